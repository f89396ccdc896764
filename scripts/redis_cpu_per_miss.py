#!/usr/bin/env python3
"""Redis CPU per cache miss and per hit, by command, with no client in the way.

Sends, pipelined in batches over one connection (as the layer's multiplexed
connection does under load), what one request costs Redis, for N fresh keys:

- naive miss: GET, then SET PX of the 4 KiB body (cache-aside);
- fence miss: the lookup's HMGET, ACQUIRE, STORE, with the scripts of a
  `src/scripts.rs` (the entry's fields in that checkout's format; a host
  dimension, so the entry is listed in its URL's variant set, as in the
  load harness);
- floor: the cheapest fenced store one can write: HMGET, a script taking the
  lease (SET NX PX, TIME), a script checking the lease and the URL fence
  (MGET) and writing the entry (HSET, PEXPIRE) and dropping the lease (DEL);
  and the same with the entry written under a temporary key in one
  transaction with the store script, which RENAMEs it into place (no body
  crossing into Lua);
- hits: GET of a 4 KiB string, HMGET of an entry's lookup fields.

Redis CPU from `INFO cpu` (main thread) deltas over the run, per request.
With `CALLGRIND=1` Redis runs under `valgrind --tool=callgrind` and the
instructions it executed per request are printed instead (deterministic:
use it on a loaded machine; a run takes a few minutes).

    python3 scripts/redis_cpu_per_miss.py SCRIPTS_RS FORMAT [N]

FORMAT is 1 (fields status hdrs body len delta stored fresh stale gen key)
or 2 (v head body stored fresh gen key). Starts its own redis-server.
"""
import os, re, socket, subprocess, sys, tempfile, time

def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)

class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""
    def _line(self):
        while b"\r\n" not in self.buf:
            self.buf += self.s.recv(1 << 20)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line
    def _read(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t in (b"+", b"-", b":"):
            if t == b"-":
                return Exception(rest.decode())
            return rest
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.s.recv(1 << 20)
            v, self.buf = self.buf[:n], self.buf[n + 2:]
            return v
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ValueError(line)
    def pipeline(self, cmds):
        self.s.sendall(b"".join(cmds))
        return [self._read() for _ in cmds]
    def call(self, *args):
        r = self.pipeline([resp(*args)])[0]
        if isinstance(r, Exception):
            raise r
        return r

def lua_of(path):
    src = open(path).read()
    macros = {}
    for m in re.finditer(r'macro_rules! (\w+) \{\s*\(\) => \{\s*r"(.*?)"\s*\};\s*\}', src, re.S):
        macros[m.group(1)] = m.group(2)
    consts = {}
    for m in re.finditer(r'pub\(crate\) const (\w+): &str = (r"(.*?)";|concat!\((.*?)\n\);)', src, re.S):
        if m.group(3) is not None:
            consts[m.group(1)] = m.group(3)
        else:
            parts = []
            for p in re.finditer(r'(\w+)!\(\)|r"(.*?)"', m.group(4), re.S):
                parts.append(macros[p.group(1)] if p.group(1) else p.group(2))
            consts[m.group(1)] = "".join(parts)
    return consts

def main():
    scripts_rs, fmt = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
    lua = lua_of(scripts_rs)
    port = 6300 + os.getpid() % 600
    d = tempfile.mkdtemp()
    cmd = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", d]
    if os.environ.get("CALLGRIND") == "1":
        global CG
        CG = d
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/cg.out"] + cmd
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                c = Conn(port); c.call("PING"); break
            except OSError:
                time.sleep(0.1)
        global PID
        PID = srv.pid
        run(c, lua, fmt, n)
    finally:
        srv.terminate(); srv.wait()

CG = None
PID = None
DUMPS = [0]

def cpu(c):
    if CG:
        # Instructions since the last dump (the dump zeroes the counters).
        c.call("PING")
        DUMPS[0] += 1
        subprocess.run(["callgrind_control", "-d", str(PID)], capture_output=True)
        dump = f"{CG}/cg.out.{DUMPS[0]}"
        for _ in range(200):
            if os.path.exists(dump) and "totals:" in open(dump).read():
                break
            time.sleep(0.1)
        for line in open(dump):
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1]) / 1e6
        raise RuntimeError("no callgrind totals")
    info = c.call("INFO", "cpu").decode()
    v = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
    return float(v["used_cpu_user_main_thread"]) + float(v["used_cpu_sys_main_thread"])

BODY = b"x" * int(os.environ.get("BODY_BYTES", "4096"))
HEADERS = (b"\x00\x0ccontent-type\x00\x00\x00\x18text/html; charset=utf-8"
           b"\x00\x0dcache-control\x00\x00\x00\x12public, max-age=60"
           b"\x00\x04etag\x00\x00\x00\x12\"5f3a9c0e2b7d41a8\""
           b"\x00\x0dlast-modified\x00\x00\x00\x1dMon, 07 Dec 2026 10:00:00 GMT")
