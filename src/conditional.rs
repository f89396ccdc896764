//! Every client gets its own answer: the conditions (`If-None-Match`,
//! `If-Modified-Since`) and the byte range (`Range`, `If-Range`) of a request
//! are answered by the cache from the full response, never by the origin on
//! behalf of a fill that other requests share.
//!
//! A fill asks the origin without these headers ([`strip`]), so what it
//! stores and hands to waiting requests is the full response; each request
//! then applies its own [`Conditions`] to the response it is given
//! ([`Conditions::answer`]). `If-Match` and `If-Unmodified-Since` are
//! preconditions for the origin (RFC 9111 §4.3.2: a cache must not evaluate
//! them), so such requests bypass the cache ([`origin_only`]).
//!
//! RFC 9110 §13.2.2 gives the order: `If-None-Match` (else
//! `If-Modified-Since`) first, then `Range` with its `If-Range`.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{
    AGE, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_RANGE, DATE, ETAG, EXPIRES,
    IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED,
    RANGE, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, request};
use http_body::Body;

use crate::body::FenceBody;

/// The request headers a fill never forwards: they would make the origin
/// answer one client's condition or range for everyone.
const CLIENT_ONLY: [HeaderName; 6] = [
    RANGE,
    IF_RANGE,
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    IF_MATCH,
    IF_UNMODIFIED_SINCE,
];

/// Whether a request carries a precondition only the origin may evaluate
/// (`If-Match`, `If-Unmodified-Since`): such a request bypasses the cache.
pub(crate) fn origin_only(headers: &HeaderMap) -> bool {
    headers.contains_key(IF_MATCH) || headers.contains_key(IF_UNMODIFIED_SINCE)
}

/// Removes the client-only headers from a request a fill sends to the
/// origin, so that the origin answers with the full response.
pub(crate) fn strip(headers: &mut HeaderMap) {
    for name in &CLIENT_ONLY {
        headers.remove(name);
    }
}

/// Whether a response is a 206 or a 304: an answer to one request's range
/// or condition, never stored and never handed to another request.
pub(crate) fn is_own_answer(status: StatusCode) -> bool {
    status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED
}

/// One request's conditions and range, answered from the full response.
#[derive(Debug, Clone)]
pub(crate) struct Conditions {
    if_none_match: Option<Vec<u8>>,
    if_modified_since: Option<SystemTime>,
    range: Option<Vec<u8>>,
    if_range: Option<Vec<u8>>,
}

impl Conditions {
    /// The conditions of a request, or `None` when it has none to answer.
    pub(crate) fn of(parts: &request::Parts) -> Option<Self> {
        let h = &parts.headers;
        if !(h.contains_key(IF_NONE_MATCH)
            || h.contains_key(IF_MODIFIED_SINCE)
            || h.contains_key(RANGE))
        {
            return None;
        }
        let joined = |name: &HeaderName| {
            h.contains_key(name)
                .then(|| crate::key::header_value(h, name))
        };
        let conditions = Self {
            if_none_match: joined(&IF_NONE_MATCH),
            // Only one valid HTTP-date counts; anything else is ignored
            // (RFC 9110 §13.1.3).
            if_modified_since: single(h, &IF_MODIFIED_SINCE).and_then(http_date),
            // A range is defined for GET only (RFC 9110 §14.2).
            range: (parts.method == Method::GET)
                .then(|| single(h, &RANGE).map(<[u8]>::to_vec))
                .flatten(),
            if_range: single(h, &IF_RANGE).map(<[u8]>::to_vec),
        };
        let any = conditions.if_none_match.is_some()
            || conditions.if_modified_since.is_some()
            || conditions.range.is_some();
        any.then_some(conditions)
    }

    /// This request's answer from `res`, the full response for its URL:
    /// `304 Not Modified` when its condition says the client's copy is
    /// current, `206 Partial Content` or `416 Range Not Satisfiable` for a
    /// single byte range of a complete body, else `res` itself. Responses
    /// other than 200 are returned untouched (they are not the selected
    /// representation, or the origin already answered this request itself).
    pub(crate) fn answer<B: Body>(
        &self,
        res: Response<FenceBody<B>>,
        status_header: Option<&HeaderName>,
    ) -> Response<FenceBody<B>> {
        if res.status() != StatusCode::OK {
            return res;
        }
        if self.not_modified(res.headers()) {
            return not_modified(res, status_header);
        }
        let Some(range) = &self.range else {
            return res;
        };
        if let Some(if_range) = &self.if_range
            && !if_range_holds(if_range, res.headers())
        {
            return res;
        }
        let Some(body) = res.body().as_full() else {
            // A streamed body can't be sliced: the full response is a valid
            // answer to a range request.
            return res;
        };
        match parse_range(range, body.len() as u64) {
            RangeAnswer::Full => res,
            RangeAnswer::Part { first, last } => partial(res, body, first, last),
            RangeAnswer::Unsatisfiable => unsatisfiable(res, body.len(), status_header),
        }
    }

