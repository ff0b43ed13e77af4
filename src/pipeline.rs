//! Wires the stages: replication stream → pgoutput decoder → relation cache → rules
//! → transaction buffer → Redis sink.
//!
//! `run` is here; the streaming loop (`Stream`) is in `stream`, what each decoded
//! message does in `changes`, transactions streamed before their commit in
//! `streamed`; start-up (markers, the managed publication, the slot and its loss) in
//! `startup`; the sink task in `apply`, the read replicas it waits for in `replicas`;
//! the heartbeat and the catalog/Redis polls in `background`; and the ack rule (the
//! flush LSN only moves forward, and only past commits whose invalidations Redis
//! acknowledged, or to the keepalive position when nothing is held) in `ack`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};

use crate::check::{self, CheckReport};
use crate::config::Config;
use crate::metrics::{self, Health, Metrics, RuleLabel};
use crate::replication::catalog;
use crate::replication::conn::{Backend, ReplicationConnection, ReplicationError};
use crate::replication::pgoutput::{DecodeError, Lsn};
use crate::replication::protocol::{self, FrameError, ServerFrame, format_lsn};
use crate::replication::relation::{RelationCache, ReplicaIdentity, Table};
use crate::rules::compile::BoundRule;
use crate::rules::invalidation::{Event, Invalidation, Work};
use crate::sink::events::Fanout;
use crate::sink::redis::{RedisSink, SinkError};

mod ack;
mod apply;
mod background;
mod changes;
mod replicas;
mod startup;
mod stream;
mod streamed;

use ack::Ack;
use apply::apply_batches;
use background::{heartbeat, poll_stats, publish_applied};
use startup::{applied_key, prepare, publication_marker, recover_lost_slot};
use stream::{Channels, Stream, TableRules};

/// Stop reading WAL once this many keys, tags, patterns and events wait for Redis:
/// Postgres keeps the WAL meanwhile, pginval's memory stays bounded.
const MAX_PENDING: usize = 200_000;
/// Reads taken without waiting before a batch is handed over regardless (so a
/// stream that never pauses cannot hold a batch back, nor delay shutdown).
const MAX_EAGER_READS: u32 = 32;
/// A batch this big goes to Redis without first reading what else has arrived.
const BATCH_SOFT_LIMIT: usize = 20_000;
/// Least time between two status updates sent because the flush position moved.
const MIN_STATUS_GAP: Duration = Duration::from_millis(200);
/// A transaction the walsender sends this long after its commit means a backlog: reads
/// are then paced (the kernel wakes pginval per 64 KiB, not per message).
const CATCH_UP_AGE_MICROS: i64 = 200_000;
/// How long shutdown waits for Redis to acknowledge the in-flight batches.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);
/// First and longest wait between reconnection attempts.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(10));
/// Longest wait for a catalog read while streaming.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a standby instance retries a slot another instance holds.
const SLOT_BUSY_RETRY: Duration = Duration::from_secs(1);
/// Prefix of `pg_logical_emit_message` hints addressed to pginval.
pub const HINT_PREFIX: &[u8] = b"pginval";
/// Prefix of the messages `sql/partitions.sql` writes for a partition's TRUNCATE,
/// DETACH, ATTACH or DROP, which PostgreSQL itself does not send.
pub const PARTITION_PREFIX: &[u8] = b"pginval-partition";

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration does not fit the database (`check` problems).
    #[error("the configuration does not fit the database")]
    Check(Box<CheckReport>),
    /// The control connection failed.
    #[error("source database: {}", catalog::describe_error(.0))]
    Database(#[from] tokio_postgres::Error),
    /// The replication connection failed in a way reconnecting cannot fix.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The stream carried bytes pginval cannot decode.
    #[error("at {lsn}: {source}")]
    Decode {
        /// Position of the message.
        lsn: String,
        /// The decoder's error.
        source: DecodeError,
    },
    /// A replication frame was malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream referenced a table it never described.
    #[error("the stream changed relation {0} before describing it")]
    UnknownRelation(u32),
    /// Redis could not be set up.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The sink task ended unexpectedly.
    #[error("the redis sink stopped")]
    SinkStopped,
    /// Rule tables left the publication while streaming (renamed, or replaced by a
    /// table of the same name): start-up runs again to follow the names.
    #[error("rule tables {} are no longer in the publication (renamed or replaced)", .0.iter().map(|(s, t)| format!("{s}.{t}")).collect::<Vec<_>>().join(", "))]
    Unpublished(Vec<(String, String)>),
    /// The slot was lost and `on_slot_lost = "fail"`.
    #[error(
        "replication slot {0} was lost (dropped or invalidated): changes since its last confirmed position are unknown; flush the cache, then delete the Redis key {1} (or set on_slot_lost = \"flush\")"
    )]
    SlotLost(String, String),
}

