//! Recipe: an axum app that shuts down gracefully on SIGTERM or Ctrl-C:
//! the server stops accepting connections and finishes the requests in
//! flight, then `FenceHandle::shutdown` lets the cache's fills finish for a
//! grace period and releases the Redis leases of those still running, so
//! the other processes take those keys over at once instead of waiting for
//! the leases to expire.
//!
//! `cargo run --example graceful_shutdown` serves on 127.0.0.1:3000 until
//! told to stop (Redis from `REDIS_URL`, else a throwaway `redis-server`).
//! `-- --self-test` (what CI runs) starts a slow fill, sends itself SIGTERM
//! while it runs, and checks the request is still answered.

#[path = "common/client.rs"]
mod client;
#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use cachefence::{FenceCache, HealingConnection};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

/// Resolves on SIGTERM (what orchestrators send) or Ctrl-C.
async fn stop_signal() {
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A slow page; `started` is told when a call begins (for the self-test).
async fn report(started: Arc<Notify>) -> &'static str {
    started.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await; // a slow query
    "the report\n"
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = common::redis()?;
    let client = redis::Client::open(redis.url.as_str())?;
    let cache = FenceCache::builder(HealingConnection::connect(client.clone()).await?)
        .namespace(format!("shutdown-recipe-{}:", std::process::id()))
        .wake_ups(client)
        .build()?;
    let handle = cache.handle();
    let started = Arc::new(Notify::new());
    let on_call = started.clone();
    let app = Router::new().route(
        "/report",
        get(move || report(on_call.clone())).layer(cache.layer()),
    );

    let self_test = std::env::args().any(|a| a == "--self-test");
    let bind = if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}; SIGTERM or Ctrl-C to stop");
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_signal())
            .await
    });

    let in_flight = self_test.then(|| tokio::spawn(client::get(addr, "/report")));
    if in_flight.is_some() {
        // Once the fill is running, stop the way an orchestrator does.
        started.notified().await;
        std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()?;
    }

    // The server returns once the signal came and its requests are answered.
    server.await??;
    // Then the cache: fills get up to 2 s to finish, the rest release
    // their leases.
    let released = handle.shutdown(Duration::from_secs(2)).await;
    println!("stopped: {released} leases released");
    if let Some(request) = in_flight {
        let reply = request.await??;
        println!(
            "the request in flight at SIGTERM: {} {}",
            reply.status,
            reply.body.trim()
        );
        if reply.status != 200 || reply.body != "the report\n" {
            return Err(format!("the request in flight was not answered: {reply:?}").into());
        }
    }
    Ok(())
}
