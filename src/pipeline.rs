//! Wires the stages: replication stream → pgoutput decoder → relation cache → rules
//! → transaction buffer → Redis sink, and owns the acknowledgement rule.
//!
//! The ack rule: the flush LSN sent to Postgres only moves forward, and only to the
//! end of a commit whose invalidations Redis acknowledged — or, when nothing at all
//! is pending, to the server's keepalive position so an idle slot keeps no WAL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::check::{self, CheckReport};
use crate::config::Config;
use crate::replication::catalog;
use crate::replication::conn::{Backend, ReplicationConnection, ReplicationError};
use crate::replication::event::RowEvent;
use crate::replication::pgoutput::{self, DecodeError, Lsn, Message};
use crate::replication::protocol::{self, FrameError, ServerFrame, format_lsn};
use crate::replication::relation::{RelationCache, Table};
use crate::rules::compile::{BoundPart, BoundRule};
use crate::rules::invalidation::Invalidation;
use crate::sink::redis::{RedisSink, SinkError};

/// Stop reading WAL once this many keys, tags and patterns wait for Redis: Postgres
/// keeps the WAL meanwhile, pginval's memory stays bounded.
const MAX_PENDING: usize = 200_000;
/// Least time between two status updates sent because the flush position moved.
const MIN_STATUS_GAP: Duration = Duration::from_millis(200);
/// How long shutdown waits for Redis to acknowledge the in-flight batches.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);
/// First and longest wait between reconnection attempts.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(10));

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration does not fit the database (`check` problems).
    #[error("the configuration does not fit the database")]
    Check(CheckReport),
    /// The control connection failed.
    #[error("source database: {0}")]
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
}

/// Committed transactions waiting to go to Redis together.
#[derive(Debug)]
struct Batch {
    inv: Invalidation,
    /// End LSN of the last commit in the batch.
    end_lsn: Lsn,
    transactions: u64,
}

/// Runs pginval until `shutdown` completes: checks, prepares the publication and the
/// slot, then streams and invalidates, reconnecting after connection failures.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let control = catalog::connect(&config.source.pg).await?;
    let report = check::check_with(&control, &config).await?;
    if !report.problems.is_empty() {
        return Err(RunError::Check(report));
    }
    prepare(&control, &config).await?;
    drop(control);

    let mut sink = RedisSink::new(&config.redis_url, &config.tag_key)?;
    if let Err(e) = sink.ping().await {
        tracing::warn!(error = %e, "redis is not reachable yet; changes will wait for it");
    }
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
    let (acked_tx, acked_rx) = watch::channel::<Lsn>(0);
    let sink_task = tokio::spawn(apply_batches(sink, batch_rx, acked_tx));

    let mut state = Stream::new(Arc::new(config), batch_tx, acked_rx);
    tokio::pin!(shutdown);
    let mut backoff = RECONNECT_BACKOFF.0;
    let result = loop {
        match state.session(&mut shutdown).await {
            Ok(()) => break Ok(()),
            Err(RunError::Replication(e)) if e.is_retryable() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "replication connection lost; reconnecting");
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
    result
}

/// Creates the publication and the slot when they are missing.
async fn prepare(control: &tokio_postgres::Client, config: &Config) -> Result<(), RunError> {
    let source = &config.source;
    if catalog::publication(control, &source.publication)
        .await?
        .is_none()
    {
        let tables: Vec<_> = config.rules.tables().into_iter().collect();
        catalog::create_publication(control, &source.publication, &tables).await?;
        tracing::info!(publication = %source.publication, tables = tables.len(), "created publication");
    }
    if catalog::slot(control, &source.slot).await?.is_none() {
        catalog::create_slot(control, &source.slot).await?;
        tracing::info!(slot = %source.slot, "created replication slot (pgoutput)");
    }
    Ok(())
}

/// The sink task: applies batches in order and publishes the end LSN of each one
/// Redis acknowledged.
async fn apply_batches(
    mut sink: RedisSink,
    mut rx: mpsc::Receiver<Batch>,
    acked: watch::Sender<Lsn>,
) {
    while let Some(batch) = rx.recv().await {
        sink.apply_until_ok(&batch.inv).await;
        tracing::debug!(
            lsn = %format_lsn(batch.end_lsn),
            transactions = batch.transactions,
            entries = batch.inv.len(),
            "batch applied"
        );
        acked.send_if_modified(|lsn| {
            let moved = batch.end_lsn > *lsn;
            *lsn = (*lsn).max(batch.end_lsn);
            moved
        });
    }
}

/// A table with the rules bound to its columns.
type TableRules = (Arc<Table>, Arc<[BoundRule]>);

/// What woke the streaming loop.
enum Wake {
    Shutdown,
    StatusTimer,
    Acked(bool),
    Sent,
    Read(Result<(), ReplicationError>),
}

