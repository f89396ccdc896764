//! The `Cache-Status` response header (RFC 9211), beside or instead of the
//! `x-cache` style status header.
//!
//! This cache appends its own member, `<identifier>; <params>`, after the
//! members of caches nearer the origin (RFC 9211 §2): a hit is
//! `hit; ttl=<seconds of freshness left>` (negative when a stale entry is
//! served); a response from the origin says why it was forwarded
//! (`fwd=uri-miss`: nothing stored; `fwd=stale`: the stored response was
//! stale, and `fwd-status=304` when the origin revalidated it;
//! `fwd=request`: the request asked for a fresh copy; `fwd=bypass`: not
//! handled by the cache, with `detail=redis-unavailable` when that is
//! because Redis could not be used), then `fwd-status`, `stored` when the
//! fill stored it under its lease, and `collapsed` when the request waited
//! on another request's fill.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::flight::CacheStatus;

/// The header's name.
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The identifier of this cache in the header, as a structured-field item:
/// a token when it is one, else a quoted string (non-printable bytes
/// dropped). `None` for an empty identifier.
pub(crate) fn identifier(name: &str) -> Option<String> {
    let name = name.trim();
    let mut chars = name.chars();
    let first = chars.next()?;
    // sf-token: ( ALPHA / "*" ) *( tchar / ":" / "/" )
    let is_token = (first.is_ascii_alphabetic() || first == '*')
        && chars.all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c));
    if is_token {
        return Some(name.to_owned());
    }
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    Some(quoted)
}

/// What a response served from an entry tells the header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FromEntry {
    /// Freshness left, in whole seconds (floored; negative when stale).
    pub(crate) ttl: i64,
    /// The status the origin answered when the entry was filled.
    pub(crate) status: StatusCode,
    /// Whether the entry was made to be stored, rather than only handed to
    /// the requests that waited on its fill (or made by the cache itself).
    pub(crate) stored: bool,
}

impl FromEntry {
    pub(crate) fn new(entry: &crate::entry::Entry, now_ms: u64) -> Self {
        let left = i128::from(entry.fresh_ms) - i128::from(now_ms);
        let ttl = left.div_euclid(1000);
        Self {
            ttl: i64::try_from(ttl).unwrap_or(if ttl < 0 { i64::MIN } else { i64::MAX }),
            status: entry.status,
            // Fills give the entries they only hand to their waiters (and
            // the cache's own 504) no stale time (src/fill.rs).
            stored: entry.stale_ms != 0,
        }
    }
}

/// Appends this cache's member for a response served as `status`, from an
/// entry or not.
pub(crate) fn mark(
    identifier: &str,
    headers: &mut HeaderMap,
    status: CacheStatus,
    entry: Option<FromEntry>,
) {
    let mut value = String::with_capacity(identifier.len() + 40);
    value.push_str(identifier);
    let fwd = match status {
        CacheStatus::Hit | CacheStatus::Stale => None,
        CacheStatus::Miss => Some("uri-miss"),
        CacheStatus::Refreshed { .. } => Some("stale"),
        CacheStatus::Refetched { .. } => Some("request"),
        CacheStatus::Bypass | CacheStatus::Unavailable => Some("bypass"),
    };
    match fwd {
        Some(fwd) => {
            value.push_str("; fwd=");
            value.push_str(fwd);
        }
        None => value.push_str("; hit"),
    }
    if let Some(entry) = entry {
        if fwd.is_some() {
            // A fill's response, handed to the requests it answers.
            let revalidated = matches!(
                status,
                CacheStatus::Refreshed { revalidated: true }
                    | CacheStatus::Refetched { revalidated: true }
            );
            let origin = if revalidated {
                StatusCode::NOT_MODIFIED
            } else {
                entry.status
            };
            value.push_str(&format!("; fwd-status={}", origin.as_u16()));
            if entry.stored && status.is_fill() {
                value.push_str("; stored");
            }
        } else {
            value.push_str(&format!("; ttl={}", entry.ttl));
        }
    }
    if status == CacheStatus::Unavailable {
        value.push_str("; detail=redis-unavailable");
    }
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.append(CACHE_STATUS, value);
    }
}

/// Adds a parameter to this cache's member (the last one) if it was
/// forwarded and doesn't have it yet.
pub(crate) fn add_param(identifier: &str, headers: &mut HeaderMap, param: &str) {
    edit_own(identifier, headers, |own| {
        let name = |p: &str| p.trim().split('=').next().unwrap_or_default().to_owned();
        if !own.contains("; fwd=") || own.split(';').any(|p| name(p) == name(param)) {
            return None;
        }
        Some(format!("{own}; {param}"))
    });
}

/// Marks a forwarded response handed to a request that waited on another
/// request's fill (a fill that found the entry stored elsewhere stays a
/// plain `hit`).
pub(crate) fn collapsed(config: &crate::config::Config, headers: &mut HeaderMap) {
    if let Some(id) = &config.cache_status {
        add_param(id, headers, "collapsed");
    }
}

