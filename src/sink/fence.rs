//! The fence (`fence = true`): a per-key marker pginval rewrites just before it
//! deletes the key, so that an application's cache-aside fill which read the database
//! before the commit cannot store its value after the delete. Owns the fence key's
//! name, the script pginval runs and the fill script applications run
//! (`pginval fill-script`); never talks to Redis itself.
//!
//! The protocol, proven over every ordering by the model in this file's tests:
//!
//! - pginval, after the commit: `SET fence <new unique value> PX ttl`, then `UNLINK
//!   key`, in one script (nothing runs between them).
//! - The application's read: `MGET key fence` (one command: the pair is read at one
//!   instant). A hit is served. On a miss it remembers the fence value `f` (or "" when
//!   there is none), and only then reads the database.
//! - Its fill: the fill script sets the key only if the fence still holds `f`, and the
//!   application runs it only if less than half the fence TTL has passed since its
//!   MGET.
//!
//! Why no stale value can stay: a fill that stores a stale value read the row before
//! the commit, so its MGET came before the commit, and the commit before pginval's
//! fence write. A fill after the delete then finds the new fence (a value never seen
//! before), or a later one, unless the fence expired, which takes the full TTL from a
//! write after the MGET: the half-TTL bound excludes it. A fill before the delete is
//! deleted by it.

/// Leads every fence key: no rule's key or pattern of the application's own keyspace
/// matches it by accident, and pattern deletes skip it.
pub const PREFIX: &str = "pginval-fence:";

/// The fence of `key`, in `key`'s hash slot where that can be expressed: the key's
/// own `{hash tag}` when it has one (`pginval-fence:{t}:key`), else the whole key as
/// the tag (`pginval-fence:{key}`). A key without a hash tag that holds a `}` (or is
/// empty) cannot be a tag; its fence (`pginval-fence:key`) lies in another slot on a cluster (see
/// [`same_slot`]).
pub fn fence_key(key: &str) -> String {
    match hash_tag(key) {
        Some(tag) => format!("{PREFIX}{{{tag}}}:{key}"),
        None if taggable(key) => format!("{PREFIX}{{{key}}}"),
        None => format!("{PREFIX}{key}"),
    }
}

/// Whether `key`'s fence shares its hash slot (what a cluster needs to fence it).
pub fn same_slot(key: &str) -> bool {
    hash_tag(key).is_some() || taggable(key)
}

/// Whether the whole of `key` can be written as a hash tag: not empty, and no `}`.
fn taggable(key: &str) -> bool {
    !key.is_empty() && !key.contains('}')
}

/// Whether `key` is a fence (pattern deletes leave fences alone: a fence deleted
/// would let a racing fill through).
pub fn is_fence(key: &[u8]) -> bool {
    key.starts_with(PREFIX.as_bytes())
}

/// The `{hash tag}` Redis Cluster hashes `key` by, if it has one: what lies between
/// the first `{` and the first `}` after it, when not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// pginval's side: for each pair of KEYS (key, its fence), writes the fence value
/// ARGV[1] with the TTL ARGV[2] (ms), then deletes the key.
pub const FENCE_LUA: &str = r#"
for i = 1, #KEYS, 2 do
  redis.call('SET', KEYS[i + 1], ARGV[1], 'PX', ARGV[2])
  redis.call('UNLINK', KEYS[i])
end
return #KEYS / 2
"#;

/// The application's fill: KEYS[1] the key, KEYS[2] its fence; ARGV[1] the fence value
/// its MGET saw ("" for none), ARGV[2] the value, ARGV[3] the key's TTL in ms (0 for
/// none). Sets the key and returns 1 only if the fence did not change; else 0.
pub const FILL_LUA: &str = r#"-- pginval fill script: set a cache key only if its fence did not change since
-- the read that missed (MGET key fence). KEYS[1] key, KEYS[2] fence;
-- ARGV[1] fence value the MGET returned ("" if none), ARGV[2] value,
-- ARGV[3] TTL in milliseconds (0: none). Returns 1 if set, 0 if not.
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
"#;