/// Streaming state that survives reconnections.
struct Stream {
    config: Arc<Config>,
    batches: mpsc::Sender<Batch>,
    acked: watch::Receiver<Lsn>,
    relations: RelationCache,
    bound: HashMap<u32, Arc<[BoundRule]>>,
    /// The open transaction's invalidations (None between COMMIT and BEGIN).
    tx: Option<Invalidation>,
    /// Committed, not yet handed to the sink.
    pending: Option<Batch>,
    /// End LSN of the last batch handed to the sink.
    sent: Lsn,
    /// The flush position confirmed to Postgres.
    confirmed: Lsn,
    /// The latest keepalive position: safe to confirm once nothing is pending.
    server_end: Lsn,
    conn: Option<ReplicationConnection>,
}

impl Stream {
    fn new(
        config: Arc<Config>,
        batches: mpsc::Sender<Batch>,
        acked: watch::Receiver<Lsn>,
    ) -> Stream {
        Stream {
            config,
            batches,
            acked,
            relations: RelationCache::default(),
            bound: HashMap::new(),
            tx: None,
            pending: None,
            sent: 0,
            confirmed: 0,
            server_end: 0,
            conn: None,
        }
    }

    /// Nothing received is waiting: no open transaction, no batch unsent or unacknowledged.
    fn idle(&self) -> bool {
        self.tx.is_none() && self.pending.is_none() && *self.acked.borrow() >= self.sent
    }

    /// The highest position the ack rule allows now.
    fn confirmable(&self) -> Lsn {
        let acked = *self.acked.borrow();
        let mut lsn = self.confirmed.max(acked);
        if self.idle() {
            lsn = lsn.max(self.server_end);
        }
        lsn
    }

    /// One replication session: connect, stream until shutdown or an error.
    async fn session(
        &mut self,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<(), RunError> {
        let source = &self.config.source;
        let mut conn = ReplicationConnection::connect(&source.pg, "pginval").await?;
        let publication = format!("\"{}\"", source.publication);
        conn.start_logical(
            &source.slot,
            0,
            &[("proto_version", "1"), ("publication_names", &publication)],
        )
        .await?;
        tracing::info!(slot = %source.slot, publication = %source.publication, "streaming");
        // A new session replays from the slot's confirmed position and resends every
        // Relation; a transaction cut off by the reconnect comes again whole.
        self.relations.clear();
        self.bound.clear();
        self.tx = None;
        self.conn = Some(conn);

        let mut status_timer = tokio::time::interval(self.config.source.status_interval);
        status_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        loop {
            // Everything already read is decoded before waiting: batches grow across
            // transactions while the stream has more buffered, and go out when it has not.
            self.drain_buffered().await?;
            let conn = self.conn.as_mut().expect("connected");
            let backlog = self.pending.as_ref().map_or(0, |b| b.inv.len());
            let wake = tokio::select! {
                biased;
                // Shutdown first: nothing else is started once it is asked for.
                _ = &mut *shutdown => Wake::Shutdown,
                // Periodic status keeps the walsender from timing out the connection.
                _ = status_timer.tick() => Wake::StatusTimer,
                // Redis acknowledged a batch: the flush position may move.
                changed = self.acked.changed() => Wake::Acked(changed.is_ok()),
                // Hand the committed batch to the sink as soon as it has room.
                permit = self.batches.reserve(), if self.pending.is_some() => {
                    if let (Ok(permit), Some(batch)) = (permit, self.pending.take()) {
                        self.sent = batch.end_lsn;
                        permit.send(batch);
                    }
                    Wake::Sent
                }
                // More WAL, unless Redis is so far behind that the backlog is full.
                read = conn.fill(), if backlog < MAX_PENDING => Wake::Read(read),
            };
            match wake {
                Wake::Shutdown => return self.drain_on_shutdown().await,
                Wake::StatusTimer => {
                    self.send_status(false).await?;
                    last_status = Instant::now();
                }
                Wake::Acked(true)
                    if self.confirmable() > self.confirmed
                        && last_status.elapsed() >= MIN_STATUS_GAP =>
                {
                    self.send_status(false).await?;
                    last_status = Instant::now();
                }
                Wake::Read(read) => read?,
                Wake::Acked(_) | Wake::Sent => {}
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
                    ServerFrame::XLogData { start, data, .. } => {
                        self.apply_message(start, &data)?
                    }
                    ServerFrame::Keepalive {
                        wal_end,
                        reply_requested,
                        ..
                    } => {
                        tracing::trace!(wal_end = %format_lsn(wal_end), reply_requested, "keepalive");
                        self.server_end = self.server_end.max(wal_end);
                        if reply_requested {
                            self.send_status(false).await?;
                        }
                    }
                },
                Backend::Other(postgres_protocol::message::backend::Message::ErrorResponse(_)) => {
                    return Err(
                        ReplicationError::Protocol("server error during streaming".into()).into(),
                    );
                }
                Backend::Other(postgres_protocol::message::backend::Message::CopyDone) => {
                    return Err(ReplicationError::Io {
                        target: "walsender".into(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "server ended the stream",
                        ),
                    }
                    .into());
                }
                Backend::Other(_) | Backend::CopyBoth => {}
            }
        }
    }

