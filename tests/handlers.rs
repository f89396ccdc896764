//! Handlers: `CacheTtl` and `CacheTags` as axum response parts (feature
//! `axum`), and `DefaultKey`'s query parameter filters.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use cachefence::key::DefaultKey;
use cachefence::{CacheTags, CacheTtl, FenceCache};
use support::{Http, RedisServer, serve};

async fn tagged() -> impl IntoResponse {
    (
        CacheTtl(Duration::from_secs(7)),
        CacheTags(vec!["product:42".into()]),
        CacheTags(vec!["products".into()]),
        "product 42",
    )
}

async fn uncached() -> impl IntoResponse {
    (CacheTtl(Duration::ZERO), "fresh every time")
}

#[tokio::test]
async fn response_parts_set_the_ttl_and_the_tags() {
    let redis = RedisServer::new();
    let cache = FenceCache::builder(redis.connection_manager().await)
        .namespace("h:")
        .build()
        .expect("cache");
    let app = Router::new()
        .route("/tagged", get(tagged))
        .route("/uncached", get(uncached))
        .layer(cache.layer());
    let addr = serve(app).await;
    let http = Http::new();

    assert_eq!(http.get(addr, "/tagged").await.cache_status(), Some("MISS"));
    assert_eq!(http.get(addr, "/tagged").await.cache_status(), Some("HIT"));
    let keys = redis.cli(&["KEYS", "h*tagged*"]);
    // The entry (its variant set has no TTL: see tests/eviction.rs).
    let key = keys
        .lines()
        .find(|k| !k.ends_with(":vars") && !k.ends_with(":lease"))
        .unwrap()
        .to_owned();
    let ttl: u64 = redis.cli(&["TTL", &key]).trim().parse().unwrap();
    // 7 s fresh + 30 s grace.
    assert!(ttl > 30 && ttl <= 37, "ttl {ttl}");
    // Both parts' tags were kept: either invalidates the entry.
    assert_eq!(cache.handle().invalidate_tag("products").await.unwrap(), 1);
    assert_eq!(http.get(addr, "/tagged").await.cache_status(), Some("MISS"));
    assert_eq!(
        cache.handle().invalidate_tag("product:42").await.unwrap(),
        1
    );

    // A zero TTL: never stored.
    for _ in 0..2 {
        let reply = http.get(addr, "/uncached").await;
        assert_eq!(reply.status, 200);
        assert_ne!(reply.cache_status(), Some("HIT"));
    }
    assert_eq!(cache.stats().stores, 2);
}

#[tokio::test]
async fn ignored_and_only_query_params_leave_the_key() {
    let redis = RedisServer::new();
    let cache = FenceCache::new(redis.connection_manager().await);
    let calls = Arc::new(AtomicUsize::new(0));
    let count = |calls: Arc<AtomicUsize>| {
        get(move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            "ok"
        })
    };
    let app = Router::new()
        .route(
            "/ignore",
            count(calls.clone()).layer(
                cache
                    .layer()
                    .key(DefaultKey::new().ignore_query_params(["utm_*", "fbclid"])),
            ),
        )
        .route(
            "/only",
            count(calls.clone()).layer(
                cache
                    .layer()
                    .key(DefaultKey::new().only_query_params(["page"])),
            ),
        );
    let addr = serve(app).await;
    let http = Http::new();

    for (path, status) in [
        ("/ignore?id=1&utm_source=mail", "MISS"),
        ("/ignore?id=1", "HIT"),
        ("/ignore?fbclid=x&utm_medium=y&id=1", "HIT"),
        ("/ignore?id=2", "MISS"),
        ("/only?page=1&session=abc", "MISS"),
        ("/only?session=def&page=1", "HIT"),
        ("/only?page=2", "MISS"),
        ("/only", "MISS"),
        ("/only?session=x", "HIT"),
    ] {
        assert_eq!(
            http.get(addr, path).await.cache_status(),
            Some(status),
            "{path}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}
