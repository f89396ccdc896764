//! HTTP semantics against a real `redis-server` and real HTTP: every client
//! gets its own answer (ranges and conditions never leak to other requests),
//! 304s and ranges from the cache, invalidation by unsafe methods.
//!
//! The origin here validates like a static-file server: it answers
//! `If-None-Match` with 304 and `Range` with 206 itself, so a cache that
//! forwarded those headers on a shared fill would hand them to everyone.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use cachefence::{FenceHandle, FenceLayer};
use http_body_util::Full;
use redis::aio::ConnectionManager;
use support::{Http, RedisServer, Reply, serve};
use tokio::sync::Semaphore;

const BODY: &str = "0123456789";
const ETAG: &str = "\"v1\"";
const LAST_MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";

/// A validating origin. `GET /doc` answers [`BODY`] with an `ETag` and a
/// `Last-Modified`, and honours `If-None-Match` (304) and `Range: bytes=a-b`
/// (206) itself; `?cc=no-cache` makes its `Cache-Control` `no-cache`.
/// `GET /held` does the same once the test gives it a permit (one per call).
/// `/res/{*path}` takes every method: GET answers the resource's version,
/// other methods bump it and answer the status in `x-status` (200 by
/// default) with the
/// `?location=` and `?content_location=` headers.
#[derive(Clone)]
struct Origin {
    calls: Arc<AtomicUsize>,
    /// Requests that reached the origin with `Range` or an `If-*` header.
    conditional_calls: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    version: Arc<AtomicUsize>,
    /// `/rfc/{case}` answers 503 while set.
    failing: Arc<AtomicBool>,
}

