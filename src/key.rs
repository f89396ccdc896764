//! Cache keys: how a request is named in Redis.
//!
//! A request's *key* is a string chosen by a [`MakeKey`] (by default the path
//! and the query with its parameters sorted, then the host). Everything up to
//! the key's first newline names the URL; what follows (the host, keyed
//! headers, keyed forwarding headers) is a *dimension* of that URL. In Redis
//! the URL lives at
//!
//! ```text
//! <namespace>|<readable url>:{<digest>}
//! ```
//!
//! where the namespace is escaped like the key (so the first raw `|` ends
//! it), the readable URL is the URL with every byte outside a safe set
//! percent-encoded (so no glob character, brace or control byte ever reaches
//! Redis) and cut to 160 bytes, and the digest is the first 128
//! bits of SHA-256 over the namespace and the URL. A key without dimensions
//! is stored right there; a key with dimensions is stored at
//! `<url key>:v:<digest of the whole key>`, beside the URL's `Vary` variants,
//! and listed in the URL's variant set, so invalidating the URL removes
//! every host and every dimension of it. The braces make the digest the
//! Redis Cluster hash tag, so an entry, its dimensions, its variants, its
//! leases and its variant set share one slot and one Lua script may touch
//! them all.

/// The namespace of a cache or layer nobody named.
pub(crate) const DEFAULT_NAMESPACE: &str = "cachefence:";

use std::fmt::Write as _;

use http::request::Parts;
use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

/// Longest readable part of a Redis key, in bytes. Longer keys are cut; the
/// digest still tells them apart.
pub(crate) const READABLE_MAX: usize = 160;

/// Chooses the cache key of a request, or says it must not be cached.
///
/// Implemented by [`DefaultKey`] and by every
/// `Fn(&http::request::Parts) -> Option<String>` closure.
///
/// # Example
///
/// ```
/// use cachefence::key::MakeKey;
///
/// // Cache per path only, ignoring the query; never cache `/admin`.
/// let key = |parts: &http::request::Parts| {
///     let path = parts.uri.path();
///     (!path.starts_with("/admin")).then(|| path.to_owned())
/// };
/// let req = http::Request::get("/shop?x=1").body(()).unwrap();
/// assert_eq!(key.make_key(&req.into_parts().0).as_deref(), Some("/shop"));
/// ```
pub trait MakeKey: Send + Sync + 'static {
    /// The key of this request, or `None` to pass it to the inner service
    /// without caching.
    ///
    /// A newline splits a key: the part before the first `\n` names the URL,
    /// the rest is a per-request dimension (as [`DefaultKey`] adds the host).
    /// [`FenceHandle::invalidate_key`](crate::FenceHandle::invalidate_key)
    /// of the URL part removes every dimension of it.
    fn make_key(&self, parts: &Parts) -> Option<String>;

    /// The URL part of the keys of every request for `path_and_query`
    /// (whatever their host or headers), or `None` when this key function
    /// can't tell. [`FenceHandle::invalidate_path`](crate::FenceHandle::invalidate_path)
    /// uses it, and fails with an error on `None` rather than remove nothing.
    ///
    /// The default is `None`, as for closures; [`DefaultKey`] returns the
    /// path and the sorted query.
    fn path_key(&self, path_and_query: &str) -> Option<String> {
        let _ = path_and_query;
        None
    }
}

impl<F> MakeKey for F
where
    F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
{
    fn make_key(&self, parts: &Parts) -> Option<String> {
        self(parts)
    }
}

