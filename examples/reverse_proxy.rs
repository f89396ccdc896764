//! A caching reverse proxy in RFC 9111 mode in front of any HTTP origin:
//! the way to put cachefence in front of a service you don't control.
//!
//! ```text
//! cargo run --release --example reverse_proxy -- \
//!     --listen 127.0.0.1:8084 --origin http://127.0.0.1:8000 \
//!     --redis redis://127.0.0.1:6379/ --namespace NS
//! ```
//!
//! Only `--origin` is required (defaults: listen `127.0.0.1:8084`, Redis
//! `redis://127.0.0.1:6379/`, namespace `proxy:`, `--connect-timeout 5s`,
//! `--response-timeout 30s`). Every method, header (minus hop-by-hop ones)
//! and body is forwarded, streaming both ways; requests get `Via`,
//! `X-Forwarded-For` (the client's address appended), `X-Forwarded-Proto`
//! and `X-Forwarded-Host` (the client's `Host`), responses a `Via` and a
//! `Cache-Status`. Responses are cached as their `Cache-Control` /
//! `CDN-Cache-Control` / `Expires` say, else heuristically (10% of the time
//! since `Last-Modified`, at most a day); stale entries with validators
//! are kept 10 minutes to be revalidated; writes through the proxy invalidate
//! what they touch. When Redis is down every request still goes to the
//! origin; an origin that can't be reached (or not within the connect
//! timeout) is a 502, one that sends no response head within the response
//! timeout a 504.
//!
//! The origin is spoken to in plain HTTP/1.1: TLS to it would need a TLS
//! connector (hyper-rustls), a dependency this example does without.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use cachefence::FenceCache;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::{Layer, Service, ServiceExt};

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

struct Args {
    listen: SocketAddr,
    origin: Uri,
    redis: String,
    namespace: String,
    connect_timeout: Duration,
    response_timeout: Duration,
}

/// `500ms`, `5s` or `5` (seconds); more than zero.
fn duration(flag: &str, value: &str) -> Result<Duration, String> {
    let parsed = if let Some(ms) = value.strip_suffix("ms") {
        ms.parse().ok().map(Duration::from_millis)
    } else {
        let secs = value.strip_suffix('s').unwrap_or(value);
        secs.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
            .map(Duration::from_secs_f64)
    };
    parsed
        .filter(|d| !d.is_zero())
        .ok_or(format!("{flag}: expected a duration such as 500ms or 5s"))
}

fn args() -> Result<Args, String> {
    let mut listen = "127.0.0.1:8084".to_owned();
    let mut origin = None;
    let mut redis = "redis://127.0.0.1:6379/".to_owned();
    let mut namespace = "proxy:".to_owned();
    let mut connect_timeout = Duration::from_secs(5);
    let mut response_timeout = Duration::from_secs(30);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = value,
            "--origin" => origin = Some(value),
            "--redis" => redis = value,
            "--namespace" => namespace = value,
            "--connect-timeout" => connect_timeout = duration(&flag, &value)?,
            "--response-timeout" => response_timeout = duration(&flag, &value)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let origin: Uri = origin
        .ok_or("--origin is required")?
        .parse()
        .map_err(|e| format!("--origin: {e}"))?;
    if origin.scheme() != Some(&Scheme::HTTP) || origin.authority().is_none() {
        return Err("--origin must be an http://host:port URL".into());
    }
    Ok(Args {
        listen: listen.parse().map_err(|e| format!("--listen: {e}"))?,
        origin,
        redis,
        namespace,
        connect_timeout,
        response_timeout,
    })
}

/// Forwards requests to the origin. Never fails: an unreachable origin is a
/// 502, one that doesn't answer in time a 504.
#[derive(Clone)]
struct Proxy {
    client: Client<HttpConnector, Incoming>,
    authority: Authority,
    /// The longest wait for the origin's response head.
    response_timeout: Duration,
}

/// The address of the client a request came from (a request extension).
#[derive(Debug, Clone, Copy)]
struct ClientAddr(IpAddr);

/// `X-Forwarded-For` with the client's address appended to what earlier
/// proxies wrote; `X-Forwarded-Proto` and `X-Forwarded-Host` as this proxy
/// received the request (replacing what the client sent: it is the edge).
fn add_forwarded(parts: &mut http::request::Parts) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
    if let Some(ClientAddr(ip)) = parts.extensions.get::<ClientAddr>().copied() {
        let mut chain: Vec<String> = parts
            .headers
            .get_all(&XFF)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        chain.push(ip.to_string());
        if let Ok(value) = HeaderValue::try_from(chain.join(", ")) {
            parts.headers.insert(XFF, value);
        }
    }
    parts.headers.insert(XFP, HeaderValue::from_static("http"));
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        let authority = parts.uri.authority()?;
        HeaderValue::try_from(authority.as_str()).ok()
    });
    match host {
        Some(host) => parts.headers.insert(XFH, host),
        None => parts.headers.remove(XFH),
    };
}

