//! [`FenceCache`]: one cache, many routes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::config::Config;
use crate::handle::FenceHandle;
use crate::shared::Shared;
use crate::stats::Stats;

/// One cache: the Redis connection and everything that belongs to it once
/// per process (the call timeout, the circuit breaker, the wake-up
/// subscription, the in-flight table, the counters). Routes get their own
/// [`FenceLayer`](crate::FenceLayer) from it with [`layer`](Self::layer), and set their own TTL,
/// name, key and policy there; the settings on this type can't be set per
/// route by mistake.
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
/// let cache = FenceCache::new(client.get_connection_manager().await?)
///     .namespace("shop:")
///     .redis_timeout(Duration::from_millis(100))
///     .wake_ups(client);
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
    /// use cachefence::FenceCache;
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let cache = FenceCache::from_client(client.clone())
    ///     .await?
    ///     .namespace("shop:")
    ///     .wake_ups(client);
    /// # Ok(()) }
    /// ```
    pub async fn from_client(client: redis::Client) -> redis::RedisResult<Self> {
        Ok(Self::new(crate::HealingConnection::connect(client).await?))
    }
}

#[cfg(feature = "cluster-async")]
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
    /// use cachefence::FenceCache;
    /// use redis::cluster::{ClusterClient, ClusterClientBuilder};
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let nodes = vec!["redis://127.0.0.1:7000/", "redis://127.0.0.1:7001/"];
    /// let cache = FenceCache::from_cluster_client(ClusterClient::new(nodes.clone())?)
    ///     .await?
    ///     .namespace("shop:")
    ///     .cluster_wake_ups(ClusterClientBuilder::new(nodes));
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
    /// opening after 5 failures for 1 s, no wake-ups (waiters poll).
    pub fn new(redis: C) -> Self {
        Self::from_parts(Arc::new(Shared::new(redis)), Config::default())
    }

    pub(crate) fn from_parts(shared: Arc<Shared<C>>, defaults: Config) -> Self {
        Self { shared, defaults }
    }

    /// A handle to invalidate entries of this cache's namespace and read
    /// its counters.
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
    pub fn stats(&self) -> Stats {
        self.handle().stats()
    }

    /// The prefix of every Redis key this cache's layers write and its
    /// handle invalidates (default `cachefence:`). A layer may still put a
    /// route in another namespace with [`FenceLayer::namespace`](crate::FenceLayer::namespace).
    ///
    /// It also names the cache in its metrics (feature `metrics`: label
    /// `cache` of the Redis call metrics, the gauges and the cache-wide
    /// counters), so two caches in one process keep apart.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        self.shared.store.set_label(&namespace);
        self.defaults.namespace = Arc::from(namespace);
        self
    }

    /// The timeout of every Redis call (default 250 ms). A call that takes
    /// longer counts as a failure and the request goes to the inner service.
    #[must_use]
    pub fn redis_timeout(self, timeout: Duration) -> Self {
        self.shared.store.set_timeout(timeout);
        self
    }

    /// After `failures` Redis failures in a row, send no command for
    /// `cooldown`, then probe with one (default 5 and 1 s). Its state is
    /// [`Stats::breaker`].
    #[must_use]
    pub fn circuit_breaker(self, failures: u32, cooldown: Duration) -> Self {
        self.shared.store.breaker().configure(failures, cooldown);
        self
    }

    /// Makes every invalidation of the handle (`invalidate_*`,
    /// `soft_invalidate_*`, [`apply`](crate::FenceHandle::apply) and so the
    /// queue worker) wait, after its writes (the fence and the deletes),
    /// until `replicas` replicas acknowledged them, at most `timeout`:
    /// `WAIT <replicas> <timeout>` on the connection that wrote them (on a
    /// Redis Cluster, on every primary). When fewer acknowledge in time the
    /// call returns an error ([`FenceError::is_not_replicated`](crate::FenceError::is_not_replicated)):
    /// the invalidation was applied on the primary, but a failover now
    /// could lose it (the queue worker retries it without using up an
    /// attempt). Default: off (`replicas` 0).
    ///
    /// `WAIT` holds the connection it runs on: on a multiplexed connection
    /// (`ConnectionManager`, a cluster connection) the commands sent after
    /// it wait behind it, usually one replication round trip, up to
    /// `timeout` when no replica answers. Keep `timeout` short, or give
    /// invalidations a handle of their own: a `FenceCache` over a second
    /// connection with the same namespace.
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) {
    /// use std::time::Duration;
    /// let cache = cachefence::FenceCache::new(conn)
    ///     .replicated_fences(1, Duration::from_millis(100));
    /// # }
    /// ```
    #[must_use]
    pub fn replicated_fences(self, replicas: u32, timeout: Duration) -> Self {
        self.shared.store.set_replicated(replicas, timeout);
        self
    }

    /// Wake waiting requests the moment another process stores the value
    /// they wait for, through one Redis pub/sub subscription opened from
    /// `client`. Without it, waiters poll with backoff (5 ms to 100 ms);
    /// with it they still poll as a fallback. Set it once: a second client
    /// is ignored (with a warning), as the subscription is already open.
    ///
    /// The listener subscribes to the channels of every namespace a layer
    /// of this cache serves (`<namespace>|#wake` and
    /// `<namespace>|#invalidate`). On a Redis Cluster use
    /// [`cluster_wake_ups`](Self::cluster_wake_ups): wake-ups there are
    /// sharded, and a plain client hears only the invalidations.
    #[must_use]
    pub fn wake_ups(self, client: redis::Client) -> Self {
        self.set_wake_source(crate::shared::Source::Single(client))
    }

    /// Wake-ups from the master a Sentinel names (feature `sentinel`):
    /// like [`wake_ups`](Self::wake_ups), but the subscription is opened
    /// at the master `conn` follows, and moved to the new master when a
    /// failover moves `conn` (or when the subscription breaks). Set it
    /// once.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::{FenceCache, SentinelConnection};
    /// use redis::sentinel::{SentinelClient, SentinelServerType};
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = SentinelClient::build(vec!["redis://127.0.0.1:26379/"], "mymaster".to_owned(), None, SentinelServerType::Master)?;
    /// let conn = SentinelConnection::connect(client).await?;
    /// let cache = FenceCache::new(conn.clone()).sentinel_wake_ups(&conn);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "sentinel")]
    #[must_use]
    pub fn sentinel_wake_ups(self, conn: &crate::sentinel::SentinelConnection) -> Self {
        self.set_wake_source(crate::shared::Source::Sentinel(conn.clone()))
    }

    /// Wake-ups on a Redis Cluster (feature `cluster-async`): the listener
    /// opens its own cluster connection from `builder` (made RESP3, with
    /// its own push sender) and subscribes with `SSUBSCRIBE` to the
    /// sharded channel of each entry a fill of this process waits on, at
    /// the primary that owns the entry's slot; subscriptions follow slot
    /// moves and failovers. Set it once.
    ///
    /// The connection also serves invalidation walks when the cache's
    /// connection is not a `ClusterConnection` itself (a wrapper, with
    /// [`cluster`](Self::cluster)): they need to reach every primary.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::FenceCache;
    /// use redis::cluster::{ClusterClient, ClusterClientBuilder};
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let nodes = vec!["redis://127.0.0.1:7000/", "redis://127.0.0.1:7001/"];
    /// let conn = ClusterClient::new(nodes.clone())?.get_async_connection().await?;
    /// let cache = FenceCache::new(conn)
    ///     .namespace("shop:")
    ///     .cluster_wake_ups(ClusterClientBuilder::new(nodes));
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "cluster-async")]
    #[must_use]
    pub fn cluster_wake_ups(self, builder: redis::cluster::ClusterClientBuilder) -> Self {
        match crate::shared::Source::cluster(builder) {
            Ok(source) => self.set_wake_source(source),
            Err(err) => {
                tracing::warn!(error = %err, "cluster_wake_ups: the cluster client could not be built; waiters poll");
                self
            }
        }
    }

    /// Redis Cluster mode, whatever the connection's type (default: on
    /// when the connection is a `redis::cluster_async::ClusterConnection`,
    /// with the `cluster-async` feature). Turn it on for your own
    /// `ConnectionLike` wrapping a cluster connection: tags are then kept
    /// in each entry's slot, wake-ups are sharded, and invalidation walks
    /// reach every primary (through the wrapped connection if it is a
    /// `ClusterConnection`, else through
    /// [`cluster_wake_ups`](Self::cluster_wake_ups)'s connection; without
    /// either a walk returns an error rather than cover one node).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::FenceCache;
    ///
    /// # async fn doc(conn: redis::aio::ConnectionManager) {
    /// // A connection the cache can't recognise as a cluster's.
    /// let cache = FenceCache::new(conn).cluster(true);
    /// # }
    /// ```
    #[must_use]
    pub fn cluster(self, on: bool) -> Self {
        self.shared.store.set_cluster(on);
        self
    }

    /// An in-process near cache of up to `max_bytes` (bodies, headers and
    /// bookkeeping) in front of Redis: fresh hits of hot keys are served
    /// from memory, with no Redis command. Off by default.
    ///
    /// It is coherent: an entry is taken in only once Redis has marked it
    /// (one extra script, the first time a process reads a version), and
    /// every write and every invalidation of a marked entry, by any
    /// process, is announced on `<namespace>|#near`; each near cache drops
    /// the entry and acknowledges, and an invalidation call returns only
    /// once every near cache acknowledged it (waiting at most 250 ms). So a
    /// read after an invalidation returned never gets the old entry from a
    /// near cache, as it never does from Redis.
    ///
    /// - It needs the subscription of [`wake_ups`](Self::wake_ups): without
    ///   it, or while the subscription is down (Redis restarted, the
    ///   connection killed), the near cache is empty and every request
    ///   goes to Redis. A process that invalidates needs `wake_ups` too, to
    ///   hear the acknowledgements (else it waits the whole 250 ms).
    /// - An entry is served from it only while fresh; stale entries,
    ///   revalidations, XFetch's early refreshes and entries that vary
    ///   (`Vary`) go to Redis. An entry larger than an eighth of
    ///   `max_bytes` is not taken in.
    /// - On a Redis Cluster it needs
    ///   [`cluster_wake_ups`](Self::cluster_wake_ups) (else the setting is
    ///   ignored): invalidations are announced on the namespace's sharded
    ///   channel, which every near cache subscribes to on the primary owning
    ///   it; when its slot moves, near caches are flushed until they
    ///   subscribed again.
    /// - Redis evicting a marked entry under `maxmemory`, or a `FLUSHALL`,
    ///   is not announced by Redis; an invalidation of an entry Redis no
    ///   longer has is announced all the same, so the near entry is dropped
    ///   (except for a prefix walk, which can't find a URL with no variant
    ///   set whose entry is gone: then it lives until its freshness ends).
    /// - Its subscription is probed (a `PING` on it every 500 ms, answered
    ///   within 900 ms): a subscription that stops answering, even with its
    ///   connection still open (a partition, a dropped NAT flow), has the
    ///   near cache emptied and bypassed **at most 1.5 s** after it stopped
    ///   answering, until a new subscription holds. Within that bound a
    ///   near cache cut off silently may still serve what it holds.
    /// - Near caches in use register in the namespace's registry (a sorted
    ///   set, `<ns>|#nearcaches`, renewed every second, expiring after
    ///   3 s): an invalidation of an entry near caches held that heard
    ///   fewer acknowledgements than near caches are registered counts
    ///   [`Stats::near_acks_missing`] and logs a warning.
    ///
    /// Its counters: [`Stats::near_hits`], [`Stats::near_evictions`],
    /// [`Stats::near_flushes`], [`Stats::near_ack_timeouts`],
    /// [`Stats::near_acks_missing`]. Set it once; a second call is ignored.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::FenceCache;
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let cache = FenceCache::new(client.get_connection_manager().await?)
    ///     .wake_ups(client)
    ///     .near_cache(64 << 20);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn near_cache(self, max_bytes: usize) -> Self {
        if self
            .shared
            .near
            .set(crate::near::Near::new(
                max_bytes,
                self.shared.store.label().clone(),
            ))
            .is_err()
        {
            tracing::warn!("near_cache was already set for this cache; the new size is ignored");
        }
        // A listener already running subscribes to the announcements now.
        self.shared.interests.changed.notify_one();
        self
    }

    /// Whether this cache's near cache holds an entry of the URL `path`
    /// (any host or variant of it) in `namespace`. For tests only.
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
    #[doc(hidden)]
    pub fn near_is_up_for_tests(&self) -> bool {
        self.shared.near().is_some_and(crate::near::Near::is_up)
    }

    fn set_wake_source(self, source: crate::shared::Source) -> Self {
        #[cfg(feature = "cluster-async")]
        if let crate::shared::Source::Cluster(client, _) = &source {
            self.shared.store.set_walk_client((**client).clone());
        }
        if self.shared.wake_client.set(source).is_err() {
            tracing::warn!("wake-ups were already set for this cache; the new client is ignored");
        }
        crate::wake::ensure_listener(&self.shared);
        self
    }
}
