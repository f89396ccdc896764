//! RFC 9110 / 9111 conformance of the RFC 9111 mode and of the reverse
//! proxy's defaults (issue 24), against a real `redis-server` and real
//! HTTP: one test per behaviour, each of which failed before.
//!
//! The origin is scripted per path: a test says what each path answers
//! (given the request and its call number) and reads back what reached it.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cachefence::{FenceCache, FenceHandle, FenceLayer};
use http_body_util::Full;
use redis::aio::ConnectionManager;
use support::{Http, RedisServer, Reply, serve};
use tokio::sync::Semaphore;

/// What a path answers: the request's headers and its call number (1 for
/// the first call of that path) in, the response out.
type Script = Arc<dyn Fn(&HeaderMap, usize) -> Answer + Send + Sync>;

/// A scripted answer.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
    Answer {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body: body.to_owned(),
    }
}

#[derive(Clone, Default)]
struct Origin {
    scripts: Arc<Mutex<HashMap<String, Script>>>,
    /// Every request that reached the origin: path and headers.
    seen: Arc<Mutex<Vec<(String, HeaderMap)>>>,
    /// When set, each call takes a permit first (held fills).
    gate: Arc<Mutex<Option<Arc<Semaphore>>>>,
}

impl Origin {
    fn on(&self, path: &str, script: impl Fn(&HeaderMap, usize) -> Answer + Send + Sync + 'static) {
        self.scripts
            .lock()
            .expect("scripts")
            .insert(path.to_owned(), Arc::new(script));
    }

    /// The same answer every time.
    fn always(&self, path: &str, a: Answer) {
        self.on(path, move |_, _| a.clone());
    }

    /// The requests `path` got, in order.
    fn requests(&self, path: &str) -> Vec<HeaderMap> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, h)| h.clone())
            .collect()
    }

    fn calls(&self, path: &str) -> usize {
        self.requests(path).len()
    }

    fn routes(&self) -> Router {
        Router::new().fallback(scripted).with_state(self.clone())
    }
}

async fn scripted(State(o): State<Origin>, req: Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let headers = req.headers().clone();
    let gate = o.gate.lock().expect("gate").clone();
    if let Some(gate) = gate {
        gate.acquire().await.expect("gate open").forget();
    }
    let n = {
        let mut seen = o.seen.lock().expect("seen");
        seen.push((path.clone(), headers.clone()));
        seen.iter().filter(|(p, _)| *p == path).count()
    };
    let script = o.scripts.lock().expect("scripts").get(&path).cloned();
    let Some(script) = script else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let a = script(&headers, n);
    let mut res = a.body.into_response();
    *res.status_mut() = StatusCode::from_u16(a.status).expect("status");
    for (k, v) in a.headers {
        res.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    res
}

/// An HTTP date `offset` seconds from now.
fn date(offset: i64) -> String {
    let now = SystemTime::now();
    let t = if offset >= 0 {
        now + Duration::from_secs(offset.unsigned_abs())
    } else {
        now - Duration::from_secs(offset.unsigned_abs())
    };
    httpdate::fmt_http_date(t)
}

struct App {
    addr: SocketAddr,
    origin: Origin,
    handle: FenceHandle<ConnectionManager>,
    http: Http,
}

/// The one place this file builds a cache: RFC 9111 mode unless
/// `configure` says otherwise, no early refresh.
async fn app(
    redis: &RedisServer,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    // A generous Redis timeout: these tests are about HTTP, not about a
    // loaded machine's Redis latency (a store timing out fails open).
    let layer = FenceCache::builder(redis.connection_manager().await)
        .redis_timeout(Duration::from_secs(2))
        .build()
        .expect("cache")
        .layer()
        .namespace("conf:")
        .rfc9111(true)
        .beta(0.0)
        .cache_status(Some("cachefence"));
    let layer = configure(layer);
    let origin = Origin::default();
    let handle = layer.handle();
    let addr = serve(origin.routes().layer(layer)).await;
    App {
        addr,
        origin,
        handle,
        http: Http::new(),
    }
}

async fn get_from(http: &Http, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    http.request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
}

impl App {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        get_from(&self.http, self.addr, path, headers).await
    }

    /// Two GETs: whether the second was a hit.
    async fn stored(&self, path: &str) -> bool {
        self.get(path, &[]).await;
        self.get(path, &[]).await.cache_status() == Some("HIT")
    }
}

