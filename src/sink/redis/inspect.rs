//! What the Redis sink asks the server besides invalidating: keyspace stats, pginval's
//! own state keys, the server's version, topology and settings, a ping. Used by
//! `check`, `status`, start-up and the polls; part of [`RedisSink`].

use super::flush::SCAN_COUNT;
use super::{MAX_BACKOFF, MIN_BACKOFF, RedisSink, SinkError, info_field};
use crate::metrics::{Health, Metrics};
use std::sync::Arc;

impl RedisSink {
    /// Redis' `keyspace_hits` and `keyspace_misses` (INFO stats); also tells whether
    /// Redis answers at all.
    pub async fn keyspace_stats(&mut self) -> Result<(u64, u64), SinkError> {
        let mut conn = self.connection().await?;
        let result = async {
            let mut totals = (0, 0);
            for primary in conn.primaries().await? {
                let info: String = conn.on(&primary, redis::cmd("INFO").arg("stats")).await?;
                totals.0 += info_field(&info, "keyspace_hits").unwrap_or(0);
                totals.1 += info_field(&info, "keyspace_misses").unwrap_or(0);
            }
            Ok(totals)
        }
        .await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Reads a string key, retrying until Redis answers (used for pginval's own
    /// slot-state marker, which decides whether changes were missed).
    pub async fn get_until_ok(&mut self, key: &str) -> Option<String> {
        let mut backoff = MIN_BACKOFF;
        loop {
            let result: Result<Option<String>, SinkError> = async {
                let mut conn = self.connection().await?;
                Ok(redis::cmd("GET").arg(key).query_async(&mut conn).await?)
            }
            .await;
            match result {
                Ok(v) => return v,
                Err(e) => {
                    self.conn = None;
                    tracing::warn!(error = %e, "waiting for redis to read pginval's slot state");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Writes a string key, retrying until Redis acknowledges.
    pub async fn set_until_ok(&mut self, key: &str, value: &str) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let result: Result<(), SinkError> = async {
                let mut conn = self.connection().await?;
                Ok(redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .query_async(&mut conn)
                    .await?)
            }
            .await;
            match result {
                Ok(()) => return,
                Err(e) => {
                    self.conn = None;
                    tracing::warn!(error = %e, key, "waiting for redis to write pginval's state");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Redis' major version (`INFO server`), e.g. 7; on a cluster the lowest of its
    /// primaries'.
    pub async fn major_version(&mut self) -> Result<u32, SinkError> {
        let mut conn = self.connection().await?;
        let mut lowest = None;
        for primary in conn.primaries().await? {
            let info: String = conn.on(&primary, redis::cmd("INFO").arg("server")).await?;
            let major = info
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .and_then(|v| v.split('.').next())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            lowest = Some(lowest.map_or(major, |l: u32| l.min(major)));
        }
        Ok(lowest.unwrap_or(0))
    }

    /// Whether the server at the configured address runs in cluster mode (`INFO
    /// cluster`), asked of that node alone whatever this sink was configured as.
    pub async fn server_is_cluster(&self) -> Result<bool, SinkError> {
        let info: String = self
            .target
            .ask_seed(redis::cmd("INFO").arg("cluster"))
            .await?;
        Ok(info_field(&info, "cluster_enabled") == Some(1))
    }

    /// Redis' major version, retrying until Redis answers.
    pub async fn major_version_until_ok(&mut self) -> u32 {
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.major_version().await {
                Ok(v) => return v,
                Err(e) => {
                    self.conn = None;
                    tracing::warn!(error = %e, "waiting for redis to read its version");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// A server setting (`CONFIG GET`) of each primary; `None` when the server does
    /// not have it.
    pub async fn config_get(&mut self, name: &str) -> Result<Vec<Option<String>>, SinkError> {
        let mut conn = self.connection().await?;
        let mut values = Vec::new();
        for primary in conn.primaries().await? {
            let pairs: Vec<String> = conn
                .on(&primary, redis::cmd("CONFIG").arg("GET").arg(name))
                .await?;
            values.push(pairs.into_iter().nth(1));
        }
        Ok(values)
    }

    /// Whether some key matches `pattern`, looking at up to `budget` keys (SCAN).
    pub async fn any_key_matches(
        &mut self,
        pattern: &str,
        budget: usize,
    ) -> Result<bool, SinkError> {
        let mut conn = self.connection().await?;
        for primary in conn.primaries().await? {
            let mut cursor = 0u64;
            let mut seen = 0;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = conn
                    .on(
                        &primary,
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(SCAN_COUNT),
                    )
                    .await?;
                if !keys.is_empty() {
                    return Ok(true);
                }
                seen += SCAN_COUNT;
                cursor = next;
                if cursor == 0 || seen >= budget {
                    break;
                }
            }
        }
        Ok(false)
    }

    /// The metrics and health this sink reports to.
    pub fn reporting(&self) -> (Arc<Metrics>, Arc<Health>) {
        (self.metrics.clone(), self.health.clone())
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
}
