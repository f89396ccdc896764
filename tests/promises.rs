//! The promises of the README's guarantees table and of the guide, each with the default settings a user gets (a setting is
//! changed only where the promise is about that setting), against a real
//! `redis-server`. Every test here was checked to fail when the behaviour it
//! names is removed (see the comment above each test).
//!
//! The origin is held by a [`Gate`]: it reports each call and answers only
//! when the test releases it, so nothing here waits on a sleep for "the fill
//! reached the origin".

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use cachefence::{CacheTags, Fence, FenceHandle, FenceLayer};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use redis::aio::ConnectionManager;
use support::RedisServer;
use support::gate::{Gate, until};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

type Origin = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;
type Svc = Fence<Origin, ConnectionManager>;
type Answer = Arc<dyn Fn(&http::request::Parts, usize) -> Response<Body> + Send + Sync>;

/// An origin that passes every call through `gate`, then answers with
/// `answer(request, call number)`.
fn origin(
    gate: &Gate,
    answer: impl Fn(&http::request::Parts, usize) -> Response<Body> + Send + Sync + 'static,
) -> Origin {
    let answer: Answer = Arc::new(answer);
    let gate = gate.clone();
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let (gate, answer) = (gate.clone(), answer.clone());
        async move {
            let (parts, _) = req.into_parts();
            let n = gate.enter().await;
            Ok::<_, Infallible>(answer(&parts, n))
        }
    }))
}

/// `<path> #<call>` with the given status and headers.
fn plain(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
) -> impl Fn(&http::request::Parts, usize) -> Response<Body> + Send + Sync + 'static {
    move |parts, n| {
        let mut res = Response::new(Body::from(format!("{} #{n}", parts.uri.path())));
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            res.headers_mut().append(*k, v.parse().unwrap());
        }
        res
    }
}

/// A default layer (namespace aside) on a connection manager of `redis`.
async fn layer(redis: &RedisServer, ns: &str) -> FenceLayer<ConnectionManager> {
    FenceLayer::new(redis.connection_manager().await).namespace(ns)
}

struct Got {
    status: StatusCode,
    cache: String,
    headers: HeaderMap,
    body: Result<Bytes, String>,
}

impl Got {
    fn text(&self) -> String {
        String::from_utf8_lossy(self.body.as_ref().expect("a complete body")).into_owned()
    }
}

async fn get(svc: &Svc, path: &str) -> Got {
    get_with(svc, path, &[]).await
}

async fn get_with(svc: &Svc, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = svc
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Got {
        status: parts.status,
        cache: parts
            .headers
            .get("x-cache")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    }
}

