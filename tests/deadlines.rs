//! Deadlines are deadlines (issue 21, must-hold 4), and the tests that hold
//! the defaults of the table in the guide's "Waiting and deadlines" chapter:
//!
//! - a request that takes over a lease after a timed-out fill (or restarts
//!   after an invalidation) gets the time left of its own cap, not a fresh
//!   `fill_timeout`: no request waits past `fill_timeout + lock_timeout`;
//! - fences (URL, prefix, tag) live at least as long as the longest fill of
//!   the cache, derived from the settings of every route;
//! - exactly one takeover when two processes wait on a SIGKILLed leader;
//! - `wait_timeout` serves the stale copy when there is one;
//! - a failing refresh backs off fleet-wide, doubling (1 s, 2 s, 4 s);
//! - the crate's own Redis timeout answers a request while Redis stalls,
//!   with a connection whose own timeout is 30 s.
//!
//! The cross-process tests re-execute this test binary as server processes
//! (`deadlines_server`, an ignored test run with `CACHEFENCE_ROLE=server`)
//! whose layer has the default settings but for those the test names.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use cachefence::{FenceCache, FenceLayer};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use redis::aio::ConnectionManager;
use support::gate::Gate;
use support::procs::Procs;
use support::proxy::StallProxy;
use support::{RedisServer, Reply, serve, wake_subscribers};

// ---------------------------------------------------------------------------
// HTTP client that reports errors instead of panicking
// ---------------------------------------------------------------------------

type RawClient = HyperClient<HttpConnector, Full<Bytes>>;

