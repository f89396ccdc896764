//! The main demo: an axum shop with per-route TTLs, tags and an
//! invalidation endpoint, driven by a few requests that show what the cache
//! does. `cargo run --example shop -- --serve` keeps the server running.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use cachefence::{FenceCache, FenceHandle};
use redis::aio::ConnectionManager;

#[derive(Clone)]
struct Shop {
    origin_calls: Arc<AtomicU64>,
    fence: FenceHandle<ConnectionManager>,
}

async fn product(State(shop): State<Shop>, Path(id): Path<u32>) -> impl IntoResponse {
    let n = shop.origin_calls.fetch_add(1, Ordering::Relaxed) + 1;
    tokio::time::sleep(Duration::from_millis(50)).await; // a slow database
    (
        [("cache-tag", format!("product:{id} products"))],
        format!("product {id} (rendered by origin call #{n})\n"),
    )
}

async fn prices(State(shop): State<Shop>) -> String {
    let n = shop.origin_calls.fetch_add(1, Ordering::Relaxed) + 1;
    format!("prices (origin call #{n})\n")
}

async fn invalidate(State(shop): State<Shop>, Path(id): Path<u32>) -> impl IntoResponse {
    match shop.fence.invalidate_tag(&format!("product:{id}")).await {
        Ok(n) => (StatusCode::OK, format!("invalidated {n} entries\n")),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("invalidation failed: {e}\n"),
        ),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = common::redis()?;
    let client = redis::Client::open(redis.url.as_str())?;
    let fence = FenceCache::builder(client.get_connection_manager().await?)
        .wake_ups(client)
        .build()?
        .layer()
        .ttl(Duration::from_secs(60))
        .grace(Duration::from_secs(30))
        .namespace(format!("shop-demo-{}:", std::process::id()));
    let shop = Shop {
        origin_calls: Arc::new(AtomicU64::new(0)),
        fence: fence.handle(),
    };
    let app = Router::new()
        .route("/products/{id}", get(product).layer(fence.clone()))
        .route(
            "/prices",
            get(prices).layer(fence.clone().ttl(Duration::from_secs(5))),
        )
        .route("/admin/invalidate/{id}", post(invalidate))
        .with_state(shop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("shop listening on http://{addr}\n");

    let show = |method: &'static str, path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: demo\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        let cache = raw
            .lines()
            .find_map(|l| l.strip_prefix("x-cache: "))
            .unwrap_or("-")
            .to_owned();
        let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
        println!("{method:4} {path:24} x-cache: {cache:6} {body}");
        Ok::<_, std::io::Error>(())
    };

    show("GET", "/products/42").await?;
    show("GET", "/products/42").await?;
    show("HEAD", "/products/42").await?;
    show("GET", "/prices").await?;
    show("GET", "/prices").await?;
    show("POST", "/admin/invalidate/42").await?;
    show("GET", "/products/42").await?;

    // A stampede: 200 concurrent requests at a cold key reach the origin once.
    let before = shop.origin_calls.load(Ordering::Relaxed);
    let burst: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(b"GET /products/7 HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n")
                    .await?;
                let mut sink = Vec::new();
                s.read_to_end(&mut sink).await?;
                Ok::<_, std::io::Error>(())
            })
        })
        .collect();
    for task in burst {
        task.await??;
    }
    let calls = shop.origin_calls.load(Ordering::Relaxed) - before;
    println!("\n200 concurrent GET /products/7 on a cold key -> {calls} origin call(s)");
    println!("stats: {:?}", shop.fence.stats());

    if std::env::args().any(|a| a == "--serve") {
        println!("\nserving until Ctrl-C; try: curl -i http://{addr}/products/1");
        tokio::signal::ctrl_c().await?;
    }
    shop.fence.invalidate_all().await?;
    drop(redis);
    Ok(())
}
