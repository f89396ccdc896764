//! [`HealingConnection`]: a connection the cache can replace when it stops
//! working while Redis itself still answers.
//!
//! The cache bounds each Redis call with its own timeout (250 ms by
//! default) and drops the call when it runs out. A connection that stops
//! forwarding without closing (a half-open TCP flow: a NAT or firewall
//! dropping it, a VM migration), or a client connection wedged by a bug,
//! never tells its own reconnect logic anything: the calls are dropped
//! before redis-rs's response timeout fires, and every request then goes to
//! the origin for good. This wrapper owns how connections are made (a
//! `redis::Client`, a `ClusterClient`, or any connect function): when calls
//! on the current connection keep failing or are dropped unanswered, it
//! opens a fresh connection and, if that one's `PING` succeeds, makes it the
//! connection of every clone.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Failed or unanswered calls in a row on one connection before a fresh
/// connection is tried.
const FAILURES_BEFORE_HEALING: u32 = 3;
/// The bound of one attempt: connecting and the `PING`.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// The shortest time between two replacements (an overloaded Redis, where
/// fresh connections answer `PING` but calls still time out, is not
/// reconnected to in a loop).
const MIN_GAP: Duration = Duration::from_secs(1);
/// How long the current connection gets at least to answer the `PING` of
/// an attempt (and at most 50 ms longer than the fresh one took): if it
/// does, it is kept (the failures lie elsewhere: a node down, a paused or
/// slow Redis), whatever the fresh one does.
const CURRENT_PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// The longest wait between two failed attempts (Redis down).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

type Connect<C> = dyn Fn() -> Pin<Box<dyn Future<Output = RedisResult<C>> + Send>> + Send + Sync;

/// An async connection that replaces itself when it stops working while a
/// fresh one works: what [`FenceCache::from_client`](crate::FenceCache::from_client)
/// (and `from_cluster_client`, feature `cluster-async`) build the cache on.
///
/// It holds one connection made by its connect function (a
/// `MultiplexedConnection` from a `redis::Client`, a cluster connection
/// from a `ClusterClient`, or your own), and replaces it when it stopped
/// working while Redis still answers:
///
/// - when 3 calls in a row on it fail with a transport error (not an error
///   Redis answered with) or are dropped unanswered (the cache's own
///   timeout), it connects again in the background and sends `PING` on
///   both connections (on a Redis Cluster, to every primary). If the fresh
///   one answers (connecting and `PING` within 1 s) and the current one
///   does not (within 300 ms, or as long as the fresh one took), every
///   clone sends its next calls on the fresh one; if the current one
///   answers, it is kept (the failures lie elsewhere: a node down, a
///   paused or slow Redis);
/// - when the connection breaks (closed or reset by the server or a hop;
///   not one node's link of a cluster connection), it connects again at
///   once, and calls wait for that attempt (within the cache's timeout)
///   rather than fail on the dead connection, as a `ConnectionManager`
///   does.
///
/// Calls in flight on a replaced connection just finish or fail (the cache
/// fails open); when a connection is replaced, the cache's circuit breaker
/// closes. While no fresh connection can be made (Redis down) it retries
/// with backoff up to 2 s; connections are replaced at most once a second.
///
/// With the cache's defaults (a 250 ms timeout) caching resumes within
/// about 1 s of the connection going silent (measured: 0.3 to 0.6 s under
/// load), and at once when it closes (0.03 s), whatever the connection's
/// own timeouts.
///
/// Cloning is cheap: every clone shares the connection.
///
/// # Example
///
/// ```no_run
/// use cachefence::{FenceCache, HealingConnection};
///
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// // What `FenceCache::from_client(client)` does.
/// let conn = HealingConnection::connect(client).await?;
/// let cache = FenceCache::builder(conn).namespace("shop:").build()?;
/// # Ok(()) }
/// ```
pub struct HealingConnection<C = MultiplexedConnection> {
    inner: Arc<Inner<C>>,
    db: i64,
}

impl<C> Clone for HealingConnection<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            db: self.db,
        }
    }
}

