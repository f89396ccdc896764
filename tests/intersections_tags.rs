//! Tags are never lost (issue 21, must-hold 1), on one Redis server: whatever
//! happens between a tagged store and `invalidate_tag` (a namespace walk, a
//! revalidation answered by a bare `304`, a shorter-lived variant of the
//! URL), the tag invalidation reaches the entry; and a path invalidation of
//! a URL with more variants than one call's batches removes them all.
//! Real `redis-server`, real HTTP (axum app, hyper client), default
//! settings unless the test is about one.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use cachefence::{CacheTtl, FenceHandle, FenceLayer};
use http_body_util::Full;
use redis::aio::ConnectionManager;
use support::{Http, RedisServer, serve};

/// What the origin sees: the version it serves (also its `ETag`), its
/// calls, and how many of them it answered `304 Not Modified`.
#[derive(Clone, Default)]
struct World {
    version: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
}

/// Answers `<version> /<path>`, tagged `all` and with the path's first
/// segment (`Cache-Tag`), with `ETag: "<version>"`. A request whose
/// `If-None-Match` names the current version gets a bare `304` (no tags,
/// as handlers answer). `?ttl_ms=N` sets the entry's TTL ([`CacheTtl`]).
/// Under `/lang/` the response varies on `Accept-Language`, and the `fr`
/// variant lives 300 ms.
async fn origin(State(world): State<World>, Path(path): Path<String>, req: Request) -> Response {
    world.calls.fetch_add(1, Ordering::SeqCst);
    let version = world.version.load(Ordering::SeqCst);
    let etag = format!("\"{version}\"");
    let headers: &HeaderMap = req.headers();
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        world.not_modified.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let first = path.split('/').next().unwrap_or_default().to_owned();
    let lang = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let mut res = (
        [
            (header::ETAG, etag),
            (
                header::HeaderName::from_static("cache-tag"),
                format!("all {first}"),
            ),
        ],
        format!("{version} /{path}"),
    )
        .into_response();
    let mut ttl = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("ttl_ms=")))
        .and_then(|v| v.parse::<u64>().ok());
    if first == "lang" {
        res.headers_mut().insert(
            header::VARY,
            header::HeaderValue::from_static("accept-language"),
        );
        if lang == "fr" {
            ttl = Some(300);
        }
    }
    if let Some(ms) = ttl {
        res.extensions_mut()
            .insert(CacheTtl(Duration::from_millis(ms)));
    }
    res
}

struct App {
    addr: SocketAddr,
    world: World,
    handle: FenceHandle<ConnectionManager>,
    http: Http,
}

async fn app(
    redis: &RedisServer,
    ns: &str,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    let layer = configure(FenceLayer::new(redis.connection_manager().await).namespace(ns));
    let world = World::default();
    let handle = layer.handle();
    let router = Router::new()
        .route("/{*path}", get(origin).layer(layer))
        .with_state(world.clone());
    App {
        addr: serve(router).await,
        world,
        handle,
        http: Http::new(),
    }
}

