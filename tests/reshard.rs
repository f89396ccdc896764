//! Redis Cluster resharding (feature `cluster-async`): slots migrated
//! (`CLUSTER SETSLOT` + `MIGRATE`, as `redis-cli --cluster reshard` does)
//! while two near-cached app instances serve traffic and prefix walks
//! invalidate: every answer is at least as new as the last walk that
//! returned `Ok`, and a walk either completes or names the node it missed.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use cachefence::{FenceCache, FenceHandle};
use redis::cluster_async::ClusterConnection;
use support::{Http, RedisCluster, RedisServer, serve};

const NS: &str = "rs:";
const KEYS: usize = 200;

struct App {
    cache: FenceCache<ClusterConnection>,
    handle: FenceHandle<ClusterConnection>,
    addr: SocketAddr,
}

/// One app instance: its own cluster connection, listener and near cache;
/// the origin answers `<version> <path>`.
async fn app(cluster: &RedisCluster, version: &Arc<AtomicU64>) -> App {
    let cache = FenceCache::builder(cluster.connection().await)
        .namespace(NS)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(cluster.urls()))
        .near_cache(4 << 20)
        .build()
        .expect("cache");
    let version = version.clone();
    let origin = move |uri: axum::http::Uri| {
        let version = version.clone();
        async move { format!("{} {}", version.load(Ordering::SeqCst), uri.path()) }
    };
    let router = Router::new().route("/{*path}", get(origin).layer(cache.layer()));
    let addr = serve(router).await;
    support::gate::until("the near cache's subscription", || {
        cache.near_is_up_for_tests()
    })
    .await;
    App {
        handle: cache.handle(),
        cache,
        addr,
    }
}

/// Returns once `cache`'s breaker is not open (closed, or its cool-down
/// over so that the next call probes), or `done` is set.
async fn breaker_cooled(cache: &FenceCache<ClusterConnection>, done: &AtomicBool) {
    while cache.stats().breaker == cachefence::BreakerState::Open && !done.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn node_id(node: &RedisServer) -> String {
    node.cli(&["CLUSTER", "MYID"])
}

/// The index of the primary owning `slot`.
fn owner(cluster: &RedisCluster, slot: u16) -> usize {
    // CLUSTER SLOTS: ranges with their primary's port.
    let value = cluster.nodes()[0].cli_value(&["CLUSTER", "SLOTS"]);
    let redis::Value::Array(ranges) = value else {
        panic!("CLUSTER SLOTS: {value:?}")
    };
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let (Some(redis::Value::Int(from)), Some(redis::Value::Int(to))) =
            (parts.first(), parts.get(1))
        else {
            continue;
        };
        if (*from..=*to).contains(&i64::from(slot))
            && let Some(redis::Value::Array(primary)) = parts.get(2)
            && let Some(redis::Value::Int(port)) = primary.get(1)
        {
            return cluster
                .nodes()
                .iter()
                .position(|n| i64::from(n.port()) == *port)
                .expect("a node of the cluster");
        }
    }
    panic!("slot {slot} has no owner")
}

