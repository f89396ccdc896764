//! The near cache ([`FenceCacheBuilder::near_cache`](crate::FenceCacheBuilder::near_cache)):
//! an in-process, byte-bounded cache of decoded fresh entries in front of
//! Redis, and the acknowledgements invalidations wait for.
//!
//! Coherence (ARCHITECTURE.md, "The near cache"):
//! - an entry is taken in only after Redis marked it (the NEAR_MARK script
//!   sets its `near` field, and the entry is still the version that was
//!   read), so every later write of it (STORE, FRESHEN, a pass marker,
//!   INVALIDATE, SOFT_INVALIDATE) is announced on `<ns>|#near`;
//! - the listener (src/wake.rs) drops the announced URL's entries, then
//!   acknowledges on `<ns>|#ack:<sender>`; an invalidation waits for as many
//!   acknowledgements as its scripts' `PUBLISH`es had receivers;
//! - the cache is split in shards by URL (a URL's entries in one), each
//!   behind its own lock with its own `epoch` and CLOCK queue, one byte
//!   budget for all: a hit takes its shard's read lock only;
//! - every drop moves its shard's epoch, every flush and reconnection every
//!   shard's, and an entry read from Redis is taken in only if its shard's
//!   epoch has not moved since before the read was sent: an announcement
//!   that overtook the reply wins;
//! - while the subscription is down the cache is empty and takes nothing;
//!   the listener probes it ([`PROBE_EVERY`], [`PROBE_TIMEOUT`]), so a
//!   subscription that stops answering takes it down within 1.5 s.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::entry::Entry;
use crate::key::url_of;

/// How long an invalidation waits for the near caches' acknowledgements.
pub(crate) const ACK_WAIT: Duration = Duration::from_millis(250);

/// How often the listener probes its subscription (a `PING` on the
/// subscribed connection) while a near cache is in use.
pub(crate) const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a probe may go unanswered before the near cache is emptied and
/// bypassed, and the subscription made again. With [`PROBE_EVERY`] (and
/// 100 ms for the probe's round trip and the scheduler): a near cache is
/// out of use at most 1.5 s after its subscription stopped answering.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(900);
/// How often a near cache in use renews its registration in the
/// namespace's registry (`store::near_registry`), which lives
/// [`REGISTERED_FOR`].
pub(crate) const REGISTER_EVERY: Duration = Duration::from_secs(1);
/// How long a registration lives unless renewed.
pub(crate) const REGISTERED_FOR: Duration = Duration::from_secs(3);

/// A near cache's shards: `1 << SHARD_BITS`. A URL's entries all live in
/// one shard (drops are by URL), chosen by [`shard_of`].
const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// The in-process cache of one [`FenceCache`](crate::FenceCache): shards,
/// each behind its own lock with its own epoch and CLOCK queue, and one
/// byte budget for them all.
pub(crate) struct Near {
    max_bytes: usize,
    shards: Box<[Shard]>,
    /// Bytes held in all shards (each shard adds and takes its own under
    /// its lock).
    bytes: AtomicUsize,
    /// Whether the subscription is up, as [`up`](Self::up) and
    /// [`down`](Self::down) last left it (each shard also knows it, under
    /// its lock).
    up: AtomicBool,
    /// Taken by `up` and `down` (which go through every shard), so one runs
    /// at a time.
    turn: Mutex<()>,
    /// The shard whose CLOCK queue eviction goes through next.
    hand: AtomicUsize,
    /// Names this cache in the size gauge (feature `metrics`).
    label: crate::metrics::CacheLabel,
}

/// One shard: its lock and epoch on their own cache line, so hits on
/// different shards share no written memory.
#[repr(align(128))]
struct Shard {
    state: RwLock<State>,
    /// Moved (under the write lock) by every drop, flush and reconnection
    /// in this shard.
    epoch: AtomicU64,
}

/// What [`Near::snapshot`] took: the epoch of the shard of a URL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot {
    shard: usize,
    epoch: u64,
}

