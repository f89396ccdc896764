//! A fill: the task that takes a key's lease, calls the inner service once,
//! stores the response fenced by the lease, and hands the result to every
//! request that waited. It runs as its own task, so the request that started
//! it may go away without stopping it (DESIGN.md promise 2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bounds::{CacheBody, Conn, Inner};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::oneshot;
use tower::ServiceExt;

use crate::body::{Buffered, FenceBody, buffer};
use crate::entry::storable_headers;
use crate::entry::{Entry, Record, duration_ms, encode_vary, now_ms};
use crate::flight::{CacheStatus, Flight, Outcome};
use crate::key::{EntryKey, header_value, lease_of};
use crate::layer::{OnWaitTimeout, Shared};
use crate::lease::{Lease, LeaseRegistration, new_token, release, with_lease};
use crate::policy::{ResponseRule, response_tags, vary_names};
use crate::service::{Ctx, from_entry, plain_response};
use crate::stats::Counters;
use crate::store::{Acquired, StoreArgs, WriteBack};
use crate::wait::Backoff;

/// Why a fill runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A miss: serve the entry if someone else stored it, else fill it.
    Fill,
    /// A client asked for a fresh copy (and the policy honours that): fill
    /// even if the entry is fresh, but through the lease like any fill.
    Refetch,
    /// A background refresh (XFetch or stale-while-revalidate): give up if
    /// another fill holds the lease.
    Refresh,
    /// Redis is unreachable: call the origin without a lease and share the
    /// answer with the requests of this process that joined.
    Offline,
}

impl Mode {
    /// The cache status of a response the origin produced for this fill.
    fn origin_status(self) -> CacheStatus {
        if self == Mode::Offline {
            CacheStatus::Bypass
        } else {
            CacheStatus::Miss
        }
    }
}

type LeaderResult<B, E> = Result<Response<FenceBody<B>>, E>;

pub(crate) struct Job<S, C, ReqB, ResB: Body, E> {
    pub(crate) ctx: Ctx<C>,
    pub(crate) flight: Arc<Flight>,
    pub(crate) svc: S,
    pub(crate) req: Request<ReqB>,
    pub(crate) ek: EntryKey,
    pub(crate) key: Arc<str>,
    /// The key to fill: the primary or a variant.
    pub(crate) entry_key: String,
    pub(crate) mode: Mode,
    /// A stale entry to fall back on when the origin fails.
    pub(crate) stale: Option<Arc<Entry>>,
    /// The request that started the fill, if it is not a background refresh.
    pub(crate) leader: Option<oneshot::Sender<LeaderResult<ResB, E>>>,
}

/// Removes the flight from the table when the fill ends, however it ends;
/// joiners of a fill that ended without an outcome (a panic) look again.
struct FlightGuard<C> {
    shared: Arc<Shared<C>>,
    key: String,
    flight: Arc<Flight>,
}

impl<C> Drop for FlightGuard<C> {
    fn drop(&mut self) {
        self.shared.flights.restart(&self.key, &self.flight);
    }
}

