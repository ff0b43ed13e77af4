//! The Redis sink: applies the `Work` with pipelined UNLINK / PEXPIRE, per-tag
//! Lua flushes (chunked for big tags), SCAN-based pattern deletes, and publishes
//! entity events; retries with capped backoff until Redis acknowledges.
//!
//! The only module that talks to Redis. It decides nothing about LSNs: it reports
//! success, and `pipeline` decides what that lets it confirm.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, ConnectionInfo, ErrorKind, RedisError, Script};

pub(super) mod conn;
mod failover;
mod flush;
mod inspect;
mod settings;

pub use settings::{Durability, SentinelConfig, Topology};

use conn::{Conn, Primary, Target};

use crate::metrics::{Health, Metrics};
use crate::rules::invalidation::{Event, TagAction, Work};

use super::Sink;
use super::events::EventsConfig;
use super::fence;
use super::replay::{self, ReplayWindow};
use super::tags::TagLayout;
use flush::FLUSH_TAG_LUA;

/// What every key of pginval's own state starts with.
pub const STATE_KEY_PREFIX: &str = "pginval:";

/// First retry delay after a Redis error; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The fence script for the fenced keys, UNLINK for the others (in chunks, per hash
/// slot on a cluster), PEXPIRE ... LT for the keys to expire that are not deleted
/// anyway. `fence` is the fence value and TTL of this unit, and the script's hash on
/// a node (a cluster gets EVAL).
fn key_commands(conn: &Conn, inv: &Work, fence: (&str, Duration, &str)) -> Vec<Cmd> {
    let cluster = conn.is_cluster();
    // On a cluster, a key whose fence cannot share its slot is deleted unfenced.
    let (fenced, unfenceable): (Vec<&str>, Vec<&str>) = inv
        .fenced
        .iter()
        .map(String::as_str)
        .partition(|k| !cluster || fence::same_slot(k));
    let plain = inv.keys.iter().map(String::as_str).chain(unfenceable);
    let mut cmds = conn.unlinks(plain);
    let (value, ttl, hash) = fence;
    for chunk in conn.by_slot(fenced) {
        let mut cmd = if cluster {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(fence::FENCE_LUA);
            cmd
        } else {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(hash);
            cmd
        };
        cmd.arg(chunk.len() * 2);
        for key in chunk {
            cmd.arg(key).arg(fence::fence_key(key));
        }
        cmd.arg(value).arg(ttl.as_millis() as u64);
        cmds.push(cmd);
    }
    for (key, ms) in &inv.expire_keys {
        if !inv.keys.contains(key) && !inv.fenced.contains(key) {
            let mut cmd = redis::cmd("PEXPIRE");
            cmd.arg(key).arg(*ms).arg("LT");
            cmds.push(cmd);
        }
    }
    cmds
}

/// An error talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// What Redis (or reaching it) answered.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// `WAIT` saw fewer replicas acknowledge the batch than `[redis] wait_replicas`.
    #[error(
        "redis: only {acked} of {wanted} replicas acknowledged the batch within the wait timeout"
    )]
    TooFewReplicas {
        /// Replicas that acknowledged.
        acked: i64,
        /// `[redis] wait_replicas`.
        wanted: u32,
    },
}

impl SinkError {
    /// Whether the error is about reaching Redis (retried without limit) rather than
    /// about a command (retried a few times).
    pub fn is_connection_error(&self) -> bool {
        let e = match self {
            SinkError::Redis(e) => e,
            SinkError::TooFewReplicas { .. } => return true,
        };
        e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                ErrorKind::Server(
                    redis::ServerErrorKind::BusyLoading
                        | redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::MasterDown
                        | redis::ServerErrorKind::ReadOnly
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::NoScript
                )
            )
    }
}

/// The Redis side of pginval.
pub struct RedisSink {
    target: Target,
    conn: Option<Conn>,
    /// Counts the connections opened, so a failure seen on an old clone of one does
    /// not drop its successor.
    generation: u64,
    tags: TagLayout,
    events: Option<EventsConfig>,
    flush_tag: Script,
    fence_script: Script,
    /// How long a fence lives.
    fence_ttl: Duration,
    /// Makes each unit's fence value one never written before: a random start, then
    /// a count.
    fence_values: (u64, std::sync::atomic::AtomicU64),
    /// The log said once that some keys go unfenced.
    fence_skip_told: std::sync::atomic::AtomicBool,
    dry_run: bool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// What was sent lately, to apply again after a failover.
    replay: Arc<std::sync::Mutex<ReplayWindow>>,
    /// A unit failed since the last replay: the next success replays the window.
    replay_owed: bool,
    replay_window: Duration,
    /// On a cluster or under Sentinel (the watcher's): the primaries last seen, and
    /// when.
    primaries_seen: Option<(tokio::time::Instant, Vec<Primary>)>,
    /// Counts the failovers the watcher saw; a connection opened before the last one
    /// is dropped (on Sentinel it may still point at the old master).
    failovers: Arc<std::sync::atomic::AtomicU64>,
    failovers_seen: u64,
    /// Held while a unit is applied (shared with the failover watcher).
    flusher: Arc<tokio::sync::Mutex<()>>,
    wait_replicas: u32,
    wait_timeout: Duration,
}

