//! Redis Cluster (feature `cluster-async`): a `FenceLayer` over a
//! `redis::cluster_async::ClusterConnection` to a real three-primary
//! cluster, serving an axum app over real HTTP.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::get;
use cachefence::{FenceCache, FenceHandle};
use redis::cluster_async::ClusterConnection;
use support::{Http, RedisCluster};

const NS: &str = "clu:";

/// What the origin sees: a call counter, a version it reports, a delay.
#[derive(Clone, Default)]
struct World {
    calls: Arc<AtomicUsize>,
    version: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
}

/// Every response is tagged with the first segment of its path.
async fn origin(State(world): State<World>, Path(path): Path<String>) -> impl IntoResponse {
    world.calls.fetch_add(1, Ordering::SeqCst);
    let delay = world.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let tag = path.split('/').next().unwrap_or_default().to_owned();
    let version = world.version.load(Ordering::SeqCst);
    ([("cache-tag", tag)], format!("{version} /{path}"))
}

struct Setup {
    cluster: RedisCluster,
    world: World,
    handle: FenceHandle<ClusterConnection>,
    addr: SocketAddr,
    http: Http,
}

impl Setup {
    async fn new() -> Self {
        let cluster = RedisCluster::new();
        let fence = FenceCache::new(cluster.connection().await)
            .redis_timeout(Duration::from_secs(2))
            .layer()
            .namespace(NS)
            .ttl(Duration::from_secs(60));
        let handle = fence.handle();
        let world = World::default();
        let app = Router::new()
            .route("/{*path}", get(origin).layer(fence))
            .with_state(world.clone());
        let addr = support::serve(app).await;
        Self {
            cluster,
            world,
            handle,
            addr,
            http: Http::new(),
        }
    }

    async fn get(&self, path: &str) -> (Option<String>, String) {
        let reply = self.http.get(self.addr, path).await;
        (reply.cache_status().map(str::to_owned), reply.text())
    }

    fn calls(&self) -> usize {
        self.world.calls.load(Ordering::SeqCst)
    }

    /// The keys of the namespace on each node.
    fn keys_per_node(&self) -> Vec<Vec<String>> {
        self.cluster
            .nodes()
            .iter()
            .map(|n| {
                let keys = n.cli(&["KEYS", &format!("{NS}|*")]);
                keys.lines()
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    }

    /// The entry keys (not tag markers, nor the variant sets listing a
    /// URL's hosts) of the namespace on each node.
    fn entries_per_node(&self) -> Vec<usize> {
        self.keys_per_node()
            .iter()
            .map(|keys| {
                keys.iter()
                    .filter(|k| !k.contains("|#") && !k.ends_with(":vars"))
                    .count()
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn miss_then_hit_and_invalidate_path() {
    let s = Setup::new().await;
    assert_eq!(s.get("/a/1").await, (Some("MISS".into()), "0 /a/1".into()));
    assert_eq!(s.get("/a/1").await, (Some("HIT".into()), "0 /a/1".into()));
    assert_eq!(s.calls(), 1);

    s.world.version.store(1, Ordering::SeqCst);
    assert_eq!(s.handle.invalidate_path("/a/1").await.unwrap(), 1);
    assert_eq!(s.get("/a/1").await, (Some("MISS".into()), "1 /a/1".into()));
    assert_eq!(s.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_key_burst_across_two_layers_reaches_the_origin_once() {
    let s = Arc::new(Setup::new().await);
    // A second layer with its own cluster connection stands for a second
    // process: only the lease in Redis keeps it from filling too.
    let other = FenceCache::new(s.cluster.connection().await)
        .redis_timeout(Duration::from_secs(2))
        .layer()
        .namespace(NS);
    let app = Router::new()
        .route("/{*path}", get(origin).layer(other))
        .with_state(s.world.clone());
    let other_addr = support::serve(app).await;
    s.world.delay_ms.store(300, Ordering::SeqCst);
    let requests = (0..100).map(|i| {
        let s = s.clone();
        let addr = if i % 2 == 0 { s.addr } else { other_addr };
        tokio::spawn(async move { s.http.get(addr, "/burst/1").await.text() })
    });
    for body in futures_util::future::join_all(requests).await {
        assert_eq!(body.unwrap(), "0 /burst/1");
    }
    assert_eq!(s.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidate_prefix_scans_every_primary() {
    let s = Setup::new().await;
    for i in 0..300 {
        s.get(&format!("/p/{i}")).await;
    }
    s.get("/q/1").await;
    let before = s.entries_per_node();
    assert!(
        before.iter().all(|&n| n > 0),
        "entries on every node: {before:?}"
    );
    assert_eq!(before.iter().sum::<usize>(), 301);

    assert_eq!(s.handle.invalidate_prefix("/p/").await.unwrap(), 300);
    assert_eq!(
        s.entries_per_node().iter().sum::<usize>(),
        1,
        "only /q/1 is left"
    );
    assert_eq!(s.get("/q/1").await.0.as_deref(), Some("HIT"));
    assert_eq!(s.get("/p/7").await.0.as_deref(), Some("MISS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidate_tag_removes_tagged_entries_in_every_slot() {
    let s = Setup::new().await;
    for i in 0..60 {
        s.get(&format!("/red/{i}")).await;
        s.get(&format!("/blue/{i}")).await;
    }
    let markers: usize = s
        .keys_per_node()
        .iter()
        .map(|keys| keys.iter().filter(|k| k.contains("|#tagged:red:")).count())
        .sum();
    assert_eq!(markers, 60);

    assert_eq!(s.handle.invalidate_tag("red").await.unwrap(), 60);
    assert_eq!(s.entries_per_node().iter().sum::<usize>(), 60);
    assert_eq!(s.get("/red/3").await.0.as_deref(), Some("MISS"));
    assert_eq!(s.get("/blue/3").await.0.as_deref(), Some("HIT"));

    // Soft: marked stale, served stale while one refresh runs.
    assert_eq!(s.handle.soft_invalidate_tag("blue").await.unwrap(), 60);
    assert_eq!(s.get("/blue/4").await.0.as_deref(), Some("STALE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_that_started_before_invalidate_tag_cannot_store() {
    let s = Arc::new(Setup::new().await);
    s.world.delay_ms.store(600, Ordering::SeqCst);
    let slow = {
        let s = s.clone();
        tokio::spawn(async move { s.get("/slow/1").await })
    };
    // Wait until the fill holds its lease, then invalidate its tag.
    for _ in 0..100 {
        if s.calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.calls(), 1);
    s.handle.invalidate_tag("slow").await.unwrap();
    let (status, body) = slow.await.unwrap();
    assert_eq!(body, "0 /slow/1");
    assert_eq!(status.as_deref(), Some("MISS"));
    assert_eq!(
        s.entries_per_node().iter().sum::<usize>(),
        0,
        "the fenced fill stored nothing"
    );
    assert_eq!(s.handle.stats().fenced, 1);

    s.world.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(s.get("/slow/1").await.0.as_deref(), Some("MISS"));
    assert_eq!(s.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidate_all_empties_the_namespace_on_every_node() {
    let s = Setup::new().await;
    for i in 0..90 {
        s.get(&format!("/x/{i}")).await;
    }
    let before = s.keys_per_node();
    assert!(before.iter().all(|k| !k.is_empty()), "{before:?}");
    assert_eq!(s.handle.invalidate_all().await.unwrap(), 90);
    let after = s.keys_per_node();
    assert!(after.iter().all(Vec::is_empty), "left: {after:?}");
    assert_eq!(s.get("/x/1").await.0.as_deref(), Some("MISS"));
}
