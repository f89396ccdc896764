//! [`FenceCacheBuilder`]: the cache-wide settings, checked once by
//! [`build`](FenceCacheBuilder::build).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::cache::FenceCache;
use crate::config::Config;
use crate::error::FenceError;
use crate::metrics::CacheLabel;
use crate::shared::{Shared, Source};

/// The longest duration a setting of the builder accepts: beyond it a value
/// is a unit mistake (seconds given as milliseconds), not a choice.
const LONGEST: Duration = Duration::from_secs(3600);

/// Builds a [`FenceCache`]: the settings that belong to the cache as a
/// whole (the namespace its layers start from, the Redis call timeout, the
/// circuit breaker, the wake-up subscription, the near cache, Redis Cluster
/// mode, replicated fences), checked together by
/// [`build`](Self::build), which returns an error naming the fix for every
/// misconfiguration. Nothing is shared before `build`: a setting can't reach
/// a cache already serving.
///
/// Made by [`FenceCache::builder`]. Per-route settings (TTL, grace, name,
/// key, policy) are set on each route's [`FenceLayer`](crate::FenceLayer).
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use cachefence::FenceCache;
///
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let cache = FenceCache::builder(client.get_connection_manager().await?)
///     .namespace("shop:")
///     .redis_timeout(Duration::from_millis(100))
///     .circuit_breaker(5, Duration::from_secs(1))
///     .wake_ups(client)
///     .near_cache(64 << 20)
///     .build()?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct FenceCacheBuilder<C = redis::aio::ConnectionManager> {
    conn: C,
    namespace: Option<String>,
    redis_timeout: Option<Duration>,
    breaker: Option<(u32, Duration)>,
    replicated: Option<(u32, Duration)>,
    /// The wake-up source and the setter that gave it.
    wake: Option<(Source, &'static str)>,
    cluster: Option<bool>,
    near: Option<usize>,
    /// The first misconfiguration a setter found, reported by `build`.
    error: Option<FenceError>,
}

impl<C> fmt::Debug for FenceCacheBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceCacheBuilder")
            .field("namespace", &self.namespace)
            .field("redis_timeout", &self.redis_timeout)
            .field("circuit_breaker", &self.breaker)
            .field("replicated_fences", &self.replicated)
            .field("wake_ups", &self.wake.as_ref().map(|(_, by)| *by))
            .field("cluster", &self.cluster)
            .field("near_cache", &self.near)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<C> FenceCache<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A builder for a cache in the Redis behind `redis` (any connection
    /// [`new`](Self::new) takes), to set the cache-wide settings; `build`
    /// checks them. `FenceCache::new(conn)` is
    /// `FenceCache::builder(conn).build()` with nothing set, which can't
    /// fail.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::FenceCache;
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let cache = FenceCache::builder(client.get_connection_manager().await?)
    ///     .namespace("shop:")
    ///     .wake_ups(client)
    ///     .build()?;
    /// let products = cache.layer().name("products");
    /// # Ok(()) }
    /// ```
    pub fn builder(redis: C) -> FenceCacheBuilder<C> {
        FenceCacheBuilder {
            conn: redis,
            namespace: None,
            redis_timeout: None,
            breaker: None,
            replicated: None,
            wake: None,
            cluster: None,
            near: None,
            error: None,
        }
    }
}