/// The default cache key: the path, then the query with its parameters
/// sorted by name, so `?a=1&b=2` and `?b=2&a=1` share an entry, then the
/// request's host.
///
/// Parameters with the same name keep their order (`?t=2&t=1` differs from
/// `?t=1&t=2`); empty parameters (`?&a=1`) are dropped.
///
/// The host (the `Host` header, or the authority of an absolute-form
/// target) is normalised: lowercased, a trailing dot and a default port
/// (`:80`, `:443`) dropped. One app serving several hostnames therefore
/// never serves one host's page to another. A request whose `Host` header
/// and absolute-form target name different hosts is not cached (the origin
/// answers for one, the key would say the other). Requests without any
/// host share one entry per URL. [`with_host(false)`](Self::with_host)
/// leaves the host out, for an app that answers the same for every host.
///
/// The key is `<path and sorted query>`, then `\nhost:<host>`, then
/// `\n<header>:<digest>` for every [`with_header`](Self::with_header):
/// the part before the first newline names the URL, so
/// [`FenceHandle::invalidate_path`](crate::FenceHandle::invalidate_path)
/// removes the URL for every host and header value.
///
/// # Example
///
/// ```
/// use cachefence::key::{DefaultKey, MakeKey};
///
/// let req = http::Request::get("/p?b=2&a=1")
///     .header("host", "Shop.Example:443")
///     .body(())
///     .unwrap();
/// let (parts, _) = req.into_parts();
/// assert_eq!(
///     DefaultKey::new().make_key(&parts).as_deref(),
///     Some("/p?a=1&b=2\nhost:shop.example")
/// );
/// let no_host = DefaultKey::new().with_host(false);
/// assert_eq!(no_host.make_key(&parts).as_deref(), Some("/p?a=1&b=2"));
/// ```
#[derive(Debug, Clone)]
pub struct DefaultKey {
    host: bool,
    headers: Vec<HeaderName>,
    params: QueryParams,
}

impl Default for DefaultKey {
    fn default() -> Self {
        Self {
            host: true,
            headers: Vec::new(),
            params: QueryParams::default(),
        }
    }
}

impl DefaultKey {
    /// The default key: path, sorted query and host.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use cachefence::key::DefaultKey;
    /// let fence = fence.key(DefaultKey::new());
    /// # let _ = fence;
    /// # }
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the request's host is in the key (default on). Turn it off
    /// only when every host the app answers for gets the same responses.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use cachefence::key::DefaultKey;
    /// // Every host the app answers for serves the same pages.
    /// let fence = fence.key(DefaultKey::new().with_host(false));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn with_host(mut self, host: bool) -> Self {
        self.host = host;
        self
    }

    /// Puts the value of a request header in the key, for example the
    /// header that selects a tenant, or `Authorization` together with
    /// [`cache_authorized`](crate::FenceLayer::cache_authorized). The value
    /// enters the key as a SHA-256 digest, so credentials never appear in
    /// Redis key names. (Headers the *response* names in `Vary` are keyed
    /// automatically.)
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::FenceLayer) {
    /// use cachefence::key::DefaultKey;
    /// let tenant = http::HeaderName::from_static("x-tenant");
    /// let fence = fence.key(DefaultKey::new().with_header(tenant));
    /// # let _ = fence;
    /// # }
    /// ```
    #[must_use]
    pub fn with_header(mut self, name: HeaderName) -> Self {
        self.headers.push(name);
        self
    }

    /// Leaves these query parameters out of the key, for example tracking
    /// parameters that don't change the response: `/p?utm_source=x&id=1`
    /// and `/p?id=1` share an entry. A name ending in `*` matches every
    /// parameter starting with the rest (`utm_*`). Replaces an earlier
    /// [`only_query_params`](Self::only_query_params).
    ///
    /// ```
    /// use cachefence::key::{DefaultKey, MakeKey};
    ///
    /// let key = DefaultKey::new().ignore_query_params(["utm_*", "fbclid"]);
    /// let req = http::Request::get("/p?utm_source=mail&id=1&fbclid=x").body(()).unwrap();
    /// assert_eq!(key.make_key(&req.into_parts().0).as_deref(), Some("/p?id=1"));
    /// ```
    ///
    /// [`FenceHandle::invalidate_path`](crate::FenceHandle::invalidate_path)
    /// does not apply this filter: invalidate the path without the ignored
    /// parameters.
    #[must_use]
    pub fn ignore_query_params<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.params = QueryParams::Ignore(names.into_iter().map(Into::into).collect());
        self
    }

    /// Keys on these query parameters only (names as in
    /// [`ignore_query_params`](Self::ignore_query_params)); every other
    /// parameter is left out of the key. Replaces an earlier
    /// `ignore_query_params`.
    ///
    /// ```
    /// use cachefence::key::{DefaultKey, MakeKey};
    ///
    /// let key = DefaultKey::new().only_query_params(["page", "sort"]);
    /// let req = http::Request::get("/list?sort=asc&session=42&page=2").body(()).unwrap();
    /// assert_eq!(key.make_key(&req.into_parts().0).as_deref(), Some("/list?page=2&sort=asc"));
    /// ```
    #[must_use]
    pub fn only_query_params<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.params = QueryParams::Only(names.into_iter().map(Into::into).collect());
        self
    }
}

