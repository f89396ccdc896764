//! Redis Cluster (feature `cluster-async`): sharded wake-ups that lose no
//! first message (a waiter subscribes before it marks the lease), and the
//! near cache on a cluster (every invalidation drops the entry in every
//! process's near cache before it returns, whatever shard holds it).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use cachefence::{FenceCache, FenceHandle};
use redis::cluster_async::ClusterConnection;
use support::gate::Gate;
use support::{Http, RedisCluster, serve};

const NS: &str = "cn:";

/// One "process" over the cluster: its own cluster connection, sharded
/// wake-ups and cache (default settings but the namespace), the origin held
/// by `gate` and answering `version`.
async fn gated_proc(
    cluster: &RedisCluster,
    gate: &Gate,
    version: &Arc<AtomicU64>,
) -> (SocketAddr, FenceHandle<ClusterConnection>) {
    let cache = FenceCache::builder(cluster.connection().await)
        .namespace(NS)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(cluster.urls()))
        .build()
        .expect("cache");
    let (gate, version) = (gate.clone(), version.clone());
    let origin = move |uri: axum::http::Uri| {
        let (gate, version) = (gate.clone(), version.clone());
        async move {
            gate.enter().await;
            format!("{} {}", version.load(Ordering::SeqCst), uri.path())
        }
    };
    let app = Router::new().route("/{*path}", get(origin).layer(cache.layer()));
    (serve(app).await, cache.handle())
}

/// The node holding the lease of `path`'s fill, and the lease key.
fn lease_of(cluster: &RedisCluster, path: &str) -> Option<(usize, String)> {
    cluster.nodes().iter().enumerate().find_map(|(i, node)| {
        node.cli(&["KEYS", &format!("{NS}|*")])
            .lines()
            .find(|k| k.ends_with(":lease") && k.contains(&format!("{path}:")))
            .map(|k| (i, k.to_owned()))
    })
}

/// The sharded wake-up channel of an entry, lease or variant key.
fn wake_channel(key: &str) -> String {
    let open = key.find('{').expect("hash tag");
    let close = open + key[open..].find('}').expect("hash tag");
    format!("{NS}|#wake:{}", &key[open..=close])
}

/// Process B waits on process A's held fill, in 10 rounds. The test
/// watches B's waiter mark (`<lease>:w`) on the node owning the entry and,
/// in the same transaction, the subscribers of the entry's sharded channel,
/// and releases A's origin the moment the mark appears. The mark must
/// never exist without B's subscription, and every round's wait ends with
/// a wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_is_subscribed_before_it_marks_the_lease_and_every_round_is_woken() {
    let cluster = RedisCluster::new();
    let version = Arc::new(AtomicU64::new(0));
    let gate = Gate::new();
    let (a, _ha) = gated_proc(&cluster, &gate, &version).await;
    let (b, hb) = gated_proc(&cluster, &Gate::open(), &version).await;
    let http = Http::new();
    let rounds = 10;
    let mut unsubscribed_marks = 0;
    let mut woken = 0;
    for round in 1..=rounds {
        let path = format!("/w/{round}");
        gate.hold();
        let leader = tokio::spawn({
            let (http, path) = (http.clone(), path.clone());
            async move { http.get(a, &path).await.text() }
        });
        gate.called(round).await;
        let (node, lease) = lease_of(&cluster, &path).expect("A's lease");
        let channel = wake_channel(&lease);
        let mut conn = cluster.nodes()[node].multiplexed().await;
        let before = hb.stats().wakeups;
        let waiter = tokio::spawn({
            let (http, path) = (http.clone(), path.clone());
            async move { http.get(b, &path).await.text() }
        });
        // Tight: the test must see the mark as early as it can.
        let subscribers = loop {
            let (marked, (_, subscribers)): (bool, (String, u64)) = redis::pipe()
                .atomic()
                .exists(format!("{lease}:w"))
                .cmd("PUBSUB")
                .arg("SHARDNUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await
                .unwrap();
            if marked {
                break subscribers;
            }
            tokio::task::yield_now().await;
        };
        gate.release();
        let expected = format!("0 {path}");
        assert_eq!(leader.await.unwrap(), expected);
        assert_eq!(waiter.await.unwrap(), expected);
        if subscribers == 0 {
            unsubscribed_marks += 1;
        }
        if hb.stats().wakeups > before {
            woken += 1;
        }
        assert_eq!(gate.calls(), round, "one fill per round");
    }
    assert_eq!(
        (unsubscribed_marks, woken),
        (0, rounds),
        "(marks seen before B's subscription, rounds woken) of {rounds}"
    );
}

