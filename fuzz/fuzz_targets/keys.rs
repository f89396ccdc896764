//! Fuzzes the default cache key through the public API:
//! `cargo +nightly fuzz run keys` (from the crate root).
//!
//! Input layout: the request target, then optionally `\n` and header lines
//! `name: value` separated by `\n`. Properties checked: no panic, the key of
//! the key (read back as a URI) is the key, header values can't add lines.
#![no_main]

use cachefence::{DefaultKey, MakeKey};
use http::{HeaderName, HeaderValue, Request, Uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let target = lines.next().unwrap_or_default();
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let mut req = Request::get(uri)
        .body(())
        .expect("a valid URI makes a request");
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

    let key = DefaultKey::new()
        .make_key(&parts)
        .expect("the default key always keys");
    let again = Uri::try_from(key.as_str()).expect("a key is a URI");
    let (again, ()) = Request::get(again).body(()).unwrap().into_parts();
    assert_eq!(
        DefaultKey::new().make_key(&again).as_deref(),
        Some(key.as_str())
    );

    let mut with = DefaultKey::new().with_host(true);
    for name in &names {
        with = with.with_header(name.clone());
    }
    let key = with.make_key(&parts).expect("the default key always keys");
    assert!(key.starts_with("//"));
    assert_eq!(key.matches('\n').count(), names.len());
});
