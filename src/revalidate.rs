//! Revalidation (RFC 9111 §4.3): a fill that replaces an entry it holds
//! asks the origin with the entry's validators, and a `304 Not Modified`
//! freshens the entry: its stored headers are updated from the 304 (§3.2,
//! §4.3.4) and its body is kept.
//!
//! The fill is the usual one-per-key fill under the lease; the freshened
//! response is shared like a full 200, and written back header-only: the
//! FRESHEN script (src/scripts.rs) rewrites the entry's head fields and
//! expiry, fenced like STORE, and leaves its body in Redis. When the entry
//! was removed or replaced meanwhile the fill stores the response in full.

use http::header::{
    CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, TRANSFER_ENCODING,
};
use http::{HeaderMap, response};

use crate::entry::Entry;

/// Adds the validators of `entry` to a fill's request (whose client-only
/// headers were stripped): `If-None-Match` with its `ETag` and
/// `If-Modified-Since` with its `Last-Modified` (RFC 9111 §4.3.1: the
/// entity tag must be sent, the date should). Returns whether it did.
pub(crate) fn ask(headers: &mut HeaderMap, entry: &Entry) -> bool {
    if crate::conditional::is_own_answer(entry.status) {
        return false;
    }
    let mut asked = false;
    if let Some(etag) = entry.headers.get(ETAG) {
        headers.insert(IF_NONE_MATCH, etag.clone());
        asked = true;
    }
    if let Some(modified) = entry.headers.get(LAST_MODIFIED) {
        headers.insert(IF_MODIFIED_SINCE, modified.clone());
        asked = true;
    }
    asked
}

/// The response a 304 makes of `entry`: its status, its headers updated with
/// every field of the 304 except those describing the body, and the 304's
/// extensions (a handler's [`CacheTtl`](crate::CacheTtl) still counts).
pub(crate) fn freshened(entry: &Entry, mut not_modified: response::Parts) -> response::Parts {
    let mut headers = entry.headers.clone();
    let keep_stored = [
        CONTENT_LENGTH,
        CONTENT_RANGE,
        CONTENT_ENCODING,
        TRANSFER_ENCODING,
    ];
    for name in not_modified.headers.keys() {
        if !keep_stored.contains(name) {
            headers.remove(name);
        }
    }
    for (name, value) in &not_modified.headers {
        if !keep_stored.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    not_modified.status = entry.status;
    not_modified.headers = headers;
    not_modified
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(pairs: &[(&'static str, &'static str)]) -> Entry {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(*k, v.parse().unwrap());
        }
        Entry {
            status: http::StatusCode::OK,
            headers,
            body: bytes::Bytes::from_static(b"body"),
            delta: Duration::ZERO,
            stored_ms: 0,
            fresh_ms: 0,
            stale_ms: 0,
            retry_ms: 0,
        }
    }

    #[test]
    fn validators_are_the_etag_and_last_modified() {
        let mut h = HeaderMap::new();
        assert!(ask(
            &mut h,
            &entry(&[("etag", "\"a\""), ("last-modified", "x")])
        ));
        assert_eq!(h[IF_NONE_MATCH], "\"a\"");
        assert_eq!(h[IF_MODIFIED_SINCE], "x");
        let mut h = HeaderMap::new();
        assert!(ask(&mut h, &entry(&[("last-modified", "x")])));
        assert_eq!(h[IF_MODIFIED_SINCE], "x");
        assert!(!ask(&mut HeaderMap::new(), &entry(&[])));
    }

    #[test]
    fn a_304_updates_stored_headers_but_not_the_body_description() {
        let stored = entry(&[
            ("etag", "\"a\""),
            ("content-type", "text/plain"),
            ("content-length", "4"),
            ("x-old", "1"),
        ]);
        let mut res = http::Response::new(());
        *res.status_mut() = http::StatusCode::NOT_MODIFIED;
        res.headers_mut().insert("etag", "\"a\"".parse().unwrap());
        res.headers_mut().insert("x-new", "2".parse().unwrap());
        res.headers_mut()
            .insert("content-length", "0".parse().unwrap());
        let parts = freshened(&stored, res.into_parts().0);
        assert_eq!(parts.status, http::StatusCode::OK);
        assert_eq!(parts.headers["content-length"], "4");
        assert_eq!(parts.headers["x-new"], "2");
        assert_eq!(parts.headers["x-old"], "1");
        assert_eq!(parts.headers["content-type"], "text/plain");
        assert_eq!(parts.headers.get_all("etag").iter().count(), 1);
    }
}