fn age_of(reply: &Reply) -> u64 {
    reply
        .header("age")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no Age: {reply:?}"))
}

/// Lets a freshness lifetime run out (expiry is a matter of time).
async fn let_expire(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    // A hang guard, not a speed limit.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. Stale entries with validators are kept and revalidated (§4.3)
// ---------------------------------------------------------------------------

const ETAG: &str = "\"e1\"";
const LAST_MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";

/// `max-age=1` with validators; a conditional request carrying them gets
/// a 304 that says `x-validated` and a new lifetime.
fn validating(cc: &'static str) -> impl Fn(&HeaderMap, usize) -> Answer {
    move |h, n| {
        if h.get("if-none-match").is_some_and(|v| v == ETAG) {
            let body = format!("call {n}");
            return answer(
                304,
                &[
                    ("etag", ETAG),
                    ("cache-control", "max-age=60"),
                    ("x-validated", &body),
                    ("content-length", "0"),
                ],
                "",
            );
        }
        answer(
            200,
            &[
                ("etag", ETAG),
                ("last-modified", LAST_MODIFIED),
                ("cache-control", cc),
                ("x-stored", "1"),
            ],
            "the stored body",
        )
    }
}

async fn assert_revalidated_after_expiry(
    get: impl AsyncFn(&[(&str, &str)]) -> Reply,
    origin: &Origin,
    path: &str,
) {
    let first = get(&[]).await;
    assert_eq!(first.text(), "the stored body");
    let_expire(1.3).await;
    let second = get(&[]).await;
    // Conditional, with both validators of the stored response.
    let asked = origin.requests(path);
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(
        asked[1].get("if-none-match").map(|v| v.to_str().ok()),
        Some(Some(ETAG))
    );
    assert_eq!(
        asked[1]
            .get("if-modified-since")
            .and_then(|v| v.to_str().ok()),
        Some(LAST_MODIFIED)
    );
    // The stored body with the 304's fields, its own length kept.
    assert_eq!(
        (second.status, second.text().as_str()),
        (StatusCode::OK, "the stored body")
    );
    assert_eq!(second.header("x-validated"), Some("call 2"));
    assert_eq!(second.header("x-stored"), Some("1"));
    assert_eq!(second.header("content-length"), Some("15"));
    assert_eq!(second.header("cache-control"), Some("max-age=60"));
    // Freshened: a hit now.
    let third = get(&[]).await;
    assert_eq!(third.text(), "the stored body");
    assert_eq!(third.header("x-validated"), Some("call 2"));
    assert_eq!(origin.calls(path), 2);
}

#[tokio::test]
async fn a_stale_entry_with_validators_is_revalidated_not_refetched() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.on("/v", validating("max-age=1"));
    assert_revalidated_after_expiry(async |h| app.get("/v", h).await, &app.origin, "/v").await;
    assert_eq!(app.get("/v", &[]).await.cache_status(), Some("HIT"));
    assert_eq!(app.handle.stats().revalidated, 1);
}

#[tokio::test]
async fn must_revalidate_means_revalidate_not_refetch() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin
        .on("/mr", validating("max-age=1, must-revalidate"));
    assert_revalidated_after_expiry(async |h| app.get("/mr", h).await, &app.origin, "/mr").await;
}

#[tokio::test]
async fn a_response_stale_on_arrival_with_a_validator_is_kept_to_be_revalidated() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.on("/zero", validating("max-age=0"));
    assert_eq!(app.get("/zero", &[]).await.text(), "the stored body");
    let second = app.get("/zero", &[]).await;
    assert_eq!(second.text(), "the stored body");
    assert_eq!(second.header("x-validated"), Some("call 2"));
    let asked = app.origin.requests("/zero");
    assert_eq!(
        asked[1].get("if-none-match").map(|v| v.as_bytes()),
        Some(ETAG.as_bytes())
    );
    // The 304 said max-age=60: fresh now.
    assert_eq!(app.get("/zero", &[]).await.cache_status(), Some("HIT"));
    assert_eq!(app.origin.calls("/zero"), 2);
}

