//! Shared by the examples: find a Redis to talk to, or start a throwaway one.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Redis URL that answers, and the throwaway server behind it if one had
/// to be started (killed on drop).
pub(crate) struct LocalRedis {
    pub(crate) url: String,
    child: Option<Child>,
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `REDIS_URL` (default `redis://127.0.0.1:6379/`) if it answers PING;
/// otherwise a `redis-server` started on a free port, without persistence.
pub(crate) fn redis() -> Result<LocalRedis, Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    if answers(&url) {
        return Ok(LocalRedis { url, child: None });
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "nothing answers at {url} and redis-server could not be started ({e}); \
                 install it (Debian/Ubuntu: apt-get install -y redis-server) or set REDIS_URL"
            )
        })?;
    let local = LocalRedis {
        url: format!("redis://127.0.0.1:{port}/"),
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answers(&local.url) {
        if Instant::now() > deadline {
            return Err("the throwaway redis-server did not answer PING".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "(no Redis at the default URL: started a throwaway redis-server at {})",
        local.url
    );
    Ok(local)
}

fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(300)) else {
        return false;
    };
    redis::cmd("PING").query::<String>(&mut con).is_ok()
}
