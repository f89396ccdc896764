//! [`Fence`]: the service, and the request path of ARCHITECTURE.md.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use redis::aio::ConnectionLike;
use tokio::sync::oneshot;
use tower_service::Service;
use tracing::Instrument;

use crate::bounds::{CacheBody, Conn, Inner};

use crate::body::FenceBody;
use crate::cache_status;
use crate::conditional::{self, Conditions};
use crate::config::{Config, OnWaitTimeout};
use crate::entry::{Entry, Record, now_ms};
use crate::error::FenceError;
use crate::fill::{self, Deadlines, Job, Mode};
use crate::flight::{CacheStatus, Joined, Outcome, Since};
use crate::key::{EntryKey, header_value};
use crate::policy::RequestRule;
use crate::response::{
    finish_cache_status, from_entry, from_owned_entry, origin, outgoing, plain_response, status_of,
};
use crate::shared::{Ctx, Shared};
use crate::stats::Counters;
use crate::store::Store;
use crate::unsafe_methods;
use crate::xfetch;

/// The service made by [`FenceLayer`](crate::FenceLayer): caches the inner
/// service's responses in Redis.
///
/// See the [crate documentation](crate) for the request path.
///
/// ```no_run
/// # fn doc(cache: cachefence::FenceCache) {
/// use tower::Layer;
/// let inner = tower::service_fn(|_req: http::Request<String>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
/// });
/// let fence: cachefence::Fence<_> = cache.layer().layer(inner);
/// # let _ = fence;
/// # }
/// ```
pub struct Fence<S, C = redis::aio::ConnectionManager> {
    inner: S,
    config: Arc<Config>,
    shared: Arc<Shared<C>>,
}

impl<S: Clone, C> Clone for Fence<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Fence<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fence")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, C> Fence<S, C> {
    pub(crate) fn new(inner: S, config: Arc<Config>, shared: Arc<Shared<C>>) -> Self {
        Self {
            inner,
            config,
            shared,
        }
    }

    /// The inner service.
    ///
    /// ```no_run
    /// # fn doc(fence: cachefence::Fence<tower::util::BoxCloneService<http::Request<String>, http::Response<String>, std::convert::Infallible>>) {
    /// let inner = fence.get_ref();
    /// # let _ = inner;
    /// # }
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pin_project! {
    /// What [`Fence::call`](tower_service::Service::call) returns: resolves to
    /// the response, `Response<FenceBody<B>>`, or the inner service's error.
    ///
    /// # Example
    ///
    /// Calling a fenced service by hand, as a server loop of one's own would:
    ///
    /// ```no_run
    /// use std::convert::Infallible;
    ///
    /// use cachefence::{Fence, FenceBody, ResponseFuture};
    /// use tower::Service;
    /// use tower::util::BoxCloneService;
    ///
    /// type Origin = BoxCloneService<http::Request<String>, http::Response<String>, Infallible>;
    ///
    /// async fn get(
    ///     fence: &mut Fence<Origin>,
    ///     request: http::Request<String>,
    /// ) -> Result<http::Response<FenceBody<String>>, Infallible> {
    ///     std::future::poll_fn(|cx| fence.poll_ready(cx)).await?;
    ///     let future: ResponseFuture<_, String, Infallible> = fence.call(request);
    ///     future.await
    /// }
    /// ```
    pub struct ResponseFuture<F, B: Body, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B: Body, E> {
        // The request is not cacheable: the inner future, untouched.
        Bypass {
            #[pin]
            future: F,
            config: Arc<Config>,
        },
        // The cache path. It awaits Redis, so it is an `async` block; boxing
        // it costs one allocation per cacheable request and keeps this
        // state machine readable.
        Cached {
            future: BoxFuture<Result<Response<FenceBody<B>>, E>>,
        },
    }
}

impl<F, B: Body, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<FenceBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Bypass { future, config } => {
                let res = ready!(future.poll(cx))?;
                let mut res = res.map(FenceBody::inner);
                outgoing(config, res.headers_mut(), CacheStatus::Bypass);
                finish_cache_status(config, &mut res);
                Poll::Ready(Ok(res))
            }
            StateProj::Cached { future } => future.as_mut().poll(cx),
        }
    }
}

