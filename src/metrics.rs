//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): whatever recorder the application installs (Prometheus,
//! StatsD, ...) receives them. Without the feature every hook here is an
//! empty inline function, so the hot path carries one-line calls only.
//!
//! The names, with their labels (see ARCHITECTURE.md, "Metrics"). `cache` is
//! the namespace of the cache (what [`FenceCacheBuilder::namespace`] set,
//! default `cachefence:`), so two caches in one process keep apart; `namespace` and
//! `route` name one layer (route) of a cache.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `cachefence_<stats field>_total` | counter | `namespace`, `route` |
//! | `cachefence_{pass_markers,detached,listener_connects,near_evictions,near_flushes,near_ack_timeouts,near_acks_missing}_total` | counter | `cache` |
//! | `cachefence_redis_calls_total`, `cachefence_redis_errors_total` | counter | `cache`, `op` |
//! | `cachefence_redis_call_duration_seconds` | histogram | `cache`, `op` |
//! | `cachefence_fill_duration_seconds` | histogram | `namespace`, `route` |
//! | `cachefence_wait_duration_seconds` | histogram | `namespace`, `route` |
//! | `cachefence_breaker_open` | gauge (0 closed, 1 open) | `cache` |
//! | `cachefence_fills_in_flight` | gauge | `cache` |
//! | `cachefence_near_cache_bytes` | gauge | `cache` |
//! | `cachefence_queue_{applied,retries,dead_lettered}_total` | counter | `queue` |
//! | `cachefence_queue_lag_seconds` | gauge | `queue` |
//!
//! Every metric is described (`describe_*!`: HELP text and unit) when a
//! cache or a queue worker is made, and registered at zero so a scrape
//! lists it before its first event: a cache's own metrics when it is
//! built, a route's when it is layered, a queue's when a worker is made,
//! an op's Redis call metrics at its first call. Install the recorder
//! before.
//!
//! [`FenceCacheBuilder::namespace`]: crate::FenceCacheBuilder::namespace

use std::time::Duration;

#[cfg(feature = "metrics")]
use std::sync::Arc;

/// The `cache` label of a cache's own metrics (Redis calls, breaker,
/// fills in flight, near cache, the events outside a route): the cache's
/// namespace, fixed when the cache is built. One per cache, shared by its
/// parts; without the feature, nothing.
#[derive(Debug, Clone)]
pub(crate) struct CacheLabel {
    #[cfg(feature = "metrics")]
    name: Arc<str>,
}

impl Default for CacheLabel {
    fn default() -> Self {
        Self::new(crate::key::DEFAULT_NAMESPACE)
    }
}

impl CacheLabel {
    pub(crate) fn new(namespace: &str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = namespace;
        Self {
            #[cfg(feature = "metrics")]
            name: Arc::from(namespace),
        }
    }

    #[cfg(feature = "metrics")]
    fn get(&self) -> ::metrics::SharedString {
        ::metrics::SharedString::from(self.name.clone())
    }
}

/// HELP text and units of every metric, for the recorder installed now;
/// `counters` are the [`Stats`](crate::Stats) fields and their docs.
/// Called when a cache or a queue worker is made (cheap: a recorder keeps
/// one description per name).
#[inline(always)]
pub(crate) fn describe(counters: &[(&str, &str)]) {
    #[cfg(feature = "metrics")]
    describe_all(counters);
    #[cfg(not(feature = "metrics"))]
    let _ = counters;
}