#[tokio::test]
async fn a_kept_entry_is_never_served_without_revalidation() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.on("/down", |_, n| {
        if n == 1 {
            answer(200, &[("etag", ETAG), ("cache-control", "max-age=1")], "v1")
        } else {
            answer(503, &[], "down")
        }
    });
    assert_eq!(app.get("/down", &[]).await.text(), "v1");
    let_expire(1.3).await;
    // The origin fails: no stale-if-error, so the stale entry stays unused.
    let reply = app.get("/down", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let asked = app.origin.requests("/down");
    assert!(
        asked[1].contains_key("if-none-match"),
        "{asked:?} {:?}",
        app.handle.stats()
    );
}

#[tokio::test]
async fn the_revalidation_window_bounds_how_long_a_validated_entry_stays_in_redis() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.revalidation_window(Duration::from_secs(120))).await;
    app.origin.always(
        "/w",
        answer(200, &[("etag", ETAG), ("cache-control", "max-age=30")], "x"),
    );
    app.origin
        .always("/nw", answer(200, &[("cache-control", "max-age=30")], "x"));
    app.get("/w", &[]).await;
    app.get("/nw", &[]).await;
    let pttl = |path: &str| -> i64 {
        let keys = redis.cli(&["KEYS", &format!("conf:*{path}:*")]);
        let key = keys
            .lines()
            .find(|k| !k.contains(":lease") && !k.ends_with(":vars") && !k.ends_with(":fence"))
            .unwrap_or_else(|| panic!("no entry for {path}: {keys}"))
            .to_owned();
        redis.cli(&["PTTL", &key]).trim().parse().expect("pttl")
    };
    // Freshness (30 s) plus the window (120 s) with a validator; without
    // one, freshness only.
    let with = pttl("/w");
    assert!((140_000..=150_000).contains(&with), "{with}");
    let without = pttl("/nw");
    assert!((20_000..=30_000).contains(&without), "{without}");
}