impl<C> FenceCacheBuilder<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The prefix of every Redis key the cache's layers write and its
    /// handle invalidates (default `cachefence:`). A layer may still put a
    /// route in another namespace with
    /// [`FenceLayer::namespace`](crate::FenceLayer::namespace).
    ///
    /// It also names the cache in its metrics (feature `metrics`: the label
    /// `cache` of the Redis call metrics, the gauges and the cache-wide
    /// counters), so two caches in one process keep apart.
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) -> Result<(), cachefence::FenceError> {
    /// let cache = cachefence::FenceCache::builder(conn).namespace("shop:").build()?;
    /// # Ok(()) }
    /// ```
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The timeout of every Redis call (default 250 ms). A call that takes
    /// longer counts as a failure and the request goes to the inner
    /// service. `build` rejects zero and more than an hour.
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) -> Result<(), cachefence::FenceError> {
    /// use std::time::Duration;
    /// let cache = cachefence::FenceCache::builder(conn)
    ///     .redis_timeout(Duration::from_millis(100))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        if timeout.is_zero() || timeout > LONGEST {
            self.fail(format!(
                "redis_timeout({timeout:?}): give a timeout above zero and at most an hour (the default is 250 ms)"
            ));
        }
        self.redis_timeout = Some(timeout);
        self
    }

    /// After `failures` Redis failures in a row, send no command for
    /// `cooldown`, then probe with one (default 5 and 1 s). Its state is
    /// [`Stats::breaker`](crate::Stats::breaker). `build` rejects 0
    /// failures (a breaker that never opens is `u32::MAX`), a zero
    /// cool-down and one over an hour.
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) -> Result<(), cachefence::FenceError> {
    /// use std::time::Duration;
    /// let cache = cachefence::FenceCache::builder(conn)
    ///     .circuit_breaker(3, Duration::from_millis(500))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        if failures == 0 {
            self.fail(
                "circuit_breaker(0, ..): give at least 1 failure (u32::MAX for a breaker that never opens)"
                    .to_owned(),
            );
        }
        if cooldown.is_zero() || cooldown > LONGEST {
            self.fail(format!(
                "circuit_breaker(.., {cooldown:?}): give a cool-down above zero and at most an hour (the default is 1 s)"
            ));
        }
        self.breaker = Some((failures, cooldown));
        self
    }

    /// Makes every invalidation of the cache's handles (`invalidate_*`,
    /// `soft_invalidate_*`, [`apply`](crate::FenceHandle::apply) and so the
    /// queue worker) wait, after its writes (the fence and the deletes),
    /// until `replicas` replicas acknowledged them, at most `timeout`:
    /// `WAIT <replicas> <timeout>` on the connection that wrote them (on a
    /// Redis Cluster, on every primary). When fewer acknowledge in time the
    /// call returns an error
    /// ([`FenceError::is_not_replicated`](crate::FenceError::is_not_replicated)):
    /// the invalidation was applied on the primary, but a failover now
    /// could lose it (the queue worker retries it without using up an
    /// attempt). Default: off. `build` rejects 0 replicas (leave the
    /// setting out instead), a zero timeout (`WAIT` would block forever)
    /// and one over an hour.
    ///
    /// `WAIT` holds the connection it runs on: on a multiplexed connection
    /// (`ConnectionManager`, a cluster connection) the commands sent after
    /// it wait behind it, usually one replication round trip, up to
    /// `timeout` when no replica answers. Keep `timeout` short, or give
    /// invalidations a handle of their own: a `FenceCache` over a second
    /// connection with the same namespace.
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) -> Result<(), cachefence::FenceError> {
    /// use std::time::Duration;
    /// let cache = cachefence::FenceCache::builder(conn)
    ///     .replicated_fences(1, Duration::from_millis(100))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn replicated_fences(mut self, replicas: u32, timeout: Duration) -> Self {
        if replicas == 0 {
            self.fail(
                "replicated_fences(0, ..): give at least 1 replica, or leave replicated_fences out for no WAIT"
                    .to_owned(),
            );
        }
        if timeout.is_zero() || timeout > LONGEST {
            self.fail(format!(
                "replicated_fences(.., {timeout:?}): give a timeout above zero (WAIT 0 blocks forever) and at most an hour"
            ));
        }
        self.replicated = Some((replicas, timeout));
        self
    }

    /// Wake waiting requests the moment another process stores the value
    /// they wait for, through one Redis pub/sub subscription opened from
    /// `client`. Without it, waiters poll with backoff (5 ms to 100 ms);
    /// with it they still poll as a fallback. The near cache needs it.
    ///
    /// The listener subscribes to the channels of every namespace a layer
    /// of this cache serves (`<namespace>|#wake` and
    /// `<namespace>|#invalidate`). `build` rejects a second wake-up source
    /// (of any of the `*wake_ups` setters) and this one on a Redis Cluster,
    /// where wake-ups are sharded: use
    /// `cluster_wake_ups` there (feature `cluster-async`).
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let cache = cachefence::FenceCache::builder(client.get_connection_manager().await?)
    ///     .wake_ups(client)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn wake_ups(self, client: redis::Client) -> Self {
        self.wake_source(Source::Single(client), "wake_ups")
    }

    /// Wake-ups from the master a Sentinel names (feature `sentinel`):
    /// like [`wake_ups`](Self::wake_ups), but the subscription is opened
    /// at the master `conn` follows, and moved to the new master when a
    /// failover moves `conn` (or when the subscription breaks). `build`
    /// rejects a second wake-up source.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::FenceCache;
    /// use cachefence::sentinel::SentinelConnection;
    /// use redis::sentinel::{SentinelClient, SentinelServerType};
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = SentinelClient::build(vec!["redis://127.0.0.1:26379/"], "mymaster".to_owned(), None, SentinelServerType::Master)?;
    /// let conn = SentinelConnection::connect(client).await?;
    /// let cache = FenceCache::builder(conn.clone()).sentinel_wake_ups(&conn).build()?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "sentinel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
    pub fn sentinel_wake_ups(self, conn: &crate::sentinel::SentinelConnection) -> Self {
        self.wake_source(Source::Sentinel(conn.clone()), "sentinel_wake_ups")
    }

    /// Wake-ups on a Redis Cluster (feature `cluster-async`): the listener
    /// opens its own cluster connection from `builder` (made RESP3, with
    /// its own push sender) and subscribes with `SSUBSCRIBE` to the
    /// sharded channel of each entry a fill of this process waits on, at
    /// the primary that owns the entry's slot; subscriptions follow slot
    /// moves and failovers.
    ///
    /// The connection also serves invalidation walks when the cache's
    /// connection is not a `ClusterConnection` itself (a wrapper, with
    /// [`cluster`](Self::cluster)): they need to reach every primary.
    ///
    /// `build` rejects a `builder` that fails to build a client (its error
    /// is the message), a second wake-up source, and a connection that is
    /// not a Redis Cluster's (say so with [`cluster`](Self::cluster) for a
    /// wrapper).
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
    /// let cache = FenceCache::builder(conn)
    ///     .namespace("shop:")
    ///     .cluster_wake_ups(ClusterClientBuilder::new(nodes))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "cluster-async")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster-async")))]
    pub fn cluster_wake_ups(mut self, builder: redis::cluster::ClusterClientBuilder) -> Self {
        match Source::cluster(builder) {
            Ok(source) => self.wake_source(source, "cluster_wake_ups"),
            Err(err) => {
                self.fail(format!(
                    "cluster_wake_ups: the cluster client could not be built ({err}): check the node URLs and the builder's settings"
                ));
                self
            }
        }
    }

    /// Redis Cluster mode, whatever the connection's type (default: on
    /// when the connection is a `redis::cluster_async::ClusterConnection`
    /// or a [`HealingConnection`](crate::HealingConnection) of one, with the
    /// `cluster-async` feature). Turn it on for your own `ConnectionLike`
    /// wrapping a cluster connection: tags are then kept in each entry's
    /// slot, wake-ups are sharded, and invalidation walks reach every
    /// primary through `cluster_wake_ups`'s connection, which `build`
    /// requires then (with the `cluster-async` feature; the example of
    /// `cluster_wake_ups` shows it).
    ///
    /// `build` rejects `cluster(false)` on a connection that is a
    /// cluster's, and `cluster(true)` on a connection it does not recognise
    /// as one without `cluster_wake_ups` (a walk could then cover one node
    /// only). What `build` can't tell, because it sends no command and a
    /// wrapper's type says nothing of what it wraps: a wrapper of a
    /// cluster connection *without* `cluster(true)` (the cache then keeps
    /// tag indexes as on one server, in other slots than their entries: a
    /// script touching both fails (`CROSSSLOT`) and its request passes
    /// through; and a walk SCANs only the node the connection sends it
    /// to), and `cluster(true)` over a connection to a
    /// single server (the cluster listener fails to connect, logs it and
    /// waiters poll). Say `cluster(true)` exactly when the connection is
    /// a cluster's.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) {
    /// // A connection the cache can't recognise as a cluster's, and no
    /// // cluster_wake_ups to reach every primary: an error naming the fix.
    /// let err = cachefence::FenceCache::builder(conn).cluster(true).build().unwrap_err();
    /// assert!(err.is_config());
    /// assert!(err.to_string().contains("add cluster_wake_ups"));
    /// # }
    /// ```
    pub fn cluster(mut self, on: bool) -> Self {
        self.cluster = Some(on);
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
    /// - It needs the subscription of [`wake_ups`](Self::wake_ups) (on a
    ///   Redis Cluster `cluster_wake_ups`, as
    ///   invalidations are announced on the namespace's sharded channel):
    ///   `build` rejects a near cache without one. While the subscription
    ///   is down (Redis restarted, the connection killed), the near cache
    ///   is empty and every request goes to Redis. A process that
    ///   invalidates needs wake-ups too, to hear the acknowledgements (else
    ///   it waits the whole 250 ms).
    /// - `build` rejects 0 bytes. An entry larger than an eighth of
    ///   `max_bytes` is not taken in.
    /// - An entry is served from it only while fresh; stale entries,
    ///   revalidations, XFetch's early refreshes and entries that vary
    ///   (`Vary`) go to Redis.
    /// - On a Redis Cluster, when the namespace channel's slot moves, near
    ///   caches are flushed until they subscribed again.
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
    ///   [`Stats::near_acks_missing`](crate::Stats::near_acks_missing) and
    ///   logs a warning.
    ///
    /// Its counters: [`Stats::near_hits`](crate::Stats::near_hits),
    /// [`Stats::near_evictions`](crate::Stats::near_evictions),
    /// [`Stats::near_flushes`](crate::Stats::near_flushes),
    /// [`Stats::near_ack_timeouts`](crate::Stats::near_ack_timeouts),
    /// [`Stats::near_acks_missing`](crate::Stats::near_acks_missing).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use cachefence::FenceCache;
    ///
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let cache = FenceCache::builder(client.get_connection_manager().await?)
    ///     .wake_ups(client)
    ///     .near_cache(64 << 20)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn near_cache(mut self, max_bytes: usize) -> Self {
        if max_bytes == 0 {
            self.fail(
                "near_cache(0): give the near cache's size in bytes (for example 64 << 20), or leave near_cache out for none"
                    .to_owned(),
            );
        }
        self.near = Some(max_bytes);
        self
    }

    /// The cache, once every setting is checked. Starts the wake-up
    /// listener when one is set (on the Tokio runtime this is called on;
    /// called outside one, the listener starts with the first layer or
    /// handle used on a runtime).
    ///
    /// # Errors
    ///
    /// An error for which
    /// [`FenceError::is_config`](crate::FenceError::is_config) is true,
    /// whose message names the setting and the fix: the first value a
    /// setter rejected (each setter says which), a second wake-up source,
    /// a near cache without wake-ups, `cluster(false)` on a Redis Cluster
    /// connection, `cluster(true)` on a connection not recognised as a
    /// cluster's without `cluster_wake_ups`, `wake_ups` or
    /// `sentinel_wake_ups` on a Redis Cluster, and `cluster_wake_ups` on a
    /// connection that is not a cluster's. ([`cluster`](Self::cluster)
    /// says which misconfigurations of a connection it can't detect.)
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) {
    /// let err = cachefence::FenceCache::builder(conn).near_cache(1 << 20).build().unwrap_err();
    /// assert!(err.is_config());
    /// # }
    /// ```
    pub fn build(self) -> Result<FenceCache<C>, FenceError> {
        if let Some(err) = self.error {
            return Err(err);
        }
        let detected = crate::store::is_cluster_connection(&self.conn);
        if self.cluster == Some(false) && detected {
            return Err(FenceError::config(
                "cluster(false) on a Redis Cluster connection: leave cluster out, the connection is a cluster's"
                    .to_owned(),
            ));
        }
        let cluster = self.cluster.unwrap_or(detected);
        match &self.wake {
            #[cfg(feature = "cluster-async")]
            Some((Source::Cluster(..), by)) if !cluster => {
                return Err(FenceError::config(format!(
                    "{by} on a connection that is not a Redis Cluster's: use wake_ups, or add cluster(true) if the connection wraps a cluster's"
                )));
            }
            #[cfg(feature = "cluster-async")]
            Some((Source::Cluster(..), _)) => {}
            Some((_, by)) if cluster => {
                return Err(FenceError::config(format!(
                    "{by} on a Redis Cluster: wake-ups there are sharded, use cluster_wake_ups (feature cluster-async)"
                )));
            }
            _ => {}
        }
        if cluster && !detected {
            // A connection not recognised as a cluster's (a wrapper): the
            // walks of invalidate_prefix, invalidate_tag and invalidate_all
            // must reach every primary, through cluster_wake_ups's
            // connection (checked above to be a cluster's source).
            #[cfg(feature = "cluster-async")]
            let reaches_every_primary = matches!(self.wake, Some((Source::Cluster(..), _)));
            #[cfg(not(feature = "cluster-async"))]
            let reaches_every_primary = false;
            if !reaches_every_primary {
                return Err(FenceError::config(
                    "cluster(true) on a connection not recognised as a Redis Cluster's (not a ClusterConnection or a HealingConnection of one) without cluster_wake_ups: invalidate_prefix, invalidate_tag and invalidate_all could not reach every primary; add cluster_wake_ups(ClusterClientBuilder::new(nodes)) (feature cluster-async), or pass the ClusterConnection itself and leave cluster out"
                        .to_owned(),
                ));
            }
        }
        if self.near.is_some() && self.wake.is_none() {
            return Err(FenceError::config(
                "near_cache without wake-ups: a near cache is kept coherent through the wake-up subscription; add wake_ups(client) (cluster_wake_ups on a Redis Cluster, sentinel_wake_ups behind a Sentinel)"
                    .to_owned(),
            ));
        }

        let namespace = self
            .namespace
            .unwrap_or_else(|| crate::key::DEFAULT_NAMESPACE.to_owned());
        let shared = Shared::new(self.conn, CacheLabel::new(&namespace));
        if let Some(timeout) = self.redis_timeout {
            shared.store.set_timeout(timeout);
        }
        if let Some((failures, cooldown)) = self.breaker {
            shared.store.breaker().configure(failures, cooldown);
        }
        if let Some((replicas, timeout)) = self.replicated {
            shared.store.set_replicated(replicas, timeout);
        }
        shared.store.set_cluster(cluster);
        if let Some(max_bytes) = self.near {
            let _ = shared.near.set(crate::near::Near::new(
                max_bytes,
                shared.store.label().clone(),
            ));
        }
        if let Some((source, _)) = self.wake {
            #[cfg(feature = "cluster-async")]
            if let Source::Cluster(client, _) = &source {
                shared.store.set_walk_client((**client).clone());
            }
            let _ = shared.wake_client.set(source);
        }
        let shared = Arc::new(shared);
        crate::wake::ensure_listener(&shared);
        let defaults = Config {
            namespace: Arc::from(namespace),
            ..Config::default()
        };
        Ok(FenceCache::from_parts(shared, defaults))
    }

    fn wake_source(mut self, source: Source, by: &'static str) -> Self {
        if let Some((_, first)) = &self.wake {
            let first = *first;
            self.fail(format!(
                "{by} after {first}: a cache has one wake-up subscription; keep one of wake_ups, sentinel_wake_ups and cluster_wake_ups"
            ));
            return self;
        }
        self.wake = Some((source, by));
        self
    }

    /// Keeps the first misconfiguration: `build` reports it.
    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(FenceError::config(message));
        }
    }
}
