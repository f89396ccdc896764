//! An HTTP purge endpoint for the cache, mounted in axum behind a bearer
//! token: `POST /admin/purge?tag=product:42` (or `path=`, `prefix=`, `key=`,
//! `all`; add `&soft` to mark stale instead of removing).
//!
//! ```text
//! cargo run --example purge             # a few calls that show the answers
//! cargo run --example purge -- --serve  # keep serving on 127.0.0.1:3000
//! ```

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use cachefence::{CacheTags, FenceCache};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = common::redis()?;
    let client = redis::Client::open(redis.url.as_str())?;
    let cache = FenceCache::builder(client.get_connection_manager().await?)
        .namespace(format!("purge-demo-{}:", std::process::id()))
        .build()?;

    // In production the token comes from the environment or a secret store.
    let token = std::env::var("PURGE_TOKEN").unwrap_or_else(|_| "s3cret".into());
    let expected = format!("Bearer {token}");
    let purge = cache
        .handle()
        .purge_service(move |parts: &http::request::Parts| {
            parts
                .headers
                .get("authorization")
                .is_some_and(|v| v.as_bytes() == expected.as_bytes())
        });

    let app = Router::new()
        .route(
            "/products/{id}",
            get(|Path(id): Path<u32>| async move {
                // With the `axum` feature: `(CacheTags(..), body)`.
                let mut res = axum::response::Response::new(axum::body::Body::from(format!(
                    "product {id}\n"
                )));
                res.extensions_mut()
                    .insert(CacheTags(vec![format!("product:{id}")]));
                res
            })
            .layer(cache.layer().name("products").ttl(Duration::from_secs(300))),
        )
        .route_service("/admin/purge", purge);

    let serve = std::env::args().any(|a| a == "--serve");
    let listener = tokio::net::TcpListener::bind(if serve {
        "127.0.0.1:3000"
    } else {
        "127.0.0.1:0"
    })
    .await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    if serve {
        println!(
            "serving on http://{addr}; try\n  curl -i http://{addr}/products/42\n  \
             curl -i -X POST -H 'authorization: Bearer {token}' 'http://{addr}/admin/purge?tag=product:42'"
        );
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }

    let call = |method: &'static str, path: &'static str, auth: Option<String>| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let auth = auth
            .map(|a| format!("authorization: {a}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: demo\r\n{auth}connection: close\r\ncontent-length: 0\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        let status = raw.lines().next().unwrap_or("").to_owned();
        let cache = raw
            .lines()
            .find_map(|l| l.strip_prefix("x-cache: "))
            .unwrap_or("-")
            .to_owned();
        let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
        println!("{method:4} {path:38} {status:28} x-cache: {cache:5} {body}");
        Ok::<_, std::io::Error>(())
    };
    let bearer = Some(format!("Bearer {token}"));
    call("GET", "/products/42", None).await?;
    call("GET", "/products/42", None).await?;
    call("POST", "/admin/purge?tag=product:42", None).await?;
    call("POST", "/admin/purge?colour=red", bearer.clone()).await?;
    call("POST", "/admin/purge?tag=product:42", bearer.clone()).await?;
    call("GET", "/products/42", None).await?;
    call(
        "POST",
        "/admin/purge?path=/products/42&soft",
        bearer.clone(),
    )
    .await?;
    call("GET", "/products/42", None).await?;
    cache.handle().invalidate_all().await?;
    drop(redis);
    Ok(())
}
