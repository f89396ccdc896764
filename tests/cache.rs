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
    let cache = FenceCache::builder(redis.connection_manager().await)
        .namespace("shop:")
        .wake_ups(redis.client())
        .build()
        .expect("cache");
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
    let cache = FenceCache::builder(redis.connection_manager().await)
        .circuit_breaker(2, Duration::from_secs(60))
        .wake_ups(redis.client())
        .build()
        .expect("cache");
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
    let cache = layer.cache();
    let addr = serve(Router::new().route("/x", get(|| async { "x" }).layer(layer))).await;
    let http = Http::new();
    http.get(addr, "/x").await;
    assert_eq!(http.get(addr, "/x").await.cache_status(), Some("HIT"));
    assert_eq!(cache.stats().hits, 1);
    assert_eq!(cache.handle().namespace(), "one:");
}

// ---------------------------------------------------------------------------
// The builder: every misconfiguration is an error at build time, whose
// message names the setting and the fix.
// ---------------------------------------------------------------------------

/// The error `build` returns for `builder`, checked to be a configuration
/// error naming each of `names`.
fn config_error<C>(builder: cachefence::FenceCacheBuilder<C>, names: &[&str]) -> String
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let err = builder.build().expect_err("a misconfiguration");
    assert!(err.is_config(), "{err:?}");
    assert!(!err.is_redis() && !err.is_invalid_input(), "{err:?}");
    let message = err.to_string();
    for name in names {
        assert!(message.contains(name), "{message:?} should name {name:?}");
    }
    message
}

#[tokio::test]
async fn a_near_cache_without_wake_ups_is_an_error_naming_wake_ups() {
    let redis = RedisServer::new();
    let builder = FenceCache::builder(redis.connection_manager().await).near_cache(1 << 20);
    config_error(
        builder,
        &["near_cache without wake-ups", "wake_ups(client)"],
    );
    // With them it builds, and the near cache is there.
    let cache = FenceCache::builder(redis.connection_manager().await)
        .near_cache(1 << 20)
        .wake_ups(redis.client())
        .build()
        .expect("near cache with wake-ups");
    assert_eq!(cache.stats().near_hits, 0);
}

#[tokio::test]
async fn a_near_cache_of_zero_bytes_is_an_error() {
    let redis = RedisServer::new();
    let builder = FenceCache::builder(redis.connection_manager().await)
        .wake_ups(redis.client())
        .near_cache(0);
    config_error(builder, &["near_cache(0)"]);
}

#[tokio::test]
async fn a_zero_or_absurd_redis_timeout_is_an_error() {
    let redis = RedisServer::new();
    let conn = redis.connection_manager().await;
    let zero = FenceCache::builder(conn.clone()).redis_timeout(Duration::ZERO);
    config_error(zero, &["redis_timeout(0ns)", "above zero"]);
    let absurd = FenceCache::builder(conn).redis_timeout(Duration::from_secs(250 * 3600));
    config_error(absurd, &["redis_timeout", "at most an hour"]);
}

#[tokio::test]
async fn a_breaker_of_zero_failures_or_zero_cooldown_is_an_error() {
    let redis = RedisServer::new();
    let conn = redis.connection_manager().await;
    let never = FenceCache::builder(conn.clone()).circuit_breaker(0, Duration::from_secs(1));
    config_error(never, &["circuit_breaker(0, ..)", "u32::MAX"]);
    let no_cooldown = FenceCache::builder(conn).circuit_breaker(5, Duration::ZERO);
    config_error(no_cooldown, &["circuit_breaker(.., 0ns)", "cool-down"]);
}

#[tokio::test]
async fn replicated_fences_of_zero_replicas_or_zero_timeout_is_an_error() {
    let redis = RedisServer::new();
    let conn = redis.connection_manager().await;
    let none = FenceCache::builder(conn.clone()).replicated_fences(0, Duration::from_millis(100));
    config_error(
        none,
        &["replicated_fences(0, ..)", "leave replicated_fences out"],
    );
    let forever = FenceCache::builder(conn).replicated_fences(1, Duration::ZERO);
    config_error(
        forever,
        &["replicated_fences(.., 0ns)", "WAIT 0 blocks forever"],
    );
}