impl Origin {
    fn new() -> Self {
        Self {
            calls: Default::default(),
            conditional_calls: Default::default(),
            gate: Arc::new(Semaphore::new(0)),
            version: Default::default(),
            failing: Default::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn conditional_calls(&self) -> usize {
        self.conditional_calls.load(Ordering::SeqCst)
    }

    fn routes(&self) -> Router {
        Router::new()
            .route("/doc", get(doc))
            .route("/held", get(held))
            .route("/always206", get(always_206))
            .route("/enc", get(encoding))
            .route("/rfc/{case}", get(rfc_case))
            .route(
                "/echo-headers",
                get(|headers: HeaderMap| async move {
                    let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
                    names.sort();
                    names.join(" ")
                }),
            )
            .route(
                "/forwarded",
                get(|headers: HeaderMap| async move {
                    ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"]
                        .map(|n| {
                            headers
                                .get(n)
                                .map_or("-", |v| v.to_str().unwrap_or("?"))
                                .to_owned()
                        })
                        .join(" | ")
                }),
            )
            // Never answers.
            .route("/hang", any(std::future::pending::<&'static str>))
            .route("/big", get(big))
            .route(
                "/upstream",
                get(|| async { ([("cache-status", "upstream; hit; ttl=5")], "x") }),
            )
            .route("/res/{*path}", any(resource))
            .with_state(self.clone())
    }
}

async fn doc(State(o): State<Origin>, uri: http::Uri, headers: HeaderMap) -> Response {
    validating(&o, &uri, &headers)
}

async fn held(State(o): State<Origin>, uri: http::Uri, headers: HeaderMap) -> Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    // Held until the test has every request waiting on this fill.
    // One permit per call: a permit let through stays used.
    o.gate.acquire().await.expect("gate open").forget();
    o.calls.fetch_sub(1, Ordering::SeqCst);
    validating(&o, &uri, &headers)
}

fn validating(o: &Origin, uri: &http::Uri, headers: &HeaderMap) -> Response {
    let no_cache = uri.query() == Some("cc=no-cache");
    o.calls.fetch_add(1, Ordering::SeqCst);
    let conditional = [
        header::RANGE,
        header::IF_RANGE,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
    ];
    if conditional.iter().any(|h| headers.contains_key(h)) {
        o.conditional_calls.fetch_add(1, Ordering::SeqCst);
    }
    let validators = [
        (header::ETAG, ETAG),
        (header::LAST_MODIFIED, LAST_MODIFIED),
        (
            header::CACHE_CONTROL,
            if no_cache {
                "no-cache"
            } else {
                "public, max-age=60"
            },
        ),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes().windows(4).any(|w| w == b"\"v1\""))
    {
        return (
            StatusCode::NOT_MODIFIED,
            validators,
            [("x-validated", "yes")],
        )
            .into_response();
    }
    if let Some((a, b)) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
    {
        return (
            StatusCode::PARTIAL_CONTENT,
            validators,
            [(
                header::CONTENT_RANGE,
                format!("bytes {a}-{b}/{}", BODY.len()),
            )],
            BODY[a..=b].to_owned(),
        )
            .into_response();
    }
    (validators, BODY).into_response()
}

/// [`BIG`] bytes, `no-cache` with an `ETag`: revalidated on every use.
async fn big(State(o): State<Origin>, headers: HeaderMap) -> Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let cache = [
        (header::ETAG, "\"big\""),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    if headers.contains_key(header::IF_NONE_MATCH) {
        o.conditional_calls.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (cache, vec![b'x'; BIG]).into_response()
}

const BIG: usize = 256 * 1024;

/// Echoes the `Accept-Encoding` and `Accept-Language` it was asked with,
/// varying on both.
async fn encoding(State(o): State<Origin>, headers: HeaderMap) -> Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let get = |name| {
        headers
            .get(name)
            .map_or("-", |v| v.to_str().unwrap_or("?"))
            .to_owned()
    };
    (
        [(header::VARY, "Accept-Encoding, Accept-Language")],
        format!(
            "{} {}",
            get(header::ACCEPT_ENCODING),
            get(header::ACCEPT_LANGUAGE)
        ),
    )
        .into_response()
}

/// Responses with the freshness headers of each RFC 9111 case.
async fn rfc_case(
    State(o): State<Origin>,
    axum::extract::Path(case): axum::extract::Path<String>,
) -> Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    if o.failing.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    if case == "slow" {
        // The response delay of RFC 9111 §4.2.3.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    let now = std::time::SystemTime::now();
    let date = |offset: i64| {
        let t = if offset >= 0 {
            now + Duration::from_secs(offset as u64)
        } else {
            now - Duration::from_secs(offset.unsigned_abs())
        };
        httpdate::fmt_http_date(t)
    };
    let headers: Vec<(&str, String)> = match case.as_str() {
        "max-age" => vec![("cache-control", "max-age=60".into())],
        "age" => vec![("cache-control", "max-age=60".into()), ("age", "20".into())],
        "age-exceeds" => vec![
            ("cache-control", "max-age=60".into()),
            ("age", "100".into()),
        ],
        "age-garbage" => vec![
            ("cache-control", "max-age=60".into()),
            ("age", "soon".into()),
        ],
        "old-date" => vec![("cache-control", "max-age=60".into()), ("date", date(-120))],
        "none" => vec![],
        "expires" => vec![("date", date(0)), ("expires", date(60))],
        "expired" => vec![("date", date(0)), ("expires", "0".into())],
        "cdn" => vec![
            ("cache-control", "max-age=0".into()),
            ("cdn-cache-control", "max-age=60".into()),
        ],
        "swr-short" => vec![
            (
                "cache-control",
                "max-age=61, stale-while-revalidate=30".into(),
            ),
            ("age", "60".into()),
        ],
        "must-revalidate-short" => vec![
            (
                "cache-control",
                "max-age=61, stale-while-revalidate=30, must-revalidate".into(),
            ),
            ("age", "60".into()),
        ],
        "short" => vec![("cache-control", "max-age=62".into()), ("age", "60".into())],
        "sie-short" => vec![
            ("cache-control", "max-age=62, stale-if-error=60".into()),
            ("age", "60".into()),
        ],
        "sie-swr-short" => vec![
            (
                "cache-control",
                "max-age=62, stale-while-revalidate=1, stale-if-error=60".into(),
            ),
            ("age", "60".into()),
        ],
        "sie-must-revalidate-short" => vec![
            (
                "cache-control",
                "max-age=62, stale-if-error=60, must-revalidate".into(),
            ),
            ("age", "60".into()),
        ],
        "must-revalidate" => vec![("cache-control", "max-age=60, must-revalidate".into())],
        "proxy-revalidate" => vec![("cache-control", "max-age=60, proxy-revalidate".into())],
        "s-maxage" => vec![("cache-control", "s-maxage=60".into())],
        "no-cache" => vec![("cache-control", "no-cache".into())],
        "slow" => vec![
            ("cache-control", "max-age=600".into()),
            ("age", "10".into()),
        ],
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mut res = format!("{case} #{}", o.calls.load(Ordering::SeqCst)).into_response();
    for (name, value) in headers {
        res.headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    res
}

async fn always_206(State(o): State<Origin>) -> Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::PARTIAL_CONTENT,
        [(header::CONTENT_RANGE, "bytes 0-3/10")],
        "0123",
    )
        .into_response()
}

async fn resource(State(o): State<Origin>, req: Request) -> Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let uri = req.uri().clone();
    let query = |name: &str| {
        uri.query().and_then(|q| {
            q.split('&')
                .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        })
    };
    if req.method() == http::Method::GET {
        // (Only the RFC 9111 mode reads it: the reverse proxy.)
        return (
            [(header::CACHE_CONTROL, "max-age=60")],
            format!("{} v{}", req.uri().path(), o.version.load(Ordering::SeqCst)),
        )
            .into_response();
    }
    o.version.fetch_add(1, Ordering::SeqCst);
    let status = req
        .headers()
        .get("x-status")
        .and_then(|s| s.to_str().ok()?.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let locations: Vec<_> = [
        ("location", header::LOCATION),
        ("content_location", header::CONTENT_LOCATION),
    ]
    .into_iter()
    .filter_map(|(param, name)| Some((name, query(param)?)))
    .collect();
    let len = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .map_or(0, |b| b.len());
    let mut res = (status, [("x-body-len", len.to_string())]).into_response();
    for (name, value) in locations {
        res.headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    res
}

struct App {
    addr: SocketAddr,
    origin: Origin,
    handle: FenceHandle<ConnectionManager>,
    http: Http,
}

async fn app(
    redis: &RedisServer,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    let layer = configure(FenceLayer::new(redis.connection_manager().await).namespace("http:"));
    let origin = Origin::new();
    let handle = layer.handle();
    let addr = serve(origin.routes().layer(layer)).await;
    App {
        addr,
        origin,
        handle,
        http: Http::new(),
    }
}

impl App {
    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.http
            .request(req.body(Full::new(Bytes::new())).expect("request"))
            .await
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", path, headers).await
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    // A hang guard, not a speed limit.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn assert_full(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.text(), BODY);
}

fn assert_not_modified(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{reply:?}");
    assert!(reply.body.is_empty());
    // RFC 9110 §15.4.5: the fields a 200 would have carried.
    assert_eq!(reply.header("etag"), Some(ETAG));
    assert_eq!(reply.header("cache-control"), Some("public, max-age=60"));
    assert_eq!(reply.header("last-modified"), Some(LAST_MODIFIED));
    assert!(reply.header("content-type").is_none());
}

/// Starts `leader` on the held route, waits until it is at the origin, then
/// sends `followers` and waits until all of them joined its fill.
async fn race(
    app: &App,
    leader: &'static [(&'static str, &'static str)],
    followers: Vec<&'static [(&'static str, &'static str)]>,
) -> (Reply, Vec<Reply>) {
    race_on(app, "/held", 0, leader, followers).await
}

/// [`race`] on `path` (the held route, maybe with a query), whose origin
/// has been called `before` times.
async fn race_on(
    app: &App,
    path: &'static str,
    before: usize,
    leader: &'static [(&'static str, &'static str)],
    followers: Vec<&'static [(&'static str, &'static str)]>,
) -> (Reply, Vec<Reply>) {
    let coalesced = app.handle.stats().coalesced;
    let spawn = |headers: &'static [(&'static str, &'static str)]| {
        let (http, addr) = (app.http.clone(), app.addr);
        tokio::spawn(async move {
            let mut req = http::Request::get(format!("http://{addr}{path}"));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            http.request(req.body(Full::new(Bytes::new())).expect("request"))
                .await
        })
    };
    let leader = spawn(leader);
    eventually("the leader's fill to reach the origin", || {
        app.origin.calls() == before + 1
    })
    .await;
    let n = followers.len() as u64;
    let followers: Vec<_> = followers.into_iter().map(spawn).collect();
    eventually("the followers to join the fill", || {
        app.handle.stats().coalesced >= coalesced + n
    })
    .await;
    app.origin.gate.add_permits(1);
    let leader = leader.await.expect("leader");
    let mut replies = Vec::new();
    for f in followers {
        replies.push(f.await.expect("follower"));
    }
    (leader, replies)
}

// ---------------------------------------------------------------------------
// 1. Own answers only
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_request_leading_a_fill_gets_206_and_plain_waiters_get_the_full_200() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let mut followers: Vec<&'static [(&str, &str)]> = vec![&[]; 30];
    followers.push(&[("if-none-match", ETAG)]);
    let (leader, replies) = race(&app, &[("range", "bytes=0-3")], followers).await;

    assert_eq!(leader.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(leader.text(), "0123");
    assert_eq!(leader.header("content-range"), Some("bytes 0-3/10"));
    for reply in &replies[..30] {
        assert_full(reply);
    }
    assert_not_modified(&replies[30]);
    assert_eq!(app.origin.calls(), 1);
    assert_eq!(
        app.origin.conditional_calls(),
        0,
        "the fill asks without the client's range"
    );
    // Stored as usual; no pass marker.
    let after = app.get("/held", &[]).await;
    assert_full(&after);
    assert_eq!(after.cache_status(), Some("HIT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_request_leading_a_fill_gets_304_and_plain_waiters_get_the_full_200() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let mut followers: Vec<&'static [(&str, &str)]> = vec![&[]; 10];
    followers.push(&[("range", "bytes=-2")]);
    let (leader, replies) = race(&app, &[("if-none-match", ETAG)], followers).await;

    assert_not_modified(&leader);
    for reply in &replies[..10] {
        assert_full(reply);
    }
    assert_eq!(replies[10].status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(replies[10].text(), "89");
    assert_eq!((app.origin.calls(), app.origin.conditional_calls()), (1, 0));
    assert_eq!(app.get("/held", &[]).await.cache_status(), Some("HIT"));
}

#[tokio::test]
async fn if_match_and_if_unmodified_since_bypass_the_cache_without_a_pass_marker() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for header in [("if-match", ETAG), ("if-unmodified-since", LAST_MODIFIED)] {
        let reply = app.get("/doc", &[header]).await;
        assert_full(&reply);
        assert_eq!(reply.cache_status(), Some("BYPASS"));
    }
    // The origin evaluated them; the URL is still cacheable for everyone.
    assert_eq!(app.origin.conditional_calls(), 2);
    assert_eq!(app.get("/doc", &[]).await.cache_status(), Some("MISS"));
    assert_eq!(app.get("/doc", &[]).await.cache_status(), Some("HIT"));
    assert_eq!(app.origin.calls(), 3);
}

#[tokio::test]
async fn responses_206_and_304_from_the_origin_are_never_stored() {
    let redis = RedisServer::new();
    // Even when the statuses are configured as cacheable.
    let app = app(&redis, |l| {
        l.statuses([
            StatusCode::OK,
            StatusCode::PARTIAL_CONTENT,
            StatusCode::NOT_MODIFIED,
        ])
    })
    .await;
    for _ in 0..2 {
        let reply = app.get("/always206", &[]).await;
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
        assert_ne!(reply.cache_status(), Some("HIT"));
    }
    assert_eq!(app.origin.calls(), 2);
    assert_eq!(app.handle.stats().stores, 0);
}

// ---------------------------------------------------------------------------
// 2. Conditional hits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn if_none_match_on_a_hit_is_answered_304_without_an_origin_call() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    assert_full(&app.get("/doc", &[]).await);
    for inm in [ETAG, "W/\"v1\"", "\"x\", W/\"v1\"", "*"] {
        let reply = app.get("/doc", &[("if-none-match", inm)]).await;
        assert_not_modified(&reply);
        assert_eq!(reply.cache_status(), Some("HIT"));
        assert!(reply.header("age").is_some());
    }
    // Not matching: the full response.
    assert_full(&app.get("/doc", &[("if-none-match", "\"v2\"")]).await);
    // HEAD too.
    let head = app.send("HEAD", "/doc", &[("if-none-match", ETAG)]).await;
    assert_eq!(head.status, StatusCode::NOT_MODIFIED);
    assert_eq!((app.origin.calls(), app.origin.conditional_calls()), (1, 0));
}

#[tokio::test]
async fn a_stale_entry_being_served_answers_conditions_too() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.beta(0.0)).await;
    assert_full(&app.get("/doc", &[]).await);
    app.handle
        .soft_invalidate_path("/doc")
        .await
        .expect("soft invalidation");
    let reply = app.get("/doc", &[("if-none-match", ETAG)]).await;
    assert_not_modified(&reply);
    assert_eq!(reply.cache_status(), Some("STALE"));
    // The background refresh revalidated the entry with its own ETag.
    eventually("the refresh", || app.handle.stats().stores == 2).await;
    assert_eq!(app.origin.calls(), 2);
}

#[tokio::test]
async fn a_stale_entry_is_revalidated_with_its_validator_and_a_304_freshens_it() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.beta(0.0)).await;
    assert_full(&app.get("/doc", &[]).await);
    app.handle
        .soft_invalidate_path("/doc")
        .await
        .expect("soft invalidation");
    assert_eq!(app.get("/doc", &[]).await.cache_status(), Some("STALE"));
    eventually("the revalidation", || app.handle.stats().stores == 2).await;
    // The origin was asked with the stored ETag and answered 304.
    assert_eq!((app.origin.calls(), app.origin.conditional_calls()), (2, 1));
    let hit = app.get("/doc", &[]).await;
    assert_full(&hit);
    assert_eq!(hit.cache_status(), Some("HIT"));
    // Headers updated from the 304, the body kept.
    assert_eq!(hit.header("x-validated"), Some("yes"));
    assert_eq!(hit.header("content-length"), Some("10"));
    assert_eq!(app.origin.calls(), 2);
}

