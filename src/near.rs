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
//! - every drop, flush and reconnection moves the `epoch`, and an entry read
//!   from Redis is taken in only if the epoch has not moved since before the
//!   read was sent: an announcement that overtook the reply wins;
//! - while the subscription is down the cache is empty and takes nothing;
//!   the listener probes it ([`PROBE_EVERY`], [`PROBE_TIMEOUT`]), so a
//!   subscription that stops answering takes it down within 1.5 s.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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

/// The in-process cache of one [`FenceCache`](crate::FenceCache).
pub(crate) struct Near {
    max_bytes: usize,
    state: Mutex<State>,
    /// Moved (under the lock) by every drop, flush and reconnection.
    epoch: AtomicU64,
    /// Names this cache in the size gauge (feature `metrics`).
    label: crate::metrics::CacheLabel,
}

#[derive(Default)]
struct State {
    /// Whether the listener holds the `#near` subscription.
    up: bool,
    /// URL key → the entries of that URL held here (its primaries: the
    /// URL's own, or a host or other key dimension of it).
    urls: HashMap<Box<str>, Vec<Slot>>,
    bytes: usize,
    live: usize,
    /// The CLOCK hand's queue: (entry key, slot id); ids no longer held are
    /// skipped.
    clock: VecDeque<(Box<str>, u64)>,
    next_id: u64,
}

impl State {
    /// Removes slot `i` of `url`'s entries (and `url` with its last one).
    fn remove_slot(&mut self, url: &str, i: usize) {
        let Some(slots) = self.urls.get_mut(url) else {
            return;
        };
        let slot = slots.swap_remove(i);
        if slots.is_empty() {
            self.urls.remove(url);
        }
        self.bytes -= slot.bytes;
        self.live -= 1;
    }
}

struct Slot {
    key: Box<str>,
    entry: Arc<Entry>,
    bytes: usize,
    id: u64,
    used: bool,
}

