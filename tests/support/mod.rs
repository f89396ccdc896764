//! Shared test support: a throwaway `redis-server` process and a tiny HTTP client.
//!
//! Used from integration tests via `mod support;`. Not every test uses every
//! item, hence the module-level `dead_code` allowance.
#![allow(dead_code, unreachable_pub)]

pub mod capture;
#[cfg(feature = "cluster-async")]
pub mod cluster;
pub mod gate;
pub mod origin;
pub mod procs;
pub mod proxy;
#[cfg(feature = "sentinel")]
pub mod sentinel;

#[cfg(feature = "cluster-async")]
#[allow(unused_imports)]
pub use cluster::RedisCluster;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

// ---------------------------------------------------------------------------
// Redis (and the counting origin in `origin.rs`)
// ---------------------------------------------------------------------------

const REDIS_NOT_FOUND: &str = "redis-server not found on PATH: install it \
    (Debian/Ubuntu: `apt-get install -y redis-server`; macOS: `brew install redis`)";

/// How long to wait for a freshly spawned server to answer PING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many fresh ports to try when the chosen one gets taken in the meantime.
const PORT_ATTEMPTS: usize = 5;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A real `redis-server` process bound to `127.0.0.1` on a free port.
///
/// Persistence is disabled and the working directory is a fresh temp dir that
/// is removed on drop. The process is killed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Start a server with the default arguments.
    pub fn new() -> Self {
        Self::with_args(&[])
    }

    /// Start a server with extra `redis-server` arguments appended, e.g.
    /// `RedisServer::with_args(&["--maxmemory", "1mb"])`.
    pub fn with_args(extra: &[&str]) -> Self {
        ensure_redis_server_installed();
        let dir = std::env::temp_dir().join(format!(
            "cachefence-redis-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos_since_epoch()
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create redis temp dir {}: {e}", dir.display()));

        let mut server = RedisServer {
            port: 0,
            dir,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };

        let mut last_err = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(child) => {
                    server.child = Some(child);
                    return server;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server failed to start after {PORT_ATTEMPTS} attempts: {last_err}");
    }

    /// TCP port the server listens on (stable across `stop()`/`start()`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A `redis::Client` for this server (does not connect yet).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("valid redis url")
    }

    /// A `ConnectionManager` tuned to fail fast (1 s connection and response
    /// timeouts, 1 retry with short back-off) so tests against a stopped or
    /// paused server don't hang.
    pub async fn connection_manager(&self) -> redis::aio::ConnectionManager {
        self.client()
            .get_connection_manager_with_config(fast_fail_config())
            .await
            .unwrap_or_else(|e| panic!("connection manager to {}: {e}", self.url()))
    }

    /// Like [`connection_manager`](Self::connection_manager) but does not
    /// connect up front, so it can be created while the server is stopped.
    pub fn connection_manager_lazy(&self) -> redis::aio::ConnectionManager {
        redis::aio::ConnectionManager::new_lazy_with_config(self.client(), fast_fail_config())
            .unwrap_or_else(|e| panic!("lazy connection manager to {}: {e}", self.url()))
    }

    /// A multiplexed async connection.
    pub async fn multiplexed(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("multiplexed connection to {}: {e}", self.url()))
    }

    /// Is the process currently running (started and not stopped)?
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// PID of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `process_id` as the server on this port reports it in `INFO server`
    /// (None if nothing answers). Equal to [`pid`](Self::pid) for a server
    /// this helper started.
    pub fn reported_pid(&self) -> Option<u32> {
        info_pid(&self.client())
    }

    /// Kill the server process and wait for it. No-op if already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // If it was paused, SIGKILL still works; SIGCONT is harmless.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)start the server on the SAME port. No-op if already running.
    /// Panics if it does not come up (retries briefly if the port is busy).
    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let last_err = match self.spawn_and_wait() {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "redis-server failed to restart on port {}: {last_err}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Freeze the server (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Unfreeze a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Run one command synchronously and render the reply as a string:
    /// bulk/simple strings verbatim, integers/doubles as numbers, `OK` as
    /// `"OK"`, nil as `"(nil)"`, arrays/sets elements joined with `'\n'`,
    /// anything else in `Debug` form. Panics on connection or server errors.
    ///
    /// `cli(&["SET", "k", "v"])`, `cli(&["GET", "k"])`, `cli(&["TTL", "k"])`
    pub fn cli(&self, args: &[&str]) -> String {
        render(&self.cli_value(args))
    }

    /// Like [`cli`](Self::cli) but returns the raw `redis::Value`.
    pub fn cli_value(&self, args: &[&str]) -> redis::Value {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("redis command {args:?} failed: {e}"))
    }

    /// Like [`cli_value`](Self::cli_value) but returns errors instead of panicking.
    pub fn try_cli(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        assert!(!args.is_empty(), "cli needs at least a command name");
        let mut con = self
            .client()
            .get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(Duration::from_secs(5)))?;
        con.set_write_timeout(Some(Duration::from_secs(5)))?;
        redis::cmd(args[0])
            .arg(&args[1..])
            .query::<redis::Value>(&mut con)
    }

    /// Number of calls of `cmd` (case-insensitive, e.g. `"hgetall"`) since
    /// start or the last [`reset_stats`](Self::reset_stats); 0 if never called.
    /// Subcommands use Redis' `|` notation, e.g. `"client|setinfo"`.
    pub fn command_count(&self, cmd: &str) -> u64 {
        let want = cmd.to_ascii_lowercase();
        self.commandstats()
            .into_iter()
            .find(|(name, _)| *name == want)
            .map(|(_, calls)| calls)
            .unwrap_or(0)
    }

    /// Total calls of all commands except `info` and `config` (including
    /// subcommands such as `config|resetstat`) and the `client|setinfo`
    /// handshake redis-rs sends on every new connection, i.e. excluding this
    /// helper's own bookkeeping traffic and connection-setup noise.
    pub fn total_commands(&self) -> u64 {
        self.commandstats()
            .into_iter()
            .filter(|(name, _)| {
                let base = name.split('|').next().unwrap_or(name);
                base != "info" && base != "config" && name != "client|setinfo"
            })
            .map(|(_, calls)| calls)
            .sum()
    }

    /// `CONFIG RESETSTAT`: zero all command statistics.
    pub fn reset_stats(&self) {
        self.cli(&["CONFIG", "RESETSTAT"]);
    }

    /// Parsed `INFO commandstats` as `(lowercase command name, calls)`.
    /// Subcommands appear as e.g. `config|resetstat`.
    pub fn commandstats(&self) -> Vec<(String, u64)> {
        let info = self.cli(&["INFO", "commandstats"]);
        parse_commandstats(&info)
    }

    /// Output (stdout+stderr) of the most recently spawned server process.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    // -- internals ----------------------------------------------------------

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis-server.log")
    }

    fn signal(&self, sig: &str) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("redis-server on port {} is not running", self.port));
        let status = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("running `kill {sig} {pid}`: {e}"));
        assert!(status.success(), "`kill {sig} {pid}` failed: {status}");
    }

    /// Spawn on `self.port` and wait for PING; on failure the child is reaped
    /// and the error (with captured stderr/stdout) returned.
    fn spawn_and_wait(&self) -> Result<Child, String> {
        let port = self.port.to_string();
        let dir = self.dir.to_string_lossy().into_owned();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--dir", &dir])
            .args(["--loglevel", "warning"])
            .args(&self.extra_args)
            .stdin(Stdio::null());
        // Redis logs to stdout; send stdout+stderr to a file in the temp dir
        // (never a pipe, which could fill up and block the server).
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cloning log handle: {e}"))?;
        cmd.stdout(Stdio::from(log)).stderr(Stdio::from(log2));
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{REDIS_NOT_FOUND}"),
            Err(e) => return Err(format!("spawning redis-server: {e}")),
        };

        let client = self.client();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited early ({status}); output:\n{}",
                    self.port,
                    self.log()
                ));
            }
            // PING alone could be answered by another test's server that
            // took the port in the meantime: the server must be this child.
            if ping(&client) {
                match info_pid(&client) {
                    Some(pid) if pid == child.id() => return Ok(child),
                    other => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!(
                            "port {} is answered by process {other:?}, not by redis-server {}",
                            self.port,
                            child.id()
                        ));
                    }
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {:?}; output:\n{}",
                    self.port,
                    STARTUP_TIMEOUT,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Default for RedisServer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// 1 s connection and response timeouts, 1 retry with short back-off.
