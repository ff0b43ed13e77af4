//! Tag flushes and pattern deletes of the Redis sink: the flush script, the spill keys
//! a big tag's members move to while they go in chunks, and the SCANs of key and tag
//! patterns over every primary. Part of [`RedisSink`]; talks to Redis only through its
//! connection.

use redis::{Cmd, RedisError, Value};

use super::conn::{self, Conn, Primary};
use super::{RedisSink, SinkError};
use crate::rules::invalidation::{TagAction, Work};
use crate::sink::fence;

/// Flushes one tag. Small tags: deletes (or expires) every member, then the tag,
/// atomically. Big tags, or a tag whose earlier chunked flush was interrupted: moves
/// the members into the spill key (atomically, so members added afterwards belong to
/// a fresh tag; a RENAME, O(1), unless an interrupted flush left a spill key to merge
/// into) and returns -1; the caller then deletes the spill key's members in
/// chunks. KEYS: tag, spill. ARGV: member prefix, "set"|"zset", inline limit, expire
/// milliseconds (0 = delete). Returns the member count, -1 (spilled), or -2 (the tag
/// key holds another type: left alone).
pub(super) const FLUSH_TAG_LUA: &str = r#"
local zset = ARGV[2] == 'zset'
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= (zset and 'zset' or 'set') then return -2 end
local n = 0
if kind ~= 'none' then
  if zset then n = redis.call('ZCARD', KEYS[1]) else n = redis.call('SCARD', KEYS[1]) end
end
local spilled = redis.call('EXISTS', KEYS[2]) == 1
if n == 0 and not spilled then return 0 end
if spilled or n > tonumber(ARGV[3]) then
  if n > 0 then
    if not spilled then
      redis.call('RENAME', KEYS[1], KEYS[2])
      redis.call('PERSIST', KEYS[2])
    elseif zset then
      redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1])
      redis.call('UNLINK', KEYS[1])
    else
      redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
      redis.call('UNLINK', KEYS[1])
    end
  end
  return -1
