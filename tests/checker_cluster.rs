//! The randomized checker (tests/checker.rs) against a Redis Cluster of
//! three primaries: the same traffic, invalidations and invariants; the
//! faults are `CLIENT KILL` of the data and of the pub/sub connections on
//! every node and a SIGKILLed leader (no restart: a node without replicas
//! loses its slots' data; no near caches: the setting is ignored on a
//! cluster). `CHECKER_SEED`, `CHECKER_SECS` / `CHECKER_OPS` and
//! `CHECKER_STRICT` as there.

mod chk;
mod support;

use chk::Backend;
use support::RedisCluster;

/// A server process of the checker (does nothing unless
/// `CACHEFENCE_ROLE=server`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a server process of the checker, run by it with CACHEFENCE_ROLE=server"]
async fn checker_cluster_server() {
    chk::server().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_features_and_faults_keep_every_promise_on_a_cluster() {
    let cluster = tokio::task::block_in_place(RedisCluster::new);
    chk::run(Backend::Cluster(cluster), "checker_cluster_server").await;
}