impl<C> fmt::Debug for HealingConnection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealingConnection")
            .field(
                "replacements",
                &self.inner.replacements.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

/// The connection of every clone, and its generation (bumped by each
/// replacement).
struct Current<C> {
    generation: u64,
    conn: C,
}

struct Inner<C> {
    /// Read by every call without a lock (one `ArcSwap` load); swapped by
    /// a replacement.
    current: ArcSwap<Current<C>>,
    connect: Box<Connect<C>>,
    /// Failed or dropped calls in a row on the current generation.
    failures: AtomicU32,
    /// A Redis Cluster connection: a broken connection to one node does not
    /// make it dead, and the `PING` of an attempt goes to every primary.
    cluster: bool,
    /// An attempt to replace the connection is running.
    healing: AtomicBool,
    /// The current connection broke (closed, reset): calls wait for the
    /// attempt running, if any, rather than fail on it.
    dead: AtomicBool,
    /// A fresh connection is being made and PINGed now.
    attempting: AtomicBool,
    /// Bumped when an attempt ends (replaced or not).
    attempts: tokio::sync::watch::Sender<u64>,
    replacements: AtomicU64,
    /// Told after each replacement (the cache closes its breaker).
    on_replaced: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    last_replaced: std::sync::Mutex<Option<Instant>>,
}

impl HealingConnection<MultiplexedConnection> {
    /// Connects to the Redis `client` names (a multiplexed connection with
    /// the client's default settings but no response timeout of its own),
    /// and reconnects from it when needed.
    ///
    /// The cache bounds each of its calls with its own `redis_timeout`
    /// (and counts a call dropped at that timeout towards replacing the
    /// connection), so redis-rs's response timeout (500 ms by default)
    /// would be a second timer on every call: it is left out. A command of
    /// your own sent over this connection is then bounded only by what you
    /// wrap it in; [`connect_with`](Self::connect_with) makes the
    /// connection with your settings.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let conn = cachefence::HealingConnection::connect(client).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(client: redis::Client) -> RedisResult<Self> {
        // One timer per call: the cache's.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        Self::connect_with(move || {
            let (client, config) = (client.clone(), config.clone());
            async move {
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
            }
        })
        .await
    }
}

#[cfg(feature = "cluster-async")]
#[cfg_attr(docsrs, doc(cfg(feature = "cluster-async")))]
impl HealingConnection<redis::cluster_async::ClusterConnection> {
    /// Connects to the Redis Cluster `client` names (feature
    /// `cluster-async`), and makes a new cluster connection from it when
    /// needed. The cache recognises it as a cluster connection.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::cluster::ClusterClient::new(vec!["redis://127.0.0.1:7000/"])?;
    /// let conn = cachefence::HealingConnection::connect_cluster(client).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_cluster(client: redis::cluster::ClusterClient) -> RedisResult<Self> {
        Self::connect_with(move || {
            let client = client.clone();
            async move { client.get_async_connection().await }
        })
        .await
    }
}

impl<C> HealingConnection<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Makes the first connection with `connect` and keeps `connect` to
    /// make the replacements: any async connection of the `redis` crate
    /// (with your own settings, TLS, credentials).
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let config = redis::AsyncConnectionConfig::new()
    ///     .set_connection_timeout(Some(Duration::from_millis(500)));
    /// let conn = cachefence::HealingConnection::connect_with(move || {
    ///     let (client, config) = (client.clone(), config.clone());
    ///     async move { client.get_multiplexed_async_connection_with_config(&config).await }
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with<F, Fut>(connect: F) -> RedisResult<Self>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RedisResult<C>> + Send + 'static,
    {
        let connect: Box<Connect<C>> = Box::new(move || Box::pin(connect()));
        let first = connect().await?;
        let cluster = is_cluster(&first);
        let db = first.get_db();
        Ok(Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(Current {
                    generation: 0,
                    conn: first,
                }),
                connect,
                cluster,
                failures: AtomicU32::new(0),
                healing: AtomicBool::new(false),
                dead: AtomicBool::new(false),
                attempting: AtomicBool::new(false),
                attempts: tokio::sync::watch::Sender::new(0),
                replacements: AtomicU64::new(0),
                on_replaced: std::sync::OnceLock::new(),
                last_replaced: std::sync::Mutex::new(None),
            }),
            db,
        })
    }

    /// How many times the connection was replaced.
    ///
    /// ```no_run
    /// # fn doc(conn: cachefence::HealingConnection) {
    /// assert_eq!(conn.replacements(), 0);
    /// # }
    /// ```
    pub fn replacements(&self) -> u64 {
        self.inner.replacements.load(Ordering::Relaxed)
    }

    /// The current connection (a clone of it).
    #[cfg(feature = "cluster-async")]
    pub(crate) fn current(&self) -> C {
        self.inner.current().1
    }

    /// The current connection for one call, and what counts how it ends.
    /// When the connection broke and a fresh one is being made, waits for
    /// that attempt (bounded by the caller's timeout), as a
    /// `ConnectionManager` does when it reconnects.
    async fn begin(&self) -> (C, Outcome<'_, C>) {
        if self.inner.reconnecting() {
            let mut attempts = self.inner.attempts.subscribe();
            if self.inner.reconnecting() {
                let _ = attempts.changed().await;
            }
        }
        let (generation, conn) = self.inner.current();
        let outcome = Outcome {
            inner: &self.inner,
            generation,
            done: false,
        };
        (conn, outcome)
    }
}

