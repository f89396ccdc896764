//! Recipe: a standalone invalidation-queue worker process (a sidecar or its
//! own deployment) that drains the queue until SIGTERM or Ctrl-C, then
//! shuts down cleanly: it finishes the messages in hand and releases the
//! rest to the other workers of the group.
//!
//! `cargo run --example queue_worker -- shop:` works for the namespace
//! `shop:` against `REDIS_URL` (else a throwaway `redis-server`) until it is
//! told to stop. `-- --self-test` (what CI runs) enqueues an invalidation,
//! waits until it is applied, then sends itself SIGTERM.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use cachefence::{FenceCache, Invalidation};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let self_test = std::env::args().any(|a| a == "--self-test");
    let namespace = match std::env::args().skip(1).find(|a| !a.starts_with("--")) {
        Some(ns) => ns,
        None => format!("worker-recipe-{}:", std::process::id()),
    };
    let redis = common::redis()?;
    let client = redis::Client::open(redis.url.as_str())?;
    // The worker applies invalidations through a cache handle of the same
    // namespace (give it the same settings as the app's cache).
    let conn = client.get_connection_manager().await?;
    let cache = FenceCache::builder(conn).namespace(&namespace).build()?;
    let queue = cache.handle().queue();
    let worker = queue.worker(client);
    let control = worker.handle();
    let mut task = tokio::spawn(worker.run());
    println!("worker for {namespace}: draining; SIGTERM or Ctrl-C to stop");

    let mut terminate = signal(SignalKind::terminate())?;
    if self_test {
        queue.enqueue(&Invalidation::path("/products/42")).await?;
        let applied = async {
            while control.stats().applied == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), applied).await?;
        // What an orchestrator does to stop the process.
        std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()?;
    }
    tokio::select! {
        _ = terminate.recv() => println!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => println!("Ctrl-C: stopping"),
        // The worker only ends by itself if the runtime shuts down.
        _ = &mut task => return Err("the worker stopped by itself".into()),
    }
    control.shutdown(); // finish the messages in hand, release the rest
    tokio::time::timeout(Duration::from_secs(10), task).await??;
    let stats = control.stats();
    println!(
        "stopped cleanly: applied {}, retries {}",
        stats.applied, stats.retries
    );
    Ok(())
}