fn raw_client() -> RawClient {
    HyperClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

async fn try_get_with(
    client: &RawClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = http::Request::get(format!("http://{addr}{path}"))
        // One Host for every process, as behind a load balancer.
        .header(http::header::HOST, support::TEST_HOST);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

async fn try_get(client: &RawClient, addr: SocketAddr, path: &str) -> Result<Reply, String> {
    try_get_with(client, addr, path, &[]).await
}

/// A GET in its own task: the reply and how long it took.
fn timed_get(
    client: &RawClient,
    addr: SocketAddr,
    path: &str,
) -> tokio::task::JoinHandle<(Result<Reply, String>, Duration)> {
    let (client, path) = (client.clone(), path.to_owned());
    tokio::spawn(async move {
        let t = Instant::now();
        (try_get(&client, addr, &path).await, t.elapsed())
    })
}

async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct ProcState {
    conn: redis::aio::MultiplexedConnection,
    delay: Duration,
}

/// Counts its calls in Redis (`origin_calls:<path>`), records when each
/// began (`origin_times:<path>`, Unix ms), answers the status stored under
/// `origin_status` (200 when none) after `ORIGIN_DELAY_MS`. The body names
/// the path and the call number.
async fn counted_origin(State(s): State<ProcState>, uri: Uri) -> Response {
    let path = uri.path().to_owned();
    let mut conn = s.conn.clone();
    let (n, _, status): (u64, u64, Option<u16>) = redis::pipe()
        .cmd("INCR")
        .arg(format!("origin_calls:{path}"))
        .cmd("RPUSH")
        .arg(format!("origin_times:{path}"))
        .arg(unix_ms())
        .cmd("GET")
        .arg("origin_status")
        .query_async(&mut conn)
        .await
        .expect("counting the origin call");
    tokio::time::sleep(s.delay).await;
    let status = status
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    (status, format!("origin {path} #{n}")).into_response()
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// A server process. Does nothing unless `CACHEFENCE_ROLE=server`. Env:
/// `REDIS_URL`, `NAMESPACE`, `ORIGIN_DELAY_MS` (default 50), and, only
/// when set, `TTL_MS`, `GRACE_MS`, `FILL_TIMEOUT_MS`, `LOCK_TIMEOUT_MS`,
/// `HONOR_NO_CACHE=1`; every other setting is the default. Cached paths are
/// under `/c/`; `/stats` (not cached) answers counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a server process for the cross-process tests, run by them with CACHEFENCE_ROLE=server"]
async fn deadlines_server() {
    if std::env::var("CACHEFENCE_ROLE").as_deref() != Ok("server") {
        eprintln!("deadlines_server: CACHEFENCE_ROLE is not `server`, nothing to do");
        return;
    }
    let url = std::env::var("REDIS_URL").expect("REDIS_URL");
    let ns = std::env::var("NAMESPACE").expect("NAMESPACE");
    let client = redis::Client::open(url.as_str()).expect("REDIS_URL");
    let mut layer = FenceCache::builder(client.get_connection_manager().await.expect("redis"))
        .wake_ups(client.clone())
        .build()
        .expect("cache")
        .layer()
        .namespace(ns);
    if let Some(v) = env_ms("TTL_MS") {
        layer = layer.ttl(v);
    }
    if let Some(v) = env_ms("GRACE_MS") {
        layer = layer.grace(v);
    }
    if let Some(v) = env_ms("FILL_TIMEOUT_MS") {
        layer = layer.fill_timeout(v);
    }
    if let Some(v) = env_ms("LOCK_TIMEOUT_MS") {
        layer = layer.lock_timeout(v);
    }
    if std::env::var("HONOR_NO_CACHE").as_deref() == Ok("1") {
        layer = layer.honor_request_no_cache(true);
    }
    let handle = layer.handle();
    let state = ProcState {
        conn: client
            .get_multiplexed_async_connection()
            .await
            .expect("redis"),
        delay: env_ms("ORIGIN_DELAY_MS").unwrap_or(Duration::from_millis(50)),
    };
    let app = Router::new()
        .route("/c/{*path}", get(counted_origin))
        .with_state(state)
        .layer(layer)
        .route(
            "/stats",
            get(move || {
                let s = handle.stats();
                async move {
                    format!(
                        "coalesced={} remote_waits={} fills={} wait_timeouts={} fill_timeouts={} stale={}",
                        s.coalesced, s.remote_waits, s.fills, s.wait_timeouts, s.fill_timeouts, s.stale
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("PORT={}", listener.local_addr().expect("addr").port());
    std::io::stdout().flush().expect("flush stdout");
    axum::serve(listener, app).await.expect("serve");
}

fn spawn_procs(redis: &RedisServer, names: &[&str], env: &[(&str, &str)]) -> Procs {
    let url = redis.url();
    let mut procs = Procs::new("deadlines_server");
    for name in names {
        let mut all = vec![("REDIS_URL", url.as_str())];
        all.extend_from_slice(env);
        procs.spawn(name, &all);
    }
    procs
}

fn origin_calls(redis: &RedisServer, path: &str) -> u64 {
    redis
        .cli(&["GET", &format!("origin_calls:{path}")])
        .parse()
        .unwrap_or(0)
}

/// When each origin call of `path` began (Unix ms).
fn origin_times(redis: &RedisServer, path: &str) -> Vec<u64> {
    redis
        .cli(&["LRANGE", &format!("origin_times:{path}"), "0", "-1"])
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits until `n` wake-up listeners are subscribed, so that no wake-up the
/// test relies on is lost.
async fn wait_for_subscribers(redis: &RedisServer, n: u64) {
    eventually("the wake-up subscriptions", Duration::from_secs(20), || {
        wake_subscribers(redis) >= n
    })
    .await;
}

fn stat(text: &str, name: &str) -> u64 {
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn proc_stat(client: &RawClient, addr: SocketAddr, name: &str) -> u64 {
    try_get(client, addr, "/stats")
        .await
        .map(|r| stat(&r.text(), name))
        .unwrap_or(0)
}

/// Waits until the processes at `addrs` count `n` waiting requests in all
/// (remote waits plus requests coalesced onto them).
async fn until_waiting(client: &RawClient, addrs: &[SocketAddr], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut waiting = 0;
        for addr in addrs {
            waiting += proc_stat(client, *addr, "coalesced").await
                + proc_stat(client, *addr, "remote_waits").await;
        }
        if waiting >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {waiting} of {n} waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. A takeover gets the time left, not a fresh fill_timeout
// ---------------------------------------------------------------------------

/// The issue's measurement: `fill_timeout` 2 s, `lock_timeout` 1 s, an
/// origin of 10 s, three processes. p0's fill times out at 2 s; p1 (waiting
/// since ~0 s) takes the lease over, then p2 (arrived after that takeover)
/// takes it over from p1. Each request waits at most its own cap, 3 s
/// (before the fix: p1 and p2 waited 4.0 s: a fresh `fill_timeout` each).
#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_after_a_timed_out_fill_gets_the_time_left_of_its_cap() {
    let redis = RedisServer::new();
    let procs = spawn_procs(
        &redis,
        &["p0", "p1", "p2"],
        &[
            ("NAMESPACE", "left:"),
            ("FILL_TIMEOUT_MS", "2000"),
            ("LOCK_TIMEOUT_MS", "1000"),
            ("ORIGIN_DELAY_MS", "10000"),
        ],
    );
    wait_for_subscribers(&redis, 3).await;
    let client = raw_client();
    let path = "/c/left";
    let cap = Duration::from_secs(3);
    let leader = timed_get(&client, procs.addr("p0"), path);
    eventually(
        "p0's fill to reach the origin",
        Duration::from_secs(10),
        || origin_calls(&redis, path) == 1,
    )
    .await;
    let p1 = timed_get(&client, procs.addr("p1"), path);
    until_waiting(&client, &[procs.addr("p1")], 1).await;
    // p0's fill times out at 2 s; p1 takes the lease over.
    eventually(
        "p1's takeover to reach the origin",
        Duration::from_secs(10),
        || origin_calls(&redis, path) == 2,
    )
    .await;
    let p2 = timed_get(&client, procs.addr("p2"), path);
    let mut took = Vec::new();
    for (name, task) in [("p0", leader), ("p1", p1), ("p2", p2)] {
        let (reply, t) = task.await.expect("request task");
        let reply = reply.expect("request");
        // No stale copy: every fill times out, every request is answered 504.
        assert_eq!(
            reply.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{name}: {}",
            reply.text()
        );
        took.push((name, t));
    }
    let calls = origin_calls(&redis, path);
    eprintln!("takeover after a timed-out fill: {took:?}, {calls} origin calls");
    // p0's own fill, p1's takeover, p2's takeover of p1's (timed out at
    // p1's cap, before p2's).
    assert_eq!(calls, 3);
    for (name, t) in took {
        assert!(
            t < cap + Duration::from_millis(500),
            "{name} waited {t:?}: the documented cap is fill_timeout + lock_timeout = {cap:?}"
        );
    }
}

/// The same with the DEFAULT settings (`fill_timeout` 30 s, `lock_timeout`
/// 3 s) and a 60 s origin: the request that takes over after the first fill
/// timed out is answered by its cap, 33 s (before the fix: 60 s).
#[tokio::test(flavor = "multi_thread")]
async fn at_the_default_settings_no_request_waits_past_33_s() {
    let redis = RedisServer::new();
    let procs = spawn_procs(
        &redis,
        &["p0", "p1"],
        &[("NAMESPACE", "cap:"), ("ORIGIN_DELAY_MS", "60000")],
    );
    wait_for_subscribers(&redis, 2).await;
    let client = raw_client();
    let path = "/c/cap";
    let leader = timed_get(&client, procs.addr("p0"), path);
    eventually(
        "p0's fill to reach the origin",
        Duration::from_secs(10),
        || origin_calls(&redis, path) == 1,
    )
    .await;
    let waiter = timed_get(&client, procs.addr("p1"), path);
    let (reply, leader_took) = leader.await.expect("task");
    assert_eq!(reply.expect("request").status, StatusCode::GATEWAY_TIMEOUT);
    let (reply, took) = waiter.await.expect("task");
    assert_eq!(reply.expect("request").status, StatusCode::GATEWAY_TIMEOUT);
    let calls = origin_calls(&redis, path);
    eprintln!(
        "defaults: leader answered after {leader_took:?}, the takeover after {took:?}, {calls} origin calls"
    );
    assert_eq!(calls, 2, "p0's fill and p1's takeover");
    assert!(
        leader_took < Duration::from_millis(30_500),
        "the leader waited {leader_took:?} (fill_timeout 30 s)"
    );
    assert!(
        took < Duration::from_millis(33_500),
        "the takeover waited {took:?}: the guide's cap is 33 s"
    );
}

// ---------------------------------------------------------------------------
// In-process: two layers on one Redis, a held or slow origin.
// ---------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
    gate: Option<Gate>,
    delay: Duration,
}

async fn origin_handler(State(o): State<Origin>, uri: Uri) -> Response {
    let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(gate) = &o.gate {
        gate.enter().await;
    }
    tokio::time::sleep(o.delay).await;
    ([("cache-tag", "t")], format!("origin {} #{n}", uri.path())).into_response()
}

fn origin_router(origin: &Origin) -> Router {
    Router::new()
        .route("/{*path}", get(origin_handler))
        .with_state(origin.clone())
}

async fn quick_fail(redis: &RedisServer) -> ConnectionManager {
    redis.connection_manager().await
}

/// An invalidation detaches the fill a request waits on; the request looks
/// again and fills itself (a restart). The restart counts against the
/// same cap: `fill_timeout` 2 s + `lock_timeout` 1 s = 3 s from the
/// request's arrival (before the fix: the restarted fill got a fresh 2 s,
/// 3.8 s in all).
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_an_invalidation_shares_the_deadline() {
    let redis = RedisServer::new();
    let origin = Origin {
        delay: Duration::from_secs(10),
        ..Origin::default()
    };
    let layer = FenceLayer::new(quick_fail(&redis).await)
        .namespace("restart:")
        .fill_timeout(Duration::from_secs(2))
        .lock_timeout(Duration::from_secs(1));
    let handle = layer.handle();
    let addr = serve(origin_router(&origin).layer(layer)).await;
    let client = raw_client();
    let path = "/r";
    let leader = timed_get(&client, addr, path);
    eventually(
        "the fill to reach the origin",
        Duration::from_secs(10),
        || origin.calls.load(Ordering::SeqCst) == 1,
    )
    .await;
    let joined = Instant::now();
    let waiter = timed_get(&client, addr, path);
    eventually(
        "the second request to join",
        Duration::from_secs(10),
        || handle.stats().coalesced == 1,
    )
    .await;
    // Late in the waiter's budget (a scenario parameter, not a sync).
    tokio::time::sleep(Duration::from_millis(1800).saturating_sub(joined.elapsed())).await;
    handle.invalidate_path(path).await.expect("invalidate");
    let (reply, took) = waiter.await.expect("task");
    let reply = reply.expect("request");
    let (_, leader_took) = leader.await.expect("task");
    let calls = origin.calls.load(Ordering::SeqCst);
    eprintln!(
        "restart: the waiter answered {} after {took:?} (leader {leader_took:?}), {calls} origin calls",
        reply.status
    );
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(calls, 2, "the detached fill and the restarted one");
    assert!(
        took < Duration::from_millis(3_400),
        "the restarted request waited {took:?}: its cap is 3 s from its arrival"
    );
}

// ---------------------------------------------------------------------------
// 2. Fences outlive every fill the settings allow
// ---------------------------------------------------------------------------

/// Every fence key of the namespace and how long it lives (ms): fences
/// have no TTL (out of `volatile-*` eviction's reach) and are removed when
/// due by the keep set (`<ns>|#keep`, scored by Redis ms: tests/eviction.rs).
fn fence_pttls(redis: &RedisServer, ns: &str) -> Vec<(String, i64)> {
    let now = || -> i64 {
        let t = redis.cli(&["TIME"]);
        let mut it = t.lines();
        let s: i64 = it.next().unwrap().trim().parse().unwrap();
        let us: i64 = it.next().unwrap().trim().parse().unwrap();
        s * 1000 + us / 1000
    };
    let keep = format!("{ns}|#keep");
    let keys = redis.cli(&["KEYS", &format!("{ns}*fence*")]);
    let mut keys: Vec<String> = keys
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    keys.sort();
    let mut fences: Vec<(String, i64)> = keys
        .into_iter()
        .map(|k| {
            let mut pttl = redis.cli(&["PTTL", &k]).parse().unwrap_or(-3);
            if pttl == -1
                && let Ok(due) = redis.cli(&["ZSCORE", &keep, &k]).parse::<f64>()
            {
                pttl = due as i64 - now();
            }
            (k, pttl)
        })
        .collect();
    // The time of the newest prefix fence (`#fences:last`) lives as long as
    // the prefix fences: checked here, then left out of the list.
    let last = format!("{ns}|#fences:last");
    let set = format!("{ns}|#fences");
    if let Some(i) = fences.iter().position(|(k, _)| *k == last) {
        let (_, last_pttl) = fences.remove(i);
        let set_pttl = fences
            .iter()
            .find(|(k, _)| *k == set)
            .map(|(_, p)| *p)
            .expect("#fences:last without #fences");
        assert!(
            (last_pttl - set_pttl).abs() <= 100,
            "{last_pttl} vs {set_pttl}"
        );
    }
    fences
}

/// Two routes of one namespace: one at the defaults, one with a
/// `fill_timeout` of 2 h. The URL, prefix and tag fences a handle sets
/// live at least 2 h + `lock_timeout` (before: 60 s, 60 s and 1 h): a fill
/// of the slow route can't outlive the fence that should refuse it.
#[tokio::test(flavor = "multi_thread")]
async fn fences_outlive_the_longest_fill_of_any_route() {
    let redis = RedisServer::new();
    let cache = FenceCache::builder(quick_fail(&redis).await)
        .namespace("long:")
        .build()
        .expect("cache");
    // The handle is made first: fences cover routes made later too.
    let handle = cache.handle();
    let origin = Origin::default();
    let _fast = origin_router(&origin).layer(cache.layer());
    let slow_fill = Duration::from_secs(2 * 3600);
    let _slow = origin_router(&origin).layer(cache.layer().fill_timeout(slow_fill));
    let cap = slow_fill + Duration::from_secs(3);
    handle.invalidate_path("/long/x").await.expect("path");
    handle.invalidate_prefix("/long/").await.expect("prefix");
    handle.invalidate_tag("t").await.expect("tag");
    handle.soft_invalidate_tag("u").await.expect("soft tag");
    let fences = fence_pttls(&redis, "long:");
    eprintln!("fences with a 2 h fill_timeout: {fences:?}");
    assert_eq!(fences.len(), 4, "URL, prefix, two tags: {fences:?}");
    for (key, pttl) in fences {
        assert!(
            pttl >= cap.as_millis() as i64 - 5_000,
            "{key} lives {pttl} ms, shorter than a fill may run ({cap:?})"
        );
    }
}

/// With short settings (`fill_timeout` 2 s, `lock_timeout` 1 s) the fences
/// are short too, derived from them, and a fill that started before a
/// prefix or tag invalidation and stores as late as its timeout allows
/// (1.8 s) is still refused: no fill outlives the fence.
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_as_long_as_its_timeout_never_outlives_a_short_fence() {
    let redis = RedisServer::new();
    for (kind, ns) in [("prefix", "sp:"), ("tag", "st:")] {
        let gate = Gate::new();
        let origin = Origin {
            gate: Some(gate.clone()),
            ..Origin::default()
        };
        let layer = FenceLayer::new(quick_fail(&redis).await)
            .namespace(ns)
            .fill_timeout(Duration::from_secs(2))
            .lock_timeout(Duration::from_secs(1));
        let handle = layer.handle();
        let addr = serve(origin_router(&origin).layer(layer)).await;
        let client = raw_client();
        let path = "/p/x";
        let started = Instant::now();
        let first = timed_get(&client, addr, path);
        gate.called(1).await;
        match kind {
            "prefix" => handle.invalidate_prefix("/p/").await.expect("prefix"),
            _ => handle.invalidate_tag("t").await.expect("tag"),
        };
        let fences = fence_pttls(&redis, ns);
        eprintln!("{kind}: fences with fill_timeout 2 s, lock_timeout 1 s: {fences:?}");
        assert_eq!(fences.len(), 1, "{fences:?}");
        let pttl = fences[0].1;
        // fill + lock (3 s), two Redis timeouts and 1 s of margin: 4.5 s
        // (a tag's fence lives at least an hour whatever the settings).
        let most = if kind == "tag" { 3_600_000 } else { 4_500 };
        assert!(
            (3_000..=most).contains(&pttl),
            "the {kind} fence lives {pttl} ms: derived from fill_timeout + lock_timeout"
        );
        // The fill answers as late as its timeout allows.
        tokio::time::sleep(Duration::from_millis(1800).saturating_sub(started.elapsed())).await;
        gate.release();
        let (reply, _) = first.await.expect("task");
        assert_eq!(reply.expect("request").status, StatusCode::OK);
        assert_eq!(
            handle.stats().fenced,
            1,
            "{kind}: the late fill was refused"
        );
        let again = try_get(&client, addr, path).await.expect("request");
        assert_eq!(
            again.cache_status(),
            Some("MISS"),
            "{kind}: nothing was stored"
        );
        assert_eq!(origin.calls.load(Ordering::SeqCst), 2);
    }
}

// ---------------------------------------------------------------------------
// 3. The guide's table, at the defaults
// ---------------------------------------------------------------------------

/// A leader SIGKILLed mid-fill, 10 waiters in each of two other processes:
/// exactly one of them takes over (2 origin calls in all, the lost one and
/// the takeover), everyone gets the takeover's response within the lease
/// (3 s) plus the origin (2 s).
#[tokio::test(flavor = "multi_thread")]
async fn two_processes_waiting_on_a_killed_leader_take_over_exactly_once() {
    let redis = RedisServer::new();
    let mut procs = spawn_procs(
        &redis,
        &["p0", "p1", "p2"],
        &[("NAMESPACE", "kill:"), ("ORIGIN_DELAY_MS", "2000")],
    );
    wait_for_subscribers(&redis, 3).await;
    let client = raw_client();
    let path = "/c/kill";
    let leader = timed_get(&client, procs.addr("p0"), path);
    eventually(
        "the leader's fill to reach the origin",
        Duration::from_secs(10),
        || origin_calls(&redis, path) == 1,
    )
    .await;
    let others = [procs.addr("p1"), procs.addr("p2")];
    let waiters: Vec<_> = (0..20)
        .map(|i| timed_get(&client, others[i % 2], path))
        .collect();
    until_waiting(&client, &others, 20).await;
    procs.kill("p0");
    let killed = Instant::now();
    assert!(leader.await.expect("task").0.is_err(), "p0 was killed");
    let mut slowest = Duration::ZERO;
    for w in waiters {
        let (reply, _) = w.await.expect("task");
        let reply = reply.expect("request");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(
            reply.text(),
            format!("origin {path} #2"),
            "the takeover's response"
        );
        slowest = slowest.max(killed.elapsed());
    }
    let calls = origin_calls(&redis, path);
    eprintln!(
        "killed leader, 2 waiting processes: {calls} origin calls, last answer {slowest:?} after the kill"
    );
    assert_eq!(calls, 2, "the lost fill and exactly one takeover");
    assert!(
        slowest < Duration::from_secs(3 + 2 + 1),
        "answered {slowest:?} after the kill: lease 3 s + origin 2 s"
    );
}

/// `wait_timeout` (5 s, the default) passes while another process's fill
/// runs and a stale copy exists: the waiting request gets the stale copy
/// (`STALE`) at 5 s, not later. (A request waits with a stale copy in hand
/// when it asked for a fresh one: `honor_request_no_cache`, the one setting
/// changed.)
#[tokio::test(flavor = "multi_thread")]
async fn wait_timeout_serves_the_stale_copy_at_5_s() {
    let redis = RedisServer::new();
    let procs = spawn_procs(
        &redis,
        &["p0", "p1"],
        &[
            ("NAMESPACE", "wt:"),
            ("TTL_MS", "200"),
            ("GRACE_MS", "60000"),
            ("HONOR_NO_CACHE", "1"),
        ],
    );
    wait_for_subscribers(&redis, 2).await;
    let client = raw_client();
    let path = "/c/wt";
    let warm = try_get(&client, procs.addr("p0"), path)
        .await
        .expect("warm");
    assert_eq!(warm.text(), format!("origin {path} #1"));
    // The copy goes stale (TTL 200 ms; a scenario parameter, not a sync).
    tokio::time::sleep(Duration::from_millis(400)).await;
    // s0's origin takes 20 s: its refetch holds the lease that long.
    let refetch = [("cache-control", "no-cache")];
    let procs_slow = spawn_procs(
        &redis,
        &["s0"],
        &[
            ("NAMESPACE", "wt:"),
            ("TTL_MS", "200"),
            ("GRACE_MS", "60000"),
            ("HONOR_NO_CACHE", "1"),
            ("ORIGIN_DELAY_MS", "20000"),
        ],
    );
    let s0 = procs_slow.addr("s0");
    let filler = {
        let client = client.clone();
        tokio::spawn(async move { try_get_with(&client, s0, path, &refetch).await })
    };
    eventually(
        "the refetch to reach the origin",
        Duration::from_secs(10),
        || origin_calls(&redis, path) == 2,
    )
    .await;
    let t = Instant::now();
    let reply = try_get_with(&client, procs.addr("p1"), path, &refetch)
        .await
        .expect("request");
    let took = t.elapsed();
    eprintln!(
        "wait_timeout with a stale copy: {} after {took:?}",
        reply.cache_status().unwrap_or("-")
    );
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.cache_status(), Some("STALE"));
    assert_eq!(reply.text(), format!("origin {path} #1"));
    assert!(
        took >= Duration::from_millis(4_900),
        "{took:?}: served before wait_timeout"
    );
    assert!(
        took < Duration::from_millis(5_500),
        "{took:?}: wait_timeout is 5 s"
    );
    assert_eq!(
        origin_calls(&redis, path),
        2,
        "the waiter never called the origin"
    );
    filler.abort();
}

/// A failing origin behind a stale entry, two processes hit alternately
/// every 50 ms: the failed refreshes back off fleet-wide, doubling from
/// 1 s (1, 2, 4 s): 4 origin calls in the 8 s after the first failure,
/// spaced at least 1, 2 and 4 s. A constant backoff would make 8; one per
/// process, twice as many.
#[tokio::test(flavor = "multi_thread")]
async fn the_refresh_backoff_doubles_fleet_wide() {
    let redis = RedisServer::new();
    let procs = spawn_procs(
        &redis,
        &["p0", "p1"],
        &[
            ("NAMESPACE", "bo:"),
            ("TTL_MS", "300"),
            ("GRACE_MS", "60000"),
            ("ORIGIN_DELAY_MS", "10"),
        ],
    );
    let addrs = [procs.addr("p0"), procs.addr("p1")];
    let client = raw_client();
    let path = "/c/backoff";
    let warm = try_get(&client, addrs[0], path).await.expect("warm-up");
    assert_eq!(warm.text(), format!("origin {path} #1"));
    redis.cli(&["SET", "origin_status", "500"]);
    let mut i = 0;
    let mut first_failure: Option<u64> = None;
    loop {
        let reply = try_get(&client, addrs[i % 2], path).await.expect("request");
        i += 1;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), format!("origin {path} #1"));
        if first_failure.is_none() {
            first_failure = origin_times(&redis, path).get(1).copied();
        }
        if let Some(first) = first_failure
            && unix_ms() > first + 8_000
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let times = origin_times(&redis, path);
    let failing = &times[1..];
    let gaps: Vec<u64> = failing.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "refresh backoff: {} failing calls in 8 s, gaps {gaps:?} ms",
        failing.len()
    );
    assert_eq!(failing.len(), 4, "gaps {gaps:?}: 1, 2, 4 s expected");
    for (gap, nominal) in gaps.iter().zip([1_000u64, 2_000, 4_000]) {
        assert!(
            *gap >= nominal - 50 && *gap < nominal + 600,
            "gap {gap} ms where the backoff is {nominal} ms (all gaps {gaps:?})"
        );
    }
}

/// Redis stalls (a half-open hop: no answer, no FIN) under a connection
/// whose own response timeout is 30 s: the crate's own Redis timeout
/// (250 ms by default) answers the request from the origin within 2 s.
#[tokio::test(flavor = "multi_thread")]
async fn the_crates_own_redis_timeout_answers_while_redis_stalls() {
    let redis = RedisServer::new();
    let proxy = StallProxy::start(
        format!("127.0.0.1:{}", redis.port())
            .parse()
            .expect("address"),
    )
    .await;
    let patient = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(30)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    let conn = redis::Client::open(proxy.url())
        .expect("url")
        .get_connection_manager_with_config(patient)
        .await
        .expect("redis");
    let origin = Origin::default();
    let layer = FenceCache::new(conn).layer().namespace("rt:");
    let addr = serve(origin_router(&origin).layer(layer)).await;
    let client = raw_client();
    let warm = try_get(&client, addr, "/rt/x").await.expect("warm");
    assert_eq!(warm.cache_status(), Some("MISS"));
    let hit = try_get(&client, addr, "/rt/x").await.expect("hit");
    assert_eq!(hit.cache_status(), Some("HIT"));
    proxy.stall_all();
    for path in ["/rt/x", "/rt/y"] {
        let t = Instant::now();
        let reply = try_get(&client, addr, path).await.expect("request");
        let took = t.elapsed();
        eprintln!(
            "Redis stalled: {path} answered {} {:?} after {took:?}",
            reply.status,
            reply.cache_status()
        );
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            took < Duration::from_secs(2),
            "{path} took {took:?}: the crate's Redis timeout is 250 ms"
        );
    }
    assert_eq!(origin.calls.load(Ordering::SeqCst), 3);
    proxy.resume();
}
