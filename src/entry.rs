//! A stored response and its encoding into the fields of a Redis hash.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The format version written into every entry. An entry with another
/// version is treated as a miss and overwritten by the next fill.
pub(crate) const FORMAT_VERSION: &str = "1";

/// A cached response.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// How long the fill that produced it took.
    pub(crate) delta: Duration,
    /// When it was stored (ms since the epoch).
    pub(crate) stored_ms: u64,
    /// Fresh until (ms since the epoch).
    pub(crate) fresh_ms: u64,
    /// May be served stale until (ms since the epoch).
    pub(crate) stale_ms: u64,
    /// No background refresh before this time (ms since the epoch): the last
    /// refresh failed and the next one backs off (0: none).
    pub(crate) retry_ms: u64,
}

/// What a primary or variant hash holds.
#[derive(Debug)]
pub(crate) enum Record {
    /// Nothing, or something unreadable (treated as a miss).
    Missing,
    /// A response.
    Entry(Entry),
    /// The response varies on these request headers: look the variant up.
    Vary(Vec<HeaderName>),
    /// A "pass" marker (hit-for-miss) is active: go to the origin.
    Pass,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Entry {
    /// The hash fields to store.
    pub(crate) fn to_fields(&self, key: &str, token: &str) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("v", FORMAT_VERSION.as_bytes().to_vec()),
            ("status", self.status.as_str().as_bytes().to_vec()),
            ("hdrs", encode_headers(&self.headers)),
            ("body", self.body.to_vec()),
            ("len", self.body.len().to_string().into_bytes()),
            ("delta", duration_ms(self.delta).to_string().into_bytes()),
            ("stored", self.stored_ms.to_string().into_bytes()),
            ("fresh", self.fresh_ms.to_string().into_bytes()),
            ("stale", self.stale_ms.to_string().into_bytes()),
            ("gen", token.as_bytes().to_vec()),
            ("key", key.as_bytes().to_vec()),
        ]
    }

    pub(crate) fn is_fresh(&self, now: u64) -> bool {
        now < self.fresh_ms
    }

    pub(crate) fn is_usable_stale(&self, now: u64) -> bool {
        now < self.stale_ms
    }

    /// Whether a background refresh may start now: not while the backoff
    /// of a failed refresh runs.
    pub(crate) fn may_refresh(&self, now: u64) -> bool {
        now >= self.retry_ms
    }

    /// Whether at least `share` of the fresh lifetime has passed.
    pub(crate) fn past_share(&self, now: u64, share: f64) -> bool {
        let lifetime = self.fresh_ms.saturating_sub(self.stored_ms) as f64;
        now.saturating_sub(self.stored_ms) as f64 >= lifetime * share
    }

    /// Seconds since it was stored, for the `Age` header.
    pub(crate) fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_ms) / 1000
    }
}

impl Record {
    /// Reads a hash as returned by HGETALL. Anything malformed is `Missing`.
    pub(crate) fn decode(mut fields: Vec<(Vec<u8>, Vec<u8>)>, now: u64) -> Record {
        if fields.is_empty() {
            return Record::Missing;
        }
        let get = |name: &[u8]| {
            fields
                .iter()
                .find(|(k, _)| k.as_slice() == name)
                .map(|(_, v)| v.as_slice())
        };
        if get(b"pass")
            .and_then(parse_u64)
            .is_some_and(|until| until > now)
        {
            return Record::Pass;
        }
        if get(b"v") != Some(FORMAT_VERSION.as_bytes()) {
            return Record::Missing;
        }
        if let Some(vary) = get(b"vary") {
            return match decode_vary(vary) {
                Some(names) => Record::Vary(names),
                None => Record::Missing,
            };
        }
        let Some(entry) = decode_entry(&get) else {
            return Record::Missing;
        };
        // The body moves out of the reply instead of being copied: a hit
        // serves the bytes Redis sent.
        let body = fields
            .iter_mut()
            .find(|(k, _)| k.as_slice() == b"body")
            .map(|(_, v)| Bytes::from(std::mem::take(v)))
            .unwrap_or_default();
        Record::Entry(Entry { body, ..entry })
    }
}

/// Everything of an entry but its body (left empty), which must be as
/// long as its `len` field says.
fn decode_entry<'a>(get: &dyn Fn(&[u8]) -> Option<&'a [u8]>) -> Option<Entry> {
    let status = StatusCode::from_bytes(get(b"status")?).ok()?;
    let headers = decode_headers(get(b"hdrs")?)?;
    let len = get(b"len").and_then(parse_u64)?;
    if get(b"body")?.len() as u64 != len {
        return None;
    }
    Some(Entry {
        status,
        headers,
        body: Bytes::new(),
        delta: Duration::from_millis(get(b"delta").and_then(parse_u64)?),
        stored_ms: get(b"stored").and_then(parse_u64)?,
        fresh_ms: get(b"fresh").and_then(parse_u64)?,
        stale_ms: get(b"stale").and_then(parse_u64)?,
        retry_ms: get(b"retry").and_then(parse_u64).unwrap_or(0),
    })
}

