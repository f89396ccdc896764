//! A near cache never outlives its subscription by more than a stated
//! bound (1.5 s): the listener probes the subscribed connection and, when a
//! probe goes unanswered, empties and bypasses the near cache and
//! subscribes again, also when the connection stays open (a half-open hop,
//! made here by `support::proxy::StallProxy`). An invalidation that heard
//! fewer acknowledgements than near caches are registered alive says so;
//! a store over a near-marked entry keeps the mark.
//!
//! Each "process" is a cache with its own data connection, listener and
//! near cache; `b`'s subscription (only it) goes through the proxy.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use cachefence::{FenceCache, FenceHandle};
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use support::gate::until;
use support::proxy::StallProxy;
use support::{Http, RedisServer, serve};

const NS: &str = "live:";
/// The documented bound: a probe every 500 ms, answered within 1 s.
const BOUND: Duration = Duration::from_millis(1500);
/// Scheduling slack on a loaded machine, on top of the bound.
const SLACK: Duration = Duration::from_millis(500);

struct Proc {
    cache: FenceCache<ConnectionManager>,
    handle: FenceHandle<ConnectionManager>,
    addr: std::net::SocketAddr,
}

/// A cache whose data connection goes to `redis` and whose subscription
/// goes to `wake_url`; its origin answers the shared version.
async fn proc(redis: &RedisServer, wake_url: &str, version: &Arc<AtomicU64>) -> Proc {
    let cache = FenceCache::builder(redis.connection_manager().await)
        .namespace(NS)
        .wake_ups(redis::Client::open(wake_url).unwrap())
        .near_cache(1 << 20)
        .build()
        .expect("cache");
    let version = version.clone();
    let origin = move || {
        let version = version.clone();
        async move { (HeaderMap::new(), version.load(Ordering::SeqCst).to_string()) }
    };
    let app = Router::new().route(
        "/{*path}",
        get(origin).layer(cache.layer().honor_request_no_cache(true)),
    );
    let addr = serve(app).await;
    until("the near cache's subscription", || {
        cache.near_is_up_for_tests()
    })
    .await;
    Proc {
        handle: cache.handle(),
        cache,
        addr,
    }
}

/// Reads `path` through `p` until its near cache holds it. Returns the body.
async fn warm(http: &Http, p: &Proc, path: &str) -> String {
    for _ in 0..5 {
        let reply = http.get(p.addr, path).await;
        if p.cache.near_holds_for_tests(NS, path) {
            return reply.text();
        }
    }
    panic!("{path} never reached the near cache");
}

fn redis_addr(redis: &RedisServer) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", redis.port()).parse().unwrap()
}

