//! In-process single flight: concurrent requests for one key share one fill.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use http::HeaderName;
use tokio::sync::{Notify, watch};

use crate::entry::Entry;

/// How a response was produced, as told by the cache-status header
/// (`x-cache` knows four of them; `Cache-Status` tells the others apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheStatus {
    Hit,
    /// From the origin: nothing was stored (`fwd=uri-miss`).
    Miss,
    Stale,
    Bypass,
    /// From the origin because the stored response was stale
    /// (`fwd=stale`), `MISS` in `x-cache`. `revalidated`: the origin
    /// answered `304` to the fill's conditional request (`fwd-status=304`).
    Refreshed {
        revalidated: bool,
    },
    /// From the origin because the request asked for a fresh copy
    /// (`fwd=request`), `MISS` in `x-cache`; `revalidated` as above.
    Refetched {
        revalidated: bool,
    },
    /// Passed to the origin because Redis could not be used (`fwd=bypass;
    /// detail=redis-unavailable`), `BYPASS` in `x-cache`.
    Unavailable,
}

impl CacheStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss | CacheStatus::Refreshed { .. } | CacheStatus::Refetched { .. } => {
                "MISS"
            }
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass | CacheStatus::Unavailable => "BYPASS",
        }
    }

    /// Whether the response was a fill's, from the origin (not served from
    /// a stored entry, not passed through).
    pub(crate) fn is_fill(self) -> bool {
        matches!(
            self,
            CacheStatus::Miss | CacheStatus::Refreshed { .. } | CacheStatus::Refetched { .. }
        )
    }
}

/// What a fill hands to the requests that joined it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Serve this response. `vary` holds the request header values it was
    /// made for: a joiner whose headers differ must not be served it.
    Serve {
        entry: Arc<Entry>,
        status: CacheStatus,
        vary: Arc<[(HeaderName, Vec<u8>)]>,
        /// Which joiners may take it (see [`Since`]).
        since: Since,
    },
    /// The result can't be shared: call the inner service yourself.
    Origin,
    /// The fill was detached by an invalidation: look the key up again.
    Restart,
}

/// What vouches for a fill's answer, and so which joiners may take it: a
/// joiner takes only an answer that is at least as new as what it knew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Since {
    /// No fenced write in Redis vouches for it (the fill was offline, its
    /// store failed or was not made, or it is what ACQUIRE read): it is
    /// what the origin (or Redis) said at this instant. A joiner whose
    /// request came after it may have come after an invalidation this
    /// process could not see: it does not take it, looks again, and joins
    /// or leads the next fill (whose origin call starts after it came).
    Asked(Instant),
    /// Stored past the fences by a write sent at this instant: no
    /// invalidation came between the fill's start and the write. A joiner
    /// whose own lookup found nothing after it (the entry was removed
    /// after it was stored: invalidated, or evicted) does not take it.
    Stored(Instant),
    /// Every joiner takes it: a stale copy (served as `STALE`), made by the
    /// cache, or a 5xx that was not stored (it tells of the origin, not of
    /// the resource).
    Any,
}

impl Since {
    /// Whether a joiner may take the answer: `arrived`, when its request
    /// came; `looked`, when its last lookup's answer was in (`None`: it
    /// joined without one).
    pub(crate) fn admits(self, arrived: Instant, looked: Option<Instant>) -> bool {
        match self {
            Since::Asked(asked) => asked >= arrived,
            Since::Stored(sent) => looked.is_none_or(|looked| looked < sent),
            Since::Any => true,
        }
    }
}

/// One in-flight fill.
#[derive(Debug)]
pub(crate) struct Flight {
    tx: watch::Sender<Option<Outcome>>,
    /// Signalled when another process announces a finished fill of this key.
    pub(crate) wake: Notify,
    detached: AtomicBool,
    /// Signalled when the flight is detached.
    pub(crate) detach: Notify,
    /// Set from the start of a fill of a key its leader found missing in
    /// Redis (no entry, not even a stale one) until its origin call ends
    /// (or it ends without one): while it is, a request for the key joins
    /// it without reading Redis first (see [`Flights::join_cold`]).
    open: AtomicBool,
}

impl Flight {
    fn new(cold: bool) -> Self {
        Self {
            tx: watch::channel(None).0,
            wake: Notify::new(),
            detached: AtomicBool::new(false),
            detach: Notify::new(),
            open: AtomicBool::new(cold),
        }
    }

