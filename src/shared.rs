//! [`Shared`]: the state of one cache, owned by a
//! [`FenceCache`](crate::FenceCache) and shared by its layers, services and
//! handles: the Redis side, the in-flight table, the counters, the wake-up
//! listener.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::config::Config;
use crate::flight::Flights;
use crate::metrics::CacheLabel;
use crate::near::{Acks, Near};
use crate::stats::Counters;
use crate::store::{Breaker, Store};

/// The state of one cache, shared by its layers, their services and its handles.
pub(crate) struct Shared<C> {
    pub(crate) store: Store<C>,
    pub(crate) flights: Flights,
    pub(crate) counters: Counters,
    /// Where the wake-up listener subscribes, once set.
    pub(crate) wake_client: OnceLock<Source>,
    /// The channels the listener should be subscribed to.
    pub(crate) interests: Arc<Interests>,
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
    /// The near cache, when [`FenceCacheBuilder::near_cache`](crate::FenceCacheBuilder::near_cache) asked for one.
    pub(crate) near: OnceLock<Near>,
    /// The near-cache acknowledgements this cache's invalidations wait for.
    pub(crate) acks: Acks,
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
    /// 250 ms, breaker opening after 5 failures for 1 s, no wake-ups. Its
    /// metrics name it `label` (its namespace).
    pub(crate) fn new(redis: C, label: CacheLabel) -> Self {
        crate::metrics::describe(crate::stats::FIELD_DOCS);
        crate::metrics::register_cache(&label);
        let store = Store::new(
            redis,
            Duration::from_millis(250),
            Breaker::new(5, Duration::from_secs(1)),
            label.clone(),
        );
        Self {
            store,
            flights: Flights::new(label.clone()),
            counters: Counters::new(&label),
            wake_client: OnceLock::new(),
            interests: Default::default(),
            listening: Default::default(),
            id: rand::random(),
            leases: Default::default(),
            closing: Default::default(),
            warn_gate: Default::default(),
            near: OnceLock::new(),
            acks: Acks::default(),
        }
    }
}

