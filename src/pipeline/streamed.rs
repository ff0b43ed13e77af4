//! Transactions PostgreSQL streams before they commit (protocol version 2,
//! `streaming = on`): a transaction whose changes outgrow the server's
//! `logical_decoding_work_mem` arrives in blocks (Stream Start … Stop) while it runs,
//! then ends with a Stream Commit or a Stream Abort.
//!
//! Nothing of it may reach Redis before its commit: a key deleted early is filled
//! again from the old row by the next reader. So each streamed transaction's work is
//! held, deduplicated in parts, tagged with the (sub)transaction each part's changes
//! belong to, until its Stream Commit hands the parts on in change order; a Stream
//! Abort drops the transaction, or one subtransaction's parts. The walsender decodes
//! while the transaction runs, so at its commit only the held work is left to send.
//!
//! Memory is bounded by `[limits] max_streamed_entries` over all open streamed
//! transactions: past it, the growing transaction's rules switch to their fallbacks, as
//! past `max_keys_per_transaction` (over-invalidation, counted as `too_many_rows`).

use std::collections::VecDeque;

use super::{Batch, MAX_COMMIT_SAMPLES, Stream, TX_PART_ENTRIES};
use crate::metrics::ReasonLabel;
use crate::replication::pgoutput::{Commit, StreamAbort, StreamCommit, StreamStart};
use crate::replication::protocol::format_lsn;
use crate::rules::invalidation::{FallbackReason, Invalidation, PendingEvent, Work};

/// A transaction the server streams before its commit.
#[derive(Debug, Default)]
pub(super) struct Streamed {
    /// Its bookkeeping (rows per rule, fallbacks), and the open part's work.
    pub(super) inv: Invalidation,
    /// The (sub)transaction the open part's changes belong to.
    open_xid: u32,
    /// Sealed parts in change order: whose changes, their work, their events.
    parts: Vec<(u32, Work, Vec<PendingEvent>)>,
    /// Entries in `parts`.
    held: usize,
}

impl Streamed {
    /// Entries held: sealed parts and the open one.
    fn len(&self) -> usize {
        self.held + self.inv.len()
    }

    /// Ends the open part (its changes are `open_xid`'s).
    fn seal(&mut self) {
        if self.inv.is_empty() {
            return;
        }
        let (work, events) = self.inv.take_work();
        self.held += work.len() + events.len();
        self.parts.push((self.open_xid, work, events));
    }

    /// The changes that follow belong to (sub)transaction `xid`.
    fn switch_to(&mut self, xid: u32) {
        if xid != self.open_xid {
            self.seal();
            self.open_xid = xid;
        }
    }

    /// Drops every part of subtransaction `subxid`.
    fn abort_subtransaction(&mut self, subxid: u32, rules: &[crate::rules::compile::Rule]) {
        if self.open_xid == subxid {
            drop(self.inv.take_work());
        }
        self.parts.retain(|(xid, ..)| *xid != subxid);
        self.held = self.parts.iter().map(|(_, w, e)| w.len() + e.len()).sum();
        self.inv.reapply_overflows(rules);
    }
}

/// Open streamed transactions, and where the stream is.
#[derive(Debug, Default)]
pub(super) struct Streams {
    /// By top-level xid.
    open: std::collections::HashMap<u32, Streamed>,
    /// The top-level xid of the block being read (between Stream Start and Stop).
    pub(super) current: Option<u32>,
}

impl Streams {
    /// Whether any streamed transaction is open: its changes are held, so the
    /// keepalive position cannot be confirmed.
    pub(super) fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// A new replication session resends every open transaction from its start.
    pub(super) fn clear(&mut self) {
        self.open.clear();
        self.current = None;
    }

    /// The transaction of the block being read.
    pub(super) fn current_mut(&mut self) -> Option<&mut Streamed> {
        let xid = self.current?;
        Some(self.open.entry(xid).or_default())
    }

    /// Entries held over all open streamed transactions.
    fn held(&self) -> usize {
        self.open.values().map(Streamed::len).sum()
    }
}

impl Stream {
    /// `Stream Start`: the changes that follow, up to `Stream Stop`, belong to `xid`.
    pub(super) fn stream_start(&mut self, start: &StreamStart) {
        if start.first_segment {
            self.streams.open.insert(start.xid, Streamed::default());
        }
        let streamed = self.streams.open.entry(start.xid).or_default();
        streamed.switch_to(start.xid);
        self.streams.current = Some(start.xid);
    }

    /// A change inside a block belongs to (sub)transaction `xid`.
    pub(super) fn stream_change_of(&mut self, xid: u32) {
        if let Some(streamed) = self.streams.current_mut() {
            streamed.switch_to(xid);
        }
    }

