//! App server processes for cross-process tests: the test binary re-executes
//! itself, running one ignored test (the "server" of the binary) with
//! `CACHEFENCE_ROLE=server`; that test prints `PORT=<n>` and serves until it
//! is killed.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Server processes, killed (SIGKILL) and reaped on drop.
pub struct Procs {
    /// The name of the ignored test that serves.
    server_test: &'static str,
    children: Vec<(String, Child)>,
    addrs: Vec<(String, SocketAddr)>,
}

impl Procs {
    pub fn new(server_test: &'static str) -> Self {
        Self {
            server_test,
            children: Vec::new(),
            addrs: Vec::new(),
        }
    }

    /// Starts a server process named `name` and returns its address.
    pub fn spawn(&mut self, name: &str, env: &[(&str, &str)]) -> SocketAddr {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .args(["--exact", self.server_test, "--ignored", "--nocapture"])
            .env("CACHEFENCE_ROLE", "server")
            .env("PROC_NAME", name)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning a server process");
        let stdout = child.stdout.take().expect("piped stdout");
        self.children.push((name.to_owned(), child));
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the PORT line, then keeps draining so the pipe never fills.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.trim().strip_prefix("PORT=") {
                    let _ = tx.send(port.parse::<u16>().expect("PORT=<n>"));
                }
            }
        });
        let port = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(60)))
            .unwrap_or_else(|_| panic!("server process {name} printed no PORT= line"));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.addrs.push((name.to_owned(), addr));
        addr
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .expect("no such process")
    }

    /// SIGKILLs the process named `name`.
    pub fn kill(&mut self, name: &str) {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("no such process");
        child.kill().expect("kill -9");
        child.wait().expect("reaping");
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
