//! [`FenceLayer`]: the builder users configure.

use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use http::{HeaderName, StatusCode};
use redis::aio::ConnectionLike;
use tower_layer::Layer;

use crate::flight::Flights;
use crate::handle::FenceHandle;
use crate::key::{DefaultKey, MakeKey};
use crate::policy::Policy;
use crate::service::Fence;
use crate::stats::Counters;
use crate::store::{Breaker, Store};
use crate::wake;

/// What a request does when its wait for another request's fill runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnWaitTimeout {
    /// Call the inner service itself (without storing the result). The default.
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
    pub(crate) wait_timeout: Duration,
    pub(crate) on_wait_timeout: OnWaitTimeout,
    pub(crate) stale_if_error: bool,
    pub(crate) pass_ttl: Duration,
    pub(crate) tag_headers: Vec<HeaderName>,
    pub(crate) expose_tags: bool,
    pub(crate) max_variants: usize,
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
            .field("wait_timeout", &self.wait_timeout)
            .field("on_wait_timeout", &self.on_wait_timeout)
            .field("stale_if_error", &self.stale_if_error)
            .field("pass_ttl", &self.pass_ttl)
            .field("tag_headers", &self.tag_headers)
            .field("expose_tags", &self.expose_tags)
            .field("max_variants", &self.max_variants)
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: Arc::from("cachefence:"),
            policy: Policy::default(),
            key: Arc::new(DefaultKey::new()),
            body_limit: 1024 * 1024,
            status_header: Some(HeaderName::from_static("x-cache")),
            beta: 1.0,
            lock_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(5),
            on_wait_timeout: OnWaitTimeout::CallOrigin,
            stale_if_error: true,
            pass_ttl: Duration::from_secs(10),
            tag_headers: vec![
                HeaderName::from_static("cache-tag"),
                HeaderName::from_static("surrogate-key"),
            ],
            expose_tags: false,
            max_variants: 64,
        }
    }
}

/// The state shared by a layer, its clones, its services and its handles.
pub(crate) struct Shared<C> {
    pub(crate) store: Store<C>,
    pub(crate) flights: Flights,
    pub(crate) counters: Counters,
    pub(crate) wake_client: OnceLock<redis::Client>,
    pub(crate) listener: OnceLock<()>,
    /// Tells this layer's own invalidation announcements from others'.
    pub(crate) id: u64,
    /// The leases held by this process's running fills (lease key → token),
    /// so that shutdown can release them.
    pub(crate) leases: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Set by [`FenceHandle::shutdown`]: new requests bypass the cache.
    pub(crate) closing: std::sync::atomic::AtomicBool,
}

impl<C> fmt::Debug for Shared<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("flights", &self.flights)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<C> Shared<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Starts the wake-up listener once, if a client for it was given and a
    /// Tokio runtime is running.
    pub(crate) fn ensure_listener(self: &Arc<Self>) {
        if self.listener.get().is_some() {
            return;
        }
        let Some(client) = self.wake_client.get() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.listener.set(()).is_ok() {
            let weak: Weak<Self> = Arc::downgrade(self);
            runtime.spawn(wake::listen(client.clone(), weak));
        }
    }
}

/// A tower [`Layer`] that caches responses in Redis and lets one request per
/// key reach the inner service when the key is cold or about to expire.
///
/// Cloning this layer is cheap and does not create a new cache: every clone,
/// every [`Fence`] made from it and every [`FenceHandle`] share one Redis
/// connection, one in-flight table and one set of counters. A clone may
/// change the per-route settings (TTL, grace, namespace, key, policy) without
/// affecting the original; the Redis settings (`redis_timeout`, the circuit
/// breaker, `wake_ups`) are shared by all clones.
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
pub struct FenceLayer<C> {
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
    /// 1 MiB, `x-cache` status header, XFetch beta 1, lock timeout 5 s, wait
    /// timeout 5 s, stale-if-error on, pass markers 10 s, Redis timeout
    /// 250 ms, breaker opening after 5 failures for 1 s. Waiters poll
    /// until [`wake_ups`](Self::wake_ups) gives a client for notifications.
    pub fn new(redis: C) -> Self {
        let breaker = Breaker::new(5, Duration::from_secs(1));
        Self {
            config: Config::default(),
            shared: Arc::new(Shared {
                store: Store::new(redis, Duration::from_millis(250), breaker),
                flights: Flights::default(),
                counters: Counters::default(),
                wake_client: OnceLock::new(),
                listener: OnceLock::new(),
                id: rand::random(),
                leases: Default::default(),
                closing: Default::default(),
            }),
        }
    }

    /// A handle to invalidate entries and read counters.
    pub fn handle(&self) -> FenceHandle<C> {
        FenceHandle::new(self.shared.clone(), self.config.clone())
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
    /// refresh off.
    #[must_use]
    pub fn beta(mut self, beta: f64) -> Self {
        self.config.beta = if beta.is_finite() { beta.max(0.0) } else { 0.0 };
        self
    }

    /// How long a fill lease lives if its owner stops renewing it, for
    /// example because its process crashed (default 5 s). A live owner
    /// renews it while the fill runs.
    #[must_use]
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.config.lock_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// The longest a request waits for another request's fill (default 5 s).
    #[must_use]
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.config.wait_timeout = timeout;
        self
    }

    /// What a request does when its wait runs out and no stale entry can be
    /// served (default [`OnWaitTimeout::CallOrigin`]).
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

    /// The most `Vary` variants one URL may have in the cache (default 64).
    /// A response for a new variant beyond it is served but not stored (it
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

    /// The timeout of every Redis call (default 250 ms). A call that takes
    /// longer counts as a failure and the request goes to the inner service.
    /// Shared by all clones of this layer.
    #[must_use]
    pub fn redis_timeout(self, timeout: Duration) -> Self {
        self.shared.store.set_timeout(timeout);
        self
    }

    /// After `failures` Redis failures in a row, send no command for
    /// `cooldown`, then probe with one (default 5 and 1 s). Shared by all
    /// clones of this layer.
    #[must_use]
    pub fn circuit_breaker(self, failures: u32, cooldown: Duration) -> Self {
        self.shared.store.breaker().configure(failures, cooldown);
        self
    }

    /// Wake waiting requests the moment another process stores the value
    /// they wait for, through a Redis pub/sub subscription opened from
    /// `client` (one per layer and its clones). Without it, waiters poll
    /// with backoff (5 ms to 100 ms); with it they still poll as a fallback.
    /// Shared by all clones of this layer; the first call wins.
    #[must_use]
    pub fn wake_ups(self, client: redis::Client) -> Self {
        let _ = self.shared.wake_client.set(client);
        self.shared.ensure_listener();
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
        Fence::new(inner, Arc::new(self.config.clone()), self.shared.clone())
    }
}
