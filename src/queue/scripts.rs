//! The Lua scripts of the queue: each step on an entry that touches
//! more than one key runs as one script, so it is atomic.

use redis::Script;

/// Records the start of an attempt. KEYS: attempts hash. ARGV: id, ttl ms.
/// Returns `{attempt number, last error or ''}`.
const BEGIN: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local err = redis.call('HGET', KEYS[1], ARGV[1] .. ':err')
return {n, err or ''}
";

/// Done: acknowledge, delete from the stream, forget the attempts, count
/// it. KEYS: stream, attempts, stats. ARGV: group, id. Returns XACK's count
/// (0 when another worker had already acknowledged it).
const ACK: &str = r"
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2], ARGV[2] .. ':err', ARGV[2] .. ':due')
if n > 0 then redis.call('HINCRBY', KEYS[3], 'applied', 1) end
return n
";

/// A failed attempt: keep the error and when the retry is due, and set
/// the entry's idle time so that it becomes claimable once its backoff has
/// passed (or, for a backoff above the claim idle time, claimable and then
/// set aside again by [`CLAIM`] until it is due). KEYS: stream, attempts,
/// stats. ARGV: group, consumer, id, error, delay ms, claim idle ms, ttl ms,
/// and `1` when the attempt is not to count (Redis was unavailable, not the
/// message at fault: BEGIN's increment is taken back).
const FAIL: &str = r"
if ARGV[8] == '1' then redis.call('HINCRBY', KEYS[2], ARGV[3], -1) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay, idle = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('HSET', KEYS[2], ARGV[3] .. ':err', ARGV[4], ARGV[3] .. ':due', now + delay)
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('HINCRBY', KEYS[3], 'retried', 1)
return #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', math.max(0, idle - delay), 'JUSTID')
";

/// Moves an entry to the dead-letter stream, atomically: XADD to dead,
/// XACK, XDEL. KEYS: stream, dead, attempts, stats. ARGV: group, id, error,
/// attempts, dead-letter max length, consumer. Returns 1 when moved, 0 when
/// the entry was no longer pending (another worker finished it).
const DEAD: &str = r"
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2], ARGV[2] .. ':err', ARGV[2] .. ':due')
if acked == 0 then return 0 end
local args = {'MAXLEN', '~', ARGV[5], '*'}
if e[1] and type(e[1][2]) == 'table' then
  for _, v in ipairs(e[1][2]) do table.insert(args, v) end
end
for _, v in ipairs({'error', ARGV[3], 'attempts', ARGV[4], 'source_id', ARGV[2], 'consumer', ARGV[6]}) do
  table.insert(args, v)
end
redis.call('XADD', KEYS[2], unpack(args))
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'dead_lettered', 1)
return 1
";

/// Takes over entries idle for at least the claim idle time (XAUTOCLAIM).
/// A failed entry whose retry is not due yet is set aside again (its idle
/// time set so that it is claimable when due) and not returned. Counts the
/// entries that were not failed attempts: those of a worker that died or
/// stopped. KEYS: stream, attempts, stats. ARGV: group, consumer, claim
/// idle ms, cursor, count. Returns `{cursor, entries, reclaimed}`.
const CLAIM: &str = r"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[3])
local due, reclaimed = {}, 0
for _, e in ipairs(r[2]) do
  local at = tonumber(redis.call('HGET', KEYS[2], e[1] .. ':due') or '0') or 0
  if at > now then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, e[1], 'IDLE', math.max(0, idle - (at - now)), 'JUSTID')
  else
    table.insert(due, e)
    if redis.call('HEXISTS', KEYS[2], e[1] .. ':err') == 0 then reclaimed = reclaimed + 1 end
  end
end
if reclaimed > 0 then redis.call('HINCRBY', KEYS[3], 'reclaimed', reclaimed) end
return {r[1], due, reclaimed}
";

