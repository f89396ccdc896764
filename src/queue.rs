//! The durable invalidation queue: [`InvalidationQueue`] appends
//! invalidations to a Redis Stream, [`InvalidationWorker`]s apply them.
//!
//! # Redis layout
//!
//! For a namespace `ns` (escaped as entry keys are), under one hash tag so
//! that a script may touch them all on a Redis Cluster:
//!
//! - `ns#queue:{q}`: the stream; each entry has one field, `inv`, holding
//!   [`Invalidation::encode`]. Workers read it with a consumer group.
//! - `ns#queue:{q}:dead`: the dead-letter stream: the fields of the original
//!   entry plus `error`, `attempts`, `source_id` and `consumer`.
//! - `ns#queue:{q}:attempts`: a hash counting attempts per entry id (and the
//!   last error), with a TTL.
//!
//! An entry is deleted from the stream (`XDEL`) in the same script that
//! acknowledges it, so the stream holds exactly the work not yet done and
//! never grows beyond it. A failed attempt leaves the entry pending and sets
//! its idle time so that it becomes claimable (`XAUTOCLAIM`) when its
//! backoff has passed; a crashed worker's entries become claimable after
//! the claim idle time. Retries and crash recovery are the same mechanism,
//! and every worker takes part in both.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, FromRedisValue, Script, Value};
use tokio::sync::watch;

use crate::error::FenceError;
use crate::handle::{FenceHandle, Invalidation};
use crate::key::escape;

/// The stream field holding the encoded invalidation.
const FIELD: &str = "inv";
/// How long the attempts hash lives after its last write.
const ATTEMPTS_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Backoff between failed Redis calls of the worker itself (reading,
/// reconnecting), not of invalidations.
const REDIS_BACKOFF_BASE: Duration = Duration::from_millis(100);
const REDIS_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Entries appended per pipeline by [`InvalidationQueue::enqueue_all`].
const ENQUEUE_CHUNK: usize = 500;
/// The longest error text kept with a dead letter.
const ERROR_MAX: usize = 1000;

/// Records the start of an attempt. KEYS: attempts hash. ARGV: id, ttl ms.
/// Returns `{attempt number, last error or ''}`.
const BEGIN: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local err = redis.call('HGET', KEYS[1], ARGV[1] .. ':err')
return {n, err or ''}
";

/// Done: acknowledge, delete from the stream, forget the attempts.
/// KEYS: stream, attempts. ARGV: group, id. Returns XACK's count (0 when
/// another worker had already acknowledged it).
const ACK: &str = r"
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2], ARGV[2] .. ':err')
return n
";

/// A failed attempt: keep the error, and set the entry's idle time so that
/// it becomes claimable once its backoff has passed.
/// KEYS: stream, attempts. ARGV: group, consumer, id, error, idle ms, ttl ms.
const FAIL: &str = r"
redis.call('HSET', KEYS[2], ARGV[3] .. ':err', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[5], 'JUSTID')
";

/// Moves an entry to the dead-letter stream, atomically: XADD to dead,
/// XACK, XDEL. KEYS: stream, dead, attempts. ARGV: group, id, error,
/// attempts, dead-letter max length, consumer. Returns 1 when moved, 0 when
/// the entry was no longer pending (another worker finished it).
const DEAD: &str = r"
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2], ARGV[2] .. ':err')
if acked == 0 then return 0 end
local args = {'MAXLEN', '~', ARGV[5], '*'}
if e[1] and type(e[1][2]) == 'table' then
  for _, v in ipairs(e[1][2]) do table.insert(args, v) end
end
for _, v in ipairs({'error', ARGV[3], 'attempts', ARGV[4], 'source_id', ARGV[2], 'consumer', ARGV[6]}) do
  table.insert(args, v)
end
redis.call('XADD', KEYS[2], unpack(args))
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
";

/// Removes a stopping worker's consumer from the group, only when nothing
/// is pending for it. KEYS: stream. ARGV: group, consumer.
const RETIRE: &str = r"
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
";

#[derive(Debug)]
struct Keys {
    stream: String,
    dead: String,
    attempts: String,
}

