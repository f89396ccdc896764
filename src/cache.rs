//! [`FenceCache`]: one cache, many routes.

use std::fmt;
use std::sync::Arc;

use redis::aio::ConnectionLike;

use crate::config::Config;
use crate::handle::FenceHandle;
use crate::shared::Shared;
use crate::stats::Stats;

/// One cache: the Redis connection and everything that belongs to it once
/// per process (the call timeout, the circuit breaker, the wake-up
/// subscription, the in-flight table, the counters). Routes get their own
/// [`FenceLayer`](crate::FenceLayer) from it with [`layer`](Self::layer), and set their own TTL,
/// name, key and policy there. The cache-wide settings are given once,
/// to [`FenceCache::builder`], whose `build` checks them; after that no
/// setting of the cache changes, so none can be set per route by mistake.
///
/// Cloning is cheap: every clone is the same cache.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use cachefence::FenceCache;
///
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let cache = FenceCache::builder(client.get_connection_manager().await?)
///     .namespace("shop:")
///     .redis_timeout(Duration::from_millis(100))
///     .wake_ups(client)
///     .build()?;
/// let app: Router = Router::new()
///     .route("/products/{id}", get(|| async { "a product" })
///         .layer(cache.layer().name("products").ttl(Duration::from_secs(60))))
///     .route("/prices", get(|| async { "prices" })
///         .layer(cache.layer().name("prices").ttl(Duration::from_secs(5))));
/// let handle = cache.handle();
/// handle.invalidate_path("/products/42").await?;
/// # Ok(()) }
/// ```
pub struct FenceCache<C = redis::aio::ConnectionManager> {
    pub(crate) shared: Arc<Shared<C>>,
    /// What [`layer`](Self::layer) starts from (the namespace).
    pub(crate) defaults: Config,
}

impl<C> Clone for FenceCache<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            defaults: self.defaults.clone(),
        }
    }
}

impl<C> fmt::Debug for FenceCache<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceCache")
            .field("namespace", &self.defaults.namespace)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl FenceCache<crate::HealingConnection> {
    /// A cache in the Redis `client` names, on a connection the cache owns
    /// and heals: a [`HealingConnection`](crate::HealingConnection) made
    /// from `client`. When its calls keep failing or time out while a fresh
    /// connection answers `PING` (a half-open TCP connection, a wedged
    /// client), the cache replaces it for every clone, and caching resumes
    /// (within about 1 s with the default settings) with no restart.
    /// Errors when the first connection can't be made. The cache's type is
    /// `FenceCache<HealingConnection>` (its handles'
    /// `FenceHandle<HealingConnection>`).
    ///
    /// [`new`](Self::new) takes a connection instead: the cache then relies
    /// on it to reconnect by itself (a `ConnectionManager` reconnects when
    /// a connection closes, but not when it goes silent: the cache drops
    /// each call at its own timeout, before the manager's response timeout
    /// would tell it).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::{FenceCache, HealingConnection};
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let cache = FenceCache::from_client(client.clone()).await?;
    /// // With settings: the builder over a `HealingConnection`.
    /// let cache = FenceCache::builder(HealingConnection::connect(client.clone()).await?)
    ///     .namespace("shop:")
    ///     .wake_ups(client)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub async fn from_client(client: redis::Client) -> redis::RedisResult<Self> {
        Ok(Self::new(crate::HealingConnection::connect(client).await?))
    }
}

