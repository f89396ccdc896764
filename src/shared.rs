//! [`Shared`]: the state of one cache, owned by a
//! [`FenceCache`](crate::FenceCache) and shared by its layers, services and
//! handles: the Redis side, the in-flight table, the counters, the wake-up
//! listener.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::config::Config;
use crate::flight::Flights;
use crate::stats::Counters;
use crate::store::{Breaker, Store};

/// The state of one cache, shared by its layers, their services and its handles.
pub(crate) struct Shared<C> {
    pub(crate) store: Store<C>,
    pub(crate) flights: Flights,
    pub(crate) counters: Counters,
    /// Where the wake-up listener subscribes, once set.
    pub(crate) wake_client: OnceLock<crate::wake::Source>,
    /// The channels the listener should be subscribed to.
    pub(crate) interests: Arc<crate::wake::Interests>,
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
            interests: Default::default(),
            listening: Default::default(),
            id: rand::random(),
            leases: Default::default(),
            closing: Default::default(),
            warn_gate: Default::default(),
        }
    }
}

/// What every step of the request path needs.
pub(crate) struct Ctx<C> {
    pub(crate) config: Arc<Config>,
    pub(crate) shared: Arc<Shared<C>>,
}

impl<C> Clone for Ctx<C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }
}