// ---------------------------------------------------------------------------
// The near cache on a Redis Cluster
// ---------------------------------------------------------------------------

/// One "process" with a near cache over the cluster: its own cluster
/// connection, cluster listener and near cache, and an app whose origin
/// answers the shared version, tagged `t:<path>`.
struct Proc {
    cache: FenceCache<ClusterConnection>,
    handle: FenceHandle<ClusterConnection>,
    addr: SocketAddr,
}

async fn near_proc(
    cluster: &RedisCluster,
    version: &Arc<AtomicU64>,
    calls: &Arc<AtomicU64>,
) -> Proc {
    let cache = FenceCache::builder(cluster.connection().await)
        .namespace(NEAR_NS)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(cluster.urls()))
        .near_cache(1 << 20)
        .build()
        .expect("cache");
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
    let app = Router::new().route(
        "/{*path}",
        get(origin).layer(cache.layer().honor_request_no_cache(true)),
    );
    let addr = serve(app).await;
    up(&cache).await;
    Proc {
        handle: cache.handle(),
        cache,
        addr,
    }
}

const NEAR_NS: &str = "cnear:";

async fn up(cache: &FenceCache<ClusterConnection>) {
    support::gate::until("the near cache's subscription", || {
        cache.near_is_up_for_tests()
    })
    .await;
}

/// Reads `path` through `p` until its near cache holds it (a miss or a
/// Redis hit first, then the near hit). Returns the body.
async fn warm(http: &Http, p: &Proc, path: &str) -> String {
    for _ in 0..5 {
        let reply = http.get(p.addr, path).await;
        if p.cache.near_holds_for_tests(NEAR_NS, path) {
            return reply.text();
        }
    }
    panic!("{path} never reached the near cache");
}

/// The index of the node holding `path`'s entry.
fn node_of(cluster: &RedisCluster, path: &str) -> Option<usize> {
    cluster.nodes().iter().position(|node| {
        node.cli(&["KEYS", &format!("{NEAR_NS}|*")])
            .lines()
            .any(|k| !k.contains("|#") && k.contains(&format!("{path}:{{")))
    })
}

