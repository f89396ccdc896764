//! Prometheus metrics for the cache: an axum app whose cached route is named
//! `products`, and `/metrics` serving the Prometheus text format through
//! `metrics-exporter-prometheus`.
//!
//! ```text
//! cargo run --example metrics --features metrics            # a short stampede, then the /metrics text
//! cargo run --example metrics --features metrics -- --serve # keep serving on 127.0.0.1:3000
//! ```

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use cachefence::{FenceCache, FenceLayer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the Prometheus recorder for the whole process (once), with
/// histogram buckets for the cache's `*_duration_seconds` metrics.
pub(crate) fn install_prometheus() -> Result<PrometheusHandle, Box<dyn std::error::Error>> {
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &buckets)?
        .install_recorder()?)
}

/// The app: a slow cached route named `products`, and `/metrics`.
pub(crate) fn app(
    fence: FenceLayer,
    prometheus: PrometheusHandle,
    origin_calls: Arc<AtomicU64>,
) -> Router {
    let products = Router::new()
        .route(
            "/products/{id}",
            get(
                |State(calls): State<Arc<AtomicU64>>, Path(id): Path<u32>| async move {
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await; // a slow database
                    format!("product {id}\n")
                },
            ),
        )
        .layer(fence.name("products"))
        .with_state(origin_calls);
    let metrics = Router::new().route("/metrics", get(move || async move { prometheus.render() }));
    products.merge(metrics)
}

#[allow(dead_code)] // the test that includes this file has its own main
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = install_prometheus()?;
    let redis = common::redis()?;
    let client = redis::Client::open(redis.url.as_str())?;
    let fence = FenceCache::builder(client.get_connection_manager().await?)
        .wake_ups(client)
        .build()?
        .layer()
        .namespace(format!("metrics-demo-{}:", std::process::id()));
    let calls = Arc::new(AtomicU64::new(0));
    let handle = fence.handle();
    let app = app(fence, prometheus, calls.clone());

    let serve = std::env::args().any(|a| a == "--serve");
    let listener = tokio::net::TcpListener::bind(if serve {
        "127.0.0.1:3000"
    } else {
        "127.0.0.1:0"
    })
    .await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    if serve {
        println!("serving on http://{addr}; try /products/1 and /metrics");
        std::future::pending::<()>().await;
    }

    // A short stampede: 50 concurrent requests for one cold key, then 50 hits.
    let get = |path: String| http_get(addr, path);
    let stampede = (0..50).map(|_| get("/products/1".into()));
    for r in futures_util::future::join_all(stampede).await {
        r?;
    }
    for _ in 0..50 {
        get("/products/1".into()).await?;
    }
    println!("origin calls: {}\n", calls.load(Ordering::Relaxed));
    let text = get("/metrics".into()).await?;
    for line in text.lines().filter(|l| l.starts_with("cachefence_")) {
        println!("{line}");
    }
    handle.invalidate_all().await?;
    drop(redis);
    Ok(())
}

/// `GET path` over a fresh connection; the body.
async fn http_get(addr: std::net::SocketAddr, path: String) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await?;
    Ok(raw
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned()))
}
