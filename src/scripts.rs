//! The Lua scripts the crate runs. Each is built once per layer;
//! `redis::Script` sends EVALSHA and loads the script on NOSCRIPT.
//!
//! Every key one script touches shares the entry's `{hash tag}`, except the
//! tag indexes and fences of the store script on a single server. In Redis
//! Cluster mode the store script writes per-entry tag markers in the entry's
//! slot instead (see the README's section on Redis Cluster).

use redis::Script;

/// "Return the entry if it is fresh, else take the fill lease."
///
/// KEYS: entry, lease. ARGV: token, lease ms, now ms, mode (`fill` or
/// `refresh`: take the lease whatever is stored, even a `Vary` index),
/// format version, the `stored` time of the entry a background refresh
/// was decided on ('' for none: a refresh of an entry that another fill
/// has replaced since is not run, and the new entry is returned as a hit).
/// Returns `{'pass'}`, `{'vary', names}`, `{'hit', fields}`,
/// `{'won', fields, start}` (fields of a stale entry in `fill` mode, and
/// the Redis time the lease was taken, in ms) or
/// `{'held', pttl}`.
pub(crate) const ACQUIRE: &str = r"
local ok, e = pcall(redis.call, 'HGETALL', KEYS[1])
if not ok then e = {} end
local f = {}
for i = 1, #e, 2 do f[e[i]] = e[i + 1] end
local now = tonumber(ARGV[3])
if tonumber(f['pass'] or '') and tonumber(f['pass']) > now then return {'pass'} end
if f['v'] == ARGV[5] and ARGV[4] == 'refresh' and ARGV[6] ~= '' and f['stored'] and f['stored'] ~= ARGV[6] then
  return {'hit', e}
end
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
local ttl = redis.call('PTTL', KEYS[2])
if ttl == -1 then
  -- A lease without expiry (written by someone else) would hold the key
  -- forever: give it the lease lifetime.
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return {'held', ttl}
";

/// The fenced write-back: stores only while the lease holds our token.
///
/// KEYS: entry, lease, primary, variants set, then `n` tag indexes and
/// their `n` tag fences. ARGV: token, entry ttl ms, wake channel, wake
/// message, vary names ('' when the entry is the primary), format version,
/// fill start (Redis ms), `n`, then field/value pairs.
///
/// In Redis Cluster mode `n` is negative and the `-n` keys after the
/// variants set are the entry's tag markers (in the entry's slot): each is
/// set to the primary key, living at least as long as the entry, and no tag
/// fence is read (cluster tag invalidations fence by removing leases).
/// Returns 1 when stored, 0 when fenced out (the lease is gone, or one of
/// the response's tags was invalidated after the fill started).
pub(crate) const STORE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[8])
local markers = n < 0
if markers then n = -n end
for i = 1, (markers and 0 or n) do
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
end
-- Every entry but the URL's own (a Vary variant, a host or other key
-- dimension) is listed in the URL's variant set.
if KEYS[1] .. ':vars' ~= KEYS[4] then
  local ok2 = pcall(redis.call, 'SADD', KEYS[4], KEYS[1])
  if not ok2 then
    redis.call('DEL', KEYS[4])
    redis.call('SADD', KEYS[4], KEYS[1])
  end
  if redis.call('PTTL', KEYS[4]) < ttl then redis.call('PEXPIRE', KEYS[4], ttl) end
end
if markers then
  for i = 1, n do
    local m = KEYS[4 + i]
    local keep = redis.call('PTTL', m)
    if keep < ttl then keep = ttl end
    redis.call('SET', m, KEYS[3], 'PX', keep)
  end
elseif n > 0 then
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
pub(crate) const TAG_BATCH: &str = r"
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

