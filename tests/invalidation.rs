//! Invalidation always wins: fenced write-backs, local aborts, prefixes with
//! glob characters, tags, soft purges, and a randomized race test.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachefence::{Fence, FenceHandle, FenceLayer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use redis::aio::ConnectionManager;
use support::RedisServer;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

type Origin = BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;
type Svc = Fence<Origin, ConnectionManager>;

/// What the origin sees: a version number it reports, a call counter, an
/// optional delay, and a flag set when an origin future is dropped early.
#[derive(Clone, Default)]
struct World {
    version: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
    dropped: Arc<AtomicBool>,
}

struct DropFlag(Arc<AtomicBool>, bool);
impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

fn origin(world: World) -> Origin {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
        let world = world.clone();
        async move {
            world.calls.fetch_add(1, Ordering::SeqCst);
            let version = world.version.load(Ordering::SeqCst);
            let mut flag = DropFlag(world.dropped.clone(), false);
            let delay = world.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            flag.1 = true;
            let mut res = Response::new(Full::new(Bytes::from(format!("{version}"))));
            // Tags: `t:<path>` plus whatever the request asks for.
            let mut tags = format!("t:{}", req.uri().path());
            if let Some(extra) = req.headers().get("x-tags").and_then(|v| v.to_str().ok()) {
                tags.push(' ');
                tags.push_str(extra);
            }
            res.headers_mut().insert("cache-tag", tags.parse().unwrap());
            Ok::<_, Infallible>(res)
        }
    }))
}

async fn layer(redis: &RedisServer, ns: &str) -> FenceLayer<ConnectionManager> {
    FenceLayer::new(redis.connection_manager().await)
        .namespace(ns)
        .beta(0.0)
        .wake_ups(redis.client())
}

fn fence(layer: &FenceLayer<ConnectionManager>, world: &World) -> Svc {
    layer.layer(origin(world.clone()))
}

async fn get(svc: &Svc, path: &str) -> (String, String) {
    get_with(svc, path, &[]).await
}

