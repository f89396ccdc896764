//! Garbage in Redis (ARCHITECTURE.md, promise 5: "never serves a corrupt one") and
//! lease edge cases: broken entries written at the exact key the layer uses
//! must read as a miss, be answered by the origin and be overwritten by the
//! fill; a lost, expired or stolen lease must never let an older response
//! be stored over a newer one, and never leave a waiter hanging.

mod fault_support;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::routing::get;
use cachefence::{FenceHandle, FenceLayer};
use fault_support::{TryHttp, cmd_bytes, entry_keys, eventually, hget, scan};
use redis::aio::ConnectionManager;
use support::origin::{Counter, routes};
use support::{RedisServer, serve};

struct App {
    addr: SocketAddr,
    counter: Counter,
    http: TryHttp,
}

async fn app(redis: &RedisServer, ns: &str) -> App {
    let layer = FenceLayer::new(redis.connection_manager().await)
        .namespace(ns)
        .beta(0.0);
    let counter = Counter::default();
    let addr = serve(routes(counter.clone()).layer(layer)).await;
    App {
        addr,
        counter,
        http: TryHttp::new(Duration::from_secs(10)),
    }
}

/// The Redis key of the entry of `path` (after one request filled it).
fn key_of(redis: &RedisServer, ns: &str, path: &str) -> String {
    let keys: Vec<String> = entry_keys(redis, ns)
        .into_iter()
        .filter(|k| k.starts_with(&format!("{ns}|{path}:{{")))
        .collect();
    assert_eq!(keys.len(), 1, "entry key of {path}: {keys:?}");
    keys.into_iter().next().unwrap()
}

/// Fills `path`, damages its entry with `corrupt`, then checks the damaged
/// entry is a miss answered by the origin and that the fill overwrites it.
async fn corrupted(corrupt: impl FnOnce(&RedisServer, &str)) {
    let redis = RedisServer::new();
    let app = app(&redis, "bad:").await;
    let path = "/item/c";
    let r = app.http.get(app.addr, path).await.unwrap();
    assert_eq!(
        (r.cache_status(), r.text().as_str()),
        (Some("MISS"), "item /item/c #1")
    );
    let key = key_of(&redis, "bad:", path);
    corrupt(&redis, &key);

    let r = app.http.get(app.addr, path).await.expect("answered");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "item /item/c #2", "a damaged entry was served");
    assert_ne!(r.cache_status(), Some("HIT"));
    let r = app.http.get(app.addr, path).await.expect("answered");
    assert_eq!(
        (r.status.as_u16(), r.cache_status(), r.text().as_str()),
        (200, Some("HIT"), "item /item/c #2"),
        "the fill did not overwrite the damaged entry: {:?}",
        redis.cli(&["HGETALL", &key])
    );
    assert_eq!(app.counter.get(), 2);
}

fn hset(redis: &RedisServer, key: &str, field: &str, value: &[u8]) {
    cmd_bytes(redis, &[b"HSET", key.as_bytes(), field.as_bytes(), value]).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_head_field() {
    corrupted(|r, k| {
        r.cli(&["HDEL", k, "head"]);
    })
    .await;
}

/// The fixed part of a format-2 `head` field: status, fill time, stale time
/// and body length (see `entry::encode_head`), big-endian.
fn head_prefix(status: u16, body_len: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&status.to_be_bytes());
    h.extend_from_slice(&20u64.to_be_bytes());
    h.extend_from_slice(&u64::MAX.to_be_bytes());
    h.extend_from_slice(&body_len.to_be_bytes());
    h
}

