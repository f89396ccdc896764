//! What may be cached, and for how long: the HTTP rules of a shared cache.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::header::{AUTHORIZATION, CACHE_CONTROL, COOKIE, PRAGMA, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderName, Method, StatusCode, request, response};

use crate::freshness::{parse_seconds, split_directives};
use crate::key::{digest, header_value, request_host};

/// Sets the fresh lifetime of one response, overriding the layer's TTL.
///
/// Put it in the response's extensions from a handler. A zero duration
/// means "don't cache this response".
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use cachefence::CacheTtl;
///
/// let mut res = http::Response::new("price: 42");
/// res.extensions_mut().insert(CacheTtl(Duration::from_secs(5)));
/// ```
///
/// With the `axum` feature it is a response part: a handler returns
/// `(CacheTtl(Duration::from_secs(5)), body)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTtl(pub Duration);

/// Tags (surrogate keys) of one response, set by a handler; added to the
/// ones named in the tag headers (`Cache-Tag`, `Surrogate-Key` by default).
/// [`FenceHandle::invalidate_tag`](crate::FenceHandle::invalidate_tag)
/// removes every entry carrying a tag.
///
/// # Example
///
/// ```
/// use cachefence::CacheTags;
///
/// let mut res = http::Response::new("product 42");
/// res.extensions_mut().insert(CacheTags(vec!["product:42".into(), "products".into()]));
/// ```
///
/// With the `axum` feature it is a response part: a handler returns
/// `(CacheTags(vec!["product:42".into()]), body)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheTags(pub Vec<String>);

/// At most this many tags are kept per response; the rest are ignored (and
/// logged), so one response can't make a store unboundedly large.
pub(crate) const MAX_TAGS: usize = 64;

