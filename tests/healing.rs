//! Connections that heal (issue 22, must-hold 2): the cache built the way
//! the README and the guide say (`FenceCache::from_client`), with DEFAULT settings, over
//! a real Redis behind a TCP proxy. The proxy wedges the cache's connection
//! without closing it (half-open: it stops forwarding, as a NAT or firewall
//! that dropped the flow), while new connections pass; or it closes it.
//! Every request is answered throughout (fail-open), and caching resumes
//! (a `HIT` served) within the bound the docs state, on one fresh
//! connection, with no restart of the app.
//!
//! The numbers are printed to stderr (`--nocapture`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachefence::{FenceCache, HealingConnection};
use support::origin::{Counter, routes};
use support::proxy::StallProxy;
use support::{Http, RedisServer, serve};

/// What `HealingConnection` documents: caching resumes within about 1 s
/// of the connection going silent with the default settings; the bound
/// leaves room for a loaded CI machine.
const RESUMES_WITHIN: Duration = Duration::from_secs(5);
const WORKERS: usize = 4;
const PATHS: [&str; 2] = ["/item/1", "/item/2"];

/// Whether a body is the origin's answer for `path` (`item <path> #<n>`).
fn names(body: &str, path: &str) -> bool {
    body.strip_prefix(&format!("item {path} #"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Asks for `path`; the answer must be the origin's for it.
async fn ask(http: &Http, addr: SocketAddr, path: &str) -> Option<String> {
    let reply = http.get(addr, path).await;
    assert_eq!(reply.status, 200, "{path}");
    assert!(names(&reply.text(), path), "{path}: {}", reply.text());
    reply.cache_status().map(str::to_owned)
}

struct Measured {
    first_hit: Duration,
    answered: usize,
    new_connections: u64,
    origin_calls: usize,
}

/// An app on a cache over a `HealingConnection` (what `from_client` makes) through a proxy in front of
/// Redis; warms [`PATHS`], runs [`WORKERS`] clients, `disrupt`s the
/// proxy, and measures when a `HIT` is served again.
async fn resumes_after(disrupt: impl FnOnce(&StallProxy)) -> Measured {
    let redis = RedisServer::new();
    let target: SocketAddr = format!("127.0.0.1:{}", redis.port()).parse().unwrap();
    let proxy = StallProxy::start(target).await;
    let conn = HealingConnection::connect(redis::Client::open(proxy.url()).unwrap())
        .await
        .unwrap();
    let cache = FenceCache::builder(conn)
        .namespace("heal:")
        .build()
        .expect("cache");
    let counter = Counter::default();
    let addr = serve(routes(counter.clone()).layer(cache.layer())).await;
    let http = Http::new();
    for path in PATHS {
        assert_eq!(ask(&http, addr, path).await.as_deref(), Some("MISS"));
        assert_eq!(ask(&http, addr, path).await.as_deref(), Some("HIT"));
    }
    assert_eq!(counter.get(), PATHS.len());
    let connections = proxy.accepted();
    assert_eq!(connections, 1, "the cache's one connection");

    // Clients all along: every request is answered with its body.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (http, stop, answered) = (http.clone(), stop.clone(), answered.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    ask(&http, addr, PATHS[i % PATHS.len()]).await;
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let disrupted = Instant::now();
    disrupt(&proxy);
    let first_hit = loop {
        // Sequential asks: a HIT says the cache's connection works again.
        if ask(&http, addr, PATHS[0]).await.as_deref() == Some("HIT") {
            break disrupted.elapsed();
        }
        assert!(
            disrupted.elapsed() < RESUMES_WITHIN,
            "caching did not resume within {RESUMES_WITHIN:?}: {} connections accepted, stats {:?}",
            proxy.accepted(),
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // And it stays up: the next asks of both keys are all HITs.
    for i in 0..20 {
        let path = PATHS[i % PATHS.len()];
        assert_eq!(
            ask(&http, addr, path).await.as_deref(),
            Some("HIT"),
            "{path}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("every request answered with its body");
    }
    Measured {
        first_hit,
        answered: answered.load(Ordering::SeqCst),
        new_connections: proxy.accepted() - connections,
        origin_calls: counter.get(),
    }
}

/// The cache's connection goes half-open (stops forwarding, never closes)
/// while new connections pass: the cache's calls time out at its own
/// 250 ms, the connection never learns it is dead. With `from_client` the
/// cache opens one fresh connection (its PING answered), replaces the
/// wedged one, and serves HITs again. (With `FenceCache::new` over a
/// `ConnectionManager`, as before, no HIT came back and no connection was
/// opened.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_replaced_and_caching_resumes() {
    let m = resumes_after(StallProxy::stall_existing).await;
    eprintln!(
        "healing (half-open): first HIT {:.2} s after the stall; {} requests answered by \
         {WORKERS} clients meanwhile, {} origin calls, {} new connection(s)",
        m.first_hit.as_secs_f64(),
        m.answered,
        m.origin_calls,
        m.new_connections
    );
    assert_eq!(m.new_connections, 1, "one replacement");
}

/// The hop closes the connection instead (a FIN): the same, and at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_replaced_and_caching_resumes() {
    let m = resumes_after(StallProxy::close_all).await;
    eprintln!(
        "healing (closed): first HIT {:.2} s after the close; {} requests answered by \
         {WORKERS} clients meanwhile, {} origin calls, {} new connection(s)",
        m.first_hit.as_secs_f64(),
        m.answered,
        m.origin_calls,
        m.new_connections
    );
    assert_eq!(m.new_connections, 1, "one replacement");
}

/// Redis paused (SIGSTOP) under traffic: calls time out, but a fresh
/// connection can't answer PING either, so the connection is kept (no
/// replacement, however long the pause); after SIGCONT both answer at
/// once, the connection is still kept, and caching resumes on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_keeps_its_connection_and_caching_resumes() {
    let redis = RedisServer::new();
    let conn = HealingConnection::connect(redis.client()).await.unwrap();
    let cache = FenceCache::builder(conn.clone())
        .namespace("heal:")
        .build()
        .expect("cache");
    let counter = Counter::default();
    let addr = serve(routes(counter.clone()).layer(cache.layer())).await;
    let http = Http::new();
    for path in PATHS {
        assert_eq!(ask(&http, addr, path).await.as_deref(), Some("MISS"));
        assert_eq!(ask(&http, addr, path).await.as_deref(), Some("HIT"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (http, stop) = (http.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    ask(&http, addr, PATHS[i % PATHS.len()]).await;
                }
            })
        })
        .collect();
    let bypasses = cache.stats().bypasses;
    let paused = Instant::now();
    redis.pause();
    // The pause lasts past the breaker opening and over a full attempt
    // (1 s) of making a fresh connection.
    while cache.stats().bypasses < bypasses + 50 || paused.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.resume();
    let resumed = Instant::now();
    let first_hit = loop {
        if ask(&http, addr, PATHS[0]).await.as_deref() == Some("HIT") {
            break resumed.elapsed();
        }
        assert!(
            resumed.elapsed() < RESUMES_WITHIN,
            "caching did not resume: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("every request answered with its body");
    }
    eprintln!(
        "healing (paused {:.1} s): first HIT {:.2} s after SIGCONT; {} replacements; stats {:?}",
        (resumed - paused).as_secs_f64(),
        first_hit.as_secs_f64(),
        conn.replacements(),
        cache.stats()
    );
    assert_eq!(conn.replacements(), 0, "the connection was kept");
}

// ---------------------------------------------------------------------------
// Redis Cluster: failovers in a row (feature `cluster-async`)
// ---------------------------------------------------------------------------

#[cfg(feature = "cluster-async")]
mod cluster {
    use super::*;

    use axum::Router;
    use axum::extract::Path;
    use axum::routing::get;
    use redis::cluster::{ClusterClient, ClusterClientBuilder};
    use support::RedisCluster;

    const NS: &str = "heal:";
    const KEYS: usize = 300;
    const FAILOVERS: usize = 5;
    /// What a user sees at worst: failure detection (the node timeout,
    /// 2 s here) and the promotion, then the clients' next slot refresh.
    const RESUMES_WITHIN: Duration = Duration::from_secs(60);

    /// `0 /<path>`, counted.
    fn app(calls: Arc<AtomicUsize>) -> Router<()> {
        Router::new().route(
            "/{*path}",
            get(move |Path(path): Path<String>| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    format!("0 /{path}")
                }
            }),
        )
    }

    /// The `/k/<n>` paths whose entries are on `node`.
    fn paths_on(node: &support::RedisServer) -> Vec<String> {
        let keys = node.cli(&["KEYS", &format!("{NS}|*")]);
        let mut paths: Vec<String> = keys
            .lines()
            .filter(|k| !k.contains("|#") && !k.ends_with(":vars") && !k.ends_with(":lease"))
            .filter_map(|k| {
                let at = k.find("/k/")?;
                let n: String = k[at + 3..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                (!n.is_empty()).then(|| format!("/k/{n}"))
            })
            .collect();
        paths.sort();
        paths.dedup();
        paths
    }

    fn is_primary(node: &support::RedisServer) -> bool {
        node.is_running() && node.cli(&["INFO", "replication"]).contains("role:master")
    }

    /// The running primary holding the entry of `path`.
    fn primary_holding(cluster: &RedisCluster, path: &str) -> usize {
        (0..cluster.nodes().len())
            .find(|&i| {
                let n = &cluster.nodes()[i];
                is_primary(n) && paths_on(n).iter().any(|p| p == path)
            })
            .unwrap_or_else(|| panic!("no primary holds {path}"))
    }

    /// Until primary `i` has a replica whose link is up and synced.
    async fn has_synced_replica(cluster: &RedisCluster, i: usize) {
        let port = u64::from(cluster.nodes()[i].port());
        let started = Instant::now();
        while !cluster.nodes().iter().filter(|n| n.is_running()).any(|n| {
            let info = n.cli(&["INFO", "replication"]);
            info.contains("role:slave")
                && support::info_field(&info, "master_port") == Some(port)
                && info.contains("master_link_status:up")
                && support::info_field(&info, "master_sync_in_progress") == Some(0)
        }) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no synced replica of node {i}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// 3 primaries with a replica each; two app servers (each its own cache
    /// and connection, default settings but the namespace and sharded
    /// wake-ups): A on a plain `ClusterConnection` (what redis >= 1.8.2
    /// alone gives), B on `FenceCache::from_cluster_client` (a healing
    /// connection). Under traffic over 300 keys, the primary holding a set
    /// of keys is SIGKILLed 5 times in a row (each time the replica that
    /// took its place; the killed node rejoins as its replica). Every
    /// request is answered with its body, and after every failover both
    /// servers serve those keys from the cache again (no wedge); the time
    /// to the first HIT on both after each SIGKILL is printed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn five_failovers_in_a_row_caching_resumes_after_each() {
        let mut cluster = RedisCluster::with(3, 1, 2000);
        let calls = Arc::new(AtomicUsize::new(0));
        let plain = FenceCache::builder(cluster.connection().await)
            .namespace(NS)
            .cluster_wake_ups(ClusterClientBuilder::new(cluster.urls()))
            .build()
            .expect("cache");
        let healing =
            HealingConnection::connect_cluster(ClusterClient::new(cluster.urls()).unwrap())
                .await
                .unwrap();
        let healed = FenceCache::builder(healing.clone())
            .namespace(NS)
            .cluster_wake_ups(ClusterClientBuilder::new(cluster.urls()))
            .build()
            .expect("cache");
        let a = serve(app(calls.clone()).layer(plain.layer())).await;
        let b = serve(app(calls.clone()).layer(healed.layer())).await;
        let http = Http::new();

        // Warm every key (16 at a time), through both servers.
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(16) {
            let warm = chunk.iter().map(|&i| {
                let http = http.clone();
                let addr = [a, b][i % 2];
                tokio::spawn(async move { http.get(addr, &format!("/k/{i}")).await.text() })
            });
            for (&i, body) in chunk.iter().zip(futures_util::future::join_all(warm).await) {
                assert_eq!(body.unwrap(), format!("0 /k/{i}"));
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), KEYS);
        let first = (0..cluster.nodes().len())
            .filter(|&i| is_primary(&cluster.nodes()[i]))
            .max_by_key(|&i| paths_on(&cluster.nodes()[i]).len())
            .unwrap();
        let paths = paths_on(&cluster.nodes()[first]);
        assert!(paths.len() > 50, "{}", paths.len());

        let traffic = support::Traffic::start(&http, [a, b], KEYS, 8, (7919, 131));
        traffic.until_answered(300, Duration::from_secs(30)).await;
        let mut resumed = Vec::new();
        for round in 0..FAILOVERS {
            let victim = primary_holding(&cluster, &paths[0]);
            has_synced_replica(&cluster, victim).await;
            let killed = Instant::now();
            cluster.kill(victim);
            let took = support::until_both_hit(&http, (a, b), &paths, killed, RESUMES_WITHIN).await;
            resumed.push(took);
            cluster
                .wait_ok(Duration::from_secs(60))
                .expect("the cluster recovers");
            eprintln!(
                "cluster failover {}/{FAILOVERS}: first HIT on both servers {:.2} s after SIGKILL \
                 of node {victim}; {} requests answered so far; B's connection replaced {} time(s)",
                round + 1,
                took.as_secs_f64(),
                traffic.answered(),
                healing.replacements()
            );
            // The killed node comes back as the new primary's replica.
            cluster.restart(victim);
        }
        let before = traffic.answered();
        traffic
            .until_answered(before + 300, Duration::from_secs(30))
            .await;
        let (answered, slowest_ms) = (traffic.answered(), traffic.slowest_ms());
        traffic.stop().await;
        let secs: Vec<String> = resumed
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect();
        eprintln!(
            "cluster failovers: {FAILOVERS}, wedges 0; first HIT after each SIGKILL (s): [{}]; \
             {} requests answered, slowest {slowest_ms} ms; A stats {:?}; B stats {:?}",
            secs.join(", "),
            answered,
            plain.stats(),
            healed.stats()
        );
        for breaker in [plain.stats().breaker, healed.stats().breaker] {
            assert_eq!(breaker, cachefence::BreakerState::Closed);
        }
    }
}
