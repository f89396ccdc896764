//! Stampedes against a real `redis-server` and real HTTP: one origin call per
//! cold key across OS processes, a crashed leader's lease taken over once,
//! in-process single flight with a constant number of Redis calls, fills
//! shielded from cancelled callers, a hot key under load, uncacheable leaders
//! that don't serialize traffic, and pub/sub wake-ups of remote waiters.
//!
//! The cross-process tests re-execute this test binary as server processes:
//! `server_process` is an ignored test that, with `CACHEFENCE_ROLE=server`,
//! serves a fenced axum app until it is killed, printing `PORT=<n>`.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use cachefence::{FenceCache, FenceHandle, FenceLayer};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use redis::aio::ConnectionManager;
use support::procs::Procs;
use support::{Http, RedisServer, Reply, serve, wake_subscribers};
use tokio::sync::Barrier;
use tower::{Layer, ServiceExt};

// ---------------------------------------------------------------------------
// An in-process origin: counts calls and the most calls running at once.
// ---------------------------------------------------------------------------

/// `GET /{*path}` answers `origin <path> #<call number>`. Query parameters:
/// `delay_ms=N` sleeps first, `status=N` answers that status, `cc=V` sets
/// `Cache-Control: V`.
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    fn reset_max_in_flight(&self) {
        self.max_in_flight.store(0, Ordering::SeqCst);
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/{*path}", get(origin_handler))
            .with_state(self.clone())
    }
}

fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == name).then_some(v)
    })
}

async fn origin_handler(State(o): State<Origin>, uri: Uri) -> Response {
    let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let now = o.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    o.max_in_flight.fetch_max(now, Ordering::SeqCst);
    if let Some(ms) = query_param(&uri, "delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    o.in_flight.fetch_sub(1, Ordering::SeqCst);
    let status = query_param(&uri, "status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let mut res = (status, format!("origin {} #{n}", uri.path())).into_response();
    if let Some(cc) = query_param(&uri, "cc") {
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_str(cc).unwrap());
    }
    res
}

/// The Redis timeout of the layers under test. The default (250 ms) counts
/// the time a task waits for a CPU: a burst of 1,000 connections on a busy
/// 2-core machine trips it, the requests fail open to the origin, and the
/// counts below would measure the machine, not the single flight. (That
/// fail-open would itself be a stampede: see the last test.)
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// A layer on `redis` in namespace `ns`, XFetch off unless a test turns it on.
/// The connection's own response timeout is the layer's, not the support
/// code's fast-fail 1 s, so that [`REDIS_TIMEOUT`] is the one that counts.
async fn layer(redis: &RedisServer, ns: &str) -> FenceLayer<ConnectionManager> {
    layer_with(redis, ns, false).await
}

/// [`layer`], with wake-ups when `wake_ups`.
async fn layer_with(
    redis: &RedisServer,
    ns: &str,
    wake_ups: bool,
) -> FenceLayer<ConnectionManager> {
    let config = support::fast_fail_config().set_response_timeout(Some(REDIS_TIMEOUT));
    let conn = redis
        .client()
        .get_connection_manager_with_config(config)
        .await
        .expect("connection manager");
    let cache = FenceCache::builder(conn).redis_timeout(REDIS_TIMEOUT);
    let cache = if wake_ups {
        cache.wake_ups(redis.client())
    } else {
        cache
    };
    cache
        .build()
        .expect("cache")
        .layer()
        .namespace(ns)
        .beta(0.0)
}

/// Serves `origin` behind `layer`; returns the address and the layer's handle.
async fn app(
    origin: &Origin,
    layer: &FenceLayer<ConnectionManager>,
) -> (SocketAddr, FenceHandle<ConnectionManager>) {
    let addr = serve(origin.router().layer(layer.clone())).await;
    (addr, layer.handle())
}
/// Once the fill of `path` has reached the origin, `n` requests for it over
/// HTTP that have joined that fill when this returns.
async fn join_the_fill(
    origin: &Origin,
    handle: &FenceHandle<ConnectionManager>,
    http: &Http,
    addr: SocketAddr,
    path: &'static str,
    n: u64,
) -> Vec<tokio::task::JoinHandle<Reply>> {
    eventually(
        "the fill to reach the origin",
        Duration::from_secs(5),
        || origin.calls() == 1,
    )
    .await;
    let waiters = (0..n)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.get(addr, path).await })
        })
        .collect();
    eventually(
        &format!("{n} requests to join the fill"),
        Duration::from_secs(5),
        || handle.stats().coalesced >= n,
    )
    .await;
    waiters
}