#[derive(Debug)]
struct Scripts {
    begin: Script,
    ack: Script,
    fail: Script,
    dead: Script,
    retire: Script,
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
pub struct InvalidationQueue<C> {
    conn: C,
    handle: FenceHandle<C>,
    keys: Arc<Keys>,
    scripts: Arc<Scripts>,
    timeout: Duration,
}

impl<C: Clone> Clone for InvalidationQueue<C> {
    fn clone(&self) -> Self {
        Self {
            conn: self.conn.clone(),
            handle: self.handle.clone(),
            keys: self.keys.clone(),
            scripts: self.scripts.clone(),
            timeout: self.timeout,
        }
    }
}

impl<C> fmt::Debug for InvalidationQueue<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidationQueue")
            .field("stream", &self.keys.stream)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<C> InvalidationQueue<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(handle: FenceHandle<C>, conn: C) -> Self {
        let base = format!("{}#queue:{{q}}", escape(handle.namespace().as_bytes()));
        let keys = Keys {
            dead: format!("{base}:dead"),
            attempts: format!("{base}:attempts"),
            stream: base,
        };
        Self {
            conn,
            handle,
            keys: Arc::new(keys),
            scripts: Arc::new(Scripts {
                begin: Script::new(BEGIN),
                ack: Script::new(ACK),
                fail: Script::new(FAIL),
                dead: Script::new(DEAD),
                retire: Script::new(RETIRE),
            }),
            timeout: Duration::from_secs(1),
        }
    }

    /// How long one Redis call of the queue and its workers may take before
    /// it counts as failed (1 s by default). Invalidations themselves run
    /// under the layer's [`redis_timeout`](crate::FenceLayer::redis_timeout).
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) {
    /// let queue = queue.redis_timeout(std::time::Duration::from_secs(2));
    /// # }
    /// ```
    #[must_use]
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Appends an invalidation to the stream and returns its entry id once
    /// Redis has it.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
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
        let id: String = call(&self.conn, self.timeout, &cmd).await?;
        tracing::debug!(stream = %self.keys.stream, id, invalidation = %invalidation.encode(), "invalidation queued");
        Ok(id)
    }

    /// Appends several invalidations, pipelined, and returns their entry
    /// ids in order. On an error some of them may have been appended.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
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
            let mut conn = self.conn.clone();
            let chunk_ids: Vec<String> = timed(self.timeout, pipe.query_async(&mut conn)).await?;
            ids.extend(chunk_ids);
        }
        Ok(ids)
    }

    /// How many invalidations are waiting or being applied: the length of
    /// the stream (done entries are deleted from it).
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
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
    /// # async fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
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
    /// # async fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
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
    /// # fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) {
    /// assert!(queue.stream_key().ends_with("#queue:{q}"));
    /// # }
    /// ```
    pub fn stream_key(&self) -> &str {
        &self.keys.stream
    }

    /// The key of the dead-letter stream.
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) {
    /// assert!(queue.dead_letter_key().ends_with("#queue:{q}:dead"));
    /// # }
    /// ```
    pub fn dead_letter_key(&self) -> &str {
        &self.keys.dead
    }

    /// A worker applying this queue's invalidations with this queue's
    /// handle. `client` opens the worker's own connection for its blocking
    /// reads (never the shared one, which a blocking read would stall).
    ///
    /// ```no_run
    /// # fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>, client: redis::Client) {
    /// let worker = queue.worker(client).max_attempts(8);
    /// tokio::spawn(worker.run());
    /// # }
    /// ```
    pub fn worker(&self, client: Client) -> InvalidationWorker<C> {
        InvalidationWorker::new(self.clone(), client)
    }
}

/// A message that could not be applied, as stored in the dead-letter
/// stream.
///
/// ```no_run
/// # async fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
/// use cachefence::Invalidation;
/// for dead in queue.dead_letters(100).await? {
///     let inv = dead.payload.as_deref().and_then(Invalidation::decode);
///     println!("{} ({:?}): {}", dead.source_id, inv, dead.error);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The id of the dead letter in the dead-letter stream.
    pub id: String,
    /// The id the message had in the queue's stream.
    pub source_id: String,
    /// The `inv` field of the message (the encoded invalidation), if it had
    /// one.
    pub payload: Option<String>,
    /// The error of the last attempt.
    pub error: String,
    /// How many times it was attempted.
    pub attempts: u64,
    /// The worker that gave up on it.
    pub consumer: String,
}

