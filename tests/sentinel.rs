//! Redis Sentinel (feature `sentinel`): caches over `SentinelConnection`s
//! to a master with one replica and three real `redis-server --sentinel`
//! processes; the master SIGKILLed under load, the replica promoted.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::get;
use cachefence::sentinel::SentinelConnection;
use cachefence::{BreakerState, FenceCache, FenceHandle, Invalidation};
use support::Http;
use support::sentinel::RedisSentinel;

const NS: &str = "sen:";

/// What the origin sees: a call counter, a delay.
#[derive(Clone, Default)]
struct World {
    calls: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
}

async fn origin(State(world): State<World>, Path(path): Path<String>) -> impl IntoResponse {
    world.calls.fetch_add(1, Ordering::SeqCst);
    let delay = world.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    format!("0 /{path}")
}

/// An app server: its own Sentinel connection, cache (default settings)
/// and wake-ups following the master.
async fn app_server(
    redis: &RedisSentinel,
    world: &World,
) -> (
    SocketAddr,
    FenceHandle<SentinelConnection>,
    SentinelConnection,
) {
    let conn = SentinelConnection::connect(redis.client())
        .await
        .expect("sentinel connection");
    let fence = FenceCache::builder(conn.clone())
        .namespace(NS)
        .sentinel_wake_ups(&conn)
        .build()
        .expect("cache")
        .layer();
    let handle = fence.handle();
    let app = Router::new()
        .route("/{*path}", get(origin).layer(fence))
        .with_state(world.clone());
    (support::serve(app).await, handle, conn)
}

/// Until `cond` holds (polled every 10 ms), at most `within`.
async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn warm(http: &Http, addr: SocketAddr, paths: &[String]) {
    for chunk in paths.chunks(16) {
        let gets = chunk.iter().map(|p| {
            let (http, p) = (http.clone(), p.clone());
            tokio::spawn(async move { (http.get(addr, &p).await.text(), p) })
        });
        for got in futures_util::future::join_all(gets).await {
            let (body, p) = got.unwrap();
            assert_eq!(body, format!("0 {p}"));
        }
    }
}

/// The paths still served from the cache.
async fn cached(http: &Http, addr: SocketAddr, paths: &[String]) -> Vec<String> {
    let mut hit = Vec::new();
    for p in paths {
        if http.get(addr, p).await.cache_status() == Some("HIT") {
            hit.push(p.clone());
        }
    }
    hit
}

/// B waits on A's slow fill of `path`; returns whether B's wait was ended
/// by a wake-up rather than a poll.
async fn woken_remote_wait(
    world: &World,
    http: &Http,
    (a, b): (SocketAddr, SocketAddr),
    hb: &FenceHandle<SentinelConnection>,
    path: &str,
) -> bool {
    let (calls, waits, wakeups) = (
        world.calls.load(Ordering::SeqCst),
        hb.stats().remote_waits,
        hb.stats().wakeups,
    );
    world.delay_ms.store(400, Ordering::SeqCst);
    let leader = {
        let (http, path) = (http.clone(), path.to_owned());
        tokio::spawn(async move { http.get(a, &path).await.text() })
    };
    eventually(
        "A's fill to call the origin",
        Duration::from_secs(10),
        || world.calls.load(Ordering::SeqCst) == calls + 1,
    )
    .await;
    let waiter = {
        let (http, path) = (http.clone(), path.to_owned());
        tokio::spawn(async move { http.get(b, &path).await.text() })
    };
    eventually("B to wait on A's lease", Duration::from_secs(10), || {
        hb.stats().remote_waits == waits + 1
    })
    .await;
    let expected = format!("0 {path}");
    assert_eq!(leader.await.unwrap(), expected);
    assert_eq!(waiter.await.unwrap(), expected);
    world.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(world.calls.load(Ordering::SeqCst), calls + 1, "one fill");
    hb.stats().wakeups > wakeups
}

