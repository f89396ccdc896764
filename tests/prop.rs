//! Property tests of the key and policy parsers through the public surface.
//!
//! Case counts are small by default; `PROPTEST_CASES=N` raises them.

mod fault_support;
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cachefence::FenceLayer;
use cachefence::key::{DefaultKey, MakeKey};
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::RedisServer;
use tower::{Layer, ServiceExt};

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    }
}

fn parts_of(uri: &http::Uri) -> http::request::Parts {
    Request::get(uri.clone()).body(()).unwrap().into_parts().0
}

/// Request targets: mostly URI-ish bytes (with `%`, `?`, `&`, `=`, glob
/// characters), sometimes anything, sometimes absolute-form.
fn target() -> impl Strategy<Value = Vec<u8>> {
    let uri_byte = prop_oneof![
        4 => prop::sample::select(
            b"abcXYZ019/?&=%*[]\\{}#.-_~!$'()+,;:@ \"<>^`|".to_vec()
        ),
        1 => any::<u8>(),
    ];
    (
        prop::bool::weighted(0.2),
        prop::collection::vec(uri_byte, 0..64),
    )
        .prop_map(|(absolute, rest)| {
            let mut t = if absolute {
                b"http://Host.example:8080/".to_vec()
            } else {
                b"/".to_vec()
            };
            t.extend(rest);
            t
        })
}

fn params(key: &str) -> Vec<String> {
    let mut p: Vec<String> = key
        .split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    p.sort();
    p
}

#[test]
fn default_keys_never_panic_and_are_idempotent() {
    let mut runner = TestRunner::new(config(512));
    let result = runner.run(
        &(target(), prop::collection::vec(any::<u8>(), 0..32)),
        |(target, header)| {
            let Ok(uri) = http::Uri::try_from(target.as_slice()) else {
                return Ok(());
            };
            let parts = parts_of(&uri);
            let key = DefaultKey::new()
                .with_host(false)
                .make_key(&parts)
                .ok_or_else(|| TestCaseError::fail("no key"))?;
            prop_assert!(key.starts_with('/'), "{key:?}");
            // The key of the key (as a URI) is the key.
            let again = http::Uri::try_from(key.as_str())
                .map_err(|e| TestCaseError::fail(format!("key {key:?} is no URI: {e}")))?;
            prop_assert_eq!(
                DefaultKey::new()
                    .with_host(false)
                    .make_key(&parts_of(&again)),
                Some(key.clone())
            );
            // Sorting keeps every non-empty parameter.
            let original = format!("{}?{}", uri.path(), uri.query().unwrap_or(""));
            prop_assert_eq!(params(&key), params(&original));
            // With the host and a header: no panic; the header value can't
            // add lines (it is escaped).
            let mut parts = parts;
            let mut host_header = None;
            if let Ok(v) = HeaderValue::from_bytes(&header) {
                parts.headers.insert("x-tenant", v.clone());
                parts.headers.insert(http::header::HOST, v.clone());
                host_header = Some(v);
            }
            let k = DefaultKey::new()
                .with_host(true)
                .with_header(HeaderName::from_static("x-tenant"))
                .make_key(&parts);
            // An absolute-form target naming another host than `Host` is not
            // cached (it could file one host's answer under another); hosts
            // are compared normalised, so only a raw difference can refuse.
            let differs = match (uri.authority(), &host_header) {
                (Some(a), Some(h)) => !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()),
                _ => false,
            };
            let Some(k) = k else {
                prop_assert!(differs, "refused without a host conflict");
                return Ok(());
            };
            // The URL, then the host line (if any), then the header line.
            let lines: Vec<&str> = k.split('\n').collect();
            prop_assert_eq!(lines[0], key.as_str());
            prop_assert!((2..=3).contains(&lines.len()), "{:?}", k);
            if lines.len() == 3 {
                prop_assert!(lines[1].starts_with("host:"), "{:?}", k);
            }
            prop_assert!(lines[lines.len() - 1].starts_with("x-tenant:"), "{:?}", k);
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Cache-Control values: directive soup or raw bytes.
fn cache_control() -> impl Strategy<Value = Vec<u8>> {
    let directive = prop_oneof![
        Just("no-store".to_owned()),
        Just("no-cache".to_owned()),
        Just("private".to_owned()),
        Just("public".to_owned()),
        Just("must-revalidate".to_owned()),
        any::<u64>().prop_map(|n| format!("max-age={n}")),
        (0u64..100).prop_map(|n| format!("max-age={n}")),
        (0u64..100).prop_map(|n| format!("s-maxage=\"{n}\"")),
        "[a-z=\" ,-]{0,12}".prop_map(|s| s),
        Just("max-age=99999999999999999999999999".to_owned()),
        Just("private=\"set-cookie, x\"".to_owned()),
    ];
    prop_oneof![
        3 => prop::collection::vec(directive, 0..4).prop_map(|d| d.join(", ").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..24),
    ]
}

/// Vary values: header-name soup or raw bytes.
fn vary() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just("accept-language".to_owned()),
        Just("Accept-Language".to_owned()),
        Just("accept-encoding".to_owned()),
        Just("*".to_owned()),
        Just(String::new()),
        "[a-zA-Z -]{0,10}".prop_map(|s| s),
    ];
    prop_oneof![
        3 => prop::collection::vec(name, 0..4).prop_map(|n| n.join(",").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..24),
    ]
}

