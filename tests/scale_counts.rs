//! The Redis commands a hit costs, exact (the scale figures' "Redis
//! commands per hit", `docs/notes/scale.md`): on one server and on a
//! 3-primary Redis Cluster (feature `cluster-async`), with the cache built
//! the way the README says (`from_client` / `from_cluster_client`, wake-ups),
//! without and with a near cache. Counted with `INFO commandstats` on every
//! node, before and after hits of entries spread over every primary.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use cachefence::{FenceCache, HealingConnection};
use redis::aio::ConnectionLike;
use support::{Http, RedisCluster, RedisServer, serve};

const NS: &str = "counts:";
/// Entries read, and passes over them.
const PATHS: usize = 12;
const PASSES: usize = 5;

/// Where the cache's wake-ups (and a near cache's announcements) come from.
enum Wake {
    Single(redis::Client),
    Cluster(Vec<String>),
}

/// The one place this file builds a cache. A 2 s Redis timeout: on a
/// loaded machine a hit slower than the default 250 ms would fail open and
/// count for nothing here (the commands a hit sends don't depend on it).
fn cache<C>(conn: C, wake: Wake, near: bool) -> FenceCache<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let builder = FenceCache::builder(conn)
        .namespace(NS)
        .redis_timeout(Duration::from_secs(2));
    let builder = match wake {
        Wake::Single(client) => builder.wake_ups(client),
        Wake::Cluster(urls) => {
            builder.cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(urls))
        }
    };
    let builder = if near {
        builder.near_cache(1 << 20)
    } else {
        builder
    };
    builder.build().unwrap()
}

/// The commands `nodes` ran so far, by name (the test's own `INFO` and
/// `CONFIG` and connection handshakes left out), summed over the nodes.
fn commands(nodes: &[&RedisServer]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for node in nodes {
        for (name, calls) in node.commandstats() {
            let base = name.split('|').next().unwrap_or(&name);
            if base != "info" && base != "config" && name != "client|setinfo" {
                *out.entry(name).or_default() += calls;
            }
        }
    }
    out
}

fn delta(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .filter_map(|(name, after)| {
            let d = after - a.get(name).copied().unwrap_or(0);
            (d > 0).then(|| (name.clone(), d))
        })
        .collect()
}

/// A near cache's heartbeat, whatever the requests: a `PING` on its
/// subscription every 500 ms and its registration (`ZADD`,
/// `ZREMRANGEBYSCORE`, `PEXPIRE`) every second. Not a hit's cost; left out
/// of the counts with a near cache.
const HEARTBEAT: [&str; 4] = ["ping", "zadd", "zremrangebyscore", "pexpire"];

/// What `PATHS` x `PASSES` hits cost: the commands run on `nodes` by name
/// (with `near`, the near cache's [`HEARTBEAT`] left out). Checks the cache
/// counted them as hits (near hits with `near`), and that every node served
/// some of them when there is no near cache.
async fn hits_cost<C>(
    cache: FenceCache<C>,
    nodes: &[&RedisServer],
    near: bool,
) -> BTreeMap<String, u64>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let app = Router::new().route(
        "/{*path}",
        get(|uri: axum::http::Uri| async move { uri.path().to_owned() }).layer(cache.layer()),
    );
    let addr: SocketAddr = serve(app).await;
    if near {
        support::gate::until("the near cache's subscription", || {
            cache.near_is_up_for_tests()
        })
        .await;
    }
    let http = Http::new();
    let paths: Vec<String> = (0..PATHS).map(|i| format!("/h/{i}")).collect();
    // Stored (a miss), then a hit that, with a near cache, takes it in.
    for path in &paths {
        let mut tries = 0;
        loop {
            let reply = http.get(addr, path).await;
            assert_eq!(reply.text(), *path);
            let ready = if near {
                cache.near_holds_for_tests(NS, path)
            } else {
                reply.cache_status() == Some("HIT")
            };
            if ready {
                break;
            }
            tries += 1;
            assert!(tries < 5, "{path} never became a hit");
        }
    }
    support::gate::until("the fills to end", || cache.stats().in_flight == 0).await;
    let hmget_before: Vec<u64> = nodes.iter().map(|n| n.command_count("hmget")).collect();
    let stats_before = cache.stats();
    let before = commands(nodes);
    for _ in 0..PASSES {
        for path in &paths {
            let reply = http.get(addr, path).await;
            assert_eq!(reply.cache_status(), Some("HIT"), "{path}");
            assert_eq!(reply.text(), *path);
        }
    }
    let after = commands(nodes);
    let stats = cache.stats();
    let hits = (PATHS * PASSES) as u64;
    assert_eq!(stats.hits - stats_before.hits, hits);
    assert_eq!(stats.misses, stats_before.misses);
    if near {
        assert_eq!(stats.near_hits - stats_before.near_hits, hits);
    } else {
        let served: Vec<u64> = nodes
            .iter()
            .zip(&hmget_before)
            .map(|(n, b)| n.command_count("hmget") - b)
            .collect();
        assert!(
            served.iter().all(|s| *s > 0),
            "every node serves some hits: {served:?}"
        );
    }
    let mut cost = delta(&before, &after);
    if near {
        cost.retain(|name, _| !HEARTBEAT.contains(&name.as_str()));
    }
    cost
}

fn expected(per_hit: &[(&str, u64)]) -> BTreeMap<String, u64> {
    per_hit
        .iter()
        .map(|(name, n)| ((*name).to_owned(), n * (PATHS * PASSES) as u64))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_on_one_server_is_one_hmget() {
    let redis = RedisServer::new();
    let conn = HealingConnection::connect(redis.client()).await.unwrap();
    let cost = hits_cost(
        cache(conn, Wake::Single(redis.client()), false),
        &[&redis],
        false,
    )
    .await;
    assert_eq!(cost, expected(&[("hmget", 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_hit_on_one_server_costs_redis_nothing() {
    let redis = RedisServer::new();
    let conn = HealingConnection::connect(redis.client()).await.unwrap();
    let cost = hits_cost(
        cache(conn, Wake::Single(redis.client()), true),
        &[&redis],
        true,
    )
    .await;
    assert_eq!(cost, expected(&[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_on_a_cluster_is_one_hmget_on_the_primary_owning_it() {
    let cluster = RedisCluster::new();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let conn = HealingConnection::connect_cluster(client).await.unwrap();
    let nodes: Vec<&RedisServer> = cluster.nodes().iter().collect();
    let cost = hits_cost(
        cache(conn, Wake::Cluster(cluster.urls()), false),
        &nodes,
        false,
    )
    .await;
    assert_eq!(cost, expected(&[("hmget", 1)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_hit_on_a_cluster_costs_redis_nothing() {
    let cluster = RedisCluster::new();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let conn = HealingConnection::connect_cluster(client).await.unwrap();
    let nodes: Vec<&RedisServer> = cluster.nodes().iter().collect();
    let cost = hits_cost(
        cache(conn, Wake::Cluster(cluster.urls()), true),
        &nodes,
        true,
    )
    .await;
    assert_eq!(cost, expected(&[]));
}
