//! Eviction cannot hide an entry from invalidation (issue 21, must-hold 2).
//!
//! Under `maxmemory` with the policy the guide recommends ("Running in production")
//! (`volatile-lru`), Redis evicts the keys with a TTL it used least
//! recently. A URL's variant set (`:vars`), tag indexes and fences are
//! written on stores only, so hot entries that are read all the time outlive
//! them; with the Host in the default key every entry is reachable only
//! through `:vars`. The crate writes those keys with no TTL (out of
//! `volatile-*`'s reach) and lists them in a keep set that the scripts reap.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use bytes::Bytes;
use cachefence::{FenceCache, FenceLayer};
use http_body_util::Full;
use support::{Http, RedisServer, Reply, serve};

const HOSTS: [&str; 3] = ["a.example", "b.example", "c.example"];
/// The hot URLs, per invalidation kind: `/p/` by path, `/x/` by prefix,
/// `/t/` by tag.
const GROUPS: [&str; 3] = ["p", "x", "t"];
const PER_GROUP: usize = 6;

fn info_field(redis: &RedisServer, section: &str, field: &str) -> u64 {
    support::info_field(&redis.cli(&["INFO", section]), field)
        .unwrap_or_else(|| panic!("{field} not in INFO {section}"))
}

/// An origin answering `v<version> <host><path>`, tagged `grp-<first
/// segment>`; `/cold/...` answers 16 KiB.
fn origin_app(version: &Arc<AtomicU64>, calls: &Arc<AtomicU64>) -> Router<()> {
    let (version, calls) = (version.clone(), calls.clone());
    let origin = move |uri: axum::http::Uri, req_headers: HeaderMap| {
        let (version, calls) = (version.clone(), calls.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let path = uri.path().to_owned();
            let group = path.split('/').nth(1).unwrap_or("").to_owned();
            let mut headers = HeaderMap::new();
            headers.insert("cache-tag", format!("grp-{group}").parse().unwrap());
            let host = req_headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let mut body = format!("v{} {host}{path}", version.load(Ordering::SeqCst));
            if group == "cold" {
                body.push_str(&".".repeat(16 * 1024));
            }
            (headers, body)
        }
    };
    Router::new().route("/{*path}", get(origin))
}

async fn get_host(http: &Http, addr: std::net::SocketAddr, host: &str, path: &str) -> Reply {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    http.request(req).await
}

fn hot_paths(group: &str) -> Vec<String> {
    (0..PER_GROUP).map(|i| format!("/{group}/{i}")).collect()
}

/// Reads every hot URL of `group` on every host; returns how many were
/// served a version older than `now`.
async fn stale_reads(
    http: &Http,
    addr: std::net::SocketAddr,
    group: &str,
    now: u64,
) -> (usize, usize) {
    let mut stale = 0;
    let mut reads = 0;
    for path in hot_paths(group) {
        for host in HOSTS {
            let r = get_host(http, addr, host, &path).await;
            assert_eq!(r.status, 200);
            reads += 1;
            if !r.text().starts_with(&format!("v{now} ")) {
                stale += 1;
            }
        }
    }
    (stale, reads)
}

