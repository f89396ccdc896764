//! The cache stampede, side by side: 500 concurrent requests at one cold key,
//! spread over 4 app instances sharing one Redis, with an origin that takes
//! 50 ms per call and serves at most 16 calls at a time (think of a database
//! behind a connection pool).
//!
//! 0. the floor: no cache and no pool limit, every request takes the
//!    origin's 50 ms side by side (what 500 HTTP exchanges with a 50 ms
//!    handler cost on this machine);
//! 1. naive cache-aside: `GET` the key; on a miss call the origin and `SET`;
//! 2. cachefence with wake-ups (pub/sub);
//! 3. cachefence polling only.
//!
//! Each instance has its own `FenceLayer::new`, so the instances share
//! nothing but Redis, as separate processes would. Every request goes over
//! real HTTP. Uses `REDIS_URL` (default `redis://127.0.0.1:6379/`) or, if
//! nothing answers there, a throwaway `redis-server` it starts and stops.
//!
//! `cargo run --release --example stampede`

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use cachefence::{FenceCache, FenceHandle};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::{Barrier, Semaphore};

const INSTANCES: usize = 4;
const REQUESTS: usize = 500;
const ORIGIN_DELAY: Duration = Duration::from_millis(50);
const ORIGIN_CAPACITY: usize = 16;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// The expensive thing behind the cache: 50 ms a call, 16 calls at a time.
#[derive(Clone)]
struct Origin {
    calls: Arc<AtomicU64>,
    pool: Arc<Semaphore>,
}

impl Default for Origin {
    fn default() -> Self {
        Self {
            calls: Arc::default(),
            pool: Arc::new(Semaphore::new(ORIGIN_CAPACITY)),
        }
    }
}

impl Origin {
    async fn render(&self) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _conn = self.pool.acquire().await.expect("open pool");
        tokio::time::sleep(ORIGIN_DELAY).await;
        "product 1: a very expensive page".to_owned()
    }
}

#[derive(Clone)]
struct Naive {
    origin: Origin,
    redis: ConnectionManager,
    key: Arc<str>,
}

/// Cache-aside as it is usually written.
async fn naive(State(app): State<Naive>) -> String {
    let mut redis = app.redis.clone();
    if let Ok(Some(hit)) = redis.get::<_, Option<String>>(&*app.key).await {
        return hit;
    }
    let page = app.origin.render().await;
    let _: redis::RedisResult<()> = redis.set_ex(&*app.key, &page, 60).await;
    page
}

async fn fenced(State(origin): State<Origin>) -> String {
    origin.render().await
}

/// `/product/1` behind the cache, `/ping` (uncached) to open connections.
fn router(product: Router) -> Router {
    product.route("/ping", get(|| async { "pong" }))
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

struct Run {
    name: &'static str,
    origin_calls: u64,
    wall: Duration,
    p50: Duration,
    p99: Duration,
    note: String,
}

async fn fetch(client: &HttpClient, addr: SocketAddr, path: &str) -> Result<Bytes, String> {
    // Every instance sees the site's name, as behind a load balancer (the
    // host is part of the cache key).
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, "shop.example")
        .body(Empty::new())
        .map_err(|e| format!("{e}"))?;
    let res = client.request(req).await.map_err(|e| format!("{e}"))?;
    if !res.status().is_success() {
        return Err(format!("status {}", res.status()));
    }
    Ok(res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e}"))?
        .to_bytes())
}