#[tokio::test]
async fn a_variant_is_revalidated_with_its_own_validator() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.on("/lang", |h, _| {
        let lang = h
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let etag = format!("\"{lang}\"");
        if h.get("if-none-match")
            .is_some_and(|v| v.as_bytes() == etag.as_bytes())
        {
            return answer(
                304,
                &[
                    ("etag", &etag),
                    ("cache-control", "max-age=60"),
                    ("vary", "accept-language"),
                ],
                "",
            );
        }
        answer(
            200,
            &[
                ("etag", &etag),
                ("cache-control", "max-age=1"),
                ("vary", "accept-language"),
            ],
            &format!("in {lang}"),
        )
    });
    assert_eq!(
        app.get("/lang", &[("accept-language", "en")]).await.text(),
        "in en"
    );
    assert_eq!(
        app.get("/lang", &[("accept-language", "fr")]).await.text(),
        "in fr"
    );
    let_expire(1.3).await;
    let fr = app.get("/lang", &[("accept-language", "fr")]).await;
    assert_eq!(fr.text(), "in fr");
    let asked = app.origin.requests("/lang");
    assert_eq!(asked.len(), 3);
    assert_eq!(
        asked[2].get("if-none-match").map(|v| v.as_bytes()),
        Some(&b"\"fr\""[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_a_kept_entry_make_one_conditional_request() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.on("/c", validating("max-age=1"));
    app.get("/c", &[]).await;
    let_expire(1.3).await;
    let gate = Arc::new(Semaphore::new(0));
    *app.origin.gate.lock().expect("gate") = Some(gate.clone());
    let coalesced = app.handle.stats().coalesced;
    let mut replies = Vec::new();
    for _ in 0..8 {
        let (http, addr) = (app.http.clone(), app.addr);
        replies.push(tokio::spawn(async move {
            get_from(&http, addr, "/c", &[]).await
        }));
    }
    eventually("the requests to join one fill", || {
        app.handle.stats().coalesced >= coalesced + 7
    })
    .await;
    gate.add_permits(100);
    for r in replies {
        assert_eq!(r.await.expect("reply").text(), "the stored body");
    }
    assert_eq!(app.origin.calls("/c"), 2);
    assert!(app.origin.requests("/c")[1].contains_key("if-none-match"));
}

// ---------------------------------------------------------------------------
// 2. Age (§5.1, §1.2.2) and the Age the cache sends
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_invalid_age_is_ignored_and_a_list_counts_its_first_member() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for (path, ages, min_age) in [
        ("/age/float", &["1.5"][..], 0),
        ("/age/negative", &["-10"][..], 0),
        ("/age/prefix", &["1a"][..], 0),
        ("/age/list", &["10, 20"][..], 10),
        ("/age/lines", &["10", "30"][..], 10),
    ] {
        let mut headers = vec![("cache-control", "max-age=3600")];
        headers.extend(ages.iter().map(|a| ("age", *a)));
        app.origin.always(path, answer(200, &headers, "x"));
        assert!(app.stored(path).await, "{path}");
        let hit = app.get(path, &[]).await;
        let age = age_of(&hit);
        assert!((min_age..min_age + 30).contains(&age), "{path}: {age}");
        assert_eq!(app.origin.calls(path), 1, "{path}");
    }
}

#[tokio::test]
async fn the_first_response_keeps_the_upstream_age() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.always(
        "/aged",
        answer(
            200,
            &[("cache-control", "max-age=3600"), ("age", "30")],
            "x",
        ),
    );
    let first = app.get("/aged", &[]).await;
    assert_eq!(first.cache_status(), Some("MISS"));
    assert!((30..60).contains(&age_of(&first)), "{first:?}");
    let hit = app.get("/aged", &[]).await;
    assert!((30..60).contains(&age_of(&hit)), "{hit:?}");
}

// ---------------------------------------------------------------------------
// 6. Dates in every format RFC 9110 §5.6.7 makes recipients accept
// ---------------------------------------------------------------------------

/// `Tue, 01 Dec 2026 12:00:00 GMT` in the RFC 850 and asctime formats.
fn obsolete_formats(imf: &str) -> (String, String) {
    let parts: Vec<&str> = imf.split([',', ' ']).filter(|p| !p.is_empty()).collect();
    let (wd, day, mon, year, time) = (parts[0], parts[1], parts[2], parts[3], parts[4]);
    let long = match wd {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    };
    let rfc850 = format!("{long}, {day}-{mon}-{} {time} GMT", &year[2..]);
    let day_num: u32 = day.parse().expect("day");
    let asctime = format!("{wd} {mon} {day_num:>2} {time} {year}");
    (rfc850, asctime)
}

#[tokio::test]
async fn expires_in_obsolete_formats_and_any_case_is_understood() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let (rfc850, asctime) = obsolete_formats(&date(3600));
    for (path, expires) in [
        ("/exp/lower", date(3600).to_lowercase()),
        ("/exp/upper-rfc850", rfc850.to_uppercase()),
        ("/exp/lower-asctime", asctime.to_lowercase()),
    ] {
        app.origin.always(
            path,
            answer(200, &[("date", &date(0)), ("expires", &expires)], "x"),
        );
        assert!(app.stored(path).await, "{path}: {expires}");
    }
}

#[tokio::test]
async fn a_date_in_any_case_counts_in_the_age() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let (rfc850, _) = obsolete_formats(&date(-100));
    app.origin.always(
        "/dated",
        answer(
            200,
            &[
                ("date", &rfc850.to_lowercase()),
                ("cache-control", "max-age=3600"),
            ],
            "x",
        ),
    );
    assert!(app.stored("/dated").await);
    let age = age_of(&app.get("/dated", &[]).await);
    assert!((100..130).contains(&age), "{age}");
}