impl<C> Shared<C> {
    /// The near cache, when there is one and it may be used: on a Redis
    /// Cluster only with the cluster listener of
    /// [`cluster_wake_ups`](crate::FenceCacheBuilder::cluster_wake_ups), which
    /// subscribes to the sharded announcements (ARCHITECTURE.md, "The near
    /// cache").
    pub(crate) fn near(&self) -> Option<&Near>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.near
            .get()
            .filter(|_| !self.store.is_cluster() || self.cluster_listener())
    }

    /// Whether the wake-up listener is a Redis Cluster's.
    fn cluster_listener(&self) -> bool {
        #[cfg(feature = "cluster-async")]
        if let Some(Source::Cluster(..)) = self.wake_client.get() {
            return true;
        }
        false
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

/// Where the listener subscribes.
#[derive(Clone)]
pub(crate) enum Source {
    /// A single server (or one node, for the namespace channels only).
    Single(redis::Client),
    /// A Redis Cluster, through a RESP3 cluster connection whose pushes
    /// the client forwards to the listener running now.
    #[cfg(feature = "cluster-async")]
    Cluster(Box<redis::cluster::ClusterClient>, Forward),
    /// The master a Sentinel names, followed across failovers.
    #[cfg(feature = "sentinel")]
    Sentinel(crate::sentinel::SentinelConnection),
}

/// Hands a cluster connection's pushes to the listener that opened it.
#[cfg(feature = "cluster-async")]
pub(crate) type Forward = Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>>>;

impl Source {
    /// A cluster source from the user's builder: RESP3, with a push sender
    /// that forwards to whichever listener is running.
    #[cfg(feature = "cluster-async")]
    pub(crate) fn cluster(
        builder: redis::cluster::ClusterClientBuilder,
    ) -> redis::RedisResult<Self> {
        let forward: Forward = Arc::default();
        let to = forward.clone();
        let client = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(move |push: redis::PushInfo| {
                if let Ok(slot) = to.lock()
                    && let Some(tx) = slot.as_ref()
                {
                    let _ = tx.send(push);
                }
                Ok::<(), std::convert::Infallible>(())
            })
            .build()?;
        Ok(Self::Cluster(Box::new(client), forward))
    }
}

/// The channels the listener should hold: every namespace's, and on a
/// cluster the sharded wake-up channels of the entries fills wait on.
#[derive(Default)]
pub(crate) struct Interests {
    namespaces: Mutex<std::collections::BTreeSet<String>>,
    /// Namespaces a handle invalidates in: their near-cache
    /// acknowledgements are heard (the namespaces' own channels are not
    /// subscribed for this).
    acks: Mutex<std::collections::BTreeSet<String>>,
    /// Sharded channel → fills waiting on it.
    shards: Mutex<std::collections::HashMap<String, usize>>,
    /// The sharded channels the server confirmed subscribing (locked after
    /// `shards` when both are).
    confirmed: Mutex<std::collections::HashSet<String>>,
    /// Moves whenever a channel is confirmed.
    confirmations: tokio::sync::watch::Sender<u64>,
    /// Told when either set changes.
    pub(crate) changed: tokio::sync::Notify,
    /// Moves whenever a namespace is added.
    version: std::sync::atomic::AtomicU64,
}

impl Interests {
    /// Returns whether `namespace` is new.
    pub(crate) fn add_namespace(&self, namespace: &str) -> bool {
        let added = lock(&self.namespaces).insert(namespace.to_owned());
        if added {
            self.version
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.changed.notify_one();
        }
        added
    }

    /// Moves whenever a namespace is added.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Hears the near-cache acknowledgements of `namespace`.
    pub(crate) fn add_acks(&self, namespace: &str) {
        let added = {
            let mut acks = lock(&self.acks);
            !acks.contains(namespace) && acks.insert(namespace.to_owned())
        };
        if added {
            self.changed.notify_one();
        }
    }

    /// The namespaces whose acknowledgements are heard: every namespace's,
    /// and those handles invalidate in.
    pub(crate) fn ack_namespaces(&self) -> Vec<String> {
        let mut all: std::collections::BTreeSet<String> = lock(&self.acks).clone();
        all.extend(lock(&self.namespaces).iter().cloned());
        all.into_iter().collect()
    }

    /// Wants `channel` until the returned guard is dropped.
    pub(crate) fn interest(self: &Arc<Self>, channel: String) -> Interest {
        let first = {
            let mut shards = lock(&self.shards);
            let n = shards.entry(channel.clone()).or_default();
            *n += 1;
            *n == 1
        };
        if first {
            self.changed.notify_one();
        }
        Interest {
            interests: self.clone(),
            channel,
        }
    }

    pub(crate) fn namespaces(&self) -> Vec<String> {
        lock(&self.namespaces).iter().cloned().collect()
    }

    #[cfg(feature = "cluster-async")]
    pub(crate) fn shards(&self) -> std::collections::HashSet<String> {
        lock(&self.shards).keys().cloned().collect()
    }

    /// The listener's subscription to `channel` was confirmed by the server.
    #[cfg(feature = "cluster-async")]
    pub(crate) fn confirm(&self, channel: &str) {
        lock(&self.confirmed).insert(channel.to_owned());
        self.confirmations.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The channels of `held` no fill wants any more, forgotten as
    /// confirmed in the same step (under the lock a new interest takes), so
    /// that a fill wanting one again waits for its new subscription.
    #[cfg(feature = "cluster-async")]
    pub(crate) fn take_unwanted(&self, held: &std::collections::HashSet<String>) -> Vec<String> {
        let shards = lock(&self.shards);
        let gone: Vec<String> = held
            .iter()
            .filter(|c| !shards.contains_key(*c))
            .cloned()
            .collect();
        let mut confirmed = lock(&self.confirmed);
        for channel in &gone {
            confirmed.remove(channel);
        }
        gone
    }

    /// `channel` is no longer subscribed (the server dropped it, or the
    /// listener's connection is new), or none is (`None`).
    #[cfg(feature = "cluster-async")]
    pub(crate) fn unconfirm(&self, channel: Option<&str>) {
        let mut confirmed = lock(&self.confirmed);
        match channel {
            Some(channel) => {
                confirmed.remove(channel);
            }
            None => confirmed.clear(),
        }
    }
}

/// A fill's interest in one sharded wake-up channel.
pub(crate) struct Interest {
    interests: Arc<Interests>,
    channel: String,
}

impl Interest {
    /// Whether the listener's subscription to the channel is confirmed by
    /// the server. A waiter marks the lease (asks the filler to publish) only after
    /// this: a store landing before would publish to nobody.
    pub(crate) fn is_subscribed(&self) -> bool {
        lock(&self.interests.confirmed).contains(&self.channel)
    }

    /// Waits until [`is_subscribed`](Self::is_subscribed), at most
    /// `within`; returns whether it is.
    pub(crate) async fn subscribed(&self, within: std::time::Duration) -> bool {
        let mut rx = self.interests.confirmations.subscribe();
        let wait = async {
            loop {
                if self.is_subscribed() {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        let last = {
            let mut shards = lock(&self.interests.shards);
            match shards.get_mut(&self.channel) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    shards.remove(&self.channel);
                    true
                }
                None => false,
            }
        };
        if last {
            self.interests.changed.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