impl App {
    async fn get(&self, path: &str) -> (String, String) {
        self.get_with(path, &[]).await
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (String, String) {
        let mut req = http::Request::get(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let reply = self
            .http
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        (
            reply.cache_status().unwrap_or_default().to_owned(),
            reply.text(),
        )
    }

    fn bump(&self) -> u64 {
        self.world.version.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// The version a body names.
fn version_of(body: &str) -> u64 {
    body.split(' ').next().unwrap().parse().unwrap()
}

/// Issue 21, row 1: a tagged URL stored while `invalidate_all` walks the
/// namespace (after the walk passed its part of the keyspace) stays in its
/// tag's index: the walk removes only what it invalidated, and no tag
/// fence either.
#[tokio::test(flavor = "multi_thread")]
async fn an_entry_stored_while_invalidate_all_walks_is_still_reached_by_its_tag() {
    const NS: &str = "walktag:";
    const FILLER: usize = 15_000;
    let redis = RedisServer::new();
    let app = app(&redis, NS, |l| l).await;
    // A fence of another tag, set before the walk: the walk leaves it.
    app.handle.invalidate_tag("other").await.unwrap();
    let fences = || redis.cli(&["KEYS", &format!("{NS}|#tag:*:fence")]);
    assert!(fences().contains("other"), "{}", fences());
    // Entries for the walk to remove (so it takes a while): URL keys of the
    // namespace, written straight into Redis.
    let mut conn = redis.connection_manager().await;
    for chunk in (0..FILLER).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("HSET")
                .arg(format!("{NS}|/filler/{i}:{{f{i}}}"))
                .arg("v")
                .arg("1")
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    // Stores of tagged URLs, one after another, while the walk runs.
    let walking = Arc::new(AtomicBool::new(true));
    let stored = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (walking, stored) = (walking.clone(), stored.clone());
        let (addr, http) = (app.addr, app.http.clone());
        tokio::spawn(async move {
            while walking.load(Ordering::SeqCst) {
                let i = stored.load(Ordering::SeqCst);
                let reply = http.get(addr, &format!("/walk/{i}")).await;
                assert_eq!(reply.status, StatusCode::OK);
                stored.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    support::gate::until("stores before the walk", || {
        stored.load(Ordering::SeqCst) >= 2
    })
    .await;
    let started = Instant::now();
    let removed = app.handle.invalidate_all().await.unwrap();
    let walk_took = started.elapsed();
    walking.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    let urls = stored.load(Ordering::SeqCst);
    assert!(removed >= FILLER as u64, "removed {removed}");
    let fence_kept = fences().contains("other");
    // The entries that survived the walk (stored after it passed them) are
    // hits; the others are stored again now.
    let mut survived = 0;
    for i in 0..urls {
        let (status, body) = app.get(&format!("/walk/{i}")).await;
        assert_eq!(version_of(&body), 0);
        if status == "HIT" {
            survived += 1;
        }
    }
    assert!(survived > 0, "no store survived the walk: nothing tested");
    // A new version, and the tag invalidated: every URL is read new.
    let current = app.bump();
    let reached = app.handle.invalidate_tag("walk").await.unwrap();
    let mut stale = 0;
    for i in 0..urls {
        let (_, body) = app.get(&format!("/walk/{i}")).await;
        if version_of(&body) < current {
            stale += 1;
        }
    }
    eprintln!(
        "walk of {removed} entries took {walk_took:?}; {urls} tagged URLs stored during it, \
         {survived} survived it; invalidate_tag reached {reached}; {stale} stale reads; \
         other tag's fence kept: {fence_kept}"
    );
    assert_eq!(
        stale, 0,
        "{stale} of {urls} reads stale after invalidate_tag"
    );
    assert_eq!(reached, urls as u64);
    assert!(fence_kept, "the walk removed a tag fence");
}

/// Issue 21, row 2: an entry kept alive by revalidations answered with a
/// bare `304` (no `Cache-Tag`) stays in its tag's index: FRESHEN extends
/// the index membership with the entry's life, using the tags stored with
/// the entry. A short grace (the setting under test: how long an entry
/// outlives its TTL) lets the index outlive the entry's first life within
/// the test.
#[tokio::test(flavor = "multi_thread")]
async fn an_entry_kept_alive_by_bare_304s_is_still_reached_by_its_tag() {
    const NS: &str = "tag304:";
    let redis = RedisServer::new();
    let app = app(&redis, NS, |l| l.grace(Duration::from_millis(400))).await;
    const PATHS: [&str; 6] = [
        "/rv/0?ttl_ms=300",
        "/rv/1?ttl_ms=300",
        "/rv/2?ttl_ms=300",
        "/rv/3?ttl_ms=300",
        "/rv/4?ttl_ms=300",
        "/rv/5?ttl_ms=300",
    ];
    for path in PATHS {
        assert_eq!(app.get(path).await.0, "MISS");
    }
    let first_life = Instant::now();
    // Read on: a stale read revalidates in the background, the origin
    // answers a bare 304 and the entry lives on (for the layer's TTL: the
    // 304 carries no `CacheTtl`). Go on past the first life of the entries
    // (ttl + grace: 700 ms) and of their index entries, until each entry
    // was revalidated.
    let mut rounds = 0;
    while first_life.elapsed() < Duration::from_millis(1_500)
        || app.world.not_modified.load(Ordering::SeqCst) < PATHS.len()
    {
        for path in PATHS {
            let (status, body) = app.get(path).await;
            assert_ne!(
                status, "MISS",
                "{path} expired: revalidation did not keep it"
            );
            assert_eq!(version_of(&body), 0);
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let revalidated = app.world.not_modified.load(Ordering::SeqCst);
    assert_eq!(
        app.world.calls.load(Ordering::SeqCst),
        PATHS.len() + revalidated
    );
    let current = app.bump();
    let reached = app.handle.invalidate_tag("rv").await.unwrap();
    let mut stale = 0;
    for path in PATHS {
        let (_, body) = app.get(path).await;
        if version_of(&body) < current {
            stale += 1;
        }
    }
    eprintln!(
        "{rounds} read rounds over {:?}, {revalidated} bare 304s; invalidate_tag reached \
         {reached}; {stale} of {} stale",
        first_life.elapsed(),
        PATHS.len()
    );
    assert_eq!(stale, 0, "{stale} of {} reads stale", PATHS.len());
    assert_eq!(reached, PATHS.len() as u64);
}

/// Issue 21, row 7: a URL's `en` variant stored for the default TTL, then
/// its `fr` variant for 300 ms, both tagged; another store of the tag once
/// `fr` expired must not drop the URL from the tag's index while `en`
/// lives (`ZADD GT`). No grace (the point: index scores follow the entry
/// expiries), so the short variant's score is its expiry.
#[tokio::test(flavor = "multi_thread")]
async fn a_shorter_lived_variant_does_not_drop_its_url_from_the_tag_index() {
    const NS: &str = "taggt:";
    const URLS: usize = 6;
    let redis = RedisServer::new();
    let app = app(&redis, NS, |l| l.grace(Duration::ZERO)).await;
    for i in 0..URLS {
        let path = format!("/lang/{i}");
        assert_eq!(
            app.get_with(&path, &[("accept-language", "en")]).await.0,
            "MISS"
        );
        assert_eq!(
            app.get_with(&path, &[("accept-language", "fr")]).await.0,
            "MISS"
        );
    }
    // Past the fr variants' life; then another store of the tag (which
    // drops the index members whose score has passed).
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(app.get("/lang/other").await.0, "MISS");
    for i in 0..URLS {
        let path = format!("/lang/{i}");
        let (status, _) = app.get_with(&path, &[("accept-language", "en")]).await;
        assert_eq!(status, "HIT");
    }
    let current = app.bump();
    let reached = app.handle.invalidate_tag("lang").await.unwrap();
    let mut stale = 0;
    for i in 0..URLS {
        let (_, body) = app
            .get_with(&format!("/lang/{i}"), &[("accept-language", "en")])
            .await;
        if version_of(&body) < current {
            stale += 1;
        }
    }
    eprintln!("invalidate_tag reached {reached}; {stale} of {URLS} en variants stale");
    assert_eq!(stale, 0, "{stale} of {URLS} en variants stale");
    // The URLs (their Vary indexes with their variants) and /lang/other.
    assert_eq!(reached, URLS as u64 + 1);
}

/// Issue 21, row 8: one URL stored under more hosts than 64 rounds of 256
/// (`max_variants` raised: the setting under test). `invalidate_path`
/// removes every one of them, or fails; never `Ok` with variants left.
/// 50 hosts are stored through the app; 17,000 more variants are copies of
/// a stored one, written straight into Redis and listed in the URL's
/// variant set as a store lists them.
#[tokio::test(flavor = "multi_thread")]
async fn invalidate_path_removes_every_variant_of_a_url_with_very_many() {
    const NS: &str = "manyvars:";
    const HOSTS: usize = 50;
    const COPIES: usize = 17_000;
    let redis = RedisServer::new();
    let app = app(&redis, NS, |l| l.max_variants(20_000)).await;
    let get_host = |h: usize| {
        let req = http::Request::get(format!("http://{}/many", app.addr))
            .header("host", format!("h{h}.example"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        app.http.request(req)
    };
    for h in 0..HOSTS {
        assert_eq!(get_host(h).await.cache_status(), Some("MISS"));
    }
    let vars = redis.cli(&["KEYS", &format!("{NS}|/many:*:vars")]);
    let vars = vars.trim().to_owned();
    assert!(vars.ends_with(":vars"), "{vars:?}");
    let url = vars.trim_end_matches(":vars").to_owned();
    let mut conn = redis.connection_manager().await;
    let one: String = redis::cmd("SRANDMEMBER")
        .arg(&vars)
        .query_async(&mut conn)
        .await
        .unwrap();
    let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&one)
        .query_async(&mut conn)
        .await
        .unwrap();
    for chunk in (0..COPIES).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let key = format!("{url}:v:copy{i}");
            let hset = pipe.cmd("HSET").arg(&key);
            for (f, v) in &fields {
                hset.arg(f.as_slice()).arg(v.as_slice());
            }
            hset.ignore();
            pipe.cmd("SADD").arg(&vars).arg(&key).ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let total = (HOSTS + COPIES) as u64;
    let started = Instant::now();
    let result = app.handle.invalidate_path("/many").await;
    let took = started.elapsed();
    let left: u64 = redis::cmd("SCARD")
        .arg(&vars)
        .query_async(&mut conn)
        .await
        .unwrap();
    app.bump();
    let mut stale = 0;
    for h in 0..HOSTS {
        if get_host(h).await.cache_status() != Some("MISS") {
            stale += 1;
        }
    }
    eprintln!("invalidate_path: {result:?} in {took:?}; {left} variants left; {stale} hosts stale");
    assert_eq!(result.unwrap(), total);
    assert_eq!(left, 0);
    assert_eq!(stale, 0);
}
