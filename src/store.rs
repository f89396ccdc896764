//! Every Redis command and Lua script the crate sends.
//!
//! Each call is bounded by the configured timeout and goes through a circuit
//! breaker: after `threshold` transport failures in a row (timeouts, refused
//! or dropped connections) no command is sent for a cool-down, then one probe
//! is let through. Errors that Redis *answers* with (a wrong type, out of
//! memory, read-only) do not trip the breaker: the server is alive.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Script, Value};

use crate::entry::{FORMAT_VERSION, duration_ms, now_ms};
use crate::error::FenceError;

/// The pub/sub channel the store script announces finished fills on.
pub(crate) const WAKE_CHANNEL: &str = "cachefence:wake";
/// The pub/sub channel invalidations are announced on.
pub(crate) const INVALIDATE_CHANNEL: &str = "cachefence:invalidate";

/// "Return the entry if it is fresh, else take the fill lease."
///
/// KEYS: entry, lease. ARGV: token, lease ms, now ms, mode (`fill` or
/// `refresh`: take the lease whatever is stored, even a `Vary` index),
/// format version.
/// Returns `{'pass'}`, `{'vary', names}`, `{'hit', fields}`,
/// `{'won', fields, start}` (fields of a stale entry in `fill` mode, and
/// the Redis time the lease was taken, in ms) or
/// `{'held', pttl}`.
const ACQUIRE: &str = r"
local ok, e = pcall(redis.call, 'HGETALL', KEYS[1])
if not ok then e = {} end
local f = {}
for i = 1, #e, 2 do f[e[i]] = e[i + 1] end
local now = tonumber(ARGV[3])
if tonumber(f['pass'] or '') and tonumber(f['pass']) > now then return {'pass'} end
if f['v'] == ARGV[5] and ARGV[4] == 'fill' then
  if f['vary'] then return {'vary', f['vary']} end
  if tonumber(f['fresh'] or '') and tonumber(f['fresh']) > now then
    return {'hit', e}
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  local start = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  if ARGV[4] == 'fill' and f['v'] == ARGV[5] then return {'won', e, start} end
  return {'won', {}, start}
end
return {'held', redis.call('PTTL', KEYS[2])}
";

/// The fenced write-back: stores only while the lease holds our token.
///
/// KEYS: entry, lease, primary, variants set, then `n` tag indexes and
/// their `n` tag fences. ARGV: token, entry ttl ms, wake channel, wake
/// message, vary names ('' when the entry is the primary), format version,
/// fill start (Redis ms), `n`, then field/value pairs.
/// Returns 1 when stored, 0 when fenced out (the lease is gone, or one of
/// the response's tags was invalidated after the fill started).
const STORE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[8])
for i = 1, n do
  local ok, ts = pcall(redis.call, 'GET', KEYS[4 + n + i])
  if ok and ts and tonumber(ts) and tonumber(ts) >= tonumber(ARGV[7]) then
    redis.call('DEL', KEYS[2])
    redis.call('PUBLISH', ARGV[3], ARGV[4])
    return 0
  end
end
local ttl = tonumber(ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('PEXPIRE', KEYS[1], ttl)
if ARGV[5] ~= '' then
  local ok, cur = pcall(redis.call, 'HGET', KEYS[3], 'vary')
  if not ok or cur ~= ARGV[5] then
    local key = ''
    for i = 9, #ARGV - 1, 2 do
      if ARGV[i] == 'key' then key = ARGV[i + 1] end
    end
    redis.call('DEL', KEYS[3])
    redis.call('HSET', KEYS[3], 'v', ARGV[6], 'vary', ARGV[5], 'key', key)
  end
  if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
  local ok2 = pcall(redis.call, 'SADD', KEYS[4], KEYS[1])
  if not ok2 then
    redis.call('DEL', KEYS[4])
    redis.call('SADD', KEYS[4], KEYS[1])
  end
  if redis.call('PTTL', KEYS[4]) < ttl then redis.call('PEXPIRE', KEYS[4], ttl) end
end
if n > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = 1, n do
    local z = KEYS[4 + i]
    if redis.call('TYPE', z)['ok'] ~= 'zset' then redis.call('DEL', z) end
    redis.call('ZADD', z, now + ttl, KEYS[3])
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    if redis.call('PTTL', z) < ttl then redis.call('PEXPIRE', z, ttl) end
  end
end
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// Starts (or continues) a tag invalidation: sets the tag's fence to now,
/// so fills that started before can't store an entry carrying the tag, and
/// pops a batch of the entries the tag index lists.
///
/// KEYS: tag index, tag fence. ARGV: batch size, fence ttl ms, offset
/// (`-1` pops the batch; otherwise it is read from that offset and kept,
/// for soft invalidation).
const TAG_BATCH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[2], now, 'PX', ARGV[2])
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then
  redis.call('DEL', KEYS[1])
  return {}