impl<S, C, ReqB, ResB> Service<Request<ReqB>> for Fence<S, C>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Send + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    type Response = Response<FenceBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Take the service that was driven to readiness and leave a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (mut parts, body) = req.into_parts();
        self.config.policy.unkeyed.strip(&mut parts.headers);
        if self.config.invalidate_unsafe && unsafe_methods::invalidates(&parts.method) {
            Counters::inc(&self.config.counters.bypasses);
            let future = invalidating(
                self.config.clone(),
                self.shared.clone(),
                inner,
                Request::from_parts(parts, body),
            );
            return ResponseFuture {
                state: State::Cached {
                    future: Box::pin(future),
                },
            };
        }
        let rule = self.config.policy.request(&parts);
        if matches!(rule, RequestRule::Lookup { .. }) {
            // Before keying: the origin is asked with the normalised values.
            self.config
                .normalizers
                .apply(&mut parts.headers, self.config.policy.rfc9111);
        }
        let closing = self
            .shared
            .closing
            .load(std::sync::atomic::Ordering::Relaxed);
        let key = match rule {
            // `If-Match` / `If-Unmodified-Since` are the origin's to evaluate.
            RequestRule::Lookup { .. } if !closing && !conditional::origin_only(&parts.headers) => {
                self.config.cache_key(&parts)
            }
            _ => None,
        };
        // With the breaker open, Redis is skipped; requests for one key still
        // share one origin call in this process.
        let offline = self.shared.store.breaker().is_open();
        let (Some(key), RequestRule::Lookup { head, refresh }) = (key, rule) else {
            Counters::inc(&self.config.counters.bypasses);
            if let RequestRule::Bypass(reason) = rule {
                tracing::trace!(reason, "bypassing the cache");
            }
            return ResponseFuture {
                state: State::Bypass {
                    future: inner.call(Request::from_parts(parts, body)),
                    config: self.config.clone(),
                },
            };
        };
        let ctx = Ctx {
            config: self.config.clone(),
            shared: self.shared.clone(),
        };
        // The path only: a query or header value may be personal data.
        let span = tracing::debug_span!(
            "cachefence.request",
            route = %self.config.name,
            method = %parts.method,
            path = parts.uri.path(),
            cache = tracing::field::Empty,
        );
        // Each request answers its own condition or range from the full
        // response (fills ask the origin without them).
        let conditions = Conditions::of(&parts);
        let req = Request::from_parts(parts, body);
        let config = self.config.clone();
        // The path's future is made inside the box, not moved into it.
        let future: BoxFuture<_> = Box::pin(async move {
            let serving = serve(ctx, inner, req, key, head, refresh, offline);
            let mut res = if span.is_disabled() {
                serving.await?
            } else {
                serving.instrument(span.clone()).await?
            };
            if !span.is_disabled() {
                span.record("cache", status_of(&config, &res));
            }
            finish_cache_status(&config, &mut res);
            Ok(match conditions {
                Some(conditions) => conditions.answer(res, config.status_header.as_ref()),
                None => res,
            })
        });
        ResponseFuture {
            state: State::Cached { future },
        }
    }
}

/// An unsafe request: passed through, then its target URI and same-origin
/// `Location` / `Content-Location` are invalidated unless it failed (RFC
/// 9111 §4.4), before the response goes back to the client.
async fn invalidating<S, C, ReqB, ResB>(
    config: Arc<Config>,
    shared: Arc<Shared<C>>,
    mut svc: S,
    req: Request<ReqB>,
) -> Result<Response<FenceBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body,
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let targets = unsafe_methods::Targets::of(req.uri(), req.headers());
    let res = svc.call(req).await?;
    let handle = crate::FenceHandle::new(shared, (*config).clone());
    targets
        .invalidate(res.status(), res.headers(), &handle, &config)
        .await;
    let mut res = res.map(FenceBody::inner);
    outgoing(&config, res.headers_mut(), CacheStatus::Bypass);
    finish_cache_status(&config, &mut res);
    Ok(res)
}

/// Lookups that find a fill restarted (by an invalidation) or a response
/// made for other `Vary` values try again at most this often.
const MAX_ATTEMPTS: usize = 3;

