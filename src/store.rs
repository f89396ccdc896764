//! Every Redis command and Lua script the crate sends.
//!
//! Each call is bounded by the configured timeout and goes through a circuit
//! breaker: after `threshold` transport failures in a row (timeouts, refused
//! or dropped connections) no command is sent for a cool-down, then one probe
//! is let through. Errors that Redis *answers* with (a wrong type, out of
//! memory, read-only) do not trip the breaker: the server is alive.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use redis::aio::ConnectionLike;

pub(crate) use crate::breaker::Breaker;
use crate::entry::{FORMAT_VERSION, LOOKUP_FIELDS, Raw, duration_ms, now_ms};
use crate::error::{FenceError, timed};
use crate::keep::keep_of;
use crate::key::{namespace_prefix, tag_keys, tag_marker};
use crate::scripts::Scripts;

/// The names of the pub/sub channels, in one place (ARCHITECTURE.md,
/// "Pub/sub"). Every channel of a namespace starts with the escaped
/// namespace and `|#`, as its keys start with the escaped namespace and `|`
/// (the escaping encodes `#`, so no entry key looks like a channel), so one
/// ACL channel pattern `&<namespace>|#*` covers a namespace's channels.
///
/// - `<ns>|#wake`: a fill of the namespace stored or released a key (the
///   message is its lease key), with `PUBLISH` on a single server;
/// - `<ns>|#wake:{<digest>}`: the same on a Redis Cluster, per entry and in
///   the entry's slot (its hash tag), with `SPUBLISH`: only the shard that
///   owns the key carries it, to the processes waiting on that entry;
/// - `<ns>|#invalidate`: an invalidation (`<kind>:<sender id>:<key or
///   prefix>`), with `PUBLISH` everywhere (every process of the namespace
///   listens: its in-flight fills of the key restart);
/// - `<ns>|#near`: a write of an entry marked for near caches (`<ack tag>
///   <key>`, the tag `<sender id>:<seq>` or `-`), `PUBLISH`ed by the
///   scripts; only processes with a near cache subscribe;
/// - `<ns>|#ack:<sender id>`: a near cache dropped what the sender's
///   announcement `<seq>` named (the message is `<seq>`).
pub(crate) mod channels {
    use crate::key::namespace_prefix;

    /// The wake-up channel of a namespace (single server).
    pub(crate) fn wake(namespace: &str) -> String {
        let mut out = namespace_prefix(namespace);
        out.push_str("#wake");
        out
    }

    /// The invalidation channel of a namespace.
    pub(crate) fn invalidate(namespace: &str) -> String {
        let mut out = namespace_prefix(namespace);
        out.push_str("#invalidate");
        out
    }

    /// The escaped namespace and `|` a key of this crate starts with.
    fn prefix_of(key: &str) -> &str {
        key.find('|').map_or("", |i| &key[..=i])
    }

    /// The invalidation channel of the namespace `key` is in.
    pub(crate) fn invalidate_of_key(key: &str) -> String {
        format!("{}#invalidate", prefix_of(key))
    }

    /// The channel a store or release of `key` (an entry, variant or lease
    /// key) announces itself on: the namespace's, or with `sharded` the
    /// entry's own channel in its slot (`None` when the key has no hash
    /// tag, which no key of this crate lacks).
    pub(crate) fn wake_of_key(key: &str, sharded: bool) -> Option<String> {
        if !sharded {
            return Some(format!("{}#wake", prefix_of(key)));
        }
        // Redis hashes the first `{...}` of a name; the key escaping
        // encodes braces, so the first one is the digest's.
        let open = key.find('{')?;
        let close = open + key[open..].find('}')?;
        Some(format!("{}#wake:{}", prefix_of(key), &key[open..=close]))
    }

    /// The near-cache channel of a namespace: writes of entries marked
    /// for near caches (`<ack tag> <key>`, `PUBLISH`ed by the scripts).
    pub(crate) fn near(namespace: &str) -> String {
        let mut out = namespace_prefix(namespace);
        out.push_str("#near");
        out
    }

    /// The near-cache channel of a namespace on a Redis Cluster: sharded,
    /// in the slot of its own hash tag (`{<namespace>|#near}`), so one
    /// primary counts every near cache's subscription; the invalidations
    /// `SPUBLISH` their announcements there (`<ack tag> <key>`).
    #[cfg_attr(not(feature = "cluster-async"), allow(dead_code))]
    pub(crate) fn near_shard(namespace: &str) -> String {
        let prefix = namespace_prefix(namespace);
        format!("{prefix}#near:{{{prefix}#near}}")
    }

    /// [`near_shard`] for the namespace `key` is in.
    pub(crate) fn near_shard_of_key(key: &str) -> String {
        let prefix = prefix_of(key);
        format!("{prefix}#near:{{{prefix}#near}}")
    }

    /// The channel the near caches acknowledge `sender`'s announcements on
    /// (the message: the announcement's sequence number).
    pub(crate) fn ack(namespace: &str, sender: u64) -> String {
        let mut out = namespace_prefix(namespace);
        out.push_str("#ack:");
        out.push_str(&sender.to_string());
        out
    }

    /// [`ack`] for the namespace `key` is in.
    pub(crate) fn ack_of_key(key: &str, sender: &str) -> String {
        format!("{}#ack:{sender}", prefix_of(key))
    }

    /// Whether `channel` is a near-cache channel.
    pub(crate) fn is_near(channel: &str) -> bool {
        channel.ends_with("#near") || channel.contains("#near:{")
    }

    /// Whether `channel` is an acknowledgement channel.
    pub(crate) fn is_ack(channel: &str) -> bool {
        channel.contains("#ack:")
    }

    /// Whether `channel` is a wake-up channel (else an invalidation one).
    pub(crate) fn is_wake(channel: &str) -> bool {
        channel.ends_with("#wake") || channel.contains("#wake:{")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn channels_are_per_namespace_and_sharded_ones_share_the_entry_slot() {
            assert_eq!(wake("shop:"), "shop:|#wake");
            assert_eq!(invalidate("a|b"), "a%7Cb|#invalidate");
            let lease = "shop:|/p/1:{0123abcd}:v:99:lease";
            assert_eq!(wake_of_key(lease, false).as_deref(), Some("shop:|#wake"));
            assert_eq!(
                wake_of_key(lease, true).as_deref(),
                Some("shop:|#wake:{0123abcd}")
            );
            assert_eq!(invalidate_of_key(lease), "shop:|#invalidate");
            assert!(is_wake("shop:|#wake") && is_wake("shop:|#wake:{0123abcd}"));
            assert!(!is_wake("shop:|#invalidate"));
            assert_eq!(near_shard("shop:"), "shop:|#near:{shop:|#near}");
            assert_eq!(near_shard_of_key(lease), near_shard("shop:"));
            assert!(is_near(&near_shard("shop:")) && is_near(&near("shop:")));
            assert!(!is_near(&wake_of_key(lease, true).unwrap_or_default()));
        }
    }
}

/// What the near-cache announcements of one invalidation reached: how many
/// listeners heard them (`PUBLISH` receivers: acknowledgements to wait for)
/// and how many marked entries were announced.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Announced {
    pub(crate) heard: u64,
    pub(crate) entries: u64,
}

impl Announced {
    fn add(&mut self, heard: u64, entries: u64) {
        self.heard += heard;
        self.entries += entries;
    }
}

/// The sorted set of a namespace's live near caches
/// (`<namespace>|#nearcaches`): each listener whose near cache is in use
/// registers its cache id, scored by when the registration expires (its
/// clock, ms), and renews it while its subscription answers its probes
/// (`wake::probe`). An invalidation compares the acknowledgements it heard
/// with the registrations.
pub(crate) fn near_registry(namespace: &str) -> String {
    let mut key = namespace_prefix(namespace);
    key.push_str("#nearcaches");
    key
}

/// [`near_registry`] of the namespace `key` is in.
pub(crate) fn near_registry_of(key: &str) -> String {
    let prefix = key.find('|').map_or("", |i| &key[..=i]);
    format!("{prefix}#nearcaches")
}

/// Added to the longest fill in a fence's lifetime ([`Store::fence_ttl`]),
/// besides two Redis timeouts: the time between the Redis clock reading a
/// fill starts with and its origin call, and between the call's end and
/// its write-back.
const FENCE_MARGIN: Duration = Duration::from_secs(1);
/// Prefix fences kept per namespace before they are folded into one fence
/// on the whole namespace.
const MAX_PREFIX_FENCES: usize = 1024;
/// Variants removed (or marked stale) per script call.
const VARIANT_BATCH: usize = 256;

