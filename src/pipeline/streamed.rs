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

use std::collections::HashSet;

use super::{Batch, Stream, TX_PART_ENTRIES};
use crate::replication::pgoutput::{Lsn, StreamAbort, StreamCommit, StreamStart};
use crate::replication::protocol::format_lsn;
use crate::rules::invalidation::{Event, FallbackReason, Invalidation, PendingEvent, Work};

/// Keys packed one after the other, each as a 4-byte length and its bytes: about 4
/// bytes over the key's own, where a set of strings takes some 90. Held parts of a
/// million-row transaction then take megabytes, not a hundred.
#[derive(Debug, Default)]
pub(super) struct PackedKeys {
    bytes: Vec<u8>,
    count: usize,
}

impl PackedKeys {
    fn pack(keys: HashSet<String>) -> PackedKeys {
        let mut bytes = Vec::with_capacity(keys.iter().map(|k| 4 + k.len()).sum());
        for key in &keys {
            // A key longer than 4 GiB cannot come out of a WAL record.
            bytes.extend((key.len() as u32).to_be_bytes());
            bytes.extend(key.as_bytes());
        }
        PackedKeys {
            bytes,
            count: keys.len(),
        }
    }

    fn len(&self) -> usize {
        self.count
    }

    /// Adds `other`'s keys (duplicates stay: a key deleted twice is deleted).
    fn append(&mut self, mut other: PackedKeys) {
        self.bytes.append(&mut other.bytes);
        self.count += other.count;
    }

    fn unpack(self) -> HashSet<String> {
        let mut keys = HashSet::with_capacity(self.count);
        let mut rest = &self.bytes[..];
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = (u32::from_be_bytes(*len) as usize).min(tail.len());
            let (key, tail) = tail.split_at(len);
            // Packed from strings: always UTF-8.
            keys.insert(String::from_utf8_lossy(key).into_owned());
            rest = tail;
        }
        keys
    }
}

/// A sealed part of a streamed transaction, in change order.
#[derive(Debug)]
pub(super) struct Part {
    /// The (sub)transaction its changes belong to.
    xid: u32,
    /// Its keys to delete.
    keys: PackedKeys,
    /// Its keys to delete with their fence first.
    fenced: PackedKeys,
    /// The rest of its work (its keys moved to `keys`).
    work: Work,
    /// Its entity events.
    events: Vec<PendingEvent>,
}

impl Part {
    fn len(&self) -> usize {
        self.keys.len() + self.fenced.len() + self.work.len() + self.events.len()
    }

    /// The part once its transaction committed at `commit_end`, its events stamped by
    /// `stamp`.
    pub(super) fn into_ready(
        self,
        stamp: impl FnOnce(Vec<PendingEvent>) -> Vec<Event>,
        commit_end: Lsn,
    ) -> Ready {
        Ready::Part {
            keys: self.keys,
            fenced: self.fenced,
            work: self.work,
            events: stamp(self.events),
            replay_lsn: commit_end,
        }
    }
}

/// Committed work waiting for the sink, ahead of `pending`, in commit order.
#[derive(Debug)]
pub(super) enum Ready {
    /// Earlier commits' batch, queued before a streamed transaction's parts.
    Batch(Batch),
    /// A part of a committed streamed transaction, its events stamped.
    Part {
        keys: PackedKeys,
        fenced: PackedKeys,
        work: Work,
        events: Vec<Event>,
        /// Its transaction's commit end, for `[replicas]`.
        replay_lsn: Lsn,
    },
}

impl Ready {
    /// Entries it holds.
    pub(super) fn len(&self) -> usize {
        match self {
            Ready::Batch(batch) => batch.len(),
            Ready::Part {
                keys,
                fenced,
                work,
                events,
                ..
            } => keys.len() + fenced.len() + work.len() + events.len(),
        }
    }

    /// The commit time of its first transaction, for the pending-age metric.
    pub(super) fn first_commit_time(&self) -> Option<i64> {
        match self {
            Ready::Batch(batch) => batch.commit_times.first().map(|(t, _)| *t),
            Ready::Part { .. } => None,
        }
    }

    /// What goes to the sink: a part covers no commit (the ack rule waits for the
    /// batch with its COMMIT, which comes after it).
    pub(super) fn into_batch(self) -> Batch {
        match self {
            Ready::Batch(batch) => batch,
            Ready::Part {
                keys,
                fenced,
                mut work,
                events,
                replay_lsn,
            } => {
                // Parts merged across subtransactions may name a key both plain and
                // fenced: it is fenced, once.
                work.fenced = fenced.unpack();
                work.keys = keys.unpack();
                work.keys.retain(|k| !work.fenced.contains(k));
                Batch {
                    work,
                    events,
                    replay_lsn,
                    ..Batch::default()
                }
            }
        }
    }
}