/// Headers that belong to one connection, not to the message (RFC 9110
/// §7.6.1), besides those `Connection` names.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

fn add_via(headers: &mut HeaderMap, version: http::Version) {
    let protocol = match version {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    };
    if let Ok(value) = HeaderValue::try_from(format!("{protocol} cachefence")) {
        headers.append(header::VIA, value);
    }
}

impl Service<Request<Incoming>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let client = self.client.clone();
        let authority = self.authority.clone();
        let response_timeout = self.response_timeout;
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            add_forwarded(&mut parts);
            let path = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority.clone())
                .path_and_query(path)
                .build();
            let Ok(uri) = uri else {
                return Ok(status(StatusCode::BAD_REQUEST));
            };
            let version = parts.version;
            parts.uri = uri;
            parts.version = http::Version::HTTP_11;
            strip_hop_by_hop(&mut parts.headers);
            add_via(&mut parts.headers, version);
            if let Ok(host) = HeaderValue::try_from(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
            let request = client.request(Request::from_parts(parts, body));
            match tokio::time::timeout(response_timeout, request).await {
                Ok(Ok(res)) => {
                    let (mut parts, body) = res.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    add_via(&mut parts.headers, parts.version);
                    Ok(Response::from_parts(parts, body.boxed_unsync()))
                }
                Ok(Err(err)) => {
                    eprintln!("origin unreachable: {err}");
                    Ok(status(StatusCode::BAD_GATEWAY))
                }
                Err(_) => {
                    eprintln!("origin sent no response within {response_timeout:?}");
                    Ok(status(StatusCode::GATEWAY_TIMEOUT))
                }
            }
        })
    }
}

fn status(code: StatusCode) -> Response<ProxyBody> {
    let body = Empty::new().map_err(|never| match never {}).boxed_unsync();
    let mut res = Response::new(body);
    *res.status_mut() = code;
    res
}

#[tokio::main]
async fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!(
                "{err}\nusage: reverse_proxy --origin http://HOST:PORT [--listen ADDR] [--redis URL] [--namespace NS] [--connect-timeout 5s] [--response-timeout 30s]"
            );
            std::process::exit(2);
        }
    };
    let client = match redis::Client::open(args.redis.as_str()) {
        Ok(client) => client,
        Err(err) => {
            eprintln!("--redis: {err}");
            std::process::exit(2);
        }
    };
    // Lazy: the proxy starts and answers even while Redis is down.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1);
    let redis = match redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config) {
        Ok(redis) => redis,
        Err(err) => {
            eprintln!("redis: {err}");
            std::process::exit(2);
        }
    };
    let cache = match FenceCache::builder(redis).wake_ups(client).build() {
        Ok(cache) => cache,
        Err(err) => {
            eprintln!("cache: {err}");
            std::process::exit(2);
        }
    };
    let fence = cache
        .layer()
        .namespace(args.namespace)
        .rfc9111(true)
        // RFC 9111 §4.2.2, as Traffic Server and Squid do: 10% of the time
        // since Last-Modified, at most a day.
        .heuristic_freshness(0.1)
        .heuristic_freshness_max(Duration::from_secs(24 * 3600))
        .cache_status(Some("cachefence"));
    let Some(authority) = args.origin.authority().cloned() else {
        eprintln!("--origin must name a host");
        std::process::exit(2);
    };
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(args.connect_timeout));
    let proxy = Proxy {
        client: Client::builder(TokioExecutor::new()).build(connector),
        authority,
        response_timeout: args.response_timeout,
    };
    let service = fence.layer(proxy);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("--listen {}: {err}", args.listen);
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().map_or(args.listen, |a| a);
    println!("LISTENING={local} origin={}", args.origin);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                eprintln!("accept: {err}");
                continue;
            }
        };
        let client = ClientAddr(peer.ip());
        let service = service
            .clone()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(client);
                req
            });
        let service = TowerToHyperService::new(service);
        tokio::spawn(async move {
            let conn = auto::Builder::new(TokioExecutor::new());
            if let Err(err) = conn.serve_connection(TokioIo::new(stream), service).await {
                eprintln!("connection: {err}");
            }
        });
    }
}
