//! The crate's error type.

use std::fmt;

/// An error from a [`FenceHandle`](crate::FenceHandle) operation or from
/// setting a cache up ([`FenceCacheBuilder::build`](crate::FenceCacheBuilder::build)).
///
/// Requests never see this type: a cache failure on the request path turns
/// into a pass-through to the inner service. It is returned by the handle's
/// invalidation calls, whose caller must know whether the invalidation
/// happened.
///
/// ```no_run
/// # async fn doc(handle: cachefence::FenceHandle) {
/// match handle.invalidate_tag("product:42").await {
///     Ok(removed) => println!("{removed} entries removed"),
///     Err(e) if e.is_timeout() || e.is_circuit_open() => eprintln!("retry later: {e}"),
///     Err(e) => eprintln!("invalidation failed: {e}"),
/// }
/// # }
/// ```
pub struct FenceError {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Redis(redis::RedisError),
    Timeout,
    CircuitOpen,
    InvalidInput(&'static str),
    /// A misconfiguration `FenceCacheBuilder::build` rejected.
    Config(String),
    /// A walk over a Redis Cluster could not cover a node (named within);
    /// `cause`: the failure that stopped it, when it was one (a timeout,
    /// the breaker open), so that `is_timeout`/`is_circuit_open` say so.
    WalkIncomplete {
        what: String,
        cause: Option<Box<FenceError>>,
    },
    /// `WAIT` after an invalidation: fewer replicas acknowledged its
    /// writes than asked for.
    NotReplicated {
        acked: u64,
        wanted: u32,
    },
}

impl FenceError {
    pub(crate) fn redis(err: redis::RedisError) -> Self {
        Self {
            kind: Kind::Redis(err),
        }
    }

    pub(crate) fn timeout() -> Self {
        Self {
            kind: Kind::Timeout,
        }
    }

    pub(crate) fn walk_incomplete(what: String) -> Self {
        Self {
            kind: Kind::WalkIncomplete { what, cause: None },
        }
    }

    /// A walk that could not cover a node because of `cause`.
    pub(crate) fn walk_incomplete_by(what: String, cause: FenceError) -> Self {
        Self {
            kind: Kind::WalkIncomplete {
                what,
                cause: Some(Box::new(cause)),
            },
        }
    }

    /// The failure that stopped an incomplete walk.
    fn walk_cause(&self) -> Option<&FenceError> {
        match &self.kind {
            Kind::WalkIncomplete { cause, .. } => cause.as_deref(),
            _ => None,
        }
    }

    pub(crate) fn not_replicated(acked: u64, wanted: u32) -> Self {
        Self {
            kind: Kind::NotReplicated { acked, wanted },
        }
    }

    pub(crate) fn circuit_open() -> Self {
        Self {
            kind: Kind::CircuitOpen,
        }
    }

    pub(crate) fn config(message: String) -> Self {
        Self {
            kind: Kind::Config(message),
        }
    }

    pub(crate) fn invalid_input(what: &'static str) -> Self {
        Self {
            kind: Kind::InvalidInput(what),
        }
    }

    /// The invalidation was applied on the primary, but fewer replicas
    /// than [`FenceCacheBuilder::replicated_fences`](crate::FenceCacheBuilder::replicated_fences)
    /// asks for acknowledged its writes in time: a failover now could
    /// lose it. Invalidating again is safe.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) {
    /// if let Err(err) = handle.invalidate_path("/products/42").await {
    ///     if err.is_not_replicated() {
    ///         // applied on the primary only: retry later
    ///     }
    /// }
    /// # }
    /// ```
    pub fn is_not_replicated(&self) -> bool {
        matches!(self.kind, Kind::NotReplicated { .. })
    }

    /// Redis answered with an error, or the connection failed.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) {
    /// match handle.invalidate_tag("product:42").await {
    ///     Err(e) if e.is_redis() => eprintln!("Redis failed: {e}"),
    ///     _ => {}
    /// }
    /// # }
    /// ```
    pub fn is_redis(&self) -> bool {
        matches!(self.kind, Kind::Redis(_))
    }