#[derive(Default)]
struct State {
    /// Whether the listener holds the `#near` subscription.
    up: bool,
    /// URL key → the entries of that URL held here (its primaries: the
    /// URL's own, or a host or other key dimension of it).
    urls: HashMap<Box<str>, Vec<Slot>>,
    /// Bytes held in this shard.
    bytes: usize,
    live: usize,
    /// The CLOCK hand's queue: (entry key, slot id); ids no longer held are
    /// skipped.
    clock: VecDeque<(Box<str>, u64)>,
    next_id: u64,
}

impl State {
    /// Removes slot `i` of `url`'s entries (and `url` with its last one);
    /// `total` is the cache's byte count.
    fn remove_slot(&mut self, url: &str, i: usize, total: &AtomicUsize) {
        let Some(slots) = self.urls.get_mut(url) else {
            return;
        };
        let slot = slots.swap_remove(i);
        if slots.is_empty() {
            self.urls.remove(url);
        }
        self.bytes -= slot.bytes;
        self.live -= 1;
        total.fetch_sub(slot.bytes, Ordering::Relaxed);
    }

    /// Moves this shard's CLOCK hand at most once around its queue,
    /// removing entries not used since the hand last passed them, until
    /// the cache holds at most `max` bytes.
    fn sweep(&mut self, total: &AtomicUsize, max: usize) {
        let mut steps = self.clock.len();
        while steps > 0 && total.load(Ordering::Relaxed) > max {
            steps -= 1;
            let Some((key, id)) = self.clock.pop_front() else {
                break;
            };
            let url = url_of(&key);
            let Some(slots) = self.urls.get_mut(url) else {
                continue;
            };
            let Some(i) = slots.iter().position(|s| s.id == id) else {
                continue;
            };
            if std::mem::replace(slots[i].used.get_mut(), false) {
                // A second chance.
                self.clock.push_back((key, id));
                continue;
            }
            self.remove_slot(url, i, total);
        }
    }

    /// Empties the shard; returns how many entries it held.
    fn clear(&mut self, total: &AtomicUsize) -> usize {
        let n = self.live;
        self.urls.clear();
        self.clock.clear();
        total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        self.live = 0;
        n
    }
}

struct Slot {
    key: Box<str>,
    entry: Arc<Entry>,
    bytes: usize,
    id: u64,
    /// Set by hits (under the read lock), cleared by the CLOCK hand.
    used: AtomicBool,
}

impl std::fmt::Debug for Near {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: usize = self.shards.iter().map(|s| s.read().live).sum();
        f.debug_struct("Near")
            .field("max_bytes", &self.max_bytes)
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .field("entries", &entries)
            .field("up", &self.up.load(Ordering::SeqCst))
            .finish()
    }
}

/// What an entry costs here: its body, its headers and the bookkeeping.
fn cost(key: &str, entry: &Entry) -> usize {
    let headers: usize = entry
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    entry.body.len() + headers + 2 * key.len() + 128
}

/// The shard of a URL key. A URL key ends with its hash tag, `{<digest>}`
/// (hex of a SHA-256 of the namespace and URL: `key::url_key`), so its last
/// bytes spread URLs evenly, and picking them costs no hashing of the key.
fn shard_of(url: &str) -> usize {
    let bytes = url.as_bytes();
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    let word = tail.iter().fold(0u64, |w, &b| (w << 8) | u64::from(b));
    let mixed = word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // The top bits: the product's best mixed.
    (mixed >> (64 - SHARD_BITS)) as usize
}

impl Shard {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called under the write lock: whatever was read before can't be
    /// taken in.
    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

impl Near {
    /// A near cache of `max_bytes` for the cache named `label` (its
    /// metrics' label: `Store::label`).
    pub(crate) fn new(max_bytes: usize, label: crate::metrics::CacheLabel) -> Self {
        Self {
            max_bytes,
            shards: (0..SHARDS)
                .map(|_| Shard {
                    state: RwLock::default(),
                    epoch: AtomicU64::new(0),
                })
                .collect(),
            bytes: AtomicUsize::new(0),
            up: AtomicBool::new(false),
            turn: Mutex::new(()),
            hand: AtomicUsize::new(0),
            label,
        }
    }

