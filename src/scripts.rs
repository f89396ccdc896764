//! The Lua scripts the crate runs. Each is built once per layer;
//! `redis::Script` sends EVALSHA and loads the script on NOSCRIPT.
//!
//! Every key one script touches shares the entry's `{hash tag}`, except the
//! tag indexes and fences of the store script on a single server. In Redis
//! Cluster mode the store script writes per-entry tag markers in the entry's
//! slot instead (see the guide's chapter on Redis Cluster).

use redis::Script;

/// "Return the entry if it is fresh, else take the fill lease."
///
/// KEYS: entry, lease. ARGV: token, lease ms, now ms, mode (`fill` or
/// `refresh`: take the lease whatever is stored, even a `Vary` index),
/// format version, the `stored` time of the entry a background refresh
/// was decided on ('' for none: a refresh of an entry that another fill
/// has replaced since is not run, and the new entry is returned as a hit),
/// `1` when the caller listens for wake-ups (then a `held` reply also
/// leaves the waiter mark `<lease>:w`, living as long as the lease, so
/// the fill's write-back publishes its wake-up; with no mark it publishes
/// nothing: nobody waits remotely, and a store costs no `PUBLISH`), `1`
/// when the caller already holds the stale entry (then `won` carries no
/// fields). Only the fields the decision needs are read (`HMGET`); the
/// whole entry (`HGETALL`) only for a reply that carries it.
/// Returns `{'pass'}`, `{'vary', names}`, `{'hit', fields}`,
/// `{'won', fields, start}` (fields of a stale entry in `fill` mode, and
/// the Redis time the lease was taken, in µs) or
/// `{'held', pttl}`.
pub(crate) const ACQUIRE: &str = r"
local ok, m = pcall(redis.call, 'HMGET', KEYS[1], 'pass', 'v', 'vary', 'fresh', 'stored')
if not ok then m = {} end
local pass, v, vary, fresh, stored = m[1], m[2], m[3], m[4], m[5]
-- The whole entry, read only for a reply that carries it.
local function entry()
  local okh, e = pcall(redis.call, 'HGETALL', KEYS[1])
  if okh then return e end
  return {}
end
local now = tonumber(ARGV[3])
if tonumber(pass or '') and tonumber(pass) > now then return {'pass'} end
if v == ARGV[5] and ARGV[4] == 'refresh' and ARGV[6] ~= '' and stored and stored ~= ARGV[6] then
  return {'hit', entry()}
end
if v == ARGV[5] and ARGV[4] == 'fill' then
  if vary then return {'vary', vary} end
  if tonumber(fresh or '') and tonumber(fresh) > now then
    return {'hit', entry()}
  end
end
-- The time before the lease: a script that fails after its SET would leave
-- the lease held until it expires (an ACL denying TIME, say).
local t = redis.call('TIME')
-- Zero-padded to 6 digits (TIME's microseconds have no leading zeros);
-- string.rep rather than string.format, which goes through a double.
local start = t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[4] == 'fill' and v == ARGV[5] and ARGV[8] ~= '1' then return {'won', entry(), start} end
  return {'won', {}, start}
end
local ttl = redis.call('PTTL', KEYS[2])
if ttl == -1 then
  -- A lease without expiry (written by someone else) would hold the key
  -- forever: give it the lease lifetime.
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  ttl = tonumber(ARGV[2])
end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[2] .. ':w', '1', 'PX', math.max(ttl, 1))
end
return {'held', ttl}
";

/// The near-cache announcement, as a literal for `concat!`: defines
/// `near(k, tag)`, which `PUBLISH`es `<tag> <k>` on the namespace's `#near`
/// channel when the hash at `k` carries the `near` mark (a process may hold
/// it in its near cache: see [`NEAR_MARK`]) and returns the number of
/// receivers (0 when unmarked); `announced` counts its announcements.
/// `tag` is `<sender>:<seq>` when the caller
/// waits for acknowledgements, `-` when not. A tag starting with `=` (a
/// Redis Cluster, where a script's `PUBLISH` counts only the node's own
/// subscribers) publishes nothing and returns 1 for a marked entry: the
/// caller announces it on the namespace's sharded channel and counts the
/// receivers there.
macro_rules! near_announce {
    () => {
        r"
local announced = 0
local function near(k, tag)
  local okn, marked = pcall(redis.call, 'HEXISTS', k, 'near')
  if okn and marked == 1 then
    announced = announced + 1
    if string.sub(tag, 1, 1) == '=' then return 1 end
    return redis.call('PUBLISH', (string.match(k, '^[^|]*|') or '') .. '#near', tag .. ' ' .. k)
  end
  return 0
end
"
    };
}

