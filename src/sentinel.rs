//! [`SentinelConnection`]: a connection to the master a Redis Sentinel
//! names, which moves to the new master after a failover (feature
//! `sentinel`).
//!
//! redis-rs has no `ConnectionManager` for Sentinel: a connection made
//! once from `SentinelClient` keeps talking to the old master. This one
//! holds a multiplexed connection to the current master and a watcher task
//! that asks the Sentinels which master to use (every second, and at once
//! after a command failed because the connection broke or the node is no
//! longer a master, or after 3 commands in a row were dropped unanswered by
//! the caller's timeout: a half-open connection), and reconnects when the
//! answer changes.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::{Mutex, Notify, watch};

/// How often the watcher asks the Sentinels for the master when nothing
/// failed.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest time between two checks (a burst of failures asks once).
const MIN_GAP: Duration = Duration::from_millis(100);
/// The bound of one Sentinel query or one connection attempt.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Calls in a row dropped unanswered (the cache's own timeout) before the
/// connection counts as broken: a half-open connection never fails by
/// itself.
const UNANSWERED_BEFORE_RECONNECT: u32 = 3;

/// An async connection to the master of a Sentinel-managed Redis that
/// follows failovers: use it as the cache's connection
/// ([`FenceCache::builder`](crate::FenceCache::builder)), and give it to
/// [`FenceCacheBuilder::sentinel_wake_ups`](crate::FenceCacheBuilder::sentinel_wake_ups)
/// and [`InvalidationQueue::sentinel_worker`](crate::queue::InvalidationQueue::sentinel_worker)
/// so that wake-ups and the queue worker follow the master too
/// (feature `sentinel`).
///
/// A watcher task asks the Sentinels for the master every second, and at
/// once when a command fails because the connection broke or the node
/// answers `READONLY` (it was demoted), or when 3 commands in a row were
/// dropped unanswered (the cache's timeout: a half-open connection); when the master changed (or the
/// connection broke), it connects to the one they name and every clone
/// sends its next commands there. Commands sent while the master is down
/// fail (the cache then fails open, as with any Redis outage); nothing is
/// retried here. The watcher ends when the last clone is dropped.
///
/// Cloning is cheap: every clone shares the connection and the watcher.
///
/// # Example
///
/// ```no_run
/// use cachefence::FenceCache;
/// use cachefence::sentinel::SentinelConnection;
/// use redis::sentinel::{SentinelClient, SentinelServerType};
///
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let sentinels = vec!["redis://10.0.0.1:26379/", "redis://10.0.0.2:26379/", "redis://10.0.0.3:26379/"];
/// let client = SentinelClient::build(sentinels, "mymaster".to_owned(), None, SentinelServerType::Master)?;
/// let conn = SentinelConnection::connect(client).await?;
/// let cache = FenceCache::builder(conn.clone())
///     .namespace("shop:")
///     .sentinel_wake_ups(&conn)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SentinelConnection {
    inner: Arc<Inner>,
    db: i64,
}

struct Inner {
    sentinel: Mutex<SentinelClient>,
    current: RwLock<Current>,
    config: AsyncConnectionConfig,
    /// Asks the watcher to check now.
    check: Notify,
    /// How many times the connection moved (to a new master, or to the
    /// same one after it broke).
    moved: watch::Sender<u64>,
    /// Calls in a row dropped before they were answered.
    unanswered: AtomicU32,
}

#[derive(Clone)]
struct Current {
    client: Client,
    conn: MultiplexedConnection,
    /// A command failed in a way that needs a new connection.
    broken: bool,
}

impl fmt::Debug for SentinelConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelConnection")
            .field("master", &self.master_client().get_connection_info().addr())
            .field("moves", &self.moves())
            .finish_non_exhaustive()
    }
}

