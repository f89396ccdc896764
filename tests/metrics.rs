//! Metrics (feature `metrics`): the example's app, scraped over HTTP after a
//! short stampede. One test per binary: the recorder is process-wide.

mod support;

#[allow(dead_code)]
#[path = "../examples/metrics.rs"]
mod example;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cachefence::{BreakerState, FenceLayer};
use support::{Http, RedisServer, serve};

/// The value of the sample whose line starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrape_after_a_stampede_counts_one_fill() {
    let prometheus = example::install_prometheus().expect("recorder");
    let redis = RedisServer::new();
    let fence = FenceLayer::new(redis.connection_manager().await).namespace("m:");
    let handle = fence.handle();
    let calls = Arc::new(AtomicU64::new(0));
    let addr = serve(example::app(fence, prometheus, calls.clone())).await;
    let http = Http::new();

    let stampede = (0..50).map(|_| http.get(addr, "/products/1"));
    for reply in futures_util::future::join_all(stampede).await {
        assert_eq!(reply.status, 200);
    }
    for _ in 0..10 {
        assert_eq!(
            http.get(addr, "/products/1").await.cache_status(),
            Some("HIT")
        );
    }
    assert_eq!(calls.load(Ordering::Relaxed), 1);

    let text = http.get(addr, "/metrics").await.text();
    let labels = r#"{namespace="m:",route="products"}"#;
    let stats = handle.stats();
    assert_eq!(stats.breaker, BreakerState::Closed);
    // Every Stats field the traffic touched, with the same values.
    for (field, value) in [
        ("fills", stats.fills),
        ("stores", stats.stores),
        ("misses", stats.misses),
        ("hits", stats.hits),
    ] {
        let series = format!("cachefence_{field}_total{labels}");
        assert_eq!(
            sample(&text, &series),
            Some(value as f64),
            "{series} in\n{text}"
        );
    }
    assert_eq!(stats.fills, 1);
    assert!(stats.hits >= 10);
    assert_eq!(stats.misses + stats.hits, 60);
    // Histograms: one fill, Redis calls by op, waits of the joiners.
    assert_eq!(
        sample(
            &text,
            &format!("cachefence_fill_duration_seconds_count{labels}")
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"cachefence_redis_call_duration_seconds_count{cache="cachefence:",op="read"}"#
        )
        // One read per hit (10) and by the leader; the 49 joiners read
        // Redis only if they came before the fill was calling the origin
        // (after that they join it without a lookup).
        .is_some_and(|n| (11.0..=60.0).contains(&n)),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"cachefence_redis_calls_total{cache="cachefence:",op="store"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("cachefence_wait_duration_seconds_count"),
        "{text}"
    );
    // Gauges: the breaker is closed, no fill is left in flight.
    assert_eq!(
        sample(&text, r#"cachefence_fills_in_flight{cache="cachefence:"}"#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"cachefence_breaker_open{cache="cachefence:"}"#),
        Some(0.0),
        "{text}"
    );

    // Redis goes away: the breaker opens, in Stats and in the gauge.
    let mut redis = redis;
    redis.stop();
    for i in 0..10 {
        let reply = http.get(addr, &format!("/products/{}", 100 + i)).await;
        assert_eq!(reply.status, 200);
    }
    // Open, or half open when the machine is slow enough for the cool-down to end.
    assert_ne!(handle.stats().breaker, BreakerState::Closed);
    let text = http.get(addr, "/metrics").await.text();
    assert_eq!(
        sample(&text, r#"cachefence_breaker_open{cache="cachefence:"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"cachefence_redis_errors_total{cache="cachefence:",op="read"}"#
        )
        .is_some_and(|n| n >= 5.0),
        "{text}"
    );
    println!(
        "{}",
        text.lines()
            .filter(|l| l.starts_with("cachefence_") && !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