    /// Applies one pgoutput message to the transaction buffer.
    fn apply_message(&mut self, lsn: Lsn, data: &Bytes) -> Result<(), RunError> {
        let msg = pgoutput::decode(data).map_err(|source| RunError::Decode {
            lsn: format_lsn(lsn),
            source,
        })?;
        tracing::trace!(lsn = %format_lsn(lsn), tag = %(data[0] as char), "message");
        match msg {
            Message::Begin(_) => self.tx = Some(Invalidation::default()),
            Message::Commit(commit) => {
                let inv = self.tx.take().unwrap_or_default();
                if inv.fallbacks > 0 {
                    tracing::warn!(
                        lsn = %format_lsn(commit.end_lsn),
                        fallbacks = inv.fallbacks,
                        "exact invalidation impossible for some rows; over-invalidated by pattern"
                    );
                }
                let batch = self.pending.get_or_insert_with(|| Batch {
                    inv: Invalidation::default(),
                    end_lsn: 0,
                    transactions: 0,
                });
                batch.inv.merge(inv);
                batch.end_lsn = commit.end_lsn;
                batch.transactions += 1;
            }
            Message::Relation(rel) => {
                let table = self.relations.update(&rel);
                let bound: Arc<[BoundRule]> = self.config.rules.bind(&table).into();
                for rule in bound.iter() {
                    for t in rule.keys.iter().chain(&rule.tags) {
                        for part in &t.parts {
                            if let BoundPart::Missing(column) = part {
                                tracing::warn!(
                                    table = %table, rule = rule.number, template = t.template.source(), column,
                                    "column missing from the stream; this template will over-invalidate by pattern"
                                );
                            }
                        }
                    }
                }
                self.bound.insert(rel.oid, bound);
            }
            Message::Insert(m) => {
                if let Some((table, rules)) = self.rules_for(m.relation)? {
                    let ev = RowEvent::insert(table, m);
                    self.tx_mut().add_row(&rules, &ev);
                }
            }
            Message::Update(m) => {
                if let Some((table, rules)) = self.rules_for(m.relation)? {
                    let ev = RowEvent::update(table, m);
                    self.tx_mut().add_row(&rules, &ev);
                }
            }
            Message::Delete(m) => {
                if let Some((table, rules)) = self.rules_for(m.relation)? {
                    let ev = RowEvent::delete(table, m);
                    self.tx_mut().add_row(&rules, &ev);
                }
            }
            Message::Truncate(m) => {
                for oid in m.relations {
                    if let Some((table, rules)) = self.rules_for(oid)? {
                        tracing::warn!(table = %table, "TRUNCATE: invalidating every key and tag of its rules by pattern");
                        self.tx_mut().add_truncate(&rules);
                    }
                }
            }
            Message::Origin(_) | Message::Type(_) | Message::Message(_) => {}
        }
        Ok(())
    }

    fn tx_mut(&mut self) -> &mut Invalidation {
        self.tx.get_or_insert_with(Invalidation::default)
    }

    /// The table and its bound rules, or `None` when no rule concerns it.
    fn rules_for(&self, oid: u32) -> Result<Option<TableRules>, RunError> {
        let table = self
            .relations
            .get(oid)
            .ok_or(RunError::UnknownRelation(oid))?;
        let rules = self
            .bound
            .get(&oid)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()));
        Ok((!rules.is_empty()).then(|| (table.clone(), rules)))
    }

    /// Sends a standby status update with the highest position the ack rule allows.
    async fn send_status(&mut self, reply_requested: bool) -> Result<(), RunError> {
        let lsn = self.confirmable();
        if lsn > self.confirmed {
            tracing::trace!(lsn = %format_lsn(lsn), "confirming");
        }
        self.confirmed = lsn;
        if let Some(conn) = self.conn.as_mut() {
            let msg = protocol::standby_status(lsn, protocol::pg_now_micros(), reply_requested);
            conn.send_copy_data(&msg).await?;
        }
        Ok(())
    }

    /// Shutdown: hand over the committed batch, wait (bounded) for Redis to
    /// acknowledge everything, confirm it, and end the stream with CopyDone.
    async fn drain_on_shutdown(&mut self) -> Result<(), RunError> {
        self.tx = None;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        if let Some(batch) = self.pending.take() {
            let end = batch.end_lsn;
            match tokio::time::timeout_at(deadline, self.batches.send(batch)).await {
                Ok(Ok(())) => self.sent = end,
                _ => tracing::warn!(
                    "shutdown: the last batch could not be handed to redis; it will be replayed"
                ),
            }
        }
        let sent = self.sent;
        let drained = tokio::time::timeout_at(deadline, self.acked.wait_for(|a| *a >= sent))
            .await
            .map(|r| r.is_ok());
        if drained != Ok(true) {
            tracing::warn!(
                "shutdown: redis did not acknowledge everything in time; unacknowledged changes will be replayed on restart"
            );
        }
        if self.conn.is_some() {
            self.send_status(false).await?;
        }
        if let Some(conn) = self.conn.take() {
            conn.finish(Duration::from_secs(2)).await?;
        }
        tracing::info!(confirmed = %format_lsn(self.confirmed), "stopped");
        Ok(())
    }
}