/// The Redis key of the one entry of `path` (not its lease, fence or
/// variant set).
fn entry_key(redis: &RedisServer, path: &str) -> String {
    let keys = redis.cli(&["KEYS", &format!("http:*{path}*")]);
    let found: Vec<&str> = keys
        .lines()
        .filter(|k| !k.ends_with(":lease") && !k.ends_with(":fence") && !k.ends_with(":vars"))
        .collect();
    assert_eq!(found.len(), 1, "{keys}");
    found[0].to_owned()
}

/// Stores `/held`, soft-purges it, and serves it stale: its background
/// revalidation is then held at the origin (which has been called twice).
async fn hold_a_revalidation(app: &App) {
    app.origin.gate.add_permits(1);
    assert_full(&app.get("/held", &[]).await);
    app.handle
        .soft_invalidate_path("/held")
        .await
        .expect("soft invalidation");
    assert_eq!(app.get("/held", &[]).await.cache_status(), Some("STALE"));
    eventually("the revalidation to reach the origin", || {
        app.origin.calls() == 2
    })
    .await;
}

#[tokio::test]
async fn a_304_revalidation_rewrites_the_head_of_the_entry_and_leaves_its_body_in_redis() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.beta(0.0)).await;
    hold_a_revalidation(&app).await;
    // A sentinel of the body's length, written behind the fill's back: a
    // write of the whole entry (the body the fill read) would replace it.
    let key = entry_key(&redis, "/held");
    redis.cli(&["HSET", &key, "body", "SENTINEL!!"]);
    let fresh_before = redis.cli(&["HGET", &key, "fresh"]);
    app.origin.gate.add_permits(1);
    eventually("the write-back", || app.handle.stats().stores == 2).await;
    assert_eq!(redis.cli(&["HGET", &key, "body"]), "SENTINEL!!");
    assert_eq!(app.handle.stats().revalidated, 1);
    assert_ne!(redis.cli(&["HGET", &key, "fresh"]), fresh_before);
    let stats = app.handle.stats();
    assert_eq!((stats.stores, stats.fenced), (2, 0));
    // Freshened: headers from the 304, the body Redis kept.
    let hit = app.get("/held", &[]).await;
    assert_eq!(hit.cache_status(), Some("HIT"));
    assert_eq!(hit.text(), "SENTINEL!!");
    assert_eq!(hit.header("x-validated"), Some("yes"));
    assert_eq!((app.origin.calls(), app.origin.conditional_calls()), (2, 1));
}