impl MakeKey for DefaultKey {
    fn make_key(&self, parts: &Parts) -> Option<String> {
        // The origin answers for the `Host` header; an absolute-form
        // target naming another host could file that answer under the
        // wrong host, so such requests are not cached.
        let host = match self.host {
            true => Some(request_host(parts).ok()?),
            false => None,
        };
        let (path, query) = (parts.uri.path(), self.params.keep(parts.uri.query()));
        let mut key = String::with_capacity(
            path.len()
                + query.as_deref().map_or(0, str::len)
                + host.as_ref().map_or(0, String::len)
                + 8,
        );
        push_path_and_query(&mut key, path, query.as_deref());
        if let Some(host) = host.filter(|h| !h.is_empty()) {
            key.push_str("\nhost:");
            key.push_str(&host);
        }
        for name in &self.headers {
            // A digest, not the value: keyed headers are often credentials,
            // and the key is readable in Redis key names.
            key.push('\n');
            key.push_str(name.as_str());
            key.push(':');
            key.push_str(&digest(&[&header_value(&parts.headers, name)]));
        }
        Some(key)
    }

    fn path_key(&self, path_and_query: &str) -> Option<String> {
        Some(normalize_user_path(path_and_query))
    }
}

/// The host a request is for, normalised by [`normalize_host`]: from the
/// `Host` header, else from the authority of an absolute-form target; empty
/// when there is neither. `Err` when both are present and name different
/// hosts.
pub(crate) fn request_host(parts: &Parts) -> Result<String, ()> {
    let scheme = parts.uri.scheme_str();
    let header = parts
        .headers
        .get(http::header::HOST)
        .map(|h| normalize_host(h.as_bytes(), scheme));
    let target = parts
        .uri
        .authority()
        .map(|a| normalize_host(a.as_str().as_bytes(), scheme));
    match (header, target) {
        (Some(h), Some(t)) if h != t => Err(()),
        (Some(h), _) => Ok(h),
        (None, Some(t)) => Ok(t),
        (None, None) => Ok(String::new()),
    }
}

/// A host as it enters keys and is compared with the allowed hosts:
/// lowercase, without a trailing dot, without an empty or default port (the
/// scheme's, or either of 80 and 443 when the scheme is unknown, as it is
/// for origin-form requests), any byte outside a safe set percent-encoded.
pub(crate) fn normalize_host(raw: &[u8], scheme: Option<&str>) -> String {
    let raw = raw.trim_ascii();
    // The usual host (`shop.example`): lowercase, no port, no trailing dot,
    // nothing to escape; it is its own normal form.
    if raw.last().is_some_and(|&b| b != b'.')
        && raw
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && let Ok(host) = std::str::from_utf8(raw)
    {
        return host.to_owned();
    }
    // Hosts come lowercase almost always: copy only when they don't.
    let raw: std::borrow::Cow<'_, [u8]> = if raw.iter().any(u8::is_ascii_uppercase) {
        raw.to_ascii_lowercase().into()
    } else {
        raw.into()
    };
    // `[v6]:port` or `name:port`; a colon inside brackets is not a port.
    let split = match raw.iter().rposition(|&b| b == b':') {
        Some(i) if !raw[i..].contains(&b']') => i,
        _ => raw.len(),
    };
    let (name, port) = raw.split_at(split);
    let port = port.strip_prefix(b":").unwrap_or(port);
    let name = match name.strip_suffix(b".") {
        Some(n) if !n.is_empty() => n,
        _ => name,
    };
    let port_num = std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse::<u16>().ok());
    let default = match (scheme, port_num) {
        (_, None) => port.is_empty(),
        (Some(s), Some(p)) if s.eq_ignore_ascii_case("http") => p == 80,
        (Some(s), Some(p)) if s.eq_ignore_ascii_case("https") => p == 443,
        (_, Some(p)) => p == 80 || p == 443,
    };
    let mut out = escape(name);
    if !default {
        out.push(':');
        match port_num {
            Some(p) => {
                let _ = write!(out, "{p}");
            }
            None => escape_into(&mut out, port),
        }
    }
    out
}

