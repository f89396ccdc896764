//! Metrics for operators (feature `metrics`): HELP text on every metric,
//! two caches in one process kept apart by their `cache` label, and the
//! shipped dashboards naming only metrics the crate exports. The recorder
//! is process-wide: one test per binary installs it (the other uses a
//! recorder local to its thread).

mod support;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use cachefence::{FenceCache, Invalidation};
use metrics_exporter_prometheus::PrometheusBuilder;
use redis::aio::ConnectionManager;
use support::{Http, RedisServer, serve};

/// The value of the sample whose line starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of every sample of `metric` whose labels contain `label`.
fn sum(text: &str, metric: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The one place this file makes a cache.
fn cache(conn: ConnectionManager, namespace: &str) -> FenceCache {
    FenceCache::builder(conn)
        .namespace(namespace)
        .build()
        .expect("a cache")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_caches_keep_their_gauges_and_redis_metrics_apart_and_every_metric_has_help() {
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    let redis = RedisServer::new();
    let a = cache(redis.connection_manager().await, "a:");
    let b = cache(redis.connection_manager().await, "b:");
    let app = Router::new()
        .route("/a", get(|| async { "a" }).layer(a.layer().name("a")))
        .route("/b", get(|| async { "b" }).layer(b.layer().name("b")));
    let addr = serve(app).await;
    let http = Http::new();
    for path in ["/a", "/a", "/b", "/b", "/b"] {
        assert_eq!(http.get(addr, path).await.status, 200);
    }
    assert_eq!(http.get(addr, "/a").await.cache_status(), Some("HIT"));

    // A queue worker of cache a: applies one invalidation.
    let queue = a.handle().queue();
    queue
        .enqueue(&Invalidation::path("/a"))
        .await
        .expect("enqueue");
    let worker = queue
        .worker(redis.client())
        .block(Duration::from_millis(100));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    let deadline = Instant::now() + Duration::from_secs(10); // a hang guard
    while control.stats().applied == 0 {
        assert!(Instant::now() < deadline, "the worker applied nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    control.shutdown();
    task.await.expect("the worker stops");
    assert_eq!(http.get(addr, "/a").await.cache_status(), Some("MISS"));

    let text = prometheus.render();
    assert_eq!(
        sample(&text, r#"cachefence_queue_applied_total{queue="a:"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, r#"cachefence_queue_lag_seconds{queue="a:"}"#)
            .is_some_and(|lag| (0.0..10.0).contains(&lag)),
        "{text}"
    );

    for (name, cache) in [("a:", &a), ("b:", &b)] {
        let label = format!(r#"cache="{name}""#);
        for gauge in ["cachefence_breaker_open", "cachefence_fills_in_flight"] {
            assert_eq!(
                sample(&text, &format!("{gauge}{{{label}}}")),
                Some(0.0),
                "{gauge} of {name} in\n{text}"
            );
        }
        // Each cache's Redis calls, by op, add up to its own count.
        let stats = cache.stats();
        assert!(stats.redis_calls > 0);
        assert_eq!(
            sum(&text, "cachefence_redis_calls_total", &label),
            stats.redis_calls as f64,
            "{name} in\n{text}"
        );
        assert_eq!(
            sum(
                &text,
                "cachefence_redis_call_duration_seconds_count",
                &label
            ),
            stats.redis_calls as f64,
            "{name} in\n{text}"
        );
    }
    // A cache named after it was made leaves no series under the default.
    assert!(!text.contains(r#"cache="cachefence:""#), "{text}");

    // Every metric in the scrape has its HELP line and type.
    let names: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 12),
            "no HELP for {name} in\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}"
        );
    }
    assert!(
        text.contains("# HELP cachefence_hits_total Requests served a fresh cached response."),
        "{text}"
    );
    assert!(
        text.contains("# HELP cachefence_breaker_open 1 while the circuit breaker"),
        "{text}"
    );
}

/// Records the names of the metrics described to it.
#[derive(Default)]
struct Described(Mutex<BTreeSet<String>>);

impl Described {
    fn add(&self, name: metrics::KeyName) {
        self.0.lock().unwrap().insert(name.as_str().to_owned());
    }
}

impl metrics::Recorder for Described {
    fn describe_counter(
        &self,
        key: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
        self.add(key);
    }
    fn describe_gauge(
        &self,
        key: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
        self.add(key);
    }
    fn describe_histogram(
        &self,
        key: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
        self.add(key);
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// The `cachefence_*` metric names `text` mentions, histogram series
/// (`_bucket`, `_count`, `_sum`) read as their histogram.
fn names_in(text: &str, histograms: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cachefence_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| histograms.contains(b)))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_alert_rules_name_only_metrics_the_crate_exports() {
    let redis = RedisServer::new();
    let conn = redis.connection_manager().await;
    // Making a cache describes every metric the crate exports.
    let described = Described::default();
    let cache = metrics::with_local_recorder(&described, || cache(conn, "d:"));
    drop(cache);
    let exported = described.0.into_inner().unwrap();
    for name in [
        "cachefence_hits_total",
        "cachefence_breaker_open",
        "cachefence_redis_call_duration_seconds",
        "cachefence_queue_lag_seconds",
        "cachefence_near_ack_timeouts_total",
    ] {
        assert!(
            exported.contains(name),
            "{name} not described: {exported:?}"
        );
    }
    let histograms: BTreeSet<&str> = exported
        .iter()
        .map(String::as_str)
        .filter(|n| n.ends_with("_duration_seconds"))
        .collect();

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut all = BTreeSet::new();
    for file in ["grafana.json", "alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file)).expect(file);
        let names = names_in(&text, &histograms);
        assert!(names.len() >= 8, "{file} names {names:?}");
        for name in &names {
            assert!(
                exported.contains(name),
                "{file} names {name}, which the crate does not export"
            );
        }
        all.extend(names);
    }
    // What the issue asks the alerts and dashboard to cover.
    for needed in [
        "cachefence_queue_lag_seconds",
        "cachefence_queue_dead_lettered_total",
        "cachefence_breaker_open",
        "cachefence_near_ack_timeouts_total",
        "cachefence_fill_timeouts_total",
        "cachefence_hits_total",
        "cachefence_near_cache_bytes",
        "cachefence_redis_errors_total",
        "cachefence_fill_duration_seconds",
        "cachefence_wait_duration_seconds",
    ] {
        assert!(all.contains(needed), "the dashboards don't show {needed}");
    }
}

/// A fresh cache's scrape lists every metric the dashboard and the alert
/// rules name, at zero, before any request: a panel or an alert on a metric
/// that never fired reads 0, not "no data". Made under a recorder local to
/// this thread: building the cache, layering its route and making a queue
/// worker register the metrics, synchronously.
#[tokio::test]
async fn a_fresh_cache_scrape_lists_every_metric_the_dashboards_name() {
    let redis = RedisServer::new();
    let conn = redis.connection_manager().await;
    let client = redis.client();
    let recorder = PrometheusBuilder::new().build_recorder();
    let scrape = recorder.handle();
    let (cache, _app, _worker) = metrics::with_local_recorder(&recorder, || {
        let cache = cache(conn, "fresh:");
        let app: Router = Router::new().route(
            "/p",
            get(|| async { "p" }).layer(cache.layer().name("products")),
        );
        let worker = cache.handle().queue().worker(client);
        (cache, app, worker)
    });
    let text = scrape.render();
    assert_eq!(cache.stats().redis_calls, 0, "no Redis call was made");

    let listed: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let histograms: BTreeSet<&str> = listed
        .iter()
        .copied()
        .filter(|n| n.ends_with("_duration_seconds"))
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    for file in ["grafana.json", "alerts.yml"] {
        let named = names_in(
            &std::fs::read_to_string(root.join(file)).expect(file),
            &histograms,
        );
        for name in named {
            assert!(
                listed.contains(name.as_str()),
                "{file} names {name}, not in a fresh cache's scrape:\n{text}"
            );
        }
    }
    // At zero, under the labels the panels and alerts group by.
    for series in [
        r#"cachefence_near_ack_timeouts_total{cache="fresh:"}"#,
        r#"cachefence_listener_connects_total{cache="fresh:"}"#,
        r#"cachefence_redis_errors_total{cache="fresh:",op="read"}"#,
        r#"cachefence_fills_in_flight{cache="fresh:"}"#,
        r#"cachefence_near_cache_bytes{cache="fresh:"}"#,
        r#"cachefence_breaker_open{cache="fresh:"}"#,
        r#"cachefence_queue_dead_lettered_total{queue="fresh:"}"#,
        r#"cachefence_queue_lag_seconds{queue="fresh:"}"#,
        r#"cachefence_fill_timeouts_total{namespace="fresh:",route="products"}"#,
        r#"cachefence_hits_total{namespace="fresh:",route="products"}"#,
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
    }
}
