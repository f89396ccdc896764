//! Redis calls of the queue and its workers, under a timeout.

use std::time::Duration;

use redis::FromRedisValue;
use redis::aio::ConnectionLike;

use crate::error::{FenceError, timed};

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
