//! Metric names and the HTTP endpoints `/metrics` (Prometheus/OpenMetrics text),
//! `/healthz` (process alive) and `/readyz` (streaming, Redis reachable, lag under
//! the threshold).
//!
//! Owns the registry and the health flags; never decides anything about the stream.
//! The HTTP side is a minimal HTTP/1.1 responder for three GET paths, written here
//! rather than pulling a web framework into a daemon that serves nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

// Metric names (counters get `_total` appended by the encoder).
/// Row changes received, by table and op.
pub const ROW_CHANGES: &str = "pginval_row_changes";
/// Committed transactions received.
pub const TRANSACTIONS: &str = "pginval_transactions";
/// Keys rendered for invalidation, by rule.
pub const KEYS_INVALIDATED: &str = "pginval_keys_invalidated";
/// Tags rendered for flushing, by rule.
pub const TAGS_INVALIDATED: &str = "pginval_tags_invalidated";
/// Fallbacks used, by reason.
pub const FALLBACKS: &str = "pginval_fallbacks";
/// Redis commands sent.
pub const REDIS_COMMANDS: &str = "pginval_redis_commands";
/// Fences written before a delete (`fence = true`).
pub const FENCES: &str = "pginval_fences";
/// Keys of fenced rules deleted without a fence: on a cluster, a key with a `}` but no
/// hash tag, whose fence cannot share its slot.
pub const FENCES_SKIPPED: &str = "pginval_fences_skipped";
/// Batches applied a second time once every read replica (`[replicas]`) replayed them.
pub const REPLICA_REDELETES: &str = "pginval_replica_redeletes";
/// Times a read replica was given up: it had not replayed a batch within
/// `[replicas] give_up_after`.
pub const REPLICA_GIVEN_UP: &str = "pginval_replica_given_up";
/// Read replicas given up now (not waited for until they catch up).
pub const REPLICAS_GIVEN_UP_NOW: &str = "pginval_replicas_given_up";
/// Failed Redis attempts.
pub const REDIS_ERRORS: &str = "pginval_redis_errors";
/// Redis failovers (or outages) after which the replay window was applied again.
pub const REDIS_REPLAYS: &str = "pginval_redis_failover_replays";
/// Invalidations that fell out of the replay window because it was full.
pub const REPLAY_DROPPED: &str = "pginval_replay_window_dropped";
/// Entity events published.
pub const EVENTS: &str = "pginval_events_published";
/// Entity events a message broker confirmed, by sink (`amqp`, `nats`).
pub const EVENTS_CONFIRMED: &str = "pginval_events_confirmed";
/// Failed attempts to publish a batch's events to a broker, by sink.
pub const EVENT_SINK_ERRORS: &str = "pginval_event_sink_errors";
/// Second deletes performed.
pub const SECOND_DELETES: &str = "pginval_second_deletes";
/// Hints (`pg_logical_emit_message(.., 'pginval', ..)`), by outcome: applied or refused.
pub const HINTS: &str = "pginval_hints";
/// Entries (keys, tags, patterns, events) per batch sent to Redis.
pub const BATCH_ENTRIES: &str = "pginval_batch_entries";
/// Transactions per batch.
pub const BATCH_TRANSACTIONS: &str = "pginval_batch_transactions";
/// Commit time to Redis acknowledgement.
pub const COMMIT_TO_INVALIDATION: &str = "pginval_commit_to_invalidation_seconds";
/// Commit time to Redis acknowledgement, per table whose rules the transaction fired:
/// how long a cached value of that table can stay stale after its row changed.
pub const TABLE_COMMIT_TO_INVALIDATION: &str = "pginval_table_commit_to_invalidation_seconds";
/// Reading a commit off the replication socket to Redis acknowledgement.
pub const READ_TO_INVALIDATION: &str = "pginval_read_to_invalidation_seconds";
/// Server WAL end minus confirmed flush position.
pub const LAG_BYTES: &str = "pginval_replication_lag_bytes";
/// Now minus the commit time of the last applied transaction.
pub const LAG_SECONDS: &str = "pginval_replication_lag_seconds";
/// WAL the slot retains on the server.
pub const SLOT_RETAINED_WAL: &str = "pginval_slot_retained_wal_bytes";
/// Replication reconnects.
pub const RECONNECTS: &str = "pginval_reconnects";
/// Replication connections given up because the server sent nothing for the
/// receive timeout.
pub const RECEIVE_TIMEOUTS: &str = "pginval_receive_timeouts";
/// Confirmed flush position.
pub const CONFIRMED_LSN: &str = "pginval_confirmed_lsn";
/// Redis `keyspace_hits` (INFO stats).
pub const REDIS_HITS: &str = "pginval_redis_keyspace_hits";
/// Redis `keyspace_misses` (INFO stats).
pub const REDIS_MISSES: &str = "pginval_redis_keyspace_misses";
/// hits / (hits + misses).
pub const REDIS_HIT_RATIO: &str = "pginval_redis_keyspace_hit_ratio";

