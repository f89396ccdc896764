//! The core layer over real HTTP and a real `redis-server`: hits, misses,
//! keys, HTTP rules, body limits, fail-open, per-route TTL, invalidation.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cachefence::{FenceCache, FenceHandle, FenceLayer};
use http_body_util::Full;
use redis::aio::ConnectionManager;
use support::origin::{Counter, routes};
use support::{Http, RedisServer, serve};

struct App {
    addr: SocketAddr,
    counter: Counter,
    handle: FenceHandle<ConnectionManager>,
    http: Http,
}

async fn app(
    redis: &RedisServer,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    app_on(FenceCache::new(redis.connection_manager().await), configure).await
}

/// [`app`] on a cache made with settings.
async fn app_on(
    cache: FenceCache<ConnectionManager>,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    let layer = configure(cache.layer().namespace("core:").beta(0.0));
    let counter = Counter::default();
    let handle = layer.handle();
    let addr = serve(routes(counter.clone()).layer(layer)).await;
    App {
        addr,
        counter,
        handle,
        http: Http::new(),
    }
}

impl App {
    async fn get(&self, path: &str) -> support::Reply {
        self.http.get(self.addr, path).await
    }

    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> support::Reply {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.http
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_miss_is_stored_and_the_next_request_is_a_hit_with_age() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let first = app.get("/item/1").await;
    assert_eq!(first.cache_status(), Some("MISS"));
    assert_eq!(first.text(), "item /item/1 #1");
    let second = app.get("/item/1").await;
    assert_eq!(second.cache_status(), Some("HIT"));
    assert_eq!(second.text(), "item /item/1 #1");
    assert_eq!(second.header("age"), Some("0"));
    assert_eq!(second.header("content-length"), Some("15"));
    assert_eq!(app.counter.get(), 1);
    let stats = app.handle.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.fills, stats.stores),
        (1, 1, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_hit_costs_exactly_one_redis_command() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.get("/item/1").await;
    // The miss: HMGET, then the acquire script and the store script.
    redis.reset_stats();
    let hit = app.get("/item/1").await;
    assert_eq!(hit.cache_status(), Some("HIT"));
    assert_eq!(redis.total_commands(), 1, "{:?}", redis.commandstats());
    assert_eq!(redis.command_count("hmget"), 1);
    // A miss is three round trips: HMGET, the acquire script, the store
    // script (Redis counts the commands inside the scripts separately).
    redis.reset_stats();
    let calls = app.handle.stats().redis_calls;
    let miss = app.get("/item/2").await;
    assert_eq!(miss.cache_status(), Some("MISS"));
    assert_eq!(app.handle.stats().redis_calls - calls, 3);
    // Every command of a cold miss, counted: the lookup's HMGET; ACQUIRE
    // reads only the decision fields (HMGET, no HGETALL of an empty key),
    // TIME, SET NX; then one transaction (MULTI, EXEC): the new entry
    // under the fill's temporary key (HSET, PEXPIRE) and STORE. STORE reads
    // the lease, the URL fence and the newest prefix fence (MGET: there is
    // none, so no ZRANGEBYSCORE of the prefix fences), lists the variant at
    // once and bounds the URL's variants (SADD, and SCARD as it is new: the
    // entry is the host's dimension of the URL), looks for a near mark to
    // carry over and whether the entry is there (HMGET), finds it missing
    // and no near cache registered to mark it for (EXISTS), renames the
    // temporary key into place (RENAME; the body never crosses into Lua)
    // and sets its TTL (PEXPIRE), keeps the variant set out of eviction's
    // reach (TIME, ZADD into the keep set: no PERSIST of a set SADD just
    // created; ZRANGEBYSCORE finds nothing due to reap), drops the lease
    // and finds no waiter mark (one DEL of both): no PUBLISH.
    let want = [
        ("evalsha", 2),
        ("hmget", 3),
        ("time", 2),
        ("set", 1),
        ("multi", 1),
        ("exec", 1),
        ("mget", 1),
        ("zrangebyscore", 1),
        ("scard", 1),
        ("del", 1),
        ("hset", 1),
        ("rename", 1),
        ("pexpire", 2),
        ("sadd", 1),
        ("zadd", 1),
        ("exists", 1),
    ];
    for (cmd, n) in want {
        assert_eq!(
            redis.command_count(cmd),
            n,
            "{cmd}: {:?}",
            redis.commandstats()
        );
    }
    assert_eq!(
        redis.total_commands(),
        want.iter().map(|(_, n)| n).sum::<u64>(),
        "{:?}",
        redis.commandstats()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn head_is_served_from_the_get_entry_and_a_head_miss_stores_nothing() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    // HEAD first: passes through, leaves nothing a GET could be served from.
    let head = app.send("HEAD", "/item/h", &[]).await;
    assert_eq!(head.cache_status(), Some("MISS"));
    assert!(head.body.is_empty());
    let get = app.get("/item/h").await;
    assert_eq!(get.cache_status(), Some("MISS"));
    assert_eq!(get.text(), "item /item/h #2");
    let head = app.send("HEAD", "/item/h", &[]).await;
    assert_eq!(head.cache_status(), Some("HIT"));
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("15"));
    assert_eq!(app.counter.get(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn query_parameters_in_another_order_share_an_entry() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    assert_eq!(
        app.get("/item/q?a=1&b=2").await.cache_status(),
        Some("MISS")
    );
    let other = app.get("/item/q?b=2&a=1").await;
    assert_eq!(other.cache_status(), Some("HIT"));
    assert_eq!(other.text(), "item /item/q?a=1&b=2 #1");
    assert_eq!(
        app.get("/item/q?a=2&b=2").await.cache_status(),
        Some("MISS")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_are_stored_per_vary_header_value() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(app.send("GET", "/vary", &en).await.text(), "lang en #1");
    assert_eq!(app.send("GET", "/vary", &fr).await.text(), "lang fr #2");
    let en_hit = app.send("GET", "/vary", &en).await;
    assert_eq!(
        (en_hit.cache_status(), en_hit.text().as_str()),
        (Some("HIT"), "lang en #1")
    );
    let fr_hit = app.send("GET", "/vary", &fr).await;
    assert_eq!(
        (fr_hit.cache_status(), fr_hit.text().as_str()),
        (Some("HIT"), "lang fr #2")
    );
    let none = app.send("GET", "/vary", &[]).await;
    assert_eq!(
        (none.cache_status(), none.text().as_str()),
        (Some("MISS"), "lang none #3")
    );
    assert_eq!(app.counter.get(), 3);
    // invalidate_path removes every variant.
    assert_eq!(app.handle.invalidate_path("/vary").await.unwrap(), 3);
    assert_eq!(
        app.send("GET", "/vary", &en).await.cache_status(),
        Some("MISS")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_must_not_be_shared_bypass_the_cache() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    for (method, headers) in [
        ("POST", vec![]),
        ("DELETE", vec![]),
        ("GET", vec![("authorization", "Bearer x")]),
        ("GET", vec![("cookie", "session=1")]),
    ] {
        for _ in 0..2 {
            let r = app.send(method, "/item/b", &headers).await;
            assert_eq!(r.cache_status(), Some("BYPASS"), "{method} {headers:?}");
        }
    }
    // Request no-cache is ignored by default: served from the cache.
    app.get("/item/nc").await;
    let r = app
        .send(
            "GET",
            "/item/nc",
            &[("cache-control", "no-cache"), ("pragma", "no-cache")],
        )
        .await;
    assert_eq!(r.cache_status(), Some("HIT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_no_cache_refetches_when_honoured() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.honor_request_no_cache(true)).await;
    app.get("/item/r").await;
    let r = app
        .send("GET", "/item/r", &[("cache-control", "no-cache")])
        .await;
    assert_eq!(
        (r.cache_status(), r.text().as_str()),
        (Some("MISS"), "item /item/r #2")
    );
    let r = app.get("/item/r").await;
    assert_eq!(
        (r.cache_status(), r.text().as_str()),
        (Some("HIT"), "item /item/r #2")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn uncacheable_responses_are_never_stored() {
    let redis = RedisServer::new();
    // No pass marker, so every request shows whether anything was stored.
    let app = app(&redis, |l| l.pass_ttl(Duration::ZERO)).await;
    for path in [
        "/private",
        "/cookie",
        "/nostore",
        "/status/500",
        "/status/201",
    ] {
        for _ in 0..2 {
            let r = app.get(path).await;
            assert_eq!(r.cache_status(), Some("MISS"), "{path}");
        }
    }
    assert_eq!(app.counter.get(), 10);
    let cookie = app.get("/cookie").await;
    assert_eq!(
        cookie.header("set-cookie"),
        Some("session=abc"),
        "the client still gets its cookie"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cacheable_errors_live_for_the_negative_ttl() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.negative_ttl(Duration::from_millis(300))
            .grace(Duration::ZERO)
    })
    .await;
    assert_eq!(app.get("/status/404").await.cache_status(), Some("MISS"));
    let hit = app.get("/status/404").await;
    assert_eq!(
        (hit.status.as_u16(), hit.cache_status()),
        (404, Some("HIT"))
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(app.get("/status/404").await.cache_status(), Some("MISS"));
    // 200s keep the long ttl.
    app.get("/item/long").await;
    assert_eq!(app.get("/item/long").await.cache_status(), Some("HIT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn response_ttl_from_cache_control_and_from_the_handler() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.respect_cache_control(true).grace(Duration::ZERO)
    })
    .await;
    app.get("/maxage/1").await;
    assert_eq!(app.get("/maxage/1").await.cache_status(), Some("HIT"));
    app.get("/ttl/200").await;
    assert_eq!(app.get("/ttl/200").await.cache_status(), Some("HIT"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.get("/ttl/200").await.cache_status(), Some("MISS"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.get("/maxage/1").await.cache_status(), Some("MISS"));
    // Absurd values are capped rather than overflowing.
    app.get("/maxage/99999999999999999999").await;
    assert_eq!(
        app.get("/maxage/99999999999999999999").await.cache_status(),
        Some("HIT")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_entries_are_served_inside_grace_while_one_refresh_runs() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.ttl(Duration::from_millis(200))
            .grace(Duration::from_secs(5))
    })
    .await;
    app.get("/item/s").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stale = app.get("/item/s").await;
    assert_eq!(
        (stale.cache_status(), stale.text().as_str()),
        (Some("STALE"), "item /item/s #1")
    );
    // The background refresh lands shortly.
    let mut refreshed = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = app.get("/item/s").await;
        if r.cache_status() == Some("HIT") {
            refreshed = Some(r);
            break;
        }
    }
    let refreshed = refreshed.expect("the refresh never landed");
    assert_eq!(refreshed.text(), "item /item/s #2");
    assert_eq!(app.counter.get(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_stream_through_uncached_with_flat_memory() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.body_limit(64 * 1024)).await;
    let before = support::peak_rss_kib();
    let r = app.get("/big/256").await;
    assert_eq!(r.body.len(), 256 * 1024 * 1024);
    drop(r);
    // The test client buffers the whole body itself (256 MiB); the cache
    // must add nothing on top of that.
    let grown = support::peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 256 * 1024 + 64 * 1024,
        "peak RSS grew by {grown} KiB"
    );
    let again = app.get("/big/1").await;
    assert_eq!(again.cache_status(), Some("MISS"));
    assert_eq!(
        app.get("/big/1").await.cache_status(),
        Some("BYPASS"),
        "pass marker"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_body_is_not_held_in_memory() {
    // Stream through a raw TCP read that discards the body, so only the
    // cache's own buffering could raise the peak.
    let redis = RedisServer::new();
    let app = app(&redis, |l| l.body_limit(1024 * 1024)).await;
    // CACHEFENCE_STREAM_MIB=1024 for the 1 GiB run.
    let mib: usize = std::env::var("CACHEFENCE_STREAM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let before = support::peak_rss_kib();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!("GET /big/{mib} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert!(total > mib * 1024 * 1024);
    let grown = support::peak_rss_kib().saturating_sub(before);
    eprintln!("streamed {total} bytes; peak RSS grew by {grown} KiB");
    assert!(
        grown < 32 * 1024,
        "peak RSS grew by {grown} KiB while streaming {mib} MiB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_pass_through_when_redis_is_down() {
    let mut redis = RedisServer::new();
    let cache = FenceCache::builder(redis.connection_manager().await)
        .redis_timeout(Duration::from_millis(100))
        .build()
        .expect("cache");
    let app = app_on(cache, |l| l).await;
    app.get("/item/f").await;
    redis.stop();
    for i in 0..10 {
        let r = app.get("/item/f").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.cache_status(), Some("BYPASS"));
        assert_eq!(r.text(), format!("item /item/f #{}", i + 2));
    }
    assert!(app.handle.stats().redis_errors >= 1);
    redis.start();
    // Hits resume by themselves once the breaker's cool-down passes.
    let mut statuses = Vec::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = app.get("/item/f").await;
        assert_eq!(r.status, 200);
        statuses.push(r.cache_status().unwrap_or("").to_owned());
        if statuses.last().map(String::as_str) == Some("HIT") {
            break;
        }
    }
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("HIT"),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn per_route_ttl_comes_from_a_clone_of_the_layer() {
    use axum::routing::get;
    let redis = RedisServer::new();
    let fence = FenceLayer::new(redis.connection_manager().await)
        .namespace("routes:")
        .grace(Duration::ZERO)
        .beta(0.0);
    let counter = Counter::default();
    let c1 = counter.clone();
    let c2 = counter.clone();
    let app = axum::Router::new()
        .route(
            "/long",
            get(move || async move {
                format!(
                    "long {}",
                    c1.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                )
            })
            .layer(fence.clone()),
        )
        .route(
            "/short",
            get(move || async move {
                format!(
                    "short {}",
                    c2.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                )
            })
            .layer(fence.clone().ttl(Duration::from_millis(200))),
        );
    let addr = serve(app).await;
    let http = Http::new();
    http.get(addr, "/long").await;
    http.get(addr, "/short").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http.get(addr, "/long").await.cache_status(), Some("HIT"));
    assert_eq!(http.get(addr, "/short").await.cache_status(), Some("MISS"));
}

#[tokio::test(flavor = "multi_thread")]
async fn invalidate_path_makes_the_next_request_refetch() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.get("/item/42").await;
    assert_eq!(app.get("/item/42").await.cache_status(), Some("HIT"));
    assert_eq!(app.handle.invalidate_path("/item/42").await.unwrap(), 1);
    let r = app.get("/item/42").await;
    assert_eq!(
        (r.cache_status(), r.text().as_str()),
        (Some("MISS"), "item /item/42 #2")
    );
    assert_eq!(app.handle.invalidate_path("/item/none").await.unwrap(), 0);
    // By key, with the query normalised the same way.
    app.get("/item/k?b=1&a=2").await;
    assert_eq!(
        app.handle.invalidate_key("/item/k?a=2&b=1").await.unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_key_function_can_refuse_to_cache() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.key(|parts: &http::request::Parts| {
            let path = parts.uri.path();
            (!path.ends_with("/nocache")).then(|| format!("custom:{path}"))
        })
    })
    .await;
    assert_eq!(
        app.get("/item/nocache").await.cache_status(),
        Some("BYPASS")
    );
    app.get("/item/x?a=1").await;
    // The query is not part of this key.
    assert_eq!(app.get("/item/x?a=2").await.cache_status(), Some("HIT"));
    assert_eq!(
        app.handle.invalidate_key("custom:/item/x").await.unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_status_header_can_be_renamed_or_removed() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| {
        l.status_header(Some(http::HeaderName::from_static("x-fence")))
    })
    .await;
    let r = app.get("/item/h1").await;
    assert_eq!(r.header("x-fence"), Some("MISS"));
    assert_eq!(r.cache_status(), None);
    let app2 = app_with_ns(&redis, "off:", |l| l.status_header(None)).await;
    let r = app2.get("/item/h2").await;
    assert!(r.header("x-cache").is_none() && r.header("x-fence").is_none());
}

async fn app_with_ns(
    redis: &RedisServer,
    ns: &str,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    let ns = ns.to_owned();
    app(redis, move |l| configure(l.namespace(ns))).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_hyper_server_works_through_service_builder() {
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let redis = RedisServer::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let origin = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(format!(
                "hyper {} #{n}",
                req.uri()
            )))))
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(FenceLayer::new(redis.connection_manager().await).namespace("hyper:"))
        .service(origin);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    let http = Http::new();
    assert_eq!(http.get(addr, "/h").await.cache_status(), Some("MISS"));
    let hit = http.get(addr, "/h").await;
    assert_eq!(
        (hit.cache_status(), hit.text().as_str()),
        (Some("HIT"), "hyper /h #1")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_after_the_scripts_were_flushed_loads_them_again() {
    let redis = RedisServer::new();
    let app = app(&redis, |l| l).await;
    app.get("/item/1").await;
    // The store script runs inside a transaction with the fill's temporary
    // key: NOSCRIPT there loads it and sends the transaction again.
    redis.cli(&["SCRIPT", "FLUSH"]);
    let miss = app.get("/item/2").await;
    assert_eq!(miss.cache_status(), Some("MISS"));
    let hit = app.get("/item/2").await;
    assert_eq!(hit.cache_status(), Some("HIT"));
    assert_eq!(app.counter.get(), 2);
    assert_eq!(app.handle.stats().stores, 2);
    // Nothing is left under a temporary key.
    assert_eq!(redis.cli(&["KEYS", "*:new"]).trim(), "");
}
