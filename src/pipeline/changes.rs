//! What each decoded message does to the stream: BEGIN/COMMIT, row changes bound to
//! their rules, Relation messages (renames, partition identities), TRUNCATE, hints and
//! the partition messages of `sql/partitions.sql`.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;

use super::streamed::{Part, Ready};
use super::{
    Batch, CATCH_UP_AGE_MICROS, HINT_PREFIX, MAX_COMMIT_SAMPLES, PARTITION_PREFIX, RunError,
    Stream, TX_PART_ENTRIES, TableRules, bounded,
};
use crate::metrics::{OutcomeLabel, ReasonLabel, TableOp};
use crate::replication::catalog;
use crate::replication::event::RowEvent;
use crate::replication::pgoutput::{self, Commit, LogicalMessage, Lsn, Message};
use crate::replication::protocol::{self, format_lsn};
use crate::replication::relation::{EffectiveIdentity, ReplicaIdentity, Table};
use crate::rules::compile::BoundRule;
use crate::rules::invalidation::{Event, FallbackReason, Invalidation, PendingEvent, Work};

impl Stream {
    /// Applies one pgoutput message to the transaction buffer.
    pub(super) async fn apply_message(&mut self, lsn: Lsn, data: &Bytes) -> Result<(), RunError> {
        let in_stream = self.streams.current.is_some();
        let (xid, msg) =
            pgoutput::decode_in(data, in_stream).map_err(|source| RunError::Decode {
                lsn: format_lsn(lsn),
                source,
            })?;
        if let Some(xid) = xid {
            self.stream_change_of(xid);
        }
        match msg {
            Message::Begin(begin) => {
                self.catching_up = self.frame_time - begin.commit_time > CATCH_UP_AGE_MICROS;
                self.tx = Some(Invalidation::default());
                self.tx_commit = (begin.final_lsn, begin.commit_time);
                self.tx_events = 0;
            }
            Message::Commit(commit) => {
                let inv = self.tx.take().unwrap_or_default();
                self.commit(inv, Vec::new(), &commit);
            }
            Message::StreamStart(start) => {
                // Read as it comes, never paced like a backlog: the walsender then
                // keeps closer to the writer (paced reads left it 140-200 MB of WAL
                // behind at a million-row commit instead of 40-130 MB).
                self.catching_up = false;
                self.stream_start(&start);
            }
            Message::StreamStop => self.streams.current = None,
            Message::StreamCommit(commit) => self.stream_commit(&commit),
            Message::StreamAbort(abort) => self.stream_abort(&abort),
            Message::Relation(rel) => {
                let described = Table::from(&rel);
                let name = (described.schema.clone(), described.name.clone());
                let identity = if self.partitioned.contains(&name) {
                    Some(self.effective_identity(&name).await)
                } else {
                    None
                };
                let table = self.relations.update(&rel, identity.as_ref());
                if let Some(before) = self.names.insert(rel.oid, name.clone())
                    && before != name
                {
                    self.table_renamed(&before, &table);
                }
                let rules: Arc<[BoundRule]> = self.config.rules.bind(&table).into();
                for rule in rules.iter().filter(|r| r.broken) {
                    tracing::warn!(
                        table = %table, rule = rule.rule.number,
                        "a column the rule reads is missing from the table; its templates on that column are applied as wildcards"
                    );
                }
                self.log_weak_identity(&table, &rules);
                let id_columns = self.id_columns(&table).into();
                let counter = |op: &str| {
                    self.metrics
                        .row_changes
                        .get_or_create(&TableOp {
                            table: table.to_string(),
                            op: op.to_owned(),
                        })
                        .clone()
                };
                let changes = [
                    counter("insert"),
                    counter("update"),
                    counter("delete"),
                    counter("truncate"),
                ];
                self.bound.insert(
                    rel.oid,
                    TableRules {
                        table,
                        rules,
                        id_columns,
                        changes,
                    },
                );
            }
            Message::Insert(m) => self.apply_row(m.relation, 0, |t| RowEvent::insert(t, m))?,
            Message::Update(m) => self.apply_row(m.relation, 1, |t| RowEvent::update(t, m))?,
            Message::Delete(m) => self.apply_row(m.relation, 2, |t| RowEvent::delete(t, m))?,
            Message::Truncate(m) => {
                for oid in m.relations {
                    if let Some(t) = self.rules_for(oid)? {
                        t.changes[3].inc();
                        tracing::warn!(table = %t.table, "TRUNCATE: applying the table's rule fallbacks");
                        self.tx_mut().add_truncate(&t.rules);
                    }
                }
            }
            Message::Message(m) if m.prefix == HINT_PREFIX => self.apply_hint(&m),
            Message::Message(m) if m.prefix == PARTITION_PREFIX => self.apply_partition_change(&m),
            Message::Origin(_) | Message::Type(_) | Message::Message(_) => {}
        }
        Ok(())
    }

