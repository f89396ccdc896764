//! A Redis user whose ACL denies the single-server store's transaction
//! (`MULTI`, `EXEC`, or `RENAME` inside STORE): the cache still stores,
//! with the fields as STORE's arguments, from the first store on; it warns
//! once and leaves no temporary entry behind.

mod support;

use cachefence::FenceLayer;
use support::capture::capture;
use support::origin::{Counter, routes};
use support::{Http, RedisServer, serve};
use tracing_subscriber::fmt::format::FmtSpan;

/// `ACL LOG`: each refusal's command (`object`) and how often, sorted.
fn refusals(redis: &RedisServer) -> Vec<(String, i64)> {
    let redis::Value::Array(entries) = redis.cli_value(&["ACL", "LOG"]) else {
        panic!("ACL LOG: not an array");
    };
    let mut out: Vec<(String, i64)> = entries
        .into_iter()
        .map(|entry| {
            let fields: Vec<(redis::Value, redis::Value)> = match entry {
                redis::Value::Array(flat) => flat
                    .chunks(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect(),
                redis::Value::Map(pairs) => pairs,
                other => panic!("ACL LOG entry: {other:?}"),
            };
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| matches!(k, redis::Value::BulkString(b) if b == name.as_bytes()))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| panic!("ACL LOG entry without {name}"))
            };
            let object = match field("object") {
                redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                other => panic!("object: {other:?}"),
            };
            let count = match field("count") {
                redis::Value::Int(n) => n,
                other => panic!("count: {other:?}"),
            };
            (object, count)
        })
        .collect();
    out.sort();
    out
}

/// A cache's `(misses, hits, stores, redis_errors)` and its Redis calls.
fn assert_stats(
    handle: &cachefence::FenceHandle,
    counts: (u64, u64, u64, u64),
    redis_calls: u64,
    which: &str,
) {
    let stats = handle.stats();
    assert_eq!(
        (stats.misses, stats.hits, stats.stores, stats.redis_errors),
        counts,
        "{which}'s counters"
    );
    assert_eq!(stats.redis_calls, redis_calls, "{which}'s Redis calls");
}

/// Every key matching `pattern`, by `SCAN`.
fn scan(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let mut cursor = "0".to_owned();
    let mut keys = Vec::new();
    loop {
        let reply = redis.cli_value(&["SCAN", &cursor, "MATCH", pattern, "COUNT", "1000"]);
        let redis::Value::Array(parts) = reply else {
            panic!("SCAN: {reply:?}");
        };
        let [redis::Value::BulkString(next), redis::Value::Array(found)] = &parts[..] else {
            panic!("SCAN: {parts:?}");
        };
        keys.extend(found.iter().map(|k| match k {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("SCAN key: {other:?}"),
        }));
        cursor = String::from_utf8_lossy(next).into_owned();
        if cursor == "0" {
            return keys;
        }
    }
}

/// The commands an `ACL LOG` should list, and how often.
fn log(entries: &[(&str, i64)]) -> Vec<(String, i64)> {
    entries.iter().map(|(c, n)| (c.to_string(), *n)).collect()
}

/// A cache on Redis user `limited:pw`; its handle's stats, the origin's
/// counter and the app's address.
async fn app(redis: &RedisServer) -> (cachefence::FenceHandle, Counter, std::net::SocketAddr) {
    let url = format!("redis://limited:pw@127.0.0.1:{}/", redis.port());
    let conn = redis::Client::open(url)
        .unwrap()
        .get_connection_manager_with_config(support::fast_fail_config())
        .await
        .unwrap();
    let layer = FenceLayer::new(conn).namespace("acl:").beta(0.0);
    let handle = layer.handle();
    let counter = Counter::default();
    let addr = serve(routes(counter.clone()).layer(layer)).await;
    (handle, counter, addr)
}