async fn serve<S, C, ReqB, ResB>(
    ctx: Ctx<C>,
    svc: S,
    req: Request<ReqB>,
    key: String,
    head: bool,
    refresh: bool,
    mut offline: bool,
) -> Result<Response<FenceBody<ResB>>, S::Error>
where
    S: Inner<ReqB, ResB> + Clone,
    ReqB: Send + 'static,
    ResB: CacheBody,
    C: Conn,
{
    let Ctx { config, shared } = &ctx;
    let counters = &config.counters;
    let ek = EntryKey::new(&config.namespace, &key);
    let deadlines = Deadlines::new(config);
    // A fill's answer not vouched for by Redis is taken only if it was
    // asked for after this request came, a stored one only if it was
    // stored after this request's lookup found nothing (see `Since`).
    let arrived = std::time::Instant::now();
    let mut looked = None;
    // The flight whose answer this request could not take.
    let mut passed = None;
    // The newest stale copy a lookup of this request found, for the end of
    // its cap.
    let mut fallback: Option<Arc<Entry>> = None;
    // The near cache serves fresh hits only (a refetch goes to Redis).
    let near = shared.near().filter(|_| !refresh);
    for attempt in 0..MAX_ATTEMPTS {
        let now = shared.store.now_ms();
        if let Some(entry) = near.and_then(|near| near.get(&ek.primary, now)) {
            let hit = near_hit(
                &ctx,
                svc,
                req,
                &ek,
                &ek.primary,
                &key,
                &entry,
                head,
                now,
                arrived,
            );
            return Ok(hit.await);
        }
        // A fill of a key its leader found missing runs in this process and
        // has not finished calling the origin: join it without reading
        // Redis. What it hands out was read or asked for after it began, or
        // says when, and is then refused (see `Flights::join_cold`).
        let blind = if refresh || head || offline {
            None
        } else {
            shared.flights.join_cold(&ek.primary)
        };
        let (joined, stale, entry_key) = match blind {
            Some(rx) => {
                if attempt == 0 {
                    Counters::inc(&counters.misses);
                }
                (Joined::Join(rx), None, String::new())
            }
            None => {
                // An announcement that overtakes the read keeps it out of the
                // near cache.
                let snapshot = near.map(|near| near.snapshot(&ek.primary));
                let found = if offline {
                    None
                } else {
                    match lookup(&shared.store, &ek, req.headers(), now, near).await {
                        Ok(Looked {
                            key: found,
                            record,
                            tag,
                            near: None,
                        }) => Some((found, record, tag)),
                        Ok(Looked {
                            key: variant,
                            near: Some(entry),
                            ..
                        }) => {
                            let hit = near_hit(
                                &ctx, svc, req, &ek, &variant, &key, &entry, head, now, arrived,
                            );
                            return Ok(hit.await);
                        }
                        Err(err) => {
                            match shared.warn_gate.allow() {
                                Some(held) => {
                                    tracing::warn!(error = %err, held_back = held, "cache lookup failed, passing the request through")
                                }
                                None => {
                                    tracing::debug!(error = %err, "cache lookup failed, passing the request through")
                                }
                            }
                            offline = true;
                            None
                        }
                    }
                };
                let (entry_key, record, tag) =
                    found.unwrap_or_else(|| (ek.primary.clone(), Record::Missing, None));
                let stale = match record {
                    Record::Pass => {
                        tracing::trace!(key = %crate::trace::redact(&entry_key), "pass marker: going to the origin");
                        Counters::inc(&counters.bypasses);
                        return Box::pin(origin(config, svc, req, CacheStatus::Bypass)).await;
                    }
                    Record::Entry(entry) if !refresh && entry.is_fresh(now) => {
                        Counters::inc(&counters.hits);
                        let early = early_refresh(config, &entry, now, head);
                        if let (Some(near), Some(tag), Some(snapshot)) = (near, tag, snapshot)
                            && !early
                            && near.fits(&entry_key, &entry)
                        {
                            // Marked first: from then on its writers announce.
                            let marked = tag.marked
                                || shared
                                    .store
                                    .near_mark(&entry_key, &tag.generation, &tag.fresh)
                                    .await
                                    .unwrap_or(false);
                            if marked {
                                near.admit(&entry_key, Arc::new(entry.clone()), snapshot);
                            }
                        }
                        if !early {
                            return Ok(from_owned_entry(
                                config,
                                entry,
                                CacheStatus::Hit,
                                head,
                                now,
                            ));
                        }
                        let res = from_entry(config, &entry, CacheStatus::Hit, head, now);
                        if refresh_in_background(
                            &ctx, svc, req, &ek, entry_key, &key, entry, arrived,
                        ) {
                            Counters::inc(&counters.early_refreshes);
                            tracing::debug!("xfetch: refreshing early");
                        }
                        return Ok(res);
                    }
                    Record::Entry(entry)
                        if !refresh
                            && entry.is_usable_stale(now)
                            && fill::may_serve(config, &entry, now, false) =>
                    {
                        Counters::inc(&counters.stale);
                        tracing::debug!(key = %crate::trace::redact(&entry_key), "serving stale while revalidating");
                        if head || !entry.may_refresh(now) {
                            return Ok(from_owned_entry(
                                config,
                                entry,
                                CacheStatus::Stale,
                                head,
                                now,
                            ));
                        }
                        let res = from_entry(config, &entry, CacheStatus::Stale, head, now);
                        if refresh_in_background(
                            &ctx, svc, req, &ek, entry_key, &key, entry, arrived,
                        ) {
                            Counters::inc(&counters.stale_refreshes);
                        }
                        return Ok(res);
                    }
                    Record::Entry(entry) if entry.is_usable_stale(now) => Some(Arc::new(entry)),
                    _ => None,
                };
                if offline {
                    Counters::inc(&counters.bypasses);
                } else if attempt == 0 {
                    Counters::inc(&counters.misses);
                }
                if head && offline {
                    return Box::pin(origin(config, svc, req, CacheStatus::Unavailable)).await;
                }
                if head {
                    // A HEAD response has no body to cache, and turning it into a GET
                    // would need a request body we can't make: pass it through.
                    return Box::pin(origin(config, svc, req, CacheStatus::Miss)).await;
                }
                // Joinable without a lookup: a fill of a missing primary.
                let cold = stale.is_none() && !offline && !refresh && entry_key == ek.primary;
                // What this request knew of Redis, as of now (a moment
                // after its lookup's answer: erring late only makes it
                // refuse an answer it could have taken).
                if !offline {
                    looked = Some(std::time::Instant::now());
                }
                (
                    shared
                        .flights
                        .join_or_lead(&entry_key, cold, passed.as_ref()),
                    stale,
                    entry_key,
                )
            }
        };
        match joined {
            Joined::Lead(flight) => {
                let (tx, rx) = oneshot::channel();
                let job = Job {
                    ctx: ctx.clone(),
                    flight,
                    svc,
                    req,
                    ek,
                    key: Arc::from(key.as_str()),
                    entry_key,
                    mode: if offline {
                        Mode::Offline
                    } else if refresh {
                        Mode::Refetch
                    } else {
                        Mode::Fill
                    },
                    stale,
                    // Read by this request's lookup, after it came.
                    stale_since: Since::Asked(arrived),
                    leader: Some(tx),
                    decided_on: None,
                    deadlines,
                };
                // The fill runs as its own task: if this request goes away,
                // the fill still finishes for everyone waiting on it.
                let span = tracing::debug_span!("cachefence.fill", key = %crate::trace::redact(&job.entry_key));
                tokio::spawn(fill::run(job).instrument(span));
                return match rx.await {
                    Ok(result) => result,
                    // The fill task ended without answering: the inner
                    // service panicked.
                    Err(_) => Ok(plain_response(config, StatusCode::INTERNAL_SERVER_ERROR)),
                };
            }
            Joined::Join(mut rx) => {
                Counters::inc(&counters.coalesced);
                // Whether this request's own lookup found a stale copy.
                let saw_stale = stale.is_some();
                if saw_stale {
                    fallback.clone_from(&stale);
                }
                let wait = rx.wait_for(Option::is_some);
                // The fill this request joined acts on the wait budget for
                // all of them (stale, or one origin call, or keeps waiting);
                // a request of its own gives up only to be served its stale
                // entry or a 504, as configured.
                let until =
                    if stale.is_some() || config.on_wait_timeout == OnWaitTimeout::GatewayTimeout {
                        deadlines.wait
                    } else {
                        deadlines.cap
                    };
                let waited = std::time::Instant::now();
                // Boxed: a hit's future stays small (it is moved, not
                // just polled, on its way into the response future).
                let outcome = match Box::pin(tokio::time::timeout_at(until, wait)).await {
                    Ok(Ok(outcome)) => outcome.clone(),
                    // The flight ended without an outcome: look again.
                    Ok(Err(_)) => Some(Outcome::Restart),
                    Err(_) => None,
                };
                counters.waited(waited.elapsed());
                match outcome {
                    // Older than what this request knew: look again (see
                    // `Since`). A stale copy is as good as the one its own
                    // lookup found.
                    Some(Outcome::Serve { since, status, .. })
                        if !(since.admits(arrived, looked)
                            || status == CacheStatus::Stale && saw_stale) =>
                    {
                        passed = Some(rx)
                    }
                    Some(Outcome::Serve {
                        entry,
                        status,
                        vary,
                        since: _,
                    }) => {
                        let matches = vary
                            .iter()
                            .all(|(name, value)| header_value(req.headers(), name) == *value);
                        if matches {
                            let mut res = from_entry(config, &entry, status, false, now_ms());
                            cache_status::collapsed(config, res.headers_mut());
                            return Ok(res);
                        }
                        // Made for other header values: look again, and
                        // don't join this finished fill again if it is
                        // still in the table (offline, a fill is keyed by
                        // its primary) but lead the next one in its place.
                        passed = Some(rx);
                    }
                    Some(Outcome::Origin) => {
                        let status = if offline {
                            CacheStatus::Unavailable
                        } else {
                            CacheStatus::Miss
                        };
                        return Box::pin(origin(config, svc, req, status)).await;
                    }
                    Some(Outcome::Restart) => {}
                    None => {
                        Counters::inc(&counters.wait_timeouts);
                        return Ok(after_wait_timeout(config, counters, stale));
                    }
                }
            }
        }
    }
    // Out of attempts (fills restarted by invalidations, answers refused as
    // older than what it knew or made for other `Vary` values): this request
    // calls the origin alone, within what is left of its cap, as a fill
    // would (the guide's "Waiting and deadlines": stale or 504 then).
    let call = Box::pin(origin(config, svc, req, CacheStatus::Miss));
    match tokio::time::timeout_at(deadlines.cap, call).await {
        Ok(result) => result,
        Err(_) => {
            Counters::inc(&counters.wait_timeouts);
            Ok(after_wait_timeout(config, counters, fallback))
        }
    }
}