/// What `pginval fill-script` prints: the fill script, then how to name the fence and
/// when to call it.
pub fn fill_script_text(fence_ttl_ms: u64) -> String {
    format!(
        "{FILL_LUA}
-- The fence of a key (same hash slot on a cluster):
--   key has a hash tag {{t}} (first '{{' then '}}', not empty): \"{PREFIX}{{t}}:\" .. key
--   else, key holds no '}}':                                   \"{PREFIX}{{\" .. key .. \"}}\"
--   else:                                                      \"{PREFIX}\" .. key (not fenced on a cluster)
-- Read with MGET key fence; on a miss read the database, then run this script only if
-- less than {half} ms (half of [redis] fence_ttl = {fence_ttl_ms} ms) passed since the MGET.
",
        half = fence_ttl_ms / 2
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::redis::conn::slot_of;

    #[test]
    fn fence_keys_share_the_keys_slot_where_a_tag_can_say_it() {
        for key in [
            "user:1",
            "laravel_cache:user:1",
            "a{b}c",
            "{user}:1",
            "ключ",
            "{",
        ] {
            let fence = fence_key(key);
            assert!(is_fence(fence.as_bytes()), "{fence}");
            assert!(same_slot(key), "{key}");
            assert_eq!(slot_of(&fence), slot_of(key), "{key} -> {fence}");
        }
        assert_eq!(fence_key("user:1"), "pginval-fence:{user:1}");
        assert_eq!(fence_key("a{b}c"), "pginval-fence:{b}:a{b}c");
        // A `}` without a tag before it cannot be expressed as a tag.
        assert!(!same_slot("a}b"));
        assert_eq!(fence_key("a}b"), "pginval-fence:a}b");
        // An empty tag first: Redis hashes the whole key, which holds a `}`.
        assert!(!same_slot("x{}y{z}"));
        assert!(!same_slot(""));
        // Distinct keys, distinct fences.
        assert_ne!(fence_key("a{b}c"), fence_key("a{b}d"));
    }

    /// One step of the model: the reader's read (MGET), database read, time check and
    /// fill (the script as Redis runs it, a delivery delay after the check), or
    /// pginval's commit, fence write and delete.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Step {
        Commit,
        Fence,
        Delete,
        Mget,
        ReadDb,
        Check,
        Fill,
    }

    /// How the model's reader decides; the real protocol is `FillRule::HalfTtl`.
    #[derive(Clone, Copy, PartialEq)]
    enum FillRule {
        /// Fill if less than half the TTL passed at the check, and the fence did not
        /// change when the script runs.
        HalfTtl,
        /// The same with the whole TTL as the bound.
        WholeTtl,
        /// Fill whatever happened (plain cache-aside).
        Always,
        /// Fill if the fence did not change, however long it took.
        NoTimeBound,
    }

    /// The fence TTL of the model, in its time units.
    const TTL: u64 = 4;

    /// Every interleaving of one writer (commit, then pginval's two steps in `writer`
    /// order) with one reader (MGET, database read, time check, fill), each step at a
    /// time chosen from `gaps` after the one before, and an old fence either absent or
    /// expiring at any of several times. Schedules whose fill reaches Redis more than
    /// `max_delivery` after its check are left out (the protocol's assumption). Returns
    /// the first schedule that leaves a stale value cached.
    fn stale_schedule(writer: [Step; 3], fill: FillRule, max_delivery: u64) -> Option<String> {
        let gaps = [0u64, 1, 2, 3, 5];
        let reader = [Step::Mget, Step::ReadDb, Step::Check, Step::Fill];
        const STEPS: usize = 7;
        // Which of the 7 positions the writer's steps take: every 3-subset.
        for mask in 0u32..(1 << STEPS) {
            if mask.count_ones() != 3 {
                continue;
            }
            let (mut w, mut r) = (0, 0);
            let order: Vec<Step> = (0..STEPS)
                .map(|i| {
                    if mask & (1 << i) != 0 {
                        w += 1;
                        writer[w - 1]
                    } else {
                        r += 1;
                        reader[r - 1]
                    }
                })
                .collect();
            for g in 0..gaps.len().pow(STEPS as u32) {
                let mut times = [0u64; STEPS];
                let (mut t, mut g) = (0, g);
                for time in &mut times {
                    t += gaps[g % gaps.len()];
                    g /= gaps.len();
                    *time = t;
                }
                let at = |step: Step| times[order.iter().position(|s| *s == step).unwrap()];
                if at(Step::Fill) - at(Step::Check) > max_delivery {
                    continue;
                }
                for old_fence_expiry in [None, Some(1), Some(3), Some(6), Some(100)] {
                    if let Some(s) = run(&order, &times, old_fence_expiry, fill) {
                        return Some(s);
                    }
                }
            }
        }
        None
    }

    /// Runs one schedule; `Some` describes it when it leaves a stale value cached.
    fn run(
        order: &[Step],
        times: &[u64],
        old_fence_expiry: Option<u64>,
        fill: FillRule,
    ) -> Option<String> {
        let mut db = 0u32; // the row's version; the commit makes it 1
        let mut cache: Option<u32> = None;
        // The fence: its value and when it expires. Value 0 is the old fence.
        let mut fence: Option<(u32, u64)> = old_fence_expiry.map(|e| (0, e));
        let fence_at = |fence: Option<(u32, u64)>, t: u64| fence.filter(|(_, e)| t < *e);
        let mut next_fence = 1;
        let (mut seen, mut missed_at, mut read, mut in_time) = (None, None, None, false);
        for (step, &t) in order.iter().zip(times) {
            match step {
                Step::Commit => db = 1,
                Step::Fence => {
                    fence = Some((next_fence, t + TTL));
                    next_fence += 1;
                }
                Step::Delete => cache = None,
                Step::Mget => {
                    if cache.is_none() {
                        missed_at = Some(t);
                        seen = fence_at(fence, t).map(|(v, _)| v);
                    }
                }
                Step::ReadDb => read = missed_at.map(|_| db),
                Step::Check => {
                    in_time = missed_at.is_some_and(|at| match fill {
                        FillRule::HalfTtl => (t - at) * 2 < TTL,
                        FillRule::WholeTtl => t - at < TTL,
                        FillRule::Always | FillRule::NoTimeBound => true,
                    })
                }
                Step::Fill => {
                    let (true, Some(v)) = (in_time, read) else {
                        continue;
                    };
                    let unchanged = fence_at(fence, t).map(|(v, _)| v) == seen;
                    if unchanged || fill == FillRule::Always {
                        cache = Some(v);
                    }
                }
            }
        }
        (cache.is_some_and(|v| v != db))
            .then(|| format!("{order:?} at {times:?}, old fence expiring at {old_fence_expiry:?}"))
    }

    /// The protocol's claim: with the fill reaching Redis at most half the TTL after
    /// its time check, no schedule leaves a stale value.
    #[test]
    fn no_ordering_of_read_commit_fence_delete_fill_and_expiry_leaves_a_stale_value() {
        let pginval = [Step::Commit, Step::Fence, Step::Delete];
        assert_eq!(stale_schedule(pginval, FillRule::HalfTtl, TTL / 2), None);
    }

    /// The model finds the races the protocol's parts are there for: without the
    /// fence, a plain fill after the delete; without the time bound, a fence expired
    /// between the read and the fill; with the whole TTL as the bound, a fill delayed
    /// on its way to Redis; a fill slower to arrive than half the TTL; the fence
    /// written after the delete instead of before.
    #[test]
    fn the_model_finds_the_stale_fill_each_part_of_the_protocol_prevents() {
        let pginval = [Step::Commit, Step::Fence, Step::Delete];
        assert!(stale_schedule(pginval, FillRule::Always, 0).is_some());
        assert!(stale_schedule(pginval, FillRule::NoTimeBound, 0).is_some());
        assert!(stale_schedule(pginval, FillRule::WholeTtl, TTL / 2).is_some());
        assert!(stale_schedule(pginval, FillRule::HalfTtl, TTL).is_some());
        let delete_first = [Step::Commit, Step::Delete, Step::Fence];
        assert!(stale_schedule(delete_first, FillRule::HalfTtl, 0).is_some());
    }
}
