//! Tags are never lost on a Redis Cluster (issue 21, must-hold 1; feature
//! `cluster-async`): one tag marker per entry key (each host of a URL has
//! its own), and the markers of entries stored while `invalidate_all`
//! walks stay. A real three-primary cluster, real HTTP, default settings.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use cachefence::{FenceCache, FenceHandle};
use http_body_util::Full;
use redis::cluster_async::ClusterConnection;
use support::{Http, RedisCluster};

const NS: &str = "clutag:";

/// The version the origin serves, and its calls.
#[derive(Clone, Default)]
struct World {
    version: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
}

/// `<version> /<path>`, tagged with the path's first segment.
async fn origin(State(world): State<World>, Path(path): Path<String>) -> impl IntoResponse {
    world.calls.fetch_add(1, Ordering::SeqCst);
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
            .layer()
            .namespace(NS);
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

    /// GET `path` for `host`: (x-cache, version read).
    async fn get(&self, host: &str, path: &str) -> (String, u64) {
        let req = http::Request::get(format!("http://{}{path}", self.addr))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = self.http.request(req).await;
        assert_eq!(reply.status, StatusCode::OK);
        let version = reply.text().split(' ').next().unwrap().parse().unwrap();
        (reply.cache_status().unwrap_or_default().to_owned(), version)
    }

    fn bump(&self) -> u64 {
        self.world.version.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The keys of the namespace matching `pattern` (after `<NS>|`), on
    /// every node.
    fn keys(&self, pattern: &str) -> usize {
        self.cluster
            .nodes()
            .iter()
            .map(|n| {
                n.cli(&["KEYS", &format!("{NS}|{pattern}")])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .sum()
    }
}

/// Issue 21, row 3: one URL cached for Host a and Host b, both tagged: the
/// tag marker is one per entry key, so `invalidate_tag` reaches both hosts
/// (on old main Host b's store overwrote Host a's marker).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_host_of_a_url_is_reached_by_its_tag() {
    const URLS: usize = 8;
    let s = Setup::new().await;
    for i in 0..URLS {
        for host in ["a.example", "b.example"] {
            assert_eq!(
                s.get(host, &format!("/hosts/{i}")).await,
                ("MISS".into(), 0)
            );
        }
    }
    let markers = s.keys("#tagged:hosts:*");
    let current = s.bump();
    let reached = s.handle.invalidate_tag("hosts").await.unwrap();
    let mut stale = [0; 2];
    for i in 0..URLS {
        for (h, host) in ["a.example", "b.example"].iter().enumerate() {
            let (_, version) = s.get(host, &format!("/hosts/{i}")).await;
            if version < current {
                stale[h] += 1;
            }
        }
    }
    eprintln!(
        "{markers} markers; invalidate_tag reached {reached}; stale: Host a {} of {URLS}, \
         Host b {} of {URLS}",
        stale[0], stale[1]
    );
    assert_eq!(markers, 2 * URLS);
    assert_eq!(stale, [0, 0]);
    assert_eq!(reached, 2 * URLS as u64);
    assert_eq!(s.world.calls.load(Ordering::SeqCst), 4 * URLS);
}

/// Issue 21, row 1 on a cluster: tagged URLs stored while `invalidate_all`
/// walks every primary keep their tag markers (the walk removes only what
/// it invalidated), so a later `invalidate_tag` reaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_stored_while_invalidate_all_walks_keeps_its_tag_marker() {
    const FILLER: usize = 6_000;
    let s = Arc::new(Setup::new().await);
    // Entries for the walk to remove, in every slot.
    let mut conn = s.cluster.connection().await;
    for i in 0..FILLER {
        let () = redis::cmd("HSET")
            .arg(format!("{NS}|/filler/{i}:{{f{i}}}"))
            .arg("v")
            .arg("1")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let walking = Arc::new(AtomicBool::new(true));
    let stored = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (s, walking, stored) = (s.clone(), walking.clone(), stored.clone());
        tokio::spawn(async move {
            while walking.load(Ordering::SeqCst) {
                let i = stored.load(Ordering::SeqCst);
                s.get("app.test", &format!("/walk/{i}")).await;
                stored.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    support::gate::until("stores before the walk", || {
        stored.load(Ordering::SeqCst) >= 2
    })
    .await;
    let started = Instant::now();
    let removed = s.handle.invalidate_all().await.unwrap();
    let walk_took = started.elapsed();
    walking.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    let urls = stored.load(Ordering::SeqCst);
    assert!(removed >= FILLER as u64, "removed {removed}");
    let mut survived = 0;
    for i in 0..urls {
        let (status, version) = s.get("app.test", &format!("/walk/{i}")).await;
        assert_eq!(version, 0);
        if status == "HIT" {
            survived += 1;
        }
    }
    assert!(survived > 0, "no store survived the walk: nothing tested");
    let current = s.bump();
    let reached = s.handle.invalidate_tag("walk").await.unwrap();
    // Markers went with their entries (those of entries the walk removed
    // too).
    let markers_left = s.keys("#tagged:walk:*");
    let mut stale = 0;
    for i in 0..urls {
        if s.get("app.test", &format!("/walk/{i}")).await.1 < current {
            stale += 1;
        }
    }
    eprintln!(
        "walk of {removed} entries took {walk_took:?}; {urls} tagged URLs stored during it, \
         {survived} survived it; invalidate_tag reached {reached}; {stale} stale reads"
    );
    assert_eq!(
        stale, 0,
        "{stale} of {urls} reads stale after invalidate_tag"
    );
    assert_eq!(reached, urls as u64);
    assert_eq!(markers_left, 0);
}

/// `<version> /<path>` with `ETag: "<version>"`, tagged `rv`, living 300 ms
/// ([`cachefence::CacheTtl`]); a bare `304` (no tags) when `If-None-Match`
/// names the current version.
async fn etag_origin(
    State(world): State<World>,
    Path(path): Path<String>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    world.calls.fetch_add(1, Ordering::SeqCst);
    let version = world.version.load(Ordering::SeqCst);
    let etag = format!("\"{version}\"");
    if headers
        .get("if-none-match")
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return (StatusCode::NOT_MODIFIED, [("etag", etag)]).into_response();
    }
    let mut res = (
        [("etag", etag), ("cache-tag", "rv".to_owned())],
        format!("{version} /{path}"),
    )
        .into_response();
    res.extensions_mut()
        .insert(cachefence::CacheTtl(std::time::Duration::from_millis(300)));
    res
}

/// Issue 21, row 2 on a cluster: an entry kept alive by bare `304`s keeps
/// its tag markers (FRESHEN with the tags stored in the entry). A short
/// grace (the setting under test) lets a marker's first life end within
/// the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_kept_alive_by_bare_304s_keeps_its_tag_markers() {
    use std::time::Duration;
    const PATHS: usize = 6;
    let cluster = RedisCluster::new();
    let fence = FenceCache::new(cluster.connection().await)
        .layer()
        .namespace(NS)
        .grace(Duration::from_millis(400));
    let handle = fence.handle();
    let world = World::default();
    let app = Router::new()
        .route("/{*path}", get(etag_origin).layer(fence))
        .with_state(world.clone());
    let addr = support::serve(app).await;
    let http = Http::new();
    let read = |i: usize| {
        let http = http.clone();
        async move {
            let reply = http.get(addr, &format!("/rv/{i}")).await;
            assert_eq!(reply.status, StatusCode::OK);
            let version: u64 = reply.text().split(' ').next().unwrap().parse().unwrap();
            (reply.cache_status().unwrap_or_default().to_owned(), version)
        }
    };
    for i in 0..PATHS {
        assert_eq!(read(i).await, ("MISS".to_owned(), 0));
    }
    let first_life = Instant::now();
    // Reads until each entry was revalidated by a bare 304 and the first
    // life (ttl + grace: 700 ms) of the entries and their markers is over.
    let revalidated = || world.calls.load(Ordering::SeqCst) - PATHS;
    while first_life.elapsed() < Duration::from_millis(1_500) || revalidated() < PATHS {
        for i in 0..PATHS {
            let (status, version) = read(i).await;
            assert_ne!(
                status, "MISS",
                "/rv/{i} expired: revalidation did not keep it"
            );
            assert_eq!(version, 0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let current = world.version.fetch_add(1, Ordering::SeqCst) + 1;
    let reached = handle.invalidate_tag("rv").await.unwrap();
    let mut stale = 0;
    for i in 0..PATHS {
        if read(i).await.1 < current {
            stale += 1;
        }
    }
    eprintln!(
        "{} bare 304s; invalidate_tag reached {reached}; {stale} of {PATHS} stale",
        revalidated()
    );
    assert_eq!(stale, 0, "{stale} of {PATHS} reads stale");
    assert_eq!(reached, PATHS as u64);
}