/// The tags of a response: its tag headers (comma or space separated) and
/// its [`CacheTags`] extension, deduplicated.
pub(crate) fn response_tags(parts: &response::Parts, tag_headers: &[HeaderName]) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for name in tag_headers {
        for value in parts.headers.get_all(name) {
            let Ok(value) = value.to_str() else { continue };
            tags.extend(
                value
                    .split([',', ' ', '\t'])
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    if let Some(CacheTags(more)) = parts.extensions.get::<CacheTags>() {
        tags.extend(more.iter().filter(|t| !t.is_empty()).cloned());
    }
    tags.sort();
    tags.dedup();
    if tags.len() > MAX_TAGS {
        tracing::warn!(
            count = tags.len(),
            max = MAX_TAGS,
            "too many cache tags, ignoring the rest"
        );
        tags.truncate(MAX_TAGS);
    }
    tags
}

/// The statuses cached by default (RFC 9110 "heuristically cacheable").
pub(crate) const DEFAULT_STATUSES: [u16; 11] =
    [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// RFC 9111 mode: how long past its freshness a response with a validator
/// is kept in Redis to be revalidated, by default.
pub(crate) const DEFAULT_REVALIDATION_WINDOW: Duration = Duration::from_secs(600);

/// Responses longer-lived than this are cut to it, whatever they ask for.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) ttl: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) grace: Duration,
    pub(crate) statuses: Vec<StatusCode>,
    pub(crate) respect_cache_control: bool,
    pub(crate) cache_authorized: bool,
    pub(crate) cache_cookies: bool,
    pub(crate) honor_request_no_cache: bool,
    pub(crate) unkeyed: Unkeyed,
    /// RFC 9111 shared-cache freshness (`FenceLayer::rfc9111`).
    pub(crate) rfc9111: bool,
    /// The heuristic fraction of the time since `Last-Modified` (0: none).
    pub(crate) heuristic: f64,
    /// The longest heuristic lifetime (`None`: `ttl`).
    pub(crate) heuristic_max: Option<Duration>,
    /// RFC 9111 mode: how long past freshness a response with a validator
    /// is kept to be revalidated (`FenceLayer::revalidation_window`).
    pub(crate) revalidate_for: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            statuses: DEFAULT_STATUSES
                .iter()
                .filter_map(|&s| StatusCode::from_u16(s).ok())
                .collect(),
            respect_cache_control: false,
            cache_authorized: false,
            cache_cookies: false,
            honor_request_no_cache: false,
            unkeyed: Unkeyed::default(),
            rfc9111: false,
            heuristic: 0.0,
            heuristic_max: None,
            revalidate_for: DEFAULT_REVALIDATION_WINDOW,
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestRule {
    /// Not cacheable: straight to the inner service.
    Bypass(&'static str),
    /// Look it up. `refresh` is set when the client asked for a fresh copy
    /// and the policy honours that.
    Lookup { head: bool, refresh: bool },
}

/// What to do with a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ResponseRule {
    Store {
        ttl: Duration,
        vary: Vec<HeaderName>,
        /// How long past fresh it may be served stale, in milliseconds.
        grace_ms: u64,
        /// Its age on arrival (from upstream caches) in milliseconds,
        /// counted in `Age`. (Milliseconds keep this enum small.)
        age_ms: u64,
        /// How long past fresh it is kept in Redis, in milliseconds: at
        /// least `grace_ms`; longer to serve it on origin errors
        /// (`stale-if-error`) or to revalidate it (`no-cache`, whose `ttl`
        /// is zero).
        keep_ms: u64,
    },
    /// Not cacheable. `shareable` says whether requests that waited on this
    /// fill may be served the same response (it is not private to the
    /// request that made it).
    DontStore {
        reason: &'static str,
        shareable: bool,
    },
}

impl Policy {
    pub(crate) fn request(&self, parts: &request::Parts) -> RequestRule {
        let head = match parts.method {
            Method::GET => false,
            Method::HEAD => true,
            _ => return RequestRule::Bypass("method"),
        };
        // RFC 9111 mode looks them up: a response to one is stored only as
        // §3.5 allows (`Policy::response`).
        if !self.cache_authorized && !self.rfc9111 && parts.headers.contains_key(AUTHORIZATION) {
            return RequestRule::Bypass("authorization");
        }
        if !self.cache_cookies && parts.headers.contains_key(COOKIE) {
            return RequestRule::Bypass("cookie");
        }
        if let Some(reason) = self.unkeyed.bypass(parts) {
            return RequestRule::Bypass(reason);
        }
        let refresh = self.honor_request_no_cache && asks_for_fresh_copy(&parts.headers);
        RequestRule::Lookup { head, refresh }
    }

    /// The rule for a response that arrived `delay` after its request was
    /// sent (counted in its age in RFC 9111 mode); `authorized`: that
    /// request carried `Authorization`.
    pub(crate) fn response(
        &self,
        parts: &response::Parts,
        delay: Duration,
        authorized: bool,
    ) -> ResponseRule {
        let shareable = shareable(&parts.headers);
        let dont = |reason| ResponseRule::DontStore { reason, shareable };
        if crate::conditional::is_own_answer(parts.status) {
            // One request's range or condition, never another's answer.
            return ResponseRule::DontStore {
                reason: "206 or 304",
                shareable: false,
            };
        }
        let listed = self.statuses.contains(&parts.status);
        let ttl_set = parts.extensions.get::<CacheTtl>().copied();
        // RFC 9111 mode: any final status with explicit freshness, and the
        // directives in force (CDN-Cache-Control, else Cache-Control) are
        // read by freshness().
        if (!listed && (!self.rfc9111 || ttl_set.is_some())) || parts.status.is_informational() {
            return dont("status");
        }
        if parts.headers.contains_key(SET_COOKIE) {
            return dont("set-cookie");
        }
        if self.rfc9111 {
            if ttl_set.is_some() && crate::freshness::refuses_set_ttl(&parts.headers) {
                return dont("cache-control");
            }
            if authorized
                && !self.cache_authorized
                && !crate::freshness::allows_authorized(&parts.headers)
            {
                // §3.5: another request must not get it; not even those that
                // waited on this fill. (With `cache_authorized` the key
                // names the credential: the user's choice, as outside this
                // mode.)
                return ResponseRule::DontStore {
                    reason: "authorization",
                    shareable: false,
                };
            }
        } else {
            let cc = CacheControl::parse(&parts.headers);
            if cc.no_store || cc.private || cc.no_cache {
                return dont("cache-control");
            }
        }
        if is_event_stream(&parts.headers) {
            // Server-sent events: endless, and each client's own.
            return ResponseRule::DontStore {
                reason: "streaming",
                shareable: false,
            };
        }
        let Some(vary) = vary_names(&parts.headers) else {
            return dont("vary: *");
        };
        let (mut grace, mut age, mut keep) = (self.grace, Duration::ZERO, None);
        let ttl = if let Some(CacheTtl(ttl)) = ttl_set {
            ttl
        } else if self.rfc9111 {
            let knobs = crate::freshness::Knobs {
                heuristic: self.heuristic,
                default_keep: self.ttl,
                heuristic_max: self.heuristic_max,
                revalidate_for: self.revalidate_for,
                listed,
            };
            let fresh = crate::freshness::freshness_with(
                parts,
                std::time::SystemTime::now(),
                delay,
                &knobs,
            );
            match fresh {
                Ok(fresh) => {
                    (grace, age, keep) = (fresh.grace, fresh.age, Some(fresh.keep));
                    fresh.ttl
                }
                Err(reason) => return dont(reason),
            }
        } else if let Some(age) = Some(CacheControl::parse(&parts.headers))
            .filter(|_| self.respect_cache_control)
            .and_then(|cc| cc.s_maxage.or(cc.max_age))
        {
            Duration::from_secs(age)
        } else if parts.status.is_client_error() || parts.status.is_server_error() {
            self.negative_ttl.min(self.ttl)
        } else {
            self.ttl
        };
        // RFC 9111 mode gives a zero lifetime only to a response it keeps to
        // be revalidated on every use (`no-cache`).
        let revalidate_only = keep.is_some_and(|k| !k.is_zero());
        if ttl.is_zero() && !revalidate_only {
            return dont("zero ttl");
        }
        let keep = keep.unwrap_or(grace).max(grace).min(MAX_TTL);
        ResponseRule::Store {
            ttl: ttl.min(MAX_TTL),
            vary,
            grace_ms: crate::entry::duration_ms(grace.min(MAX_TTL)),
            age_ms: crate::entry::duration_ms(age),
            keep_ms: crate::entry::duration_ms(keep),
        }
    }
}

/// `Content-Type: text/event-stream`.
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Whether an uncacheable response says the key is uncacheable by nature,
/// so that a pass marker should send the next requests straight to the
/// origin: not a transient failure (5xx, 408, 425, 429), which says nothing
/// about the next response.
pub(crate) fn uncacheable_by_nature(reason: &str, status: http::StatusCode) -> bool {
    let transient = status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429);
    // A response to a request with credentials says nothing about the
    // next requests, which may carry none.
    !(reason == "status" && transient) && reason != "authorization"
}

/// Request headers that commonly change a response without the response
/// naming them in `Vary`: frameworks build absolute links and redirects
/// from them. A request carrying one is keyed on a SHA-256 digest of its
/// value (of `Forwarded`, without its per-client `for` and `by`
/// parameters), unless the header is trusted or stripped.
pub(crate) const KEYED_HEADERS: [&str; 11] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-scheme",
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "front-end-https",
    "x-url-scheme",
    "x-host",
];

/// Request headers that make some frameworks serve another URL than the
/// request line names: a request carrying one passes through uncached,
/// unless the header is trusted or stripped.
pub(crate) const REWRITE_HEADERS: [&str; 3] = ["x-original-url", "x-rewrite-url", "x-original-uri"];

/// Method overrides: a request carrying one of these headers passes through
/// uncached, unless the header is trusted or stripped.
pub(crate) const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Method-override query parameters: a request carrying one passes through
/// uncached.
pub(crate) const METHOD_OVERRIDE_PARAMS: [&str; 1] = ["_method"];

/// How the layer treats request inputs the key does not name: the headers
/// above, and the host.
#[derive(Debug, Clone, Default)]
pub(crate) struct Unkeyed {
    /// Headers the user says are set by their own proxy (constant per host):
    /// neither keyed nor a reason to pass through.
    pub(crate) trusted: Vec<HeaderName>,
    /// Headers removed from every request before the inner service sees it.
    pub(crate) stripped: Vec<HeaderName>,
    /// Normalised hosts whose requests may be cached; `None`: any host.
    pub(crate) allowed_hosts: Option<Arc<HashSet<String>>>,
}

impl Unkeyed {
    fn trusts(&self, name: &str) -> bool {
        self.trusted.iter().any(|t| t.as_str() == name)
    }

    /// Removes the stripped headers.
    pub(crate) fn strip(&self, headers: &mut HeaderMap) {
        for name in &self.stripped {
            headers.remove(name);
        }
    }

    /// Why this request must pass through uncached, if it must.
    pub(crate) fn bypass(&self, parts: &request::Parts) -> Option<&'static str> {
        if let Some(hosts) = &self.allowed_hosts {
            match request_host(parts) {
                Ok(host) if hosts.contains(&host) => {}
                _ => return Some("host not allowed"),
            }
        }
        // One pass over the request's header names (a few), instead of a
        // hashed lookup of every listed name.
        let carries = |names: &[&str]| {
            parts.headers.keys().any(|k| {
                let k = k.as_str();
                names.contains(&k) && !self.trusts(k)
            })
        };
        let override_param = parts.uri.query().is_some_and(|q| {
            q.split('&').any(|p| {
                let name = percent_decode(p.split_once('=').map_or(p, |(n, _)| n));
                METHOD_OVERRIDE_PARAMS
                    .iter()
                    .any(|m| name.eq_ignore_ascii_case(m.as_bytes()))
            })
        });
        if override_param || carries(&METHOD_OVERRIDE_HEADERS) {
            return Some("method override");
        }
        if carries(&REWRITE_HEADERS) {
            return Some("url rewrite header");
        }
        None
    }

    /// Appends the keyed headers this request carries to its key, as
    /// dimensions (`\n<name>:<digest>`) of the key's URL.
    pub(crate) fn extend_key(&self, mut key: String, headers: &HeaderMap) -> String {
        // Most requests carry none: one pass over their header names.
        if !headers.keys().any(|k| KEYED_HEADERS.contains(&k.as_str())) {
            return key;
        }
        for name in KEYED_HEADERS {
            if self.trusts(name) || !headers.contains_key(name) {
                continue;
            }
            let name = HeaderName::from_static(name);
            let mut value = header_value(headers, &name);
            if name == http::header::FORWARDED {
                value = forwarded_without_client(&value);
            }
            if value.is_empty() {
                continue;
            }
            key.push('\n');
            key.push_str(name.as_str());
            key.push(':');
            key.push_str(&digest(&[&value]));
        }
        key
    }
}