/// `table`, `op` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableOp {
    /// `schema.table`.
    pub table: String,
    /// insert, update, delete, truncate.
    pub op: String,
}

/// `table` label: `schema.table`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// `schema.table`.
    pub table: String,
}

/// `rule` label: `#N schema.table`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    /// The rule.
    pub rule: String,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why the fallback was used.
    pub reason: String,
}

/// `sink` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    /// The event sink: `amqp` or `nats`.
    pub sink: &'static str,
}

/// `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What happened to it.
    pub outcome: &'static str,
}

/// Every metric pginval exports.
pub struct Metrics {
    registry: Registry,
    /// See [`ROW_CHANGES`].
    pub row_changes: Family<TableOp, Counter>,
    /// See [`TRANSACTIONS`].
    pub transactions: Counter,
    /// See [`KEYS_INVALIDATED`].
    pub keys: Family<RuleLabel, Counter>,
    /// See [`TAGS_INVALIDATED`].
    pub tags: Family<RuleLabel, Counter>,
    /// See [`FALLBACKS`].
    pub fallbacks: Family<ReasonLabel, Counter>,
    /// See [`REDIS_COMMANDS`].
    pub redis_commands: Counter,
    /// See [`FENCES`].
    pub fences: Counter,
    /// See [`FENCES_SKIPPED`].
    pub fences_skipped: Counter,
    /// See [`REPLICA_REDELETES`].
    pub replica_redeletes: Counter,
    /// See [`REPLICA_GIVEN_UP`].
    pub replica_given_up: Counter,
    /// See [`REPLICAS_GIVEN_UP_NOW`].
    pub replicas_given_up_now: Gauge,
    /// See [`REDIS_ERRORS`].
    pub redis_errors: Counter,
    /// See [`REDIS_REPLAYS`].
    pub redis_replays: Counter,
    /// See [`REPLAY_DROPPED`].
    pub replay_dropped: Counter,
    /// See [`EVENTS`].
    pub events: Counter,
    /// See [`EVENTS_CONFIRMED`].
    pub events_confirmed: Family<SinkLabel, Counter>,
    /// See [`EVENT_SINK_ERRORS`].
    pub event_sink_errors: Family<SinkLabel, Counter>,
    /// See [`SECOND_DELETES`].
    pub second_deletes: Counter,
    /// See [`HINTS`].
    pub hints: Family<OutcomeLabel, Counter>,
    /// See [`BATCH_ENTRIES`].
    pub batch_entries: Histogram,
    /// See [`BATCH_TRANSACTIONS`].
    pub batch_transactions: Histogram,
    /// See [`COMMIT_TO_INVALIDATION`].
    pub commit_to_invalidation: Histogram,
    /// See [`TABLE_COMMIT_TO_INVALIDATION`].
    pub table_commit_to_invalidation: Family<TableLabel, Histogram, fn() -> Histogram>,
    /// See [`READ_TO_INVALIDATION`].
    pub read_to_invalidation: Histogram,
    /// See [`LAG_BYTES`].
    pub lag_bytes: Gauge,
    /// See [`LAG_SECONDS`].
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// See [`SLOT_RETAINED_WAL`].
    pub retained_wal: Gauge,
    /// See [`RECONNECTS`].
    pub reconnects: Counter,
    /// Replication connections given up as silent.
    pub receive_timeouts: Counter,
    /// See [`CONFIRMED_LSN`].
    pub confirmed_lsn: Gauge,
    /// See [`REDIS_HITS`].
    pub redis_hits: Gauge,
    /// See [`REDIS_MISSES`].
    pub redis_misses: Gauge,
    /// See [`REDIS_HIT_RATIO`].
    pub redis_hit_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// The buckets of the commit → invalidation histograms: 0.1 ms to about 10 minutes.
fn commit_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.5, 16))
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            row_changes: Family::default(),
            transactions: Counter::default(),
            keys: Family::default(),
            tags: Family::default(),
            fallbacks: Family::default(),
            redis_commands: Counter::default(),
            fences: Counter::default(),
            fences_skipped: Counter::default(),
            replica_redeletes: Counter::default(),
            replica_given_up: Counter::default(),
            replicas_given_up_now: Gauge::default(),
            redis_errors: Counter::default(),
            redis_replays: Counter::default(),
            replay_dropped: Counter::default(),
            events: Counter::default(),
            events_confirmed: Family::default(),
            event_sink_errors: Family::default(),
            second_deletes: Counter::default(),
            hints: Family::default(),
            batch_entries: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            batch_transactions: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            commit_to_invalidation: commit_buckets(),
            table_commit_to_invalidation: Family::new_with_constructor(commit_buckets),
            read_to_invalidation: Histogram::new(exponential_buckets(0.00005, 1.5, 24)),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            retained_wal: Gauge::default(),
            reconnects: Counter::default(),
            receive_timeouts: Counter::default(),
            confirmed_lsn: Gauge::default(),
            redis_hits: Gauge::default(),
            redis_misses: Gauge::default(),
            redis_hit_ratio: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(ROW_CHANGES, "Row changes received", m.row_changes.clone());
        r.register(
            TRANSACTIONS,
            "Committed transactions received",
            m.transactions.clone(),
        );
        r.register(
            KEYS_INVALIDATED,
            "Keys rendered for invalidation",
            m.keys.clone(),
        );
        r.register(
            TAGS_INVALIDATED,
            "Tags rendered for flushing",
            m.tags.clone(),
        );
        r.register(
            FALLBACKS,
            "Fallbacks used (over-invalidation)",
            m.fallbacks.clone(),
        );
        r.register(
            REDIS_COMMANDS,
            "Redis commands sent",
            m.redis_commands.clone(),
        );
        r.register(
            FENCES,
            "Fences written before a delete (fence = true)",
            m.fences.clone(),
        );
        r.register(
            FENCES_SKIPPED,
            "Keys of fenced rules deleted without their fence (on a cluster, a key whose fence cannot share its slot)",
            m.fences_skipped.clone(),
        );
        r.register(
            REPLICA_REDELETES,
            "Batches applied again once every read replica replayed them ([replicas])",
            m.replica_redeletes.clone(),
        );
        r.register(
            REPLICA_GIVEN_UP,
            "Times a read replica was given up: it had not replayed a batch within [replicas] give_up_after",
            m.replica_given_up.clone(),
        );
        r.register(
            REPLICAS_GIVEN_UP_NOW,
            "Read replicas given up now: not waited for until they replayed the batch they were given up at",
            m.replicas_given_up_now.clone(),
        );
        r.register(
            REDIS_ERRORS,
            "Failed Redis attempts",
            m.redis_errors.clone(),
        );
        r.register(
            REDIS_REPLAYS,
            "Redis failovers or outages after which the recent invalidations were applied again",
            m.redis_replays.clone(),
        );
        r.register(
            REPLAY_DROPPED,
            "Invalidations that fell out of the full replay window",
            m.replay_dropped.clone(),
        );
        r.register(EVENTS, "Entity events published", m.events.clone());
        r.register(
            EVENTS_CONFIRMED,
            "Entity events a message broker confirmed",
            m.events_confirmed.clone(),
        );
        r.register(
            EVENT_SINK_ERRORS,
            "Failed attempts to publish events to a message broker",
            m.event_sink_errors.clone(),
        );
        r.register(
            SECOND_DELETES,
            "Keys deleted a second time",
            m.second_deletes.clone(),
        );
        r.register(
            HINTS,
            "Hints received, by outcome (applied, refused)",
            m.hints.clone(),
        );
        r.register(
            BATCH_ENTRIES,
            "Entries per Redis batch",
            m.batch_entries.clone(),
        );
        r.register(
            BATCH_TRANSACTIONS,
            "Transactions per Redis batch",
            m.batch_transactions.clone(),
        );
        r.register(
            COMMIT_TO_INVALIDATION,
            "Commit time to Redis acknowledgement",
            m.commit_to_invalidation.clone(),
        );
        r.register(
            TABLE_COMMIT_TO_INVALIDATION,
            "Commit time to Redis acknowledgement, per table whose rules the transaction fired",
            m.table_commit_to_invalidation.clone(),
        );
        r.register(
            READ_TO_INVALIDATION,
            "Time from reading a commit off the replication socket to Redis acknowledging its invalidations: pginval's own share of the latency",
            m.read_to_invalidation.clone(),
        );
        r.register(
            LAG_BYTES,
            "Server WAL end minus the confirmed position",
            m.lag_bytes.clone(),
        );
        r.register(
            LAG_SECONDS,
            "Now minus the commit time of the last applied transaction",
            m.lag_seconds.clone(),
        );
        r.register(
            SLOT_RETAINED_WAL,
            "WAL retained by the slot",
            m.retained_wal.clone(),
        );
        r.register(RECONNECTS, "Replication reconnects", m.reconnects.clone());
        r.register(
            RECEIVE_TIMEOUTS,
            "Replication connections reopened because the server sent nothing for receive_timeout_secs",
            m.receive_timeouts.clone(),
        );
        r.register(
            CONFIRMED_LSN,
            "Confirmed flush position",
            m.confirmed_lsn.clone(),
        );
        r.register(
            REDIS_HITS,
            "Redis keyspace_hits (INFO stats)",
            m.redis_hits.clone(),
        );
        r.register(
            REDIS_MISSES,
            "Redis keyspace_misses (INFO stats)",
            m.redis_misses.clone(),
        );
        r.register(
            REDIS_HIT_RATIO,
            "Redis hits / (hits + misses)",
            m.redis_hit_ratio.clone(),
        );
        m
    }

    /// The registry in OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Liveness and readiness state, written by the pipeline, read by `/readyz`.