#[tokio::test]
async fn last_modified_in_an_obsolete_format_gives_heuristic_freshness_and_answers_conditions() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.heuristic_freshness(0.1)).await;
    let (_, asctime) = obsolete_formats(&date(-36_000));
    app.origin.always(
        "/lm",
        answer(200, &[("last-modified", &asctime.to_uppercase())], "x"),
    );
    assert!(app.stored("/lm").await);
    let not_modified = app.get("/lm", &[("if-modified-since", &date(-3600))]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
}

// ---------------------------------------------------------------------------
// 3. CDN-Cache-Control (RFC 9213)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn cdn_cache_control_overrides_a_no_store_cache_control() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let cdn = answer(
        200,
        &[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60"),
        ],
        "x",
    );
    app.origin.always("/cdn", cdn.clone());
    assert!(app.stored("/cdn").await);
    app.origin.always(
        "/cdn-no",
        answer(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store"),
            ],
            "x",
        ),
    );
    assert!(!app.stored("/cdn-no").await);
    // The plain middleware does not read CDN-Cache-Control: Cache-Control's
    // no-store still refuses.
    let plain = self::app(&redis, |l| l.rfc9111(false).namespace("plain:")).await;
    plain.origin.always("/cdn", cdn);
    assert!(!plain.stored("/cdn").await);
}

// ---------------------------------------------------------------------------
// 4. Explicit freshness for any final status; must-understand
// ---------------------------------------------------------------------------

#[tokio::test]
async fn explicit_freshness_makes_any_final_status_storable() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for status in [302, 303, 307, 400, 403, 500, 502, 503, 504, 599] {
        let path = format!("/status/{status}");
        app.origin.always(
            &path,
            answer(status, &[("cache-control", "max-age=60")], "x"),
        );
        assert!(app.stored(&path).await, "{status}");
        assert_eq!(app.get(&path, &[]).await.status.as_u16(), status);
        assert_eq!(app.origin.calls(&path), 1, "{status}");
        let expires = format!("/status/{status}/expires");
        app.origin.always(
            &expires,
            answer(status, &[("date", &date(0)), ("expires", &date(60))], "x"),
        );
        assert!(app.stored(&expires).await, "{status} with Expires");
    }
    // Without explicit freshness they are not stored.
    app.origin.always("/status/500/none", answer(500, &[], "x"));
    assert!(!app.stored("/status/500/none").await);
}

#[tokio::test]
async fn must_understand_stores_an_understood_status_despite_no_store() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let cc = [("cache-control", "max-age=60, must-understand, no-store")];
    app.origin.always("/mu", answer(200, &cc, "x"));
    assert!(app.stored("/mu").await);
    app.origin.always("/mu-unknown", answer(299, &cc, "x"));
    assert!(!app.stored("/mu-unknown").await);
}

// ---------------------------------------------------------------------------
// 5. Heuristic freshness (§4.2.2)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn heuristic_freshness_is_opt_in_and_only_for_heuristically_cacheable_statuses() {
    let redis = RedisServer::new();
    let off = app(&redis, |l| l).await;
    let on = app(&redis, |l| l.namespace("heur:").heuristic_freshness(0.1)).await;
    for app in [&off, &on] {
        for status in [200, 404, 500] {
            let path = format!("/heur/{status}");
            app.origin.always(
                &path,
                answer(
                    status,
                    &[("date", &date(0)), ("last-modified", &date(-100_000))],
                    "x",
                ),
            );
        }
    }
    assert!(!off.stored("/heur/200").await);
    assert!(on.stored("/heur/200").await);
    assert!(on.stored("/heur/404").await);
    assert!(!on.stored("/heur/500").await);
    // Capped at the TTL (60 s by default), not 10% of 100,000 s, unless
    // told otherwise.
    let ttl_of = |reply: &Reply| -> i64 {
        reply
            .header("cache-status")
            .and_then(|s| s.split("ttl=").nth(1))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{reply:?}"))
    };
    let hit = on.get("/heur/200", &[]).await;
    assert!((50..=60).contains(&ttl_of(&hit)), "{hit:?}");
    let long = app(&redis, |l| {
        l.namespace("long:")
            .heuristic_freshness(0.1)
            .heuristic_freshness_max(Duration::from_secs(3600))
    })
    .await;
    long.origin.always(
        "/heur",
        answer(
            200,
            &[("date", &date(0)), ("last-modified", &date(-100_000))],
            "x",
        ),
    );
    assert!(long.stored("/heur").await);
    let hit = long.get("/heur", &[]).await;
    assert!((3500..=3600).contains(&ttl_of(&hit)), "{hit:?}");
}

