//! [`FenceLayer`]: the builder users configure.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use redis::aio::ConnectionLike;
use tower_layer::Layer;

use crate::cache::FenceCache;
use crate::handle::FenceHandle;
use crate::key::{DefaultKey, MakeKey};
use crate::policy::Policy;
use crate::service::Fence;
pub(crate) use crate::shared::Shared;
use crate::stats::Counters;

/// What a request does when its wait for another request's fill runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnWaitTimeout {
    /// Keep waiting for the fill (the default). A live fill is bounded by
    /// [`fill_timeout`](FenceLayer::fill_timeout) and a dead one by
    /// [`lock_timeout`](FenceLayer::lock_timeout), after which one request
    /// takes over: the request is answered by whichever fill lands, and never
    /// waits longer than `fill_timeout` + `lock_timeout` in all (then `504`).
    Wait,
    /// Call the inner service without storing the result. At most one
    /// request per key and process does so (the others of the process are
    /// handed its response), never one per waiting request.
    CallOrigin,
    /// Answer `504 Gateway Timeout`.
    GatewayTimeout,
}

/// The per-layer configuration (a clone of the layer may change it).
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) namespace: Arc<str>,
    pub(crate) policy: Policy,
    pub(crate) key: Arc<dyn MakeKey>,
    pub(crate) body_limit: usize,
    pub(crate) status_header: Option<HeaderName>,
    pub(crate) beta: f64,
    pub(crate) lock_timeout: Duration,
    pub(crate) fill_timeout: Duration,
    pub(crate) wait_timeout: Duration,
    pub(crate) early_refresh_after: f64,
    pub(crate) on_wait_timeout: OnWaitTimeout,
    pub(crate) stale_if_error: bool,
    pub(crate) pass_ttl: Duration,
    pub(crate) tag_headers: Vec<HeaderName>,
    pub(crate) expose_tags: bool,
    /// The route's name, a label of its metrics and spans.
    pub(crate) name: Arc<str>,
    /// The route's counters: the cache's totals, labelled metrics. Set by
    /// [`Config::for_route`].
    pub(crate) counters: Arc<Counters>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("namespace", &self.namespace)
            .field("policy", &self.policy)
            .field("body_limit", &self.body_limit)
            .field("status_header", &self.status_header)
            .field("beta", &self.beta)
            .field("lock_timeout", &self.lock_timeout)
            .field("fill_timeout", &self.fill_timeout)
            .field("wait_timeout", &self.wait_timeout)
            .field("early_refresh_after", &self.early_refresh_after)
            .field("on_wait_timeout", &self.on_wait_timeout)
            .field("stale_if_error", &self.stale_if_error)
            .field("pass_ttl", &self.pass_ttl)
            .field("tag_headers", &self.tag_headers)
            .field("expose_tags", &self.expose_tags)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The headers the cache adds or strips itself: the cache-status header,
    /// and the tag headers unless they are exposed. They are never stored.
    pub(crate) fn is_own_header(&self, name: &HeaderName) -> bool {
        self.status_header.as_ref() == Some(name)
            || (!self.expose_tags && self.tag_headers.contains(name))
    }

    /// The settings as a layer uses them: every duration inside the range
    /// its setter documents, so that no deadline overflows and no lease is
    /// too short to renew. Applied when a service is made, so the order of
    /// the setters doesn't matter.
    pub(crate) fn sanitized(mut self) -> Self {
        self.lock_timeout = self.lock_timeout.clamp(MIN_LOCK_TIMEOUT, MAX_TIMEOUT);
        self.fill_timeout = self.fill_timeout.clamp(MIN_LOCK_TIMEOUT, MAX_TIMEOUT);
        self.wait_timeout = self.wait_timeout.min(MAX_TIMEOUT);
        self.pass_ttl = self.pass_ttl.min(crate::policy::MAX_TTL);
        self.policy.grace = self.policy.grace.min(crate::policy::MAX_TTL);
        if !self.beta.is_finite() || self.beta < 0.0 {
            self.beta = 0.0;
        }
        if !(0.0..=1.0).contains(&self.early_refresh_after) {
            // NaN too.
            self.early_refresh_after = DEFAULT_EARLY_REFRESH_AFTER;
        }
        self
    }

    /// The settings as a service or handle of `shared` uses them: sanitized,
    /// with the route's counters.
    pub(crate) fn for_route<C>(&self, shared: &Shared<C>) -> Self {
        let mut config = self.clone().sanitized();
        config.counters = Arc::new(shared.counters.for_route(&config.namespace, &config.name));
        config
    }

    /// The longest a request may wait for fills in all: the longest a live
    /// fill may run, plus the time a dead filler's lease takes to expire.
    pub(crate) fn wait_cap(&self) -> Duration {
        self.fill_timeout.saturating_add(self.lock_timeout)
    }
}

