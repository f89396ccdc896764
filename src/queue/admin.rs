//! What operators see and steer: [`InvalidationQueue::stats`] and the
//! replay and purge of dead letters.

use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionLike;

use super::InvalidationQueue;
use super::reply::text;
use crate::error::{FenceError, timed};

/// Dead letters moved per call by [`InvalidationQueue::replay_dead_letters`].
const REPLAY_CHUNK: usize = 500;

/// A snapshot of an [`InvalidationQueue`] and its consumer group, from
/// [`InvalidationQueue::stats`]. Gathered in one Redis call, from Redis,
/// so it covers the workers of every process.
///
/// What to alert on: [`oldest_age`](Self::oldest_age) above the drain time
/// you promise (the queue is falling behind, or no worker runs), and
/// [`dead_letters`](Self::dead_letters) growing (invalidations that were
/// given up on: their entries may be stale until they expire).
///
/// ```no_run
/// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
/// use std::time::Duration;
/// let stats = queue.stats().await?;
/// if stats.oldest_age.is_some_and(|age| age > Duration::from_secs(30)) {
///     eprintln!("invalidation queue lagging: {} waiting", stats.depth);
/// }
/// for c in &stats.consumers {
///     println!("{}: {} in hand, seen {:?} ago", c.name, c.pending, c.idle);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Invalidations not applied yet: waiting, or in a worker's hands
    /// (applied entries are deleted from the stream).
    pub depth: u64,
    /// Of those, the entries delivered to a worker and not yet
    /// acknowledged: in hand, waiting for a retry, or held by a worker that
    /// died until another reclaims them.
    pub pending: u64,
    /// How long the oldest unapplied invalidation has been queued (from its
    /// entry id, by the Redis clock); `None` when the queue is empty.
    pub oldest_age: Option<Duration>,
    /// The consumers of the group, one per worker that ever read (a
    /// stopped worker with nothing pending removes itself).
    pub consumers: Vec<ConsumerStats>,
    /// Whether the consumer group exists (a worker creates it when it
    /// starts); without it nothing is being applied.
    pub group_exists: bool,
    /// Entries in the dead-letter stream.
    pub dead_letters: u64,
    /// Invalidations applied and acknowledged, since the queue's counters
    /// began (a duplicate delivery is not counted twice).
    pub applied: u64,
    /// Failed attempts scheduled for another try.
    pub retried: u64,
    /// Invalidations moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Entries taken over from a worker that died or stopped with them in
    /// hand.
    pub reclaimed: u64,
    /// Dead letters put back on the queue.
    pub replayed: u64,
}

/// One consumer (worker) of the group, in [`QueueStats::consumers`].
///
/// ```no_run
/// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
/// use std::time::Duration;
/// for c in queue.stats().await?.consumers {
///     if c.pending > 0 && c.idle > Duration::from_secs(10) {
///         eprintln!("{} looks dead; its {} entries will be reclaimed", c.name, c.pending);
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// The consumer name ([`InvalidationWorker::consumer`](super::InvalidationWorker::consumer)).
    pub name: String,
    /// Entries delivered to it and not yet acknowledged.
    pub pending: u64,
    /// Time since it was last handed a message or refreshed its claim on
    /// the messages in hand (Redis's consumer idle time). It grows while a
    /// worker has nothing to do; but a live worker holding messages keeps
    /// it below its claim idle time, so `pending > 0` with an `idle` well
    /// above it means a worker that died (its messages are being taken
    /// over) or is stalled.
    pub idle: Duration,
}

