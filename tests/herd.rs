//! Waiting never becomes a herd, with the DEFAULT settings (issue 16): a
//! slow origin is called once however long it takes, a crashed leader is
//! taken over once, a hot key is refreshed about once per TTL, a failing
//! origin is not hammered by refreshes, a panicking handler releases its
//! lease at once, a hung origin or an endless body is bounded by
//! `fill_timeout`, extreme settings don't panic or hang, and the wake-up
//! listener comes back after Redis restarts or its runtime goes away.
//!
//! The cross-process tests re-execute this test binary as server processes
//! (`herd_server`, an ignored test run with `CACHEFENCE_ROLE=server`) whose
//! layer is `FenceCache::builder(conn).wake_ups(client).build().expect("cache").layer().ttl(..)
//! .grace(..).namespace(..)`: nothing else is configured.

mod support;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use cachefence::{FenceCache, FenceLayer, OnWaitTimeout};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use redis::aio::ConnectionManager;
use support::procs::Procs;
use support::{RedisServer, Reply, serve, wake_subscribers};
use tokio::sync::Notify;

// ---------------------------------------------------------------------------
// HTTP client that reports errors instead of panicking
// ---------------------------------------------------------------------------

type RawClient = HyperClient<HttpConnector, Full<Bytes>>;

fn raw_client() -> RawClient {
    HyperClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

async fn try_get(client: &RawClient, addr: SocketAddr, path: &str) -> Result<Reply, String> {
    // One Host for every process, as behind a load balancer: the host is in
    // the cache key.
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, support::TEST_HOST)
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

async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------
// Server processes with the default settings
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct ProcState {
    conn: redis::aio::MultiplexedConnection,
    delay: Duration,
}

/// Counts its calls in Redis (`origin_calls:<path>`), answers the status
/// stored under `origin_status` (200 when none), after `ORIGIN_DELAY_MS`.
/// The body names the path and the call number.
async fn counted_origin(State(s): State<ProcState>, uri: Uri) -> Response {
    let path = uri.path().to_owned();
    let mut conn = s.conn.clone();
    let (n, status): (u64, Option<u16>) = redis::pipe()
        .cmd("INCR")
        .arg(format!("origin_calls:{path}"))
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

fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// A server process. Does nothing unless `CACHEFENCE_ROLE=server`. Env:
/// `REDIS_URL`, `NAMESPACE`, `TTL_MS`, `GRACE_MS`, `ORIGIN_DELAY_MS`. The
/// layer has the default settings but for TTL, grace and namespace.
/// Cached paths are under `/c/`; `/stats` (not cached) answers counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a server process for the cross-process tests, run by them with CACHEFENCE_ROLE=server"]
async fn herd_server() {
    if std::env::var("CACHEFENCE_ROLE").as_deref() != Ok("server") {
        eprintln!("herd_server: CACHEFENCE_ROLE is not `server`, nothing to do");
        return;
    }
    let url = std::env::var("REDIS_URL").expect("REDIS_URL");
    let ns = std::env::var("NAMESPACE").expect("NAMESPACE");
    let client = redis::Client::open(url.as_str()).expect("REDIS_URL");
    let layer = FenceCache::builder(client.get_connection_manager().await.expect("redis"))
        .wake_ups(client.clone())
        .build()
        .expect("cache")
        .layer()
        .ttl(env_ms("TTL_MS", 60_000))
        .grace(env_ms("GRACE_MS", 30_000))
        .namespace(ns);
    let handle = layer.handle();
    let state = ProcState {
        conn: client
            .get_multiplexed_async_connection()
            .await
            .expect("redis"),
        delay: env_ms("ORIGIN_DELAY_MS", 50),
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
                        "coalesced={} remote_waits={} fills={} wait_timeouts={} early_refreshes={} stale_refreshes={}",
                        s.coalesced,
                        s.remote_waits,
                        s.fills,
                        s.wait_timeouts,
                        s.early_refreshes,
                        s.stale_refreshes
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
    let mut procs = Procs::new("herd_server");
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

/// `n` concurrent GETs of `path`, spread over `addrs`; the replies and each
/// one's latency.
async fn burst(
    client: &RawClient,
    addrs: &[SocketAddr],
    path: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<(Result<Reply, String>, Duration)>> {
    (0..n)
        .map(|i| {
            let (client, path) = (client.clone(), path.to_owned());
            let addr = addrs[i % addrs.len()];
            tokio::spawn(async move {
                let t = Instant::now();
                (try_get(&client, addr, &path).await, t.elapsed())
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 1. A slow origin is called once, however long the waits
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_origin_slower_than_the_wait_timeout_is_called_once_for_60_requests_over_3_processes() {
    let redis = RedisServer::new();
    let procs = spawn_procs(
        &redis,
        &["p0", "p1", "p2"],
        &[("NAMESPACE", "slow:"), ("ORIGIN_DELAY_MS", "11000")],
    );
    wait_for_subscribers(&redis, 3).await;
    let addrs = [procs.addr("p0"), procs.addr("p1"), procs.addr("p2")];
    let client = raw_client();
    let path = "/c/slow";
    let started = Instant::now();
    let tasks = burst(&client, &addrs, path, 60).await;
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (reply, took) = t.await.expect("request task");
        let reply = reply.expect("request");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), format!("origin {path} #1"));
        slowest = slowest.max(took);
    }
    assert_eq!(
        origin_calls(&redis, path),
        1,
        "waiters past wait_timeout must keep waiting for the live fill"
    );
    eprintln!(
        "slow origin (11 s): 60 requests over 3 processes, 1 origin call, slowest {slowest:?}, all in {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 3. A crashed leader is taken over once, under the default settings
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_mid_fill_is_taken_over_once_and_every_waiter_is_answered() {
    let redis = RedisServer::new();
    let mut procs = spawn_procs(
        &redis,
        &["p0", "p1", "p2"],
        &[("NAMESPACE", "crash:"), ("ORIGIN_DELAY_MS", "3000")],
    );
    wait_for_subscribers(&redis, 3).await;
    let client = raw_client();
    let path = "/c/crash";
    // The leader, in p0: its fill reaches the origin.
    let leader = burst(&client, &[procs.addr("p0")], path, 1).await;
    eventually(
        "the leader's fill to reach the origin",
        Duration::from_secs(10),
        || origin_calls(&redis, path) == 1,
    )
    .await;
    // 60 waiters in the two other processes.
    let others = [procs.addr("p1"), procs.addr("p2")];
    let started = Instant::now();
    let waiters = burst(&client, &others, path, 60).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut joined = 0;
        for addr in others {
            joined += proc_stat(&client, addr, "coalesced").await
                + proc_stat(&client, addr, "remote_waits").await;
        }
        // Each process: one fill waiting on p0's lease, the rest joined it.
        if joined >= 60 {
            break;
        }
        assert!(Instant::now() < deadline, "only {joined} of 60 waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    procs.kill("p0");
    for t in leader {
        assert!(t.await.expect("task").0.is_err(), "p0 was killed");
    }
    let mut slowest = Duration::ZERO;
    for t in waiters {
        let (reply, took) = t.await.expect("request task");
        let reply = reply.expect("request");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        slowest = slowest.max(took);
    }
    let calls = origin_calls(&redis, path);
    assert_eq!(
        calls, 2,
        "{calls} origin calls: the lost fill and exactly one takeover expected"
    );
    eprintln!(
        "crashed leader: 60 waiters answered, {calls} origin calls, slowest {slowest:?} (waiting began {:?} before the end)",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 4. A hot key is refreshed about once per TTL at any request rate
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_hot_key_in_2_processes_is_refreshed_about_once_per_ttl_and_nobody_waits() {
    let redis = RedisServer::new();
    let procs = spawn_procs(
        &redis,
        &["p0", "p1"],
        &[
            ("NAMESPACE", "hot:"),
            ("TTL_MS", "1000"),
            ("GRACE_MS", "5000"),
            ("ORIGIN_DELAY_MS", "100"),
        ],
    );
    wait_for_subscribers(&redis, 2).await;
    let addrs = [procs.addr("p0"), procs.addr("p1")];
    let client = raw_client();
    let path = "/c/hot";
    let warm = try_get(&client, addrs[0], path).await.expect("warm-up");
    assert_eq!(warm.cache_status(), Some("MISS"));
    let before = origin_calls(&redis, path);
    const RUN: Duration = Duration::from_secs(10);
    let end = Instant::now() + RUN;
    let loops: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            let addr = addrs[i % 2];
            tokio::spawn(async move {
                let mut statuses = std::collections::BTreeMap::<String, u64>::new();
                while Instant::now() < end {
                    let reply = try_get(&client, addr, path).await.expect("request");
                    assert_eq!(reply.status, StatusCode::OK);
                    *statuses
                        .entry(reply.cache_status().unwrap_or("-").to_owned())
                        .or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    let mut all = std::collections::BTreeMap::<String, u64>::new();
    for l in loops {
        for (k, v) in l.await.expect("load loop") {
            *all.entry(k).or_default() += v;
        }
    }
    let calls = origin_calls(&redis, path) - before;
    let total: u64 = all.values().sum();
    eprintln!(
        "hot key, TTL 1 s, origin 100 ms, 2 processes: {total} requests in {RUN:?} ({:.0}/s), {calls} origin calls, statuses {all:?}",
        total as f64 / RUN.as_secs_f64()
    );
    assert!(calls <= 15, "{calls} refreshes in 10 s of a 1 s TTL");
    assert!(
        calls >= 5,
        "{calls} refreshes: the key must still be kept fresh"
    );
    // Nobody waited on a refresh: every request was served from the cache.
    assert!(all.keys().all(|k| k == "HIT" || k == "STALE"), "{all:?}");
}

// ---------------------------------------------------------------------------
// 10. A failing origin is not hammered by refreshes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_origin_behind_a_stale_entry_is_refreshed_with_backoff_and_recovers() {
    let redis = RedisServer::new();
    let procs = spawn_procs(
        &redis,
        &["p0", "p1"],
        &[
            ("NAMESPACE", "fail:"),
            ("TTL_MS", "300"),
            ("GRACE_MS", "5000"),
            ("ORIGIN_DELAY_MS", "10"),
        ],
    );
    let addrs = [procs.addr("p0"), procs.addr("p1")];
    let client = raw_client();
    let path = "/c/failing";
    let warm = try_get(&client, addrs[0], path).await.expect("warm-up");
    assert_eq!(warm.text(), format!("origin {path} #1"));
    redis.cli(&["SET", "origin_status", "500"]);
    let before = origin_calls(&redis, path);
    // Wait out the TTL: the first stale read starts the first (failing)
    // refresh.
    let turning = Instant::now();
    loop {
        let reply = try_get(&client, addrs[0], path).await.expect("request");
        if reply.cache_status() == Some("STALE") {
            break;
        }
        assert_eq!(reply.cache_status(), Some("HIT"));
        assert!(turning.elapsed() < Duration::from_secs(5), "never stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then 10 requests a second for 2 s, alternating processes.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..20 {
        tick.tick().await;
        let reply = try_get(&client, addrs[i % 2], path).await.expect("request");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.cache_status(), Some("STALE"));
        assert_eq!(reply.text(), format!("origin {path} #1"));
    }
    let failing_calls = origin_calls(&redis, path) - before;
    assert!(
        (1..=5).contains(&failing_calls),
        "{failing_calls} refreshes of a failing origin in 2 s"
    );
    // The origin recovers: a fresh copy arrives without anyone waiting.
    redis.cli(&["DEL", "origin_status"]);
    let recovering = Instant::now();
    loop {
        let reply = try_get(&client, addrs[0], path).await.expect("request");
        assert_eq!(reply.status, StatusCode::OK);
        if reply.text() != format!("origin {path} #1") {
            break;
        }
        assert!(
            recovering.elapsed() < Duration::from_secs(10),
            "no fresh copy 10 s after the origin recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "failing origin: {failing_calls} origin calls in 2 s of 10 req/s; fresh copy {:?} after recovery",
        recovering.elapsed()
    );
}

// ---------------------------------------------------------------------------
// In-process tests: two layers on one Redis stand for two processes.
// ---------------------------------------------------------------------------

/// An origin whose calls are counted and can be held: `hold` calls wait for
/// `release`; `panic` calls panic; `hang` calls never answer; `stream`
/// calls answer an endless body (`sse` with `text/event-stream`).
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
    per_path: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    release: Arc<Notify>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/{*path}", get(origin_handler))
            .with_state(self.clone())
    }
}

fn endless(sse: bool) -> Response {
    let stream = futures_util::stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("data: {n}\n\n"))),
            n + 1,
        ))
    });
    let mut res = Response::new(Body::from_stream(stream));
    if sse {
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
    }
    res
}

async fn origin_handler(State(o): State<Origin>, uri: Uri) -> Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let n = {
        let mut map = o.per_path.lock().unwrap();
        let n = map.entry(uri.path().to_owned()).or_default();
        *n += 1;
        *n
    };
    let q = uri.query().unwrap_or("");
    let first = n == 1;
    if q.contains("hold") && first {
        o.release.notified().await;
    }
    if q.contains("panic") && first {
        panic!("the handler panics (on purpose)");
    }
    if q.contains("hang") && first {
        std::future::pending::<()>().await;
    }
    if q.contains("stream") && first {
        return endless(false);
    }
    if q.contains("sse") {
        return endless(true);
    }
    format!("origin {} #{n}", uri.path()).into_response()
}

async fn default_layer(redis: &RedisServer, ns: &str) -> FenceLayer<ConnectionManager> {
    FenceLayer::new(redis.connection_manager().await).namespace(ns)
}

/// [`default_layer`] with wake-ups.
async fn waking_layer(redis: &RedisServer, ns: &str) -> FenceLayer<ConnectionManager> {
    FenceCache::builder(redis.connection_manager().await)
        .wake_ups(redis.client())
        .build()
        .expect("cache")
        .layer()
        .namespace(ns)
}

#[tokio::test(flavor = "multi_thread")]
async fn call_origin_after_the_wait_sends_one_request_per_process_not_one_per_waiter() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let a = default_layer(&redis, "co:").await;
    let b = default_layer(&redis, "co:")
        .await
        .wait_timeout(Duration::from_millis(300))
        .on_wait_timeout(OnWaitTimeout::CallOrigin);
    let addr_a = serve(origin.router().layer(a)).await;
    let addr_b = serve(origin.router().layer(b.clone())).await;
    let client = raw_client();
    let path = "/k?hold";
    let leader = burst(&client, &[addr_a], path, 1).await;
    eventually(
        "A's fill to reach the origin",
        Duration::from_secs(10),
        || origin.calls() == 1,
    )
    .await;
    let waiters = burst(&client, &[addr_b], path, 20).await;
    for t in waiters {
        let reply = t.await.expect("task").0.expect("request");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "origin /k #2", "B's one origin call, shared");
    }
    assert_eq!(origin.calls(), 2, "one call for A, one for all of B");
    origin.release.notify_one();
    let reply = leader.into_iter().next().unwrap().await.unwrap().0.unwrap();
    assert_eq!(reply.text(), "origin /k #1");
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_timeout_after_the_wait_never_calls_the_origin() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let a = default_layer(&redis, "gt:").await;
    let b = default_layer(&redis, "gt:")
        .await
        .wait_timeout(Duration::from_millis(300))
        .on_wait_timeout(OnWaitTimeout::GatewayTimeout);
    let addr_a = serve(origin.router().layer(a)).await;
    let addr_b = serve(origin.router().layer(b)).await;
    let client = raw_client();
    let path = "/k?hold";
    let leader = burst(&client, &[addr_a], path, 1).await;
    eventually(
        "A's fill to reach the origin",
        Duration::from_secs(10),
        || origin.calls() == 1,
    )
    .await;
    for t in burst(&client, &[addr_b], path, 20).await {
        let reply = t.await.expect("task").0.expect("request");
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(origin.calls(), 1);
    origin.release.notify_one();
    for t in leader {
        assert_eq!(t.await.unwrap().0.unwrap().status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_releases_its_lease_at_once_and_its_waiters_retry_through_one_fill() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = default_layer(&redis, "panic:").await;
    let handle = layer.handle();
    let addr = serve(origin.router().layer(layer)).await;
    let client = raw_client();
    let path = "/p?hold&panic";
    let leader = burst(&client, &[addr], path, 1).await;
    eventually(
        "the fill to reach the origin",
        Duration::from_secs(10),
        || origin.calls() == 1,
    )
    .await;
    let waiters = burst(&client, &[addr], path, 20).await;
    eventually(
        "20 requests to join the fill",
        Duration::from_secs(10),
        || handle.stats().coalesced >= 20,
    )
    .await;
    origin.release.notify_one();
    let reply = leader.into_iter().next().unwrap().await.unwrap().0.unwrap();
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    for t in waiters {
        let reply = t.await.expect("task").0.expect("request");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "origin /p #2");
    }
    assert_eq!(origin.calls(), 2, "the panicking fill and one retry");
    let stats = handle.stats();
    // The retry took the lease at once: the panicking fill had released it
    // instead of leaving it to expire.
    assert_eq!(stats.remote_waits, 0, "{stats:?}");
    assert_eq!(stats.fills, 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_origin_is_abandoned_after_the_default_fill_timeout_and_the_next_request_fills_again()
 {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = default_layer(&redis, "hang:").await;
    let handle = layer.handle();
    let addr = serve(origin.router().layer(layer)).await;
    let client = raw_client();
    let path = "/h?hang";
    let started = Instant::now();
    for t in burst(&client, &[addr], path, 10).await {
        let reply = t.await.expect("task").0.expect("request");
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(29), "abandoned after {took:?}");
    assert_eq!(origin.calls(), 1);
    assert_eq!(handle.stats().fill_timeouts, 1);
    assert!(
        redis.cli(&["KEYS", "*:lease"]).trim().is_empty(),
        "the lease was released"
    );
    let reply = try_get(&client, addr, path).await.expect("request");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.cache_status(), Some("MISS"));
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_body_streams_to_its_own_client_while_its_waiters_get_504_at_the_fill_timeout() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = default_layer(&redis, "endless:")
        .await
        .fill_timeout(Duration::from_secs(1));
    let handle = layer.handle();
    let addr = serve(origin.router().layer(layer)).await;
    let path = "/e?stream";
    let leader = tokio::spawn(reqwest_like_get(addr, path));
    eventually(
        "the fill to reach the origin",
        Duration::from_secs(10),
        || origin.calls() == 1,
    )
    .await;
    let waiters = burst(&raw_client(), &[addr], path, 5).await;
    eventually(
        "5 requests to join the fill",
        Duration::from_secs(10),
        || handle.stats().coalesced >= 5,
    )
    .await;
    // The leader reads its endless response for a while.
    let res = leader.await.expect("leader task");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let mut read = 0;
    let reading = Instant::now();
    while reading.elapsed() < Duration::from_secs(2) {
        let frame = body.frame().await.expect("a frame").expect("data");
        read += frame.data_ref().map_or(0, Bytes::len);
    }
    assert!(read > 0);
    for t in waiters {
        let reply = t.await.expect("task").0.expect("request");
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    }
    drop(body);
    assert_eq!(handle.stats().fill_timeouts, 1);
    // Nothing left behind: the next request fills again.
    let reply = try_get(&raw_client(), addr, path).await.expect("request");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "origin /e #2");
}

async fn reqwest_like_get(addr: SocketAddr, path: &str) -> http::Response<hyper::body::Incoming> {
    let client = raw_client();
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, support::TEST_HOST)
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.request(req).await.expect("request")
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_pass_through_to_each_client_and_nobody_waits_on_them() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = default_layer(&redis, "sse:").await;
    let addr = serve(origin.router().layer(layer)).await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let res = tokio::time::timeout(
            Duration::from_secs(10),
            reqwest_like_get(addr, "/events?sse"),
        )
        .await
        .expect("an SSE response does not wait on another");
        assert_eq!(res.status(), StatusCode::OK);
        let mut body = res.into_body();
        let frame = body.frame().await.expect("a frame").expect("data");
        assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
        streams.push(body);
    }
    assert_eq!(origin.calls(), 5, "each client its own stream");
}

#[tokio::test(flavor = "multi_thread")]
async fn extreme_settings_never_panic_or_hang_a_request() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let variants: Vec<(&str, FenceLayer<ConnectionManager>)> = vec![
        (
            "wait-max",
            default_layer(&redis, "x1:")
                .await
                .wait_timeout(Duration::MAX),
        ),
        (
            "lock-zero",
            default_layer(&redis, "x2:")
                .await
                .lock_timeout(Duration::ZERO),
        ),
        (
            "lock-max",
            default_layer(&redis, "x3:")
                .await
                .lock_timeout(Duration::MAX),
        ),
        (
            "ttl-zero",
            default_layer(&redis, "x4:").await.ttl(Duration::ZERO),
        ),
        (
            "ttl-max",
            default_layer(&redis, "x5:")
                .await
                .ttl(Duration::MAX)
                .grace(Duration::MAX),
        ),
        (
            "beta-nan",
            default_layer(&redis, "x6:")
                .await
                .beta(f64::NAN)
                .early_refresh_after(f64::NAN),
        ),
        (
            "beta-neg",
            default_layer(&redis, "x7:")
                .await
                .beta(-1.0)
                .early_refresh_after(-3.0),
        ),
        (
            "fill-below-lock",
            default_layer(&redis, "x8:")
                .await
                .fill_timeout(Duration::ZERO)
                .lock_timeout(Duration::from_secs(10)),
        ),
        (
            "all-max",
            default_layer(&redis, "x9:")
                .await
                .fill_timeout(Duration::MAX)
                .pass_ttl(Duration::MAX)
                .negative_ttl(Duration::MAX)
                .body_limit(usize::MAX),
        ),
        (
            "wait-zero",
            default_layer(&redis, "x10:")
                .await
                .wait_timeout(Duration::ZERO),
        ),
    ];
    let client = raw_client();
    for (name, layer) in variants {
        let addr = serve(origin.router().layer(layer)).await;
        for round in 0..2 {
            let replies = tokio::time::timeout(Duration::from_secs(30), async {
                let mut out = Vec::new();
                for t in burst(&client, &[addr], &format!("/{name}"), 10).await {
                    out.push(t.await.expect("task").0.expect("request"));
                }
                out
            })
            .await
            .unwrap_or_else(|_| panic!("{name}: a request hung"));
            for r in replies {
                assert_eq!(
                    r.status,
                    StatusCode::OK,
                    "{name} round {round}: {}",
                    r.text()
                );
            }
        }
    }
}

/// B waits on A's held fill of a fresh path; A's fill is released and
/// stores. Returns whether B's wait was ended by a wake-up (a poll that
/// happens to read the entry first is a fallback, so callers try again).
async fn woken_remote_wait(
    origin: &Origin,
    http: &RawClient,
    (addr_a, addr_b): (SocketAddr, SocketAddr),
    hb: &cachefence::FenceHandle<ConnectionManager>,
    attempt: usize,
) -> bool {
    let path = format!("/w{attempt}?hold");
    let (calls, waits, wakeups) = (origin.calls(), hb.stats().remote_waits, hb.stats().wakeups);
    let leader = burst(http, &[addr_a], &path, 1).await;
    eventually(
        "A's fill to reach the origin",
        Duration::from_secs(10),
        || origin.calls() == calls + 1,
    )
    .await;
    let waiter = burst(http, &[addr_b], &path, 1).await;
    eventually("B to wait on A's lease", Duration::from_secs(10), || {
        hb.stats().remote_waits == waits + 1
    })
    .await;
    origin.release.notify_one();
    for t in leader.into_iter().chain(waiter) {
        let reply = t.await.unwrap().0.unwrap();
        assert_eq!(reply.text(), format!("origin /w{attempt} #1"));
    }
    hb.stats().wakeups > wakeups
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wake_up_listener_reconnects_after_a_redis_restart_and_wakes_waiters_again() {
    let mut redis = RedisServer::new();
    let origin = Origin::default();
    let a = default_layer(&redis, "wk:").await;
    let b = waking_layer(&redis, "wk:").await;
    let hb = b.handle();
    let addr_a = serve(origin.router().layer(a)).await;
    let addr_b = serve(origin.router().layer(b)).await;
    eventually("the listener to connect", Duration::from_secs(10), || {
        hb.stats().listener_connects == 1
    })
    .await;
    redis.stop();
    redis.start();
    eventually("the listener to reconnect", Duration::from_secs(20), || {
        hb.stats().listener_connects >= 2
    })
    .await;
    wait_for_subscribers(&redis, 1).await;
    // Both layers' connections are back.
    let http = raw_client();
    for addr in [addr_a, addr_b] {
        let path = format!("/ready-{}", addr.port());
        let ready = Instant::now();
        while try_get(&http, addr, &path)
            .await
            .map(|r| r.cache_status() == Some("HIT"))
            != Ok(true)
        {
            assert!(
                ready.elapsed() < Duration::from_secs(20),
                "Redis never came back for {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A remote wait in B is woken by A's store.
    let mut woken = false;
    for attempt in 0..5 {
        if woken_remote_wait(&origin, &http, (addr_a, addr_b), &hb, attempt).await {
            woken = true;
            break;
        }
    }
    assert!(woken, "no remote wait was woken: {:?}", hb.stats());
}

#[test]
fn the_wake_up_listener_outlives_the_runtime_that_built_the_layer() {
    let redis = RedisServer::new();
    // Built, with its listener, on a runtime that then shuts down.
    let first = tokio::runtime::Runtime::new().unwrap();
    let b = first.block_on(async {
        // A lazy connection: it connects on the runtime that first uses it.
        let b = FenceCache::builder(redis.connection_manager_lazy())
            .wake_ups(redis.client())
            .build()
            .expect("cache")
            .layer()
            .namespace("rt:");
        let hb = b.handle();
        eventually("the listener to connect", Duration::from_secs(10), || {
            hb.stats().listener_connects == 1
        })
        .await;
        b
    });
    drop(first);
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let origin = Origin::default();
        let hb = b.handle();
        let a = default_layer(&redis, "rt:").await;
        let addr_a = serve(origin.router().layer(a)).await;
        let addr_b = serve(origin.router().layer(b)).await;
        let http = raw_client();
        // Serving B on this runtime started its listener again.
        eventually("the listener to run again", Duration::from_secs(10), || {
            hb.stats().listener_connects >= 2
        })
        .await;
        wait_for_subscribers(&redis, 1).await;
        let mut woken = false;
        for attempt in 0..5 {
            if woken_remote_wait(&origin, &http, (addr_a, addr_b), &hb, attempt).await {
                woken = true;
                break;
            }
        }
        assert!(woken, "no remote wait was woken: {:?}", hb.stats());
    });
}

/// `Vary: x-variant`; variant `private` answers with `Set-Cookie`
/// (uncacheable by nature), the others are cacheable.
async fn varying(State(o): State<Origin>, headers: http::HeaderMap) -> Response {
    let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let variant = headers
        .get("x-variant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut res = format!("variant {variant} #{n}").into_response();
    res.headers_mut().insert(
        http::header::VARY,
        http::HeaderValue::from_static("x-variant"),
    );
    if variant == "private" {
        res.headers_mut().insert(
            http::header::SET_COOKIE,
            http::HeaderValue::from_static("session=1"),
        );
    }
    res
}

async fn get_variant(client: &RawClient, addr: SocketAddr, variant: &str) -> Reply {
    let req = http::Request::get(format!("http://{addr}/v"))
        .header(http::header::HOST, support::TEST_HOST)
        .header("x-variant", variant)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.expect("request");
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pass_marker_covers_its_vary_variant_not_the_whole_url() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = default_layer(&redis, "pv:").await;
    let handle = layer.handle();
    let app = Router::new()
        .route("/v", get(varying))
        .with_state(origin.clone())
        .layer(layer);
    let addr = serve(app).await;
    let client = raw_client();
    // The first response for the URL is the private variant's.
    let first = get_variant(&client, addr, "private").await;
    assert_eq!(first.cache_status(), Some("MISS"));
    assert_eq!(handle.stats().pass_markers, 1);
    // That variant passes...
    let again = get_variant(&client, addr, "private").await;
    assert_eq!(again.cache_status(), Some("BYPASS"));
    // ...the others are cached as usual.
    for v in ["en", "de"] {
        assert_eq!(
            get_variant(&client, addr, v).await.cache_status(),
            Some("MISS")
        );
        let hit = get_variant(&client, addr, v).await;
        assert_eq!(hit.cache_status(), Some("HIT"), "variant {v}");
        assert!(hit.text().starts_with(&format!("variant {v} #")));
    }
    assert_eq!(origin.calls(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_wait_with_the_longest_wait_timeout_is_answered() {
    // `wait_timeout(Duration::MAX)` on the path that waits on another
    // process's lease (a deadline computed from it must not overflow).
    let redis = RedisServer::new();
    let origin = Origin::default();
    let a = default_layer(&redis, "wmax:").await;
    let b = default_layer(&redis, "wmax:")
        .await
        .wait_timeout(Duration::MAX)
        .lock_timeout(Duration::MAX);
    let hb = b.handle();
    let addr_a = serve(origin.router().layer(a)).await;
    let addr_b = serve(origin.router().layer(b)).await;
    let http = raw_client();
    let path = "/m?hold";
    let leader = burst(&http, &[addr_a], path, 1).await;
    eventually(
        "A's fill to reach the origin",
        Duration::from_secs(10),
        || origin.calls() == 1,
    )
    .await;
    let waiter = burst(&http, &[addr_b], path, 1).await;
    eventually("B to wait on A's lease", Duration::from_secs(10), || {
        hb.stats().remote_waits == 1
    })
    .await;
    origin.release.notify_one();
    for t in leader.into_iter().chain(waiter) {
        let reply = t.await.unwrap().0.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "origin /m #1");
    }
}