/// Index keys out of eviction's reach, as a literal for `concat!`: the
/// URL's variant set, tag indexes and markers, and the URL, prefix and tag
/// fences are written with no TTL, so no `volatile-*` `maxmemory` policy can
/// evict them (an evicted index would hide live entries from invalidation;
/// an evicted fence would let a fenced fill store). Each is listed in the
/// "keep" sorted set, the script's LAST key (`<ns>|#keep`; on a Redis
/// Cluster one per hash slot, `<ns>|#keep:{<tag of the slot>}`), scored by
/// the Redis time (ms) it would have expired at (`ZADD GT`: the latest
/// wins). Defines `keep(k, ms)` (list `k` until `ms` from now) and
/// `reap()` (remove a bounded batch of keys whose time has come, and the
/// keep set itself once empty); every script that calls `keep` reaps.
macro_rules! keep_index {
    () => {
        r"
local KEEP = KEYS[#KEYS]
local keep_now
-- Set once this script listed a key: only then does it reap.
local kept = false
local function keep_clock()
  if not keep_now then
    local tk = redis.call('TIME')
    keep_now = tonumber(tk[1]) * 1000 + math.floor(tonumber(tk[2]) / 1000)
  end
  return keep_now
end
local function keep(k, ms, new)
  -- A key this script just created has no TTL to remove.
  if not new then redis.call('PERSIST', k) end
  kept = true
  if not pcall(redis.call, 'ZADD', KEEP, 'GT', keep_clock() + tonumber(ms), k) then
    redis.call('DEL', KEEP)
    redis.call('ZADD', KEEP, keep_clock() + tonumber(ms), k)
  end
end
local function reap()
  if not kept then return end
  local okr, due = pcall(redis.call, 'ZRANGEBYSCORE', KEEP, '-inf', keep_clock(), 'LIMIT', 0, 16)
  if okr and #due > 0 then
    redis.call('UNLINK', unpack(due))
    redis.call('ZREM', KEEP, unpack(due))
    if redis.call('ZCARD', KEEP) == 0 then redis.call('DEL', KEEP) end
  end
end
"
    };
}

/// Marks an entry as possibly held in a near cache, if it is still the
/// version that was read, as it was read: its writers then announce every
/// change of it (see `near_announce!`).
///
/// KEYS: entry. ARGV: the `gen` and `fresh` fields read. Returns 1 when
/// marked; 0 when the entry was replaced (STORE, FRESHEN), marked stale
/// (SOFT_INVALIDATE: `fresh` changed), given a pass marker, or removed.
pub(crate) const NEAR_MARK: &str = r"
local ok, f = pcall(redis.call, 'HMGET', KEYS[1], 'gen', 'fresh', 'pass')
if ok and f[1] == ARGV[1] and f[2] == ARGV[2] and not f[3] then
  redis.call('HSET', KEYS[1], 'near', '1')
  return 1
end
return 0
";

/// The start STORE and FRESHEN share, as a literal for `concat!`: the
/// lease must hold our token (else 0), and no URL, prefix or tag fence may
/// be at or after the fill's start (else the lease is dropped, waiters are
/// woken and 0 returned). Defines `started`, `wake`, `refuse`, `n` and
/// `markers` for the rest of the script. KEYS and ARGV as [`STORE`].
macro_rules! fenced_write_prologue {
    () => {
        r"
-- The lease, the URL fence and (single server) the time of the newest
-- prefix fence in one read (MGET answers nil for a key of another type).
local lf
if ARGV[10] == '1' then
  lf = redis.call('MGET', KEYS[2], KEYS[5], KEYS[6] .. ':last')
else
  lf = redis.call('MGET', KEYS[2], KEYS[5])
end
if lf[1] ~= ARGV[1] then
  if TMP then redis.call('DEL', TMP) end
  return 0
end
local started = tonumber(ARGV[7])
-- Set once STORE has listed the entry in the URL's variant set; `new_set`
-- when that created the set (it has no TTL for `keep` to remove).
local listed = false
local new_set = false
local function drop_lease()
  -- Only a waiter in another process that listens for wake-ups marks the
  -- lease (ACQUIRE): with no mark nobody is woken, and nothing published.
  -- The lease is there (read above): 2 keys removed means a mark.
  if redis.call('DEL', KEYS[2], KEYS[2] .. ':w') < 2 then return end
  if string.find(ARGV[3], '{', 1, true) then
    redis.call('SPUBLISH', ARGV[3], ARGV[4])
  else
    redis.call('PUBLISH', ARGV[3], ARGV[4])
  end
end
local function refuse(code)
  if TMP then redis.call('DEL', TMP) end
  drop_lease()
  return code
end
local uf = lf[2]
if uf and tonumber(uf) and tonumber(uf) >= started then return refuse(0) end
-- The prefix fences are read only when the newest is at or after the
-- fill's start (`:last`, PREFIX_FENCE: missing when there was none in a
-- fence's lifetime).
if ARGV[10] == '1' and lf[3] and (tonumber(lf[3]) or started) >= started then
  local okp, fences = pcall(redis.call, 'ZRANGEBYSCORE', KEYS[6], ARGV[7], '+inf')
  if okp then
    for _, p in ipairs(fences) do
      if string.sub(KEYS[3], 1, #p) == p then return refuse(0) end
    end
  end
end
local n = tonumber(ARGV[8])
local markers = n < 0
if markers then n = -n end
for i = 1, (markers and 0 or n) do
  local ok, ts = pcall(redis.call, 'GET', KEYS[6 + n + i])
  if ok and ts and tonumber(ts) and tonumber(ts) >= started then return refuse(0) end
end
"
    };
}

/// The end STORE and FRESHEN share (after `near_announce!`, whose `near`
/// announces a marked primary the `Vary` index replaces), as a literal for `concat!`: after the
/// entry was written (with `ttl` and the field/value pairs from
/// `ARGV[first]` on), its URL's `Vary` index, its place in the URL's variant
/// set (every entry but the URL's own: a Vary variant, a host or other key
/// dimension), its tag indexes or markers; then the lease is dropped, the
/// waiters woken and 1 returned.
macro_rules! fenced_write_epilogue {
    () => {
        r"
if ARGV[5] ~= '' then
  local ok, cur = pcall(redis.call, 'HGET', KEYS[3], 'vary')
  if not ok or cur ~= ARGV[5] then
    local key = key_field()
    if ARGV[11] == '1' then near(KEYS[3], '-') end
    redis.call('DEL', KEYS[3])
    redis.call('HSET', KEYS[3], 'v', ARGV[6], 'vary', ARGV[5], 'key', key)
  end
  if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
end
-- Every entry but the URL's own (a Vary variant, a host or other key
-- dimension) is listed in the URL's variant set.
if KEYS[1] .. ':vars' ~= KEYS[4] then
  if not listed then
    local ok2 = pcall(redis.call, 'SADD', KEYS[4], KEYS[1])
    if not ok2 then
      redis.call('DEL', KEYS[4])
      redis.call('SADD', KEYS[4], KEYS[1])
    end
  end
  keep(KEYS[4], ttl, new_set)
end
if markers then
  for i = 1, n do
    local m = KEYS[6 + i]
    redis.call('SET', m, KEYS[3])
    keep(m, ttl)
  end
elseif n > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = 1, n do
    local z = KEYS[6 + i]
    if redis.call('TYPE', z)['ok'] ~= 'zset' then redis.call('DEL', z) end
    -- GT: a shorter-lived variant of the primary never lowers its score
    -- (the primary is listed while any of its variants lives).
    redis.call('ZADD', z, 'GT', now + ttl, KEYS[3])
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    keep(z, ttl)
  end
end
reap()
drop_lease()
return 1
"
    };
}

/// The fenced write-back: stores only while the lease holds our token and
/// no invalidation fenced the fill out.
///
/// KEYS: entry, lease, primary, variants set, the URL fence (the Redis time
/// of the last path or key invalidation of the primary), the namespace's
/// prefix fences (a sorted set of key prefixes scored by the Redis time of
/// their invalidation; a same-slot stand-in in Redis Cluster mode), then `n`
/// tag indexes and their `n` tag fences, then (when ARGV 13 is `1`) the
/// fill's temporary key holding the new entry, then (last) the keep set
/// (`keep_index!`: the variant set, tag indexes and markers get no TTL).
/// ARGV: token, entry ttl ms, wake
/// channel (a sharded one, `SPUBLISH`ed, when it holds a `{hash tag}`: the
/// entry's, on a Redis Cluster; see `store::channels`), wake message, vary names ('' when the entry is the primary),
/// format version, fill start (Redis µs), `n`, the most variants a URL may
/// have, whether to read the prefix fences (`1`/`0`), whether a near cache
/// may hold the entry being replaced (`1` for a refresh or refetch, which
/// may replace a fresh entry: then a marked one is announced, see
/// `near_announce!`; a fill of a missing or stale entry replaces nothing a
/// near cache serves), the entry's `key` field (for a `Vary` index),
/// `1` when the new entry is the temporary key (written by the caller in
/// the same `MULTI`/`EXEC`: RENAMEd into place, or removed when the store
/// is refused; its body never crosses into Lua) or `0` when it is the
/// field/value pairs that follow (a Redis Cluster). The new hash keeps the old
/// one's `near` mark: a near cache that has not heard the announcement yet
/// (or never will: a lost subscription) may still hold the old copy, so the
/// next invalidation must still announce and wait.
///
/// In Redis Cluster mode `n` is negative and the `-n` keys after the
/// fences are the entry's tag markers (in the entry's slot): each is
/// set to the primary key, living at least as long as the entry, and no tag
/// fence is read (cluster tag and prefix invalidations fence by removing
/// leases).
/// Returns 1 when stored, 0 when fenced out (the lease is gone, or the URL,
/// a prefix of its key or one of the response's tags was invalidated at or
/// after the fill started), 2 when not stored because the URL has the most
/// variants it may have, 4 when the temporary key was gone (not stored);
/// a `NOPERM` error, the temporary key removed and the lease kept, when the
/// Redis user may not run `RENAME` (the caller stores with the fields as
/// ARGV).
///
/// The prefix fences (ARGV 10 `1`) are read only when their newest
/// (`<fences>:last`, written by [`PREFIX_FENCE`]; read in the lease's
/// `MGET`) is at or after the fill's start.
pub(crate) const STORE: &str = concat!(
    near_announce!(),
    keep_index!(),
    r"
-- The new entry, written by the caller under a key of its own (when
-- ARGV[13] is `1`): renamed into place, or removed when refused.
local TMP = ARGV[13] == '1' and KEYS[#KEYS - 1]
local function key_field() return ARGV[12] end
",
    fenced_write_prologue!(),
    r"
local ttl = tonumber(ARGV[2])
if KEYS[1] .. ':vars' ~= KEYS[4] then
  -- Listed at once (nothing refuses the store after this): only a new
  -- member is counted against the bound.
  local max = tonumber(ARGV[9])
  local oka, added = pcall(redis.call, 'SADD', KEYS[4], KEYS[1])
  local card = 0
  if not oka then
    redis.call('DEL', KEYS[4])
    added = redis.call('SADD', KEYS[4], KEYS[1])
    new_set = true
  elseif added == 1 then
    card = redis.call('SCARD', KEYS[4])
    new_set = card == 1
  end
  if card > max then
    redis.call('SREM', KEYS[4], KEYS[1])
    -- Forget variants that expired, a bounded look at a time.
    local scan = redis.call('SSCAN', KEYS[4], 0, 'COUNT', max * 2)
    for _, v in ipairs(scan[2]) do
      if redis.call('EXISTS', v) == 0 then redis.call('SREM', KEYS[4], v) end
    end
    if redis.call('SCARD', KEYS[4]) >= max then return refuse(2) end
    redis.call('SADD', KEYS[4], KEYS[1])
  end
  listed = true
end
if ARGV[11] == '1' then near(KEYS[1], '-') end
-- A near cache may still hold the old copy: the mark carries over. When
-- the entry is missing and near caches are registered (single server), a
-- near cache may still hold a copy Redis evicted without an announcement:
-- the new entry is marked, so its next write or invalidation is announced.
-- One read tells both: every hash the crate writes has `v` or `pass`
-- (another type errors: it is there too).
local okc, cur = pcall(redis.call, 'HMGET', KEYS[1], 'near', 'v', 'pass', 'fresh')
local marked = okc and cur[1] ~= false
local existed = not okc or cur[1] or cur[2] or cur[3] or cur[4]
if not marked and not existed and not string.find(ARGV[3], '{', 1, true) then
  local okr, r = pcall(redis.call, 'EXISTS', (string.match(KEYS[1], '^[^|]*|') or '') .. '#nearcaches')
  marked = okr and r == 1
end
if TMP then
  -- RENAME replaces the old hash whole. The key is missing when it expired
  -- or was evicted before this ran: nothing is stored.
  local okr, err = pcall(redis.call, 'RENAME', TMP, KEYS[1])
  if not okr then
    -- An ACL that denies RENAME (Redis 7.0: 'The user executing the script
    -- can't run this command', 7.2 on: 'ACL failure in script'): an error,
    -- the lease kept, and the caller stores with the fields as ARGV.
    local m = type(err) == 'table' and err.err or tostring(err)
    if string.find(m, 'NOPERM', 1, true) or string.find(m, 'ACL', 1, true)
        or string.find(m, 'executing the script can', 1, true) then
      redis.call('DEL', TMP)
      return redis.error_reply('NOPERM RENAME refused in STORE: ' .. m)
    end
    TMP = false
    return refuse(4)
  end
  if marked then redis.call('HSET', KEYS[1], 'near', '1') end
else
  if existed then redis.call('DEL', KEYS[1]) end
  if marked then
    redis.call('HSET', KEYS[1], 'near', '1', unpack(ARGV, 14))
  else
    redis.call('HSET', KEYS[1], unpack(ARGV, 14))
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
",
    fenced_write_epilogue!()
);

/// The header-only write-back of a revalidation (RFC 9111 §4.3.4): a
/// `304 Not Modified` freshened the entry the fill holds the lease of, so
/// only its head fields and expiry are rewritten; its body stays as it is
/// in Redis. Fenced exactly like [`STORE`]: written only while the lease
/// holds our token and no URL, prefix or tag invalidation fenced the fill
/// out (then the lease is dropped and 0 returned, as STORE does).
///
/// KEYS and ARGV 1 to 11: as [`STORE`] (the wake channel published the
/// same way; ARGV 9, the most variants, is not used: the entry is already
/// one of them). ARGV 12: the `head` field of
/// the entry that was revalidated, ARGV 13: its body's length; then the
/// field/value pairs to write (every field but `body`).
///
/// The entry must still be the one that was revalidated: a hash of this
/// format version, not a `Vary` index, with the same `head` (so the same
/// validators) and a body of the same length. If it was removed or replaced
/// meanwhile nothing is written, the lease is kept, and 3 is returned: the
/// fill then stores the response in full with [`STORE`].
/// Returns 1 when freshened, 0 when fenced out, 3 when the entry is gone.
pub(crate) const FRESHEN: &str = concat!(
    near_announce!(),
    keep_index!(),
    r"
local TMP = false
local function key_field()
  for i = 14, #ARGV - 1, 2 do
    if ARGV[i] == 'key' then return ARGV[i + 1] end
  end
  return ''
end
",
    fenced_write_prologue!(),
    r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 3 end
local cur = redis.call('HMGET', KEYS[1], 'v', 'head', 'vary')
if cur[1] ~= ARGV[6] or cur[2] ~= ARGV[12] or cur[3] then return 3 end
if redis.call('HSTRLEN', KEYS[1], 'body') ~= tonumber(ARGV[13]) then return 3 end
local ttl = tonumber(ARGV[2])
if ARGV[11] == '1' then near(KEYS[1], '-') end
redis.call('HDEL', KEYS[1], 'pass', 'retry', 'fails')
local first = 14
redis.call('HSET', KEYS[1], unpack(ARGV, first))
redis.call('PEXPIRE', KEYS[1], ttl)
",
    fenced_write_epilogue!()
);

/// Sets a prefix fence: fills of keys starting with the prefix that
/// started at or before now (Redis time) can no longer store. The fences
/// live in one sorted set per namespace, scored by time; fences older than
/// their lifetime are dropped, and when more than `max` remain they are
/// folded into one fence on the whole namespace (which refuses more fills,
/// never fewer).
///
/// KEYS: the namespace's prefix fences, the time of the newest of them
/// (`<fences>:last`, a string: STORE reads the fences only when it is at
/// or after the fill's start), the keep set (`keep_index!`: the fences
/// have no TTL). ARGV: key prefix, lifetime ms, max fences, namespace
/// prefix. Returns the fence's time (Redis µs).
pub(crate) const PREFIX_FENCE: &str = concat!(
    keep_index!(),
    r"
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local ttl = tonumber(ARGV[2])
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then redis.call('DEL', KEYS[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now) - ttl * 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
if redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  redis.call('ZADD', KEYS[1], now, ARGV[4])
end
-- The newest fence's time only rises (a clock stepping back keeps the
-- later one, at or after every score in the set).
local okl, last = pcall(redis.call, 'GET', KEYS[2])
if not okl or not tonumber(last or '') or tonumber(last) < tonumber(now) then
  redis.call('SET', KEYS[2], now)
end
keep(KEYS[1], ttl)
keep(KEYS[2], ttl)
reap()
return now
"
);

/// Starts (or continues) a tag invalidation: sets the tag's fence to now,
/// so fills that started before can't store an entry carrying the tag, and
/// pops a batch of the entries the tag index lists.
///
/// KEYS: tag index, tag fence, the keep set (`keep_index!`: the fence has
/// no TTL). ARGV: batch size, fence ttl ms.
pub(crate) const TAG_BATCH: &str = concat!(
    keep_index!(),
    r"
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
redis.call('SET', KEYS[2], now)
keep(KEYS[2], ARGV[2])
reap()
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then
  redis.call('DEL', KEYS[1])
  return {}
end
local members = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #members > 0 then redis.call('ZREM', KEYS[1], unpack(members)) end
return members
"
);

/// Removes a tag marker (Redis Cluster mode) after the tag walk
/// invalidated the primary it names, unless that primary was stored again
/// meanwhile (its store set the marker again: it must stay, or the tag
/// would no longer reach the entry).
///
/// KEYS: marker, primary (same slot). Returns 1 when removed.
pub(crate) const TAG_UNMARK: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local ok, p = pcall(redis.call, 'GET', KEYS[1])
if ok and p == KEYS[2] then return redis.call('UNLINK', KEYS[1]) end
return 0
";

/// One page of a soft tag invalidation: the tag index is read (not
/// popped) in score order from a cursor, so entries added or moved while
/// the walk pages are never skipped: a page always ends with every member
/// of its last score. Sets the tag's fence on the first page.
///
/// KEYS: tag index, tag fence, the keep set (`keep_index!`). ARGV: page
/// size, fence ttl ms, cursor
/// (`-inf` for the first page, then the `(score` returned last).
/// Returns the page's members followed by the cursor of the next page, or
/// nothing when the walk is done.
pub(crate) const TAG_PAGE: &str = concat!(
    keep_index!(),
    r"
if ARGV[3] == '-inf' then
  local t = redis.call('TIME')
  local now = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[2], now)
  keep(KEYS[2], ARGV[2])
  reap()
end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then return {} end
local page = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
if #page == 0 then return {} end
local last = page[#page]
local out, seen = {}, {}
for i = 1, #page, 2 do
  table.insert(out, page[i])
  seen[page[i]] = true
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], last, last)) do
  if not seen[m] then table.insert(out, m) end
