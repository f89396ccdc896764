//! Recipe: the cache on a Redis Cluster (feature `cluster-async`): its own
//! cluster connection, replaced if it wedges, sharded wake-ups, and a queue
//! worker whose blocking reads follow the primary owning the queue.
//!
//! Running it needs a cluster (Redis 7 for sharded wake-ups), so CI only
//! compiles it:
//!
//! ```text
//! REDIS_CLUSTER=redis://10.0.0.1:6379/,redis://10.0.0.2:6379/ \
//!     cargo run --example cluster --features cluster-async
//! ```
//!
//! It serves on 127.0.0.1:3000 until Ctrl-C.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use cachefence::{FenceCache, HealingConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(nodes) = std::env::var("REDIS_CLUSTER") else {
        eprintln!("set REDIS_CLUSTER to a comma-separated list of cluster node URLs");
        std::process::exit(2);
    };
    let nodes: Vec<String> = nodes.split(',').map(str::to_owned).collect();
    // Its own cluster connection, replaced if it wedges after a failover.
    let conn = HealingConnection::connect_cluster(ClusterClient::new(nodes.clone())?).await?;
    let cache = FenceCache::builder(conn)
        // sharded wake-ups (SSUBSCRIBE) on the listener's own RESP3 connection
        .cluster_wake_ups(ClusterClientBuilder::new(nodes.clone()))
        .namespace("shop:")
        .build()?;
    let handle = cache.handle();

    // The worker's client lends only its settings (user, password, TLS): its
    // blocking reads go to the primary that owns the queue's slot.
    let worker = handle
        .queue()
        .worker(redis::Client::open(nodes[0].as_str())?);
    let control = worker.handle();
    let worker_task = tokio::spawn(worker.run());

    let app = Router::new().route(
        "/products/{id}",
        get(|| async { "a product\n" }).layer(cache.layer().ttl(Duration::from_secs(60))),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    control.shutdown();
    worker_task.await?;
    handle.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