end
local batch = tonumber(ARGV[1])
local offset = tonumber(ARGV[3])
if offset >= 0 then
  return redis.call('ZRANGE', KEYS[1], offset, offset + batch - 1)
end
local members = redis.call('ZRANGE', KEYS[1], 0, batch - 1)
if #members > 0 then redis.call('ZREM', KEYS[1], unpack(members)) end
return members
";

/// Gives a lease up without storing, optionally leaving a pass marker.
///
/// KEYS: lease, primary. ARGV: token, pass-until ms (0 for none), pass ms,
/// wake channel, wake message.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local pass_ms = tonumber(ARGV[3])
if pass_ms > 0 then
  if redis.call('TYPE', KEYS[2])['ok'] ~= 'hash' then redis.call('DEL', KEYS[2]) end
  redis.call('HSET', KEYS[2], 'pass', ARGV[2])
  if redis.call('PTTL', KEYS[2]) < pass_ms then redis.call('PEXPIRE', KEYS[2], pass_ms) end
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// Extends a lease we still hold. KEYS: lease. ARGV: token, ms.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

/// Removes an entry, its variants and every lease, so that no fill that
/// started before can write back. KEYS: primary, variants set.
/// ARGV: invalidate channel, sender id. Returns the number of entries removed.
const INVALIDATE: &str = r"
local n = 0
local ok, vars = pcall(redis.call, 'SMEMBERS', KEYS[2])
if ok then
  for _, v in ipairs(vars) do
    n = n + redis.call('UNLINK', v)
    redis.call('UNLINK', v .. ':lease')
  end
end
local had = redis.call('EXISTS', KEYS[1])
local kind = redis.call('TYPE', KEYS[1])['ok']
local index = false
if kind == 'hash' then index = redis.call('HEXISTS', KEYS[1], 'vary') == 1 end
redis.call('UNLINK', KEYS[1], KEYS[1] .. ':lease', KEYS[2])
if had == 1 and not index then n = n + 1 end
redis.call('PUBLISH', ARGV[1], 'key:' .. ARGV[2] .. ':' .. KEYS[1])
return n
";

/// Marks an entry and its variants stale. KEYS: primary, variants set.
/// ARGV: now ms. Returns the number of entries marked.
const SOFT_INVALIDATE: &str = r"
local n = 0
local keys = {KEYS[1]}
local ok, vars = pcall(redis.call, 'SMEMBERS', KEYS[2])
if ok then for _, v in ipairs(vars) do table.insert(keys, v) end end
for _, k in ipairs(keys) do
  local ok2, fresh = pcall(redis.call, 'HGET', k, 'fresh')
  if ok2 and fresh then
    if tonumber(fresh) and tonumber(fresh) > tonumber(ARGV[1]) then
      redis.call('HSET', k, 'fresh', ARGV[1])
    end
    n = n + 1
  end
  redis.call('UNLINK', k .. ':lease')
end
return n
";

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

#[derive(Debug)]
pub(crate) struct Scripts {
    acquire: Script,
    store: Script,
    release: Script,
    extend: Script,
    invalidate: Script,
    soft_invalidate: Script,
    tag_batch: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            acquire: Script::new(ACQUIRE),
            store: Script::new(STORE),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
            invalidate: Script::new(INVALIDATE),
            soft_invalidate: Script::new(SOFT_INVALIDATE),
            tag_batch: Script::new(TAG_BATCH),
        }
    }
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
    /// The Redis time the lease was taken (ms), for the tag fences.
    pub(crate) started: u64,
    /// (index key, fence key) of every tag of the response.
    pub(crate) tags: Vec<(String, String)>,
    pub(crate) fields: Vec<(&'static str, Vec<u8>)>,
}

