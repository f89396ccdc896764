//! Metrics for operators (feature `metrics`): HELP text on every metric,
//! two caches in one process kept apart by their `cache` label, and the
//! shipped dashboards naming only metrics the crate exports. The recorder
//! is process-wide: one test per binary installs it.

mod support;

use axum::Router;
use axum::routing::get;
use cachefence::FenceCache;
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
    FenceCache::new(conn).namespace(namespace)
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
    let text = prometheus.render();

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
