//! A worker's counters, and the [`WorkerHandle`] that reads them and
//! stops the worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::watch;

#[cfg(doc)]
use super::InvalidationWorker;

/// Counters of an [`InvalidationWorker`], from [`WorkerHandle::stats`].
///
/// ```no_run
/// # fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
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
    /// Of the claimed messages, those of workers that died or stopped
    /// without finishing them.
    pub reclaimed: u64,
    /// Heartbeats: refreshes of the claim on the messages in hand.
    pub refreshes: u64,
    /// Messages in hand that another worker took over (this worker was
    /// stalled for longer than the claim idle time); both may apply them.
    pub lost_claims: u64,
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
pub(super) struct Counters {
    pub(super) applied: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) claimed: AtomicU64,
    pub(super) reclaimed: AtomicU64,
    pub(super) refreshes: AtomicU64,
    pub(super) lost_claims: AtomicU64,
    pub(super) released: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) redis_errors: AtomicU64,
    pub(super) connects: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerStats {
            applied: get(&self.applied),
            retries: get(&self.retries),
            dead_lettered: get(&self.dead_lettered),
            claimed: get(&self.claimed),
            reclaimed: get(&self.reclaimed),
            refreshes: get(&self.refreshes),
            lost_claims: get(&self.lost_claims),
            released: get(&self.released),
            duplicates: get(&self.duplicates),
            redis_errors: get(&self.redis_errors),
            connects: get(&self.connects),
        }
    }
}

#[derive(Debug)]
pub(super) struct Control {
    pub(super) counters: Counters,
    pub(super) shutdown: watch::Sender<bool>,
    pub(super) running: AtomicBool,
}

/// Stops an [`InvalidationWorker`] and reads its counters while it runs.
/// Cheap to clone.
///
/// ```no_run
/// # async fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) -> Result<(), tokio::task::JoinError> {
/// let control = worker.handle();
/// let task = tokio::spawn(worker.run());
/// println!("{:?}", control.stats());
/// control.shutdown();
/// task.await?; // the messages in hand were finished or released
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    pub(super) control: Arc<Control>,
}

impl WorkerHandle {
    /// Asks the worker to stop: it finishes the messages it is applying,
    /// hands the rest of its batch back (claimable at once by other
    /// workers), ends a blocking read early and returns from
    /// [`run`](InvalidationWorker::run).
    ///
    /// ```no_run
    /// # fn doc(control: cachefence::queue::WorkerHandle) {
    /// control.shutdown();
    /// # }
    /// ```
    pub fn shutdown(&self) {
        self.control.shutdown.send_replace(true);
    }

    /// A snapshot of the worker's counters.
    ///
    /// ```no_run
    /// # fn doc(control: cachefence::queue::WorkerHandle) {
    /// let applied = control.stats().applied;
    /// # }
    /// ```
    pub fn stats(&self) -> WorkerStats {
        self.control.counters.snapshot()
    }

    /// Whether the worker's [`run`](InvalidationWorker::run) is in progress.
    ///
    /// ```no_run
    /// # fn doc(control: cachefence::queue::WorkerHandle) {
    /// if !control.is_running() { eprintln!("worker stopped"); }
    /// # }
    /// ```
    pub fn is_running(&self) -> bool {
        self.control.running.load(Ordering::Acquire)
    }
}