/// A user with `+@all` and `denied` (e.g. `-multi`), a cache on it: a
/// miss is stored (the next request a HIT, one origin call), so is a
/// second key's, which meets no refusal (the first store switched to
/// the ARGV path: no further `ACL LOG` entry, no `MULTI` or `EXEC`).
/// Then a second cache (STORE is loaded now) stores a third key. One
/// warning a cache; no temporary entry, no lease left.
///
/// `first`: `ACL LOG` after the first store (its `EVALSHA` met `NOSCRIPT`);
/// `both`: after the second cache's first store; `calls`: each cache's
/// Redis calls.
async fn stores_without(
    denied: &[&str],
    first: &[(&str, i64)],
    both: &[(&str, i64)],
    calls: (u64, u64),
) {
    // A current-thread runtime: the server and the fills log here.
    let (captured, _guard) = capture("cachefence=warn", FmtSpan::NONE);
    let redis = RedisServer::new();
    let mut setuser = vec![
        "ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all",
    ];
    setuser.extend_from_slice(denied);
    assert_eq!(redis.cli(&setuser), "OK");
    let (handle, counter, addr) = app(&redis).await;
    let http = Http::new();

    let miss = http.get(addr, "/item/1").await;
    assert_eq!(miss.cache_status(), Some("MISS"));
    assert_eq!(refusals(&redis), log(first), "the first store's refusals");
    let transactions = (redis.command_count("multi"), redis.command_count("exec"));
    let hit = http.get(addr, "/item/1").await;
    assert_eq!(hit.cache_status(), Some("HIT"));
    assert_eq!(hit.body, miss.body);
    assert_eq!(counter.get(), 1, "one origin call");

    // The second store goes straight to the ARGV path.
    assert_eq!(http.get(addr, "/item/2").await.cache_status(), Some("MISS"));
    assert_eq!(http.get(addr, "/item/2").await.cache_status(), Some("HIT"));
    assert_eq!(counter.get(), 2);
    assert_eq!(refusals(&redis), log(first), "no refusal after the first");
    assert_eq!(
        (redis.command_count("multi"), redis.command_count("exec")),
        transactions,
        "no transaction after the first"
    );
    assert_stats(&handle, (2, 2, 2, 0), calls.0, "the first cache");
    assert_eq!(captured.count("may not run"), 1, "one warning");

    // Another cache (another process), STORE loaded.
    let (handle, counter, addr) = app(&redis).await;
    assert_eq!(http.get(addr, "/item/3").await.cache_status(), Some("MISS"));
    assert_eq!(refusals(&redis), log(both), "the second cache's refusals");
    assert_eq!(http.get(addr, "/item/3").await.cache_status(), Some("HIT"));
    assert_eq!(counter.get(), 1);
    assert_stats(&handle, (1, 1, 1, 0), calls.1, "the second cache");
    assert_eq!(captured.count("may not run"), 2, "one warning a cache");

    assert_eq!(
        scan(&redis, "*:new"),
        Vec::<String>::new(),
        "temporary entries"
    );
    assert_eq!(scan(&redis, "*:lease*"), Vec::<String>::new(), "leases");
    // Three entries (the host's variant of each URL, in its variant set),
    // and the keep set.
    let keys = scan(&redis, "acl:|*");
    assert_eq!(keys.len(), 3 * 2 + 1, "{keys:?}");
    let entries: Vec<&String> = keys.iter().filter(|k| k.contains(":v:")).collect();
    assert_eq!(entries.len(), 3, "{keys:?}");
    for entry in entries {
        assert!(
            redis
                .cli(&["HGET", entry, "body"])
                .starts_with("item /item/")
        );
    }
}

/// `MULTI` refused: HSET, PEXPIRE and `EVALSHA` STORE ran one by one. The
/// first store's `EVALSHA` met `NOSCRIPT` (the temporary entry is removed,
/// the store made with the fields as arguments); the second cache's
/// STORE stored (fenced as ever: one script) with no second call.
#[tokio::test]
async fn a_user_without_multi_and_exec_stores_with_the_fields_as_arguments() {
    stores_without(
        &["-multi", "-exec"],
        &[("exec", 1), ("multi", 1)],
        &[("exec", 2), ("multi", 2)],
        (9, 4),
    )
    .await;
}

/// `MULTI` refused, and then (once loaded) `RENAME` inside STORE: STORE
/// removed the temporary entry and kept the lease, and the fields went as
/// its arguments.
#[tokio::test]
async fn a_user_without_multi_exec_and_rename_stores_with_the_fields_as_arguments() {
    stores_without(
        &["-multi", "-exec", "-rename"],
        &[("exec", 1), ("multi", 1)],
        &[("exec", 2), ("multi", 2), ("rename", 1)],
        (9, 5),
    )
    .await;
}

/// The transaction ran, `RENAME` inside STORE was refused: without the
/// fallback no store ever stored (STORE took the refusal for a missing
/// temporary entry).
#[tokio::test]
async fn a_user_without_rename_stores_with_the_fields_as_arguments() {
    stores_without(&["-rename"], &[("rename", 1)], &[("rename", 2)], (9, 5)).await;
}

/// `EXEC` refused: Redis discarded the transaction (`EXECABORT`), nothing
/// of it ran.
#[tokio::test]
async fn a_user_without_exec_stores_with_the_fields_as_arguments() {
    stores_without(&["-exec"], &[("exec", 1)], &[("exec", 2)], (9, 5)).await;
}