    /// Ends the time a request may join without a lookup; `true` if it was
    /// open until now.
    fn close(&self) -> bool {
        self.open.swap(false, Ordering::AcqRel)
    }

    /// Hands the outcome to every joiner (once; a detached flight keeps its
    /// `Restart`).
    pub(crate) fn finish(&self, outcome: Outcome) {
        if !self.is_detached() {
            self.tx.send_if_modified(|slot| {
                if slot.is_none() {
                    *slot = Some(outcome);
                    true
                } else {
                    false
                }
            });
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Outcome>> {
        self.tx.subscribe()
    }

    pub(crate) fn joiners(&self) -> usize {
        self.tx.receiver_count()
    }

    pub(crate) fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    fn detach_now(&self) {
        self.detached.store(true, Ordering::Release);
        self.tx.send_replace(Some(Outcome::Restart));
        self.detach.notify_waiters();
        self.detach.notify_one();
    }
}

/// Whether the caller leads a new fill or joins one.
#[derive(Debug)]
pub(crate) enum Joined {
    Lead(Arc<Flight>),
    Join(watch::Receiver<Option<Outcome>>),
}

/// A fill calling the origin (see [`Flights::calling`]); dropped when the
/// call ended, however it ended, which closes the fill to requests that
/// have not read Redis.
#[derive(Debug)]
pub(crate) struct Calling<'a> {
    flights: &'a Flights,
    flight: &'a Flight,
}

impl Drop for Calling<'_> {
    fn drop(&mut self) {
        self.flights.close(self.flight);
    }
}

/// The table of in-flight fills of one process (of one layer and its clones).
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, Arc<Flight>>>,
    /// How many fills are open to requests without a lookup
    /// ([`join_cold`](Self::join_cold)): while none is, a request (a hit,
    /// most of the time) skips the map's lock.
    cold_open: AtomicUsize,
    /// Names this cache in the in-flight gauge (feature `metrics`).
    label: crate::metrics::CacheLabel,
}

impl Flights {
    /// The in-flight table of the cache named `label`.
    pub(crate) fn new(label: crate::metrics::CacheLabel) -> Self {
        Self {
            map: Mutex::default(),
            cold_open: AtomicUsize::new(0),
            label,
        }
    }

    /// A guard for `flight`'s origin call: when the call ends, requests
    /// no longer join it without a lookup (its answer may be stored next,
    /// and a request that came after an invalidation that followed the
    /// store must not take it).
    pub(crate) fn calling<'a>(&'a self, flight: &'a Flight) -> Calling<'a> {
        Calling {
            flights: self,
            flight,
        }
    }

