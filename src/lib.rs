//! A stampede-proof HTTP response cache in Redis for any tower service.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use cachefence::FenceLayer;
//!
//! # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1/")?;
//! let fence = FenceLayer::new(client.get_connection_manager().await?)
//!     .ttl(Duration::from_secs(60))
//!     .grace(Duration::from_secs(30))
//!     .namespace("shop:");
//! let handle = fence.handle();
//! let app: Router = Router::new()
//!     .route("/products/{id}", get(|| async { "product" }).layer(fence.clone()))
//!     .route("/prices", get(|| async { "prices" }).layer(fence.clone().ttl(Duration::from_secs(5))));
//! // later, when product 42 changes:
//! handle.invalidate_path("/products/42").await?;
//! # Ok(()) }
//! ```
//!
//! With several routes, or any cache-wide setting, make one [`FenceCache`]
//! (it owns the connection and the cache-wide settings, given once to
//! [`FenceCache::builder`]) and a layer per route from it:
//! `cache.layer().name("products").ttl(..)`. [`FenceHandle::purge_service`]
//! answers purge calls over HTTP. Feature `metrics` exports counters,
//! histograms and gauges through the `metrics` facade; feature `axum` makes
//! [`CacheTtl`] and [`CacheTags`] response parts. The [guide] has a chapter
//! per concern (HTTP semantics, invalidation, the near cache, the queue,
//! Cluster and Sentinel, security, deadlines, metrics, production);
//! ARCHITECTURE.md in the repository describes the internals.
//!
//! The root holds what every app names; the rest is grouped by concern:
//! [`queue`] (the durable invalidation queue and its workers), [`purge`]
//! (invalidation over HTTP), [`key`] (cache keys and custom key functions),
//! `sentinel` (feature `sentinel`: a connection that follows failovers).
//! [`redis`] is the `redis` crate the API takes.
//!
//! # The request path
//!
//! 1. Requests that may not be cached (not GET or HEAD, carrying
//!    `Authorization` or `Cookie`, a key function that says `None`) go
//!    straight to the inner service, untouched but for the `BYPASS`
//!    cache-status header.
//! 2. Everything else is looked up with ONE Redis command (`HMGET`; two when
//!    the response varies on request headers). A fresh entry is served
//!    (`HIT`) without spawning anything; XFetch may pick this request to start
//!    one early refresh in the background. An entry inside its grace period
//!    is served (`STALE`) while one background refresh runs. A HEAD request
//!    is served from the GET entry; a HEAD miss passes through and stores
//!    nothing.
//! 3. A miss joins this process's fill for the key or starts one. The fill
//!    runs as its own task: it takes the key's lease in Redis (one per key
//!    across every process), calls the inner service, stores the response
//!    fenced by the lease, and hands it to everyone who waited (`MISS`). If
//!    another process holds the lease, the fill waits for it, woken by pub/sub
//!    when [`FenceCacheBuilder::wake_ups`] is set and polling with backoff anyway.
//!
//! # Concurrent requests for the same key
//!
//! At most one request per key reaches the inner service at a time, across
//! every process sharing the Redis, on a miss and on a refresh. Requests in one
//! process share one fill: one lease attempt, one wait loop. A client that
//! disconnects never cancels a fill others wait on. A waiting request never
//! duplicates a live fill: after [`FenceLayer::wait_timeout`] it is served
//! the stale entry if one exists, else it keeps waiting ([`OnWaitTimeout`]);
//! a fill is bounded by [`FenceLayer::fill_timeout`]. A leader that crashes
//! leaves a lease that expires after [`FenceLayer::lock_timeout`] (a live one
//! renews it), and one waiting request takes over. When the response can't
//! be cached, the waiters get it if it is shareable (a 5xx) or go to the
//! origin side by side if not; only a response uncacheable by nature
//! (`private`, `no-store`, `Set-Cookie`, too large) leaves a short "pass"
//! marker that sends the following requests for its variant straight to the
//! origin.
//!
//! # HTTP semantics
//!
//! Every client gets its own answer: a fill asks the inner service without
//! the client's `Range`, `If-Range`, `If-None-Match` and `If-Modified-Since`,
//! stores and shares the full response, and each request answers its own
//! condition (`304 Not Modified`) or single byte range (`206`, `416`) from
//! it. Requests with `If-Match` or `If-Unmodified-Since` bypass the cache;
//! `206` and `304` responses are never stored. A non-error response to an
//! unsafe method invalidates the target URI and a same-origin `Location` /
//! `Content-Location` ([`FenceLayer::invalidate_on_unsafe_methods`]).
//! A refresh revalidates the entry with its `ETag` / `Last-Modified`; a
//! `304` from the origin freshens it. `Accept-Encoding` is normalised before keying
//! ([`FenceLayer::normalize_accept_encoding`]); [`FenceLayer::rfc9111`]
//! takes freshness from the response as an RFC 9111 shared cache, and
//! [`FenceLayer::cache_status`] adds an RFC 9211 `Cache-Status` header. The
//! [HTTP semantics](guide::http_semantics) chapter of the [guide] lists what
//! is supported.
//!
//! # Failure behaviour
//!
//! The cache fails open: when Redis errors, times out
//! ([`FenceCacheBuilder::redis_timeout`], 250 ms by default) or holds garbage, the
//! request goes to the inner service and its response is returned unchanged
//! (`BYPASS`); concurrent requests for one key in one process still share
//! one origin call. After repeated failures a circuit breaker stops sending
//! commands for a cool-down ([`FenceCacheBuilder::circuit_breaker`]). Damaged
//! entries read as misses and are overwritten. The service's error type is
//! the inner service's: the cache adds no error of its own. See
//! [`FenceHandle::shutdown`] for a graceful exit.
//!
//! # Ordering with other layers
//!
//! Put the fence outside layers that produce the response to cache
//! (compression should be inside, so compressed bodies are cached once per
//! `Accept-Encoding` variant the response names in `Vary`), and inside layers
//! that authenticate or rate-limit requests, which must run for every request
//! including hits.
//!
//! # Panics
//!
//! Nothing in the cache panics on input or network errors. If the inner
//! service panics during a fill, the request that started it is answered
//! `500` and the requests that waited on it look the key up again.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
mod body;
mod bounds;
mod breaker;
mod builder;
mod cache;
mod cache_status;
mod conditional;
mod config;
mod entry;
mod error;
mod fill;
mod flight;
mod freshness;
pub mod guide;
mod handle;
mod healing;
#[cfg(feature = "__internals")]
#[doc(hidden)]
pub mod internals;
mod keep;
pub mod key;
mod layer;
mod lease;
mod metrics;
mod near;
mod normalize;
#[cfg(feature = "axum")]
mod parts;
mod policy;
pub mod purge;
pub mod queue;
mod response;
mod revalidate;
mod scripts;
#[cfg(feature = "sentinel")]
#[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
pub mod sentinel;
mod service;
mod shared;
mod stats;
mod store;
mod trace;
mod unsafe_methods;
mod wait;
mod wake;
mod xfetch;

pub use body::FenceBody;
pub use builder::FenceCacheBuilder;
pub use cache::FenceCache;
pub use config::OnWaitTimeout;
pub use error::FenceError;
pub use handle::{FenceHandle, Invalidation};
pub use healing::HealingConnection;
pub use layer::FenceLayer;
pub use policy::{CacheTags, CacheTtl};
pub use service::{Fence, ResponseFuture};
pub use stats::{BreakerState, Stats};

/// The `redis` crate this crate's API takes (its connections, `Client`,
/// `ClusterClientBuilder`, errors): name its types through this re-export,
/// or depend on the same `redis` version (the one in this crate's
/// `Cargo.toml`), so that your connection is the type the cache expects.
///
/// ```no_run
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// use cachefence::redis;
///
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let cache = cachefence::FenceCache::new(client.get_connection_manager().await?);
/// # Ok(()) }
/// ```
pub use redis;

// The README's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