end
table.insert(out, '(' .. last)
return out
"
);

/// Gives a lease up without storing; optionally leaves a pass marker on
/// the key that was filled, or backs the next refresh of the entry there off.
///
/// KEYS: lease, filled key (the primary or a variant), primary, variants
/// set, the keep set (`keep_index!`). ARGV: token, pass-until ms (0 for none), pass ms, wake channel
/// (sharded when it holds a `{hash tag}`, as in [`STORE`]), wake message, vary names ('' when the response does not vary), format
/// version, the URL's key, backoff base ms (0 for none), backoff cap ms,
/// now ms.
///
/// A pass marker on a variant needs the primary to be a `Vary` index that
/// sends lookups to the variant: it is created when the primary is empty,
/// and no marker is left when the primary holds something else. A backoff
/// counts the failures in the entry's `fails` field and sets its `retry`
/// time to now + base * 2^(fails - 1), at most the cap; a successful store
/// rewrites the hash and so resets both.
pub(crate) const RELEASE: &str = concat!(
    near_announce!(),
    keep_index!(),
    r"
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
    keep(KEYS[4], pass_ms)
    reap()
  end
end
if pass_ms > 0 then
  near(KEYS[2], '-')
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
if redis.call('DEL', KEYS[1] .. ':w') == 1 then
  -- A waiter in another process listens (see ACQUIRE's waiter mark).
  if string.find(ARGV[4], '{', 1, true) then
    redis.call('SPUBLISH', ARGV[4], ARGV[5])
  else
    redis.call('PUBLISH', ARGV[4], ARGV[5])
  end
end
if pass_ms > 0 then return 2 end
return 1
"
);

/// Extends a lease we still hold. KEYS: lease. ARGV: token, ms.
pub(crate) const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

/// Removes an entry, a batch of its variants and their leases, and (when
/// asked) sets the URL's fence to now, so that no fill of the URL that
/// started before, of any variant, even one never stored, can write back.
///
/// KEYS: primary, variants set, URL fence, then entries of the URL a prefix
/// walk found (removed too, listed in the variant set or not), then the
/// keep set (`keep_index!`). ARGV: invalidate channel, sender
/// id, `1` to set the fence, fence ttl ms, batch size, near-cache ack tag
/// (`<sender>:<seq>`), `1` to announce a missing primary on `#near`.
/// Returns the number of entries removed, the number of variants left
/// in the set (call again while it is not zero), how many near-cache
/// listeners heard of a removed marked entry (acknowledgements to wait for),
/// and how many marked entries were announced.
///
/// A primary that is missing (never stored, expired, or evicted under
/// `maxmemory`, which announces nothing) is announced all the same (with
/// ARGV 7): a near cache may still hold it, and drops its URL.
///
/// When the primary is the URL's own key, variants are popped from the
/// URL's set in batches; when it is a dimension of the URL (one host), only
/// it and its own `Vary` variants go (the set is bounded by `max_variants`).
pub(crate) const INVALIDATE: &str = concat!(
    near_announce!(),
    keep_index!(),
    r"
if ARGV[3] == '1' then
  local t = redis.call('TIME')
  local now = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[3], now)
  keep(KEYS[3], ARGV[4])
  reap()
end
local n = 0
local left = 0
local heard = 0
local whole = KEYS[1] .. ':vars' == KEYS[2]
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind == 'set' then
  local vars
  if whole then
    vars = redis.call('SPOP', KEYS[2], tonumber(ARGV[5]))
  else
    local below = KEYS[1] .. ':v:'
    vars = {}
    for _, v in ipairs(redis.call('SMEMBERS', KEYS[2])) do
      if string.sub(v, 1, #below) == below then table.insert(vars, v) end
    end
    if #vars > 0 then redis.call('SREM', KEYS[2], unpack(vars)) end
  end
  for _, v in ipairs(vars) do
    heard = heard + near(v, ARGV[6])
    n = n + redis.call('UNLINK', v)
    redis.call('UNLINK', v .. ':lease')
  end
  if whole then
    left = redis.call('SCARD', KEYS[2])
  else
    redis.call('SREM', KEYS[2], KEYS[1])
  end
elseif kind ~= 'none' and whole then
  redis.call('UNLINK', KEYS[2])
end
-- Entries a prefix walk found, whether the variant set lists them or not.
for i = 4, #KEYS - 1 do
  local x = KEYS[i]
  if redis.call('TYPE', x)['ok'] == 'hash' then
    heard = heard + near(x, ARGV[6])
    n = n + redis.call('UNLINK', x)
    redis.call('UNLINK', x .. ':lease')
  end
end
local had = redis.call('EXISTS', KEYS[1])
-- (Any announcement of the URL drops all of it: one is enough.)
if had == 0 and ARGV[7] == '1' and announced == 0 then
  announced = announced + 1
  heard = heard + redis.call('PUBLISH', (string.match(KEYS[1], '^[^|]*|') or '') .. '#near', ARGV[6] .. ' ' .. KEYS[1])
end
local index = false
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
  index = redis.call('HEXISTS', KEYS[1], 'vary') == 1
end
heard = heard + near(KEYS[1], ARGV[6])
redis.call('UNLINK', KEYS[1], KEYS[1] .. ':lease')
if had == 1 and not index then n = n + 1 end
-- Redis Cluster: the announcement is the caller's SPUBLISH, after this
-- script. Until it clears the URL's owed mark (CLEAR_OWED), a walk finds
-- the mark and announces the URL again (an earlier SPUBLISH failed).
if string.sub(ARGV[6], 1, 1) == '=' then
  local owed = (string.match(KEYS[1], '^[^}]*}') or KEYS[1]) .. ':near-owed'
  if announced == 0 and redis.call('EXISTS', owed) == 1 then
    announced = 1
    heard = heard + 1
  end
  if announced > 0 then redis.call('SET', owed, ARGV[6]) end
end
redis.call('PUBLISH', ARGV[1], 'key:' .. ARGV[2] .. ':' .. KEYS[1])
return {n, left, heard, announced}
"
);

/// Clears a URL's owed near-cache announcement (Redis Cluster, see
/// [`INVALIDATE`]) once it went out: only if no later invalidation owes
/// one since (the mark still holds this one's tag).
///
/// KEYS: the URL's `:near-owed` mark. ARGV: the ack tag INVALIDATE set.
/// Returns 1 when cleared.
pub(crate) const CLEAR_OWED: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Marks an entry and a batch of its variants stale: their `fresh` time
/// becomes 0, so no reader, whatever its clock says, takes them for fresh.
/// Removes their leases and (when asked) sets the URL's fence as
/// [`INVALIDATE`] does.
///
/// KEYS: primary, variants set, URL fence, entries a prefix walk found,
/// the keep set (as [`INVALIDATE`]). ARGV: `1` to set the fence,
/// fence ttl ms, batch size, SSCAN cursor of the variants set (`0` first),
/// near-cache ack tag, `1` to announce a missing primary (as [`INVALIDATE`]).
/// Returns the number of entries marked, the next cursor (`0` when done),
/// how many near-cache listeners heard of a marked entry and how many
/// marked entries were announced.
///
/// When the primary is a dimension of the URL (one host), only it and its
/// own `Vary` variants are marked.
pub(crate) const SOFT_INVALIDATE: &str = concat!(
    near_announce!(),
    keep_index!(),
    r"
if ARGV[1] == '1' then
  local t = redis.call('TIME')
  local now = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[3], now)
  keep(KEYS[3], ARGV[2])
  reap()
end
local n = 0
local heard = 0
local keys = {}
local cursor = '0'
local whole = KEYS[1] .. ':vars' == KEYS[2]
local below = KEYS[1] .. ':v:'
local missing = false
if ARGV[4] == '0' then
  table.insert(keys, KEYS[1])
  -- Entries a prefix walk found, whether the variant set lists them or not.
  for i = 4, #KEYS - 1 do table.insert(keys, KEYS[i]) end
  missing = ARGV[6] == '1' and redis.call('EXISTS', KEYS[1]) == 0
end
if redis.call('TYPE', KEYS[2])['ok'] == 'set' then
  local scan = redis.call('SSCAN', KEYS[2], ARGV[4], 'COUNT', tonumber(ARGV[3]))
  cursor = scan[1]
  for _, v in ipairs(scan[2]) do
    if whole or string.sub(v, 1, #below) == below then table.insert(keys, v) end
  end
end
local marked = {}
for _, k in ipairs(keys) do
  local ok, fresh = pcall(redis.call, 'HGET', k, 'fresh')
  if ok and fresh and not marked[k] then
    marked[k] = true
    heard = heard + near(k, ARGV[5])
    if fresh ~= '0' then redis.call('HSET', k, 'fresh', '0') end
    n = n + 1
  end
  redis.call('UNLINK', k .. ':lease')
end
-- (Any announcement of the URL drops all of it: one is enough.)
if missing and announced == 0 then
  announced = announced + 1
  heard = heard + redis.call('PUBLISH', (string.match(KEYS[1], '^[^|]*|') or '') .. '#near', ARGV[5] .. ' ' .. KEYS[1])
end
return {n, cursor, heard, announced}
"
);

#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) acquire: Script,
    pub(crate) store: Script,
    pub(crate) freshen: Script,
    pub(crate) release: Script,
    pub(crate) extend: Script,
    pub(crate) invalidate: Script,
    pub(crate) soft_invalidate: Script,
    pub(crate) tag_batch: Script,
    pub(crate) tag_page: Script,
    pub(crate) tag_unmark: Script,
    pub(crate) prefix_fence: Script,
    pub(crate) near_mark: Script,
    pub(crate) clear_owed: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            acquire: Script::new(ACQUIRE),
            store: Script::new(STORE),
            freshen: Script::new(FRESHEN),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
            invalidate: Script::new(INVALIDATE),
            soft_invalidate: Script::new(SOFT_INVALIDATE),
            tag_batch: Script::new(TAG_BATCH),
            tag_page: Script::new(TAG_PAGE),
            tag_unmark: Script::new(TAG_UNMARK),
            prefix_fence: Script::new(PREFIX_FENCE),
            near_mark: Script::new(NEAR_MARK),
            clear_owed: Script::new(CLEAR_OWED),
        }
    }
}
