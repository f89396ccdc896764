//! Cache poisoning and hostile input (ARCHITECTURE.md, promise 6): unkeyed headers,
//! credentials, cookies, hop-by-hop headers, tenants sharing one Redis, and
//! raw request bytes over TCP that hyper's client would refuse to send.

mod fault_support;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cachefence::FenceLayer;
use cachefence::key::DefaultKey;
use fault_support::{TryHttp, entry_keys, hget, raw, raw_get, scan};
use redis::aio::ConnectionManager;
use support::origin::{Counter, routes};
use support::{RedisServer, serve};

#[derive(Clone)]
struct Origin {
    name: &'static str,
    calls: Arc<AtomicUsize>,
}

fn header_str(headers: &HeaderMap, name: &str) -> String {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Routes whose bodies echo request headers.
fn echo(origin: Origin) -> Router {
    async fn echo_header(
        State(o): State<Origin>,
        Path(name): Path<String>,
        req: Request,
    ) -> Response {
        o.calls.fetch_add(1, Ordering::SeqCst);
        let value = header_str(req.headers(), &name);
        let mut res = format!("{name}={value}").into_response();
        if req.uri().query() == Some("vary=1") {
            res.headers_mut()
                .insert(header::VARY, HeaderValue::from_str(&name).unwrap());
        }
        res
    }
    async fn host(State(o): State<Origin>, headers: HeaderMap) -> String {
        o.calls.fetch_add(1, Ordering::SeqCst);
        format!("host={}", header_str(&headers, "host"))
    }
    async fn whoami(State(o): State<Origin>, headers: HeaderMap) -> String {
        o.calls.fetch_add(1, Ordering::SeqCst);
        format!(
            "auth={} cookie={}",
            header_str(&headers, "authorization"),
            header_str(&headers, "cookie")
        )
    }
    async fn set_cookie(State(o): State<Origin>) -> Response {
        let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
        (
            [
                (header::SET_COOKIE, "session=secret-of-the-first-client"),
                (header::CACHE_CONTROL, "public, max-age=60"),
            ],
            format!("set-cookie #{n}"),
        )
            .into_response()
    }
    async fn hop(State(o): State<Origin>) -> Response {
        o.calls.fetch_add(1, Ordering::SeqCst);
        let mut res = "hop".into_response();
        let h = res.headers_mut();
        for (k, v) in [
            ("connection", "x-secret, x-other"),
            ("x-secret", "per-connection"),
            ("x-other", "per-connection"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("proxy-authenticate", "Basic"),
            ("x-keep", "yes"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        res
    }
    async fn tenant(State(o): State<Origin>, req: Request) -> String {
        o.calls.fetch_add(1, Ordering::SeqCst);
        format!("tenant {} {}", o.name, req.uri())
    }
    async fn vary_star(State(o): State<Origin>) -> Response {
        let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
        ([(header::VARY, "*")], format!("vary-star #{n}")).into_response()
    }
    async fn cc(State(o): State<Origin>, req: Request) -> Response {
        let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mut res = format!("cc {} #{n}", req.uri()).into_response();
        if let Some(v) = req.headers().get("x-cc") {
            res.headers_mut().insert(header::CACHE_CONTROL, v.clone());
        }
        if let Some(v) = req.headers().get("x-vary") {
            res.headers_mut().insert(header::VARY, v.clone());
        }
        res
    }
    // Honours method overrides, as Express's method-override or Rails'
    // `_method` do for the requests they accept.
    async fn method(State(o): State<Origin>, req: Request) -> String {
        let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let param = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|p| p.strip_prefix("_method=").map(str::to_owned))
        });
        let header = req
            .headers()
            .get("x-http-method-override")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let method = header.or(param).unwrap_or_else(|| req.method().to_string());
        format!("did {method} #{n}")
    }
    async fn blob(Path(id): Path<String>) -> String {
        format!("{id}:{}", "x".repeat(16 * 1024))
    }
    Router::new()
        .route("/method", get(method))
        .route("/big-item/{id}", get(blob))
        .route("/echo/{name}", get(echo_header))
        .route("/host", get(host))
        .route("/whoami", get(whoami))
        .route("/set-cookie", get(set_cookie))
        .route("/hop", get(hop))
        .route("/tenant", get(tenant))
        .route("/vary-star", get(vary_star))
        .route("/cc", get(cc))
        .with_state(origin)
}

struct App {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    http: TryHttp,
}

async fn app_named(
    redis: &RedisServer,
    name: &'static str,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    let layer = configure(
        FenceLayer::new(redis.connection_manager().await)
            .namespace("poison:")
            .beta(0.0),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let origin = Origin {
        name,
        calls: calls.clone(),
    };
    let router = echo(origin).merge(routes(Counter::default()));
    let addr = serve(router.layer(layer)).await;
    App {
        addr,
        calls,
        http: TryHttp::new(Duration::from_secs(10)),
    }
}

async fn app(
    redis: &RedisServer,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    app_named(redis, "main", configure).await
}

impl App {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> support::Reply {
        self.http
            .get_with(self.addr, path, headers)
            .await
            .expect("answered")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_that_varies_on_a_forwarded_header_is_never_served_to_another_value() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    // (Accept-Encoding is normalised before keying and the origin call, so
    // "evil" and "good" are both `identity` there: http_semantics.rs.)
    for name in ["x-forwarded-host", "x-forwarded-proto", "accept-language"] {
        let path = format!("/echo/{name}?vary=1");
        let evil = app.get(&path, &[(name, "evil")]).await;
        assert_eq!(
            (evil.cache_status(), evil.text()),
            (Some("MISS"), format!("{name}=evil"))
        );
        let good = app.get(&path, &[(name, "good")]).await;
        assert_eq!(good.text(), format!("{name}=good"), "poisoned via {name}");
        assert_ne!(good.cache_status(), Some("HIT"));
        let none = app.get(&path, &[]).await;
        assert_eq!(none.text(), format!("{name}="), "poisoned via {name}");
        // Each variant is cached on its own.
        for value in ["evil", "good"] {
            let r = app.get(&path, &[(name, value)]).await;
            assert_eq!(
                (r.cache_status(), r.text()),
                (Some("HIT"), format!("{name}={value}"))
            );
        }
        // Whitespace and case of the value are not the same variant as the
        // poisoned one unless they are the same bytes once trimmed.
        let r = app.get(&path, &[(name, "EVIL")]).await;
        assert_eq!(r.text(), format!("{name}=EVIL"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tenants_by_host_never_see_each_others_pages() {
    // Default settings: one app answering for two hostnames.
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let a = app.get("/host", &[("host", "a.example")]).await;
    let b = app.get("/host", &[("host", "b.example")]).await;
    assert_eq!(a.text(), "host=a.example");
    assert_eq!(
        (b.cache_status(), b.text().as_str()),
        (Some("MISS"), "host=b.example"),
        "one tenant's page was served to another"
    );
    for h in ["a.example", "b.example"] {
        let r = app.get("/host", &[("host", h)]).await;
        assert_eq!(
            (r.cache_status(), r.text()),
            (Some("HIT"), format!("host={h}"))
        );
    }
    // Spellings of one host share its entry.
    for h in ["A.Example", "a.example.", "a.example:80", "a.example:443"] {
        let r = app.get("/host", &[("host", h)]).await;
        assert_eq!(
            (r.cache_status(), r.text().as_str()),
            (Some("HIT"), "host=a.example"),
            "{h}"
        );
    }
    // Another port is another site.
    let other = app.get("/host", &[("host", "a.example:8080")]).await;
    assert_eq!(other.text(), "host=a.example:8080");
    assert_eq!(app.calls.load(Ordering::SeqCst), 3);
    // Turning the host off is explicit.
    let shared = app_named(&redis, "shared", |l| {
        l.namespace("poison-nohost:")
            .key(DefaultKey::new().with_host(false))
    })
    .await;
    shared.get("/host", &[("host", "a.example")]).await;
    let r = shared.get("/host", &[("host", "b.example")]).await;
    assert_eq!(r.cache_status(), Some("HIT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absolute_form_target_cannot_poison_another_host() {
    // `GET http://victim.example/host` with `Host: evil.example`: hyper
    // accepts it; the key says victim.example, an origin that reads Host
    // (most do) answers for evil.example. Default settings.
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let attack = raw(
        app.addr,
        b"GET http://victim.example/host HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(attack.status < 500);
    let victim = app.get("/host", &[("host", "victim.example")]).await;
    assert_eq!(
        victim.text(),
        "host=victim.example",
        "the victim host was served the attacker's response ({:?})",
        victim.cache_status()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_and_cookies_bypass_the_cache_by_default() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for (h, v) in [("authorization", "Bearer alice"), ("cookie", "sid=alice")] {
        for _ in 0..2 {
            let r = app.get("/whoami", &[(h, v)]).await;
            assert_eq!(r.cache_status(), Some("BYPASS"));
            assert!(r.text().contains("alice"));
        }
    }
    // Nobody else gets alice's answer.
    let anon = app.get("/whoami", &[]).await;
    assert_eq!(anon.text(), "auth= cookie=");
    assert_eq!(app.calls.load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn opted_in_authorized_caching_keys_each_credential_apart() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.cache_authorized(true)
            .key(DefaultKey::new().with_header(header::AUTHORIZATION))
    })
    .await;
    for user in ["alice", "bob", "alice", "bob"] {
        let auth = format!("Bearer {user}-token");
        let r = app.get("/whoami", &[("authorization", &auth)]).await;
        assert_eq!(r.text(), format!("auth={auth} cookie="));
    }
    assert_eq!(app.calls.load(Ordering::SeqCst), 2, "one fill per user");
    let anon = app.get("/whoami", &[]).await;
    assert_eq!(anon.text(), "auth= cookie=");
    // A custom key function that puts a digest of the credential in the key.
    let app2 = app_named(&redis, "closure", |l| {
        l.namespace("poison2:")
            .cache_authorized(true)
            .key(|parts: &http::request::Parts| {
                let auth = parts.headers.get(header::AUTHORIZATION)?;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(auth.as_bytes(), &mut h);
                Some(format!(
                    "{}#{}",
                    parts.uri.path(),
                    std::hash::Hasher::finish(&h)
                ))
            })
    })
    .await;
    for user in ["carol", "dave", "carol", "dave"] {
        let auth = format!("Bearer {user}");
        let r = app2.get("/whoami", &[("authorization", &auth)]).await;
        assert_eq!(r.text(), format!("auth={auth} cookie="));
    }
    assert_eq!(app2.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_the_key_do_not_appear_in_redis_key_names() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.cache_authorized(true)
            .key(DefaultKey::new().with_header(header::AUTHORIZATION))
    })
    .await;
    app.get("/whoami", &[("authorization", "Bearer s3cr3t-t0ken")])
        .await;
    let keys = scan(&redis, "*");
    assert!(!keys.is_empty());
    for k in keys {
        assert!(
            !String::from_utf8_lossy(&k).contains("s3cr3t"),
            "credential in a Redis key name: {}",
            String::from_utf8_lossy(&k)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_that_set_cookies_are_never_stored_or_shared() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.respect_cache_control(true)).await;
    for n in 1..=3 {
        let r = app.get("/set-cookie", &[]).await;
        assert_eq!(r.text(), format!("set-cookie #{n}"));
        assert_ne!(r.cache_status(), Some("HIT"));
    }
    for key in entry_keys(&redis, "poison:") {
        let hdrs = hget(&redis, &key, "head").unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&hdrs).contains("secret-of-the-first-client"),
            "Set-Cookie stored at {key}"
        );
    }
    // Concurrent requests for it don't get each other's cookie either.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, addr) = (app.http.clone(), app.addr);
        set.spawn(async move { http.get(addr, "/set-cookie").await.unwrap() });
    }
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        assert_ne!(r.cache_status(), Some("HIT"));
    }
    assert_eq!(app.calls.load(Ordering::SeqCst), 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_not_stored() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.get("/hop", &[]).await;
    let keys = entry_keys(&redis, "poison:");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let hdrs = hget(&redis, &keys[0], "head").unwrap();
    let hdrs = String::from_utf8_lossy(&hdrs).to_ascii_lowercase();
    assert!(hdrs.contains("x-keep"), "{hdrs:?}");
    for name in [
        "connection",
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "proxy-authenticate",
        "transfer-encoding",
        "x-cache",
    ] {
        assert!(!hdrs.contains(name), "{name} stored: {hdrs:?}");
    }
    assert!(!hdrs.contains("\0\u{2}te"), "te stored: {hdrs:?}");
    let hit = app.get("/hop", &[]).await;
    assert_eq!(
        (hit.cache_status(), hit.text().as_str()),
        (Some("HIT"), "hop")
    );
    assert_eq!(hit.header("x-keep"), Some("yes"));
    for name in [
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
    ] {
        assert!(hit.header(name).is_none(), "{name} on a HIT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_isolate_tenants_sharing_one_redis() {
    let redis = RedisServer::new();
    let a = app_named(&redis, "A", |l| l.namespace("tenant-a:")).await;
    let b = app_named(&redis, "B", |l| l.namespace("tenant-b:")).await;
    // A namespace that is a prefix of another one.
    let c = app_named(&redis, "C", |l| l.namespace("tenant-")).await;
    for _ in 0..3 {
        for (app, name) in [(&a, "A"), (&b, "B"), (&c, "C")] {
            let r = app.get("/tenant", &[]).await;
            assert_eq!(r.text(), format!("tenant {name} /tenant"));
        }
    }
    for app in [&a, &b, &c] {
        assert_eq!(app.calls.load(Ordering::SeqCst), 1);
    }
}

// ---------------------------------------------------------------------------
// Hostile input over raw TCP
// ---------------------------------------------------------------------------

fn bad_targets() -> Vec<Vec<u8>> {
    let mut t: Vec<Vec<u8>> = [
        "/item/a?b=1",
        "/item/a%3Fb=1",
        "/item/a%3fb=1",
        "/item/x*",
        "/item/xy",
        "/item/x%2A",
        "/item/x?",
        "/item/x?*",
        "/item/x?[a]",
        "/item/[a]",
        "/item/%5Ba%5D",
        "/item/%ff%fe%00%01",
        "/item/%C3%A9",
        "/item/%c3%a9",
        "/item/../../etc/passwd",
        "/item/%2e%2e%2f%2e%2e",
        "/item/..",
        "/item/a%2Fb",
        "/item/A",
        "/item/a",
        "/item/%7Bx%7D",
        "/item/{x}",
        "/item/a%20b",
        "/item/a?x=%0d%0aSet-Cookie:%20evil",
        "/item/a?=&=",
        "/item/a?a=1&a=2",
        "/item/a?a=2&a=1",
        "/item/q?%26=1",
        "/item/q?&=1",
        "*",
        "//item/x",
        "/item//x",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    t.push(b"/item/\xc3\xa9".to_vec());
    t.push(b"/item/\xff".to_vec());
    t.push(b"/item/a\\b".to_vec());
    t.push(format!("/item/{}", "a".repeat(8192)).into_bytes());
    t.push(format!("/item/{}b", "a".repeat(8191)).into_bytes());
    t.push(format!("/item/l?{}", "q=%2A&".repeat(1400)).into_bytes());
    t.push(format!("/item/{}", "%2A".repeat(2800)).into_bytes());
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_targets_never_fail_and_never_collide() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let mut seen = Vec::new();
    for round in 0..2 {
        for target in bad_targets() {
            let shown = String::from_utf8_lossy(&target[..target.len().min(60)]).into_owned();
            let r = raw_get(app.addr, &target, b"")
                .await
                .unwrap_or_else(|e| panic!("{shown}: {e}"));
            assert!(r.status < 500, "{shown}: {} {:?}", r.status, r.text());
            if r.status == 200 && target.starts_with(b"/item/") {
                // The origin names the URI it answered: a response for
                // another target would be a key collision.
                let body = r.text();
                let expected = format!("item {} #", String::from_utf8_lossy(&target));
                assert!(
                    body.starts_with(&expected),
                    "round {round}: {shown} was answered {:?} ({:?})",
                    &body[..body.len().min(80)],
                    r.header("x-cache")
                );
            }
            seen.push((shown, r.status, r.header("x-cache").map(str::to_owned)));
        }
    }
    // Many headers, and a header block near hyper's limits.
    let mut extra = Vec::new();
    for i in 0..90 {
        extra.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(50)).as_bytes());
    }
    let r = raw_get(app.addr, b"/item/many-headers", &extra)
        .await
        .unwrap();
    assert!(r.status < 500);
    let mut extra = Vec::new();
    for i in 0..200 {
        extra.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    let r = raw_get(app.addr, b"/item/too-many-headers", &extra)
        .await
        .unwrap();
    assert!(r.status < 500);
    // Keys stay bounded.
    let keys = scan(&redis, "*");
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(
            k.len() < 300,
            "a {}-byte Redis key: {}",
            k.len(),
            String::from_utf8_lossy(&k[..80])
        );
    }
    eprintln!(
        "hostile targets: {} answers, {} Redis keys",
        seen.len(),
        keys.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_response_headers_never_fail() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.respect_cache_control(true)).await;
    // Vary: * is never stored.
    for n in 1..=2 {
        let r = app.get("/vary-star", &[]).await;
        assert_eq!(r.text(), format!("vary-star #{n}"));
        assert_ne!(r.cache_status(), Some("HIT"));
    }
    let cache_controls: &[&[u8]] = &[
        b"max-age=99999999999999999999999999999",
        b"s-maxage=18446744073709551615",
        b"max-age=-1",
        b"max-age=\"abc\"",
        b"max-age=\"60\"",
        b"max-age=1e10",
        b"max-age",
        b"max-age=",
        b",,,=,=,",
        b"\"",
        b"private=\"x, no-store\", max-age=60",
        b"no-store=\"a,b\"",
        b"max-age=0",
        b"s-maxage=0, max-age=60",
        b"public\x80\xff",
        b"max-age=60, max-age=0",
        b"MAX-AGE=60",
    ];
    let varies: &[&[u8]] = &[
        b"",
        b",,,",
        b"Accept-Language, ,",
        b"bad header",
        b"*, accept",
        b"\xff",
        b"a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u,v,w,x,y,z",
    ];
    let mut i = 0;
    for cc in cache_controls {
        for vary in varies {
            i += 1;
            let path = format!("/cc?i={i}");
            let mut extra = b"x-cc: ".to_vec();
            extra.extend_from_slice(cc);
            extra.extend_from_slice(b"\r\n");
            if !vary.is_empty() {
                extra.extend_from_slice(b"x-vary: ");
                extra.extend_from_slice(vary);
                extra.extend_from_slice(b"\r\n");
            }
            for _ in 0..2 {
                let r = raw_get(app.addr, path.as_bytes(), &extra).await.unwrap();
                let what = format!(
                    "{:?} / {:?}",
                    String::from_utf8_lossy(cc),
                    String::from_utf8_lossy(vary)
                );
                assert_eq!(r.status, 200, "{what}");
                assert!(
                    r.text().starts_with(&format!("cc {path} #")),
                    "{what}: {}",
                    r.text()
                );
            }
        }
    }
    // Every key the cache wrote expires (index keys and fences, which
    // have no TTL, when the keep set says they are due).
    for k in scan(&redis, "poison:*") {
        let k = String::from_utf8_lossy(&k).into_owned();
        if k == "poison:|#keep" {
            continue;
        }
        let ttl: i64 = redis.cli(&["PTTL", &k]).parse().unwrap();
        let kept = !redis.cli(&["ZSCORE", "poison:|#keep", &k]).is_empty();
        assert!(ttl > 0 || kept, "{k} has no TTL ({ttl})");
        assert!(ttl <= (366 * 24 * 3600 + 60) * 1000, "{k}: {ttl} ms");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zero_ttl_caches_nothing_and_never_fails() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.ttl(Duration::ZERO)).await;
    for n in 1..=4 {
        let r = app.get("/tenant", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "tenant main /tenant");
        assert_ne!(r.cache_status(), Some("HIT"), "request {n}");
    }
    assert_eq!(app.calls.load(Ordering::SeqCst), 4);
    assert!(
        entry_keys(&redis, "poison:")
            .iter()
            .all(|k| hget(&redis, k, "body").is_none())
    );
}

// ---------------------------------------------------------------------------
// Unkeyed inputs (issue 13): each vector, attacker first, then a plain client
// ---------------------------------------------------------------------------

/// Headers the layer keys on by default, each with an attacker's value.
const KEYED: [(&str, &str); 11] = [
    ("forwarded", "for=192.0.2.1;host=evil.example;proto=http"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "http"),
    ("x-forwarded-scheme", "http"),
    ("x-forwarded-prefix", "/evil"),
    ("x-forwarded-port", "6666"),
    ("x-forwarded-server", "evil.example"),
    ("x-forwarded-ssl", "off"),
    ("front-end-https", "off"),
    ("x-url-scheme", "http"),
    ("x-host", "evil.example"),
];

/// Headers that make a request pass through uncached by default.
const PASSED: [(&str, &str); 6] = [
    ("x-original-url", "/admin"),
    ("x-rewrite-url", "/admin"),
    ("x-original-uri", "/admin"),
    ("x-http-method-override", "DELETE"),
    ("x-http-method", "DELETE"),
    ("x-method-override", "DELETE"),
];

#[tokio::test(flavor = "multi_thread")]
async fn no_unkeyed_header_poisons_the_page_of_plain_clients() {
    // The origin reflects each header without declaring `Vary`, as apps
    // building absolute links from X-Forwarded-Host do. Default settings.
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for (name, evil) in KEYED.iter().chain(&PASSED) {
        let path = format!("/echo/{name}");
        let attack = app.get(&path, &[(name, evil)]).await;
        assert_eq!(attack.text(), format!("{name}={evil}"));
        let plain = app.get(&path, &[]).await;
        assert_eq!(
            plain.text(),
            format!("{name}="),
            "poisoned via {name} ({:?})",
            plain.cache_status()
        );
        // Another attacker's value is not served the first one's page.
        let other = app.get(&path, &[(name, "other")]).await;
        assert_eq!(other.text(), format!("{name}=other"), "via {name}");
        let plain = app.get(&path, &[]).await;
        assert_eq!(
            (plain.cache_status(), plain.text()),
            (Some("HIT"), format!("{name}=")),
            "{name}"
        );
    }
    // Keyed headers still cache: a proxy's constant value gets its entry.
    for (name, evil) in KEYED {
        let r = app.get(&format!("/echo/{name}"), &[(name, evil)]).await;
        assert_eq!(
            (r.cache_status(), r.text()),
            (Some("HIT"), format!("{name}={evil}"))
        );
    }
    // The others never do.
    for (name, evil) in PASSED {
        let r = app.get(&format!("/echo/{name}"), &[(name, evil)]).await;
        assert_eq!(r.cache_status(), Some("BYPASS"), "{name}");
    }
    // The values never appear in Redis key names.
    for k in scan(&redis, "*") {
        let k = String::from_utf8_lossy(&k).into_owned();
        assert!(!k.contains("evil") && !k.contains("admin"), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_keys_on_host_and_proto_but_not_on_the_client_address() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let path = "/echo/forwarded";
    app.get(
        path,
        &[("forwarded", "for=192.0.2.1;proto=https;host=a.example")],
    )
    .await;
    // Another client behind the same proxy shares the entry...
    let r = app
        .get(
            path,
            &[("forwarded", "for=192.0.2.2;proto=https;host=a.example")],
        )
        .await;
    assert_eq!(r.cache_status(), Some("HIT"));
    // ...another host or scheme does not.
    for value in [
        "for=192.0.2.1;proto=https;host=evil.example",
        "for=192.0.2.1;proto=http;host=a.example",
    ] {
        let r = app.get(path, &[("forwarded", value)]).await;
        assert_eq!(
            (r.cache_status(), r.text()),
            (Some("MISS"), format!("forwarded={value}"))
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn method_overrides_are_never_cached() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for round in 1..=2 {
        let r = app
            .get("/method", &[("x-http-method-override", "DELETE")])
            .await;
        assert_eq!(
            (r.cache_status(), r.text()),
            (Some("BYPASS"), format!("did DELETE #{round}"))
        );
    }
    let plain = app.get("/method", &[]).await;
    assert_eq!(plain.text(), "did GET #3", "{:?}", plain.cache_status());
    for n in [4, 5] {
        let r = app.get("/method?_method=DELETE", &[]).await;
        assert_eq!(
            (r.cache_status(), r.text()),
            (Some("BYPASS"), format!("did DELETE #{n}"))
        );
    }
    let r = app.get("/method?%5Fmethod=PUT", &[]).await;
    assert_eq!(r.cache_status(), Some("BYPASS"));
    let plain = app.get("/method", &[]).await;
    assert_eq!(
        (plain.cache_status(), plain.text().as_str()),
        (Some("HIT"), "did GET #3")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_headers_are_ignored_and_stripped_ones_never_reach_the_app() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.trust_header(header::HeaderName::from_static("x-forwarded-proto"))
            .strip_header(header::HeaderName::from_static("x-original-url"))
            .strip_header(header::HeaderName::from_static("x-forwarded-host"))
    })
    .await;
    // Trusted: the user says their proxy sets it, one value per host.
    app.get("/echo/x-forwarded-proto", &[("x-forwarded-proto", "https")])
        .await;
    let r = app.get("/echo/x-forwarded-proto", &[]).await;
    assert_eq!(r.cache_status(), Some("HIT"));
    // Stripped: the app never sees it, so the page is cached as a plain one.
    for name in ["x-original-url", "x-forwarded-host"] {
        let path = format!("/echo/{name}");
        let first = app.get(&path, &[(name, "/admin")]).await;
        assert_eq!(first.text(), format!("{name}="));
        assert_eq!(first.cache_status(), Some("MISS"));
        let again = app.get(&path, &[(name, "/admin")]).await;
        assert_eq!(again.cache_status(), Some("HIT"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allow_list_flood_of_hosts_writes_nothing_to_redis() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.allowed_hosts(["a.example", "B.Example."])).await;
    for i in 0..300 {
        let host = format!("flood-{i}.example");
        let r = app.get("/host", &[("host", &host)]).await;
        assert_eq!(
            (r.cache_status(), r.text()),
            (Some("BYPASS"), format!("host={host}"))
        );
    }
    assert_eq!(entry_keys(&redis, "poison:"), Vec::<String>::new());
    // The allowed hosts are cached, however they are spelled.
    for (h, status) in [
        ("a.example", "MISS"),
        ("A.EXAMPLE:443", "HIT"),
        ("b.example", "MISS"),
    ] {
        let r = app.get("/host", &[("host", h)]).await;
        assert_eq!(r.cache_status(), Some(status), "{h}");
    }
    assert_eq!(app.calls.load(Ordering::SeqCst), 302);
}

// ---------------------------------------------------------------------------
// Key-aware invalidation (issue 8, point 4)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn invalidate_path_removes_the_url_for_every_host_and_variant() {
    let redis = RedisServer::new();
    let layer = FenceLayer::new(redis.connection_manager().await)
        .namespace("poison:")
        .beta(0.0);
    let handle = layer.handle();
    let app = app(&redis, |_| layer).await;
    let path = "/echo/accept-language?vary=1";
    let hosts = ["a.example", "b.example", "c.example"];
    for host in hosts {
        for lang in ["en", "fr"] {
            let h = [("host", host), ("accept-language", lang)];
            assert_eq!(app.get(path, &h).await.cache_status(), Some("MISS"));
            assert_eq!(app.get(path, &h).await.cache_status(), Some("HIT"));
        }
    }
    // Keyed forwarding headers are dimensions of the URL too.
    app.get(
        "/echo/x",
        &[("host", "a.example"), ("x-forwarded-host", "p")],
    )
    .await;
    app.get("/echo/x", &[("host", "b.example")]).await;
    assert_eq!(handle.invalidate_path(path).await.unwrap(), 6);
    for host in hosts {
        for lang in ["en", "fr"] {
            let h = [("host", host), ("accept-language", lang)];
            let r = app.get(path, &h).await;
            assert_eq!(r.cache_status(), Some("MISS"), "{host} {lang}");
        }
    }
    assert_eq!(handle.invalidate_path("/echo/x").await.unwrap(), 2);
    assert_eq!(handle.soft_invalidate_path(path).await.unwrap(), 6);
    // The README's example, with the host now in the key.
    app.get("/item/42", &[("host", "shop.example")]).await;
    app.get("/item/42", &[]).await;
    assert_eq!(handle.invalidate_path("/item/42").await.unwrap(), 2);
    assert_eq!(
        app.get("/item/42", &[("host", "shop.example")])
            .await
            .cache_status(),
        Some("MISS")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalidate_uri_and_request_run_the_layers_key_for_one_host() {
    let redis = RedisServer::new();
    let layer = FenceLayer::new(redis.connection_manager().await)
        .namespace("poison:")
        .beta(0.0);
    let handle = layer.handle();
    let app = app(&redis, |_| layer).await;
    let path = "/echo/accept-language?vary=1";
    for host in ["a.example", "b.example"] {
        for lang in ["en", "fr"] {
            app.get(path, &[("host", host), ("accept-language", lang)])
                .await;
        }
    }
    let uri: http::Uri = format!("http://A.example{path}").parse().unwrap();
    assert_eq!(handle.invalidate_uri(&uri).await.unwrap(), 2);
    let status = |host: &'static str, lang: &'static str| {
        let app = &app;
        async move {
            app.get(path, &[("host", host), ("accept-language", lang)])
                .await
                .cache_status()
                .map(str::to_owned)
        }
    };
    assert_eq!(status("a.example", "en").await.as_deref(), Some("MISS"));
    assert_eq!(status("b.example", "en").await.as_deref(), Some("HIT"));
    assert_eq!(status("b.example", "fr").await.as_deref(), Some("HIT"));
    let req = http::Request::get(path)
        .header("host", "b.example")
        .body(())
        .unwrap();
    assert_eq!(handle.invalidate_request(&req).await.unwrap(), 2);
    assert_eq!(status("b.example", "fr").await.as_deref(), Some("MISS"));
    assert_eq!(status("a.example", "en").await.as_deref(), Some("HIT"));
    // A request the layer never caches is an error, not a silent 0.
    let post = http::Request::post(path).body(()).unwrap();
    assert!(
        handle
            .invalidate_request(&post)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalidate_path_fails_clearly_when_the_key_function_cannot_derive_it() {
    let redis = RedisServer::new();
    let layer = FenceLayer::new(redis.connection_manager().await)
        .namespace("poison:")
        .key(|p: &http::request::Parts| Some(format!("custom:{}", p.uri.path())));
    let handle = layer.handle();
    let app = app(&redis, |_| layer).await;
    app.get("/item/1", &[]).await;
    let err = handle.invalidate_path("/item/1").await.unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    let uri: http::Uri = "/item/1".parse().unwrap();
    assert_eq!(handle.invalidate_uri(&uri).await.unwrap(), 1);
    assert_eq!(app.get("/item/1", &[]).await.cache_status(), Some("MISS"));
}

// ---------------------------------------------------------------------------
// Bounded damage from floods
// ---------------------------------------------------------------------------

fn info_field(redis: &RedisServer, section: &str, field: &str) -> u64 {
    let info = redis.cli(&["INFO", section]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in INFO {section}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn under_volatile_lru_a_url_flood_evicts_cache_entries_and_no_queued_invalidation() {
    // The setting the guide recommends: every cache key has a TTL, the
    // invalidation streams have none, so `volatile-lru` evicts only cache.
    let redis =
        RedisServer::with_args(&["--maxmemory", "8mb", "--maxmemory-policy", "volatile-lru"]);
    let layer = FenceLayer::new(redis.connection_manager().await)
        .namespace("poison:")
        .beta(0.0);
    let handle = layer.handle();
    let app = app(&redis, |_| layer).await;
    let queue = handle.queue();
    let work: Vec<cachefence::Invalidation> = (0..500)
        .map(|i| cachefence::Invalidation::path(format!("/item/queued-{i}")))
        .collect();
    queue.enqueue_all(&work).await.unwrap();
    assert_eq!(queue.backlog().await.unwrap(), 500);
    // A flood of distinct URLs with 16 KiB bodies: about 3 times maxmemory.
    let mut i = 0;
    while info_field(&redis, "stats", "evicted_keys") == 0 || i < 1500 {
        assert!(i < 20_000, "no eviction after {i} URLs");
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (http, addr) = (app.http.clone(), app.addr);
            let path = format!("/big-item/{i}");
            i += 1;
            set.spawn(async move { http.get(addr, &path).await.unwrap() });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().status, 200);
        }
    }
    let evicted = info_field(&redis, "stats", "evicted_keys");
    let used = info_field(&redis, "memory", "used_memory");
    eprintln!("flood: {i} URLs, {evicted} keys evicted, used_memory {used}");
    assert!(used <= 9 * 1024 * 1024, "used_memory {used}");
    // Nothing queued was lost, and it is still applied.
    assert_eq!(queue.backlog().await.unwrap(), 500);
    let stream = queue.stream_key().to_owned();
    assert_eq!(redis.cli(&["XLEN", &stream]), "500");
    let worker = queue
        .worker(redis.client())
        .block(Duration::from_millis(200));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while control.stats().applied < 500 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            control.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queue.backlog().await.unwrap(), 0);
    control.shutdown();
    task.await.unwrap();
    // The cache still works at the memory limit.
    let r = app.get("/item/after-flood", &[]).await;
    assert_eq!(r.cache_status(), Some("MISS"));
    assert_eq!(
        app.get("/item/after-flood", &[]).await.cache_status(),
        Some("HIT")
    );
}
