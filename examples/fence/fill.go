// Package fence: cache-aside reads guarded by pginval's fence (rules with
// `fence = true`), for go-redis v9.
//
// GetOrFill returns the cached value, or load's value, which it stores only if no
// invalidation of the key came between the read that missed and the fill, and the fill
// came within half of pginval's [redis] fence_ttl. Use full key names.
//
// Not tested by the project's suite: the Go module proxy is out of its machine's reach
// (the Python, Node and PHP snippets beside it are tested).
package fence

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// `pginval fill-script` prints this script.
var fill = redis.NewScript(`
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
`)

// FenceKey is the fence pginval writes for key, in the key's hash slot on a cluster.
func FenceKey(key string) string {
	if start := strings.Index(key, "{"); start >= 0 {
		if end := strings.Index(key[start+1:], "}"); end > 0 {
			return "pginval-fence:{" + key[start+1:start+1+end] + "}:" + key
		}
	}
	if key != "" && !strings.Contains(key, "}") {
		return "pginval-fence:{" + key + "}"
	}
	return "pginval-fence:" + key
}

// GetOrFill returns the value and whether it came from the cache.
func GetOrFill(ctx context.Context, rdb redis.Cmdable, key string, load func() (string, error),
	ttl, fenceTTL time.Duration) (string, bool, error) {
	fence := FenceKey(key)
	started := time.Now()
	got, err := rdb.MGet(ctx, key, fence).Result()
	if err != nil {
		return "", false, err
	}
	if v, ok := got[0].(string); ok {
		return v, true, nil
	}
	seen, _ := got[1].(string)
	value, err := load()
	if err != nil || time.Since(started) >= fenceTTL/2 {
		return value, false, err // too slow: the fence may have expired meanwhile
	}
	err = fill.Run(ctx, rdb, []string{key, fence}, seen, value, ttl.Milliseconds()).Err()
	if errors.Is(err, redis.Nil) {
		err = nil
	}
	return value, false, err
}
