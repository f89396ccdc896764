//! A fill's lease on its key: taking part in shutdown, renewal while the
//! origin works, release with an optional pass marker.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::oneshot;

use crate::bounds::Conn;
use crate::flight::Flight;
use crate::key::{EntryKey, lease_of};
use crate::shared::Shared;
use crate::stats::Counters;
use crate::store::ReleaseArgs;

/// The lease a fill holds on the key it fills.
pub(crate) struct Lease {
    pub(crate) key: String,
    pub(crate) token: String,
    /// The Redis time it was taken (µs).
    pub(crate) started: u64,
}

impl Lease {
    pub(crate) fn lease_key(&self) -> String {
        lease_of(&self.key)
    }
}

/// Lists a lease in the shared table while its fill runs, so that
/// [`FenceHandle::shutdown`](crate::FenceHandle::shutdown) can release the
/// leases of fills that don't finish in time. Dropping it removes the entry
/// only while it still holds this fill's token: a detached old fill that
/// ends after a new fill of the same key registered never drops the new
/// fill's registration.
pub(crate) struct LeaseRegistration<'a, C> {
    shared: &'a Shared<C>,
    key: String,
    token: String,
}

impl<'a, C> LeaseRegistration<'a, C> {
    pub(crate) fn new(shared: &'a Shared<C>, lease: &Lease) -> Self {
        let key = lease.lease_key();
        shared
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), lease.token.clone());
        Self {
            shared,
            key,
            token: lease.token.clone(),
        }
    }
}

impl<C> Drop for LeaseRegistration<'_, C> {
    fn drop(&mut self) {
        let mut leases = self.shared.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.get(&self.key) == Some(&self.token) {
            leases.remove(&self.key);
        }
    }
}

/// How a fill's origin call under its lease ended.
pub(crate) enum Ended<T> {
    /// The call finished.
    Done(T),
    /// The fill was detached by an invalidation and nobody waits for it.
    Abandoned,
    /// The inner service (or its body) panicked.
    Panicked,
}

/// Runs `fut` (the origin call and the buffering of its body) while renewing
/// the lease, so a slow but live fill keeps it. The call is abandoned (the
/// future dropped) when the fill was detached by an invalidation and nobody
/// waits for it any more. A panic in the call is caught, so that the fill
/// can release its lease at once instead of leaving it to expire.
pub(crate) async fn with_lease<C, F, T>(
    shared: &Shared<C>,
    lease: Option<&Lease>,
    flight: &Flight,
    leader: &mut Option<oneshot::Sender<T>>,
    fut: F,
    lock_timeout: Duration,
) -> Ended<F::Output>
where
    C: Conn,
    F: Future,
{
    let mut fut = pin!(AssertUnwindSafe(fut).catch_unwind());
    let period = (lock_timeout / 3).max(Duration::from_millis(5));
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let abandoned = async {
        loop {
            if flight.is_detached() {
                match leader.as_mut() {
                    Some(tx) => tx.closed().await,
                    None => return,
                }
                return;
            }
            flight.detach.notified().await;
        }
    };
    let mut abandoned = pin!(abandoned);
    loop {
        tokio::select! {
            out = &mut fut => return match out {
                Ok(out) => Ended::Done(out),
                Err(_) => Ended::Panicked,
            },
            _ = &mut abandoned => return Ended::Abandoned,
            _ = renew.tick(), if lease.is_some() => {
                if let Some(lease) = lease {
                    match shared.store.extend(&lease.lease_key(), &lease.token, lock_timeout).await {
                        Ok(true) => {}
                        Ok(false) => tracing::debug!(key = %crate::trace::redact(&lease.key), "fill lease lost while filling; its write-back will be refused"),
                        Err(err) => tracing::debug!(error = %err, "renewing the fill lease failed"),
                    }
                }
            }
        }
    }
}

/// What a lease given up without a store leaves behind.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Leave<'a> {
    /// Nothing: the next request for the key is coalesced as usual.
    Nothing,
    /// A pass marker (hit-for-miss) on `filled`, the key of the entry or
    /// variant the response belongs to, for `ttl`; `vary` holds the
    /// response's encoded `Vary` names ('' for none).
    Pass {
        filled: &'a str,
        vary: &'a str,
        ttl: Duration,
    },
    /// The background refresh of the entry under the lease failed: the next
    /// one waits (1 s, doubling up to `cap`), fleet-wide.
    Backoff { cap: Duration },
}

/// The first pause after a failed background refresh.
pub(crate) const REFRESH_BACKOFF: Duration = Duration::from_secs(1);

/// Gives the lease up (if held), leaving what `leave` says.
pub(crate) async fn release<C>(
    shared: &Shared<C>,
    ek: &EntryKey,
    url_key: &str,
    lease: Option<&Lease>,
    leave: Leave<'_>,
) where
    C: Conn,
{
    let Some(lease) = lease else {
        return;
    };
    let lease_key = lease.lease_key();
    let variants_set = ek.variants_set();
    let mut args = ReleaseArgs::plain(&lease_key, &ek.primary, &lease.token);
    args.filled = &lease.key;
    args.variants_set = &variants_set;
    args.url_key = url_key;
    match leave {
        Leave::Nothing => {}
        Leave::Pass { filled, vary, ttl } => {
            args.filled = filled;
            args.vary = vary;
            args.pass = ttl;
        }
        Leave::Backoff { cap } => args.backoff = (REFRESH_BACKOFF, cap.max(REFRESH_BACKOFF)),
    }
    match shared.store.release(args).await {
        Ok(Some(true)) => {
            Counters::inc(&shared.counters.pass_markers);
            tracing::debug!(key = %crate::trace::redact(&lease.key), "pass marker set");
        }
        Ok(_) => {}
        Err(err) => {
            tracing::debug!(error = %err, "releasing the fill lease failed; it expires by itself")
        }
    }
}

/// A random lease token.
pub(crate) fn new_token() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}