    /// Redis did not answer within the configured timeout (also for a
    /// prefix, tag or namespace walk on a Redis Cluster that could not
    /// cover a node because a call to it timed out: its message names the
    /// node).
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) {
    /// if let Err(e) = handle.invalidate_tag("product:42").await {
    ///     if e.is_timeout() {
    ///         eprintln!("Redis answered too late; retry later");
    ///     }
    /// }
    /// # }
    /// ```
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::Timeout)
            || matches!(&self.kind, Kind::Redis(e) if e.is_timeout())
            || self.walk_cause().is_some_and(Self::is_timeout)
    }

    /// The circuit breaker is open after repeated failures, so the command
    /// was not sent (also for a walk on a Redis Cluster that stopped at a
    /// node for that reason: its message names the node).
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) {
    /// if let Err(e) = handle.invalidate_tag("product:42").await {
    ///     if e.is_circuit_open() {
    ///         eprintln!("Redis is failing: nothing was sent");
    ///     }
    /// }
    /// # }
    /// ```
    pub fn is_circuit_open(&self) -> bool {
        matches!(self.kind, Kind::CircuitOpen)
            || self.walk_cause().is_some_and(Self::is_circuit_open)
    }

    /// An argument was rejected (for example an empty prefix).
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) {
    /// let err = handle.invalidate_prefix("").await.unwrap_err();
    /// assert!(err.is_invalid_input());
    /// # }
    /// ```
    pub fn is_invalid_input(&self) -> bool {
        matches!(self.kind, Kind::InvalidInput(_))
    }

    /// [`FenceCacheBuilder::build`](crate::FenceCacheBuilder::build)
    /// rejected a setting, or settings that don't go together; the message
    /// names the setting and the fix.
    ///
    /// ```no_run
    /// # async fn doc(conn: redis::aio::ConnectionManager) {
    /// use std::time::Duration;
    /// let built = cachefence::FenceCache::builder(conn).redis_timeout(Duration::ZERO).build();
    /// assert!(built.is_err_and(|err| err.is_config()));
    /// # }
    /// ```
    pub fn is_config(&self) -> bool {
        matches!(self.kind, Kind::Config(_))
    }

    /// The error code Redis answered with (`WRONGTYPE`, `NOGROUP`, ...).
    pub(crate) fn redis_code(&self) -> Option<&str> {
        match &self.kind {
            Kind::Redis(e) => e.code(),
            _ => None,
        }
    }

    /// The `host:port` of a Redis Cluster `MOVED` redirection.
    pub(crate) fn moved_to(&self) -> Option<String> {
        match &self.kind {
            Kind::Redis(e) if e.code() == Some("MOVED") => {
                e.redirect_node().map(|(addr, _)| addr.to_owned())
            }
            _ => None,
        }
    }

    /// Whether this failure says the data's Redis can't be reached right
    /// now, so trying again later may succeed: a transport failure, a
    /// timeout, the breaker open, a cluster redirection or failover reply
    /// (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`,
    /// `READONLY`), or a walk that could not reach a node.
    pub(crate) fn is_unavailable(&self) -> bool {
        self.is_transport()
            || self.is_circuit_open()
            || self.is_timeout()
            || matches!(
                self.kind,
                Kind::WalkIncomplete { .. } | Kind::NotReplicated { .. }
            )
            || matches!(
                self.redis_code(),
                Some(
                    "MOVED"
                        | "ASK"
                        | "TRYAGAIN"
                        | "CLUSTERDOWN"
                        | "MASTERDOWN"
                        | "LOADING"
                        | "READONLY"
                )
            )
    }

    /// Whether this failure says the Redis server is unreachable or
    /// unhealthy, as opposed to a command being refused (a wrong type, a
    /// full memory).
    pub(crate) fn is_transport(&self) -> bool {
        match &self.kind {
            Kind::Timeout => true,
            Kind::Redis(e) => !matches!(e.kind(), redis::ErrorKind::Server(_)),
            Kind::CircuitOpen
            | Kind::InvalidInput(_)
            | Kind::Config(_)
            | Kind::WalkIncomplete { .. }
            | Kind::NotReplicated { .. } => false,
        }
    }
}

