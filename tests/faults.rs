//! Fail-open under Redis faults (ARCHITECTURE.md, promise 5): a real axum server
//! with the fence in front of a counting origin, under concurrent load, while
//! the test redis-server is killed, paused, resumed, restarted and flushed.
//!
//! `CACHEFENCE_LONG=1` runs the chaos test with 50 clients for 20 s instead
//! of 20 clients for 8 s. Its numbers are printed to stderr
//! (`cargo test --test faults -- --nocapture`).

mod fault_support;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cachefence::{FenceCache, FenceHandle, FenceLayer};
use fault_support::{TryHttp, entry_keys, eventually, quantile};
use redis::aio::ConnectionManager;
use support::origin::{Counter, routes};
use support::{RedisServer, serve};

const REDIS_TIMEOUT: Duration = Duration::from_millis(100);

struct App {
    addr: SocketAddr,
    counter: Counter,
    handle: FenceHandle<ConnectionManager>,
    http: TryHttp,
}

async fn app(
    redis: &RedisServer,
    ns: &str,
    configure: impl FnOnce(FenceLayer<ConnectionManager>) -> FenceLayer<ConnectionManager>,
) -> App {
    let layer = configure(
        FenceCache::builder(redis.connection_manager().await)
            .redis_timeout(REDIS_TIMEOUT)
            .circuit_breaker(3, Duration::from_millis(500))
            .build()
            .expect("cache")
            .layer()
            .namespace(ns)
            .beta(0.0),
    );
    let counter = Counter::default();
    let handle = layer.handle();
    let addr = serve(routes(counter.clone()).layer(layer)).await;
    App {
        addr,
        counter,
        handle,
        http: TryHttp::new(Duration::from_secs(10)),
    }
}

