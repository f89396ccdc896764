//! [`PurgeService`]: invalidation over HTTP, behind the application's own
//! authorisation check.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use redis::aio::ConnectionLike;
use tower_service::Service;

use crate::handle::{FenceHandle, Invalidation};

/// A tower service answering purge calls for one cache namespace, made by
/// [`FenceHandle::purge_service`].
///
/// A purge is a `POST` (or `PURGE`) whose query names exactly one target:
///
/// | query | removes |
/// |---|---|
/// | `?path=/products/42` | every variant of a URL ([`FenceHandle::invalidate_path`]) |
/// | `?prefix=/products/` | every entry under a key prefix ([`FenceHandle::invalidate_prefix`]) |
/// | `?tag=product:42` | every entry carrying a tag ([`FenceHandle::invalidate_tag`]) |
/// | `?key=...` | the entry of a cache key ([`FenceHandle::invalidate_key`]) |
/// | `?all` | the whole namespace ([`FenceHandle::invalidate_all`]) |
///
/// Add `&soft` (or `&soft=true`) to mark entries stale instead of removing
/// them (not with `all`). Values are percent-decoded.
///
/// Answers: `200` with `{"removed":N}`; `403` when the authorisation check
/// refuses the request (checked first, before anything else is looked at);
/// `405` for other methods; `400` with a one-line reason for a missing,
/// repeated, empty or unknown parameter; `503` when Redis fails (the
/// invalidation may be retried: applying one twice is harmless). The
/// request body is ignored.
///
/// # Example
///
/// The type written out (a field of an admin app's state, a function's
/// return type): with a plain function as the check, `A` is a function
/// pointer. Called here without a server, as a test of the admin route
/// would:
///
/// ```no_run
/// use cachefence::FenceHandle;
/// use cachefence::purge::PurgeService;
/// use http::request::Parts;
/// use redis::aio::ConnectionManager;
/// use tower::ServiceExt;
///
/// fn is_admin(parts: &Parts) -> bool {
///     parts.headers.get("x-admin-token").is_some_and(|v| v == "s3cret")
/// }
///
/// fn purge_of(handle: &FenceHandle) -> PurgeService<ConnectionManager, fn(&Parts) -> bool> {
///     handle.purge_service(is_admin as fn(&Parts) -> bool)
/// }
///
/// # async fn doc(handle: FenceHandle) -> Result<(), Box<dyn std::error::Error>> {
/// let request = http::Request::post("/admin/purge?tag=product:42")
///     .header("x-admin-token", "s3cret")
///     .body(())?;
/// let response = purge_of(&handle).oneshot(request).await?;
/// // 200 `{"removed":N}`, or 503 when Redis failed.
/// println!("{}", response.status());
/// # Ok(())
/// # }
/// ```
pub struct PurgeService<C, A> {
    handle: FenceHandle<C>,
    authorize: A,
}

impl<C, A: Clone> Clone for PurgeService<C, A> {
    fn clone(&self) -> Self {
        Self {
            handle: self.handle.clone(),
            authorize: self.authorize.clone(),
        }
    }
}