/// Keys of the stored responses of a namespace (hashes with a body; a pass
/// marker has none).
fn entries(redis: &RedisServer, ns: &str) -> Vec<String> {
    let keys = redis.cli(&["KEYS", &format!("{ns}*")]);
    keys.lines()
        .filter(|k| redis.cli(&["HEXISTS", k, "body"]) == "1")
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// The circuit breaker (defaults: 5 failures, 1 s cool-down, 250 ms timeout)
// ---------------------------------------------------------------------------

/// Stops Redis, sends requests until the default breaker (5 transport
/// failures in a row) opens, and returns when the 5th failing request was
/// sent: the cool-down ends no earlier than a second after that.
async fn trip_the_breaker(
    redis: &mut RedisServer,
    svc: &Svc,
    handle: &FenceHandle<ConnectionManager>,
) -> Instant {
    redis.stop();
    let errors = handle.stats().redis_errors;
    let mut last = Instant::now();
    let mut i = 0;
    while handle.stats().redis_errors < errors + 5 {
        i += 1;
        assert!(
            i <= 5,
            "more than 5 requests to open the breaker: {:?}",
            handle.stats()
        );
        last = Instant::now();
        let r = get(svc, &format!("/trip/{i}")).await;
        assert_eq!((r.status, r.cache.as_str()), (StatusCode::OK, "BYPASS"));
    }
    last
}

// Breaks when `Breaker::allow` always returns true (Redis is called during
// the cool-down) or lets every caller through when it ends (no single probe).
#[tokio::test(flavor = "multi_thread")]
async fn the_open_breaker_sends_nothing_to_redis_then_probes_with_exactly_one_call() {
    const COOLDOWN: Duration = Duration::from_secs(1);
    let mut redis = RedisServer::new();
    let gate = Gate::open();
    let layer = layer(&redis, "breaker:").await;
    let handle = layer.handle();
    let svc = layer.layer(origin(&gate, plain(200, &[])));
    assert_eq!(get(&svc, "/a").await.cache, "MISS");

    // The cool-down is checked against a fresh server on the same port (its
    // command counts start at zero); a restart that took most of the
    // cool-down leaves no time to check, so the trip is tried again.
    let mut checked = 0;
    for _ in 0..5 {
        let tripped = trip_the_breaker(&mut redis, &svc, &handle).await;
        redis.start();
        redis.reset_stats(); // start() itself PINGs
        let calls = handle.stats().redis_calls;
        while tripped.elapsed() < COOLDOWN * 8 / 10 {
            let r = get(&svc, "/a").await;
            assert_eq!((r.status, r.cache.as_str()), (StatusCode::OK, "BYPASS"));
            checked += 1;
        }
        assert_eq!(
            handle.stats().redis_calls,
            calls,
            "Redis called during the cool-down"
        );
        assert_eq!(redis.total_commands(), 0, "{:?}", redis.commandstats());
        if checked > 0 {
            break;
        }
        // Let the breaker close again before the next trip.
        until_cached(&svc, "/a").await;
    }
    assert!(checked > 0, "never a request inside the cool-down");

    // When the cool-down ends, one call probes; with Redis paused the probe
    // times out, and the 20 requests sent beside it call nothing.
    let tripped_by = Instant::now();
    redis.pause();
    tokio::time::sleep(COOLDOWN.saturating_sub(tripped_by.elapsed()) + COOLDOWN / 2).await;
    let calls = handle.stats().redis_calls;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let svc = svc.clone();
        set.spawn(async move { get(&svc, &format!("/probe/{i}")).await });
    }
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        assert_eq!((r.status, r.cache.as_str()), (StatusCode::OK, "BYPASS"));
    }
    assert_eq!(
        handle.stats().redis_calls - calls,
        1,
        "one probe: {:?}",
        handle.stats()
    );
    redis.resume();

    // After the next cool-down the cache is used again by itself.
    until_cached(&svc, "/a").await;
    assert_eq!(get(&svc, "/a").await.cache, "HIT");
}

// Breaks when a request that came while Redis was out of reach takes the
// answer of an origin call made before it came: an invalidation made
// through another process in between (which this one can't hear) would be
// undone for it (tests/checker.rs found it: seed 1, a soft tag invalidation
// then two BYPASS reads of the version before it). The requests that came
// during the call still share one origin call: the next one.
#[tokio::test(flavor = "multi_thread")]
async fn offline_no_request_takes_an_answer_asked_before_it_came_and_late_ones_share_the_next() {
    let mut redis = RedisServer::new();
    // Every call waits at `gate`; those after the first then at `next`.
    let (gate, next) = (Gate::new(), Gate::new());
    let layer = layer(&redis, "offline-join:").await;
    let handle = layer.handle();
    let svc = layer.layer(BoxCloneSyncService::new(tower::service_fn({
        let (gate, next) = (gate.clone(), next.clone());
        move |req: Request<Body>| {
            let (gate, next) = (gate.clone(), next.clone());
            async move {
                let n = gate.enter().await;
                if n > 1 {
                    next.enter().await;
                }
                let body = format!("{} #{n}", req.uri().path());
                Ok::<_, Infallible>(Response::new(Body::from(body)))
            }
        }
    })));
    redis.stop();
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { get(&svc, "/a").await }
    });
    gate.called(1).await;
    // Five requests come while the first one's origin call runs, and join it.
    let late: Vec<_> = (0..5)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { get(&svc, "/a").await })
        })
        .collect();
    until("the late requests joined the call", || {
        handle.stats().coalesced >= 5
    })
    .await;
    gate.release();
    let first = first.await.unwrap();
    assert_eq!(
        (first.status, first.cache.as_str()),
        (StatusCode::OK, "BYPASS")
    );
    assert_eq!(first.text(), "/a #1");
    // One of them calls the origin again; the other four join that call.
    next.called(1).await;
    until("the other late requests joined the next call", || {
        handle.stats().coalesced >= 9
    })
    .await;
    next.release();
    for r in late {
        let r = r.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.text(),
            "/a #2",
            "a late request took the first call's answer"
        );
    }
    assert_eq!(gate.calls(), 2, "the late requests share one origin call");
}