#[tokio::test]
async fn an_invalidation_racing_a_revalidation_wins() {
    for soft in [false, true] {
        let redis = RedisServer::new();
        let app = app(&redis, |l| l.beta(0.0)).await;
        hold_a_revalidation(&app).await;
        let key = entry_key(&redis, "/held");
        // Another process invalidates the URL while the origin answers.
        let other = FenceLayer::new(redis.connection_manager().await)
            .namespace("http:")
            .handle();
        if soft {
            other.soft_invalidate_path("/held").await.expect("soft");
        } else {
            other.invalidate_path("/held").await.expect("invalidate");
        }
        app.origin.gate.add_permits(2);
        eventually("the fenced write-back", || app.handle.stats().fenced == 1).await;
        let stats = app.handle.stats();
        assert_eq!((stats.stores, stats.revalidated), (1, 0), "soft {soft}");
        if soft {
            // Still the purged entry: not freshened.
            assert_eq!(redis.cli(&["HGET", &key, "fresh"]), "0");
            assert_eq!(app.get("/held", &[]).await.cache_status(), Some("STALE"));
        } else {
            assert_eq!(redis.cli(&["EXISTS", &key]), "0");
            let after = app.get("/held", &[]).await;
            assert_full(&after);
            assert_eq!(after.cache_status(), Some("MISS"));
            assert_eq!(app.origin.calls(), 3);
        }
    }
}

#[tokio::test]
async fn a_304_for_an_entry_removed_meanwhile_stores_the_response_in_full() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.beta(0.0)).await;
    hold_a_revalidation(&app).await;
    let key = entry_key(&redis, "/held");
    // Gone without an invalidation (evicted, say): the lease still holds.
    redis.cli(&["DEL", &key]);
    app.origin.gate.add_permits(1);
    eventually("the store", || app.handle.stats().stores == 2).await;
    assert_eq!(app.handle.stats().revalidated, 0);
    assert_eq!(redis.cli(&["HGET", &key, "body"]), BODY);
    let hit = app.get("/held", &[]).await;
    assert_full(&hit);
    assert_eq!(hit.cache_status(), Some("HIT"));
    assert_eq!(hit.header("x-validated"), Some("yes"));
}

#[tokio::test]
async fn if_modified_since_on_a_hit_is_answered_304_only_without_if_none_match() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    assert_full(&app.get("/doc", &[]).await);
    let ims = |date| [("if-modified-since", date)];
    assert_not_modified(&app.get("/doc", &ims(LAST_MODIFIED)).await);
    assert_not_modified(&app.get("/doc", &ims("Wed, 02 Dec 2026 10:00:00 GMT")).await);
    assert_full(&app.get("/doc", &ims("Mon, 30 Nov 2026 10:00:00 GMT")).await);
    assert_full(&app.get("/doc", &ims("not a date")).await);
    // If-None-Match decides alone when present.
    let both = [
        ("if-none-match", "\"v2\""),
        ("if-modified-since", LAST_MODIFIED),
    ];
    assert_full(&app.get("/doc", &both).await);
    assert_eq!((app.origin.calls(), app.origin.conditional_calls()), (1, 0));
}

// ---------------------------------------------------------------------------
// 3. Ranges from the cache
// ---------------------------------------------------------------------------

#[tokio::test]
async fn single_byte_ranges_are_answered_206_from_the_cache() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    assert_full(&app.get("/doc", &[]).await);
    for (range, body, content_range) in [
        ("bytes=0-3", "0123", "bytes 0-3/10"),
        ("bytes=5-", "56789", "bytes 5-9/10"),
        ("bytes=-3", "789", "bytes 7-9/10"),
        ("bytes=8-100", "89", "bytes 8-9/10"),
    ] {
        let reply = app.get("/doc", &[("range", range)]).await;
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(reply.text(), body);
        assert_eq!(reply.header("content-range"), Some(content_range));
        assert_eq!(
            reply.header("content-length"),
            Some(&*body.len().to_string())
        );
        assert_eq!(reply.header("etag"), Some(ETAG));
        assert_eq!(reply.cache_status(), Some("HIT"));
    }
    assert_eq!((app.origin.calls(), app.origin.conditional_calls()), (1, 0));
}

#[tokio::test]
async fn unsatisfiable_ranges_get_416_and_multiple_ranges_the_full_200() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    assert_full(&app.get("/doc", &[]).await);
    for range in ["bytes=10-", "bytes=-0"] {
        let reply = app.get("/doc", &[("range", range)]).await;
        assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(reply.header("content-range"), Some("bytes */10"));
        assert!(reply.body.is_empty());
    }
    for range in ["bytes=0-1,4-5", "lines=1-2", "bytes=oops"] {
        assert_full(&app.get("/doc", &[("range", range)]).await);
    }
    // A range on HEAD is ignored (RFC 9110 §14.2).
    let head = app.send("HEAD", "/doc", &[("range", "bytes=0-3")]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(app.origin.calls(), 1);
}

#[tokio::test]
async fn if_range_decides_between_the_range_and_the_full_response() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    assert_full(&app.get("/doc", &[]).await);
    let with = |if_range| [("range", "bytes=0-3"), ("if-range", if_range)];
    for matching in [ETAG, LAST_MODIFIED] {
        let reply = app.get("/doc", &with(matching)).await;
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{matching}");
        assert_eq!(reply.text(), "0123");
    }
    for stale in [
        "\"v0\"",
        "W/\"v1\"",
        "Mon, 30 Nov 2026 10:00:00 GMT",
        "junk",
    ] {
        assert_full(&app.get("/doc", &with(stale)).await);
    }
    // A 304 comes before the range.
    let reply = app
        .get("/doc", &[("range", "bytes=0-3"), ("if-none-match", ETAG)])
        .await;
    assert_not_modified(&reply);
    assert_eq!(app.origin.calls(), 1);
}