impl DeadLetter {
    fn from_entry(entry: Entry) -> Self {
        // The dead-letter fields come last: take the last occurrence.
        let last = |name: &str| {
            entry
                .fields
                .iter()
                .rev()
                .find(|(k, _)| k.as_slice() == name.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        Self {
            source_id: last("source_id").unwrap_or_default(),
            payload: entry.payload().map(str::to_owned),
            error: last("error").unwrap_or_default(),
            attempts: last("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
            consumer: last("consumer").unwrap_or_default(),
            id: entry.id,
        }
    }
}

/// Counters of an [`InvalidationWorker`], from [`WorkerHandle::stats`].
///
/// ```no_run
/// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
/// let stats = worker.stats();
/// println!("applied {}, retried {}, dead {}", stats.applied, stats.retries, stats.dead_lettered);
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Invalidations applied and acknowledged.
    pub applied: u64,
    /// Failed attempts that were scheduled for another try.
    pub retries: u64,
    /// Messages moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Messages taken over from the pending list: retries that came due,
    /// and messages of workers that stopped without finishing them.
    pub claimed: u64,
    /// Messages handed back unstarted at shutdown.
    pub released: u64,
    /// Messages this worker applied that another worker had acknowledged
    /// first (applied twice, which is harmless).
    pub duplicates: u64,
    /// Failed Redis calls of the worker itself (reading, acknowledging),
    /// not counting failed invalidations.
    pub redis_errors: u64,
    /// Connections opened for blocking reads (1 when nothing failed).
    pub connects: u64,
}

#[derive(Debug, Default)]
struct Counters {
    applied: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    claimed: AtomicU64,
    released: AtomicU64,
    duplicates: AtomicU64,
    redis_errors: AtomicU64,
    connects: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerStats {
            applied: get(&self.applied),
            retries: get(&self.retries),
            dead_lettered: get(&self.dead_lettered),
            claimed: get(&self.claimed),
            released: get(&self.released),
            duplicates: get(&self.duplicates),
            redis_errors: get(&self.redis_errors),
            connects: get(&self.connects),
        }
    }
}

#[derive(Debug)]
struct Control {
    counters: Counters,
    shutdown: watch::Sender<bool>,
    running: AtomicBool,
}

/// Stops an [`InvalidationWorker`] and reads its counters while it runs.
/// Cheap to clone.
///
/// ```no_run
/// # async fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) -> Result<(), tokio::task::JoinError> {
/// let control = worker.handle();
/// let task = tokio::spawn(worker.run());
/// println!("{:?}", control.stats());
/// control.shutdown();
/// task.await?; // the message in hand was finished or released
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    control: Arc<Control>,
}

impl WorkerHandle {
    /// Asks the worker to stop: it finishes the message it is applying,
    /// hands the rest of its batch back (claimable at once by other
    /// workers), ends a blocking read early and returns from
    /// [`run`](InvalidationWorker::run).
    ///
    /// ```no_run
    /// # fn doc(control: cachefence::WorkerHandle) {
    /// control.shutdown();
    /// # }
    /// ```
    pub fn shutdown(&self) {
        self.control.shutdown.send_replace(true);
    }

    /// A snapshot of the worker's counters.
    ///
    /// ```no_run
    /// # fn doc(control: cachefence::WorkerHandle) {
    /// let applied = control.stats().applied;
    /// # }
    /// ```
    pub fn stats(&self) -> WorkerStats {
        self.control.counters.snapshot()
    }

    /// Whether the worker's [`run`](InvalidationWorker::run) is in progress.
    ///
    /// ```no_run
    /// # fn doc(control: cachefence::WorkerHandle) {
    /// if !control.is_running() { eprintln!("worker stopped"); }
    /// # }
    /// ```
    pub fn is_running(&self) -> bool {
        self.control.running.load(Ordering::Acquire)
    }
}

/// Applies the invalidations of an [`InvalidationQueue`]: run any number of
/// them, in any processes.
///
/// Made by [`InvalidationQueue::worker`] and configured with its builder
/// methods; [`run`](Self::run) consumes it (`tokio::spawn(worker.run())`),
/// so take a [`handle`](Self::handle) first to stop it and read its
/// counters.
///
/// - Delivery is at least once: an invalidation is acknowledged only after
///   [`FenceHandle::apply`] succeeded, and applying one twice is harmless.
/// - A message whose worker died is claimed by another worker once it has
///   been idle for [`claim_idle`](Self::claim_idle); set it above the
///   longest invalidation you expect, or slow ones are applied twice.
/// - A failed attempt is retried after an exponential backoff with jitter
///   ([`backoff`](Self::backoff)), by whichever worker claims it first,
///   while other messages go on. After [`max_attempts`](Self::max_attempts)
///   attempts (a message that can't be decoded counts as failing) it moves
///   to the dead-letter stream with the last error.
/// - Reads block on a connection of the worker's own, opened from the
///   `redis::Client`, with a response timeout above the block time; it is
///   reopened with backoff when it fails.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
///
/// # async fn doc(queue: cachefence::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), Box<dyn std::error::Error>> {
/// let worker = queue
///     .worker(redis::Client::open("redis://127.0.0.1/")?)
///     .group("invalidators")
///     .block(Duration::from_secs(5))
///     .claim_idle(Duration::from_secs(60))
///     .max_attempts(5)
///     .backoff(Duration::from_millis(500), Duration::from_secs(30))
///     .batch(16);
/// let control = worker.handle();
/// let task = tokio::spawn(worker.run());
/// tokio::signal::ctrl_c().await?;
/// control.shutdown();
/// task.await?;
/// # Ok(()) }
/// ```
pub struct InvalidationWorker<C> {
    queue: InvalidationQueue<C>,
    client: Client,
    consumer: String,
    group: String,
    block: Duration,
    claim_idle: Duration,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_cap: Duration,
    batch: usize,
    dead_letter_limit: usize,
    control: Arc<Control>,
}