/// Reads the entry of a key: ONE command, two when the response varies.
/// With `near`, also what the near cache needs of the entry read, and a
/// `Vary` variant it holds is served from it (the index is still read).
pub(crate) async fn lookup<C>(
    store: &Store<C>,
    ek: &EntryKey,
    headers: &HeaderMap,
    now: u64,
    near: Option<&crate::near::Near>,
) -> Result<Looked, FenceError>
where
    C: Conn,
{
    let read = |key: &str| {
        let key = key.to_owned();
        async move {
            if near.is_some() {
                let (raw, extra) = store.read_with(&key, &crate::near::TAG_FIELDS).await?;
                Ok::<_, FenceError>((raw, crate::near::tag_of(extra)))
            } else {
                Ok((store.read(&key).await?, None))
            }
        }
    };
    let (raw, tag) = read(&ek.primary).await?;
    let record = Record::from_raw(raw, now);
    let Record::Vary(names) = record else {
        return Ok(Looked {
            key: ek.primary.clone(),
            record,
            tag,
            near: None,
        });
    };
    // The index was read from Redis just now: the variant it names may be
    // held near (its coherence is a primary's: marked, announced, dropped
    // with its URL).
    let variant = ek.variant(&names, headers);
    if let Some(entry) = near.and_then(|near| near.get(&variant, now)) {
        return Ok(Looked {
            key: variant,
            record: Record::Missing,
            tag: None,
            near: Some(entry),
        });
    }
    let (raw, tag) = read(&variant).await?;
    let record = match Record::from_raw(raw, now) {
        Record::Vary(_) => Record::Missing,
        other => other,
    };
    Ok(Looked {
        key: variant,
        record,
        tag,
        near: None,
    })
}