fn varies_on_language(vary: &[u8]) -> bool {
    vary.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        t == b"*" || t.eq_ignore_ascii_case(b"accept-language")
    })
}

#[test]
fn arbitrary_cache_control_and_vary_never_break_a_response() {
    let redis = RedisServer::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    // Every body the origin produced, by path.
    let produced: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let origin = {
        let (calls, produced) = (calls.clone(), produced.clone());
        tower::service_fn(move |req: Request<String>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let lang = req
                .headers()
                .get("accept-language")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let body = format!("{} al={lang} #{n}", req.uri().path());
            produced
                .lock()
                .unwrap()
                .entry(req.uri().path().to_owned())
                .or_default()
                .push(body.clone());
            let mut res = Response::new(Full::new(Bytes::from(body)));
            for (from, to) in [("x-cc", "cache-control"), ("x-vary", "vary")] {
                if let Some(v) = req.headers().get(from) {
                    res.headers_mut().insert(to, v.clone());
                }
            }
            async move { Ok::<_, std::convert::Infallible>(res) }
        })
    };
    let fence = rt.block_on(async {
        FenceLayer::new(redis.connection_manager().await)
            .namespace("prop:")
            .respect_cache_control(true)
            .beta(0.0)
            .layer(origin)
    });
    let case = AtomicU64::new(0);
    let mut runner = TestRunner::new(config(64));
    let result = runner.run(
        &(cache_control(), vary(), prop::collection::vec(0u8..3, 1..5)),
        |(cc, vary, langs)| {
            let path = format!("/p/{}", case.fetch_add(1, Ordering::SeqCst));
            rt.block_on(async {
                for lang in langs {
                    let mut req = Request::get(path.as_str());
                    if let Ok(v) = HeaderValue::from_bytes(&cc) {
                        req = req.header("x-cc", v);
                    }
                    if let Ok(v) = HeaderValue::from_bytes(&vary) {
                        req = req.header("x-vary", v);
                    }
                    let lang = ["en", "fr", ""][lang as usize];
                    if !lang.is_empty() {
                        req = req.header("accept-language", lang);
                    }
                    let res = fence
                        .clone()
                        .oneshot(req.body(String::new()).unwrap())
                        .await
                        .unwrap();
                    prop_assert_eq!(res.status(), 200);
                    let status = res
                        .headers()
                        .get("x-cache")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let body = res.into_body().collect().await.unwrap().to_bytes();
                    let body = String::from_utf8(body.to_vec()).unwrap();
                    let bodies = produced
                        .lock()
                        .unwrap()
                        .get(&path)
                        .cloned()
                        .unwrap_or_default();
                    prop_assert!(
                        bodies.contains(&body),
                        "{:?} ({:?}) is not a response of the origin: {:?}",
                        body,
                        status,
                        bodies
                    );
                    if varies_on_language(&vary) {
                        prop_assert!(
                            body.contains(&format!(" al={lang} #")),
                            "Vary {:?}: {:?} served to accept-language {:?}",
                            String::from_utf8_lossy(&vary),
                            body,
                            lang
                        );
                    }
                }
                Ok(())
            })
        },
    );
    drop(fence);
    eprintln!(
        "policy: {} cases, {} origin calls",
        case.load(Ordering::SeqCst),
        calls.load(Ordering::SeqCst)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    // Every key the cache wrote expires (index keys and fences, which
    // have no TTL, when the keep set says they are due).
    for k in fault_support::scan(&redis, "*") {
        let k = String::from_utf8_lossy(&k).into_owned();
        if k == "prop:|#keep" {
            continue;
        }
        let ttl: i64 = redis.cli(&["PTTL", &k]).parse().unwrap();
        let kept = !redis.cli(&["ZSCORE", "prop:|#keep", &k]).is_empty();
        assert!(ttl > 0 || kept, "{k} has no TTL ({ttl})");
    }
}
