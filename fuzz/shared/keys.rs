//! The property checked by the `keys` fuzz target, as a plain function so it
//! also runs on stable: `tests/fuzz_corpus.rs` replays the corpus through it
//! and the fuzz target (`fuzz/fuzz_targets/keys.rs`) includes this file with
//! `#[path]`.
//!
//! Input layout: the request target, then optionally `\n` and header lines
//! `name: value` separated by `\n`. Properties checked: no panic; the default
//! key always keys and the key of the key (read back as a URI) is the key;
//! with `with_host(true)` the key is refused exactly when an absolute-form
//! target names another host than the `Host` header (the one refusal the API
//! allows), and header values can't add lines.

use cachefence::{DefaultKey, MakeKey};
use http::{HeaderName, HeaderValue, Request, Uri};

/// Runs the checks on one input; panics when a property breaks.
pub(crate) fn check(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let target = lines.next().unwrap_or_default();
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let Ok(mut req) = Request::get(uri).body(()) else {
        return;
    };
    let mut names = Vec::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        req.headers_mut().append(name.clone(), value);
        names.push(name);
    }
    let (parts, ()) = req.into_parts();

    // The default key (path and sorted query) refuses nothing.
    let Some(key) = DefaultKey::new().make_key(&parts) else {
        panic!("the default key refused {:?}", parts.uri);
    };
    let Ok(again) = Uri::try_from(key.as_str()) else {
        panic!("the key {key:?} of {:?} is not a URI", parts.uri);
    };
    let Ok(again) = Request::get(again).body(()) else {
        panic!("the key {key:?} makes no request");
    };
    let (again, ()) = again.into_parts();
    assert_eq!(
        DefaultKey::new().make_key(&again).as_deref(),
        Some(key.as_str()),
        "keying the key changes it"
    );

    // With the host: refused when the absolute-form target's authority is
    // not the `Host` header (compared case-insensitively, on the first one).
    let mut with = DefaultKey::new().with_host(true);
    for name in &names {
        with = with.with_header(name.clone());
    }
    let host = parts
        .headers
        .get(http::header::HOST)
        .map(HeaderValue::as_bytes);
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let conflict = matches!((host, authority), (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a));
    match with.make_key(&parts) {
        None => assert!(
            conflict,
            "with_host refused a request without a host conflict"
        ),
        Some(key) => {
            assert!(
                !conflict,
                "with_host keyed a request whose target names another host"
            );
            assert!(key.starts_with("//"), "{key:?}");
            assert_eq!(key.matches('\n').count(), names.len(), "{key:?}");
        }
    }
}
