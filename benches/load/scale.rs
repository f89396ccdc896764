//! `--cluster N`: hit throughput and Redis CPU per hit on one Redis vs an
//! N-primary Redis Cluster (started here from `redis-server` and
//! `redis-cli --cluster create`, on this machine), alternated in one run,
//! and Redis memory per cached entry with a 4 KiB body (`INFO memory`
//! `used_memory` before and after storing 10,000 entries, divided).
//!
//! ```text
//! cargo bench --bench load --features cluster-async -- --cluster 3
//! ```
//!
//! Uses `--conc`, `--reps` and `--secs` of the main harness. The app (one
//! cachefence layer, default settings, TTL 10 min) serves 1,000 keys, all
//! stored before the measured windows, so every request is a hit.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use cachefence::FenceCache;

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

    /// CPU seconds (user + system) so far.
    fn cpu_s(&self) -> f64 {
        self.info("cpu", "used_cpu_user") + self.info("cpu", "used_cpu_sys")
    }
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

/// An app with one cachefence layer over `conn`, listening.
async fn app<C>(conn: C, namespace: &str) -> Result<SocketAddr, Error>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let origin = Origin::new(Duration::ZERO);
    let fence = FenceCache::new(conn)
        .layer()
        .namespace(namespace)
        .ttl(Duration::from_secs(600));
    let routes = Router::new()
        .route("/k/{id}", get(small))
        .with_state(origin)
        .layer(fence);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, routes).await });
    Ok(addr)
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

/// One measured window of hits: (hits per second, Redis CPU µs per hit
/// summed over `nodes`, errors).
async fn window(addr: SocketAddr, nodes: &[&Node], opts: &Opts) -> (f64, f64, u64) {
    let measuring = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + opts.warmup + Duration::from_secs_f64(opts.secs);
    let run = tokio::spawn(load(
        addr,
        opts.conc,
        Pattern::Uniform(KEYS),
        measuring.clone(),
        end,
        rand_seed(),
    ));
    tokio::time::sleep(opts.warmup).await;
    let cpu_a: f64 = nodes.iter().map(|n| n.cpu_s()).sum();
    let started = Instant::now();
    measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    let rec = run.await.unwrap_or_default();
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let cpu_b: f64 = nodes.iter().map(|n| n.cpu_s()).sum();
    let hits = rec.latencies_us.len().max(1) as f64;
    (hits / secs, (cpu_b - cpu_a) * 1e6 / hits, rec.errors)
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

pub(super) fn run(primaries: usize, opts: &Opts) -> Result<(), Error> {
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
    let single = Node::start(false)?;
    let cluster = start_cluster(primaries)?;
    let load_before = loadavg();
    eprintln!(
        "scale: 1 Redis vs a {primaries}-primary cluster on this machine; {} connections, {} x {:.1} s each; load average {load_before}",
        opts.conc, opts.reps, opts.secs
    );
    let single_url = single.url();
    let cluster_urls: Vec<String> = cluster.iter().map(Node::url).collect();
    let (single_addr, cluster_addr, mem_single_addr, mem_cluster_addr) =
        app_rt.block_on(async {
            let one = redis::Client::open(single_url.as_str())?;
            let many = redis::cluster::ClusterClient::new(cluster_urls.clone())?;
            Ok::<_, Error>((
                app(one.get_connection_manager().await?, "scale:").await?,
                app(many.get_async_connection().await?, "scale:").await?,
                app(one.get_connection_manager().await?, "mem:").await?,
                app(many.get_async_connection().await?, "mem:").await?,
            ))
        })?;
    let single_nodes = [&single];
    let cluster_nodes: Vec<&Node> = cluster.iter().collect();

    // Every key stored before the windows.
    let keys: Vec<String> = (0..KEYS).map(|i| format!("/k/h{i}")).collect();
    for addr in [single_addr, cluster_addr] {
        let failed = load_rt.block_on(fetch_all(addr, keys.clone()));
        if failed > 0 {
            return Err(format!("{failed} warm-up requests failed").into());
        }
    }
    let mut results: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut errors = 0;
    for rep in 0..opts.reps {
        let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (addr, nodes): (SocketAddr, &[&Node]) = if i == 0 {
                (single_addr, &single_nodes)
            } else {
                (cluster_addr, &cluster_nodes)
            };
            let (rps, cpu_us, errs) = load_rt.block_on(window(addr, nodes, opts));
            errors += errs;
            results[i].push((rps, cpu_us));
        }
    }
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (rps1, cpu1) = (med(&results[0], |r| r.0), med(&results[0], |r| r.1));
    let (rpsn, cpun) = (med(&results[1], |r| r.0), med(&results[1], |r| r.1));

    // Memory per entry: 10,000 new entries with a 4 KiB body.
    let mem_paths: Vec<String> = (0..MEMORY_ENTRIES).map(|i| format!("/k/m{i}")).collect();
    let mut per_entry = Vec::new();
    for (addr, nodes) in [
        (mem_single_addr, &single_nodes[..]),
        (mem_cluster_addr, &cluster_nodes[..]),
    ] {
        let before = used_memory(nodes);
        let failed = load_rt.block_on(fetch_all(addr, mem_paths.clone()));
        let after = used_memory(nodes);
        if failed > 0 {
            return Err(format!("{failed} memory-run requests failed").into());
        }
        per_entry.push((after - before) / MEMORY_ENTRIES as f64);
    }
    let load_after = loadavg();
    println!(
        "\ncargo bench --bench load --features cluster-async -- --cluster {primaries}: \
         {} connections, medians of {} alternated runs of {:.1} s, hits over {KEYS} keys (4 KiB); \
         {}; load average {load_before} -> {load_after}\n",
        opts.conc,
        opts.reps,
        opts.secs,
        machine()
    );
    println!(
        "| Redis | hits/s | Redis CPU µs/hit (all nodes) | Redis memory per entry (4 KiB body) |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| 1 server | {rps1:.0} | {cpu1:.1} | {:.0} B |",
        per_entry[0]
    );
    println!(
        "| {primaries}-primary cluster | {rpsn:.0} | {cpun:.1} | {:.0} B |",
        per_entry[1]
    );
    println!(
        "\nratio {primaries} primaries / 1 server: throughput {:.2}x, Redis CPU per hit {:.2}x; {errors} errors",
        rpsn / rps1.max(1e-9),
        cpun / cpu1.max(1e-9)
    );
    drop(app_rt);
    drop(load_rt);
    if errors > 0 {
        return Err(format!("{errors} requests failed").into());
    }
    Ok(())
}
