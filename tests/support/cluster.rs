//! A real Redis Cluster for the tests (feature `cluster-async`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{RedisServer, render};

/// A real Redis Cluster (by default three primaries, no replicas) of `redis-server`
/// processes on free ports, made with `redis-cli --cluster create`. Every
/// node is killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes, joins them, and waits for `cluster_state:ok` on
    /// every one.
    pub fn new() -> Self {
        Self::with(3, 0, 5000)
    }

    /// `primaries` primaries with `replicas` replicas each, the node
    /// timeout (failure detection) `node_timeout_ms`.
    pub fn with(primaries: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| {
                RedisServer::with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes };
        assert!(
            cluster.wait_ok(Duration::from_secs(30)).is_some(),
            "the cluster did not reach cluster_state:ok"
        );
        if replicas > 0 {
            // Every replica in sync with its primary.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !cluster.nodes.iter().all(|n| {
                let info = n.cli(&["INFO", "replication"]);
                !info.contains("role:slave") || info.contains("master_link_status:up")
            }) {
                assert!(Instant::now() < deadline, "replicas did not sync");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// Waits until every running node says `cluster_state:ok`, at most
    /// `within`; returns how long that took.
    pub fn wait_ok(&self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        loop {
            let ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                n.try_cli(&["CLUSTER", "INFO"])
                    .map(|v| render(&v).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                return Some(started.elapsed());
            }
            if started.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The nodes (primaries and replicas; stopped ones too).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The running primaries.
    pub fn primaries(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.is_running() && n.cli(&["INFO", "replication"]).contains("role:master"))
            .collect()
    }

    /// SIGKILLs node `i` (index into [`nodes`](Self::nodes)).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again after [`kill`](Self::kill), on its port with
    /// its `nodes.conf`: a killed primary rejoins as a replica of the node
    /// that took its place.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].start();
    }

    /// The `redis://` URLs of the nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// A connected async cluster connection.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("cluster connection")
    }
}

impl Default for RedisCluster {
    fn default() -> Self {
        Self::new()
    }
}