/// A `Forwarded` value (RFC 7239) without its `for` and `by` parameters:
/// they name the client and the proxy, differ per client, and keying on
/// them would give every client its own entry. The rest (`host`, `proto`)
/// is kept in order, parameter names lowercased.
fn forwarded_without_client(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for element in split_unquoted(value, b',') {
        let mut kept = Vec::new();
        for pair in split_unquoted(element, b';') {
            let (name, rest) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i..]),
                None => (pair, &[][..]),
            };
            let name = name.trim_ascii().to_ascii_lowercase();
            if name == b"for" || name == b"by" {
                continue;
            }
            let mut p = name;
            p.extend_from_slice(rest);
            kept.push(p);
        }
        if kept.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(&kept.join(&b';'));
    }
    out
}

/// Decodes `%XX` escapes, as frameworks do before they read a parameter's
/// name; other bytes are kept.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Splits on `sep` outside quoted strings, trimming, dropping empty parts.
fn split_unquoted(value: &[u8], sep: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in value.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            out.push(value[start..i].trim_ascii());
            start = i + 1;
        }
    }
    out.push(value[start..].trim_ascii());
    out.retain(|p| !p.is_empty());
    out
}

/// Whether a response can be handed to other requests for the same key: not
/// marked private and setting no cookie.
fn shareable(headers: &HeaderMap) -> bool {
    !headers.contains_key(SET_COOKIE) && !CacheControl::parse(headers).private
}

