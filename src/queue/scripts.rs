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

/// Done: acknowledge, delete from the stream, forget the attempts.
/// KEYS: stream, attempts. ARGV: group, id. Returns XACK's count (0 when
/// another worker had already acknowledged it).
const ACK: &str = r"
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2], ARGV[2] .. ':err')
return n
";

/// A failed attempt: keep the error, and set the entry's idle time so that
/// it becomes claimable once its backoff has passed.
/// KEYS: stream, attempts. ARGV: group, consumer, id, error, idle ms, ttl ms.
const FAIL: &str = r"
redis.call('HSET', KEYS[2], ARGV[3] .. ':err', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[5], 'JUSTID')
";

/// Moves an entry to the dead-letter stream, atomically: XADD to dead,
/// XACK, XDEL. KEYS: stream, dead, attempts. ARGV: group, id, error,
/// attempts, dead-letter max length, consumer. Returns 1 when moved, 0 when
/// the entry was no longer pending (another worker finished it).
const DEAD: &str = r"
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2], ARGV[2] .. ':err')
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
return 1
";

/// Removes a stopping worker's consumer from the group, only when nothing
/// is pending for it. KEYS: stream. ARGV: group, consumer.
const RETIRE: &str = r"
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// The queue's scripts, shared by the queue and its workers.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) begin: Script,
    pub(super) ack: Script,
    pub(super) fail: Script,
    pub(super) dead: Script,
    pub(super) retire: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            begin: Script::new(BEGIN),
            ack: Script::new(ACK),
            fail: Script::new(FAIL),
            dead: Script::new(DEAD),
            retire: Script::new(RETIRE),
        }
    }
}