/// A transaction with this many entries waiting for Redis sends them on before its
/// COMMIT arrives. Safe: with protocol version 1 the walsender sends a transaction only
/// once its commit has been decoded, so every part is already committed; the flush
/// position still moves only past the COMMIT of a transaction whose parts Redis has all
/// acknowledged. Keeps memory flat for million-row transactions.
const TX_PART_ENTRIES: usize = 10_000;
/// Most commit times one batch keeps for the latency histogram.
const MAX_COMMIT_SAMPLES: usize = 10_000;
/// How often the slot's retained WAL and Redis' keyspace stats are read.
const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Committed transactions waiting to go to Redis together.
#[derive(Debug, Default)]
struct Batch {
    /// The Redis work of its transactions.
    work: Work,
    /// Entity events, stamped with their commits.
    events: Vec<Event>,
    /// End LSN of the last commit in the batch.
    end_lsn: Lsn,
    /// A physical replica has everything of the batch once it replayed past this
    /// position: its last commit's end, or, for a part of a transaction sent before
    /// its commit, just past that commit record (`[replicas]`).
    replay_lsn: Lsn,
    transactions: u64,
    /// Commit times (Postgres micros) of its transactions, and when pginval read
    /// each commit off the socket, for latency metrics.
    commit_times: Vec<(i64, Instant)>,
    /// Commit times (Postgres micros) per table whose rules each transaction fired,
    /// for the per-table latency histogram.
    table_commits: Vec<(i64, Arc<str>)>,
}

impl Batch {
    fn len(&self) -> usize {
        self.work.len() + self.events.len()
    }
}

/// What the sink has acknowledged so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Applied {
    /// Batches applied, in order.
    batches: u64,
    /// Highest end LSN among them.
    lsn: Lsn,
}

/// A catalog step bounded by `CATALOG_TIMEOUT`, its error described: a control
/// connection that hangs without closing counts as failed.
async fn bounded<T>(
    step: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    tokio::time::timeout(CATALOG_TIMEOUT, step)
        .await
        .map_err(|_| format!("no answer within {CATALOG_TIMEOUT:?}"))?
        .map_err(|e| catalog::describe_error(&e))
}

/// Which Redis database a plain sink (no events, never a dry run) writes to.
#[derive(Clone, Copy)]
enum Db {
    /// The cache's database.
    Cache,
    /// pginval's own state database (`[state]`).
    State,
}

/// A sink without events that always writes: for start-up, recovery and pginval's
/// own state.
fn plain_sink(
    config: &Config,
    db: Db,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) -> Result<RedisSink, SinkError> {
    let seeds = match db {
        Db::Cache => config.redis_seeds(),
        Db::State => config.state_seeds(),
    };
    RedisSink::new(
        seeds,
        config.redis_topology(),
        config.redis_ca.as_deref(),
        &config.redis_durability,
        config.tags.clone(),
        None,
        false,
        metrics.clone(),
        health.clone(),
    )
}

