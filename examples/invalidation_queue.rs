//! The durable invalidation queue: cache two pages, enqueue their
//! invalidations (and one that Redis-side logic refuses), run a worker that
//! applies them, show the result and shut the worker down cleanly.
//!
//! Runs against `REDIS_URL` (default `redis://127.0.0.1:6379/`), in a
//! namespace of its own that it removes at the end.
//! `RUST_LOG=cachefence=debug` shows more of what happens.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::routing::get;
use cachefence::{FenceLayer, Invalidation};
use tower::ServiceExt;
use tracing_subscriber::EnvFilter;

async fn product(Path(id): Path<u32>) -> String {
    format!("product {id}\n")
}

/// GETs `path` through the cached router and returns the `x-cache` status.
async fn get_status(app: &Router, path: &str) -> Result<String, Box<dyn std::error::Error>> {
    let request = http::Request::get(path).body(Body::empty())?;
    let response = app.clone().oneshot(request).await?;
    Ok(response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("cachefence=info,cachefence::queue=debug")),
        )
        .init();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let client = redis::Client::open(url.as_str())?;
    let conn = client.get_connection_manager().await?;
    let fence = FenceLayer::new(conn.clone())
        .ttl(Duration::from_secs(60))
        .namespace(format!("queue-demo-{}:", std::process::id()));
    let handle = fence.handle();
    let app = Router::new().route("/products/{id}", get(product).layer(fence));

    for path in ["/products/1", "/products/2"] {
        let first = get_status(&app, path).await?;
        let second = get_status(&app, path).await?;
        println!("GET {path}: {first}, then {second}");
    }

    // Producer side: append to the stream and return.
    let queue = handle.queue();
    let ids = queue
        .enqueue_all(&[
            Invalidation::path("/products/1"),
            Invalidation::prefix("/products/"),
            // Refused by apply (an empty prefix): it ends up a dead letter.
            Invalidation::prefix(""),
        ])
        .await?;
    println!("enqueued {ids:?}; backlog {}", queue.backlog().await?);

    // Consumer side: any number of workers, in any processes.
    let worker = queue
        .worker(client)
        .block(Duration::from_secs(1))
        .max_attempts(3)
        .backoff(Duration::from_millis(100), Duration::from_millis(400));
    println!("worker {} started", worker.consumer_name());
    let control = worker.handle();
    let task = tokio::spawn(worker.run());

    let deadline = Instant::now() + Duration::from_secs(15);
    while {
        let s = control.stats();
        s.applied < 2 || s.dead_lettered < 1
    } {
        if Instant::now() > deadline {
            return Err(format!("the worker did not finish: {:?}", control.stats()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = control.stats();
    println!(
        "applied {}, retried {}, dead-lettered {}; backlog {}",
        stats.applied,
        stats.retries,
        stats.dead_lettered,
        queue.backlog().await?
    );
    let queue_stats = queue.stats().await?;
    println!(
        "queue: depth {}, dead letters {}, applied {}, retried {}, dead-lettered {}",
        queue_stats.depth,
        queue_stats.dead_letters,
        queue_stats.applied,
        queue_stats.retried,
        queue_stats.dead_lettered
    );
    for dead in queue.dead_letters(100).await? {
        if ids.contains(&dead.source_id) {
            println!(
                "dead letter {:?} after {} attempts: {}",
                dead.payload.unwrap_or_default(),
                dead.attempts,
                dead.error
            );
        }
    }
    for path in ["/products/1", "/products/2"] {
        println!(
            "GET {path} after the invalidations: {}",
            get_status(&app, path).await?
        );
    }

    control.shutdown();
    task.await?;
    println!("worker stopped cleanly");

    // Leave nothing behind in the demo namespace.
    handle.invalidate_all().await?;
    let attempts = format!("{}:attempts", queue.stream_key());
    let counters = format!("{}:stats", queue.stream_key());
    redis::cmd("UNLINK")
        .arg(queue.stream_key())
        .arg(queue.dead_letter_key())
        .arg(attempts)
        .arg(counters)
        .exec_async(&mut conn.clone())
        .await?;
    Ok(())
}