/// Awaits one Redis call for at most `timeout`.
pub(crate) async fn timed<T>(
    timeout: std::time::Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, FenceError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(FenceError::redis(err)),
        Err(_) => Err(FenceError::timeout()),
    }
}

impl fmt::Debug for FenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FenceError").field(&self.kind).finish()
    }
}

impl fmt::Display for FenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Redis(e) => write!(f, "redis error: {e}"),
            Kind::Timeout => f.write_str("redis did not answer in time"),
            Kind::CircuitOpen => f.write_str("redis circuit breaker is open"),
            Kind::InvalidInput(what) => write!(f, "invalid input: {what}"),
            Kind::Config(what) => write!(f, "invalid cache configuration: {what}"),
            Kind::WalkIncomplete { what, .. } => f.write_str(what),
            Kind::NotReplicated { acked, wanted } => write!(
                f,
                "the invalidation was applied on the primary but acknowledged by {acked} of {wanted} replicas in time"
            ),
        }
    }
}

impl std::error::Error for FenceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Redis(e) => Some(e),
            Kind::WalkIncomplete {
                cause: Some(cause), ..
            } => Some(cause.as_ref()),
            _ => None,
        }
    }
}

impl From<redis::RedisError> for FenceError {
    fn from(err: redis::RedisError) -> Self {
        Self::redis(err)
    }
}

#[cfg(test)]
mod tests {
    use super::FenceError;
    use redis::{ErrorKind, RedisError, ServerErrorKind};

    fn server(kind: ServerErrorKind, code: &'static str, detail: &str) -> FenceError {
        FenceError::redis(RedisError::from((
            ErrorKind::Server(kind),
            code,
            detail.to_owned(),
        )))
    }

    /// Cluster redirections and retry replies are Redis answering: the
    /// breaker does not count them (only transport failures and timeouts).
    #[test]
    fn redirections_are_not_transport_failures() {
        for (kind, code) in [
            (ServerErrorKind::Moved, "MOVED"),
            (ServerErrorKind::Ask, "ASK"),
            (ServerErrorKind::TryAgain, "TRYAGAIN"),
            (ServerErrorKind::ClusterDown, "CLUSTERDOWN"),
        ] {
            let err = server(kind, code, "3999 127.0.0.1:6381");
            assert!(!err.is_transport(), "{code}");
            assert!(err.is_unavailable(), "{code}");
        }
        assert!(FenceError::timeout().is_transport());
    }

    /// A walk stopped at a node by a timeout or the open breaker names the
    /// node and says why through `is_timeout` / `is_circuit_open`.
    #[test]
    fn a_walk_stopped_by_a_timeout_or_the_breaker_says_so() {
        let by_timeout = FenceError::walk_incomplete_by("node a".to_owned(), FenceError::timeout());
        assert!(by_timeout.is_timeout() && !by_timeout.is_circuit_open());
        assert!(!by_timeout.is_transport() && by_timeout.is_unavailable());
        assert_eq!(by_timeout.to_string(), "node a");
        assert!(std::error::Error::source(&by_timeout).is_some());
        let by_breaker =
            FenceError::walk_incomplete_by("node b".to_owned(), FenceError::circuit_open());
        assert!(by_breaker.is_circuit_open() && !by_breaker.is_timeout());
        let plain = FenceError::walk_incomplete("node c".to_owned());
        assert!(!plain.is_timeout() && !plain.is_circuit_open() && plain.is_unavailable());
    }
}