    /// A transaction commits: its metrics and fallback warning, then its work (the
    /// sealed `parts`, then what `inv` still holds) is queued with its events stamped.
    pub(super) fn commit(&mut self, mut inv: Invalidation, parts: Vec<Part>, commit: &Commit) {
        self.metrics.transactions.inc();
        for (reason, n) in &inv.fallbacks {
            self.metrics
                .fallbacks
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str().to_owned(),
                })
                .inc_by(*n);
        }
        for (rule, (keys, tags)) in inv.rendered.drain() {
            if let Some(label) = self.rule_labels.get(&rule) {
                self.metrics.keys.get_or_create(label).inc_by(keys);
                self.metrics.tags.get_or_create(label).inc_by(tags);
            }
        }
        if !inv.fallbacks.is_empty() {
            let reasons: Vec<String> = inv
                .fallbacks
                .iter()
                .map(|(r, n)| format!("{}={n}", r.as_str()))
                .collect();
            tracing::warn!(
                lsn = %format_lsn(commit.end_lsn),
                fallbacks = %reasons.join(","),
                "exact invalidation impossible; applied the rules' fallbacks (over-invalidation)"
            );
        }
        self.tx_commit = (commit.commit_lsn, commit.commit_time);
        if !parts.is_empty() {
            // Earlier commits go first; each part is a batch of its own, its keys
            // unpacked only as it goes to the sink.
            if let Some(batch) = self.pending.take() {
                self.ready.push_back(Ready::Batch(batch));
            }
            for part in parts {
                let ready = part.into_ready(|events| self.stamp(events), commit.end_lsn);
                self.ready.push_back(ready);
            }
        }
        let fired: Vec<usize> = inv.rules_fired().collect();
        self.queue(inv.work, inv.events);
        let batch = self.pending.get_or_insert_with(Batch::default);
        batch.end_lsn = batch.end_lsn.max(commit.end_lsn);
        batch.replay_lsn = batch.replay_lsn.max(commit.end_lsn);
        batch.transactions += 1;
        if batch.commit_times.len() < MAX_COMMIT_SAMPLES {
            batch.commit_times.push((commit.commit_time, self.read_at));
            let tables: BTreeSet<&Arc<str>> = fired
                .iter()
                .filter_map(|rule| self.rule_tables.get(rule))
                .collect();
            for table in tables {
                batch
                    .table_commits
                    .push((commit.commit_time, table.clone()));
            }
        }
    }

    /// Applies a row change of `relation`; `op` indexes its change counter. The event
    /// is only built when some rule of the table still needs rows.
    pub(super) fn apply_row(
        &mut self,
        relation: u32,
        op: usize,
        event: impl FnOnce(Arc<Table>) -> RowEvent,
    ) -> Result<(), RunError> {
        let Some(t) = self.rules_for(relation)? else {
            return Ok(());
        };
        t.changes[op].inc();
        if self.tx_mut().saturated(&t.rules) {
            return Ok(());
        }
        let ev = event(t.table);
        self.tx_mut().add_row(&t.rules, &ev, &t.id_columns);
        self.queue_part_if_big();
        Ok(())
    }

    /// Adds the open transaction's work to the pending batch, its events stamped with
    /// the transaction's commit. Moves no flush position.
    pub(super) fn queue(&mut self, work: Work, events: Vec<PendingEvent>) {
        let events = self.stamp(events);
        let batch = self.pending.get_or_insert_with(Batch::default);
        batch.work.merge(work);
        batch.events.extend(events);
    }

    /// The open transaction's next events, stamped with its commit and their places.
    pub(super) fn stamp(&mut self, events: Vec<PendingEvent>) -> Vec<Event> {
        if events.is_empty() {
            return Vec::new();
        }
        let (lsn, time) = self.tx_commit;
        let at = format_lsn(lsn);
        let time = humantime::format_rfc3339_micros(protocol::pg_time(time)).to_string();
        let first = self.tx_events;
        self.tx_events += events.len() as u64;
        (first..)
            .zip(&events)
            .map(|(position, e)| e.stamp(&self.config.source.slot, &at, &time, position))
            .collect()
    }

    /// Sends a big open transaction's work on in parts (see `TX_PART_ENTRIES`).
    pub(super) fn queue_part_if_big(&mut self) {
        if self.streams.current.is_some() {
            // Streamed before its commit: held until then.
            return self.stream_part_if_big();
        }
        if let Some(tx) = self.tx.as_mut().filter(|tx| tx.len() >= TX_PART_ENTRIES) {
            let (work, events) = tx.take_work();
            self.queue(work, events);
            // Its commit time, so lag and readiness see a part waiting for Redis.
            let batch = self.pending.get_or_insert_with(Batch::default);
            // Replicas have it once they replayed its commit record (BEGIN's final LSN).
            batch.replay_lsn = batch.replay_lsn.max(self.tx_commit.0.saturating_add(1));
            if batch.commit_times.len() < MAX_COMMIT_SAMPLES {
                batch.commit_times.push((self.tx_commit.1, self.read_at));
            }
        }
    }

    /// A `pg_logical_emit_message(.., 'pginval', '{"keys":[..],"tags":[..]}')` hint:
    /// transactional hints join their transaction; others apply on their own.
    pub(super) fn apply_hint(&mut self, m: &LogicalMessage) {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Hint {
            #[serde(default)]
            keys: Vec<String>,
            #[serde(default)]
            tags: Vec<String>,
        }
        let hint: Hint = match serde_json::from_slice(&m.content) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(
                    lsn = %format_lsn(m.lsn), error = %e,
                    "ignored a pginval hint that is not {{\"keys\": [...], \"tags\": [...]}}"
                );
                return;
            }
        };
        if let Some(why) = self.config.hints.refusal(&hint.keys, &hint.tags) {
            self.metrics
                .hints
                .get_or_create(&OutcomeLabel { outcome: "refused" })
                .inc();
            tracing::warn!(
                lsn = %format_lsn(m.lsn), reason = %why,
                "refused a pginval hint (pg_logical_emit_message): nothing of it is applied"
            );
            return;
        }
        self.metrics
            .hints
            .get_or_create(&OutcomeLabel { outcome: "applied" })
            .inc();
        if m.transactional {
            self.tx_mut().work.add_hint(hint.keys, hint.tags);
            // The same bounds as row changes: a big transaction goes on in parts.
            self.queue_part_if_big();
        } else {
            let batch = self.pending.get_or_insert_with(Batch::default);
            batch.work.add_hint(hint.keys, hint.tags);
            batch.end_lsn = batch.end_lsn.max(m.lsn);
            batch.replay_lsn = batch.replay_lsn.max(m.lsn);
        }
    }

    /// A partition's TRUNCATE, DETACH, ATTACH or DROP, as `sql/partitions.sql` tells it
    /// (`{"root": "schema.table", "op": ...}`): the root's rules apply as for a
    /// TRUNCATE of the root. Anyone who may call `pg_logical_emit_message` can send
    /// one; it can only make pginval apply rule fallbacks (over-invalidation).
    pub(super) fn apply_partition_change(&mut self, m: &LogicalMessage) {
        #[derive(serde::Deserialize)]
        struct Change {
            root: String,
            op: String,
        }
        let change: Change = match serde_json::from_slice(&m.content) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    lsn = %format_lsn(m.lsn), error = %e,
                    "ignored a pginval-partition message that is not {{\"root\": ..., \"op\": ...}}"
                );
                return;
            }
        };
        // Only partitioned rule tables: anyone may write such a message, and it must not
        // flush the fallbacks of a table that has no partitions to speak of.
        if !self
            .partitioned
            .iter()
            .any(|(schema, table)| format!("{schema}.{table}") == change.root)
        {
            tracing::warn!(
                lsn = %format_lsn(m.lsn), table = %change.root,
                "ignored a pginval-partition message for a table that is not a partitioned rule table"
            );
            return;
        }
        let config = self.config.clone();
        let rules: Vec<_> = config
            .rules
            .rules
            .iter()
            .filter(|r| r.qualified_table() == change.root)
            .collect();
        if rules.is_empty() {
            return;
        }
        tracing::warn!(
            table = %change.root, op = %change.op,
            "a partition changed unseen by the stream (sql/partitions.sql told): applying the table's rule fallbacks"
        );
        if m.transactional {
            let tx = self.tx_mut();
            for rule in rules {
                tx.add_partition_change(rule);
            }
        } else {
            // Outside a transaction there is no commit to give events: fallbacks only.
            let batch = self.pending.get_or_insert_with(Batch::default);
            batch.end_lsn = batch.end_lsn.max(m.lsn);
            batch.replay_lsn = batch.replay_lsn.max(m.lsn);
            let mut inv = Invalidation::default();
            for rule in rules {
                inv.add_rule_fallback(&rule.effective_fallback(), FallbackReason::PartitionChanged);
            }
            batch.work.merge(inv.work);
        }
    }

    /// What a partitioned table's partitions send in old rows, from the catalog now.
    /// When the catalog cannot be read, only the primary key counts as sent (the safe
    /// side: other old values are unknown, so their templates apply as wildcards).
    pub(super) async fn effective_identity(
        &mut self,
        name: &(String, String),
    ) -> EffectiveIdentity {
        let key_only = EffectiveIdentity {
            replica_identity: ReplicaIdentity::Default,
            columns: self.primary_keys.get(name).cloned().unwrap_or_default(),
        };
        if self.control.is_none() {
            match bounded(catalog::connect(&self.config.source)).await {
                Ok(client) => self.control = Some(client),
                _ => {
                    tracing::warn!(table = %format!("{}.{}", name.0, name.1), "cannot read the partitions' replica identity from the catalog; treating old rows as carrying only the primary key");
                    return key_only;
                }
            }
        }
        let client = self.control.as_ref().expect("connected");
        match bounded(catalog::table_info(client, &name.0, &name.1)).await {
            Ok(Some(info)) => EffectiveIdentity {
                replica_identity: info.replica_identity,
                columns: info.identity_columns,
            },
            _ => {
                self.control = None;
                tracing::warn!(table = %format!("{}.{}", name.0, name.1), "cannot read the partitions' replica identity from the catalog; treating old rows as carrying only the primary key");
                key_only
            }
        }
    }

    /// A table the rules name was renamed (`ALTER TABLE posts RENAME TO posts_old`):
    /// its changes no longer concern those rules, and whatever took the name may not
    /// be in the publication. The rules' fallbacks cover the switch.
    pub(super) fn table_renamed(&mut self, before: &(String, String), table: &Table) {
        let rules: Vec<_> = self
            .config
            .rules
            .rules
            .iter()
            .filter(|r| r.schema == before.0 && r.table == before.1)
            .map(|r| r.effective_fallback())
            .collect();
        if rules.is_empty() {
            return;
        }
        tracing::error!(
            table = %format!("{}.{}", before.0, before.1), now = %table,
            "a rule table was renamed: applying its rules' fallbacks (over-invalidation); the rules follow the name, not the renamed table"
        );
        // Inside a stream block the Relation message carries the xid of whichever
        // (sub)transaction first changed the table: the rename belongs to the whole
        // transaction, not to a savepoint that may roll back while the new name stays.
        if let Some(top) = self.streams.current {
            self.stream_change_of(top);
        }
        let tx = self.tx_mut();
        for fallback in &rules {
            tx.add_rule_fallback(fallback, FallbackReason::TableRenamed);
        }
    }

    /// Logs, once per table and identity, the templates that can no longer get their
    /// old values (REPLICA IDENTITY changed while running, or a partition's own).
    pub(super) fn log_weak_identity(&mut self, table: &Table, rules: &[BoundRule]) {
        if table.replica_identity == ReplicaIdentity::Full {
            return;
        }
        let blind: BTreeSet<&str> = rules
            .iter()
            .flat_map(|r| r.templates())
            .filter(|t| t.reads_old_outside_identity(table))
            .map(|t| t.template.source())
            .collect();
        if blind.is_empty()
            || !self
                .identity_logged
                .insert((table.oid, table.replica_identity))
        {
            return;
        }
        tracing::warn!(
            table = %table, replica_identity = %table.replica_identity,
            templates = %blind.into_iter().collect::<Vec<_>>().join(", "),
            "the table's old rows no longer carry what these templates read: they are applied as wildcards on UPDATE and DELETE (over-invalidation, counted as value_not_sent) until REPLICA IDENTITY FULL is restored"
        );
    }

    /// Tuple positions of a table's primary key, for entity event ids: from the
    /// catalog (a FULL identity marks every column as key in the stream), else the
    /// stream's key flags.
    pub(super) fn id_columns(&self, table: &Table) -> Vec<usize> {
        let key = (table.schema.clone(), table.name.clone());
        match self.primary_keys.get(&key) {
            Some(pk) if !pk.is_empty() => pk.iter().filter_map(|c| table.column_index(c)).collect(),
            _ if table.replica_identity != ReplicaIdentity::Full => table
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key)
                .map(|(i, _)| i)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Publishes the age of the oldest committed change Redis has not acknowledged.
    pub(super) fn update_health(&mut self) {
        let applied = self.acked.borrow().batches;
        while self
            .in_flight
            .front()
            .is_some_and(|(seq, _)| *seq <= applied)
        {
            self.in_flight.pop_front();
        }
        let oldest = self.in_flight.front().map(|(_, t)| *t).or_else(|| {
            self.ready
                .iter()
                .find_map(Ready::first_commit_time)
                .or_else(|| {
                    self.pending
                        .as_ref()
                        .and_then(|b| b.commit_times.first().map(|(t, _)| *t))
                })
        });
        self.health
            .set_oldest_pending(oldest.map(protocol::pg_time));
    }

    /// The open transaction: the streamed one whose block is being read, else the
    /// one between BEGIN and COMMIT.
    pub(super) fn tx_mut(&mut self) -> &mut Invalidation {
        match self.streams.current_mut() {
            Some(streamed) => &mut streamed.inv,
            None => self.tx.get_or_insert_with(Invalidation::default),
        }
    }

    /// The table and its bound rules, or `None` when no rule concerns it.
    pub(super) fn rules_for(&self, oid: u32) -> Result<Option<TableRules>, RunError> {
        let t = self.bound.get(&oid).ok_or(RunError::UnknownRelation(oid))?;
        Ok((!t.rules.is_empty()).then(|| t.clone()))
    }
}