impl std::fmt::Debug for Near {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Near")
            .field("max_bytes", &self.max_bytes)
            .field("bytes", &state.bytes)
            .field("entries", &state.live)
            .field("up", &state.up)
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

impl Near {
    /// A near cache of `max_bytes` for the cache named `label` (its
    /// metrics' label: `Store::label`).
    pub(crate) fn new(max_bytes: usize, label: crate::metrics::CacheLabel) -> Self {
        Self {
            max_bytes,
            state: Mutex::default(),
            epoch: AtomicU64::new(0),
            label,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called under the lock: whatever was read before can't be taken in.
    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Taken before the Redis read whose result may be [`admit`](Self::admit)ted.
    pub(crate) fn snapshot(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether an entry of this size may be held at all (an eighth of the
    /// budget at most, so one entry never flushes the others).
    pub(crate) fn fits(&self, key: &str, entry: &Entry) -> bool {
        cost(key, entry) <= self.max_bytes / 8
    }

    /// The fresh entry held for `key`, if any (never one past its `fresh`
    /// time: that goes to Redis).
    pub(crate) fn get(&self, key: &str, now: u64) -> Option<Arc<Entry>> {
        let mut state = self.lock();
        if !state.up {
            return None;
        }
        let url = url_of(key);
        let slots = state.urls.get_mut(url)?;
        let i = slots.iter().position(|s| &*s.key == key)?;
        if slots[i].entry.is_fresh(now) {
            slots[i].used = true;
            return Some(slots[i].entry.clone());
        }
        state.remove_slot(url, i);
        None
    }

    /// Takes `entry` (read from Redis after `snapshot`, and marked there) in,
    /// unless an announcement, flush or reconnection came in between.
    /// Returns whether it was taken.
    pub(crate) fn admit(&self, key: &str, entry: Arc<Entry>, snapshot: u64) -> bool {
        let bytes = cost(key, &entry);
        if bytes > self.max_bytes / 8 {
            return false;
        }
        let mut state = self.lock();
        if !state.up || self.epoch.load(Ordering::SeqCst) != snapshot {
            return false;
        }
        let state = &mut *state;
        let id = state.next_id;
        state.next_id += 1;
        let url = url_of(key);
        let held = state
            .urls
            .get(url)
            .and_then(|slots| slots.iter().position(|s| &*s.key == key));
        if let Some(i) = held {
            state.remove_slot(url, i);
        }
        state.urls.entry(Box::from(url)).or_default().push(Slot {
            key: Box::from(key),
            entry,
            bytes,
            id,
            used: false,
        });
        state.bytes += bytes;
        state.live += 1;
        state.clock.push_back((Box::from(key), id));
        while state.bytes > self.max_bytes {
            let Some((key, id)) = state.clock.pop_front() else {
                break;
            };
            let url = url_of(&key);
            let Some(slots) = state.urls.get_mut(url) else {
                continue;
            };
            let Some(i) = slots.iter().position(|s| s.id == id) else {
                continue;
            };
            if slots[i].used {
                // A second chance.
                slots[i].used = false;
                state.clock.push_back((key, id));
                continue;
            }
            state.remove_slot(url, i);
        }
        // Dropped slots leave their place in the queue: keep it bounded.
        if state.clock.len() > 2 * state.live + 1024 {
            let urls = &state.urls;
            state.clock.retain(|(key, id)| {
                urls.get(url_of(key))
                    .is_some_and(|slots| slots.iter().any(|s| s.id == *id))
            });
        }
        crate::metrics::near_cache_bytes(&self.label, state.bytes);
        true
    }

    /// Drops every entry of the URL of `key` (an entry, variant or lease
    /// key), for an announced write. Returns how many were held.
    pub(crate) fn drop_url_of(&self, key: &str) -> usize {
        let mut state = self.lock();
        self.bump();
        let Some(slots) = state.urls.remove(url_of(key)) else {
            return 0;
        };
        let bytes: usize = slots.iter().map(|s| s.bytes).sum();
        state.bytes -= bytes;
        state.live -= slots.len();
        crate::metrics::near_cache_bytes(&self.label, state.bytes);
        slots.len()
    }

    /// The subscription is lost: empty, and take nothing until
    /// [`up`](Self::up). Returns how many entries were dropped, `None` when
    /// it was down already.
    pub(crate) fn down(&self) -> Option<usize> {
        let mut state = self.lock();
        self.bump();
        if !std::mem::replace(&mut state.up, false) {
            return None;
        }
        let n = state.live;
        state.urls.clear();
        state.clock.clear();
        state.bytes = 0;
        state.live = 0;
        crate::metrics::near_cache_bytes(&self.label, 0);
        Some(n)
    }

    /// The subscription holds (again): entries read from now on may be
    /// taken in.
    pub(crate) fn up(&self) {
        let mut state = self.lock();
        self.bump();
        state.up = true;
    }

    /// Whether the subscription is up (the near cache in use).
    pub(crate) fn is_up(&self) -> bool {
        self.lock().up
    }

    /// Whether an entry is held for `key` (tests).
    #[cfg(test)]
    pub(crate) fn holds(&self, key: &str) -> bool {
        self.lock()
            .urls
            .get(url_of(key))
            .is_some_and(|slots| slots.iter().any(|s| &*s.key == key))
    }

    /// Whether an entry of the URL of `key` is held (tests).
    #[cfg(any(test, feature = "__internals"))]
    pub(crate) fn holds_url(&self, key: &str) -> bool {
        self.lock().urls.contains_key(url_of(key))
    }

    /// Entries and bytes held.
    #[cfg(test)]
    pub(crate) fn size(&self) -> (usize, usize) {
        let state = self.lock();
        (state.live, state.bytes)
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

    #[test]
    fn takes_nothing_while_down_and_nothing_read_before_a_drop() {
        let near = Near::new(1 << 20, Default::default());
        let snap = near.snapshot();
        assert!(!near.admit("ns|/a:{1}", entry(10, 100), snap), "down");
        near.up();
        let snap = near.snapshot();
        near.drop_url_of("ns|/b:{2}:v:x");
        assert!(
            !near.admit("ns|/a:{1}", entry(10, 100), snap),
            "a drop came between"
        );
        let snap = near.snapshot();
        assert!(near.admit("ns|/a:{1}", entry(10, 100), snap));
        assert!(near.get("ns|/a:{1}", 50).is_some());
        assert!(near.get("ns|/a:{1}", 100).is_none(), "never past fresh");
        assert!(!near.holds("ns|/a:{1}"));
        let snap = near.snapshot();
        assert!(near.admit("ns|/a:{1}:h:host", entry(10, 100), snap));
        assert_eq!(near.drop_url_of("ns|/a:{1}:v:9:lease"), 1);
        let snap = near.snapshot();
        assert!(near.admit("ns|/a:{1}", entry(10, 100), snap));
        assert_eq!(near.down(), Some(1));
        assert_eq!(near.down(), None);
        assert!(near.get("ns|/a:{1}", 50).is_none());
    }

    #[test]
    fn stays_within_its_bytes_and_keeps_what_is_used() {
        let near = Near::new(64 * 1024, Default::default());
        near.up();
        let hot = "ns|/hot:{0}";
        assert!(near.admit(hot, entry(1000, u64::MAX), near.snapshot()));
        for i in 0..1000 {
            let key = format!("ns|/k{i}:{{{i}}}");
            assert!(near.get(hot, 0).is_some(), "the hot entry stays");
            near.admit(&key, entry(1000, u64::MAX), near.snapshot());
            let (_, bytes) = near.size();
            assert!(bytes <= 64 * 1024);
        }
        assert!(!near.admit("ns|/big:{9}", entry(9000, u64::MAX), near.snapshot()));
        let state = near.lock();
        assert!(state.clock.len() <= 2 * state.live + 1024);
    }
}
