//! How long after a fill lands are the requests that waited for it in
//! another process answered: pub/sub wake-ups against polling only.
//!
//! Two layers on one Redis stand for two processes (each `FenceLayer::new`
//! has its own in-flight table and wake-up listener). Per iteration, on a
//! fresh key: layer A's request fills it (the origin takes 30 ms); 5 ms
//! later 4 requests reach layer B, whose fill finds A's lease and waits.
//! The measured delay is from A's response being ready (the fill stored and
//! announced) to the last of B's requests being answered.
//!
//! `cargo bench --bench wakeup -- --warm-up-time 1 --measurement-time 3`
//! runs criterion; `WAKEUP_LOAD=1 cargo bench --bench wakeup` instead runs
//! `WAKEUP_RUNS` (default 200) iterations per mode and prints p50/p99.
//! Uses `REDIS_URL` or a throwaway `redis-server`.

#[path = "../examples/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachefence::{Fence, FenceCache, FenceLayer};
use criterion::Criterion;
use http::{Request, Response};
use http_body_util::Full;
use redis::aio::ConnectionManager;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

const ORIGIN: Duration = Duration::from_millis(30);
const B_LATER: Duration = Duration::from_millis(5);
const B_REQUESTS: usize = 4;

type Origin = BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;
type Svc = Fence<Origin, ConnectionManager>;

static KEY: AtomicU64 = AtomicU64::new(0);

fn origin() -> Origin {
    BoxCloneSyncService::new(tower::service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(ORIGIN).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"filled"))))
    }))
}

struct Pair {
    a: Svc,
    b: Svc,
    b_handle: cachefence::FenceHandle<ConnectionManager>,
}

async fn pair(client: &redis::Client, ns: &str, wake_ups: bool) -> Pair {
    let cm = || async { client.get_connection_manager().await.expect("redis") };
    let la = FenceLayer::new(cm().await).namespace(ns).beta(0.0);
    let mut cache = FenceCache::builder(cm().await);
    if wake_ups {
        cache = cache.wake_ups(client.clone());
    }
    let lb = cache
        .build()
        .expect("cache")
        .layer()
        .namespace(ns)
        .beta(0.0);
    let pair = Pair {
        a: la.layer(origin()),
        b: lb.layer(origin()),
        b_handle: lb.handle(),
    };
    // Let B's subscription settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    pair
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

/// One scenario on a fresh key: the delay from A's fill landing to the last
/// of B's waiting requests being answered.
async fn once(p: &Pair) -> Duration {
    let path = format!("/wake/{}", KEY.fetch_add(1, Ordering::Relaxed));
    let waits = p.b_handle.stats().remote_waits;
    let a = {
        let (svc, req) = (p.a.clone(), get(&path));
        tokio::spawn(async move {
            let res = svc.oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200);
            Instant::now()
        })
    };
    tokio::time::sleep(B_LATER).await;
    let bs: Vec<_> = (0..B_REQUESTS)
        .map(|_| {
            let (svc, req) = (p.b.clone(), get(&path));
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                assert_eq!(res.status(), 200);
                Instant::now()
            })
        })
        .collect();
    let landed = a.await.unwrap();
    let mut last = landed;
    for b in bs {
        last = last.max(b.await.unwrap());
    }
    assert_eq!(
        p.b_handle.stats().remote_waits,
        waits + 1,
        "B must wait on A's lease"
    );
    last.saturating_duration_since(landed)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn benches(c: &mut Criterion, client: &redis::Client, ns: &str) {
    let rt = runtime();
    let mut group = c.benchmark_group("landing_to_remote_waiters_served");
    group.sample_size(10);
    for (name, wake_ups) in [("notification", true), ("polling_only", false)] {
        let p = rt.block_on(pair(client, &format!("{ns}{name}:"), wake_ups));
        group.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += once(&p).await;
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn load_run(client: &redis::Client, ns: &str) {
    let runs: usize = std::env::var("WAKEUP_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let rt = runtime();
    println!(
        "landing -> {B_REQUESTS} remote waiters served; origin {} ms, waiters {} ms later; {runs} runs each",
        ORIGIN.as_millis(),
        B_LATER.as_millis()
    );
    println!(
        "| {:<14} | {:>9} | {:>9} | {:>9} | {:>9} | {:>7} |",
        "mode", "p50", "p99", "mean", "max", "woken"
    );
    println!(
        "|{:-<16}|{:->11}|{:->11}|{:->11}|{:->11}|{:->9}|",
        "", "", "", "", "", ""
    );
    for (name, wake_ups) in [("notification", true), ("polling only", false)] {
        let (mut delays, woken) = rt.block_on(async {
            let p = pair(client, &format!("{ns}load:{wake_ups}:"), wake_ups).await;
            let mut delays = Vec::with_capacity(runs);
            for _ in 0..runs {
                delays.push(once(&p).await);
            }
            (delays, p.b_handle.stats().wakeups)
        });
        delays.sort();
        let mean = delays.iter().sum::<Duration>() / runs as u32;
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
        println!(
            "| {:<14} | {:>9} | {:>9} | {:>9} | {:>9} | {:>7} |",
            name,
            ms(percentile(&delays, 0.5)),
            ms(percentile(&delays, 0.99)),
            ms(mean),
            ms(*delays.last().unwrap()),
            woken
        );
    }
}

fn main() {
    let local = common::redis().expect("a Redis");
    let client = redis::Client::open(local.url.as_str()).expect("redis url");
    let ns = format!("wakeup-bench:{:08x}:", rand::random::<u32>());
    if std::env::var("WAKEUP_LOAD").is_ok() {
        load_run(&client, &ns);
    } else {
        let mut c = Criterion::default().configure_from_args();
        benches(&mut c, &client, &ns);
        c.final_summary();
    }
    // Leave nothing behind in a shared Redis.
    if let Ok(mut con) = client.get_connection() {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{ns}*"))
            .query(&mut con)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut con);
        }
    }
    drop(local);
}