/// The next batch for the sink, in commit order: a committed streamed transaction's
/// parts (and the batch queued before them) first, then `pending`. A function of the
/// two fields, not of the stream, so the caller may hold a permit of its channel.
pub(super) fn next_batch(
    ready: &mut std::collections::VecDeque<Ready>,
    pending: &mut Option<Batch>,
) -> Option<Batch> {
    ready
        .pop_front()
        .map(Ready::into_batch)
        .or_else(|| pending.take())
}

/// A transaction the server streams before its commit.
#[derive(Debug, Default)]
pub(super) struct Streamed {
    /// Its bookkeeping (rows per rule, fallbacks), and the open part's work.
    pub(super) inv: Invalidation,
    /// The (sub)transaction the open part's changes belong to.
    open_xid: u32,
    /// Sealed parts in change order.
    parts: Vec<Part>,
    /// Entries in `parts`.
    held: usize,
    /// Blocks of it came before pginval saw its first one: what it changed is not
    /// all known, so its commit applies every rule's fallback.
    incomplete: bool,
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
        let (mut work, events) = self.inv.take_work();
        let part = Part {
            xid: self.open_xid,
            keys: PackedKeys::pack(std::mem::take(&mut work.keys)),
            fenced: PackedKeys::pack(std::mem::take(&mut work.fenced)),
            work,
            events,
        };
        self.held += part.len();
        self.parts.push(part);
    }

    /// The changes that follow belong to (sub)transaction `xid`.
    fn switch_to(&mut self, xid: u32) {
        if xid != self.open_xid {
            self.seal();
            self.open_xid = xid;
        }
    }

    /// Its sealed parts for the sink, consecutive ones merged up to about
    /// `TX_PART_ENTRIES` entries each (a subtransaction per row would otherwise make a
    /// batch per row).
    fn into_parts(mut self) -> (Invalidation, Vec<Part>) {
        self.seal();
        let mut merged: Vec<Part> = Vec::new();
        for part in self.parts {
            match merged.last_mut() {
                Some(last) if last.len() + part.len() <= TX_PART_ENTRIES => {
                    last.keys.append(part.keys);
                    last.fenced.append(part.fenced);
                    last.work.merge(part.work);
                    last.events.extend(part.events);
                }
                _ => merged.push(part),
            }
        }
        (self.inv, merged)
    }

    /// Drops every part of subtransaction `subxid`.
    fn abort_subtransaction(&mut self, subxid: u32, rules: &[crate::rules::compile::Rule]) {
        if self.open_xid == subxid {
            drop(self.inv.take_work());
        }
        self.parts.retain(|part| part.xid != subxid);
        self.held = self.parts.iter().map(Part::len).sum();
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

    /// A block of `xid` starts. PostgreSQL sends a transaction's first block first
    /// and only once per session; anything else is named in the returned message, and
    /// never loses a change: a transaction seen in part applies every rule's fallback
    /// at its commit, and a repeated first block keeps what is held.
    fn start(&mut self, xid: u32, first_segment: bool) -> Option<&'static str> {
        self.current = Some(xid);
        let known = self.open.contains_key(&xid);
        let streamed = self.open.entry(xid).or_default();
        streamed.switch_to(xid);
        match (first_segment, known) {
            (false, false) => {
                streamed.incomplete = true;
                Some(
                    "a streamed transaction's first block was not seen: its commit applies every rule's fallback (over-invalidation)",
                )
            }
            (true, true) => Some(
                "a streamed transaction's first block came again: keeping what it already sent",
            ),
            _ => None,
        }
    }
}