    /// Whether the client's copy is current (RFC 9110 §13.1.2, §13.1.3):
    /// `If-None-Match` by weak comparison, else `If-Modified-Since` against
    /// `Last-Modified` (or `Date`, RFC 9111 §4.3.2).
    fn not_modified(&self, headers: &HeaderMap) -> bool {
        if let Some(inm) = &self.if_none_match {
            let Some(current) = headers.get(ETAG).and_then(|v| entity_tag(v.as_bytes())) else {
                return inm.trim_ascii() == b"*";
            };
            if inm.trim_ascii() == b"*" {
                return true;
            }
            return entity_tags(inm)
                .is_some_and(|tags| tags.iter().any(|t| t.opaque == current.opaque));
        }
        let Some(since) = self.if_modified_since else {
            return false;
        };
        let modified = headers
            .get(LAST_MODIFIED)
            .or_else(|| headers.get(DATE))
            .and_then(|v| http_date(v.as_bytes()));
        modified.is_some_and(|m| m <= since)
    }
}

/// The one value of a header; `None` when absent or repeated.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    values.next().is_none().then_some(first.as_bytes())
}

fn http_date(value: &[u8]) -> Option<SystemTime> {
    crate::freshness::parse_date(value)
}

/// An entity tag (RFC 9110 §8.8.3): `W/` marks it weak; `opaque` is the
/// quoted string, quotes included.
#[derive(Debug, PartialEq, Eq)]
struct EntityTag<'a> {
    weak: bool,
    opaque: &'a [u8],
}

/// Parses one entity tag at the start of `s`, returning it and the rest.
fn entity_tag_prefix(s: &[u8]) -> Option<(EntityTag<'_>, &[u8])> {
    let (weak, s) = match s.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    if s.first() != Some(&b'"') {
        return None;
    }
    let end = s[1..].iter().position(|&b| b == b'"')? + 2;
    let opaque = &s[..end];
    // etagc: %x21 / %x23-7E / obs-text
    if opaque[1..end - 1]
        .iter()
        .any(|&b| b < 0x21 || b == 0x7f || b == b'"')
    {
        return None;
    }
    Some((EntityTag { weak, opaque }, &s[end..]))
}

/// A header value holding exactly one entity tag.
fn entity_tag(value: &[u8]) -> Option<EntityTag<'_>> {
    let (tag, rest) = entity_tag_prefix(value.trim_ascii())?;
    rest.is_empty().then_some(tag)
}

/// A comma-separated list of entity tags (commas may sit inside the quotes);
/// `None` when malformed.
fn entity_tags(value: &[u8]) -> Option<Vec<EntityTag<'_>>> {
    let mut tags = Vec::new();
    let mut s = value;
    loop {
        s = s.trim_ascii_start();
        while let Some(rest) = s.strip_prefix(b",") {
            s = rest.trim_ascii_start();
        }
        if s.is_empty() {
            return Some(tags);
        }
        let (tag, rest) = entity_tag_prefix(s)?;
        tags.push(tag);
        s = rest.trim_ascii_start();
        if !(s.is_empty() || s.starts_with(b",")) {
            return None;
        }
    }
}

/// `If-Range` (RFC 9110 §13.1.5): an entity tag that matches the current one
/// by strong comparison, or a date equal to `Last-Modified`.
fn if_range_holds(if_range: &[u8], headers: &HeaderMap) -> bool {
    if let Some(tag) = entity_tag(if_range) {
        return !tag.weak
            && headers
                .get(ETAG)
                .and_then(|v| entity_tag(v.as_bytes()))
                .is_some_and(|current| !current.weak && current.opaque == tag.opaque);
    }
    let Some(date) = http_date(if_range) else {
        return false;
    };
    headers
        .get(LAST_MODIFIED)
        .and_then(|v| http_date(v.as_bytes()))
        .is_some_and(|modified| modified == date)
}

