//! A stored response and its encoding into the fields of a Redis hash.
//!
//! Format 2: what only Rust reads (status, fill time, stale time, body
//! length, headers) is packed into one `head` field ([`encode_head`]); the
//! fields the scripts read stay separate (`v`, `pass`, `vary`, `stored`,
//! `fresh`, `gen`, `key`, `near`, `tags`, `retry`, `fails`). Fewer fields
//! cost Redis less memory per entry and a lookup fewer reply values.
//! Entries of another format (format 1 had `status`, `hdrs`, `len`, `delta`
//! and `stale` fields) read as misses and are overwritten by the next fill.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The format version written into every entry. An entry with another
/// version is treated as a miss and overwritten by the next fill.
pub(crate) const FORMAT_VERSION: &str = "2";

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
        let mut fields = self.head_fields(key, token, self.body.len());
        fields.insert(2, ("body", self.body.to_vec()));
        fields
    }

    /// The hash fields a header-only write-back (FRESHEN) writes: every
    /// field but `body`, for a stored body of `body_len` bytes.
    pub(crate) fn head_fields(
        &self,
        key: &str,
        token: &str,
        body_len: usize,
    ) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("v", FORMAT_VERSION.as_bytes().to_vec()),
            ("head", encode_head(self, body_len)),
            ("stored", self.stored_ms.to_string().into_bytes()),
            ("fresh", self.fresh_ms.to_string().into_bytes()),
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

/// The fields of an entry hash a lookup reads, in the order `HMGET` asks
/// for them (the hit's one command); [`Raw`] holds them by these indexes.
/// The others (`gen`, `key`, `fails`) are the scripts'.
pub(crate) const LOOKUP_FIELDS: [&str; 8] = [
    "pass", "v", "vary", "head", "body", "stored", "fresh", "retry",
];
const PASS: usize = 0;
const V: usize = 1;
const VARY: usize = 2;
const HEAD: usize = 3;
const BODY: usize = 4;
const STORED: usize = 5;
const FRESH: usize = 6;
const RETRY: usize = 7;