/// Fires `REQUESTS` requests at `/product/1`, round robin over `addrs`, all
/// released at once; returns the wall time and each request's latency.
async fn fire(addrs: &[SocketAddr]) -> (Duration, Vec<Duration>) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // Open the connections first, so the burst measures the cache, not TCP.
    let warm: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (client, addr) = (client.clone(), addrs[i % addrs.len()]);
            tokio::spawn(async move { fetch(&client, addr, "/ping").await })
        })
        .collect();
    for w in warm {
        w.await.expect("task").expect("ping");
    }
    let barrier = Arc::new(Barrier::new(REQUESTS + 1));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (client, barrier, addr) = (client.clone(), barrier.clone(), addrs[i % addrs.len()]);
            tokio::spawn(async move {
                barrier.wait().await;
                let t = Instant::now();
                let body = fetch(&client, addr, "/product/1").await.expect("request");
                assert!(body.starts_with(b"product 1"));
                t.elapsed()
            })
        })
        .collect();
    barrier.wait().await;
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(REQUESTS);
    for t in tasks {
        latencies.push(t.await.expect("task"));
    }
    (start.elapsed(), latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn run(
    name: &'static str,
    origin: &Origin,
    wall: Duration,
    mut lat: Vec<Duration>,
    note: String,
) -> Run {
    lat.sort();
    Run {
        name,
        origin_calls: origin.calls.load(Ordering::SeqCst),
        wall,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        note,
    }
}

async fn naive_run(client: &redis::Client, ns: &str) -> Run {
    let origin = Origin::default();
    let mut addrs = Vec::new();
    for _ in 0..INSTANCES {
        let state = Naive {
            origin: origin.clone(),
            redis: client.get_connection_manager().await.expect("redis"),
            key: Arc::from(format!("{ns}naive:/product/1")),
        };
        addrs.push(
            serve(router(
                Router::new()
                    .route("/product/1", get(naive))
                    .with_state(state),
            ))
            .await,
        );
    }
    let (wall, lat) = fire(&addrs).await;
    run("naive cache-aside", &origin, wall, lat, String::new())
}

async fn fenced_run(client: &redis::Client, ns: &str, wake_ups: bool) -> Run {
    let origin = Origin::default();
    let mut addrs = Vec::new();
    let mut handles: Vec<FenceHandle<ConnectionManager>> = Vec::new();
    for _ in 0..INSTANCES {
        let mut cache = FenceCache::builder(client.get_connection_manager().await.expect("redis"));
        if wake_ups {
            cache = cache.wake_ups(client.clone());
        }
        let layer = cache
            .build()
            .expect("cache")
            .layer()
            .namespace(format!("{ns}{}:", if wake_ups { "wake" } else { "poll" }));
        handles.push(layer.handle());
        let product = Router::new()
            .route("/product/1", get(fenced))
            .with_state(origin.clone())
            .layer(layer);
        addrs.push(serve(router(product)).await);
    }
    if wake_ups {
        // Let the subscriptions settle, as they would in a running service.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (wall, lat) = fire(&addrs).await;
    let (mut remote, mut woken, mut coalesced) = (0, 0, 0);
    for h in &handles {
        let s = h.stats();
        remote += s.remote_waits;
        woken += s.wakeups;
        coalesced += s.coalesced;
    }
    let note = format!("{coalesced} coalesced, {remote} remote waits, {woken} woken");
    let name = if wake_ups {
        "cachefence, wake-ups (pub/sub)"
    } else {
        "cachefence, polling only"
    };
    run(name, &origin, wall, lat, note)
}

/// The floor: no cache, and an origin with no pool limit, so every one of
/// the 500 requests takes the origin's 50 ms side by side. What a cached
/// arm's latency adds over this is the cache's (and its one origin call's)
/// doing; the rest is 500 HTTP exchanges on this machine.
async fn floor_run() -> Run {
    let origin = Origin {
        pool: Arc::new(Semaphore::new(REQUESTS)),
        ..Origin::default()
    };
    let mut addrs = Vec::new();
    for _ in 0..INSTANCES {
        let product = Router::new()
            .route("/product/1", get(fenced))
            .with_state(origin.clone());
        addrs.push(serve(router(product)).await);
    }
    let (wall, lat) = fire(&addrs).await;
    run(
        "floor: no cache, no pool limit",
        &origin,
        wall,
        lat,
        String::new(),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let local = common::redis()?;
    let client = redis::Client::open(local.url.as_str())?;
    let ns = format!("stampede-demo:{:08x}:", rand::random::<u32>());
    println!(
        "{REQUESTS} concurrent requests at one cold key, over {INSTANCES} app instances sharing one Redis;\norigin: {} ms a call, {ORIGIN_CAPACITY} calls at a time\n",
        ORIGIN_DELAY.as_millis()
    );
    let runs = [
        floor_run().await,
        naive_run(&client, &ns).await,
        fenced_run(&client, &ns, true).await,
        fenced_run(&client, &ns, false).await,
    ];
    println!(
        "| {:<30} | {:>12} | {:>9} | {:>9} | {:>9} |",
        "", "origin calls", "wall", "p50", "p99"
    );
    println!(
        "|{:-<32}|{:->14}|{:->11}|{:->11}|{:->11}|",
        "", "", "", "", ""
    );
    for r in &runs {
        println!(
            "| {:<30} | {:>12} | {:>9} | {:>9} | {:>9} |",
            r.name,
            r.origin_calls,
            ms(r.wall),
            ms(r.p50),
            ms(r.p99)
        );
    }
    println!();
    for r in runs.iter().filter(|r| !r.note.is_empty()) {
        println!("{}: {}", r.name, r.note);
    }
    // Leave nothing behind in a shared Redis.
    let mut con = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = con.keys(format!("{ns}*")).await?;
    if !keys.is_empty() {
        let _: () = con.del(keys).await?;
    }
    drop(local);
    Ok(())
}
