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
//! and a process SIGKILLed while it leads a fill.
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
//!   body of its own URL, host and language;
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