/// Adds `fwd-status` to this cache's member, right after its `fwd`, when
/// the response was forwarded and the member doesn't say it yet.
pub(crate) fn finish(identifier: &str, headers: &mut HeaderMap, status: StatusCode) {
    edit_own(identifier, headers, |own| {
        if own.contains("; fwd-status=") {
            return None;
        }
        let start = own.find("; fwd=")? + 2;
        let end = own[start..].find(';').map_or(own.len(), |i| start + i);
        Some(format!(
            "{}; fwd-status={}{}",
            &own[..end],
            status.as_u16(),
            &own[end..]
        ))
    });
}

/// Replaces the last `Cache-Status` field line if it is this cache's member
/// and `edit` returns a new one.
fn edit_own(identifier: &str, headers: &mut HeaderMap, edit: impl FnOnce(&str) -> Option<String>) {
    let Some(last) = headers.get_all(CACHE_STATUS).iter().next_back() else {
        return;
    };
    let Ok(own) = last.to_str() else { return };
    if own.split(';').next().map(str::trim) != Some(identifier) {
        return;
    }
    let Some(new) = edit(own) else { return };
    let Ok(new) = HeaderValue::try_from(new) else {
        return;
    };
    let mut values: Vec<HeaderValue> = headers.get_all(CACHE_STATUS).iter().cloned().collect();
    values.pop();
    values.push(new);
    headers.remove(CACHE_STATUS);
    for v in values {
        headers.append(CACHE_STATUS, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_tokens_or_quoted_strings() {
        assert_eq!(identifier("cachefence").as_deref(), Some("cachefence"));
        assert_eq!(identifier("edge/1:a").as_deref(), Some("edge/1:a"));
        assert_eq!(
            identifier("my cache \"x\"\n").as_deref(),
            Some("\"my cache \\\"x\\\"\"")
        );
        assert_eq!(identifier("1st").as_deref(), Some("\"1st\""));
        assert_eq!(identifier("  "), None);
    }

    #[test]
    fn members_are_appended_after_upstream_ones_and_finished() {
        let mut h = HeaderMap::new();
        h.append(CACHE_STATUS, HeaderValue::from_static("origin-cdn; hit"));
        mark("cf", &mut h, CacheStatus::Bypass, None);
        finish("cf", &mut h, StatusCode::CREATED);
        finish("cf", &mut h, StatusCode::OK);
        let all: Vec<_> = h.get_all(CACHE_STATUS).iter().collect();
        assert_eq!(all, ["origin-cdn; hit", "cf; fwd=bypass; fwd-status=201"]);

        let mut h = HeaderMap::new();
        let entry = |ttl, stored| FromEntry {
            ttl,
            status: StatusCode::OK,
            stored,
        };
        mark("cf", &mut h, CacheStatus::Stale, Some(entry(-3, true)));
        finish("cf", &mut h, StatusCode::OK);
        assert_eq!(h[CACHE_STATUS], "cf; hit; ttl=-3");

        let mut h = HeaderMap::new();
        mark("cf", &mut h, CacheStatus::Miss, Some(entry(60, true)));
        add_param("cf", &mut h, "collapsed");
        add_param("cf", &mut h, "collapsed");
        assert_eq!(
            h[CACHE_STATUS],
            "cf; fwd=uri-miss; fwd-status=200; stored; collapsed"
        );
    }

    #[test]
    fn forwards_say_why_and_a_redis_less_answer_says_so() {
        let entry = FromEntry {
            ttl: 60,
            status: StatusCode::OK,
            stored: true,
        };
        let member = |status, entry| {
            let mut h = HeaderMap::new();
            mark("cf", &mut h, status, entry);
            finish("cf", &mut h, StatusCode::OK);
            h[CACHE_STATUS].to_str().unwrap().to_owned()
        };
        let (fresh, revalidated) = (false, true);
        assert_eq!(
            member(CacheStatus::Refreshed { revalidated: fresh }, Some(entry)),
            "cf; fwd=stale; fwd-status=200; stored"
        );
        assert_eq!(
            member(CacheStatus::Refreshed { revalidated }, Some(entry)),
            "cf; fwd=stale; fwd-status=304; stored"
        );
        assert_eq!(
            member(CacheStatus::Refetched { revalidated: fresh }, Some(entry)),
            "cf; fwd=request; fwd-status=200; stored"
        );
        assert_eq!(
            member(CacheStatus::Refetched { revalidated }, Some(entry)),
            "cf; fwd=request; fwd-status=304; stored"
        );
        // Nothing is stored without Redis, whatever the entry says.
        assert_eq!(
            member(CacheStatus::Unavailable, Some(entry)),
            "cf; fwd=bypass; fwd-status=200; detail=redis-unavailable"
        );
        // fwd-status goes right after fwd when it is added last.
        assert_eq!(
            member(CacheStatus::Unavailable, None),
            "cf; fwd=bypass; fwd-status=200; detail=redis-unavailable"
        );
    }
}