/// The ids of the server's pub/sub clients.
fn pubsub_ids(redis: &RedisServer) -> Vec<String> {
    redis
        .cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .filter_map(|line| line.strip_prefix("id="))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// The near caches registered alive in the namespace (the registry of
/// ARCHITECTURE.md, "The near cache").
fn registered(redis: &RedisServer) -> u64 {
    redis
        .cli(&["ZCARD", "live:|#nearcaches"])
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_subscription_takes_the_near_cache_out_of_use_within_the_bound() {
    let redis = RedisServer::new();
    let proxy = StallProxy::start(redis_addr(&redis)).await;
    let version = Arc::new(AtomicU64::new(0));
    let a = proc(&redis, &redis.url(), &version).await;
    let b = proc(&redis, &proxy.url(), &version).await;
    let http = Http::new();
    assert_eq!(warm(&http, &a, "/p").await, "0");
    assert_eq!(warm(&http, &b, "/p").await, "0");
    let flushes = b.cache.stats().near_flushes;
    let timeouts = a.cache.stats().near_ack_timeouts;

    // b's subscription stops answering; its connection stays open (Redis
    // still counts it as a subscriber), new connections get through.
    let stalled = Instant::now();
    proxy.stall_existing();
    // Waits for b's flush, or gives up after the bound (old code: never).
    while b.cache.stats().near_flushes == flushes && stalled.elapsed() < BOUND + SLACK * 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let flushed_after = stalled.elapsed();

    version.store(1, Ordering::SeqCst);
    a.handle.invalidate_path("/p").await.unwrap();
    let mut old = 0;
    let mut near_hits = 0;
    let reads = 100;
    for _ in 0..reads {
        let before = b.cache.stats().near_hits;
        if http.get(b.addr, "/p").await.text() == "0" {
            old += 1;
        }
        near_hits += b.cache.stats().near_hits - before;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "b flushed {flushed_after:?} after the stall; after the invalidation b served the old body {old} of {reads} times ({near_hits} near hits)"
    );
    assert_eq!(old, 0, "old bodies served by b after the invalidation");
    assert_eq!(b.cache.stats().near_flushes, flushes + 1);
    assert!(
        flushed_after <= BOUND + SLACK,
        "b's near cache was emptied {flushed_after:?} after its subscription stalled"
    );
    // The stalled connection still counts as a listener: a waits for its
    // acknowledgement and says it did not come.
    assert_eq!(a.cache.stats().near_ack_timeouts - timeouts, 1);

    // Back up on a new subscription: b's near cache serves hits again,
    // and hears invalidations again.
    proxy.resume();
    until("b's near cache back in use", || {
        b.cache.near_is_up_for_tests()
    })
    .await;
    assert_eq!(warm(&http, &b, "/p").await, "1");
    let before = b.cache.stats().near_hits;
    for _ in 0..10 {
        assert_eq!(http.get(b.addr, "/p").await.text(), "1");
    }
    assert_eq!(b.cache.stats().near_hits - before, 10);
    version.store(2, Ordering::SeqCst);
    a.handle.invalidate_path("/p").await.unwrap();
    assert!(!b.cache.near_holds_for_tests(NS, "/p"));
    assert_eq!(http.get(b.addr, "/p").await.text(), "2");
}

/// Redis drops `b`'s subscription, and `b` does not hear of it (the hop
/// neither forwards nor closes): until `b`'s probe notices, `b` is a near
/// cache alive that no announcement reaches. Invalidates a URL `b` holds
/// through `by`, and returns the change of `by`'s `near_ack_timeouts` and
/// `near_acks_missing`, if the call returned before `b` noticed (else
/// `None`: a slow machine; the caller tries again). `others`: the pub/sub
/// clients that are not `b`'s.
async fn drop_b_silently_and_invalidate(
    redis: &RedisServer,
    proxy: &StallProxy,
    others: &[String],
    (b, by): (&Proc, &FenceHandle<ConnectionManager>),
    path: &str,
) -> Option<(u64, u64)> {
    let http = Http::new();
    warm(&http, b, path).await;
    let b_id = pubsub_ids(redis)
        .into_iter()
        .find(|id| !others.contains(id))
        .unwrap();
    let flushes = b.cache.stats().near_flushes;
    let before = by.stats();
    proxy.stall_existing();
    redis.cli(&["CLIENT", "KILL", "ID", &b_id]);
    by.invalidate_path(path).await.unwrap();
    let after = by.stats();
    let b_noticed = b.cache.stats().near_flushes != flushes;
    proxy.resume();
    until("b back up", || b.cache.near_is_up_for_tests()).await;
    if b_noticed {
        eprintln!("{path}: b noticed before the invalidation returned; again");
        return None;
    }
    Some((
        after.near_ack_timeouts - before.near_ack_timeouts,
        after.near_acks_missing - before.near_acks_missing,
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalidation_heard_by_fewer_near_caches_than_are_alive_says_so() {
    let redis = RedisServer::new();
    let proxy = StallProxy::start(redis_addr(&redis)).await;
    let version = Arc::new(AtomicU64::new(0));
    let a = proc(&redis, &redis.url(), &version).await;
    let others = pubsub_ids(&redis);
    assert_eq!(others.len(), 1);
    let http = Http::new();
    let b = proc(&redis, &proxy.url(), &version).await;
    until("both near caches registered", || registered(&redis) == 2).await;
    // Healthy: as many acknowledgements as near caches alive.
    assert_eq!(warm(&http, &a, "/h").await, "0");
    assert_eq!(warm(&http, &b, "/h").await, "0");
    a.handle.invalidate_path("/h").await.unwrap();
    let s = a.cache.stats();
    assert_eq!((s.near_ack_timeouts, s.near_acks_missing), (0, 0));

    // Heard by a alone, acknowledged by a alone: no timeout, but one near
    // cache alive did not acknowledge.
    let mut counted = None;
    for round in 0..3 {
        until("both near caches registered", || registered(&redis) == 2).await;
        let path = format!("/k/{round}");
        let dropped =
            drop_b_silently_and_invalidate(&redis, &proxy, &others, (&b, &a.handle), &path);
        counted = dropped.await;
        if counted.is_some() {
            break;
        }
    }
    assert_eq!(counted, Some((0, 1)), "(ack timeouts, acks missing)");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalidation_no_listener_heard_says_so_when_a_near_cache_is_alive() {
    // The invalidating process has no near cache (an invalidation worker):
    // when Redis dropped the only near cache's subscription, the
    // announcement has no receiver at all.
    let redis = RedisServer::new();
    let proxy = StallProxy::start(redis_addr(&redis)).await;
    let version = Arc::new(AtomicU64::new(0));
    let admin = FenceCache::builder(redis.connection_manager().await)
        .namespace(NS)
        .wake_ups(redis.client())
        .build()
        .expect("cache");
    let handle = admin.handle();
    until("the admin's listener", || pubsub_ids(&redis).len() == 1).await;
    let others = pubsub_ids(&redis);
    let b = proc(&redis, &proxy.url(), &version).await;
    let mut counted = None;
    for round in 0..3 {
        until("b registered", || registered(&redis) == 1).await;
        let path = format!("/k/{round}");
        counted =
            drop_b_silently_and_invalidate(&redis, &proxy, &others, (&b, &handle), &path).await;
        if counted.is_some() {
            break;
        }
    }
    assert_eq!(counted, Some((0, 1)), "(ack timeouts, acks missing)");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_over_a_near_marked_entry_keeps_the_mark_for_the_next_invalidation() {
    let redis = RedisServer::new();
    let version = Arc::new(AtomicU64::new(0));
    let a = proc(&redis, &redis.url(), &version).await;
    let http = Http::new();
    assert_eq!(warm(&http, &a, "/m").await, "0");
    let marked = || -> Vec<String> {
        redis
            .cli(&["KEYS", "live:|/m*"])
            .lines()
            .map(str::to_owned)
            .filter(|k| redis.cli(&["TYPE", k]).trim() == "hash")
            .filter(|k| redis.cli(&["HEXISTS", k, "near"]).trim() == "1")
            .collect()
    };
    let keys = marked();
    assert_eq!(keys.len(), 1, "the near-held entry is marked");

    // A stand-in for a near cache that may still hold the old copy: it
    // records the announcements and acknowledges those that ask for it.
    let mut pubsub = redis.client().get_async_pubsub().await.unwrap();
    pubsub.subscribe("live:|#near").await.unwrap();
    let heard = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listener = {
        let heard = heard.clone();
        let mut acker = redis.connection_manager().await;
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let payload: String = msg.get_payload().unwrap();
                let (tag, _key) = payload.split_once(' ').unwrap();
                heard.lock().unwrap().push(tag.to_owned());
                if let Some((sender, seq)) = tag.split_once(':') {
                    let _: i64 = redis::cmd("PUBLISH")
                        .arg(format!("live:|#ack:{sender}"))
                        .arg(seq)
                        .query_async(&mut acker)
                        .await
                        .unwrap();
                }
            }
        })
    };

    // A refetch stores version 1 over the marked version 0.
    version.store(1, Ordering::SeqCst);
    let req = http::Request::get(format!("http://{}/m", a.addr))
        .header("cache-control", "no-cache")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(http.request(req).await.text(), "1");
    until("the store's announcement", || {
        heard.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(
        heard.lock().unwrap()[0],
        "-",
        "a store asks no acknowledgement"
    );
    assert_eq!(marked(), keys, "the new version carries the mark");

    // So the invalidation right after it announces, and waits for both
    // listeners (a's and the stand-in).
    let timeouts = a.cache.stats().near_ack_timeouts;
    a.handle.invalidate_path("/m").await.unwrap();
    let tags = heard.lock().unwrap().clone();
    listener.abort();
    eprintln!("announcements heard: {tags:?}");
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(
        tags[1].contains(':'),
        "the invalidation asks acknowledgements: {tags:?}"
    );
    assert_eq!(a.cache.stats().near_ack_timeouts, timeouts);
    assert_eq!(a.cache.stats().near_acks_missing, 0);
}
