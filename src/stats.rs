//! Counters of what the cache did, readable from the handle.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::{self, CacheLabel, Labels};

/// One counter: the total shared by every route of a cache (what
/// [`Stats`] reads), and the route's labelled metric (feature `metrics`).
#[derive(Debug, Default, Clone)]
pub(crate) struct Count {
    total: Arc<AtomicU64>,
    metric: metrics::Counter,
}

impl Count {
    fn load(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The same total, with the metric of a route (`Ok(labels)`) or of the
    /// whole cache (see [`metrics::counter`]).
    fn labelled(&self, field: &'static str, labels: Result<&Labels, &CacheLabel>) -> Self {
        Self {
            total: self.total.clone(),
            metric: metrics::counter(field, labels),
        }
    }
}

/// Whether the circuit breaker in front of Redis lets commands through.
///
/// ```no_run
/// # fn doc(cache: cachefence::FenceCache) {
/// use cachefence::BreakerState;
/// if cache.stats().breaker == BreakerState::Open {
///     eprintln!("Redis is failing: requests bypass the cache");
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Commands go to Redis (the normal state).
    #[default]
    Closed,
    /// Redis failed repeatedly: no command is sent until the cool-down ends;
    /// requests bypass the cache.
    Open,
    /// The cool-down is over: the next command probes Redis and closes the
    /// breaker if it succeeds.
    HalfOpen,
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Each counter's name and its documentation (the metric's HELP).
        pub(crate) const FIELD_DOCS: &[(&str, &str)] = &[
            $((stringify!($name), concat!($($doc, "\n"),*)),)*
        ];

        /// The counters of a cache (unlabelled metrics), or of one route
        /// (made by [`Counters::for_route`]: the same totals, labelled
        /// metrics, and the route's histograms).
        #[derive(Debug, Default, Clone)]
        pub(crate) struct Counters {
            $(pub(crate) $name: Count,)*
            /// How long fills took (origin call and body).
            pub(crate) fill_duration: metrics::Histogram,
            /// How long requests waited for another request's fill.
            pub(crate) wait_duration: metrics::Histogram,
        }

        /// A snapshot of a fence's counters, shared by every clone of a
        /// layer and its handles, since the layer was made.
        ///
        /// # Example
        ///
        /// ```no_run
        /// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) {
        /// let stats = handle.stats();
        /// println!("hit ratio {:.2}", stats.hits as f64 / (stats.hits + stats.misses).max(1) as f64);
        /// # }
        /// ```
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $($(#[doc = $doc])* pub $name: u64,)*
            /// Redis calls that failed or timed out.
            pub redis_errors: u64,
            /// Redis calls sent (commands and scripts).
            pub redis_calls: u64,
            /// Fills in flight in this process right now.
            pub in_flight: u64,
            /// The state of the circuit breaker in front of Redis.
            pub breaker: BreakerState,
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats {
                    $($name: self.$name.load(),)*
                    redis_errors: 0,
                    redis_calls: 0,
                    in_flight: 0,
                    breaker: BreakerState::Closed,
                }
            }

            /// The counters of a cache: the totals, with the metrics of the
            /// cache (named `cache`).
            pub(crate) fn new(cache: &CacheLabel) -> Self {
                let base = Self::default();
                Self {
                    $($name: base.$name.labelled(stringify!($name), Err(cache)),)*
                    ..base
                }
            }

            /// The counters of one route of this cache: the same totals,
            /// and metrics labelled with the route's namespace and name.
            pub(crate) fn for_route(&self, namespace: &str, route: &str) -> Self {
                let labels = Labels {
                    namespace: namespace.to_owned(),
                    route: route.to_owned(),
                };
                // The cache-wide counters keep the cache's metric, so their
                // events count whichever counters (cache or route) see them.
                let route = |count: &Count, field: &'static str| {
                    if metrics::CACHE_LEVEL.contains(&field) {
                        count.clone()
                    } else {
                        count.labelled(field, Ok(&labels))
                    }
                };
                Self {
                    $($name: route(&self.$name, stringify!($name)),)*
                    fill_duration: metrics::histogram("fill", &labels),
                    wait_duration: metrics::histogram("wait", &labels),
                }
            }
        }
    };
}

counters! {
    /// Requests served a fresh cached response.
    hits,
    /// Requests that found no usable entry.
    misses,
    /// Requests served a stale entry (inside grace, or because the origin failed).
    stale,
    /// Requests passed to the inner service without caching (method,
    /// credentials, key function, pass marker, Redis unavailable).
    bypasses,
    /// Calls to the inner service made by fills and refreshes.
    fills,
    /// Entries written to Redis.
    stores,
    /// Entries freshened by a `304 Not Modified` from the origin: their
    /// head and expiry rewritten, their body left as it is in Redis (also
    /// counted in `stores`).
    revalidated,
    /// Write-backs refused because the fill's lease was lost (invalidated or expired).
    fenced,
    /// Requests that joined another request's fill in this process.
    coalesced,
    /// Fills that waited on another process's lease.
    remote_waits,
    /// Waits woken by a notification from Redis.
    wakeups,
    /// Waits that reached the wait budget.
    wait_timeouts,
    /// Background refreshes started early by XFetch.
    early_refreshes,
    /// Background refreshes of a stale entry served inside grace.
    stale_refreshes,
    /// Pass markers (hit-for-miss) written for uncacheable responses.
    pass_markers,
    /// Fills detached from the in-flight table by an invalidation.
    detached,
    /// Fills abandoned by `fill_timeout`.
    fill_timeouts,
    /// Times the wake-up listener (re)connected its subscription.
    listener_connects,
    /// Responses not stored because their URL already had the most `Vary`
    /// variants it may have ([`FenceLayer::max_variants`](crate::FenceLayer::max_variants)).
    variants_over_limit,
    /// Requests served from the near cache, with no Redis command (also
    /// counted in `hits`).
    near_hits,
    /// Near-cache entries dropped because a write or invalidation of them
    /// was announced.
    near_evictions,
    /// Times the near cache was emptied because its subscription was lost.
    near_flushes,
    /// Invalidations that returned before every near cache acknowledged
    /// dropping the entry (after waiting 250 ms; see
    /// [`FenceCacheBuilder::near_cache`](crate::FenceCacheBuilder::near_cache)).
    near_ack_timeouts,
    /// Invalidations of entries near caches held that heard fewer
    /// acknowledgements than near caches are registered alive in the
    /// namespace: a near cache whose subscription Redis dropped may serve
    /// the old copy until it notices (at most 1.5 s; see
    /// [`FenceCacheBuilder::near_cache`](crate::FenceCacheBuilder::near_cache)).
    near_acks_missing,
}

impl Counters {
    pub(crate) fn inc(counter: &Count) {
        Self::add(counter, 1);
    }

    pub(crate) fn add(counter: &Count, n: usize) {
        counter.total.fetch_add(n as u64, Ordering::Relaxed);
        metrics::increment(&counter.metric, n as u64);
    }

    /// Records how long a fill took.
    pub(crate) fn fill_took(&self, elapsed: Duration) {
        metrics::record(&self.fill_duration, elapsed);
    }

    /// Records how long a request waited for another request's fill.
    pub(crate) fn waited(&self, elapsed: Duration) {
        metrics::record(&self.wait_duration, elapsed);
    }
}