#[tokio::test]
async fn serve_dir_validators_and_ranges_are_answered_by_the_cache() {
    let redis = RedisServer::new();
    let dir = std::env::temp_dir().join(format!("cachefence-servedir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("file.txt"), BODY).expect("file");
    let layer = FenceLayer::new(redis.connection_manager().await).namespace("dir:");
    let handle = layer.handle();
    let app = Router::new()
        .nest_service("/static", tower_http::services::ServeDir::new(&dir))
        .layer(layer);
    let addr = serve(app).await;
    let http = Http::new();
    let get = |headers: &'static [(&'static str, &'static str)]| {
        let http = http.clone();
        async move {
            let mut req = http::Request::get(format!("http://{addr}/static/file.txt"));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            http.request(req.body(Full::new(Bytes::new())).expect("request"))
                .await
        }
    };
    // Cold, with a range: the fill asks for the whole file.
    let first = get(&[("range", "bytes=2-4")]).await;
    assert_eq!(first.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(first.text(), "234");
    let last_modified = first.header("last-modified").expect("ServeDir sets it");
    let full = get(&[]).await;
    assert_eq!((full.status, full.text().as_str()), (StatusCode::OK, BODY));
    assert_eq!(full.cache_status(), Some("HIT"));
    // If-Modified-Since with ServeDir's own date.
    let mut req = http::Request::get(format!("http://{addr}/static/file.txt"));
    req = req.header("if-modified-since", last_modified);
    let reply = http
        .request(req.body(Full::new(Bytes::new())).expect("request"))
        .await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    assert_eq!(reply.cache_status(), Some("HIT"));
    assert_eq!(handle.stats().fills, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// 5. Invalidation by unsafe methods (RFC 9111 §4.4)
// ---------------------------------------------------------------------------

/// Caches `/res/a`, sends `method` to `target`, and returns what a GET of
/// `/res/a` says afterwards.
async fn after_write(app: &App, method: &str, target: &str, status: &str) -> Reply {
    let first = app.get("/res/a", &[]).await;
    assert!(first.text().starts_with("/res/a v"));
    assert_eq!(app.get("/res/a", &[]).await.cache_status(), Some("HIT"));
    let write = app.send(method, target, &[("x-status", status)]).await;
    assert_eq!(write.status.as_str(), status);
    assert_eq!(write.cache_status(), Some("BYPASS"));
    app.get("/res/a", &[]).await
}

async fn assert_invalidated_by(method: &str) {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let reply = after_write(&app, method, "/res/a", "200").await;
    assert_eq!(reply.text(), "/res/a v1", "{method}");
    assert_eq!(reply.cache_status(), Some("MISS"));
}

#[tokio::test]
async fn post_invalidates_the_target_uri() {
    assert_invalidated_by("POST").await;
}

#[tokio::test]
async fn put_invalidates_the_target_uri() {
    assert_invalidated_by("PUT").await;
}

#[tokio::test]
async fn patch_invalidates_the_target_uri() {
    assert_invalidated_by("PATCH").await;
}

#[tokio::test]
async fn delete_invalidates_the_target_uri() {
    assert_invalidated_by("DELETE").await;
}

#[tokio::test]
async fn an_unknown_method_invalidates_the_target_uri() {
    assert_invalidated_by("FROB").await;
}

#[tokio::test]
async fn the_target_uri_is_invalidated_with_its_query_normalised_and_all_variants() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    assert_eq!(app.get("/res/q?b=2&a=1", &[]).await.text(), "/res/q v0");
    assert_eq!(
        app.get("/res/q?a=1&b=2", &[]).await.cache_status(),
        Some("HIT")
    );
    app.send("POST", "/res/q?a=1&b=2", &[]).await;
    assert_eq!(app.get("/res/q?b=2&a=1", &[]).await.text(), "/res/q v1");
}

#[tokio::test]
async fn same_origin_location_and_content_location_are_invalidated() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    // The requests' Host (the test client's), which is in the cache key.
    let host = support::TEST_HOST;
    for path in ["/res/a", "/res/b", "/res/c", "/res/other"] {
        app.get(path, &[]).await;
    }
    // Relative, absolute-path and absolute same-origin references.
    let target = format!("/res/new?location=b&content_location=http://{host}/res/c");
    let created = app.send("POST", &target, &[]).await;
    assert_eq!(created.status, StatusCode::OK);
    assert_eq!(app.get("/res/b", &[]).await.text(), "/res/b v1");
    assert_eq!(app.get("/res/c", &[]).await.text(), "/res/c v1");
    assert_eq!(app.get("/res/a", &[]).await.cache_status(), Some("HIT"));
    app.send("PUT", "/res/x?location=/res/a", &[]).await;
    assert_eq!(app.get("/res/a", &[]).await.text(), "/res/a v2");
    // Another origin's URI is left alone.
    app.send(
        "POST",
        "/res/x?location=http://elsewhere.example/res/other",
        &[],
    )
    .await;
    assert_eq!(app.get("/res/other", &[]).await.cache_status(), Some("HIT"));
}

#[tokio::test]
async fn error_responses_and_safe_methods_do_not_invalidate() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for status in ["400", "404", "500"] {
        let reply = after_write(&app, "POST", "/res/a", status).await;
        assert_eq!(reply.cache_status(), Some("HIT"), "POST answered {status}");
    }
    // A redirect is not an error.
    let reply = after_write(&app, "POST", "/res/a", "303").await;
    assert_eq!(reply.cache_status(), Some("MISS"));
    for method in ["OPTIONS", "TRACE"] {
        let reply = after_write(&app, method, "/res/a", "200").await;
        assert_eq!(reply.cache_status(), Some("HIT"), "{method}");
    }
}

#[tokio::test]
async fn invalidation_by_unsafe_methods_can_be_turned_off() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.invalidate_on_unsafe_methods(false)).await;
    let reply = after_write(&app, "DELETE", "/res/a", "204").await;
    assert_eq!(reply.cache_status(), Some("HIT"));
    assert_eq!(reply.text(), "/res/a v0");
}

#[tokio::test]
async fn a_write_still_answers_when_redis_is_down() {
    let mut redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.get("/res/a", &[]).await;
    redis.stop();
    let reply = app.send("POST", "/res/a", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.cache_status(), Some("BYPASS"));
}

// ---------------------------------------------------------------------------
// 7. Cache-Status (RFC 9211)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_status_tells_hits_misses_collapsed_requests_and_bypasses() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.cache_status(Some("cachefence"))
            .status_header(None)
            .ttl(Duration::from_secs(60))
            .beta(0.0)
    })
    .await;
    let (leader, followers) = race(&app, &[], vec![&[]]).await;
    assert_eq!(
        leader.header("cache-status"),
        Some("cachefence; fwd=uri-miss; fwd-status=200; stored")
    );
    assert_eq!(
        followers[0].header("cache-status"),
        Some("cachefence; fwd=uri-miss; fwd-status=200; stored; collapsed")
    );
    assert!(leader.header("x-cache").is_none());
    let hit = app.get("/held", &[]).await;
    let status = hit.header("cache-status").expect("cache-status");
    let ttl: i64 = status
        .strip_prefix("cachefence; hit; ttl=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{status}"));
    assert!((0..=60).contains(&ttl), "{status}");
    // A 304 keeps it.
    let not_modified = app.get("/held", &[("if-none-match", ETAG)]).await;
    assert!(
        not_modified
            .header("cache-status")
            .unwrap()
            .contains("; hit")
    );
    // Stale: no freshness left (0 in the millisecond it turned stale).
    app.handle
        .soft_invalidate_path("/held")
        .await
        .expect("soft");
    let stale = app.get("/held", &[]).await;
    let status = stale.header("cache-status").expect("cache-status");
    let ttl: i64 = status
        .strip_prefix("cachefence; hit; ttl=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{status}"));
    assert!(ttl <= 0, "{status}");
    let post = app.send("POST", "/res/a", &[("x-status", "201")]).await;
    assert_eq!(
        post.header("cache-status"),
        Some("cachefence; fwd=bypass; fwd-status=201")
    );
    let uncacheable = app.get("/always206", &[]).await;
    assert_eq!(
        uncacheable.header("cache-status"),
        Some("cachefence; fwd=uri-miss; fwd-status=206")
    );
}

