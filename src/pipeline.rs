//! Wires the stages: replication stream → pgoutput decoder → relation cache → rules
//! → transaction buffer → Redis sink.
//!
//! `run` and the streaming loop (`Stream`) are here, what each decoded message does in
//! `changes`; start-up (markers, the managed publication, the slot and its loss) is
//! in `startup`, the sink task in `apply`, the
//! heartbeat and the catalog/Redis polls in `background`, and the ack rule — the flush
//! LSN only moves forward, and only past commits whose invalidations Redis
//! acknowledged, or to the keepalive position when nothing is held — in `ack`.

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
mod streamed;

use ack::Ack;
use apply::apply_batches;
use background::{heartbeat, poll_stats, publish_applied};
use startup::{applied_key, prepare, publication_marker, recover_lost_slot};

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
    let report = check::check_with(&control, &config).await?;
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
        start = prepare(&control, &config, &mut sink, &mut own) => start?,
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
                let report = check::check_with(&control, &state.config).await?;
                if !report.problems.is_empty() {
                    break Err(RunError::Check(Box::new(report)));
                }
                let restarted = tokio::select! {
                    biased;
                    _ = &mut shutdown => break Ok(()),
                    r = prepare(&control, &state.config, &mut cache, &mut own) => r,
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

/// A table with the rules bound to its columns and its primary key's positions.
#[derive(Clone)]
struct TableRules {
    table: Arc<Table>,
    rules: Arc<[BoundRule]>,
    id_columns: Arc<[usize]>,
    /// Row change counters for insert, update, delete, truncate (handles resolved once,
    /// so the hot path allocates no labels).
    changes: [Counter; 4],
}

/// What woke the streaming loop.
enum Wake {
    Shutdown,
    Unpublished,
    StatusTimer,
    Acked(bool),
    Sent,
    SinkGone,
    Read(Result<(), ReplicationError>),
    /// Half the receive timeout passed in silence: ask the server for a keepalive.
    Quiet,
    /// The whole receive timeout passed in silence: the connection is dead.
    Deaf,
}

/// The stream's ends of its channels: batches to the sink task, the sink's
/// acknowledgements back, and positions to the publisher of the applied position.
struct Channels {
    batches: mpsc::Sender<Batch>,
    acked: watch::Receiver<Applied>,
    applied: watch::Sender<Lsn>,
}

/// Streaming state that survives reconnections.
struct Stream {
    config: Arc<Config>,
    primary_keys: HashMap<(String, String), Vec<String>>,
    /// Rule tables that are partitioned: their old rows carry what each partition's
    /// own identity sends, read from the catalog whenever the stream describes them.
    partitioned: BTreeSet<(String, String)>,
    /// Rule tables the publication no longer publishes (from the catalog poll).
    unpublished: watch::Receiver<Vec<(String, String)>>,
    /// A control connection for those catalog reads, opened when first needed.
    control: Option<tokio_postgres::Client>,
    /// The name each table OID had when the stream last described it: a different
    /// name later is a rename, which unbinds the rules of the old name.
    names: HashMap<u32, (String, String)>,
    /// Tables (OID, identity) whose weaker identity was already logged.
    identity_logged: HashSet<(u32, ReplicaIdentity)>,
    batches: mpsc::Sender<Batch>,
    acked: watch::Receiver<Applied>,
    /// The newest position the ack rule allowed, for [`publish_applied`] to write to
    /// Redis.
    applied: watch::Sender<Lsn>,
    relations: RelationCache,
    bound: HashMap<u32, TableRules>,
    /// The open transaction's invalidations (None between COMMIT and BEGIN).
    tx: Option<Invalidation>,
    /// The open transaction's commit position and time (from BEGIN), for its events.
    tx_commit: (Lsn, i64),
    /// Events the open transaction has queued so far: the next one's position.
    tx_events: u64,
    /// Transactions streamed before their commit (protocol version 2), held.
    streams: streamed::Streams,
    /// Committed batches ready for the sink, ahead of `pending` (a streamed
    /// transaction's parts).
    ready: std::collections::VecDeque<streamed::Ready>,
    /// Committed, not yet handed to the sink.
    pending: Option<Batch>,
    /// The ack rule: what was handed to the sink, acknowledged, kept alive, and
    /// so the flush position that may be confirmed to Postgres.
    ack: Ack,
    /// The server's WAL end as last reported (for the lag metric).
    server_wal_end: Lsn,
    conn: Option<ReplicationConnection>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    rule_labels: HashMap<usize, RuleLabel>,
    /// Each rule's `schema.table`, by rule number.
    rule_tables: HashMap<usize, Arc<str>>,
    /// Sequence number and first commit time of batches handed to the sink.
    in_flight: std::collections::VecDeque<(u64, i64)>,
    /// Server clock of the XLogData frame being applied.
    frame_time: i64,
    /// The latest transaction came from a backlog (sent long after its commit).
    catching_up: bool,
    /// When the latest read off the replication socket completed.
    read_at: Instant,
    /// Since when the server has sent nothing while pginval was reading (the
    /// receive timeout counts from here).
    heard_at: Instant,
    /// When a keepalive was asked for, if since `heard_at`.
    asked_at: Option<Instant>,
}

impl Stream {
    fn new(
        config: Arc<Config>,
        report: CheckReport,
        unpublished: watch::Receiver<Vec<(String, String)>>,
        channels: Channels,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Stream {
        let Channels {
            batches,
            acked,
            applied,
        } = channels;
        // Streaming resumes where the sink starts out: the slot's confirmed position.
        let start = acked.borrow().lsn;
        let ack = Ack::new(start, config.dry_run);
        let rule_labels = config
            .rules
            .rules
            .iter()
            .map(|r| {
                (
                    r.number,
                    RuleLabel {
                        rule: format!("#{} {}", r.number, r.qualified_table()),
                    },
                )
            })
            .collect();
        let rule_tables = config
            .rules
            .rules
            .iter()
            .map(|r| (r.number, Arc::from(r.qualified_table())))
            .collect();
        Stream {
            rule_tables,
            config,
            primary_keys: report.primary_keys,
            partitioned: report.partitioned,
            unpublished,
            control: None,
            names: HashMap::new(),
            identity_logged: HashSet::new(),
            batches,
            acked,
            applied,
            relations: RelationCache::default(),
            bound: HashMap::new(),
            tx: None,
            tx_commit: (0, 0),
            tx_events: 0,
            streams: streamed::Streams::default(),
            ready: std::collections::VecDeque::new(),
            pending: None,
            ack,
            server_wal_end: start,
            conn: None,
            metrics,
            health,
            rule_labels,
            in_flight: std::collections::VecDeque::new(),
            frame_time: 0,
            catching_up: false,
            read_at: Instant::now(),
            heard_at: Instant::now(),
            asked_at: None,
        }
    }

    /// Work not yet handed to the sink: an open transaction, or an unsent batch.
    ///
    /// A transaction streamed before its commit does not count: the keepalive's WAL
    /// end can pass only a Stream Commit already read (its work is then in `ready` or
    /// `pending`), and a confirmed position inside an open transaction makes
    /// PostgreSQL send it again whole, from its start, after a reconnect (as for
    /// PostgreSQL's own subscriber). Counting it would keep WAL without limit behind a
    /// transaction a server crash ended, which PostgreSQL drops without a Stream Abort.
    fn holding(&self) -> bool {
        self.tx.is_some() || !self.ready.is_empty() || self.pending.is_some()
    }

    /// Keys, tags, patterns and events committed and not yet handed to the sink.
    fn backlog(&self) -> usize {
        self.ready.iter().map(streamed::Ready::len).sum::<usize>()
            + self.pending.as_ref().map_or(0, Batch::len)
    }

    /// The highest position the ack rule allows now (after taking in the sink's
    /// latest acknowledgements).
    fn confirmable(&mut self) -> Lsn {
        self.ack.acknowledged(self.acked.borrow().batches);
        self.ack.confirmable(self.holding())
    }

    /// Hands `lsn` (a position the ack rule allows) to [`publish_applied`] when it is
    /// newer than the last one: writers waiting to read their own writes need not wait
    /// for the next status update.
    fn publish(&self, lsn: Lsn) {
        self.applied.send_if_modified(|published| {
            let newer = lsn > *published;
            if newer {
                *published = lsn;
            }
            newer
        });
    }

    /// One replication session: connect, stream until shutdown or an error.
    async fn session(
        &mut self,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<(), RunError> {
        let source = &self.config.source;
        let mut conn = ReplicationConnection::connect(source, "pginval").await?;
        let publication = format!("\"{}\"", source.publication);
        let slot = if self.config.dry_run {
            let name = format!("{}_dry_run_{}", source.slot, std::process::id());
            conn.create_temporary_slot(&name).await?;
            tracing::info!(slot = %name, "dry run: streaming from a temporary slot (changes from now on)");
            name
        } else {
            source.slot.clone()
        };
        // Protocol version 2 streams a transaction while it runs once it outgrows the
        // server's logical_decoding_work_mem (PostgreSQL 14+).
        let streaming = source.streaming && conn.server_version().is_some_and(|v| v >= 140000);
        let mut options = vec![
            ("proto_version", if streaming { "2" } else { "1" }),
            ("publication_names", publication.as_str()),
            ("messages", "true"),
        ];
        if streaming {
            options.push(("streaming", "on"));
        }
        let started = conn.start_logical(&slot, 0, &options);
        // Bounded like every read: a server that never answers is a dead connection.
        // Starting to decode can take a busy server a while: never less than a catalog
        // step, or a short receive timeout would cut every start short.
        let bound = source
            .receive_timeout
            .map_or(Duration::MAX, |t| t.max(CATALOG_TIMEOUT));
        match tokio::time::timeout(bound, started).await {
            Ok(started) => started?,
            Err(_) => {
                // Its walsender may have the slot already: end it, as for a silent
                // connection, or the next start waits out wal_sender_timeout.
                let pid = conn.backend_pid();
                let error =
                    conn.timed_out(format!("START_REPLICATION got no answer within {bound:?}"));
                self.end_silent_walsender(pid).await;
                return Err(error.into());
            }
        }
        tracing::info!(slot = %source.slot, publication = %source.publication, protocol = if streaming { 2 } else { 1 }, "streaming");
        // A new session replays from the slot's confirmed position and resends every
        // Relation; a transaction cut off by the reconnect comes again whole.
        self.relations.clear();
        self.bound.clear();
        self.tx = None;
        self.streams.clear();
        self.ack.reconnected();
        self.conn = Some(conn);
        self.health.set_streaming(true);
        self.heard(Instant::now());
        let receive_timeout = self.config.source.receive_timeout;

        let mut status_timer = tokio::time::interval(self.config.source.status_interval);
        status_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        let mut eager_reads = 0;
        loop {
            // Everything already read is decoded before waiting: batches grow across
            // transactions while the stream has more buffered, and go out when it has not.
            self.drain_buffered().await?;
            let backlog = self.backlog();
            // A status update owed because the last one was too recent.
            let status_due = (self.confirmable() > self.ack.confirmed())
                .then(|| tokio::time::Instant::from_std(last_status + MIN_STATUS_GAP));
            let conn = self.conn.as_mut().expect("connected");
            // Before a batch goes out, take whatever the kernel already holds: batches
            // then span every transaction that has arrived, without waiting for any
            // more (a read that would block returns at once). Cancel-safe: `fill`
            // either read or did nothing.
            if self.pending.is_some() && backlog < BATCH_SOFT_LIMIT && eager_reads < MAX_EAGER_READS
            {
                if let Some(read) = conn.fill().now_or_never() {
                    read?;
                    self.read_at = Instant::now();
                    self.heard_at = self.read_at;
                    self.asked_at = None;
                    eager_reads += 1;
                    continue;
                }
            }
            eager_reads = 0;
            conn.pace_reads(self.catching_up);
            let reading = backlog < MAX_PENDING;
            if !reading {
                // Not reading (Redis is behind): the server's silence means nothing.
                self.heard_at = Instant::now();
                self.asked_at = None;
            }
            // Like PostgreSQL's wal_receiver_timeout: a connection that stopped
            // delivering without closing (a half-open socket, a stuck proxy) would
            // otherwise stall invalidation while looking healthy.
            let quiet_at =
                receive_timeout.map(|t| tokio::time::Instant::from_std(self.heard_at + t / 2));
            // Dead only once the keepalive asked for has had half the timeout to come:
            // time spent away from the socket (a slow catalog read) is not silence.
            let deaf_at = receive_timeout.zip(self.asked_at).map(|(t, asked)| {
                tokio::time::Instant::from_std((self.heard_at + t).max(asked + t / 2))
            });
            let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
            let wake = tokio::select! {
                biased;
                // Shutdown first: nothing else is started once it is asked for.
                _ = &mut *shutdown => Wake::Shutdown,
                // A rule table left the publication: start-up follows the names again.
                Ok(()) = self.unpublished.changed() => Wake::Unpublished,
                // Confirm what Redis acknowledged once the minimum gap has passed.
                _ = tokio::time::sleep_until(status_due.unwrap_or_else(tokio::time::Instant::now)), if status_due.is_some() => Wake::StatusTimer,
                // Periodic status keeps the walsender from timing out the connection.
                _ = status_timer.tick() => Wake::StatusTimer,
                // Redis acknowledged a batch: the flush position may move.
                changed = self.acked.changed() => Wake::Acked(changed.is_ok()),
                // Hand the committed batch to the sink as soon as it has room.
                permit = self.batches.reserve(), if self.pending.is_some() || !self.ready.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(batch) = streamed::next_batch(&mut self.ready, &mut self.pending) {
                            let seq = self.ack.sent(batch.end_lsn);
                            if let Some((first, _)) = batch.commit_times.first() {
                                self.in_flight.push_back((seq, *first));
                            }
                            permit.send(batch);
                        }
                        Wake::Sent
                    }
                    Err(_) => Wake::SinkGone,
                },
                // More WAL, unless Redis is so far behind that the backlog is full.
                read = conn.fill(), if reading => Wake::Read(read),
                _ = tokio::time::sleep_until(quiet_at.unwrap_or(far)), if reading && quiet_at.is_some() && self.asked_at.is_none() => Wake::Quiet,
                _ = tokio::time::sleep_until(deaf_at.unwrap_or(far)), if reading && deaf_at.is_some() => Wake::Deaf,
            };
            self.update_health();
            match wake {
                Wake::Shutdown => return self.drain_on_shutdown().await,
                Wake::Unpublished => {
                    let tables = self.unpublished.borrow_and_update().clone();
                    if !tables.is_empty() {
                        self.drain_on_shutdown().await?;
                        return Err(RunError::Unpublished(tables));
                    }
                }
                Wake::StatusTimer => {
                    self.send_status().await?;
                    last_status = Instant::now();
                }
                Wake::Acked(true) => {
                    let confirmable = self.confirmable();
                    self.publish(confirmable);
                    if confirmable > self.ack.confirmed() && last_status.elapsed() >= MIN_STATUS_GAP
                    {
                        self.send_status().await?;
                        last_status = Instant::now();
                    }
                }
                Wake::Acked(false) | Wake::SinkGone => return Err(RunError::SinkStopped),
                Wake::Read(read) => {
                    read?;
                    self.read_at = Instant::now();
                    self.heard(self.read_at);
                }
                Wake::Sent => {}
                Wake::Quiet => {
                    self.asked_at = Some(Instant::now());
                    self.send_status_asking(true).await?;
                    last_status = Instant::now();
                }
                Wake::Deaf => {
                    let silence = receive_timeout.unwrap_or_default();
                    self.metrics.receive_timeouts.inc();
                    let pid = self
                        .conn
                        .as_ref()
                        .and_then(ReplicationConnection::backend_pid);
                    self.end_silent_walsender(pid).await;
                    let conn = self.conn.as_ref().expect("connected");
                    return Err(conn
                        .timed_out(format!(
                            "nothing received for {silence:?}, not even the keepalive asked for (receive_timeout_secs)"
                        ))
                        .into());
                }
            }
        }
    }

    /// Decodes and applies every complete message in the read buffer.
    async fn drain_buffered(&mut self) -> Result<(), RunError> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(());
            };
            let Some(msg) = conn.buffered_message()? else {
                return Ok(());
            };
            match msg {
                Backend::CopyData(frame) => match protocol::decode_frame(frame)? {
                    ServerFrame::XLogData {
                        start,
                        wal_end,
                        server_time,
                        data,
                    } => {
                        self.server_wal_end = self.server_wal_end.max(wal_end);
                        self.frame_time = server_time;
                        self.apply_message(start, &data).await?
                    }
                    ServerFrame::Keepalive {
                        wal_end,
                        reply_requested,
                        ..
                    } => {
                        self.ack.keepalive(wal_end);
                        self.server_wal_end = self.server_wal_end.max(wal_end);
                        if reply_requested {
                            self.send_status().await?;
                        }
                    }
                },
                Backend::Other(postgres_protocol::message::backend::Message::CopyDone) => {
                    return Err(ReplicationError::StreamEnded.into());
                }
                Backend::Other(_) | Backend::CopyBoth => {}
            }
        }
    }

    /// The server still thinks the silent connection's walsender streams (it notices
    /// only after its `wal_sender_timeout`) and keeps the slot for it: end that
    /// walsender, so the next session gets the slot at once. Best effort: when it
    /// cannot be done, the next session waits for the slot like a warm standby.
    async fn end_silent_walsender(&mut self, pid: Option<i32>) {
        let Some(pid) = pid else { return };
        if self.config.dry_run {
            return;
        }
        let slot = self.config.source.slot.clone();
        let ended = async {
            let client = bounded(catalog::connect(&self.config.source)).await?;
            bounded(catalog::end_walsender(&client, &slot, pid)).await
        };
        match ended.await {
            Ok(true) => tracing::info!(
                pid,
                "ended the walsender of the silent connection, which still held the slot"
            ),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(pid, %error, "could not end the walsender of the silent connection; the slot is free once the server's wal_sender_timeout passes")
            }
        }
    }

    /// Something arrived from the server at `at`: the receive timeout starts again.
    fn heard(&mut self, at: Instant) {
        self.heard_at = at;
        self.asked_at = None;
    }

    /// Sends a standby status update with the highest position the ack rule allows.
    async fn send_status(&mut self) -> Result<(), RunError> {
        self.send_status_asking(false).await
    }

    /// A standby status update; `reply` asks the server to answer with a keepalive
    /// at once. The send is bounded like the reads: a connection whose socket no
    /// longer drains is dead.
    async fn send_status_asking(&mut self, reply: bool) -> Result<(), RunError> {
        let before = self.ack.confirmed();
        self.ack.acknowledged(self.acked.borrow().batches);
        let lsn = self.ack.confirm(self.holding());
        if lsn > before {
            tracing::trace!(lsn = %format_lsn(lsn), "confirming");
        }
        self.metrics.confirmed_lsn.set(lsn as i64);
        self.publish(lsn);
        self.metrics
            .lag_bytes
            .set(self.server_wal_end.saturating_sub(lsn) as i64);
        if let Some(conn) = self.conn.as_mut() {
            let msg = protocol::standby_status(lsn, protocol::pg_now_micros(), reply);
            let bound = self.config.source.receive_timeout.unwrap_or(Duration::MAX);
            match tokio::time::timeout(bound, conn.send_copy_data(&msg)).await {
                Ok(sent) => sent?,
                Err(_) => {
                    let what = format!("a status update could not be sent within {bound:?}");
                    return Err(conn.timed_out(what).into());
                }
            }
        }
        Ok(())
    }

    /// Shutdown: hand over the committed batch, wait (bounded) for Redis to
    /// acknowledge everything, confirm it, and end the stream with CopyDone.
    async fn drain_on_shutdown(&mut self) -> Result<(), RunError> {
        // An open transaction never committed as far as pginval saw: replayed later.
        self.tx = None;
        self.streams.clear();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        while self.pending.is_some() || !self.ready.is_empty() {
            match tokio::time::timeout_at(deadline, self.batches.reserve()).await {
                Ok(Ok(permit)) => {
                    if let Some(batch) = streamed::next_batch(&mut self.ready, &mut self.pending) {
                        self.ack.sent(batch.end_lsn);
                        permit.send(batch);
                    }
                }
                // The batch stays pending, so nothing past it is confirmed.
                _ => {
                    tracing::warn!(
                        "shutdown: the last batches could not be handed to redis; they will be replayed"
                    );
                    break;
                }
            }
        }
        let sent = self.ack.sent_batches();
        let drained = tokio::time::timeout_at(deadline, self.acked.wait_for(|a| a.batches >= sent))
            .await
            .map(|r| r.is_ok());
        if drained != Ok(true) {
            tracing::warn!(
                "shutdown: redis (or the read replicas) did not acknowledge everything in time; unacknowledged changes will be replayed on restart"
            );
        }
        if self.conn.is_some() {
            self.send_status().await?;
        }
        if let Some(conn) = self.conn.take() {
            conn.finish(Duration::from_secs(2)).await?;
        }
        tracing::info!(confirmed = %format_lsn(self.ack.confirmed()), "stopped");
        Ok(())
    }
}
