//! [`FenceLayer`]: the builder users configure.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use redis::aio::ConnectionLike;
use tower_layer::Layer;

use crate::cache::FenceCache;
use crate::config::{Config, OnWaitTimeout};
use crate::handle::FenceHandle;
use crate::key::{MakeKey, normalize_host};
use crate::service::Fence;
use crate::shared::Shared;

/// A tower [`Layer`] that caches responses in Redis and lets one request per
/// key reach the inner service when the key is cold or about to expire.
///
/// Cloning this layer is cheap and does not create a new cache: every clone,
/// every [`Fence`] made from it and every [`FenceHandle`] share one Redis
/// connection, one in-flight table and one set of counters. A clone may
/// change the per-route settings (TTL, grace, name, namespace, key, policy)
/// without affecting the original; the cache-wide settings (`redis_timeout`,
/// the circuit breaker, `wake_ups`) belong to the [`FenceCache`] behind it,
/// are set once by [`FenceCache::builder`], and are shared by all clones.
/// With several routes, or any cache-wide setting, make the cache first and
/// a layer per route from it ([`FenceCache::layer`]);
/// `FenceLayer::new(conn)` is the one-liner for
/// `FenceCache::new(conn).layer()`, with the cache-wide defaults.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use cachefence::FenceLayer;
///
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let fence = FenceLayer::new(client.get_connection_manager().await?)
///     .ttl(Duration::from_secs(60))
///     .grace(Duration::from_secs(30))
///     .namespace("shop:");
/// let handle = fence.handle();
/// let app: Router = Router::new()
///     .route("/products/{id}", get(|| async { "a product" }).layer(fence.clone()))
///     .route("/prices", get(|| async { "prices" }).layer(fence.clone().ttl(Duration::from_secs(5))));
/// handle.invalidate_path("/products/42").await?;
/// # Ok(()) }
/// ```
pub struct FenceLayer<C = redis::aio::ConnectionManager> {
    pub(crate) config: Config,
    pub(crate) shared: Arc<Shared<C>>,
}

