//! `--cluster N`: hit throughput, Redis CPU and Redis commands per hit on
//! one Redis vs an N-primary Redis Cluster (started here from
//! `redis-server` and `redis-cli --cluster create`, on this machine), each
//! with and without a 64 MiB near cache: four arms alternated in one run.
//! Then Redis memory per cached entry with a 4 KiB body (`INFO memory`
//! `used_memory` before and after storing 10,000 entries, divided).
//!
//! ```text
//! cargo bench --bench load --features cluster-async -- --cluster 3
//! cargo bench --bench load --features cluster-async -- --cluster 3 --smoke   # CI: a few seconds
//! ```
//!
//! Uses `--conc`, `--reps` and `--secs` of the main harness. Each arm's app
//! (one cachefence layer made the way the README says: a
//! `HealingConnection` and wake-ups; TTL 10 min) serves 1,000 keys, all
//! stored (and, with a near cache, taken into it) before the measured
//! windows, so every request is a hit. Redis CPU (`INFO cpu`) and commands
//! (`INFO commandstats`, the harness's own `INFO` and connection handshakes
//! left out) are deltas over the window, summed over the arm's nodes, per
//! hit answered in the window; commands per socket read (`INFO stats`
//! `total_reads_processed`) shows how many commands a node gets per
//! wake-up (the multiplexed connections pipeline concurrent requests).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use cachefence::{FenceCache, HealingConnection};

use super::{Error, Opts, Origin, Pattern, connect, get_once, load, loadavg, machine, small};

/// Keys the hit windows spread over (so every primary serves some).
const KEYS: usize = 1000;
/// Entries stored for the memory figure.
const MEMORY_ENTRIES: usize = 10_000;