#[tokio::test]
async fn cache_status_is_off_by_default_and_keeps_upstream_members() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let reply = app.get("/doc", &[]).await;
    assert!(reply.header("cache-status").is_none());
    assert_eq!(reply.cache_status(), Some("MISS"));

    let app = self::app(&redis, |l| l.namespace("cs:").cache_status(Some("edge"))).await;
    let members = |r: &Reply| -> Vec<String> {
        r.headers
            .get_all("cache-status")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    let miss = app.get("/upstream", &[]).await;
    assert_eq!(
        members(&miss),
        [
            "upstream; hit; ttl=5",
            "edge; fwd=uri-miss; fwd-status=200; stored"
        ]
    );
    assert_eq!(miss.cache_status(), Some("MISS"));
    let hit = app.get("/upstream", &[]).await;
    assert_eq!(members(&hit)[0], "upstream; hit; ttl=5");
    assert!(members(&hit)[1].starts_with("edge; hit; ttl="));
    assert_eq!(members(&hit).len(), 2);
}

#[tokio::test]
async fn cache_status_says_fwd_stale_for_a_stale_entry_refreshed_and_fwd_status_304_when_revalidated()
 {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.rfc9111(true).beta(0.0).cache_status(Some("cachefence"))
    })
    .await;
    // Stored to be revalidated on every use: the next request revalidates.
    let first = app.get("/doc?cc=no-cache", &[]).await;
    assert_eq!(
        first.header("cache-status"),
        Some("cachefence; fwd=uri-miss; fwd-status=200; stored")
    );
    let second = app.get("/doc?cc=no-cache", &[]).await;
    assert_full(&second);
    assert_eq!(second.cache_status(), Some("MISS"));
    assert_eq!(
        second.header("cache-status"),
        Some("cachefence; fwd=stale; fwd-status=304; stored")
    );
    // A stale entry refetched in full (no validator to ask with).
    app.get("/rfc/must-revalidate", &[]).await;
    app.handle
        .soft_invalidate_path("/rfc/must-revalidate")
        .await
        .expect("soft");
    let refreshed = app.get("/rfc/must-revalidate", &[]).await;
    assert_eq!(
        refreshed.header("cache-status"),
        Some("cachefence; fwd=stale; fwd-status=200; stored")
    );
}

#[tokio::test]
async fn cache_status_says_fwd_request_when_the_request_forced_a_refetch() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.honor_request_no_cache(true)
            .beta(0.0)
            .cache_status(Some("cachefence"))
    })
    .await;
    app.get("/doc", &[]).await;
    app.get("/rfc/max-age", &[]).await;
    // Revalidated with the entry's ETag: the origin answered 304.
    let refetched = app.get("/doc", &[("cache-control", "no-cache")]).await;
    assert_full(&refetched);
    assert_eq!(
        refetched.header("cache-status"),
        Some("cachefence; fwd=request; fwd-status=304; stored")
    );
    let refetched = app.get("/rfc/max-age", &[("pragma", "no-cache")]).await;
    assert_eq!(
        refetched.header("cache-status"),
        Some("cachefence; fwd=request; fwd-status=200; stored")
    );
    assert_eq!(app.origin.conditional_calls(), 1);
}

#[tokio::test]
async fn cache_status_says_redis_unavailable_when_the_cache_answers_without_redis() {
    let mut redis = RedisServer::new();
    let app = app(&redis, |l| l.cache_status(Some("cachefence"))).await;
    let unavailable = "cachefence; fwd=bypass; fwd-status=200; detail=redis-unavailable";
    // The lease can't be taken (scripts denied): the fill answers without it.
    redis.cli(&["ACL", "SETUSER", "default", "-@scripting"]);
    let reply = app.get("/doc", &[]).await;
    assert_full(&reply);
    assert_eq!(reply.cache_status(), Some("BYPASS"));
    assert_eq!(reply.header("cache-status"), Some(unavailable));
    redis.cli(&["ACL", "SETUSER", "default", "+@all"]);
    assert!(
        app.get("/rfc/max-age", &[])
            .await
            .header("cache-status")
            .unwrap()
            .starts_with("cachefence; fwd=uri-miss")
    );
    // Redis gone: lookups fail, then the breaker opens; every answer says so.
    redis.stop();
    for _ in 0..8 {
        let reply = app.get("/doc", &[]).await;
        assert_full(&reply);
        assert_eq!(reply.header("cache-status"), Some(unavailable));
    }
    let head = app.send("HEAD", "/doc", &[]).await;
    assert_eq!(head.header("cache-status"), Some(unavailable));
}

// ---------------------------------------------------------------------------
// 8. Accept-Encoding normalisation and other Vary headers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn accept_encoding_variants_are_normalised_to_one_coding() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let cases = [
        ("gzip, deflate, br", "br -"),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", "br -"),
        ("deflate, gzip, br", "br -"),
        ("br, gzip", "br -"),
        ("gzip", "gzip -"),
        ("gzip, deflate", "gzip -"),
        ("x-gzip;q=0.5, identity", "gzip -"),
        ("deflate", "identity -"),
        ("identity", "identity -"),
        ("zstd, br", "zstd -"),
    ];
    for (accept, seen) in cases {
        let reply = app.get("/enc", &[("accept-encoding", accept)]).await;
        assert_eq!(reply.text(), seen, "{accept}");
    }
    // One origin call per normalised value: br, zstd, gzip, identity.
    assert_eq!(app.origin.calls(), 4);
    // No header: left alone, its own variant.
    assert_eq!(app.get("/enc", &[]).await.text(), "- -");
    assert_eq!(app.origin.calls(), 5);
}

#[tokio::test]
async fn other_vary_headers_are_normalised_by_a_hook_and_accept_encoding_can_be_left_alone() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.normalize_accept_encoding(false).normalize_header(
            header::ACCEPT_LANGUAGE,
            |v: &http::HeaderValue| {
                let de = v.to_str().ok()?.trim_start().starts_with("de");
                Some(http::HeaderValue::from_static(if de { "de" } else { "en" }))
            },
        )
    })
    .await;
    for lang in ["de-CH, en;q=0.5", "de", "de-DE"] {
        let reply = app
            .get(
                "/enc",
                &[("accept-language", lang), ("accept-encoding", "gzip, br")],
            )
            .await;
        assert_eq!(reply.text(), "gzip, br de");
    }
    assert_eq!(app.origin.calls(), 1);
    let reply = app
        .get(
            "/enc",
            &[("accept-language", "fr"), ("accept-encoding", "gzip, br")],
        )
        .await;
    assert_eq!(reply.text(), "gzip, br en");
    assert_eq!(app.origin.calls(), 2);
}

