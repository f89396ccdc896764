//! Counters of what the cache did, readable from the handle.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
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
            $($(#[$doc])* pub $name: u64,)*
            /// Redis calls that failed or timed out.
            pub redis_errors: u64,
            /// Redis calls sent (commands and scripts).
            pub redis_calls: u64,
            /// Fills in flight in this process right now.
            pub in_flight: u64,
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    redis_errors: 0,
                    redis_calls: 0,
                    in_flight: 0,
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
}

impl Counters {
    pub(crate) fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
