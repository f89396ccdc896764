//! A counting origin: an axum router whose handlers count their calls and
//! name the URL they answer in the body.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

/// Counts calls to the origin.
#[derive(Clone, Default)]
pub struct Counter(pub Arc<AtomicUsize>);

impl Counter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// The routes, each answering `<what> <uri> #<call number>`:
/// - `/item/{id}`: plain 200, `?delay_ms=N` sleeps first
/// - `/vary`: `Vary: accept-language`, echoes the header
/// - `/private`, `/cookie`, `/nostore`: uncacheable responses
/// - `/status/{code}`: that status
/// - `/maxage/{secs}`: `Cache-Control: max-age=secs`
/// - `/ttl/{ms}`: sets `CacheTtl`
/// - `/big/{mib}`: streams `mib` MiB in 64 KiB chunks
pub fn routes(counter: Counter) -> Router {
    Router::new()
        .route("/item/{id}", get(item))
        .route("/vary", get(vary))
        .route("/private", get(private))
        .route("/cookie", get(cookie))
        .route("/nostore", get(nostore))
        .route("/status/{code}", get(status))
        .route("/maxage/{secs}", get(maxage))
        .route("/ttl/{ms}", get(ttl))
        .route("/big/{mib}", get(big))
        .with_state(counter)
}

async fn item(State(c): State<Counter>, req: Request) -> Response {
    let n = c.bump();
    if let Some(ms) = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("delay_ms=")))
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    format!("item {} #{n}", req.uri()).into_response()
}

async fn vary(State(c): State<Counter>, headers: HeaderMap) -> Response {
    let n = c.bump();
    let lang = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    (
        [(header::VARY, "Accept-Language")],
        format!("lang {lang} #{n}"),
    )
        .into_response()
}

async fn private(State(c): State<Counter>) -> Response {
    let n = c.bump();
    (
        [(header::CACHE_CONTROL, "private")],
        format!("private #{n}"),
    )
        .into_response()
}

async fn cookie(State(c): State<Counter>) -> Response {
    let n = c.bump();
    (
        [(header::SET_COOKIE, "session=abc")],
        format!("cookie #{n}"),
    )
        .into_response()
}

async fn nostore(State(c): State<Counter>) -> Response {
    let n = c.bump();
    (
        [(header::CACHE_CONTROL, "no-store")],
        format!("nostore #{n}"),
    )
        .into_response()
}

async fn status(State(c): State<Counter>, Path(code): Path<u16>) -> Response {
    let n = c.bump();
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (status, format!("status {code} #{n}")).into_response()
}

async fn maxage(State(c): State<Counter>, Path(secs): Path<String>) -> Response {
    let n = c.bump();
    (
        [(header::CACHE_CONTROL, format!("max-age={secs}"))],
        format!("maxage {secs} #{n}"),
    )
        .into_response()
}

async fn ttl(State(c): State<Counter>, Path(ms): Path<u64>) -> Response {
    let n = c.bump();
    let mut res = format!("ttl {ms} #{n}").into_response();
    res.extensions_mut()
        .insert(cachefence::CacheTtl(Duration::from_millis(ms)));
    res
}

async fn big(State(c): State<Counter>, Path(mib): Path<usize>) -> Response {
    c.bump();
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = mib * 16;
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::convert::Infallible>(chunk.clone())),
    );
    Body::from_stream(stream).into_response()
}