/// A random start for the fence values of this process, so that no value repeats one
/// an earlier run wrote.
fn fence_seed() -> u64 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((now, std::process::id()))
}

/// How often the failover watcher compares a cluster's primaries (or the master the
/// Sentinels name) with the last ones seen.
const TOPOLOGY_CHECK: Duration = Duration::from_secs(1);

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("tags", &self.tags)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

impl RedisSink {
    /// A sink for the Redis at `seeds` (the URL, then a cluster's further seed nodes),
    /// reached as `topology` says; connects lazily. `ca_pem` replaces the public roots
    /// for `rediss://`. With `dry_run` it logs instead of writing.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seeds: Vec<ConnectionInfo>,
        topology: Topology,
        ca_pem: Option<&[u8]>,
        durability: &Durability,
        tags: TagLayout,
        events: Option<EventsConfig>,
        dry_run: bool,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<RedisSink, SinkError> {
        Ok(RedisSink {
            replay: Arc::new(std::sync::Mutex::new(ReplayWindow::new(
                durability.replay_window,
                replay::MAX_ENTRIES,
            ))),
            replay_window: durability.replay_window,
            replay_owed: false,
            primaries_seen: None,
            failovers: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            failovers_seen: 0,
            flusher: Arc::new(tokio::sync::Mutex::new(())),
            wait_replicas: durability.wait_replicas,
            wait_timeout: durability.wait_timeout,
            target: Target::new(seeds, topology, ca_pem)?,
            conn: None,
            generation: 0,
            tags,
            events,
            flush_tag: Script::new(FLUSH_TAG_LUA),
            fence_script: Script::new(fence::FENCE_LUA),
            fence_ttl: durability.fence_ttl,
            fence_values: (fence_seed(), std::sync::atomic::AtomicU64::new(0)),
            fence_skip_told: std::sync::atomic::AtomicBool::new(false),
            dry_run,
            metrics,
            health,
        })
    }

    async fn connection(&mut self) -> Result<Conn, SinkError> {
        let failovers = self.failovers.load(std::sync::atomic::Ordering::Acquire);
        if failovers != self.failovers_seen {
            self.failovers_seen = failovers;
            self.conn = None;
        }
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let mut conn = self.target.connect().await?;
        if !conn.is_cluster() {
            // Loaded once per connection, so pipelines can use EVALSHA. (A cluster gets
            // EVAL: its nodes change, and each caches the script itself.)
            for script in [&self.flush_tag, &self.fence_script] {
                script.prepare_invoke().load_async(&mut conn).await?;
            }
        }
        self.conn = Some(conn.clone());
        self.generation += 1;
        Ok(conn)
    }

    /// Applies `inv` and publishes `events` once. On error the connection is dropped
    /// so the next attempt starts afresh.
    pub async fn apply(&mut self, inv: &Work, events: &[Event]) -> Result<(), SinkError> {
        if self.dry_run {
            tracing::info!(
                keys = ?inv.keys, fenced = ?inv.fenced, expire = ?inv.expire_keys, tags = ?inv.tags,
                key_patterns = ?inv.key_patterns, tag_patterns = ?inv.tag_patterns,
                events = ?events, "dry run: would invalidate"
            );
            return Ok(());
        }
        let result = self.try_apply(inv, events).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// A fence value no fence held before (empty when `inv` fences nothing); counts
    /// the fences, and the keys a cluster cannot fence (telling the log once).
    fn fence_value(&self, inv: &Work, cluster: bool) -> String {
        if inv.fenced.is_empty() {
            return String::new();
        }
        let skipped = if cluster {
            inv.fenced.iter().filter(|k| !fence::same_slot(k)).count()
        } else {
            0
        };
        self.metrics
            .fences
            .inc_by((inv.fenced.len() - skipped) as u64);
        if skipped > 0 {
            self.metrics.fences_skipped.inc_by(skipped as u64);
            if !self
                .fence_skip_told
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(
                    skipped,
                    "keys of fenced rules hold a '}}' but no {{hash tag}}, so their fence cannot share their slot on a cluster: deleted without a fence (counted in pginval_fences_skipped_total)"
                );
            }
        }
        let (seed, count) = &self.fence_values;
        let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{seed:016x}.{n:x}")
    }

