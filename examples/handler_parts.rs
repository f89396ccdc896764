//! Recipe: handlers that choose their own TTL and tags with the `CacheTtl`
//! and `CacheTags` response parts (feature `axum`), then one tag
//! invalidation that removes every page carrying the tag.
//!
//! `cargo run --example handler_parts --features axum` runs against
//! `REDIS_URL` (else a throwaway `redis-server`), prints what happens and
//! exits.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::response::IntoResponse;
use axum::routing::get;
use cachefence::{CacheTags, CacheTtl, FenceCache};
use tower::ServiceExt;

/// A product page: cached 10 minutes, tagged with the product and with
/// `products` (so one call can drop every product page).
async fn product(Path(id): Path<u32>) -> impl IntoResponse {
    (
        CacheTtl(Duration::from_secs(600)),
        CacheTags(vec![format!("product:{id}"), "products".to_owned()]),
        format!("product {id}\n"),
    )
}

/// Stock levels change fast: cached 2 seconds, tagged like the product.
async fn stock(Path(id): Path<u32>) -> impl IntoResponse {
    (
        CacheTtl(Duration::from_secs(2)),
        CacheTags(vec![format!("product:{id}")]),
        format!("product {id}: 3 in stock\n"),
    )
}

/// Sends a GET through the router and returns its `x-cache` header.
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
    let client = redis::Client::open(redis.url.as_str())?;
    let cache = FenceCache::builder(client.get_connection_manager().await?)
        .namespace(format!("parts-recipe-{}:", std::process::id()))
        .build()?;
    let handle = cache.handle();
    let app = Router::new()
        .route("/products/{id}", get(product).layer(cache.layer()))
        .route("/products/{id}/stock", get(stock).layer(cache.layer()));

    let mut seen = Vec::new();
    for path in [
        "/products/1",
        "/products/1",
        "/products/1/stock",
        "/products/1/stock",
    ] {
        seen.push(x_cache(&app, path).await?);
    }
    println!("two GETs of a product page, then of its stock: {seen:?}");
    let removed = handle.invalidate_tag("product:1").await?;
    let after = x_cache(&app, "/products/1").await?;
    println!("invalidate_tag(\"product:1\") removed {removed} entries; the page is now a {after}");
    handle.invalidate_all().await?;
    if seen != ["MISS", "HIT", "MISS", "HIT"] || removed != 2 || after != "MISS" {
        return Err("the handler's TTL and tags did not work as shown".into());
    }
    Ok(())
}