end
if n == 0 then return 0 end
local members
if zset then members = redis.call('ZRANGE', KEYS[1], 0, -1) else members = redis.call('SMEMBERS', KEYS[1]) end
local ms = tonumber(ARGV[4])
for i = 1, #members, 500 do
  local chunk = {}
  for j = i, math.min(i + 499, #members) do chunk[#chunk + 1] = ARGV[1] .. members[j] end
  if ms > 0 then
    for _, k in ipairs(chunk) do redis.call('PEXPIRE', k, ms, 'LT') end
  else
    redis.call('UNLINK', unpack(chunk))
  end
end
redis.call('UNLINK', KEYS[1])
return n
"#;

/// What one tag flush found.
pub(super) enum Flushed {
    Done,
    Spilled,
    WrongType,
}

impl RedisSink {
    /// Deletes the keys of `inv`'s key patterns and flushes the tags of its tag
    /// patterns, scanning each of `primaries`.
    pub(super) async fn scan_patterns(
        &self,
        conn: &mut Conn,
        inv: &Work,
        primaries: &[Primary],
    ) -> Result<(), SinkError> {
        let cluster = conn.is_cluster();
        for pattern in &inv.key_patterns {
            for primary in primaries {
                self.scan_each(conn, primary, "SCAN", None, pattern, |key| {
                    let mut cmd = redis::cmd("UNLINK");
                    cmd.arg(key);
                    cmd
                })
                .await?;
            }
        }
        for tag_pattern in &inv.tag_patterns {
            let pattern = self.tags.tag_key_pattern(tag_pattern);
            // Tags whose chunked flush was interrupted exist only as spill keys now:
            // those are flushed under their tag's name too (the script finishes them).
            let spills = spill_pattern(&pattern, cluster);
            for primary in primaries {
                for (pattern, of_spill) in [(&pattern, false), (&spills, true)] {
                    // Page by page: each SCAN page's tags are flushed at once before the
                    // next page is read, so memory and round trips do not grow with the
                    // number of tags.
                    let mut cursor = 0;
                    loop {
                        let (next, page) = self.scan_page(conn, primary, cursor, pattern).await?;
                        let tag_keys: Vec<&str> = page
                            .iter()
                            .filter_map(|key| match of_spill {
                                true => spilled_tag(key, cluster),
                                false => spilled_tag(key, cluster).is_none().then_some(key),
                            })
                            .collect();
                        let cmds: Vec<Cmd> = tag_keys
                            .iter()
                            .map(|tag_key| self.flush_command(tag_key, TagAction::Delete, cluster))
                            .collect();
                        self.metrics.redis_commands.inc_by(cmds.len() as u64);
                        let results = conn.run(cmds).await?;
                        for (tag_key, result) in tag_keys.iter().zip(&results) {
                            self.after_flush(conn, tag_key, TagAction::Delete, result)
                                .await?;
                        }
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        }
        Ok(())
    }

    /// The script call flushing one tag. On a cluster the script only moves the
    /// members to the spill key (the members live in other slots, which a script may
    /// not touch); [`RedisSink::after_flush`] deletes them.
    pub(super) fn flush_command(&self, tag_key: &str, action: TagAction, cluster: bool) -> Cmd {
        let ms = match action {
            TagAction::Delete => 0,
            TagAction::Expire(ms) => ms.max(1),
        };
        let mut cmd = if cluster {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(FLUSH_TAG_LUA);
            cmd
        } else {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.flush_tag.get_hash());
            cmd
        };
        cmd.arg(2)
            .arg(tag_key)
            .arg(spill_key(tag_key, cluster))
            .arg(self.tags.member_prefix())
            .arg(if self.tags.is_zset() { "zset" } else { "set" })
            .arg(if cluster {
                -1
            } else {
                INLINE_TAG_MEMBERS as i64
            })
            .arg(ms);
        cmd
    }

    /// Completes a tag flush the script could not do inline.
    pub(super) async fn after_flush(
        &self,
        conn: &mut Conn,
        tag_key: &str,
        action: TagAction,
        result: &Value,
    ) -> Result<Flushed, SinkError> {
        match redis::from_redis_value_ref::<i64>(result).map_err(RedisError::from)? {
            -2 => {
                tracing::error!(
                    tag_key = %tag_key.escape_debug(),
                    "tag key holds a value of another type than the tag layout expects; left alone"
                );
                Ok(Flushed::WrongType)
            }
            -1 => {
                let spill = spill_key(tag_key, conn.is_cluster());
                let prefix = self.tags.member_prefix().to_owned();
                let scan = if self.tags.is_zset() {
                    "ZSCAN"
                } else {
                    "SSCAN"
                };
                self.scan_each(conn, &None, scan, Some(&spill), "*", |member| {
                    let key = format!("{prefix}{member}");
                    match action {
                        TagAction::Delete => {
                            let mut cmd = redis::cmd("UNLINK");
                            cmd.arg(key);
                            cmd
                        }
                        TagAction::Expire(ms) => {
                            let mut cmd = redis::cmd("PEXPIRE");
                            cmd.arg(key).arg(ms).arg("LT");
                            cmd
                        }
                    }
                })
                .await?;
                conn.run(vec![redis::cmd("UNLINK").arg(&spill).to_owned()])
                    .await?;
                Ok(Flushed::Spilled)
            }
            _ => Ok(Flushed::Done),
        }
    }

    /// One `SCAN` page of `primary`'s keys matching `pattern` whose type is the tag
    /// layout's.
    async fn scan_page(
        &self,
        conn: &mut Conn,
        primary: &Primary,
        cursor: u64,
        pattern: &str,
    ) -> Result<(u64, Vec<String>), SinkError> {
        let kind = if self.tags.is_zset() { "zset" } else { "set" };
        self.metrics.redis_commands.inc();
        Ok(conn
            .on(
                primary,
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .arg("TYPE")
                    .arg(kind),
            )
            .await?)
    }

    /// Iterates `SCAN` over `primary`'s keys (or `SSCAN`/`ZSCAN` over `key`) matching
    /// `pattern` and runs the command `each` makes of every element, page by page.
    /// ZSCAN's scores are skipped.
    async fn scan_each(
        &self,
        conn: &mut Conn,
        primary: &Primary,
        command: &str,
        key: Option<&str>,
        pattern: &str,
        mut each: impl FnMut(&str) -> Cmd,
    ) -> Result<u64, SinkError> {
        let mut cursor: u64 = 0;
        let mut found = 0;
        let step = if command == "ZSCAN" { 2 } else { 1 };
        loop {
            let mut scan = redis::cmd(command);
            if let Some(k) = key {
                scan.arg(k);
            }
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, items): (u64, Vec<String>) = match key {
                // A key's elements: routed by the key.
                Some(_) => scan.query_async(conn).await?,
                None => conn.on(primary, &scan).await?,
            };
            // A fence a keyspace pattern matched stays: deleting it would let a fill
            // that raced the delete through.
            let cmds: Vec<Cmd> = items
                .iter()
                .step_by(step)
                .filter(|item| key.is_some() || !fence::is_fence(item.as_bytes()))
                .map(|item| each(item))
                .collect();
            found += cmds.len() as u64;
            if !cmds.is_empty() {
                self.metrics.redis_commands.inc_by(cmds.len() as u64 + 1);
                conn.run(cmds).await?;
            }
            if next == 0 {
                return Ok(found);
            }
            cursor = next;
        }
    }
}

/// Where a tag's members are moved while they are flushed in chunks. On a cluster it
/// must share the tag key's hash slot (the flush script names both): a `{hash tag}`
/// of that slot leads it.
fn spill_key(tag_key: &str, cluster: bool) -> String {
    if cluster {
        let slot = conn::slot_of(tag_key);
        format!("{{{}}}{CLUSTER_SPILL_MARK}{tag_key}", conn::slot_tag(slot))
    } else {
        format!("{tag_key}{SPILL_SUFFIX}")
    }
}

/// The tag key a spill key belongs to, if `key` is one.
fn spilled_tag(key: &str, cluster: bool) -> Option<&str> {
    if cluster {
        let (head, tag_key) = key.split_once(CLUSTER_SPILL_MARK)?;
        (head.starts_with('{') && !head[1..].contains('{')).then_some(tag_key)
    } else {
        key.strip_suffix(SPILL_SUFFIX)
    }
}

/// The glob of the spill keys of the tags whose keys match `tag_key_pattern`.
fn spill_pattern(tag_key_pattern: &str, cluster: bool) -> String {
    if cluster {
        format!("{{*}}{CLUSTER_SPILL_MARK}{tag_key_pattern}")
    } else {
        format!("{tag_key_pattern}{SPILL_SUFFIX}")
    }
}

/// Suffix of the key a big tag's members are moved to while they are flushed.
pub const SPILL_SUFFIX: &str = ":pginval-flushing";

/// On a cluster, what follows the `{hash tag}` of a spill key, before its tag key.
const CLUSTER_SPILL_MARK: &str = "pginval-flushing:";

/// SCAN / SSCAN / ZSCAN COUNT hint.
pub(super) const SCAN_COUNT: usize = 1000;

/// Tags with more members than this are flushed in chunks instead of in one script.
const INLINE_TAG_MEMBERS: usize = 5000;