pub(crate) fn parse_u64(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

pub(crate) fn encode_vary(names: &[HeaderName]) -> String {
    names
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

fn decode_vary(bytes: &[u8]) -> Option<Vec<HeaderName>> {
    if bytes.is_empty() {
        return None;
    }
    bytes
        .split(|&b| b == b',')
        .map(|n| HeaderName::from_bytes(n).ok())
        .collect()
}

/// `u16 name length, name, u32 value length, value`, for every header.
pub(crate) fn encode_headers(headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let (n, v) = (name.as_str().as_bytes(), value.as_bytes());
        // Header names and values are far below these limits; skip any
        // that are not rather than write a field that cannot be read.
        let (Ok(nl), Ok(vl)) = (u16::try_from(n.len()), u32::try_from(v.len())) else {
            continue;
        };
        out.extend_from_slice(&nl.to_be_bytes());
        out.extend_from_slice(n);
        out.extend_from_slice(&vl.to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn decode_headers(mut bytes: &[u8]) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    while !bytes.is_empty() {
        let (nl, rest) = bytes.split_first_chunk::<2>()?;
        let (name, rest) = rest.split_at_checked(u16::from_be_bytes(*nl) as usize)?;
        let (vl, rest) = rest.split_first_chunk::<4>()?;
        let (value, rest) = rest.split_at_checked(u32::from_be_bytes(*vl) as usize)?;
        headers.append(
            HeaderName::from_bytes(name).ok()?,
            HeaderValue::from_bytes(value).ok()?,
        );
        bytes = rest;
    }
    Some(headers)
}

/// Headers that are stored: not hop-by-hop, not per-client, not the ones the
/// cache adds itself.
pub(crate) fn storable_headers(
    headers: &HeaderMap,
    cache_own: impl Fn(&HeaderName) -> bool,
) -> HeaderMap {
    use http::header::{
        AGE, CONNECTION, CONTENT_LENGTH, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, SET_COOKIE, TE,
        TRAILER, TRANSFER_ENCODING, UPGRADE,
    };
    const HOP_BY_HOP: [&str; 2] = ["keep-alive", "proxy-connection"];
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            if let Ok(name) = HeaderName::from_bytes(token.trim_ascii()) {
                named.push(name);
            }
        }
    }
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let drop = [
            &CONNECTION,
            &TE,
            &TRAILER,
            &TRANSFER_ENCODING,
            &UPGRADE,
            &PROXY_AUTHENTICATE,
            &PROXY_AUTHORIZATION,
            &SET_COOKIE,
            &AGE,
            &CONTENT_LENGTH,
        ]
        .contains(&name)
            || HOP_BY_HOP.contains(&name.as_str())
            || named.contains(name)
            || cache_own(name);
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Entry {
            status: StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from_static(b"hello"),
            delta: Duration::from_millis(42),
            stored_ms: 1_000,
            fresh_ms: 2_000,
            stale_ms: 3_000,
            retry_ms: 0,
        }
    }

    fn fields(e: &Entry) -> Vec<(Vec<u8>, Vec<u8>)> {
        e.to_fields("/k", "tok")
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v))
            .collect()
    }

    #[test]
    fn an_entry_round_trips_through_hash_fields() {
        let e = sample();
        let Record::Entry(back) = Record::decode(fields(&e), 0) else {
            panic!("not an entry")
        };
        assert_eq!(back.status, e.status);
        assert_eq!(back.headers, e.headers);
        assert_eq!(back.body, e.body);
        assert_eq!(back.delta, e.delta);
        assert_eq!(
            (back.stored_ms, back.fresh_ms, back.stale_ms),
            (1_000, 2_000, 3_000)
        );
    }

    #[test]
    fn damaged_entries_read_as_missing() {
        let good = fields(&sample());
        type Fields = Vec<(Vec<u8>, Vec<u8>)>;
        let damage: [&dyn Fn(&mut Fields); 6] = [
            &|f| f.retain(|(k, _)| k != b"status"),
            &|f| {
                f.iter_mut()
                    .filter(|(k, _)| k == b"body")
                    .for_each(|(_, v)| v.truncate(2))
            },
            &|f| {
                f.iter_mut()
                    .filter(|(k, _)| k == b"v")
                    .for_each(|(_, v)| *v = b"99".to_vec())
            },
            &|f| {
                f.iter_mut()
                    .filter(|(k, _)| k == b"hdrs")
                    .for_each(|(_, v)| v.truncate(5))
            },
            &|f| {
                f.iter_mut()
                    .filter(|(k, _)| k == b"fresh")
                    .for_each(|(_, v)| *v = b"x".to_vec())
            },
            &|f| {
                f.iter_mut()
                    .filter(|(k, _)| k == b"status")
                    .for_each(|(_, v)| *v = vec![0xff])
            },
        ];
        for d in damage {
            let mut f = good.clone();
            d(&mut f);
            assert!(matches!(Record::decode(f, 0), Record::Missing));
        }
    }

    #[test]
    fn an_active_pass_marker_wins_over_an_entry() {
        let mut f = fields(&sample());
        f.push((b"pass".to_vec(), b"500".to_vec()));
        assert!(matches!(Record::decode(f.clone(), 499), Record::Pass));
        assert!(matches!(Record::decode(f, 500), Record::Entry(_)));
    }

    #[test]
    fn hop_by_hop_and_per_client_headers_are_not_stored() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "x-private, close"),
            ("x-private", "1"),
            ("keep-alive", "5"),
            ("transfer-encoding", "chunked"),
            ("set-cookie", "a=b"),
            ("x-cache", "MISS"),
            ("content-type", "text/plain"),
            ("age", "3"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        let stored = storable_headers(&h, |n| n == "x-cache");
        assert_eq!(stored.len(), 1);
        assert!(stored.contains_key("content-type"));
    }
}