async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `n` wake-up listeners are subscribed (so no wake-up is lost
/// to a subscription that is still being set up).
async fn wait_for_subscribers(redis: &RedisServer, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let count = wake_subscribers(redis);
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {count} of {n} wake-up subscriptions"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The lease keys in the test Redis.
fn leases(redis: &RedisServer) -> Vec<String> {
    redis
        .cli(&["KEYS", "*:lease"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// An HTTP client that reports errors instead of panicking (for requests to a
// process that is killed), with a tally of cache statuses.
// ---------------------------------------------------------------------------

type RawClient = HyperClient<HttpConnector, Full<Bytes>>;

fn raw_client() -> RawClient {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

async fn try_get(client: &RawClient, addr: SocketAddr, path: &str) -> Result<Reply, String> {
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

fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for r in replies {
        *t.entry(r.cache_status().unwrap_or("-").to_owned())
            .or_insert(0) += 1;
    }
    t
}

// ---------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct ProcState {
    conn: redis::aio::MultiplexedConnection,
    delay: Duration,
    name: Arc<str>,
}

/// The origin of a server process: counts its calls in Redis, under
/// `origin_calls:<path>` and `origin_calls:<process name>:<path>`, sleeps
/// `ORIGIN_DELAY_MS`, and names the path.
async fn counted_origin(State(s): State<ProcState>, uri: Uri) -> String {
    let path = uri.path().to_owned();
    let mut conn = s.conn.clone();
    let _: () = redis::pipe()
        .cmd("INCR")
        .arg(format!("origin_calls:{path}"))
        .ignore()
        .cmd("INCR")
        .arg(format!("origin_calls:{}:{path}", s.name))
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("counting the origin call");
    tokio::time::sleep(s.delay).await;
    format!("origin {path}")
}

fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// A server process for the cross-process tests. Does nothing unless
/// `CACHEFENCE_ROLE=server`; then serves until killed. Env: `REDIS_URL`,
/// `NAMESPACE`, `PROC_NAME`, `ORIGIN_DELAY_MS`, `LOCK_TIMEOUT_MS`,
/// `WAIT_TIMEOUT_MS`. Cached paths are under `/c/`; `/stats` (not cached)
/// answers the layer's counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a server process for the cross-process tests, run by them with CACHEFENCE_ROLE=server"]
async fn server_process() {
    if std::env::var("CACHEFENCE_ROLE").as_deref() != Ok("server") {
        eprintln!("server_process: CACHEFENCE_ROLE is not `server`, nothing to do");
        return;
    }
    let url = std::env::var("REDIS_URL").expect("REDIS_URL");
    let ns = std::env::var("NAMESPACE").expect("NAMESPACE");
    let name = std::env::var("PROC_NAME").unwrap_or_else(|_| "server".into());
    let client = redis::Client::open(url.as_str()).expect("REDIS_URL");
    let layer = FenceCache::builder(client.get_connection_manager().await.expect("redis"))
        .redis_timeout(REDIS_TIMEOUT)
        .wake_ups(client.clone())
        .build()
        .expect("cache")
        .layer()
        .namespace(ns)
        .beta(0.0)
        .lock_timeout(env_ms("LOCK_TIMEOUT_MS", 5000))
        .wait_timeout(env_ms("WAIT_TIMEOUT_MS", 5000));
    let handle = layer.handle();
    let state = ProcState {
        conn: client
            .get_multiplexed_async_connection()
            .await
            .expect("redis"),
        delay: env_ms("ORIGIN_DELAY_MS", 50),
        name: Arc::from(name),
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
                        "misses={} coalesced={} fills={} stores={} remote_waits={} wakeups={} wait_timeouts={} redis_calls={}",
                        s.misses,
                        s.coalesced,
                        s.fills,
                        s.stores,
                        s.remote_waits,
                        s.wakeups,
                        s.wait_timeouts,
                        s.redis_calls
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

fn origin_calls(redis: &RedisServer, who_and_path: &str) -> u64 {
    redis
        .cli(&["GET", &format!("origin_calls:{who_and_path}")])
        .parse()
        .unwrap_or(0)
}

async fn proc_stats(client: &RawClient, addr: SocketAddr) -> String {
    try_get(client, addr, "/stats")
        .await
        .map(|r| r.text())
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

// ---------------------------------------------------------------------------
// Cross-process tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_key_hit_by_500_requests_in_4_processes_reaches_the_origin_once() {
    const PROCESSES: usize = 4;
    const REQUESTS: usize = 500;
    const ROUNDS: usize = 20;
    let redis = RedisServer::new();
    let url = redis.url();
    let mut procs = Procs::new("server_process");
    let addrs: Vec<SocketAddr> = (0..PROCESSES)
        .map(|i| {
            procs.spawn(
                &format!("p{i}"),
                &[
                    ("REDIS_URL", &url),
                    ("NAMESPACE", "xp:"),
                    ("ORIGIN_DELAY_MS", "50"),
                ],
            )
        })
        .collect();
    wait_for_subscribers(&redis, PROCESSES as u64).await;
    let client = raw_client();
    let mut totals = BTreeMap::new();
    for round in 0..ROUNDS {
        let path = format!("/c/stampede/{round}");
        let barrier = Arc::new(Barrier::new(REQUESTS));
        let tasks: Vec<_> = (0..REQUESTS)
            .map(|i| {
                let (client, barrier, path) = (client.clone(), barrier.clone(), path.clone());
                let addr = addrs[i % PROCESSES];
                tokio::spawn(async move {
                    barrier.wait().await;
                    try_get(&client, addr, &path).await
                })
            })
            .collect();
        let mut replies = Vec::with_capacity(REQUESTS);
        for task in tasks {
            let reply = task.await.expect("request task").expect("request");
            assert_eq!(reply.status, StatusCode::OK, "round {round}");
            assert_eq!(reply.text(), format!("origin {path}"), "round {round}");
            replies.push(reply);
        }
        assert_eq!(
            origin_calls(&redis, &path),
            1,
            "round {round}: origin calls for {path}; statuses {:?}",
            tally(&replies)
        );
        for (k, v) in tally(&replies) {
            *totals.entry(k).or_insert(0) += v;
        }
    }
    eprintln!("{ROUNDS} rounds x {REQUESTS} requests, cache statuses: {totals:?}");
    for (i, addr) in addrs.iter().enumerate() {
        eprintln!("p{i}: {}", proc_stats(&client, *addr).await);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_mid_fill_loses_its_lease_and_one_other_process_takes_over() {
    const LOCK_MS: u64 = 1000;
    const WAIT_MS: u64 = 3000;
    let redis = RedisServer::new();
    let url = redis.url();
    let (lock, wait) = (LOCK_MS.to_string(), WAIT_MS.to_string());
    let mut procs = Procs::new("server_process");
    for (name, delay) in [("A", "60000"), ("B", "50")] {
        procs.spawn(
            name,
            &[
                ("REDIS_URL", &url),
                ("NAMESPACE", "crash:"),
                ("LOCK_TIMEOUT_MS", &lock),
                ("WAIT_TIMEOUT_MS", &wait),
                ("ORIGIN_DELAY_MS", delay),
            ],
        );
    }
    let (a, b) = (procs.addr("A"), procs.addr("B"));
    wait_for_subscribers(&redis, 2).await;
    let client = raw_client();
    let path = "/c/crash";

    // A takes the lease and hangs in its origin.
    let doomed = {
        let client = client.clone();
        tokio::spawn(async move { try_get(&client, a, path).await })
    };
    // The lease is taken before the origin is called: wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    while leases(&redis).is_empty() || origin_calls(&redis, &format!("A:{path}")) == 0 {
        assert!(
            Instant::now() < deadline,
            "A never took the lease and called its origin"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(origin_calls(&redis, &format!("A:{path}")), 1);

    // 50 requests at B wait on A's lease.
    let started = Instant::now();
    let waiting: Vec<_> = (0..50)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let reply = try_get(&client, b, path).await;
                (reply, started.elapsed())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !proc_stats(&client, b).await.contains("remote_waits=1") {
        assert!(Instant::now() < deadline, "B never waited on A's lease");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // kill -9 A: its lease is no longer renewed and expires by itself.
    procs.kill("A");
    let killed_at = started.elapsed();
    let doomed = doomed.await.expect("task");
    assert!(doomed.is_err(), "A's request can't be answered: {doomed:?}");

    let budget = Duration::from_millis(LOCK_MS + WAIT_MS) + Duration::from_secs(2);
    let mut slowest = Duration::ZERO;
    for task in waiting {
        let (reply, took) = task.await.expect("task");
        let reply = reply.expect("B's request");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), format!("origin {path}"));
        assert!(
            took <= killed_at + budget,
            "answered after {took:?} (A killed at {killed_at:?})"
        );
        slowest = slowest.max(took);
    }
    assert_eq!(
        origin_calls(&redis, &format!("B:{path}")),
        1,
        "B took the lease over once"
    );
    assert_eq!(origin_calls(&redis, path), 2, "A's call and B's");
    // B stored it under the lease it took over: the next request is a hit.
    let next = try_get(&client, b, path).await.expect("request");
    assert_eq!(next.cache_status(), Some("HIT"));
    eprintln!(
        "A killed {killed_at:?} after B's requests started; the slowest of B's 50 was answered after {slowest:?}; B: {}",
        proc_stats(&client, b).await
    );
}

// ---------------------------------------------------------------------------
// In one process
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_requests_in_one_process_share_one_fill_and_a_constant_few_redis_calls() {
    const REQUESTS: usize = 1000;
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = layer(&redis, "one:").await;
    let (addr, handle) = app(&origin, &layer).await;
    let http = Http::new();
    // Warm up: loads the scripts, so the counts below hold no NOSCRIPT
    // retry, and opens the client's connections, so the 1,000 requests
    // below arrive together instead of one connection set-up apart.
    assert_eq!(http.get(addr, "/warm").await.cache_status(), Some("MISS"));
    let raw = raw_client();
    let warm: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let raw = raw.clone();
            tokio::spawn(async move { try_get(&raw, addr, "/warm").await })
        })
        .collect();
    for w in warm {
        let reply = w.await.unwrap().expect("request");
        assert_eq!(reply.cache_status(), Some("HIT"), "{:?}", handle.stats());
    }
    redis.reset_stats();
    let calls_before = handle.stats().redis_calls;
    let origin_before = origin.calls();

    let path = "/single/flight?delay_ms=50";
    let barrier = Arc::new(Barrier::new(REQUESTS));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (raw, barrier) = (raw.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                try_get(&raw, addr, path).await.expect("request")
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.expect("task"));
    }
    let calls = handle.stats().redis_calls - calls_before;
    let stats = handle.stats();
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "origin /single/flight #2");
    }
    eprintln!(
        "{REQUESTS} requests: redis_calls {calls}, hmget {}, evalsha {}, all {:?}; statuses {:?}; {stats:?}",
        redis.command_count("hmget"),
        redis.command_count("evalsha"),
        redis.commandstats(),
        tally(&replies)
    );
    assert_eq!(origin.calls() - origin_before, 1);
    // One HMGET per request (the hit path can't be coalesced), then the
    // one fill: a constant few.
    assert!(calls <= REQUESTS as u64 + 5, "{calls} Redis calls");
    assert!(redis.command_count("evalsha") <= 3);
    assert_eq!(redis.command_count("eval"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_leaders_future_does_not_cancel_the_fill() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = layer(&redis, "shield:").await;
    let (addr, handle) = app(&origin, &layer).await;
    let fence = layer.layer(origin.router());
    let path = "/shielded?delay_ms=1000";

    // The leader: a direct tower call, dropped once the fill has reached the
    // origin and 20 other requests wait on it.
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let leader = tokio::spawn(async move {
        let req = http::Request::get(path)
            .header(http::header::HOST, support::TEST_HOST)
            .body(axum::body::Body::empty())
            .unwrap();
        tokio::select! {
            res = fence.oneshot(req) => Some(res.map(|r| r.status())),
            _ = cancelled => None,
        }
    });
    let http = Http::new();
    let waiters = join_the_fill(&origin, &handle, &http, addr, path, 20).await;
    cancel.send(()).unwrap();
    assert_eq!(
        leader.await.unwrap(),
        None,
        "the leader's future was dropped"
    );

    for w in waiters {
        let reply = w.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "origin /shielded #1");
        assert_eq!(reply.cache_status(), Some("MISS"));
    }
    assert_eq!(origin.calls(), 1);
    let next = http.get(addr, path).await;
    assert_eq!(next.cache_status(), Some("HIT"));
    assert_eq!(next.text(), "origin /shielded #1");
    assert_eq!(handle.stats().stores, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_on_the_leading_request_does_not_cancel_the_fill() {
    use tokio::io::AsyncWriteExt;
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = layer(&redis, "hangup:").await;
    let (addr, handle) = app(&origin, &layer).await;
    let path = "/hangup?delay_ms=1000";

    // A raw HTTP/1.1 request whose connection is closed mid-fill.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n",
                support::TEST_HOST
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let http = Http::new();
    let waiters = join_the_fill(&origin, &handle, &http, addr, path, 20).await;
    drop(stream);

    for w in waiters {
        let reply = w.await.unwrap();
        assert_eq!(reply.text(), "origin /hangup #1");
    }
    assert_eq!(origin.calls(), 1);
    assert_eq!(http.get(addr, path).await.cache_status(), Some("HIT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiter_dropped_mid_wait_does_not_disturb_the_others() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = layer(&redis, "dropwait:").await;
    let (addr, handle) = app(&origin, &layer).await;
    let fence = layer.layer(origin.router());
    let path = "/dropwait?delay_ms=500";
    let http = Http::new();

    let leader = {
        let http = http.clone();
        tokio::spawn(async move { http.get(addr, path).await })
    };
    eventually(
        "the fill to reach the origin",
        Duration::from_secs(5),
        || origin.calls() == 1,
    )
    .await;
    // Joiners, with droppable ones in between.
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for i in 0..30 {
        if i % 3 == 0 {
            let fence = fence.clone();
            let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let req = http::Request::get(path)
                    .header(http::header::HOST, support::TEST_HOST)
                    .body(axum::body::Body::empty())
                    .unwrap();
                tokio::select! {
                    _ = fence.oneshot(req) => false,
                    _ = cancelled => true,
                }
            });
            dropped.push((cancel, task));
        } else {
            let http = http.clone();
            kept.push(tokio::spawn(async move { http.get(addr, path).await }));
        }
    }
    eventually(
        "30 requests to join the fill",
        Duration::from_secs(5),
        || handle.stats().coalesced >= 30,
    )
    .await;
    for (cancel, task) in dropped {
        cancel.send(()).unwrap();
        assert!(task.await.unwrap(), "dropped while waiting");
    }
    let first = leader.await.unwrap();
    assert_eq!(first.text(), "origin /dropwait #1");
    for k in kept {
        let reply = k.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "origin /dropwait #1");
    }
    assert_eq!(origin.calls(), 1);
    assert_eq!(handle.stats().in_flight, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_started_a_remote_wait_may_go_away_while_others_join_it() {
    // Two layers on one Redis are two "processes". B's first request starts
    // B's fill, which waits on A's lease; it is dropped; B's other requests
    // joined that fill and are still answered from A's fill.
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer_a = layer(&redis, "remote-drop:").await;
    let layer_b = layer_with(&redis, "remote-drop:", true).await;
    let (addr_a, _) = app(&origin, &layer_a).await;
    let (addr_b, handle_b) = app(&origin, &layer_b).await;
    let fence_b = layer_b.layer(origin.router());
    wait_for_subscribers(&redis, 1).await;
    let path = "/remote?delay_ms=600";
    let http = Http::new();

    let from_a = {
        let http = http.clone();
        tokio::spawn(async move { http.get(addr_a, path).await })
    };
    eventually(
        "A's fill to reach the origin",
        Duration::from_secs(5),
        || origin.calls() == 1,
    )
    .await;
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let b_leader = tokio::spawn(async move {
        let req = http::Request::get(path)
            .header(http::header::HOST, support::TEST_HOST)
            .body(axum::body::Body::empty())
            .unwrap();
        tokio::select! {
            _ = fence_b.oneshot(req) => false,
            _ = cancelled => true,
        }
    });
    eventually("B to wait on A's lease", Duration::from_secs(5), || {
        handle_b.stats().remote_waits == 1
    })
    .await;
    let joiners: Vec<_> = (0..10)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.get(addr_b, path).await })
        })
        .collect();
    eventually("B's requests to join", Duration::from_secs(5), || {
        handle_b.stats().coalesced >= 10
    })
    .await;
    cancel.send(()).unwrap();
    assert!(b_leader.await.unwrap());

    assert_eq!(from_a.await.unwrap().text(), "origin /remote #1");
    for j in joiners {
        let reply = j.await.unwrap();
        assert_eq!(reply.text(), "origin /remote #1");
    }
    assert_eq!(origin.calls(), 1);
    let stats = handle_b.stats();
    assert_eq!((stats.fills, stats.remote_waits), (0, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hot_key_with_a_short_ttl_under_steady_load_is_refreshed_a_few_times_per_ttl_and_never_misses()
 {
    let secs = if std::env::var("CACHEFENCE_LONG").as_deref() == Ok("1") {
        60
    } else {
        10
    };
    hot_key(1.0, Duration::from_secs(secs)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hot_key_without_xfetch_is_refreshed_through_stale_while_revalidate_and_never_misses() {
    let secs = if std::env::var("CACHEFENCE_LONG").as_deref() == Ok("1") {
        30
    } else {
        5
    };
    hot_key(0.0, Duration::from_secs(secs)).await;
}

/// 16 loops request one key with a 1 s TTL and 1 s grace for `run_for`.
async fn hot_key(beta: f64, run_for: Duration) {
    const LOOPS: usize = 16;
    let ttl = Duration::from_secs(1);
    let redis = RedisServer::new();
    let origin = Origin::default();
    // With XFetch on, early refreshes are part of what is counted.
    let layer = layer(&redis, "hot:")
        .await
        .ttl(ttl)
        .grace(Duration::from_secs(1))
        .beta(beta);
    let (addr, handle) = app(&origin, &layer).await;
    let http = Http::new();
    let path = "/hot?delay_ms=20";

    let first = http.get(addr, path).await;
    assert_eq!(first.cache_status(), Some("MISS"));
    let start = Instant::now();
    let loops: Vec<_> = (0..LOOPS)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move {
                let mut seen = BTreeMap::<String, usize>::new();
                while start.elapsed() < run_for {
                    let reply = http.get(addr, path).await;
                    assert_eq!(reply.status, StatusCode::OK);
                    assert!(reply.text().starts_with("origin /hot #"));
                    *seen
                        .entry(reply.cache_status().unwrap_or("-").to_owned())
                        .or_insert(0) += 1;
                }
                seen
            })
        })
        .collect();
    let mut seen = BTreeMap::<String, usize>::new();
    for l in loops {
        for (k, v) in l.await.unwrap() {
            *seen.entry(k).or_insert(0) += v;
        }
    }
    let elapsed = start.elapsed();
    let periods = elapsed.as_secs_f64() / ttl.as_secs_f64();
    let calls = origin.calls();
    eprintln!(
        "beta {beta}: {elapsed:?} of load: {seen:?}; {calls} origin calls over {periods:.1} TTL periods; {:?}",
        handle.stats()
    );
    let allowed = 3 * periods.ceil() as usize + 2;
    assert!(calls <= allowed, "{calls} origin calls > {allowed}");
    assert!(
        seen.keys().all(|k| k == "HIT" || k == "STALE"),
        "after the first fill only HIT or STALE: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_5xx_is_handed_to_the_waiters_and_the_next_requests_are_coalesced_again() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = layer(&redis, "u500:").await;
    let (addr, handle) = app(&origin, &layer).await;
    let http = Http::new();
    let path = "/fail?delay_ms=300&status=500";

    for round in 1..=2 {
        let before = origin.calls();
        let leader = {
            let http = http.clone();
            tokio::spawn(async move { http.get(addr, path).await })
        };
        eventually(
            "the fill to reach the origin",
            Duration::from_secs(5),
            || origin.calls() == before + 1,
        )
        .await;
        let coalesced = handle.stats().coalesced;
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let http = http.clone();
                tokio::spawn(async move { http.get(addr, path).await })
            })
            .collect();
        eventually(
            "20 requests to join the fill",
            Duration::from_secs(5),
            || handle.stats().coalesced >= coalesced + 20,
        )
        .await;
        for t in std::iter::once(leader).chain(waiters) {
            let reply = t.await.unwrap();
            assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(reply.cache_status(), Some("MISS"));
            // The shared response of the round's one fill.
            assert_eq!(reply.text(), format!("origin /fail #{round}"));
        }
        assert_eq!(origin.calls(), before + 1, "round {round}: one origin call");
    }
    // A transient failure says nothing about the next response: no pass
    // marker, so the second round was coalesced like the first.
    assert_eq!(handle.stats().pass_markers, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uncacheable_by_nature_answer_leaves_a_pass_marker_that_lets_the_next_requests_through()
{
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = layer(&redis, "unostore:").await;
    let (addr, handle) = app(&origin, &layer).await;
    let http = Http::new();
    let path = "/nostore?cc=no-store&delay_ms=300";
    assert_eq!(http.get(addr, path).await.cache_status(), Some("MISS"));
    assert_eq!(handle.stats().pass_markers, 1);

    // The pass marker: the next requests go to the origin at once, side by
    // side, taking no lease.
    redis.reset_stats();
    origin.reset_max_in_flight();
    let before = origin.calls();
    let next: Vec<_> = (0..10)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.get(addr, path).await })
        })
        .collect();
    for n in next {
        let reply = n.await.unwrap();
        assert_eq!(reply.cache_status(), Some("BYPASS"));
    }
    assert_eq!(origin.calls() - before, 10);
    assert!(
        origin.max_in_flight() > 1,
        "the pass requests were serialized"
    );
    assert_eq!(redis.command_count("evalsha"), 0, "no lease was taken");
    assert_eq!(redis.command_count("hmget"), 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_answer_releases_the_waiters_to_the_origin_side_by_side() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = layer(&redis, "upriv:").await;
    let (addr, handle) = app(&origin, &layer).await;
    let http = Http::new();
    let path = "/mine?delay_ms=300&cc=private";

    let barrier = Arc::new(Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (http, barrier) = (http.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let t = Instant::now();
                (http.get(addr, path).await, t.elapsed())
            })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (reply, took) = t.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert!(matches!(reply.cache_status(), Some("MISS" | "BYPASS")));
        // A private response is never handed to another request.
        assert!(bodies.insert(reply.text()), "shared {}", reply.text());
        slowest = slowest.max(took);
    }
    assert_eq!(origin.calls(), 50, "each request called the origin itself");
    assert!(
        origin.max_in_flight() > 1,
        "the waiters were serialized behind the leader's lease"
    );
    // Serialized, 50 calls of 300 ms would take 15 s; released, about two
    // calls' time. Generous: well inside one wait budget (5 s).
    assert!(slowest < Duration::from_secs(5), "slowest {slowest:?}");
    assert_eq!(handle.stats().pass_markers, 1);
    let next = http.get(addr, path).await;
    assert_eq!(next.cache_status(), Some("BYPASS"));
    eprintln!(
        "private: max {} origin calls at once, slowest request {slowest:?}",
        origin.max_in_flight()
    );
}

// ---------------------------------------------------------------------------
// Wake-ups of remote waiters
// ---------------------------------------------------------------------------

/// Layer A fills slowly; layer B (another "process": its own layer state)
/// waits on A's lease. Returns B's stats, the replies, the origin calls
/// and the wake-ups published.
async fn remote_wait(wake_ups: bool) -> (cachefence::Stats, Vec<Reply>, usize, u64) {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer_a = layer_with(&redis, "wake:", true).await;
    let layer_b = layer_with(&redis, "wake:", wake_ups).await;
    let (addr_a, _) = app(&origin, &layer_a).await;
    let (addr_b, handle_b) = app(&origin, &layer_b).await;
    wait_for_subscribers(&redis, if wake_ups { 2 } else { 1 }).await;
    let http = Http::new();
    let path = "/slow?delay_ms=300";
    let from_a = {
        let http = http.clone();
        tokio::spawn(async move { http.get(addr_a, path).await })
    };
    eventually(
        "A's fill to reach the origin",
        Duration::from_secs(5),
        || origin.calls() == 1,
    )
    .await;
    let from_b: Vec<_> = (0..5)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.get(addr_b, path).await })
        })
        .collect();
    let mut replies = vec![from_a.await.unwrap()];
    for b in from_b {
        replies.push(b.await.unwrap());
    }
    (
        handle_b.stats(),
        replies,
        origin.calls(),
        redis.command_count("publish"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_waiter_is_woken_by_the_fill_landing_elsewhere() {
    // A poll of B's (every 5 to 100 ms) can find the entry in the instant
    // between A's store and its wake-up reaching B: then that wait ended
    // by polling. Up to 3 rounds; every one must hold the rest.
    let mut polled = Vec::new();
    for _ in 0..3 {
        let (stats, replies, calls, published) = remote_wait(true).await;
        assert_eq!(calls, 1);
        // B's wait marked A's lease: A's store published one wake-up.
        assert_eq!(published, 1);
        for r in &replies {
            assert_eq!(r.text(), "origin /slow #1");
        }
        assert_eq!(stats.remote_waits, 1, "{stats:?}");
        assert_eq!(stats.fills, 0, "{stats:?}");
        if stats.wakeups >= 1 {
            return;
        }
        polled.push(stats);
    }
    panic!("no remote wait was woken in 3 rounds: {polled:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_wake_ups_a_remote_waiter_still_finds_the_fill_by_polling() {
    let (stats, replies, calls, published) = remote_wait(false).await;
    assert_eq!(calls, 1);
    // B cannot be woken, so it did not mark A's lease: A published nothing.
    assert_eq!(published, 0);
    for r in &replies {
        assert_eq!(r.text(), "origin /slow #1");
    }
    assert_eq!(stats.remote_waits, 1, "{stats:?}");
    assert_eq!(stats.wakeups, 0, "{stats:?}");
}

// ---------------------------------------------------------------------------
// Counters, and single flight while Redis is unreachable
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_that_lands_in_this_process_is_not_counted_as_a_wake_up() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = layer_with(&redis, "ownwake:", true).await;
    let (addr, handle) = app(&origin, &layer).await;
    wait_for_subscribers(&redis, 1).await;
    let http = Http::new();
    for i in 0..20 {
        assert_eq!(
            http.get(addr, &format!("/own/{i}")).await.cache_status(),
            Some("MISS")
        );
    }
    // Give the last notifications time to arrive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = handle.stats();
    assert_eq!(stats.remote_waits, 0, "{stats:?}");
    assert_eq!(stats.wakeups, 0, "nobody waited remotely: {stats:?}");
    // And so the 20 stores published nothing: a store costs no PUBLISH
    // unless a waiter in another process listens.
    assert_eq!(redis.command_count("publish"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn early_refreshes_counts_refreshes_started() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    // A huge beta: every hit of an entry whose fill took time asks for an
    // early refresh.
    let layer = layer(&redis, "early:")
        .await
        .beta(1e9)
        .early_refresh_after(0.0);
    let (addr, handle) = app(&origin, &layer).await;
    let http = Http::new();
    let path = "/early?delay_ms=500";
    assert_eq!(http.get(addr, path).await.cache_status(), Some("MISS"));
    // While the first early refresh runs (500 ms), 10 more hits.
    for _ in 0..10 {
        assert_eq!(http.get(addr, path).await.cache_status(), Some("HIT"));
    }
    eventually("the refresh to land", Duration::from_secs(5), || {
        handle.stats().stores >= 2
    })
    .await;
    let stats = handle.stats();
    assert_eq!(origin.calls(), 2, "one fill, one refresh: {stats:?}");
    assert_eq!(stats.fills, 2, "{stats:?}");
    assert_eq!(
        stats.early_refreshes, 1,
        "one refresh started early: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_unreachable_concurrent_requests_for_a_key_still_share_one_origin_call() {
    let redis = RedisServer::new();
    let origin = Origin::default();
    let layer = FenceCache::builder(redis.connection_manager().await)
        .redis_timeout(Duration::from_millis(100))
        .build()
        .expect("cache")
        .layer()
        .namespace("down:")
        .beta(0.0);
    let (addr, handle) = app(&origin, &layer).await;
    let http = Http::new();
    assert_eq!(http.get(addr, "/warm").await.cache_status(), Some("MISS"));
    // Frozen: every Redis call times out (and the breaker opens).
    redis.pause();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.get(addr, "/down?delay_ms=300").await })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    redis.resume();
    eprintln!(
        "redis paused: {} origin calls for 100 requests, {:?}, {:?}",
        origin.calls() - 1,
        tally(&replies),
        handle.stats()
    );
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK);
    }
    // Promise 1, in-process part: one origin call per key at a time, even
    // when Redis is gone (fail open to a local single flight).
    assert_eq!(origin.calls() - 1, 1);
}
