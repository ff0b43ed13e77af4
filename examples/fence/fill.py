"""Cache-aside reads guarded by pginval's fence (rules with `fence = true`).

get_or_fill(r, key, load, ttl_ms, fence_ttl_ms) returns the cached value, or load()'s
value, which it stores only if no invalidation of the key came between the read that
missed and the fill (and the fill came within half of pginval's [redis] fence_ttl).
Use a client with decode_responses=True and full key names (no client-side prefix).

Run as a script, it reads one key through get_or_fill, asking for the database value
on stdin (what the project's tests drive): python3 fill.py redis://host:port key fence_ttl_ms
"""
import sys
import time

import redis

# `pginval fill-script` prints this script.
FILL_LUA = """
local seen = redis.call('GET', KEYS[2]) or ''
if seen ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""


def fence_key(key):
    """The fence pginval writes for `key`, in the key's hash slot on a cluster."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return "pginval-fence:{" + key[start + 1:end] + "}:" + key
    if key and "}" not in key:
        return "pginval-fence:{" + key + "}"
    return "pginval-fence:" + key


def get_or_fill(r, key, load, ttl_ms, fence_ttl_ms):
    """(value, "hit" | "stored" | "not stored")."""
    fence = fence_key(key)
    started = time.monotonic()
    value, seen = r.mget(key, fence)
    if value is not None:
        return value, "hit"
    value = load()
    if (time.monotonic() - started) * 1000 >= fence_ttl_ms / 2:
        return value, "not stored"  # the fence may have expired meanwhile
    stored = r.register_script(FILL_LUA)(keys=[key, fence], args=[seen or "", value, ttl_ms])
    return value, "stored" if stored == 1 else "not stored"


if __name__ == "__main__" and sys.argv[1:2] == ["fence-key"]:
    for k in sys.argv[2:]:
        print(fence_key(k))
elif __name__ == "__main__":
    url, key, fence_ttl_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = redis.Redis.from_url(url, decode_responses=True)

    def load():
        print("LOAD", flush=True)
        return sys.stdin.readline().rstrip("\n")

    value, outcome = get_or_fill(client, key, load, 3_600_000, fence_ttl_ms)
    print(f"{outcome} {value}", flush=True)
