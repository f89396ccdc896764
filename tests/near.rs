//! The near cache (`FenceCache::near_cache`): hits with no Redis command,
//! coherence across caches (every store and invalidation through one drops
//! the entry in the others before the call returns), and the flush while
//! its subscription is down.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use cachefence::{FenceCache, FenceHandle};
use redis::aio::ConnectionManager;
use support::gate::until;
use support::{Http, RedisServer, serve};

const NS: &str = "near:";

/// One "process": its own connection, listener and near cache, and an app
/// whose origin answers the shared version, tagged `t:<path>`.
struct Proc {
    cache: FenceCache<ConnectionManager>,
    handle: FenceHandle<ConnectionManager>,
    addr: std::net::SocketAddr,
}

/// A cache of namespace [`NS`] with wake-ups and a 1 MiB near cache.
async fn near_cache(redis: &RedisServer) -> FenceCache<ConnectionManager> {
    FenceCache::builder(redis.connection_manager().await)
        .namespace(NS)
        .wake_ups(redis.client())
        .near_cache(1 << 20)
        .build()
        .expect("cache")
}

/// A [`Proc`] on a [`near_cache`] serving `app(&cache)`, returned once its
/// near cache is up.
async fn start(
    redis: &RedisServer,
    app: impl FnOnce(&FenceCache<ConnectionManager>) -> Router,
) -> Proc {
    let cache = near_cache(redis).await;
    let addr = serve(app(&cache)).await;
    up(&cache).await;
    Proc {
        handle: cache.handle(),
        cache,
        addr,
    }
}

async fn proc(redis: &RedisServer, version: &Arc<AtomicU64>, calls: &Arc<AtomicU64>) -> Proc {
    let (version, calls) = (version.clone(), calls.clone());
    let origin = move |uri: axum::http::Uri| {
        let (version, calls) = (version.clone(), calls.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut headers = HeaderMap::new();
            headers.insert("cache-tag", format!("t:{}", uri.path()).parse().unwrap());
            (headers, version.load(Ordering::SeqCst).to_string())
        }
    };
    // `no-cache` asks for a refetch (and so a store over a fresh entry).
    start(redis, |cache| {
        Router::new().route(
            "/{*path}",
            get(origin).layer(cache.layer().honor_request_no_cache(true)),
        )
    })
    .await
}

async fn up(cache: &FenceCache<ConnectionManager>) {
    until("the near cache's subscription", || {
        cache.near_is_up_for_tests()
    })
    .await;
}

/// Reads `path` through `p` until its near cache holds it (a miss or a
/// Redis hit first, then the near hit). Returns the body.
async fn warm(http: &Http, p: &Proc, path: &str) -> String {
    for _ in 0..5 {
        let reply = http.get(p.addr, path).await;
        if p.cache.near_holds_for_tests(NS, path) {
            return reply.text();
        }
    }
    panic!("{path} never reached the near cache");
}