impl<C> InvalidationQueue<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Depth, lag, consumers and counters of the queue, for its
    /// [`group`](Self::group). See [`QueueStats`] for what to alert on.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// let s = queue.stats().await?;
    /// println!("depth {} oldest {:?} dead {}", s.depth, s.oldest_age, s.dead_letters);
    /// # Ok(()) }
    /// ```
    pub async fn stats(&self) -> Result<QueueStats, FenceError> {
        let keys = &self.keys;
        let mut inv = self.scripts.stats.key(&keys.stream);
        inv.key(&keys.dead).key(&keys.stats).arg(&*self.group);
        let mut conn = self.conn.clone();
        let value: Value = timed(self.timeout, inv.invoke_async(&mut conn)).await?;
        parse_stats(value).ok_or_else(|| FenceError::invalid_input("unexpected queue stats reply"))
    }

    /// Puts dead letters back on the queue, oldest first, at most `limit`
    /// of them (`usize::MAX` for all), and returns the new entry ids. It
    /// moves them 500 per Redis call. Each goes back as a new
    /// entry with its original fields and a fresh attempt count, and leaves
    /// the dead-letter stream in the same step (a letter is never replayed
    /// twice, even by two admins at once).
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// // After fixing what made them fail:
    /// let ids = queue.replay_dead_letters(usize::MAX).await?;
    /// println!("{} invalidations queued again", ids.len());
    /// # Ok(()) }
    /// ```
    pub async fn replay_dead_letters(&self, limit: usize) -> Result<Vec<String>, FenceError> {
        let mut ids = Vec::new();
        while ids.len() < limit {
            let chunk = (limit - ids.len()).min(REPLAY_CHUNK);
            let pairs = self.replay("", chunk).await?;
            let done = pairs.len() < chunk;
            ids.extend(pairs.into_iter().map(|(_, new)| new));
            if done {
                break;
            }
        }
        Ok(ids)
    }

    /// Puts one dead letter (by its [`DeadLetter::id`](super::DeadLetter::id))
    /// back on the queue; returns its new entry id, or `None` when there is
    /// no such dead letter (already replayed or purged).
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// for dead in queue.dead_letters(100).await? {
    ///     if dead.error.contains("timed out") {
    ///         queue.replay_dead_letter(&dead.id).await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn replay_dead_letter(&self, id: &str) -> Result<Option<String>, FenceError> {
        if id.is_empty() {
            return Err(FenceError::invalid_input("empty dead letter id"));
        }
        let pairs = self.replay(id, 1).await?;
        Ok(pairs.into_iter().next().map(|(_, new)| new))
    }

    async fn replay(&self, id: &str, limit: usize) -> Result<Vec<(String, String)>, FenceError> {
        let keys = &self.keys;
        let mut inv = self.scripts.replay.key(&keys.dead);
        inv.key(&keys.stream).key(&keys.stats).arg(id).arg(limit);
        let mut conn = self.conn.clone();
        let value: Value = timed(self.timeout, inv.invoke_async(&mut conn)).await?;
        let Value::Array(items) = value else {
            return Ok(Vec::new());
        };
        let pairs: Vec<(String, String)> = items
            .iter()
            .filter_map(|item| match item {
                Value::Array(pair) if pair.len() == 2 => Some((text(&pair[0])?, text(&pair[1])?)),
                _ => None,
            })
            .collect();
        if !pairs.is_empty() {
            tracing::info!(stream = %keys.stream, count = pairs.len(), "dead letters replayed");
        }
        Ok(pairs)
    }

    /// Deletes the given dead letters (by [`DeadLetter::id`](super::DeadLetter::id))
    /// and returns how many existed.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// let junk: Vec<String> = queue
    ///     .dead_letters(100)
    ///     .await?
    ///     .into_iter()
    ///     .filter(|d| d.payload.is_none())
    ///     .map(|d| d.id)
    ///     .collect();
    /// queue.purge_dead_letters(&junk).await?;
    /// # Ok(()) }
    /// ```
    pub async fn purge_dead_letters(&self, ids: &[String]) -> Result<u64, FenceError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.purge(ids).await
    }

    /// Deletes every dead letter and returns how many there were.
    ///
    /// ```no_run
    /// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// let gone = queue.purge_all_dead_letters().await?;
    /// println!("{gone} dead letters deleted");
    /// # Ok(()) }
    /// ```
    pub async fn purge_all_dead_letters(&self) -> Result<u64, FenceError> {
        self.purge(&[]).await
    }

    async fn purge(&self, ids: &[String]) -> Result<u64, FenceError> {
        let mut inv = self.scripts.purge.key(&self.keys.dead);
        for id in ids {
            inv.arg(id);
        }
        let mut conn = self.conn.clone();
        let n: u64 = timed(self.timeout, inv.invoke_async(&mut conn)).await?;
        tracing::info!(stream = %self.keys.dead, count = n, "dead letters purged");
        Ok(n)
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn count(value: &Value) -> u64 {
    int(value).and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

fn millis(value: &Value) -> Duration {
    Duration::from_millis(count(value))
}

/// The reply of the stats script: `{depth, age, consumers, dead, counters,
/// group exists}`.
fn parse_stats(value: Value) -> Option<QueueStats> {
    let Value::Array(parts) = value else {
        return None;
    };
    let [depth, age, consumers, dead, counters, group] = parts.as_slice() else {
        return None;
    };
    let consumers: Vec<ConsumerStats> = match consumers {
        Value::Array(items) => items
            .iter()
            .filter_map(|c| match c {
                Value::Array(f) if f.len() == 3 => Some(ConsumerStats {
                    name: text(&f[0])?,
                    pending: count(&f[1]),
                    idle: millis(&f[2]),
                }),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut stats = QueueStats {
        depth: count(depth),
        pending: consumers.iter().map(|c| c.pending).sum(),
        oldest_age: int(age).filter(|a| *a >= 0).map(|a| millis(&Value::Int(a))),
        consumers,
        group_exists: count(group) == 1,
        dead_letters: count(dead),
        ..QueueStats::default()
    };
    let pairs: Vec<(String, u64)> = match counters {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|kv| Some((text(kv.first()?)?, count(kv.get(1)?))))
            .collect(),
        Value::Map(map) => map
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, count(v))))
            .collect(),
        _ => Vec::new(),
    };
    for (name, n) in pairs {
        match name.as_str() {
            "applied" => stats.applied = n,
            "retried" => stats.retried = n,
            "dead_lettered" => stats.dead_lettered = n,
            "reclaimed" => stats.reclaimed = n,
            "replayed" => stats.replayed = n,
            _ => {}
        }
    }
    Some(stats)
}
