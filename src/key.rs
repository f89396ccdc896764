//! Cache keys: how a request is named in Redis.
//!
//! A request's *key* is a string chosen by a [`MakeKey`] (by default the path
//! and the query with its parameters sorted). In Redis an entry lives at
//!
//! ```text
//! <namespace>|<readable key>:{<digest>}
//! ```
//!
//! where the namespace is escaped like the key (so the first raw `|` ends
//! it), the readable key is the key with every byte outside a safe set
//! percent-encoded (so no glob character, brace or control byte ever reaches
//! Redis) and cut to [`READABLE_MAX`] bytes, and the digest is the first 128
//! bits of SHA-256 over the namespace and the whole key. The braces make the
//! digest the Redis Cluster hash tag, so an entry, its variants, its lease and
//! its variant set share one slot and one Lua script may touch them all.

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
/// use cachefence::MakeKey;
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
    fn make_key(&self, parts: &Parts) -> Option<String>;
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
/// sorted by name, so `?a=1&b=2` and `?b=2&a=1` share an entry.
///
/// Parameters with the same name keep their order (`?t=2&t=1` differs from
/// `?t=1&t=2`); empty parameters (`?&a=1`) are dropped. The host is not part
/// of the key unless [`DefaultKey::with_host`] says so: behind a proxy that
/// serves several hosts, turn it on.
///
/// # Example
///
/// ```
/// use cachefence::{DefaultKey, MakeKey};
///
/// let req = http::Request::get("/p?b=2&a=1").body(()).unwrap();
/// let (parts, _) = req.into_parts();
/// assert_eq!(DefaultKey::new().make_key(&parts).as_deref(), Some("/p?a=1&b=2"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct DefaultKey {
    host: bool,
    headers: Vec<HeaderName>,
    params: QueryParams,
}

impl DefaultKey {
    /// The default key: path and sorted query.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the request's `Host` (or the URI authority) in the key.
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
    /// use cachefence::{DefaultKey, MakeKey};
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
    /// use cachefence::{DefaultKey, MakeKey};
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
        let mut key = String::new();
        if self.host {
            // The origin answers for the `Host` header; an absolute-form
            // target naming another host could file that answer under the
            // wrong host, so such requests are not cached.
            let header = parts.headers.get(http::header::HOST).map(|h| h.as_bytes());
            let target = parts.uri.authority().map(|a| a.as_str().as_bytes());
            let host = match (header, target) {
                (Some(h), Some(t)) if !h.eq_ignore_ascii_case(t) => return None,
                (Some(h), _) => h,
                (None, Some(t)) => t,
                (None, None) => &[],
            };
            key.push_str("//");
            escape_into(&mut key, &host.to_ascii_lowercase());
        }
        key.push_str(&normalize_path_and_query(
            parts.uri.path(),
            self.params.keep(parts.uri.query()).as_deref(),
        ));
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
    out.push_str(if path.is_empty() { "/" } else { path });
    if let Some(query) = query {
        let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        if !params.is_empty() {
            params.sort_by(|a, b| param_name(a).cmp(param_name(b)));
            out.push('?');
            out.push_str(&params.join("&"));
        }
    }
    out
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
            let _ = write!(out, "%{b:02X}");
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
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let hash = hasher.finalize();
    let mut out = String::with_capacity(32);
    for b in &hash[..16] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The Redis names of one cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct EntryKey {
    /// The hash holding the entry, a Vary index, or a pass marker.
    pub(crate) primary: String,
}

impl EntryKey {
    pub(crate) fn new(namespace: &str, key: &str) -> Self {
        let mut primary = String::with_capacity(namespace.len() + READABLE_MAX + 36);
        primary.push_str(&namespace_prefix(namespace));
        let mut readable = escape(key.as_bytes());
        truncate_escaped(&mut readable, READABLE_MAX);
        primary.push_str(&readable);
        primary.push_str(":{");
        primary.push_str(&digest(&[namespace.as_bytes(), key.as_bytes()]));
        primary.push('}');
        Self { primary }
    }

    /// The key of the variant selected by these `Vary` header values.
    pub(crate) fn variant(&self, vary: &[HeaderName], headers: &HeaderMap) -> String {
        let values: Vec<Vec<u8>> = vary.iter().map(|n| header_value(headers, n)).collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(vary.len() * 2);
        for (name, value) in vary.iter().zip(&values) {
            parts.push(name.as_str().as_bytes());
            parts.push(value);
        }
        format!("{}:v:{}", self.primary, digest(&parts))
    }

    /// The set listing this entry's variants.
    pub(crate) fn variants_set(&self) -> String {
        variants_set_of(&self.primary)
    }
}

/// The set listing the variants of the entry at `primary`.
pub(crate) fn variants_set_of(primary: &str) -> String {
    format!("{primary}:vars")
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
/// entry's digest), so the store script may write it next to the entry.
pub(crate) fn tag_marker(namespace: &str, tag: &str, primary: &str) -> String {
    let digest = primary
        .rfind(":{")
        .map_or(primary, |i| primary[i + 2..].trim_end_matches('}'));
    let mut out = tag_marker_prefix(namespace, tag);
    out.push_str(digest);
    out.push('}');
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
        let key = EntryKey::new("ns{x}:", "/a*b?c[d]\\e{f}%20 \r\n\u{e9}");
        let readable = &key.primary[..key.primary.rfind(":{").unwrap()];
        assert!(!readable.contains(['*', '?', '[', ']', '\\', '{', '}', ' ', '\r', '\n']));
        assert!(key.primary.ends_with('}'));
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
    fn namespaces_separate_equal_keys() {
        assert_ne!(EntryKey::new("a:", "/x"), EntryKey::new("b:", "/x"));
        // The length prefix in the digest keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(EntryKey::new("ab", "c"), EntryKey::new("a", "bc"));
    }
}