impl<C, A> fmt::Debug for PurgeService<C, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PurgeService")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl<C> FenceHandle<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A tower service answering HTTP purge calls (see [`PurgeService`]) for
    /// which `authorize` returns true. Mount it on an admin route.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use axum::Router;
    /// use axum::routing::get;
    /// use cachefence::FenceCache;
    ///
    /// # async fn doc(cache: FenceCache) {
    /// let token = std::env::var("PURGE_TOKEN").expect("a purge token");
    /// let expected = format!("Bearer {token}");
    /// let purge = cache.handle().purge_service(move |parts: &http::request::Parts| {
    ///     parts.headers.get("authorization").is_some_and(|v| v.as_bytes() == expected.as_bytes())
    /// });
    /// let app: Router = Router::new()
    ///     .route("/products/{id}", get(|| async { "a product" }).layer(cache.layer()))
    ///     .route_service("/admin/purge", purge);
    /// // curl -X POST -H "authorization: Bearer $PURGE_TOKEN" 'http://host/admin/purge?tag=product:42'
    /// # }
    /// ```
    pub fn purge_service<A>(&self, authorize: A) -> PurgeService<C, A>
    where
        A: Fn(&http::request::Parts) -> bool + Clone + Send + Sync + 'static,
    {
        PurgeService {
            handle: self.clone(),
            authorize,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<C, A, B> Service<Request<B>> for PurgeService<C, A>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
    A: Fn(&http::request::Parts) -> bool + Clone + Send + Sync + 'static,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, _body) = req.into_parts();
        if !(self.authorize)(&parts) {
            tracing::info!(
                path = parts.uri.path(),
                "purge refused by the authorisation check"
            );
            return ready(reply(StatusCode::FORBIDDEN, "not authorised to purge"));
        }
        if parts.method != Method::POST && parts.method.as_str() != "PURGE" {
            let mut res = reply(StatusCode::METHOD_NOT_ALLOWED, "use POST or PURGE");
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST, PURGE"));
            return ready(res);
        }
        let invalidation = match parse(parts.uri.query().unwrap_or("")) {
            Ok(invalidation) => invalidation,
            Err(reason) => return ready(reply(StatusCode::BAD_REQUEST, &reason)),
        };
        let handle = self.handle.clone();
        Box::pin(async move {
            Ok(match handle.apply(&invalidation).await {
                Ok(removed) => {
                    tracing::info!(invalidation = %invalidation.encode(), removed, "purged");
                    let mut res = Response::new(Full::new(Bytes::from(format!(
                        "{{\"removed\":{removed}}}\n"
                    ))));
                    res.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    res
                }
                Err(err) => {
                    tracing::warn!(error = %err, "purge failed");
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("purge failed, retry: {err}"),
                    )
                }
            })
        })
    }
}

fn ready(res: Response<Full<Bytes>>) -> BoxFuture<Result<Response<Full<Bytes>>, Infallible>> {
    Box::pin(std::future::ready(Ok(res)))
}

/// A plain-text answer.
fn reply(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// The invalidation a purge query names, or why it names none.
fn parse(query: &str) -> Result<Invalidation, String> {
    let mut target: Option<Invalidation> = None;
    let mut soft = false;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let found = match name.as_ref() {
            "soft" => {
                soft = match value.as_ref() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("soft must be true or false, not {value:?}")),
                };
                continue;
            }
            "all" => match value.as_ref() {
                "" | "true" | "1" => Invalidation::all(),
                _ => return Err("all takes no value".into()),
            },
            kind @ ("path" | "prefix" | "tag" | "key") => {
                if value.is_empty() {
                    return Err(format!("{kind} must not be empty"));
                }
                let value = value.into_owned();
                match kind {
                    "path" => Invalidation::path(value),
                    "prefix" => Invalidation::prefix(value),
                    "tag" => Invalidation::tag(value),
                    _ => Invalidation::key(value),
                }
            }
            other => return Err(format!("unknown parameter {other:?}")),
        };
        if target.replace(found).is_some() {
            return Err("name exactly one of path, prefix, tag, key, all".into());
        }
    }
    let target = target.ok_or_else(|| "name one of path, prefix, tag, key, all".to_owned())?;
    if !soft {
        return Ok(target);
    }
    if target == Invalidation::all() {
        return Err("all can't be soft".into());
    }
    Ok(target.soft())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_queries_parse_or_say_why_not() {
        assert_eq!(parse("path=/p%3Fa%3D1"), Ok(Invalidation::path("/p?a=1")));
        assert_eq!(parse("tag=t&soft"), Ok(Invalidation::tag("t").soft()));
        assert_eq!(
            parse("soft=false&prefix=/a/"),
            Ok(Invalidation::prefix("/a/"))
        );
        assert_eq!(parse("all"), Ok(Invalidation::all()));
        for bad in [
            "",
            "path=",
            "path=/a&tag=b",
            "all&soft",
            "soft",
            "x=1",
            "all=no",
            "soft=maybe&tag=t",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