/// Which query parameters [`DefaultKey`] keys on.
#[derive(Debug, Clone, Default)]
enum QueryParams {
    #[default]
    All,
    Ignore(Vec<String>),
    Only(Vec<String>),
}

impl QueryParams {
    /// The part of `query` to key on.
    fn keep<'a>(&self, query: Option<&'a str>) -> Option<std::borrow::Cow<'a, str>> {
        let query = query?;
        let (names, keep_named) = match self {
            QueryParams::All => return Some(query.into()),
            QueryParams::Ignore(names) => (names, false),
            QueryParams::Only(names) => (names, true),
        };
        let named = |param: &str| {
            let name = param_name(param);
            names.iter().any(|n| match n.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == n,
            })
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| !p.is_empty() && named(p) == keep_named)
            .collect();
        Some(kept.join("&").into())
    }
}

/// The path and the query with parameters stably sorted by name.
pub(crate) fn normalize_path_and_query(path: &str, query: Option<&str>) -> String {
    let mut out = String::with_capacity(path.len() + query.map_or(0, str::len) + 1);
    push_path_and_query(&mut out, path, query);
    out
}

/// [`normalize_path_and_query`], appended to `out`.
fn push_path_and_query(out: &mut String, path: &str, query: Option<&str>) {
    out.push_str(if path.is_empty() { "/" } else { path });
    if let Some(query) = query {
        let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        if !params.is_empty() {
            params.sort_by(|a, b| param_name(a).cmp(param_name(b)));
            out.push('?');
            for (i, param) in params.iter().enumerate() {
                if i > 0 {
                    out.push('&');
                }
                out.push_str(param);
            }
        }
    }
}

/// Normalizes a user-given path (with an optional query) the way requests
/// are normalized by [`DefaultKey`].
pub(crate) fn normalize_user_path(path: &str) -> String {
    match path.split_once('?') {
        Some((path, query)) => normalize_path_and_query(path, Some(query)),
        None => normalize_path_and_query(path, None),
    }
}

fn param_name(param: &str) -> &str {
    param.split_once('=').map_or(param, |(name, _)| name)
}

/// All values of a header, joined by `", "`, as bytes.
pub(crate) fn header_value(headers: &HeaderMap, name: &HeaderName) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, value) in headers.get_all(name).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(value.as_bytes().trim_ascii());
    }
    out
}

/// A header value with the optional whitespace of lists and parameters
/// (RFC 9110 §5.6.1, §5.6.6) in one spelling, so that variants don't
/// multiply per spelling (RFC 9111 §4.1): empty list members dropped,
/// members joined by `", "`, no whitespace around `;` and `=`, runs of
/// whitespace one space; quoted strings are kept as they are.
pub(crate) fn without_list_whitespace(value: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(value.len());
    let (mut quoted, mut escaped, mut space) = (false, false, false);
    for &b in value {
        if quoted {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = false;
            }
            continue;
        }
        match b {
            b' ' | b'\t' => space = true,
            b',' => {
                while out.last() == Some(&b' ') {
                    out.pop();
                }
                if !out.is_empty() && !out.ends_with(b",") {
                    out.push(b',');
                }
                space = false;
            }
            b';' | b'=' => {
                while out.last() == Some(&b' ') {
                    out.pop();
                }
                out.push(b);
                space = false;
            }
            _ => {
                let after_separator = matches!(out.last(), Some(b';' | b'=') | None);
                if out.last() == Some(&b',') || (space && !after_separator) {
                    out.push(b' ');
                }
                space = false;
                if b == b'"' {
                    quoted = true;
                }
                out.push(b);
            }
        }
    }
    if out.last() == Some(&b',') {
        out.pop();
    }
    out
}