pub(crate) async fn run<S, C, ReqB, ResB>(mut job: Job<S, C, ReqB, ResB, S::Error>)
where
    S: Inner<ReqB, ResB>,
    ReqB: Send + 'static,
    ResB: CacheBody,
    C: Conn,
{
    let _guard = FlightGuard {
        shared: job.ctx.shared.clone(),
        key: job.entry_key.clone(),
        flight: job.flight.clone(),
    };
    let shared = job.ctx.shared.clone();
    let config = job.ctx.config.clone();
    let counters = &shared.counters;
    let token = new_token();
    let mut key = job.entry_key.clone();
    let mut redirected = false;
    let mut repairing = false;
    let mut refresh = job.mode != Mode::Fill;
    let mut deadline: Option<Instant> = None;
    let mut backoff = Backoff::new();
    if job.mode == Mode::Offline {
        return call_and_decide(job, None).await;
    }
    loop {
        let lease = lease_of(&key);
        let acquired = shared
            .store
            .acquire(&key, &lease, &token, config.lock_timeout, refresh)
            .await;
        match acquired {
            Err(err) => {
                tracing::warn!(error = %err, key = %key, "fill lease unavailable, calling the origin without caching");
                if job.mode == Mode::Refresh {
                    return;
                }
                return call_and_decide(job, None).await;
            }
            Ok(Acquired::Hit(fields)) => match Record::decode(fields, now_ms()) {
                Record::Entry(entry) => {
                    let vary = varies_on(&entry.headers, job.req.headers());
                    serve_all(
                        &job.flight,
                        &mut job.leader,
                        &config,
                        Arc::new(entry),
                        CacheStatus::Hit,
                        vary,
                    );
                    return;
                }
                // Unreadable (damaged, foreign, another version): take the
                // lease regardless of what is stored, so this fill replaces it.
                _ if !repairing => {
                    tracing::debug!(key = %key, "unreadable entry: refilling it");
                    repairing = true;
                    refresh = true;
                }
                _ => return call_and_decide(job, None).await,
            },
            Ok(Acquired::Vary(names)) if !redirected => {
                let names = std::str::from_utf8(&names).map_err(drop).and_then(|s| {
                    s.split(',')
                        .map(|n| HeaderName::try_from(n).map_err(drop))
                        .collect::<Result<Vec<_>, ()>>()
                });
                match names {
                    Ok(names) => {
                        key = job.ek.variant(&names, job.req.headers());
                        redirected = true;
                    }
                    // A damaged Vary index: refill the primary over it.
                    Err(()) if !repairing => {
                        repairing = true;
                        refresh = true;
                    }
                    Err(()) => return call_and_decide(job, None).await,
                }
            }
            Ok(Acquired::Vary(_)) => return call_and_decide(job, None).await,
            Ok(Acquired::Pass) => {
                if job.mode == Mode::Refresh {
                    return;
                }
                job.flight.finish(Outcome::Origin);
                let result =
                    crate::service::origin(&config, job.svc, job.req, CacheStatus::Bypass).await;
                send(&mut job.leader, result);
                return;
            }
            Ok(Acquired::Won(fields, started)) => {
                tracing::debug!(key = %key, mode = ?job.mode, "fill lease won");
                if job.stale.is_none()
                    && let Record::Entry(entry) = Record::decode(fields, now_ms())
                {
                    job.stale = Some(Arc::new(entry));
                }
                let lease = Lease {
                    key,
                    token,
                    started,
                };
                return call_and_decide(job, Some(lease)).await;
            }
            Ok(Acquired::Held(remaining)) => {
                if job.mode == Mode::Refresh {
                    tracing::trace!(key = %key, "refresh skipped: another fill holds the lease");
                    job.flight.finish(Outcome::Origin);
                    return;
                }
                let now = Instant::now();
                let deadline = *deadline.get_or_insert_with(|| {
                    Counters::inc(&counters.remote_waits);
                    tracing::debug!(key = %key, "fill lease held elsewhere, waiting");
                    now + config.wait_timeout
                });
                if now >= deadline {
                    Counters::inc(&counters.wait_timeouts);
                    tracing::debug!(key = %key, "wait budget spent");
                    return wait_timed_out(job).await;
                }
                // After the other fill lands, a plain lookup finds it.
                refresh = false;
                // Poll again when the lease expires, if that is sooner.
                let mut pause = backoff.next();
                if !remaining.is_zero() {
                    pause = pause.min(remaining);
                }
                let pause = pause.min(deadline - now);
                tokio::select! {
                    _ = job.flight.wake.notified() => Counters::inc(&counters.wakeups),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// The wait budget is spent: stale if there is one, else the configured
/// action. The response is shared with local joiners only through "go to the
/// origin yourself", since it is not cached.
async fn wait_timed_out<S, C, ReqB, ResB>(mut job: Job<S, C, ReqB, ResB, S::Error>)
where
    S: Inner<ReqB, ResB>,
    ReqB: Send + 'static,
    ResB: CacheBody,
    C: Conn,
{
    if let Some(stale) = job.stale.clone() {
        let headers = job.req.headers().clone();
        serve_stale(&job.ctx, &job.flight, &mut job.leader, stale, &headers);
        return;
    }
    if job.ctx.config.on_wait_timeout == OnWaitTimeout::GatewayTimeout {
        job.flight.finish(Outcome::Origin);
        let res = plain_response(&job.ctx.config, StatusCode::GATEWAY_TIMEOUT);
        send(&mut job.leader, Ok(res));
        return;
    }
    call_and_decide(job, None).await
}

/// What the origin call and body buffering produced.
enum Called<B: Body, E> {
    Failed(E),
    Responded {
        parts: Box<http::response::Parts>,
        rule: ResponseRule,
        body: Either<B>,
    },
}

enum Either<B: Body> {
    Buffered(Buffered<B>),
    Streaming(B),
}

/// Calls the origin, under `lease` if one was won (without one when Redis
/// failed or the wait timed out: nothing is stored then), and hands the
/// response to the leader and, when it may be shared, to the joiners.
async fn call_and_decide<S, C, ReqB, ResB>(
    job: Job<S, C, ReqB, ResB, S::Error>,
    lease: Option<Lease>,
) where
    S: Inner<ReqB, ResB>,
    ReqB: Send + 'static,
    ResB: CacheBody,
    C: Conn,
{
    let Job {
        ctx,
        flight,
        svc,
        req,
        ek,
        key,
        entry_key,
        mode,
        stale,
        mut leader,
    } = job;
    let (config, shared) = (ctx.config.clone(), ctx.shared.clone());
    let counters = &shared.counters;
    let started = Instant::now();
    let req_headers = req.headers().clone();
    Counters::inc(&counters.fills);

    let body_limit = config.body_limit;
    let policy = config.policy.clone();
    let joined = flight.clone();
    let call = async move {
        // A background refresh owns a clone that was never polled ready.
        let res = if mode == Mode::Refresh {
            svc.oneshot(req).await
        } else {
            let mut svc = svc;
            svc.call(req).await
        };
        let res = match res {
            Ok(res) => res,
            Err(err) => return Called::Failed(err),
        };
        let (parts, body) = res.into_parts();
        let rule = policy.response(&parts);
        let buffer_it = match &rule {
            ResponseRule::Store { .. } => true,
            // Buffer an uncacheable response only to hand it to joiners.
            ResponseRule::DontStore { shareable, .. } => *shareable && joined.joiners() > 0,
        };
        let body = if buffer_it {
            Either::Buffered(buffer(body, body_limit).await)
        } else {
            Either::Streaming(body)
        };
        Called::Responded {
            parts: Box::new(parts),
            rule,
            body,
        }
    };
    let _registered = lease.as_ref().map(|l| LeaseRegistration::new(&shared, l));
    let called = with_lease(
        &shared,
        lease.as_ref(),
        &flight,
        &mut leader,
        call,
        config.lock_timeout,
    )
    .await;
    let Some(called) = called else {
        tracing::debug!(key = %entry_key, "fill abandoned after an invalidation");
        release(&shared, &ek, lease.as_ref(), Duration::ZERO).await;
        return;
    };
    let delta = started.elapsed();
    // How long a pass marker sends the key's next requests straight to the
    // origin after an uncacheable answer: not while a stale entry can be
    // served instead, nor for a body that failed (that says nothing about
    // the key).
    let pass_for = |body_failed: bool| {
        if body_failed || stale.is_some() {
            Duration::ZERO
        } else {
            config.pass_ttl
        }
    };

    let (parts, rule, body) = match called {
        Called::Failed(err) => {
            release(&shared, &ek, lease.as_ref(), Duration::ZERO).await;
            match stale.filter(|_| config.stale_if_error) {
                Some(stale) => {
                    tracing::debug!(key = %entry_key, "origin failed, serving stale");
                    serve_stale(&ctx, &flight, &mut leader, stale, &req_headers);
                }
                None => {
                    flight.finish(Outcome::Origin);
                    send(&mut leader, Err(err));
                }
            }
            return;
        }
        Called::Responded { parts, rule, body } => (*parts, rule, body),
    };

    if parts.status.is_server_error()
        && config.stale_if_error
        && let Some(stale) = stale.clone()
    {
        tracing::debug!(key = %entry_key, status = %parts.status, "origin answered 5xx, serving stale");
        release(&shared, &ek, lease.as_ref(), Duration::ZERO).await;
        serve_stale(&ctx, &flight, &mut leader, stale, &req_headers);
        return;
    }

    let tags = response_tags(&parts, &config.tag_headers);
    let entry_of = |data: bytes::Bytes, ttl: Duration| {
        let now = now_ms();
        let fresh_ms = now.saturating_add(duration_ms(ttl));
        Arc::new(Entry {
            status: parts.status,
            headers: storable_headers(&parts.headers, |n| config.is_own_header(n)),
            body: data,
            delta,
            stored_ms: now,
            fresh_ms,
            stale_ms: fresh_ms.saturating_add(duration_ms(config.policy.grace)),
        })
    };

    match (rule, body) {
        (
            ResponseRule::Store { ttl, vary },
            Either::Buffered(Buffered::Complete {
                data,
                trailers: None,
            }),
        ) => {
            let entry = entry_of(data, ttl);
            if let Some(lease) = &lease {
                let store_key = if vary.is_empty() {
                    lease.key.clone()
                } else {
                    ek.variant(&vary, &req_headers)
                };
                let vary_field = if vary.is_empty() {
                    String::new()
                } else {
                    encode_vary(&vary)
                };
                let args = StoreArgs {
                    entry_key: &store_key,
                    lease_key: &lease.lease_key(),
                    primary: &ek.primary,
                    variants_set: &ek.variants_set(),
                    token: &lease.token,
                    ttl: ttl.saturating_add(config.policy.grace),
                    vary: &vary_field,
                    started: lease.started,
                    namespace: &config.namespace,
                    tags: &tags,
                    max_variants: config.max_variants,
                    fields: entry.to_fields(&key, &lease.token),
                };
                match shared.store.store(args).await {
                    Ok(WriteBack::Stored) => {
                        Counters::inc(&counters.stores);
                        tracing::debug!(key = %store_key, ?delta, "fill stored");
                    }
                    Ok(WriteBack::TooManyVariants) => {
                        Counters::inc(&counters.variants_over_limit);
                        tracing::debug!(key = %store_key, "not stored: the URL has the most variants it may have");
                    }
                    Ok(WriteBack::Fenced) => {
                        Counters::inc(&counters.fenced);
                        // Computed before an invalidation: the joiners look
                        // again rather than take it.
                        shared.flights.restart(&entry_key, &flight);
                        tracing::debug!(key = %store_key, "write-back fenced out: the lease was lost (invalidated or expired)");
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, key = %store_key, "storing the fill failed");
                        release(&shared, &ek, Some(lease), Duration::ZERO).await;
                    }
                }
            }
            // A detached flight keeps its `Restart`: its joiners look again
            // instead of taking a response that was computed before an
            // invalidation. The leader's own request raced the invalidation,
            // so it may have it.
            let status = if leader.is_some() {
                mode.origin_status()
            } else {
                CacheStatus::Hit
            };
            serve_all(
                &flight,
                &mut leader,
                &config,
                entry,
                status,
                vary_values(&vary, &req_headers),
            );
        }
        (rule, Either::Buffered(buffered)) => {
            let shareable = matches!(
                rule,
                ResponseRule::DontStore {
                    shareable: true,
                    ..
                }
            );
            let reason = match (&rule, &buffered) {
                (ResponseRule::DontStore { reason, .. }, _) => *reason,
                (_, Buffered::TooLarge { .. }) => "too large",
                (_, Buffered::Failed { .. }) => "body error",
                (_, Buffered::Complete { .. }) => "trailers",
            };
            tracing::debug!(key = %entry_key, reason, "response not cacheable");
            let failed = matches!(buffered, Buffered::Failed { .. });
            release(&shared, &ek, lease.as_ref(), pass_for(failed)).await;
            match buffered {
                Buffered::Complete {
                    data,
                    trailers: None,
                } if shareable => {
                    let vary = vary_names(&parts.headers).unwrap_or_default();
                    let entry = entry_of(data.clone(), Duration::ZERO);
                    flight.finish(Outcome::Serve {
                        entry,
                        status: mode.origin_status(),
                        vary: vary_values(&vary, &req_headers),
                    });
                    send_response(
                        &mut leader,
                        &config,
                        parts,
                        FenceBody::full(data),
                        mode.origin_status(),
                    );
                }
                other => {
                    flight.finish(Outcome::Origin);
                    let body = match other {
                        Buffered::Complete { data, trailers } => {
                            FenceBody::buffered(data, trailers, None)
                        }
                        Buffered::TooLarge { prefix, rest } => FenceBody::rest(prefix, rest),
                        Buffered::Failed { data, error } => {
                            FenceBody::buffered(data, None, Some(error))
                        }
                    };
                    send_response(&mut leader, &config, parts, body, mode.origin_status());
                }
            }
        }
        (_, Either::Streaming(body)) => {
            release(&shared, &ek, lease.as_ref(), pass_for(false)).await;
            flight.finish(Outcome::Origin);
            send_response(
                &mut leader,
                &config,
                parts,
                FenceBody::inner(body),
                mode.origin_status(),
            );
        }
    }
}

/// Hands a stale entry to the joiners and to the leader.
fn serve_stale<C, B: Body, E>(
    ctx: &Ctx<C>,
    flight: &Flight,
    leader: &mut Option<oneshot::Sender<LeaderResult<B, E>>>,
    stale: Arc<Entry>,
    req_headers: &HeaderMap,
) {
    Counters::inc(&ctx.shared.counters.stale);
    let vary = varies_on(&stale.headers, req_headers);
    serve_all(flight, leader, &ctx.config, stale, CacheStatus::Stale, vary);
}

/// Hands an entry to the joiners and to the leader.
fn serve_all<B: Body, E>(
    flight: &Flight,
    leader: &mut Option<oneshot::Sender<LeaderResult<B, E>>>,
    config: &crate::layer::Config,
    entry: Arc<Entry>,
    status: CacheStatus,
    vary: Arc<[(HeaderName, Vec<u8>)]>,
) {
    let res = from_entry(config, &entry, status, false, now_ms());
    flight.finish(Outcome::Serve {
        entry,
        status,
        vary,
    });
    send(leader, Ok(res));
}

fn send_response<B: Body, E>(
    leader: &mut Option<oneshot::Sender<LeaderResult<B, E>>>,
    config: &crate::layer::Config,
    parts: http::response::Parts,
    body: FenceBody<B>,
    status: CacheStatus,
) {
    let mut res = Response::from_parts(parts, body);
    crate::service::outgoing(config, res.headers_mut(), status);
    send(leader, Ok(res));
}

fn send<T>(leader: &mut Option<oneshot::Sender<T>>, value: T) {
    if let Some(tx) = leader.take() {
        // The leader's client may be gone; the fill finished anyway.
        let _ = tx.send(value);
    }
}

/// The request header values a response varies on.
fn varies_on(response: &HeaderMap, request: &HeaderMap) -> Arc<[(HeaderName, Vec<u8>)]> {
    vary_values(&vary_names(response).unwrap_or_default(), request)
}

/// The values of these request headers, for telling joiners whose request
/// selects another variant.
fn vary_values(names: &[HeaderName], request: &HeaderMap) -> Arc<[(HeaderName, Vec<u8>)]> {
    names
        .iter()
        .map(|n| (n.clone(), header_value(request, n)))
        .collect()
}