impl<C> Clone for FenceLayer<C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<C> fmt::Debug for FenceLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C> FenceLayer<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A layer caching in the Redis behind `redis`: any async connection of
    /// the `redis` crate (`ConnectionManager`, `MultiplexedConnection`, ...).
    ///
    /// With the `cluster-async` feature, a
    /// `redis::cluster_async::ClusterConnection` is detected as a Redis
    /// Cluster: invalidation walks SCAN every primary and tags are kept in
    /// the slot of each entry (see the guide's [`cluster`](crate::guide::cluster) chapter).
    ///
    /// Defaults: TTL 60 s, grace 30 s, namespace `cachefence:`, body limit
    /// 1 MiB, `x-cache` status header, XFetch beta 1 (never before 75 % of
    /// the TTL), lock timeout 3 s (renewed every second while a fill runs),
    /// fill timeout 30 s, wait timeout 5 s (then stale if there is one, else
    /// keep waiting for the fill), stale-if-error on, pass markers 10 s,
    /// Redis timeout 250 ms, breaker opening after 5 failures for 1 s.
    /// Waiters poll until [`FenceCacheBuilder::wake_ups`](crate::FenceCacheBuilder::wake_ups) gives a client for
    /// notifications.
    ///
    /// ```no_run
    /// # fn doc(conn: redis::aio::ConnectionManager) {
    /// let fence = cachefence::FenceLayer::new(conn).ttl(std::time::Duration::from_secs(60));
    /// # let _ = fence;
    /// # }
    /// ```
    pub fn new(redis: C) -> Self {
        FenceCache::new(redis).layer()
    }

    /// A handle to invalidate entries and read counters.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let handle = fence.handle();
    /// # let _ = handle;
    /// # }
    /// ```
    pub fn handle(&self) -> FenceHandle<C> {
        FenceCache::from_parts(self.shared.clone(), self.config.clone()).handle()
    }

    /// How long a response stays fresh (default 60 s). Per route: set it on a
    /// clone of the layer.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use std::time::Duration;
    /// let fence = fence.ttl(Duration::from_secs(300));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.policy.ttl = ttl;
        self
    }

    /// How long past fresh an entry may be served stale while one request
    /// refreshes it in the background (default 30 s).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use std::time::Duration;
    /// let fence = fence.grace(Duration::from_secs(60));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.config.policy.grace = grace;
        self
    }

    /// The fresh lifetime of cacheable 4xx/5xx statuses (404, 405, 410, 414,
    /// 501 by default); never longer than `ttl` (default 10 s).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use std::time::Duration;
    /// let fence = fence.negative_ttl(Duration::from_secs(5));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.config.policy.negative_ttl = ttl;
        self
    }

    /// The route's name (default `default`): the `route` label of its
    /// metrics (feature `metrics`) and a field of its request spans. Per
    /// route: set it on the layer of each route.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let products = fence.clone().name("products");
    /// let prices = fence.name("prices");
    /// # }
    /// ```
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Arc::from(name.into());
        self
    }

    /// The prefix of every Redis key this layer writes (default
    /// `cachefence:`). Tenants sharing one Redis use different namespaces.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.namespace("blog:");
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.namespace = Arc::from(namespace.into());
        self
    }

    /// Replaces the key function (default [`DefaultKey`](crate::key::DefaultKey): path, sorted
    /// query and host). [`FenceHandle::invalidate_path`] needs the key
    /// function's [`MakeKey::path_key`]: with a closure it fails with an
    /// error; [`FenceHandle::invalidate_request`] and
    /// [`FenceHandle::invalidate_uri`] work with any key function.
    ///
    /// Whatever the key function, the forwarding headers listed at
    /// [`trust_header`](Self::trust_header) are added to the key.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use cachefence::key::DefaultKey;
    /// let fence = fence.key(DefaultKey::new().with_header(http::header::ACCEPT_LANGUAGE));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn key(mut self, key: impl MakeKey) -> Self {
        self.config.key = Arc::new(key);
        self
    }

    /// Caches only requests for these hosts (compared after normalising as
    /// [`DefaultKey`](crate::key::DefaultKey) does: lowercase, no trailing dot, no default port);
    /// requests for any other host, or naming none, pass through uncached.
    /// Default: any host. With it, a client sending arbitrary `Host`
    /// values can't fill Redis with entries.
    ///
    /// ```
    /// # fn doc(conn: redis::aio::MultiplexedConnection) {
    /// let fence = cachefence::FenceLayer::new(conn)
    ///     .allowed_hosts(["shop.example", "www.shop.example"]);
    /// # }
    /// ```
    #[must_use]
    pub fn allowed_hosts<I, H>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = H>,
        H: AsRef<str>,
    {
        let hosts = hosts
            .into_iter()
            .map(|h| normalize_host(h.as_ref().as_bytes(), None))
            .collect();
        self.config.policy.unkeyed.allowed_hosts = Some(Arc::new(hosts));
        self
    }

    /// Declares a request header trusted: set by your own proxy on every
    /// request (overwriting what clients send), and constant per host, so
    /// it neither enters the key nor makes a request pass through.
    ///
    /// By default the layer guards against request headers that change
    /// responses without the response naming them in `Vary` (the inputs of
    /// web cache poisoning):
    ///
    /// - keyed on a SHA-256 digest of their value: `Forwarded` (without its
    ///   per-client `for` and `by` parameters), `X-Forwarded-Host`,
    ///   `X-Forwarded-Proto`, `X-Forwarded-Scheme`, `X-Forwarded-Prefix`,
    ///   `X-Forwarded-Port`, `X-Forwarded-Server`, `X-Forwarded-Ssl`,
    ///   `Front-End-Https`, `X-Url-Scheme`, `X-Host`;
    /// - passed through uncached: `X-Original-URL`, `X-Rewrite-URL`,
    ///   `X-Original-URI` (they make some frameworks serve another URL), and
    ///   the method overrides `X-HTTP-Method-Override`, `X-HTTP-Method`,
    ///   `X-Method-Override` (and a `_method` query parameter, which can't
    ///   be trusted).
    ///
    /// Behind a proxy that always sets `X-Forwarded-Proto`, keying costs
    /// nothing (one value per host); trusting it saves the digest.
    ///
    /// ```
    /// # fn doc(conn: redis::aio::MultiplexedConnection) {
    /// use http::HeaderName;
    /// let fence = cachefence::FenceLayer::new(conn)
    ///     .trust_header(HeaderName::from_static("x-forwarded-proto"))
    ///     .strip_header(HeaderName::from_static("x-original-url"));
    /// # }
    /// ```
    #[must_use]
    pub fn trust_header(mut self, name: HeaderName) -> Self {
        self.config.policy.unkeyed.trusted.push(name);
        self
    }

    /// Removes a request header from every request (cached or not) before
    /// the inner service sees it: for headers your app must never act on
    /// when they come from clients, such as `X-Original-URL` or a method
    /// override. A stripped header is neither keyed nor a reason to pass
    /// through.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.strip_header(http::HeaderName::from_static("x-http-method-override"));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn strip_header(mut self, name: HeaderName) -> Self {
        self.config.policy.unkeyed.stripped.push(name);
        self
    }

    /// The largest body buffered for caching (default 1 MiB). Larger bodies
    /// stream through to the client uncached.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.body_limit(4 << 20); // 4 MiB
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// The name of the cache-status header (`HIT`, `MISS`, `STALE`,
    /// `BYPASS`), or `None` to send none (default `x-cache`).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.status_header(None); // no x-cache header
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn status_header(mut self, name: Option<HeaderName>) -> Self {
        self.config.status_header = name;
        self
    }

    /// Add a `Cache-Status` header (RFC 9211) naming this cache
    /// `identifier` (default off), beside the
    /// [`status_header`](Self::status_header) or, with that set to `None`,
    /// instead of it. This cache's member comes after those of caches nearer
    /// the origin:
    ///
    /// - `hit; ttl=N`: served from the cache with N seconds of freshness
    ///   left (negative: a stale entry served while it is refreshed, or
    ///   because the origin failed);
    /// - `fwd=uri-miss; fwd-status=S`: filled from the origin, plus
    ///   `stored` when the fill stored the response (a Redis failure or a
    ///   racing invalidation can still refuse that write) and `collapsed`
    ///   when the request waited on another request's fill;
    /// - `fwd=stale`: filled because the stored response was stale (and
    ///   could not be served), `fwd-status=304` when the origin revalidated
    ///   it; `fwd=request`: the request asked for a fresh copy
    ///   ([`honor_request_no_cache`](Self::honor_request_no_cache));
    /// - `fwd=bypass; fwd-status=S`: passed to the origin without the cache
    ///   (method, credentials, pass marker), with
    ///   `detail=redis-unavailable` when Redis could not be used (errors,
    ///   timeouts, the circuit breaker open).
    ///
    /// An identifier that is not a structured-field token is sent as a
    /// quoted string; an empty one turns the header off.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use cachefence::FenceLayer;
    ///
    /// let redis = redis::Client::open("redis://127.0.0.1/")?;
    /// // `Cache-Status: edge; hit; ttl=42` and no `x-cache`.
    /// let fence = FenceLayer::new(redis.get_connection_manager().await?)
    ///     .cache_status(Some("edge"))
    ///     .status_header(None);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn cache_status(mut self, identifier: Option<&str>) -> Self {
        self.config.cache_status = identifier
            .and_then(crate::cache_status::identifier)
            .map(Arc::from);
        self
    }

    /// Reduce a cacheable request's `Accept-Encoding` to the one coding the
    /// client prefers among `zstd`, `br` and `gzip` by its q-values (ties in
    /// that order), or `identity` when it accepts none of them, before the
    /// request is keyed and sent to the origin (default on). A response
    /// that `Vary`s on `Accept-Encoding` then has at most four variants
    /// instead of one per header spelling, and each is exactly what the
    /// origin answered to its normalised value. A request without the
    /// header is left without it.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.normalize_accept_encoding(false);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn normalize_accept_encoding(mut self, on: bool) -> Self {
        self.config.normalizers.accept_encoding = on;
        self
    }

    /// Normalise another request header before a cacheable request is keyed
    /// and sent to the origin, so that a response varying on it has few
    /// variants: `normalize` gets the header's value (several lines joined
    /// by `, `) and returns the value to use, or `None` to remove the
    /// header. It is called only when the header is present. The origin
    /// sees the normalised value, so the stored variant is what it answered
    /// to that value.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use http::{HeaderValue, header::ACCEPT_LANGUAGE};
    /// use cachefence::FenceLayer;
    ///
    /// let redis = redis::Client::open("redis://127.0.0.1/")?;
    /// // The site speaks German and English: two variants, not hundreds.
    /// let fence = FenceLayer::new(redis.get_connection_manager().await?)
    ///     .normalize_header(ACCEPT_LANGUAGE, |value: &HeaderValue| {
    ///         let german = value.to_str().ok()?.trim_start().starts_with("de");
    ///         Some(HeaderValue::from_static(if german { "de" } else { "en" }))
    ///     });
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn normalize_header<F>(mut self, name: HeaderName, normalize: F) -> Self
    where
        F: Fn(&http::HeaderValue) -> Option<http::HeaderValue> + Send + Sync + 'static,
    {
        self.config.normalizers.custom.retain(|(n, _)| *n != name);
        self.config
            .normalizers
            .custom
            .push((name, Arc::new(normalize)));
        self
    }

    /// The statuses that may be cached (default 200, 203, 204, 300, 301,
    /// 308, 404, 405, 410, 414, 501).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use http::StatusCode;
    /// let fence = fence.statuses([StatusCode::OK, StatusCode::NOT_FOUND]);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.config.policy.statuses = statuses.into_iter().collect();
        self
    }

    /// Take the TTL of a response from its `Cache-Control: s-maxage` or
    /// `max-age` (default off: the layer's TTL rules).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.respect_cache_control(true);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn respect_cache_control(mut self, on: bool) -> Self {
        self.config.policy.respect_cache_control = on;
        self
    }

    /// Follow RFC 9111 as a shared cache (default off: the layer's TTL
    /// rules). Meant for a cache in front of an HTTP origin that says how
    /// its responses may be cached, such as a reverse proxy:
    ///
    /// - the fresh lifetime is `CDN-Cache-Control` (RFC 9213, replacing
    ///   `Cache-Control` when it holds any directive), else `s-maxage`,
    ///   `max-age`, then `Expires` minus `Date`; without any, the response
    ///   is not stored unless [`heuristic_freshness`](Self::heuristic_freshness)
    ///   is set ([`CacheTtl`](crate::CacheTtl) still wins);
    /// - the age on arrival is the larger of the time since `Date` and the
    ///   upstream `Age` (its first member; ignored when invalid, §5.1) plus
    ///   the time the response took to arrive (§4.2.3); responses the cache
    ///   sends, the first included, carry an `Age` that includes it; a
    ///   response already stale on arrival is stored only with a validator,
    ///   to be revalidated on its next use;
    /// - a `no-cache` response with a validator (`ETag` or `Last-Modified`)
    ///   is stored and revalidated on every use: each use waits for a
    ///   conditional request through the one-fill-per-key path (concurrent
    ///   requests share it: it is made after each of them arrived), whose
    ///   `304` serves the stored body; it is kept for the rest of its
    ///   lifetime, else for [`ttl`](Self::ttl). Without a validator it is not
    ///   stored;
    /// - stale serving comes from the response's `stale-while-revalidate`
    ///   (RFC 5861), replacing [`grace`](Self::grace), and on origin errors
    ///   (an error, a timeout, a 5xx) from its `stale-if-error`, beyond the
    ///   `stale-while-revalidate` window; `no-cache`, `must-revalidate`,
    ///   `proxy-revalidate` and `s-maxage` forbid both, and a soft purge
    ///   then refetches instead of serving stale;
    /// - any final status with explicit freshness is stored (the
    ///   [`statuses`](Self::statuses) list only limits the others);
    ///   `must-understand` stores a status the cache understands despite
    ///   `no-store` (and never one it doesn't);
    /// - a response with a validator is kept past its freshness for the
    ///   [`revalidation_window`](Self::revalidation_window) and revalidated,
    ///   not refetched (`must-revalidate` included);
    /// - a request with `Authorization` is looked up; its response is
    ///   stored, and then served to any request for the key, only with
    ///   `public`, `s-maxage` or `must-revalidate` (§3.5);
    /// - `Accept-Language` is normalised
    ///   ([`normalize_accept_language`](Self::normalize_accept_language));
    /// - `no-store`, `private` (also in `CDN-Cache-Control`) and `Vary: *`
    ///   are never stored; `Date` is kept as received, and added (the time
    ///   it was received) when missing (RFC 9110 §6.6.1).
    ///
    /// (Refreshes revalidate with the entry's validators in every mode.)
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use cachefence::FenceLayer;
    ///
    /// let redis = redis::Client::open("redis://127.0.0.1/")?;
    /// let fence = FenceLayer::new(redis.get_connection_manager().await?)
    ///     .rfc9111(true)
    ///     .heuristic_freshness(0.1);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn rfc9111(mut self, on: bool) -> Self {
        self.config.policy.rfc9111 = on;
        self
    }

    /// In [`rfc9111`](Self::rfc9111) mode, give a response without
    /// explicit freshness this fraction of the time since its
    /// `Last-Modified` (until its `Date`) as its lifetime, at most
    /// [`heuristic_freshness_max`](Self::heuristic_freshness_max), by
    /// default [`ttl`](Self::ttl) (RFC 9111 §4.2.2; default 0: none; 0.1 is
    /// customary), for the [`statuses`](Self::statuses) cached without
    /// explicit freshness (by default the heuristically cacheable ones).
    /// Values are clamped to 0..=1.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.rfc9111(true).heuristic_freshness(0.1);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn heuristic_freshness(mut self, fraction: f64) -> Self {
        self.config.policy.heuristic = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// In [`rfc9111`](Self::rfc9111) mode, how long past its freshness a
    /// response with a validator (`ETag` or `Last-Modified`) stays in Redis
    /// to be revalidated (RFC 9111 §4.3; default 10 minutes; zero: dropped
    /// when no longer servable). Such an entry is never served without a
    /// successful revalidation (`must-revalidate` included): the next
    /// request for it makes the one fill of its key, with `If-None-Match`
    /// and `If-Modified-Since`; a `304` freshens it (its header fields
    /// replace the stored ones, the body stays in Redis), anything else
    /// replaces it. Memory: each such entry lives at most this long past its
    /// freshness, with its Redis TTL, so a `volatile-*` `maxmemory` policy
    /// evicts it like any entry. Clamped to at most a year.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use cachefence::FenceLayer;
    ///
    /// let redis = redis::Client::open("redis://127.0.0.1/")?;
    /// let fence = FenceLayer::new(redis.get_connection_manager().await?)
    ///     .rfc9111(true)
    ///     .revalidation_window(Duration::from_secs(3600));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn revalidation_window(mut self, window: Duration) -> Self {
        self.config.policy.revalidate_for = window.min(crate::policy::MAX_TTL);
        self
    }

    /// Normalise `Accept-Language` before a cacheable request is keyed and
    /// sent to the origin (default: on in [`rfc9111`](Self::rfc9111) mode,
    /// off otherwise): language tags lowercased, weights written the one
    /// way (`q=0.5`, none for 1), tags of equal weight in one order,
    /// malformed items and duplicates dropped, so that `en-US, fr;q=0.5` and
    /// `fr; q=0.50,EN-us` share one variant of a response that varies on
    /// it. The origin sees the normalised value.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use cachefence::FenceLayer;
    ///
    /// let redis = redis::Client::open("redis://127.0.0.1/")?;
    /// let fence = FenceLayer::new(redis.get_connection_manager().await?)
    ///     .normalize_accept_language(true);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn normalize_accept_language(mut self, on: bool) -> Self {
        self.config.normalizers.accept_language = Some(on);
        self
    }

    /// The longest lifetime [`heuristic_freshness`](Self::heuristic_freshness)
    /// gives (default: [`ttl`](Self::ttl)). Clamped to at most a year.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use cachefence::FenceLayer;
    ///
    /// let redis = redis::Client::open("redis://127.0.0.1/")?;
    /// let fence = FenceLayer::new(redis.get_connection_manager().await?)
    ///     .rfc9111(true)
    ///     .heuristic_freshness(0.1)
    ///     .heuristic_freshness_max(Duration::from_secs(24 * 3600));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn heuristic_freshness_max(mut self, max: Duration) -> Self {
        self.config.policy.heuristic_max = Some(max.min(crate::policy::MAX_TTL));
        self
    }

    /// Cache requests that carry `Authorization` (default off). Turn it on
    /// only with a key function that puts the credential's identity, or
    /// whatever selects the response, in the key.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// // Only with a key that separates users (here: a per-user header).
    /// use cachefence::key::DefaultKey;
    /// let fence = fence
    ///     .key(DefaultKey::new().with_header(http::header::AUTHORIZATION))
    ///     .cache_authorized(true);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn cache_authorized(mut self, on: bool) -> Self {
        self.config.policy.cache_authorized = on;
        self
    }

    /// Cache requests that carry `Cookie` (default off). Turn it on when the
    /// responses don't depend on cookies, or key on the ones they do.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.cache_requests_with_cookies(true);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn cache_requests_with_cookies(mut self, on: bool) -> Self {
        self.config.policy.cache_cookies = on;
        self
    }

    /// Let a request's `Cache-Control: no-cache` (or `no-store`,
    /// `max-age=0`, `Pragma: no-cache`) force a refetch (default off, as in
    /// Varnish and nginx: clients must not be able to push load onto the
    /// origin). Even when on, the refetch goes through the one-fill-per-key
    /// path.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.honor_request_no_cache(true);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn honor_request_no_cache(mut self, on: bool) -> Self {
        self.config.policy.honor_request_no_cache = on;
        self
    }

    /// The XFetch beta (default 1.0): larger refreshes earlier, 0 turns early
    /// refresh off. NaN, infinite and negative values turn it off.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.beta(2.0); // refresh earlier
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn beta(mut self, beta: f64) -> Self {
        self.config.beta = if beta.is_finite() { beta.max(0.0) } else { 0.0 };
        self
    }

    /// The share of an entry's TTL that must have passed before XFetch may
    /// refresh it early (default 0.75). It bounds early refreshes of a hot
    /// key to about one per TTL at any request rate, fleet-wide; 1.0 turns
    /// early refresh off (refresh on expiry, served stale inside `grace`),
    /// 0.0 is plain XFetch. Values outside `0.0..=1.0` (and NaN) mean the
    /// default.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.early_refresh_after(0.9);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn early_refresh_after(mut self, share: f64) -> Self {
        self.config.early_refresh_after = share;
        self
    }

    /// How long a fill lease lives if its owner stops renewing it, for
    /// example because its process crashed (default 3 s). A live owner
    /// renews it every third of this while the fill runs, so a dead owner's
    /// lease is taken over by one waiting request within this time.
    /// Clamped to 100 ms ..= 1 day.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use std::time::Duration;
    /// let fence = fence.lock_timeout(Duration::from_secs(5));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.config.lock_timeout = timeout;
        self
    }

    /// The longest a fill may take to produce a complete response (default
    /// 30 s). A fill still running then is abandoned: the inner service's
    /// future is dropped (or, when its response has started, the rest of the
    /// body streams to its own client only), the lease is released, the
    /// requests waiting for it are served stale if there is a stale entry,
    /// else `504 Gateway Timeout`, and the next request starts a new fill.
    /// A hung upstream can't hold a key's lease fleet-wide. A fill started
    /// by a request that already waited (a takeover, a restart after an
    /// invalidation, [`OnWaitTimeout::CallOrigin`]) gets the time left of
    /// that request's `fill_timeout + lock_timeout`, not a fresh
    /// `fill_timeout`. Invalidation fences outlive the longest fill of any
    /// route of the cache. Clamped to 100 ms ..= 1 day.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use std::time::Duration;
    /// let fence = fence.fill_timeout(Duration::from_secs(10));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn fill_timeout(mut self, timeout: Duration) -> Self {
        self.config.fill_timeout = timeout;
        self
    }

    /// How long a request waits for another request's fill before it is
    /// served a stale entry, when there is one (default 5 s). Without a
    /// stale entry, [`on_wait_timeout`](Self::on_wait_timeout) decides.
    /// Invalidations that restart a wait count against the same budget.
    /// Clamped to at most 1 day.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use std::time::Duration;
    /// let fence = fence.wait_timeout(Duration::from_secs(2));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.config.wait_timeout = timeout;
        self
    }

    /// What a request does when its wait runs out and no stale entry can be
    /// served (default [`OnWaitTimeout::Wait`]: keep waiting for the live
    /// fill, which is itself bounded by `fill_timeout`).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use cachefence::OnWaitTimeout;
    /// let fence = fence.on_wait_timeout(OnWaitTimeout::GatewayTimeout);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn on_wait_timeout(mut self, action: OnWaitTimeout) -> Self {
        self.config.on_wait_timeout = action;
        self
    }

    /// Serve the stale entry when a refresh fails with an error or a 5xx
    /// (default on). In [`rfc9111`](Self::rfc9111) mode only as far as the
    /// response allows: inside its `stale-while-revalidate` window or its
    /// `stale-if-error` time, never with `must-revalidate` and friends.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.stale_if_error(false);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn stale_if_error(mut self, on: bool) -> Self {
        self.config.stale_if_error = on;
        self
    }

    /// How long an uncacheable response makes the following requests for
    /// its key go straight to the origin, instead of queueing behind a fill
    /// lease ("hit-for-miss", default 10 s; zero turns it off).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use std::time::Duration;
    /// let fence = fence.pass_ttl(Duration::from_secs(30));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn pass_ttl(mut self, ttl: Duration) -> Self {
        self.config.pass_ttl = ttl;
        self
    }

    /// The response headers that name a response's tags, comma or space
    /// separated (default `Cache-Tag` and `Surrogate-Key`).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.tag_headers([http::HeaderName::from_static("x-tags")]);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn tag_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.tag_headers = names.into_iter().collect();
        self
    }

    /// Send the tag headers on to clients (default off: they are stripped
    /// from cached and filled responses, as CDNs do).
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let fence = fence.expose_tags(true);
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn expose_tags(mut self, on: bool) -> Self {
        self.config.expose_tags = on;
        self
    }

    /// After a non-error (2xx or 3xx) response to a `POST`, `PUT`, `PATCH`,
    /// `DELETE` or any method not known to be safe, invalidate the cached
    /// responses of its target URI and of a same-origin `Location` or
    /// `Content-Location` (RFC 9111 §4.4; default on). The keys are the ones
    /// the key function gives a GET of that URI with the request's headers;
    /// the invalidation is fenced like
    /// [`FenceHandle::invalidate_key`] and done before the response goes
    /// back, so the client that changed a resource reads the change. A Redis
    /// failure is logged and the response is sent regardless. Only writes
    /// that pass through this layer invalidate, in its namespace: put the
    /// layer on the write routes too (a clone of it, for one namespace).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use cachefence::FenceLayer;
    ///
    /// let redis = redis::Client::open("redis://127.0.0.1/")?;
    /// // Writes go through another path that invalidates by tag itself.
    /// let fence = FenceLayer::new(redis.get_connection_manager().await?)
    ///     .invalidate_on_unsafe_methods(false);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn invalidate_on_unsafe_methods(mut self, on: bool) -> Self {
        self.config.invalidate_unsafe = on;
        self
    }

    /// The most variants one URL may have in the cache (default 64): its
    /// `Vary` variants and its other key dimensions (one per host, keyed
    /// header value). A response for a new variant beyond it is served but
    /// not stored (it
    /// passes through uncached, counted in
    /// [`Stats::variants_over_limit`](crate::Stats::variants_over_limit)),
    /// so a header with unbounded values can't grow one URL without limit;
    /// variants that expired make room again. Zero is taken as one.
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) {
    /// let fence = cachefence::FenceLayer::new(conn).max_variants(16);
    /// # }
    /// ```
    #[must_use]
    pub fn max_variants(mut self, max: usize) -> Self {
        self.config.max_variants = max.max(1);
        self
    }

    /// The cache this layer belongs to: the one object that owns the
    /// connection and the cache-wide settings, and makes more layers.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// let cache = fence.cache();
    /// let other_route = cache.layer().name("other");
    /// # let _ = other_route;
    /// # }
    /// ```
    pub fn cache(&self) -> FenceCache<C> {
        FenceCache::from_parts(self.shared.clone(), self.config.clone())
    }
}

/// Layers come from a cache (here, so that `layer → cache` is the only edge
/// between the two modules).
impl<C> FenceCache<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A layer for one route, with the default per-route settings and this
    /// cache's namespace. Set the route's TTL, name, key and policy on it.
    ///
    /// ```no_run
    /// # fn doc(conn: redis::aio::ConnectionManager) {
    /// let cache = cachefence::FenceCache::new(conn);
    /// let products = cache.layer().name("products");
    /// # let _ = products;
    /// # }
    /// ```
    pub fn layer(&self) -> FenceLayer<C> {
        FenceLayer {
            config: self.defaults.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, C> Layer<S> for FenceLayer<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    type Service = Fence<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        crate::wake::listen_to(&self.shared, &self.config.namespace);
        let config = self.config.for_route(&self.shared.counters);
        // The fences outlive this route's fills too.
        self.shared.store.cover_fills(&config);
        Fence::new(inner, Arc::new(config), self.shared.clone())
    }
}
