//! Responses as the cache sends them: cached entries, the inner service's
//! responses passed through, and the cache's own (504, 500), each marked with
//! its cache status (`x-cache`, `Cache-Status`) and stripped of tag headers.

use bytes::Bytes;
use http::header::{AGE, CONTENT_LENGTH};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::FenceBody;
use crate::cache_status;
use crate::config::Config;
use crate::entry::Entry;
use crate::flight::CacheStatus;

/// Completes the `Cache-Status` member of a forwarded response with the
/// status the origin answered.
pub(crate) fn finish_cache_status<B>(config: &Config, res: &mut Response<B>) {
    if let Some(id) = &config.cache_status {
        let status = res.status();
        cache_status::finish(id, res.headers_mut(), status);
    }
}

/// Calls the inner service (which is ready) and passes its response through.
pub(crate) async fn origin<S, ReqB, ResB>(
    config: &Config,
    mut svc: S,
    req: Request<ReqB>,
    status: CacheStatus,
) -> Result<Response<FenceBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body,
{
    let res = svc.call(req).await?;
    let mut res = res.map(FenceBody::inner);
    outgoing(config, res.headers_mut(), status);
    keep_status(config, &mut res, status);
    Ok(res)
}

/// The last touch on every response: the cache-status header, and the tag
/// headers removed unless they are to be exposed.
pub(crate) fn outgoing(config: &Config, headers: &mut HeaderMap, status: CacheStatus) {
    if !config.expose_tags {
        for name in &config.tag_headers {
            headers.remove(name);
        }
    }
    mark(config, headers, status, None);
}

/// A cached response, as sent to a client.
pub(crate) fn from_entry<B: Body>(
    config: &Config,
    entry: &Entry,
    status: CacheStatus,
    head: bool,
    now: u64,
) -> Response<FenceBody<B>> {
    let body = if head {
        Bytes::new()
    } else {
        entry.body.clone()
    };
    let from = cache_status::FromEntry::new(entry, now);
    let age = entry.age_secs(now);
    let len = entry.body.len();
    respond(config, from, entry.headers.clone(), body, len, status, age)
}

/// [`from_entry`] for an entry that is not needed afterwards (a hit): its
/// headers and body move into the response.
pub(crate) fn from_owned_entry<B: Body>(
    config: &Config,
    entry: Entry,
    status: CacheStatus,
    head: bool,
    now: u64,
) -> Response<FenceBody<B>> {
    let from = cache_status::FromEntry::new(&entry, now);
    let age = entry.age_secs(now);
    let len = entry.body.len();
    let body = if head { Bytes::new() } else { entry.body };
    respond(config, from, entry.headers, body, len, status, age)
}

fn respond<B: Body>(
    config: &Config,
    from: cache_status::FromEntry,
    headers: HeaderMap,
    body: Bytes,
    len: usize,
    status: CacheStatus,
    age: u64,
) -> Response<FenceBody<B>> {
    // `len`: a HEAD response says the length of the body it leaves out.
    let mut res = Response::new(FenceBody::full(body));
    *res.status_mut() = from.status;
    *res.headers_mut() = headers;
    let headers = res.headers_mut();
    if !(from.status.is_informational()
        || from.status == StatusCode::NO_CONTENT
        || from.status == StatusCode::NOT_MODIFIED)
    {
        headers.insert(CONTENT_LENGTH, length_value(len));
    }
    // RFC 9111 mode: the first response too, with the age it arrived
    // with (an upstream `Age`, the response delay: §4.2.3, §5.1).
    if !status.is_fill() || config.policy.rfc9111 {
        headers.insert(AGE, small_number(age));
    }
    mark(config, headers, status, Some(from));
    keep_status(config, &mut res, status);
    res
}