/// The kinds of invalidation, each through `by`'s handle.
async fn invalidate(kind: &str, by: &FenceHandle<ClusterConnection>, path: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn near_hits_on_a_cluster_make_no_redis_command() {
    let cluster = RedisCluster::new();
    let (version, calls) = (Arc::default(), Arc::default());
    let p = near_proc(&cluster, &version, &calls).await;
    let http = Http::new();
    let paths: Vec<String> = (0..12).map(|i| format!("/h/{i}")).collect();
    for path in &paths {
        warm(&http, &p, path).await;
    }
    let nodes: std::collections::BTreeSet<usize> = paths
        .iter()
        .filter_map(|path| node_of(&cluster, path))
        .collect();
    assert_eq!(nodes.len(), 3, "the entries are on every primary");
    let before = p.cache.stats();
    let commands: u64 = cluster
        .nodes()
        .iter()
        .map(|n| n.command_count("hmget"))
        .sum();
    for path in &paths {
        let reply = http.get(p.addr, path).await;
        assert_eq!(reply.cache_status(), Some("HIT"));
        assert_eq!(reply.text(), "0");
    }
    let after = p.cache.stats();
    assert_eq!(after.near_hits - before.near_hits, paths.len() as u64);
    assert_eq!(after.redis_calls, before.redis_calls);
    let commands_after: u64 = cluster
        .nodes()
        .iter()
        .map(|n| n.command_count("hmget"))
        .sum();
    assert_eq!(commands_after, commands);
    assert_eq!(calls.load(Ordering::SeqCst), paths.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_invalidation_on_a_cluster_drops_the_entry_in_every_near_cache_before_it_returns() {
    let cluster = RedisCluster::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let a = near_proc(&cluster, &version, &calls).await;
    let b = near_proc(&cluster, &version, &calls).await;
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
    let mut nodes = std::collections::BTreeSet::new();
    for (i, kind) in kinds.iter().enumerate() {
        // Three entries per kind, on whatever shards their keys hash to.
        for j in 0..3 {
            let path = format!("/k/{i}/{j}");
            let old = warm(&http, &a, &path).await;
            assert_eq!(warm(&http, &b, &path).await, old);
            nodes.extend(node_of(&cluster, &path));
            let evictions = b.cache.stats().near_evictions;
            let new = version.fetch_add(1, Ordering::SeqCst) + 1;
            invalidate(kind, &a.handle, &path).await;
            // Dropped everywhere when the call returns: no waiting here.
            assert!(!b.cache.near_holds_for_tests(NEAR_NS, &path), "{kind}: b");
            assert!(!a.cache.near_holds_for_tests(NEAR_NS, &path), "{kind}: a");
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
    }
    assert_eq!(nodes.len(), 3, "entries on every primary");
    for p in [&a, &b] {
        assert_eq!(p.cache.stats().near_flushes, 0);
        assert_eq!(p.cache.stats().near_ack_timeouts, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_on_a_cluster_drops_the_entry_in_the_other_near_cache() {
    let cluster = RedisCluster::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let a = near_proc(&cluster, &version, &calls).await;
    let b = near_proc(&cluster, &version, &calls).await;
    let http = Http::new();
    let mut nodes = std::collections::BTreeSet::new();
    for i in 0..12 {
        let path = format!("/s/{i}");
        let v = version.load(Ordering::SeqCst);
        warm(&http, &a, &path).await;
        assert_eq!(warm(&http, &b, &path).await, v.to_string());
        nodes.extend(node_of(&cluster, &path));
        let v = version.fetch_add(1, Ordering::SeqCst) + 1;
        // A refetch through `a` stores the new version over the fresh one.
        let req = http::Request::get(format!("http://{}{path}", a.addr))
            .header("cache-control", "no-cache")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        assert_eq!(http.request(req).await.text(), v.to_string());
        assert!(!a.cache.near_holds_for_tests(NEAR_NS, &path));
        // A store does not wait for acknowledgements: its announcement
        // (classic pub/sub, forwarded to every node) reaches `b` on its own.
        support::gate::until("b dropping the stored-over entry", || {
            !b.cache.near_holds_for_tests(NEAR_NS, &path)
        })
        .await;
        assert_eq!(http.get(b.addr, &path).await.text(), v.to_string());
    }
    let keys: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.cli(&["KEYS", "*"]))
        .collect();
    assert_eq!(nodes.len(), 3, "entries on every primary: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_with_no_layer_hears_the_acknowledgements_on_a_cluster() {
    let cluster = RedisCluster::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let p = near_proc(&cluster, &version, &calls).await;
    let admin = FenceCache::builder(cluster.connection().await)
        .namespace(NEAR_NS)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(cluster.urls()))
        .build()
        .expect("cache");
    let handle = admin.handle();
    let http = Http::new();
    support::gate::until("the admin's acknowledgement channel", || {
        cluster
            .nodes()
            .iter()
            .map(|n| {
                n.cli(&["PUBSUB", "CHANNELS", &format!("{NEAR_NS}|#ack:*")])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .sum::<usize>()
            == 2
    })
    .await;
    for i in 0..20 {
        let path = format!("/w/{i}");
        warm(&http, &p, &path).await;
        handle.invalidate_path(&path).await.unwrap();
        assert!(!p.cache.near_holds_for_tests(NEAR_NS, &path));
    }
    assert_eq!(admin.stats().near_ack_timeouts, 0);
    assert_eq!(p.cache.stats().near_evictions, 20);
}

/// Over 300 invalidations on a cluster with three near caches: no near
/// cache still holds the entry when the call returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn near_caches_on_a_cluster_drop_an_entry_before_the_invalidation_returns() {
    let cluster = RedisCluster::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let procs = [
        near_proc(&cluster, &version, &calls).await,
        near_proc(&cluster, &version, &calls).await,
        near_proc(&cluster, &version, &calls).await,
    ];
    let http = Http::new();
    let n = 300;
    let mut call_us = Vec::with_capacity(n);
    let mut held_after_return = 0;
    for i in 0..n {
        let path = format!("/m/{}", i % 10);
        for p in &procs {
            warm(&http, p, &path).await;
        }
        let by = &procs[i % procs.len()].handle;
        let started = std::time::Instant::now();
        by.invalidate_path(&path).await.unwrap();
        call_us.push(started.elapsed().as_micros() as u64);
        for p in &procs {
            if p.cache.near_holds_for_tests(NEAR_NS, &path) {
                held_after_return += 1;
            }
        }
    }
    call_us.sort_unstable();
    eprintln!(
        "cluster near: {n} invalidations over 3 caches: held after return {held_after_return}; \
         invalidate_path call p50 {} µs, p99 {} µs",
        call_us[n / 2],
        call_us[n * 99 / 100],
    );
    assert_eq!(held_after_return, 0);
    for p in &procs {
        assert_eq!(p.cache.stats().near_ack_timeouts, 0);
        assert_eq!(p.cache.stats().near_flushes, 0);
    }
}

/// Kills, on every node, the connections holding subscriptions (the
/// listeners'); returns how many.
fn kill_subscribers(cluster: &RedisCluster) -> usize {
    let mut killed = 0;
    for node in cluster.nodes() {
        for line in node.cli(&["CLIENT", "LIST"]).lines() {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(&format!("{name}=")))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if field("sub") + field("ssub") > 0 {
                node.cli(&["CLIENT", "KILL", "ID", &field("id").to_string()]);
                killed += 1;
            }
        }
    }
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_cluster_subscription_flushes_the_near_cache_until_it_is_back() {
    let cluster = RedisCluster::new();
    let (version, calls) = (Arc::new(AtomicU64::new(0)), Arc::default());
    let a = near_proc(&cluster, &version, &calls).await;
    let b = near_proc(&cluster, &version, &calls).await;
    let http = Http::new();
    warm(&http, &a, "/l").await;
    warm(&http, &b, "/l").await;
    assert!(kill_subscribers(&cluster) >= 2);
    support::gate::until("the flushes", || {
        a.cache.stats().near_flushes >= 1 && b.cache.stats().near_flushes >= 1
    })
    .await;
    assert!(!a.cache.near_holds_for_tests(NEAR_NS, "/l"));
    // In use again once subscribed again; coherent again.
    up(&a.cache).await;
    up(&b.cache).await;
    warm(&http, &a, "/l").await;
    warm(&http, &b, "/l").await;
    version.store(1, Ordering::SeqCst);
    a.handle.invalidate_path("/l").await.unwrap();
    assert!(!b.cache.near_holds_for_tests(NEAR_NS, "/l"));
    assert_eq!(http.get(b.addr, "/l").await.text(), "1");
    assert_eq!(a.cache.stats().near_ack_timeouts, 0);
}