pub fn fast_fail_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(100))
}

fn ensure_redis_server_installed() {
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths).any(|p| {
                let f = p.join("redis-server");
                f.is_file()
            })
        })
        .unwrap_or(false);
    if !found {
        panic!("{REDIS_NOT_FOUND}");
    }
}

/// The number after `field:` in an `INFO` reply.
pub fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

fn nanos_since_epoch() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn ping(client: &redis::Client) -> bool {
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(250)) else {
        return false;
    };
    let _ = con.set_read_timeout(Some(Duration::from_millis(500)));
    matches!(
        redis::cmd("PING").query::<redis::Value>(&mut con),
        Ok(redis::Value::SimpleString(ref s)) if s == "PONG"
    )
}

/// `process_id` from `INFO server`.
fn info_pid(client: &redis::Client) -> Option<u32> {
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(250))
        .ok()?;
    con.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut con).ok()?;
    parse_info_pid(&info)
}

fn parse_info_pid(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

fn parse_commandstats(info: &str) -> Vec<(String, u64)> {
    info.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("cmdstat_")?;
            let (name, fields) = rest.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_ascii_lowercase(), calls))
        })
        .collect()
}

fn render(v: &redis::Value) -> String {
    use redis::Value;
    match v {
        Value::Nil => "(nil)".to_string(),
        Value::Okay => "OK".to_string(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::Array(items) | Value::Set(items) => {
            items.iter().map(render).collect::<Vec<_>>().join("\n")
        }
        Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| format!("{}\n{}", render(k), render(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// Serve `app` on `127.0.0.1:0` in a background task; returns the bound address.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("axum::serve");
    });
    addr
}

/// A fully-buffered HTTP response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

impl Reply {
    /// Header value as `&str` (None if absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-cache` header (e.g. `HIT` / `MISS`).
    pub fn cache_status(&self) -> Option<&str> {
        self.header("x-cache")
    }

    /// Body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Minimal HTTP/1 client for tests.
#[derive(Clone)]
pub struct Http {
    client: HyperClient<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new() -> Self {
        Http {
            client: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `GET http://{addr}{path_and_query}` with `Host: app.test` (see
    /// [`TEST_HOST`]); `path_and_query` must start with `/`.
    pub async fn get(&self, addr: SocketAddr, path_and_query: &str) -> Reply {
        let req = http::Request::get(format!("http://{addr}{path_and_query}"))
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        self.request(req).await
    }

    /// Send `req` (absolute URI required; `Host: app.test` unless it names
    /// one) and buffer the whole response.
    pub async fn request(&self, mut req: http::Request<Full<Bytes>>) -> Reply {
        req.headers_mut()
            .entry(http::header::HOST)
            .or_insert(http::HeaderValue::from_static(TEST_HOST));
        let desc = format!("{} {}", req.method(), req.uri());
        let resp = self
            .client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("HTTP {desc}: {e}"));
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("reading body of {desc}: {e}"))
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

/// The `Host` the test clients send unless told otherwise. The host is in
/// the default cache key; app instances listening on different ports stand
/// for instances behind one load balancer, which all see the site's name.
pub const TEST_HOST: &str = "app.test";

/// Traffic against two app servers: each of `workers` tasks asks for
/// `/k/<i>` over `keys` keys, starting at `worker * first` and going on in
/// steps of `step`, alternating servers by key; every answer must be
/// `200 0 /k/<i>` and is timed. Runs until [`Traffic::stop`].
pub struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    slowest_ms: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(
        http: &Http,
        addrs: [SocketAddr; 2],
        keys: usize,
        workers: usize,
        (first, step): (usize, usize),
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let slowest_ms = Arc::new(AtomicU64::new(0));
        let workers = (0..workers)
            .map(|w| {
                let (http, stop, answered, slowest_ms) = (
                    http.clone(),
                    stop.clone(),
                    answered.clone(),
                    slowest_ms.clone(),
                );
                tokio::spawn(async move {
                    let mut i = w * first;
                    while !stop.load(Ordering::SeqCst) {
                        i = (i + step) % keys;
                        let started = Instant::now();
                        let reply = http.get(addrs[i % 2], &format!("/k/{i}")).await;
                        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                        slowest_ms.fetch_max(took, Ordering::SeqCst);
                        assert_eq!(reply.status, 200, "/k/{i}: {:?}", reply.cache_status());
                        assert_eq!(reply.text(), format!("0 /k/{i}"), "a wrong body");
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Self {
            stop,
            answered,
            slowest_ms,
            workers,
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// The slowest answer so far, in ms.
    pub fn slowest_ms(&self) -> u64 {
        self.slowest_ms.load(Ordering::SeqCst)
    }

    /// Until at least `n` requests were answered, at most `within`.
    pub async fn until_answered(&self, n: usize, within: Duration) {
        let started = Instant::now();
        while self.answered() < n {
            assert!(
                started.elapsed() < within,
                "timed out waiting for {n} answered requests ({} so far)",
                self.answered()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the workers; panics if any request was not answered with its
    /// body.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.await.expect("every request answered with its body");
        }
    }
}

/// After a failover: asks both app servers for `paths` in turn (each
/// answer must be `0 <path>`) until both answer one from the cache (`HIT`),
/// and returns how long that took after `since`; panics after `within`.
pub async fn until_both_hit(
    http: &Http,
    (a, b): (SocketAddr, SocketAddr),
    paths: &[String],
    since: Instant,
    within: Duration,
) -> Duration {
    for path in paths.iter().cycle() {
        let (ra, rb) = (http.get(a, path).await, http.get(b, path).await);
        assert_eq!(ra.text(), format!("0 {path}"));
        assert_eq!(rb.text(), format!("0 {path}"));
        if ra.cache_status() == Some("HIT") && rb.cache_status() == Some("HIT") {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < within,
            "caching did not resume after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no paths to ask for")
}

/// This process's peak resident set size (`VmHWM`), in KiB; 0 where
/// `/proc` doesn't tell. Nextest runs each test in its own process, so it is
/// the test's own peak.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The subscribers of the namespaces' wake-up channels (`<ns>|#wake`),
/// summed: one per listener for a test using one namespace.
pub fn wake_subscribers(redis: &RedisServer) -> u64 {
    let channels = redis.cli(&["PUBSUB", "CHANNELS", "*|#wake"]);
    channels
        .lines()
        .filter(|c| !c.is_empty() && *c != "(nil)")
        .map(|c| {
            let out = redis.cli(&["PUBSUB", "NUMSUB", c]);
            out.lines()
                .last()
                .and_then(|l| l.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}