#[tokio::test(flavor = "multi_thread")]
async fn near_hits_make_no_redis_command() {
    let redis = RedisServer::new();
    let (version, calls) = (Arc::default(), Arc::default());
    let p = proc(&redis, &version, &calls).await;
    let http = Http::new();
    assert_eq!(http.get(p.addr, "/a").await.cache_status(), Some("MISS"));
    // A hit from Redis, whose version is marked, then taken in.
    let hit = http.get(p.addr, "/a").await;
    assert_eq!(hit.cache_status(), Some("HIT"));
    assert!(p.cache.near_holds_for_tests(NS, "/a"));
    let before = p.cache.stats();
    redis.reset_stats();
    for _ in 0..20 {
        let reply = http.get(p.addr, "/a").await;
        assert_eq!(reply.cache_status(), Some("HIT"));
        assert_eq!(reply.text(), "0");
        assert!(reply.header("age").is_some());
    }
    // The listener's liveness traffic (its probe, its registration) is not
    // a hit's.
    let liveness: u64 = ["ping", "zadd", "zremrangebyscore", "pexpire"]
        .iter()
        .map(|c| redis.command_count(c))
        .sum();
    assert_eq!(
        redis.total_commands() - liveness,
        0,
        "{:?}",
        redis.commandstats()
    );
    let after = p.cache.stats();
    assert_eq!(after.near_hits - before.near_hits, 20);
    assert_eq!(after.hits - before.hits, 20);
    assert_eq!(after.redis_calls, before.redis_calls);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// The kinds of invalidation, each through `by`'s handle.
async fn invalidate(kind: &str, by: &FenceHandle<ConnectionManager>, path: &str) {
    match kind {
        "key" => {
            let uri: http::Uri = format!("http://{}{path}", support::TEST_HOST)
                .parse()
                .unwrap();
            by.invalidate_uri(&uri).await.unwrap();
        }
        "path" => {
            by.invalidate_path(path).await.unwrap();
        }
        "prefix" => {
            by.invalidate_prefix(path).await.unwrap();
        }
        "tag" => {
            by.invalidate_tag(&format!("t:{path}")).await.unwrap();
        }
        "all" => {
            by.invalidate_all().await.unwrap();
        }
        "soft path" => {
            by.soft_invalidate_path(path).await.unwrap();
        }
        "soft prefix" => {
            by.soft_invalidate_prefix(path).await.unwrap();
        }
        "soft tag" => {
            by.soft_invalidate_tag(&format!("t:{path}")).await.unwrap();
        }
        "soft all" => {
            by.soft_invalidate_all().await.unwrap();
        }
        other => unreachable!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_invalidation_through_one_cache_drops_the_entry_in_the_other_before_it_returns() {
    let redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let a = proc(&redis, &version, &calls).await;
    let b = proc(&redis, &version, &calls).await;
    let http = Http::new();
    let kinds = [
        "key",
        "path",
        "prefix",
        "tag",
        "all",
        "soft path",
        "soft prefix",
        "soft tag",
        "soft all",
    ];
    for (i, kind) in kinds.iter().enumerate() {
        let path = format!("/k/{i}");
        let old = warm(&http, &a, &path).await;
        assert_eq!(warm(&http, &b, &path).await, old);
        let evictions = b.cache.stats().near_evictions;
        let new = version.fetch_add(1, Ordering::SeqCst) + 1;
        invalidate(kind, &a.handle, &path).await;
        // Dropped everywhere when the call returns: no waiting here.
        assert!(!b.cache.near_holds_for_tests(NS, &path), "{kind}: b");
        assert!(!a.cache.near_holds_for_tests(NS, &path), "{kind}: a");
        assert!(b.cache.stats().near_evictions > evictions, "{kind}");
        for p in [&b, &a] {
            let reply = http.get(p.addr, &path).await;
            let soft_stale = kind.starts_with("soft") && reply.cache_status() == Some("STALE");
            assert!(
                reply.text() == new.to_string() || soft_stale,
                "{kind}: read {} ({:?}) after invalidating at {new}",
                reply.text(),
                reply.cache_status()
            );
        }
    }
    assert_eq!(a.cache.stats().near_flushes, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_with_no_layer_and_no_near_cache_hears_the_acknowledgements() {
    // An invalidation worker's shape: a cache with wake-ups whose handle
    // invalidates, with no route and no near cache of its own.
    let redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let p = proc(&redis, &version, &calls).await;
    let admin = FenceCache::builder(redis.connection_manager().await)
        .namespace(NS)
        .wake_ups(redis.client())
        .build()
        .expect("cache");
    let handle = admin.handle();
    let http = Http::new();
    until("the admin's acknowledgement channel", || {
        redis
            .cli(&["PUBSUB", "CHANNELS", &format!("{NS}|#ack:*")])
            .lines()
            .filter(|l| !l.is_empty())
            .count()
            == 2
    })
    .await;
    for i in 0..20 {
        let path = format!("/w/{i}");
        warm(&http, &p, &path).await;
        handle.invalidate_path(&path).await.unwrap();
        assert!(!p.cache.near_holds_for_tests(NS, &path));
    }
    assert_eq!(admin.stats().near_ack_timeouts, 0);
    assert_eq!(p.cache.stats().near_evictions, 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_through_one_cache_drops_the_entry_in_the_other() {
    let redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let a = proc(&redis, &version, &calls).await;
    let b = proc(&redis, &version, &calls).await;
    let http = Http::new();
    warm(&http, &a, "/s").await;
    assert_eq!(warm(&http, &b, "/s").await, "0");
    version.store(1, Ordering::SeqCst);
    // A refetch through `a` stores version 1 over the fresh version 0.
    let req = http::Request::get(format!("http://{}/s", a.addr))
        .header("cache-control", "no-cache")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(http.request(req).await.text(), "1");
    // The storing process drops its own copy before answering.
    assert!(!a.cache.near_holds_for_tests(NS, "/s"));
    assert_eq!(http.get(a.addr, "/s").await.text(), "1");
    // A store does not wait for acknowledgements: its announcement reaches
    // `b` on its own.
    until("b dropping the stored-over entry", || {
        !b.cache.near_holds_for_tests(NS, "/s")
    })
    .await;
    assert_eq!(http.get(b.addr, "/s").await.text(), "1");
    assert_eq!(warm(&http, &b, "/s").await, "1");
    assert_eq!(http.get(b.addr, "/s").await.text(), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_subscription_flushes_the_near_cache_until_it_is_back() {
    let mut redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let p = proc(&redis, &version, &calls).await;
    let http = Http::new();
    warm(&http, &p, "/l").await;

    // The listener's connection killed: flushed, then in use again.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    until("the flush", || p.cache.stats().near_flushes == 1).await;
    assert!(!p.cache.near_holds_for_tests(NS, "/l"));
    up(&p.cache).await;
    warm(&http, &p, "/l").await;
    let hits = p.cache.stats().near_hits;
    assert_eq!(http.get(p.addr, "/l").await.cache_status(), Some("HIT"));
    assert_eq!(p.cache.stats().near_hits, hits + 1);

    // Redis restarted (empty): flushed, bypassed while it is down, filled
    // again when it is back.
    redis.stop();
    until("the flush", || p.cache.stats().near_flushes == 2).await;
    assert!(!p.cache.near_is_up_for_tests());
    let hits = p.cache.stats().near_hits;
    let reply = http.get(p.addr, "/l").await;
    assert_eq!(reply.status, 200);
    assert_ne!(reply.cache_status(), Some("HIT"), "no near hit while down");
    assert_eq!(p.cache.stats().near_hits, hits);
    redis.start();
    up(&p.cache).await;
    version.store(7, Ordering::SeqCst);
    // The old entry went with the restart; the new one is taken in.
    until("the breaker closing", || {
        p.cache.stats().breaker == cachefence::BreakerState::Closed
    })
    .await;
    let mut body = String::new();
    for _ in 0..50 {
        let reply = http.get(p.addr, "/l").await;
        body = reply.text();
        if p.cache.near_holds_for_tests(NS, "/l") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(body, "7");
    assert!(p.cache.near_holds_for_tests(NS, "/l"));
    let hits = p.cache.stats().near_hits;
    assert_eq!(http.get(p.addr, "/l").await.text(), "7");
    assert_eq!(p.cache.stats().near_hits, hits + 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_loop_of_near_hits_lets_other_tasks_run() {
    // A near hit awaits no I/O; a caller looping on the service (a test's
    // prober, an in-process client) must still let other tasks of its
    // thread run, here the only thread.
    use tower::{Layer, ServiceExt};
    let redis = RedisServer::new();
    let cache = near_cache(&redis).await;
    let svc = cache
        .layer()
        .layer(tower::service_fn(|_req: http::Request<String>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new("body".to_owned()))
        }));
    up(&cache).await;
    let get = || {
        svc.clone()
            .oneshot(http::Request::get("/loop").body(String::new()).unwrap())
    };
    get().await.unwrap();
    get().await.unwrap();
    assert!(cache.near_holds_for_tests(NS, "/loop"));
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn({
        let ran = ran.clone();
        async move { ran.store(true, Ordering::SeqCst) }
    });
    let mut hits = 0;
    while !ran.load(Ordering::SeqCst) && hits < 1_000_000 {
        get().await.unwrap();
        hits += 1;
    }
    assert!(ran.load(Ordering::SeqCst), "{hits} near hits never yielded");
    assert_eq!(cache.stats().near_hits, hits);
}

/// A measurement with an assertion: over 1,000 invalidations, the time from
/// the invalidating call returning to the last near cache dropping the
/// entry (0 by construction: the call waits for every acknowledgement), and
/// no near cache still holding it when the call returned.
#[tokio::test(flavor = "multi_thread")]
async fn near_caches_drop_an_entry_before_the_invalidation_returns() {
    let redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let procs = [
        proc(&redis, &version, &calls).await,
        proc(&redis, &version, &calls).await,
        proc(&redis, &version, &calls).await,
    ];
    let http = Http::new();
    let n = 1_000;
    let mut lag_us = Vec::with_capacity(n);
    let mut call_us = Vec::with_capacity(n);
    let mut held_after_return = 0;
    for i in 0..n {
        let path = format!("/m/{}", i % 10);
        for p in &procs {
            warm(&http, p, &path).await;
        }
        let by = &procs[i % procs.len()].handle;
        let started = Instant::now();
        by.invalidate_path(&path).await.unwrap();
        let returned = Instant::now();
        call_us.push(returned.duration_since(started).as_micros() as u64);
        let mut last = returned;
        for p in &procs {
            if p.cache.near_holds_for_tests(NS, &path) {
                held_after_return += 1;
                while p.cache.near_holds_for_tests(NS, &path) {
                    tokio::task::yield_now().await;
                }
                last = last.max(Instant::now());
            }
        }
        lag_us.push(last.duration_since(returned).as_micros() as u64);
    }
    lag_us.sort_unstable();
    call_us.sort_unstable();
    let pct = |v: &[u64], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    eprintln!(
        "near: {n} invalidations over 3 caches: drop lag after return p50 {} µs, p99 {} µs, max {} µs; \
         held after return {held_after_return}; invalidate_path call p50 {} µs, p99 {} µs",
        pct(&lag_us, 0.5),
        pct(&lag_us, 0.99),
        lag_us[n - 1],
        pct(&call_us, 0.5),
        pct(&call_us, 0.99),
    );
    assert_eq!(held_after_return, 0);
    assert!(pct(&lag_us, 0.99) < 1_000);
    for p in &procs {
        assert_eq!(p.cache.stats().near_ack_timeouts, 0);
    }
}

/// Coherence under contention: 16 tasks on each of two caches hit 8 URLs
/// (near hits, on 4 worker threads, so the near cache's shards are taken
/// from many threads at once) while invalidations, through either cache,
/// drop URLs from both. No read that starts after an invalidation returned
/// gets the version before it, from a near cache or from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_near_hits_never_outlive_an_invalidation() {
    let redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let procs = Arc::new([
        proc(&redis, &version, &calls).await,
        proc(&redis, &version, &calls).await,
    ]);
    let paths: Arc<Vec<String>> = Arc::new((0..8).map(|i| format!("/c/{i}")).collect());
    // The version each path's last returned invalidation was made after.
    let floor: Arc<Vec<AtomicU64>> = Arc::new(paths.iter().map(|_| AtomicU64::new(0)).collect());
    let http = Http::new();
    for p in procs.iter() {
        for path in paths.iter() {
            warm(&http, p, path).await;
        }
    }
    let before: u64 = procs.iter().map(|p| p.cache.stats().near_hits).sum();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (reads, stale) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut readers = Vec::new();
    for t in 0..32 {
        let (procs, paths, floor, stop) =
            (procs.clone(), paths.clone(), floor.clone(), stop.clone());
        let (reads, stale, http) = (reads.clone(), stale.clone(), http.clone());
        readers.push(tokio::spawn(async move {
            let p = &procs[t % 2];
            let mut i = t;
            while !stop.load(Ordering::SeqCst) {
                let u = i % paths.len();
                i += 1;
                let least = floor[u].load(Ordering::SeqCst);
                let got: u64 = http.get(p.addr, &paths[u]).await.text().parse().unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                if got < least {
                    stale.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "{}: read {got} after the invalidation made at {least}",
                        paths[u]
                    );
                }
            }
        }));
    }
    let rounds = 300;
    for n in 0..rounds {
        let u = (n * 3) % paths.len();
        let v = version.fetch_add(1, Ordering::SeqCst) + 1;
        procs[n % 2]
            .handle
            .invalidate_path(&paths[u])
            .await
            .unwrap();
        floor[u].store(v, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        reader.await.unwrap();
    }
    let near_hits: u64 = procs.iter().map(|p| p.cache.stats().near_hits).sum::<u64>() - before;
    let reads = reads.load(Ordering::Relaxed);
    eprintln!("{reads} reads, {near_hits} near hits, {rounds} invalidations");
    assert_eq!(stale.load(Ordering::Relaxed), 0);
    assert!(near_hits > 0 && reads >= near_hits);
    for p in procs.iter() {
        assert_eq!(p.cache.stats().near_ack_timeouts, 0);
    }
}

/// A `Vary` response is near-cached per variant: a near hit of a variant
/// reads the URL's index only (one command, no body), and an invalidation
/// through another cache drops every variant before it returns.
#[tokio::test(flavor = "multi_thread")]
async fn vary_variants_are_near_cached_each_and_dropped_with_their_url() {
    let redis = RedisServer::new();
    let version = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let mut procs = Vec::new();
    for _ in 0..2 {
        let (version, calls) = (version.clone(), calls.clone());
        let origin = move |headers: HeaderMap| {
            let (version, calls) = (version.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let lang = headers
                    .get("accept-language")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let mut out = HeaderMap::new();
                out.insert("vary", "accept-language".parse().unwrap());
                (out, format!("{}:{lang}", version.load(Ordering::SeqCst)))
            }
        };
        procs.push(
            start(&redis, |cache| {
                Router::new().route("/{*path}", get(origin).layer(cache.layer()))
            })
            .await,
        );
    }
    let http = Http::new();
    let get_lang = |p: &Proc, lang: &'static str| {
        let req = http::Request::get(format!("http://{}/v", p.addr))
            .header("accept-language", lang)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let http = http.clone();
        async move { http.request(req).await }
    };
    let a = &procs[0];
    // Each variant: a miss, a hit from Redis (marked, taken in), then near.
    for lang in ["en", "fr"] {
        assert_eq!(get_lang(a, lang).await.cache_status(), Some("MISS"));
        assert_eq!(get_lang(a, lang).await.cache_status(), Some("HIT"));
    }
    // The store of `fr` dropped the URL here (every variant of it):
    // `en` is taken in again.
    assert_eq!(get_lang(a, "en").await.cache_status(), Some("HIT"));
    assert!(a.cache.near_holds_for_tests(NS, "/v"));
    let before = a.cache.stats();
    redis.reset_stats();
    for lang in ["en", "fr", "en", "fr"] {
        let reply = get_lang(a, lang).await;
        assert_eq!(reply.cache_status(), Some("HIT"));
        assert_eq!(reply.text(), format!("0:{lang}"));
    }
    let after = a.cache.stats();
    assert_eq!(after.near_hits - before.near_hits, 4);
    // One HMGET of the index per hit; the variants' bodies are not read.
    assert_eq!(
        redis.command_count("hmget"),
        4,
        "{:?}",
        redis.commandstats()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // An invalidation through the other cache drops both variants here
    // before it returns.
    version.store(1, Ordering::SeqCst);
    procs[1].handle.invalidate_path("/v").await.unwrap();
    assert!(!a.cache.near_holds_for_tests(NS, "/v"));
    assert_eq!(a.cache.stats().near_ack_timeouts, 0);
    for lang in ["en", "fr"] {
        assert_eq!(get_lang(a, lang).await.text(), format!("1:{lang}"));
    }
}
