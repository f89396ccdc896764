//! Connections that heal (issue 22, must-hold 2): the cache built the way
//! the README says (`FenceCache::from_client`), with DEFAULT settings, over
//! a real Redis behind a TCP proxy. The proxy wedges the cache's connection
//! without closing it (half-open: it stops forwarding, as a NAT or firewall
//! that dropped the flow), while new connections pass; or it closes it.
//! Every request is answered throughout (fail-open), and caching resumes
//! (a `HIT` served) within the bound the docs state, on one fresh
//! connection, with no restart of the app.
//!
//! The numbers are printed to stderr (`--nocapture`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachefence::FenceCache;
use support::origin::{Counter, routes};
use support::proxy::StallProxy;
use support::{Http, RedisServer, serve};

/// What `HealingConnection` documents: caching resumes within about 1.5 s
/// of the connection going silent with the default settings; the bound
/// leaves room for a loaded CI machine.
const RESUMES_WITHIN: Duration = Duration::from_secs(5);
const WORKERS: usize = 4;
const PATHS: [&str; 2] = ["/item/1", "/item/2"];

/// Whether a body is the origin's answer for `path` (`item <path> #<n>`).
fn names(body: &str, path: &str) -> bool {
    body.strip_prefix(&format!("item {path} #"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Asks for `path`; the answer must be the origin's for it.
async fn ask(http: &Http, addr: SocketAddr, path: &str) -> Option<String> {
    let reply = http.get(addr, path).await;
    assert_eq!(reply.status, 200, "{path}");
    assert!(names(&reply.text(), path), "{path}: {}", reply.text());
    reply.cache_status().map(str::to_owned)
}

struct Measured {
    first_hit: Duration,
    answered: usize,
    new_connections: u64,
    origin_calls: usize,
}

/// An app on a cache made with `from_client` through a proxy in front of
/// Redis; warms [`PATHS`], runs [`WORKERS`] clients, `disrupt`s the
/// proxy, and measures when a `HIT` is served again.
async fn resumes_after(disrupt: impl FnOnce(&StallProxy)) -> Measured {
    let redis = RedisServer::new();
    let target: SocketAddr = format!("127.0.0.1:{}", redis.port()).parse().unwrap();
    let proxy = StallProxy::start(target).await;
    let cache = FenceCache::from_client(redis::Client::open(proxy.url()).unwrap())
        .await
        .unwrap()
        .namespace("heal:");
    let counter = Counter::default();
    let addr = serve(routes(counter.clone()).layer(cache.layer())).await;
    let http = Http::new();
    for path in PATHS {
        assert_eq!(ask(&http, addr, path).await.as_deref(), Some("MISS"));
        assert_eq!(ask(&http, addr, path).await.as_deref(), Some("HIT"));
    }
    assert_eq!(counter.get(), PATHS.len());
    let connections = proxy.accepted();
    assert_eq!(connections, 1, "the cache's one connection");

    // Clients all along: every request is answered with its body.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (http, stop, answered) = (http.clone(), stop.clone(), answered.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    ask(&http, addr, PATHS[i % PATHS.len()]).await;
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let disrupted = Instant::now();
    disrupt(&proxy);
    let first_hit = loop {
        // Sequential asks: a HIT says the cache's connection works again.
        if ask(&http, addr, PATHS[0]).await.as_deref() == Some("HIT") {
            break disrupted.elapsed();
        }
        assert!(
            disrupted.elapsed() < RESUMES_WITHIN,
            "caching did not resume within {RESUMES_WITHIN:?}: {} connections accepted, stats {:?}",
            proxy.accepted(),
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // And it stays up: the next asks of both keys are all HITs.
    for i in 0..20 {
        let path = PATHS[i % PATHS.len()];
        assert_eq!(ask(&http, addr, path).await.as_deref(), Some("HIT"), "{path}");
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("every request answered with its body");
    }
    Measured {
        first_hit,
        answered: answered.load(Ordering::SeqCst),
        new_connections: proxy.accepted() - connections,
        origin_calls: counter.get(),
    }
}

/// The cache's connection goes half-open (stops forwarding, never closes)
/// while new connections pass: the cache's calls time out at its own
/// 250 ms, the connection never learns it is dead. With `from_client` the
/// cache opens one fresh connection (its PING answered), replaces the
/// wedged one, and serves HITs again. (With `FenceCache::new` over a
/// `ConnectionManager`, as before, no HIT came back and no connection was
/// opened.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_replaced_and_caching_resumes() {
    let m = resumes_after(StallProxy::stall_existing).await;
    eprintln!(
        "healing (half-open): first HIT {:.2} s after the stall; {} requests answered by \
         {WORKERS} clients meanwhile, {} origin calls, {} new connection(s)",
        m.first_hit.as_secs_f64(),
        m.answered,
        m.origin_calls,
        m.new_connections
    );
    assert_eq!(m.new_connections, 1, "one replacement");
}

/// The hop closes the connection instead (a FIN): the same, and at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_replaced_and_caching_resumes() {
    let m = resumes_after(StallProxy::close_all).await;
    eprintln!(
        "healing (closed): first HIT {:.2} s after the close; {} requests answered by \
         {WORKERS} clients meanwhile, {} origin calls, {} new connection(s)",
        m.first_hit.as_secs_f64(),
        m.answered,
        m.origin_calls,
        m.new_connections
    );
    assert_eq!(m.new_connections, 1, "one replacement");
}
