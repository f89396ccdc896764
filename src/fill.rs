//! A fill: the task that takes a key's lease, calls the inner service once,
//! stores the response fenced by the lease, and hands the result to every
//! request that waited. It runs as its own task, so the request that started
//! it may go away without stopping it (ARCHITECTURE.md, promise 2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bounds::{CacheBody, Conn, Inner};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::oneshot;
use tower::ServiceExt;

use crate::body::{Buffered, FenceBody, buffer};
use crate::config::{Config, OnWaitTimeout};
use crate::entry::storable_headers;
use crate::entry::{Entry, Record, duration_ms, encode_vary, now_ms};
use crate::flight::{CacheStatus, Flight, Outcome, Since};
use crate::key::{EntryKey, header_value, lease_of};
use crate::lease::{Ended, Lease, LeaseRegistration, Leave, new_token, release, with_lease};
use crate::policy::{ResponseRule, response_tags, uncacheable_by_nature, vary_names};
use crate::response::{from_entry, plain_response};
use crate::shared::Ctx;
use crate::shared::Shared;
use crate::stats::Counters;
use crate::store::{AcquireArgs, Acquired, StoreArgs, WriteBack};
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
    /// The cache status of a response the origin produced for this fill,
    /// which replaces `stale` (if any); `revalidated`: the origin answered
    /// the fill's conditional request `304`.
    fn origin_status(self, stale: Option<&Entry>, revalidated: bool) -> CacheStatus {
        match self {
            Mode::Offline => CacheStatus::Unavailable,
            Mode::Refetch => CacheStatus::Refetched { revalidated },
            _ if revalidated || stale.is_some_and(|s| !s.is_fresh(now_ms())) => {
                CacheStatus::Refreshed { revalidated }
            }
            _ => CacheStatus::Miss,
        }
    }
}

/// Whether `entry` may be served in place of a response from the origin
/// right now: a stale entry in [`rfc9111`](crate::FenceLayer::rfc9111)
/// mode only as its headers allow (src/freshness.rs); `error`: the origin
/// failed, timed out or answered 5xx. Other modes keep their own rules
/// (`grace`, `stale_if_error`).
pub(crate) fn may_serve(config: &Config, entry: &Entry, now: u64, error: bool) -> bool {
    !config.policy.rfc9111
        || entry.is_fresh(now)
        || crate::freshness::may_serve_stale(
            &entry.headers,
            entry.fresh_ms,
            entry.stale_ms,
            now,
            error,
        )
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
    /// Which joiners may take `stale`: it is as new as the read that found
    /// it (`Since::Asked` with the arrival of the request whose lookup
    /// found it, or ACQUIRE's asking).
    pub(crate) stale_since: Since,
    /// The request that started the fill, if it is not a background refresh.
    pub(crate) leader: Option<oneshot::Sender<LeaderResult<ResB, E>>>,
    /// The `stored` time of the entry a background refresh was decided on.
    pub(crate) decided_on: Option<u64>,
    /// When the wait of the request that started the fill runs out.
    pub(crate) deadlines: Deadlines,
}

/// The wait deadlines of one request, set once when it arrives: restarts
/// (a fill detached by an invalidation) count against the same ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// Then a stale entry is served, or `on_wait_timeout` acts.
    pub(crate) wait: tokio::time::Instant,
    /// Then the wait ends whatever happens: `504` (or stale).
    pub(crate) cap: tokio::time::Instant,
}

impl Deadlines {
    pub(crate) fn new(config: &crate::config::Config) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            wait: now + config.wait_timeout,
            cap: now + config.wait_cap(),
        }
    }
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

