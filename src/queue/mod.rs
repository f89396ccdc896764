//! The durable invalidation queue: [`InvalidationQueue`] appends
//! invalidations to a Redis Stream, [`InvalidationWorker`]s apply them.
//!
//! # Redis layout
//!
//! For a namespace `ns` (escaped as entry keys are), under one hash tag so
//! that a script may touch them all on a Redis Cluster:
//!
//! - `ns|#queue:{q}`: the stream; each entry has one field, `inv`, holding
//!   [`Invalidation::encode`]. Workers read it with a consumer group.
//! - `ns|#queue:{q}:dead`: the dead-letter stream: the fields of the original
//!   entry plus `error`, `attempts`, `source_id` and `consumer`.
//! - `ns|#queue:{q}:attempts`: a hash counting attempts per entry id (and the
//!   last error), with a TTL.
//! - `ns|#queue:{q}:stats`: a hash of counters kept by the scripts
//!   (`applied`, `retried`, `dead_lettered`, `reclaimed`, `replayed`), read
//!   by [`InvalidationQueue::stats`].
//!
//! An entry is deleted from the stream (`XDEL`) in the same script that
//! acknowledges it, so the stream holds exactly the work not yet done and
//! never grows beyond it. A failed attempt leaves the entry pending and sets
//! its idle time so that it becomes claimable (`XAUTOCLAIM`) when its
//! backoff has passed; a crashed worker's entries become claimable after
//! the claim idle time (3 s by default), because a live worker resets the
//! idle time of the entries it holds every third of it (its heartbeat).
//! Retries and crash recovery are the same mechanism, and every worker
//! takes part in both.

mod admin;
mod call;
mod reply;
mod scripts;
mod worker;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Client, Value};

use crate::error::{FenceError, timed};
use crate::handle::{FenceHandle, Invalidation};
use crate::key::namespace_prefix;

pub use admin::{ConsumerStats, QueueStats};
use call::{call, retry};
pub use reply::DeadLetter;
use reply::parse_entries;
use scripts::Scripts;
pub use worker::{InvalidationWorker, WorkerHandle, WorkerStats};

/// The stream field holding the encoded invalidation.
const FIELD: &str = "inv";
/// Entries appended per pipeline by [`InvalidationQueue::enqueue_all`].
const ENQUEUE_CHUNK: usize = 500;
/// The consumer group of workers and of [`InvalidationQueue::stats`]
/// unless set otherwise.
const DEFAULT_GROUP: &str = "cachefence";

#[derive(Debug)]
struct Keys {
    stream: String,
    dead: String,
    attempts: String,
    stats: String,
}

/// A durable queue of [`Invalidation`]s in a Redis Stream, applied by
/// [`InvalidationWorker`]s.
///
/// [`enqueue`](Self::enqueue) returns once Redis has appended the
/// invalidation; a worker in any process applies it later, at least once,
/// retrying failures and moving what keeps failing to a dead-letter stream.
/// Made by [`FenceHandle::queue`]; cheap to clone. The queue is as durable
/// as the Redis holding it: run it with persistence (AOF) and without an
/// eviction policy that could evict the stream.
///
/// # Example
///
/// ```no_run
/// use cachefence::{FenceLayer, Invalidation};
///
/// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let conn = client.get_connection_manager().await?;
/// let handle = FenceLayer::new(conn).namespace("shop:").handle();
/// let queue = handle.queue();
/// queue.enqueue(&Invalidation::path("/products/42")).await?;
///
/// // In this process or any other:
/// let worker = queue.worker(client);
/// let control = worker.handle();
/// let task = tokio::spawn(worker.run());
/// // ... at shutdown:
/// control.shutdown();
/// task.await?;
/// # Ok(()) }
/// ```
pub struct InvalidationQueue<C = redis::aio::ConnectionManager> {
    conn: C,
    handle: FenceHandle<C>,
    keys: Arc<Keys>,
    scripts: Arc<Scripts>,
    timeout: Duration,
    retry_budget: Duration,
    group: Arc<str>,
}

impl<C: Clone> Clone for InvalidationQueue<C> {
    fn clone(&self) -> Self {
        Self {
            conn: self.conn.clone(),
            handle: self.handle.clone(),
            keys: self.keys.clone(),
            scripts: self.scripts.clone(),
            timeout: self.timeout,
            retry_budget: self.retry_budget,
            group: self.group.clone(),
        }
    }
}

impl<C> fmt::Debug for InvalidationQueue<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidationQueue")
            .field("stream", &self.keys.stream)
            .field("group", &self.group)
            .field("timeout", &self.timeout)
            .field("retry_budget", &self.retry_budget)
            .finish_non_exhaustive()
    }
}

