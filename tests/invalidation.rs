//! Invalidation always wins: fenced write-backs, local aborts, prefixes with
//! glob characters, tags, soft purges, and a randomized race test.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachefence::{Fence, FenceCache, FenceHandle, FenceLayer};
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
#[derive(Clone)]
struct World {
    version: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
    dropped: Arc<AtomicBool>,
    /// Requests with `x-hold` read the version, count themselves in `held`
    /// and wait for a permit of `gate` before answering.
    gate: Arc<tokio::sync::Semaphore>,
    held: Arc<AtomicUsize>,
}

impl Default for World {
    fn default() -> Self {
        Self {
            version: Arc::default(),
            calls: Arc::default(),
            delay_ms: Arc::default(),
            dropped: Arc::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            held: Arc::default(),
        }
    }
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
            if req.headers().contains_key("x-hold") {
                world.held.fetch_add(1, Ordering::SeqCst);
                world.gate.acquire().await.unwrap().forget();
            }
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
            // Paths under /v/ vary on the language.
            if req.uri().path().starts_with("/v/") {
                res.headers_mut()
                    .insert("vary", http::HeaderValue::from_static("accept-language"));
            }
            Ok::<_, Infallible>(res)
        }
    }))
}

async fn layer(redis: &RedisServer, ns: &str) -> FenceLayer<ConnectionManager> {
    layer_with(redis, ns, false).await
}

/// [`layer`], with a near cache when `near`.
async fn layer_with(redis: &RedisServer, ns: &str, near: bool) -> FenceLayer<ConnectionManager> {
    let cache = FenceCache::builder(redis.connection_manager().await).wake_ups(redis.client());
    let cache = if near {
        cache.near_cache(1 << 20)
    } else {
        cache
    };
    cache
        .build()
        .expect("cache")
        .layer()
        .namespace(ns)
        .beta(0.0)
}

fn fence(layer: &FenceLayer<ConnectionManager>, world: &World) -> Svc {
    layer.layer(origin(world.clone()))
}

async fn get(svc: &Svc, path: &str) -> (String, String) {
    get_with(svc, path, &[]).await
}