    fn shard(&self, url: &str) -> (usize, &Shard) {
        let i = shard_of(url);
        (i, &self.shards[i])
    }

    /// Taken before the Redis read of `key` (any key of its URL) whose
    /// result may be [`admit`](Self::admit)ted.
    pub(crate) fn snapshot(&self, key: &str) -> Snapshot {
        let (shard, held) = self.shard(url_of(key));
        Snapshot {
            shard,
            epoch: held.epoch.load(Ordering::SeqCst),
        }
    }

    /// Whether an entry of this size may be held at all (an eighth of the
    /// budget at most, so one entry never flushes the others).
    pub(crate) fn fits(&self, key: &str, entry: &Entry) -> bool {
        cost(key, entry) <= self.max_bytes / 8
    }

    /// The fresh entry held for `key`, if any (never one past its `fresh`
    /// time: that goes to Redis). Takes its shard's read lock only.
    pub(crate) fn get(&self, key: &str, now: u64) -> Option<Arc<Entry>> {
        let url = url_of(key);
        let (_, shard) = self.shard(url);
        let id = {
            let state = shard.read();
            if !state.up {
                return None;
            }
            let slot = state.urls.get(url)?.iter().find(|s| &*s.key == key)?;
            if slot.entry.is_fresh(now) {
                // Written only when it changes: hits on one entry from many
                // threads don't take its cache line from each other.
                if !slot.used.load(Ordering::Relaxed) {
                    slot.used.store(true, Ordering::Relaxed);
                }
                return Some(slot.entry.clone());
            }
            slot.id
        };
        // Past its freshness: dropped, unless it was replaced meanwhile.
        let mut state = shard.write();
        let held = state
            .urls
            .get(url)
            .and_then(|slots| slots.iter().position(|s| s.id == id));
        if let Some(i) = held {
            state.remove_slot(url, i, &self.bytes);
        }
        None
    }

    /// Takes `entry` (read from Redis after `snapshot`, and marked there) in,
    /// unless an announcement of its URL's shard, a flush or a reconnection
    /// came in between. Returns whether it was taken.
    pub(crate) fn admit(&self, key: &str, entry: Arc<Entry>, snapshot: Snapshot) -> bool {
        let bytes = cost(key, &entry);
        if bytes > self.max_bytes / 8 {
            return false;
        }
        let url = url_of(key);
        let (i, shard) = self.shard(url);
        if i != snapshot.shard {
            // A snapshot of another URL's shard says nothing of this one.
            return false;
        }
        {
            let mut state = shard.write();
            if !state.up || shard.epoch.load(Ordering::SeqCst) != snapshot.epoch {
                return false;
            }
            let state = &mut *state;
            let id = state.next_id;
            state.next_id += 1;
            let held = state
                .urls
                .get(url)
                .and_then(|slots| slots.iter().position(|s| &*s.key == key));
            if let Some(i) = held {
                state.remove_slot(url, i, &self.bytes);
            }
            state.urls.entry(Box::from(url)).or_default().push(Slot {
                key: Box::from(key),
                entry,
                bytes,
                id,
                used: AtomicBool::new(false),
            });
            state.bytes += bytes;
            state.live += 1;
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
            state.clock.push_back((Box::from(key), id));
            // Dropped slots leave their place in the queue: keep it bounded.
            if state.clock.len() > 2 * state.live + 64 {
                let urls = &state.urls;
                state.clock.retain(|(key, id)| {
                    urls.get(url_of(key))
                        .is_some_and(|slots| slots.iter().any(|s| s.id == *id))
                });
            }
        }
        self.evict();
        crate::metrics::near_cache_bytes(&self.label, self.bytes.load(Ordering::Relaxed));
        true
    }

