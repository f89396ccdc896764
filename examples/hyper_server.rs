//! Recipe: a plain hyper server (no axum) with the cache put in front of a
//! `tower::service_fn` by `tower::ServiceBuilder`.
//!
//! `cargo run --example hyper_server` serves on 127.0.0.1:3000 until Ctrl-C
//! (Redis: `REDIS_URL`, else a throwaway `redis-server`); `-- --self-test`
//! (what CI runs) asks twice for one page and exits.

#[path = "common/client.rs"]
mod client;
#[path = "common/mod.rs"]
mod common;

use bytes::Bytes;
use cachefence::{FenceCache, HealingConnection};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = common::redis()?;
    let client = redis::Client::open(redis.url.as_str())?;
    let ns = format!("hyper-recipe-{}:", std::process::id());
    let conn = HealingConnection::connect(client.clone()).await?;
    let cache = FenceCache::builder(conn)
        .wake_ups(client)
        .namespace(ns)
        .build()?;
    let origin = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
        let page = format!("rendered {}\n", req.uri().path());
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(page))))
    });
    let svc = tower::ServiceBuilder::new()
        .layer(cache.layer())
        .service(origin);

    let self_test = std::env::args().any(|a| a == "--self-test");
    let bind = if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = TowerToHyperService::new(svc.clone());
            let builder = auto::Builder::new(TokioExecutor::new());
            tokio::spawn(async move { builder.serve_connection(TokioIo::new(stream), svc).await });
        }
    });
    if self_test {
        return client::expect_miss_then_hit(addr, "/hello").await;
    }
    println!("listening on http://{addr}; try: curl -i http://{addr}/hello");
    Ok(tokio::signal::ctrl_c().await?)
}