    /// Closes `flight` to requests without a lookup.
    fn close(&self, flight: &Flight) {
        if flight.close() {
            self.cold_open.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// A new flight, counted as open when `cold`.
    fn flight(&self, cold: bool) -> Arc<Flight> {
        if cold {
            self.cold_open.fetch_add(1, Ordering::AcqRel);
        }
        Arc::new(Flight::new(cold))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        // A panic while holding this lock can't leave the map inconsistent
        // (every operation is a single insert or remove), so recover from
        // poisoning instead of failing every later request.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the fill of `key`, or leads a new one; `cold`: the caller
    /// found nothing stored (see [`join_cold`](Self::join_cold)).
    /// `passed`: the flight whose answer the caller could not take (made
    /// before it came and not vouched for: see `Outcome::Serve`); if it is
    /// still the one registered (finished, its fill not yet gone), the
    /// caller leads a new one in its place instead of joining it again.
    pub(crate) fn join_or_lead(
        &self,
        key: &str,
        cold: bool,
        passed: Option<&watch::Receiver<Option<Outcome>>>,
    ) -> Joined {
        let mut map = self.lock();
        if let Some(flight) = map.get(key) {
            let rx = flight.subscribe();
            if !passed.is_some_and(|p| p.same_channel(&rx)) {
                return Joined::Join(rx);
            }
            // The finished fill's own removal won't find the new flight
            // (`remove` compares pointers): the gauge counts one either way.
            let flight = self.flight(cold);
            map.insert(key.to_owned(), flight.clone());
            return Joined::Lead(flight);
        }
        let flight = self.flight(cold);
        map.insert(key.to_owned(), flight.clone());
        crate::metrics::fills_in_flight(&self.label, 1.0);
        Joined::Lead(flight)
    }

    /// Joins the fill of `key` if one runs whose leader found nothing
    /// stored and whose origin call has not ended: the caller need not read
    /// Redis first. Whatever that fill answers was read or asked for after
    /// the fill began (ACQUIRE's reads, the origin's answer, another
    /// process's entry found once its lease is gone), or, if before the
    /// caller came, it carries [`Since::Asked`] and the caller looks again;
    /// what it stores is fenced against every invalidation since its start.
    /// Once the call ended, the answer may be stored, then invalidated,
    /// before the fill hands it out: a request then reads Redis itself.
    pub(crate) fn join_cold(&self, key: &str) -> Option<watch::Receiver<Option<Outcome>>> {
        if self.cold_open.load(Ordering::Acquire) == 0 {
            return None;
        }
        let map = self.lock();
        map.get(key)
            .filter(|f| {
                f.open.load(Ordering::Acquire) && !f.is_detached() && f.tx.borrow().is_none()
            })
            .map(|f| f.subscribe())
    }

    /// Leads only if nobody else fills or refreshes the key (for background
    /// refreshes, which never wait).
    pub(crate) fn try_lead(&self, key: &str) -> Option<Arc<Flight>> {
        let mut map = self.lock();
        if map.contains_key(key) {
            return None;
        }
        let flight = self.flight(false);
        map.insert(key.to_owned(), flight.clone());
        crate::metrics::fills_in_flight(&self.label, 1.0);
        Some(flight)
    }

    /// Removes `flight` if it is still the one registered under `key`
    /// (and closes it, registered or not).
    pub(crate) fn remove(&self, key: &str, flight: &Arc<Flight>) {
        self.close(flight);
        let mut map = self.lock();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
            crate::metrics::fills_in_flight(&self.label, -1.0);
        }
    }

    /// Ends `flight` without an outcome its joiners may take: it leaves the
    /// table first, so a joiner told to look again can't find this finished
    /// flight and join it again; then its joiners are told to look again.
    pub(crate) fn restart(&self, key: &str, flight: &Arc<Flight>) {
        self.remove(key, flight);
        flight.finish(Outcome::Restart);
    }

    /// Wakes the fill of `key`, if there is one. When it is not waiting
    /// right now (a poll is in flight) the wake-up is kept for its next
    /// wait, which then ends at once.
    ///
    /// A fill registered under an entry's primary key may have followed its
    /// `Vary` index to a variant: a variant's wake-up wakes it too.
    pub(crate) fn wake(&self, key: &str) {
        let map = self.lock();
        if let Some(flight) = map.get(key) {
            flight.wake.notify_one();
        }
        if let Some((primary, _)) = key.rsplit_once(":v:")
            && let Some(flight) = map.get(primary)
        {
            flight.wake.notify_one();
        }
    }

    /// Wakes every fill of the table: a wake-up may have been lost (the
    /// listener's connection to a node dropped), so waiters look again now
    /// instead of at their next poll.
    #[cfg(feature = "cluster-async")]
    pub(crate) fn wake_all(&self) {
        for flight in self.lock().values() {
            flight.wake.notify_one();
        }
    }

    /// Detaches the fills of an entry (the primary key and its variants):
    /// they leave the table, so the next request starts a new fill, and
    /// their joiners restart. Returns how many were detached.
    pub(crate) fn detach_entry(&self, primary: &str) -> usize {
        let variant_prefix = format!("{primary}:v:");
        self.detach_where(|k| k == primary || k.starts_with(&variant_prefix))
    }

    /// Detaches every fill whose key starts with `prefix`.
    pub(crate) fn detach_prefix(&self, prefix: &str) -> usize {
        self.detach_where(|k| k.starts_with(prefix))
    }

    fn detach_where(&self, pred: impl Fn(&str) -> bool) -> usize {
        let detached: Vec<Arc<Flight>> = {
            let mut map = self.lock();
            let keys: Vec<String> = map.keys().filter(|k| pred(k)).cloned().collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        crate::metrics::fills_in_flight(&self.label, -(detached.len() as f64));
        for flight in &detached {
            self.close(flight);
            flight.detach_now();
        }
        detached.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_caller_leads_and_the_others_join() {
        let flights = Flights::default();
        let Joined::Lead(lead) = flights.join_or_lead("k", false, None) else {
            panic!("first caller must lead")
        };
        let Joined::Join(mut rx) = flights.join_or_lead("k", false, None) else {
            panic!("second caller must join")
        };
        lead.finish(Outcome::Origin);
        assert!(matches!(*rx.borrow_and_update(), Some(Outcome::Origin)));
        flights.remove("k", &lead);
        assert_eq!(flights.len(), 0);
    }

    #[test]
    fn only_a_fill_of_a_missing_key_is_joined_without_a_lookup() {
        let flights = Flights::default();
        assert!(flights.join_cold("k").is_none());
        let Joined::Lead(warm) = flights.join_or_lead("k", false, None) else {
            panic!()
        };
        let _warm_calls = flights.calling(&warm);
        assert!(
            flights.join_cold("k").is_none(),
            "a fill with a stale entry"
        );
        let Joined::Lead(cold) = flights.join_or_lead("c", true, None) else {
            panic!()
        };
        // Joinable while it acquires (what it finds carries `Since::Asked`)
        // and while it calls the origin.
        let mut early = flights.join_cold("c").expect("joined while acquiring");
        let calls = flights.calling(&cold);
        let mut rx = flights.join_cold("c").expect("joined while calling");
        drop(calls);
        assert!(flights.join_cold("c").is_none(), "the call ended");
        assert_eq!(flights.cold_open.load(Ordering::Acquire), 0);
        cold.finish(Outcome::Origin);
        assert!(matches!(*rx.borrow_and_update(), Some(Outcome::Origin)));
        assert!(matches!(*early.borrow_and_update(), Some(Outcome::Origin)));
        assert_eq!(flights.detach_entry("c"), 1);
        assert!(flights.join_cold("c").is_none());
    }

    #[test]
    fn a_fill_closes_to_blind_joiners_however_it_ends() {
        let flights = Flights::default();
        // Answered without a call (ACQUIRE found the entry): closed when
        // it leaves the table.
        let Joined::Lead(hit) = flights.join_or_lead("a", true, None) else {
            panic!()
        };
        hit.finish(Outcome::Origin);
        assert!(flights.join_cold("a").is_none(), "a finished fill");
        flights.remove("a", &hit);
        // Detached while acquiring.
        let Joined::Lead(_detached) = flights.join_or_lead("b", true, None) else {
            panic!()
        };
        assert_eq!(flights.detach_prefix("b"), 1);
        assert!(flights.join_cold("b").is_none());
        // Replaced in place by a request that could not take its answer:
        // the old fill's removal still closes it.
        let Joined::Lead(old) = flights.join_or_lead("c", true, None) else {
            panic!()
        };
        let passed = old.subscribe();
        old.finish(Outcome::Origin);
        let Joined::Lead(new) = flights.join_or_lead("c", true, Some(&passed)) else {
            panic!("a request that passed the answer leads the next fill")
        };
        flights.remove("c", &old);
        assert!(flights.join_cold("c").is_some(), "the new fill is open");
        flights.remove("c", &new);
        assert_eq!(flights.cold_open.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_joiner_takes_only_an_answer_as_new_as_what_it_knew() {
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(1);
        let t2 = t1 + std::time::Duration::from_millis(1);
        // Asked for before the request came: not taken.
        assert!(!Since::Asked(t0).admits(t1, None));
        assert!(Since::Asked(t1).admits(t1, Some(t2)));
        // Stored after the joiner's lookup found nothing: taken; its
        // lookup found nothing after the write: the entry was removed
        // since (invalidated): not taken.
        assert!(Since::Stored(t2).admits(t0, Some(t1)));
        assert!(!Since::Stored(t1).admits(t0, Some(t2)));
        assert!(Since::Stored(t0).admits(t0, None));
        assert!(Since::Any.admits(t2, Some(t2)));
    }

    #[test]
    fn detaching_restarts_joiners_and_frees_the_key() {
        let flights = Flights::default();
        let Joined::Lead(lead) = flights.join_or_lead("p:v:1", false, None) else {
            panic!()
        };
        let Joined::Join(rx) = flights.join_or_lead("p:v:1", false, None) else {
            panic!()
        };
        assert_eq!(flights.detach_entry("p"), 1);
        assert!(matches!(*rx.borrow(), Some(Outcome::Restart)));
        // The old fill's late outcome is ignored.
        lead.finish(Outcome::Origin);
        assert!(matches!(*rx.borrow(), Some(Outcome::Restart)));
        assert!(matches!(
            flights.join_or_lead("p:v:1", false, None),
            Joined::Lead(_)
        ));
        // Removing the detached flight doesn't remove its successor.
        flights.remove("p:v:1", &lead);
        assert_eq!(flights.len(), 1);
    }
}