    /// While the cache holds more than its budget: the CLOCK hand goes
    /// through the shards in turn, once around each one's queue per visit
    /// (so a used entry has its second chance until the hand is back). Two
    /// rounds of every shard clear every mark, so a third finds what to
    /// remove; entries taken in meanwhile by other threads are for their
    /// own `admit`s to make room for.
    fn evict(&self) {
        let mut visits = 0;
        while self.bytes.load(Ordering::Relaxed) > self.max_bytes && visits < 3 * SHARDS {
            visits += 1;
            let i = self.hand.fetch_add(1, Ordering::Relaxed) & (SHARDS - 1);
            self.shards[i].write().sweep(&self.bytes, self.max_bytes);
        }
    }

    /// Drops every entry of the URL of `key` (an entry, variant or lease
    /// key), for an announced write. Returns how many were held.
    pub(crate) fn drop_url_of(&self, key: &str) -> usize {
        let url = url_of(key);
        let (_, shard) = self.shard(url);
        let dropped = {
            let mut state = shard.write();
            shard.bump();
            let Some(slots) = state.urls.remove(url) else {
                return 0;
            };
            let bytes: usize = slots.iter().map(|s| s.bytes).sum();
            state.bytes -= bytes;
            state.live -= slots.len();
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            slots.len()
        };
        crate::metrics::near_cache_bytes(&self.label, self.bytes.load(Ordering::Relaxed));
        dropped
    }

    /// The subscription is lost: empty, and take nothing until
    /// [`up`](Self::up). Returns how many entries were dropped, `None` when
    /// it was down already.
    pub(crate) fn down(&self) -> Option<usize> {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let was_up = self.up.swap(false, Ordering::SeqCst);
        let mut dropped = 0;
        for shard in &self.shards {
            let mut state = shard.write();
            shard.bump();
            state.up = false;
            dropped += state.clear(&self.bytes);
        }
        crate::metrics::near_cache_bytes(&self.label, self.bytes.load(Ordering::Relaxed));
        was_up.then_some(dropped)
    }

    /// The subscription holds (again): entries read from now on may be
    /// taken in (every shard's epoch moves: a read sent before can't be).
    pub(crate) fn up(&self) {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        for shard in &self.shards {
            let mut state = shard.write();
            shard.bump();
            state.up = true;
        }
        self.up.store(true, Ordering::SeqCst);
    }

    /// Whether the subscription is up (the near cache in use).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Whether an entry is held for `key` (tests).
    #[cfg(test)]
    pub(crate) fn holds(&self, key: &str) -> bool {
        let url = url_of(key);
        self.shard(url)
            .1
            .read()
            .urls
            .get(url)
            .is_some_and(|slots| slots.iter().any(|s| &*s.key == key))
    }

    /// Whether an entry of the URL of `key` is held (tests).
    #[cfg(any(test, feature = "__internals"))]
    pub(crate) fn holds_url(&self, key: &str) -> bool {
        let url = url_of(key);
        self.shard(url).1.read().urls.contains_key(url)
    }

    /// Entries and bytes held.
    #[cfg(test)]
    pub(crate) fn size(&self) -> (usize, usize) {
        let (mut live, mut bytes) = (0, 0);
        for shard in &self.shards {
            let state = shard.read();
            live += state.live;
            bytes += state.bytes;
        }
        assert_eq!(bytes, self.bytes.load(Ordering::Relaxed));
        (live, bytes)
    }
}

/// What a near cache needs of the fields of a primary read from Redis:
/// the version (`gen`) and freshness (`fresh`: a soft invalidation changes
/// it, not `gen`) read, and whether it is marked already.
pub(crate) struct Tag {
    pub(crate) generation: Vec<u8>,
    pub(crate) fresh: Vec<u8>,
    pub(crate) marked: bool,
}

/// The fields a lookup reads besides the hit's when a near cache may take
/// the entry in (their values: [`tag_of`]).
pub(crate) const TAG_FIELDS: [&str; 3] = ["gen", "fresh", "near"];

/// The [`Tag`] from the values of [`TAG_FIELDS`] (`None` without `gen` and
/// `fresh`).
pub(crate) fn tag_of(values: Vec<Option<bytes::Bytes>>) -> Option<Tag> {
    let mut values = values.into_iter();
    let generation = values.next().flatten()?;
    let fresh = values.next().flatten()?;
    let marked = values.next().flatten().is_some();
    Some(Tag {
        generation: generation.to_vec(),
        fresh: fresh.to_vec(),
        marked,
    })
}

/// The acknowledgements an invalidation waits for, by sequence number.
#[derive(Default)]
pub(crate) struct Acks {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Arc<Waiter>>>,
}

#[derive(Default)]
pub(crate) struct Waiter {
    heard: AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Acks {
    /// A sequence number whose acknowledgements are counted until the
    /// returned guard is dropped. Register before the script that announces.
    pub(crate) fn register(&self) -> AckWait<'_> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let waiter = Arc::new(Waiter::default());
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(seq, waiter.clone());
        AckWait {
            acks: self,
            seq,
            waiter,
        }
    }