/// One `redis-server` (killed, its directory removed, on drop).
struct Node {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    fn start(cluster: bool) -> Result<Self, Error> {
        let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir =
            std::env::temp_dir().join(format!("cachefence-bench-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null());
        if cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        let child = cmd.spawn()?;
        let node = Node { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while node.query::<String>(&["PING"]).is_err() {
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(node)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> Result<T, Error> {
        let client = redis::Client::open(self.url())?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        Ok(redis::cmd(args[0]).arg(&args[1..]).query(&mut con)?)
    }

    /// A field of `INFO <section>` as a number.
    fn info(&self, section: &str, field: &str) -> f64 {
        self.query::<String>(&["INFO", section])
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// CPU seconds (user + system), commands executed (the harness's
    /// `INFO` and the handshakes of its connections left out) and reads
    /// from client sockets so far, read with one `INFO`.
    fn counters(&self) -> Counters {
        let Ok(info) = self.query::<String>(&["INFO", "cpu", "stats", "commandstats"]) else {
            return Counters::default();
        };
        let mut out = Counters::default();
        for line in info.lines() {
            if let Some(v) = line
                .strip_prefix("used_cpu_user:")
                .or_else(|| line.strip_prefix("used_cpu_sys:"))
            {
                out.cpu_s += v.trim().parse::<f64>().unwrap_or(0.0);
            }
            if let Some(v) = line.strip_prefix("total_reads_processed:") {
                out.reads += v.trim().parse::<u64>().unwrap_or(0);
            }
            let Some((name, fields)) = line
                .strip_prefix("cmdstat_")
                .and_then(|rest| rest.split_once(':'))
            else {
                continue;
            };
            if name == "info" || name == "client|setinfo" {
                continue;
            }
            out.commands += fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|c| c.parse::<u64>().ok())
                .unwrap_or(0);
        }
        out
    }
}

/// What Redis nodes did so far (summed over nodes).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    cpu_s: f64,
    commands: u64,
    /// Reads from client sockets (`total_reads_processed`): commands per
    /// read is how many commands a node gets per wake-up.
    reads: u64,
}

fn counters(nodes: &[&Node]) -> Counters {
    nodes.iter().fold(Counters::default(), |acc, n| {
        let c = n.counters();
        Counters {
            cpu_s: acc.cpu_s + c.cpu_s,
            commands: acc.commands + c.commands,
            reads: acc.reads + c.reads,
        }
    })
}

/// Starts `n` cluster nodes and joins them as `n` primaries.
fn start_cluster(n: usize) -> Result<Vec<Node>, Error> {
    let nodes: Vec<Node> = (0..n)
        .map(|_| Node::start(true))
        .collect::<Result<_, _>>()?;
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        )
        .into());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| {
        n.query::<String>(&["CLUSTER", "INFO"])
            .is_ok_and(|i| i.contains("cluster_state:ok"))
    }) {
        if Instant::now() > deadline {
            return Err("the cluster did not reach cluster_state:ok".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(nodes)
}

/// The near cache of the `+near` arms.
const NEAR_BYTES: usize = 64 << 20;

/// Where an arm's cache keeps its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Single,
    Cluster,
}

/// One arm: an app with one cachefence layer, listening.
struct Arm {
    place: Place,
    near: bool,
    addr: SocketAddr,
    stats: StatsFn,
}

impl Arm {
    fn name(&self, primaries: usize) -> String {
        let place = match self.place {
            Place::Single => "1 server".to_owned(),
            Place::Cluster => format!("{primaries} primaries"),
        };
        if self.near {
            format!("{place} + near")
        } else {
            place
        }
    }
}

/// The one place the bench builds a cache: the way the README says (a
/// `HealingConnection`, as `from_client` / `from_cluster_client` make,
/// wake-ups), in `namespace`, with
/// a 64 MiB near cache when `near`. Serves it and, with a near cache, waits
/// until its subscription holds.
async fn app(
    place: Place,
    near: bool,
    single_url: &str,
    cluster_urls: &[String],
    namespace: &str,
) -> Result<Arm, Error> {
    let (addr, stats) = match place {
        Place::Single => {
            let client = redis::Client::open(single_url)?;
            let builder = FenceCache::builder(HealingConnection::connect(client.clone()).await?)
                .namespace(namespace)
                .wake_ups(client);
            let builder = if near {
                builder.near_cache(NEAR_BYTES)
            } else {
                builder
            };
            serve(builder.build()?, near).await?
        }
        Place::Cluster => {
            let client = redis::cluster::ClusterClient::new(cluster_urls.to_vec())?;
            let builder = FenceCache::builder(HealingConnection::connect_cluster(client).await?)
                .namespace(namespace)
                .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(
                    cluster_urls.to_vec(),
                ));
            let builder = if near {
                builder.near_cache(NEAR_BYTES)
            } else {
                builder
            };
            serve(builder.build()?, near).await?
        }
    };
    Ok(Arm {
        place,
        near,
        addr,
        stats,
    })
}

type StatsFn = Box<dyn Fn() -> cachefence::Stats + Send + Sync>;

/// Serves `/k/{id}` (4 KiB, instant origin, TTL 10 min) through `cache`.
async fn serve<C>(cache: FenceCache<C>, near: bool) -> Result<(SocketAddr, StatsFn), Error>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let origin = Origin::new(Duration::ZERO);
    let fence = cache.layer().ttl(Duration::from_secs(600));
    let routes = Router::new()
        .route("/k/{id}", get(small))
        .with_state(origin)
        .layer(fence);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, routes).await });
    if near {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cache.near_is_up_for_tests() {
            if Instant::now() > deadline {
                return Err("the near cache's subscription did not come up".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok((addr, Box::new(move || cache.stats())))
}

/// GETs `paths`, 32 at a time; counts the failures.
async fn fetch_all(addr: SocketAddr, paths: Vec<String>) -> usize {
    let paths = Arc::new(std::sync::Mutex::new(paths));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let paths = paths.clone();
            tokio::spawn(async move {
                let mut failed = 0;
                let Ok(mut sender) = connect(addr).await else {
                    return usize::MAX / 64;
                };
                loop {
                    let next = paths.lock().ok().and_then(|mut p| p.pop());
                    let Some(path) = next else { break };
                    if get_once(&mut sender, &path).await.is_none() {
                        failed += 1;
                        match connect(addr).await {
                            Ok(s) => sender = s,
                            Err(_) => return failed + 1,
                        }
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(1);
    }
    failed
}

/// One measured window of one arm.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p99_ms: f64,
    /// Redis CPU µs per hit, summed over the arm's nodes.
    cpu_us: f64,
    /// Redis commands per hit, summed over the arm's nodes.
    cmds: f64,
    /// The share of the hits served by the near cache.
    near_share: f64,
    /// Commands per read from a client socket, over the arm's nodes.
    batch: f64,
}

/// One measured window of hits over `keys` keys on `arm`, whose Redis is
/// `nodes`; and the failed requests.
async fn window(arm: &Arm, nodes: &[&Node], keys: usize, opts: &Opts) -> (Sample, u64) {
    let measuring = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + opts.warmup + Duration::from_secs_f64(opts.secs);
    let run = tokio::spawn(load(
        arm.addr,
        opts.conc,
        Pattern::Uniform(keys),
        measuring.clone(),
        end,
        rand_seed(),
    ));
    tokio::time::sleep(opts.warmup).await;
    let a = counters(nodes);
    let near_a = (arm.stats)().near_hits;
    let started = Instant::now();
    measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rec = run.await.unwrap_or_default();
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let near_b = (arm.stats)().near_hits;
    let b = counters(nodes);
    rec.latencies_us.sort_unstable();
    let hits = rec.latencies_us.len().max(1) as f64;
    let sample = Sample {
        rps: rec.latencies_us.len() as f64 / secs,
        p99_ms: super::percentile(&rec.latencies_us, 0.99),
        cpu_us: (b.cpu_s - a.cpu_s) * 1e6 / hits,
        cmds: b.commands.saturating_sub(a.commands) as f64 / hits,
        near_share: near_b.saturating_sub(near_a) as f64 / hits,
        batch: b.commands.saturating_sub(a.commands) as f64
            / b.reads.saturating_sub(a.reads).max(1) as f64,
    };
    (sample, rec.errors)
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

/// `used_memory` summed over `nodes`.
fn used_memory(nodes: &[&Node]) -> f64 {
    nodes.iter().map(|n| n.info("memory", "used_memory")).sum()
}

fn median(samples: &[Sample], f: fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn run(primaries: usize, opts: &Opts) -> Result<(), Error> {
    let (keys, memory_entries) = if opts.smoke {
        (100, 300)
    } else {
        (KEYS, MEMORY_ENTRIES)
    };
    let app_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("app")
        .enable_all()
        .build()?;
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load")
        .enable_all()
        .build()?;
    let started = Instant::now();
    let single = Node::start(false)?;
    let cluster = start_cluster(primaries)?;
    let load_before = loadavg();
    eprintln!(
        "scale: 1 Redis vs a {primaries}-primary cluster on this machine, each without and with a near cache; {} connections, {} x {:.1} s per arm; load average {load_before}",
        opts.conc, opts.reps, opts.secs
    );
    let single_url = single.url();
    let cluster_urls: Vec<String> = cluster.iter().map(Node::url).collect();
    let arms: Vec<Arm> = app_rt.block_on(async {
        let mut arms = Vec::new();
        for (place, near, ns) in [
            (Place::Single, false, "scale:"),
            (Place::Single, true, "scale-near:"),
            (Place::Cluster, false, "scale:"),
            (Place::Cluster, true, "scale-near:"),
        ] {
            arms.push(app(place, near, &single_url, &cluster_urls, ns).await?);
        }
        Ok::<_, Error>(arms)
    })?;
    let single_nodes = [&single];
    let cluster_nodes: Vec<&Node> = cluster.iter().collect();
    let nodes_of = |arm: &Arm| -> &[&Node] {
        match arm.place {
            Place::Single => &single_nodes,
            Place::Cluster => &cluster_nodes,
        }
    };

    // Every key stored before the windows; a second pass takes them into
    // the near caches (a store marks an entry, the next read takes it in).
    let paths: Vec<String> = (0..keys).map(|i| format!("/k/h{i}")).collect();
    for arm in &arms {
        for _ in 0..2 {
            let failed = load_rt.block_on(fetch_all(arm.addr, paths.clone()));
            if failed > 0 {
                return Err(format!("{failed} warm-up requests failed").into());
            }
        }
    }
    // What the nodes burn with no request: Redis's own cron (and on a
    // cluster the cluster bus), part of every window's CPU.
    let idle = Duration::from_secs_f64(opts.secs);
    let idle_cpu = |nodes: &[&Node]| {
        let a = counters(nodes).cpu_s;
        std::thread::sleep(idle);
        (counters(nodes).cpu_s - a) * 1e3 / idle.as_secs_f64()
    };
    let (idle_single, idle_cluster) = (idle_cpu(&single_nodes), idle_cpu(&cluster_nodes));
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); arms.len()];
    let mut errors = 0;
    for rep in 0..opts.reps {
        for k in 0..arms.len() {
            let i = (k + rep) % arms.len();
            let arm = &arms[i];
            let (sample, errs) = load_rt.block_on(window(arm, nodes_of(arm), keys, opts));
            errors += errs;
            results[i].push(sample);
        }
    }

    // Memory per entry: new entries with a 4 KiB body, stored and read
    // once more (with a near cache, the read that takes it in).
    let mem_paths: Vec<String> = (0..memory_entries).map(|i| format!("/k/m{i}")).collect();
    let mut per_entry = Vec::new();
    for arm in &arms {
        let nodes = nodes_of(arm);
        let before = used_memory(nodes);
        for _ in 0..2 {
            let failed = load_rt.block_on(fetch_all(arm.addr, mem_paths.clone()));
            if failed > 0 {
                return Err(format!("{failed} memory-run requests failed").into());
            }
        }
        let after = used_memory(nodes);
        per_entry.push((after - before) / memory_entries as f64);
    }
    let load_after = loadavg();
    println!(
        "\ncargo bench --bench load --features cluster-async -- --cluster {primaries}{}: \
         {} connections, medians of {} alternated runs of {:.1} s, hits over {keys} keys (4 KiB); \
         {}; load average {load_before} -> {load_after}\n",
        if opts.smoke { " --smoke" } else { "" },
        opts.conc,
        opts.reps,
        opts.secs,
        machine()
    );
    println!(
        "| Redis | hits/s | p99 ms | Redis CPU µs/hit (all nodes) | Redis commands/hit (all nodes) | commands per socket read | near-cache hits | Redis memory/entry (4 KiB body) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let med: Vec<Sample> = results
        .iter()
        .map(|s| Sample {
            rps: median(s, |x| x.rps),
            p99_ms: median(s, |x| x.p99_ms),
            cpu_us: median(s, |x| x.cpu_us),
            cmds: median(s, |x| x.cmds),
            near_share: median(s, |x| x.near_share),
            batch: median(s, |x| x.batch),
        })
        .collect();
    for ((arm, m), mem) in arms.iter().zip(&med).zip(&per_entry) {
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.2} | {} | {:.0} % | {} B |",
            arm.name(primaries),
            thousands(m.rps),
            m.p99_ms,
            m.cpu_us,
            m.cmds,
            if m.cmds >= 0.01 {
                format!("{:.1}", m.batch)
            } else {
                "-".to_owned()
            },
            m.near_share * 100.0,
            thousands(*mem),
        );
    }
    println!("\nevery run (hits/s, Redis CPU µs/hit, commands/hit):");
    for (arm, samples) in arms.iter().zip(&results) {
        let runs: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.0} {:.1} {:.2}", s.rps, s.cpu_us, s.cmds))
            .collect();
        println!("  {}: {}", arm.name(primaries), runs.join(" | "));
    }
    println!(
        "\nRedis CPU with no request (near caches' heartbeats only): 1 server {idle_single:.1} ms/s, \
         {primaries} primaries {idle_cluster:.1} ms/s (all nodes)"
    );
    let ratio = |a: f64, b: f64| a / b.max(1e-9);
    println!(
        "\n{primaries} primaries / 1 server: throughput {:.2}x, Redis CPU per hit {:.2}x; \
         with near caches: throughput {:.2}x; near / no near: {:.2}x on 1 server, {:.2}x on the cluster; \
         {errors} errors; {:.0} s in all",
        ratio(med[2].rps, med[0].rps),
        ratio(med[2].cpu_us, med[0].cpu_us),
        ratio(med[3].rps, med[1].rps),
        ratio(med[1].rps, med[0].rps),
        ratio(med[3].rps, med[2].rps),
        started.elapsed().as_secs_f64(),
    );
    drop(arms);
    drop(app_rt);
    drop(load_rt);
    if errors > 0 {
        return Err(format!("{errors} requests failed").into());
    }
    Ok(())
}
