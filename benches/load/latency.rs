//! `--redis-latency`: the latency distribution of the cache's own Redis
//! calls (what `FenceCache::redis_timeout` bounds), to choose its default
//! from: every call the cache sends is timed on its connection (a wrapper
//! around the `HealingConnection` that `FenceCache::from_client` makes),
//! with a 5 s timeout so slow calls are measured, not cut off.
//!
//! ```text
//! cargo bench --bench load -- --redis-latency              # 10 s per phase (about 60 s)
//! cargo bench --bench load -- --redis-latency --secs 30    # longer phases: a better tail
//! cargo bench --bench load -- --redis-latency --no-hog     # the machine as it is only
//! ```
//!
//! Phases, each on the machine as it is and again beside two busy loops
//! (`sh -c 'while :; do :; done'`, one per core of a 2-core machine):
//!
//! - `hits, paced`: 8 tasks, each a hit (one `HMGET`) every 2 ms, over 100
//!   stored keys (4 KiB bodies);
//! - `hits, saturated`: 32 tasks, hits back to back: the app's 2 worker
//!   threads busy, as in a loaded app;
//! - `misses, paced`: 8 tasks, each a new key every 2 ms (instant origin):
//!   the miss's `HMGET`, the lease script, and the store script (the one
//!   carrying the 4 KiB body).
//!
//! Uses `REDIS_URL` if set, else its own `redis-server` (as the harness).
//! The calls are driven through the layer (no HTTP), on an app runtime of 2
//! worker threads; Redis, the app and the busy loops share the machine.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachefence::{FenceCache, HealingConnection};
use http_body_util::{BodyExt, Full};
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tower::{Layer, ServiceExt};

use super::{Error, loadavg, machine, percentile, start_redis};

/// Every call, timed.
type Samples = Arc<Mutex<Vec<Call>>>;

#[derive(Debug, Clone, Copy)]
struct Call {
    kind: &'static str,
    /// When it started, µs since the process's first call.
    at_us: u64,
    us: u32,
    ok: bool,
}

/// The clock calls are placed on (for the seconds with a slow call).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

const HIT: &str = "HMGET";
const STORE: &str = "store script (with the body)";
const SCRIPT: &str = "other script (lease, ...)";
const PIPELINE: &str = "pipeline";
const OTHER: &str = "other command";
const REQUEST: &str = "whole hit through the layer";

/// A connection that times each call the cache makes on it.
#[derive(Clone)]
struct Timed<C> {
    inner: C,
    samples: Samples,
}

fn kind(cmd: &Cmd) -> &'static str {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(b) => Some(b),
        _ => None,
    });
    let name = args.next().unwrap_or_default().to_ascii_uppercase();
    match name.as_slice() {
        b"HMGET" => HIT,
        b"EVALSHA" | b"EVAL" | b"FCALL" => {
            if args.any(|a| a.len() >= 4096) {
                STORE
            } else {
                SCRIPT
            }
        }
        _ => OTHER,
    }
}

fn record(samples: &Samples, kind: &'static str, since: Instant, ok: bool) {
    let us = since.elapsed().as_micros().min(u32::MAX as u128) as u32;
    let at_us = since.saturating_duration_since(epoch()).as_micros() as u64;
    if let Ok(mut s) = samples.lock() {
        s.push(Call {
            kind,
            at_us,
            us,
            ok,
        });
    }
}