/// Request `Cache-Control: no-cache|no-store|max-age=0` or `Pragma: no-cache`.
fn asks_for_fresh_copy(headers: &HeaderMap) -> bool {
    let cc = CacheControl::parse(headers);
    cc.no_cache
        || cc.no_store
        || cc.max_age == Some(0)
        || headers
            .get_all(PRAGMA)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"))
}

/// The header names a response varies on, lowercased, sorted and deduplicated;
/// `None` for `Vary: *`.
pub(crate) fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(VARY) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token == b"*" {
                return None;
            }
            if token.is_empty() {
                continue;
            }
            // A malformed name cannot be matched against requests: refuse to
            // cache rather than ignore it.
            names.push(HeaderName::from_bytes(token).ok()?);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// The directives of `Cache-Control` that matter to a shared cache. Unknown or
/// malformed directives are ignored; numbers too large saturate.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheControl {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
}

impl CacheControl {
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(CACHE_CONTROL) {
            for directive in split_directives(value.as_bytes()) {
                let (name, arg) = match directive.iter().position(|&b| b == b'=') {
                    Some(i) => (&directive[..i], Some(&directive[i + 1..])),
                    None => (directive, None),
                };
                let name = name.trim_ascii();
                let seconds = || arg.and_then(parse_seconds);
                if name.eq_ignore_ascii_case(b"no-store") {
                    cc.no_store = true;
                } else if name.eq_ignore_ascii_case(b"no-cache") {
                    cc.no_cache = true;
                } else if name.eq_ignore_ascii_case(b"private") {
                    cc.private = true;
                } else if name.eq_ignore_ascii_case(b"max-age") {
                    cc.max_age = cc.max_age.or_else(seconds);
                } else if name.eq_ignore_ascii_case(b"s-maxage") {
                    cc.s_maxage = cc.s_maxage.or_else(seconds);
                }
            }
        }
        cc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn response(status: u16, pairs: &[(&'static str, &'static str)]) -> response::Parts {
        let mut res = http::Response::new(());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        *res.headers_mut() = headers(pairs);
        res.into_parts().0
    }