/// What [`lookup`] found: the entry key and record read from Redis (with
/// what a near cache needs of it), or a `Vary` variant held near.
pub(crate) struct Looked {
    key: String,
    record: Record,
    tag: Option<crate::near::Tag>,
    /// The variant at `key`, held near (`record` is then `Missing`).
    near: Option<Arc<Entry>>,
}

/// Serves a fresh hit from the near cache (the primary's, or the `Vary`
/// variant at `entry_key`), found there by a request that came at
/// `arrived`, and starts XFetch's early refresh if it is due.
#[allow(clippy::too_many_arguments)]
async fn near_hit<S, C, ReqB, ResB>(
    ctx: &Ctx<C>,
    svc: S,
    req: Request<ReqB>,
    ek: &EntryKey,
    entry_key: &str,
    key: &str,
    entry: &Arc<Entry>,
    head: bool,
    now: u64,
    arrived: std::time::Instant,
) -> Response<FenceBody<ResB>>
where
    S: Inner<ReqB, ResB> + Clone,
    ReqB: Send + 'static,
    ResB: CacheBody,
    C: Conn,
{
    // A near hit awaits nothing: take from the task's budget, so a loop of
    // them still lets other tasks of its worker run.
    tokio::task::consume_budget().await;
    let (config, counters) = (&ctx.config, &ctx.config.counters);
    Counters::inc(&counters.hits);
    Counters::inc(&counters.near_hits);
    let res = from_entry(config, entry, CacheStatus::Hit, head, now);
    if early_refresh(config, entry, now, head) {
        let current = (**entry).clone();
        let entry_key = entry_key.to_owned();
        if refresh_in_background(ctx, svc, req, ek, entry_key, key, current, arrived) {
            Counters::inc(&counters.early_refreshes);
        }
    }
    res
}

