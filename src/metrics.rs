//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): whatever recorder the application installs (Prometheus,
//! StatsD, ...) receives them. Without the feature every hook here is an
//! empty inline function, so the hot path carries one-line calls only.
//!
//! The names, with their labels (see ARCHITECTURE.md, "Metrics"):
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `cachefence_<stats field>_total` | counter | `namespace`, `route` |
//! | `cachefence_redis_calls_total`, `cachefence_redis_errors_total` | counter | `op` |
//! | `cachefence_redis_call_duration_seconds` | histogram | `op` |
//! | `cachefence_fill_duration_seconds` | histogram | `namespace`, `route` |
//! | `cachefence_wait_duration_seconds` | histogram | `namespace`, `route` |
//! | `cachefence_breaker_open` | gauge (0 closed, 1 open) | |
//! | `cachefence_fills_in_flight` | gauge | |

use std::time::Duration;

/// A counter handle: a registered `metrics::Counter`, or nothing.
#[cfg(feature = "metrics")]
pub(crate) type Counter = Option<::metrics::Counter>;
/// A counter handle: a registered `metrics::Counter`, or nothing.
#[cfg(not(feature = "metrics"))]
pub(crate) type Counter = ();

/// The counters of events that happen outside a route's requests (a lease
/// release leaving a pass marker, the wake-up listener, invalidations): their
/// metrics carry no labels. Every other counter is a metric per route.
#[cfg(feature = "metrics")]
const CACHE_LEVEL: [&str; 3] = ["pass_markers", "detached", "listener_connects"];

/// The counter `cachefence_<field>_total` of one route (`labels`), or of
/// the whole cache. A field is a metric of one or the other (see
/// [`CACHE_LEVEL`]), never both, so no event is exported twice: the other
/// gets `None`.
#[cfg(feature = "metrics")]
pub(crate) fn counter(field: &'static str, labels: Option<&Labels>) -> Counter {
    if CACHE_LEVEL.contains(&field) != labels.is_none() {
        return None;
    }
    let name = format!("cachefence_{field}_total");
    Some(match labels {
        Some(l) => {
            ::metrics::counter!(name, "namespace" => l.namespace.clone(), "route" => l.route.clone())
        }
        None => ::metrics::counter!(name),
    })
}

/// The counter `cachefence_<field>_total`: nothing without the feature.
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn counter(_field: &'static str, _labels: Option<&Labels>) -> Counter {}

/// Adds to a counter.
#[inline(always)]
pub(crate) fn increment(counter: &Counter, n: u64) {
    #[cfg(feature = "metrics")]
    if let Some(c) = counter {
        c.increment(n);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (counter, n);
}

/// The labels of one route: its namespace and its name.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
#[derive(Debug, Clone)]
pub(crate) struct Labels {
    pub(crate) namespace: String,
    pub(crate) route: String,
}

/// One Redis call took `elapsed` (`ok`: it succeeded). Only with the
/// feature: without it the caller doesn't read the clock at all.
#[cfg(feature = "metrics")]
pub(crate) fn redis_call(op: &'static str, elapsed: Duration, ok: bool) {
    ::metrics::counter!("cachefence_redis_calls_total", "op" => op).increment(1);
    if !ok {
        ::metrics::counter!("cachefence_redis_errors_total", "op" => op).increment(1);
    }
    ::metrics::histogram!("cachefence_redis_call_duration_seconds", "op" => op)
        .record(elapsed.as_secs_f64());
}

/// A histogram handle: a registered `metrics::Histogram`, or nothing.
#[cfg(feature = "metrics")]
pub(crate) type Histogram = Option<::metrics::Histogram>;
/// A histogram handle: a registered `metrics::Histogram`, or nothing.
#[cfg(not(feature = "metrics"))]
pub(crate) type Histogram = ();

/// The histogram `cachefence_<what>_duration_seconds` of one route.
#[cfg(feature = "metrics")]
pub(crate) fn histogram(what: &'static str, labels: &Labels) -> Histogram {
    let name = format!("cachefence_{what}_duration_seconds");
    Some(
        ::metrics::histogram!(name, "namespace" => labels.namespace.clone(), "route" => labels.route.clone()),
    )
}

/// The histogram `cachefence_<what>_duration_seconds` of one route.
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn histogram(_what: &'static str, _labels: &Labels) -> Histogram {}

/// Records a duration.
#[inline(always)]
pub(crate) fn record(histogram: &Histogram, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    if let Some(h) = histogram {
        h.record(elapsed.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (histogram, elapsed);
}

/// The circuit breaker opened (`true`) or closed.
#[inline(always)]
pub(crate) fn breaker_open(open: bool) {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!("cachefence_breaker_open").set(if open { 1.0 } else { 0.0 });
    #[cfg(not(feature = "metrics"))]
    let _ = open;
}

/// Fills entered (`delta` > 0) or left the in-flight table of a cache.
/// A delta, not a level, so that several caches in one process add up.
#[inline(always)]
pub(crate) fn fills_in_flight(delta: f64) {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!("cachefence_fills_in_flight").increment(delta);
    #[cfg(not(feature = "metrics"))]
    let _ = delta;
}