impl Stream {
    /// `Stream Start`: the changes that follow, up to `Stream Stop`, belong to `xid`.
    pub(super) fn stream_start(&mut self, start: &StreamStart) {
        if let Some(anomaly) = self.streams.start(start.xid, start.first_segment) {
            tracing::error!(xid = start.xid, "{anomaly}");
        }
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
                xid,
                limit = self.config.max_streamed_entries,
                "transactions streamed before their commit hold more entries than [limits] max_streamed_entries: this one's rules switch to their fallbacks (over-invalidation) for its remaining rows"
            );
            streamed.inv.cap();
        }
    }

    /// `Stream Commit`: the transaction's parts go to the sink in change order, in
    /// batches of bounded size; the last carries its end LSN for the ack rule.
    pub(super) fn stream_commit(&mut self, commit: &StreamCommit) {
        self.streams.current = None;
        // Its events are numbered from its first, as from a BEGIN.
        self.tx_events = 0;
        let streamed = self
            .streams
            .open
            .remove(&commit.xid)
            .unwrap_or_else(|| Streamed {
                // Every streamed transaction of this session began with a Stream Start
                // pginval saw: a commit of another one means its changes are unknown.
                incomplete: true,
                ..Streamed::default()
            });
        let incomplete = streamed.incomplete;
        let (mut inv, parts) = streamed.into_parts();
        if incomplete {
            tracing::error!(
                xid = commit.xid, lsn = %format_lsn(commit.commit.end_lsn),
                "a streamed transaction committed of which pginval did not see every change: applying every rule's fallback (over-invalidation)"
            );
            for rule in &self.config.rules.rules {
                inv.add_rule_fallback(&rule.effective_fallback(), FallbackReason::StreamUnseen);
            }
        }
        tracing::debug!(
            xid = commit.xid,
            parts = parts.len(),
            "streamed transaction committed"
        );
        self.commit(inv, parts, &commit.commit);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_small_parts_merge_into_batch_sized_ones_in_order() {
        let mut s = Streamed::default();
        for i in 0..3000u32 {
            // A subtransaction per row, as a PL/pgSQL loop with an EXCEPTION block makes.
            hint(&mut s, 100 + i, &format!("row:{i}"));
        }
        let (_, parts) = s.into_parts();
        assert_eq!(parts.len(), 1, "3,000 one-key parts fit one batch");
        assert_eq!(parts[0].keys.len(), 3000);
        let mut s = Streamed::default();
        for i in 0..(TX_PART_ENTRIES as u32 + 10) {
            hint(&mut s, 100 + i, &format!("row:{i}"));
        }
        let (_, parts) = s.into_parts();
        let sizes: Vec<usize> = parts.iter().map(Part::len).collect();
        assert_eq!(sizes, [TX_PART_ENTRIES, 10]);
    }

    #[test]
    fn a_transaction_seen_from_a_later_block_is_marked_incomplete_and_a_repeated_first_block_keeps_its_parts()
     {
        let mut streams = Streams::default();
        assert!(streams.start(7, false).is_some());
        assert!(streams.open[&7].incomplete);
        assert!(streams.start(8, true).is_none());
        streams
            .current_mut()
            .unwrap()
            .inv
            .work
            .add_hint(["k".to_owned()], []);
        streams.current_mut().unwrap().seal();
        assert!(streams.start(8, true).is_some());
        assert_eq!(streams.open[&8].len(), 1, "the held part stays");
        assert!(!streams.open[&8].incomplete);
    }

    /// One subtransaction deletes a key plainly, another fences it: merged into one
    /// part, the key goes to the sink fenced, once.
    #[test]
    fn a_key_plain_in_one_subtransaction_and_fenced_in_another_is_fenced_once() {
        let mut s = Streamed::default();
        hint(&mut s, 10, "k");
        s.switch_to(11);
        s.inv.work.fenced.insert("k".to_owned());
        s.inv.work.fenced.insert("f".to_owned());
        let (_, parts) = s.into_parts();
        assert_eq!(parts.len(), 1);
        let Batch { work, .. } = parts
            .into_iter()
            .next()
            .unwrap()
            .into_ready(|_| Vec::new(), 100)
            .into_batch();
        assert!(work.keys.is_empty(), "{work:?}");
        assert_eq!(work.fenced.len(), 2);
        assert_eq!(work.len(), 2);
    }

    #[test]
    fn packed_keys_unpack_to_the_same_set() {
        let keys: HashSet<String> = ["", "a", "user:1", "ключ", "a\0b", &"x".repeat(70_000)]
            .iter()
            .map(|k| k.to_string())
            .collect();
        let packed = PackedKeys::pack(keys.clone());
        assert_eq!(packed.len(), keys.len());
        assert_eq!(packed.unpack(), keys);
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
        let order: Vec<(u32, Vec<String>)> = s
            .parts
            .drain(..)
            .map(|part| {
                let mut keys: Vec<String> = part.keys.unpack().into_iter().collect();
                keys.sort();
                (part.xid, keys)
            })
            .collect();
        let expected = [(10, "top:1"), (10, "top:2"), (12, "other:1")];
        let expected: Vec<(u32, Vec<String>)> = expected
            .iter()
            .map(|(x, k)| (*x, vec![k.to_string()]))
            .collect();
        assert_eq!(order, expected);
    }
}