#[derive(Debug)]
pub struct Health {
    streaming: AtomicBool,
    redis_ok: AtomicBool,
    /// Event sinks whose last attempt failed.
    sinks_down: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
    /// Unix micros of the oldest commit received and not yet acknowledged (0: none).
    oldest_pending: AtomicI64,
    max_lag: Duration,
}

impl Health {
    /// Fresh state; `max_lag` is the readiness threshold.
    pub fn new(max_lag: Duration) -> Health {
        Health {
            streaming: AtomicBool::new(false),
            redis_ok: AtomicBool::new(false),
            sinks_down: Default::default(),
            oldest_pending: AtomicI64::new(0),
            max_lag,
        }
    }

    /// The replication stream is (not) running.
    pub fn set_streaming(&self, on: bool) {
        self.streaming.store(on, Ordering::Relaxed);
    }

    /// Redis answered (or failed) the last attempt.
    pub fn set_redis_ok(&self, ok: bool) {
        self.redis_ok.store(ok, Ordering::Relaxed);
    }

    /// The event sink `name` confirmed (or failed) the last attempt.
    pub fn set_sink_ok(&self, name: &'static str, ok: bool) {
        let mut down = self.sinks_down.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            down.remove(name);
        } else {
            down.insert(name);
        }
    }

    /// The oldest unacknowledged commit, or `None` when nothing waits.
    pub fn set_oldest_pending(&self, at: Option<SystemTime>) {
        let micros = at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as i64);
        self.oldest_pending.store(micros, Ordering::Relaxed);
    }

    /// `Ok` when ready, else the reasons.
    pub fn ready(&self) -> Result<(), String> {
        let mut why = Vec::new();
        if !self.streaming.load(Ordering::Relaxed) {
            why.push("replication is not streaming".to_owned());
        }
        if !self.redis_ok.load(Ordering::Relaxed) {
            why.push("redis is not reachable".to_owned());
        }
        for name in self
            .sinks_down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            why.push(format!("the {name} event sink is not confirming"));
        }
        let oldest = self.oldest_pending.load(Ordering::Relaxed);
        if oldest > 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64);
            let age = Duration::from_micros((now - oldest).max(0) as u64);
            if age > self.max_lag {
                why.push(format!(
                    "a committed change has waited {:.1} s for redis (limit {} s)",
                    age.as_secs_f64(),
                    self.max_lag.as_secs()
                ));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.encode(),
                ),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                "/readyz" => match health.ready() {
                    Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
                    Err(why) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("not ready: {why}\n"),
                    ),
                },
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics, /healthz or /readyz\n".to_owned(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