    #[test]
    fn cache_control_parsing_tolerates_garbage() {
        let cc = CacheControl::parse(&headers(&[(
            "cache-control",
            "max-age=99999999999999999999999, S-MAXAGE=\"5\", private=\"a,b\", x=\"\", =, ,",
        )]));
        assert_eq!(cc.max_age, Some(u64::MAX));
        assert_eq!(cc.s_maxage, Some(5));
        assert!(cc.private && !cc.no_store);
        let cc = CacheControl::parse(&headers(&[("cache-control", "max-age=-1, max-age=abc")]));
        assert_eq!(cc.max_age, None);
    }

    #[test]
    fn only_get_and_head_without_credentials_are_looked_up() {
        let p = Policy::default();
        let req = |m: Method, h: &[(&'static str, &'static str)]| {
            let mut r = http::Request::new(());
            *r.method_mut() = m;
            *r.headers_mut() = headers(h);
            p.request(&r.into_parts().0)
        };
        assert_eq!(
            req(Method::GET, &[]),
            RequestRule::Lookup {
                head: false,
                refresh: false
            }
        );
        assert_eq!(
            req(Method::HEAD, &[]),
            RequestRule::Lookup {
                head: true,
                refresh: false
            }
        );
        assert!(matches!(req(Method::POST, &[]), RequestRule::Bypass(_)));
        assert!(matches!(
            req(Method::GET, &[("authorization", "x")]),
            RequestRule::Bypass(_)
        ));
        assert!(matches!(
            req(Method::GET, &[("cookie", "a=b")]),
            RequestRule::Bypass(_)
        ));
        // Ignored by default: a client cannot force load onto the origin.
        assert_eq!(
            req(
                Method::GET,
                &[("cache-control", "no-cache"), ("pragma", "no-cache")]
            ),
            RequestRule::Lookup {
                head: false,
                refresh: false
            }
        );
    }