    /// Seals the open part of the block's transaction once it is big, and caps the
    /// transaction once open streamed transactions hold more than the limit.
    pub(super) fn stream_part_if_big(&mut self) {
        let over = self.streams.held() > self.config.max_streamed_entries;
        let xid = self.streams.current.unwrap_or_default();
        let Some(streamed) = self.streams.current_mut() else {
            return;
        };
        if streamed.inv.len() >= TX_PART_ENTRIES {
            streamed.seal();
        }
        if over && !streamed.inv.capped() {
            tracing::warn!(
                xid, limit = self.config.max_streamed_entries,
                "transactions streamed before their commit hold more entries than [limits] max_streamed_entries: this one's rules switch to their fallbacks (over-invalidation) for its remaining rows"
            );
            streamed.inv.cap();
        }
    }

    /// `Stream Commit`: the transaction's parts go to the sink in change order, in
    /// batches of bounded size; the last carries its end LSN for the ack rule.
    pub(super) fn stream_commit(&mut self, commit: &StreamCommit) {
        self.streams.current = None;
        let Some(mut streamed) = self.streams.open.remove(&commit.xid) else {
            // Every streamed transaction of this session began with a Stream Start
            // pginval saw: a commit of another one means its changes are unknown.
            tracing::error!(
                xid = commit.xid, lsn = %format_lsn(commit.commit.end_lsn),
                "a streamed transaction committed whose changes pginval did not see: applying every rule's fallback (over-invalidation)"
            );
            let mut inv = Invalidation::default();
            for rule in &self.config.rules.rules {
                inv.add_rule_fallback(&rule.effective_fallback(), FallbackReason::StreamUnseen);
            }
            self.commit(inv, Vec::new(), &commit.commit);
            return;
        };
        streamed.seal();
        tracing::debug!(xid = commit.xid, parts = streamed.parts.len(), "streamed transaction committed");
        self.commit(streamed.inv, streamed.parts, &commit.commit);
    }

    /// `Stream Abort`: the transaction, or one subtransaction, never happened.
    pub(super) fn stream_abort(&mut self, abort: &StreamAbort) {
        self.streams.current = None;
        if abort.xid == abort.subxid {
            self.streams.open.remove(&abort.xid);
        } else if let Some(streamed) = self.streams.open.get_mut(&abort.xid) {
            streamed.abort_subtransaction(abort.subxid, &self.config.rules.rules);
        }
    }

    /// A transaction commits: its metrics and fallback warning, then its work (the
    /// sealed `parts`, then what `inv` still holds) is queued with its events stamped.
    pub(super) fn commit(
        &mut self,
        mut inv: Invalidation,
        parts: Vec<(u32, Work, Vec<PendingEvent>)>,
        commit: &Commit,
    ) {
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
            self.tx_events = 0;
        }
        for (_, work, events) in parts {
            self.queue(work, events);
            // A batch per part or so: a million-row transaction is never one set.
            if self.pending.as_ref().is_some_and(|b| b.len() >= TX_PART_ENTRIES) {
                let batch = self.pending.take().expect("pending");
                self.ready.push_back(batch);
            }
        }
        self.queue(inv.work, inv.events);
        let batch = self.pending.get_or_insert_with(Batch::default);
        batch.end_lsn = batch.end_lsn.max(commit.end_lsn);
        batch.transactions += 1;
        if batch.commit_times.len() < MAX_COMMIT_SAMPLES {
            batch.commit_times.push((commit.commit_time, self.read_at));
        }
    }
}

/// Batches committed and ready for the sink, in order, ahead of `pending`.
pub(super) type Ready = VecDeque<Batch>;

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(work: &Work) -> Vec<&str> {
        let mut v: Vec<&str> = work.keys.iter().map(String::as_str).collect();
        v.sort();
        v
    }

    fn hint(streamed: &mut Streamed, xid: u32, key: &str) {
        streamed.switch_to(xid);
        streamed.inv.work.add_hint([key.to_owned()], []);
    }

    #[test]
    fn parts_follow_the_change_order_and_a_subtransaction_abort_drops_only_its_own() {
        let mut s = Streamed::default();
        hint(&mut s, 10, "top:1");
        hint(&mut s, 11, "sub:1");
        hint(&mut s, 10, "top:2");
        hint(&mut s, 12, "other:1");
        hint(&mut s, 11, "sub:2");
        s.abort_subtransaction(11, &[]);
        s.seal();
        let order: Vec<(u32, Vec<&str>)> = s.parts.iter().map(|(x, w, _)| (*x, keys(w))).collect();
        assert_eq!(
            order,
            vec![(10, vec!["top:1"]), (10, vec!["top:2"]), (12, vec!["other:1"])]
        );
        assert_eq!(s.len(), 3);
    }
}