// ---------------------------------------------------------------------------
// 6. RFC 9111 shared-cache mode
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rfc9111_mode_stores_only_what_the_response_says_is_fresh() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.rfc9111(true).beta(0.0)).await;
    for (case, cached) in [
        ("max-age", true),
        ("age", true),
        ("expires", true),
        ("cdn", true),
        ("age-exceeds", false),
        ("old-date", false),
        // An invalid Age is ignored (RFC 9111 §5.1), not a reason to refuse.
        ("age-garbage", true),
        ("none", false),
        ("expired", false),
    ] {
        let path = format!("/rfc/{case}");
        let before = app.origin.calls();
        app.get(&path, &[]).await;
        let second = app.get(&path, &[]).await;
        assert_eq!(
            second.cache_status() == Some("HIT"),
            cached,
            "{case}: {second:?}"
        );
        assert_eq!(
            app.origin.calls() - before,
            if cached { 1 } else { 2 },
            "{case}"
        );
    }
}

#[tokio::test]
async fn rfc9111_mode_counts_the_upstream_age_on_hits() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.rfc9111(true).beta(0.0)).await;
    app.get("/rfc/age", &[]).await;
    let hit = app.get("/rfc/age", &[]).await;
    assert_eq!(hit.cache_status(), Some("HIT"));
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!((20..60).contains(&age), "{age}");
}

#[tokio::test]
async fn rfc9111_mode_serves_stale_only_when_the_response_allows_it() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.rfc9111(true).beta(0.0)).await;
    // Both arrive with one second of freshness left (Age 60, max-age 61).
    for case in ["swr-short", "must-revalidate-short"] {
        let path = format!("/rfc/{case}");
        assert_eq!(app.get(&path, &[]).await.cache_status(), Some("MISS"));
        assert_eq!(app.get(&path, &[]).await.cache_status(), Some("HIT"));
    }
    // Expiry is a matter of time: let that second pass.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let swr = app.get("/rfc/swr-short", &[]).await;
    assert_eq!(swr.cache_status(), Some("STALE"));
    let strict = app.get("/rfc/must-revalidate-short", &[]).await;
    assert_eq!(strict.cache_status(), Some("MISS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rfc9111_mode_revalidates_no_cache_responses_on_every_use() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.rfc9111(true).beta(0.0)).await;
    app.origin.gate.add_permits(1);
    assert_full(&app.get("/held?cc=no-cache", &[]).await);
    // Every use asks the origin with the stored ETag; its 304 serves the
    // stored body, which stays in Redis.
    for n in 1..=3 {
        app.origin.gate.add_permits(1);
        let reply = app.get("/held?cc=no-cache", &[]).await;
        assert_full(&reply);
        assert_eq!(reply.cache_status(), Some("MISS"));
        assert_eq!(app.handle.stats().revalidated, n);
    }
    assert_eq!((app.origin.calls(), app.origin.conditional_calls()), (4, 3));
    // Concurrent requests share one revalidation: it was made after each
    // of them arrived, so each is answered by a validated response.
    let (leader, followers) = race_on(&app, "/held?cc=no-cache", 4, &[], vec![&[]; 5]).await;
    assert_full(&leader);
    for f in &followers {
        assert_full(f);
    }
    assert_eq!((app.origin.calls(), app.origin.conditional_calls()), (5, 4));
    // A conditional request is answered from the revalidated response.
    app.origin.gate.add_permits(1);
    assert_not_modified_no_cache(
        &app.get("/held?cc=no-cache", &[("if-none-match", ETAG)])
            .await,
    );
    // Without a validator there is nothing to revalidate: not stored, and
    // a pass marker sends the next requests straight to the origin.
    app.get("/rfc/no-cache", &[]).await;
    assert_eq!(
        app.get("/rfc/no-cache", &[]).await.cache_status(),
        Some("BYPASS")
    );
    assert_eq!(app.origin.calls(), 8);
    assert_eq!(app.handle.stats().stores, 6);
}

fn assert_not_modified_no_cache(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{reply:?}");
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("etag"), Some(ETAG));
    assert_eq!(reply.header("cache-control"), Some("no-cache"));
}

/// Bytes Redis has read from its clients.
fn net_input_bytes(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_net_input_bytes")
}

#[tokio::test]
async fn a_revalidation_sends_redis_the_head_of_the_entry_not_its_body() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.rfc9111(true).beta(0.0)).await;
    let before = net_input_bytes(&redis);
    assert_eq!(app.get("/big", &[]).await.body.len(), BIG);
    let stored = net_input_bytes(&redis) - before;
    // The first revalidation loads the FRESHEN script; the second is what
    // every later one costs.
    let mut revalidated = 0;
    for n in 1..=2 {
        let before = net_input_bytes(&redis);
        let reply = app.get("/big", &[]).await;
        revalidated = net_input_bytes(&redis) - before;
        assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, BIG));
        assert_eq!(app.handle.stats().revalidated, n);
    }
    eprintln!("bytes sent to Redis: store {stored}, revalidation {revalidated}");
    // The store carried the body; a revalidation (lookup, lease, head
    // write, and these INFO calls) none of it.
    assert!(stored > BIG as u64, "{stored}");
    assert!(revalidated < 8 * 1024, "{revalidated}");
}

#[tokio::test]
async fn rfc9111_mode_serves_stale_if_error_beyond_the_stale_while_revalidate_window() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.rfc9111(true).beta(0.0)).await;
    // Each arrives with two seconds of freshness left (Age 60, max-age 62).
    let cases = [
        "short",
        "sie-short",
        "sie-swr-short",
        "sie-must-revalidate-short",
    ];
    for case in cases {
        let path = format!("/rfc/{case}");
        assert_eq!(app.get(&path, &[]).await.cache_status(), Some("MISS"));
    }
    assert_eq!(app.handle.stats().stores, 4);
    // Expiry is a matter of time: let the two seconds of freshness, and the
    // one-second stale-while-revalidate window, pass.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    app.origin.failing.store(true, Ordering::SeqCst);
    for (case, stale) in [
        ("short", false),
        ("sie-short", true),
        ("sie-swr-short", true),
        ("sie-must-revalidate-short", false),
    ] {
        let reply = app.get(&format!("/rfc/{case}"), &[]).await;
        if stale {
            assert_eq!(reply.status, StatusCode::OK, "{case}");
            assert_eq!(reply.cache_status(), Some("STALE"), "{case}");
            assert!(reply.text().starts_with(case), "{case}");
        } else {
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{case}");
        }
    }
    // Without an error the stale entry is not served: the origin answers.
    app.origin.failing.store(false, Ordering::SeqCst);
    let reply = app.get("/rfc/sie-short", &[]).await;
    assert_eq!(reply.cache_status(), Some("MISS"));
}