/// Whether a body is the origin's answer for `path` (`item <path> #<n>`).
fn names(body: &str, path: &str) -> bool {
    body.strip_prefix(&format!("item {path} #"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Polls `path` until it is a HIT; returns how long that took.
async fn until_hit(app: &App, path: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        let r = app.http.get(app.addr, path).await.expect("answered");
        assert_eq!(r.status, 200);
        assert!(names(&r.text(), path), "{path}: {}", r.text());
        if r.cache_status() == Some("HIT") {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

// ---------------------------------------------------------------------------
// The chaos run
// ---------------------------------------------------------------------------

struct Sample {
    start: Instant,
    end: Instant,
    /// `Err` for a failed request (transport error, timeout, non-200).
    outcome: Result<String, String>,
    wrong_body: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    FlushAll,
    ScriptFlush,
}

struct Event {
    fault: Fault,
    /// When the fault began.
    began: Instant,
    /// When the server was back (restart/resume done; the command returned).
    recovered: Instant,
}

/// Kills, pauses, resumes, restarts and flushes `redis` in turn until
/// `duration` has passed. Runs on a blocking thread.
fn chaos(redis: &mut RedisServer, duration: Duration) -> Vec<Event> {
    let sleep = std::thread::sleep;
    let t0 = Instant::now();
    let mut events = Vec::new();
    sleep(Duration::from_millis(1000)); // warm-up
    // One cycle takes ~6.4 s; keep ~1.5 s at the end to watch recovery.
    loop {
        let began = Instant::now();
        redis.stop();
        sleep(Duration::from_millis(1000));
        redis.start();
        events.push(Event {
            fault: Fault::Kill,
            began,
            recovered: Instant::now(),
        });
        sleep(Duration::from_millis(1000));

        let began = Instant::now();
        redis.pause();
        sleep(Duration::from_millis(1000));
        redis.resume();
        events.push(Event {
            fault: Fault::Pause,
            began,
            recovered: Instant::now(),
        });
        sleep(Duration::from_millis(1000));

        let began = Instant::now();
        redis.cli(&["FLUSHALL"]);
        events.push(Event {
            fault: Fault::FlushAll,
            began,
            recovered: Instant::now(),
        });
        sleep(Duration::from_millis(700));

        let began = Instant::now();
        redis.cli(&["SCRIPT", "FLUSH"]);
        events.push(Event {
            fault: Fault::ScriptFlush,
            began,
            recovered: Instant::now(),
        });
        sleep(Duration::from_millis(700));
        if t0.elapsed() + Duration::from_millis(6400) > duration {
            break;
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_open_under_kill_pause_restart_and_flush_with_load() {
    let long = std::env::var("CACHEFENCE_LONG").is_ok_and(|v| v == "1");
    let (clients, duration) = if long {
        (50, Duration::from_secs(20))
    } else {
        (20, Duration::from_secs(8))
    };
    const URLS: u64 = 50;

    let mut redis = RedisServer::new();
    let app = Arc::new(app(&redis, "chaos:", |l| l).await);
    let stop = Arc::new(AtomicBool::new(false));

    let mut tasks = Vec::new();
    for _ in 0..clients {
        let app = app.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let path = format!("/item/{}", rand::random::<u64>() % URLS);
                let start = Instant::now();
                let r = app.http.get(app.addr, &path).await;
                let end = Instant::now();
                let (outcome, wrong_body) = match r {
                    Ok(r) if r.status == 200 => {
                        let wrong = !names(&r.text(), &path);
                        if wrong {
                            eprintln!("WRONG BODY for {path}: {:?}", r.text());
                        }
                        (Ok(r.cache_status().unwrap_or("").to_owned()), wrong)
                    }
                    Ok(r) => (Err(format!("{path}: status {}", r.status)), false),
                    Err(e) => (Err(e), false),
                };
                samples.push(Sample {
                    start,
                    end,
                    outcome,
                    wrong_body,
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples
        }));
    }

    let t0 = Instant::now();
    let (redis_back, events) = tokio::task::spawn_blocking(move || {
        let events = chaos(&mut redis, duration);
        (redis, events)
    })
    .await
    .expect("chaos thread");
    let redis = redis_back;
    // Let the load run to the end of the configured duration (at least 1.5 s
    // after the last fault) so recovery can be observed.
    let rest = duration
        .saturating_sub(t0.elapsed())
        .max(Duration::from_millis(1500));
    tokio::time::sleep(rest).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.expect("client task"));
    }
    samples.sort_by_key(|s| s.start);

    // --- numbers -----------------------------------------------------------
    let errors: Vec<&String> = samples
        .iter()
        .filter_map(|s| s.outcome.as_ref().err())
        .collect();
    let wrong = samples.iter().filter(|s| s.wrong_body).count();
    let count = |st: &str| {
        samples
            .iter()
            .filter(|s| s.outcome.as_deref() == Ok(st))
            .count()
    };
    let lat = |filter: &dyn Fn(&Sample) -> bool| {
        let mut l: Vec<Duration> = samples
            .iter()
            .filter(|s| filter(s))
            .map(|s| s.end - s.start)
            .collect();
        l.sort();
        l
    };
    let all = lat(&|_| true);
    let in_fault = |s: &Sample| {
        events.iter().any(|e| {
            matches!(e.fault, Fault::Kill | Fault::Pause)
                && s.start >= e.began
                && s.start <= e.recovered
        })
    };
    let during = lat(&in_fault);
    eprintln!(
        "chaos: {clients} clients, {:?}, {URLS} urls, redis timeout {REDIS_TIMEOUT:?}, breaker 3/500ms",
        t0.elapsed()
    );
    eprintln!(
        "chaos: requests sent {}, errors {}, wrong bodies {wrong}; HIT {} MISS {} BYPASS {} STALE {}; origin calls {}",
        samples.len(),
        errors.len(),
        count("HIT"),
        count("MISS"),
        count("BYPASS"),
        count("STALE"),
        app.counter.get(),
    );
    eprintln!(
        "chaos: latency overall p50 {:?} p99 {:?} max {:?}",
        quantile(&all, 0.5),
        quantile(&all, 0.99),
        all.last().copied().unwrap_or_default()
    );
    eprintln!(
        "chaos: latency during kill/pause windows ({} requests) p50 {:?} p99 {:?} max {:?}",
        during.len(),
        quantile(&during, 0.5),
        quantile(&during, 0.99),
        during.last().copied().unwrap_or_default()
    );
    let stats = app.handle.stats();
    eprintln!(
        "chaos: stats hits {} misses {} stores {} fenced {} bypasses {} redis_errors {} redis_calls {}",
        stats.hits,
        stats.misses,
        stats.stores,
        stats.fenced,
        stats.bypasses,
        stats.redis_errors,
        stats.redis_calls
    );
    let mut recoveries = Vec::new();
    for e in &events {
        // The first HIT of a request sent after the server was back.
        let first_hit = samples
            .iter()
            .filter(|s| s.start >= e.recovered && s.outcome.as_deref() == Ok("HIT"))
            .map(|s| s.end)
            .min();
        let recovery = first_hit.map(|t| t - e.recovered);
        eprintln!(
            "chaos: {:?} at +{:?} (lasted {:?}): recovery to first HIT {recovery:?}",
            e.fault,
            e.began - t0,
            e.recovered - e.began
        );
        recoveries.push((e.fault, recovery));
    }

    // --- assertions --------------------------------------------------------
    assert!(!events.is_empty());
    assert!(
        errors.is_empty(),
        "{} failed requests, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(wrong, 0, "wrong bodies served");
    for (fault, recovery) in &recoveries {
        assert!(recovery.is_some(), "no HIT after the {fault:?} recovered");
    }
    // Redis still works for the cache at the end.
    assert!(
        until_hit(&app, "/item/0", Duration::from_secs(5))
            .await
            .is_some()
    );
    drop(redis);
}

// ---------------------------------------------------------------------------
// Focused faults
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_redis_costs_at_most_the_redis_timeout_and_hits_resume() {
    let redis = RedisServer::new();
    let app = app(&redis, "pause:", |l| l).await;
    for i in 0..5 {
        let path = format!("/item/p{i}");
        app.http.get(app.addr, &path).await.expect("warm");
        assert!(
            until_hit(&app, &path, Duration::from_secs(2))
                .await
                .is_some()
        );
    }
    redis.pause();
    // A miss sends at most three Redis calls (read, lease, store/release),
    // each bounded by the Redis timeout; the origin answers at once.
    let bound = REDIS_TIMEOUT * 3 + Duration::from_secs(2);
    let mut worst = Duration::ZERO;
    for round in 0..3 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..10 {
            let (http, addr) = (app.http.clone(), app.addr);
            let path = if i < 5 {
                format!("/item/p{i}")
            } else {
                format!("/item/new{round}-{i}")
            };
            set.spawn(async move {
                let start = Instant::now();
                let r = http.get(addr, &path).await;
                (path, r, start.elapsed())
            });
        }
        while let Some(done) = set.join_next().await {
            let (path, r, took) = done.unwrap();
            let r = r.unwrap_or_else(|e| panic!("{path} while paused: {e}"));
            assert_eq!(r.status, 200, "{path}");
            assert!(names(&r.text(), &path), "{path}: {}", r.text());
            assert_ne!(r.cache_status(), Some("HIT"), "a HIT from a paused Redis?");
            assert!(took <= bound, "{path} took {took:?} (bound {bound:?})");
            worst = worst.max(took);
        }
    }
    eprintln!("paused: slowest answer {worst:?} (bound {bound:?})");
    redis.resume();
    let recovery = until_hit(&app, "/item/p0", Duration::from_secs(5)).await;
    eprintln!("paused: time from SIGCONT to first HIT {recovery:?}");
    assert!(recovery.is_some(), "hits did not resume after SIGCONT");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_out_of_memory_refuses_writes_and_requests_still_succeed() {
    let redis = RedisServer::with_args(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let app = app(&redis, "oom:", |l| l).await;
    // Stored before Redis runs out of memory.
    app.http.get(app.addr, "/item/before").await.unwrap();
    assert!(
        until_hit(&app, "/item/before", Duration::from_secs(2))
            .await
            .is_some()
    );

    // Fill the memory with one big key: SETRANGE allocates it from a tiny
    // command (a big SET would be refused for its own query buffer).
    redis.cli(&["SETRANGE", "filler", "3000000", "x"]);
    let refused = redis.try_cli(&["SET", "probe", "1"]);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("OOM")),
        "Redis should refuse writes now: {refused:?}"
    );

    let stores = app.handle.stats().stores;
    for round in 0..3 {
        for i in 0..5 {
            let path = format!("/item/oom{i}");
            let r = app.http.get(app.addr, &path).await.expect("answered");
            assert_eq!(r.status, 200, "{path}");
            assert!(names(&r.text(), &path), "{path}: {}", r.text());
            assert_ne!(r.cache_status(), Some("HIT"), "round {round}: {path}");
        }
        // Reads still work: the old entry is still a hit.
        let r = app.http.get(app.addr, "/item/before").await.unwrap();
        assert_eq!(
            (r.cache_status(), r.text().as_str()),
            (Some("HIT"), "item /item/before #1")
        );
    }
    assert_eq!(app.handle.stats().stores, stores, "nothing can be stored");
    assert_eq!(app.counter.get(), 1 + 15);
    // The breaker stays closed: Redis answers (with errors), it is alive.
    redis.cli(&["DEL", "filler"]);
    assert!(
        until_hit(&app, "/item/oom0", Duration::from_secs(3))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_replica_serves_hits_and_refuses_fills_without_errors() {
    let primary = RedisServer::new();
    let replica = RedisServer::with_args(&["--replica-read-only", "yes"]);
    replica.cli(&["REPLICAOF", "127.0.0.1", &primary.port().to_string()]);
    let synced = eventually(Duration::from_secs(10), || {
        replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
    })
    .await;
    assert!(synced, "{}", replica.cli(&["INFO", "replication"]));

    let writer = app(&primary, "ro:", |l| l).await;
    let reader = app(&replica, "ro:", |l| l).await;
    // Filled through the primary, replicated, served by the replica.
    writer.http.get(writer.addr, "/item/shared").await.unwrap();
    let replicated = eventually(Duration::from_secs(5), || {
        !entry_keys(&replica, "ro:").is_empty()
    })
    .await;
    assert!(replicated);
    let r = reader.http.get(reader.addr, "/item/shared").await.unwrap();
    assert_eq!(
        (r.cache_status(), r.text().as_str()),
        (Some("HIT"), "item /item/shared #1")
    );
    // A miss on the replica: the lease can't be written (READONLY); the
    // request goes to the origin and is answered.
    for round in 0..3 {
        for i in 0..5 {
            let path = format!("/item/ro{i}");
            let r = reader.http.get(reader.addr, &path).await.expect("answered");
            assert_eq!(r.status, 200, "round {round} {path}");
            assert!(names(&r.text(), &path), "{path}: {}", r.text());
            assert_ne!(r.cache_status(), Some("HIT"));
        }
    }
    assert_eq!(reader.counter.get(), 15);
    assert!(reader.handle.stats().redis_errors >= 15);
}

#[tokio::test(flavor = "multi_thread")]
async fn script_flush_mid_run_reloads_the_scripts_and_stores_again() {
    let redis = RedisServer::new();
    let app = app(&redis, "sf:", |l| l).await;
    app.http.get(app.addr, "/item/s1").await.unwrap();
    assert!(
        until_hit(&app, "/item/s1", Duration::from_secs(2))
            .await
            .is_some()
    );
    redis.cli(&["SCRIPT", "FLUSH"]);
    let stores = app.handle.stats().stores;
    let r = app.http.get(app.addr, "/item/s2").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.cache_status(), r.text().as_str()),
        (200, Some("MISS"), "item /item/s2 #2")
    );
    assert_eq!(app.handle.stats().stores, stores + 1, "the fill stored");
    let r = app.http.get(app.addr, "/item/s2").await.unwrap();
    assert_eq!(
        (r.cache_status(), r.text().as_str()),
        (Some("HIT"), "item /item/s2 #2")
    );
    // And once more, in the middle of a burst.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (http, addr) = (app.http.clone(), app.addr);
        set.spawn(async move {
            let path = format!("/item/burst{}", i % 5);
            (http.get(addr, &path).await, path)
        });
        if i == 10 {
            redis.cli(&["SCRIPT", "FLUSH"]);
        }
    }
    while let Some(done) = set.join_next().await {
        let (r, path) = done.unwrap();
        let r = r.unwrap();
        assert_eq!(r.status, 200);
        assert!(names(&r.text(), &path));
    }
    for i in 0..5 {
        let path = format!("/item/burst{i}");
        assert!(
            until_hit(&app, &path, Duration::from_secs(2))
                .await
                .is_some()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn flushall_while_a_fill_runs_answers_everyone_and_writes_nothing_back() {
    let redis = RedisServer::new();
    let app = app(&redis, "fa:", |l| l).await;
    let path = "/item/slow?delay_ms=600";
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let (http, addr) = (app.http.clone(), app.addr);
        set.spawn(async move {
            let start = Instant::now();
            (http.get(addr, path).await, start.elapsed())
        });
    }
    // The fill holds its lease now; flush everything under it.
    let leased = eventually(Duration::from_secs(2), || {
        fault_support::scan(&redis, "fa:*")
            .iter()
            .any(|k| k.ends_with(b":lease"))
    })
    .await;
    assert!(leased, "the fill took no lease");
    redis.cli(&["FLUSHALL"]);
    while let Some(done) = set.join_next().await {
        let (r, took) = done.unwrap();
        let r = r.expect("answered");
        assert_eq!(r.status, 200);
        assert!(names(&r.text(), path), "{}", r.text());
        // The fenced fill, then at most one refill by the requests that
        // waited on it (they look again rather than take a response whose
        // lease was lost): two origin times plus slack.
        assert!(took < Duration::from_millis(1200) + Duration::from_secs(3));
    }
    assert!(app.counter.get() <= 2, "{} origin calls", app.counter.get());
    assert_eq!(app.handle.stats().fenced, 1, "{:?}", app.handle.stats());
    // The fill whose lease was flushed never writes back.
    for key in entry_keys(&redis, "fa:") {
        let body = fault_support::hget(&redis, &key, "body").unwrap_or_default();
        assert_ne!(
            String::from_utf8_lossy(&body),
            format!("item {path} #1"),
            "a fill whose lease was flushed wrote back"
        );
    }
    // The cache works on: a hit with the newest response.
    assert!(
        until_hit(&app, path, Duration::from_secs(3))
            .await
            .is_some()
    );
    let r = app.http.get(app.addr, path).await.unwrap();
    assert_eq!(
        (r.cache_status(), r.text()),
        (Some("HIT"), format!("item {path} #{}", app.counter.get()))
    );
    assert_ne!(app.counter.get(), 1);
}
