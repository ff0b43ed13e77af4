<?php
// Cache-aside reads guarded by pginval's fence (rules with `fence = true`), for phpredis.
//
// pginval_get_or_fill($redis, $key, $load, $ttlMs, $fenceTtlMs) returns [value, outcome]:
// the cached value ('hit'), or $load()'s value, stored only if no invalidation of the key
// came between the read that missed and the fill, and the fill came within half of
// pginval's [redis] fence_ttl ('stored', else 'not stored'). Use a connection without
// Redis::OPT_PREFIX and full key names.
//
// Run as a script, it reads one key through pginval_get_or_fill, asking for the database
// value on stdin (what the project's tests drive): php fill.php redis://host:port key fence_ttl_ms

// `pginval fill-script` prints this script.
const PGINVAL_FILL_LUA = <<<'LUA'
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
LUA;

// The fence pginval writes for $key, in the key's hash slot on a cluster.
function pginval_fence_key(string $key): string
{
    $start = strpos($key, '{');
    if ($start !== false) {
        $end = strpos($key, '}', $start + 1);
        if ($end !== false && $end > $start + 1) {
            return 'pginval-fence:{' . substr($key, $start + 1, $end - $start - 1) . '}:' . $key;
        }
    }
    if ($key !== '' && strpos($key, '}') === false) {
        return 'pginval-fence:{' . $key . '}';
    }
    return 'pginval-fence:' . $key;
}

function pginval_get_or_fill(Redis $redis, string $key, callable $load, int $ttlMs, int $fenceTtlMs): array
{
    $fence = pginval_fence_key($key);
    $started = hrtime(true);
    [$value, $seen] = $redis->mGet([$key, $fence]);
    if ($value !== false) {
        return [$value, 'hit'];
    }
    $loaded = $load();
    if ((hrtime(true) - $started) / 1e6 >= $fenceTtlMs / 2) {
        return [$loaded, 'not stored']; // the fence may have expired meanwhile
    }
    $args = [$key, $fence, $seen === false ? '' : $seen, $loaded, $ttlMs];
    $stored = $redis->evalSha(sha1(PGINVAL_FILL_LUA), $args, 2);
    if ($stored === false) { // NOSCRIPT: the server does not have it yet
        $redis->clearLastError();
        $stored = $redis->eval(PGINVAL_FILL_LUA, $args, 2);
    }
    return [$loaded, $stored === 1 ? 'stored' : 'not stored'];
}

if (PHP_SAPI === 'cli' && isset($argv[1]) && $argv[1] === 'fence-key' && realpath($argv[0]) === __FILE__) {
    foreach (array_slice($argv, 2) as $k) {
        echo pginval_fence_key($k), "\n";
    }
} elseif (PHP_SAPI === 'cli' && isset($argv[0]) && realpath($argv[0]) === __FILE__) {
    [, $url, $key, $fenceTtlMs] = $argv;
    $at = parse_url($url);
    $redis = new Redis();
    $redis->connect($at['host'], $at['port'] ?? 6379);
    $load = function () {
        echo "LOAD\n";
        fflush(STDOUT);
        return rtrim(fgets(STDIN), "\n");
    };
    [$value, $outcome] = pginval_get_or_fill($redis, $key, $load, 3600000, (int) $fenceTtlMs);
    echo "$outcome $value\n";
}