/// The longest a waiter on a Redis Cluster waits for its sharded wake-up
/// subscription to be confirmed before it polls (unmarked) instead.
const CONFIRM_WAIT: Duration = Duration::from_millis(500);
/// The first poll of a waiter whose sharded subscription is confirmed (and
/// whose lease is marked): pub/sub wakes it; the poll only covers a
/// message lost with a connection (then polls every [`crate::wait::CAP`]).
/// A poll landing just after the store would take the entry before the
/// message: rare polls leave that to the message.
const SUBSCRIBED_POLL: Duration = Duration::from_secs(1);

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
    // The origin answers the full response, which every request served
    // from this fill cuts its own condition or range from.
    crate::conditional::strip(job.req.headers_mut());
    let shared = job.ctx.shared.clone();
    let config = job.ctx.config.clone();
    let counters = &config.counters;
    let token = new_token();
    let mut key = job.entry_key.clone();
    let mut redirected = false;
    let mut repairing = false;
    let mut refresh = job.mode != Mode::Fill;
    let mut waiting = false;
    // Keeps the wake-up subscription of the awaited entry (Redis Cluster).
    let mut interest: Option<crate::shared::Interest> = None;
    // Whether this fill waited for that subscription to be confirmed.
    let mut confirming = false;
    let mut wait_spent = false;
    let mut backoff = Backoff::new();
    // When this fill began waiting on another process's lease.
    let mut wait_started: Option<Instant> = None;
    if job.mode == Mode::Offline {
        return call_and_decide(job, None).await;
    }
    loop {
        let lease = lease_of(&key);
        // What ACQUIRE finds stored is what Redis held when it was asked.
        let asked = Instant::now();
        let acquired = shared
            .store
            .acquire(AcquireArgs {
                key: &key,
                lease: &lease,
                token: &token,
                lease_for: config.lock_timeout,
                refresh,
                decided_on: job.decided_on.filter(|_| !redirected && !repairing),
                // A waiter that can be woken asks the fill to publish; on a
                // Redis Cluster only once its sharded subscription is
                // confirmed (a store before would publish to nobody).
                listening: shared.wake_client.get().is_some()
                    && (!shared.store.is_cluster()
                        || interest
                            .as_ref()
                            .is_some_and(crate::shared::Interest::is_subscribed)),
                // A stale copy in hand needs no second one from Redis.
                have_stale: job.stale.is_some(),
            })
            .await;
        if !matches!(acquired, Ok(Acquired::Held(_)))
            && let Some(started) = wait_started.take()
        {
            counters.waited(started.elapsed());
        }
        match acquired {
            Err(err) => {
                if let Some(held) = shared.warn_gate.allow() {
                    tracing::warn!(error = %err, key = %crate::trace::redact(&key), held_back = held, "fill lease unavailable, calling the origin without caching");
                }
                if job.mode == Mode::Refresh {
                    return;
                }
                // Redis is unavailable to this fill: it answers as an
                // offline one does.
                job.mode = Mode::Offline;
                return call_and_decide(job, None).await;
            }
            Ok(Acquired::Hit(fields)) => match Record::decode(fields, now_ms()) {
                Record::Entry(entry) => {
                    if job.mode == Mode::Refresh {
                        tracing::trace!(key = %crate::trace::redact(&key), "refresh skipped: another fill replaced the entry");
                    }
                    let vary = varies_on(&entry.headers, job.req.headers());
                    serve_all(
                        &job.flight,
                        &mut job.leader,
                        &config,
                        Arc::new(entry),
                        CacheStatus::Hit,
                        vary,
                        Since::Asked(asked),
                    );
                    return;
                }
                // Unreadable (damaged, foreign, another version): take the
                // lease regardless of what is stored, so this fill replaces it.
                _ if !repairing => {
                    tracing::debug!(key = %crate::trace::redact(&key), "unreadable entry: refilling it");
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
                    crate::response::origin(&config, job.svc, job.req, CacheStatus::Bypass).await;
                send(&mut job.leader, result);
                return;
            }
            Ok(Acquired::Won(fields, started)) => {
                tracing::debug!(key = %crate::trace::redact(&key), mode = ?job.mode, "fill lease won");
                if job.stale.is_none()
                    && let Record::Entry(entry) = Record::decode(fields, now_ms())
                {
                    job.stale = Some(Arc::new(entry));
                    job.stale_since = Since::Asked(asked);
                }
                let lease = Lease {
                    key,
                    token,
                    started,
                };
                // A takeover won at the cap has no time left for the
                // origin: give the lease back and give up without calling.
                if tokio::time::Instant::now() >= job.deadlines.cap {
                    Counters::inc(&counters.wait_timeouts);
                    release(&shared, &job.ek, &job.key, Some(&lease), Leave::Nothing).await;
                    return give_up(job, true).await;
                }
                return call_and_decide(job, Some(lease)).await;
            }
            Ok(Acquired::Held(remaining)) => {
                // A background refresh nobody waits for gives way to the
                // other fill; one that requests joined waits for it with
                // them, as a fill would (never sending them to the origin).
                if job.mode == Mode::Refresh && job.flight.joiners() == 0 {
                    tracing::trace!(key = %crate::trace::redact(&key), "refresh skipped: another fill holds the lease");
                    return;
                }
                if !waiting {
                    waiting = true;
                    wait_started = Some(Instant::now());
                    Counters::inc(&counters.remote_waits);
                    tracing::debug!(key = %crate::trace::redact(&key), "fill lease held elsewhere, waiting");
                    // The listener may have died with a runtime: restart it.
                    crate::wake::ensure_listener(&shared);
                    // On a Redis Cluster: this entry's sharded channel.
                    interest = crate::wake::wake_interest(&shared, &key);
                }
                // Subscribed first, marked after: once the subscription is
                // confirmed, ACQUIRE again at once (it marks the lease, or
                // finds what landed meanwhile). Unconfirmed in time: poll
                // unmarked, and mark once it is.
                if !confirming && let Some(interest) = &interest {
                    confirming = true;
                    let bound = job
                        .deadlines
                        .wait
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(CONFIRM_WAIT);
                    let bound = if remaining.is_zero() {
                        bound
                    } else {
                        bound.min(remaining)
                    };
                    if interest.subscribed(bound).await {
                        // The store's message will reach this waiter:
                        // polls are only the fallback for a lost one.
                        backoff = Backoff::from(SUBSCRIBED_POLL);
                        continue;
                    }
                }
                let now = tokio::time::Instant::now();
                if now >= job.deadlines.cap {
                    Counters::inc(&counters.wait_timeouts);
                    tracing::debug!(key = %crate::trace::redact(&key), "waited the longest a fill may take");
                    counters.waited(wait_started.map_or(Duration::ZERO, |s| s.elapsed()));
                    return give_up(job, true).await;
                }
                if now >= job.deadlines.wait && !wait_spent {
                    wait_spent = true;
                    Counters::inc(&counters.wait_timeouts);
                    tracing::debug!(key = %crate::trace::redact(&key), "wait budget spent");
                    if job.stale.is_some() || config.on_wait_timeout != OnWaitTimeout::Wait {
                        counters.waited(wait_started.map_or(Duration::ZERO, |s| s.elapsed()));
                        return give_up(job, false).await;
                    }
                }
                // After the other fill lands, a plain lookup finds it.
                refresh = false;
                // Poll again when the lease expires, if that is sooner.
                let mut pause = backoff.next();
                if !remaining.is_zero() {
                    pause = pause.min(remaining);
                }
                let next_deadline = if wait_spent {
                    job.deadlines.cap
                } else {
                    job.deadlines.wait
                };
                let pause = pause.min(next_deadline.saturating_duration_since(now));
                tokio::select! {
                    _ = job.flight.wake.notified() => Counters::inc(&counters.wakeups),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// The wait for another process's fill is over (`cap`: the longest a fill
/// may take has passed): stale if there is one, else the configured action
/// (`504` after the cap). The origin response of `CallOrigin` is handed to
/// this process's joiners like any fill's, but not stored.
async fn give_up<S, C, ReqB, ResB>(mut job: Job<S, C, ReqB, ResB, S::Error>, cap: bool)
where
    S: Inner<ReqB, ResB>,
    ReqB: Send + 'static,
    ResB: CacheBody,
    C: Conn,
{
    if let Some(stale) = job
        .stale
        .clone()
        .filter(|s| may_serve(&job.ctx.config, s, now_ms(), false))
    {
        let headers = job.req.headers().clone();
        let since = job.stale_since;
        serve_stale(
            &job.ctx,
            &job.flight,
            &mut job.leader,
            stale,
            &headers,
            since,
        );
        return;
    }
    if cap || job.ctx.config.on_wait_timeout != OnWaitTimeout::CallOrigin {
        gateway_timeout(&job.ctx.config, &job.flight, &mut job.leader);
        return;
    }
    call_and_decide(job, None).await
}

/// Answers the leader and every joiner `504 Gateway Timeout`.
fn gateway_timeout<B: Body, E>(
    config: &crate::config::Config,
    flight: &Flight,
    leader: &mut Option<oneshot::Sender<LeaderResult<B, E>>>,
) {
    let now = now_ms();
    let entry = Arc::new(Entry {
        status: StatusCode::GATEWAY_TIMEOUT,
        headers: HeaderMap::new(),
        body: bytes::Bytes::new(),
        delta: Duration::ZERO,
        stored_ms: now,
        fresh_ms: now,
        // Made by the cache, never stored (`stored` in Cache-Status).
        stale_ms: 0,
        retry_ms: 0,
    });
    serve_all(
        flight,
        leader,
        config,
        entry,
        CacheStatus::Miss,
        Arc::from([]),
        Since::Any,
    );
}

/// What the origin call and body buffering produced.
enum Called<B: Body, E> {
    Failed(E),
    /// No response head before the fill timeout.
    TimedOut,
    Responded {
        head: Box<Head>,
        body: Either<B>,
    },
}

/// A response head and what the policy and the fill made of it.
struct Head {
    parts: http::response::Parts,
    rule: ResponseRule,
    /// The entry a `304 Not Modified` revalidated: `parts` are its
    /// freshened head, the body its body.
    revalidated: Option<Arc<Entry>>,
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
        stale_since,
        mut leader,
        deadlines,
        ..
    } = job;
    let (config, shared) = (ctx.config.clone(), ctx.shared.clone());
    let counters = &config.counters;
    let started = Instant::now();
    // A fill runs at most `fill_timeout`, and never past the cap of the
    // request it answers: a takeover after a dead or timed-out fill, or a
    // restart after an invalidation, gets the time left, not a fresh
    // `fill_timeout` (the guide's "Waiting and deadlines").
    let deadline = (tokio::time::Instant::now() + config.fill_timeout).min(deadlines.cap);
    let req_headers = req.headers().clone();
    Counters::inc(&counters.fills);

    let body_limit = config.body_limit;
    let policy = config.policy.clone();
    let joined = flight.clone();
    // Under a lease, an entry being replaced is revalidated: a 304 keeps its
    // body (revalidate.rs).
    let mut req = req;
    let authorized = req.headers().contains_key(http::header::AUTHORIZATION);
    let revalidating = stale
        .clone()
        .filter(|s| lease.is_some() && crate::revalidate::ask(req.headers_mut(), s));
    let call = async move {
        // The request time of RFC 9111 §4.2.3: the response delay counts in
        // the age.
        let sent = Instant::now();
        // A background refresh owns a clone that was never polled ready.
        let res = if mode == Mode::Refresh {
            tokio::time::timeout_at(deadline, svc.oneshot(req)).await
        } else {
            let mut svc = svc;
            tokio::time::timeout_at(deadline, svc.call(req)).await
        };
        let res = match res {
            Ok(Ok(res)) => res,
            Ok(Err(err)) => return Called::Failed(err),
            Err(_) => return Called::TimedOut,
        };
        let delay = sent.elapsed();
        let (parts, body) = res.into_parts();
        if let Some(stale) = revalidating.filter(|_| parts.status == StatusCode::NOT_MODIFIED) {
            let parts = crate::revalidate::freshened(&stale, parts);
            let rule = policy.response(&parts, delay, authorized);
            let body = Buffered::Complete {
                data: stale.body.clone(),
                trailers: None,
            };
            return Called::Responded {
                head: Box::new(Head {
                    parts,
                    rule,
                    revalidated: Some(stale),
                }),
                body: Either::Buffered(body),
            };
        }
        let rule = policy.response(&parts, delay, authorized);
        let buffer_it = match &rule {
            ResponseRule::Store { .. } => true,
            // Buffer an uncacheable response only to hand it to joiners.
            ResponseRule::DontStore { shareable, .. } => *shareable && joined.joiners() > 0,
        };
        let body = if buffer_it {
            Either::Buffered(buffer(body, body_limit, deadline).await)
        } else {
            Either::Streaming(body)
        };
        Called::Responded {
            head: Box::new(Head {
                parts,
                rule,
                revalidated: None,
            }),
            body,
        }
    };
    let _registered = lease.as_ref().map(|l| LeaseRegistration::new(&shared, l));
    // Requests may join without a lookup while the origin is called (see
    // `Flight::calling`).
    let calling = shared.flights.calling(&flight);
    // What the origin answers is what it knew when it was asked: a joiner
    // that came later takes it only past the fences (`Outcome::Serve`).
    let called_at = Instant::now();
    let ended = with_lease(
        &shared,
        lease.as_ref(),
        &flight,
        &mut leader,
        call,
        config.lock_timeout,
    )
    .await;
    drop(calling);
    // A failed background refresh backs the next one off, fleet-wide, while
    // the stale entry keeps being served.
    let failed_leave = if mode == Mode::Refresh && stale.is_some() {
        Leave::Backoff {
            cap: config.policy.grace,
        }
    } else {
        Leave::Nothing
    };
    let called = match ended {
        Ended::Done(called) => called,
        Ended::Abandoned => {
            tracing::debug!(key = %crate::trace::redact(&entry_key), "fill abandoned after an invalidation");
            release(&shared, &ek, &key, lease.as_ref(), Leave::Nothing).await;
            return;
        }
        Ended::Panicked => {
            tracing::error!(key = %crate::trace::redact(&entry_key), "the inner service panicked during a fill; its lease is released and waiting requests look again");
            release(&shared, &ek, &key, lease.as_ref(), failed_leave).await;
            shared.flights.restart(&entry_key, &flight);
            send(
                &mut leader,
                Ok(plain_response(&config, StatusCode::INTERNAL_SERVER_ERROR)),
            );
            return;
        }
    };
    let delta = started.elapsed();
    counters.fill_took(delta);

    let (parts, rule, body, revalidated) = match called {
        Called::Failed(err) => {
            release(&shared, &ek, &key, lease.as_ref(), failed_leave).await;
            let now = now_ms();
            match stale.filter(|s| config.stale_if_error && may_serve(&config, s, now, true)) {
                Some(stale) => {
                    tracing::debug!(key = %crate::trace::redact(&entry_key), "origin failed, serving stale");
                    serve_stale(&ctx, &flight, &mut leader, stale, &req_headers, stale_since);
                }
                None => {
                    flight.finish(Outcome::Origin);
                    send(&mut leader, Err(err));
                }
            }
            return;
        }
        Called::TimedOut => {
            tracing::warn!(key = %crate::trace::redact(&entry_key), fill_timeout = ?config.fill_timeout, "fill timed out before the response began; abandoned");
            Counters::inc(&counters.fill_timeouts);
            release(&shared, &ek, &key, lease.as_ref(), failed_leave).await;
            let now = now_ms();
            match stale.filter(|s| may_serve(&config, s, now, true)) {
                Some(stale) => {
                    serve_stale(&ctx, &flight, &mut leader, stale, &req_headers, stale_since)
                }
                None => gateway_timeout(&config, &flight, &mut leader),
            }
            return;
        }
        Called::Responded { head, body } => {
            let Head {
                parts,
                rule,
                revalidated,
            } = *head;
            (parts, rule, body, revalidated)
        }
    };
    let origin_status = mode.origin_status(stale.as_deref(), revalidated.is_some());

    if parts.status.is_server_error()
        && config.stale_if_error
        && let Some(stale) = stale
            .clone()
            .filter(|s| may_serve(&config, s, now_ms(), true))
    {
        tracing::debug!(key = %crate::trace::redact(&entry_key), status = %parts.status, "origin answered 5xx, serving stale");
        release(&shared, &ek, &key, lease.as_ref(), failed_leave).await;
        serve_stale(&ctx, &flight, &mut leader, stale, &req_headers, stale_since);
        return;
    }

    let tags = response_tags(&parts, &config.tag_headers);
    // `age`: how old the response already was on arrival (RFC 9111 mode),
    // so that `Age` on hits counts it.
    // A response only handed to the requests that waited (`shared`) gets no
    // stale time: it was not made to be stored (`stored` in Cache-Status).
    // One stored without a lifetime (to be revalidated on every use) is
    // never fresh, whatever a reader's clock says.
    let entry_of = |data: bytes::Bytes, ttl: Duration, grace_ms: u64, age_ms: u64, shared: bool| {
        let now = now_ms();
        let (fresh_ms, stale_ms) = if shared {
            (now, 0)
        } else if ttl.is_zero() {
            (0, now)
        } else {
            let fresh_ms = now.saturating_add(duration_ms(ttl));
            (fresh_ms, fresh_ms.saturating_add(grace_ms))
        };
        let mut headers = storable_headers(&parts.headers, |n| config.is_own_header(n));
        if config.policy.rfc9111 && !headers.contains_key(http::header::DATE) {
            // RFC 9110 §6.6.1: a cache adds the `Date` it received it at
            // (conditions then compare with it: RFC 9111 §4.3.2).
            let received =
                std::time::UNIX_EPOCH + Duration::from_millis(now.saturating_sub(age_ms));
            if let Ok(date) = http::HeaderValue::try_from(httpdate::fmt_http_date(received)) {
                headers.insert(http::header::DATE, date);
            }
        }
        Arc::new(Entry {
            status: parts.status,
            headers,
            body: data,
            delta,
            stored_ms: now.saturating_sub(age_ms),
            fresh_ms,
            stale_ms,
            retry_ms: 0,
        })
    };

    match (rule, body) {
        (
            ResponseRule::Store {
                ttl,
                vary,
                grace_ms,
                age_ms,
                keep_ms,
            },
            Either::Buffered(Buffered::Complete {
                data,
                trailers: None,
            }),
        ) => {
            let entry = entry_of(data, ttl, grace_ms, age_ms, false);
            // Stored past the fences, or else what the origin said when it
            // was asked (see `Since`).
            let mut since = Since::Asked(called_at);
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
                let (lease_key, variants_set) = (lease.lease_key(), ek.variants_set());
                // A 304 without tags (as handlers answer) keeps the tags the
                // revalidated entry was stored with: FRESHEN extends the
                // entry's life, and its tag indexes (or markers) with it.
                let recovered = match &revalidated {
                    Some(_) if tags.is_empty() => shared
                        .store
                        .hget(&store_key, "tags")
                        .await
                        .map(|raw| raw.map(|raw| crate::entry::decode_tags(&raw))),
                    _ => Ok(None),
                };
                let (tags, recovered) = match recovered {
                    Ok(Some(stored)) => (stored, Ok(())),
                    Ok(None) => (tags, Ok(())),
                    Err(err) => (tags, Err(err)),
                };
                // The tags go into the entry too (see `entry::encode_tags`).
                let tagged = |mut fields: Vec<(&'static str, Vec<u8>)>| {
                    if !tags.is_empty() {
                        fields.push(("tags", crate::entry::encode_tags(&tags)));
                    }
                    fields
                };
                let args = |fields| StoreArgs {
                    entry_key: &store_key,
                    lease_key: &lease_key,
                    primary: &ek.primary,
                    variants_set: &variants_set,
                    token: &lease.token,
                    ttl: ttl.saturating_add(Duration::from_millis(keep_ms.max(grace_ms))),
                    vary: &vary_field,
                    started: lease.started,
                    namespace: &config.namespace,
                    tags: &tags,
                    max_variants: config.max_variants,
                    fields,
                    // A fill of a missing or stale entry replaces nothing a
                    // near cache serves (nobody else could store meanwhile:
                    // it holds the lease).
                    near_check: matches!(mode, Mode::Refresh | Mode::Refetch),
                };
                let sent = Instant::now();
                let written = match &revalidated {
                    // The stored tags could not be read: nothing is written
                    // (a FRESHEN without them would extend the entry's life
                    // past its tag indexes).
                    Some(_) if recovered.is_err() => recovered.map(|()| WriteBack::Fenced),
                    // A 304: the head and expiry only; the body stays in Redis.
                    Some(old) => {
                        let fields = tagged(entry.head_fields(&key, &lease.token, old.body.len()));
                        let head = crate::entry::encode_head(old, old.body.len());
                        match shared
                            .store
                            .freshen(args(fields), &head, old.body.len())
                            .await
                        {
                            Ok(Some(written)) => {
                                if written == WriteBack::Stored {
                                    Counters::inc(&counters.revalidated);
                                }
                                Ok(written)
                            }
                            Ok(None) => {
                                tracing::debug!(key = %crate::trace::redact(&store_key), "the revalidated entry was replaced or removed: storing the response in full");
                                let fields = tagged(entry.to_fields(&key, &lease.token));
                                shared.store.store(args(fields)).await
                            }
                            Err(err) => Err(err),
                        }
                    }
                    None => {
                        let fields = tagged(entry.to_fields(&key, &lease.token));
                        shared.store.store(args(fields)).await
                    }
                };
                if matches!(written, Ok(WriteBack::Stored)) {
                    since = Since::Stored(sent);
                }
                match written {
                    Ok(WriteBack::Stored) => {
                        // This process reads its own write at once (other
                        // near caches when the announcement arrives).
                        if let Some(near) = shared.near() {
                            near.drop_url_of(&store_key);
                        }
                        Counters::inc(&counters.stores);
                        tracing::debug!(key = %crate::trace::redact(&store_key), ?delta, "fill stored");
                    }
                    Ok(WriteBack::TooManyVariants) => {
                        Counters::inc(&counters.variants_over_limit);
                        tracing::debug!(key = %crate::trace::redact(&store_key), "not stored: the URL has the most variants it may have");
                    }
                    Ok(WriteBack::Fenced) => {
                        Counters::inc(&counters.fenced);
                        // Computed before an invalidation: the joiners look
                        // again rather than take it.
                        shared.flights.restart(&entry_key, &flight);
                        tracing::debug!(key = %crate::trace::redact(&store_key), "write-back fenced out: the lease was lost (invalidated or expired)");
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, key = %crate::trace::redact(&store_key), "storing the fill failed");
                        release(&shared, &ek, &key, Some(lease), Leave::Nothing).await;
                    }
                }
            }
            // A detached flight keeps its `Restart`: its joiners look again
            // instead of taking a response that was computed before an
            // invalidation. The leader's own request raced the invalidation,
            // so it may have it.
            let status = if leader.is_some() {
                origin_status
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
                since,
            );
        }
        (rule, body) => {
            let (reason, shareable) = match &rule {
                ResponseRule::DontStore { reason, shareable } => (*reason, *shareable),
                ResponseRule::Store { .. } => ("", true),
            };
            let (reason, partial) = match &body {
                Either::Buffered(Buffered::TooLarge { .. }) => ("too large", false),
                Either::Buffered(Buffered::Unfinished { .. }) => ("fill timeout", true),
                Either::Buffered(Buffered::Failed { .. }) => ("body error", true),
                Either::Buffered(Buffered::Complete {
                    trailers: Some(_), ..
                }) => ("trailers", false),
                _ => (reason, false),
            };
            tracing::debug!(key = %crate::trace::redact(&entry_key), reason, "response not cacheable");
            // A pass marker only for what is uncacheable by nature, on the
            // variant the response belongs to; none while a stale entry can
            // be served instead, nor for a body that failed or timed out.
            let vary = vary_names(&parts.headers);
            let vary_field = vary.as_deref().map(encode_vary).unwrap_or_default();
            let filled = match vary.as_deref() {
                Some(names) if !names.is_empty() => ek.variant(names, &req_headers),
                _ => lease.as_ref().map_or_else(String::new, |l| l.key.clone()),
            };
            let leave = if mode == Mode::Refresh && stale.is_some() {
                failed_leave
            } else if partial
                || stale.is_some()
                || config.pass_ttl.is_zero()
                || !uncacheable_by_nature(reason, parts.status)
            {
                Leave::Nothing
            } else {
                Leave::Pass {
                    filled: &filled,
                    vary: &vary_field,
                    ttl: config.pass_ttl,
                }
            };
            release(&shared, &ek, &key, lease.as_ref(), leave).await;
            match body {
                Either::Buffered(Buffered::Complete {
                    data,
                    trailers: None,
                }) if shareable => {
                    let entry = entry_of(data.clone(), Duration::ZERO, 0, 0, true);
                    // A 5xx tells of the origin, not of the resource: every
                    // joiner shares it (a failing origin gets one call per
                    // round, not one per waiter).
                    let since = if entry.status.is_server_error() {
                        Since::Any
                    } else {
                        Since::Asked(called_at)
                    };
                    flight.finish(Outcome::Serve {
                        entry,
                        status: origin_status,
                        vary: vary_values(&vary.unwrap_or_default(), &req_headers),
                        since,
                    });
                    send_response(
                        &mut leader,
                        &config,
                        parts,
                        FenceBody::full(data),
                        origin_status,
                    );
                }
                Either::Buffered(Buffered::Unfinished { prefix, rest }) => {
                    // The response is its leader's own; the others must not
                    // wait for an endless body.
                    Counters::inc(&counters.fill_timeouts);
                    tracing::warn!(key = %crate::trace::redact(&entry_key), fill_timeout = ?config.fill_timeout, "fill timed out while reading the body; the rest streams to its own client");
                    match stale.filter(|s| may_serve(&config, s, now_ms(), true)) {
                        Some(stale) => {
                            Counters::inc(&counters.stale);
                            let vary = varies_on(&stale.headers, &req_headers);
                            flight.finish(Outcome::Serve {
                                entry: stale,
                                status: CacheStatus::Stale,
                                vary,
                                since: stale_since,
                            });
                        }
                        None => gateway_timeout::<ResB, S::Error>(&config, &flight, &mut None),
                    }
                    send_response(
                        &mut leader,
                        &config,
                        parts,
                        FenceBody::rest(prefix, rest),
                        origin_status,
                    );
                }
                other => {
                    flight.finish(Outcome::Origin);
                    let body = match other {
                        Either::Buffered(Buffered::Complete { data, trailers }) => {
                            FenceBody::buffered(data, trailers, None)
                        }
                        Either::Buffered(Buffered::TooLarge { prefix, rest }) => {
                            FenceBody::rest(prefix, rest)
                        }
                        Either::Buffered(Buffered::Failed { data, error }) => {
                            FenceBody::buffered(data, None, Some(error))
                        }
                        Either::Buffered(Buffered::Unfinished { prefix, rest }) => {
                            FenceBody::rest(prefix, rest)
                        }
                        Either::Streaming(body) => FenceBody::inner(body),
                    };
                    send_response(&mut leader, &config, parts, body, origin_status);
                }
            }
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
    since: Since,
) {
    Counters::inc(&ctx.config.counters.stale);
    let vary = varies_on(&stale.headers, req_headers);
    serve_all(
        flight,
        leader,
        &ctx.config,
        stale,
        CacheStatus::Stale,
        vary,
        since,
    );
}

/// Hands an entry to the joiners and to the leader.
fn serve_all<B: Body, E>(
    flight: &Flight,
    leader: &mut Option<oneshot::Sender<LeaderResult<B, E>>>,
    config: &crate::config::Config,
    entry: Arc<Entry>,
    status: CacheStatus,
    vary: Arc<[(HeaderName, Vec<u8>)]>,
    since: Since,
) {
    let res = from_entry(config, &entry, status, false, now_ms());
    flight.finish(Outcome::Serve {
        entry,
        status,
        vary,
        since,
    });
    send(leader, Ok(res));
}

fn send_response<B: Body, E>(
    leader: &mut Option<oneshot::Sender<LeaderResult<B, E>>>,
    config: &crate::config::Config,
    parts: http::response::Parts,
    body: FenceBody<B>,
    status: CacheStatus,
) {
    let mut res = Response::from_parts(parts, body);
    crate::response::outgoing(config, res.headers_mut(), status);
    crate::response::keep_status(config, &mut res, status);
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