/// Has `told` run after each replacement of `conn`'s connection, if `conn`
/// is a [`HealingConnection`] over a `MultiplexedConnection` or a cluster
/// connection (set once: the cache's store).
pub(crate) fn when_replaced<C: 'static>(conn: &C, told: impl Fn() + Send + Sync + 'static) {
    let conn = conn as &dyn std::any::Any;
    let slot = conn
        .downcast_ref::<HealingConnection<MultiplexedConnection>>()
        .map(|healing| &healing.inner.on_replaced);
    #[cfg(feature = "cluster-async")]
    let slot = slot.or_else(|| {
        conn.downcast_ref::<HealingConnection<redis::cluster_async::ClusterConnection>>()
            .map(|healing| &healing.inner.on_replaced)
    });
    if let Some(slot) = slot {
        let _ = slot.set(Box::new(told));
    }
}

/// Whether `conn` is a Redis Cluster connection.
fn is_cluster(conn: &dyn std::any::Any) -> bool {
    #[cfg(feature = "cluster-async")]
    let cluster = conn.is::<redis::cluster_async::ClusterConnection>();
    #[cfg(not(feature = "cluster-async"))]
    let cluster = {
        let _ = conn;
        false
    };
    cluster
}

/// `PING` over `conn`; on a Redis Cluster connection, to every primary
/// (one answering node says nothing of the others).
async fn ping<C>(conn: &mut C) -> RedisResult<()>
where
    C: ConnectionLike + Send + 'static,
{
    #[cfg(feature = "cluster-async")]
    if let Some(cluster) =
        (conn as &mut dyn std::any::Any).downcast_mut::<redis::cluster_async::ClusterConnection>()
    {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
        let routing = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        ));
        return cluster
            .route_command(redis::cmd("PING"), routing)
            .await
            .map(drop);
    }
    redis::cmd("PING").query_async::<()>(conn).await
}

/// Whether `err` says the connection or the node did not answer (as
/// opposed to Redis answering with an error).
fn is_transport(err: &RedisError) -> bool {
    !matches!(err.kind(), redis::ErrorKind::Server(_))
        && (err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || err.is_unrecoverable_error()
            || matches!(err.kind(), redis::ErrorKind::ClusterConnectionNotFound))
}

/// Whether `err` says the connection itself is gone (closed, reset): no
/// call on it can succeed any more.
fn is_broken(err: &RedisError) -> bool {
    err.is_connection_dropped() || err.is_unrecoverable_error()
}

/// Counts a call dropped before it ended (the cache's timeout) as a
/// failure.
struct Outcome<'a, C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    inner: &'a Arc<Inner<C>>,
    generation: u64,
    done: bool,
}

impl<C> Outcome<'_, C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The call ended with `result`.
    fn end<T>(mut self, result: &RedisResult<T>) {
        self.done = true;
        match result {
            Err(err) if is_transport(err) => self.inner.failed(self.generation, is_broken(err)),
            _ => self.inner.answered(self.generation),
        }
    }
}

impl<C> Drop for Outcome<'_, C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if !self.done {
            self.inner.failed(self.generation, false);
        }
    }
}