NOW = int(time.time() * 1000)
# Entries live through the run (hits are measured on them at the end).
TTL = 600000

def fields(fmt, key):
    common_tail = [b"stored", str(NOW).encode(), b"fresh", str(NOW + 2000).encode(),
                   b"gen", b"0123456789abcdef0123456789abcdef", b"key", key.encode()]
    if fmt == "1":
        return [b"v", b"1", b"status", b"200", b"hdrs", HEADERS, b"body", BODY, b"len", str(len(BODY)).encode(),
                b"delta", b"20", b"stale", str(NOW + 2000).encode()] + common_tail
    head = (200).to_bytes(2, "big") + (20).to_bytes(8, "big") + (NOW + 2000).to_bytes(8, "big") \
        + len(BODY).to_bytes(8, "big") + HEADERS
    return [b"v", b"2", b"head", head, b"body", BODY] + common_tail

LOOKUP = {"1": ["pass", "v", "vary", "status", "hdrs", "len", "body", "delta", "stored", "fresh",
                "stale", "retry"],
          "2": ["pass", "v", "vary", "head", "body", "stored", "fresh", "retry"]}

FLOOR_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  return {'won', t[1] .. string.format('%06d', tonumber(t[2]))}
end
return {'held', redis.call('PTTL', KEYS[1])}
"""
FLOOR_STORE = """
local lf = redis.call('MGET', KEYS[2], KEYS[3])
if lf[1] ~= ARGV[1] then return 0 end
if lf[2] and tonumber(lf[2]) >= tonumber(ARGV[3]) then redis.call('DEL', KEYS[2]) return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""