// Breaks when a request whose lookup found nothing joins a background
// refresh and takes the stale copy that refresh falls back on: the entry was
// invalidated (through another process) after the refresh read it and
// before the request looked, so that copy is exactly what was invalidated.
// The request looks again and gets an answer asked for after it came.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_after_an_invalidation_never_takes_the_stale_copy_a_failing_refresh_falls_back_on()
 {
    let redis = RedisServer::new();
    let gate = Gate::open();
    // Call 2 (the background refresh) fails; the others answer 200.
    let a_layer = layer(&redis, "refresh-race:").await;
    let a_handle = a_layer.handle();
    let a = a_layer.layer(origin(&gate, |parts, n| {
        let status = if n == 2 { 500 } else { 200 };
        plain(status, &[])(parts, n)
    }));
    // Another process, which invalidates.
    let b = layer(&redis, "refresh-race:").await.handle();
    assert_eq!(get(&a, "/k").await.cache, "MISS");
    until("the fill to end", || a_handle.stats().in_flight == 0).await;
    b.soft_invalidate_path("/k").await.unwrap();
    gate.hold();
    // Served stale; its background refresh holds the stale copy and waits
    // at the origin.
    let stale = get(&a, "/k").await;
    assert_eq!(
        (stale.cache.as_str(), stale.text()),
        ("STALE", "/k #1".into())
    );
    gate.called(2).await;
    b.invalidate_path("/k").await.unwrap();
    let before = a_handle.stats();
    // This request came after the invalidation returned: its lookup finds
    // nothing, and it joins the refresh.
    let late = tokio::spawn({
        let a = a.clone();
        async move { get(&a, "/k").await }
    });
    until("the request to join the refresh", || {
        a_handle.stats().coalesced - before.coalesced == 1
    })
    .await;
    gate.release();
    let late = late.await.unwrap();
    assert_eq!(late.status, StatusCode::OK);
    assert_eq!(
        late.text(),
        "/k #3",
        "a request after the invalidation took the invalidated copy ({})",
        late.cache
    );
    assert_eq!(gate.calls(), 3);
}

// Breaks when a late request of a `Vary` URL (offline, so no fenced STORE
// vouches for anything) takes an answer asked for before it came, or one
// made for another language, or when the requests that look again don't
// share the next call of their language: three origin calls in all, each
// answer asked for after every request it is given to came and made for
// its language.
#[tokio::test(flavor = "multi_thread")]
async fn offline_late_requests_of_a_vary_url_take_only_a_later_answer_of_their_language() {
    let mut redis = RedisServer::new();
    // Call 1 waits at `gates[0]`, call 2 at `gates[1]`, the later ones at
    // `gates[2]`.
    let gates = [Gate::new(), Gate::new(), Gate::new()];
    let layer = layer(&redis, "offline-vary:").await;
    let handle = layer.handle();
    let svc = layer.layer(vary_origin(&gates));
    redis.stop();
    let spawn = |lang: &'static str| {
        let svc = svc.clone();
        tokio::spawn(async move { get_with(&svc, "/v", &[("accept-language", lang)]).await })
    };
    let first = spawn("en");
    gates[0].called(1).await;
    // Two of each language come while the first call runs, and join it.
    let late = [spawn("en"), spawn("en"), spawn("fr"), spawn("fr")];
    until("the late requests joined the first call", || {
        handle.stats().coalesced >= 4
    })
    .await;
    gates[0].release();
    assert_eq!(first.await.unwrap().text(), "en #1");
    // They look again: one leads the second call, the three others join it.
    gates[1].called(1).await;
    until("the late requests joined the second call", || {
        handle.stats().coalesced >= 7
    })
    .await;
    gates[1].release();
    // The two of the other language look again once more: one call.
    gates[2].called(1).await;
    until("the other language joined the third call", || {
        handle.stats().coalesced >= 8
    })
    .await;
    gates[2].release();
    let mut bodies: Vec<String> = Vec::new();
    for (r, lang) in late.into_iter().zip(["en", "en", "fr", "fr"]) {
        let r = r.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let text = r.text();
        assert!(
            text.starts_with(&format!("{lang} #")) && !text.ends_with("#1"),
            "a late {lang} request got {text}"
        );
        bodies.push(text);
    }
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 2, "one answer per language: {bodies:?}");
    assert_eq!(
        gates[0].calls(),
        3,
        "the late requests share one call per language"
    );
}