#[tokio::test]
async fn rfc9111_mode_counts_the_response_delay_in_the_age() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.rfc9111(true).beta(0.0)).await;
    // Age 10 on a response that took 1.5 s to arrive: 11.5 s old.
    app.get("/rfc/slow", &[]).await;
    let hit = app.get("/rfc/slow", &[]).await;
    assert_eq!(hit.cache_status(), Some("HIT"));
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!((11..600).contains(&age), "{age}");
}

#[tokio::test]
async fn rfc9111_mode_soft_purges_serve_stale_only_when_the_response_allows_it() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.rfc9111(true).beta(0.0)).await;
    for (case, stale) in [
        ("max-age", true),
        ("must-revalidate", false),
        ("proxy-revalidate", false),
        ("s-maxage", false),
    ] {
        let path = format!("/rfc/{case}");
        app.get(&path, &[]).await;
        assert_eq!(app.get(&path, &[]).await.cache_status(), Some("HIT"));
        app.handle.soft_invalidate_path(&path).await.expect("soft");
        let reply = app.get(&path, &[]).await;
        let expected = if stale { "STALE" } else { "MISS" };
        assert_eq!(reply.cache_status(), Some(expected), "{case}");
    }
}

#[tokio::test]
async fn without_rfc9111_mode_the_layer_ttl_rules_apply() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for case in ["none", "age-exceeds", "expired"] {
        let path = format!("/rfc/{case}");
        app.get(&path, &[]).await;
        assert_eq!(
            app.get(&path, &[]).await.cache_status(),
            Some("HIT"),
            "{case}"
        );
    }
}

// ---------------------------------------------------------------------------
// 9. examples/reverse_proxy.rs over real sockets
// ---------------------------------------------------------------------------

/// The reverse proxy example as a child process, killed on drop.
struct ReverseProxy {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ReverseProxy {
    fn start(origin: SocketAddr, redis: &RedisServer) -> Self {
        Self::start_with(origin, redis, &[])
    }

    /// Started with more flags.
    fn start_with(origin: SocketAddr, redis: &RedisServer, flags: &[&str]) -> Self {
        use std::io::BufRead;
        // Built by the test so that it runs against this checkout.
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", "reverse_proxy"])
            .status()
            .expect("cargo build --example reverse_proxy");
        assert!(status.success(), "building the example failed");
        let exe = std::env::current_exe().expect("test exe");
        // target/<profile>/deps/<test> -> target/<profile>/examples/reverse_proxy
        let bin = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target dir")
            .join("examples")
            .join("reverse_proxy");
        let mut child = std::process::Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--origin"])
            .arg(format!("http://{origin}"))
            .args(["--redis", &redis.url(), "--namespace", "rp:"])
            .args(flags)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the proxy's first line");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("LISTENING="))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Self { child, addr }
    }
}

impl Drop for ReverseProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reverse_proxy_caches_forwards_faithfully_and_survives_redis_going_down() {
    let mut redis = RedisServer::new();
    let origin = Origin::new();
    let origin_addr = serve(origin.routes()).await;
    let proxy = ReverseProxy::start(origin_addr, &redis);
    let http = Http::new();
    let send = |method: &str, path: &str, headers: &[(&str, &str)], body: &'static str| {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", proxy.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request");
        let http = http.clone();
        async move { http.request(req).await }
    };

    // Cached as the origin's Cache-Control says; a range from the cache.
    let miss = send("GET", "/doc", &[], "").await;
    assert_full(&miss);
    assert!(miss.header("via").unwrap().contains("cachefence"));
    assert_eq!(
        miss.header("cache-status"),
        Some("cachefence; fwd=uri-miss; fwd-status=200; stored")
    );
    let hit = send("GET", "/doc", &[], "").await;
    assert!(
        hit.header("cache-status")
            .unwrap()
            .starts_with("cachefence; hit")
    );
    let range = send("GET", "/doc", &[("range", "bytes=-4")], "").await;
    assert_eq!(
        (range.status, range.text().as_str()),
        (StatusCode::PARTIAL_CONTENT, "6789")
    );
    let not_modified = send("GET", "/doc", &[("if-none-match", ETAG)], "").await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert_eq!((origin.calls(), origin.conditional_calls()), (1, 0));

    // Hop-by-hop headers stay behind; Via is added.
    let echoed = send(
        "GET",
        "/echo-headers",
        &[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("x-kept", "1"),
        ],
        "",
    )
    .await;
    let names = echoed.text();
    assert!(names.contains("x-kept") && names.contains("via"), "{names}");
    assert!(!names.contains("x-secret"), "{names}");

    // X-Forwarded-For gets the client appended; Proto and Host are the
    // proxy's view (the client's own values replaced).
    let forwarded = send(
        "GET",
        "/forwarded",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ],
        "",
    )
    .await;
    assert_eq!(forwarded.text(), "203.0.113.9, 127.0.0.1 | http | app.test");
    let forwarded = send("GET", "/forwarded", &[], "").await;
    assert_eq!(forwarded.text(), "127.0.0.1 | http | app.test");

    // A write goes through with its body and invalidates what it touched.
    assert_eq!(send("GET", "/res/a", &[], "").await.text(), "/res/a v0");
    let post = send("POST", "/res/a", &[], "hello").await;
    assert_eq!(post.header("x-body-len"), Some("5"));
    assert_eq!(send("GET", "/res/a", &[], "").await.text(), "/res/a v1");

    // Redis down: every request is still answered by the origin.
    redis.stop();
    for path in ["/doc", "/res/b", "/rfc/none"] {
        let reply = send("GET", path, &[], "").await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
    let after = origin.calls();
    assert!(after >= 5, "{after}");
}

#[tokio::test]
async fn the_reverse_proxy_answers_504_when_the_origin_sends_no_response_in_time() {
    let redis = RedisServer::new();
    let origin = Origin::new();
    let origin_addr = serve(origin.routes()).await;
    let proxy = ReverseProxy::start_with(
        origin_addr,
        &redis,
        &["--response-timeout", "300ms", "--connect-timeout", "1s"],
    );
    let http = Http::new();
    // Through a fill, and passed through (a write).
    for method in ["GET", "POST"] {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/hang", proxy.addr))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let reply = http.request(req).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{method}");
    }
    // The proxy still answers.
    assert_full(&http.get(proxy.addr, "/doc").await);
}

#[tokio::test]
async fn the_reverse_proxy_answers_502_when_the_origin_is_unreachable() {
    let redis = RedisServer::new();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let proxy = ReverseProxy::start(dead, &redis);
    let reply = Http::new().get(proxy.addr, "/anything").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
}