# The same, the new entry written under a temporary key in the same
# transaction (MULTI, HSET, PEXPIRE, EVALSHA, EXEC) and renamed into place:
# no body crosses into Lua.
FLOOR_STORE_RENAME = """
local lf = redis.call('MGET', KEYS[2], KEYS[3])
if lf[1] ~= ARGV[1] or (lf[2] and tonumber(lf[2]) >= tonumber(ARGV[3])) then
  redis.call('DEL', KEYS[2], KEYS[4])
  return 0
end
redis.call('RENAME', KEYS[4], KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""

def measure(c, name, batches):
    c.call("CONFIG", "RESETSTAT")
    before = cpu(c)
    if CG:
        before = 0
    reqs = 0
    for cmds, k in batches:
        for r in c.pipeline(cmds):
            if isinstance(r, Exception):
                raise r
        reqs += k
    spent = cpu(c) - before
    stats = c.call("INFO", "commandstats").decode()
    calls = {}
    for l in stats.splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", l)
        if m and not m.group(1).startswith(("info", "config")):
            calls[m.group(1)] = int(m.group(2))
    total = sum(calls.values())
    unit = 1e6 if not CG else 1e3
    print(f"| {name} | {spent / reqs * unit:.1f} | {total / reqs:.2f} | "
          + ", ".join(f"{k} {v / reqs:g}" for k, v in sorted(calls.items())) + " |")

TEMP_KEY = False
INLINE = os.environ.get("INLINE") == "1"
TEMP_TTL = 10000

def run(c, lua, fmt, n):
    global TEMP_KEY
    # STORE of this checkout takes the new entry under a key of its own
    # (MULTI, HSET, PEXPIRE, EVALSHA, EXEC); `INLINE=1`: its fields as ARGV
    # (as on a Redis Cluster).
    TEMP_KEY = "RENAME" in lua["STORE"]
    sha = {k: c.call("SCRIPT", "LOAD", v).decode() for k, v in
           {"acquire": lua["ACQUIRE"], "store": lua["STORE"], "facq": FLOOR_ACQUIRE,
            "fstore": FLOOR_STORE, "fstore2": FLOOR_STORE_RENAME}.items()}
    ns = "bench:"
    batch = 50
    print(f"{n} requests of each kind, pipelined {batch} at a time; format {fmt}\n")
    print("| what | " + ("Redis instructions (thousands)/request" if CG else "Redis CPU µs/request")
          + " | commands/request | commands |")
    print("|---|---:|---:|---|")

    def keys(i, tag):
        url = f"{ns}|/k/{tag}{i}:{{{i:032x}}}"
        entry = url + ":h:shop.example"
        return url, entry

    def naive(i):
        k = f"naive:/k/{i}"
        return [resp("GET", k), resp("SET", k, BODY, "PX", TTL)]

    def fence(i, tag="f"):
        url, entry = keys(i, tag)
        lease = entry + ":lease"
        token = f"tok{i}"
        started = NOW * 1000
        acq = resp("EVALSHA", sha["acquire"], 2, entry, lease, token, 5000, NOW, "fill", fmt, "", "0", "0")
        store_keys = [entry, lease, url, url + ":vars", url + ":fence", ns + "|#fences", ns + "|#keep"]
        store_args = [token, TTL, ns + "|#wake", lease, "", fmt, started, 0, 64, "1", "0"]
        entry_fields = fields(fmt, "/k/" + str(i))
        if not TEMP_KEY:
            store = resp("EVALSHA", sha["store"], len(store_keys), *store_keys, *store_args, *entry_fields)
            return [resp("HMGET", entry, *LOOKUP[fmt]), acq, store]
        if INLINE:
            store = resp("EVALSHA", sha["store"], len(store_keys), *store_keys, *store_args,
                         "/k/" + str(i), "0", *entry_fields)
            return [resp("HMGET", entry, *LOOKUP[fmt]), acq, store]
        # The entry under a key of the fill's own (its lease and token), in
        # one MULTI/EXEC with STORE, which renames it into place.
        tmp = f"{lease}:{token}:new"
        store_keys.insert(len(store_keys) - 1, tmp)
        store = resp("EVALSHA", sha["store"], len(store_keys), *store_keys, *store_args, "/k/" + str(i), "1")
        return [resp("HMGET", entry, *LOOKUP[fmt]), acq, resp("MULTI"), resp("HSET", tmp, *entry_fields),
                resp("PEXPIRE", tmp, TEMP_TTL), store, resp("EXEC")]

    def floor(i):
        url, entry = keys(i, "fl")
        lease = entry + ":lease"
        token = f"tok{i}"
        acq = resp("EVALSHA", sha["facq"], 1, lease, token, 5000)
        store = resp("EVALSHA", sha["fstore"], 3, entry, lease, url + ":fence", token, TTL, NOW * 1000,
                     *fields(fmt, "/k/" + str(i)))
        return [resp("HMGET", entry, *LOOKUP[fmt]), acq, store]

    def floor_rename(i):
        url, entry = keys(i, "fr")
        lease = entry + ":lease"
        token = f"tok{i}"
        tmp = f"{lease}:{token}:new"
        acq = resp("EVALSHA", sha["facq"], 1, lease, token, 5000)
        store = resp("EVALSHA", sha["fstore2"], 4, entry, lease, url + ":fence", tmp, token, TTL, NOW * 1000)
        return [resp("HMGET", entry, *LOOKUP[fmt]), acq, resp("MULTI"), resp("HSET", tmp, *fields(fmt, "/k/" + str(i))),
                resp("PEXPIRE", tmp, TEMP_TTL), store, resp("EXEC")]

    def batches(make, count, offset=0):
        out = []
        for b in range(0, count, batch):
            cmds = []
            for i in range(b, min(b + batch, count)):
                cmds += make(i + offset)
            out.append((cmds, min(batch, count - b)))
        return out

    # Warm the allocator and the scripts' caches.
    for r in range(1):
        for cmds, _ in (batches(naive, min(n, 2000), 10**7) + batches(fence, min(n, 2000), 10**7)
                        + batches(floor, min(n, 2000), 10**7) + batches(floor_rename, min(n, 2000), 10**7)):
            c.pipeline(cmds)
    for rnd in range(3):
        measure(c, f"naive miss (GET + SET PX) #{rnd + 1}", batches(naive, n, rnd * n))
        measure(c, f"fence miss (HMGET + ACQUIRE + STORE) #{rnd + 1}", batches(fence, n, rnd * n))
        measure(c, f"floor miss (HMGET + SET NX/TIME script + MGET/HSET/PEXPIRE/DEL script) #{rnd + 1}",
                batches(floor, n, rnd * n))
        measure(c, f"floor miss, entry renamed into place (HMGET + SET NX/TIME script + MULTI, HSET, PEXPIRE, "
                f"MGET/RENAME/PEXPIRE/DEL script, EXEC) #{rnd + 1}", batches(floor_rename, n, rnd * n))
    # Refill of expired entries (their URL's variant set still there): the
    # entries are deleted.
    url_entries = [keys(i, "f")[1] for i in range(n)]
    for b in range(0, n, 500):
        c.pipeline([resp("DEL", *url_entries[b:b + 500])])
    measure(c, "fence refill of an expired entry", batches(fence, n))
    # Hits.
    measure(c, "naive hit (GET)", [([resp("GET", f"naive:/k/{i}") for i in range(b, b + batch)], batch)
                                    for b in range(0, n, batch)])
    measure(c, "fence hit (HMGET)", [([resp("HMGET", keys(i, "f")[1], *LOOKUP[fmt]) for i in range(b, b + batch)], batch)
                                      for b in range(0, n, batch)])
    mem = int(c.call("MEMORY", "USAGE", keys(1, "f")[1], "SAMPLES", "0"))
    c.call("SET", "floor", BODY)
    print(f"\nMEMORY USAGE of one entry: {mem} bytes; a string key holding the body alone: "
          f"{int(c.call('MEMORY', 'USAGE', 'floor', 'SAMPLES', '0'))} bytes")

main()
