//! Redis calls of the queue and its workers, under a timeout, and the
//! bounded retry of transient failures that [`enqueue`] uses.
//!
//! [`enqueue`]: super::InvalidationQueue::enqueue

use std::future::Future;
use std::time::{Duration, Instant};

use redis::FromRedisValue;
use redis::aio::ConnectionLike;

use crate::backoff::jittered;
use crate::error::{FenceError, timed};

/// The first pause between two tries of a transient failure; it doubles
/// up to [`RETRY_CAP`], with jitter.
const RETRY_BASE: Duration = Duration::from_millis(25);
const RETRY_CAP: Duration = Duration::from_millis(500);

/// Runs one command on `conn` under `timeout`.
pub(super) async fn call<T, C>(
    conn: &C,
    timeout: Duration,
    cmd: &redis::Cmd,
) -> Result<T, FenceError>
where
    T: FromRedisValue,
    C: ConnectionLike + Clone + Send,
{
    let mut conn = conn.clone();
    timed(timeout, cmd.query_async(&mut conn)).await
}

/// Whether a failed call may succeed if sent again shortly: the
/// connection failed or timed out, or the server is loading its data set,
/// failing over or read-only during a failover.
pub(super) fn is_transient(err: &FenceError) -> bool {
    err.is_transport()
        || matches!(
            err.redis_code(),
            Some("LOADING" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY")
        )
}

/// Runs `attempt` until it succeeds, fails for good, or `budget` has
/// passed: a transient failure is tried again after an exponential backoff
/// with jitter, as long as the pause ends within the budget. Returns the
/// result and the number of tries.
pub(super) async fn retry<T, F, Fut>(
    budget: Duration,
    mut attempt: F,
) -> (Result<T, FenceError>, u32)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, FenceError>>,
{
    let start = Instant::now();
    let mut tries = 0u32;
    loop {
        tries = tries.saturating_add(1);
        let err = match attempt().await {
            Ok(value) => return (Ok(value), tries),
            Err(err) => err,
        };
        let pause = jittered(RETRY_BASE, RETRY_CAP, tries);
        if !is_transient(&err) || start.elapsed() + pause > budget {
            return (Err(err), tries);
        }
        tracing::debug!(error = %err, tries, retry_in_ms = pause.as_millis() as u64, "invalidation queue: retrying a transient failure");
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn transient_failures_are_retried_within_the_budget_and_others_are_not() {
        let budget = Duration::from_millis(300);
        let start = Instant::now();
        let (result, tries) =
            retry::<(), _, _>(budget, || async { Err(FenceError::timeout()) }).await;
        assert!(result.unwrap_err().is_timeout());
        assert!(tries >= 3, "{tries}");
        // Bounded: no pause ends past the budget (the calls themselves are
        // instant here).
        assert!(
            start.elapsed() < budget + Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );

        let (result, tries) =
            retry::<(), _, _>(budget, || async { Err(FenceError::invalid_input("no")) }).await;
        assert!(result.unwrap_err().is_invalid_input());
        assert_eq!(tries, 1);

        let mut n = 0;
        let (result, tries) = retry(budget, || {
            n += 1;
            let fail = n < 3;
            async move {
                if fail {
                    Err(FenceError::timeout())
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        assert_eq!((result.unwrap(), tries), (7, 3));
    }
}
