//! Bounded state and graceful shutdown.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use cachefence::FenceLayer;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use support::RedisServer;
use tower::{Layer, ServiceExt};

fn slow_origin(
    delay: Duration,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(req.uri().to_string()))))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_in_flight_table_is_empty_again_after_many_distinct_keys() {
    let n: usize = std::env::var("CACHEFENCE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let redis = RedisServer::new();
    let layer = FenceLayer::new(redis.connection_manager().await).namespace("mem:");
    let svc = layer.layer(slow_origin(Duration::from_millis(1)));
    let mut pending = Vec::new();
    let mut peak = 0;
    for i in 0..n {
        let svc = svc.clone();
        pending.push(tokio::spawn(async move {
            let req = Request::get(format!("/k/{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let res = svc.oneshot(req).await.unwrap();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("/k/{i}"));
        }));
        if pending.len() == 256 {
            peak = peak.max(layer.handle().stats().in_flight);
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    let stats = layer.handle().stats();
    eprintln!("{n} keys: peak in-flight {peak}, after: {stats:?}");
    assert_eq!(stats.in_flight, 0);
    assert!(peak <= 256);
    assert_eq!(stats.fills as usize, n);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_releases_the_leases_of_fills_that_do_not_finish() {
    let redis = RedisServer::new();
    let layer = FenceLayer::new(redis.connection_manager().await)
        .namespace("down:")
        .lock_timeout(Duration::from_secs(30));
    let svc = layer.layer(slow_origin(Duration::from_millis(1_500)));
    let request = |path: &str| {
        let svc = svc.clone();
        let req = Request::get(path).body(Full::new(Bytes::new())).unwrap();
        async move {
            let res = svc.oneshot(req).await.unwrap();
            let status = res.headers()["x-cache"].to_str().unwrap().to_owned();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    };
    let slow = tokio::spawn(request("/slow"));
    let mut lease = String::new();
    for _ in 0..100 {
        lease = redis.cli(&["KEYS", "down:*:lease"]);
        if !lease.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!lease.is_empty(), "the fill never took its lease");
    let released = layer.handle().shutdown(Duration::from_millis(100)).await;
    assert_eq!(released, 1);
    assert_eq!(
        redis.cli(&["KEYS", "down:*:lease"]),
        "",
        "no lease left behind"
    );
    // The request in flight is still answered, and new ones bypass.
    let (status, body) = slow.await.unwrap();
    assert_eq!((status.as_str(), &body[..]), ("MISS", &b"/slow"[..]));
    let (status, _) = request("/other").await;
    assert_eq!(status, "BYPASS");
}
