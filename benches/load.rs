//! The load harness: the same axum app over real HTTP/1.1 keep-alive
//! connections, with no cache, with a hand-written cache-aside layer
//! (`naive`: one `GET`, and `SET PX` on a miss), with cachefence (`fence`)
//! and with cachefence and a 64 MiB near cache (`fence+near`), side by side
//! in one run, the arms alternated.
//!
//! ```text
//! cargo bench --bench load                 # the full run (about 90 s), writes docs/performance.svg
//! cargo bench --bench load -- --quick      # one round of each arm (about 40 s)
//! cargo bench --bench load -- --smoke      # a few seconds in all (CI)
//! ```
//!
//! Separate measurements (instead of the workloads): `--cluster N` (hits
//! on one Redis vs an N-primary cluster, and memory per entry; feature
//! `cluster-async`; `load/scale.rs`; with near caches too), `--wait-cost` (what
//! `replicated_fences` adds to an invalidation; `load/wait.rs`),
//! `--redis-latency` (the latency of each of the cache's Redis calls, on
//! the machine as it is and beside busy loops: what `redis_timeout`'s
//! default is chosen from; `load/latency.rs`).
//!
//! Options: `--svg PATH` (where the chart goes; `--no-svg` for none),
//! `--conc N` (connections, default 50), `--reps N`, `--secs S` (seconds
//! per measured run), `--only WORKLOAD[,WORKLOAD]` (`hits`, `zipf`, `cold`,
//! `large`), `--arms ARM[,ARM]`, `--split-large` (the `fence` arm serves the
//! 1 MiB route through a cache of its own, with its own Redis connection:
//! tells head-of-line blocking on the one connection from CPU contention).
//!
//! `CACHEFENCE_ONE_TIMER=1`: the cachefence arms' connection managers get no
//! response timeout of their own (`set_response_timeout(None)`): the cache
//! bounds every call with its `redis_timeout` already, so each call then
//! runs under one timer instead of two.
//!
//! Uses `REDIS_URL` if set, else starts its own `redis-server` on a free
//! port (killed at the end). The app (its Tokio runtime, 2 worker threads)
//! and the load generator (another runtime) share this process; the app's
//! CPU time is read from its own threads (`/proc/self/task/<tid>/schedstat`),
//! Redis's from `INFO cpu` and `INFO commandstats` deltas, so both are per
//! request of the measured window.
//!
//! Workloads:
//!
//! - `hits`: 10 keys, all stored before the window; instant origin, 4 KiB
//!   bodies, TTL 60 s.
//! - `zipf`: Zipf (s = 1.0) over 10,000 keys, TTL 2 s, origin 20 ms, 4 KiB;
//!   every run starts cold (its own keys).
//! - `cold`: a stampede: every connection asks for the same cold key at
//!   once, one new key per round; origin 50 ms. Shows the origin calls per
//!   key and the latency over the origin's.
//! - `large`: 4 KiB hits alone, then beside 1 MiB hits (a sixth of the
//!   connections): the small hits' p99 in both.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::middleware;
use axum::routing::get;
use bytes::Bytes;
use cachefence::{FenceCache, FenceHandle};
use http::{StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use redis::aio::ConnectionManager;
use tokio::runtime::Runtime;

use app::{Naive, Origin, large, naive, small};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[path = "load/app.rs"]
mod app;
#[path = "load/latency.rs"]
mod latency;
#[cfg(feature = "cluster-async")]
#[path = "load/scale.rs"]
mod scale;
#[path = "load/wait.rs"]
mod wait;

// ---------------------------------------------------------------- options

#[derive(Debug, Clone)]
struct Opts {
    smoke: bool,
    conc: usize,
    reps: usize,
    secs: f64,
    warmup: Duration,
    cold_rounds: usize,
    svg: Option<PathBuf>,
    only: Vec<String>,
    arms: Vec<Arm>,
    /// `--split-large`: the fence arm serves `/big` through a cache of its
    /// own (its own Redis connection), as an app can do per route.
    split_large: bool,
}

impl Opts {
    fn parse() -> Result<Self, Error> {
        let mut opts = Opts {
            smoke: false,
            conc: 50,
            reps: 3,
            secs: 2.0,
            warmup: Duration::from_millis(300),
            cold_rounds: 20,
            svg: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/docs/performance.svg"
            ))),
            only: Vec::new(),
            arms: Arm::ALL.to_vec(),
            split_large: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--smoke" => {
                    opts.smoke = true;
                    opts.reps = 1;
                    opts.secs = 0.4;
                    opts.warmup = Duration::from_millis(100);
                    opts.cold_rounds = 2;
                    opts.conc = 16;
                    opts.svg = Some(PathBuf::from(concat!(
                        env!("CARGO_TARGET_TMPDIR"),
                        "/load-smoke.svg"
                    )));
                }
                "--quick" => {
                    opts.reps = 1;
                    opts.cold_rounds = 10;
                }
                "--svg" => opts.svg = Some(PathBuf::from(value()?)),
                "--no-svg" => opts.svg = None,
                "--split-large" => opts.split_large = true,
                "--conc" => opts.conc = value()?.parse()?,
                "--reps" => opts.reps = value()?.parse()?,
                "--secs" => opts.secs = value()?.parse()?,
                "--only" => opts.only = value()?.split(',').map(str::to_owned).collect(),
                "--arms" => {
                    opts.arms = value()?
                        .split(',')
                        .map(|a| {
                            Arm::ALL
                                .into_iter()
                                .find(|x| x.name() == a)
                                .ok_or_else(|| format!("unknown arm {a}"))
                        })
                        .collect::<Result<_, _>>()?;
                }
                // `cargo bench` passes `--bench`; criterion-style filters
                // are ignored.
                _ => {}
            }
        }
        opts.conc = opts.conc.max(2);
        opts.reps = opts.reps.max(1);
        Ok(opts)
    }

    fn runs(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }
}