#[tokio::test(flavor = "multi_thread")]
async fn under_a_maxmemory_flood_path_prefix_and_tag_invalidation_reach_every_hot_entry() {
    let redis =
        RedisServer::with_args(&["--maxmemory", "4mb", "--maxmemory-policy", "volatile-lru"]);
    let (version, calls) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(0)));
    // Default settings, the Host in the key.
    let layer = FenceLayer::new(redis.connection_manager().await).namespace("ev:");
    let handle = layer.handle();
    let addr = serve(origin_app(&version, &calls).layer(layer)).await;
    let http = Http::new();
    let hot: Vec<(String, &str)> = GROUPS
        .iter()
        .flat_map(|g| hot_paths(g))
        .flat_map(|p| HOSTS.iter().map(move |h| (p.clone(), *h)))
        .collect();
    for (path, host) in &hot {
        let r = get_host(&http, addr, host, path).await;
        assert_eq!(r.cache_status(), Some("MISS"), "{host}{path}");
    }
    // A flood of cold 16 KiB entries (several times maxmemory), the hot
    // entries read between its batches.
    let mut i = 0;
    let mut rounds = 0;
    while info_field(&redis, "stats", "evicted_keys") < 1000 || i < 1200 {
        assert!(i < 20_000, "not enough eviction after {i} URLs");
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (http, path) = (http.clone(), format!("/cold/{i}"));
            i += 1;
            set.spawn(async move { get_host(&http, addr, "flood.example", &path).await });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().status, 200);
        }
        for (path, host) in &hot {
            get_host(&http, addr, host, path).await;
        }
        rounds += 1;
    }
    // Every hot entry is in Redis (read until a whole pass hits: one the
    // flood evicted is filled again, with the same version).
    let mut passes = 0;
    loop {
        passes += 1;
        assert!(passes < 20, "hot entries keep missing");
        let mut hits = 0;
        for (path, host) in &hot {
            if get_host(&http, addr, host, path).await.cache_status() == Some("HIT") {
                hits += 1;
            }
        }
        if hits == hot.len() {
            break;
        }
    }
    let evicted = info_field(&redis, "stats", "evicted_keys");
    let vars_left = redis
        .cli(&["KEYS", "ev:|/[pxt]/*:vars"])
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    let tags_left = redis.cli(&["KEYS", "ev:|#tag:grp-[pxt]:*"]);
    eprintln!(
        "flood: {i} URLs in {rounds} rounds, {evicted} keys evicted; hot URL variant sets left: \
         {vars_left} of 18; hot tag indexes: {tags_left:?}"
    );
    // The origin changes; each kind of invalidation, then every host of
    // every URL it covers is read.
    version.store(2, Ordering::SeqCst);
    let mut removed = Vec::new();
    let mut path_removed = 0;
    for path in hot_paths("p") {
        path_removed += handle.invalidate_path(&path).await.unwrap();
    }
    removed.push(path_removed);
    let path_stale = stale_reads(&http, addr, "p", 2).await;
    removed.push(handle.invalidate_prefix("/x/").await.unwrap());
    let prefix_stale = stale_reads(&http, addr, "x", 2).await;
    removed.push(handle.invalidate_tag("grp-t").await.unwrap());
    let tag_stale = stale_reads(&http, addr, "t", 2).await;
    eprintln!(
        "removed (path, prefix, tag): {removed:?}; stale reads: path {path_stale:?}, \
         prefix {prefix_stale:?}, tag {tag_stale:?}"
    );
    assert_eq!(
        (path_stale.0, prefix_stale.0, tag_stale.0),
        (0, 0, 0),
        "stale reads after the invalidations returned"
    );
    // (The refills after one kind may evict an entry of the next: it is
    // then filled again with the new version, and not removed.)
    assert!(removed.iter().all(|&n| n > 0), "{removed:?}");
}

/// Redis's clock (`TIME`), in milliseconds.
fn redis_ms(redis: &RedisServer) -> u64 {
    let t = redis.cli(&["TIME"]);
    let mut it = t.lines();
    let s: u64 = it.next().unwrap().parse().unwrap();
    let us: u64 = it.next().unwrap().parse().unwrap();
    s * 1000 + us / 1000
}