/// Whether XFetch starts a background refresh of this fresh hit now.
fn early_refresh(config: &Config, entry: &Entry, now: u64, head: bool) -> bool {
    !head
        && config.beta > 0.0
        && entry.may_refresh(now)
        && entry.past_share(now, config.early_refresh_after)
        && xfetch::should_refresh(
            now,
            entry.fresh_ms,
            crate::entry::duration_ms(entry.delta),
            config.beta,
            xfetch::random01(),
        )
}

/// Starts a background refresh of `current`, read from Redis (or held
/// near) no earlier than `read`, unless one runs.
#[allow(clippy::too_many_arguments)]
fn refresh_in_background<S, C, ReqB, ResB>(
    ctx: &Ctx<C>,
    svc: S,
    req: Request<ReqB>,
    ek: &EntryKey,
    entry_key: String,
    key: &str,
    current: Entry,
    read: std::time::Instant,
) -> bool
where
    S: Inner<ReqB, ResB> + Clone,
    ReqB: Send + 'static,
    ResB: CacheBody,
    C: Conn,
{
    // One refresh per key per process; the lease makes it one per fleet.
    let Some(flight) = ctx.shared.flights.try_lead(&entry_key) else {
        return false;
    };
    let job = Job {
        ctx: ctx.clone(),
        flight,
        svc,
        req,
        ek: ek.clone(),
        key: Arc::from(key),
        entry_key,
        mode: Mode::Refresh,
        decided_on: Some(current.stored_ms),
        stale: Some(Arc::new(current)),
        // A request that joins the refresh after its lookup found nothing
        // does not take this copy if it came after it was read (see
        // `Since`).
        stale_since: Since::Asked(read),
        leader: None,
        deadlines: Deadlines::new(&ctx.config),
    };
    let span =
        tracing::debug_span!("cachefence.refresh", key = %crate::trace::redact(&job.entry_key));
    tokio::spawn(fill::run(job).instrument(span));
    true
}

/// A joiner's wait ran out: its stale entry, else `504`.
fn after_wait_timeout<B: Body>(
    config: &Config,
    counters: &Counters,
    stale: Option<Arc<Entry>>,
) -> Response<FenceBody<B>> {
    let now = now_ms();
    match stale.filter(|s| fill::may_serve(config, s, now, false)) {
        Some(stale) => {
            Counters::inc(&counters.stale);
            from_entry(config, &stale, CacheStatus::Stale, false, now)
        }
        None => plain_response(config, StatusCode::GATEWAY_TIMEOUT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}
    fn assert_sync<T: Sync>() {}
    fn assert_clone<T: Clone>() {}

    #[test]
    fn fence_is_clone_send_sync_and_its_future_send() {
        type Inner = tower::util::BoxCloneSyncService<
            Request<String>,
            Response<String>,
            std::convert::Infallible,
        >;
        type F = Fence<Inner, redis::aio::MultiplexedConnection>;
        assert_send::<F>();
        assert_sync::<F>();
        assert_clone::<F>();
        assert_send::<<F as Service<Request<String>>>::Future>();
        assert_send::<FenceBody<String>>();
    }
}