/// Percent-encodes every byte outside a conservative safe set. The safe set
/// has no glob character (`*?[]\`), no brace and no whitespace, so the
/// result can be put in a Redis key and a SCAN pattern as it is. The mapping
/// is byte by byte, so it keeps prefixes: a prefix of the input escapes to a
/// prefix of the output.
pub(crate) fn escape_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        let safe = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'/' | b'-'
                    | b'_'
                    | b'.'
                    | b'~'
                    | b'='
                    | b'&'
                    | b':'
                    | b'@'
                    | b','
                    | b';'
                    | b'+'
                    | b'!'
                    | b'$'
                    | b'\''
                    | b'('
                    | b')'
            );
        if safe {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
            out.push(char::from(HEX_UPPER[usize::from(b & 0xf)]));
        }
    }
}

pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    escape_into(&mut out, bytes);
    out
}

/// What every Redis key of a namespace starts with: the escaped namespace
/// and a `|`. Escaping encodes `|`, so the first raw `|` ends the namespace
/// and no namespace's keys can match another's patterns (`a|*` never
/// matches the keys of namespace `ab`).
pub(crate) fn namespace_prefix(namespace: &str) -> String {
    let mut out = escape(namespace.as_bytes());
    out.push('|');
    out
}

/// 128 bits of SHA-256 in hex.
pub(crate) fn digest(parts: &[&[u8]]) -> String {
    let mut out = String::with_capacity(32);
    digest_into(&mut out, parts);
    out
}

/// [`digest`], appended to `out`.
pub(crate) fn digest_into(out: &mut String, parts: &[&[u8]]) {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let hash = hasher.finalize();
    for &b in &hash[..16] {
        out.push(char::from(HEX_LOWER[usize::from(b >> 4)]));
        out.push(char::from(HEX_LOWER[usize::from(b & 0xf)]));
    }
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// The Redis names of one cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct EntryKey {
    /// The hash holding the entry, a Vary index, or a pass marker: the URL
    /// key for a key without dimensions, else `<url key>:v:<digest>`.
    pub(crate) primary: String,
}

impl EntryKey {
    /// The names of `key` in `namespace`: remembered for the hot keys of
    /// this thread ([`KeyMemo`]), derived (escaping, SHA-256) otherwise.
    pub(crate) fn new(namespace: &str, key: &str) -> Self {
        if namespace.len() + key.len() > KeyMemo::LONGEST {
            return Self::derive(namespace, key);
        }
        KEY_MEMO.with(|memo| {
            let mut memo = memo.borrow_mut();
            if let Some(primary) = memo.get(namespace, key) {
                return Self {
                    primary: primary.to_owned(),
                };
            }
            let derived = Self::derive(namespace, key);
            memo.put(namespace, key, &derived.primary);
            derived
        })
    }

    fn derive(namespace: &str, key: &str) -> Self {
        let url = key.split_once('\n').map_or(key, |(url, _)| url);
        let mut primary = url_key(namespace, url);
        if url.len() < key.len() {
            // A dimension of the URL (host, keyed header): a variant of it,
            // listed in the URL's variant set by the store script.
            primary.push_str(":v:");
            digest_into(&mut primary, &[namespace.as_bytes(), b"\n", key.as_bytes()]);
        }
        Self { primary }
    }

    /// The key of the variant selected by these `Vary` header values.
    pub(crate) fn variant(&self, vary: &[HeaderName], headers: &HeaderMap) -> String {
        let values: Vec<Vec<u8>> = vary
            .iter()
            .map(|n| without_list_whitespace(&header_value(headers, n)))
            .collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(vary.len() * 2);
        for (name, value) in vary.iter().zip(&values) {
            parts.push(name.as_str().as_bytes());
            parts.push(value);
        }
        format!("{}:v:{}", self.primary, digest(&parts))
    }

    /// The set listing the variants of this entry's URL.
    pub(crate) fn variants_set(&self) -> String {
        variants_set_of(&self.primary)
    }
}

thread_local! {
    static KEY_MEMO: std::cell::RefCell<KeyMemo> = std::cell::RefCell::new(KeyMemo::default());
}

/// The entry keys of the cache keys this thread derived last, in a small
/// direct-mapped table: a hot key's two SHA-256 digests and escaping are
/// done once, not on every hit. A slot holds the namespace and key it was
/// derived from, compared in full, so a collision is only a miss.
#[derive(Default)]
struct KeyMemo {
    slots: Vec<Option<(String, String, String)>>,
}

impl KeyMemo {
    const SLOTS: usize = 256;
    /// Longer keys (namespace and key together, in bytes) are derived
    /// every time: the table stays small.
    const LONGEST: usize = 512;