/// The fence of one URL (a primary key): the Redis time of its last path
/// or key invalidation. In the entry's slot.
pub(crate) fn url_fence_of(primary: &str) -> String {
    // Of the URL, not of one host's dimension of it: a path invalidation
    // (every host) and a host's own invalidation both fence every fill of
    // the URL (fencing a host's neighbours too is safe: their fills look
    // again).
    format!("{}:fence", crate::key::url_of(primary))
}

/// The sorted set of a namespace's prefix fences (`<namespace>|#fences`;
/// `#` is escaped in entry keys, so no entry key looks like it).
pub(crate) fn prefix_fences_of(namespace: &str) -> String {
    let mut key = namespace_prefix(namespace);
    key.push_str("#fences");
    key
}

/// What became of a write-back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteBack {
    /// The entry was written.
    Stored,
    /// Refused: the lease was lost, or an invalidation fenced the fill out.
    Fenced,
    /// Not written: the URL already has the most variants it may have.
    TooManyVariants,
}

/// What the acquire script found.
#[derive(Debug)]
pub(crate) enum Acquired {
    Pass,
    Vary(Vec<u8>),
    Hit(Vec<(Vec<u8>, Vec<u8>)>),
    /// The lease was won: the fields of a stale entry (if any), and the
    /// Redis time it was taken.
    Won(Vec<(Vec<u8>, Vec<u8>)>, u64),
    Held(Duration),
}

/// A lookup that takes the fill lease when it finds nothing fresh.
pub(crate) struct AcquireArgs<'a> {
    pub(crate) key: &'a str,
    pub(crate) lease: &'a str,
    pub(crate) token: &'a str,
    /// How long the lease lives.
    pub(crate) lease_for: Duration,
    /// Take the lease whatever is stored (a refresh, a repair).
    pub(crate) refresh: bool,
    /// The `stored` time of the entry a background refresh was decided on.
    pub(crate) decided_on: Option<u64>,
    /// The caller listens for wake-ups: a `held` reply marks the lease.
    pub(crate) listening: bool,
    /// The caller holds the stale entry already: `won` need not carry it.
    pub(crate) have_stale: bool,
}

/// A write of one entry.
pub(crate) struct StoreArgs<'a> {
    pub(crate) entry_key: &'a str,
    pub(crate) lease_key: &'a str,
    pub(crate) primary: &'a str,
    pub(crate) variants_set: &'a str,
    pub(crate) token: &'a str,
    pub(crate) ttl: Duration,
    pub(crate) vary: &'a str,
    /// The Redis time the lease was taken (µs), for the fences.
    pub(crate) started: u64,
    /// The namespace, and the tags of the response.
    pub(crate) namespace: &'a str,
    pub(crate) tags: &'a [String],
    /// The most variants one URL may have.
    pub(crate) max_variants: usize,
    pub(crate) fields: Vec<(&'static str, Vec<u8>)>,
    /// Whether the entry replaced may be fresh and held by near caches (a
    /// refresh or refetch): then the write announces it if it is marked.
    pub(crate) near_check: bool,
}

/// The keys a fenced write-back names besides the entry's own: computed
/// once per write, outside the retried call.
struct FencedWriteKeys {
    url_fence: String,
    /// On a cluster the prefix fences live in another slot: a stand-in key
    /// of the entry's slot takes their place, and is not read.
    prefix_fences: String,
    wake_channel: String,
    /// The keep set of the entry's slot (the script's last key).
    keep: String,
}

impl FencedWriteKeys {
    fn new<C>(store: &Store<C>, args: &StoreArgs<'_>) -> Self
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let url_fence = url_fence_of(args.primary);
        let prefix_fences = if store.is_cluster() {
            url_fence.clone()
        } else {
            prefix_fences_of(args.namespace)
        };
        Self {
            keep: keep_of(&url_fence, store.is_cluster()),
            url_fence,
            prefix_fences,
            wake_channel: store.wake_channel(args.lease_key),
        }
    }
}

/// How long the temporary key of a new entry lives (`<lease>:<token>:new`,
/// written in the same transaction as the STORE that renames it into
/// place): only a STORE that fails with an error leaves it behind.
const TEMP_ENTRY_MS: u64 = 10_000;

/// The temporary key a fill writes its new entry under: named after its
/// lease and token (a fill whose lease expired never touches the next
/// fill's), in the entry's hash slot.
pub(crate) fn temp_entry_of(lease_key: &str, token: &str) -> String {
    format!("{lease_key}:{token}:new")
}

/// Whether `key` is a fill's temporary new entry ([`temp_entry_of`]).
pub(crate) fn is_temp_entry(key: &str) -> bool {
    key.ends_with(":new") && key.contains(":lease:")
}

/// The KEYS and ARGV of a fenced write (STORE or FRESHEN): sent as a script
/// call that loads the script on `NOSCRIPT` ([`invoke_async`]
/// (Self::invoke_async)), or as an `EVALSHA` inside a transaction
/// ([`evalsha_cmd`](Self::evalsha_cmd)).
struct FencedWrite<'s> {
    script: &'s redis::Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'s> FencedWrite<'s> {
    fn new(script: &'s redis::Script) -> Self {
        Self {
            script,
            keys: Vec::with_capacity(8),
            args: Vec::with_capacity(32),
        }
    }

    fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    fn evalsha_cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }

    async fn invoke_async<C, T>(self, con: &mut C) -> redis::RedisResult<T>
    where
        C: ConnectionLike,
        T: redis::FromRedisValue,
    {
        let mut inv = self.script.prepare_invoke();
        for key in &self.keys {
            inv.key(key.as_slice());
        }
        for arg in &self.args {
            inv.arg(arg.as_slice());
        }
        inv.invoke_async(con).await
    }
}

/// A release of a lease without a store.
pub(crate) struct ReleaseArgs<'a> {
    pub(crate) lease_key: &'a str,
    /// The key the fill filled: where a pass marker or a backoff goes.
    pub(crate) filled: &'a str,
    pub(crate) primary: &'a str,
    pub(crate) variants_set: &'a str,
    pub(crate) token: &'a str,
    /// How long a pass marker lasts (zero: none).
    pub(crate) pass: Duration,
    /// The response's `Vary` names, encoded ('' for none).
    pub(crate) vary: &'a str,
    /// The URL's cache key (written into a `Vary` index the release makes).
    pub(crate) url_key: &'a str,
    /// The base and cap of the refresh backoff (zero base: none).
    pub(crate) backoff: (Duration, Duration),
}

impl<'a> ReleaseArgs<'a> {
    /// A release that leaves nothing behind.
    pub(crate) fn plain(lease_key: &'a str, primary: &'a str, token: &'a str) -> Self {
        Self {
            lease_key,
            filled: primary,
            primary,
            variants_set: primary,
            token,
            pass: Duration::ZERO,
            vary: "",
            url_key: "",
            backoff: (Duration::ZERO, Duration::ZERO),
        }
    }
}

/// The `allkeys-*` policy a `CONFIG GET maxmemory-policy` reply names, if
/// any (a list or map, from one node or several).
fn allkeys_policy(reply: &Value) -> Option<String> {
    match reply {
        Value::BulkString(b) => {
            let s = String::from_utf8_lossy(b);
            s.starts_with("allkeys-").then(|| s.into_owned())
        }
        Value::SimpleString(s) => s.starts_with("allkeys-").then(|| s.clone()),
        Value::Array(items) | Value::Set(items) => items.iter().find_map(allkeys_policy),
        Value::Map(pairs) => pairs
            .iter()
            .find_map(|(k, v)| allkeys_policy(k).or_else(|| allkeys_policy(v))),
        _ => None,
    }
}

/// What a single-server store's transaction came to
/// ([`Store::store_in_transaction`]).
#[derive(Debug, PartialEq)]
enum Transaction {
    /// STORE's answer.
    Done(i64),
    /// The Redis user was refused a command of the transaction (`why`: the
    /// server's words). `ran`: STORE's answer when it ran all the same (a
    /// refused `MULTI` lets the commands after it run one by one; STORE is
    /// one script, fenced as ever, and its temporary key the fill's own);
    /// `None` when it did not run or was refused itself (`RENAME`): the
    /// temporary key is removed, the lease still held, and the store is
    /// to be made with the fields as ARGV.
    Denied { why: String, ran: Option<i64> },
}

/// The replies of `MULTI`, `HSET`, `PEXPIRE`, `EVALSHA` STORE and `EXEC`,
/// read.
#[derive(Debug)]
enum TransactionReply {
    Stored(i64),
    /// STORE is not loaded: load it and send the transaction again.
    NoScript,
    Denied {
        why: String,
        ran: Option<i64>,
    },
    Failed(redis::RedisError),
}