#[tokio::test]
async fn a_second_wake_up_source_is_an_error() {
    let redis = RedisServer::new();
    let twice = FenceCache::builder(redis.connection_manager().await)
        .wake_ups(redis.client())
        .wake_ups(redis.client());
    config_error(twice, &["wake_ups after wake_ups", "keep one"]);
}

#[tokio::test]
async fn the_first_misconfiguration_is_the_one_reported() {
    let redis = RedisServer::new();
    let builder = FenceCache::builder(redis.connection_manager().await)
        .redis_timeout(Duration::ZERO)
        .circuit_breaker(0, Duration::from_secs(1))
        .near_cache(0);
    let message = config_error(builder, &["redis_timeout"]);
    assert!(!message.contains("circuit_breaker"), "{message}");
}

#[tokio::test]
async fn wake_ups_on_a_cluster_are_an_error_naming_cluster_wake_ups() {
    let redis = RedisServer::new();
    // A connection said to be a cluster's (a wrapper would be).
    let builder = FenceCache::builder(redis.connection_manager().await)
        .cluster(true)
        .wake_ups(redis.client());
    config_error(
        builder,
        &["wake_ups on a Redis Cluster", "cluster_wake_ups"],
    );
}

#[cfg(feature = "cluster-async")]
#[tokio::test]
async fn a_cluster_client_that_fails_to_build_is_an_error_not_polling() {
    let redis = RedisServer::new();
    let builder = FenceCache::builder(redis.connection_manager().await)
        .cluster(true)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(vec![
            "not a redis url",
        ]));
    config_error(
        builder,
        &["cluster_wake_ups", "could not be built", "node URLs"],
    );
}

#[cfg(feature = "cluster-async")]
#[tokio::test]
async fn cluster_wake_ups_on_a_single_server_is_an_error() {
    let redis = RedisServer::new();
    let builder = FenceCache::builder(redis.connection_manager().await)
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(vec![redis.url()]));
    config_error(
        builder,
        &["not a Redis Cluster's", "use wake_ups", "cluster(true)"],
    );
}

#[cfg(feature = "cluster-async")]
#[tokio::test]
async fn cluster_wake_ups_after_wake_ups_is_an_error() {
    let redis = RedisServer::new();
    let builder = FenceCache::builder(redis.connection_manager().await)
        .cluster(true)
        .wake_ups(redis.client())
        .cluster_wake_ups(redis::cluster::ClusterClientBuilder::new(vec![redis.url()]));
    config_error(builder, &["cluster_wake_ups after wake_ups"]);
}

/// `cluster(true)` on a connection the cache can't recognise as a cluster's
/// (here a single server's), with nothing to reach every primary: a walk
/// would cover one node, so `build` refuses and names the fix.
#[tokio::test]
async fn cluster_true_without_a_way_to_every_primary_is_an_error() {
    let redis = RedisServer::new();
    let builder = FenceCache::builder(redis.connection_manager().await).cluster(true);
    config_error(
        builder,
        &[
            "cluster(true) on a connection not recognised as a Redis Cluster's",
            "every primary",
            "add cluster_wake_ups",
        ],
    );
}

#[tokio::test]
async fn the_builder_settings_reach_the_cache() {
    let mut redis = RedisServer::new();
    let cache = FenceCache::builder(redis.connection_manager().await)
        .namespace("built:")
        .circuit_breaker(1, Duration::from_secs(60))
        .build()
        .expect("cache");
    assert_eq!(cache.handle().namespace(), "built:");
    let addr = serve(app(&cache)).await;
    let http = Http::new();
    redis.stop();
    // One failure opens this breaker (the default needs five).
    assert_eq!(http.get(addr, "/products/1").await.status, 200);
    assert_eq!(cache.stats().breaker, BreakerState::Open);
}
