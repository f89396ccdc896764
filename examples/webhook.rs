//! Recipe: a webhook that verifies a signed payload and turns it into tag
//! invalidations through the durable queue. A catalogue service POSTs one
//! tag per line (`product:42`) with `x-signature: sha256=<hex>`, the
//! HMAC-SHA256 of the body under a shared secret; the handler checks the
//! signature, enqueues the invalidations and answers 202 at once; a queue
//! worker (here in the same process, usually in every app process) applies
//! them.
//!
//! The signature is checked with the `hmac` crate (HMAC-SHA256 over
//! `sha2`), whose `verify_slice` compares in constant time.
//!
//! `cargo run --example webhook` serves on 127.0.0.1:3000 until Ctrl-C
//! (secret from `WEBHOOK_SECRET`; Redis from `REDIS_URL`, else a throwaway
//! `redis-server`); `-- --self-test` (what CI runs) sends a forged and a
//! signed webhook and checks the cached page is gone.

#[path = "common/client.rs"]
mod client;
#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use cachefence::queue::InvalidationQueue;
use cachefence::{FenceCache, Invalidation};
use hmac::{Hmac, KeyInit, Mac};
use redis::aio::ConnectionManager;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 of `message` under `key` (HMAC takes a key of any length:
/// the error never happens).
fn hmac_sha256(key: &[u8], message: &[u8]) -> Result<[u8; 32], hmac::digest::InvalidLength> {
    let mut mac = HmacSha256::new_from_slice(key)?;
    mac.update(message);
    Ok(mac.finalize().into_bytes().into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `text` as bytes, two hex digits each; `None` if it isn't hex.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether `header` (`sha256=<hex>`) is the body's HMAC under `secret`,
/// compared in constant time (`Mac::verify_slice`).
fn signed(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(given) = header
        .and_then(|h| h.strip_prefix("sha256="))
        .and_then(unhex)
    else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

#[derive(Clone)]
struct Hook {
    secret: Arc<[u8]>,
    queue: InvalidationQueue<ConnectionManager>,
}

/// `POST /webhooks/catalog`: one tag per line, signed.
async fn catalog_changed(State(hook): State<Hook>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
    if !signed(&hook.secret, &body, signature) {
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let tags: Vec<Invalidation> = text
        .lines()
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .map(Invalidation::tag)
        .collect();
    match hook.queue.enqueue_all(&tags).await {
        Ok(_) => StatusCode::ACCEPTED,
        // Redis unavailable: the sender retries the webhook.
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn product(Path(id): Path<u32>) -> ([(&'static str, String); 1], String) {
    (
        [("cache-tag", format!("product:{id}"))],
        format!("product {id}\n"),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // RFC 4231, test case 2: the HMAC used is the standard one.
    assert_eq!(
        hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")?),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    let redis = common::redis()?;
    let client = redis::Client::open(redis.url.as_str())?;
    let cache = FenceCache::builder(client.get_connection_manager().await?)
        .namespace(format!("webhook-recipe-{}:", std::process::id()))
        .wake_ups(client.clone())
        .build()?;
    let handle = cache.handle();
    let queue = handle.queue();
    let worker = queue.worker(client);
    let control = worker.handle();
    let worker_task = tokio::spawn(worker.run());

    let secret = std::env::var("WEBHOOK_SECRET").unwrap_or_else(|_| "demo secret".into());
    let hook = Hook {
        secret: secret.as_bytes().into(),
        queue,
    };
    let app = Router::new()
        .route("/products/{id}", get(product).layer(cache.layer()))
        .route("/webhooks/catalog", post(catalog_changed))
        .with_state(hook);
    let self_test = std::env::args().any(|a| a == "--self-test");
    let bind = if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    if !self_test {
        println!(
            "listening on http://{addr}; POST /webhooks/catalog with x-signature: sha256=<hex>"
        );
        tokio::signal::ctrl_c().await?;
    } else {
        let page = [
            client::get(addr, "/products/42").await?,
            client::get(addr, "/products/42").await?,
        ];
        let body = b"product:42\n";
        let forged = [("x-signature", "sha256=00")];
        let forged = client::request(addr, "POST", "/webhooks/catalog", &forged, body).await?;
        let good = format!("sha256={}", hex(&hmac_sha256(secret.as_bytes(), body)?));
        let good = [("x-signature", good.as_str())];
        let signed = client::request(addr, "POST", "/webhooks/catalog", &good, body).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.stats().applied == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = client::get(addr, "/products/42").await?;
        println!(
            "GET /products/42: {}, {}; forged webhook: {}; signed webhook: {}; applied: {}; GET: {}",
            page[0].cache,
            page[1].cache,
            forged.status,
            signed.status,
            control.stats().applied,
            after.cache
        );
        let seen = (
            page[0].cache.as_str(),
            page[1].cache.as_str(),
            forged.status,
            signed.status,
            after.cache.as_str(),
        );
        if seen != ("MISS", "HIT", 401, 202, "MISS") {
            return Err(format!("unexpected: {seen:?}").into());
        }
    }
    control.shutdown();
    worker_task.await?;
    handle.invalidate_all().await?;
    Ok(())
}
