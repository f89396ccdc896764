//! One cache, many routes: `FenceCache` owns the connection and the
//! cache-wide settings; each route's layer comes from it.

mod support;

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use cachefence::{BreakerState, FenceCache, FenceHandle, FenceLayer};
use support::{Http, RedisServer, serve};

/// An axum state struct: the handle's connection type defaults to
/// `ConnectionManager`, so it needs no parameter.
#[derive(Clone)]
struct AppState {
    #[allow(dead_code)]
    cache: FenceHandle,
}

fn app(cache: &FenceCache) -> Router {
    let state = AppState {
        cache: cache.handle(),
    };
    Router::new()
        .route(
            "/products/{id}",
            get(|| async { "product" }).layer(cache.layer().name("products")),
        )
        .route(
            "/prices",
            get(|| async { "prices" })
                .layer(cache.layer().name("prices").ttl(Duration::from_secs(5))),
        )
        .with_state(state)
}

#[tokio::test]
async fn routes_of_one_cache_share_counters_namespace_and_handle() {
    let redis = RedisServer::new();
    let cache = FenceCache::new(redis.connection_manager().await)
        .namespace("shop:")
        .wake_ups(redis.client());
    let addr = serve(app(&cache)).await;
    let http = Http::new();
    for path in ["/products/1", "/prices"] {
        assert_eq!(http.get(addr, path).await.cache_status(), Some("MISS"));
        assert_eq!(http.get(addr, path).await.cache_status(), Some("HIT"));
    }
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.stores), (2, 2, 2));
    // Both routes wrote under the cache's namespace; its handle reaches both.
    assert_eq!(cache.handle().namespace(), "shop:");
    assert_eq!(cache.handle().invalidate_all().await.unwrap(), 2);
    assert_eq!(http.get(addr, "/prices").await.cache_status(), Some("MISS"));
    // The per-route TTL: the prices entry lives 5 s (+ 30 s grace).
    let keys = redis.cli(&["KEYS", "shop*prices*"]);
    let key = keys
        .lines()
        // (Not its variant set or fence: they have no TTL, see tests/eviction.rs.)
        .find(|k| !k.ends_with(":lease") && !k.ends_with(":vars") && !k.ends_with(":fence"))
        .unwrap()
        .to_owned();
    let ttl: u64 = redis.cli(&["TTL", &key]).trim().parse().unwrap();
    assert!(ttl <= 35 && ttl > 30, "ttl {ttl}");
}

#[tokio::test]
async fn the_breaker_is_the_caches_and_every_route_sees_it() {
    let mut redis = RedisServer::new();
    let cache = FenceCache::new(redis.connection_manager().await)
        .circuit_breaker(2, Duration::from_secs(60))
        // A second wake-up client is ignored, not a panic.
        .wake_ups(redis.client())
        .wake_ups(redis.client());
    let addr = serve(app(&cache)).await;
    let http = Http::new();
    redis.stop();
    for _ in 0..3 {
        // Redis is gone: the origin answers.
        assert_eq!(http.get(addr, "/products/1").await.status, 200);
    }
    assert_eq!(cache.stats().breaker, BreakerState::Open);
    // The other route bypasses too, without a Redis call.
    let calls = cache.stats().redis_calls;
    assert_eq!(
        http.get(addr, "/prices").await.cache_status(),
        Some("BYPASS")
    );
    assert_eq!(cache.stats().redis_calls, calls);
}

#[tokio::test]
async fn fence_layer_new_is_still_the_one_liner_and_knows_its_cache() {
    let redis = RedisServer::new();
    let layer = FenceLayer::new(redis.connection_manager().await).namespace("one:");
    let _ = layer.cache().redis_timeout(Duration::from_millis(500));
    let cache = layer.cache();
    let addr = serve(Router::new().route("/x", get(|| async { "x" }).layer(layer))).await;
    let http = Http::new();
    http.get(addr, "/x").await;
    assert_eq!(http.get(addr, "/x").await.cache_status(), Some("HIT"));
    assert_eq!(cache.stats().hits, 1);
    assert_eq!(cache.handle().namespace(), "one:");
}