/// Consecutive transport failures before the breaker opens.
#[derive(Debug)]
pub(crate) struct Breaker {
    failures: AtomicU32,
    open_until: AtomicU64,
    threshold: AtomicU32,
    cooldown_ms: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: AtomicU32::new(threshold.max(1)),
            cooldown_ms: AtomicU64::new(duration_ms(cooldown)),
        }
    }

    pub(crate) fn configure(&self, threshold: u32, cooldown: Duration) {
        self.threshold.store(threshold.max(1), Ordering::Relaxed);
        self.cooldown_ms
            .store(duration_ms(cooldown), Ordering::Relaxed);
    }

    fn cooldown(&self) -> u64 {
        self.cooldown_ms.load(Ordering::Relaxed)
    }

    /// Whether a command may be sent. When a cool-down ends, exactly one
    /// caller wins the right to probe; the others keep bypassing until the
    /// probe succeeds.
    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = now_ms();
        if now < until {
            return false;
        }
        let next = now + self.cooldown();
        self.open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.open_until.store(0, Ordering::Release);
    }

    /// Returns true when this failure opened the breaker.
    fn failure(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold.load(Ordering::Relaxed) {
            let next = now_ms() + self.cooldown();
            return self.open_until.swap(next, Ordering::AcqRel) == 0;
        }
        false
    }

    pub(crate) fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until != 0 && now_ms() < until
    }
}

/// The Redis side of the cache.
#[derive(Debug)]
pub(crate) struct Store<C> {
    conn: C,
    timeout_ms: AtomicU64,
    breaker: Breaker,
    scripts: Scripts,
    pub(crate) errors: AtomicU64,
    pub(crate) commands: AtomicU64,
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

impl<C> Store<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(conn: C, timeout: Duration, breaker: Breaker) -> Self {
        Self {
            conn,
            timeout_ms: AtomicU64::new(duration_ms(timeout)),
            breaker,
            scripts: Scripts::new(),
            errors: AtomicU64::new(0),
            commands: AtomicU64::new(0),
        }
    }

    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub(crate) fn connection(&self) -> C {
        self.conn.clone()
    }