impl<C> Inner<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn current(&self) -> (u64, C) {
        let current = self.current.load();
        (current.generation, current.conn.clone())
    }

    fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// A call on `generation` got an answer.
    fn answered(&self, generation: u64) {
        // The failure count first: it is 0 on almost every call.
        if self.failures.load(Ordering::Relaxed) != 0 && generation == self.generation() {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Whether calls should wait for the attempt running.
    fn reconnecting(&self) -> bool {
        self.dead.load(Ordering::Acquire) && self.attempting.load(Ordering::Acquire)
    }

    /// A call on `generation` failed (`broken`: the connection is gone) or
    /// was dropped unanswered.
    fn failed(self: &Arc<Self>, generation: u64, broken: bool) {
        // Calls still in flight on a replaced connection count for nothing.
        if generation != self.generation() {
            return;
        }
        // One node's connection of a cluster connection breaking is a node
        // down, not the connection.
        let broken = broken && !self.cluster;
        if broken {
            self.dead.store(true, Ordering::Release);
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if (broken || n >= FAILURES_BEFORE_HEALING) && !self.healing.swap(true, Ordering::AcqRel) {
            // Calls wait for the first attempt from now on.
            self.attempting.store(true, Ordering::Release);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(heal(Arc::downgrade(self)));
                }
                Err(_) => {
                    self.attempting.store(false, Ordering::Release);
                    self.healing.store(false, Ordering::Release);
                }
            }
        }
    }

    fn still_failing(&self) -> bool {
        self.dead.load(Ordering::Acquire)
            || self.failures.load(Ordering::Relaxed) >= FAILURES_BEFORE_HEALING
    }

    /// An attempt ended: waiting calls go on.
    fn attempt_ended(&self) {
        self.attempting.store(false, Ordering::Release);
        self.attempts.send_modify(|n| *n += 1);
    }

    fn since_replaced(&self) -> Option<Duration> {
        let last = match self.last_replaced.lock() {
            Ok(last) => *last,
            Err(poisoned) => *poisoned.into_inner(),
        };
        last.map(|at| at.elapsed())
    }

    /// A fresh connection whose `PING` succeeded, within [`ATTEMPT_TIMEOUT`].
    async fn fresh(&self) -> RedisResult<C> {
        let attempt = async {
            let mut conn = (self.connect)().await?;
            ping(&mut conn).await?;
            Ok(conn)
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "a fresh connection did not answer PING in time",
            ))),
        }
    }

    /// One attempt: a fresh connection, and whether the current one still
    /// answers `PING` (a broken one is not asked). `Ok(None)`: it does, keep
    /// it.
    async fn attempt(&self) -> RedisResult<Option<C>> {
        let started = Instant::now();
        let (_, mut current) = self.current();
        let dead = self.dead.load(Ordering::Acquire);
        let current_answers = async { !dead && ping(&mut current).await.is_ok() };
        tokio::pin!(current_answers);
        let fresh = self.fresh();
        tokio::pin!(fresh);
        let fresh = tokio::select! {
            fresh = &mut fresh => fresh?,
            answers = &mut current_answers => {
                if answers {
                    return Ok(None);
                }
                return fresh.await.map(Some);
            }
        };
        // The current connection gets as long as the fresh one took (a
        // Redis that was paused answers both at once), and at least
        // CURRENT_PROBE_TIMEOUT.
        let until =
            (started + CURRENT_PROBE_TIMEOUT).max(Instant::now() + Duration::from_millis(50));
        let answers = tokio::time::timeout_at(until.into(), current_answers).await == Ok(true);
        Ok((!answers).then_some(fresh))
    }

    fn replace(&self, conn: C) {
        // Only the one healing task replaces: no other writer to race.
        let generation = self.generation() + 1;
        self.current.store(Arc::new(Current { generation, conn }));
        self.failures.store(0, Ordering::Relaxed);
        self.dead.store(false, Ordering::Release);
        match self.last_replaced.lock() {
            Ok(mut last) => *last = Some(Instant::now()),
            Err(poisoned) => *poisoned.into_inner() = Some(Instant::now()),
        }
        self.replacements.fetch_add(1, Ordering::Relaxed);
    }
}

/// The background attempt: until the current connection answers again or
/// a fresh one replaced it; ends when the last clone is dropped.
async fn heal<C>(inner: Weak<Inner<C>>)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if let Some(wait) = strong
            .since_replaced()
            .and_then(|since| MIN_GAP.checked_sub(since))
        {
            // Calls do not wait through the gap.
            strong.attempt_ended();
            drop(strong);
            tokio::time::sleep(wait).await;
            continue;
        }
        if !strong.still_failing() {
            strong.attempt_ended();
            strong.healing.store(false, Ordering::Release);
            return;
        }
        strong.attempting.store(true, Ordering::Release);
        let attempt = strong.attempt().await;
        match attempt {
            Ok(None) => {
                // The connection answers: what failed was not it.
                strong.failures.store(0, Ordering::Relaxed);
                strong.attempt_ended();
                strong.healing.store(false, Ordering::Release);
                tracing::debug!("redis calls failing, but the connection answers PING: kept");
                return;
            }
            Ok(Some(conn)) => {
                strong.replace(conn);
                if let Some(told) = strong.on_replaced.get() {
                    told();
                }
                strong.attempt_ended();
                strong.healing.store(false, Ordering::Release);
                tracing::warn!(
                    replacements = strong.replacements.load(Ordering::Relaxed),
                    "redis calls kept failing while a fresh connection answers PING: connection replaced"
                );
                return;
            }
            Err(err) => {
                strong.attempt_ended();
                tracing::debug!(error = %err, "redis connection failing; a fresh one failed too");
            }
        }
        drop(strong);
        tokio::time::sleep(backoff.next()).await;
    }
}

impl<C> ConnectionLike for HealingConnection<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (mut conn, outcome) = self.begin().await;
            let result = conn.req_packed_command(cmd).await;
            outcome.end(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (mut conn, outcome) = self.begin().await;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            outcome.end(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}
