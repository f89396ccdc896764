//! Recipe: the near cache, an in-process cache of decoded hits in front of
//! Redis. Two caches stand for two app processes sharing one Redis: hits in
//! the first are served from its memory with no Redis command, and an
//! invalidation through the second drops the first's copy before it returns.
//!
//! `cargo run --example near_cache` runs against `REDIS_URL` (else a
//! throwaway `redis-server`), prints what happens and exits.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use cachefence::FenceCache;
use redis::aio::ConnectionManager;
use tower::ServiceExt;

/// One "process": its own connection, wake-up subscription and near cache.
async fn process(
    url: &str,
    ns: &str,
) -> Result<FenceCache<ConnectionManager>, Box<dyn std::error::Error>> {
    let client = redis::Client::open(url)?;
    let cache = FenceCache::builder(client.get_connection_manager().await?)
        .namespace(ns)
        .wake_ups(client) // the near cache lives on this subscription
        .near_cache(64 << 20) // up to 64 MiB of decoded hits
        .build()?; // an error without a wake-up source
    Ok(cache)
}

async fn x_cache(app: &Router, path: &str) -> Result<String, Box<dyn std::error::Error>> {
    let response = app
        .clone()
        .oneshot(http::Request::get(path).body(Body::empty())?)
        .await?;
    let status = response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok());
    Ok(status.unwrap_or("-").to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = common::redis()?;
    let ns = format!("near-recipe-{}:", std::process::id());
    let (a, b) = (
        process(&redis.url, &ns).await?,
        process(&redis.url, &ns).await?,
    );
    let app = Router::new().route("/page", get(|| async { "a page\n" }).layer(a.layer()));

    // A miss, then hits: the first hit from Redis takes the entry into the
    // near cache (once its subscription is up), the next ones are served
    // from memory.
    let first = x_cache(&app, "/page").await?;
    let mut tries = 0;
    while a.stats().near_hits == 0 {
        tries += 1;
        if tries > 200 {
            return Err("no near hit after 200 requests".into());
        }
        x_cache(&app, "/page").await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = a.stats().redis_calls;
    for _ in 0..100 {
        x_cache(&app, "/page").await?;
    }
    let stats = a.stats();
    println!(
        "first GET: {first}; then {} near hits, {} Redis calls for the last 100",
        stats.near_hits,
        stats.redis_calls - calls
    );

    // Another process invalidates: when the call returns, this process's
    // near copy is gone.
    b.handle().invalidate_path("/page").await?;
    let after = x_cache(&app, "/page").await?;
    println!("after an invalidation through the other process: {after}");
    b.handle().invalidate_all().await?;
    if first != "MISS" || stats.redis_calls != calls || after != "MISS" {
        return Err("the near cache did not behave as shown".into());
    }
    Ok(())
}