/// What `HMGET <key> LOOKUP_FIELDS...` answers for a hash holding these
/// field/value pairs (for the benches' samples and the tests).
#[cfg(any(test, feature = "__internals"))]
pub(crate) fn lookup_values(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<Option<Bytes>> {
    LOOKUP_FIELDS
        .iter()
        .map(|name| {
            fields
                .iter()
                .find(|(k, _)| k == name.as_bytes())
                .map(|(_, v)| Bytes::from(v.clone()))
        })
        .collect()
}

/// The fields of a hash a lookup reads ([`LOOKUP_FIELDS`]), as the reply
/// gave them: every value a [`Bytes`] that owns the reply's buffer, so
/// header values and the body are slices of it, never copies.
#[derive(Debug, Default)]
pub(crate) struct Raw {
    slots: [Option<Bytes>; LOOKUP_FIELDS.len()],
}

impl Raw {
    /// From `HGETALL`'s (or a script's) field-value pairs; fields a lookup
    /// doesn't read are dropped.
    pub(crate) fn from_pairs(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Raw {
        let mut raw = Raw::default();
        for (name, value) in fields {
            if let Some(i) = LOOKUP_FIELDS.iter().position(|f| f.as_bytes() == name) {
                raw.slots[i] = Some(Bytes::from(value));
            }
        }
        raw
    }

    /// From `HMGET <key> LOOKUP_FIELDS...`'s values, in that order (`None`
    /// for a field that is not there). Extra values are ignored.
    pub(crate) fn from_values(values: impl IntoIterator<Item = Option<Bytes>>) -> Raw {
        let mut raw = Raw::default();
        for (slot, value) in raw.slots.iter_mut().zip(values) {
            *slot = value;
        }
        raw
    }

    fn get(&self, i: usize) -> Option<&Bytes> {
        self.slots[i].as_ref()
    }

    fn u64(&self, i: usize) -> Option<u64> {
        self.get(i).and_then(|b| parse_u64(b))
    }
}

impl Record {
    /// Reads a hash as returned by HGETALL. Anything malformed is `Missing`.
    pub(crate) fn decode(fields: Vec<(Vec<u8>, Vec<u8>)>, now: u64) -> Record {
        Record::from_raw(Raw::from_pairs(fields), now)
    }

    /// Reads the fields a lookup read. Anything malformed is `Missing`.
    pub(crate) fn from_raw(mut raw: Raw, now: u64) -> Record {
        if raw.u64(PASS).is_some_and(|until| until > now) {
            return Record::Pass;
        }
        if raw.get(V).map(|v| v.as_ref()) != Some(FORMAT_VERSION.as_bytes()) {
            return Record::Missing;
        }
        if let Some(vary) = raw.get(VARY) {
            return match decode_vary(vary) {
                Some(names) => Record::Vary(names),
                None => Record::Missing,
            };
        }
        match decode_entry(&mut raw) {
            Some(entry) => Record::Entry(entry),
            None => Record::Missing,
        }
    }
}

/// An entry, whose body must be as long as its `len` field says. The body
/// and the header values move out of the reply instead of being copied: a
/// hit serves the bytes Redis sent.
fn decode_entry(raw: &mut Raw) -> Option<Entry> {
    let head = decode_head(raw.get(HEAD)?)?;
    if raw.get(BODY)?.len() as u64 != head.body_len {
        return None;
    }
    let (status, headers, delta, stale_ms) = (head.status, head.headers, head.delta, head.stale_ms);
    let (stored_ms, fresh_ms) = (raw.u64(STORED)?, raw.u64(FRESH)?);
    Some(Entry {
        status,
        headers,
        body: raw.slots[BODY].take().unwrap_or_default(),
        delta,
        stored_ms,
        fresh_ms,
        stale_ms,
        retry_ms: raw.u64(RETRY).unwrap_or(0),
    })
}

/// A decimal `u64`: digits only (no sign, no space), as the scripts and
/// [`Entry::to_fields`] write them.
pub(crate) fn parse_u64(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The `tags` field of an entry: the response's cache tags, each as
/// `<byte length>:<tag>`, so a revalidation answered by a `304` without tag
/// headers (or a handler's tags, never stored in the headers) keeps the
/// entry in the indexes of its tags. Entries without tags have no field.
pub(crate) fn encode_tags(tags: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for tag in tags {
        out.extend_from_slice(tag.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(tag.as_bytes());
    }
    out
}

/// Reads [`encode_tags`]'s form; what is malformed ends the list.
pub(crate) fn decode_tags(mut bytes: &[u8]) -> Vec<String> {
    let mut tags = Vec::new();
    while let Some(colon) = bytes.iter().position(|&b| b == b':') {
        let Some(len) = parse_u64(&bytes[..colon]).and_then(|n| usize::try_from(n).ok()) else {
            break;
        };
        let rest = &bytes[colon + 1..];
        let Some(tag) = rest.get(..len).and_then(|t| std::str::from_utf8(t).ok()) else {
            break;
        };
        if !tag.is_empty() {
            tags.push(tag.to_owned());
        }
        bytes = &rest[len..];
    }
    tags
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

/// The fixed part of the `head` field: status, fill time, stale time and
/// body length.
const HEAD_FIXED: usize = 2 + 8 + 8 + 8;

/// The `head` field of an entry whose body is `body_len` bytes:
/// `u16 status, u64 fill time (ms), u64 stale-until (ms since the epoch),
/// u64 body length`, big-endian, then the headers as [`encode_headers`]
/// writes them. Only Rust reads it (the scripts compare it whole).
pub(crate) fn encode_head(entry: &Entry, body_len: usize) -> Vec<u8> {
    let headers = encode_headers(&entry.headers);
    let mut out = Vec::with_capacity(HEAD_FIXED + headers.len());
    out.extend_from_slice(&entry.status.as_u16().to_be_bytes());
    out.extend_from_slice(&duration_ms(entry.delta).to_be_bytes());
    out.extend_from_slice(&entry.stale_ms.to_be_bytes());
    out.extend_from_slice(&(body_len as u64).to_be_bytes());
    out.extend_from_slice(&headers);
    out
}

/// What [`decode_head`] reads.
struct Head {
    status: StatusCode,
    delta: Duration,
    stale_ms: u64,
    body_len: u64,
    headers: HeaderMap,
}

/// Reads [`encode_head`]'s form; every header value a slice of `field`.
fn decode_head(field: &Bytes) -> Option<Head> {
    let (fixed, _) = field.split_first_chunk::<HEAD_FIXED>()?;
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&fixed[i..i + 8]);
        u64::from_be_bytes(b)
    };
    Some(Head {
        status: StatusCode::from_u16(u16::from_be_bytes([fixed[0], fixed[1]])).ok()?,
        delta: Duration::from_millis(u64_at(2)),
        stale_ms: u64_at(10),
        body_len: u64_at(18),
        headers: decode_headers(&field.slice(HEAD_FIXED..))?,
    })
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

/// The headers [`encode_headers`] wrote; every value a slice of `field`.
fn decode_headers(field: &Bytes) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    let mut at = 0;
    let bytes = field.as_ref();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let (nl, rest) = rest.split_first_chunk::<2>()?;
        let (name, rest) = rest.split_at_checked(u16::from_be_bytes(*nl) as usize)?;
        let (vl, rest) = rest.split_first_chunk::<4>()?;
        let value_len = u32::from_be_bytes(*vl) as usize;
        if rest.len() < value_len {
            return None;
        }
        let start = bytes.len() - rest.len();
        let value = HeaderValue::from_maybe_shared(field.slice(start..start + value_len)).ok()?;
        headers.append(HeaderName::from_bytes(name).ok()?, value);
        at = start + value_len;
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
    #[test]
    fn tags_round_trip_whatever_they_hold() {
        let tags: Vec<String> = ["a", "b c", "1:2", "\u{e9}\n,", ""]
            .iter()
            .map(|t| (*t).to_owned())
            .collect();
        let decoded = super::decode_tags(&super::encode_tags(&tags));
        assert_eq!(decoded, tags[..4].to_vec());
        assert!(super::decode_tags(b"").is_empty());
        assert_eq!(super::decode_tags(b"1:a9:b"), vec!["a".to_owned()]);
        assert!(super::decode_tags(b"x:a").is_empty());
    }

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
            &|f| f.retain(|(k, _)| k != b"head"),
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
                    .filter(|(k, _)| k == b"head")
                    .for_each(|(_, v)| v.truncate(HEAD_FIXED + 5))
            },
            &|f| {
                f.iter_mut()
                    .filter(|(k, _)| k == b"fresh")
                    .for_each(|(_, v)| *v = b"x".to_vec())
            },
            &|f| {
                f.iter_mut()
                    .filter(|(k, _)| k == b"head")
                    .for_each(|(_, v)| v[..2].copy_from_slice(&[0xff, 0xff]))
            },
        ];
        for d in damage {
            let mut f = good.clone();
            d(&mut f);
            assert!(matches!(Record::decode(f, 0), Record::Missing));
        }
    }

    #[test]
    fn hmget_values_decode_as_the_hash_does_and_are_not_copied() {
        let e = sample();
        let values = lookup_values(&fields(&e));
        let body_at = values[BODY].as_ref().unwrap().as_ptr();
        let hdrs = values[HEAD].clone().unwrap();
        let Record::Entry(back) = Record::from_raw(Raw::from_values(values), 0) else {
            panic!("not an entry")
        };
        assert_eq!(
            (back.status, &back.headers, &back.body, back.delta),
            (e.status, &e.headers, &e.body, e.delta)
        );
        // The body and the header values are the reply's bytes.
        assert_eq!(back.body.as_ptr(), body_at);
        let within = |p: *const u8| hdrs.as_ptr_range().contains(&p);
        assert!(back.headers.values().all(|v| within(v.as_bytes().as_ptr())));
        // Every field a hit reads is one HMGET asks for; nothing else.
        let all: Vec<&str> = e.to_fields("/k", "t").iter().map(|(k, _)| *k).collect();
        for name in LOOKUP_FIELDS {
            assert!(all.contains(&name) || ["pass", "vary", "retry"].contains(&name));
        }
        // A key that is not there: HMGET answers nils.
        assert!(matches!(
            Record::from_raw(Raw::from_values(vec![None; LOOKUP_FIELDS.len()]), 0),
            Record::Missing
        ));
    }

    #[test]
    fn numbers_are_plain_decimal_digits() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"1700000000123"), Some(1_700_000_000_123));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"+1",
            b"-1",
            b" 1",
            b"1 ",
            b"1e3",
            b"x",
        ] {
            assert_eq!(parse_u64(bad), None, "{:?}", String::from_utf8_lossy(bad));
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