/// The shortest lease and fill timeout a layer uses: a lease must outlive a
/// few Redis round trips to be renewed.
pub(crate) const MIN_LOCK_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest lease, fill and wait timeout a layer uses (one day).
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The default share of the TTL before which XFetch never refreshes.
pub(crate) const DEFAULT_EARLY_REFRESH_AFTER: f64 = 0.75;

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: Arc::from("cachefence:"),
            policy: Policy::default(),
            key: Arc::new(DefaultKey::new()),
            body_limit: 1024 * 1024,
            status_header: Some(HeaderName::from_static("x-cache")),
            beta: 1.0,
            lock_timeout: Duration::from_secs(3),
            fill_timeout: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(5),
            early_refresh_after: DEFAULT_EARLY_REFRESH_AFTER,
            on_wait_timeout: OnWaitTimeout::Wait,
            stale_if_error: true,
            pass_ttl: Duration::from_secs(10),
            tag_headers: vec![
                HeaderName::from_static("cache-tag"),
                HeaderName::from_static("surrogate-key"),
            ],
            expose_tags: false,
            name: Arc::from("default"),
            counters: Arc::default(),
        }
    }
}

/// A tower [`Layer`] that caches responses in Redis and lets one request per
/// key reach the inner service when the key is cold or about to expire.
///
/// Cloning this layer is cheap and does not create a new cache: every clone,
/// every [`Fence`] made from it and every [`FenceHandle`] share one Redis
/// connection, one in-flight table and one set of counters. A clone may
/// change the per-route settings (TTL, grace, name, namespace, key, policy)
/// without affecting the original; the cache-wide settings (`redis_timeout`,
/// the circuit breaker, `wake_ups`) belong to the [`FenceCache`] behind it
/// and are shared by all clones. With several routes, make the cache first
/// and a layer per route from it ([`FenceCache::layer`]);
/// `FenceLayer::new(conn)` is the one-liner for
/// `FenceCache::new(conn).layer()`.
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
///     .namespace("shop:")
///     .wake_ups(client);
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
    /// the slot of each entry (see the README's section on Redis Cluster).
    ///
    /// Defaults: TTL 60 s, grace 30 s, namespace `cachefence:`, body limit
    /// 1 MiB, `x-cache` status header, XFetch beta 1 (never before 75 % of
    /// the TTL), lock timeout 3 s (renewed every second while a fill runs),
    /// fill timeout 30 s, wait timeout 5 s (then stale if there is one, else
    /// keep waiting for the fill), stale-if-error on, pass markers 10 s,
    /// Redis timeout 250 ms, breaker opening after 5 failures for 1 s.
    /// Waiters poll until [`wake_ups`](Self::wake_ups) gives a client for
    /// notifications.
    pub fn new(redis: C) -> Self {
        FenceCache::new(redis).layer()
    }

    /// A handle to invalidate entries and read counters.
    pub fn handle(&self) -> FenceHandle<C> {
        let mut config = self.config.clone().sanitized();
        // A handle counts what it does for the whole cache, not a route.
        config.counters = Arc::new(self.shared.counters.clone());
        FenceHandle::new(self.shared.clone(), config)
    }

    /// How long a response stays fresh (default 60 s). Per route: set it on a
    /// clone of the layer.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.policy.ttl = ttl;
        self
    }

    /// How long past fresh an entry may be served stale while one request
    /// refreshes it in the background (default 30 s).
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.config.policy.grace = grace;
        self
    }

    /// The fresh lifetime of cacheable 4xx/5xx statuses (404, 405, 410, 414,
    /// 501 by default); never longer than `ttl` (default 10 s).
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
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.namespace = Arc::from(namespace.into());
        self
    }

    /// Replaces the key function (default [`DefaultKey`]). Note that
    /// [`FenceHandle::invalidate_path`] assumes the default key; with a
    /// custom one, invalidate by key.
    #[must_use]
    pub fn key(mut self, key: impl MakeKey) -> Self {
        self.config.key = Arc::new(key);
        self
    }

    /// The largest body buffered for caching (default 1 MiB). Larger bodies
    /// stream through to the client uncached.
    #[must_use]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// The name of the cache-status header (`HIT`, `MISS`, `STALE`,
    /// `BYPASS`), or `None` to send none (default `x-cache`).
    #[must_use]
    pub fn status_header(mut self, name: Option<HeaderName>) -> Self {
        self.config.status_header = name;
        self
    }

    /// The statuses that may be cached (default 200, 203, 204, 300, 301,
    /// 308, 404, 405, 410, 414, 501).
    #[must_use]
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.config.policy.statuses = statuses.into_iter().collect();
        self
    }

    /// Take the TTL of a response from its `Cache-Control: s-maxage` or
    /// `max-age` (default off: the layer's TTL rules).
    #[must_use]
    pub fn respect_cache_control(mut self, on: bool) -> Self {
        self.config.policy.respect_cache_control = on;
        self
    }

    /// Cache requests that carry `Authorization` (default off). Turn it on
    /// only with a key function that puts the credential's identity, or
    /// whatever selects the response, in the key.
    #[must_use]
    pub fn cache_authorized(mut self, on: bool) -> Self {
        self.config.policy.cache_authorized = on;
        self
    }

    /// Cache requests that carry `Cookie` (default off). Turn it on when the
    /// responses don't depend on cookies, or key on the ones they do.
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
    #[must_use]
    pub fn honor_request_no_cache(mut self, on: bool) -> Self {
        self.config.policy.honor_request_no_cache = on;
        self
    }

    /// The XFetch beta (default 1.0): larger refreshes earlier, 0 turns early
    /// refresh off. NaN, infinite and negative values turn it off.
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
    /// A hung upstream can't hold a key's lease fleet-wide. Clamped to
    /// 100 ms ..= 1 day.
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
    #[must_use]
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.config.wait_timeout = timeout;
        self
    }

    /// What a request does when its wait runs out and no stale entry can be
    /// served (default [`OnWaitTimeout::Wait`]: keep waiting for the live
    /// fill, which is itself bounded by `fill_timeout`).
    #[must_use]
    pub fn on_wait_timeout(mut self, action: OnWaitTimeout) -> Self {
        self.config.on_wait_timeout = action;
        self
    }

    /// Serve the stale entry when a refresh fails with an error or a 5xx
    /// (default on).
    #[must_use]
    pub fn stale_if_error(mut self, on: bool) -> Self {
        self.config.stale_if_error = on;
        self
    }

    /// How long an uncacheable response makes the following requests for
    /// its key go straight to the origin, instead of queueing behind a fill
    /// lease ("hit-for-miss", default 10 s; zero turns it off).
    #[must_use]
    pub fn pass_ttl(mut self, ttl: Duration) -> Self {
        self.config.pass_ttl = ttl;
        self
    }

    /// The response headers that name a response's tags, comma or space
    /// separated (default `Cache-Tag` and `Surrogate-Key`).
    #[must_use]
    pub fn tag_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.tag_headers = names.into_iter().collect();
        self
    }

    /// Send the tag headers on to clients (default off: they are stripped
    /// from cached and filled responses, as CDNs do).
    #[must_use]
    pub fn expose_tags(mut self, on: bool) -> Self {
        self.config.expose_tags = on;
        self
    }

    /// The cache this layer belongs to: the one object that owns the
    /// connection and the cache-wide settings, and makes more layers.
    pub fn cache(&self) -> FenceCache<C> {
        FenceCache::from_parts(self.shared.clone(), self.config.clone())
    }

    /// Cache-wide: see [`FenceCache::redis_timeout`], where it belongs when
    /// there are several routes. Here it changes the cache of this layer
    /// and of all its clones, for the one-liner `FenceLayer::new(conn)`.
    #[must_use]
    pub fn redis_timeout(self, timeout: Duration) -> Self {
        let _ = self.cache().redis_timeout(timeout);
        self
    }

    /// Cache-wide: see [`FenceCache::circuit_breaker`], where it belongs
    /// when there are several routes. Here it changes the cache of this
    /// layer and of all its clones.
    #[must_use]
    pub fn circuit_breaker(self, failures: u32, cooldown: Duration) -> Self {
        let _ = self.cache().circuit_breaker(failures, cooldown);
        self
    }

    /// Cache-wide: see [`FenceCache::wake_ups`], where it belongs when there
    /// are several routes. Here it sets the wake-ups of the cache of this
    /// layer and of all its clones; a second client is ignored.
    #[must_use]
    pub fn wake_ups(self, client: redis::Client) -> Self {
        let _ = self.cache().wake_ups(client);
        self
    }
}

impl<S, C> Layer<S> for FenceLayer<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    type Service = Fence<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        self.shared.ensure_listener();
        Fence::new(
            inner,
            Arc::new(self.config.for_route(&self.shared)),
            self.shared.clone(),
        )
    }
}