#[tokio::test(flavor = "multi_thread")]
async fn index_keys_have_no_ttl_and_are_reaped_once_due_so_memory_stays_bounded() {
    let redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(0)));
    // Long enough for a round's 40 stores on a loaded 2-core machine (a
    // round took over 300 ms at a load of 10-14, and the reaper rightly
    // reaped its first index key before the round's checks).
    let ttl = Duration::from_millis(1500);
    let layer = FenceLayer::new(redis.connection_manager().await)
        .namespace("reap:")
        .ttl(ttl)
        .grace(Duration::ZERO);
    let handle = layer.handle();
    let addr = serve(origin_app(&version, &calls).layer(layer)).await;
    let http = Http::new();
    let keys = |pattern: &str| -> Vec<String> {
        redis
            .cli(&["KEYS", pattern])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let count = |pattern: &str| keys(pattern).len();
    // Each round stores 40 tagged entries (each a host's dimension of its
    // URL: a variant set each) and invalidates one URL (a URL fence); then
    // they all expire.
    for round in 0..4 {
        for i in 0..40 {
            let r = get_host(&http, addr, "a.example", &format!("/r{round}/{i}")).await;
            assert_eq!(r.cache_status(), Some("MISS"));
        }
        handle
            .invalidate_path(&format!("/r{round}/0"))
            .await
            .unwrap();
        // This round's index keys and its fence have no TTL (no volatile-*
        // policy can evict them) and are listed in the keep set, due about
        // when the entries expire (the fence: its own lifetime).
        let vars = keys(&format!("reap:|/r{round}/*:vars"));
        assert_eq!(vars.len(), 39, "{vars:?}");
        let fences = keys(&format!("reap:|/r{round}/*:fence"));
        assert_eq!(fences.len(), 1);
        let tag_index = keys(&format!("reap:|#tag:grp-r{round}:*"));
        assert_eq!(tag_index.len(), 1, "{tag_index:?}");
        let now_ms = redis_ms(&redis);
        let mut last_due = 0;
        for k in vars.iter().chain(&fences).chain(&tag_index) {
            assert_eq!(redis.cli(&["PTTL", k]), "-1", "{k} has a TTL");
            let due: u64 = redis
                .cli(&["ZSCORE", "reap:|#keep", k])
                .parse()
                .unwrap_or_else(|_| panic!("{k} not in the keep set"));
            assert!(due > now_ms, "{k}: due {due}, now {now_ms}");
            if !fences.contains(k) {
                last_due = last_due.max(due);
            }
        }
        // Bounded: the previous round's index keys were reaped by this
        // round's first stores (16 a write); what is listed is this round's
        // (40 variant sets, the invalidated URL's already gone, and the tag
        // index) and the fences (each lives a minute).
        let listed: usize = redis.cli(&["ZCARD", "reap:|#keep"]).parse().unwrap();
        assert_eq!(listed, 40 + 1 + round + 1, "round {round}");
        if round > 0 {
            assert_eq!(count(&format!("reap:|/r{}/*:vars", round - 1)), 0);
            assert_eq!(count(&format!("reap:|#tag:grp-r{}:*", round - 1)), 0);
        }
        // Everything of the round expires (entries by TTL): waits until
        // Redis's clock passed the last index key's due time.
        let started = Instant::now();
        while redis_ms(&redis) <= last_due {
            assert!(
                started.elapsed() < ttl * 4,
                "Redis's clock never reached {last_due}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // (An entry's own TTL may end a few ms after its index key's due.)
        let entries = format!("reap:|/r{round}/*:v:*");
        let due = Instant::now();
        while count(&entries) > 0 && due.elapsed() < ttl {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(count(&entries), 0, "entries expire by their TTL");
    }
    // A few more writes reap the last round's keys (the fence lives its own
    // lifetime, a minute).
    for i in 0..4 {
        get_host(&http, addr, "b.example", &format!("/last/{i}")).await;
    }
    assert_eq!(count("reap:|/r3/*:vars"), 0);
    assert_eq!(count("reap:|#tag:grp-r3:*"), 0);
    // The last writes' 4 entries, 4 variant sets and tag index, the 4
    // rounds' fences, the keep set. The keys alive: `DBSIZE` also counts
    // entries whose TTL ended that Redis's active expiry has not sampled
    // yet (it frees them on its own; the crate's keys without a TTL are
    // what the reaper must bound).
    let live = keys("*");
    assert_eq!(live.len(), 4 + 4 + 1 + 4 + 1, "{live:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_near_cached_entry_redis_dropped_unannounced_is_dropped_by_the_invalidation() {
    let redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(0)));
    let cache = FenceCache::builder(redis.connection_manager().await)
        .namespace("nev:")
        .wake_ups(redis.client())
        .near_cache(1 << 20)
        .build()
        .expect("cache");
    let handle = cache.handle();
    let addr = serve(origin_app(&version, &calls).layer(cache.layer())).await;
    let http = Http::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cache.near_is_up_for_tests() {
        assert!(Instant::now() < deadline, "near cache never up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut held = false;
    for _ in 0..5 {
        http.get(addr, "/n/1").await;
        if cache.near_holds_for_tests("nev:", "/n/1") {
            held = true;
            break;
        }
    }
    assert!(held, "never reached the near cache");
    // Redis drops the entry (as eviction does): no script runs, nothing is
    // announced.
    let entry: Vec<String> = redis
        .cli(&["KEYS", "nev:|/n/1:*:v:*"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(entry.len(), 1, "{entry:?}");
    assert_eq!(redis.cli(&["DEL", &entry[0]]), "1");
    version.store(2, Ordering::SeqCst);
    handle.invalidate_path("/n/1").await.unwrap();
    let mut stale = 0;
    for _ in 0..5 {
        if http.get(addr, "/n/1").await.text().starts_with("v1 ") {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "the near cache served the invalidated entry");
}

/// The entry Redis evicted is stored again by another process before the
/// invalidation (found by the randomized checker, seed 7): the new entry
/// must carry the near mark, or its invalidation announces nothing and the
/// near copy of the evicted version stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_near_cached_entry_evicted_and_stored_again_is_dropped_by_the_invalidation() {
    let redis = RedisServer::new();
    let (version, calls) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(0)));
    let near = FenceCache::builder(redis.connection_manager().await)
        .namespace("nev2:")
        .wake_ups(redis.client())
        .near_cache(1 << 20)
        .build()
        .expect("cache");
    let near_addr = serve(origin_app(&version, &calls).layer(near.layer())).await;
    let other = FenceCache::builder(redis.connection_manager().await)
        .namespace("nev2:")
        .build()
        .expect("cache");
    let handle = other.handle();
    let other_addr = serve(origin_app(&version, &calls).layer(other.layer())).await;
    let http = Http::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !near.near_is_up_for_tests() {
        assert!(Instant::now() < deadline, "near cache never up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut held = false;
    for _ in 0..5 {
        http.get(near_addr, "/n/1").await;
        if near.near_holds_for_tests("nev2:", "/n/1") {
            held = true;
            break;
        }
    }
    assert!(held, "never reached the near cache");
    // Redis drops the entry (as eviction does): nothing is announced.
    let entry: Vec<String> = redis
        .cli(&["KEYS", "nev2:|/n/1:*:v:*"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(entry.len(), 1, "{entry:?}");
    assert_eq!(redis.cli(&["DEL", &entry[0]]), "1");
    // Another process (no near cache) stores the URL again.
    let refill = http.get(other_addr, "/n/1").await;
    assert_eq!(refill.cache_status(), Some("MISS"));
    assert_eq!(
        redis.cli(&["HGET", &entry[0], "near"]),
        "1",
        "the new entry is not marked"
    );
    version.store(2, Ordering::SeqCst);
    handle.invalidate_path("/n/1").await.unwrap();
    let mut stale = 0;
    for _ in 0..5 {
        if http.get(near_addr, "/n/1").await.text().starts_with("v1 ") {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "the near cache served the invalidated entry");
}

/// The WARN lines about the eviction policy logged by a cache over a Redis
/// with `policy`, after three stores.
async fn policy_warnings(policy: &str) -> usize {
    let (captured, _guard) = support::capture::capture(
        "cachefence=warn",
        tracing_subscriber::fmt::format::FmtSpan::NONE,
    );
    let redis = RedisServer::with_args(&["--maxmemory", "64mb", "--maxmemory-policy", policy]);
    let (version, calls) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(0)));
    let layer = FenceLayer::new(redis.connection_manager().await).namespace("pol:");
    let addr = serve(origin_app(&version, &calls).layer(layer)).await;
    let http = Http::new();
    for i in 0..3 {
        let r = http.get(addr, &format!("/w/{i}")).await;
        assert_eq!(r.cache_status(), Some("MISS"));
    }
    captured
        .text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("maxmemory-policy"))
        .count()
}

// Current-thread runtime: the subscriber is this thread's, and every task
// (server, fills) runs on it.
#[tokio::test]
async fn an_allkeys_policy_is_warned_about_once() {
    assert_eq!(policy_warnings("allkeys-lru").await, 1);
    assert_eq!(policy_warnings("volatile-lru").await, 0);
    assert_eq!(policy_warnings("noeviction").await, 0);
}
