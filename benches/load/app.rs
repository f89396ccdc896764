//! The load harness's app, shared with `benches/hit_cost.rs` (which counts
//! the instructions of one hit of the same app): the simulated origin, its
//! handlers, and the hand-written cache-aside layer of the `naive` arm.
//! Each bench uses a part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

/// The simulated origin.
pub(crate) struct Origin {
    pub(crate) latency: Duration,
    pub(crate) small: Bytes,
    pub(crate) large: Bytes,
    pub(crate) calls: AtomicU64,
}

impl Origin {
    pub(crate) fn new(latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            latency,
            small: Bytes::from(vec![b's'; 4 * 1024]),
            large: Bytes::from(vec![b'L'; 1024 * 1024]),
            calls: AtomicU64::new(0),
        })
    }
}

/// A 200 of `body`, `application/octet-stream`.
fn octet_stream(body: impl Into<AxumBody>) -> Response {
    let mut res = Response::new(body.into());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    res
}

/// `/k/{id}`: 4 KiB after the origin's latency.
pub(crate) async fn small(State(origin): State<Arc<Origin>>, Path(_): Path<String>) -> Response {
    origin.calls.fetch_add(1, Ordering::Relaxed);
    if !origin.latency.is_zero() {
        tokio::time::sleep(origin.latency).await;
    }
    octet_stream(origin.small.clone())
}

/// `/big/{id}`: 1 MiB at once.
pub(crate) async fn large(State(origin): State<Arc<Origin>>, Path(_): Path<String>) -> Response {
    origin.calls.fetch_add(1, Ordering::Relaxed);
    octet_stream(origin.large.clone())
}

/// The hand-written cache-aside layer: `GET` the path; on a miss call the
/// handler, then `SET` the body `PX` the TTL.
#[derive(Clone)]
pub(crate) struct Naive {
    pub(crate) redis: ConnectionManager,
    pub(crate) ttl_ms: u64,
    pub(crate) prefix: Arc<str>,
    /// Redis round trips made.
    pub(crate) calls: Arc<AtomicU64>,
}

pub(crate) async fn naive(State(n): State<Naive>, req: Request, next: Next) -> Response {
    let key = format!("{}{}", n.prefix, req.uri().path());
    let mut redis = n.redis.clone();
    n.calls.fetch_add(1, Ordering::Relaxed);
    if let Ok(Some(body)) = redis.get::<_, Option<Vec<u8>>>(&key).await {
        return octet_stream(body);
    }
    let res = next.run(req).await;
    let (parts, body) = res.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    if parts.status == StatusCode::OK {
        n.calls.fetch_add(1, Ordering::Relaxed);
        let _: Result<(), _> = redis.pset_ex(&key, body.as_ref(), n.ttl_ms).await;
    }
    Response::from_parts(parts, AxumBody::from(body))
}