    /// One acknowledgement of `seq` arrived.
    pub(crate) fn ack(&self, seq: u64) {
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&seq)
            .cloned();
        if let Some(waiter) = waiter {
            waiter.heard.fetch_add(1, Ordering::SeqCst);
            waiter.notify.notify_one();
        }
    }
}

/// Counts the acknowledgements of one invalidation.
pub(crate) struct AckWait<'a> {
    acks: &'a Acks,
    pub(crate) seq: u64,
    waiter: Arc<Waiter>,
}

impl AckWait<'_> {
    /// How many acknowledgements arrived so far.
    pub(crate) fn heard(&self) -> u64 {
        self.waiter.heard.load(Ordering::SeqCst) as u64
    }

    /// Waits until `n` acknowledgements arrived, at most `within`. Returns
    /// whether they did.
    pub(crate) async fn until(&self, n: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.waiter.heard.load(Ordering::SeqCst) >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, self.waiter.notify.notified())
                .await
                .is_err()
            {
                return self.waiter.heard.load(Ordering::SeqCst) >= n;
            }
        }
    }
}

impl Drop for AckWait<'_> {
    fn drop(&mut self) {
        self.acks
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry(body: usize, fresh_ms: u64) -> Arc<Entry> {
        Arc::new(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            delta: Duration::ZERO,
            stored_ms: 0,
            fresh_ms,
            stale_ms: fresh_ms,
            retry_ms: 0,
        })
    }

    /// A URL key (`ns|/<path>:{<n>}`) whose shard is not `not`'s.
    fn in_another_shard(not: &str) -> String {
        (0..)
            .map(|n| format!("ns|/o:{{{n}}}"))
            .find(|url| shard_of(url) != shard_of(url_of(not)))
            .unwrap()
    }

    #[test]
    fn takes_nothing_while_down_and_nothing_read_before_a_drop() {
        let near = Near::new(1 << 20, Default::default());
        let a = "ns|/a:{1}";
        let snap = near.snapshot(a);
        assert!(!near.admit(a, entry(10, 100), snap), "down");
        near.up();
        assert!(!near.admit(a, entry(10, 100), snap), "read while down");
        let snap = near.snapshot(a);
        near.drop_url_of("ns|/a:{1}:v:x");
        assert!(
            !near.admit(a, entry(10, 100), snap),
            "a drop of the URL came between"
        );
        let snap = near.snapshot(a);
        near.drop_url_of(&in_another_shard(a));
        assert!(
            near.admit(a, entry(10, 100), snap),
            "a drop in another shard does not keep it out"
        );
        let other = in_another_shard(a);
        assert!(
            !near.admit(&other, entry(10, 100), near.snapshot(a)),
            "a snapshot of another shard"
        );
        assert!(near.get(a, 50).is_some());
        assert!(near.get(a, 100).is_none(), "never past fresh");
        assert!(!near.holds(a));
        assert_eq!(near.size(), (0, 0));
        let snap = near.snapshot(a);
        assert!(near.admit("ns|/a:{1}:h:host", entry(10, 100), snap));
        assert_eq!(near.drop_url_of("ns|/a:{1}:v:9:lease"), 1);
        let snap = near.snapshot(a);
        assert!(near.admit(a, entry(10, 100), snap));
        let snap = near.snapshot(&other);
        assert!(near.admit(&other, entry(10, 100), snap));
        let before = near.snapshot(&other);
        assert_eq!(near.down(), Some(2));
        assert_eq!(near.size(), (0, 0));
        assert_eq!(near.down(), None);
        assert!(near.get(a, 50).is_none());
        near.up();
        assert!(
            !near.admit(&other, entry(10, 100), before),
            "a flush moves every shard's epoch"
        );
    }

    #[test]
    fn stays_within_its_bytes_and_keeps_what_is_used() {
        let near = Near::new(64 * 1024, Default::default());
        near.up();
        let hot = "ns|/hot:{0}";
        assert!(near.admit(hot, entry(1000, u64::MAX), near.snapshot(hot)));
        for i in 0..1000 {
            let key = format!("ns|/k{i}:{{{i}}}");
            assert!(near.get(hot, 0).is_some(), "the hot entry stays");
            near.admit(&key, entry(1000, u64::MAX), near.snapshot(&key));
            let (_, bytes) = near.size();
            assert!(bytes <= 64 * 1024);
        }
        let (live, _) = near.size();
        assert!(live > 40, "{live} entries: the budget is used");
        let big = "ns|/big:{9}";
        assert!(!near.admit(big, entry(9000, u64::MAX), near.snapshot(big)));
        for shard in &near.shards {
            let state = shard.read();
            assert!(state.clock.len() <= 2 * state.live + 64);
        }
    }

    #[test]
    fn urls_spread_over_the_shards() {
        let mut counts = [0usize; SHARDS];
        for i in 0..SHARDS * 100 {
            let key = crate::key::EntryKey::new("ns", &format!("/p{i}")).primary;
            counts[shard_of(url_of(&key))] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min >= 50 && *max <= 160, "{min}..{max} of 100 a shard");
    }

    /// Hits, drops and admits from many threads: after a drop of a URL
    /// returned, no hit returns what was held before it, and the byte
    /// count stays exact.
    #[test]
    fn hits_never_see_an_entry_past_its_drop() {
        let near = Near::new(1 << 20, Default::default());
        near.up();
        let urls: Vec<String> = (0..16).map(|n| format!("ns|/c:{{{n}}}")).collect();
        // Version `v` of a URL's entry: `stored_ms` = v.
        let versioned = |v: u64| {
            let mut e = (*entry(100, u64::MAX)).clone();
            e.stored_ms = v;
            Arc::new(e)
        };
        // The lowest version a hit may still return, per URL.
        let floor: Vec<AtomicU64> = (0..urls.len()).map(|_| AtomicU64::new(0)).collect();
        let hits = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (near, urls, floor, hits) = (&near, &urls, &floor, &hits);
                s.spawn(move || {
                    for n in 0..20_000 {
                        let u = (n * 7 + t) % urls.len();
                        let least = floor[u].load(Ordering::SeqCst);
                        if let Some(e) = near.get(&urls[u], 0) {
                            assert!(e.stored_ms >= least, "an entry dropped before this hit");
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            // Two writers, each with its own half of the URLs.
            for t in 0..2 {
                let (near, urls, floor) = (&near, &urls, &floor);
                s.spawn(move || {
                    for n in 0..5_000 {
                        let u = (n * 2 + t) % urls.len();
                        let v = floor[u].load(Ordering::SeqCst) + 1;
                        // A read of the version before, sent before the
                        // drop, whose reply comes after it.
                        let snap = near.snapshot(&urls[u]);
                        near.drop_url_of(&urls[u]);
                        floor[u].store(v, Ordering::SeqCst);
                        assert!(!near.admit(&urls[u], versioned(v - 1), snap));
                        // Kept out only by a drop in its shard meanwhile
                        // (the other writer's URLs may share it).
                        let snap = near.snapshot(&urls[u]);
                        near.admit(&urls[u], versioned(v), snap);
                    }
                });
            }
        });
        assert!(hits.load(Ordering::Relaxed) > 0);
        let (live, bytes) = near.size();
        assert!(live <= urls.len() && bytes > 0);
    }
}