/// A master, a replica and three Sentinels (down-after 1 s); two app
/// servers, each with its own `SentinelConnection`, cache (default
/// settings) and wake-ups, under traffic over 200 keys; a queue worker
/// following the master drains 4,800 invalidations. The master is
/// SIGKILLed mid-drain. Every request is answered with the right body;
/// caching, single-fill and wake-ups resume on the promoted replica; the
/// worker applies every invalidation queued before the kill and those
/// queued after it; none is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_is_followed_by_the_cache_its_wake_ups_and_the_queue() {
    const KEYS: usize = 200;
    const QUEUED: usize = 300;
    const FILLER: usize = 15;
    let mut redis = RedisSentinel::new(1000);
    let world = World::default();
    let (a, ha, conn_a) = app_server(&redis, &world).await;
    let (b, hb, conn_b) = app_server(&redis, &world).await;
    let addrs = [a, b];
    let http = Http::new();
    let old_master = redis.master().expect("a master");
    assert_eq!(old_master, 0);

    let keys: Vec<String> = (0..KEYS).map(|i| format!("/k/{i}")).collect();
    let queued: Vec<String> = (0..QUEUED).map(|i| format!("/q/{i}")).collect();
    warm(&http, a, &keys).await;
    warm(&http, a, &queued).await;
    assert_eq!(world.calls.load(Ordering::SeqCst), KEYS + QUEUED);
    assert_eq!(cached(&http, b, &keys[..20]).await.len(), 20);

    // The queue: 4,800 invalidations, 300 of them of cached URLs, spread
    // through the stream; replicated before the worker starts.
    let queue = ha.queue();
    let mut invs = Vec::new();
    for (i, p) in queued.iter().enumerate() {
        invs.push(Invalidation::path(p));
        for j in 0..FILLER {
            invs.push(Invalidation::path(format!("/never/{i}/{j}")));
        }
    }
    queue.enqueue_all(&invs).await.unwrap();
    let total = invs.len() as u64;
    redis.wait_replicated();

    // Traffic: every answer is checked and timed.
    let traffic = support::Traffic::start(&http, addrs, KEYS, 4, (53, 17));
    traffic.until_answered(300, Duration::from_secs(30)).await;

    let worker = queue.sentinel_worker(&conn_a).consumer("w1");
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    eventually("the drain to start", Duration::from_secs(30), || {
        control.stats().applied >= 100
    })
    .await;

    let killed = Instant::now();
    redis.servers[old_master].stop();
    let at_kill = control.stats().applied;

    // Caching resumed: both servers read the entries from the promoted
    // replica.
    let resumed =
        support::until_both_hit(&http, (a, b), &keys, killed, Duration::from_secs(30)).await;
    let new_master = redis.master().expect("a promoted master");
    assert_ne!(new_master, old_master);
    // The Sentinels name it: the one that led the failover at once, the
    // others once its new configuration reached them (hello messages, every
    // 2 s; a Sentinel asked before that still names the old master).
    let new_port = redis.servers[new_master].port();
    eventually(
        "the Sentinels to name the promoted master",
        Duration::from_secs(10),
        || redis.named_master_port() == Some(new_port),
    )
    .await;
    for conn in [&conn_a, &conn_b] {
        assert!(conn.moves() >= 1);
    }
    // A new key is stored on the new master and read back.
    let mut stored = None;
    for j in 0.. {
        let path = format!("/after/{j}");
        let first = http.get(a, &path).await;
        assert_eq!(first.text(), format!("0 {path}"));
        if http.get(a, &path).await.cache_status() == Some("HIT") {
            stored = Some(killed.elapsed());
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no store");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let before = traffic.answered();
    traffic
        .until_answered(before + 300, Duration::from_secs(30))
        .await;
    let (answered, slowest_ms) = (traffic.answered(), traffic.slowest_ms());
    traffic.stop().await;
    // No request waited past the lease lifetime (a lost release) plus the
    // wait budget and a margin for a loaded machine.
    assert!(
        slowest_ms < 3_000 + 5_000 + 2_000,
        "slowest request {slowest_ms} ms"
    );

    // Single-fill on the new master: bursts on fresh keys across both
    // servers reach the origin once per key.
    eventually("the breakers to close", Duration::from_secs(10), || {
        ha.stats().breaker == BreakerState::Closed && hb.stats().breaker == BreakerState::Closed
    })
    .await;
    world.delay_ms.store(200, Ordering::SeqCst);
    let calls = world.calls.load(Ordering::SeqCst);
    for j in 0..6 {
        let burst = (0..20).map(|i| {
            let http = http.clone();
            tokio::spawn(async move { http.get(addrs[i % 2], &format!("/fresh/{j}")).await.text() })
        });
        for body in futures_util::future::join_all(burst).await {
            assert_eq!(body.unwrap(), format!("0 /fresh/{j}"));
        }
    }
    assert_eq!(
        world.calls.load(Ordering::SeqCst),
        calls + 6,
        "one fill per key: {:?} {:?}",
        ha.stats(),
        hb.stats()
    );
    world.delay_ms.store(0, Ordering::SeqCst);

    // Wake-ups reach a remote waiter through the new master.
    let mut woken = 0;
    for i in 0..5 {
        if woken_remote_wait(&world, &http, (a, b), &hb, &format!("/wake/{i}")).await {
            woken += 1;
        }
    }
    assert!(
        woken >= 1,
        "no wake-up after the failover: {:?}",
        hb.stats()
    );

    // Invalidations queued after the failover are applied too.
    let late: Vec<String> = (0..50).map(|i| format!("/late/{i}")).collect();
    warm(&http, a, &late).await;
    assert_eq!(cached(&http, a, &late).await.len(), late.len());
    let late_invs: Vec<Invalidation> = late.iter().map(Invalidation::path).collect();
    queue.enqueue_all(&late_invs).await.unwrap();
    loop {
        if queue.backlog().await.is_ok_and(|n| n == 0) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the queue did not drain: {:?} {:?}",
            queue.stats().await,
            control.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = killed.elapsed();
    let left = cached(&http, a, &queued).await;
    let late_left = cached(&http, a, &late).await;
    let stats = control.stats();
    eprintln!(
        "sentinel failover: caching resumed (HIT on both servers) {:.2} s after SIGKILL, \
         first store on the new master {:.2} s; {} requests, slowest {} ms; \
         queue {at_kill}/{total} applied at SIGKILL, drained {:.2} s after it; worker {stats:?}; \
         moves A {} B {}; stats A {:?}",
        resumed.as_secs_f64(),
        stored.unwrap_or_default().as_secs_f64(),
        answered,
        slowest_ms,
        drained.as_secs_f64(),
        conn_a.moves(),
        conn_b.moves(),
        ha.stats(),
    );
    assert!(at_kill < total, "the queue drained before the kill");
    assert!(left.is_empty(), "invalidations lost: {left:?}");
    assert!(
        late_left.is_empty(),
        "late invalidations lost: {late_left:?}"
    );
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0, "{stats:?}");
    assert!(stats.connects >= 2, "{stats:?}");
    control.shutdown();
    task.await.unwrap();
}

/// A manual failover (`SENTINEL FAILOVER`): the old master stays up and
/// becomes a replica. The caches, their wake-ups and the queue worker move
/// to the new master: stores land there (none is refused as `READONLY`
/// for long), a remote waiter is woken, invalidations queued afterwards are
/// applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manual_sentinel_failover_moves_the_cache_its_wake_ups_and_the_queue() {
    let redis = RedisSentinel::new(1000);
    let world = World::default();
    let (a, ha, conn_a) = app_server(&redis, &world).await;
    let (b, hb, conn_b) = app_server(&redis, &world).await;
    let http = Http::new();
    let keys: Vec<String> = (0..50).map(|i| format!("/m/{i}")).collect();
    warm(&http, a, &keys).await;
    redis.wait_replicated();
    let queue = ha.queue();
    let worker = queue.sentinel_worker(&conn_a).consumer("w1");
    let control = worker.handle();
    let task = tokio::spawn(worker.run());

    let old_master = redis.master().expect("a master");
    let started = Instant::now();
    redis.sentinels[0].cli(&["SENTINEL", "FAILOVER", support::sentinel::MASTER_NAME]);
    let old_port = redis.servers[old_master].port();
    eventually(
        "the Sentinels to name the new master",
        Duration::from_secs(30),
        || redis.named_master_port().is_some_and(|p| p != old_port),
    )
    .await;
    let switched = started.elapsed();
    let new_master = 1 - old_master;
    assert_eq!(
        redis.named_master_port(),
        Some(redis.servers[new_master].port())
    );
    // Both caches follow: their connection moves to the new master, and a
    // new key is stored there and hit.
    let new_address = format!("127.0.0.1:{}", redis.servers[new_master].port());
    for (addr, conn) in [(a, &conn_a), (b, &conn_b)] {
        eventually("the connection to move", Duration::from_secs(10), || {
            conn.master_client()
                .get_connection_info()
                .addr()
                .to_string()
                == new_address
        })
        .await;
        let mut j = 0;
        loop {
            let path = format!("/after/{}/{j}", addr.port());
            assert_eq!(http.get(addr, &path).await.text(), format!("0 {path}"));
            if http.get(addr, &path).await.cache_status() == Some("HIT") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no store after the failover"
            );
            j += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            conn.master_client()
                .get_connection_info()
                .addr()
                .to_string(),
            format!("127.0.0.1:{}", redis.servers[new_master].port())
        );
    }
    let moved = started.elapsed();
    let keys_on_new = redis.servers[new_master].cli(&["DBSIZE"]);
    assert_ne!(keys_on_new, "0");

    let mut woken = 0;
    for i in 0..5 {
        if woken_remote_wait(&world, &http, (a, b), &hb, &format!("/mwake/{i}")).await {
            woken += 1;
        }
    }
    assert!(
        woken >= 1,
        "no wake-up after the failover: {:?}",
        hb.stats()
    );

    let invs: Vec<Invalidation> = keys.iter().map(Invalidation::path).collect();
    queue.enqueue_all(&invs).await.unwrap();
    eventually("the queue to drain", Duration::from_secs(30), || {
        control.stats().applied >= keys.len() as u64
    })
    .await;
    assert!(cached(&http, a, &keys).await.is_empty());
    eprintln!(
        "manual sentinel failover: the Sentinels named the new master {:.2} s after SENTINEL FAILOVER, \
         both caches storing there {:.2} s after it; moves A {} B {}; worker {:?}",
        switched.as_secs_f64(),
        moved.as_secs_f64(),
        conn_a.moves(),
        conn_b.moves(),
        control.stats()
    );
    control.shutdown();
    task.await.unwrap();
}

/// One wake-up subscription per cache: Sentinel's and a cluster's together
/// are an error at build time, not one of them silently ignored.
#[cfg(feature = "cluster-async")]
#[tokio::test(flavor = "multi_thread")]
async fn sentinel_and_cluster_wake_ups_together_are_an_error() {
    let redis = RedisSentinel::new(5000);
    let conn = SentinelConnection::connect(redis.client())
        .await
        .expect("sentinel connection");
    let err = FenceCache::builder(conn.clone())
        .sentinel_wake_ups(&conn)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(redis.urls()))
        .build()
        .expect_err("a misconfiguration");
    assert!(err.is_config(), "{err:?}");
    assert!(
        err.to_string()
            .contains("cluster_wake_ups after sentinel_wake_ups"),
        "{err}"
    );
}
