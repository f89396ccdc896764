//! Helpers shared by the reliability and security tests (`faults.rs`,
//! `corruption.rs`, `poisoning.rs`, `prop.rs`): a non-panicking HTTP client,
//! raw requests over TCP, and Redis key inspection.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{RedisServer, Reply};

/// An HTTP/1 client that reports failures instead of panicking, with a
/// per-request timeout.
#[derive(Clone)]
pub struct TryHttp {
    client: HyperClient<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl TryHttp {
    pub fn new(timeout: Duration) -> Self {
        Self {
            client: HyperClient::builder(TokioExecutor::new()).build_http(),
            timeout,
        }
    }

    pub async fn get(&self, addr: SocketAddr, path: &str) -> Result<Reply, String> {
        self.get_with(addr, path, &[]).await
    }

    pub async fn get_with(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let mut req = http::Request::get(format!("http://{addr}{path}"));
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header(http::header::HOST, crate::support::TEST_HOST);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let work = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let (parts, body) = res.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("GET {path}: no answer within {:?}", self.timeout)),
        }
    }
}

/// A response read off a raw TCP connection.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `GET <target> HTTP/1.1` with the given extra header lines (raw
/// bytes, so anything hyper's client would refuse can be sent) and reads the
/// response to the end (`Connection: close`).
pub async fn raw_get(addr: SocketAddr, target: &[u8], extra: &[u8]) -> Result<RawReply, String> {
    let mut req = Vec::new();
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    req.extend_from_slice(extra);
    req.extend_from_slice(b"\r\n");
    raw(addr, &req).await
}

/// Sends raw bytes and parses whatever comes back.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Result<RawReply, String> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(request).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // The server may reset the connection after answering an oversized
        // request; keep what was read.
        let _ = stream.read_to_end(&mut buf).await;
        parse_response(&buf)
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "raw request: no answer within 10 s".to_owned())?
}

fn parse_response(buf: &[u8]) -> Result<RawReply, String> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(buf)))?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Ok(RawReply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// Every key matching `pattern`, by SCAN.
pub fn scan(redis: &RedisServer, pattern: &str) -> Vec<Vec<u8>> {
    let mut con = redis
        .client()
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("redis connection");
    let mut cursor = 0u64;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)
            .expect("SCAN");
        out.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out.sort();
    out.dedup();
    out
}

/// The entry keys (hashes that are not leases, variant sets or tag indexes)
/// of a namespace.
pub fn entry_keys(redis: &RedisServer, namespace: &str) -> Vec<String> {
    scan(redis, &format!("{namespace}*"))
        .into_iter()
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .filter(|k| !k.ends_with(":lease") && !k.ends_with(":vars"))
        .filter(|k| redis.cli(&["TYPE", k]) == "hash")
        .collect()
}

/// One field of a hash, as bytes.
pub fn hget(redis: &RedisServer, key: &str, field: &str) -> Option<Vec<u8>> {
    let mut con = redis
        .client()
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("redis connection");
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query(&mut con)
        .ok()?
}

/// Runs a command with binary arguments.
pub fn cmd_bytes(redis: &RedisServer, args: &[&[u8]]) -> redis::RedisResult<redis::Value> {
    let mut con = redis
        .client()
        .get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("command name"));
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut con)
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `q`-quantile (0..=1) of a list of durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
