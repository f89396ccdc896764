//! The run loop of an [`InvalidationWorker`]: claiming what is due,
//! reading new messages, applying them, retrying with backoff, moving what
//! keeps failing to the dead-letter stream, and stopping cleanly.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::Value;
use redis::aio::ConnectionLike;

use super::InvalidationWorker;
#[cfg(doc)]
use super::WorkerHandle;
use super::control::Counters;
use super::node;
use super::ops::{Read, ReadConn};
use crate::backoff::jittered;
use crate::entry::duration_ms;
use crate::error::FenceError;
use crate::error::timed;
use crate::queue::call::call;
use crate::queue::reply::Entry;

/// Backoff between failed Redis calls of the worker itself (reading,
/// reconnecting), not of invalidations.
const REDIS_BACKOFF_BASE: Duration = Duration::from_millis(100);
const REDIS_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The longest error text kept with a dead letter.
const ERROR_MAX: usize = 1000;

/// The mutable state of a running worker.
pub(super) struct Run {
    pub(super) conn: Option<ReadConn>,
    /// Where a `MOVED` sent the next read (Redis Cluster).
    pub(super) redirect: Option<(String, u16)>,
    group_ready: bool,
    cursor: String,
    next_claim: Instant,
    redis_failures: u32,
}

impl<C> InvalidationWorker<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Applies invalidations until [`WorkerHandle::shutdown`] is called.
    /// Redis failures never end it: it logs them and tries again with
    /// backoff.
    ///
    /// ```no_run
    /// # async fn doc(worker: cachefence::queue::InvalidationWorker<redis::aio::ConnectionManager>) {
    /// let task = tokio::spawn(worker.run());
    /// # }
    /// ```
    pub async fn run(self) {
        let control = &self.control;
        control.running.store(true, Ordering::Release);
        tracing::info!(stream = %self.queue.keys.stream, group = %self.group, consumer = %self.consumer, "invalidation worker started");
        let mut run = Run {
            conn: None,
            redirect: None,
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
                Ok((next, entries, reclaimed)) => {
                    run.redis_failures = 0;
                    let done = next == "0-0";
                    run.cursor = next;
                    if done {
                        run.next_claim = Instant::now() + self.beat();
                    }
                    if !entries.is_empty() {
                        let counters = &self.control.counters;
                        Counters::add(&counters.claimed, entries.len() as u64);
                        Counters::add(&counters.reclaimed, reclaimed);
                        if reclaimed > 0 {
                            tracing::info!(
                                count = reclaimed,
                                "reclaimed invalidations of a worker that died or stopped"
                            );
                        }
                        tracing::debug!(count = entries.len(), "claimed pending invalidations");
                        self.process(run, entries).await;
                    }
                    if !done {
                        return;
                    }
                }
                Err(err) => {
                    if err.redis_code() == Some("NOGROUP") {
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
                if err.redis_code() == Some("NOGROUP") {
                    run.group_ready = false;
                } else {
                    // Reopen the connection: it may be broken, or hold a
                    // reply nobody will read. On a cluster, at the node a
                    // MOVED names, else at the slot's owner looked up again
                    // (a failover).
                    run.conn = None;
                    run.redirect = err.moved_to().and_then(|a| node::parse_address(&a));
                    if run.redirect.is_some() && run.redis_failures == 0 {
                        // Follow at once, once; a redirection loop backs off.
                        run.redis_failures = 1;
                        tracing::info!(error = %err, "invalidation worker: the queue's slot moved; following it");
                        return;
                    }
                }
                self.redis_failed(run, "reading the stream", &err).await;
            }
        }
    }

    async fn redis_failed(&self, run: &mut Run, what: &str, err: &FenceError) {
        Counters::add(&self.control.counters.redis_errors, 1);
        run.redis_failures = run.redis_failures.saturating_add(1);
        let delay = jittered(REDIS_BACKOFF_BASE, REDIS_BACKOFF_CAP, run.redis_failures);
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "invalidation worker: {what} failed");
        self.sleep(delay).await;
    }

    /// How often a worker refreshes the messages it holds and looks for
    /// messages to take over: a third of the claim idle time.
    fn beat(&self) -> Duration {
        (self.claim_idle / 3).max(Duration::from_millis(1))
    }

    /// Applies a batch, up to [`concurrency`](Self::concurrency) messages
    /// at a time, while the heartbeat keeps the claim on the messages still
    /// held; at shutdown, finishes the messages started and releases the
    /// others.
    async fn process(&self, run: &mut Run, entries: Vec<Entry>) {
        let held = Mutex::new(entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
        let work = async {
            let mut waiting = entries.into_iter();
            let mut running = FuturesUnordered::new();
            let mut retry_at: Option<Instant> = None;
            loop {
                while running.len() < self.concurrency {
                    if self.stopping() {
                        let ids: Vec<String> = waiting.by_ref().map(|e| e.id).collect();
                        // No more heartbeats for them: released messages
                        // are claimable at once.
                        lock(&held).retain(|h| !ids.contains(h));
                        self.release(&ids).await;
                        break;
                    }
                    let Some(entry) = waiting.next() else { break };
                    let held = &held;
                    running.push(async move {
                        let id = entry.id.clone();
                        let retry = self.one(entry).await;
                        lock(held).retain(|h| *h != id);
                        retry
                    });
                }
                match running.next().await {
                    Some(Some(delay)) => {
                        let at = Instant::now() + delay;
                        retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
                    }
                    Some(None) => {}
                    None => break,
                }
            }
            retry_at
        };
        let retry_at = tokio::select! {
            retry_at = work => retry_at,
            () = self.heartbeat(&held) => None,
        };
        if let Some(at) = retry_at {
            run.next_claim = run.next_claim.min(at);
        }
    }

    /// Every [`beat`](Self::beat), resets the idle time of the held
    /// messages, so that no other worker takes them over while this one is
    /// alive. (A refresh that crosses a failed attempt's rescheduling may
    /// delay that retry to the claim idle time, which is harmless.) Never
    /// returns.
    async fn heartbeat(&self, held: &Mutex<Vec<String>>) {
        let counters = &self.control.counters;
        loop {
            tokio::time::sleep(self.beat()).await;
            let ids = lock(held).clone();
            if ids.is_empty() {
                continue;
            }
            match self.refresh(&ids).await {
                Ok(lost) => {
                    Counters::add(&counters.refreshes, 1);
                    let mut held = lock(held);
                    if !lost.is_empty() {
                        held.retain(|h| !lost.contains(h));
                        Counters::add(&counters.lost_claims, lost.len() as u64);
                        tracing::warn!(count = lost.len(), ids = ?lost, "invalidation worker: another worker took over messages in hand (this one was stalled longer than claim_idle); they may be applied twice");
                    }
                }
                Err(err) => {
                    Counters::add(&counters.redis_errors, 1);
                    tracing::warn!(error = %err, "invalidation worker: refreshing the claim on the messages in hand failed");
                }
            }
        }
    }

    /// One attempt at one message. Returns the retry delay when it failed
    /// and will be tried again.
    async fn one(&self, entry: Entry) -> Option<Duration> {
        let counters = &self.control.counters;
        let (attempt, last_error) = match self.begin(&entry.id).await {
            Ok(begun) => begun,
            Err(err) => {
                // It stays pending and is claimed again after the idle time.
                Counters::add(&counters.redis_errors, 1);
                tracing::warn!(error = %err, id = %entry.id, "invalidation worker: recording an attempt failed");
                return None;
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
            self.dead_letter(&entry, &error, attempt - 1).await;
            return None;
        }
        // A failure because the data's Redis is unavailable (down, failing
        // over, the breaker open) is not the message's fault: it doesn't
        // use up an attempt, so an outage longer than the retries never
        // sends invalidations to the dead letters.
        let result = match entry.invalidation() {
            Ok(inv) => self
                .queue
                .handle
                .apply(&inv)
                .await
                .map_err(|e| (!e.is_unavailable(), e.to_string())),
            Err(err) => Err((true, err)),
        };
        match result {
            Ok(removed) => match self.ack(&entry.id).await {
                Ok(acked) => {
                    Counters::add(&counters.applied, 1);
                    let queue = self.queue.handle.namespace();
                    crate::metrics::queue_event(queue, "applied");
                    if let Some(lag) = enqueued_ago(&entry.id) {
                        crate::metrics::queue_lag(queue, lag);
                    }
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
            Err((counted, error)) => {
                let mut error = error;
                truncate(&mut error, ERROR_MAX);
                if counted && attempt >= u64::from(self.max_attempts) {
                    self.dead_letter(&entry, &error, attempt).await;
                    return None;
                }
                let delay = jittered(self.backoff_base, self.backoff_cap, attempt_u32(attempt));
                match self.fail(&entry.id, &error, delay, counted).await {
                    Ok(()) => {
                        Counters::add(&counters.retries, 1);
                        crate::metrics::queue_event(self.queue.handle.namespace(), "retries");
                        tracing::warn!(id = %entry.id, invalidation = entry.payload().unwrap_or(""), error = %error, attempt, max_attempts = self.max_attempts, retry_in_ms = delay.as_millis() as u64, "invalidation failed; will retry");
                        return Some(delay);
                    }
                    Err(err) => {
                        Counters::add(&counters.redis_errors, 1);
                        tracing::warn!(error = %err, id = %entry.id, "invalidation worker: recording a failure failed");
                    }
                }
            }
        }
        None
    }

    async fn dead_letter(&self, entry: &Entry, error: &str, attempts: u64) {
        let keys = &self.queue.keys;
        let mut inv = self.queue.scripts.dead.key(&keys.stream);
        inv.key(&keys.dead)
            .key(&keys.attempts)
            .key(&keys.stats)
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
                crate::metrics::queue_event(self.queue.handle.namespace(), "dead_lettered");
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
    pub(super) async fn release(&self, ids: &[String]) {
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

    fn stopping(&self) -> bool {
        *self.control.shutdown.borrow()
    }

    /// Sleeps, cut short by shutdown.
    async fn sleep(&self, duration: Duration) {
        let mut rx = self.control.shutdown.subscribe();
        // Following a Sentinel: the master moving ends the wait.
        #[cfg(feature = "sentinel")]
        let mut moves = self.sentinel.as_ref().map(|conn| {
            conn.nudge();
            conn.subscribe()
        });
        #[cfg(not(feature = "sentinel"))]
        let mut moves: Option<tokio::sync::watch::Receiver<u64>> = None;
        let moved = async {
            if let Some(rx) = moves.as_mut()
                && rx.changed().await.is_ok()
            {
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = rx.wait_for(|stop| *stop) => {}
            () = moved => {}
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn attempt_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
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

/// How long ago the message `id` (`<ms>-<seq>`, Redis's clock) was added
/// to the stream, by this machine's clock; `None` for an id of another
/// shape.
fn enqueued_ago(id: &str) -> Option<Duration> {
    let (ms, _) = id.split_once('-')?;
    let ms: u64 = ms.parse().ok()?;
    Some(Duration::from_millis(
        crate::entry::now_ms().saturating_sub(ms),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let mut s = "é".repeat(600);
        truncate(&mut s, ERROR_MAX);
        assert!(s.len() <= ERROR_MAX);
    }
}
