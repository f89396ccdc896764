//! [`InvalidationWorker`]: its settings, its counters and its handle. The
//! run loop is in `run`, the Redis commands it sends in `ops`.

mod control;
mod node;
mod ops;
mod run;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use redis::Client;
use redis::aio::ConnectionLike;
use tokio::sync::watch;

use super::InvalidationQueue;
#[cfg(doc)]
use crate::handle::FenceHandle;
use control::{Control, Counters};
pub use control::{WorkerHandle, WorkerStats};

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
///   been idle for [`claim_idle`](Self::claim_idle) (3 s by default). A
///   live worker resets the idle time of the messages it holds every third
///   of that time (a heartbeat), so a long invalidation (a prefix walk over
///   many keys) keeps its claim and nobody starts it a second time.
/// - A failed attempt is retried after an exponential backoff with jitter
///   ([`backoff`](Self::backoff)), by whichever worker claims it first,
///   while other messages go on. After [`max_attempts`](Self::max_attempts)
///   attempts (a message that can't be decoded counts as failing) it moves
///   to the dead-letter stream with the last error. A failure because the
///   data's Redis is unavailable (unreachable, timing out, breaker open,
///   failing over) uses up no attempt: it is retried until Redis is back.
/// - Reads block on a connection of the worker's own, opened from the
///   `redis::Client`, with a response timeout above the block time; it is
///   reopened with backoff when it fails. On a Redis Cluster it goes to the
///   primary that owns the queue's slot (the client lends only its
///   settings: user, password, TLS), follows `MOVED`, and looks the owner
///   up again after a failure, so it follows a failover.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
///
/// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), Box<dyn std::error::Error>> {
/// let worker = queue
///     .worker(redis::Client::open("redis://127.0.0.1/")?)
///     .group("invalidators")
///     .block(Duration::from_secs(5))
///     .claim_idle(Duration::from_secs(5))
///     .concurrency(4)
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
pub struct InvalidationWorker<C = redis::aio::ConnectionManager> {
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
    concurrency: usize,
    dead_letter_limit: usize,
    control: Arc<Control>,
    /// Reads go to the master this connection follows (Sentinel).
    #[cfg(feature = "sentinel")]
    sentinel: Option<crate::sentinel::SentinelConnection>,
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
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<C> InvalidationWorker<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(super) fn new(queue: InvalidationQueue<C>, client: Client) -> Self {
        crate::metrics::describe(crate::stats::FIELD_DOCS);
        crate::metrics::register_queue(queue.handle.namespace());
        let (shutdown, _) = watch::channel(false);
        let group = queue.group.to_string();
        Self {
            queue,
            client,
            consumer: default_consumer(),
            group,
            block: Duration::from_secs(5),
            claim_idle: DEFAULT_CLAIM_IDLE,
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            batch: 16,
            concurrency: DEFAULT_CONCURRENCY,
            dead_letter_limit: 10_000,
            control: Arc::new(Control {
                counters: Counters::default(),
                shutdown,
                running: AtomicBool::new(false),
            }),
            #[cfg(feature = "sentinel")]
            sentinel: None,
        }
    }

    /// A worker whose reads go to the master `conn` follows.
    #[cfg(feature = "sentinel")]
    pub(super) fn following(
        queue: InvalidationQueue<C>,
        conn: &crate::sentinel::SentinelConnection,
    ) -> Self {
        let mut worker = Self::new(queue, conn.master_client());
        worker.sentinel = Some(conn.clone());
        worker
    }

    /// The consumer name, unique per worker (default
    /// `<hostname>-<pid>-<random>`). A worker restarted under the same name
    /// picks up the messages its previous run left pending.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.consumer("web-1");
    /// # }
    /// ```
    #[must_use]
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// The consumer group (default: the queue's
    /// [`group`](super::InvalidationQueue::group), `cachefence`). Workers of
    /// one group share the work.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
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
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.block(std::time::Duration::from_secs(2));
    /// # }
    /// ```
    #[must_use]
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block.max(Duration::from_millis(1));
        self
    }

    /// How long a message must have been idle in another worker's hands
    /// before this one takes it over (default 3 s). It bounds how long the
    /// messages of a worker that died wait: they are taken over within
    /// about 4/3 of it (a worker looks for them every third of it). A live
    /// worker refreshes its messages every third of it, so it never loses
    /// one to a slow invalidation; only a worker stalled for longer than
    /// this (a paused process, a Redis unreachable for that long) may have
    /// a message applied a second time, which is harmless. Give every
    /// worker of a group the same value.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
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
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.max_attempts(10);
    /// # }
    /// ```
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The retry backoff: after the `n`th failed attempt the message waits
    /// about `base * 2^(n-1)`, at most `cap`, with jitter (default 500 ms
    /// and 30 s: with the default 5 attempts, a message is given up on
    /// about 4 to 8 s after its first failure).
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
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
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.batch(64);
    /// # }
    /// ```
    #[must_use]
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How many messages of a batch are applied at the same time (default
    /// 8, at least 1). Invalidations are independent and idempotent, so
    /// their order does not matter; this bounds the load one worker puts on
    /// Redis (each may be a prefix or tag walk) and the messages in hand at
    /// shutdown.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let worker = worker.concurrency(1); // one at a time
    /// # }
    /// ```
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The dead-letter stream is trimmed to about this many entries, oldest
    /// first (default 10 000).
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
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
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// println!("worker {}", worker.consumer_name());
    /// # }
    /// ```
    pub fn consumer_name(&self) -> &str {
        &self.consumer
    }

    /// A handle to stop the worker and read its counters once it runs.
    ///
    /// ```no_run
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
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
    /// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// assert_eq!(worker.stats().applied, 0);
    /// # }
    /// ```
    pub fn stats(&self) -> WorkerStats {
        self.control.counters.snapshot()
    }
}

/// The default [`InvalidationWorker::claim_idle`]: a crashed worker's
/// messages are taken over within about 4 s.
const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(3);
/// The default [`InvalidationWorker::concurrency`].
const DEFAULT_CONCURRENCY: usize = 8;

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