    pub(crate) fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(duration_ms(timeout).max(1), Ordering::Relaxed);
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
        let result = match tokio::time::timeout(timeout, f(self.conn.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(FenceError::redis(err)),
            Err(_) => Err(FenceError::timeout()),
        };
        match &result {
            Ok(_) => self.breaker.success(),
            Err(err) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if err.is_transport() {
                    if self.breaker.failure() {
                        tracing::warn!(error = %err, cooldown_ms = self.breaker.cooldown(), "redis failing, circuit breaker opened");
                    }
                } else {
                    // Redis answered: it is alive.
                    self.breaker.success();
                }
                tracing::debug!(error = %err, op = what, "redis call failed");
            }
        }
        result
    }

    /// HGETALL: the one command of a hit. A key of another type reads as
    /// empty (a miss), never as an error.
    pub(crate) async fn read(&self, key: &str) -> Result<Fields, FenceError> {
        let result = self
            .run("read", |mut c| {
                let cmd = redis::cmd("HGETALL").arg(key).clone();
                async move { cmd.query_async::<Fields>(&mut c).await }
            })
            .await;
        match result {
            Err(e) if is_wrong_type(&e) => Ok(Vec::new()),
            other => other,
        }
    }

    pub(crate) async fn acquire(
        &self,
        key: &str,
        lease: &str,
        token: &str,
        lease_for: Duration,
        refresh: bool,
    ) -> Result<Acquired, FenceError> {
        let value: Value = self
            .run("acquire", |mut c| {
                let script = &self.scripts.acquire;
                let mut inv = script.key(key);
                inv.key(lease)
                    .arg(token)
                    .arg(duration_ms(lease_for).max(1))
                    .arg(now_ms())
                    .arg(if refresh { "refresh" } else { "fill" })
                    .arg(FORMAT_VERSION);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        parse_acquired(value).ok_or_else(|| FenceError::invalid_input("unexpected acquire reply"))
    }

    pub(crate) async fn store(&self, args: StoreArgs<'_>) -> Result<bool, FenceError> {
        let stored: i64 = self
            .run("store", |mut c| {
                let mut inv = self.scripts.store.key(args.entry_key);
                inv.key(args.lease_key)
                    .key(args.primary)
                    .key(args.variants_set);
                for (index, _) in &args.tags {
                    inv.key(index.as_str());
                }
                for (_, fence) in &args.tags {
                    inv.key(fence.as_str());
                }
                inv.arg(args.token)
                    .arg(duration_ms(args.ttl).max(1))
                    .arg(WAKE_CHANNEL)
                    .arg(args.lease_key)
                    .arg(args.vary)
                    .arg(FORMAT_VERSION)
                    .arg(args.started)
                    .arg(args.tags.len());
                for (name, value) in &args.fields {
                    inv.arg(*name).arg(value.as_slice());
                }
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(stored == 1)
    }

    pub(crate) async fn release(
        &self,
        lease: &str,
        primary: &str,
        token: &str,
        pass: Duration,
    ) -> Result<bool, FenceError> {
        let pass_ms = duration_ms(pass);
        let released: i64 = self
            .run("release", |mut c| {
                let mut inv = self.scripts.release.key(lease);
                inv.key(primary)
                    .arg(token)
                    .arg(if pass_ms > 0 { now_ms() + pass_ms } else { 0 })
                    .arg(pass_ms)
                    .arg(WAKE_CHANNEL)
                    .arg(lease);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(released == 1)
    }

    /// Deletes a lease if it still holds `token`, waking its waiters.
    pub(crate) async fn release_lease(&self, lease: &str, token: &str) -> Result<bool, FenceError> {
        let released: i64 = self
            .run("release", |mut c| {
                let mut inv = self.scripts.release.key(lease);
                inv.key(lease)
                    .arg(token)
                    .arg(0)
                    .arg(0)
                    .arg(WAKE_CHANNEL)
                    .arg(lease);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(released == 1)
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

    pub(crate) async fn invalidate(
        &self,
        primary: &str,
        variants: &str,
        sender: u64,
    ) -> Result<u64, FenceError> {
        self.run("invalidate", |mut c| {
            let mut inv = self.scripts.invalidate.key(primary);
            inv.key(variants).arg(INVALIDATE_CHANNEL).arg(sender);
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    pub(crate) async fn soft_invalidate(
        &self,
        primary: &str,
        variants: &str,
    ) -> Result<u64, FenceError> {
        self.run("soft_invalidate", |mut c| {
            let mut inv = self.scripts.soft_invalidate.key(primary);
            inv.key(variants).arg(now_ms());
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    /// Sets a tag's fence and pops up to `batch` entries from its index.
    pub(crate) async fn tag_batch(
        &self,
        index: &str,
        fence: &str,
        batch: usize,
        fence_for: Duration,
        offset: Option<usize>,
    ) -> Result<Vec<String>, FenceError> {
        let offset = offset.map_or(-1, |o| i64::try_from(o).unwrap_or(i64::MAX));
        self.run("tag_batch", |mut c| {
            let mut inv = self.scripts.tag_batch.key(index);
            inv.key(fence)
                .arg(batch.max(1))
                .arg(duration_ms(fence_for).max(1))
                .arg(offset);
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    /// One SCAN step. Returns the next cursor and the keys.
    pub(crate) async fn scan(
        &self,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), FenceError> {
        self.run("scan", |mut c| {
            let cmd = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(count)
                .clone();
            async move { cmd.query_async(&mut c).await }
        })
        .await
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

    pub(crate) async fn publish(&self, channel: &str, message: &str) -> Result<(), FenceError> {
        self.run("publish", |mut c| {
            let cmd = redis::cmd("PUBLISH").arg(channel).arg(message).clone();
            async move { cmd.query_async::<Value>(&mut c).await.map(drop) }
        })
        .await
    }
}

fn is_wrong_type(err: &FenceError) -> bool {
    use std::error::Error as _;
    err.source()
        .and_then(|s| s.downcast_ref::<redis::RedisError>())
        .is_some_and(|e| e.code() == Some("WRONGTYPE"))
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
