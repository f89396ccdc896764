//! Invalidation by unsafe methods (RFC 9111 §4.4): after a non-error
//! response to a `POST`, `PUT`, `PATCH`, `DELETE` or any method not known to
//! be safe, the cached responses of the target URI and of a same-origin
//! `Location` / `Content-Location` are removed, fenced like every other
//! invalidation, before the response goes back to the client.

use http::header::{CONTENT_LOCATION, HOST, LOCATION};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use redis::aio::ConnectionLike;

use crate::config::Config;
use crate::handle::FenceHandle;

/// Whether a response to `method` invalidates: every method except the safe
/// ones (RFC 9110 §9.2.1 and the WebDAV / `QUERY` methods defined safe) and
/// `CONNECT`, which targets no cached URI.
pub(crate) fn invalidates(method: &Method) -> bool {
    !matches!(
        method.as_str(),
        "GET"
            | "HEAD"
            | "OPTIONS"
            | "TRACE"
            | "CONNECT"
            | "PROPFIND"
            | "REPORT"
            | "SEARCH"
            | "QUERY"
    )
}

/// What an unsafe request needs to invalidate once its response is known.
#[derive(Debug)]
pub(crate) struct Targets {
    uri: Uri,
    headers: HeaderMap,
}

impl Targets {
    pub(crate) fn of(uri: &Uri, headers: &HeaderMap) -> Self {
        Self {
            uri: uri.clone(),
            headers: headers.clone(),
        }
    }

    /// Invalidates the target URI and the same-origin `Location` and
    /// `Content-Location` of `response_headers`, if `status` is not an
    /// error. A Redis failure is logged: the response goes out regardless.
    pub(crate) async fn invalidate<C>(
        self,
        status: StatusCode,
        response_headers: &HeaderMap,
        handle: &FenceHandle<C>,
        config: &Config,
    ) where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        if !(status.is_success() || status.is_redirection()) {
            return;
        }
        let mut keys: Vec<String> = Vec::with_capacity(3);
        let mut add = |path: Option<PathAndQuery>| {
            if let Some(key) = path.and_then(|p| self.key_of(p, config))
                && !keys.contains(&key)
            {
                keys.push(key);
            }
        };
        add(self.uri.path_and_query().cloned());
        for name in [LOCATION, CONTENT_LOCATION] {
            for value in response_headers.get_all(name) {
                add(self.same_origin_path(value.as_bytes()));
            }
        }
        for key in keys {
            match handle.invalidate_key(&key).await {
                Ok(removed) => {
                    tracing::debug!(key = %crate::trace::redact(&key), removed, "invalidated after an unsafe method")
                }
                Err(err) => {
                    tracing::warn!(error = %err, key = %crate::trace::redact(&key), "invalidation after an unsafe method failed")
                }
            }
        }
    }

    /// The cache key a GET of `path` with this request's headers would have.
    fn key_of(&self, path: PathAndQuery, config: &Config) -> Option<String> {
        let mut get = Request::get(Uri::from(path)).body(()).ok()?;
        *get.headers_mut() = self.headers.clone();
        config.cache_key(&get.into_parts().0)
    }

    /// The path and query of a `Location` / `Content-Location` value if it
    /// names this request's origin: an absolute path, a relative reference
    /// (resolved against the target), or an absolute URI whose authority is
    /// the request's host (and whose scheme is the request's, when known).
    fn same_origin_path(&self, value: &[u8]) -> Option<PathAndQuery> {
        let value = std::str::from_utf8(value).ok()?.trim();
        // The fragment is not part of the resource.
        let value = value.split('#').next()?;
        if value.is_empty() {
            return None;
        }
        if value.starts_with("//") || value.contains("://") {
            let full = if value.starts_with("//") {
                format!("http:{value}")
            } else {
                value.to_owned()
            };
            let uri = Uri::try_from(full).ok()?;
            let authority = uri.authority()?;
            let host = self
                .headers
                .get(HOST)
                .map(|h| h.as_bytes())
                .or_else(|| self.uri.authority().map(|a| a.as_str().as_bytes()))?;
            if !authority.as_str().as_bytes().eq_ignore_ascii_case(host) {
                return None;
            }
            if value.contains("://")
                && let (Some(theirs), Some(ours)) = (uri.scheme(), self.uri.scheme())
                && theirs != ours
            {
                return None;
            }
            return uri.path_and_query().cloned();
        }
        if value.contains(':') && !value.starts_with('/') {
            // Another scheme (`mailto:`, `urn:`, ...), or a relative
            // reference we would have to guess at.
            let before = value.split(['/', '?']).next().unwrap_or(value);
            if before.contains(':') {
                return None;
            }
        }
        let joined = if value.starts_with('/') {
            value.to_owned()
        } else {
            let base = self.uri.path();
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("/{}{value}", dir.trim_start_matches('/'))
        };
        let (path, query) = match joined.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (joined.as_str(), None),
        };
        let mut out = remove_dot_segments(path);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        PathAndQuery::try_from(out).ok()
    }
}

/// RFC 3986 §5.2.4 for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(uri: &str, host: &str) -> Targets {
        let req = Request::post(uri).header(HOST, host).body(()).unwrap();
        Targets::of(req.uri(), req.headers())
    }

    #[test]
    fn only_unsafe_and_unknown_methods_invalidate() {
        for m in ["POST", "PUT", "PATCH", "DELETE", "FROB", "MKCOL"] {
            assert!(
                invalidates(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"] {
            assert!(
                !invalidates(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
    }

    #[test]
    fn locations_are_resolved_and_other_origins_ignored() {
        let t = targets("/a/b/c?x=1", "shop.example:8080");
        let p = |v: &str| t.same_origin_path(v.as_bytes()).map(|p| p.to_string());
        assert_eq!(p("/items/1").as_deref(), Some("/items/1"));
        assert_eq!(p("d?y=2#frag").as_deref(), Some("/a/b/d?y=2"));
        assert_eq!(p("../d").as_deref(), Some("/a/d"));
        assert_eq!(p("../../../../d").as_deref(), Some("/d"));
        assert_eq!(p("./").as_deref(), Some("/a/b/"));
        assert_eq!(p("http://SHOP.example:8080/x?q").as_deref(), Some("/x?q"));
        assert_eq!(p("//shop.example:8080/y").as_deref(), Some("/y"));
        assert_eq!(p("http://shop.example/x"), None);
        assert_eq!(p("https://evil.example/x"), None);
        assert_eq!(p("//evil.example/x"), None);
        assert_eq!(p("mailto:a@b"), None);
        assert_eq!(p(""), None);
        assert_eq!(p("/bad path"), None);
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(remove_dot_segments("/a/./b/../c"), "/a/c");
        assert_eq!(remove_dot_segments("/a/b/.."), "/a/");
        assert_eq!(remove_dot_segments("/.."), "/");
        assert_eq!(remove_dot_segments("/"), "/");
    }
}
