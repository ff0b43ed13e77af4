//! The streaming loop: one replication session after another, each message decoded
//! and handed to `changes`, committed batches to the sink task, acknowledgements into
//! the ack rule, status updates to the server, and the shutdown drain. State that
//! survives reconnections lives in [`Stream`].

// The pipeline's wiring: its types, limits and imports.
use super::*;

/// A table with the rules bound to its columns and its primary key's positions.
#[derive(Clone)]
pub(super) struct TableRules {
    pub(super) table: Arc<Table>,
    pub(super) rules: Arc<[BoundRule]>,
    pub(super) id_columns: Arc<[usize]>,
    /// Row change counters for insert, update, delete, truncate (handles resolved once,
    /// so the hot path allocates no labels).
    pub(super) changes: [Counter; 4],
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
pub(super) struct Channels {
    pub(super) batches: mpsc::Sender<Batch>,
    pub(super) acked: watch::Receiver<Applied>,
    pub(super) applied: watch::Sender<Lsn>,
}

/// Streaming state that survives reconnections.
pub(super) struct Stream {
    pub(super) config: Arc<Config>,
    pub(super) primary_keys: HashMap<(String, String), Vec<String>>,
    /// Rule tables that are partitioned: their old rows carry what each partition's
    /// own identity sends, read from the catalog whenever the stream describes them.
    pub(super) partitioned: BTreeSet<(String, String)>,
    /// Rule tables the publication no longer publishes (from the catalog poll).
    pub(super) unpublished: watch::Receiver<Vec<(String, String)>>,
    /// A control connection for those catalog reads, opened when first needed.
    pub(super) control: Option<tokio_postgres::Client>,
    /// The name each table OID had when the stream last described it: a different
    /// name later is a rename, which unbinds the rules of the old name.
    pub(super) names: HashMap<u32, (String, String)>,
    /// Tables (OID, identity) whose weaker identity was already logged.
    pub(super) identity_logged: HashSet<(u32, ReplicaIdentity)>,
    pub(super) batches: mpsc::Sender<Batch>,
    pub(super) acked: watch::Receiver<Applied>,
    /// The newest position the ack rule allowed, for [`publish_applied`] to write to
    /// Redis.
    pub(super) applied: watch::Sender<Lsn>,
    pub(super) relations: RelationCache,
    pub(super) bound: HashMap<u32, TableRules>,
    /// The open transaction's invalidations (None between COMMIT and BEGIN).
    pub(super) tx: Option<Invalidation>,
    /// The open transaction's commit position and time (from BEGIN), for its events.
    pub(super) tx_commit: (Lsn, i64),
    /// Events the open transaction has queued so far: the next one's position.
    pub(super) tx_events: u64,
    /// Transactions streamed before their commit (protocol version 2), held.
    pub(super) streams: streamed::Streams,
    /// Committed batches ready for the sink, ahead of `pending` (a streamed
    /// transaction's parts).
    pub(super) ready: std::collections::VecDeque<streamed::Ready>,
    /// Committed, not yet handed to the sink.
    pub(super) pending: Option<Batch>,
    /// The ack rule: what was handed to the sink, acknowledged, kept alive, and
    /// so the flush position that may be confirmed to Postgres.
    pub(super) ack: Ack,
    /// The server's WAL end as last reported (for the lag metric).
    pub(super) server_wal_end: Lsn,
    pub(super) conn: Option<ReplicationConnection>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) rule_labels: HashMap<usize, RuleLabel>,
    /// Each rule's `schema.table`, by rule number.
    pub(super) rule_tables: HashMap<usize, Arc<str>>,
    /// Sequence number and first commit time of batches handed to the sink.
    pub(super) in_flight: std::collections::VecDeque<(u64, i64)>,
    /// Server clock of the XLogData frame being applied.
    pub(super) frame_time: i64,
    /// The latest transaction came from a backlog (sent long after its commit).
    pub(super) catching_up: bool,
    /// When the latest read off the replication socket completed.
    pub(super) read_at: Instant,
    /// Since when the server has sent nothing while pginval was reading (the
    /// receive timeout counts from here).
    pub(super) heard_at: Instant,
    /// When a keepalive was asked for, if since `heard_at`.
    pub(super) asked_at: Option<Instant>,
}

impl Stream {
    pub(super) fn new(
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
    pub(super) fn holding(&self) -> bool {
        self.tx.is_some() || !self.ready.is_empty() || self.pending.is_some()
    }

    /// Keys, tags, patterns and events committed and not yet handed to the sink.
    pub(super) fn backlog(&self) -> usize {
        self.ready.iter().map(streamed::Ready::len).sum::<usize>()
            + self.pending.as_ref().map_or(0, Batch::len)
    }

    /// The highest position the ack rule allows now (after taking in the sink's
    /// latest acknowledgements).
    pub(super) fn confirmable(&mut self) -> Lsn {
        self.ack.acknowledged(self.acked.borrow().batches);
        self.ack.confirmable(self.holding())
    }

    /// Hands `lsn` (a position the ack rule allows) to [`publish_applied`] when it is
    /// newer than the last one: writers waiting to read their own writes need not wait
    /// for the next status update.
    pub(super) fn publish(&self, lsn: Lsn) {
        self.applied.send_if_modified(|published| {
            let newer = lsn > *published;
            if newer {
                *published = lsn;
            }
            newer
        });
    }

    /// One replication session: connect, stream until shutdown or an error.
    pub(super) async fn session(
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
    pub(super) async fn drain_buffered(&mut self) -> Result<(), RunError> {
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
    pub(super) async fn end_silent_walsender(&mut self, pid: Option<i32>) {
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
    pub(super) fn heard(&mut self, at: Instant) {
        self.heard_at = at;
        self.asked_at = None;
    }

    /// Sends a standby status update with the highest position the ack rule allows.
    pub(super) async fn send_status(&mut self) -> Result<(), RunError> {
        self.send_status_asking(false).await
    }

    /// A standby status update; `reply` asks the server to answer with a keepalive
    /// at once. The send is bounded like the reads: a connection whose socket no
    /// longer drains is dead.
    pub(super) async fn send_status_asking(&mut self, reply: bool) -> Result<(), RunError> {
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
    pub(super) async fn drain_on_shutdown(&mut self) -> Result<(), RunError> {
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
