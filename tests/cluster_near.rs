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
    let cache = FenceCache::new(cluster.connection().await)
        .namespace(NS)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(cluster.urls()));
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