#[cfg(feature = "metrics")]
fn describe_all(counters: &[(&str, &str)]) {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    for (field, doc) in counters {
        describe_counter!(format!("cachefence_{field}_total"), Unit::Count, help(doc));
    }
    describe_counter!(
        "cachefence_redis_calls_total",
        Unit::Count,
        "Redis calls sent by the cache (commands and scripts), by op."
    );
    describe_counter!(
        "cachefence_redis_errors_total",
        Unit::Count,
        "Redis calls that failed or timed out, by op."
    );
    describe_histogram!(
        "cachefence_redis_call_duration_seconds",
        Unit::Seconds,
        "How long one Redis call took, by op (timeouts included)."
    );
    describe_histogram!(
        "cachefence_fill_duration_seconds",
        Unit::Seconds,
        "How long a fill took: the origin call and reading its body."
    );
    describe_histogram!(
        "cachefence_wait_duration_seconds",
        Unit::Seconds,
        "How long a request waited for another request's fill."
    );
    describe_gauge!(
        "cachefence_breaker_open",
        Unit::Count,
        "1 while the circuit breaker in front of Redis is open (requests bypass the cache), else 0."
    );
    describe_gauge!(
        "cachefence_fills_in_flight",
        Unit::Count,
        "Fills running in this process."
    );
    describe_gauge!(
        "cachefence_near_cache_bytes",
        Unit::Bytes,
        "Bytes held by the in-process near cache."
    );
    describe_counter!(
        "cachefence_queue_applied_total",
        Unit::Count,
        "Invalidations the queue worker applied."
    );
    describe_counter!(
        "cachefence_queue_retries_total",
        Unit::Count,
        "Failed invalidation attempts the queue worker will retry."
    );
    describe_counter!(
        "cachefence_queue_dead_lettered_total",
        Unit::Count,
        "Invalidations moved to the dead-letter stream after their last attempt."
    );
    describe_gauge!(
        "cachefence_queue_lag_seconds",
        Unit::Seconds,
        "Time from enqueueing to applying of the invalidation the worker applied last."
    );
}

/// Registers the cache `cache`'s own metrics at zero when it is built, so
/// a scrape lists them before their first event (a dashboard panel or an
/// alert on a metric that never fired would show "no data"): the
/// cache-wide counters ([`CACHE_LEVEL`]), the gauges, and the Redis call
/// metrics of the `read` op (the first call of every request). A route's
/// counters and histograms are registered when the route is layered; the
/// other ops' error counters at their first call. Adds nothing: caches
/// sharing a name keep their counts.
#[inline(always)]
pub(crate) fn register_cache(cache: &CacheLabel) {
    #[cfg(feature = "metrics")]
    {
        let name = cache.get();
        for field in CACHE_LEVEL {
            ::metrics::counter!(format!("cachefence_{field}_total"), "cache" => name.clone())
                .increment(0);
        }
        for gauge in ["cachefence_fills_in_flight", "cachefence_near_cache_bytes"] {
            ::metrics::gauge!(gauge, "cache" => name.clone()).increment(0.0);
        }
        for counter in [
            "cachefence_redis_calls_total",
            "cachefence_redis_errors_total",
        ] {
            ::metrics::counter!(counter, "cache" => name.clone(), "op" => "read").increment(0);
        }
        // Registered, not recorded: a histogram has no zero sample.
        let _ = ::metrics::histogram!("cachefence_redis_call_duration_seconds", "cache" => name, "op" => "read");
    }
    #[cfg(not(feature = "metrics"))]
    let _ = cache;
}

/// Registers the queue worker metrics of the queue `queue` (its namespace)
/// at zero when a worker is made, for the same reason as
/// [`register_cache`]; the lag gauge reads 0 until the first invalidation
/// is applied.
#[inline(always)]
pub(crate) fn register_queue(queue: &str) {
    #[cfg(feature = "metrics")]
    {
        for what in ["applied", "retries", "dead_lettered"] {
            ::metrics::counter!(format!("cachefence_queue_{what}_total"), "queue" => queue.to_owned())
                .increment(0);
        }
        ::metrics::gauge!("cachefence_queue_lag_seconds", "queue" => queue.to_owned())
            .increment(0.0);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = queue;
}

/// A counter's documentation as one line of plain text: the lines joined,
/// intra-doc links reduced to their text.
#[cfg(feature = "metrics")]
fn help(doc: &str) -> String {
    let text = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|i| open + i) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|i| close + i) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A counter handle: a route's registered counter, a cache-wide one
/// (labelled with the cache's name when it counts), or nothing.
#[cfg(feature = "metrics")]
#[derive(Debug, Clone, Default)]
pub(crate) enum Counter {
    #[default]
    Off,
    Route(::metrics::Counter),
    Cache(String, CacheLabel),
}
/// A counter handle: a registered `metrics::Counter`, or nothing.
#[cfg(not(feature = "metrics"))]
pub(crate) type Counter = ();

/// The counters of events that happen outside a route's requests (a lease
/// release leaving a pass marker, the wake-up listener, invalidations and
/// their near-cache announcements): they are metrics of the cache (label
/// `cache`), whichever counters count them. Every other counter is a
/// metric per route.
pub(crate) const CACHE_LEVEL: [&str; 7] = [
    "pass_markers",
    "detached",
    "listener_connects",
    "near_evictions",
    "near_flushes",
    "near_ack_timeouts",
    "near_acks_missing",
];