/// What a `Range` header asks of a body of a given length.
#[derive(Debug, PartialEq, Eq)]
enum RangeAnswer {
    /// Not a single valid byte range: answer with the full response.
    Full,
    /// Bytes `first..=last`.
    Part { first: u64, last: u64 },
    /// A valid range that lies past the end of the body.
    Unsatisfiable,
}

/// Parses `bytes=first-last`, `bytes=first-` and `bytes=-suffix` (RFC 9110
/// §14.1.2). Other units, malformed values and multiple ranges are answered
/// with the full response, which RFC 9110 §14.2 allows.
fn parse_range(value: &[u8], len: u64) -> RangeAnswer {
    let value = value.trim_ascii();
    let Some(spec) = value
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case(b"bytes="))
        .map(|_| &value[6..])
    else {
        return RangeAnswer::Full;
    };
    let mut specs = spec
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return RangeAnswer::Full;
    };
    let Some(dash) = spec.iter().position(|&b| b == b'-') else {
        return RangeAnswer::Full;
    };
    let (first, last) = (spec[..dash].trim_ascii(), spec[dash + 1..].trim_ascii());
    match (digits(first), digits(last)) {
        // `-suffix`: the last `suffix` bytes.
        (None, Some(suffix)) if first.is_empty() => {
            if suffix == 0 || len == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Part {
                    first: len.saturating_sub(suffix),
                    last: len - 1,
                }
            }
        }
        // `first-`: from `first` to the end.
        (Some(first), None) if last.is_empty() => {
            if first >= len {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Part {
                    first,
                    last: len - 1,
                }
            }
        }
        (Some(first), Some(last)) if first <= last => {
            if first >= len {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Part {
                    first,
                    last: last.min(len - 1),
                }
            }
        }
        _ => RangeAnswer::Full,
    }
}

/// Non-empty ASCII digits; too large saturates (a huge first byte is past
/// any end, a huge last byte means "to the end").
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// The headers a 304 (and a 416) keeps from the full response: those RFC
/// 9110 §15.4.5 requires, the validators, `Age` and the cache-status header.
fn keep_for_304(name: &HeaderName, status_header: Option<&HeaderName>) -> bool {
    [
        CACHE_CONTROL,
        CONTENT_LOCATION,
        DATE,
        ETAG,
        EXPIRES,
        VARY,
        LAST_MODIFIED,
        AGE,
    ]
    .contains(name)
        || name.as_str() == "cache-status"
        || status_header == Some(name)
}

fn not_modified<B: Body>(
    res: Response<FenceBody<B>>,
    status_header: Option<&HeaderName>,
) -> Response<FenceBody<B>> {
    let mut out = Response::new(FenceBody::empty());
    *out.status_mut() = StatusCode::NOT_MODIFIED;
    copy_kept(res.headers(), out.headers_mut(), status_header);
    out
}

fn copy_kept(from: &HeaderMap, to: &mut HeaderMap, status_header: Option<&HeaderName>) {
    for (name, value) in from {
        if keep_for_304(name, status_header) {
            to.append(name.clone(), value.clone());
        }
    }
}

fn partial<B: Body>(
    res: Response<FenceBody<B>>,
    body: Bytes,
    first: u64,
    last: u64,
) -> Response<FenceBody<B>> {
    let len = body.len();
    // `first <= last < len`, both from `parse_range` with this length.
    let slice = body.slice(first as usize..=last as usize);
    let (mut parts, _) = res.into_parts();
    parts.status = StatusCode::PARTIAL_CONTENT;
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(slice.len()));
    if let Ok(value) = HeaderValue::try_from(format!("bytes {first}-{last}/{len}")) {
        parts.headers.insert(CONTENT_RANGE, value);
    }
    Response::from_parts(parts, FenceBody::full(slice))
}