// ---------------------------------------------------------------- arms

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    NoCache,
    Naive,
    Fence,
    /// cachefence with a 64 MiB near cache.
    FenceNear,
}

impl Arm {
    const ALL: [Arm; 4] = [Arm::NoCache, Arm::Naive, Arm::Fence, Arm::FenceNear];

    fn name(self) -> &'static str {
        match self {
            Arm::NoCache => "no-cache",
            Arm::Naive => "naive",
            Arm::Fence => "fence",
            Arm::FenceNear => "fence+near",
        }
    }
}

// ---------------------------------------------------------------- redis

struct Redis {
    url: String,
    child: Option<Child>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_redis() -> Result<Redis, Error> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Ok(Redis { url, child: None });
    }
    let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("redis-server could not be started ({e}); install it or set REDIS_URL")
        })?;
    let redis = Redis {
        url: format!("redis://127.0.0.1:{port}/"),
        child: Some(child),
    };
    let client = redis::Client::open(redis.url.as_str())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200))
            && redis::cmd("PING").query::<String>(&mut c).is_ok()
        {
            return Ok(redis);
        }
        if Instant::now() > deadline {
            return Err("redis-server did not answer PING".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What Redis has done so far: commands executed (those inside scripts
/// included, `INFO` itself not) and CPU seconds.
#[derive(Debug, Clone, Copy, Default)]
struct RedisCounters {
    commands: u64,
    cpu_s: f64,
}

async fn redis_counters(conn: &mut ConnectionManager) -> Result<RedisCounters, Error> {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let cpu: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let mut out = RedisCounters::default();
    for line in stats.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        if name == "info" {
            continue;
        }
        if let Some(calls) = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|c| c.parse::<u64>().ok())
        {
            out.commands += calls;
        }
    }
    for line in cpu.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            out.cpu_s += v.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- app CPU

/// The threads of the app's runtime, and their CPU time.
#[derive(Default)]
struct AppThreads {
    tids: Mutex<Vec<u32>>,
}

impl AppThreads {
    fn register(&self) {
        let tid = std::fs::read_to_string("/proc/thread-self/stat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        if let Some(tid) = tid {
            self.tids.lock().unwrap().push(tid);
        }
    }

    /// CPU time of every app thread so far, in ns.
    fn cpu_ns(&self) -> u64 {
        let tids = self.tids.lock().unwrap().clone();
        tids.iter()
            .filter_map(|tid| {
                let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
                s.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

// ---------------------------------------------------------------- the app

/// One arm's app, listening.
struct App {
    arm: Arm,
    addr: SocketAddr,
    origin: Arc<Origin>,
    handle: Option<FenceHandle<ConnectionManager>>,
    naive_calls: Arc<AtomicU64>,
}

impl App {
    /// Redis round trips the app made so far.
    fn redis_calls(&self) -> u64 {
        match &self.handle {
            Some(h) => h.stats().redis_calls,
            None => self.naive_calls.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct AppSettings {
    latency: Duration,
    ttl: Duration,
    split_large: bool,
}

async fn start_app(
    arm: Arm,
    settings: AppSettings,
    redis_url: &str,
    tag: &str,
) -> Result<App, Error> {
    let origin = Origin::new(settings.latency);
    let client = redis::Client::open(redis_url)?;
    let mut routes = Router::new().route("/k/{id}", get(small));
    routes = if arm == Arm::Fence && settings.split_large {
        let big = FenceCache::builder(client.get_connection_manager().await?)
            .wake_ups(client.clone())
            .build()?
            .layer()
            .namespace(format!("{}-big-{tag}:", arm.name()))
            .ttl(settings.ttl)
            .body_limit(2 * 1024 * 1024);
        routes.route("/big/{id}", get(large).layer(big))
    } else {
        routes.route("/big/{id}", get(large))
    };
    let routes = routes.with_state(origin.clone());
    let naive_calls = Arc::new(AtomicU64::new(0));
    let mut handle = None;
    let app = match arm {
        Arm::NoCache => routes,
        Arm::Naive => {
            let state = Naive {
                redis: client.get_connection_manager().await?,
                ttl_ms: settings.ttl.as_millis() as u64,
                prefix: Arc::from(format!("naive-{tag}:")),
                calls: naive_calls.clone(),
            };
            routes.layer(middleware::from_fn_with_state(state, naive))
        }
        Arm::Fence | Arm::FenceNear => {
            let conn = if std::env::var_os("CACHEFENCE_ONE_TIMER").is_some_and(|v| v == "1") {
                let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(None);
                client.get_connection_manager_with_config(config).await?
            } else {
                client.get_connection_manager().await?
            };
            let cache = FenceCache::builder(conn).wake_ups(client.clone());
            let cache = if arm == Arm::FenceNear {
                cache.near_cache(64 << 20)
            } else {
                cache
            };
            let fence = cache
                .build()?
                .layer()
                .namespace(format!("{}-{tag}:", arm.name()))
                .ttl(settings.ttl)
                .body_limit(2 * 1024 * 1024);
            handle = Some(fence.handle());
            routes.layer(fence)
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(App {
        arm,
        addr,
        origin,
        handle,
        naive_calls,
    })
}

// ---------------------------------------------------------------- client

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one GET and reads the whole body: its latency, or `None` on any
/// error or a status other than 200.
async fn get_once(sender: &mut Sender, path: &str) -> Option<Duration> {
    let req = http::Request::get(path)
        .header(header::HOST, "bench.local")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let started = Instant::now();
    sender.ready().await.ok()?;
    let res = sender.send_request(req).await.ok()?;
    let ok = res.status() == StatusCode::OK;
    res.into_body().collect().await.ok()?;
    ok.then(|| started.elapsed())
}

/// A tiny xorshift: the load generator's choices, without a shared RNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf over ranks 1..=n: the cumulative distribution, searched.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf(cdf)
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }
}

/// What the load generator asks for.
#[derive(Clone)]
enum Pattern {
    /// `/k/h{0..n}`.
    Uniform(usize),
    /// `/k/z{run}-{rank}`.
    Zipf(Arc<Zipf>, u64),
    /// `/big/b{0..n}`.
    Large(usize),
}

impl Pattern {
    fn path(&self, rng: &mut Rng) -> String {
        match self {
            Pattern::Uniform(n) => format!("/k/h{}", rng.next() as usize % n),
            Pattern::Zipf(z, run) => format!("/k/z{run}-{}", z.sample(rng)),
            Pattern::Large(n) => format!("/big/b{}", rng.next() as usize % n),
        }
    }
}

#[derive(Default)]
struct Recorded {
    latencies_us: Vec<u32>,
    errors: u64,
}

/// Runs `conns` keep-alive connections asking for `pattern` until
/// `end`; records what completes while `measuring` is set.
async fn load(
    addr: SocketAddr,
    conns: usize,
    pattern: Pattern,
    measuring: Arc<AtomicBool>,
    end: Instant,
    seed: u64,
) -> Recorded {
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let pattern = pattern.clone();
            let measuring = measuring.clone();
            tokio::spawn(async move {
                let mut rec = Recorded::default();
                let mut rng =
                    Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((i as u64 + 1) * 7919));
                let mut sender = None;
                while Instant::now() < end {
                    let s = match sender.as_mut() {
                        Some(s) => s,
                        None => match connect(addr).await {
                            Ok(s) => sender.insert(s),
                            Err(_) => {
                                rec.errors += 1;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let path = pattern.path(&mut rng);
                    let result = get_once(s, &path).await;
                    let counted = measuring.load(Ordering::Relaxed);
                    match result {
                        Some(lat) if counted => rec
                            .latencies_us
                            .push(lat.as_micros().min(u32::MAX as u128) as u32),
                        Some(_) => {}
                        None => {
                            if counted {
                                rec.errors += 1;
                            }
                            sender = None;
                        }
                    }
                }
                rec
            })
        })
        .collect();
    let mut all = Recorded::default();
    for t in tasks {
        if let Ok(rec) = t.await {
            all.latencies_us.extend(rec.latencies_us);
            all.errors += rec.errors;
        }
    }
    all
}

// ---------------------------------------------------------------- samples

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    app_cpu_us: f64,
    redis_calls: f64,
    redis_cmds: f64,
    redis_cpu_us: f64,
    origin_calls: f64,
    errors: f64,
    requests: f64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// Counters read at the start and at the end of a measured window.
struct Snapshot {
    at: Instant,
    app_cpu_ns: u64,
    redis: RedisCounters,
    redis_calls: u64,
    origin_calls: u64,
}

struct Meter {
    threads: Arc<AppThreads>,
    conn: ConnectionManager,
}

impl Meter {
    async fn snapshot(&mut self, app: &App) -> Snapshot {
        // The app's own counters first (no await between them), then
        // Redis's.
        let at = Instant::now();
        let app_cpu_ns = self.threads.cpu_ns();
        let redis_calls = app.redis_calls();
        let origin_calls = app.origin.calls.load(Ordering::Relaxed);
        Snapshot {
            at,
            app_cpu_ns,
            redis: redis_counters(&mut self.conn).await.unwrap_or_default(),
            redis_calls,
            origin_calls,
        }
    }
}

fn sample_of(a: &Snapshot, b: &Snapshot, mut rec: Recorded, window: Duration) -> Sample {
    rec.latencies_us.sort_unstable();
    let n = rec.latencies_us.len().max(1) as f64;
    let secs = window.as_secs_f64().max(1e-3);
    Sample {
        rps: rec.latencies_us.len() as f64 / secs,
        p50_ms: percentile(&rec.latencies_us, 0.50),
        p99_ms: percentile(&rec.latencies_us, 0.99),
        p999_ms: percentile(&rec.latencies_us, 0.999),
        app_cpu_us: (b.app_cpu_ns - a.app_cpu_ns) as f64 / 1000.0 / n,
        redis_calls: (b.redis_calls - a.redis_calls) as f64 / n,
        // Minus the harness's own INFO (the second one of the first
        // snapshot is counted).
        redis_cmds: (b.redis.commands.saturating_sub(a.redis.commands + 1)) as f64 / n,
        redis_cpu_us: (b.redis.cpu_s - a.redis.cpu_s) * 1e6 / n,
        origin_calls: (b.origin_calls - a.origin_calls) as f64,
        errors: rec.errors as f64,
        requests: rec.latencies_us.len() as f64,
    }
}

/// The median of every field over the repetitions.
fn median(samples: &[Sample]) -> Sample {
    let med = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            0.0
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        }
    };
    Sample {
        rps: med(|s| s.rps),
        p50_ms: med(|s| s.p50_ms),
        p99_ms: med(|s| s.p99_ms),
        p999_ms: med(|s| s.p999_ms),
        app_cpu_us: med(|s| s.app_cpu_us),
        redis_calls: med(|s| s.redis_calls),
        redis_cmds: med(|s| s.redis_cmds),
        redis_cpu_us: med(|s| s.redis_cpu_us),
        origin_calls: med(|s| s.origin_calls),
        errors: med(|s| s.errors),
        requests: med(|s| s.requests),
    }
}

// ---------------------------------------------------------------- workloads

struct Harness {
    opts: Opts,
    app_rt: Runtime,
    threads: Arc<AppThreads>,
    redis_url: String,
    meter: Meter,
    run: u64,
    /// workload -> arm -> samples
    results: BTreeMap<&'static str, Vec<(Arm, Vec<Sample>)>>,
    /// The `large` workload: arm -> (small alone, small beside large) p99s.
    large: Vec<(Arm, Vec<(f64, f64)>)>,
}

impl Harness {
    fn apps(&self, settings: AppSettings, workload: &str) -> Result<Vec<App>, Error> {
        let url = self.redis_url.clone();
        let arms = self.opts.arms.clone();
        let tag = format!("{workload}-{}", std::process::id());
        self.app_rt.block_on(async move {
            let mut apps = Vec::new();
            for arm in arms {
                apps.push(start_app(arm, settings, &url, &tag).await?);
            }
            Ok(apps)
        })
    }

    fn secs(&self) -> Duration {
        Duration::from_secs_f64(self.opts.secs)
    }

    /// One measured window of `conns` connections on `pattern`.
    async fn window(&mut self, app: &App, conns: usize, pattern: Pattern) -> Sample {
        let from = Instant::now() + self.opts.warmup;
        let end = from + self.secs();
        self.run += 1;
        let seed = self.run;
        let measuring = Arc::new(AtomicBool::new(false));
        let generator = tokio::spawn(load(app.addr, conns, pattern, measuring.clone(), end, seed));
        tokio::time::sleep_until(from.into()).await;
        let a = self.meter.snapshot(app).await;
        measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep_until(end.into()).await;
        measuring.store(false, Ordering::Relaxed);
        let window = end.saturating_duration_since(a.at);
        let rec = generator.await.unwrap_or_default();
        let b = self.meter.snapshot(app).await;
        sample_of(&a, &b, rec, window)
    }

    /// Requests every key once, so the window measures hits.
    async fn warm(app: &App, paths: impl Iterator<Item = String>) {
        let Ok(mut s) = connect(app.addr).await else {
            return;
        };
        for p in paths {
            let _ = get_once(&mut s, &p).await;
        }
    }

    fn record(&mut self, workload: &'static str, arm: Arm, sample: Sample) {
        let per = self.results.entry(workload).or_default();
        match per.iter_mut().find(|(a, _)| *a == arm) {
            Some((_, v)) => v.push(sample),
            None => per.push((arm, vec![sample])),
        }
    }

    /// The arms in the order of repetition `rep` (rotated, so no arm always
    /// runs first or last).
    fn order(n: usize, rep: usize) -> impl Iterator<Item = usize> {
        (0..n).map(move |i| (i + rep) % n)
    }

    async fn hits(&mut self, apps: &[App]) {
        for app in apps {
            Self::warm(app, (0..10).map(|i| format!("/k/h{i}"))).await;
        }
        for rep in 0..self.opts.reps {
            for i in Self::order(apps.len(), rep) {
                let s = self
                    .window(&apps[i], self.opts.conc, Pattern::Uniform(10))
                    .await;
                self.record("hits", apps[i].arm, s);
            }
        }
    }

    async fn zipf(&mut self, apps: &[App]) {
        let zipf = Arc::new(Zipf::new(10_000, 1.0));
        for rep in 0..self.opts.reps {
            for i in Self::order(apps.len(), rep) {
                let run = self.run;
                let s = self
                    .window(&apps[i], self.opts.conc, Pattern::Zipf(zipf.clone(), run))
                    .await;
                self.record("zipf", apps[i].arm, s);
            }
        }
    }

    /// Rounds of `conc` requests at one cold key at once.
    async fn cold(&mut self, apps: &[App]) {
        for rep in 0..self.opts.reps {
            for i in Self::order(apps.len(), rep) {
                let app = &apps[i];
                let mut senders = Vec::new();
                for _ in 0..self.opts.conc {
                    if let Ok(s) = connect(app.addr).await {
                        senders.push(s);
                    }
                }
                self.run += 1;
                let run = self.run;
                let a = self.meter.snapshot(app).await;
                let mut rec = Recorded::default();
                for round in 0..self.opts.cold_rounds {
                    let path = format!("/k/c{run}-{round}");
                    let results = futures_util::future::join_all(
                        senders.iter_mut().map(|s| get_once(s, &path)),
                    )
                    .await;
                    for r in results {
                        match r {
                            Some(l) => rec.latencies_us.push(l.as_micros() as u32),
                            None => rec.errors += 1,
                        }
                    }
                }
                let b = self.meter.snapshot(app).await;
                let window = b.at.duration_since(a.at);
                let mut s = sample_of(&a, &b, rec, window);
                // Per cold key.
                s.origin_calls /= self.opts.cold_rounds as f64;
                self.record("cold", app.arm, s);
            }
        }
    }

    /// 4 KiB hits alone, then beside 1 MiB hits.
    async fn large(&mut self, apps: &[App]) {
        let big = (self.opts.conc / 6).max(1);
        let small = self.opts.conc - big;
        for app in apps {
            Self::warm(
                app,
                (0..10)
                    .map(|i| format!("/k/h{i}"))
                    .chain((0..2).map(|i| format!("/big/b{i}"))),
            )
            .await;
        }
        for rep in 0..self.opts.reps {
            for i in Self::order(apps.len(), rep) {
                let app = &apps[i];
                if app.arm == Arm::NoCache {
                    continue;
                }
                let alone = self.window(app, small, Pattern::Uniform(10)).await;
                let end = Instant::now() + self.opts.warmup + self.secs();
                let all = Arc::new(AtomicBool::new(true));
                let bigs = tokio::spawn(load(app.addr, big, Pattern::Large(2), all, end, 99));
                let beside = self.window(app, small, Pattern::Uniform(10)).await;
                let _ = bigs.await;
                match self.large.iter().position(|(a, _)| *a == app.arm) {
                    Some(at) => self.large[at].1.push((alone.p99_ms, beside.p99_ms)),
                    None => self
                        .large
                        .push((app.arm, vec![(alone.p99_ms, beside.p99_ms)])),
                }
            }
        }
    }
}

// ---------------------------------------------------------------- output

fn table(results: &BTreeMap<&'static str, Vec<(Arm, Vec<Sample>)>>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | arm | req/s | p50 ms | p99 ms | p99.9 ms | app CPU µs/req | Redis calls/req | Redis cmds/req | Redis CPU µs/req | origin calls | errors |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for workload in ["hits", "zipf", "cold"] {
        let Some(per) = results.get(workload) else {
            continue;
        };
        for (arm, samples) in per {
            let m = median(samples);
            let origin = if workload == "cold" {
                format!("{:.1}/key", m.origin_calls)
            } else {
                format!("{:.0}", m.origin_calls)
            };
            let _ = writeln!(
                out,
                "| {workload} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {:.1} | {origin} | {:.0} |",
                arm.name(),
                m.rps,
                m.p50_ms,
                m.p99_ms,
                m.p999_ms,
                m.app_cpu_us,
                m.redis_calls,
                m.redis_cmds,
                m.redis_cpu_us,
                m.errors,
            );
        }
    }
    out
}

fn large_table(large: &[(Arm, Vec<(f64, f64)>)]) -> String {
    let mut out = String::new();
    if large.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "| arm | 4 KiB p99 alone ms | 4 KiB p99 beside 1 MiB ms | ratio |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (arm, pairs) in large {
        let med = |f: fn(&(f64, f64)) -> f64| {
            let mut v: Vec<f64> = pairs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (alone, beside) = (med(|p| p.0), med(|p| p.1));
        let _ = writeln!(
            out,
            "| {} | {alone:.2} | {beside:.2} | {:.2}x |",
            arm.name(),
            beside / alone.max(1e-9)
        );
    }
    out
}

/// A hand-written SVG of three panels: req/s and p99 per arm and workload,
/// and the origin calls per cold key.
fn svg(results: &BTreeMap<&'static str, Vec<(Arm, Vec<Sample>)>>, caption: &str) -> String {
    const COLORS: [&str; 4] = ["#9e9e9e", "#e8a33d", "#2f6db3", "#3aa655"];
    let arm_color = |arm: Arm| COLORS[Arm::ALL.iter().position(|a| *a == arm).unwrap_or(0)];
    let (pw, ph) = (300.0_f64, 220.0_f64);
    let (left, top, bottom) = (55.0, 40.0, 40.0);
    let mut out = String::new();
    let width = 3.0 * pw + 40.0;
    let height = ph + top + bottom + 40.0;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    type Panel<'a> = (&'a str, &'a [&'a str], fn(&Sample) -> f64, &'a str);
    let panels: [Panel; 3] = [
        (
            "requests per second (higher is better)",
            &["hits", "zipf"],
            |s| s.rps,
            "{:.0}",
        ),
        (
            "p99 latency, ms (lower is better)",
            &["hits", "zipf"],
            |s| s.p99_ms,
            "{:.1}",
        ),
        (
            "origin calls per cold key (stampede)",
            &["cold"],
            |s| s.origin_calls,
            "{:.0}",
        ),
    ];
    for (p, (title, workloads, value, _)) in panels.iter().enumerate() {
        let x0 = 20.0 + p as f64 * pw;
        let groups: Vec<(&str, Vec<(Arm, f64)>)> = workloads
            .iter()
            .filter_map(|w| {
                let per = results.get(w)?;
                Some((
                    *w,
                    per.iter().map(|(a, s)| (*a, value(&median(s)))).collect(),
                ))
            })
            .collect();
        let max = groups
            .iter()
            .flat_map(|(_, v)| v.iter().map(|(_, x)| *x))
            .fold(0.0_f64, f64::max)
            .max(1e-9);
        let plot_w = pw - left - 10.0;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" font-weight="bold">{title}</text>"#,
            x0 + 5.0,
            top - 20.0
        );
        let base = top + ph;
        let _ = writeln!(
            out,
            r##"<line x1="{}" y1="{top}" x2="{}" y2="{base}" stroke="#333"/><line x1="{}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/>"##,
            x0 + left,
            x0 + left,
            x0 + left,
            x0 + left + plot_w
        );
        for tick in 0..=4 {
            let v = max * tick as f64 / 4.0;
            let y = base - ph * tick as f64 / 4.0;
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{}" text-anchor="end" fill="#555">{}</text>"##,
                x0 + left - 4.0,
                y + 4.0,
                short(v)
            );
        }
        let gw = plot_w / groups.len().max(1) as f64;
        for (g, (workload, bars)) in groups.iter().enumerate() {
            let bw = (gw - 20.0) / bars.len().max(1) as f64;
            for (b, (arm, v)) in bars.iter().enumerate() {
                let h = ph * v / max;
                let x = x0 + left + g as f64 * gw + 10.0 + b as f64 * bw;
                let _ = writeln!(
                    out,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{} {workload}: {}</title></rect>"#,
                    base - h,
                    bw - 2.0,
                    arm_color(*arm),
                    arm.name(),
                    short(*v)
                );
                let _ = writeln!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{}</text>"#,
                    x + (bw - 2.0) / 2.0,
                    base - h - 3.0,
                    short(*v)
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{workload}</text>"#,
                x0 + left + g as f64 * gw + gw / 2.0,
                base + 15.0
            );
        }
    }
    // Legend.
    let ly = top + ph + 35.0;
    for (i, arm) in Arm::ALL.iter().enumerate() {
        let x = 20.0 + left + i as f64 * 110.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            ly - 10.0,
            arm_color(*arm),
            x + 16.0,
            ly,
            arm.name()
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="20" y="{}" fill="#555" font-size="10">{}</text>"##,
        ly + 20.0,
        xml_escape(caption)
    );
    out.push_str("</svg>\n");
    out
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}")
}

// ---------------------------------------------------------------- scale

/// `--cluster N`: the scale figures (see `load/scale.rs`) instead of the
/// workloads.
fn cluster_flag() -> Result<Option<usize>, Error> {
    let mut args = std::env::args().skip_while(|a| a != "--cluster");
    if args.next().is_none() {
        return Ok(None);
    }
    let n = args.next().ok_or("--cluster needs a number of primaries")?;
    Ok(Some(n.parse()?))
}

#[cfg(feature = "cluster-async")]
fn run_scale(primaries: usize, opts: &Opts) -> Result<(), Error> {
    scale::run(primaries, opts)
}

#[cfg(not(feature = "cluster-async"))]
fn run_scale(_: usize, _: &Opts) -> Result<(), Error> {
    Err("--cluster needs the cluster-async feature: cargo bench --bench load --features cluster-async -- --cluster 3".into())
}

// ---------------------------------------------------------------- main

fn main() -> Result<(), Error> {
    // Test runners list a `harness = false` target's tests with `--list`
    // (nextest on `--all-targets`): there are none; nothing runs.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let opts = Opts::parse()?;
    if let Some(primaries) = cluster_flag()? {
        return run_scale(primaries, &opts);
    }
    if std::env::args().any(|a| a == "--wait-cost") {
        return wait::run();
    }
    if std::env::args().any(|a| a == "--redis-latency") {
        let secs = if opts.smoke {
            0.5
        } else if std::env::args().any(|a| a == "--secs") {
            opts.secs
        } else {
            10.0
        };
        let hog = !std::env::args().any(|a| a == "--no-hog");
        return latency::run(secs, hog);
    }
    let redis = start_redis()?;
    let threads = Arc::new(AppThreads::default());
    let registered = threads.clone();
    let app_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("app")
        .on_thread_start(move || registered.register())
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load")
        .enable_all()
        .build()?;
    let meter_conn = client_rt.block_on(async {
        redis::Client::open(redis.url.as_str())?
            .get_connection_manager()
            .await
    })?;
    let started = Instant::now();
    let load_before = loadavg();
    eprintln!(
        "load harness: {} connections, {} x {:.1} s per arm and workload, redis {}; load average {load_before}",
        opts.conc, opts.reps, opts.secs, redis.url
    );
    let mut h = Harness {
        opts: opts.clone(),
        app_rt,
        threads,
        redis_url: redis.url.clone(),
        meter: Meter {
            threads: Arc::new(AppThreads::default()),
            conn: meter_conn,
        },
        run: 0,
        results: BTreeMap::new(),
        large: Vec::new(),
    };
    h.meter.threads = h.threads.clone();

    let instant = AppSettings {
        latency: Duration::ZERO,
        ttl: Duration::from_secs(60),
        split_large: opts.split_large,
    };
    if opts.runs("hits") || opts.runs("large") {
        let apps = h.apps(instant, "hits")?;
        if opts.runs("hits") {
            client_rt.block_on(h.hits(&apps));
            eprintln!("hits done ({:.0} s)", started.elapsed().as_secs_f64());
        }
        if opts.runs("large") {
            client_rt.block_on(h.large(&apps));
            eprintln!("large done ({:.0} s)", started.elapsed().as_secs_f64());
        }
    }
    if opts.runs("zipf") {
        let apps = h.apps(
            AppSettings {
                latency: Duration::from_millis(20),
                ttl: Duration::from_secs(2),
                split_large: false,
            },
            "zipf",
        )?;
        client_rt.block_on(h.zipf(&apps));
        eprintln!("zipf done ({:.0} s)", started.elapsed().as_secs_f64());
    }
    if opts.runs("cold") {
        let apps = h.apps(
            AppSettings {
                latency: Duration::from_millis(50),
                ttl: Duration::from_secs(60),
                split_large: false,
            },
            "cold",
        )?;
        client_rt.block_on(h.cold(&apps));
        eprintln!("cold done ({:.0} s)", started.elapsed().as_secs_f64());
    }

    let load_after = loadavg();
    let caption = format!(
        "cargo bench --bench load{}: {} connections, medians of {} alternated runs of {:.1} s; {}; load average {load_before} -> {load_after}",
        if opts.smoke { " -- --smoke" } else { "" },
        opts.conc,
        opts.reps,
        opts.secs,
        machine(),
    );
    println!("\n{caption}\n");
    print!("{}", table(&h.results));
    let large = large_table(&h.large);
    if !large.is_empty() {
        println!("\nlarge bodies beside small hits:\n");
        print!("{large}");
    }
    let total_errors: f64 = h
        .results
        .values()
        .flat_map(|per| per.iter().flat_map(|(_, s)| s.iter().map(|s| s.errors)))
        .sum();
    if let Some(path) = &opts.svg {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, svg(&h.results, &caption))?;
        println!("\nchart: {}", path.display());
    }
    println!("({:.0} s in all)", started.elapsed().as_secs_f64());
    // Shut the app runtime down before Redis goes away.
    drop(h);
    drop(redis);
    if opts.smoke && total_errors > 0.0 {
        return Err(format!("{total_errors} requests failed").into());
    }
    Ok(())
}