/// The counter `cachefence_<field>_total` of one route (`labels`), or of
/// the cache (`cache`). A field is a metric of one or the other (see
/// [`CACHE_LEVEL`]), never both, so no event is exported twice: the other
/// gets nothing.
#[cfg(feature = "metrics")]
pub(crate) fn counter(field: &'static str, labels: Result<&Labels, &CacheLabel>) -> Counter {
    let name = format!("cachefence_{field}_total");
    match labels {
        Ok(l) if !CACHE_LEVEL.contains(&field) => Counter::Route(
            ::metrics::counter!(name, "namespace" => l.namespace.clone(), "route" => l.route.clone()),
        ),
        Err(cache) if CACHE_LEVEL.contains(&field) => Counter::Cache(name, cache.clone()),
        _ => Counter::Off,
    }
}

/// The counter `cachefence_<field>_total`: nothing without the feature.
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn counter(_field: &'static str, _labels: Result<&Labels, &CacheLabel>) -> Counter {}

/// Adds to a counter.
#[inline(always)]
pub(crate) fn increment(counter: &Counter, n: u64) {
    #[cfg(feature = "metrics")]
    match counter {
        Counter::Off => {}
        Counter::Route(c) => c.increment(n),
        // Events outside requests are rare: the label is read as they count.
        Counter::Cache(name, cache) => {
            ::metrics::counter!(name.clone(), "cache" => cache.get()).increment(n)
        }
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

/// One Redis call of the cache `cache` took `elapsed` (`ok`: it
/// succeeded). Only with the feature: without it the caller doesn't read
/// the clock at all.
#[cfg(feature = "metrics")]
pub(crate) fn redis_call(cache: &CacheLabel, op: &'static str, elapsed: Duration, ok: bool) {
    let cache = cache.get();
    ::metrics::counter!("cachefence_redis_calls_total", "cache" => cache.clone(), "op" => op)
        .increment(1);
    // Registered at an op's first call, failed or not, so an error rate
    // reads 0 rather than "no data" (one registry lookup per call, like
    // the two others).
    ::metrics::counter!("cachefence_redis_errors_total", "cache" => cache.clone(), "op" => op)
        .increment(u64::from(!ok));
    ::metrics::histogram!("cachefence_redis_call_duration_seconds", "cache" => cache, "op" => op)
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

/// The circuit breaker of the cache `cache` opened (`true`) or closed.
#[inline(always)]
pub(crate) fn breaker_open(cache: &CacheLabel, open: bool) {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!("cachefence_breaker_open", "cache" => cache.get()).set(if open {
        1.0
    } else {
        0.0
    });
    #[cfg(not(feature = "metrics"))]
    let _ = (cache, open);
}

/// Fills entered (`delta` > 0) or left the in-flight table of the cache
/// `cache`. A delta, not a level, so that caches sharing a name add up.
#[inline(always)]
pub(crate) fn fills_in_flight(cache: &CacheLabel, delta: f64) {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!("cachefence_fills_in_flight", "cache" => cache.get()).increment(delta);
    #[cfg(not(feature = "metrics"))]
    let _ = (cache, delta);
}

/// The near cache of the cache `cache` holds `bytes`.
#[inline(always)]
pub(crate) fn near_cache_bytes(cache: &CacheLabel, bytes: usize) {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!("cachefence_near_cache_bytes", "cache" => cache.get()).set(bytes as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = (cache, bytes);
}

/// A queue worker of the queue `queue` (its namespace) counted an event:
/// `what` is `applied`, `retries` or `dead_lettered`.
#[inline(always)]
pub(crate) fn queue_event(queue: &str, what: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(format!("cachefence_queue_{what}_total"), "queue" => queue.to_owned())
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (queue, what);
}

/// A queue worker applied an invalidation enqueued `lag` ago.
#[inline(always)]
pub(crate) fn queue_lag(queue: &str, lag: Duration) {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!("cachefence_queue_lag_seconds", "queue" => queue.to_owned())
        .set(lag.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (queue, lag);
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    #[test]
    fn help_text_is_one_line_without_link_targets() {
        assert_eq!(
            super::help(
                " Responses not stored (\n [`FenceLayer::max_variants`](crate::FenceLayer::max_variants)).\n"
            ),
            "Responses not stored ( `FenceLayer::max_variants`)."
        );
        assert_eq!(super::help(" Plain [text] here.\n"), "Plain [text] here.");
    }
}
