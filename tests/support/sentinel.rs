//! A Sentinel-managed Redis for the tests (feature `sentinel`): a master,
//! one replica and three `redis-server --sentinel` processes on free ports,
//! with fast failure detection.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{COUNTER, RedisServer, free_port, info_field, nanos_since_epoch, ping, render};

/// The name the Sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";

/// One `redis-server --sentinel` process (killed on drop, its directory
/// removed).
pub struct SentinelProc {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl SentinelProc {
    /// Starts a Sentinel monitoring `master_port` (quorum 2) that judges a
    /// master down after `down_after_ms`.
    fn start(master_port: u16, down_after_ms: u64) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "cachefence-sentinel-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos_since_epoch()
        ));
        std::fs::create_dir_all(&dir).expect("sentinel temp dir");
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n\
                     sentinel failover-timeout {MASTER_NAME} 3000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir = dir.display()
                ),
            )
            .expect("writing sentinel.conf");
            let log = std::fs::File::create(dir.join("sentinel.log")).expect("sentinel log");
            let log2 = log.try_clone().expect("sentinel log");
            let mut child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log2))
                .spawn()
                .expect("spawning redis-server --sentinel");
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "sentinel exited ({status}): {}",
                        std::fs::read_to_string(dir.join("sentinel.log")).unwrap_or_default()
                    );
                    break;
                }
                if ping(&client) {
                    return Self { port, dir, child };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = "sentinel did not answer PING".to_owned();
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        panic!("no sentinel started: {last}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// One command to this Sentinel, rendered as `RedisServer::cli` does.
    pub fn cli(&self, args: &[&str]) -> String {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connecting to a sentinel");
        let value: redis::Value = redis::cmd(args[0])
            .arg(&args[1..])
            .query(&mut con)
            .unwrap_or_else(|e| panic!("sentinel command {args:?}: {e}"));
        render(&value)
    }
}

impl Drop for SentinelProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master, a replica of it, and three Sentinels that know both and each
/// other.
pub struct RedisSentinel {
    /// `[master, replica]` at the start; which one is master changes with
    /// a failover.
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<SentinelProc>,
}

impl RedisSentinel {
    /// Starts everything and waits until the replica is in sync and every
    /// Sentinel sees the replica and the two other Sentinels (else a
    /// failover could not happen).
    pub fn new(down_after_ms: u64) -> Self {
        let master = RedisServer::new();
        let replica =
            RedisServer::with_args(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
        let sentinels: Vec<SentinelProc> = (0..3)
            .map(|_| SentinelProc::start(master.port(), down_after_ms))
            .collect();
        let setup = Self {
            servers: vec![master, replica],
            sentinels,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let synced = setup.servers[1]
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up");
            let known = setup.sentinels.iter().all(|s| {
                let info = s.cli(&["SENTINEL", "MASTER", MASTER_NAME]);
                field_after(&info, "num-slaves") == Some(1)
                    && field_after(&info, "num-other-sentinels") == Some(2)
            });
            if synced && known {
                return setup;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not discover each other and the replica"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Sentinels' addresses.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels.iter().map(SentinelProc::url).collect()
    }

    /// A `SentinelClient` for the master.
    pub fn client(&self) -> redis::sentinel::SentinelClient {
        redis::sentinel::SentinelClient::build(
            self.urls(),
            MASTER_NAME.to_owned(),
            None,
            redis::sentinel::SentinelServerType::Master,
        )
        .expect("sentinel client")
    }

    /// The index of the running server that says it is the master.
    pub fn master(&self) -> Option<usize> {
        (0..self.servers.len()).find(|&i| {
            let s = &self.servers[i];
            s.is_running()
                && s.try_cli(&["INFO", "replication"])
                    .map(|v| render(&v).contains("role:master"))
                    .unwrap_or(false)
        })
    }

    /// The master's port as the Sentinels name it (the first that answers).
    pub fn named_master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let reply = s.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]);
            reply.lines().nth(1)?.parse().ok()
        })
    }

    /// Waits until the replica of the master has every write of it.
    pub fn wait_replicated(&self) {
        let Some(m) = self.master() else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let offset = info_field(
                &self.servers[m].cli(&["INFO", "replication"]),
                "master_repl_offset",
            );
            let synced = self.servers.iter().enumerate().any(|(i, s)| {
                i != m && s.is_running() && {
                    let info = s.cli(&["INFO", "replication"]);
                    info.contains("master_link_status:up")
                        && info_field(&info, "slave_repl_offset") == offset
                }
            });
            if synced {
                return;
            }
            assert!(Instant::now() < deadline, "the replica did not catch up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// In a `SENTINEL MASTER` reply (rendered one item a line: name, value,
/// name, value…), the number after `name`.
fn field_after(reply: &str, name: &str) -> Option<u64> {
    let mut lines = reply.lines();
    while let Some(line) = lines.next() {
        if line == name {
            return lines.next()?.parse().ok();
        }
    }
    None
}