// Breaks when a request that ran out of attempts (answers refused as
// asked for before it came, or made for another language: three rounds)
// calls the origin with no deadline: it waits past `fill_timeout +
// lock_timeout` (tests/checker.rs found one on its `/d/` route: 3.3 s on a
// 1.5 s cap). It gets its 504 at the cap instead (no stale copy here).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_out_of_attempts_still_ends_at_its_cap() {
    let mut redis = RedisServer::new();
    // Call n waits at `gates[min(n - 1, 3)]` (after `gates[0]`, which
    // counts them all).
    let gates = [Gate::new(), Gate::new(), Gate::new(), Gate::new()];
    let layer = layer(&redis, "attempts:")
        .await
        .fill_timeout(Duration::from_secs(3))
        .lock_timeout(Duration::from_secs(1));
    let handle = layer.handle();
    let svc = layer.layer(vary_origin(&gates));
    redis.stop();
    let spawn = |lang: &'static str| {
        let svc = svc.clone();
        tokio::spawn(async move { get_with(&svc, "/v", &[("accept-language", lang)]).await })
    };
    let first = spawn("en");
    gates[0].called(1).await;
    let late = [spawn("de"), spawn("fr"), spawn("it")];
    until("the late requests joined the first call", || {
        handle.stats().coalesced >= 3
    })
    .await;
    gates[0].release();
    assert_eq!(first.await.unwrap().text(), "en #1");
    // They refuse it (asked for before they came): one leads the second
    // call, two join it; one of those takes it, the other leads the third
    // call and the last joins it; the last one, handed an answer for
    // another language once more, is out of attempts.
    gates[1].called(1).await;
    until("two joined the second call", || {
        handle.stats().coalesced >= 5
    })
    .await;
    gates[1].release();
    gates[2].called(1).await;
    until("one joined the third call", || {
        handle.stats().coalesced >= 6
    })
    .await;
    gates[2].release();
    // It calls the origin alone, which never answers in time.
    gates[3].called(1).await;
    let mut statuses = Vec::new();
    for (r, lang) in late.into_iter().zip(["de", "fr", "it"]) {
        let r = tokio::time::timeout(support::gate::HANG_GUARD, r)
            .await
            .expect("every request answered by its cap")
            .unwrap();
        if r.status == StatusCode::OK {
            assert!(r.text().starts_with(lang), "{lang} got {}", r.text());
        }
        statuses.push(r.status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 504]);
    assert_eq!(gates[0].calls(), 4);
    gates[3].release();
}

/// An origin answering `<accept-language> #<call>` with `Vary:
/// Accept-Language`; call `n` waits at `gates[0]` (which counts every call),
/// then, after the first, at `gates[min(n - 1, last)]`.
fn vary_origin<const N: usize>(gates: &[Gate; N]) -> Origin {
    let gates = gates.clone();
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let gates = gates.clone();
        async move {
            let lang = req
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let n = gates[0].enter().await;
            if n > 1 {
                gates[(n - 1).min(N - 1)].enter().await;
            }
            let mut res = Response::new(Body::from(format!("{lang} #{n}")));
            res.headers_mut()
                .insert("vary", "accept-language".parse().unwrap());
            Ok::<_, Infallible>(res)
        }
    }))
}

