// Cache-aside reads guarded by pginval's fence (rules with `fence = true`), for ioredis.
//
// getOrFill(redis, key, load, ttlMs, fenceTtlMs) resolves to [value, outcome]: the
// cached value ("hit"), or load()'s value, stored only if no invalidation of the key
// came between the read that missed and the fill, and the fill came within half of
// pginval's [redis] fence_ttl ("stored", else "not stored"). Use full key names (no
// keyPrefix option).
//
// Run as a script, it reads one key through getOrFill, asking for the database value
// on stdin (what the project's tests drive): node fill.js redis://host:port key fence_ttl_ms
"use strict";
const Redis = require("ioredis");

// `pginval fill-script` prints this script.
const FILL_LUA = `
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
`;

// The fence pginval writes for `key`, in the key's hash slot on a cluster.
function fenceKey(key) {
  const start = key.indexOf("{");
  if (start >= 0) {
    const end = key.indexOf("}", start + 1);
    if (end > start + 1) return "pginval-fence:{" + key.slice(start + 1, end) + "}:" + key;
  }
  if (key !== "" && !key.includes("}")) return "pginval-fence:{" + key + "}";
  return "pginval-fence:" + key;
}

async function getOrFill(redis, key, load, ttlMs, fenceTtlMs) {
  if (!redis.pginvalFill) redis.defineCommand("pginvalFill", { numberOfKeys: 2, lua: FILL_LUA });
  const fence = fenceKey(key);
  const started = process.hrtime.bigint();
  const [value, seen] = await redis.mget(key, fence);
  if (value !== null) return [value, "hit"];
  const loaded = await load();
  if (Number(process.hrtime.bigint() - started) / 1e6 >= fenceTtlMs / 2) {
    return [loaded, "not stored"]; // the fence may have expired meanwhile
  }
  const stored = await redis.pginvalFill(key, fence, seen ?? "", loaded, ttlMs);
  return [loaded, stored === 1 ? "stored" : "not stored"];
}

module.exports = { fenceKey, getOrFill, FILL_LUA };

if (require.main === module && process.argv[2] === "fence-key") {
  for (const k of process.argv.slice(3)) process.stdout.write(fenceKey(k) + "\n");
} else if (require.main === module) {
  const [url, key, fenceTtlMs] = process.argv.slice(2);
  const redis = new Redis(url);
  const lines = require("readline").createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const load = async () => {
    process.stdout.write("LOAD\n");
    return (await lines.next()).value;
  };
  getOrFill(redis, key, load, 3600000, Number(fenceTtlMs)).then(([value, outcome]) => {
    process.stdout.write(`${outcome} ${value}\n`);
    process.exit(0);
  });
}