    /// Keeps `inv` in the replay window (as it is sent: keeping it early is safe).
    fn record(&self, inv: &Work) {
        let dropped = self
            .replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(std::time::Instant::now(), inv);
        if dropped > 0 {
            self.metrics.replay_dropped.inc_by(dropped as u64);
            tracing::debug!(
                dropped,
                "the replay window is full; its oldest invalidations went"
            );
        }
    }

    /// Applies `inv` and publishes `events`, retrying with capped exponential backoff
    /// until Redis acknowledges. Nothing is ever given up: a batch Redis keeps
    /// rejecting holds the flush position (Postgres keeps the WAL), `/readyz` turns
    /// unready and the error is logged, once when it starts and once more as an error
    /// if it is not about the connection. Logs again when Redis recovers.
    pub async fn apply_until_ok(&mut self, inv: &Work, events: &[Event]) {
        // Once, not per attempt: retries during a long outage must not push what was
        // sent before it out of the window.
        if !self.dry_run {
            self.record(inv);
        }
        let mut backoff = MIN_BACKOFF;
        let mut failing_since = None;
        let mut reported_command_error = false;
        loop {
            match self.apply(inv, events).await {
                Ok(()) => {
                    self.health.set_redis_ok(true);
                    if let Some(since) = failing_since {
                        let down: Duration = tokio::time::Instant::now() - since;
                        tracing::info!(
                            down_secs = down.as_secs_f64(),
                            "redis is back; invalidations resumed"
                        );
                    }
                    if failing_since.is_some() || self.replay_owed {
                        self.replay_after_failover("redis failed").await;
                    }
                    return;
                }
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    self.health.set_redis_ok(false);
                    if !e.is_connection_error() && !reported_command_error {
                        tracing::error!(
                            error = %e, keys = inv.keys.len(), tags = inv.tags.len(),
                            "redis rejects a command of this batch; holding the flush position until it is accepted"
                        );
                        reported_command_error = true;
                    }
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

    async fn try_apply(&mut self, inv: &Work, events: &[Event]) -> Result<(), SinkError> {
        self.apply_once(inv, events, true).await
    }

    /// Applies `inv` and publishes `events` once; with `wait`, then waits for the
    /// replicas (`wait_replicas`).
    async fn apply_once(
        &mut self,
        inv: &Work,
        events: &[Event],
        wait: bool,
    ) -> Result<(), SinkError> {
        // One flusher at a time: the failover watcher's replay and the sink both move
        // tags into the same spill keys, and two flushes of one spill key at once may
        // each miss members the other merged in.
        let _one_flusher = self.flusher.clone().lock_owned().await;
        let mut conn = self.connection().await?;
        let cluster = conn.is_cluster();
        let tags: Vec<(String, TagAction)> = inv
            .tags
            .iter()
            .map(|(tag, action)| (self.tags.tag_key(tag), *action))
            .collect();
        if !inv.keys.is_empty()
            || !inv.fenced.is_empty()
            || !inv.expire_keys.is_empty()
            || !tags.is_empty()
        {
            let value = self.fence_value(inv, cluster);
            let fence = (value.as_str(), self.fence_ttl, self.fence_script.get_hash());
            let mut cmds = key_commands(&conn, inv, fence);
            let first_flush = cmds.len();
            for (tag_key, action) in &tags {
                cmds.push(self.flush_command(tag_key, *action, cluster));
            }
            self.metrics.redis_commands.inc_by(cmds.len() as u64);
            let results = conn.run(cmds).await?;
            for ((tag_key, action), result) in tags.iter().zip(&results[first_flush..]) {
                self.after_flush(&mut conn, tag_key, *action, result)
                    .await?;
            }
        }
        if !inv.key_patterns.is_empty() || !inv.tag_patterns.is_empty() {
            // A key that moves between two primaries' scans is seen by neither: scan
            // until the slots stood still (and no slot was migrating) from before the
            // first primary's scan to after the last one's.
            loop {
                let before = conn.topology().await?;
                self.scan_patterns(&mut conn, inv, &before.primaries)
                    .await?;
                let after = conn.topology().await?;
                if before == after && after.settled {
                    break;
                }
                tracing::debug!("the cluster's slots moved during a pattern scan; scanning again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if let Some(cfg) = &self.events
            && !events.is_empty()
            && (cfg.channel.is_some() || cfg.stream.is_some())
        {
            let mut cmds = Vec::new();
            for event in events {
                let json = &event.json;
                if let Some(channel) = &cfg.channel {
                    let mut cmd = redis::cmd("PUBLISH");
                    cmd.arg(channel).arg(json);
                    cmds.push(cmd);
                }
                if let Some(stream) = &cfg.stream {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(stream)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(cfg.stream_maxlen)
                        .arg("*")
                        .arg("event")
                        .arg(json);
                    cmds.push(cmd);
                }
            }
            self.metrics.redis_commands.inc_by(cmds.len() as u64);
            if conn.is_cluster() {
                // One after the other: consumers read the events in commit order.
                for cmd in cmds {
                    conn.run(vec![cmd]).await?;
                }
            } else {
                conn.run(cmds).await?;
            }
            self.metrics.events.inc_by(events.len() as u64);
        }
        if !wait {
            return Ok(());
        }
        wait_for_replicas(&mut conn, self.wait_replicas, self.wait_timeout).await
    }
}

/// With `replicas` > 0: on every primary, a write to pginval's own key (so that what
/// follows covers everything the primary took before, also on an earlier connection:
/// a retried batch finds its deletes done and writes nothing itself), then `WAIT
/// replicas timeout`; fewer acknowledgements fail the batch.
async fn wait_for_replicas(
    conn: &mut Conn,
    replicas: u32,
    timeout: Duration,
) -> Result<(), SinkError> {
    if replicas == 0 {
        return Ok(());
    }
    let mut wait = redis::cmd("WAIT");
    wait.arg(replicas).arg(timeout.as_millis() as u64);
    for (primary, slot) in conn.primaries_and_slots().await? {
        let mut mark = redis::cmd("SET");
        mark.arg(format!(
            "{STATE_KEY_PREFIX}wait:{{{}}}",
            conn::slot_tag(slot)
        ))
        .arg(1)
        .arg("PX")
        .arg(60_000);
        conn.on::<()>(&primary, &mark).await?;
        let acked: i64 = conn.on(&primary, &wait).await?;
        if acked < i64::from(replicas) {
            return Err(SinkError::TooFewReplicas {
                acked,
                wanted: replicas,
            });
        }
    }
    Ok(())
}

/// A numeric field of an `INFO` reply.
fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse::<u64>().ok())
}
impl Sink for RedisSink {
    type Error = SinkError;

    /// Sends a batch that only deletes keys and lowers TTLs (no tags, patterns or
    /// events) on the open connection, without waiting for the batches before it:
    /// such commands commute, so several may be in flight. `None` when there is no open
    /// connection, in a dry run, or for any other batch: use [`Sink::deliver`].
    /// The future's error means nothing about which commands ran: retry the batch.
    /// Returns the connection's generation with the future, for
    /// [`Sink::discard_connection`].
    fn send_commuting(
        &self,
        inv: &Work,
        events: &[Event],
    ) -> Option<(
        u64,
        impl Future<Output = Result<(), SinkError>> + Send + 'static,
    )> {
        let commuting = events.is_empty()
            && inv.tags.is_empty()
            && inv.key_patterns.is_empty()
            && inv.tag_patterns.is_empty();
        if !commuting || self.dry_run {
            return None;
        }
        if self.failovers.load(std::sync::atomic::Ordering::Acquire) != self.failovers_seen {
            // The connection may point at a master that is no longer one.
            return None;
        }
        let mut conn = self.conn.clone()?;
        self.record(inv);
        let value = self.fence_value(inv, conn.is_cluster());
        let fence = (value.as_str(), self.fence_ttl, self.fence_script.get_hash());
        let cmds = key_commands(&conn, inv, fence);
        self.metrics.redis_commands.inc_by(cmds.len() as u64);
        let health = self.health.clone();
        let (replicas, timeout) = (self.wait_replicas, self.wait_timeout);
        Some((self.generation, async move {
            conn.run(cmds).await?;
            wait_for_replicas(&mut conn, replicas, timeout).await?;
            health.set_redis_ok(true);
            Ok(())
        }))
    }

    fn deliver(&mut self, work: &Work, events: &[Event]) -> impl Future<Output = ()> + Send {
        self.apply_until_ok(work, events)
    }

    /// Drops the connection of `generation` after a batch failed on it, so the retry
    /// connects afresh; true when it was still the current one.
    fn discard_connection(&mut self, generation: u64) -> bool {
        self.replay_owed = true;
        let current = self.conn.is_some() && self.generation == generation;
        if current {
            self.conn = None;
        }
        current
    }
}