/// The heartbeat of a worker: resets the idle time of the entries it holds
/// that are still its own, so that nobody reclaims them while it works.
/// An entry another worker took over meanwhile is left to that worker; an
/// entry no longer pending (done) is ignored. KEYS: stream. ARGV: group,
/// consumer, ids... Returns `{ids still held, ids another worker holds}`.
const REFRESH: &str = r"
local mine, lost = {}, {}
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] then
    if p[1][2] == ARGV[2] then
      table.insert(mine, ARGV[i])
      table.insert(args, ARGV[i])
    else
      table.insert(lost, ARGV[i])
    end
  end
end
if #mine > 0 then
  table.insert(args, 'JUSTID')
  redis.call(unpack(args))
end
return {mine, lost}
";

/// Removes a stopping worker's consumer from the group, only when nothing
/// is pending for it. KEYS: stream. ARGV: group, consumer.
const RETIRE: &str = r"
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// A snapshot of the queue for [`stats`](super::InvalidationQueue::stats).
/// KEYS: stream, dead, stats. ARGV: group. Returns `{depth, oldest age ms
/// or -1, {{consumer, pending, idle ms}...}, dead letters, {counter,
/// value...}, group exists 0/1}`.
const STATS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local depth = redis.call('XLEN', KEYS[1])
local age = -1
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if first[1] then
  local ms = tonumber(string.match(first[1][1], '^(%d+)'))
  if ms then age = math.max(0, now - ms) end
end
local consumers = {}
local ok, info = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if ok then
  for _, c in ipairs(info) do
    local m = {}
    for i = 1, #c, 2 do m[c[i]] = c[i + 1] end
    table.insert(consumers, {m['name'], m['pending'] or 0, m['idle'] or 0})
  end
end
local dead = redis.call('XLEN', KEYS[2])
return {depth, age, consumers, dead, redis.call('HGETALL', KEYS[3]), ok and 1 or 0}
";

/// Puts dead letters back on the queue as new entries with their original
/// fields (without the dead-letter ones), and removes them from the
/// dead-letter stream. KEYS: dead, stream, stats. ARGV: an id, or '' and a
/// count for the oldest ones. Returns `{{dead id, new id}...}`.
const REPLAY: &str = r"
local es
if ARGV[1] ~= '' then
  es = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
else
  es = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[2])
end
local meta = {error = true, attempts = true, source_id = true, consumer = true}
local out = {}
for _, e in ipairs(es) do
  local f = e[2]
  local n = #f
  local stripped = 0
  while n >= 2 and stripped < 4 and meta[f[n - 1]] do
    n = n - 2
    stripped = stripped + 1
  end
  local args = {}
  for i = 1, n do args[i] = f[i] end
  if #args == 0 then args = {'inv', ''} end
  local id = redis.call('XADD', KEYS[2], '*', unpack(args))
  redis.call('XDEL', KEYS[1], e[1])
  table.insert(out, {e[1], id})
end
if #out > 0 then redis.call('HINCRBY', KEYS[3], 'replayed', #out) end
return out
";

/// Deletes dead letters: the given ids, or all of them when none is given.
/// KEYS: dead. ARGV: ids... Returns how many were deleted.
const PURGE: &str = r"
if #ARGV == 0 then
  local n = redis.call('XLEN', KEYS[1])
  redis.call('DEL', KEYS[1])
  return n
end
return redis.call('XDEL', KEYS[1], unpack(ARGV))
";

/// The queue's scripts, shared by the queue and its workers.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) begin: Script,
    pub(super) ack: Script,
    pub(super) fail: Script,
    pub(super) dead: Script,
    pub(super) retire: Script,
    pub(super) claim: Script,
    pub(super) refresh: Script,
    pub(super) stats: Script,
    pub(super) replay: Script,
    pub(super) purge: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            begin: Script::new(BEGIN),
            ack: Script::new(ACK),
            fail: Script::new(FAIL),
            dead: Script::new(DEAD),
            retire: Script::new(RETIRE),
            claim: Script::new(CLAIM),
            refresh: Script::new(REFRESH),
            stats: Script::new(STATS),
            replay: Script::new(REPLAY),
            purge: Script::new(PURGE),
        }
    }
}
