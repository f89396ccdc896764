//! The durable invalidation queue against a real `redis-server`: applying,
//! bounded streams, a worker killed with messages in hand, poison messages,
//! duplicate deliveries and clean shutdown.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cachefence::queue::InvalidationQueue;
use cachefence::{FenceCache, FenceHandle, FenceLayer, Invalidation};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use support::origin::{Counter, routes};
use support::{Http, RedisServer, serve};
use tokio::sync::watch;

const NS: &str = "q:";
const GROUP: &str = "cachefence";

/// A connection whose commands wait until its gate is open, then go to
/// Redis: a handle over a closed gate applies nothing until told to.
#[derive(Clone)]
struct Gated {
    inner: ConnectionManager,
    open: watch::Receiver<bool>,
}

impl Gated {
    fn open(inner: ConnectionManager) -> Self {
        let (tx, open) = watch::channel(true);
        drop(tx);
        Self { inner, open }
    }

    fn closed(inner: ConnectionManager) -> (Self, watch::Sender<bool>) {
        let (tx, open) = watch::channel(false);
        (Self { inner, open }, tx)
    }

    async fn wait(&self) {
        let mut open = self.open.clone();
        // An error means the sender is gone: the gate stays as it is.
        if !*open.borrow() && open.wait_for(|o| *o).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl ConnectionLike for Gated {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.wait().await;
            self.inner.req_packed_command(cmd).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.wait().await;
            self.inner
                .req_packed_commands(pipeline, offset, count)
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// A cached origin over HTTP, its handle and queue.
struct App {
    addr: SocketAddr,
    http: Http,
    handle: FenceHandle<Gated>,
    queue: InvalidationQueue<Gated>,
    conn: ConnectionManager,
}

async fn app(redis: &RedisServer) -> App {
    let conn = redis.connection_manager().await;
    let layer = FenceCache::builder(Gated::open(conn.clone()))
        .redis_timeout(Duration::from_secs(5))
        .build()
        .expect("cache")
        .layer()
        .namespace(NS)
        .beta(0.0);
    let handle = layer.handle();
    let queue = handle.queue_with(Gated::open(conn.clone()));
    let addr = serve(routes(Counter::default()).layer(layer)).await;
    App {
        addr,
        http: Http::new(),
        handle,
        queue,
        conn,
    }
}

impl App {
    async fn status(&self, path: &str) -> String {
        let reply = self.http.get(self.addr, path).await;
        reply.cache_status().unwrap_or("none").to_owned()
    }

    /// Stores `path` in the cache and checks that it is served from there.
    async fn cache(&self, path: &str) {
        self.status(path).await;
        assert_eq!(self.status(path).await, "HIT", "{path} was not cached");
    }

    /// A handle whose commands fail while the returned flag is set (as an
    /// unreachable server, or with `refuses` as a server answering with an
    /// error), and its queue over a connection that works.
    fn breakable_queue(
        &self,
        refuses: bool,
    ) -> (
        FenceHandle<Breakable>,
        InvalidationQueue<Breakable>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        let broken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let handle = FenceLayer::new(Breakable {
            inner: self.conn.clone(),
            broken: broken.clone(),
            refuses,
        })
        .namespace(NS)
        .handle();
        let queue = handle.queue_with(Breakable {
            inner: self.conn.clone(),
            broken: std::sync::Arc::default(),
            refuses: false,
        });
        (handle, queue, broken)
    }

    /// A queue whose worker's handle waits on a gate before every command.
    fn gated_queue(&self) -> (InvalidationQueue<Gated>, watch::Sender<bool>) {
        let (gated, gate) = Gated::closed(self.conn.clone());
        let handle = FenceCache::builder(gated)
            .redis_timeout(Duration::from_secs(600))
            .build()
            .expect("cache")
            .layer()
            .namespace(NS)
            .handle();
        (handle.queue_with(Gated::open(self.conn.clone())), gate)
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn int(redis: &RedisServer, args: &[&str]) -> i64 {
    match redis.cli_value(args) {
        Value::Int(n) => n,
        other => panic!("{args:?}: {other:?}"),
    }
}

fn array_len(redis: &RedisServer, args: &[&str]) -> usize {
    match redis.cli_value(args) {
        Value::Array(items) => items.len(),
        Value::Nil => 0,
        other => panic!("{args:?}: {other:?}"),
    }
}

/// Messages pending in the group (for one consumer, or all).
fn pending(redis: &RedisServer, stream: &str, consumer: Option<&str>) -> usize {
    let mut args = vec!["XPENDING", stream, GROUP, "-", "+", "10000"];
    if let Some(c) = consumer {
        args.push(c);
    }
    // Before any worker made the group, nothing is pending.
    match redis.try_cli(&args) {
        Ok(Value::Array(items)) => items.len(),
        _ => 0,
    }
}

fn attempts_key(queue: &InvalidationQueue<Gated>) -> String {
    format!("{}:attempts", queue.stream_key())
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_invalidations_are_applied_and_the_stream_stays_bounded() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    app.cache("/item/1").await;
    let queue = &app.queue;
    queue.enqueue(&Invalidation::path("/item/1")).await.unwrap();
    assert_eq!(queue.backlog().await.unwrap(), 1);
    // Enqueuing sends no blocking command on the shared connection.
    assert_eq!(redis.command_count("xreadgroup"), 0);

    let worker = queue
        .worker(redis.client())
        .block(Duration::from_millis(200))
        .consumer("w1");
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    wait_for("the first invalidation", Duration::from_secs(10), || {
        control.stats().applied == 1
    })
    .await;
    assert_eq!(queue.backlog().await.unwrap(), 0);
    assert_eq!(app.status("/item/1").await, "MISS");

    // 1000 more: every one applied, and nothing stays behind.
    let many: Vec<Invalidation> = (0..1000)
        .map(|i| Invalidation::path(format!("/item/n{i}")))
        .collect();
    let ids = queue.enqueue_all(&many).await.unwrap();
    assert_eq!(ids.len(), 1000);
    let stream = queue.stream_key().to_owned();
    let mut longest = 0;
    wait_for("1000 invalidations", Duration::from_secs(60), || {
        longest = longest.max(int(&redis, &["XLEN", &stream]));
        control.stats().applied == 1001
    })
    .await;
    assert!(longest <= 1000, "the stream grew to {longest}");
    assert_eq!(queue.backlog().await.unwrap(), 0);
    assert_eq!(int(&redis, &["XLEN", &stream]), 0);
    assert_eq!(pending(&redis, &stream, None), 0);
    assert_eq!(int(&redis, &["EXISTS", &attempts_key(queue)]), 0);
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
    let stats = control.stats();
    assert_eq!(
        (stats.retries, stats.dead_lettered, stats.redis_errors),
        (0, 0, 0)
    );
    assert_eq!(stats.connects, 1);

    control.shutdown();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the worker stops")
        .unwrap();
    assert!(!control.is_running());
    // A clean stop with nothing pending leaves no consumer behind.
    assert_eq!(
        array_len(&redis, &["XINFO", "CONSUMERS", &stream, GROUP]),
        0
    );
}

/// A worker in a child process whose every apply hangs (its handle's
/// connection is gated shut), so it holds its messages until killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "the child process of a_killed_worker_s_messages_are_claimed_and_applied"]
async fn worker_process() {
    if std::env::var("CACHEFENCE_ROLE").as_deref() != Ok("worker") {
        return;
    }
    let url = std::env::var("CACHEFENCE_REDIS_URL").expect("CACHEFENCE_REDIS_URL");
    let consumer = std::env::var("CACHEFENCE_CONSUMER").expect("CACHEFENCE_CONSUMER");
    let client = redis::Client::open(url).expect("redis url");
    let conn = client.get_connection_manager().await.expect("connect");
    let (gated, _gate) = Gated::closed(conn.clone());
    let handle = FenceCache::builder(gated)
        .redis_timeout(Duration::from_secs(600))
        .build()
        .expect("cache")
        .layer()
        .namespace(NS)
        .handle();
    let worker = handle
        .queue_with(Gated::open(conn))
        .worker(client)
        .consumer(consumer)
        .batch(50)
        .block(Duration::from_millis(200));
    worker.run().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_s_messages_are_claimed_and_applied() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    let paths: Vec<String> = (0..20).map(|i| format!("/item/k{i}")).collect();
    for p in &paths {
        app.cache(p).await;
    }
    let invs: Vec<Invalidation> = paths.iter().map(Invalidation::path).collect();
    app.queue.enqueue_all(&invs).await.unwrap();
    let stream = app.queue.stream_key().to_owned();

    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "worker_process", "--ignored", "--nocapture"])
        .env("CACHEFENCE_ROLE", "worker")
        .env("CACHEFENCE_REDIS_URL", redis.url())
        .env("CACHEFENCE_CONSUMER", "doomed")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The child read all 20 and is stuck applying the first.
    let attempts = attempts_key(&app.queue);
    wait_for(
        "the child to take the messages",
        Duration::from_secs(30),
        || pending(&redis, &stream, Some("doomed")) == 20 && int(&redis, &["HLEN", &attempts]) >= 1,
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(pending(&redis, &stream, Some("doomed")), 20);
    for p in &paths {
        assert_eq!(
            app.status(p).await,
            "HIT",
            "{p} was invalidated by the killed worker"
        );
    }

    let worker = app
        .queue
        .worker(redis.client())
        .consumer("rescuer")
        .claim_idle(Duration::from_millis(300))
        .block(Duration::from_millis(100));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    wait_for("the rescue", Duration::from_secs(20), || {
        control.stats().applied == 20
    })
    .await;
    for p in &paths {
        assert_eq!(app.status(p).await, "MISS", "{p} was not invalidated");
    }
    assert_eq!(pending(&redis, &stream, None), 0);
    assert_eq!(app.queue.backlog().await.unwrap(), 0);
    let stats = control.stats();
    assert_eq!(stats.claimed, 20);
    assert_eq!(stats.dead_lettered, 0);
    control.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_go_to_the_dead_letter_stream_and_do_not_block_others() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    let good = ["/item/g1", "/item/g2", "/item/g3"];
    for p in good {
        app.cache(p).await;
    }
    let queue = &app.queue;
    let stream = queue.stream_key().to_owned();
    // Refused by apply: an empty prefix.
    let refused = queue.enqueue(&Invalidation::prefix("")).await.unwrap();
    // Written by something else: no `inv` field, and a bogus one.
    let junk = redis.cli(&["XADD", &stream, "*", "junk", "1"]);
    let bogus = redis.cli(&["XADD", &stream, "*", "inv", "bogus"]);
    for p in good {
        queue.enqueue(&Invalidation::path(p)).await.unwrap();
    }

    let worker = queue
        .worker(redis.client())
        .max_attempts(3)
        .backoff(Duration::from_millis(300), Duration::from_secs(1))
        .claim_idle(Duration::from_secs(5))
        .block(Duration::from_millis(100));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    // The good ones are applied while the poison waits for its retry.
    wait_for("the good invalidations", Duration::from_secs(10), || {
        control.stats().applied == 3
    })
    .await;
    assert_eq!(control.stats().dead_lettered, 0);
    for p in good {
        assert_eq!(app.status(p).await, "MISS");
    }
    wait_for("the dead letters", Duration::from_secs(20), || {
        control.stats().dead_lettered == 3
    })
    .await;
    let stats = control.stats();
    assert_eq!((stats.applied, stats.retries), (3, 6));
    assert_eq!(queue.backlog().await.unwrap(), 0);
    assert_eq!(pending(&redis, &stream, None), 0);
    assert_eq!(int(&redis, &["EXISTS", &attempts_key(queue)]), 0);

    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(queue.dead_letter_count().await.unwrap(), 3);
    assert_eq!(dead.len(), 3);
    assert!(dead.iter().all(|d| d.attempts == 3), "{dead:?}");
    // (Their order depends on the jitter of their retries.)
    let by_source = |id: &str| {
        dead.iter()
            .find(|d| d.source_id == id)
            .unwrap_or_else(|| panic!("no dead letter for {id}: {dead:?}"))
    };
    let refused = by_source(&refused);
    assert_eq!(refused.payload.as_deref(), Some("prefix:"));
    assert!(refused.error.contains("empty prefix"), "{}", refused.error);
    let junk = by_source(&junk);
    assert_eq!(junk.payload, None);
    assert!(junk.error.contains("undecodable"), "{}", junk.error);
    let bogus = by_source(&bogus);
    assert_eq!(bogus.payload.as_deref(), Some("bogus"));
    assert!(bogus.error.contains("undecodable"), "{}", bogus.error);
    // The dead-letter entry keeps the original fields.
    let raw = redis.cli(&["XRANGE", queue.dead_letter_key(), &junk.id, &junk.id]);
    assert!(raw.contains("junk"), "{raw}");
    control.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_delivered_twice_does_no_harm() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    app.cache("/item/d").await;
    let stream = app.queue.stream_key().to_owned();
    app.queue
        .enqueue(&Invalidation::path("/item/d"))
        .await
        .unwrap();

    // The first worker takes it and hangs in the invalidation.
    let (slow_queue, gate) = app.gated_queue();
    let slow = slow_queue
        .worker(redis.client())
        .consumer("slow")
        .claim_idle(Duration::from_secs(600))
        .block(Duration::from_millis(100));
    let slow_control = slow.handle();
    let slow_task = tokio::spawn(slow.run());
    wait_for("the slow worker to start", Duration::from_secs(10), || {
        pending(&redis, &stream, Some("slow")) == 1
    })
    .await;

    // A second worker claims it once idle, applies and acknowledges it.
    let fast = app
        .queue
        .worker(redis.client())
        .consumer("fast")
        .claim_idle(Duration::from_millis(300))
        .block(Duration::from_millis(100));
    let fast_control = fast.handle();
    let fast_task = tokio::spawn(fast.run());
    wait_for("the second delivery", Duration::from_secs(10), || {
        fast_control.stats().applied == 1
    })
    .await;
    assert_eq!(app.status("/item/d").await, "MISS");
    assert_eq!(app.status("/item/d").await, "HIT");

    // The first worker finishes too: applied twice, harmlessly.
    gate.send_replace(true);
    wait_for("the first delivery", Duration::from_secs(10), || {
        slow_control.stats().applied == 1
    })
    .await;
    assert_eq!(slow_control.stats().duplicates, 1);
    // A late duplicate invalidates what was stored after it was enqueued,
    // which is allowed; nothing failed and nothing is left over.
    assert_eq!(app.queue.backlog().await.unwrap(), 0);
    assert_eq!(pending(&redis, &stream, None), 0);
    assert_eq!(app.queue.dead_letter_count().await.unwrap(), 0);
    assert_eq!(int(&redis, &["EXISTS", &attempts_key(&app.queue)]), 0);
    // Applying it once more by hand is harmless as well.
    app.handle
        .apply(&Invalidation::path("/item/d"))
        .await
        .unwrap();
    assert_eq!(app.status("/item/d").await, "MISS");
    assert_eq!(app.status("/item/d").await, "HIT");

    // Enqueued twice: both applied, the second removes nothing.
    app.queue
        .enqueue_all(&[Invalidation::path("/item/d"), Invalidation::path("/item/d")])
        .await
        .unwrap();
    wait_for("both copies", Duration::from_secs(10), || {
        fast_control.stats().applied + slow_control.stats().applied == 4
    })
    .await;
    assert_eq!(app.status("/item/d").await, "MISS");
    assert_eq!(
        fast_control.stats().dead_lettered + slow_control.stats().dead_lettered,
        0
    );
    slow_control.shutdown();
    fast_control.shutdown();
    slow_task.await.unwrap();
    fast_task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_a_blocking_read_at_once() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    let stream = app.queue.stream_key().to_owned();
    let worker = app
        .queue
        .worker(redis.client())
        .consumer("idle")
        .block(Duration::from_secs(30));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    wait_for("the blocking read", Duration::from_secs(10), || {
        redis.command_count("xreadgroup") >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    control.shutdown();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("shutdown waited for the 30 s read")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        array_len(&redis, &["XINFO", "CONSUMERS", &stream, GROUP]),
        0
    );
    // A message enqueued now waits for the next worker.
    app.queue.enqueue(&Invalidation::path("/x")).await.unwrap();
    assert_eq!(app.queue.backlog().await.unwrap(), 1);
    assert_eq!(pending(&redis, &stream, None), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_the_message_in_hand_and_releases_the_rest() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    let paths = ["/item/s1", "/item/s2", "/item/s3"];
    for p in paths {
        app.cache(p).await;
    }
    let invs: Vec<Invalidation> = paths.iter().map(|p| Invalidation::path(*p)).collect();
    app.queue.enqueue_all(&invs).await.unwrap();
    let stream = app.queue.stream_key().to_owned();
    let attempts = attempts_key(&app.queue);

    let (slow_queue, gate) = app.gated_queue();
    let worker = slow_queue
        .worker(redis.client())
        .consumer("stopping")
        .batch(3)
        .concurrency(1)
        .claim_idle(Duration::from_secs(60))
        .block(Duration::from_millis(100));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    wait_for("the first message in hand", Duration::from_secs(10), || {
        int(&redis, &["HLEN", &attempts]) == 1
    })
    .await;
    control.shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !task.is_finished(),
        "shutdown abandoned the message in hand"
    );
    gate.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the worker stops")
        .unwrap();
    let stats = control.stats();
    assert_eq!((stats.applied, stats.released), (1, 2));
    assert_eq!(app.status("/item/s1").await, "MISS");
    assert_eq!(app.status("/item/s2").await, "HIT");
    assert_eq!(pending(&redis, &stream, Some("stopping")), 2);

    // Released messages are claimable at once, long before the 60 s idle
    // time a crashed worker's would need.
    let next = app
        .queue
        .worker(redis.client())
        .consumer("next")
        .claim_idle(Duration::from_secs(60))
        .block(Duration::from_millis(100));
    let next_control = next.handle();
    let next_task = tokio::spawn(next.run());
    wait_for("the released messages", Duration::from_secs(5), || {
        next_control.stats().applied == 2
    })
    .await;
    assert_eq!(next_control.stats().claimed, 2);
    assert_eq!(app.status("/item/s2").await, "MISS");
    assert_eq!(app.status("/item/s3").await, "MISS");
    assert_eq!(app.queue.backlog().await.unwrap(), 0);
    assert_eq!(pending(&redis, &stream, None), 0);
    next_control.shutdown();
    next_task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_reconnects_after_redis_restarts() {
    let mut redis = RedisServer::new();
    let app = app(&redis).await;
    let worker = app
        .queue
        .worker(redis.client())
        .block(Duration::from_millis(200));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    app.queue.enqueue(&Invalidation::path("/a")).await.unwrap();
    wait_for("the first invalidation", Duration::from_secs(10), || {
        control.stats().applied == 1
    })
    .await;

    // Without persistence the restart loses the stream and its group too.
    redis.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.queue.enqueue(&Invalidation::path("/b")).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the queue's connection did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for(
        "an invalidation after the restart",
        Duration::from_secs(15),
        || control.stats().applied == 2,
    )
    .await;
    let stats = control.stats();
    assert!(stats.redis_errors > 0, "{stats:?}");
    assert!(stats.connects >= 2, "{stats:?}");
    assert_eq!(app.queue.backlog().await.unwrap(), 0);
    control.shutdown();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the worker stops")
        .unwrap();
}

// ---------------------------------------------------------------------------
// The drain SLA with default settings: worker processes, one SIGKILLed
// mid-drain; a live worker keeps its claim; stats; dead letters; enqueue
// through a Redis restart.
// ---------------------------------------------------------------------------

/// A worker process with every setting at its default. Does nothing unless
/// `CACHEFENCE_ROLE=default-worker`; then applies invalidations until
/// killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a worker process for a_sigkilled_worker_process_does_not_break_the_drain_sla"]
async fn default_worker_process() {
    if std::env::var("CACHEFENCE_ROLE").as_deref() != Ok("default-worker") {
        return;
    }
    let url = std::env::var("CACHEFENCE_REDIS_URL").expect("CACHEFENCE_REDIS_URL");
    let consumer = std::env::var("CACHEFENCE_CONSUMER").expect("CACHEFENCE_CONSUMER");
    let client = redis::Client::open(url).expect("redis url");
    let conn = client.get_connection_manager().await.expect("connect");
    let handle = FenceLayer::new(conn).namespace(NS).handle();
    handle.queue().worker(client).consumer(consumer).run().await;
}

/// Child processes, SIGKILLed and reaped on drop.
struct Children(Vec<(String, std::process::Child)>);

impl Children {
    fn spawn_worker(&mut self, redis: &RedisServer, name: &str) {
        let exe = std::env::current_exe().unwrap();
        let child = Command::new(exe)
            .args([
                "--exact",
                "default_worker_process",
                "--ignored",
                "--nocapture",
            ])
            .env("CACHEFENCE_ROLE", "default-worker")
            .env("CACHEFENCE_REDIS_URL", redis.url())
            .env("CACHEFENCE_CONSUMER", name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.0.push((name.to_owned(), child));
    }

    fn pid(&self, name: &str) -> u32 {
        self.0.iter().find(|(n, _)| n == name).unwrap().1.id()
    }

    fn signal(&self, name: &str, sig: &str) {
        let pid = self.pid(name).to_string();
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    }

    fn kill(&mut self, name: &str) {
        let child = &mut self.0.iter_mut().find(|(n, _)| n == name).unwrap().1;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// GETs every path, `parallel` at a time, and returns the `x-cache`
/// statuses in order.
async fn statuses(app: &App, paths: &[String], parallel: usize) -> Vec<String> {
    use futures_util::StreamExt;
    futures_util::stream::iter(paths)
        .map(|p| app.status(p))
        .buffered(parallel)
        .collect()
        .await
}

fn pending_of(stats: &cachefence::queue::QueueStats, consumer: &str) -> u64 {
    stats
        .consumers
        .iter()
        .find(|c| c.name == consumer)
        .map_or(0, |c| c.pending)
}

/// The scenario of issue 12: two worker processes with default settings,
/// 5,000 invalidations queued at once, one worker SIGKILLed mid-drain with
/// messages in hand. Every invalidation lands within 10 s of the enqueue.
#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_worker_process_does_not_break_the_drain_sla() {
    const N: usize = 5_000;
    const SLA: Duration = Duration::from_secs(10);
    let redis = RedisServer::new();
    let app = app(&redis).await;
    let paths: Vec<String> = (0..N).map(|i| format!("/item/sla{i}")).collect();
    statuses(&app, &paths, 32).await;
    let cached = statuses(&app, &paths, 32).await;
    assert!(
        cached.iter().all(|s| s == "HIT"),
        "not all {N} pages were cached"
    );

    let mut children = Children(Vec::new());
    children.spawn_worker(&redis, "w-a");
    children.spawn_worker(&redis, "w-b");
    let queue = &app.queue;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = queue.stats().await.unwrap();
        if stats.consumers.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workers did not start: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let invs: Vec<Invalidation> = paths.iter().map(Invalidation::path).collect();
    let enqueued = Instant::now();
    queue.enqueue_all(&invs).await.unwrap();
    let enqueue_time = enqueued.elapsed();
    tokio::time::sleep(Duration::from_millis(100).saturating_sub(enqueue_time)).await;
    // Freeze the victim to see what it holds, then kill it with that in
    // hand (if it was between two batches, let it take the next one).
    let in_hand = loop {
        children.signal("w-b", "-STOP");
        let held = pending_of(&queue.stats().await.unwrap(), "w-b");
        if held > 0 {
            break held;
        }
        children.signal("w-b", "-CONT");
        assert!(enqueued.elapsed() < SLA, "w-b never held a message");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    children.kill("w-b");
    let killed_at = enqueued.elapsed();

    let mut drained = None;
    let mut max_age = Duration::ZERO;
    while drained.is_none() {
        let stats = queue.stats().await.unwrap();
        max_age = max_age.max(stats.oldest_age.unwrap_or_default());
        if stats.depth == 0 && stats.pending == 0 {
            drained = Some(enqueued.elapsed());
        }
        assert!(
            enqueued.elapsed() < Duration::from_secs(60),
            "the queue did not drain: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = drained.unwrap();
    let stats = queue.stats().await.unwrap();
    eprintln!(
        "drain SLA: {N} invalidations enqueued in {enqueue_time:?}, w-b killed at {killed_at:?} \
         with {in_hand} in hand, all applied {drained:?} after the enqueue \
         (oldest age seen {max_age:?}); {stats:?}"
    );
    assert!(
        drained <= SLA,
        "drained in {drained:?}, above the {SLA:?} SLA"
    );
    assert_eq!(stats.applied, N as u64, "{stats:?}");
    assert!(stats.reclaimed >= in_hand, "{stats:?}");
    assert_eq!((stats.dead_letters, stats.dead_lettered), (0, 0));
    // Nothing lost: every page is gone from the cache.
    let after = statuses(&app, &paths, 32).await;
    let kept: Vec<&String> = paths
        .iter()
        .zip(&after)
        .filter(|(_, s)| *s != "MISS")
        .map(|(p, _)| p)
        .collect();
    assert!(
        kept.is_empty(),
        "{} pages were not invalidated: {:?}",
        kept.len(),
        &kept[..kept.len().min(5)]
    );
}

/// A worker busy with one long invalidation keeps its claim (its heartbeat
/// refreshes it) far beyond the claim idle time: the other worker, with
/// default settings too, never starts it a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_worker_busy_on_a_long_invalidation_keeps_its_claim() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    app.cache("/item/long").await;
    let (slow_queue, gate) = app.gated_queue();
    let slow = slow_queue.worker(redis.client()).consumer("slow");
    let slow_control = slow.handle();
    let slow_task = tokio::spawn(slow.run());
    app.queue
        .enqueue(&Invalidation::prefix("/item/"))
        .await
        .unwrap();
    wait_for(
        "the slow worker to take it",
        Duration::from_secs(10),
        || pending(&redis, app.queue.stream_key(), Some("slow")) == 1,
    )
    .await;
    let other = app.queue.worker(redis.client()).consumer("other");
    let other_control = other.handle();
    let other_task = tokio::spawn(other.run());

    // Hold it for well over twice the 3 s claim idle time.
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_secs(7) {
        let stats = app.queue.stats().await.unwrap();
        let slow_c = stats.consumers.iter().find(|c| c.name == "slow").unwrap();
        assert_eq!(slow_c.pending, 1, "{stats:?}");
        assert!(slow_c.idle < Duration::from_secs(3), "{stats:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let other_stats = other_control.stats();
    assert_eq!(
        (other_stats.claimed, other_stats.applied),
        (0, 0),
        "{other_stats:?}"
    );
    let slow_stats = slow_control.stats();
    assert!(slow_stats.refreshes >= 5, "{slow_stats:?}");
    assert_eq!(slow_stats.lost_claims, 0);
    assert_eq!(app.status("/item/long").await, "HIT");

    gate.send_replace(true);
    wait_for("the long invalidation", Duration::from_secs(10), || {
        slow_control.stats().applied == 1
    })
    .await;
    assert_eq!(app.status("/item/long").await, "MISS");
    let stats = app.queue.stats().await.unwrap();
    assert_eq!(
        (stats.applied, stats.reclaimed, stats.depth, stats.pending),
        (1, 0, 0, 0)
    );
    assert_eq!(slow_control.stats().duplicates, 0);
    slow_control.shutdown();
    other_control.shutdown();
    slow_task.await.unwrap();
    other_task.await.unwrap();
}

/// A connection whose commands fail while it is broken, and go to Redis
/// otherwise. It fails as an unreachable server (connection refused), or,
/// with `refuses`, as a server that answers every command with an error.
#[derive(Clone)]
struct Breakable {
    inner: ConnectionManager,
    broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refuses: bool,
}

impl Breakable {
    fn check(&self) -> redis::RedisResult<()> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            if self.refuses {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                    "refused by the test",
                )));
            }
            return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        }
        Ok(())
    }
}

impl ConnectionLike for Breakable {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.check()?;
            self.inner.req_packed_command(cmd).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.check()?;
            self.inner
                .req_packed_commands(pipeline, offset, count)
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_count_and_dead_letters_can_be_listed_replayed_and_purged() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    for p in ["/item/r1", "/item/r2"] {
        app.cache(p).await;
    }
    // A handle whose Redis calls fail until it is repaired, with a command
    // refused (not Redis unreachable): it uses up attempts.
    let (handle, queue, broken) = app.breakable_queue(true);
    let stream = queue.stream_key().to_owned();
    let r1 = queue
        .enqueue(&Invalidation::path("/item/r1"))
        .await
        .unwrap();
    let r2 = queue
        .enqueue(&Invalidation::path("/item/r2"))
        .await
        .unwrap();
    let junk = redis.cli(&["XADD", &stream, "*", "junk", "1"]);
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.depth, stats.pending, stats.group_exists),
        (3, 0, false)
    );
    assert!(stats.oldest_age.is_some(), "{stats:?}");
    assert!(stats.consumers.is_empty());

    let worker = queue
        .worker(redis.client())
        .consumer("w")
        .max_attempts(2)
        .backoff(Duration::from_millis(50), Duration::from_millis(100));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    wait_for("three dead letters", Duration::from_secs(20), || {
        control.stats().dead_lettered == 3
    })
    .await;
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (
            stats.depth,
            stats.pending,
            stats.dead_letters,
            stats.retried,
            stats.dead_lettered,
            stats.applied
        ),
        (0, 0, 3, 3, 3, 0),
        "{stats:?}"
    );
    assert!(stats.oldest_age.is_none());
    assert_eq!(stats.consumers.len(), 1);
    assert_eq!(stats.consumers[0].name, "w");
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert!(dead.iter().all(|d| d.attempts == 2), "{dead:?}");
    assert!(dead.iter().any(|d| d.source_id == r2), "{dead:?}");
    let id_of = |source: &str| {
        dead.iter()
            .find(|d| d.source_id == source)
            .unwrap()
            .id
            .clone()
    };
    assert!(
        dead.iter()
            .find(|d| d.source_id == r1)
            .unwrap()
            .error
            .contains("refused")
            || dead
                .iter()
                .find(|d| d.source_id == r1)
                .unwrap()
                .error
                .contains("circuit breaker"),
        "the broken connection's error, or the breaker it opened: {dead:?}"
    );

    // Repair the handle (and wait for its circuit breaker to close).
    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.invalidate_path("/nothing").await.is_err() {
        assert!(Instant::now() < deadline, "the handle did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Replay one by id: applied; a second replay of it finds nothing.
    let again = queue.replay_dead_letter(&id_of(&r1)).await.unwrap();
    assert!(again.is_some());
    assert_eq!(queue.replay_dead_letter(&id_of(&r1)).await.unwrap(), None);
    wait_for("the replayed invalidation", Duration::from_secs(10), || {
        control.stats().applied == 1
    })
    .await;
    assert_eq!(app.status("/item/r1").await, "MISS");
    assert_eq!(app.status("/item/r2").await, "HIT");
    // Purge the junk by id, replay the rest.
    assert_eq!(queue.purge_dead_letters(&[id_of(&junk)]).await.unwrap(), 1);
    assert_eq!(queue.purge_dead_letters(&[id_of(&junk)]).await.unwrap(), 0);
    assert_eq!(queue.replay_dead_letters(100).await.unwrap().len(), 1);
    wait_for(
        "the second replayed invalidation",
        Duration::from_secs(10),
        || control.stats().applied == 2,
    )
    .await;
    assert_eq!(app.status("/item/r2").await, "MISS");
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (
            stats.depth,
            stats.dead_letters,
            stats.applied,
            stats.replayed,
            stats.reclaimed
        ),
        (0, 0, 2, 2, 0),
        "{stats:?}"
    );

    // Purge everything: a new poison message, dead-lettered, then gone.
    redis.cli(&["XADD", &stream, "*", "inv", "bogus"]);
    wait_for("a fourth dead letter", Duration::from_secs(20), || {
        control.stats().dead_lettered == 4
    })
    .await;
    assert_eq!(queue.purge_all_dead_letters().await.unwrap(), 1);
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
    control.shutdown();
    task.await.unwrap();
    // A clean stop leaves no consumer behind.
    assert!(queue.stats().await.unwrap().consumers.is_empty());
}

/// 50 producers enqueue through a 1 s Redis restart (with AOF, as the
/// queue must run): fewer than 0.5 % of the calls fail, every call that
/// succeeded is in the stream afterwards, and workers with default
/// settings apply every one.
#[tokio::test(flavor = "multi_thread")]
async fn enqueue_rides_out_a_redis_restart_under_load() {
    const PRODUCERS: usize = 50;
    let mut redis = RedisServer::with_args(&["--appendonly", "yes", "--appendfsync", "always"]);
    // The connection a user makes, with its default settings.
    let conn = redis.client().get_connection_manager().await.unwrap();
    let handle = FenceLayer::new(conn).namespace(NS).handle();
    let queue = handle.queue();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let queue = queue.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut errors, mut slowest) = (Vec::new(), 0usize, Duration::ZERO);
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let started = Instant::now();
                    match queue
                        .enqueue(&Invalidation::path(format!("/load/{p}/{i}")))
                        .await
                    {
                        Ok(id) => ok.push(id),
                        Err(_) => errors += 1,
                    }
                    slowest = slowest.max(started.elapsed());
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                (ok, errors, slowest)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| {
        redis.stop();
        std::thread::sleep(Duration::from_secs(1));
        redis.start();
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut ok, mut errors, mut slowest) = (Vec::new(), 0, Duration::ZERO);
    for p in producers {
        let (o, e, s) = p.await.unwrap();
        ok.extend(o);
        errors += e;
        slowest = slowest.max(s);
    }
    let calls = ok.len() + errors;
    let rate = errors as f64 / calls as f64;
    // Every call told "queued" is in the stream (a retried append may be
    // there twice, which is harmless).
    let stream = queue.stream_key().to_owned();
    let stored: std::collections::HashSet<String> =
        match redis.cli_value(&["XRANGE", &stream, "-", "+"]) {
            Value::Array(entries) => entries
                .into_iter()
                .filter_map(|e| match e {
                    Value::Array(mut parts) if !parts.is_empty() => match parts.swap_remove(0) {
                        Value::BulkString(id) => Some(String::from_utf8(id).unwrap()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            other => panic!("{other:?}"),
        };
    let lost = ok.iter().filter(|id| !stored.contains(*id)).count();
    eprintln!(
        "enqueue under load: {calls} calls by {PRODUCERS} producers, {errors} errors ({:.3} %), \
         slowest call {slowest:?}, {lost} lost, {} entries in the stream",
        rate * 100.0,
        stored.len()
    );
    assert_eq!(
        lost, 0,
        "acknowledged invalidations missing from the stream"
    );
    assert!(rate < 0.005, "{errors} of {calls} enqueue calls failed");

    // Two workers with default settings apply them all.
    let workers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let worker = queue.worker(redis.client()).consumer(name);
            let control = worker.handle();
            (control, tokio::spawn(worker.run()))
        })
        .collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let stats = queue.stats().await.unwrap();
        if stats.depth == 0 && stats.pending == 0 {
            eprintln!(
                "drained {} entries in {:?}: {stats:?}",
                stored.len(),
                started.elapsed()
            );
            assert_eq!(stats.applied, stored.len() as u64, "{stats:?}");
            assert_eq!(stats.dead_letters, 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not drain: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (control, task) in workers {
        control.shutdown();
        task.await.unwrap();
    }
}

/// A retry backoff longer than the claim idle time is kept: the message is
/// not tried again before it is due, though workers look for due messages
/// far more often.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_waits_out_a_backoff_longer_than_the_claim_idle_time() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    // Refused by apply: an empty prefix.
    app.queue.enqueue(&Invalidation::prefix("")).await.unwrap();
    let worker = app
        .queue
        .worker(redis.client())
        .max_attempts(2)
        .claim_idle(Duration::from_millis(200))
        .backoff(Duration::from_millis(1500), Duration::from_millis(1500));
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    wait_for("the first failure", Duration::from_secs(10), || {
        control.stats().retries == 1
    })
    .await;
    let failed = Instant::now();
    wait_for("the dead letter", Duration::from_secs(20), || {
        control.stats().dead_lettered == 1
    })
    .await;
    // The jittered backoff is at least 750 ms; the claim idle time 200 ms.
    assert!(
        failed.elapsed() >= Duration::from_millis(700),
        "retried after {:?}",
        failed.elapsed()
    );
    let stats = control.stats();
    assert!(stats.claimed >= 1, "{stats:?}");
    assert_eq!(stats.reclaimed, 0, "{stats:?}");
    control.shutdown();
    task.await.unwrap();
}

/// An outage of the data's Redis longer than every retry (connection
/// refused for the worker's handle, while the queue's own Redis answers)
/// uses up no attempt: nothing goes to the dead letters, and every
/// invalidation is applied once Redis is back.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_longer_than_the_retries_dead_letters_nothing() {
    let redis = RedisServer::new();
    let app = app(&redis).await;
    let paths = ["/item/o1", "/item/o2", "/item/o3"];
    for p in paths {
        app.cache(p).await;
    }
    // Redis unreachable for the worker's handle until it is repaired.
    let (_handle, queue, broken) = app.breakable_queue(false);
    for p in paths {
        queue.enqueue(&Invalidation::path(p)).await.unwrap();
    }
    // The worker's defaults: 5 attempts for a failing message.
    let worker = queue.worker(redis.client());
    let control = worker.handle();
    let task = tokio::spawn(worker.run());
    // More failed tries than the 5 attempts allow, for each of the 3.
    wait_for("retries during the outage", Duration::from_secs(60), || {
        control.stats().retries >= 3 * 6
    })
    .await;
    assert_eq!(control.stats().dead_lettered, 0);
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
    for p in paths {
        assert_eq!(
            app.status(p).await,
            "HIT",
            "{p} invalidated during the outage"
        );
    }

    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for(
        "the invalidations after the outage",
        Duration::from_secs(30),
        || control.stats().applied == 3,
    )
    .await;
    assert_eq!(control.stats().dead_lettered, 0);
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
    for p in paths {
        assert_eq!(
            app.status(p).await,
            "MISS",
            "{p} still cached after the outage"
        );
    }
    control.shutdown();
    task.await.unwrap();
}