/// Whether a server error is an ACL refusal: `NOPERM` (a command, or
/// `RENAME` inside STORE, which answers `NOPERM` for it), or an `EXEC`
/// aborted for one.
fn is_denied(err: &redis::ServerError) -> bool {
    err.kind() == Some(redis::ServerErrorKind::NoPerm)
        || err.details().is_some_and(|d| d.contains("NOPERM"))
}

/// A server error as Redis worded it (`CODE details`).
fn server_words(err: &redis::ServerError) -> String {
    match err.details() {
        Some(details) => format!("{} {details}", err.code()),
        None => err.code().to_owned(),
    }
}

/// Reads the replies of a store's transaction (see [`TransactionReply`]).
fn read_transaction(replies: Value) -> TransactionReply {
    let unexpected = |what: &'static str| {
        TransactionReply::Failed(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            what,
        )))
    };
    let Value::Array(replies) = replies else {
        return unexpected("a store's transaction: not an array of replies");
    };
    let Ok([multi, hset, pexpire, store, exec]) = <[Value; 5]>::try_from(replies) else {
        return unexpected("a store's transaction: not five replies");
    };
    match multi {
        Value::Okay | Value::SimpleString(_) => {}
        Value::ServerError(err) if is_denied(&err) => {
            // HSET, PEXPIRE and EVALSHA ran on their own; EXEC was refused
            // too, or found no transaction.
            let why = server_words(&err);
            return match store {
                Value::Int(stored) => TransactionReply::Denied {
                    why,
                    ran: Some(stored),
                },
                Value::ServerError(store) if is_denied(&store) => TransactionReply::Denied {
                    why: format!("{why}; {}", server_words(&store)),
                    ran: None,
                },
                _ => TransactionReply::Denied { why, ran: None },
            };
        }
        Value::ServerError(err) => return TransactionReply::Failed(err.into()),
        _ => return unexpected("a store's transaction: MULTI"),
    }
    match exec {
        Value::Array(mut results) => match results.pop() {
            Some(Value::Int(stored)) if results.len() == 2 => TransactionReply::Stored(stored),
            Some(Value::ServerError(err))
                if err.kind() == Some(redis::ServerErrorKind::NoScript) =>
            {
                TransactionReply::NoScript
            }
            Some(Value::ServerError(err)) if is_denied(&err) => TransactionReply::Denied {
                why: server_words(&err),
                ran: None,
            },
            Some(Value::ServerError(err)) => TransactionReply::Failed(err.into()),
            _ => unexpected("a store's transaction: EXEC"),
        },
        // EXECABORT: a command refused as it was queued (its reply says
        // why), or EXEC itself; nothing ran.
        Value::ServerError(err) => {
            let queued = [hset, pexpire, store]
                .into_iter()
                .find_map(|reply| match reply {
                    Value::ServerError(e) if is_denied(&e) => Some(e),
                    _ => None,
                });
            match queued {
                Some(refused) => TransactionReply::Denied {
                    why: server_words(&refused),
                    ran: None,
                },
                None if is_denied(&err) => TransactionReply::Denied {
                    why: server_words(&err),
                    ran: None,
                },
                None => TransactionReply::Failed(err.into()),
            }
        }
        _ => unexpected("a store's transaction: EXEC"),
    }
}

/// The command an ACL refusal names (`'multi'` in Redis's words, `RENAME`
/// in STORE's), upper case, for the warning.
fn denied_command(why: &str) -> String {
    let lower = why.to_ascii_lowercase();
    for command in ["multi", "exec", "rename"] {
        if lower.contains(&format!("'{command}'")) || lower.contains(&format!("{command} refused"))
        {
            return command.to_ascii_uppercase();
        }
    }
    "MULTI, EXEC or RENAME".to_owned()
}

/// A node a SCAN goes to: `None` is the connection itself (a single
/// server); `Some((host, port))` one primary of a Redis Cluster.
pub(crate) type Node = Option<(String, u16)>;

/// The connection as a Redis Cluster connection, if it is one (or a
/// [`HealingConnection`](crate::HealingConnection) of one: its current
/// connection).
#[cfg(feature = "cluster-async")]
fn as_cluster<C: 'static>(conn: &C) -> Option<redis::cluster_async::ClusterConnection> {
    use redis::cluster_async::ClusterConnection;
    let conn = conn as &dyn std::any::Any;
    if let Some(healing) = conn.downcast_ref::<crate::HealingConnection<ClusterConnection>>() {
        return Some(healing.current());
    }
    conn.downcast_ref::<ClusterConnection>().cloned()
}

/// Whether `conn` is a Redis Cluster connection (a `ClusterConnection`, or
/// a `HealingConnection` of one), as [`Store::new`] detects it.
pub(crate) fn is_cluster_connection<C: 'static>(conn: &C) -> bool {
    #[cfg(feature = "cluster-async")]
    return as_cluster(conn).is_some();
    #[cfg(not(feature = "cluster-async"))]
    {
        let _ = conn;
        false
    }
}

/// The Redis side of the cache.
#[derive(Debug)]
pub(crate) struct Store<C> {
    conn: C,
    /// Redis Cluster mode: the connection is a
    /// `redis::cluster_async::ClusterConnection`, or the user said so
    /// (`FenceCacheBuilder::cluster`).
    cluster: AtomicBool,
    timeout_ms: AtomicU64,
    /// The longest a fill of this cache may run: the largest
    /// `fill_timeout + lock_timeout` of the routes and handles made so far
    /// ([`Store::cover_fills`]).
    longest_fill_ms: AtomicU64,
    /// Shared with a [`HealingConnection`](crate::HealingConnection) that
    /// closes it when it replaced its connection.
    breaker: std::sync::Arc<Breaker>,
    /// The cache's name in its metrics (its namespace), shared with the
    /// in-flight table, the near cache and the cache-wide counters.
    label: crate::metrics::CacheLabel,
    scripts: Scripts,
    pub(crate) errors: AtomicU64,
    pub(crate) commands: AtomicU64,
    /// Added to this process's clock (tests play a host whose clock is off).
    skew_ms: AtomicI64,
    /// `WAIT` after each invalidation: how many replicas must acknowledge
    /// (0: no `WAIT`), and for how long it waits
    /// (`FenceCacheBuilder::replicated_fences`).
    wait_replicas: std::sync::atomic::AtomicU32,
    wait_ms: AtomicU64,
    /// Set once the `maxmemory-policy` was looked at (`check_eviction_policy`).
    policy_checked: AtomicBool,
    /// Set once the Redis user was refused a command of the single-server
    /// store's transaction (`MULTI`, `EXEC`, or `RENAME` inside STORE):
    /// stores then send the fields as STORE's ARGV, as on a cluster
    /// ([`Store::store`]).
    argv_store: AtomicBool,
    /// Reaches every primary for walks when the connection is not a
    /// `ClusterConnection` itself (`FenceCacheBuilder::cluster_wake_ups`).
    #[cfg(feature = "cluster-async")]
    walk_client: std::sync::OnceLock<redis::cluster::ClusterClient>,
    #[cfg(feature = "cluster-async")]
    walk_conn: WalkConn,
}

/// The connection walks open from the walk client, once.
#[cfg(feature = "cluster-async")]
#[derive(Default)]
struct WalkConn(tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>);

#[cfg(feature = "cluster-async")]
impl std::fmt::Debug for WalkConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WalkConn")
            .field(&self.0.initialized())
            .finish()
    }
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

