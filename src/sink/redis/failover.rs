//! Following a Redis failover: the replay window applied again after a failure, and,
//! on a cluster or under Sentinel, the watcher that notices a new primary. Part of
//! [`RedisSink`].

use std::future::Future;

use redis::Script;

use super::conn::{Primary, Target};
use super::flush::FLUSH_TAG_LUA;
use super::{MAX_BACKOFF, MIN_BACKOFF, RedisSink, TOPOLOGY_CHECK, fence_seed};
use crate::sink::fence;

impl RedisSink {
    /// After a failure (or a changed cluster topology): applies everything of the
    /// replay window again, until Redis acknowledges. The promoted replica may lack
    /// deletes the old primary had acknowledged; deleting again is always safe.
    pub(super) async fn replay_after_failover(&mut self, why: &str) {
        self.replay_owed = false;
        let replay = self
            .replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replay();
        let Some(work) = replay else {
            return;
        };
        self.metrics.redis_replays.inc();
        tracing::warn!(
            keys = work.keys.len(),
            tags = work.tags.len(),
            patterns = work.key_patterns.len() + work.tag_patterns.len(),
            why,
            "applying the replay window again: a failed-over Redis may have lost deletes its old primary acknowledged"
        );
        let mut backoff = MIN_BACKOFF;
        // Without WAIT: a promoted primary may have no replica yet, and a repair that
        // waited for one would stop the watcher.
        while let Err(e) = self.apply_once(&work, &[], false).await {
            self.conn = None;
            self.metrics.redis_errors.inc();
            tracing::debug!(error = %e, ?backoff, "replaying the window failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// On a cluster or under Sentinel, a task that looks at the primaries (the master
    /// the Sentinels name) every [`TOPOLOGY_CHECK`] and, when one appeared that was
    /// not one before (a replica took over), makes the sink reconnect and applies the
    /// replay window again on a connection of its own. `None` on a single node (its
    /// failovers show as errors, after which the sink replays itself) or without a
    /// replay window.
    pub fn failover_watch(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let watched = self.target.is_cluster() || matches!(self.target, Target::Sentinel(_));
        if !watched || self.dry_run || self.replay_window.is_zero() {
            return None;
        }
        let mut watcher = RedisSink {
            target: self.target.clone(),
            conn: None,
            generation: 0,
            tags: self.tags.clone(),
            events: None,
            flush_tag: Script::new(FLUSH_TAG_LUA),
            fence_script: Script::new(fence::FENCE_LUA),
            fence_ttl: self.fence_ttl,
            fence_values: (fence_seed(), std::sync::atomic::AtomicU64::new(0)),
            fence_skip_told: std::sync::atomic::AtomicBool::new(false),
            dry_run: false,
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            replay: self.replay.clone(),
            replay_window: self.replay_window,
            replay_owed: false,
            primaries_seen: None,
            failovers: self.failovers.clone(),
            failovers_seen: 0,
            flusher: self.flusher.clone(),
            wait_replicas: self.wait_replicas,
            wait_timeout: self.wait_timeout,
        };
        Some(async move {
            let mut tick = tokio::time::interval(TOPOLOGY_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if watcher.primaries_changed().await {
                    watcher
                        .failovers
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    watcher
                        .replay_after_failover("a replica took over from its primary")
                        .await;
                }
            }
        })
    }

    /// Whether a primary appeared that was not one at the last look (a replica took
    /// over); the first look only remembers.
    async fn primaries_changed(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let now_primaries: Result<Vec<Primary>, String> = match self.target.sentinel_master().await
        {
            Some(master) => master.map(|m| vec![Some(m)]).map_err(|e| e.to_string()),
            None => match self.connection().await {
                Ok(mut conn) => conn.primaries().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        let now_primaries = match now_primaries {
            Ok(p) => p,
            Err(e) => {
                self.conn = None;
                tracing::debug!(error = %e, "cannot read the primaries");
                return false;
            }
        };
        let changed = self
            .primaries_seen
            .as_ref()
            .is_some_and(|(_, seen)| now_primaries.iter().any(|p| !seen.contains(p)));
        self.primaries_seen = Some((now, now_primaries));
        changed
    }
}
