//! Tracing: a span per cached request with its cache status, no query in
//! any field, warnings of a failing Redis rate-limited, the breaker's
//! opening and closing logged once each.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use cachefence::{FenceCache, FenceLayer};
use http::{Request, Response};
use support::RedisServer;
use support::capture::Captured;
use tower::{Layer, Service, ServiceExt, service_fn};
use tracing_subscriber::fmt::format::FmtSpan;

/// Captures `cachefence` events and span closes at DEBUG for this thread
/// (the tests run on a current-thread runtime, so spawned fills too).
fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    support::capture::capture("cachefence=debug", FmtSpan::CLOSE)
}

fn origin()
-> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future: Send + 'static>
+ Clone
+ Send
+ 'static {
    service_fn(|req: Request<String>| async move { Ok(Response::new(format!("{}", req.uri()))) })
}

async fn get<S>(svc: &S, uri: &str) -> http::StatusCode
where
    S: Service<Request<String>, Error = Infallible> + Clone,
    S::Response: Into<Response<cachefence::FenceBody<String>>>,
{
    let res = svc
        .clone()
        .oneshot(Request::get(uri).body(String::new()).unwrap())
        .await
        .unwrap();
    res.into().status()
}

#[tokio::test]
async fn a_request_span_carries_the_cache_status_and_no_query() {
    let (captured, _guard) = capture();
    let redis = RedisServer::new();
    let fence = FenceLayer::new(redis.connection_manager().await).name("search");
    let svc = fence.layer(origin());
    let uri = "/search?email=alice%40example.com&q=secret";
    assert_eq!(get(&svc, uri).await, 200);
    assert_eq!(get(&svc, uri).await, 200);

    let text = captured.text();
    let closes: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("cachefence.request{")
                && !l.contains("cachefence.fill{")
                && l.contains("close")
        })
        .collect();
    assert_eq!(closes.len(), 2, "{text}");
    assert!(
        closes[0].contains("route=search") && closes[0].contains("/search"),
        "{text}"
    );
    assert!(closes[0].contains("MISS"), "{text}");
    assert!(closes[1].contains("HIT"), "{text}");
    // The fill span exists, and nothing anywhere shows the query.
    assert!(text.contains("cachefence.fill{"), "{text}");
    assert!(
        !text.contains("alice") && !text.contains("secret"),
        "{text}"
    );
}

#[tokio::test]
async fn failing_redis_warns_once_a_second_and_the_breaker_logs_open_and_close_once() {
    let (captured, _guard) = capture();
    let mut redis = RedisServer::new();
    let conn = redis.connection_manager().await;
    // A breaker that never opens: every request tries Redis and fails.
    let never_open = FenceCache::builder(conn.clone())
        .circuit_breaker(u32::MAX, Duration::from_secs(1))
        .build()
        .expect("cache")
        .layer();
    let svc = never_open.layer(origin());
    redis.stop();
    let started = std::time::Instant::now();
    for i in 0..40 {
        assert_eq!(get(&svc, &format!("/k/{i}")).await, 200);
    }
    let seconds = started.elapsed().as_secs() as usize;
    let warnings = captured.count("WARN");
    assert!(
        warnings >= 1 && warnings <= seconds + 1,
        "{warnings} warnings in {seconds} s:\n{}",
        captured.text()
    );

    // The default-sized breaker, with a short cool-down.
    let fence = FenceCache::builder(conn)
        .circuit_breaker(3, Duration::from_millis(100))
        .build()
        .expect("cache")
        .layer();
    let svc = fence.layer(origin());
    for i in 0..20 {
        assert_eq!(get(&svc, &format!("/b/{i}")).await, 200);
        if i % 5 == 0 {
            // Let cool-downs end, so probes fail and re-open it.
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    }
    assert_eq!(
        captured.count("circuit breaker opened"),
        1,
        "{}",
        captured.text()
    );
    redis.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while captured.count("circuit breaker closed") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "never closed:\n{}",
            captured.text()
        );
        get(&svc, "/b/again").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..10 {
        get(&svc, &format!("/c/{i}")).await;
    }
    assert_eq!(
        captured.count("circuit breaker opened"),
        1,
        "{}",
        captured.text()
    );
    assert_eq!(
        captured.count("circuit breaker closed"),
        1,
        "{}",
        captured.text()
    );
}
