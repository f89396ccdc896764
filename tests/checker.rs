//! A seeded, randomized checker that combines features and faults (issue 21).
//!
//! Three app server processes (this test binary re-executed as
//! `checker_server`, default layer settings; near caches in `p0` and `p2`,
//! `p2`'s subscription through a [`StallProxy`]) share one real
//! `redis-server` (AOF on, so a restart keeps the queue). The driver (this
//! process) is the origin: every process forwards its cache misses to it
//! over HTTP, so it knows every URL's version and every origin call's
//! interval. At random it mixes GETs (plain, `Vary`, tagged, ETag/304 with a
//! 1 s TTL so revalidations and XFetch refreshes run, two hosts, client
//! `If-None-Match`), version bumps followed by every invalidation kind
//! (path, key, uri, prefix, tag, all, soft, queued through the
//! `InvalidationQueue` and the workers of the processes), and faults: Redis
//! restart, `CLIENT KILL` of the data and of the pub/sub connections, a
//! stalled (half-open) subscription, a `maxmemory` + `volatile-lru` flood,
//! and a process SIGKILLed while it leads a fill. Beside them, origin
//! outages: for 0.5-2 s one URL (most of them an `/e/` URL, refreshed in the
//! background every second), or for 0.3-1 s every URL, the origin fails
//! most calls (`500`, `503`, a slow `503`, or a connection dropped mid-body,
//! which the app answers `502`), quickly or after 0.3-1.5 s, so fills and
//! background refreshes fall back on their stale copies
//! (`stale_if_error`) while invalidations run. In odd seeds `p1` has no
//! wake-up subscription (the builder's default) and no queue worker, and
//! nothing is invalidated through it: it hears no invalidation made
//! elsewhere, so nothing but the fences and its own checks stop its fills
//! and refreshes from handing out what an invalidation removed.
//!
//! Invariants, checked on the recorded history after the run:
//! - (a) no read that started after an invalidation returned sees a version
//!   older than the origin's at the invalidation's start (a soft one: a
//!   `STALE` answer may be older; a queued one "returns" when the queue is
//!   seen drained after its enqueue);
//! - (b) no two origin calls for one entry key overlap, except where the
//!   docs allow it (see [`overlap_excused`]);
//! - (c) no request waits past `fill_timeout + lock_timeout` (33 s) + 2 s,
//!   and every request of a live process is answered 200 or 304 with the
//!   body of its own URL, host and language, or a 5xx that is the failure
//!   of an origin call its own process made for its entry key while it
//!   waited (the body names the call; see `chk::origin_failure`);
//! - (d) every enqueued invalidation is applied (seen drained) within the
//!   drain SLA (10 s) + 5 s, and nothing ends in the dead letters.
//!
//! `CHECKER_SEED` (default 1), `CHECKER_SECS` (default 40) or `CHECKER_OPS`
//! (reads), `CHECKER_STRICT=1` (also fail on the violations of open bugs,
//! see [`KNOWN`]). A failure prints the seed and the history around it.

mod chk;
mod support;

use chk::Backend;
use support::RedisServer;

/// A server process of the checker (does nothing unless
/// `CACHEFENCE_ROLE=server`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a server process of the checker, run by it with CACHEFENCE_ROLE=server"]
async fn checker_server() {
    chk::server().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_features_and_faults_keep_every_promise() {
    let redis = RedisServer::with_args(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    chk::run(Backend::Single(redis), "checker_server").await;
}