// ---------------------------------------------------------------------------
// 7. Vary matching after normalisation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn accept_language_variants_match_whatever_the_case_order_spaces_and_weights() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.on("/al", |h, n| {
        let lang = h
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        answer(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            &format!("{lang} #{n}"),
        )
    });
    let first = app
        .get("/al", &[("accept-language", "en-US, fr;q=0.5")])
        .await;
    for spelling in [
        "en-US, fr;q=0.5",
        "fr;q=0.50, EN-us",
        "en-us,fr; q=0.5",
        " fr ; q=0.500 ,en-US ",
    ] {
        let reply = app.get("/al", &[("accept-language", spelling)]).await;
        assert_eq!(reply.cache_status(), Some("HIT"), "{spelling}");
        assert_eq!(reply.text(), first.text());
    }
    assert_eq!(app.origin.calls("/al"), 1);
    let other = app
        .get("/al", &[("accept-language", "fr, en-US;q=0.5")])
        .await;
    assert_eq!(other.cache_status(), Some("MISS"));
}

#[tokio::test]
async fn whitespace_in_any_varied_field_does_not_split_variants() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.always(
        "/ws",
        answer(
            200,
            &[("cache-control", "max-age=60"), ("vary", "x-features")],
            "x",
        ),
    );
    app.get("/ws", &[("x-features", "a, b;v=1")]).await;
    for spelling in ["a,b;v=1", "a ,  b ; v=1", " a,b;v=1 "] {
        let reply = app.get("/ws", &[("x-features", spelling)]).await;
        assert_eq!(reply.cache_status(), Some("HIT"), "{spelling:?}");
    }
    assert_eq!(app.origin.calls("/ws"), 1);
}

// ---------------------------------------------------------------------------
// 8. Authorization (§3.5)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_response_to_an_authorized_request_is_shared_only_as_section_3_5_allows() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let auth = [("authorization", "Bearer alice")];
    for (path, cc, shared) in [
        ("/auth/max-age", "max-age=60", false),
        ("/auth/public", "public, max-age=60", true),
        ("/auth/s-maxage", "s-maxage=60", true),
        ("/auth/must-revalidate", "max-age=60, must-revalidate", true),
    ] {
        app.origin
            .always(path, answer(200, &[("cache-control", cc)], "for alice"));
        app.get(path, &auth).await;
        let again = app.get(path, &auth).await;
        assert_eq!(again.cache_status() == Some("HIT"), shared, "{path}");
        // Shared means shared: a request without credentials gets it too.
        let anonymous = app.get(path, &[]).await;
        assert_eq!(anonymous.cache_status() == Some("HIT"), shared, "{path}");
        assert_eq!(app.origin.calls(path), if shared { 1 } else { 3 }, "{path}");
    }
}

// ---------------------------------------------------------------------------
// 9. If-Modified-Since from clients
// ---------------------------------------------------------------------------

#[tokio::test]
async fn if_modified_since_is_answered_by_the_date_of_a_response_without_last_modified() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    // No Last-Modified, and no Date either (the cache adds the time it got it).
    app.origin.always(
        "/nolm",
        answer(200, &[("cache-control", "max-age=60")], "x"),
    );
    app.get("/nolm", &[]).await;
    let later = app.get("/nolm", &[("if-modified-since", &date(5))]).await;
    assert_eq!(later.status, StatusCode::NOT_MODIFIED, "{later:?}");
    let earlier = app
        .get("/nolm", &[("if-modified-since", &date(-3600))])
        .await;
    assert_eq!(earlier.status, StatusCode::OK);
    assert_eq!(app.origin.calls("/nolm"), 1);
}