impl<C> fmt::Debug for InvalidationWorker<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvalidationWorker")
            .field("stream", &self.queue.keys.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("block", &self.block)
            .field("claim_idle", &self.claim_idle)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// A stream entry: its id and its fields.
#[derive(Debug)]
struct Entry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    fn payload(&self) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_slice() == FIELD.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn invalidation(&self) -> Result<Invalidation, String> {
        let Some(text) = self.payload() else {
            return Err(format!("undecodable queue entry: no UTF-8 `{FIELD}` field"));
        };
        Invalidation::decode(text).ok_or_else(|| {
            let shown: String = text.chars().take(200).collect();
            format!("undecodable queue entry: {shown:?} is not an invalidation")
        })
    }
}

/// How a blocking read ended.
enum Read {
    Entries(Vec<Entry>),
    Stopped,
}

/// The mutable state of a running worker.
struct Run {
    conn: Option<(MultiplexedConnection, Option<i64>)>,
    group_ready: bool,
    cursor: String,
    next_claim: Instant,
    redis_failures: u32,
}

impl<C> InvalidationWorker<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn new(queue: InvalidationQueue<C>, client: Client) -> Self {
        let (shutdown, _) = watch::channel(false);
        Self {
            queue,
            client,
            consumer: default_consumer(),
            group: "cachefence".to_owned(),
            block: Duration::from_secs(5),
            claim_idle: Duration::from_secs(30),
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            batch: 16,
            dead_letter_limit: 10_000,
            control: Arc::new(Control {
                counters: Counters::default(),
                shutdown,
                running: AtomicBool::new(false),
            }),
        }
    }

    /// The consumer name, unique per worker (default
    /// `<hostname>-<pid>-<random>`). A worker restarted under the same name
    /// picks up the messages its previous run left pending.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.consumer("web-1");
    /// # }
    /// ```
    #[must_use]
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// The consumer group (default `cachefence`). Workers of one group share
    /// the work; each group applies every invalidation.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.group("invalidators");
    /// # }
    /// ```
    #[must_use]
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = name.into();
        self
    }

    /// How long one read waits for new messages (default 5 s). Shutdown does
    /// not wait for it.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.block(std::time::Duration::from_secs(2));
    /// # }
    /// ```
    #[must_use]
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block.max(Duration::from_millis(1));
        self
    }

    /// How long a message must have been idle in another worker's hands
    /// before this one takes it over (default 30 s). It also bounds the
    /// retry backoff.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.claim_idle(std::time::Duration::from_secs(60));
    /// # }
    /// ```
    #[must_use]
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle.max(Duration::from_millis(1));
        self
    }

    /// Attempts before a message moves to the dead-letter stream (default
    /// 5, at least 1).
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.max_attempts(10);
    /// # }
    /// ```
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The retry backoff: after the `n`th failed attempt the message waits
    /// about `base * 2^(n-1)`, at most `cap` and at most the claim idle time,
    /// with jitter (default 500 ms and 30 s).
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// use std::time::Duration;
    /// let worker = worker.backoff(Duration::from_millis(100), Duration::from_secs(10));
    /// # }
    /// ```
    #[must_use]
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.backoff_base = base.max(Duration::from_millis(1));
        self.backoff_cap = cap.max(self.backoff_base);
        self
    }

    /// Messages read at once (default 16, at least 1).
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.batch(64);
    /// # }
    /// ```
    #[must_use]
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The dead-letter stream is trimmed to about this many entries, oldest
    /// first (default 10 000).
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.dead_letter_limit(1000);
    /// # }
    /// ```
    #[must_use]
    pub fn dead_letter_limit(mut self, limit: usize) -> Self {
        self.dead_letter_limit = limit.max(1);
        self
    }

    /// This worker's consumer name.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// println!("worker {}", worker.consumer_name());
    /// # }
    /// ```
    pub fn consumer_name(&self) -> &str {
        &self.consumer
    }

    /// A handle to stop the worker and read its counters once it runs.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let control = worker.handle();
    /// tokio::spawn(worker.run());
    /// control.shutdown();
    /// # }
    /// ```
    pub fn handle(&self) -> WorkerHandle {
        WorkerHandle {
            control: self.control.clone(),
        }
    }

    /// A snapshot of the counters (also on [`WorkerHandle::stats`]).
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// assert_eq!(worker.stats().applied, 0);
    /// # }
    /// ```
    pub fn stats(&self) -> WorkerStats {
        self.control.counters.snapshot()
    }

    /// Applies invalidations until [`WorkerHandle::shutdown`] is called.
    /// Redis failures never end it: it logs them and tries again with
    /// backoff.
    ///
    /// ```no_run
    /// # async fn doc(worker: cachefence::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let task = tokio::spawn(worker.run());
    /// # }
    /// ```
    pub async fn run(self) {
        let control = &self.control;
        control.running.store(true, Ordering::Release);
        tracing::info!(stream = %self.queue.keys.stream, group = %self.group, consumer = %self.consumer, "invalidation worker started");
        let mut run = Run {
            conn: None,
            group_ready: false,
            cursor: "0-0".to_owned(),
            next_claim: Instant::now(),
            redis_failures: 0,
        };
        while !self.stopping() {
            self.step(&mut run).await;
        }
        match self.retire().await {
            Ok(true) => {
                tracing::debug!(consumer = %self.consumer, "consumer removed from the group")
            }
            Ok(false) => {}
            Err(err) => tracing::debug!(error = %err, "removing the consumer failed"),
        }
        let stats = self.stats();
        tracing::info!(consumer = %self.consumer, applied = stats.applied, retries = stats.retries, dead_lettered = stats.dead_lettered, released = stats.released, "invalidation worker stopped");
        control.running.store(false, Ordering::Release);
    }

    /// One turn of the loop: claim what is due, else read new messages.
    async fn step(&self, run: &mut Run) {
        if !run.group_ready {
            match self.ensure_group().await {
                Ok(()) => run.group_ready = true,
                Err(err) => {
                    return self
                        .redis_failed(run, "creating the consumer group", &err)
                        .await;
                }
            }
        }
        if Instant::now() >= run.next_claim {
            match self.autoclaim(&run.cursor).await {
                Ok((next, entries)) => {
                    run.redis_failures = 0;
                    let done = next == "0-0";
                    run.cursor = next;
                    if done {
                        run.next_claim = Instant::now() + self.block.min(self.claim_idle);
                    }
                    if !entries.is_empty() {
                        Counters::add(&self.control.counters.claimed, entries.len() as u64);
                        tracing::debug!(count = entries.len(), "claimed pending invalidations");
                        self.process(run, entries).await;
                    }
                    if !done {
                        return;
                    }
                }
                Err(err) => {
                    if is_code(&err, "NOGROUP") {
                        run.group_ready = false;
                    }
                    return self
                        .redis_failed(run, "claiming pending messages", &err)
                        .await;
                }
            }
        }
        let wait = run
            .next_claim
            .saturating_duration_since(Instant::now())
            .min(self.block)
            .max(Duration::from_millis(1));
        match self.read(run, wait).await {
            Ok(Read::Entries(entries)) => {
                run.redis_failures = 0;
                self.process(run, entries).await;
            }
            Ok(Read::Stopped) => {}
            Err(err) => {
                if is_code(&err, "NOGROUP") {
                    run.group_ready = false;
                } else {
                    // Reopen the connection: it may be broken, or hold a
                    // reply nobody will read.
                    run.conn = None;
                }
                self.redis_failed(run, "reading the stream", &err).await;
            }
        }
    }

    async fn redis_failed(&self, run: &mut Run, what: &str, err: &FenceError) {
        Counters::add(&self.control.counters.redis_errors, 1);
        run.redis_failures = run.redis_failures.saturating_add(1);
        let delay = backoff(REDIS_BACKOFF_BASE, REDIS_BACKOFF_CAP, run.redis_failures);
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "invalidation worker: {what} failed");
        self.sleep(delay).await;
    }

    /// Applies a batch one message at a time; at shutdown, releases the
    /// messages not started.
    async fn process(&self, run: &mut Run, entries: Vec<Entry>) {
        let mut rest = entries.into_iter();
        while let Some(entry) = rest.next() {
            if self.stopping() {
                let ids: Vec<String> = std::iter::once(entry).chain(rest).map(|e| e.id).collect();
                self.release(&ids).await;
                return;
            }
            self.one(run, entry).await;
        }
    }

    /// One attempt at one message.
    async fn one(&self, run: &mut Run, entry: Entry) {
        let counters = &self.control.counters;
        let (attempt, last_error) = match self.begin(&entry.id).await {
            Ok(begun) => begun,
            Err(err) => {
                // It stays pending and is claimed again after the idle time.
                Counters::add(&counters.redis_errors, 1);
                tracing::warn!(error = %err, id = %entry.id, "invalidation worker: recording an attempt failed");
                return;
            }
        };
        if attempt > u64::from(self.max_attempts) {
            let error = if last_error.is_empty() {
                format!(
                    "no attempt finished in {} tries (the workers stopped while applying it)",
                    attempt - 1
                )
            } else {
                last_error
            };
            return self.dead_letter(&entry, &error, attempt - 1).await;
        }
        let result = match entry.invalidation() {
            Ok(inv) => self
                .queue
                .handle
                .apply(&inv)
                .await
                .map_err(|e| e.to_string()),
            Err(err) => Err(err),
        };
        match result {
            Ok(removed) => match self.ack(&entry.id).await {
                Ok(acked) => {
                    Counters::add(&counters.applied, 1);
                    if !acked {
                        Counters::add(&counters.duplicates, 1);
                    }
                    tracing::debug!(id = %entry.id, invalidation = entry.payload().unwrap_or(""), removed, attempt, "invalidation applied");
                }
                Err(err) => {
                    // Applied but not acknowledged: it will be applied again.
                    Counters::add(&counters.redis_errors, 1);
                    tracing::warn!(error = %err, id = %entry.id, "invalidation worker: acknowledging failed");
                }
            },
            Err(error) => {
                let mut error = error;
                truncate(&mut error, ERROR_MAX);
                if attempt >= u64::from(self.max_attempts) {
                    return self.dead_letter(&entry, &error, attempt).await;
                }
                let delay = backoff(self.backoff_base, self.backoff_cap, attempt_u32(attempt))
                    .min(self.claim_idle);
                match self.fail(&entry.id, &error, delay).await {
                    Ok(()) => {
                        Counters::add(&counters.retries, 1);
                        run.next_claim = run.next_claim.min(Instant::now() + delay);
                        tracing::warn!(id = %entry.id, invalidation = entry.payload().unwrap_or(""), error = %error, attempt, max_attempts = self.max_attempts, retry_in_ms = delay.as_millis() as u64, "invalidation failed; will retry");
                    }
                    Err(err) => {
                        Counters::add(&counters.redis_errors, 1);
                        tracing::warn!(error = %err, id = %entry.id, "invalidation worker: recording a failure failed");
                    }
                }
            }
        }
    }

    async fn dead_letter(&self, entry: &Entry, error: &str, attempts: u64) {
        let keys = &self.queue.keys;
        let mut inv = self.queue.scripts.dead.key(&keys.stream);
        inv.key(&keys.dead)
            .key(&keys.attempts)
            .arg(&self.group)
            .arg(&entry.id)
            .arg(error)
            .arg(attempts)
            .arg(self.dead_letter_limit)
            .arg(&self.consumer);
        let mut conn = self.queue.conn.clone();
        match timed::<i64>(self.queue.timeout, inv.invoke_async(&mut conn)).await {
            Ok(1) => {
                Counters::add(&self.control.counters.dead_lettered, 1);
                tracing::warn!(id = %entry.id, invalidation = entry.payload().unwrap_or(""), error, attempts, dead_letters = %keys.dead, "invalidation moved to the dead-letter stream");
            }
            Ok(_) => {
                Counters::add(&self.control.counters.duplicates, 1);
                tracing::debug!(id = %entry.id, "already finished by another worker");
            }
            Err(err) => {
                Counters::add(&self.control.counters.redis_errors, 1);
                tracing::warn!(error = %err, id = %entry.id, "invalidation worker: moving to the dead-letter stream failed");
            }
        }
    }

    /// Hands messages back unstarted: pending, with an idle time that lets
    /// any worker claim them at once.
    async fn release(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.queue.keys.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(ids)
            .arg("IDLE")
            .arg(duration_ms(self.claim_idle))
            .arg("JUSTID");
        match call::<Value, _>(&self.queue.conn, self.queue.timeout, &cmd).await {
            Ok(_) => {
                Counters::add(&self.control.counters.released, ids.len() as u64);
                tracing::info!(
                    count = ids.len(),
                    "released unstarted invalidations at shutdown"
                );
            }
            Err(err) => {
                // Still pending: claimed by another worker after the idle time.
                Counters::add(&self.control.counters.redis_errors, 1);
                tracing::warn!(error = %err, count = ids.len(), "releasing invalidations failed; they will be claimed after the idle time");
            }
        }
    }

    async fn ensure_group(&self) -> Result<(), FenceError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.queue.keys.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM");
        match call::<Value, _>(&self.queue.conn, self.queue.timeout, &cmd).await {
            Ok(_) => Ok(()),
            Err(err) if is_code(&err, "BUSYGROUP") => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn autoclaim(&self, cursor: &str) -> Result<(String, Vec<Entry>), FenceError> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.queue.keys.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(duration_ms(self.claim_idle))
            .arg(cursor)
            .arg("COUNT")
            .arg(self.batch);
        let value: Value = call(&self.queue.conn, self.queue.timeout, &cmd).await?;
        let Value::Array(mut parts) = value else {
            return Err(FenceError::invalid_input("unexpected XAUTOCLAIM reply"));
        };
        if parts.len() < 2 {
            return Err(FenceError::invalid_input("unexpected XAUTOCLAIM reply"));
        }
        let entries = parts.swap_remove(1);
        let next = text(&parts[0]).unwrap_or_else(|| "0-0".to_owned());
        Ok((next, parse_entries(entries)))
    }

    /// One blocking read on the worker's own connection. Shutdown ends it
    /// early with `CLIENT UNBLOCK`, so no message is delivered to a read
    /// nobody waits for.
    async fn read(&self, run: &mut Run, wait: Duration) -> Result<Read, FenceError> {
        let margin = self.queue.timeout.max(Duration::from_secs(1));
        if run.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(margin))
                .set_response_timeout(Some(self.block + margin));
            let mut conn = timed(
                margin + margin,
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await?;
            Counters::add(&self.control.counters.connects, 1);
            let id: Option<i64> = timed(
                margin,
                redis::cmd("CLIENT").arg("ID").query_async(&mut conn),
            )
            .await
            .ok();
            run.conn = Some((conn, id));
        }
        let Some((conn, client_id)) = run.conn.as_mut() else {
            return Ok(Read::Stopped);
        };
        let client_id = *client_id;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.batch)
            .arg("BLOCK")
            .arg(duration_ms(wait).max(1))
            .arg("STREAMS")
            .arg(&self.queue.keys.stream)
            .arg(">");
        let read = timed::<Value>(wait + margin, cmd.query_async(conn));
        tokio::pin!(read);
        let mut rx = self.control.shutdown.subscribe();
        let stopped = async move {
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let value = tokio::select! {
            value = &mut read => value?,
            () = stopped => {
                if let Some(id) = client_id {
                    let mut unblock = redis::cmd("CLIENT");
                    unblock.arg("UNBLOCK").arg(id);
                    if let Err(err) = call::<Value, _>(&self.queue.conn, self.queue.timeout, &unblock).await {
                        tracing::debug!(error = %err, "CLIENT UNBLOCK failed; waiting for the read to end");
                    }
                }
                match read.await {
                    Ok(value) => {
                        let ids: Vec<String> = parse_read(value).into_iter().map(|e| e.id).collect();
                        self.release(&ids).await;
                    }
                    Err(err) => tracing::debug!(error = %err, "the last read failed at shutdown"),
                }
                return Ok(Read::Stopped);
            }
        };
        Ok(Read::Entries(parse_read(value)))
    }

    async fn begin(&self, id: &str) -> Result<(u64, String), FenceError> {
        let mut inv = self.queue.scripts.begin.key(&self.queue.keys.attempts);
        inv.arg(id).arg(duration_ms(ATTEMPTS_TTL));
        let mut conn = self.queue.conn.clone();
        let (n, err): (i64, String) =
            timed(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        Ok((u64::try_from(n).unwrap_or(1).max(1), err))
    }

    async fn ack(&self, id: &str) -> Result<bool, FenceError> {
        let keys = &self.queue.keys;
        let mut inv = self.queue.scripts.ack.key(&keys.stream);
        inv.key(&keys.attempts).arg(&self.group).arg(id);
        let mut conn = self.queue.conn.clone();
        let n: i64 = timed(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(n > 0)
    }

    async fn fail(&self, id: &str, error: &str, delay: Duration) -> Result<(), FenceError> {
        let keys = &self.queue.keys;
        let idle = self.claim_idle.saturating_sub(delay);
        let mut inv = self.queue.scripts.fail.key(&keys.stream);
        inv.key(&keys.attempts)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(id)
            .arg(error)
            .arg(duration_ms(idle))
            .arg(duration_ms(ATTEMPTS_TTL));
        let mut conn = self.queue.conn.clone();
        timed::<Value>(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn retire(&self) -> Result<bool, FenceError> {
        let mut inv = self.queue.scripts.retire.key(&self.queue.keys.stream);
        inv.arg(&self.group).arg(&self.consumer);
        let mut conn = self.queue.conn.clone();
        let n: i64 = timed(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(n == 1)
    }

    fn stopping(&self) -> bool {
        *self.control.shutdown.borrow()
    }

    /// Sleeps, cut short by shutdown.
    async fn sleep(&self, duration: Duration) {
        let mut rx = self.control.shutdown.subscribe();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = rx.wait_for(|stop| *stop) => {}
        }
    }
}

/// Runs one command on `conn` under `timeout`.
async fn call<T, C>(conn: &C, timeout: Duration, cmd: &redis::Cmd) -> Result<T, FenceError>
where
    T: FromRedisValue,
    C: ConnectionLike + Clone + Send,
{
    let mut conn = conn.clone();
    timed(timeout, cmd.query_async(&mut conn)).await
}

async fn timed<T>(
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, FenceError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(FenceError::redis(err)),
        Err(_) => Err(FenceError::timeout()),
    }
}

fn is_code(err: &FenceError, code: &str) -> bool {
    use std::error::Error as _;
    err.source()
        .and_then(|s| s.downcast_ref::<redis::RedisError>())
        .is_some_and(|e| e.code() == Some(code))
}

/// Exponential backoff with jitter: `base * 2^(n-1)` capped, then a random
/// point in its upper half.
fn backoff(base: Duration, cap: Duration, n: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << n.saturating_sub(1).min(20))
        .min(cap);
    exp.mul_f64(0.5 + rand::random_range(0.0..0.5))
}

fn attempt_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn default_consumer() -> String {
    let from_file = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| from_file("/proc/sys/kernel/hostname").filter(|h| !h.is_empty()))
        .or_else(|| from_file("/etc/hostname").filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "host".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// The entries of an XRANGE / XAUTOCLAIM list: `[[id, [field, value, ...]], ...]`.
/// Entries deleted while pending (fields nil) come with no fields.
fn parse_entries(value: Value) -> Vec<Entry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else {
                return None;
            };
            let mut parts = parts.into_iter();
            let id = parts.next().as_ref().and_then(text)?;
            let fields = match parts.next() {
                Some(Value::Array(flat)) => {
                    let mut fields = Vec::with_capacity(flat.len() / 2);
                    let mut flat = flat.into_iter();
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        fields.push((bytes(k).unwrap_or_default(), bytes(v).unwrap_or_default()));
                    }
                    fields
                }
                Some(Value::Map(pairs)) => pairs
                    .into_iter()
                    .map(|(k, v)| (bytes(k).unwrap_or_default(), bytes(v).unwrap_or_default()))
                    .collect(),
                _ => Vec::new(),
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// The entries of an XREADGROUP reply for one stream: nil on timeout,
/// `[[stream, entries]]` in RESP2, `{stream: entries}` in RESP3.
fn parse_read(value: Value) -> Vec<Entry> {
    match value {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => parse_entries(pair.swap_remove(1)),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams
            .into_iter()
            .flat_map(|(_, entries)| parse_entries(entries))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        for n in 1..40 {
            let d = backoff(base, cap, n);
            let exp = base.saturating_mul(1 << (n - 1).min(20)).min(cap);
            assert!(d >= exp / 2 && d <= exp, "{n}: {d:?}");
        }
    }

    #[test]
    fn replies_parse_in_both_protocols() {
        let entry = |id: &str, f: &str, v: &str| {
            Value::Array(vec![
                Value::BulkString(id.into()),
                Value::Array(vec![
                    Value::BulkString(f.into()),
                    Value::BulkString(v.into()),
                ]),
            ])
        };
        let entries = Value::Array(vec![entry("1-0", "inv", "path:/a"), entry("2-0", "x", "y")]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            entries.clone(),
        ])]);
        let resp3 = Value::Map(vec![(Value::BulkString(b"s".to_vec()), entries)]);
        for reply in [resp2, resp3] {
            let got = parse_read(reply);
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].invalidation(), Ok(Invalidation::path("/a")));
            assert!(got[1].invalidation().is_err());
        }
        assert!(parse_read(Value::Nil).is_empty());
        // A deleted entry in a pending list has nil fields.
        let deleted = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"3-0".to_vec()),
            Value::Nil,
        ])]);
        let got = parse_entries(deleted);
        assert_eq!(got[0].id, "3-0");
        assert!(got[0].invalidation().is_err());
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let mut s = "é".repeat(600);
        truncate(&mut s, ERROR_MAX);
        assert!(s.len() <= ERROR_MAX);
    }
}