impl SentinelConnection {
    /// Asks the Sentinels of `sentinel` (a `SentinelClient` built for
    /// `SentinelServerType::Master`) for the master, connects to it, and
    /// starts the watcher on the current Tokio runtime.
    ///
    /// ```no_run
    /// # async fn doc() -> redis::RedisResult<()> {
    /// use redis::sentinel::{SentinelClient, SentinelServerType};
    /// let client = SentinelClient::build(vec!["redis://127.0.0.1:26379/"], "mymaster".to_owned(), None, SentinelServerType::Master)?;
    /// let conn = cachefence::sentinel::SentinelConnection::connect(client).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(sentinel: SentinelClient) -> redis::RedisResult<Self> {
        Self::connect_with_config(sentinel, AsyncConnectionConfig::new()).await
    }

    /// [`connect`](Self::connect) with the settings of the master
    /// connections (connection and response timeouts).
    ///
    /// ```no_run
    /// # async fn doc(client: redis::sentinel::SentinelClient) -> redis::RedisResult<()> {
    /// use std::time::Duration;
    /// let config = redis::AsyncConnectionConfig::new()
    ///     .set_connection_timeout(Some(Duration::from_millis(500)));
    /// let conn = cachefence::sentinel::SentinelConnection::connect_with_config(client, config).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with_config(
        mut sentinel: SentinelClient,
        config: AsyncConnectionConfig,
    ) -> redis::RedisResult<Self> {
        let client = sentinel.async_get_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let db = conn.get_db();
        let inner = Arc::new(Inner {
            sentinel: Mutex::new(sentinel),
            current: RwLock::new(Current {
                client,
                conn,
                broken: false,
            }),
            config,
            check: Notify::new(),
            moved: watch::Sender::new(0),
            unanswered: AtomicU32::new(0),
        });
        tokio::spawn(watch_master(Arc::downgrade(&inner)));
        Ok(Self { inner, db })
    }

    /// A client for the current master (with the settings the
    /// `SentinelClient` gives its nodes: user, password, TLS, database).
    ///
    /// ```no_run
    /// # fn doc(conn: cachefence::sentinel::SentinelConnection) {
    /// println!("master: {}", conn.master_client().get_connection_info().addr());
    /// # }
    /// ```
    pub fn master_client(&self) -> Client {
        self.inner.current().client
    }

    /// How many times the connection moved: to a new master after a
    /// failover, or to the same address after its connection broke.
    ///
    /// ```no_run
    /// # fn doc(conn: cachefence::sentinel::SentinelConnection) {
    /// assert_eq!(conn.moves(), 0);
    /// # }
    /// ```
    pub fn moves(&self) -> u64 {
        *self.inner.moved.borrow()
    }

    /// Told each time the connection moves.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.moved.subscribe()
    }

    /// Asks the watcher to check the master now.
    pub(crate) fn nudge(&self) {
        self.inner.check.notify_one();
    }

    /// The current master's connection (only it is cloned: this runs for
    /// every command).
    fn conn(&self) -> MultiplexedConnection {
        self.inner.with_current(|current| current.conn.clone())
    }

    /// Has the watcher look for the master at once if `result` says the
    /// connection or the node can't serve it.
    fn after<T>(&self, result: &redis::RedisResult<T>) {
        if let Err(err) = result
            && needs_new_master(err)
        {
            self.inner.failed();
        }
    }
}

/// Counts a call dropped before it was answered (the cache's timeout ran
/// out): after [`UNANSWERED_BEFORE_RECONNECT`] in a row the connection is
/// taken as broken (half-open) and the watcher reconnects.
struct Answered<'a> {
    inner: &'a Inner,
    done: bool,
}

impl Answered<'_> {
    fn done(mut self) {
        self.done = true;
        if self.inner.unanswered.load(Ordering::Relaxed) != 0 {
            self.inner.unanswered.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        if !self.done
            && self.inner.unanswered.fetch_add(1, Ordering::Relaxed) + 1
                >= UNANSWERED_BEFORE_RECONNECT
        {
            self.inner.unanswered.store(0, Ordering::Relaxed);
            self.inner.failed();
        }
    }
}

/// Whether `err` means the connection or the node can't serve the master
/// any more: the connection broke or was refused, or the node is a
/// replica now (`READONLY`, `MASTERDOWN`).
fn needs_new_master(err: &RedisError) -> bool {
    err.is_unrecoverable_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_io_error()
        || matches!(err.code(), Some("READONLY" | "MASTERDOWN"))
        || err.to_string().contains("READONLY")
}

impl Inner {
    fn current(&self) -> Current {
        self.with_current(Current::clone)
    }

    /// Reads the current master under the lock.
    fn with_current<T>(&self, read: impl FnOnce(&Current) -> T) -> T {
        match self.current.read() {
            Ok(current) => read(&current),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }

    fn failed(&self) {
        match self.current.write() {
            Ok(mut current) => current.broken = true,
            Err(poisoned) => poisoned.into_inner().broken = true,
        }
        self.check.notify_one();
    }

    /// Asks the Sentinels for the master; reconnects if it changed or the
    /// connection broke.
    async fn check(&self) -> redis::RedisResult<()> {
        let client = {
            let mut sentinel = self.sentinel.lock().await;
            bounded(sentinel.async_get_client()).await?
        };
        let current = self.current();
        let same =
            client.get_connection_info().addr() == current.client.get_connection_info().addr();
        if same && !current.broken {
            return Ok(());
        }
        let conn =
            bounded(client.get_multiplexed_async_connection_with_config(&self.config)).await?;
        let address = client.get_connection_info().addr().to_string();
        {
            let mut slot = match self.current.write() {
                Ok(slot) => slot,
                Err(poisoned) => poisoned.into_inner(),
            };
            *slot = Current {
                client,
                conn,
                broken: false,
            };
        }
        self.moved.send_modify(|n| *n += 1);
        if same {
            tracing::info!(master = %address, "sentinel connection: reconnected to the master");
        } else {
            tracing::warn!(master = %address, "sentinel connection: following the new master");
        }
        Ok(())
    }
}

/// The watcher: checks every [`CHECK_INTERVAL`], or when nudged, at most
/// once per [`MIN_GAP`]; ends when the last connection is dropped.
async fn watch_master(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if let Err(err) = strong.check().await {
            tracing::debug!(error = %err, "sentinel connection: asking for the master failed");
            // Keep looking soon while the master is unknown or unreachable.
            strong.check.notify_one();
        }
        tokio::time::sleep(MIN_GAP).await;
        let _ = tokio::time::timeout(CHECK_INTERVAL, strong.check.notified()).await;
    }
}

async fn bounded<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "sentinel connection: call timed out",
        ))),
    }
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut conn = self.conn();
            let answered = Answered {
                inner: &self.inner,
                done: false,
            };
            let result = conn.req_packed_command(cmd).await;
            answered.done();
            self.after(&result);
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
            let mut conn = self.conn();
            let answered = Answered {
                inner: &self.inner,
                done: false,
            };
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            answered.done();
            self.after(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}