/// How many trials (or fills) the race tests run: 2,000 by default,
/// `CACHEFENCE_RACE_TRIALS=20000` for the long run.
fn race_trials() -> u64 {
    std::env::var("CACHEFENCE_RACE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// A read after an invalidation returned that must not be older than
/// `current`. A soft invalidation may still serve the old version marked
/// `STALE`, never as fresh.
fn is_stale_read((status, body): &(String, String), current: u64, soft: bool) -> bool {
    let seen: u64 = body.parse().unwrap();
    seen < current && !(soft && status == "STALE")
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
    race("race:", false, race_trials()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_read_after_an_invalidation_returns_an_older_version_with_near_caches() {
    // The same with a near cache in each "process": readers read twice, so
    // entries are in the near caches when the invalidation comes, and the
    // kinds include the whole namespace and soft invalidations.
    race("nrace:", true, race_trials() / 2).await;
}

async fn race(ns: &str, near: bool, trials: u64) {
    // Two layers on one Redis play two processes. Each trial: concurrent
    // reads on both of a cold key (filling, with random origin delays), a
    // write that bumps the version and invalidates through a random handle
    // by path, prefix or tag, then reads on both that must see at least the
    // version current at the invalidation.
    let redis = RedisServer::new();
    let world = World::default();
    let (la, lb) = (
        layer_with(&redis, ns, near).await,
        layer_with(&redis, ns, near).await,
    );
    let (a, b) = (fence(&la, &world), fence(&lb, &world));
    let handles = [la.handle(), lb.handle()];
    let (reads, kinds) = if near { (2, 7) } else { (1, 3) };
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
                for _ in 1..reads {
                    get(&svc, &path).await;
                }
                get(&svc, &path).await
            }));
        }
        tokio::time::sleep(Duration::from_micros(rand::random_range(0..1_500))).await;
        let current = world.version.fetch_add(1, Ordering::SeqCst) + 1;
        // By path, by prefix or by tag (the origin tags `t:<path>`).
        let handle = &handles[rand::random_range(0..2)];
        let kind = rand::random_range(0..kinds);
        match kind {
            0 => handle.invalidate_path(&path).await.unwrap(),
            1 => handle.invalidate_prefix(&path).await.unwrap(),
            2 => handle.invalidate_tag(&format!("t:{path}")).await.unwrap(),
            3 => handle.invalidate_all().await.unwrap(),
            4 => handle.soft_invalidate_path(&path).await.unwrap(),
            5 => handle.soft_invalidate_prefix(&path).await.unwrap(),
            _ => handle
                .soft_invalidate_tag(&format!("t:{path}"))
                .await
                .unwrap(),
        };
        for svc in [&a, &b] {
            let read = get(svc, &path).await;
            if is_stale_read(&read, current, kind >= 4) {
                stale_reads += 1;
                eprintln!(
                    "trial {trial}: read {read:?} after invalidating (kind {kind}) at {current}"
                );
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
    let near_hits = handles[0].stats().near_hits + handles[1].stats().near_hits;
    let evictions = handles[0].stats().near_evictions + handles[1].stats().near_evictions;
    eprintln!(
        "race: {trials} trials, {stale_reads} stale reads, {} origin calls, fenced {} + {}, \
         near hits {near_hits}, near evictions {evictions}",
        world.calls.load(Ordering::SeqCst),
        handles[0].stats().fenced,
        handles[1].stats().fenced
    );
    if near {
        assert!(
            near_hits > 0 && evictions > 0,
            "the near caches were not used"
        );
    }
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
    // The index has no TTL (no volatile-* policy may evict it): the next
    // write after its entries expired removes it (see tests/eviction.rs).
    for index in tag_keys().lines() {
        assert_eq!(redis.cli(&["PTTL", index]), "-1", "{index}");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // 21 indexes (each entry's `t:<path>` and `shared`), 16 reaped a write.
    get(&svc, "/untagged/1").await;
    get(&svc, "/untagged/2").await;
    assert!(
        !tag_keys().contains("shared"),
        "index left behind: {}",
        tag_keys()
    );
    // The last entries expire by themselves; what is left is their tag
    // indexes (`t:<path>`), until the next write reaps them, and the keep
    // set listing them.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(redis.cli(&["DBSIZE"]), "3", "{}", redis.cli(&["KEYS", "*"]));
    assert_eq!(redis.cli(&["ZCARD", "tagttl:|#keep"]), "2");
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
    // Only the namespace's fence and the time of the newest fence are left
    // (the keep set removes them when due), the keep set, and the tag indexes (a walk removes only what
    // it invalidated: entries stored while it ran keep their tags; members
    // naming removed entries expire).
    let left = redis.cli(&["KEYS", "all|*"]);
    let mut left: Vec<&str> = left
        .lines()
        .filter(|k| !k.starts_with("all|#tag:"))
        .collect();
    left.sort_unstable();
    assert_eq!(left, ["all|#fences", "all|#fences:last", "all|#keep"]);
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
    // (A fill whose store timed out on a loaded machine stored nothing.)
    let present = count_entries(&redis, "purge:|/p/*");
    let rss_before = support::peak_rss_kib();
    let t = Instant::now();
    let removed = l.handle().invalidate_prefix("/p/").await.unwrap();
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (worst_hit, hits) = prober.await.unwrap();
    let grown = support::peak_rss_kib().saturating_sub(rss_before);
    eprintln!(
        "purge: {n} entries filled in {filled_in:?}; invalidate_prefix removed {removed} in {took:?}; \
         peak RSS grew {grown} KiB; {hits} concurrent hits, worst {worst_hit:?}; {} redis errors",
        l.handle().stats().redis_errors
    );
    assert_eq!(removed, present);
    assert_eq!(redis.cli(&["KEYS", "purge:|/p/*"]), "");
    assert!(hits > 0);
}

#[allow(dead_code)]
fn handle_is_send_sync(h: FenceHandle<ConnectionManager>) -> impl Send + Sync {
    h
}

/// Fills `<prefix>0` .. `<prefix>{n-1}` through `svc`, 64 at a time.
async fn fill_range(svc: &Svc, prefix: &str, n: usize, headers: &'static [(&str, &str)]) {
    let mut pending = Vec::new();
    for i in 0..n {
        let svc = svc.clone();
        let path = format!("{prefix}{i}");
        pending.push(tokio::spawn(
            async move { get_with(&svc, &path, headers).await },
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
}

/// How many entries (primary keys: the names ending in the digest's `}`)
/// match a pattern.
fn count_entries(redis: &RedisServer, pattern: &str) -> u64 {
    let script = "return #redis.call('KEYS', ARGV[1] .. '}')";
    redis.cli(&["EVAL", script, "0", pattern]).parse().unwrap()
}

/// Waits (a hang guard, not a timing) until `n` held origin calls arrived.
async fn until_held(world: &World, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while world.held.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "held fills never reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn fenced(handles: &[FenceHandle<ConnectionManager>]) -> u64 {
    handles.iter().map(|h| h.stats().fenced).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_variants_racing_a_path_invalidation_never_store_old_data() {
    // A URL whose responses vary on Accept-Language, with `en` cached. Each
    // trial asks for a language never stored before (so its fill's lease is
    // listed nowhere yet), bumps the version and invalidates the URL by path
    // while that fill runs, then reads both variants on both "processes".
    let redis = RedisServer::new();
    let world = World::default();
    let (la, lb) = (layer(&redis, "vrace:").await, layer(&redis, "vrace:").await);
    let (a, b) = (fence(&la, &world), fence(&lb, &world));
    let handles = [la.handle(), lb.handle()];
    let trials = race_trials();
    let mut stale_reads = 0;
    for trial in 0..trials {
        let path = format!("/v/{}", trial % 5);
        let lang = format!("l{trial}");
        world
            .delay_ms
            .store(rand::random_range(0..4), Ordering::SeqCst);
        get_with(&a, &path, &[("accept-language", "en")]).await;
        let mut readers = Vec::new();
        for i in 0..rand::random_range(1..5) {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (path, lang) = (path.clone(), lang.clone());
            readers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(rand::random_range(0..1_500))).await;
                get_with(&svc, &path, &[("accept-language", &lang)]).await
            }));
        }
        tokio::time::sleep(Duration::from_micros(rand::random_range(0..1_500))).await;
        let current = world.version.fetch_add(1, Ordering::SeqCst) + 1;
        handles[rand::random_range(0..2)]
            .invalidate_path(&path)
            .await
            .unwrap();
        for svc in [&a, &b] {
            for l in [lang.as_str(), "en"] {
                let read = get_with(svc, &path, &[("accept-language", l)]).await;
                if is_stale_read(&read, current, false) {
                    stale_reads += 1;
                    eprintln!("trial {trial}: {l} read {read:?} after invalidating at {current}");
                }
            }
        }
        for r in readers {
            r.await.unwrap();
        }
    }
    let fenced = fenced(&handles);
    eprintln!(
        "variants: {trials} trials, {stale_reads} stale reads, {} origin calls, {fenced} fenced",
        world.calls.load(Ordering::SeqCst)
    );
    assert!(fenced > 0, "no variant fill raced an invalidation");
    assert_eq!(stale_reads, 0);
}

/// The newest prefix fence of a namespace (Redis ms), 0 if none.
async fn newest_fence(conn: &mut ConnectionManager, namespace: &str) -> u64 {
    let newest: Vec<String> = redis::cmd("ZREVRANGE")
        .arg(format!("{namespace}|#fences"))
        .arg(0)
        .arg(0)
        .arg("WITHSCORES")
        .query_async(conn)
        .await
        .unwrap();
    newest.get(1).map_or(0, |s| s.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_and_namespace_walks_fence_fills_that_store_while_they_run() {
    let entries: usize = std::env::var("CACHEFENCE_WALK_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    walks("walk", false, entries).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_and_namespace_walks_fence_fills_that_store_while_they_run_with_near_caches() {
    // The same with a near cache in each "process", holding the walked
    // entries (read twice through each before every walk); fewer entries.
    walks("nwalk", true, 2_000).await;
}

async fn walks(ns: &str, near: bool, entries: usize) {
    // 10,000 entries under /item/pw-. Each round: cold fills under the same
    // prefix reach the origin (their leases are taken) and are held there;
    // the version changes; a prefix or whole-namespace invalidation (soft,
    // then hard) starts, and once its fence is set the held fills are let go
    // a few at a time while its walk runs, so they store into parts of the
    // keyspace the walk has already passed. Every one of them must be
    // refused, and no read after the call may see old data as fresh.
    // 500 fills a round (more at once only measures an overloaded Redis);
    // rounds cycle through the four kinds, at least one each.
    let kinds = [
        ("prefix", true),
        ("all", true),
        ("prefix", false),
        ("all", false),
    ];
    let per_round = 500;
    let rounds = (race_trials() as usize)
        .div_ceil(per_round)
        .max(kinds.len());
    let redis = RedisServer::new();
    let world = World::default();
    // Entries outlive the test, however slow the machine.
    let long = |l: FenceLayer<ConnectionManager>| l.ttl(Duration::from_secs(600));
    let (la, lb) = (
        long(layer_with(&redis, ns, near).await),
        long(layer_with(&redis, ns, near).await),
    );
    // With near caches, both read every entry (a Redis hit: taken in).
    let warm = async |a: &Svc, b: &Svc| {
        if near {
            fill_range(a, "/item/pw-", entries, &[]).await;
            fill_range(b, "/item/pw-", entries, &[]).await;
        }
    };
    let (a, b) = (fence(&la, &world), fence(&lb, &world));
    let handles = [la.handle(), lb.handle()];
    let mut conn = redis.connection_manager().await;
    fill_range(&a, "/item/pw-", entries, &[]).await;
    let mut stale_reads = 0;
    let mut during_total = 0;
    for round in 0..rounds {
        let (kind, soft) = kinds[round % kinds.len()];
        if round > 0 && !kinds[(round - 1) % kinds.len()].1 {
            // The hard round before removed them.
            fill_range(&a, "/item/pw-", entries, &[]).await;
        }
        warm(&a, &b).await;
        get(&a, "/other").await;
        world.held.store(0, Ordering::SeqCst);
        let mut fills = Vec::new();
        for j in 0..per_round {
            let svc = if j % 2 == 0 { a.clone() } else { b.clone() };
            let path = format!("/item/pw-cold-{round}-{j}");
            fills.push(tokio::spawn(async move {
                get_with(&svc, &path, &[("x-hold", "1")]).await;
                Instant::now()
            }));
        }
        until_held(&world, per_round).await;
        let fenced_before = fenced(&handles);
        let stat = |f: fn(&cachefence::Stats) -> u64| -> u64 {
            handles.iter().map(|h| f(&h.stats())).sum()
        };
        let (stores_before, errors_before) = (stat(|s| s.stores), stat(|s| s.redis_errors));
        let current = world.version.fetch_add(1, Ordering::SeqCst) + 1;
        let fence_before = newest_fence(&mut conn, ns).await;
        // Hits outside the prefix keep flowing during a prefix walk.
        let stop = Arc::new(AtomicBool::new(false));
        let prober = (kind == "prefix").then(|| {
            let (svc, stop) = (b.clone(), stop.clone());
            tokio::spawn(async move {
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
            })
        });
        // (A fill whose store timed out on a loaded machine stored nothing.)
        let present = if kind == "prefix" {
            count_entries(&redis, &format!("{ns}|/item/pw-*"))
        } else {
            count_entries(&redis, &format!("{ns}|/*"))
        };
        let handle = handles[round % 2].clone();
        let started = Instant::now();
        let walk = tokio::spawn(async move {
            match (kind, soft) {
                ("prefix", false) => handle.invalidate_prefix("/item/pw-").await,
                ("prefix", true) => handle.soft_invalidate_prefix("/item/pw-").await,
                (_, false) => handle.invalidate_all().await,
                (_, true) => handle.soft_invalidate_all().await,
            }
        });
        while newest_fence(&mut conn, ns).await <= fence_before && !walk.is_finished() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let mut released = 0;
        while released < per_round && !walk.is_finished() {
            let n = 4.min(per_round - released);
            world.gate.add_permits(n);
            released += n;
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let removed = walk.await.unwrap().unwrap();
        let (took, walk_end) = (started.elapsed(), Instant::now());
        world.gate.add_permits(per_round - released);
        stop.store(true, Ordering::SeqCst);
        let mut during = 0;
        for f in fills {
            if f.await.unwrap() < walk_end {
                during += 1;
            }
        }
        during_total += during;
        let fenced_now = fenced(&handles) - fenced_before;
        let stores = stat(|s| s.stores) - stores_before;
        let errors = stat(|s| s.redis_errors) - errors_before;
        let probe = match prober {
            Some(p) => {
                let (worst, hits) = p.await.unwrap();
                format!("; {hits} hits outside the prefix during it, worst {worst:?}")
            }
            None => String::new(),
        };
        eprintln!(
            "walk {kind}{}: {removed} entries in {took:?} ({:.0} entries/s); {per_round} fills \
             held before it, {during} stored during the walk, {fenced_now} fenced \
             ({stores} stores, {errors} redis errors){probe}",
            if soft { " (soft)" } else { "" },
            removed as f64 / took.as_secs_f64()
        );
        assert!(removed >= present, "{removed} of {present}");
        // Every held fill is refused (one whose store script timed out on
        // a loaded machine counts as a Redis error and stored nothing).
        assert_eq!(stores, 0, "a fill that started before the walk stored");
        assert!(fenced_now > 0 && fenced_now + errors >= per_round as u64);
        // Every raced key, and a sample of the walked entries, on both.
        let checks = (0..per_round)
            .map(|j| format!("/item/pw-cold-{round}-{j}"))
            .chain((0..entries).step_by(50).map(|i| format!("/item/pw-{i}")));
        for path in checks {
            for svc in [&a, &b] {
                let read = get(svc, &path).await;
                if is_stale_read(&read, current, soft) {
                    stale_reads += 1;
                    eprintln!(
                        "round {round}: {path} read {read:?} after invalidating at {current}"
                    );
                }
            }
        }
    }
    let near_hits = handles[0].stats().near_hits + handles[1].stats().near_hits;
    let evictions = handles[0].stats().near_evictions + handles[1].stats().near_evictions;
    eprintln!(
        "walks: {during_total} fills stored during the walks, {stale_reads} stale reads, \
         near hits {near_hits}, near evictions {evictions}"
    );
    if near {
        assert!(
            near_hits > 0 && evictions > 0,
            "the near caches were not used"
        );
    }
    assert!(during_total > 0, "no fill stored while a walk ran");
    assert_eq!(stale_reads, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_soft_purge_is_stale_for_a_reader_whose_clock_runs_behind() {
    skewed_soft_purges("skew:", false, race_trials()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_soft_purge_is_stale_for_a_reader_whose_clock_runs_behind_with_near_caches() {
    // The same with a near cache in each "process" (readers read twice, so
    // entries are in the near caches when the soft purge comes).
    skewed_soft_purges("nskew:", true, race_trials() / 2).await;
}

async fn skewed_soft_purges(ns: &str, near: bool, trials: u64) {
    // Process B's clock runs 20 s behind A's (and Redis's). Each trial:
    // fills race on a URL (cold or cached), the version changes, a random
    // handle soft-invalidates it by path, prefix, tag or namespace, and
    // both read: the old version may come back as STALE, never as fresh.
    let redis = RedisServer::new();
    let world = World::default();
    let (la, lb) = (
        layer_with(&redis, ns, near).await,
        layer_with(&redis, ns, near).await,
    );
    lb.handle().skew_clock_for_tests(-20_000);
    let (a, b) = (fence(&la, &world), fence(&lb, &world));
    let handles = [la.handle(), lb.handle()];
    let reads = if near { 2 } else { 1 };
    let mut stale_reads = 0;
    let mut kinds = [0u64; 4];
    for trial in 0..trials {
        let path = format!("/c/{}", trial % 7);
        world
            .delay_ms
            .store(rand::random_range(0..4), Ordering::SeqCst);
        if trial % 2 == 0 {
            handles[0].invalidate_path(&path).await.unwrap();
        }
        let mut readers = Vec::new();
        for i in 0..rand::random_range(1..5) {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            let path = path.clone();
            readers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(rand::random_range(0..2_000))).await;
                for _ in 1..reads {
                    get(&svc, &path).await;
                }
                get(&svc, &path).await
            }));
        }
        tokio::time::sleep(Duration::from_micros(rand::random_range(0..1_500))).await;
        let current = world.version.fetch_add(1, Ordering::SeqCst) + 1;
        let handle = &handles[rand::random_range(0..2)];
        let kind = rand::random_range(0..4);
        kinds[kind] += 1;
        match kind {
            0 => handle.soft_invalidate_path(&path).await.unwrap(),
            1 => handle.soft_invalidate_prefix(&path).await.unwrap(),
            2 => handle
                .soft_invalidate_tag(&format!("t:{path}"))
                .await
                .unwrap(),
            _ => handle
                .apply(&cachefence::Invalidation::all().soft())
                .await
                .unwrap(),
        };
        for svc in [&b, &a] {
            let read = get(svc, &path).await;
            if is_stale_read(&read, current, true) {
                stale_reads += 1;
                eprintln!("trial {trial}: read {read:?} after soft-invalidating at {current}");
            }
        }
        for r in readers {
            r.await.unwrap();
        }
    }
    let fenced = fenced(&handles);
    let stat = |f: fn(&cachefence::Stats) -> u64| f(&handles[0].stats()) + f(&handles[1].stats());
    eprintln!(
        "skewed soft purges: {trials} trials (path/prefix/tag/all {kinds:?}), {stale_reads} \
         stale reads, {fenced} fenced, {} stale served, near hits {}, near evictions {}",
        stat(|s| s.stale),
        stat(|s| s.near_hits),
        stat(|s| s.near_evictions)
    );
    assert!(fenced > 0, "no fill raced a soft invalidation");
    if near {
        assert!(stat(|s| s.near_hits) > 0 && stat(|s| s.near_evictions) > 0);
    }
    assert_eq!(stale_reads, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_tag_invalidation_skips_no_entry_while_the_tag_index_changes() {
    // Entries carrying one tag; while a soft invalidation of the tag pages
    // through its index, entries at the start of the index are stored again
    // (moving to its end), new ones are added, and fills held since before
    // the call store. No entry of the tag may be served old as fresh.
    let n = race_trials() as usize;
    let held = 50;
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "tagpage:").await;
    let svc = fence(&l, &world);
    let handle = l.handle();
    fill_range(&svc, "/d/", n, &[("x-tags", "grp")]).await;
    let mut fills = Vec::new();
    for j in 0..held {
        let svc = svc.clone();
        fills.push(tokio::spawn(async move {
            get_with(
                &svc,
                &format!("/d/cold-{j}"),
                &[("x-tags", "grp"), ("x-hold", "1")],
            )
            .await
        }));
    }
    until_held(&world, held).await;
    let current = world.version.fetch_add(1, Ordering::SeqCst) + 1;
    let stop = Arc::new(AtomicBool::new(false));
    const CHURNERS: usize = 4;
    let churn: Vec<_> = (0..CHURNERS)
        .map(|c| {
            let (svc, handle, stop) = (svc.clone(), handle.clone(), stop.clone());
            tokio::spawn(async move {
                let mut moved = 0;
                while !stop.load(Ordering::SeqCst) {
                    // The oldest entries: first in the index, stored again last.
                    let i = moved * CHURNERS + c;
                    let path = format!("/d/{}", i % n);
                    handle.invalidate_path(&path).await.unwrap();
                    get_with(&svc, &path, &[("x-tags", "grp")]).await;
                    get_with(&svc, &format!("/d/new-{i}"), &[("x-tags", "grp")]).await;
                    moved += 1;
                }
                moved
            })
        })
        .collect();
    let walk = tokio::spawn({
        let handle = handle.clone();
        async move { handle.soft_invalidate_tag("grp").await }
    });
    // The held fills go once the tag's fence is set, while the walk pages.
    while redis.cli(&["KEYS", "tagpage:|#tag:grp:*:fence"]).is_empty() {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let mut released = 0;
    while released < held && !walk.is_finished() {
        world.gate.add_permits(1);
        released += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let marked = walk.await.unwrap().unwrap();
    world.gate.add_permits(held - released);
    stop.store(true, Ordering::SeqCst);
    let mut moved = 0;
    for c in churn {
        moved += c.await.unwrap();
    }
    for f in fills {
        f.await.unwrap();
    }
    let fenced = handle.stats().fenced;
    let mut stale_reads = 0;
    let paths = (0..n)
        .map(|i| format!("/d/{i}"))
        .chain((0..held).map(|j| format!("/d/cold-{j}")));
    for path in paths {
        let read = get_with(&svc, &path, &[("x-tags", "grp")]).await;
        if is_stale_read(&read, current, true) {
            stale_reads += 1;
            eprintln!("{path} read {read:?} after soft-invalidating the tag at {current}");
        }
    }
    eprintln!(
        "soft tag: {n} entries, {marked} marked, {moved} stored again and {moved} added while \
         it paged, {released} held fills let go during it, {fenced} fenced, {stale_reads} stale reads"
    );
    assert!(
        fenced >= held as u64,
        "every held fill is refused: {fenced}"
    );
    assert!(moved > 0, "the index did not change while the walk paged");
    assert_eq!(stale_reads, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_url_keeps_at_most_max_variants_and_the_rest_pass_through() {
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "manyvar:").await;
    let svc = fence(&l, &world);
    let handle = l.handle();
    let lang = |i: usize| format!("x{i}");
    for i in 0..70 {
        let (status, _) = get_with(&svc, "/v/many", &[("accept-language", &lang(i))]).await;
        assert_eq!(status, "MISS", "{i}");
    }
    // The default bound is 64: the first 64 are cached, the rest are not.
    assert_eq!(handle.stats().variants_over_limit, 6);
    assert_eq!(
        get_with(&svc, "/v/many", &[("accept-language", &lang(3))])
            .await
            .0,
        "HIT"
    );
    assert_eq!(
        get_with(&svc, "/v/many", &[("accept-language", &lang(66))])
            .await
            .0,
        "MISS"
    );
    assert_eq!(handle.stats().variants_over_limit, 7);
    assert_eq!(
        redis.cli(&["SCARD", &redis.cli(&["KEYS", "manyvar:*:vars"])]),
        "64"
    );
    // Removed in batches; then new variants are stored again.
    assert_eq!(handle.invalidate_path("/v/many").await.unwrap(), 64);
    get_with(&svc, "/v/many", &[("accept-language", &lang(66))]).await;
    assert_eq!(
        get_with(&svc, "/v/many", &[("accept-language", &lang(66))])
            .await
            .0,
        "HIT"
    );
    // A smaller bound.
    let small = layer(&redis, "fewvar:").await.max_variants(2);
    let svc = fence(&small, &world);
    for i in 0..3 {
        get_with(&svc, "/v/few", &[("accept-language", &lang(i))]).await;
    }
    assert_eq!(small.handle().stats().variants_over_limit, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_invalidation_of_the_whole_namespace_marks_everything_stale() {
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "softall:").await;
    let svc = fence(&l, &world);
    for i in 0..10 {
        get(&svc, &format!("/s/{i}")).await;
    }
    world.version.store(1, Ordering::SeqCst);
    let inv = cachefence::Invalidation::all().soft();
    assert_eq!(
        cachefence::Invalidation::decode(&inv.encode()),
        Some(inv.clone())
    );
    assert_eq!(l.handle().apply(&inv).await.unwrap(), 10);
    let (status, body) = get(&svc, "/s/4").await;
    assert_eq!((status.as_str(), body.as_str()), ("STALE", "0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_detached_fill_ending_late_keeps_the_new_fills_lease_registered() {
    // Fill A is detached by an invalidation while its origin call runs; fill
    // B of the same key takes the lease; A ends. Shutdown must still release
    // B's lease (A's end must not drop B's registration).
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "reg:").await;
    let svc = fence(&l, &world);
    let handle = l.handle();
    let spawn_get = || {
        let svc = svc.clone();
        tokio::spawn(async move { get_with(&svc, "/k", &[("x-hold", "1")]).await })
    };
    let a = spawn_get();
    until_held(&world, 1).await;
    handle.invalidate_path("/k").await.unwrap();
    let b = spawn_get();
    until_held(&world, 2).await;
    // The gate is fair: the first permit goes to A.
    world.gate.add_permits(1);
    a.await.unwrap();
    assert_eq!(handle.stats().fenced, 1, "A's write-back was refused");
    assert_eq!(
        handle.shutdown(Duration::ZERO).await,
        1,
        "B's lease released"
    );
    assert_eq!(redis.cli(&["KEYS", "reg:*:lease"]), "");
    world.gate.add_permits(1);
    b.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_fences_stay_bounded_by_folding_into_a_namespace_fence() {
    let redis = RedisServer::new();
    let world = World::default();
    let l = layer(&redis, "fold:").await;
    let svc = fence(&l, &world);
    let h = l.handle();
    for i in 0..1_100 {
        h.invalidate_prefix(&format!("/f/{i}/")).await.unwrap();
    }
    let count: u64 = redis.cli(&["ZCARD", "fold:|#fences"]).parse().unwrap();
    assert!(count <= 1_024, "{count}");
    // Folded into one fence on the whole namespace (which fences more
    // fills, never fewer), and it expires by itself.
    assert_ne!(redis.cli(&["ZSCORE", "fold:|#fences", "fold:|"]), "");
    // It is removed when due, by the keep set (no TTL: out of eviction's
    // reach).
    assert_eq!(redis.cli(&["PTTL", "fold:|#fences"]), "-1");
    let due: u64 = redis
        .cli(&["ZSCORE", "fold:|#keep", "fold:|#fences"])
        .parse()
        .unwrap();
    let t = redis.cli(&["TIME"]);
    let now: u64 = t.lines().next().unwrap().parse::<u64>().unwrap() * 1000;
    assert!(due > now && due <= now + 61_000, "{due} {now}");
    // Fills that start after it store as usual.
    assert_eq!(get(&svc, "/f/1/x").await.0, "MISS");
    assert_eq!(get(&svc, "/f/1/x").await.0, "HIT");
}

/// Waits until `replica` has every write of `master`.
async fn replicated(master: &RedisServer, replica: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let offset =
            support::info_field(&master.cli(&["INFO", "replication"]), "master_repl_offset");
        let info = replica.cli(&["INFO", "replication"]);
        if info.contains("master_link_status:up")
            && support::info_field(&info, "slave_repl_offset") == offset
        {
            return;
        }
        assert!(Instant::now() < deadline, "the replica did not catch up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The keys of `redis` matching `pattern` that contain `part`.
fn keys_with(redis: &RedisServer, pattern: &str, part: &str) -> usize {
    redis
        .cli(&["KEYS", pattern])
        .lines()
        .filter(|k| k.contains(part))
        .count()
}

/// `FenceCache::replicated_fences(1, …)`: an invalidation returns once a
/// replica acknowledged its writes, so the replica already holds the fence
/// and not the entry when the call returns; with no replica it returns a
/// not-replicated error, the invalidation applied on the master, and
/// applying it again once a replica is back succeeds. Off by default: no
/// `WAIT` is sent.
#[tokio::test(flavor = "multi_thread")]
async fn replicated_fences_wait_for_a_replica_and_say_when_none_acknowledged() {
    let master = RedisServer::new();
    let mut replica =
        RedisServer::with_args(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    let world = World::default();
    let plain = layer(&master, "rep:").await;
    let svc = fence(&plain, &world);
    for path in ["/a", "/b", "/c"] {
        assert_eq!(get(&svc, path).await.0, "MISS");
    }
    replicated(&master, &replica).await;
    let handle = FenceCache::builder(master.connection_manager().await)
        .replicated_fences(1, Duration::from_millis(500))
        .namespace("rep:")
        .build()
        .expect("cache")
        .handle();

    master.reset_stats();
    assert_eq!(plain.handle().invalidate_path("/a").await.unwrap(), 1);
    assert_eq!(master.command_count("wait"), 0, "off by default");

    assert_eq!(handle.invalidate_path("/b").await.unwrap(), 1);
    assert_eq!(master.command_count("wait"), 1);
    // No waiting here: WAIT returned after the replica acknowledged.
    assert_eq!(
        keys_with(&replica, "rep:|*:fence", "/b"),
        1,
        "the fence replicated"
    );
    assert_eq!(
        count_entries(&replica, "rep:|/b:*"),
        0,
        "the entry deleted on the replica"
    );

    replica.stop();
    let err = handle.invalidate_path("/c").await.unwrap_err();
    assert!(err.is_not_replicated(), "{err}");
    assert_eq!(
        count_entries(&master, "rep:|/c:*"),
        0,
        "applied on the master"
    );
    assert_eq!(keys_with(&master, "rep:|*:fence", "/c"), 1);

    replica.start();
    replicated(&master, &replica).await;
    assert_eq!(handle.invalidate_path("/c").await.unwrap(), 0);
    assert_eq!(keys_with(&replica, "rep:|*:fence", "/c"), 1);
}
