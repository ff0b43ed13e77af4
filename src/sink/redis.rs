//! The Redis sink: applies an `Invalidation` with pipelined UNLINKs, per-tag Lua
//! flushes and SCAN-based pattern deletes; retries with capped backoff until Redis
//! acknowledges.
//!
//! The only module that talks to Redis. It decides nothing about LSNs: it reports
//! success, and `pipeline` decides what that lets it confirm.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};

use crate::rules::invalidation::Invalidation;
use crate::rules::template::push_glob_escaped;

/// Keys per UNLINK command inside a pipeline.
const KEYS_PER_UNLINK: usize = 256;
/// SCAN COUNT hint for pattern deletes.
const SCAN_COUNT: usize = 1000;
/// First retry delay after a Redis error; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Flushes one tag atomically: deletes every member key, then the tag's SET.
const FLUSH_TAG_LUA: &str = r#"
local members = redis.call('SMEMBERS', KEYS[1])
for i = 1, #members, 500 do
  redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
end
redis.call('UNLINK', KEYS[1])
return #members
"#;

/// An error talking to Redis; every one is retried.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct SinkError(#[from] redis::RedisError);

/// The Redis side of pginval.
pub struct RedisSink {
    client: Client,
    conn: Option<MultiplexedConnection>,
    tag_key: String,
    flush_tag: Script,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("tag_key", &self.tag_key)
            .finish_non_exhaustive()
    }
}

impl RedisSink {
    /// A sink for `url`; connects lazily. `tag_key` is the tag-set layout (`cache_tag:{tag}`).
    pub fn new(url: &str, tag_key: &str) -> Result<RedisSink, SinkError> {
        Ok(RedisSink {
            client: Client::open(url)?,
            conn: None,
            tag_key: tag_key.to_owned(),
            flush_tag: Script::new(FLUSH_TAG_LUA),
        })
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, SinkError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // Loaded once per connection, so pipelines can use EVALSHA.
        self.flush_tag
            .prepare_invoke()
            .load_async(&mut conn)
            .await?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Checks that Redis answers (PING).
    pub async fn ping(&mut self) -> Result<(), SinkError> {
        let mut conn = self.connection().await?;
        let r: Result<(), _> = redis::cmd("PING").query_async(&mut conn).await;
        if r.is_err() {
            self.conn = None;
        }
        Ok(r?)
    }

    /// Applies `inv` once. On error the connection is dropped so the next attempt
    /// starts afresh.
    pub async fn apply(&mut self, inv: &Invalidation) -> Result<(), SinkError> {
        let result = self.try_apply(inv).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Applies `inv`, retrying with capped exponential backoff until Redis
    /// acknowledges. Logs once when Redis starts failing and once when it recovers.
    pub async fn apply_until_ok(&mut self, inv: &Invalidation) {
        let mut backoff = MIN_BACKOFF;
        let mut failing_since = None;
        loop {
            match self.apply(inv).await {
                Ok(()) => {
                    if let Some(since) = failing_since {
                        let down: Duration = tokio::time::Instant::now() - since;
                        tracing::info!(
                            down_secs = down.as_secs_f64(),
                            "redis is back; invalidations resumed"
                        );
                    }
                    return;
                }
                Err(e) => {
                    if failing_since.is_none() {
                        tracing::warn!(error = %e, "redis failed; holding the flush position and retrying with backoff");
                        failing_since = Some(tokio::time::Instant::now());
                    } else {
                        tracing::debug!(error = %e, ?backoff, "redis still failing");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn try_apply(&mut self, inv: &Invalidation) -> Result<(), SinkError> {
        let mut conn = self.connection().await?;
        if !inv.keys.is_empty() || !inv.tags.is_empty() {
            let mut pipe = redis::pipe();
            let keys: Vec<&str> = inv.keys.iter().map(String::as_str).collect();
            for chunk in keys.chunks(KEYS_PER_UNLINK) {
                pipe.cmd("UNLINK").arg(chunk).ignore();
            }
            for tag in &inv.tags {
                let key = self.tag_key.replace("{tag}", tag);
                pipe.cmd("EVALSHA")
                    .arg(self.flush_tag.get_hash())
                    .arg(1)
                    .arg(key)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        for pattern in &inv.key_patterns {
            self.scan_each(&mut conn, pattern, None, |pipe, key| {
                pipe.cmd("UNLINK").arg(key).ignore();
            })
            .await?;
        }
        for tag_pattern in &inv.tag_patterns {
            let pattern = self.tag_key_pattern(tag_pattern);
            let sha = self.flush_tag.get_hash().to_owned();
            self.scan_each(&mut conn, &pattern, Some("set"), |pipe, key| {
                pipe.cmd("EVALSHA").arg(&sha).arg(1).arg(key).ignore();
            })
            .await?;
        }
        Ok(())
    }

    /// The glob of tag-set keys for a tag glob: the layout's literal text escaped.
    fn tag_key_pattern(&self, tag_pattern: &str) -> String {
        let (before, after) = self
            .tag_key
            .split_once("{tag}")
            .unwrap_or((self.tag_key.as_str(), ""));
        let mut out = String::new();
        push_glob_escaped(&mut out, before);
        out.push_str(tag_pattern);
        push_glob_escaped(&mut out, after);
        out
    }

    /// SCANs keys matching `pattern` and pipelines `each` for every batch found.
    async fn scan_each(
        &self,
        conn: &mut MultiplexedConnection,
        pattern: &str,
        key_type: Option<&str>,
        mut each: impl FnMut(&mut redis::Pipeline, &str),
    ) -> Result<u64, SinkError> {
        let mut cursor: u64 = 0;
        let mut found = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            if let Some(t) = key_type {
                scan.arg("TYPE").arg(t);
            }
            let (next, keys): (u64, Vec<String>) = scan.query_async(conn).await?;
            if !keys.is_empty() {
                found += keys.len() as u64;
                let mut pipe = redis::pipe();
                for key in &keys {
                    each(&mut pipe, key);
                }
                pipe.query_async::<()>(conn).await?;
            }
            if next == 0 {
                return Ok(found);
            }
            cursor = next;
        }
    }
}
