//! The purge endpoint: `FenceHandle::purge_service` mounted in axum, called
//! over HTTP.

mod support;

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use cachefence::FenceCache;
use http_body_util::Full;
use support::{Http, RedisServer, Reply, serve};

const TOKEN: &str = "Bearer s3cret";

async fn setup(redis: &RedisServer) -> (SocketAddr, FenceCache) {
    let cache = FenceCache::builder(redis.connection_manager().await)
        .namespace("purge:")
        .build()
        .expect("cache");
    let purge = cache
        .handle()
        .purge_service(|parts: &http::request::Parts| {
            parts
                .headers
                .get("authorization")
                .is_some_and(|v| v == TOKEN)
        });
    let app = Router::new()
        .route(
            "/products/{id}",
            get(
                |axum::extract::Path(id): axum::extract::Path<u32>| async move {
                    (
                        [("cache-tag", format!("product:{id} products"))],
                        format!("product {id}"),
                    )
                },
            )
            .layer(cache.layer()),
        )
        .route("/other", get(|| async { "other" }).layer(cache.layer()))
        .route_service("/admin/purge", purge);
    (serve(app).await, cache)
}

async fn purge(
    http: &Http,
    addr: SocketAddr,
    method: &str,
    query: &str,
    token: Option<&str>,
) -> Reply {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}/admin/purge{query}"));
    if let Some(token) = token {
        req = req.header("authorization", token);
    }
    http.request(req.body(Full::new(Bytes::new())).unwrap())
        .await
}

async fn warm(http: &Http, addr: SocketAddr) {
    for path in ["/products/1", "/products/2", "/other"] {
        http.get(addr, path).await;
        assert_eq!(
            http.get(addr, path).await.cache_status(),
            Some("HIT"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_purge_without_authorisation_is_refused_and_removes_nothing() {
    let redis = RedisServer::new();
    let (addr, _cache) = setup(&redis).await;
    let http = Http::new();
    warm(&http, addr).await;
    for token in [None, Some("Bearer wrong")] {
        let reply = purge(&http, addr, "POST", "?all", token).await;
        assert_eq!(reply.status, 403, "{}", reply.text());
    }
    // Refused before anything else is looked at: a bad query gets 403 too.
    assert_eq!(
        purge(&http, addr, "POST", "?nonsense", None).await.status,
        403
    );
    assert_eq!(
        http.get(addr, "/products/1").await.cache_status(),
        Some("HIT")
    );
}

#[tokio::test]
async fn bad_purge_calls_get_a_clear_4xx() {
    let redis = RedisServer::new();
    let (addr, _cache) = setup(&redis).await;
    let http = Http::new();
    let reply = purge(&http, addr, "GET", "?all", Some(TOKEN)).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST, PURGE"));
    for (query, says) in [
        ("", "name one of"),
        ("?path=", "must not be empty"),
        ("?path=/a&tag=b", "exactly one"),
        ("?all&soft", "can't be soft"),
        ("?colour=red", "unknown parameter"),
        ("?tag=t&soft=maybe", "soft must be"),
    ] {
        let reply = purge(&http, addr, "POST", query, Some(TOKEN)).await;
        assert_eq!(reply.status, 400, "{query}");
        assert!(reply.text().contains(says), "{query}: {}", reply.text());
    }
}

#[tokio::test]
async fn each_kind_of_purge_removes_what_it_names() {
    let redis = RedisServer::new();
    let (addr, _cache) = setup(&redis).await;
    let http = Http::new();
    let status = |path: &'static str| {
        let http = http.clone();
        async move { http.get(addr, path).await.cache_status().map(str::to_owned) }
    };
    // (query, body, then the cache status of /products/1, /products/2, /other)
    let cases: [(&str, &str, [&str; 3]); 7] = [
        (
            "?path=/products/1",
            "{\"removed\":1}",
            ["MISS", "HIT", "HIT"],
        ),
        (
            "?key=/products/2",
            "{\"removed\":1}",
            ["HIT", "MISS", "HIT"],
        ),
        (
            "?prefix=/products/",
            "{\"removed\":2}",
            ["MISS", "MISS", "HIT"],
        ),
        (
            "?tag=product%3A2",
            "{\"removed\":1}",
            ["HIT", "MISS", "HIT"],
        ),
        (
            "?tag=products&soft",
            "{\"removed\":2}",
            ["STALE", "STALE", "HIT"],
        ),
        (
            "?path=/other&soft=true",
            "{\"removed\":1}",
            ["HIT", "HIT", "STALE"],
        ),
        ("?all", "{\"removed\":3}", ["MISS", "MISS", "MISS"]),
    ];
    for (i, (query, body, after)) in cases.into_iter().enumerate() {
        redis.cli(&["FLUSHALL"]);
        warm(&http, addr).await;
        let method = if i % 2 == 0 { "POST" } else { "PURGE" };
        let reply = purge(&http, addr, method, query, Some(TOKEN)).await;
        assert_eq!(reply.status, 200, "{query}: {}", reply.text());
        assert_eq!(reply.text().trim(), body, "{query}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        for (path, expected) in ["/products/1", "/products/2", "/other"]
            .into_iter()
            .zip(after)
        {
            assert_eq!(
                status(path).await.as_deref(),
                Some(expected),
                "{query} then {path}"
            );
        }
    }
}

#[tokio::test]
async fn a_purge_while_redis_is_down_answers_503() {
    let mut redis = RedisServer::new();
    let (addr, _cache) = setup(&redis).await;
    let http = Http::new();
    redis.stop();
    let reply = purge(&http, addr, "POST", "?tag=products", Some(TOKEN)).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.text().contains("retry"));
}