/// `n` as a header value, without an allocation below 100 (most ages).
fn small_number(n: u64) -> HeaderValue {
    const DIGITS: &[u8; 200] = b"00010203040506070809\
        10111213141516171819202122232425262728293031323334353637383940414243444546474849\
        50515253545556575859606162636465666768697071727374757677787980818283848586878889\
        90919293949596979899";
    match usize::try_from(n) {
        Ok(n @ 0..=9) => HeaderValue::from_static(digits(&DIGITS[n * 2 + 1..n * 2 + 2])),
        Ok(n @ 10..=99) => HeaderValue::from_static(digits(&DIGITS[n * 2..n * 2 + 2])),
        _ => HeaderValue::from(n),
    }
}

/// `n` as a `Content-Length` value. Hits serve the same few lengths again
/// and again: the values made last are kept per thread (16 slots), so a
/// hit clones one (a reference count) instead of formatting and allocating.
fn length_value(n: usize) -> HeaderValue {
    type Slots = [(usize, Option<HeaderValue>); 16];
    thread_local! {
        static LENGTHS: std::cell::RefCell<Slots> =
            std::cell::RefCell::new(std::array::from_fn(|_| (0, None)));
    }
    if n < 100 {
        return small_number(n as u64);
    }
    LENGTHS.with(|slots| {
        let mut slots = slots.borrow_mut();
        let slot = &mut slots[(n ^ (n >> 4) ^ (n >> 8)) % 16];
        match slot {
            (len, Some(value)) if *len == n => value.clone(),
            _ => {
                let value = HeaderValue::from(n);
                *slot = (n, Some(value.clone()));
                value
            }
        }
    })
}

fn digits(b: &'static [u8]) -> &'static str {
    std::str::from_utf8(b).unwrap_or("0")
}

/// A response made by the cache itself (504 after a wait, 500 after a panic).
pub(crate) fn plain_response<B: Body>(
    config: &Config,
    status: StatusCode,
) -> Response<FenceBody<B>> {
    let mut res = Response::new(FenceBody::empty());
    *res.status_mut() = status;
    mark(config, res.headers_mut(), CacheStatus::Miss, None);
    keep_status(config, &mut res, CacheStatus::Miss);
    res
}
/// Keeps a response's cache status where the request span reads it: in
/// the status header, or, when there is none, in an extension (which costs
/// an allocation, so only then).
pub(crate) fn keep_status<B>(config: &Config, res: &mut Response<B>, status: CacheStatus) {
    if config.status_header.is_none() {
        res.extensions_mut().insert(status);
    }
}

/// The cache status [`keep_status`] kept.
pub(crate) fn status_of<B>(config: &Config, res: &Response<B>) -> &'static str {
    let from_header = config
        .status_header
        .as_ref()
        .and_then(|name| res.headers().get(name))
        .and_then(|value| match value.as_bytes() {
            b"HIT" => Some(CacheStatus::Hit),
            b"MISS" => Some(CacheStatus::Miss),
            b"STALE" => Some(CacheStatus::Stale),
            b"BYPASS" => Some(CacheStatus::Bypass),
            _ => None,
        });
    from_header
        .or_else(|| res.extensions().get::<CacheStatus>().copied())
        .map_or("", CacheStatus::as_str)
}

pub(crate) fn mark(
    config: &Config,
    headers: &mut HeaderMap,
    status: CacheStatus,
    entry: Option<cache_status::FromEntry>,
) {
    if let Some(name) = &config.status_header {
        headers.insert(name.clone(), HeaderValue::from_static(status.as_str()));
    }
    if let Some(id) = &config.cache_status {
        cache_status::mark(id, headers, status, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_lengths_are_their_numbers() {
        for n in [0, 99, 100, 4096, 4096, 4112, 65_536, 1 << 20, usize::MAX] {
            assert_eq!(length_value(n), n.to_string().as_str());
        }
    }

    #[test]
    fn small_numbers_are_static_values() {
        for n in [0, 7, 9, 10, 42, 99, 100, 12_345, u64::MAX] {
            assert_eq!(small_number(n), n.to_string().as_str());
        }
    }
}
