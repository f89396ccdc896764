//! Invalidation by unsafe methods (RFC 9111 §4.4): after a non-error
//! response to a `POST`, `PUT`, `PATCH`, `DELETE` or any method not known to
//! be safe, the cached responses of the target URI and of a same-origin
//! `Location` / `Content-Location` are removed, fenced like every other
//! invalidation, before the response goes back to the client.

use http::header::{CONTENT_LOCATION, HOST, LOCATION};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use redis::aio::ConnectionLike;
use url::Url;

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
    /// names this request's origin: the value is resolved against the
    /// target URI (RFC 3986 §5, by the `url` crate: relative references,
    /// dot segments, network-path references), then its scheme, host and
    /// port must be the request's, default ports included (`http://h:80/x`
    /// is `Host: h`). When the request's scheme is not known (an
    /// origin-form target), an `http` or `https` value is compared with the
    /// `Host` under its own scheme.
    fn same_origin_path(&self, value: &[u8]) -> Option<PathAndQuery> {
        let value = std::str::from_utf8(value).ok()?.trim();
        if value.is_empty() {
            return None;
        }
        let host = match self.headers.get(HOST) {
            Some(host) => host.to_str().ok()?,
            None => self.uri.authority()?.as_str(),
        };
        let known = self.uri.scheme_str();
        let target = self.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let base = Url::parse(&format!("{}://{host}{target}", known.unwrap_or("http"))).ok()?;
        let resolved = base.join(value).ok()?;
        let ours = match known {
            Some(_) => base,
            None if matches!(resolved.scheme(), "http" | "https") => {
                Url::parse(&format!("{}://{host}/", resolved.scheme())).ok()?
            }
            None => return None,
        };
        if resolved.scheme() != ours.scheme()
            || resolved.host() != ours.host()
            || resolved.port_or_known_default() != ours.port_or_known_default()
        {
            return None;
        }
        let mut out = resolved.path().to_owned();
        if let Some(query) = resolved.query() {
            out.push('?');
            out.push_str(query);
        }
        PathAndQuery::try_from(out).ok()
    }
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
        assert_eq!(p("http://shop.example:8080/../x").as_deref(), Some("/x"));
        assert_eq!(p("https://evil.example/x"), None);
        assert_eq!(p("//evil.example/x"), None);
        assert_eq!(p("mailto:a@b"), None);
        assert_eq!(p(""), None);
        // A space a browser would encode, encoded.
        assert_eq!(p("/bad path").as_deref(), Some("/bad%20path"));
    }

    #[test]
    fn default_ports_name_the_same_origin() {
        let t = targets("/a", "shop.example");
        let p = |v: &str| t.same_origin_path(v.as_bytes()).map(|p| p.to_string());
        assert_eq!(p("http://shop.example:80/x").as_deref(), Some("/x"));
        assert_eq!(p("https://shop.example:443/y").as_deref(), Some("/y"));
        assert_eq!(p("http://shop.example:443/z"), None);
        assert_eq!(p("http://shop.example:8080/z"), None);
        let t = targets("/a", "shop.example:80");
        let p = |v: &str| t.same_origin_path(v.as_bytes()).map(|p| p.to_string());
        assert_eq!(p("http://shop.example/x").as_deref(), Some("/x"));
        // With the scheme known (an absolute-form target), only that one.
        let t = targets("https://shop.example/a", "shop.example");
        let p = |v: &str| t.same_origin_path(v.as_bytes()).map(|p| p.to_string());
        assert_eq!(p("https://shop.example:443/x").as_deref(), Some("/x"));
        assert_eq!(p("http://shop.example/x"), None);
    }
}