/// Requests `path` until it is answered through the cache (not `BYPASS`).
async fn until_cached(svc: &Svc, path: &str) {
    let deadline = Instant::now() + support::gate::HANG_GUARD;
    while get(svc, path).await.cache == "BYPASS" {
        assert!(Instant::now() < deadline, "the cache was never used again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// stale_if_error (default on)
// ---------------------------------------------------------------------------

// Breaks when fill.rs ignores `stale_if_error` for a 5xx answer (the 500 is
// passed on instead of the stale entry).
#[tokio::test(flavor = "multi_thread")]
async fn a_refetch_answered_5xx_serves_the_stale_entry_and_keeps_it() {
    for stale_if_error in [true, false] {
        let redis = RedisServer::new();
        let gate = Gate::open();
        // A refetch with the entry still usable is the path where the request
        // itself waits on the refresh: `Cache-Control: no-cache` with
        // `honor_request_no_cache`. The first call answers 200, the rest 503.
        let mut l = layer(&redis, "sie:").await.honor_request_no_cache(true);
        if !stale_if_error {
            l = l.stale_if_error(false);
        }
        let l_handle = l.handle();
        let svc = l.layer(origin(&gate, |parts, n| {
            let mut res = plain(200, &[])(parts, n);
            if n > 1 {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            res
        }));
        let handle = l_handle;
        assert_eq!(get(&svc, "/s").await.cache, "MISS");
        // A request arriving while the fill is still in the table joins it.
        until("the fill to end", || handle.stats().in_flight == 0).await;
        let r = get_with(&svc, "/s", &[("cache-control", "no-cache")]).await;
        assert_eq!(gate.calls(), 2, "{} {:?}", r.cache, r.body);
        if stale_if_error {
            assert_eq!(
                (r.status, r.cache.as_str(), r.text().as_str()),
                (StatusCode::OK, "STALE", "/s #1")
            );
            // The entry is kept, not replaced by the error.
            let again = get(&svc, "/s").await;
            assert_eq!(
                (again.cache.as_str(), again.text().as_str()),
                ("HIT", "/s #1")
            );
        } else {
            assert_eq!(
                r.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "stale_if_error(false) passes the 503 on"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Bodies that fail
// ---------------------------------------------------------------------------

// Breaks when `body::buffer` treats a body error as the end of the body (the
// truncated body would be stored and served as a HIT).
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_fails_reaches_the_client_as_an_error_and_is_never_cached() {
    let redis = RedisServer::new();
    let gate = Gate::open();
    let svc = layer(&redis, "bodyerr:").await.layer(origin(&gate, |_, _| {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"half a bo")),
            Err(std::io::Error::other("the origin's body broke")),
        ];
        Response::new(Body::from_stream(futures_util::stream::iter(chunks)))
    }));
    for call in 1..=3 {
        let r = get(&svc, "/broken").await;
        assert_eq!(r.status, StatusCode::OK);
        let err = r.body.expect_err("the body error reaches the client");
        assert!(err.contains("the origin's body broke"), "{err}");
        // Not cached, and no pass marker either: each request tries again.
        assert_eq!(gate.calls(), call);
        assert_ne!(r.cache, "BYPASS");
    }
    assert_eq!(entries(&redis, "bodyerr:"), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// Tags
// ---------------------------------------------------------------------------

/// The origin of the tag tests: `/h/<header>/<tags>` answers with header
/// `<header>: <tags>`, `/x/<tags>` with the `CacheTags` extension.
fn tagging() -> impl Fn(&http::request::Parts, usize) -> Response<Body> + Send + Sync + 'static {
    |parts, n| {
        let path = parts.uri.path().to_owned();
        let mut res = Response::new(Body::from(format!("{path} #{n}")));
        let segs: Vec<&str> = path.split('/').collect();
        match segs.as_slice() {
            ["", "h", header, tags] => {
                res.headers_mut().insert(
                    http::HeaderName::from_bytes(header.as_bytes()).unwrap(),
                    tags.replace(',', " ").parse().unwrap(),
                );
            }
            ["", "x", tags] => {
                res.extensions_mut()
                    .insert(CacheTags(tags.split(',').map(str::to_owned).collect()));
            }
            _ => {}
        }
        res
    }
}

// Breaks when `response_tags` skips a header or the extension, or when the
// stored headers keep the tag headers (`expose_tags` off by default).
#[tokio::test(flavor = "multi_thread")]
async fn tags_come_from_surrogate_key_cache_tag_and_cache_tags_and_are_stripped() {
    let redis = RedisServer::new();
    let gate = Gate::open();
    let l = layer(&redis, "tags:").await;
    let handle = l.handle();
    let svc = l.layer(origin(&gate, tagging()));
    let paths = ["/h/surrogate-key/a,b", "/h/cache-tag/a,c", "/x/a,d"];
    for path in paths {
        for want in ["MISS", "HIT"] {
            let r = get(&svc, path).await;
            assert_eq!(r.cache, want, "{path}");
            assert!(
                r.headers.get("surrogate-key").is_none() && r.headers.get("cache-tag").is_none(),
                "{path}: tag headers are not exposed by default: {:?}",
                r.headers
            );
        }
    }
    assert_eq!(handle.invalidate_tag("b").await.unwrap(), 1);
    assert_eq!(handle.invalidate_tag("c").await.unwrap(), 1);
    assert_eq!(handle.invalidate_tag("d").await.unwrap(), 1);
    for path in paths {
        assert_eq!(
            get(&svc, path).await.cache,
            "MISS",
            "{path} was invalidated"
        );
    }
    assert_eq!(handle.invalidate_tag("a").await.unwrap(), 3);
}

// Breaks when `tag_headers` is ignored (the default names still used) or
// `expose_tags(true)` still strips them.
#[tokio::test(flavor = "multi_thread")]
async fn tag_headers_choose_where_tags_come_from_and_expose_tags_keeps_them() {
    let redis = RedisServer::new();
    let gate = Gate::open();
    let l = layer(&redis, "taghdr:")
        .await
        .tag_headers([http::HeaderName::from_static("x-keys")])
        .expose_tags(true);
    let handle = l.handle();
    let svc = l.layer(origin(&gate, tagging()));
    for want in ["MISS", "HIT"] {
        let r = get(&svc, "/h/x-keys/k1,k2").await;
        assert_eq!(r.cache, want);
        assert_eq!(
            r.headers.get("x-keys").map(|v| v.to_str().unwrap()),
            Some("k1 k2"),
            "exposed on a {want}"
        );
        let r = get(&svc, "/h/cache-tag/k3").await;
        assert_eq!(r.cache, want);
        assert_eq!(
            r.headers.get("cache-tag").map(|v| v.to_str().unwrap()),
            Some("k3")
        );
    }
    // Cache-Tag is no tag header any more: k3 tags nothing.
    assert_eq!(handle.invalidate_tag("k3").await.unwrap(), 0);
    assert_eq!(handle.invalidate_tag("k2").await.unwrap(), 1);
    assert_eq!(get(&svc, "/h/x-keys/k1,k2").await.cache, "MISS");
}

// Breaks when `MAX_TAGS` is raised or the cap removed (t69 would tag the
// entry).
#[tokio::test(flavor = "multi_thread")]
async fn a_response_keeps_at_most_64_tags() {
    let redis = RedisServer::new();
    let gate = Gate::open();
    let l = layer(&redis, "tagcap:").await;
    let handle = l.handle();
    let svc = l.layer(origin(&gate, tagging()));
    let tags: Vec<String> = (0..70).map(|i| format!("t{i:02}")).collect();
    let path = format!("/x/{}", tags.join(","));
    assert_eq!(get(&svc, &path).await.cache, "MISS");
    assert_eq!(get(&svc, &path).await.cache, "HIT");
    // Sorted, the first 64 are kept: t00..t63; t64..t69 are ignored.
    for ignored in &tags[64..] {
        assert_eq!(
            handle.invalidate_tag(ignored).await.unwrap(),
            0,
            "{ignored}"
        );
    }
    assert_eq!(get(&svc, &path).await.cache, "HIT");
    assert_eq!(handle.invalidate_tag("t63").await.unwrap(), 1);
    assert_eq!(get(&svc, &path).await.cache, "MISS");
}

// ---------------------------------------------------------------------------
// HTTP rules
// ---------------------------------------------------------------------------

// Breaks when `Policy::response` stops refusing `Cache-Control: no-cache`.
#[tokio::test(flavor = "multi_thread")]
async fn a_no_cache_response_is_not_stored() {
    let redis = RedisServer::new();
    let gate = Gate::open();
    let svc = layer(&redis, "nocache:")
        .await
        .layer(origin(&gate, plain(200, &[("cache-control", "no-cache")])));
    for call in 1..=3 {
        let r = get(&svc, "/nc").await;
        assert_eq!(r.text(), format!("/nc #{call}"));
        assert_ne!(r.cache, "HIT");
    }
    assert_eq!(entries(&redis, "nocache:"), Vec::<String>::new());
}

// Breaks when `UPGRADE` is taken out of the hop-by-hop list in
// `storable_headers`.
#[tokio::test(flavor = "multi_thread")]
async fn upgrade_is_never_stored_or_served_from_the_cache() {
    let redis = RedisServer::new();
    let gate = Gate::open();
    let svc = layer(&redis, "upgrade:").await.layer(origin(
        &gate,
        plain(200, &[("upgrade", "websocket"), ("x-kept", "yes")]),
    ));
    assert_eq!(get(&svc, "/u").await.cache, "MISS");
    let hit = get(&svc, "/u").await;
    assert_eq!(hit.cache, "HIT");
    assert_eq!(
        hit.headers.get("x-kept").map(|v| v.to_str().unwrap()),
        Some("yes")
    );
    assert!(hit.headers.get("upgrade").is_none(), "{:?}", hit.headers);
    let stored = entries(&redis, "upgrade:");
    assert_eq!(stored.len(), 1);
    let hdrs = redis
        .cli(&["HGET", &stored[0], "head"])
        .to_ascii_lowercase();
    assert!(
        hdrs.contains("x-kept") && !hdrs.contains("upgrade") && !hdrs.contains("websocket"),
        "{hdrs}"
    );
}

// Breaks when `cache_requests_with_cookies(true)` is ignored (requests with
// a Cookie keep bypassing) or when the default lets them in.
#[tokio::test(flavor = "multi_thread")]
async fn requests_with_cookies_are_cached_only_when_opted_in() {
    let redis = RedisServer::new();
    let gate = Gate::open();
    let default = layer(&redis, "cookie-off:")
        .await
        .layer(origin(&gate, plain(200, &[])));
    for _ in 0..2 {
        assert_eq!(
            get_with(&default, "/c", &[("cookie", "s=1")]).await.cache,
            "BYPASS"
        );
    }
    assert_eq!(gate.calls(), 2);
    let opted = layer(&redis, "cookie-on:")
        .await
        .cache_requests_with_cookies(true)
        .layer(origin(&gate, plain(200, &[])));
    assert_eq!(
        get_with(&opted, "/c", &[("cookie", "s=1")]).await.cache,
        "MISS"
    );
    let hit = get_with(&opted, "/c", &[("cookie", "s=2")]).await;
    assert_eq!((hit.cache.as_str(), hit.text().as_str()), ("HIT", "/c #3"));
    // Authorization is a separate opt-in.
    assert_eq!(
        get_with(&opted, "/c", &[("authorization", "Bearer x")])
            .await
            .cache,
        "BYPASS"
    );
}

// Breaks when the default status list changes (one of the 11 not stored, or
// another one stored) or `statuses(..)` is ignored.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_the_configured_statuses_are_stored() {
    let redis = RedisServer::new();
    let gate = Gate::open();
    let status_of = |parts: &http::request::Parts, n: usize| {
        let code: u16 = parts.uri.path().trim_start_matches('/').parse().unwrap();
        let mut res = plain(200, &[])(parts, n);
        *res.status_mut() = StatusCode::from_u16(code).unwrap();
        res
    };
    let svc = layer(&redis, "statuses:")
        .await
        .layer(origin(&gate, status_of));
    let cached = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];
    let not_cached = [201, 202, 206, 302, 303, 307, 400, 403, 429, 500, 502, 503];
    for code in cached.iter().chain(&not_cached) {
        let path = format!("/{code}");
        let first = get(&svc, &path).await;
        assert_eq!(first.status.as_u16(), *code);
        let second = get(&svc, &path).await;
        assert_eq!(second.status.as_u16(), *code);
        // Not stored: a pass marker sends the next request straight to the
        // origin, except after a transient failure (429, 5xx), which leaves
        // none, so the next request is coalesced (and filled) again.
        let want = if cached.contains(code) {
            "HIT"
        } else if *code == 429 || *code >= 500 {
            "MISS"
        } else {
            "BYPASS"
        };
        assert_eq!(second.cache, want, "status {code}");
    }
    let custom = layer(&redis, "statuses-custom:")
        .await
        .statuses([StatusCode::CREATED])
        .layer(origin(&gate, status_of));
    for (code, want) in [(201, "HIT"), (200, "BYPASS"), (404, "BYPASS")] {
        let path = format!("/{code}");
        get(&custom, &path).await;
        assert_eq!(
            get(&custom, &path).await.cache,
            want,
            "custom statuses, {code}"
        );
    }
}

// ---------------------------------------------------------------------------
// A hit spawns nothing
// ---------------------------------------------------------------------------

// Breaks when anything is spawned on the hit path (checked by adding a
// `tokio::spawn` before `return Ok(res)` in service.rs's fresh-hit branch).
#[test]
fn a_hit_spawns_no_task() {
    // One thread: a task spawned by the hit can't run (and end) before the
    // hit returns control, so the live-task count shows it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let redis = RedisServer::new();
        let gate = Gate::open();
        let l = layer(&redis, "nospawn:").await;
        let handle = l.handle();
        let svc = l.layer(origin(&gate, plain(200, &[])));
        assert_eq!(get(&svc, "/h").await.cache, "MISS");
        until("the fill to end", || handle.stats().in_flight == 0).await;
        let metrics = tokio::runtime::Handle::current().metrics();
        for _ in 0..100 {
            let before = metrics.num_alive_tasks();
            let res = svc
                .clone()
                .oneshot(Request::get("/h").body(Body::empty()).unwrap())
                .await
                .unwrap();
            let after = metrics.num_alive_tasks();
            assert_eq!(res.headers()["x-cache"], "HIT");
            assert_eq!(after, before, "a hit spawned a task");
        }
        let stats = handle.stats();
        assert_eq!((stats.hits, stats.fills, stats.in_flight), (100, 1, 0));
    });
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

// Breaks when `shutdown` releases leases without waiting for the grace (the
// fill would lose its lease and store nothing).
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_a_fill_finish_within_the_grace_and_store_it() {
    let redis = RedisServer::new();
    let gate = Gate::new();
    let l = layer(&redis, "drain:").await;
    let handle = l.handle();
    let svc = l.layer(origin(&gate, plain(200, &[])));
    let request = tokio::spawn({
        let svc = svc.clone();
        async move { get(&svc, "/f").await }
    });
    gate.called(1).await;
    let shutdown = tokio::spawn({
        let handle = handle.clone();
        async move { handle.shutdown(Duration::from_secs(60)).await }
    });
    // Shutdown has begun once new requests bypass the cache (asked through
    // the same layer in front of an origin that is not held)...
    let open = Gate::open();
    let probe = l.layer(origin(&open, plain(200, &[])));
    let deadline = Instant::now() + support::gate::HANG_GUARD;
    while get(&probe, "/other").await.cache != "BYPASS" {
        assert!(Instant::now() < deadline, "shutdown never began");
        tokio::task::yield_now().await;
    }
    // ...and it waits for the held fill.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown returned while a fill runs"
    );
    gate.release();
    assert_eq!(shutdown.await.unwrap(), 0, "no lease left to release");
    let r = request.await.unwrap();
    assert_eq!((r.cache.as_str(), r.text().as_str()), ("MISS", "/f #1"));
    // Stored: another process is served it.
    let other = layer(&redis, "drain:")
        .await
        .layer(origin(&gate, plain(200, &[])));
    let hit = get(&other, "/f").await;
    assert_eq!((hit.cache.as_str(), hit.text().as_str()), ("HIT", "/f #1"));
}

// Breaks when `shutdown` leaves the leases of unfinished fills in Redis (the
// other process would wait its whole wait_timeout and count a timeout).
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_hands_an_unfinished_fill_to_a_process_waiting_on_it() {
    let redis = RedisServer::new();
    let (gate_a, gate_b) = (Gate::new(), Gate::open());
    let a = layer(&redis, "handover:").await;
    let b = layer(&redis, "handover:").await;
    let (handle_a, handle_b) = (a.handle(), b.handle());
    let svc_a = a.layer(origin(&gate_a, |p, n| {
        plain(200, &[])(p, n).map(|_| Body::from("from A"))
    }));
    let svc_b = b.layer(origin(&gate_b, |p, n| {
        plain(200, &[])(p, n).map(|_| Body::from("from B"))
    }));
    let in_a = tokio::spawn({
        let svc = svc_a.clone();
        async move { get(&svc, "/k").await }
    });
    gate_a.called(1).await;
    // B's request waits on A's lease (default lock and wait timeouts: 5 s).
    let in_b = tokio::spawn({
        let svc = svc_b.clone();
        async move { get(&svc, "/k").await }
    });
    until("B to wait on A's lease", || {
        handle_b.stats().remote_waits == 1
    })
    .await;
    assert_eq!(handle_a.shutdown(Duration::from_millis(50)).await, 1);
    let r = in_b.await.unwrap();
    assert_eq!((r.cache.as_str(), r.text().as_str()), ("MISS", "from B"));
    let stats = handle_b.stats();
    assert_eq!((stats.wait_timeouts, stats.stores), (0, 1), "{stats:?}");
    assert_eq!(gate_b.calls(), 1);
    // A's request is still answered by its own origin call.
    gate_a.release();
    let r = in_a.await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "from A"));
    assert_eq!(
        get(&svc_b, "/k").await.text(),
        "from B",
        "A's late answer stored nothing"
    );
}