    fn slot(namespace: &str, key: &str) -> usize {
        // FNV-1a: cheap, and good enough to spread keys over the slots.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in namespace
            .as_bytes()
            .iter()
            .chain([0xffu8].iter())
            .chain(key.as_bytes())
        {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        (h % Self::SLOTS as u64) as usize
    }

    fn get(&self, namespace: &str, key: &str) -> Option<&str> {
        match self.slots.get(Self::slot(namespace, key))? {
            Some((ns, k, primary)) if ns == namespace && k == key => Some(primary),
            _ => None,
        }
    }

    fn put(&mut self, namespace: &str, key: &str, primary: &str) {
        if self.slots.is_empty() {
            self.slots.resize(Self::SLOTS, None);
        }
        let slot = &mut self.slots[Self::slot(namespace, key)];
        match slot {
            // Reuse the slot's strings.
            Some((ns, k, p)) => {
                for (to, from) in [(ns, namespace), (k, key), (p, primary)] {
                    to.clear();
                    to.push_str(from);
                }
            }
            None => *slot = Some((namespace.to_owned(), key.to_owned(), primary.to_owned())),
        }
    }
}

/// The Redis key of a URL (the part of a cache key before its first
/// newline): `<namespace>|<readable url>:{<digest>}`.
fn url_key(namespace: &str, url: &str) -> String {
    // Room for a dimension's or a variant's suffix too (`:v:<digest>`).
    let mut out = String::with_capacity(namespace.len() + READABLE_MAX.min(url.len() * 3) + 72);
    escape_into(&mut out, namespace.as_bytes());
    out.push('|');
    let start = out.len();
    escape_into(&mut out, url.as_bytes());
    if out.len() - start > READABLE_MAX {
        let mut readable = out.split_off(start);
        truncate_escaped(&mut readable, READABLE_MAX);
        out.push_str(&readable);
    }
    out.push_str(":{");
    digest_into(&mut out, &[namespace.as_bytes(), url.as_bytes()]);
    out.push('}');
    out
}

/// The URL key an entry key (primary, dimension, variant, lease) belongs
/// to: everything up to its hash tag's `}` (no other brace can come before
/// it: escaping encodes braces).
pub(crate) fn url_of(key: &str) -> &str {
    key.find('}').map_or(key, |end| &key[..=end])
}

/// The set listing every variant and dimension of the URL of the entry at
/// `primary` (itself, for a key without dimensions, is not listed).
pub(crate) fn variants_set_of(primary: &str) -> String {
    format!("{}:vars", url_of(primary))
}

/// The Redis keys of a tag: its index (a sorted set of primary keys scored
/// by expiry) and its fence (the Redis time of its last invalidation).
///
/// They start with `<namespace>|#tag:`; `#` is always escaped in entry keys,
/// so no entry key can look like a tag key.
pub(crate) fn tag_keys(namespace: &str, tag: &str) -> (String, String) {
    let mut index = namespace_prefix(namespace);
    index.push_str("#tag:");
    let mut readable = escape(tag.as_bytes());
    truncate_escaped(&mut readable, READABLE_MAX);
    index.push_str(&readable);
    index.push_str(":{");
    index.push_str(&digest(&[namespace.as_bytes(), b"#tag", tag.as_bytes()]));
    index.push('}');
    let fence = format!("{index}:fence");
    (index, fence)
}

/// What every tag marker of a tag starts with (Redis Cluster mode):
/// `<namespace>|#tagged:<escaped tag>:{`. The tag is escaped but never cut,
/// so the prefix names exactly one tag, and holds no glob character.
pub(crate) fn tag_marker_prefix(namespace: &str, tag: &str) -> String {
    let mut out = namespace_prefix(namespace);
    out.push_str("#tagged:");
    escape_into(&mut out, tag.as_bytes());
    out.push_str(":{");
    out
}

/// The tag marker of an entry (Redis Cluster mode): a string key holding
/// the entry's primary key, in the entry's hash slot (its hash tag is the
/// URL's digest), so the store script may write it next to the entry.
/// One marker per primary: `<prefix><url digest>}` followed by what the
/// primary holds after its hash tag (`:v:<digest of the whole key>` for a
/// host or other dimension of the URL, nothing for the URL itself), so the
/// stores of two hosts of one URL never share (and overwrite) a marker.
pub(crate) fn tag_marker(namespace: &str, tag: &str, primary: &str) -> String {
    let url = url_of(primary);
    let digest = url
        .rfind(":{")
        .map_or(url, |i| url[i + 2..].trim_end_matches('}'));
    let mut out = tag_marker_prefix(namespace, tag);
    out.push_str(digest);
    out.push('}');
    out.push_str(&primary[url.len()..]);
    out
}

/// The fill lease of an entry (primary or variant) key.
pub(crate) fn lease_of(key: &str) -> String {
    format!("{key}:lease")
}

/// Cuts an escaped string to at most `max` bytes without splitting a `%XX`.
pub(crate) fn truncate_escaped(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max;
    // A '%' in the last two kept bytes starts an escape that would be split.
    let bytes = s.as_bytes();
    for back in 1..=2 {
        if cut >= back && bytes[cut - back] == b'%' {
            cut -= back;
            break;
        }
    }
    s.truncate(cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_whitespace_has_one_spelling() {
        let w = |v: &str| String::from_utf8(without_list_whitespace(v.as_bytes())).unwrap();
        for v in [
            "a, b;q=1",
            "a,b;q=1",
            " a ,\tb ; q = 1 ",
            "a,, b;q=1,",
            "a,  b;q=1",
        ] {
            assert_eq!(w(v), "a, b;q=1", "{v:?}");
        }
        assert_eq!(w("x  y"), "x y");
        assert_eq!(w("\"a , b\", c"), "\"a , b\", c");
    }

    #[test]
    fn remembered_entry_keys_are_the_derived_ones() {
        let keys: Vec<String> = (0..2_000)
            .map(|i| format!("/p/{i}?a=1\nhost:h{}", i % 7))
            .chain([String::new(), "x".repeat(600)])
            .collect();
        for round in 0..3 {
            for (i, key) in keys.iter().enumerate() {
                let ns = if i % 2 == 0 { "a:" } else { "b:" };
                assert_eq!(
                    EntryKey::new(ns, key),
                    EntryKey::derive(ns, key),
                    "round {round}, {key:?}"
                );
            }
        }
        // The same key in two namespaces: two entries.
        assert_ne!(EntryKey::new("a:", "/k"), EntryKey::new("b:", "/k"));
    }

    fn parts(uri: &str) -> Parts {
        http::Request::get(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn query_parameters_are_sorted_stably_by_name() {
        let k = DefaultKey::new();
        assert_eq!(
            k.make_key(&parts("/p?b=2&a=1")),
            k.make_key(&parts("/p?a=1&b=2"))
        );
        assert_eq!(
            k.make_key(&parts("/p?t=2&a=0&t=1")).unwrap(),
            "/p?a=0&t=2&t=1"
        );
        assert_eq!(k.make_key(&parts("/p?&&")).unwrap(), "/p");
        assert_ne!(k.make_key(&parts("/p?a=1")), k.make_key(&parts("/p?a=2")));
    }

    #[test]
    fn redis_keys_never_hold_glob_or_brace_characters() {
        for raw in ["/a*b?c[d]\\e{f}%20 \r\u{e9}", "/a*b{c}\nhost:{x}*\n{y}"] {
            let key = EntryKey::new("ns{x}:", raw);
            let readable = &key.primary[..key.primary.find(":{").unwrap()];
            assert!(!readable.contains(['*', '?', '[', ']', '\\', '{', '}', ' ', '\r', '\n']));
            // One hash tag, and nothing after it a glob could match.
            assert_eq!(key.primary.matches('{').count(), 1, "{}", key.primary);
            assert_eq!(key.primary.matches('}').count(), 1, "{}", key.primary);
            let tail = &key.primary[key.primary.find('}').unwrap()..];
            assert!(
                tail.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"}:".contains(&b))
            );
        }
    }

    #[test]
    fn long_keys_are_capped_and_still_distinct() {
        let a = "/x".repeat(1000);
        let b = format!("{a}y");
        let (ka, kb) = (EntryKey::new("n:", &a), EntryKey::new("n:", &b));
        assert!(ka.primary.len() < READABLE_MAX + 40);
        assert_ne!(ka, kb);
    }

    #[test]
    fn escaping_keeps_prefixes() {
        let full = escape("/a b/*/c".as_bytes());
        let prefix = escape("/a b/*".as_bytes());
        assert!(full.starts_with(&prefix));
    }

    #[test]
    fn truncation_never_splits_an_escape() {
        let mut s = "ab%2F".to_owned();
        truncate_escaped(&mut s, 4);
        assert_eq!(s, "ab");
        let mut s = "ab%2Fc".to_owned();
        truncate_escaped(&mut s, 5);
        assert_eq!(s, "ab%2F");
    }

    #[test]
    fn tag_markers_share_the_entry_slot() {
        let ek = EntryKey::new("n:", "/a?b=1");
        let marker = tag_marker("n:", "x*y", &ek.primary);
        let slot_tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
        assert_eq!(slot_tag(&marker), slot_tag(&ek.primary));
        assert!(marker.starts_with(&tag_marker_prefix("n:", "x*y")));
        assert!(!tag_marker_prefix("n:", "x*y").contains('*'));
    }

    #[test]
    fn hosts_are_normalised_into_the_key() {
        let k = DefaultKey::new();
        let with = |host: &str| {
            let req = http::Request::get("/p").header("host", host).body(());
            k.make_key(&req.unwrap().into_parts().0).unwrap()
        };
        for same in [
            "a.example",
            "A.Example",
            "a.example.",
            "a.example:80",
            "a.example:443",
            " a.example:",
        ] {
            assert_eq!(with(same), "/p\nhost:a.example", "{same:?}");
        }
        // Taken as it is (no port, nothing to lowercase or escape).
        assert_eq!(with("a-1.b2.example"), "/p\nhost:a-1.b2.example");
        assert_eq!(with("a.example:8080"), "/p\nhost:a.example:8080");
        assert_eq!(with("[::1]:80"), "/p\nhost:%5B::1%5D");
        assert_eq!(with("[::1]"), "/p\nhost:%5B::1%5D");
        assert_ne!(with("a.example"), with("b.example"));
        // Absolute form: the scheme's own default port only.
        let abs = |uri: &str, host: &str| {
            let req = http::Request::get(uri).header("host", host).body(());
            k.make_key(&req.unwrap().into_parts().0)
        };
        assert_eq!(
            abs("http://a.example:80/p", "A.EXAMPLE").as_deref(),
            Some("/p\nhost:a.example")
        );
        assert_eq!(abs("http://a.example/p", "b.example"), None);
        assert_eq!(abs("http://a.example/p", "a.example:443"), None);
        // No host at all: the URL alone.
        assert_eq!(k.make_key(&parts("/p")).unwrap(), "/p");
    }

    #[test]
    fn key_dimensions_hang_off_their_url() {
        let url = EntryKey::new("n:", "/p?a=1");
        let a = EntryKey::new("n:", "/p?a=1\nhost:a.example");
        let b = EntryKey::new("n:", "/p?a=1\nhost:b.example");
        assert_ne!(a, b);
        assert_ne!(a, url);
        for k in [&a, &b] {
            assert!(k.primary.starts_with(&format!("{}:v:", url.primary)));
            assert_eq!(url_of(&k.primary), url.primary);
            assert_eq!(k.variants_set(), url.variants_set());
            // One marker per host, in the URL's slot.
            let marker = tag_marker("n:", "t", &k.primary);
            assert_ne!(marker, tag_marker("n:", "t", &url.primary));
            assert_eq!(url_of(&marker), tag_marker("n:", "t", &url.primary));
            assert!(marker.starts_with(&tag_marker_prefix("n:", "t")));
        }
        assert_ne!(
            tag_marker("n:", "t", &a.primary),
            tag_marker("n:", "t", &b.primary)
        );
        let v = a.variant(&[HeaderName::from_static("accept")], &HeaderMap::new());
        assert_eq!(variants_set_of(&v), url.variants_set());
    }

    #[test]
    fn namespaces_separate_equal_keys() {
        assert_ne!(EntryKey::new("a:", "/x"), EntryKey::new("b:", "/x"));
        // The length prefix in the digest keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(EntryKey::new("ab", "c"), EntryKey::new("a", "bc"));
    }
}