/// The queue of a handle's namespace (here, so that `queue → handle` is
/// the only edge between the two modules).
impl<C> FenceHandle<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The durable invalidation queue of this handle's namespace: a Redis
    /// Stream that [`InvalidationWorker`](crate::queue::InvalidationWorker)s apply
    /// with this handle. Its commands (none of them blocks) go over the
    /// layer's connection.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// use cachefence::Invalidation;
    /// handle.queue().enqueue(&Invalidation::path("/products/42")).await?;
    /// # Ok(()) }
    /// ```
    pub fn queue(&self) -> InvalidationQueue<C> {
        self.queue_with(self.connection())
    }

    /// [`queue`](Self::queue) over another connection.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle, client: redis::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// // The queue's commands on a connection of their own.
    /// let queue = handle.queue_with(client.get_connection_manager().await?);
    /// queue.enqueue(&cachefence::Invalidation::tag("product:42")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn queue_with(&self, conn: C) -> InvalidationQueue<C> {
        InvalidationQueue::new(self.clone(), conn)
    }
}

impl<C> InvalidationQueue<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(handle: FenceHandle<C>, conn: C) -> Self {
        let base = format!("{}#queue:{{q}}", namespace_prefix(handle.namespace()));
        let keys = Keys {
            dead: format!("{base}:dead"),
            attempts: format!("{base}:attempts"),
            stats: format!("{base}:stats"),
            stream: base,
        };
        Self {
            conn,
            handle,
            keys: Arc::new(keys),
            scripts: Arc::new(Scripts::new()),
            timeout: Duration::from_secs(1),
            retry_budget: Duration::from_secs(5),
            group: Arc::from(DEFAULT_GROUP),
        }
    }

    /// How long one Redis call of the queue and its workers may take before
    /// it counts as failed (1 s by default). Invalidations themselves run
    /// under the layer's [`redis_timeout`](crate::FenceCacheBuilder::redis_timeout).
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) {
    /// let queue = queue.redis_timeout(std::time::Duration::from_secs(2));
    /// # }
    /// ```
    #[must_use]
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long [`enqueue`](Self::enqueue) and
    /// [`enqueue_all`](Self::enqueue_all) keep retrying a transient Redis
    /// failure (a dropped or refused connection, a timeout, `LOADING`,
    /// `READONLY` / `MASTERDOWN` / `TRYAGAIN` / `CLUSTERDOWN` during a
    /// failover) before they return it: 5 s by default, enough to ride out
    /// a Redis restart. Tries are spaced by an exponential backoff with
    /// jitter from 25 ms up to 500 ms; no pause ends after the budget, so a
    /// call returns within the budget plus one
    /// [`redis_timeout`](Self::redis_timeout). Zero disables retries.
    ///
    /// A retried append may have reached Redis the first time (its reply
    /// was lost): the invalidation is then queued twice, which is harmless.
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) {
    /// let queue = queue.retry_budget(std::time::Duration::from_secs(15));
    /// # }
    /// ```
    #[must_use]
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// The consumer group that [`stats`](Self::stats) reports on and that
    /// the workers made by [`worker`](Self::worker) join (default
    /// `cachefence`).
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) {
    /// let queue = queue.group("invalidators");
    /// # }
    /// ```
    #[must_use]
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = Arc::from(name.into());
        self
    }

    /// Appends an invalidation to the stream and returns its entry id once
    /// Redis has it. Transient Redis failures are retried within the
    /// [`retry_budget`](Self::retry_budget); an error means the
    /// invalidation may not have been queued.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// use cachefence::Invalidation;
    /// let id = queue.enqueue(&Invalidation::tag("product:42")).await?;
    /// println!("queued as {id}");
    /// # Ok(()) }
    /// ```
    pub async fn enqueue(&self, invalidation: &Invalidation) -> Result<String, FenceError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.keys.stream)
            .arg("*")
            .arg(FIELD)
            .arg(invalidation.encode());
        let (result, tries) = retry(self.retry_budget, || {
            call::<String, _>(&self.conn, self.timeout, &cmd)
        })
        .await;
        match result {
            Ok(id) => {
                tracing::debug!(stream = %self.keys.stream, id, tries, invalidation = %invalidation.encode(), "invalidation queued");
                Ok(id)
            }
            Err(err) => {
                tracing::warn!(stream = %self.keys.stream, error = %err, tries, invalidation = %invalidation.encode(), "queuing an invalidation failed");
                Err(err)
            }
        }
    }

    /// Appends several invalidations, pipelined, and returns their entry
    /// ids in order. Transient failures are retried as by
    /// [`enqueue`](Self::enqueue), per pipeline of 500. On an error some of
    /// them may have been appended.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// use cachefence::Invalidation;
    /// let batch = [Invalidation::path("/a"), Invalidation::path("/b")];
    /// let ids = queue.enqueue_all(&batch).await?;
    /// assert_eq!(ids.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_all<'a>(
        &self,
        invalidations: impl IntoIterator<Item = &'a Invalidation>,
    ) -> Result<Vec<String>, FenceError> {
        let all: Vec<&Invalidation> = invalidations.into_iter().collect();
        let mut ids = Vec::with_capacity(all.len());
        for chunk in all.chunks(ENQUEUE_CHUNK) {
            let mut pipe = redis::pipe();
            for inv in chunk {
                pipe.cmd("XADD")
                    .arg(&self.keys.stream)
                    .arg("*")
                    .arg(FIELD)
                    .arg(inv.encode());
            }
            let (result, _) = retry(self.retry_budget, || {
                let mut conn = self.conn.clone();
                let pipe = &pipe;
                async move { timed(self.timeout, pipe.query_async::<Vec<String>>(&mut conn)).await }
            })
            .await;
            ids.extend(result?);
        }
        Ok(ids)
    }

    /// How many invalidations are waiting or being applied: the length of
    /// the stream (done entries are deleted from it).
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// println!("backlog: {}", queue.backlog().await?);
    /// # Ok(()) }
    /// ```
    pub async fn backlog(&self) -> Result<u64, FenceError> {
        let mut cmd = redis::cmd("XLEN");
        cmd.arg(&self.keys.stream);
        call(&self.conn, self.timeout, &cmd).await
    }

    /// How many dead letters the dead-letter stream holds.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// if queue.dead_letter_count().await? > 0 {
    ///     eprintln!("some invalidations could not be applied");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn dead_letter_count(&self) -> Result<u64, FenceError> {
        let mut cmd = redis::cmd("XLEN");
        cmd.arg(&self.keys.dead);
        call(&self.conn, self.timeout, &cmd).await
    }

    /// Up to `limit` dead letters, oldest first.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// for dead in queue.dead_letters(10).await? {
    ///     eprintln!("{:?} failed {} times: {}", dead.payload, dead.attempts, dead.error);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, FenceError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&self.keys.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1));
        let value: Value = call(&self.conn, self.timeout, &cmd).await?;
        Ok(parse_entries(value)
            .into_iter()
            .map(DeadLetter::from_entry)
            .collect())
    }

    /// The key of the stream.
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) {
    /// assert!(queue.stream_key().ends_with("#queue:{q}"));
    /// # }
    /// ```
    pub fn stream_key(&self) -> &str {
        &self.keys.stream
    }

    /// The key of the dead-letter stream.
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) {
    /// assert!(queue.dead_letter_key().ends_with("#queue:{q}:dead"));
    /// # }
    /// ```
    pub fn dead_letter_key(&self) -> &str {
        &self.keys.dead
    }

    /// A worker applying this queue's invalidations with this queue's
    /// handle. `client` opens the worker's own connection for its blocking
    /// reads (never the shared one, which a blocking read would stall). On
    /// a Redis Cluster that connection goes to the primary owning the
    /// queue's slot, whichever node `client` names.
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>, client: redis::Client) {
    /// let worker = queue.worker(client).max_attempts(8);
    /// tokio::spawn(worker.run());
    /// # }
    /// ```
    pub fn worker(&self, client: Client) -> InvalidationWorker<C> {
        InvalidationWorker::new(self.clone(), client)
    }

    /// A worker whose blocking reads go to the master `conn` follows
    /// (feature `sentinel`): after a failover it reads from the new master
    /// (it looks the master up again whenever its connection fails, and
    /// the queue's own commands go through the queue's connection, which
    /// should be `conn` or a clone of it).
    ///
    /// ```no_run
    /// # async fn doc(conn: cachefence::sentinel::SentinelConnection) {
    /// let cache = cachefence::FenceCache::new(conn.clone());
    /// let queue = cache.handle().queue();
    /// tokio::spawn(queue.sentinel_worker(&conn).run());
    /// # }
    /// ```
    #[cfg(feature = "sentinel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
    pub fn sentinel_worker(
        &self,
        conn: &crate::sentinel::SentinelConnection,
    ) -> InvalidationWorker<C> {
        InvalidationWorker::following(self.clone(), conn)
    }
}
