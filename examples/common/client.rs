//! Shared by the recipes' self-tests: one HTTP/1.1 request over a fresh
//! connection, read to the end (the request says `connection: close`).

// Each recipe uses the part it needs.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the self-tests look at: the status code, the `x-cache` header (or
/// `-`) and the body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) cache: String,
    pub(crate) body: String,
}

/// Sends `method path` with `headers` and `body` to `addr`.
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: recipe\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let cache = head
        .lines()
        .find_map(|line| line.strip_prefix("x-cache: "))
        .unwrap_or("-")
        .to_owned();
    Ok(Reply {
        status,
        cache,
        body: body.to_owned(),
    })
}

/// `GET path`.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    request(addr, "GET", path, &[], b"").await
}

/// The self-test of a recipe that serves one cached route: two GETs of
/// `path`, a MISS then a HIT.
pub(crate) async fn expect_miss_then_hit(
    addr: SocketAddr,
    path: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let (first, second) = (get(addr, path).await?, get(addr, path).await?);
    println!(
        "GET {path}: {}, then {}: {}",
        first.cache,
        second.cache,
        second.body.trim()
    );
    if (first.cache.as_str(), second.cache.as_str()) != ("MISS", "HIT") {
        return Err(format!("expected a MISS then a HIT, got {first:?} then {second:?}").into());
    }
    Ok(())
}
