//! `--wait-cost`: what `FenceCache::replicated_fences(1, 100 ms)` adds to
//! an invalidation: 1,000 `invalidate_path` calls, one at a time, with and
//! without it (alternated in rounds of 100), against a master with one
//! replica on this machine (both started here).
//!
//! ```text
//! cargo bench --bench load -- --wait-cost
//! ```

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cachefence::FenceCache;

use super::{Error, loadavg, machine, percentile};

const CALLS: usize = 1000;
const ROUND: usize = 100;

struct Server(Child, u16, std::path::PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.2);
    }
}

fn start(extra: &[&str]) -> Result<Server, Error> {
    let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
    // Its own directory: a replica writes the RDB of its first sync there.
    let dir = std::env::temp_dir().join(format!(
        "cachefence-wait-cost-{}-{port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()?;
    let server = Server(child, port, dir);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200))
            && redis::cmd("PING").query::<String>(&mut c).is_ok()
        {
            return Ok(server);
        }
        if Instant::now() > deadline {
            return Err("redis-server did not answer PING".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn run() -> Result<(), Error> {
    let master = start(&[])?;
    let replica = start(&["--replicaof", "127.0.0.1", &master.1.to_string()])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load_before = loadavg();
    let url = format!("redis://127.0.0.1:{}/", master.1);
    let replica_url = format!("redis://127.0.0.1:{}/", replica.1);
    let (plain_us, waited_us) = rt.block_on(async {
        // The replica in sync first.
        let replica_client = redis::Client::open(replica_url.as_str())?;
        let mut rc = replica_client.get_multiplexed_async_connection().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut rc)
                .await?;
            if info.contains("master_link_status:up") {
                break;
            }
            if Instant::now() > deadline {
                return Err::<_, Error>("the replica did not sync".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = redis::Client::open(url.as_str())?;
        let plain = FenceCache::builder(client.get_connection_manager().await?)
            .namespace("wait-cost:")
            .build()?
            .handle();
        let waited = FenceCache::builder(client.get_connection_manager().await?)
            .namespace("wait-cost:")
            .replicated_fences(1, Duration::from_millis(100))
            .build()?
            .handle();
        let mut plain_us = Vec::with_capacity(CALLS);
        let mut waited_us = Vec::with_capacity(CALLS);
        for round in 0..CALLS / ROUND {
            for (handle, out) in [(&plain, &mut plain_us), (&waited, &mut waited_us)] {
                for i in 0..ROUND {
                    let path = format!("/products/{round}-{i}");
                    let started = Instant::now();
                    handle.invalidate_path(&path).await?;
                    out.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
        }
        Ok((plain_us, waited_us))
    })?;
    let load_after = loadavg();
    println!(
        "\ncargo bench --bench load -- --wait-cost: {CALLS} invalidate_path calls each, one at a time, \
         alternated in rounds of {ROUND}; master + 1 replica on this machine; {}; load average {load_before} -> {load_after}\n",
        machine()
    );
    println!("| invalidate_path | mean ms | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (name, mut v) in [
        ("default", plain_us),
        ("replicated_fences(1, 100 ms)", waited_us),
    ] {
        v.sort_unstable();
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64 / 1000.0;
        println!(
            "| {name} | {mean:.3} | {:.3} | {:.3} |",
            percentile(&v, 0.50),
            percentile(&v, 0.99)
        );
    }
    Ok(())
}