fn unsatisfiable<B: Body>(
    res: Response<FenceBody<B>>,
    len: usize,
    status_header: Option<&HeaderName>,
) -> Response<FenceBody<B>> {
    let mut out = Response::new(FenceBody::empty());
    *out.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    copy_kept(res.headers(), out.headers_mut(), status_header);
    let headers = out.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(0));
    if let Ok(value) = HeaderValue::try_from(format!("bytes */{len}")) {
        headers.insert(CONTENT_RANGE, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_are_parsed_per_rfc_9110() {
        use RangeAnswer::*;
        let p = |s: &str| parse_range(s.as_bytes(), 10);
        assert_eq!(p("bytes=0-3"), Part { first: 0, last: 3 });
        assert_eq!(p("Bytes = 0-3"), Full);
        assert_eq!(p("BYTES=2-"), Part { first: 2, last: 9 });
        assert_eq!(p("bytes=-3"), Part { first: 7, last: 9 });
        assert_eq!(p("bytes=-30"), Part { first: 0, last: 9 });
        assert_eq!(
            p("bytes=5-99999999999999999999999"),
            Part { first: 5, last: 9 }
        );
        assert_eq!(p("bytes=10-"), Unsatisfiable);
        assert_eq!(p("bytes=99999999999999999999999-"), Unsatisfiable);
        assert_eq!(p("bytes=-0"), Unsatisfiable);
        assert_eq!(p("bytes=3-2"), Full);
        assert_eq!(p("bytes=0-1,4-5"), Full);
        assert_eq!(p("bytes=0-1, ,"), Part { first: 0, last: 1 });
        assert_eq!(p("items=0-1"), Full);
        assert_eq!(p("bytes=a-b"), Full);
        assert_eq!(p("bytes=-"), Full);
        assert_eq!(p("bytes=1--2"), Full);
        assert_eq!(p(""), Full);
        assert_eq!(parse_range(b"bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-5", 0), Unsatisfiable);
    }

    #[test]
    fn entity_tag_lists_allow_commas_inside_quotes_and_reject_garbage() {
        let tags = entity_tags(br#" W/"a,b" ,"c",, "" "#).unwrap();
        let opaque: Vec<&[u8]> = tags.iter().map(|t| t.opaque).collect();
        assert_eq!(opaque, [&br#""a,b""#[..], br#""c""#, br#""""#]);
        assert!(tags[0].weak && !tags[1].weak);
        assert!(entity_tags(br#""a" "b""#).is_none());
        assert!(entity_tags(br#"a"#).is_none());
        assert!(entity_tags(br#""unterminated"#).is_none());
        assert!(entity_tag(br#"w/"lowercase-w""#).is_none());
        assert_eq!(entity_tags(b"").unwrap(), []);
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn conditions(pairs: &[(&'static str, &'static str)]) -> Option<Conditions> {
        let mut req = http::Request::get("/").body(()).unwrap();
        *req.headers_mut() = headers(pairs);
        Conditions::of(&req.into_parts().0)
    }

    #[test]
    fn if_none_match_uses_weak_comparison_and_wins_over_if_modified_since() {
        let stored = headers(&[
            ("etag", r#"W/"v1""#),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ]);
        let nm = |pairs| conditions(pairs).unwrap().not_modified(&stored);
        assert!(nm(&[("if-none-match", r#""v1""#)]));
        assert!(nm(&[("if-none-match", r#""x", W/"v1""#)]));
        assert!(nm(&[("if-none-match", "*")]));
        assert!(!nm(&[("if-none-match", r#""v2""#)]));
        assert!(!nm(&[("if-none-match", "garbage")]));
        // If-None-Match present: If-Modified-Since is not looked at.
        assert!(!nm(&[
            ("if-none-match", r#""v2""#),
            ("if-modified-since", "Tue, 01 Dec 2026 11:00:00 GMT"),
        ]));
        assert!(nm(&[(
            "if-modified-since",
            "Tue, 01 Dec 2026 10:00:00 GMT"
        )]));
        assert!(!nm(&[(
            "if-modified-since",
            "Tue, 01 Dec 2026 09:59:59 GMT"
        )]));
        assert!(conditions(&[("if-modified-since", "yesterday")]).is_none());
    }

    #[test]
    fn if_range_needs_a_strong_match_or_the_exact_date() {
        let stored = headers(&[
            ("etag", r#""v1""#),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ]);
        assert!(if_range_holds(br#""v1""#, &stored));
        assert!(!if_range_holds(br#"W/"v1""#, &stored));
        assert!(!if_range_holds(br#""v2""#, &stored));
        assert!(if_range_holds(b"Tue, 01 Dec 2026 10:00:00 GMT", &stored));
        assert!(!if_range_holds(b"Tue, 01 Dec 2026 10:00:01 GMT", &stored));
        let weak = headers(&[("etag", r#"W/"v1""#)]);
        assert!(!if_range_holds(br#""v1""#, &weak));
    }
}
