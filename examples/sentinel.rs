//! Recipe: the cache on a master followed through Redis Sentinel (feature
//! `sentinel`): one `SentinelConnection` that moves to the new master after
//! a failover, shared by the cache, its wake-ups and the queue worker.
//!
//! Running it needs Sentinels, so CI only compiles it:
//!
//! ```text
//! REDIS_SENTINELS=redis://10.0.0.1:26379/,redis://10.0.0.2:26379/ REDIS_MASTER=mymaster \
//!     cargo run --example sentinel --features sentinel
//! ```
//!
//! It serves on 127.0.0.1:3000 until Ctrl-C.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use cachefence::FenceCache;
use cachefence::sentinel::SentinelConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(sentinels) = std::env::var("REDIS_SENTINELS") else {
        eprintln!("set REDIS_SENTINELS to a comma-separated list of Sentinel URLs");
        std::process::exit(2);
    };
    let sentinels: Vec<String> = sentinels.split(',').map(str::to_owned).collect();
    let master = std::env::var("REDIS_MASTER").unwrap_or_else(|_| "mymaster".into());
    // User, password and TLS of the master connections: the third argument
    // (a `SentinelNodeConnectionInfo`).
    let client = SentinelClient::build(sentinels, master, None, SentinelServerType::Master)?;
    let conn = SentinelConnection::connect(client).await?;
    let cache = FenceCache::builder(conn.clone())
        .sentinel_wake_ups(&conn) // subscribes at the master, moves with it
        .namespace("shop:")
        .build()?;
    let handle = cache.handle();
    let worker = handle.queue().sentinel_worker(&conn); // blocking reads at the master
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
