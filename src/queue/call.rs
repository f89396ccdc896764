//! Redis calls of the queue and its workers, under a timeout.

use std::time::Duration;

use redis::FromRedisValue;
use redis::aio::ConnectionLike;

use crate::error::FenceError;

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

pub(super) async fn timed<T>(
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, FenceError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(FenceError::redis(err)),
        Err(_) => Err(FenceError::timeout()),
    }
}

pub(super) fn is_code(err: &FenceError, code: &str) -> bool {
    use std::error::Error as _;
    err.source()
        .and_then(|s| s.downcast_ref::<redis::RedisError>())
        .is_some_and(|e| e.code() == Some(code))
}

pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