/// Moves `slot` from node `from` to node `to` as `redis-cli --cluster
/// reshard` does: IMPORTING/MIGRATING, `MIGRATE` of its keys a batch at a
/// time, then `SETSLOT NODE` on every node.
fn move_slot(cluster: &RedisCluster, slot: u16, from: usize, to: usize) {
    let nodes = cluster.nodes();
    let (src, dst) = (&nodes[from], &nodes[to]);
    let (src_id, dst_id) = (node_id(src), node_id(dst));
    let slot_s = slot.to_string();
    dst.cli(&["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &src_id]);
    src.cli(&["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &dst_id]);
    loop {
        let keys = src.cli(&["CLUSTER", "GETKEYSINSLOT", &slot_s, "20"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        let port = dst.port().to_string();
        let mut args = vec![
            "MIGRATE",
            "127.0.0.1",
            &port,
            "",
            "0",
            "5000",
            "REPLACE",
            "KEYS",
        ];
        args.extend(keys);
        src.cli(&args);
        // Requests run between the batches.
        std::thread::sleep(Duration::from_millis(2));
    }
    for node in [dst, src] {
        node.cli(&["CLUSTER", "SETSLOT", &slot_s, "NODE", &dst_id]);
    }
    for node in nodes {
        node.cli(&["CLUSTER", "SETSLOT", &slot_s, "NODE", &dst_id]);
    }
}

/// Slots migrated, in turn, to the next primary, while two app instances
/// (near caches on) answer traffic over 200 keys and prefix walks
/// invalidate every key again and again. The slots: those of the entries
/// (most of them), and the slot of the namespace's sharded near-cache
/// channel, so the near caches' subscription follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_migrated_under_load_keep_answers_correct_and_walks_complete_or_name_the_node() {
    let cluster = Arc::new(RedisCluster::new());
    let version = Arc::new(AtomicU64::new(0));
    let a = app(&cluster, &version).await;
    let b = app(&cluster, &version).await;
    let http = Http::new();
    let paths: Vec<String> = (0..KEYS).map(|i| format!("/r/{i}")).collect();
    for path in &paths {
        for p in [&a, &b] {
            http.get(p.addr, path).await;
            http.get(p.addr, path).await;
        }
    }
    // The slots to move: the entries' and the near channel's.
    let node0 = &cluster.nodes()[0];
    let mut slots: Vec<u16> = Vec::new();
    for node in cluster.nodes() {
        for key in node.cli(&["KEYS", &format!("{NS}|/r/*")]).lines() {
            if key.is_empty() {
                continue;
            }
            let slot: u16 = node0.cli(&["CLUSTER", "KEYSLOT", key]).parse().unwrap();
            if !slots.contains(&slot) {
                slots.push(slot);
            }
        }
    }
    slots.truncate(60);
    let near_slot: u16 = node0
        .cli(&["CLUSTER", "KEYSLOT", &format!("{NS}|#near:{{{NS}|#near}}")])
        .parse()
        .unwrap();
    slots.insert(slots.len() / 2, near_slot);

    // Traffic: every answer at least as new as the last walk that
    // returned `Ok` before the request started.
    let floor = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let stale = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (http, floor, stop, answered, stale, paths) = (
                http.clone(),
                floor.clone(),
                stop.clone(),
                answered.clone(),
                stale.clone(),
                paths.clone(),
            );
            let addrs = [a.addr, b.addr];
            tokio::spawn(async move {
                let mut i = w * 37;
                while !stop.load(Ordering::SeqCst) {
                    i = (i + 7) % paths.len();
                    let path = &paths[i];
                    let at_least = floor.load(Ordering::SeqCst);
                    let reply = http.get(addrs[i % 2], path).await;
                    assert_eq!(reply.status, 200, "{path}");
                    let text = reply.text();
                    let (v, rest) = text.split_once(' ').expect("a body");
                    assert_eq!(rest, path);
                    let v: u64 = v.parse().expect("a version");
                    if v < at_least {
                        stale.lock().unwrap().push(format!(
                            "{path}: version {v} ({:?}) after the walk of {at_least} returned",
                            reply.cache_status()
                        ));
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let done = Arc::new(AtomicBool::new(false));
    let mover = {
        let (cluster, done, slots) = (cluster.clone(), done.clone(), slots.clone());
        tokio::task::spawn_blocking(move || {
            let n = cluster.nodes().len();
            for slot in slots {
                let from = owner(&cluster, slot);
                move_slot(&cluster, slot, from, (from + 1) % n);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut oks = 0;
    let mut errors = Vec::new();
    let mut walk_ms = Vec::new();
    let mut unavailable = 0;
    let moving = std::time::Instant::now();
    while !done.load(Ordering::SeqCst) {
        // The mover panicked (a command failed): its panic is the
        // failure, not a loop of walks that never ends.
        if mover.is_finished() && !done.load(Ordering::SeqCst) {
            break;
        }
        let v = version.fetch_add(1, Ordering::SeqCst) + 1;
        let started = std::time::Instant::now();
        let result = a.handle.invalidate_prefix("/r/").await;
        walk_ms.push(started.elapsed().as_millis());
        match result {
            Ok(_) => {
                floor.fetch_max(v, Ordering::SeqCst);
                oks += 1;
            }
            // Redis unavailable to this process (its calls timed out on a
            // loaded machine, until the breaker opened): the walk says so,
            // names the node it stopped at when it stopped mid-way, and
            // covered nothing it claims. The next walk once the breaker's
            // cool-down is over (walking again at once only spins).
            Err(err) if err.is_circuit_open() || err.is_timeout() => {
                unavailable += 1;
                breaker_cooled(&a.cache, &done).await;
            }
            Err(err) => {
                let text = err.to_string();
                assert!(
                    text.contains("were not covered") && text.contains("127.0.0.1:"),
                    "a walk error that names no node: {text}"
                );
                errors.push(text);
            }
        }
    }
    mover.await.unwrap();
    let moving = moving.elapsed();
    // Settled: one more walk, which must complete.
    let v = version.fetch_add(1, Ordering::SeqCst) + 1;
    let settled = std::time::Instant::now();
    loop {
        match b.handle.invalidate_prefix("/r/").await {
            Ok(_) => break,
            Err(err) if err.is_circuit_open() || err.is_timeout() => {
                // Redis answers again once the moves are over: a breaker
                // still open after 30 s is a failure, not a wait.
                assert!(
                    settled.elapsed() < Duration::from_secs(30),
                    "the walk after the moves: Redis still unavailable after 30 s ({err}); {:?}",
                    b.cache.stats()
                );
                breaker_cooled(&b.cache, &AtomicBool::new(false)).await;
            }
            Err(err) => panic!("the walk after the moves: {err}"),
        }
    }
    floor.fetch_max(v, Ordering::SeqCst);
    let before = answered.load(Ordering::SeqCst);
    while answered.load(Ordering::SeqCst) < before + 400 {
        // A worker that panicked answers no more: its panic is the failure.
        if workers.iter().any(|w| w.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    for path in &paths {
        for p in [&a, &b] {
            let reply = http.get(p.addr, path).await;
            let text = reply.text();
            let got: u64 = text.split(' ').next().unwrap().parse().unwrap();
            assert!(
                got >= v,
                "{path}: {text} ({:?}) after the last walk ({v})",
                reply.cache_status()
            );
        }
    }
    let stale = stale.lock().unwrap().clone();
    let (sa, sb) = (a.cache.stats(), b.cache.stats());
    eprintln!(
        "reshard: {} slots moved in {:.1} s (the near channel's among them); {} requests answered; \
         walks: {oks} Ok, {} errors {:?}, {unavailable} Redis unavailable, took {walk_ms:?} ms; stale answers {}; near hits {}+{}, \
         flushes {}+{}, ack timeouts {}+{}",
        slots.len(),
        moving.as_secs_f64(),
        answered.load(Ordering::SeqCst),
        errors.len(),
        errors.first(),
        stale.len(),
        sa.near_hits,
        sb.near_hits,
        sa.near_flushes,
        sb.near_flushes,
        sa.near_ack_timeouts,
        sb.near_ack_timeouts,
    );
    assert!(
        stale.is_empty(),
        "{} stale answers: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    assert!(
        oks + errors.len() + unavailable >= 1,
        "walks ran while slots moved"
    );
    // The near caches followed their channel's slot.
    assert!(sa.near_flushes >= 1 && sb.near_flushes >= 1);
    assert!(a.cache.near_is_up_for_tests() && b.cache.near_is_up_for_tests());
}

/// A connection whose commands wait while its gate is held, counting the
/// commands held.
#[derive(Clone)]
struct Gated {
    inner: ClusterConnection,
    held: Arc<tokio::sync::watch::Sender<bool>>,
    entered: Arc<AtomicUsize>,
}

impl Gated {
    fn new(inner: ClusterConnection) -> Self {
        Self {
            inner,
            held: Arc::new(tokio::sync::watch::channel(false).0),
            entered: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn pass(&self) {
        let mut held = self.held.subscribe();
        if *held.borrow() {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let _ = held.wait_for(|h| !*h).await;
        }
    }
}

impl redis::aio::ConnectionLike for Gated {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            self.pass().await;
            self.inner.req_packed_command(cmd).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            self.pass().await;
            self.inner.req_packed_commands(cmd, offset, count).await
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// A prefix walk is held at its first batch, after it scanned the first
/// primary; a slot with cached entries is then migrated from a primary not
/// scanned yet to the one scanned. Released, the walk must still remove
/// those entries (it sees the slot moved and walks its new owner again):
/// a read after it returned gets the new version, never the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_migrated_into_a_walked_primary_mid_walk_is_walked_again() {
    const WNS: &str = "rw:";
    let cluster = Arc::new(RedisCluster::new());
    let version = Arc::new(AtomicU64::new(0));
    let gated = Gated::new(cluster.connection().await);
    let cache = FenceCache::builder(gated.clone())
        .cluster(true)
        .namespace(WNS)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(cluster.urls()))
        .build()
        .expect("cache");
    let handle = cache.handle();
    let origin = {
        let version = version.clone();
        move |uri: axum::http::Uri| {
            let version = version.clone();
            async move { format!("{} {}", version.load(Ordering::SeqCst), uri.path()) }
        }
    };
    let addr = serve(Router::new().route("/{*path}", get(origin).layer(cache.layer()))).await;
    let http = Http::new();
    let paths: Vec<String> = (0..60).map(|i| format!("/g/{i}")).collect();
    for path in &paths {
        assert_eq!(http.get(addr, path).await.text(), format!("0 {path}"));
        assert_eq!(http.get(addr, path).await.cache_status(), Some("HIT"));
    }
    version.store(1, Ordering::SeqCst);
    for node in cluster.nodes() {
        node.reset_stats();
    }
    gated.held.send_replace(true);
    let walk = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.invalidate_prefix("/g/").await })
    };
    support::gate::until("the walk's first batch", || {
        gated.entered.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Every primary was scanned once for leases; the walk's first one
    // twice.
    let scans: Vec<u64> = cluster
        .nodes()
        .iter()
        .map(|n| n.command_count("scan"))
        .collect();
    let walked = scans
        .iter()
        .position(|&n| n >= 2)
        .expect("a primary walked");
    assert_eq!(scans.iter().filter(|&&n| n >= 2).count(), 1, "{scans:?}");
    // Entries on a primary not walked yet: their slot moves to the walked one.
    let (from, key) = cluster
        .nodes()
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != walked)
        .find_map(|(i, node)| {
            node.cli(&["KEYS", &format!("{WNS}|/g/*")])
                .lines()
                .find(|k| !k.is_empty() && !k.ends_with(":lease") && !k.ends_with(":vars"))
                .map(|k| (i, k.to_owned()))
        })
        .expect("entries on another primary");
    let slot: u16 = cluster.nodes()[0]
        .cli(&["CLUSTER", "KEYSLOT", &key])
        .parse()
        .unwrap();
    let start = key.find('|').unwrap() + 1;
    let moved_path = key[start..key.find(":{").unwrap()].to_owned();
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || move_slot(&cluster, slot, from, walked))
            .await
            .unwrap();
    }
    assert_eq!(owner(&cluster, slot), walked);
    gated.held.send_replace(false);
    let result = walk.await.unwrap();
    let reply = http.get(addr, &moved_path).await;
    eprintln!(
        "walk across a slot move ({moved_path}, slot {slot}, node {from} -> {walked}): {result:?}; \
         then {moved_path} answered {:?} ({:?})",
        reply.text(),
        reply.cache_status()
    );
    match result {
        Ok(_) => {
            assert_eq!(
                reply.text(),
                format!("1 {moved_path}"),
                "the walk returned Ok but the moved entry survived"
            );
            for path in &paths {
                assert_eq!(http.get(addr, path).await.text(), format!("1 {path}"));
            }
        }
        Err(err) => {
            let text = err.to_string();
            assert!(
                text.contains("were not covered") && text.contains("127.0.0.1:"),
                "{text}"
            );
        }
    }
}

/// A connection whose `SPUBLISH`es fail (as a timed-out call does) while
/// `fail` is set.
#[derive(Clone)]
struct NoSpublish {
    inner: ClusterConnection,
    fail: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
}

impl redis::aio::ConnectionLike for NoSpublish {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let spublish = matches!(cmd.args_iter().next(),
                Some(redis::Arg::Simple(name)) if name.eq_ignore_ascii_case(b"SPUBLISH"));
            if spublish && self.fail.load(Ordering::SeqCst) {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "SPUBLISH lost (test)",
                )));
            }
            self.inner.req_packed_command(cmd).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.inner.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// On a Redis Cluster a walk's near-cache announcement is an `SPUBLISH`
/// after the script removed the entry. When it is lost (the walk fails,
/// naming the node), another near cache still holds the entry Redis no
/// longer has: the next walk that returns `Ok` must still have it dropped
/// (the URL's owed announcement), never leave it answering the old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_near_announcement_is_made_by_the_next_walk() {
    const ONS: &str = "ro:";
    let cluster = RedisCluster::new();
    let version = Arc::new(AtomicU64::new(0));
    let origin = |version: Arc<AtomicU64>| {
        move |uri: axum::http::Uri| {
            let version = version.clone();
            async move { format!("{} {}", version.load(Ordering::SeqCst), uri.path()) }
        }
    };
    // The invalidating process: its SPUBLISHes can be made to fail.
    let conn = NoSpublish {
        inner: cluster.connection().await,
        fail: Arc::new(AtomicBool::new(false)),
        failed: Arc::new(AtomicUsize::new(0)),
    };
    let invalidator = FenceCache::builder(conn.clone())
        .cluster(true)
        .namespace(ONS)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(cluster.urls()))
        .build()
        .expect("cache");
    let handle = invalidator.handle();
    // The process holding the entry in its near cache.
    let holder = FenceCache::builder(cluster.connection().await)
        .namespace(ONS)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(cluster.urls()))
        .near_cache(1 << 20)
        .build()
        .expect("cache");
    let addr = serve(Router::new().route(
        "/{*path}",
        get(origin(version.clone())).layer(holder.layer()),
    ))
    .await;
    support::gate::until("the near cache's subscription", || {
        holder.near_is_up_for_tests()
    })
    .await;
    let http = Http::new();
    for _ in 0..3 {
        assert_eq!(http.get(addr, "/o/1").await.text(), "0 /o/1");
    }
    let near_hits = holder.stats().near_hits;
    assert_eq!(http.get(addr, "/o/1").await.text(), "0 /o/1");
    assert_eq!(
        holder.stats().near_hits,
        near_hits + 1,
        "held in the near cache"
    );

    version.store(1, Ordering::SeqCst);
    conn.fail.store(true, Ordering::SeqCst);
    let lost = handle.invalidate_prefix("/o/").await;
    conn.fail.store(false, Ordering::SeqCst);
    assert_eq!(conn.failed.load(Ordering::SeqCst), 1);
    let err = lost.expect_err("the walk whose announcement was lost fails");
    assert!(err.to_string().contains("127.0.0.1:"), "{err}");

    version.store(2, Ordering::SeqCst);
    let again = handle.invalidate_prefix("/o/").await;
    let reply = http.get(addr, "/o/1").await;
    eprintln!(
        "lost announcement: first walk {err}; second walk {again:?}; then {:?} ({:?})",
        reply.text(),
        reply.cache_status()
    );
    again.expect("the second walk");
    assert_eq!(
        reply.text(),
        "2 /o/1",
        "the walk returned Ok, the near cache kept the old entry"
    );
}