/// Gives a lease up without storing; optionally leaves a pass marker on
/// the key that was filled, or backs the next refresh of the entry there off.
///
/// KEYS: lease, filled key (the primary or a variant), primary, variants
/// set. ARGV: token, pass-until ms (0 for none), pass ms, wake channel, wake
/// message, vary names ('' when the response does not vary), format
/// version, the URL's key, backoff base ms (0 for none), backoff cap ms,
/// now ms.
///
/// A pass marker on a variant needs the primary to be a `Vary` index that
/// sends lookups to the variant: it is created when the primary is empty,
/// and no marker is left when the primary holds something else. A backoff
/// counts the failures in the entry's `fails` field and sets its `retry`
/// time to now + base * 2^(fails - 1), at most the cap; a successful store
/// rewrites the hash and so resets both.
pub(crate) const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local pass_ms = tonumber(ARGV[3])
if pass_ms > 0 and ARGV[6] ~= '' and KEYS[2] ~= KEYS[3] then
  local kind = redis.call('TYPE', KEYS[3])['ok']
  if kind == 'none' then
    redis.call('HSET', KEYS[3], 'v', ARGV[7], 'vary', ARGV[6], 'key', ARGV[8])
    redis.call('PEXPIRE', KEYS[3], pass_ms)
  elseif kind == 'hash' and redis.call('HGET', KEYS[3], 'vary') == ARGV[6] then
    if redis.call('PTTL', KEYS[3]) < pass_ms then redis.call('PEXPIRE', KEYS[3], pass_ms) end
  else
    pass_ms = 0
  end
  if pass_ms > 0 then
    if not pcall(redis.call, 'SADD', KEYS[4], KEYS[2]) then
      redis.call('DEL', KEYS[4])
      redis.call('SADD', KEYS[4], KEYS[2])
    end
    if redis.call('PTTL', KEYS[4]) < pass_ms then redis.call('PEXPIRE', KEYS[4], pass_ms) end
  end
end
if pass_ms > 0 then
  if redis.call('TYPE', KEYS[2])['ok'] ~= 'hash' then redis.call('DEL', KEYS[2]) end
  redis.call('HSET', KEYS[2], 'pass', ARGV[2])
  if redis.call('PTTL', KEYS[2]) < pass_ms then redis.call('PEXPIRE', KEYS[2], pass_ms) end
end
local base = tonumber(ARGV[9])
if base > 0 and redis.call('TYPE', KEYS[2])['ok'] == 'hash'
    and redis.call('HEXISTS', KEYS[2], 'fresh') == 1 then
  local fails = redis.call('HINCRBY', KEYS[2], 'fails', 1)
  local delay = base * 2 ^ math.min(fails - 1, 40)
  if delay > tonumber(ARGV[10]) then delay = tonumber(ARGV[10]) end
  redis.call('HSET', KEYS[2], 'retry', string.format('%d', tonumber(ARGV[11]) + delay))
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
if pass_ms > 0 then return 2 end
return 1
";

/// Extends a lease we still hold. KEYS: lease. ARGV: token, ms.
pub(crate) const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

/// Removes an entry, its variants and every lease, so that no fill that
/// started before can write back. KEYS: primary, the variant set of its URL.
/// ARGV: invalidate channel, sender id. Returns the number of entries removed.
///
/// When the primary is the URL's own key, every listed variant and
/// dimension goes; when it is a dimension of the URL (one host), only it and
/// its own `Vary` variants do.
pub(crate) const INVALIDATE: &str = r"
local n = 0
local whole = KEYS[1] .. ':vars' == KEYS[2]
local below = KEYS[1] .. ':v:'
local ok, vars = pcall(redis.call, 'SMEMBERS', KEYS[2])
if ok then
  for _, v in ipairs(vars) do
    if whole or v == KEYS[1] or string.sub(v, 1, #below) == below then
      n = n + redis.call('UNLINK', v)
      redis.call('UNLINK', v .. ':lease')
      if not whole then redis.call('SREM', KEYS[2], v) end
    end
  end
end
local had = redis.call('EXISTS', KEYS[1])
local kind = redis.call('TYPE', KEYS[1])['ok']
local index = false
if kind == 'hash' then index = redis.call('HEXISTS', KEYS[1], 'vary') == 1 end
redis.call('UNLINK', KEYS[1], KEYS[1] .. ':lease')
if whole then redis.call('UNLINK', KEYS[2]) end
if had == 1 and not index then n = n + 1 end
redis.call('PUBLISH', ARGV[1], 'key:' .. ARGV[2] .. ':' .. KEYS[1])
return n
";

/// Marks an entry and its variants stale. KEYS: primary, the variant set of
/// its URL (filtered as in [`INVALIDATE`]). ARGV: now ms. Returns the number
/// of entries marked.
pub(crate) const SOFT_INVALIDATE: &str = r"
local n = 0
local keys = {KEYS[1]}
local whole = KEYS[1] .. ':vars' == KEYS[2]
local below = KEYS[1] .. ':v:'
local ok, vars = pcall(redis.call, 'SMEMBERS', KEYS[2])
if ok then
  for _, v in ipairs(vars) do
    if whole or string.sub(v, 1, #below) == below then table.insert(keys, v) end
  end
end
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

#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) acquire: Script,
    pub(crate) store: Script,
    pub(crate) release: Script,
    pub(crate) extend: Script,
    pub(crate) invalidate: Script,
    pub(crate) soft_invalidate: Script,
    pub(crate) tag_batch: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
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
