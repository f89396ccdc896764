//! The property checked by the `keys` fuzz target, as a plain function so it
//! also runs on stable: `tests/fuzz_corpus.rs` replays the corpus
//! (`tests/fuzz_corpus/keys/`) through it and the fuzz target
//! (`fuzz/fuzz_targets/keys.rs`) includes this file with `#[path]`. Both live
//! under `tests/` so the published package builds and runs that test (cargo
//! leaves the nested `fuzz/` crate out of the package).
//!
//! Input layout: the request target, then optionally `\n` and header lines
//! `name: value` separated by `\n`. Properties checked: no panic; the key
//! without the host always keys and the key of the key (read back as a URI)
//! is the key; the default key (with the host) is refused only when an
//! absolute-form target names another host than the `Host` header (the one
//! refusal the API allows), its first line is the key without the host, and
//! header values can't add lines.

use cachefence::key::{DefaultKey, MakeKey};
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

    // Without the host, the key (path and sorted query) refuses nothing,
    // and keying the key gives the key.
    let plain = DefaultKey::new().with_host(false);
    let Some(key) = plain.make_key(&parts) else {
        panic!("the key without host refused {:?}", parts.uri);
    };
    let Ok(again) = Uri::try_from(key.as_str()) else {
        panic!("the key {key:?} of {:?} is not a URI", parts.uri);
    };
    let Ok(again) = Request::get(again).body(()) else {
        panic!("the key {key:?} makes no request");
    };
    let (again, ()) = again.into_parts();
    assert_eq!(
        plain.make_key(&again).as_deref(),
        Some(key.as_str()),
        "keying the key changes it"
    );

    // The default key (with the host, and here every header): refused only
    // when the absolute-form target's authority and the `Host` header name
    // different hosts (the one refusal the API allows); never when they are
    // equal but for case. Its first line is the key without the host, and
    // header values can't add lines.
    let mut with = DefaultKey::new();
    for name in &names {
        with = with.with_header(name.clone());
    }
    let host = parts
        .headers
        .get(http::header::HOST)
        .map(HeaderValue::as_bytes);
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let same = matches!((host, authority), (Some(h), Some(a)) if h.eq_ignore_ascii_case(a));
    let both = host.is_some() && authority.is_some();
    match with.make_key(&parts) {
        None => assert!(
            both && !same,
            "the default key refused a request without a host conflict"
        ),
        Some(with_key) => {
            assert_eq!(
                with_key.split('\n').next(),
                Some(key.as_str()),
                "{with_key:?}"
            );
            let lines = with_key.matches('\n').count();
            assert!(
                lines == names.len() || lines == names.len() + 1,
                "{with_key:?}"
            );
        }
    }
}