    #[test]
    fn rfc9111_mode_stores_a_response_to_credentials_only_as_section_3_5_allows() {
        let mut p = Policy {
            rfc9111: true,
            ..Policy::default()
        };
        let req = |p: &Policy| {
            let r = http::Request::get("/")
                .header("authorization", "x")
                .body(())
                .unwrap();
            p.request(&r.into_parts().0)
        };
        assert!(matches!(req(&p), RequestRule::Lookup { .. }));
        let stored = |p: &Policy, cc| {
            let r = response(200, &[("cache-control", cc)]);
            match p.response(&r, Duration::ZERO, true) {
                ResponseRule::Store { .. } => Ok(()),
                ResponseRule::DontStore { reason, shareable } => Err((reason, shareable)),
            }
        };
        assert_eq!(stored(&p, "max-age=60"), Err(("authorization", false)));
        assert!(!uncacheable_by_nature("authorization", StatusCode::OK));
        for cc in [
            "public, max-age=60",
            "s-maxage=60",
            "max-age=60, must-revalidate",
        ] {
            assert_eq!(stored(&p, cc), Ok(()), "{cc}");
        }
        // Keyed on the credential by the user: their choice.
        p.cache_authorized = true;
        assert_eq!(stored(&p, "max-age=60"), Ok(()));
    }

    #[test]
    fn uncacheable_responses_are_refused_with_sharing_decided() {
        let p = Policy::default();
        let dont = |r| match p.response(&r, Duration::ZERO, false) {
            ResponseRule::DontStore { shareable, .. } => Some(shareable),
            ResponseRule::Store { .. } => None,
        };
        assert_eq!(dont(response(500, &[])), Some(true));
        assert_eq!(
            dont(response(200, &[("cache-control", "private")])),
            Some(false)
        );
        assert_eq!(dont(response(200, &[("set-cookie", "a=b")])), Some(false));
        assert_eq!(
            dont(response(200, &[("cache-control", "no-store")])),
            Some(true)
        );
        assert_eq!(dont(response(200, &[("vary", "accept, *")])), Some(true));
        assert_eq!(dont(response(200, &[])), None);
    }

    #[test]
    fn ttl_comes_from_the_extension_then_cache_control_then_defaults() {
        let mut p = Policy::default();
        let ttl = |p: &Policy, r| match p.response(&r, Duration::ZERO, false) {
            ResponseRule::Store { ttl, .. } => ttl,
            ResponseRule::DontStore { .. } => Duration::ZERO,
        };
        assert_eq!(
            ttl(&p, response(200, &[("cache-control", "max-age=5")])),
            p.ttl
        );
        assert_eq!(ttl(&p, response(404, &[])), p.negative_ttl);
        p.respect_cache_control = true;
        assert_eq!(
            ttl(
                &p,
                response(200, &[("cache-control", "max-age=5, s-maxage=7")])
            ),
            Duration::from_secs(7)
        );
        assert_eq!(
            ttl(
                &p,
                response(200, &[("cache-control", "max-age=99999999999999")])
            ),
            MAX_TTL
        );
        assert_eq!(
            ttl(&p, response(200, &[("cache-control", "max-age=0")])),
            Duration::ZERO
        );
        let mut r = response(200, &[("cache-control", "max-age=5")]);
        r.extensions.insert(CacheTtl(Duration::from_secs(3)));
        assert_eq!(ttl(&p, r), Duration::from_secs(3));
    }