// Breaks when an entry of the previous format (1: `status`, `hdrs`, `len`,
// `delta` and `stale` fields) is read as an entry, or survives its refill
// (its old fields left behind in the new hash).
#[tokio::test(flavor = "multi_thread")]
async fn an_entry_of_format_1_is_a_miss_and_is_overwritten() {
    corrupted(|r, k| {
        r.cli(&["DEL", k]);
        r.cli(&[
            "HSET",
            k,
            "v",
            "1",
            "status",
            "200",
            "hdrs",
            "",
            "body",
            "item /item/c #1",
            "len",
            "15",
            "delta",
            "1",
            "stored",
            "1",
            "fresh",
            "99999999999999",
            "stale",
            "99999999999999",
            "gen",
            "old",
            "key",
            "/item/c",
        ]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_refill_of_a_format_1_entry_leaves_none_of_its_fields() {
    let redis = RedisServer::new();
    let app = app(&redis, "old:").await;
    app.http.get(app.addr, "/item/o").await.unwrap();
    let key = key_of(&redis, "old:", "/item/o");
    redis.cli(&["DEL", &key]);
    redis.cli(&[
        "HSET", &key, "v", "1", "status", "200", "hdrs", "", "body", "old", "len", "3", "stored",
        "1", "fresh", "1", "stale", "1",
    ]);
    let r = app.http.get(app.addr, "/item/o").await.unwrap();
    assert_eq!(r.text(), "item /item/o #2");
    assert!(
        eventually(Duration::from_secs(10), || redis.cli(&["HGET", &key, "v"])
            == "2")
        .await,
        "the refill did not store"
    );
    for old in ["status", "hdrs", "len", "delta", "stale"] {
        assert_eq!(redis.cli(&["HEXISTS", &key, old]), "0", "{old} left behind");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_body_field() {
    corrupted(|r, k| {
        r.cli(&["HDEL", k, "body"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_version_field_left() {
    corrupted(|r, k| {
        r.cli(&["DEL", k]);
        r.cli(&["HSET", k, "v", "1"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_string_at_the_entry_key() {
    corrupted(|r, k| {
        r.cli(&["DEL", k]);
        r.cli(&["SET", k, "garbage"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_at_the_entry_key() {
    corrupted(|r, k| {
        r.cli(&["DEL", k]);
        r.cli(&["RPUSH", k, "a", "b", "c"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_bytes_in_head() {
    corrupted(|r, k| hset(r, k, "head", b"\xff\xff\x00\x01garbage\x00")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_headers_after_a_good_head_prefix() {
    let mut h = head_prefix(200, 15);
    h.extend_from_slice(b"\xff\xff\x00\x01garbage\x00");
    corrupted(move |r, k| hset(r, k, "head", &h)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn well_framed_hdrs_with_an_invalid_header() {
    // name "bad name" (a space), value "x\r\n" (control bytes).
    let mut h = head_prefix(200, 15);
    h.extend_from_slice(&8u16.to_be_bytes());
    h.extend_from_slice(b"bad name");
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(b"x\r\n");
    corrupted(move |r, k| hset(r, k, "head", &h)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_body() {
    corrupted(|r, k| hset(r, k, "body", b"it")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_length_the_body_does_not_have() {
    corrupted(|r, k| hset(r, k, "head", &head_prefix(200, 16))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_future_format_version() {
    corrupted(|r, k| hset(r, k, "v", b"99")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_numeric_fresh() {
    corrupted(|r, k| hset(r, k, "fresh", b"soon")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_beyond_u64() {
    // Lua's tonumber reads it as 1e23 (fresh); Rust's u64 parse fails.
    corrupted(|r, k| hset(r, k, "fresh", b"99999999999999999999999")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_status() {
    corrupted(|r, k| hset(r, k, "head", &head_prefix(1000, 15))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_garbage_vary_field() {
    corrupted(|r, k| hset(r, k, "vary", b"bad name,\x01")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_vary_field() {
    corrupted(|r, k| hset(r, k, "vary", b"")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_garbage_pass_marker() {
    corrupted(|r, k| {
        r.cli(&["DEL", k]);
        r.cli(&["HSET", k, "pass", "never"]);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------

/// An origin whose every call gets the next version: `v<n> <uri>`. It waits
/// `?delay_ms=N`, or a random 0..=max_random_ms when there is none.
#[derive(Clone)]
struct Versions {
    next: Arc<AtomicU64>,
    max_random_ms: u64,
}

fn versioned(versions: Versions) -> Router {
    async fn handler(State(v): State<Versions>, req: Request) -> String {
        let n = v.next.fetch_add(1, Ordering::SeqCst) + 1;
        let delay = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("delay_ms=")))
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| {
                if v.max_random_ms == 0 {
                    0
                } else {
                    rand::random::<u64>() % (v.max_random_ms + 1)
                }
            });
        tokio::time::sleep(Duration::from_millis(delay)).await;
        format!("v{n} {}", req.uri())
    }
    Router::new()
        .route("/v", get(handler))
        .route("/race", get(handler))
        .with_state(versions)
}

fn version_of(body: &str) -> u64 {
    body.strip_prefix('v')
        .and_then(|b| b.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a versioned body: {body:?}"))
}

struct VApp {
    addr: SocketAddr,
    handle: FenceHandle<ConnectionManager>,
    http: TryHttp,
}

/// Another "process": its own connection, layer and in-process flights.
async fn vapp(
    redis: &RedisServer,
    versions: &Versions,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> VApp {
    let layer = configure(
        FenceLayer::new(redis.connection_manager().await)
            .namespace("lease:")
            .beta(0.0),
    );
    let handle = layer.handle();
    let addr = serve(versioned(versions.clone()).layer(layer)).await;
    VApp {
        addr,
        handle,
        http: TryHttp::new(Duration::from_secs(15)),
    }
}

fn lease_keys(redis: &RedisServer) -> Vec<Vec<u8>> {
    scan(redis, "lease:*")
        .into_iter()
        .filter(|k| k.ends_with(b":lease"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_deleted_during_a_fill_fences_that_fill_out() {
    let redis = RedisServer::new();
    let versions = Versions {
        next: Arc::default(),
        max_random_ms: 0,
    };
    let a = vapp(&redis, &versions, |l| l).await;
    let b = vapp(&redis, &versions, |l| l).await;
    let path = "/v?delay_ms=600";
    let first = {
        let (http, addr) = (a.http.clone(), a.addr);
        tokio::spawn(async move { http.get(addr, path).await })
    };
    assert!(eventually(Duration::from_secs(2), || !lease_keys(&redis).is_empty()).await);
    // Evicted, say.
    for k in lease_keys(&redis) {
        cmd_bytes(&redis, &[b"DEL", &k]).unwrap();
    }
    // Another process takes a new lease and fills with a newer version.
    let second = b.http.get(b.addr, path).await.expect("answered");
    let first = first.await.unwrap().expect("answered");
    assert_eq!(version_of(&first.text()), 1);
    assert_eq!(version_of(&second.text()), 2);
    // The first fill lost its lease: its write-back was refused.
    assert_eq!(a.handle.stats().fenced, 1, "{:?}", a.handle.stats());
    assert_eq!(b.handle.stats().stores, 1);
    for app in [&a, &b] {
        let r = app.http.get(app.addr, path).await.unwrap();
        assert_eq!((r.cache_status(), version_of(&r.text())), (Some("HIT"), 2));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_slower_than_the_lock_timeout_keeps_its_lease_by_renewing_it() {
    let redis = RedisServer::new();
    let versions = Versions {
        next: Arc::default(),
        max_random_ms: 0,
    };
    let configure = |l: FenceLayer<ConnectionManager>| {
        l.lock_timeout(Duration::from_millis(100))
            .wait_timeout(Duration::from_secs(2))
    };
    let a = vapp(&redis, &versions, configure).await;
    let b = vapp(&redis, &versions, configure).await;
    let path = "/v?delay_ms=400";
    let start = Instant::now();
    let first = {
        let (http, addr) = (a.http.clone(), a.addr);
        tokio::spawn(async move { http.get(addr, path).await })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Past the lock timeout, the lease is still held: b waits for a's fill.
    assert!(
        !lease_keys(&redis).is_empty(),
        "the live fill lost its lease"
    );
    let second = b.http.get(b.addr, path).await.expect("answered");
    let first = first.await.unwrap().expect("answered");
    assert!(
        start.elapsed()
            < Duration::from_millis(400) + Duration::from_secs(2) + Duration::from_secs(2)
    );
    assert_eq!(version_of(&first.text()), 1);
    assert_eq!(version_of(&second.text()), 1, "b called the origin again");
    assert_eq!(versions.next.load(Ordering::SeqCst), 1);
    assert_eq!(a.handle.stats().stores, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_fills_after_lost_leases_never_store_an_older_response_over_a_newer() {
    const WAIT: Duration = Duration::from_secs(1);
    const ORIGIN_MAX: u64 = 300;
    let redis = RedisServer::new();
    let versions = Versions {
        next: Arc::default(),
        max_random_ms: ORIGIN_MAX,
    };
    let configure = |l: FenceLayer<ConnectionManager>| {
        l.lock_timeout(Duration::from_millis(100))
            .wait_timeout(WAIT)
            .ttl(Duration::from_secs(60))
    };
    let apps = Arc::new([
        vapp(&redis, &versions, configure).await,
        vapp(&redis, &versions, configure).await,
        vapp(&redis, &versions, configure).await,
    ]);
    // Learn the entry key.
    let r = apps[0].http.get(apps[0].addr, "/race").await.unwrap();
    assert_eq!(version_of(&r.text()), 1);
    let key = key_of(&redis, "lease:", "/race");
    let lease = format!("{key}:lease");

    let stop = Arc::new(AtomicBool::new(false));
    // Chaos: drop leases (eviction, expiry) and sometimes the entry itself.
    let chaos = {
        let stop = stop.clone();
        let client = redis.client();
        let (key, lease) = (key.clone(), lease.clone());
        std::thread::spawn(move || {
            let mut con = client.get_connection().unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&lease).query(&mut con);
                if n.is_multiple_of(5) {
                    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&key).query(&mut con);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Sample the stored version as often as possible.
    let sampler = {
        let stop = stop.clone();
        let client = redis.client();
        let key = key.clone();
        std::thread::spawn(move || {
            let mut con = client.get_connection().unwrap();
            let mut seen: Vec<u64> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let body: Option<Vec<u8>> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("body")
                    .query(&mut con)
                    .unwrap_or(None);
                if let Some(body) = body {
                    let v = version_of(&String::from_utf8_lossy(&body));
                    if seen.last() != Some(&v) {
                        seen.push(v);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        })
    };
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..12 {
        let apps = apps.clone();
        let stop = stop.clone();
        clients.spawn(async move {
            let app = &apps[i % 3];
            let mut worst = Duration::ZERO;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = app.http.get(app.addr, "/race").await.expect("answered");
                worst = worst.max(start.elapsed());
                assert_eq!(r.status, 200, "{r:?}");
                version_of(&r.text());
                n += 1;
            }
            (n, worst)
        });
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut worst = Duration::ZERO;
    let mut requests = 0;
    while let Some(done) = clients.join_next().await {
        let (n, w) = done.unwrap();
        requests += n;
        worst = worst.max(w);
    }
    chaos.join().unwrap();
    let seen = sampler.join().unwrap();
    let (fenced, stores): (u64, u64) = apps
        .iter()
        .map(|a| a.handle.stats())
        .fold((0, 0), |(f, s), st| (f + st.fenced, s + st.stores));
    eprintln!(
        "race: {requests} requests, slowest {worst:?}, origin calls {}, stores {stores}, fenced {fenced}, stored versions seen {}",
        versions.next.load(Ordering::SeqCst),
        seen.len()
    );
    let bound = WAIT + Duration::from_millis(ORIGIN_MAX) + Duration::from_secs(2);
    assert!(worst <= bound, "a request took {worst:?} (bound {bound:?})");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "an older response was stored over a newer one: {seen:?}"
    );
    // Settled: the cached version is the newest stored one or newer.
    let newest = seen.last().copied().unwrap_or(0);
    let r = apps[0].http.get(apps[0].addr, "/race").await.unwrap();
    let last = version_of(&r.text());
    assert!(last >= newest, "cached v{last} < stored v{newest}");
    if let Some(body) = hget(&redis, &key, "body") {
        assert!(version_of(&String::from_utf8_lossy(&body)) >= newest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_lease_without_expiry_does_not_hold_the_key_forever() {
    let redis = RedisServer::new();
    let layer = FenceLayer::new(redis.connection_manager().await)
        .namespace("stuck:")
        .beta(0.0)
        .lock_timeout(Duration::from_millis(300))
        .wait_timeout(Duration::from_secs(5));
    let counter = Counter::default();
    let addr = serve(routes(counter.clone()).layer(layer)).await;
    let http = TryHttp::new(Duration::from_secs(10));
    // Learn the key, then remove the entry and plant a lease with no TTL.
    http.get(addr, "/item/l").await.unwrap();
    let key = key_of(&redis, "stuck:", "/item/l");
    redis.cli(&["DEL", &key]);
    redis.cli(&["SET", &format!("{key}:lease"), "someone-else"]);
    let started = Instant::now();
    let r = http.get(addr, "/item/l").await.expect("answered");
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "item /item/l #2")
    );
    // The lease got the lease lifetime, expired, and this request filled.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let r = http.get(addr, "/item/l").await.expect("answered");
    assert_eq!(r.cache_status(), Some("HIT"));
}
