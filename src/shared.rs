//! [`Shared`]: the state of one cache, owned by a
//! [`FenceCache`](crate::FenceCache) and shared by its layers, services and
//! handles: the Redis side, the in-flight table, the counters, the wake-up
//! listener.

use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::flight::Flights;
use crate::stats::Counters;
use crate::store::{Breaker, Store};
use crate::wake;

/// The state of one cache, shared by its layers, their services and its handles.
pub(crate) struct Shared<C> {
    pub(crate) store: Store<C>,
    pub(crate) flights: Flights,
    pub(crate) counters: Counters,
    pub(crate) wake_client: OnceLock<redis::Client>,
    /// Whether the wake-up listener task is running; it clears this when
    /// it ends, for example with the runtime it was spawned on.
    pub(crate) listening: Arc<std::sync::atomic::AtomicBool>,
    /// Tells this layer's own invalidation announcements from others'.
    pub(crate) id: u64,
    /// The leases held by this process's running fills (lease key → token),
    /// so that shutdown can release them.
    pub(crate) leases: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Set by [`FenceHandle::shutdown`]: new requests bypass the cache.
    pub(crate) closing: std::sync::atomic::AtomicBool,
    /// Lets the warning of a failed Redis call on the request path through
    /// once a second, not once per request.
    pub(crate) warn_gate: crate::trace::Gate,
}

impl<C> fmt::Debug for Shared<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("flights", &self.flights)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<C> Shared<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A cache over `redis` with the default Redis settings: timeout
    /// 250 ms, breaker opening after 5 failures for 1 s, no wake-ups.
    pub(crate) fn new(redis: C) -> Self {
        Self {
            store: Store::new(
                redis,
                Duration::from_millis(250),
                Breaker::new(5, Duration::from_secs(1)),
            ),
            flights: Flights::default(),
            counters: Counters::new(),
            wake_client: OnceLock::new(),
            listening: Default::default(),
            id: rand::random(),
            leases: Default::default(),
            closing: Default::default(),
            warn_gate: Default::default(),
        }
    }

    /// Starts the wake-up listener once, if a client for it was given and a
    /// Tokio runtime is running.
    ///
    /// Called again where waiting starts: a listener that ended with the
    /// runtime it ran on is started again on the current one.
    pub(crate) fn ensure_listener(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.listening.load(Ordering::Acquire) {
            return;
        }
        let Some(client) = self.wake_client.get() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self
            .listening
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let weak: Weak<Self> = Arc::downgrade(self);
            let running = wake::Running(self.listening.clone());
            runtime.spawn(wake::listen(client.clone(), weak, running));
        }
    }
}