    fn parts(uri: &str, pairs: &[(&'static str, &'static str)]) -> request::Parts {
        let mut r = http::Request::get(uri).body(()).unwrap();
        *r.headers_mut() = headers(pairs);
        r.into_parts().0
    }

    #[test]
    fn method_overrides_and_rewrites_pass_through_unless_trusted() {
        let mut p = Policy::default();
        for (uri, h) in [
            ("/x", &[("x-http-method-override", "DELETE")][..]),
            ("/x", &[("x-http-method", "PUT")][..]),
            ("/x", &[("x-method-override", "PATCH")][..]),
            ("/x?_method=DELETE", &[][..]),
            ("/x?a=1&%5Fmethod=DELETE", &[][..]),
            ("/x", &[("x-original-url", "/admin")][..]),
            ("/x", &[("x-rewrite-url", "/admin")][..]),
        ] {
            let rule = p.request(&parts(uri, h));
            assert!(matches!(rule, RequestRule::Bypass(_)), "{uri} {h:?}");
        }
        p.unkeyed
            .trusted
            .push(HeaderName::from_static("x-original-url"));
        assert!(matches!(
            p.request(&parts("/x", &[("x-original-url", "/admin")])),
            RequestRule::Lookup { .. }
        ));
    }

    #[test]
    fn forwarding_headers_become_key_dimensions() {
        let mut u = Unkeyed::default();
        let key = |u: &Unkeyed, h| u.extend_key("/p".to_owned(), &headers(h));
        assert_eq!(key(&u, &[]), "/p");
        let evil = key(&u, &[("x-forwarded-host", "evil.example")]);
        assert!(evil.starts_with("/p\nx-forwarded-host:"));
        assert!(!evil.contains("evil"));
        assert_ne!(evil, key(&u, &[("x-forwarded-host", "good.example")]));
        // Forwarded: the per-client parameters don't split the cache.
        assert_eq!(
            key(&u, &[("forwarded", "for=1.2.3.4")]),
            "/p",
            "for= alone is not keyed"
        );
        assert_eq!(
            key(&u, &[("forwarded", "for=1.2.3.4;proto=https;host=a")]),
            key(&u, &[("forwarded", "For=\"[::1]:9\"; proto=https;host=a")])
        );
        assert_ne!(
            key(&u, &[("forwarded", "proto=https;host=a")]),
            key(&u, &[("forwarded", "proto=https;host=evil")])
        );
        u.trusted.push(HeaderName::from_static("x-forwarded-host"));
        assert_eq!(key(&u, &[("x-forwarded-host", "evil.example")]), "/p");
    }

    #[test]
    fn only_allowed_hosts_are_looked_up() {
        let mut p = Policy::default();
        p.unkeyed.allowed_hosts = Some(Arc::new(["a.example".to_owned()].into()));
        let rule = |h: &[(&'static str, &'static str)]| p.request(&parts("/", h));
        assert!(matches!(
            rule(&[("host", "A.example:443")]),
            RequestRule::Lookup { .. }
        ));
        assert!(matches!(
            rule(&[("host", "b.example")]),
            RequestRule::Bypass(_)
        ));
        assert!(matches!(rule(&[]), RequestRule::Bypass(_)));
    }

    #[test]
    fn vary_names_are_normalised() {
        let h = headers(&[("vary", "Accept-Language, accept"), ("vary", "ACCEPT")]);
        let names = vary_names(&h).unwrap();
        assert_eq!(
            names,
            vec![
                HeaderName::from_static("accept"),
                HeaderName::from_static("accept-language")
            ]
        );
        assert_eq!(vary_names(&headers(&[("vary", "a b")])), None);
    }
}