impl<C: ConnectionLike + Send> ConnectionLike for Timed<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let kind = kind(cmd);
        Box::pin(async move {
            let started = Instant::now();
            let out = self.inner.req_packed_command(cmd).await;
            record(&self.samples, kind, started, out.is_ok());
            out
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let started = Instant::now();
            let out = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            record(&self.samples, PIPELINE, started, out.is_ok());
            out
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// The one place this mode builds its cache: `from_client`'s connection,
/// timed, wake-ups, and a 5 s timeout (the tail is measured, not cut).
fn cache(
    conn: Timed<HealingConnection>,
    client: redis::Client,
) -> Result<FenceCache<Timed<HealingConnection>>, Error> {
    Ok(FenceCache::builder(conn)
        .namespace("latency:")
        .wake_ups(client)
        .redis_timeout(Duration::from_secs(5))
        .build()?)
}

/// Two busy loops (one per core here), killed on drop.
struct Hog(Vec<Child>);

impl Hog {
    fn start(n: usize) -> Result<Self, Error> {
        let children = (0..n)
            .map(|_| {
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        Ok(Hog(children))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

type Req = http::Request<Full<Bytes>>;
type Res = http::Response<Full<Bytes>>;

#[derive(Debug, Clone, Copy)]
enum Phase {
    HitsPaced,
    HitsSaturated,
    MissesPaced,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::HitsPaced => "hits, paced (8 x 1 per 2 ms)",
            Phase::HitsSaturated => "hits, saturated (32 back to back)",
            Phase::MissesPaced => "misses, paced (8 x 1 per 2 ms)",
        }
    }
}

pub(super) fn run(secs: f64, hog: bool) -> Result<(), Error> {
    let redis = start_redis()?;
    let app_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("app")
        .enable_all()
        .build()?;
    let samples: Samples = Arc::default();
    let client = redis::Client::open(redis.url.as_str())?;
    let svc = app_rt.block_on(async {
        let conn = Timed {
            inner: HealingConnection::connect(client.clone()).await?,
            samples: samples.clone(),
        };
        let body = Bytes::from(vec![b's'; 4 * 1024]);
        let origin = tower::service_fn(move |_req: Req| {
            let body = body.clone();
            async move { Ok::<_, Infallible>(Res::new(Full::new(body))) }
        });
        let layer = cache(conn, client.clone())?
            .layer()
            .ttl(Duration::from_secs(3600));
        Ok::<_, Error>((layer.handle(), layer.layer(origin)))
    })?;
    let (handle, svc) = svc;
    let load_before = loadavg();
    eprintln!(
        "redis latency: {secs:.0} s per phase, redis {}; load average {load_before}",
        redis.url
    );
    // (machine state, phase, calls by kind, the cache's Redis errors and
    // bypasses in the phase).
    type PhaseResult = (String, Phase, BTreeMap<&'static str, Vec<Call>>, (u64, u64));
    let mut results: Vec<PhaseResult> = Vec::new();
    let states: &[bool] = if hog { &[false, true] } else { &[false] };
    let misses = Arc::new(AtomicU64::new(0));
    // The load average at the end of each machine state.
    let mut loads = Vec::new();
    for &hogged in states {
        let _hog = if hogged { Some(Hog::start(2)?) } else { None };
        let state = if hogged {
            "+ 2 busy loops".to_owned()
        } else {
            "as is".to_owned()
        };
        for phase in [Phase::HitsPaced, Phase::HitsSaturated, Phase::MissesPaced] {
            // The hit keys, stored before (their calls not counted).
            app_rt.block_on(async {
                for i in 0..100 {
                    let _ = get(&svc, &format!("/h{i}")).await;
                }
                // A fill's store may still be in flight: let it land.
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
            if let Ok(mut s) = samples.lock() {
                s.clear();
            }
            let stats_before = handle.stats();
            let requests: Samples = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            app_rt.block_on(async {
                let (tasks, pause) = match phase {
                    Phase::HitsPaced | Phase::MissesPaced => (8, Some(Duration::from_millis(2))),
                    Phase::HitsSaturated => (32, None),
                };
                let handles: Vec<_> = (0..tasks)
                    .map(|t| {
                        let (svc, stop, requests, misses) =
                            (svc.clone(), stop.clone(), requests.clone(), misses.clone());
                        tokio::spawn(async move {
                            let mut n = t as u64;
                            while !stop.load(Ordering::Relaxed) {
                                let path = match phase {
                                    Phase::MissesPaced => {
                                        format!("/m{}", misses.fetch_add(1, Ordering::Relaxed))
                                    }
                                    _ => format!("/h{}", n % 100),
                                };
                                n = n
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407)
                                    >> 1;
                                let started = Instant::now();
                                let ok = get(&svc, &path).await;
                                if !matches!(phase, Phase::MissesPaced) {
                                    record(&requests, REQUEST, started, ok);
                                }
                                match pause {
                                    Some(p) => tokio::time::sleep(p).await,
                                    None => tokio::task::yield_now().await,
                                }
                            }
                        })
                    })
                    .collect();
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                stop.store(true, Ordering::Relaxed);
                for h in handles {
                    let _ = h.await;
                }
                // Stores of the last misses land.
                tokio::time::sleep(Duration::from_millis(300)).await;
            });
            let stats = handle.stats();
            let mut by_kind: BTreeMap<&'static str, Vec<Call>> = BTreeMap::new();
            for calls in [&samples, &requests] {
                if let Ok(s) = calls.lock() {
                    for c in s.iter() {
                        by_kind.entry(c.kind).or_default().push(*c);
                    }
                }
            }
            for v in by_kind.values_mut() {
                v.sort_unstable_by_key(|c| c.us);
            }
            eprintln!("{state}: {} done", phase.name());
            results.push((
                state.clone(),
                phase,
                by_kind,
                (
                    stats.redis_errors - stats_before.redis_errors,
                    stats.bypasses - stats_before.bypasses,
                ),
            ));
        }
        loads.push(format!("{state}: {}", loadavg()));
    }
    let load_after = loadavg();
    println!(
        "\ncargo bench --bench load -- --redis-latency --secs {secs}{}: each Redis call of the cache timed on its connection; \
         {}; load average {load_before} -> {load_after} (at the end of each state: {})\n",
        if hog { "" } else { " --no-hog" },
        machine(),
        loads.join(", ")
    );
    println!(
        "| machine | phase | call | calls | errors | p50 ms | p99 ms | p99.9 ms | max ms | > 50 ms | > 100 ms | > 250 ms | > 500 ms | seconds with one > 100 ms | > 250 ms |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (state, phase, by_kind, _) in &results {
        for (kind, v) in by_kind {
            let us: Vec<u32> = v.iter().map(|c| c.us).collect();
            let over = |ms: u32| us.iter().filter(|&&x| x > ms * 1000).count();
            // Distinct seconds (of the calls' starts) with a call over `ms`:
            // about how many stalls a timeout of `ms` would have cut.
            let seconds = |ms: u32| {
                let mut s: Vec<u64> = v
                    .iter()
                    .filter(|c| c.us > ms * 1000)
                    .map(|c| c.at_us / 1_000_000)
                    .collect();
                s.dedup();
                s.sort_unstable();
                s.dedup();
                s.len()
            };
            println!(
                "| {state} | {} | {kind} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {} |",
                phase.name(),
                v.len(),
                v.iter().filter(|c| !c.ok).count(),
                percentile(&us, 0.50),
                percentile(&us, 0.99),
                percentile(&us, 0.999),
                us.last().copied().unwrap_or(0) as f64 / 1000.0,
                over(50),
                over(100),
                over(250),
                over(500),
                seconds(100),
                seconds(250),
            );
        }
    }
    println!(
        "\nthe cache's counters per phase (its timeout is 5 s here: errors are the connection's own):"
    );
    for (state, phase, _, (errors, bypasses)) in &results {
        println!(
            "  {state}, {}: Redis errors {errors}, bypasses {bypasses}",
            phase.name()
        );
    }
    drop(svc);
    drop(handle);
    drop(app_rt);
    drop(redis);
    Ok(())
}

/// One GET through the layer; whether it answered 200 with the body.
async fn get<S, B>(svc: &S, path: &str) -> bool
where
    S: tower::Service<Req, Response = http::Response<B>> + Clone,
    B: hyper::body::Body,
{
    let Ok(req) = http::Request::get(path)
        .header(http::header::HOST, "bench.local")
        .body(Full::new(Bytes::new()))
    else {
        return false;
    };
    let Ok(res) = svc.clone().oneshot(req).await else {
        return false;
    };
    res.status() == http::StatusCode::OK && res.into_body().collect().await.is_ok()
}