impl<C> Store<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(
        conn: C,
        timeout: Duration,
        breaker: Breaker,
        label: crate::metrics::CacheLabel,
    ) -> Self {
        let cluster = is_cluster_connection(&conn);
        crate::metrics::breaker_open(&label, false);
        let breaker = std::sync::Arc::new(breaker);
        crate::healing::when_replaced(&conn, {
            let breaker = std::sync::Arc::downgrade(&breaker);
            let label = label.clone();
            move || {
                // A fresh connection answered PING: no cool-down to sit out.
                if breaker.upgrade().is_some_and(|b| b.success()) {
                    crate::metrics::breaker_open(&label, false);
                    tracing::info!("redis connection replaced, circuit breaker closed");
                }
            }
        });
        Self {
            conn,
            cluster: AtomicBool::new(cluster),
            timeout_ms: AtomicU64::new(duration_ms(timeout)),
            longest_fill_ms: AtomicU64::new(0),
            breaker,
            label,
            scripts: Scripts::new(),
            errors: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            skew_ms: AtomicI64::new(0),
            wait_replicas: std::sync::atomic::AtomicU32::new(0),
            wait_ms: AtomicU64::new(0),
            policy_checked: AtomicBool::new(false),
            argv_store: AtomicBool::new(false),
            #[cfg(feature = "cluster-async")]
            walk_client: std::sync::OnceLock::new(),
            #[cfg(feature = "cluster-async")]
            walk_conn: WalkConn::default(),
        }
    }

    /// Whether the connection is a Redis Cluster connection: tags are then
    /// kept as per-entry markers and SCANs go to every primary.
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster.load(Ordering::Relaxed)
    }

    /// The cluster client walks use when the connection is not a
    /// `ClusterConnection` (a wrapper).
    #[cfg(feature = "cluster-async")]
    pub(crate) fn set_walk_client(&self, client: redis::cluster::ClusterClient) {
        let _ = self.walk_client.set(client);
    }

    /// A cluster connection that can route a command to one node: the
    /// cache's own, or one from the walk client.
    #[cfg(feature = "cluster-async")]
    async fn cluster_connection(
        &self,
        conn: &C,
    ) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        if let Some(conn) = as_cluster(conn) {
            return Ok(conn);
        }
        let Some(client) = self.walk_client.get() else {
            return Err(not_cluster());
        };
        self.walk_conn
            .0
            .get_or_try_init(|| client.get_async_connection())
            .await
            .cloned()
    }

    /// Sets Redis Cluster mode whatever the connection's type.
    pub(crate) fn set_cluster(&self, cluster: bool) {
        self.cluster.store(cluster, Ordering::Relaxed);
    }

    /// The channel a store or release of `lease` announces itself on
    /// (sharded on a Redis Cluster; see [`channels`]). A key without a
    /// hash tag (none of this crate's) falls back to the namespace's.
    fn wake_channel(&self, lease: &str) -> String {
        channels::wake_of_key(lease, self.is_cluster())
            .or_else(|| channels::wake_of_key(lease, false))
            .unwrap_or_default()
    }

    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The cache's name in its metrics.
    pub(crate) fn label(&self) -> &crate::metrics::CacheLabel {
        &self.label
    }

    pub(crate) fn connection(&self) -> C {
        self.conn.clone()
    }

    /// This process's clock (ms since the epoch), as freshness and pass
    /// markers are judged by it.
    pub(crate) fn now_ms(&self) -> u64 {
        now_ms().saturating_add_signed(self.skew_ms.load(Ordering::Relaxed))
    }

    #[cfg(feature = "__internals")]
    pub(crate) fn set_clock_skew(&self, ms: i64) {
        self.skew_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(duration_ms(timeout).max(1), Ordering::Relaxed);
    }

    /// Makes the fences this cache sets outlive the fills of a route (or
    /// handle) with these settings: called whenever one is made, so the
    /// fences cover the longest of them (routes of one namespace may differ).
    pub(crate) fn cover_fills(&self, config: &crate::config::Config) {
        self.longest_fill_ms
            .fetch_max(duration_ms(config.wait_cap()), Ordering::Relaxed);
    }

    /// How long a fence (of a URL, a key prefix or the namespace, and at
    /// least this long a tag's) refuses the write-backs of fills that
    /// started before its invalidation: longer than any fill of this cache
    /// may run, so that no setting lets a fill outlive the fence that should
    /// refuse it. The longest `fill_timeout + lock_timeout` of the routes
    /// and handles made (a fill's origin call is bounded by its request's
    /// cap), plus two Redis timeouts and [`FENCE_MARGIN`] for the round
    /// trips around the fill. The one place the lifetime is computed: the
    /// scripts receive it as an argument.
    pub(crate) fn fence_ttl(&self) -> Duration {
        let fills = Duration::from_millis(self.longest_fill_ms.load(Ordering::Relaxed));
        let calls = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        fills
            .saturating_add(calls.saturating_mul(2))
            .saturating_add(FENCE_MARGIN)
    }

    /// Has every invalidation wait until `replicas` replicas acknowledged
    /// its writes, at most `timeout` (0 replicas: no waiting).
    pub(crate) fn set_replicated(&self, replicas: u32, timeout: Duration) {
        self.wait_ms
            .store(duration_ms(timeout).max(1), Ordering::Relaxed);
        self.wait_replicas.store(replicas, Ordering::Relaxed);
    }

    /// `WAIT <replicas> <ms>` over the connection that wrote an
    /// invalidation (on a Redis Cluster, redis-rs sends it to every primary
    /// and keeps the smallest count): `Ok` at once when not asked for, or
    /// when enough replicas acknowledged every write sent before it on the
    /// connection; else a not-replicated error.
    pub(crate) async fn wait_replicated(&self) -> Result<(), FenceError> {
        let wanted = self.wait_replicas.load(Ordering::Relaxed);
        if wanted == 0 {
            return Ok(());
        }
        if !self.breaker.allow() {
            return Err(FenceError::circuit_open());
        }
        let wait = Duration::from_millis(self.wait_ms.load(Ordering::Relaxed));
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed)) + wait;
        self.commands.fetch_add(1, Ordering::Relaxed);
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(wanted).arg(duration_ms(wait).max(1));
        let mut conn = self.conn.clone();
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let result: Result<i64, FenceError> = timed(timeout, cmd.query_async(&mut conn)).await;
        #[cfg(feature = "metrics")]
        crate::metrics::redis_call(&self.label, "wait", started.elapsed(), result.is_ok());
        let acked = result.inspect_err(|_| {
            self.errors.fetch_add(1, Ordering::Relaxed);
        })?;
        let acked = u64::try_from(acked).unwrap_or(0);
        if acked < u64::from(wanted) {
            return Err(FenceError::not_replicated(acked, wanted));
        }
        Ok(())
    }

    /// Runs one Redis call under the timeout and the breaker.
    async fn run<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, FenceError>
    where
        F: FnOnce(C) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return Err(FenceError::circuit_open());
        }
        self.commands.fetch_add(1, Ordering::Relaxed);
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        // The clock is read for the metrics only.
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let result = timed(timeout, f(self.conn.clone())).await;
        #[cfg(feature = "metrics")]
        crate::metrics::redis_call(&self.label, what, started.elapsed(), result.is_ok());
        match &result {
            Ok(_) => self.succeeded(),
            Err(err) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if err.is_transport() {
                    if self.breaker.failure() {
                        // Logged once per outage: a failed probe re-opens
                        // the breaker silently.
                        crate::metrics::breaker_open(&self.label, true);
                        tracing::warn!(error = %err, cooldown_ms = self.breaker.cooldown(), "redis failing, circuit breaker opened");
                    }
                } else {
                    // Redis answered: it is alive.
                    self.succeeded();
                }
                tracing::debug!(error = %err, op = what, "redis call failed");
            }
        }
        result
    }

    /// A call reached Redis: close the breaker, logging it once.
    fn succeeded(&self) {
        if self.breaker.success() {
            crate::metrics::breaker_open(&self.label, false);
            tracing::info!("redis answering again, circuit breaker closed");
        }
    }

    /// HMGET of the fields a lookup reads ([`LOOKUP_FIELDS`]): the one
    /// command of a hit. Field values only (`HGETALL` would send the names
    /// too, and the fields only the scripts read), each kept as the
    /// [`Bytes`] of the reply. A key of another type reads as empty (a
    /// miss), never as an error.
    pub(crate) async fn read(&self, key: &str) -> Result<Raw, FenceError> {
        // Sized up front: no reallocation while the arguments are added.
        let mut cmd = redis::Cmd::with_capacity(2 + LOOKUP_FIELDS.len(), key.len() + 64);
        cmd.arg("HMGET").arg(key).arg(&LOOKUP_FIELDS[..]);
        match self.read_reply(cmd).await {
            Ok(Value::Array(values)) => Ok(Raw::from_values(values.into_iter().map(|v| match v {
                Value::BulkString(b) => Some(Bytes::from(b)),
                _ => None,
            }))),
            // Not an HMGET reply: nothing a lookup can use.
            Ok(_) => Ok(Raw::default()),
            Err(e) if is_wrong_type(&e) => Ok(Raw::default()),
            Err(e) => Err(e),
        }
    }

    /// The reply of a lookup's `HMGET`, as redis-rs parsed it: an error
    /// reply (`WRONGTYPE`) as an error. Not `query_async`, which walks
    /// every value of the reply for nested errors (an `HMGET` has none) and
    /// rebuilds the array.
    async fn read_reply(&self, cmd: redis::Cmd) -> Result<Value, FenceError> {
        self.run("read", move |mut c| async move {
            match c.req_packed_command(&cmd).await? {
                error @ Value::ServerError(_) => error.extract_error(),
                value => Ok(value),
            }
        })
        .await
    }

    /// [`read`](Self::read), with the values of `extra` fields besides
    /// (in that order; `None` for a field that is not there): the same one
    /// command.
    pub(crate) async fn read_with(
        &self,
        key: &str,
        extra: &[&str],
    ) -> Result<(Raw, Vec<Option<Bytes>>), FenceError> {
        let mut cmd = redis::Cmd::with_capacity(
            2 + LOOKUP_FIELDS.len() + extra.len(),
            key.len() + 64 + 8 * extra.len(),
        );
        cmd.arg("HMGET").arg(key).arg(&LOOKUP_FIELDS[..]).arg(extra);
        let values = match self.read_reply(cmd).await {
            Ok(Value::Array(values)) => values,
            Ok(_) => Vec::new(),
            Err(e) if is_wrong_type(&e) => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut values: Vec<Option<Bytes>> = values
            .into_iter()
            .map(|v| match v {
                Value::BulkString(b) => Some(Bytes::from(b)),
                _ => None,
            })
            .collect();
        if values.len() != LOOKUP_FIELDS.len() + extra.len() {
            return Ok((Raw::default(), vec![None; extra.len()]));
        }
        let extras = values.split_off(LOOKUP_FIELDS.len());
        Ok((Raw::from_values(values), extras))
    }

    /// Runs the ACQUIRE script (see its documentation).
    pub(crate) async fn acquire(&self, args: AcquireArgs<'_>) -> Result<Acquired, FenceError> {
        let value: Value = self
            .run("acquire", |mut c| {
                let script = &self.scripts.acquire;
                let mut inv = script.key(args.key);
                inv.key(args.lease)
                    .arg(args.token)
                    .arg(duration_ms(args.lease_for).max(1))
                    .arg(self.now_ms())
                    .arg(if args.refresh { "refresh" } else { "fill" })
                    .arg(FORMAT_VERSION)
                    .arg(args.decided_on.map_or_else(String::new, |s| s.to_string()))
                    .arg(if args.listening { "1" } else { "0" })
                    .arg(if args.have_stale { "1" } else { "0" });
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        parse_acquired(value).ok_or_else(|| FenceError::invalid_input("unexpected acquire reply"))
    }

    /// Before this cache's first write, once: warns when Redis's
    /// `maxmemory-policy` is an `allkeys-*` one, which may evict the index
    /// keys and fences the crate keeps out of `volatile-*` eviction's reach
    /// (no TTL). Errors are ignored (a managed Redis may deny `CONFIG`).
    /// Not counted in the stats' Redis calls.
    async fn check_eviction_policy(&self) {
        if self.policy_checked.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        let mut conn = self.conn.clone();
        match timed(timeout, cmd.query_async::<Value>(&mut conn)).await {
            Ok(reply) => {
                if let Some(policy) = allkeys_policy(&reply) {
                    tracing::warn!(
                        policy,
                        "Redis maxmemory-policy is {policy}: eviction may remove the cache's index keys and fences, hiding live entries from invalidation;                          use volatile-lru or volatile-lfu"
                    );
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "reading maxmemory-policy failed (ignored)");
            }
        }
    }

    /// The fenced write-back of a fill (the STORE script). On a single
    /// server the new entry goes under the fill's temporary key in one
    /// transaction with STORE ([`store_in_transaction`]
    /// (Self::store_in_transaction)); on a cluster, or once the Redis user
    /// was refused a command of that transaction (an ACL without `MULTI`,
    /// `EXEC` or `RENAME`), its fields are STORE's ARGV.
    pub(crate) async fn store(&self, args: StoreArgs<'_>) -> Result<WriteBack, FenceError> {
        self.check_eviction_policy().await;
        let keys = FencedWriteKeys::new(self, &args);
        let key_field = args
            .fields
            .iter()
            .find(|(name, _)| *name == "key")
            .map_or(&[][..], |(_, value)| value.as_slice());
        let stored: i64 = if self.is_cluster() || self.argv_store.load(Ordering::Relaxed) {
            // On a cluster: a MULTI/EXEC pipeline would have to follow
            // MOVED/ASK redirections as a whole while slots move.
            self.store_argv(&args, &keys, key_field).await?
        } else {
            match self.store_in_transaction(&args, &keys, key_field).await? {
                Transaction::Done(stored) => stored,
                Transaction::Denied { why, ran } => {
                    self.deny_transaction(&why);
                    match ran {
                        Some(stored) => stored,
                        None => self.store_argv(&args, &keys, key_field).await?,
                    }
                }
            }
        };
        Ok(match stored {
            1 => WriteBack::Stored,
            2 => WriteBack::TooManyVariants,
            // 0: fenced out; 4: the temporary new entry was gone (removed
            // by hand, a flush): not stored either.
            _ => WriteBack::Fenced,
        })
    }

    /// STORE with the entry's fields as its ARGV (a Redis Cluster, or a
    /// Redis user that may not run the transaction).
    async fn store_argv(
        &self,
        args: &StoreArgs<'_>,
        keys: &FencedWriteKeys,
        key_field: &[u8],
    ) -> Result<i64, FenceError> {
        self.run("store", |mut c| {
            let mut inv = self.fenced_write(&self.scripts.store, args, keys, None);
            inv.arg(key_field).arg("0");
            for (name, value) in &args.fields {
                inv.arg(*name).arg(value.as_slice());
            }
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    /// STORE on a single server: the new entry under a key of the fill's
    /// own, renamed into place by STORE in the same transaction, so the
    /// body never crosses into Lua (BENCHMARKS.md, "Redis per cold miss").
    ///
    /// `MULTI` and `EXEC` are commands of a plain pipeline whose every
    /// reply is read ([`read_transaction`]), not an atomic one: a refused
    /// `MULTI` must be told apart (then the commands after it ran one by
    /// one), and redis-rs 1.8's transaction bookkeeping computes the index
    /// of a `MULTI` error reply as `1 - 2` (a `usize`: a panic in a debug
    /// build). A refusal leaves no temporary key behind and keeps the lease,
    /// unless STORE itself ran ([`Transaction::Denied`]).
    async fn store_in_transaction(
        &self,
        args: &StoreArgs<'_>,
        keys: &FencedWriteKeys,
        key_field: &[u8],
    ) -> Result<Transaction, FenceError> {
        let temp = temp_entry_of(args.lease_key, args.token);
        let script = &self.scripts.store;
        self.run("store", |mut c| {
            let mut inv = self.fenced_write(script, args, keys, Some(&temp));
            inv.arg(key_field).arg("1");
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.cmd("MULTI");
            pipe.cmd("HSET").arg(temp.as_str());
            for (name, value) in &args.fields {
                pipe.arg(*name).arg(value.as_slice());
            }
            pipe.cmd("PEXPIRE").arg(temp.as_str()).arg(TEMP_ENTRY_MS);
            pipe.add_command(inv.evalsha_cmd());
            pipe.cmd("EXEC");
            async move {
                let mut loaded = false;
                loop {
                    let replies: Value = pipe.query_async(&mut c).await?;
                    match read_transaction(replies) {
                        TransactionReply::Stored(stored) => return Ok(Transaction::Done(stored)),
                        TransactionReply::NoScript if !loaded => {
                            // The temporary key is written again.
                            script.load_async(&mut c).await?;
                            loaded = true;
                        }
                        TransactionReply::NoScript => {
                            return Err(redis::RedisError::from((
                                redis::ErrorKind::Server(redis::ServerErrorKind::NoScript),
                                "STORE missing right after SCRIPT LOAD",
                            )));
                        }
                        TransactionReply::Denied { why, ran } => {
                            if ran.is_none() {
                                // A refused MULTI let HSET and PEXPIRE run
                                // on their own (a refused RENAME: STORE
                                // removed it): the ARGV path stores.
                                let mut del = redis::cmd("DEL");
                                del.arg(temp.as_str());
                                if let Err(err) = del.exec_async(&mut c).await {
                                    tracing::debug!(error = %err, "removing a temporary entry failed (it expires in 10 s)");
                                }
                            }
                            return Ok(Transaction::Denied { why, ran });
                        }
                        TransactionReply::Failed(err) => return Err(err),
                    }
                }
            }
        })
        .await
    }

    /// The Redis user was refused a command of the store's transaction:
    /// every later store sends the fields as ARGV. Warns once.
    fn deny_transaction(&self, why: &str) {
        if self.argv_store.swap(true, Ordering::Relaxed) {
            return;
        }
        let command = denied_command(why);
        tracing::warn!(
            error = why,
            command,
            "the Redis user may not run {command}: stores now send the response to the store script as arguments \
             (slower: the body crosses into Lua); grant MULTI, EXEC and RENAME to store through a transaction \
             (ACL SETUSER <user> +multi +exec +rename)"
        );
    }

    /// The header-only write-back of a revalidation (the FRESHEN script):
    /// rewrites the head fields and expiry of the entry that was
    /// revalidated, whose `head` field was `revalidated_head` and whose body
    /// is `revalidated_len` bytes, fenced like [`store`](Self::store).
    /// `args.fields` must not hold `body`. Returns `None` (the lease
    /// still held) when that entry is no longer there: the caller stores in
    /// full.
    pub(crate) async fn freshen(
        &self,
        args: StoreArgs<'_>,
        revalidated_head: &[u8],
        revalidated_len: usize,
    ) -> Result<Option<WriteBack>, FenceError> {
        let keys = FencedWriteKeys::new(self, &args);
        let freshened: i64 = self
            .run("freshen", |mut c| {
                let mut inv = self.fenced_write(&self.scripts.freshen, &args, &keys, None);
                inv.arg(revalidated_head).arg(revalidated_len);
                for (name, value) in &args.fields {
                    inv.arg(*name).arg(value.as_slice());
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(match freshened {
            1 => Some(WriteBack::Stored),
            3 => None,
            _ => Some(WriteBack::Fenced),
        })
    }

    /// The KEYS and the first eleven ARGV that STORE and FRESHEN share (their
    /// fenced-write prologue): entry, lease, primary, variants set, URL
    /// fence, prefix fences, the tag indexes and fences (or, on a cluster,
    /// the tag markers); token, TTL, wake channel and message, vary names,
    /// format version, fill start, tag count, variant bound, whether to
    /// read the prefix fences, whether to announce a marked entry replaced.
    fn fenced_write<'s>(
        &self,
        script: &'s redis::Script,
        args: &StoreArgs<'_>,
        keys: &FencedWriteKeys,
        temp: Option<&str>,
    ) -> FencedWrite<'s> {
        let cluster = self.is_cluster();
        let mut inv = FencedWrite::new(script);
        inv.key(args.entry_key);
        inv.key(args.lease_key)
            .key(args.primary)
            .key(args.variants_set)
            .key(keys.url_fence.as_str())
            .key(keys.prefix_fences.as_str());
        if cluster {
            // Markers in the entry's own slot.
            for tag in args.tags {
                inv.key(tag_marker(args.namespace, tag, args.primary));
            }
        } else {
            // Every index, then every fence.
            let tag_keys: Vec<(String, String)> = args
                .tags
                .iter()
                .map(|t| tag_keys(args.namespace, t))
                .collect();
            for (index, _) in &tag_keys {
                inv.key(index.as_str());
            }
            for (_, fence) in &tag_keys {
                inv.key(fence.as_str());
            }
        }
        if let Some(temp) = temp {
            inv.key(temp);
        }
        inv.key(keys.keep.as_str());
        // In cluster mode the keys are tag markers, flagged by a negative
        // count.
        let n = i64::try_from(args.tags.len()).unwrap_or(i64::MAX);
        inv.arg(args.token)
            .arg(duration_ms(args.ttl).max(1))
            .arg(keys.wake_channel.as_str())
            .arg(args.lease_key)
            .arg(args.vary)
            .arg(FORMAT_VERSION)
            .arg(args.started)
            .arg(if cluster { -n } else { n })
            .arg(args.max_variants.max(1))
            .arg(if cluster { "0" } else { "1" })
            .arg(if args.near_check { "1" } else { "0" });
        inv
    }

    /// Gives a lease up (see the RELEASE script). Returns `None` when the
    /// lease was no longer ours, else whether a pass marker was left.
    pub(crate) async fn release(&self, args: ReleaseArgs<'_>) -> Result<Option<bool>, FenceError> {
        let pass_ms = duration_ms(args.pass);
        let now = self.now_ms();
        let wake_channel = self.wake_channel(args.lease_key);
        let keep = keep_of(args.primary, self.is_cluster());
        let released: i64 = self
            .run("release", |mut c| {
                let mut inv = self.scripts.release.key(args.lease_key);
                inv.key(args.filled)
                    .key(args.primary)
                    .key(args.variants_set)
                    .key(keep.as_str())
                    .arg(args.token)
                    .arg(if pass_ms > 0 {
                        now.saturating_add(pass_ms)
                    } else {
                        0
                    })
                    .arg(pass_ms)
                    .arg(wake_channel.as_str())
                    .arg(args.lease_key)
                    .arg(args.vary)
                    .arg(FORMAT_VERSION)
                    .arg(args.url_key)
                    .arg(duration_ms(args.backoff.0))
                    .arg(duration_ms(args.backoff.1).max(1))
                    .arg(now);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(match released {
            0 => None,
            2 => Some(true),
            _ => Some(false),
        })
    }

    pub(crate) async fn extend(
        &self,
        lease: &str,
        token: &str,
        by: Duration,
    ) -> Result<bool, FenceError> {
        let extended: i64 = self
            .run("extend", |mut c| {
                let mut inv = self.scripts.extend.key(lease);
                inv.arg(token).arg(duration_ms(by).max(1));
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(extended == 1)
    }

    /// Removes the entry at `primary` and its variants, a batch of variants
    /// per script, and with `fence` sets the URL's fence first. Returns how
    /// many entries were removed.
    ///
    /// `ack` is the near-cache acknowledgement tag (`<sender>:<seq>`); the
    /// [`Announced`] returned says how many near-cache listeners heard of a
    /// removed entry (acknowledgements to wait for).
    /// `found`: entries of the URL a prefix walk found, removed too even
    /// when the variant set does not list them.
    pub(crate) async fn invalidate(
        &self,
        primary: &str,
        sender: u64,
        fence: bool,
        ack: &str,
        found: &[&str],
    ) -> Result<(u64, Announced), FenceError> {
        let variants = crate::key::variants_set_of(primary);
        let url_fence = url_fence_of(primary);
        let keep = keep_of(&url_fence, self.is_cluster());
        // On a cluster a missing entry is not announced (the script's
        // PUBLISH would count one node's listeners); a URL's owed
        // announcement is (see `INVALIDATE`).
        let announce = if self.is_cluster() { "0" } else { "1" };
        let mut found = found;
        let channel = channels::invalidate_of_key(primary);
        let mut total = 0;
        let mut near = Announced::default();
        let mut fence = fence;
        // Batches run until the set is empty, however many variants the URL
        // has. New variants may be added while they run (after the fence,
        // so they are new data): a bound, from the count left after the
        // first batch, keeps a URL stored faster than it is emptied from
        // holding the call forever, and then the call fails saying how many
        // are left (never Ok with entries behind).
        let mut rounds: u64 = 0;
        let mut bound: u64 = u64::MAX;
        loop {
            let (removed, left, told, announced): (u64, u64, u64, u64) = self
                .run("invalidate", |mut c| {
                    let mut inv = self.scripts.invalidate.key(primary);
                    inv.key(variants.as_str()).key(url_fence.as_str());
                    for key in found {
                        inv.key(*key);
                    }
                    inv.key(keep.as_str())
                        .arg(channel.as_str())
                        .arg(sender)
                        .arg(if fence { "1" } else { "0" })
                        .arg(duration_ms(self.fence_ttl()))
                        .arg(VARIANT_BATCH)
                        .arg(ack)
                        .arg(announce);
                    async move { inv.invoke_async(&mut c).await }
                })
                .await?;
            fence = false;
            found = &[];
            total += removed;
            near.add(told, announced);
            if left == 0 {
                break;
            }
            if rounds == 0 {
                let batch = VARIANT_BATCH as u64;
                bound = (left.div_ceil(batch)).saturating_mul(2).saturating_add(64);
            }
            rounds += 1;
            if rounds > bound {
                return Err(FenceError::walk_incomplete(format!(
                    "invalidation incomplete: {left} variants of the URL left after removing \
                     {total} (new ones are stored faster than they are removed); call again"
                )));
            }
        }
        Ok((total, near))
    }

    /// Marks the entry at `primary` and its variants stale, a batch of
    /// variants per script, and with `fence` sets the URL's fence first.
    /// Returns how many entries were marked.
    /// `ack` and the second number returned: as [`invalidate`](Self::invalidate).
    pub(crate) async fn soft_invalidate(
        &self,
        primary: &str,
        fence: bool,
        ack: &str,
        found: &[&str],
    ) -> Result<(u64, Announced), FenceError> {
        let variants = crate::key::variants_set_of(primary);
        let url_fence = url_fence_of(primary);
        let keep = keep_of(&url_fence, self.is_cluster());
        let announce = if self.is_cluster() { "0" } else { "1" };
        let mut total = 0;
        let mut near = Announced::default();
        let mut cursor = "0".to_owned();
        let mut fence = fence;
        loop {
            let (marked, next, told, announced): (u64, String, u64, u64) = self
                .run("soft_invalidate", |mut c| {
                    let mut inv = self.scripts.soft_invalidate.key(primary);
                    inv.key(variants.as_str()).key(url_fence.as_str());
                    // The first call marks what the walk found.
                    if cursor == "0" {
                        for key in found {
                            inv.key(*key);
                        }
                    }
                    inv.key(keep.as_str())
                        .arg(if fence { "1" } else { "0" })
                        .arg(duration_ms(self.fence_ttl()))
                        .arg(VARIANT_BATCH)
                        .arg(cursor.as_str())
                        .arg(ack)
                        .arg(announce);
                    async move { inv.invoke_async(&mut c).await }
                })
                .await?;
            fence = false;
            total += marked;
            near.add(told, announced);
            if next == "0" {
                return Ok((total, near));
            }
            cursor = next;
        }
    }

    /// Sets the fence of a key prefix (the namespace prefix for the whole
    /// namespace): fills of keys under it that started before can't store.
    /// Not on a Redis Cluster (the store script can't read it there).
    pub(crate) async fn prefix_fence(
        &self,
        namespace: &str,
        key_prefix: &str,
    ) -> Result<u64, FenceError> {
        let fences = prefix_fences_of(namespace);
        let whole = namespace_prefix(namespace);
        let last = format!("{fences}:last");
        let keep = keep_of(&fences, self.is_cluster());
        self.run("prefix_fence", |mut c| {
            let mut inv = self.scripts.prefix_fence.key(fences.as_str());
            inv.key(last.as_str())
                .key(keep.as_str())
                .arg(key_prefix)
                .arg(duration_ms(self.fence_ttl()))
                .arg(MAX_PREFIX_FENCES)
                .arg(whole.as_str());
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    /// One page of a soft tag walk from `cursor` (`None` first; it sets
    /// the tag's fence): the members and the next cursor, or `None` when
    /// the walk is done.
    pub(crate) async fn tag_page(
        &self,
        index: &str,
        fence: &str,
        batch: usize,
        fence_for: Duration,
        cursor: Option<&str>,
    ) -> Result<Option<(Vec<String>, String)>, FenceError> {
        let keep = keep_of(fence, self.is_cluster());
        let mut page: Vec<String> = self
            .run("tag_page", |mut c| {
                let mut inv = self.scripts.tag_page.key(index);
                inv.key(fence)
                    .key(keep.as_str())
                    .arg(batch.max(1))
                    .arg(duration_ms(fence_for).max(1))
                    .arg(cursor.unwrap_or("-inf"));
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(page.pop().map(|next| (page, next)))
    }

    /// Sets a tag's fence and pops up to `batch` entries from its index.
    pub(crate) async fn tag_batch(
        &self,
        index: &str,
        fence: &str,
        batch: usize,
        fence_for: Duration,
    ) -> Result<Vec<String>, FenceError> {
        let keep = keep_of(fence, self.is_cluster());
        self.run("tag_batch", |mut c| {
            let mut inv = self.scripts.tag_batch.key(index);
            inv.key(fence)
                .key(keep.as_str())
                .arg(batch.max(1))
                .arg(duration_ms(fence_for).max(1));
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    /// The nodes a walk over every key must SCAN: the connection itself, or
    /// on a Redis Cluster every primary the connection knows of.
    pub(crate) async fn nodes(&self) -> Result<Vec<Node>, FenceError> {
        #[cfg(feature = "cluster-async")]
        if self.is_cluster() {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
            if as_cluster(&self.conn).is_none() && self.walk_client.get().is_none() {
                // Not a transport failure: nothing to retry, no breaker.
                return Err(FenceError::invalid_input(
                    "a walk over a Redis Cluster needs a ClusterConnection or cluster_wake_ups to reach every primary",
                ));
            }
            // The slot map as a node sees it: a primary that failed still
            // owns its slots there until its replica takes over (the
            // client's own list drops a node it lost the connection to).
            let value: Value = self
                .run("nodes", |c| async move {
                    let mut conn = self.cluster_connection(&c).await?;
                    let mut cmd = redis::cmd("CLUSTER");
                    cmd.arg("SLOTS");
                    // Asked of every node, the first answer taken: one node
                    // down (or a stale entry of the client's) fails nothing.
                    let routing = RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllNodes,
                        Some(ResponsePolicy::OneSucceeded),
                    ));
                    conn.route_command(cmd, routing).await
                })
                .await?;
            let nodes = slot_primaries(&value).ok_or_else(|| {
                FenceError::invalid_input(
                    "unexpected CLUSTER SLOTS reply listing cluster primaries",
                )
            })?;
            if nodes.is_empty() {
                return Err(FenceError::invalid_input("CLUSTER SLOTS lists no primary"));
            }
            return Ok(nodes.into_iter().map(Some).collect());
        }
        #[cfg(not(feature = "cluster-async"))]
        if self.is_cluster() {
            // One node of a cluster is not the whole keyspace.
            return Err(FenceError::invalid_input(
                "a walk over a Redis Cluster needs the cluster-async feature",
            ));
        }
        Ok(vec![None])
    }

    /// Who owns which slots of a Redis Cluster, and which primaries are
    /// importing slots (a migration in progress: its keys arrive there one
    /// `MIGRATE` at a time); for a walk to tell whether keys moved while
    /// it ran (`None` when not on a cluster).
    pub(crate) async fn layout(&self) -> Result<Option<Layout>, FenceError> {
        #[cfg(feature = "cluster-async")]
        if self.is_cluster() {
            use redis::cluster_routing::{
                MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
            };
            let value: Value = self
                .run("layout", |c| async move {
                    let mut conn = self.cluster_connection(&c).await?;
                    let mut cmd = redis::cmd("CLUSTER");
                    cmd.arg("SLOTS");
                    let routing = RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllNodes,
                        Some(ResponsePolicy::OneSucceeded),
                    ));
                    conn.route_command(cmd, routing).await
                })
                .await?;
            let ranges = slot_ranges(&value).ok_or_else(|| {
                FenceError::invalid_input("unexpected CLUSTER SLOTS reply listing slot owners")
            })?;
            let mut primaries: Vec<(String, u16)> = Vec::new();
            for (_, _, node) in &ranges {
                if !primaries.contains(node) {
                    primaries.push(node.clone());
                }
            }
            let mut importing = Vec::new();
            for (host, port) in primaries {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                });
                let text: String = self
                    .run("layout", |c| async move {
                        let mut conn = self.cluster_connection(&c).await?;
                        let mut cmd = redis::cmd("CLUSTER");
                        cmd.arg("NODES");
                        let value = conn.route_command(cmd, routing).await?;
                        Ok(redis::from_redis_value(value)?)
                    })
                    .await?;
                // Its own line (`myself`) lists what it imports: `[<slot>-<-<id>]`.
                if text
                    .lines()
                    .any(|line| line.contains("myself") && line.contains("-<-"))
                {
                    importing.push((host, port));
                }
            }
            return Ok(Some(Layout { ranges, importing }));
        }
        Ok(None)
    }

    /// One SCAN step on one node. Returns the next cursor and the keys that
    /// are UTF-8 (every key this crate writes is; a foreign one matching the
    /// pattern is skipped rather than failing the walk).
    pub(crate) async fn scan(
        &self,
        node: &Node,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), FenceError> {
        let (next, keys): (u64, Vec<Vec<u8>>) = self.scan_raw(node, cursor, pattern, count).await?;
        let keys = keys
            .into_iter()
            .filter_map(|k| String::from_utf8(k).ok())
            .collect();
        Ok((next, keys))
    }

    async fn scan_raw(
        &self,
        node: &Node,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<Vec<u8>>), FenceError> {
        let cmd = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count)
            .clone();
        match node {
            None => {
                self.run("scan", |mut c| async move { cmd.query_async(&mut c).await })
                    .await
            }
            #[cfg(feature = "cluster-async")]
            Some((host, port)) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                self.run("scan", |c| async move {
                    let mut conn = self.cluster_connection(&c).await?;
                    let value = conn.route_command(cmd, routing).await?;
                    Ok(redis::from_redis_value(value)?)
                })
                .await
            }
            #[cfg(not(feature = "cluster-async"))]
            Some(_) => Err(FenceError::invalid_input(
                "cluster node without cluster support",
            )),
        }
    }

    /// GET of one string key (a tag marker). A key of another type reads as
    /// absent.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, FenceError> {
        let result = self
            .run("get", |mut c| {
                let cmd = redis::cmd("GET").arg(key).clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await;
        match result {
            Err(e) if is_wrong_type(&e) => Ok(None),
            other => other,
        }
    }

    /// Removes a tag marker unless its primary exists (the TAG_UNMARK
    /// script). Returns whether it was removed.
    pub(crate) async fn tag_unmark(&self, marker: &str, primary: &str) -> Result<bool, FenceError> {
        let removed: i64 = self
            .run("tag_unmark", |mut c| {
                let mut inv = self.scripts.tag_unmark.key(marker);
                inv.key(primary);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(removed == 1)
    }

    /// UNLINK of one key.
    pub(crate) async fn unlink(&self, key: &str) -> Result<(), FenceError> {
        self.run("unlink", |mut c| {
            let cmd = redis::cmd("UNLINK").arg(key).clone();
            async move { cmd.query_async::<Value>(&mut c).await.map(drop) }
        })
        .await
    }

    /// HGET of one field, for checking candidates of a prefix scan.
    pub(crate) async fn hget(&self, key: &str, field: &str) -> Result<Option<Vec<u8>>, FenceError> {
        let result = self
            .run("hget", |mut c| {
                let cmd = redis::cmd("HGET").arg(key).arg(field).clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await;
        match result {
            Err(e) if is_wrong_type(&e) => Ok(None),
            other => other,
        }
    }

    /// Marks the entry at `key` for near caches if its `gen` and `fresh`
    /// fields are still `generation` and `fresh` (the NEAR_MARK script).
    /// Returns whether it did.
    pub(crate) async fn near_mark(
        &self,
        key: &str,
        generation: &[u8],
        fresh: &[u8],
    ) -> Result<bool, FenceError> {
        let marked: i64 = self
            .run("near_mark", |mut c| {
                let mut inv = self.scripts.near_mark.key(key);
                inv.arg(generation).arg(fresh);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(marked == 1)
    }

    /// How many near caches of the namespace of `key` are registered alive
    /// ([`near_registry_of`]): a `ZCOUNT` of the unexpired registrations.
    pub(crate) async fn near_known(&self, key: &str) -> Result<u64, FenceError> {
        let registry = near_registry_of(key);
        let now = self.now_ms();
        self.run("near_known", |mut c| {
            let cmd = redis::cmd("ZCOUNT")
                .arg(registry)
                .arg(now)
                .arg("+inf")
                .clone();
            async move { cmd.query_async::<u64>(&mut c).await }
        })
        .await
    }

    /// Registers (`alive`) this cache's near cache in the namespace's
    /// registry until `ttl` from now, pruning expired registrations, or
    /// takes it out. Sent on the connection as it is: not counted as one of
    /// the cache's calls, nor seen by the breaker (the listener's
    /// heartbeat, not a request's).
    pub(crate) async fn near_register(
        &self,
        namespace: &str,
        id: u64,
        alive: bool,
        ttl: Duration,
    ) -> Result<(), FenceError> {
        let registry = near_registry(namespace);
        let now = self.now_ms();
        let mut pipe = redis::pipe();
        if alive {
            let expires = now.saturating_add(duration_ms(ttl));
            pipe.cmd("ZADD")
                .arg(&registry)
                .arg(expires)
                .arg(id)
                .ignore();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(&registry)
                .arg("-inf")
                .arg(format!("({now}"))
                .ignore();
            pipe.cmd("PEXPIRE")
                .arg(&registry)
                .arg(duration_ms(ttl))
                .ignore();
        } else {
            pipe.cmd("ZREM").arg(&registry).arg(id).ignore();
        }
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        let mut conn = self.conn.clone();
        timed(timeout, pipe.query_async::<()>(&mut conn)).await
    }

    /// Clears the owed near-cache announcement of `primary`'s URL (Redis
    /// Cluster: INVALIDATE set it with `tag`, the announcement went out).
    pub(crate) async fn clear_owed(&self, primary: &str, tag: &str) -> Result<(), FenceError> {
        let owed = format!("{}:near-owed", crate::key::url_of(primary));
        self.run("clear_owed", |mut c| {
            let mut inv = self.scripts.clear_owed.key(owed);
            inv.arg(tag);
            async move { inv.invoke_async::<u64>(&mut c).await }
        })
        .await
        .map(|_| ())
    }

    /// `SPUBLISH`es `message` on the sharded `channel`; returns how many
    /// subscribers the channel's primary delivered it to.
    pub(crate) async fn spublish(&self, channel: &str, message: &str) -> Result<u64, FenceError> {
        self.run("spublish", |mut c| {
            let cmd = redis::cmd("SPUBLISH").arg(channel).arg(message).clone();
            async move { cmd.query_async::<u64>(&mut c).await }
        })
        .await
    }

    pub(crate) async fn publish(&self, channel: &str, message: &str) -> Result<(), FenceError> {
        self.run("publish", |mut c| {
            let cmd = redis::cmd("PUBLISH").arg(channel).arg(message).clone();
            async move { cmd.query_async::<Value>(&mut c).await.map(drop) }
        })
        .await
    }
}

#[cfg(feature = "cluster-async")]
fn not_cluster() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "a walk over a Redis Cluster needs a ClusterConnection or cluster_wake_ups to reach every primary",
    ))
}

fn is_wrong_type(err: &FenceError) -> bool {
    err.redis_code() == Some("WRONGTYPE")
}

fn parse_acquired(value: Value) -> Option<Acquired> {
    let Value::Array(mut items) = value else {
        return None;
    };
    if items.is_empty() {
        return None;
    }
    let rest = items.split_off(1);
    let tag = bytes_of(items.pop()?)?;
    let mut rest = rest.into_iter();
    Some(match tag.as_slice() {
        b"pass" => Acquired::Pass,
        b"vary" => Acquired::Vary(bytes_of(rest.next()?)?),
        b"hit" => Acquired::Hit(pairs(rest.next()?)?),
        b"won" => {
            let fields = pairs(rest.next()?)?;
            let start = bytes_of(rest.next()?).and_then(|b| crate::entry::parse_u64(&b))?;
            Acquired::Won(fields, start)
        }
        b"held" => {
            let ms = match rest.next()? {
                Value::Int(ms) => ms,
                _ => return None,
            };
            Acquired::Held(Duration::from_millis(ms.max(0) as u64))
        }
        _ => return None,
    })
}

fn bytes_of(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn pairs(value: Value) -> Option<Fields> {
    let Value::Array(items) = value else {
        return None;
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((bytes_of(k)?, bytes_of(v)?));
    }
    Some(out)
}

/// The primaries (`host`, `port`) serving slots in a `CLUSTER SLOTS`
/// reply, each once, in the reply's order; `None` when the reply (or an
/// address in it) is not understood.
/// A range of slots (first, last) and the address of its primary.
type SlotRange = (u16, u16, (String, u16));

/// A Redis Cluster's slot owners and importing primaries
/// ([`Store::layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Slot ranges (first, last) with their primary.
    ranges: Vec<SlotRange>,
    /// Primaries importing slots.
    importing: Vec<(String, u16)>,
}

impl Layout {
    fn owner(&self, slot: u16) -> Option<&(String, u16)> {
        self.ranges
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, node)| node)
    }

    /// The primaries keys may have moved to since `before`: those owning a
    /// slot they did not own then, and those importing then or now.
    pub(crate) fn moved_to_since(&self, before: &Self) -> Vec<Node> {
        let mut out: Vec<(String, u16)> = Vec::new();
        let mut add = |node: &(String, u16)| {
            if !out.contains(node) {
                out.push(node.clone());
            }
        };
        for slot in 0..16384u16 {
            if let Some(now) = self.owner(slot)
                && before.owner(slot) != Some(now)
            {
                add(now);
            }
        }
        for node in before.importing.iter().chain(&self.importing) {
            add(node);
        }
        out.into_iter().map(Some).collect()
    }
}

/// The slot ranges of a `CLUSTER SLOTS` reply, with their primary.
#[cfg(feature = "cluster-async")]
fn slot_ranges(reply: &Value) -> Option<Vec<SlotRange>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else {
            return None;
        };
        let (Some(Value::Int(first)), Some(Value::Int(last))) = (parts.first(), parts.get(1))
        else {
            return None;
        };
        let Some(Value::Array(primary)) = parts.get(2) else {
            return None;
        };
        let host = match primary.first()? {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let port = match primary.get(1)? {
            Value::Int(p) => u16::try_from(*p).ok()?,
            _ => return None,
        };
        out.push((
            u16::try_from(*first).ok()?,
            u16::try_from(*last).ok()?,
            (host, port),
        ));
    }
    Some(out)
}

#[cfg(feature = "cluster-async")]
fn slot_primaries(reply: &Value) -> Option<Vec<(String, u16)>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut nodes: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(parts) = range else {
            return None;
        };
        let Some(Value::Array(primary)) = parts.get(2) else {
            return None;
        };
        let host = match primary.first()? {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let port = match primary.get(1)? {
            Value::Int(p) => u16::try_from(*p).ok()?,
            _ => return None,
        };
        if host.is_empty() {
            return None;
        }
        if !nodes.iter().any(|(h, p)| *h == host && *p == port) {
            nodes.push((host, port));
        }
    }
    Some(nodes)
}