async fn get_with(svc: &Svc, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = svc
        .clone()
        .oneshot(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = res
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        res.headers().get("cache-tag").is_none(),
        "tag headers are stripped"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn no_read_after_an_invalidation_returns_an_older_version() {
    // Two layers on one Redis play two processes. Each trial: concurrent
    // reads on both of a cold key (filling, with random origin delays), a
    // write that bumps the version and invalidates through a random handle
    // by path, prefix or tag, then reads on both that must see at least the
    // version current at the invalidation.
    let redis = RedisServer::new();
    let world = World::default();
    let (la, lb) = (layer(&redis, "race:").await, layer(&redis, "race:").await);
    let (a, b) = (fence(&la, &world), fence(&lb, &world));
    let handles = [la.handle(), lb.handle()];
    let trials: u64 = std::env::var("CACHEFENCE_RACE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let mut stale_reads = 0;
    for trial in 0..trials {
        let path = format!("/r/{}", trial % 7);
        world
            .delay_ms
            .store(rand::random_range(0..4), Ordering::SeqCst);
        // Cold, so the readers below start fills that race the invalidation.
        handles[0].invalidate_path(&path).await.unwrap();
        let mut readers = Vec::new();
        for i in 0..rand::random_range(1..6) {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            let path = path.clone();
            readers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(rand::random_range(0..2_000))).await;
                get(&svc, &path).await
            }));
        }
        tokio::time::sleep(Duration::from_micros(rand::random_range(0..1_500))).await;
        let current = world.version.fetch_add(1, Ordering::SeqCst) + 1;
        // By path, by prefix or by tag (the origin tags `t:<path>`).
        let handle = &handles[rand::random_range(0..2)];
        match rand::random_range(0..3) {
            0 => handle.invalidate_path(&path).await.unwrap(),
            1 => handle.invalidate_prefix(&path).await.unwrap(),
            _ => handle.invalidate_tag(&format!("t:{path}")).await.unwrap(),
        };
        for svc in [&a, &b] {
            let (_, body) = get(svc, &path).await;
            let seen: u64 = body.parse().unwrap();
            if seen < current {
                stale_reads += 1;
                eprintln!("trial {trial}: read version {seen} after invalidating at {current}");
            }
        }
        for r in readers {
            r.await.unwrap();
        }
    }
    let fenced = handles[0].stats().fenced + handles[1].stats().fenced;
    assert!(
        fenced > 0,
        "no fill raced an invalidation: the test tests nothing"
    );
    eprintln!(
        "race: {trials} trials, {stale_reads} stale reads, {} origin calls, fenced {} + {}",
        world.calls.load(Ordering::SeqCst),
        handles[0].stats().fenced,
        handles[1].stats().fenced
    );
    assert_eq!(stale_reads, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_back_that_started_before_an_invalidation_is_refused() {
    let redis = RedisServer::new();
    let world = World::default();
    let (la, lb) = (layer(&redis, "fence:").await, layer(&redis, "fence:").await);
    let a = fence(&la, &world);
    world.delay_ms.store(300, Ordering::SeqCst);
    let slow = tokio::spawn({
        let a = a.clone();
        async move { get(&a, "/f").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    world.version.store(1, Ordering::SeqCst);
    world.delay_ms.store(0, Ordering::SeqCst);
    // Invalidated from the other "process".
    lb.handle().invalidate_path("/f").await.unwrap();
    let (_, old) = slow.await.unwrap();
    assert_eq!(old, "0", "the leader's own request raced the invalidation");
    assert_eq!(la.handle().stats().fenced, 1, "its write-back was refused");
    let (status, body) = get(&a, "/f").await;
    assert_eq!((status.as_str(), body.as_str()), ("MISS", "1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn invalidation_aborts_a_local_fill_nobody_waits_for_and_restarts_its_joiners() {
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "abort:").await;
    let svc = fence(&l, &world);
    world.delay_ms.store(2_000, Ordering::SeqCst);
    // The leader's client gives up; the fill goes on (shielded).
    let leader = tokio::time::timeout(Duration::from_millis(50), get(&svc, "/slow")).await;
    assert!(leader.is_err());
    // A joiner waits on that fill.
    let joiner = tokio::spawn({
        let svc = svc.clone();
        async move { get(&svc, "/slow").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(l.handle().stats().coalesced, 1, "{:?}", l.handle().stats());
    world.version.store(7, Ordering::SeqCst);
    world.delay_ms.store(0, Ordering::SeqCst);
    let start = Instant::now();
    l.handle().invalidate_path("/slow").await.unwrap();
    // The joiner restarts with a new fill and gets the new version at once,
    // not after the old fill's 2 s.
    let (_, body) = joiner.await.unwrap();
    assert_eq!(body, "7");
    assert!(start.elapsed() < Duration::from_millis(1_500));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        world.dropped.load(Ordering::SeqCst),
        "the old origin future was dropped"
    );
    assert_eq!(world.calls.load(Ordering::SeqCst), 2);
    assert_eq!(l.handle().stats().detached, 1);
    let (status, body) = get(&svc, "/slow").await;
    assert_eq!((status.as_str(), body.as_str()), ("HIT", "7"));
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_invalidation_never_treats_path_characters_as_globs() {
    let redis = RedisServer::new();
    let world = World::default();
    // Keys taken verbatim from a header, so any text can be a key.
    let l = layer(&redis, "glob:")
        .await
        .key(|p: &http::request::Parts| {
            p.headers
                .get("x-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
    let svc = fence(&l, &world);
    let keys = ["a*", "a?", "a[1]", "a\\b", "ab", "a", "a-z", "a^", "b*"];
    let fill = |k: &'static str| {
        let svc = svc.clone();
        async move { get_with(&svc, "/", &[("x-key", k)]).await }
    };
    for k in keys {
        assert_eq!(fill(k).await.0, "MISS");
    }
    let h = l.handle();
    assert_eq!(h.invalidate_prefix("a*").await.unwrap(), 1);
    assert_eq!(h.invalidate_prefix("a[").await.unwrap(), 1);
    assert_eq!(h.invalidate_prefix("a\\").await.unwrap(), 1);
    assert_eq!(h.invalidate_prefix("a?").await.unwrap(), 1);
    for gone in ["a*", "a[1]", "a\\b", "a?"] {
        assert_eq!(fill(gone).await.0, "MISS", "{gone}");
    }
    for kept in ["ab", "a", "a-z", "a^", "b*"] {
        assert_eq!(fill(kept).await.0, "HIT", "{kept}");
    }
    // A prefix matching several, and one longer than the readable part of
    // a Redis key (checked against the stored key).
    assert_eq!(h.invalidate_prefix("a").await.unwrap(), 9 - 1);
    let long_a = format!("L{}", "x".repeat(400));
    let long_b = format!("{long_a}y");
    let long_c = format!("L{}z", "x".repeat(300));
    for k in [&long_a, &long_b, &long_c] {
        get_with(&svc, "/", &[("x-key", k)]).await;
    }
    assert_eq!(h.invalidate_prefix(&long_a).await.unwrap(), 2);
    assert_eq!(get_with(&svc, "/", &[("x-key", &long_c)]).await.0, "HIT");
    assert!(
        h.invalidate_prefix("")
            .await
            .unwrap_err()
            .is_invalid_input()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_reach_many_entries_and_entries_carry_many_tags() {
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "tags:").await;
    let svc = fence(&l, &world);
    for i in 0..50 {
        let tags = if i % 2 == 0 { "even all" } else { "odd all" };
        get_with(&svc, &format!("/t/{i}"), &[("x-tags", tags)]).await;
    }
    let h = l.handle();
    assert_eq!(h.invalidate_tag("even").await.unwrap(), 25);
    assert_eq!(get(&svc, "/t/0").await.0, "MISS");
    assert_eq!(get(&svc, "/t/1").await.0, "HIT");
    // Per-path tag `t:/t/1`.
    assert_eq!(h.invalidate_tag("t:/t/1").await.unwrap(), 1);
    // "all" still lists everything that exists; entries gone already count 0.
    // The 25 odd ones but /t/1, and /t/0: refilled without the tag, it is
    // still listed under it (indexes are by URL; an extra miss is harmless).
    let removed = h.invalidate_tag("all").await.unwrap();
    assert_eq!(removed, 25);
    assert_eq!(h.invalidate_tag("nothing").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tag_index_expires_with_its_entries() {
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "tagttl:")
        .await
        .ttl(Duration::from_millis(200))
        .grace(Duration::ZERO);
    let svc = fence(&l, &world);
    for i in 0..20 {
        get_with(&svc, &format!("/e/{i}"), &[("x-tags", "shared")]).await;
    }
    let tag_keys = || redis.cli(&["KEYS", "tagttl:|#tag:*"]);
    assert!(tag_keys().contains("shared"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !tag_keys().contains("shared"),
        "index left behind: {}",
        tag_keys()
    );
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "{}", redis.cli(&["KEYS", "*"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_started_before_a_tag_invalidation_cannot_store() {
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "tagfence:").await;
    let svc = fence(&l, &world);
    world.delay_ms.store(300, Ordering::SeqCst);
    let slow = tokio::spawn({
        let svc = svc.clone();
        async move { get_with(&svc, "/tf", &[("x-tags", "hot")]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    world.delay_ms.store(0, Ordering::SeqCst);
    world.version.store(1, Ordering::SeqCst);
    // Nothing is indexed under the tag yet: only the fence can stop the fill.
    assert_eq!(l.handle().invalidate_tag("hot").await.unwrap(), 0);
    assert_eq!(slow.await.unwrap().1, "0");
    assert_eq!(l.handle().stats().fenced, 1);
    assert_eq!(get(&svc, "/tf").await, ("MISS".into(), "1".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_invalidation_serves_stale_while_one_refresh_runs() {
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "soft:").await;
    let svc = fence(&l, &world);
    get(&svc, "/s").await;
    world.version.store(1, Ordering::SeqCst);
    assert_eq!(l.handle().soft_invalidate_path("/s").await.unwrap(), 1);
    let (status, body) = get(&svc, "/s").await;
    assert_eq!((status.as_str(), body.as_str()), ("STALE", "0"));
    let mut last = (String::new(), String::new());
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        last = get(&svc, "/s").await;
        if last.0 == "HIT" {
            break;
        }
    }
    assert_eq!(last, ("HIT".into(), "1".into()));
    assert_eq!(world.calls.load(Ordering::SeqCst), 2);
    // Soft by tag and prefix too.
    assert_eq!(l.handle().soft_invalidate_tag("t:/s").await.unwrap(), 1);
    assert_eq!(get(&svc, "/s").await.0, "STALE");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(l.handle().soft_invalidate_prefix("/s").await.unwrap(), 1);
    assert_eq!(get(&svc, "/s").await.0, "STALE");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalidate_all_empties_the_namespace_and_only_it() {
    let redis = RedisServer::new();
    let world = World::default();
    let (la, lb) = (layer(&redis, "all").await, layer(&redis, "all-b").await);
    let (a, b) = (fence(&la, &world), fence(&lb, &world));
    for i in 0..30 {
        get(&a, &format!("/x/{i}")).await;
        get(&b, &format!("/x/{i}")).await;
    }
    assert_eq!(la.handle().invalidate_all().await.unwrap(), 30);
    // "all" is a prefix of "all-b": the other namespace keeps everything.
    assert_eq!(redis.cli(&["KEYS", "all|*"]), "");
    assert_eq!(get(&b, "/x/3").await.0, "HIT");
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_invalidation_over_many_entries_is_bounded_and_does_not_block_hits() {
    let n: usize = std::env::var("CACHEFENCE_PURGE_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "purge:").await;
    let svc = fence(&l, &world);
    // Fill through the layer, 64 at a time.
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..n {
        let svc = svc.clone();
        pending.push(tokio::spawn(
            async move { get(&svc, &format!("/p/{i}")).await },
        ));
        if pending.len() == 64 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    get(&svc, "/other").await;
    let filled_in = started.elapsed();
    // Hits on another key keep flowing while the purge runs.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = tokio::spawn({
        let (svc, stop) = (svc.clone(), stop.clone());
        async move {
            let mut worst = Duration::ZERO;
            let mut count = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let (status, _) = get(&svc, "/other").await;
                assert_eq!(status, "HIT");
                worst = worst.max(t.elapsed());
                count += 1;
            }
            (worst, count)
        }
    });
    let rss_before = support::peak_rss_kib();
    let t = Instant::now();
    let removed = l.handle().invalidate_prefix("/p/").await.unwrap();
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (worst_hit, hits) = prober.await.unwrap();
    let grown = support::peak_rss_kib().saturating_sub(rss_before);
    eprintln!(
        "purge: {n} entries filled in {filled_in:?}; invalidate_prefix removed {removed} in {took:?}; \
         peak RSS grew {grown} KiB; {hits} concurrent hits, worst {worst_hit:?}"
    );
    assert_eq!(removed, n as u64);
    assert_eq!(redis.cli(&["KEYS", "purge:|/p/*"]), "");
    assert!(hits > 0);
}

#[allow(dead_code)]
fn handle_is_send_sync(h: FenceHandle<ConnectionManager>) -> impl Send + Sync {
    h
}