/// Runs pginval until `shutdown` completes: checks, prepares the publication and the
/// slot, then streams and invalidates, reconnecting after connection failures.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let control = catalog::connect(&config.source).await?;
    // What the catalog says of the rule tables, read once for the check and the
    // publication policy.
    let snapshot = catalog::Snapshot::read(&control, config.rules.tables()).await?;
    let report = check::check_with(&control, &config, &snapshot).await?;
    if !report.problems.is_empty() {
        return Err(RunError::Check(Box::new(report)));
    }
    for w in &report.warnings {
        tracing::warn!(line = w.line, "{}", w.message);
    }
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(config.max_lag));
    let mut background = Vec::new();
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr).await.map_err(|e| {
            RunError::Replication(ReplicationError::Unsupported(format!(
                "cannot listen on {addr} for metrics: {e}"
            )))
        })?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        background.push(tokio::spawn(metrics::serve(
            listener,
            metrics.clone(),
            health.clone(),
        )));
    }
    let (unpublished_tx, unpublished_rx) = watch::channel(Vec::new());
    background.push(tokio::spawn(poll_stats(
        config.clone(),
        metrics.clone(),
        health.clone(),
        unpublished_tx,
    )));

    let mut sink = RedisSink::new(
        config.redis_seeds(),
        config.redis_topology(),
        config.redis_ca.as_deref(),
        &config.redis_durability,
        config.tags.clone(),
        config.events.clone(),
        config.dry_run,
        metrics.clone(),
        health.clone(),
    )?;
    if let Some(watch) = sink.failover_watch() {
        background.push(tokio::spawn(watch));
    }
    // pginval's own state: the cache's server, a database of its own (`[state]`).
    let mut own = plain_sink(&config, Db::State, &metrics, &health)?;
    if let Err(e) = sink.ping().await {
        tracing::warn!(error = %e, "redis is not reachable yet; changes will wait for it");
    }
    tokio::pin!(shutdown);
    // Preparing can wait on Redis (the slot marker): a stop request ends the wait.
    let start = tokio::select! {
        biased;
        _ = &mut shutdown => {
            for task in &background {
                task.abort();
            }
            return Ok(());
        }
        start = prepare(&control, &config, &snapshot, &mut sink, &mut own) => start?,
    };
    if let Some(every) = config.source.heartbeat {
        background.push(tokio::spawn(heartbeat(
            config.source.clone(),
            Some(control),
            every,
        )));
    } else {
        drop(control);
    }
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
    let (acked_tx, acked_rx) = watch::channel(Applied {
        batches: 0,
        lsn: start,
    });
    let sink = Fanout::new(
        sink,
        config.events.as_ref(),
        config.dry_run,
        metrics.clone(),
        health.clone(),
    );
    let replicas = if config.dry_run {
        None
    } else {
        replicas::ReplicaWait::new(&config.read_replicas, &config.source).map(
            |(wait, positions, watcher)| {
                background.push(tokio::spawn(watcher));
                (wait, positions)
            },
        )
    };
    let sink_task = tokio::spawn(apply_batches(
        sink,
        batch_rx,
        acked_tx,
        metrics.clone(),
        replicas,
    ));
    let (applied_tx, applied_rx) = watch::channel(start);
    if !config.dry_run {
        background.push(tokio::spawn(publish_applied(
            own,
            applied_key(&config),
            applied_rx,
        )));
    }

    let mut state = Stream::new(
        Arc::new(config),
        report,
        unpublished_rx,
        Channels {
            batches: batch_tx,
            acked: acked_rx,
            applied: applied_tx,
        },
        metrics.clone(),
        health.clone(),
    );
    let mut backoff = RECONNECT_BACKOFF.0;
    let mut waiting_for_slot = false;
    let result = loop {
        let began = Instant::now();
        let outcome = state.session(&mut shutdown).await;
        if began.elapsed() > Duration::from_secs(30) {
            // A long session: the next failure is a new incident, not a retry storm.
            backoff = RECONNECT_BACKOFF.0;
        }
        match outcome {
            Ok(()) => break Ok(()),
            Err(RunError::Replication(e)) if e.is_slot_lost() && !state.config.dry_run => {
                tracing::error!(error = %e, "the replication slot is gone");
                let mut recovery = plain_sink(&state.config, Db::Cache, &metrics, &health)?;
                let control = catalog::connect(&state.config.source).await?;
                let slot = catalog::slot(&control, &state.config.source.slot).await?;
                let lost = slot
                    .as_ref()
                    .is_none_or(|s| s.wal_status.as_deref() == Some("lost"));
                if !lost {
                    // The server says the slot is gone but the catalog disagrees (another
                    // server behind the DSN, say): not a case to flush the cache over.
                    break Err(RunError::Replication(e));
                }
                let mut own_state = plain_sink(&state.config, Db::State, &metrics, &health)?;
                let recovered = tokio::select! {
                    biased;
                    _ = &mut shutdown => break state.drain_on_shutdown().await,
                    r = recover_lost_slot(&control, &state.config, &mut recovery, &mut own_state, slot.is_some()) => r,
                };
                if let Err(e) = recovered {
                    break Err(e);
                }
                state.conn = None;
                health.set_streaming(false);
                metrics.reconnects.inc();
            }
            Err(RunError::Unpublished(tables)) => {
                // Whatever now bears a rule table's name was not streamed since the
                // switch: its rules' fallbacks are owed (kept in pginval's state across
                // a crash) once the publication has it again.
                tracing::error!(
                    tables = %tables.iter().map(|(s, t)| format!("{s}.{t}")).collect::<Vec<_>>().join(","),
                    "rule tables are no longer in the publication (renamed or replaced); following their names: checking and preparing again"
                );
                let mut cache = plain_sink(&state.config, Db::Cache, &metrics, &health)?;
                let mut own = plain_sink(&state.config, Db::State, &metrics, &health)?;
                let owed = publication_marker(&state.config);
                let mut lines: Vec<String> = own
                    .get_until_ok(&owed)
                    .await
                    .map(|l| l.lines().map(str::to_owned).collect())
                    .unwrap_or_default();
                lines.extend(tables.iter().map(|(s, t)| format!("{s}.{t}")));
                own.set_until_ok(&owed, &lines.join("\n")).await;
                health.set_streaming(false);
                let control = catalog::connect(&state.config.source).await?;
                let snapshot =
                    catalog::Snapshot::read(&control, state.config.rules.tables()).await?;
                let report = check::check_with(&control, &state.config, &snapshot).await?;
                if !report.problems.is_empty() {
                    break Err(RunError::Check(Box::new(report)));
                }
                let restarted = tokio::select! {
                    biased;
                    _ = &mut shutdown => break Ok(()),
                    r = prepare(&control, &state.config, &snapshot, &mut cache, &mut own) => r,
                };
                if let Err(e) = restarted {
                    break Err(e);
                }
                state.conn = None;
            }
            Err(RunError::Replication(e)) if e.is_slot_busy() => {
                // Warm standby: another instance holds the slot. Poll at a steady pace
                // so the takeover after its death is quick.
                if !waiting_for_slot {
                    tracing::info!(error = %e, "the slot is in use by another process; waiting to take over (warm standby)");
                    waiting_for_slot = true;
                }
                state.conn = None;
                health.set_streaming(false);
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break state.drain_on_shutdown().await,
                    _ = tokio::time::sleep(SLOT_BUSY_RETRY) => {}
                }
            }
            Err(RunError::Replication(e)) if e.is_retryable() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "replication connection lost; reconnecting");
                state.conn = None;
                health.set_streaming(false);
                metrics.reconnects.inc();
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break state.drain_on_shutdown().await,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
            }
            Err(e) => break Err(e),
        }
    };
    drop(state);
    sink_task.abort();
    for task in background {
        task.abort();
    }
    result
}