#[tokio::test]
async fn if_modified_since_on_a_stale_entry_is_answered_after_revalidation() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.origin.on("/ims", validating("max-age=1"));
    app.get("/ims", &[]).await;
    let_expire(1.3).await;
    let reply = app
        .get("/ims", &[("if-modified-since", LAST_MODIFIED)])
        .await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{reply:?}");
    // The fields of the freshened response (the 304's Cache-Control).
    assert_eq!(reply.header("cache-control"), Some("max-age=60"));
    assert_eq!(reply.header("etag"), Some(ETAG));
    // The origin was asked with the cache's own validators, not the client's.
    let asked = app.origin.requests("/ims");
    assert_eq!(
        asked[1].get("if-none-match").map(|v| v.as_bytes()),
        Some(ETAG.as_bytes())
    );
    assert_eq!(app.handle.stats().revalidated, 1);
}

// ---------------------------------------------------------------------------
// The reverse proxy's defaults (examples/reverse_proxy.rs over sockets)
// ---------------------------------------------------------------------------

/// The reverse proxy example as a child process, killed on drop.
struct ReverseProxy {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ReverseProxy {
    fn start(origin: SocketAddr, redis: &RedisServer) -> Self {
        use std::io::BufRead;
        // Built by the test so that it runs against this checkout.
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", "reverse_proxy"])
            .status()
            .expect("cargo build --example reverse_proxy");
        assert!(status.success(), "building the example failed");
        let exe = std::env::current_exe().expect("test exe");
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

/// An origin served on its own socket, the proxy in front of it.
async fn proxied(redis: &RedisServer) -> (Origin, ReverseProxy, Http) {
    let origin = Origin::default();
    let addr = serve(origin.routes()).await;
    (origin, ReverseProxy::start(addr, redis), Http::new())
}

fn proxy_hit(reply: &Reply) -> bool {
    reply
        .header("cache-status")
        .is_some_and(|s| s.starts_with("cachefence; hit"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reverse_proxy_revalidates_stale_entries_with_their_validators() {
    let redis = RedisServer::new();
    let (origin, proxy, http) = proxied(&redis).await;
    origin.on("/pv", validating("max-age=1, must-revalidate"));
    let get = async |h: &[(&str, &str)]| get_from(&http, proxy.addr, "/pv", h).await;
    assert_revalidated_after_expiry(get, &origin, "/pv").await;
    assert!(proxy_hit(&get_from(&http, proxy.addr, "/pv", &[]).await));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reverse_proxy_caches_heuristically_by_default() {
    let redis = RedisServer::new();
    let (origin, proxy, http) = proxied(&redis).await;
    origin.always(
        "/ph",
        answer(200, &[("last-modified", &date(-100_000))], "x"),
    );
    get_from(&http, proxy.addr, "/ph", &[]).await;
    assert!(proxy_hit(&get_from(&http, proxy.addr, "/ph", &[]).await));
    assert_eq!(origin.calls("/ph"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reverse_proxy_keeps_upstream_age_and_reads_cdn_cache_control() {
    let redis = RedisServer::new();
    let (origin, proxy, http) = proxied(&redis).await;
    origin.always(
        "/pa",
        answer(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=600"),
                ("age", "1.5"),
            ],
            "x",
        ),
    );
    origin.always(
        "/pb",
        answer(200, &[("cache-control", "max-age=600"), ("age", "40")], "x"),
    );
    let first = get_from(&http, proxy.addr, "/pb", &[]).await;
    assert!((40..70).contains(&age_of(&first)), "{first:?}");
    get_from(&http, proxy.addr, "/pa", &[]).await;
    assert!(proxy_hit(&get_from(&http, proxy.addr, "/pa", &[]).await));
    assert_eq!(origin.calls("/pa"), 1);
}