#[cfg(feature = "cluster-async")]
#[cfg_attr(docsrs, doc(cfg(feature = "cluster-async")))]
impl FenceCache<crate::HealingConnection<redis::cluster_async::ClusterConnection>> {
    /// A cache in the Redis Cluster `client` names (feature
    /// `cluster-async`), on a cluster connection the cache owns and heals
    /// (`FenceCache::from_client` for a cluster): when its calls
    /// keep failing or time out while a fresh cluster connection answers
    /// `PING` (a connection wedged after a failover), the cache makes a new
    /// one from `client`. Errors when the first connection can't be made.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::{FenceCache, HealingConnection};
    /// use redis::cluster::{ClusterClient, ClusterClientBuilder};
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let nodes = vec!["redis://127.0.0.1:7000/", "redis://127.0.0.1:7001/"];
    /// let cache = FenceCache::from_cluster_client(ClusterClient::new(nodes.clone())?).await?;
    /// // With settings: the builder over a `HealingConnection`.
    /// let conn = HealingConnection::connect_cluster(ClusterClient::new(nodes.clone())?).await?;
    /// let cache = FenceCache::builder(conn)
    ///     .namespace("shop:")
    ///     .cluster_wake_ups(ClusterClientBuilder::new(nodes))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub async fn from_cluster_client(
        client: redis::cluster::ClusterClient,
    ) -> redis::RedisResult<Self> {
        Ok(Self::new(
            crate::HealingConnection::connect_cluster(client).await?,
        ))
    }
}

impl<C> FenceCache<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A cache in the Redis behind `redis`: any async connection of the
    /// `redis` crate (`ConnectionManager`, `MultiplexedConnection`, and with
    /// the `cluster-async` feature a Redis Cluster connection), or a
    /// [`HealingConnection`](crate::HealingConnection).
    ///
    /// The cache uses `redis` as it is: it can't replace a connection it
    /// did not make. A connection that goes silent without closing (a
    /// half-open TCP flow) or wedges then stays wedged, and every request
    /// goes to the inner service until the app restarts.
    /// [`from_client`](Self::from_client) (or a `HealingConnection`) lets
    /// the cache make connections and replace one that stopped working.
    ///
    /// Defaults: namespace `cachefence:`, Redis timeout 250 ms, breaker
    /// opening after 5 failures for 1 s, no wake-ups (waiters poll), no
    /// near cache. [`builder`](Self::builder) sets them otherwise.
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) {
    /// let cache = cachefence::FenceCache::new(conn);
    /// let fence = cache.layer();
    /// # }
    /// ```
    pub fn new(redis: C) -> Self {
        Self::from_parts(
            Arc::new(Shared::new(redis, Default::default())),
            Config::default(),
        )
    }

    pub(crate) fn from_parts(shared: Arc<Shared<C>>, defaults: Config) -> Self {
        Self { shared, defaults }
    }

    /// A handle to invalidate entries of this cache's namespace and read
    /// its counters.
    ///
    /// ```no_run
    /// # async fn doc(cache: cachefence::FenceCache) -> Result<(), cachefence::FenceError> {
    /// let handle = cache.handle(); // Clone + Send + Sync
    /// handle.invalidate_tag("product:42").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn handle(&self) -> FenceHandle<C> {
        let mut config = self.defaults.clone().sanitized();
        self.shared.store.cover_fills(&config);
        // A handle counts what it does for the whole cache, not a route.
        config.counters = Arc::new(self.shared.counters.clone());
        // Its invalidations wait for near caches' acknowledgements.
        crate::wake::hear_acks(&self.shared, &config.namespace);
        FenceHandle::new(self.shared.clone(), config)
    }

    /// A snapshot of the counters, summed over every route.
    ///
    /// ```no_run
    /// # fn doc(cache: cachefence::FenceCache) {
    /// let stats = cache.stats();
    /// println!("{} hits, {} misses", stats.hits, stats.misses);
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.handle().stats()
    }

    /// Whether this cache's near cache holds an entry of the URL `path`
    /// (any host or variant of it) in `namespace`. For tests only.
    #[cfg(feature = "__internals")]
    #[doc(hidden)]
    pub fn near_holds_for_tests(&self, namespace: &str, path: &str) -> bool {
        let Some(key) = self.defaults.key.path_key(path) else {
            return false;
        };
        let ek = crate::key::EntryKey::new(namespace, &key);
        self.shared.near().is_some_and(|n| n.holds_url(&ek.primary))
    }

    /// Whether this cache's near cache is in use (its subscription holds).
    /// For tests only.
    #[cfg(feature = "__internals")]
    #[doc(hidden)]
    pub fn near_is_up_for_tests(&self) -> bool {
        self.shared.near().is_some_and(crate::near::Near::is_up)
    }
}
