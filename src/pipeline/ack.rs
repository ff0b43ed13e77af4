//! The ack rule: the one WAL position that may be confirmed to PostgreSQL.
//!
//! Pure bookkeeping, told what happens on the data path and asked for the position:
//!
//! - a batch is handed to the sink, covering commits up to some end LSN (0 when it
//!   holds only parts of a transaction still open);
//! - the sink acknowledged batches up to some sequence number (in order);
//! - the server's keepalive reported its WAL end;
//! - the replication connection was opened again.
//!
//! The position never goes backwards, never passes a commit whose batch the sink has
//! not acknowledged, and follows the server's keepalive only while pginval holds
//! nothing (no open transaction, no unsent or unacknowledged batch), so an idle slot
//! keeps no WAL. A transaction streamed before its commit is not held in that sense:
//! PostgreSQL sends it again whole after a reconnect to any position before its
//! commit. Parts of a big transaction never confirm anything: only its COMMIT,
//! in a later batch, carries an end LSN.

use std::collections::VecDeque;

use crate::replication::pgoutput::Lsn;

/// The ack rule's state.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The position last confirmed to the server.
    confirmed: Lsn,
    /// The highest end LSN among acknowledged batches.
    acked_lsn: Lsn,
    /// The server's WAL end from its latest keepalive in this session.
    server_end: Lsn,
    /// Batches handed to the sink so far (the last one's sequence number).
    sent: u64,
    /// Batches the sink acknowledged (in order).
    acked: u64,
    /// Sequence numbers and end LSNs of batches sent and not yet acknowledged.
    unacked: VecDeque<(u64, Lsn)>,
    /// A dry run: nothing is ever confirmed past the start.
    frozen: bool,
}

impl Ack {
    /// The rule at `start` (the slot's confirmed position); `frozen` for a dry run,
    /// which must not move the slot.
    pub fn new(start: Lsn, frozen: bool) -> Ack {
        Ack {
            confirmed: start,
            acked_lsn: start,
            server_end: start,
            sent: 0,
            acked: 0,
            unacked: VecDeque::new(),
            frozen,
        }
    }

    /// A batch went to the sink, covering commits up to `covers` (0: parts only).
    /// Returns its sequence number.
    pub fn sent(&mut self, covers: Lsn) -> u64 {
        self.sent += 1;
        self.unacked.push_back((self.sent, covers));
        self.sent
    }

    /// The sink acknowledged every batch up to sequence number `upto`.
    pub fn acknowledged(&mut self, upto: u64) {
        while let Some(&(seq, covers)) = self.unacked.front() {
            if seq > upto {
                break;
            }
            self.acked_lsn = self.acked_lsn.max(covers);
            self.acked = seq;
            self.unacked.pop_front();
        }
    }

    /// The server's keepalive: its WAL end.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        self.server_end = self.server_end.max(wal_end);
    }

    /// A new replication session: the old session's keepalive no longer speaks for
    /// what this one has received (it replays from the slot's confirmed position).
    pub fn reconnected(&mut self) {
        self.server_end = self.confirmed.max(self.acked_lsn);
    }

    /// Every batch sent is acknowledged.
    pub fn drained(&self) -> bool {
        self.unacked.is_empty()
    }

    /// Batches handed to the sink so far.
    pub fn sent_batches(&self) -> u64 {
        self.sent
    }

    /// The position last confirmed.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// The highest position that may be confirmed now. `holding`: pginval holds work
    /// not yet handed to the sink (an open transaction or an unsent batch).
    pub fn confirmable(&self, holding: bool) -> Lsn {
        if self.frozen {
            return self.confirmed;
        }
        let mut lsn = self.confirmed.max(self.acked_lsn);
        if !holding && self.drained() {
            lsn = lsn.max(self.server_end);
        }
        lsn
    }

    /// Records that [`Ack::confirmable`]`(holding)` is being confirmed; returns it.
    pub fn confirm(&mut self, holding: bool) -> Lsn {
        self.confirmed = self.confirmable(holding);
        self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn idle_slot_follows_the_keepalive_and_a_busy_one_does_not() {
        let mut ack = Ack::new(100, false);
        ack.keepalive(500);
        assert_eq!(ack.confirmable(true), 100, "an open transaction holds it");
        assert_eq!(ack.confirm(false), 500);
        let seq = ack.sent(600);
        ack.keepalive(900);
        assert_eq!(
            ack.confirmable(false),
            500,
            "batch {seq} is not acknowledged"
        );
        ack.acknowledged(seq);
        assert_eq!(ack.confirmable(false), 900);
    }

    #[test]
    fn a_dry_run_never_moves() {
        let mut ack = Ack::new(100, true);
        let seq = ack.sent(300);
        ack.acknowledged(seq);
        ack.keepalive(900);
        assert_eq!(ack.confirm(false), 100);
    }

    #[test]
    fn a_reconnect_forgets_the_old_sessions_keepalive() {
        let mut ack = Ack::new(100, false);
        ack.keepalive(900);
        ack.reconnected();
        assert_eq!(ack.confirmable(false), 100);
        ack.keepalive(950);
        assert_eq!(ack.confirmable(false), 950);
    }

    /// What happens on the data path, in any order a session could produce.
    #[derive(Debug, Clone)]
    enum Step {
        /// BEGIN of a transaction.
        Begin,
        /// A part of the open transaction joins the unsent batch.
        Part,
        /// COMMIT of the open transaction: it joins the unsent batch.
        Commit,
        /// The unsent batch goes to the sink.
        Send,
        /// The sink acknowledges this many more batches.
        Ack(u8),
        /// A keepalive this far past the WAL seen so far.
        Keepalive(u8),
        /// The connection is opened again (the open transaction is dropped).
        Reconnect,
        /// A status update confirms what the rule allows.
        Confirm,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Begin),
            Just(Step::Part),
            Just(Step::Commit),
            Just(Step::Send),
            (1u8..4).prop_map(Step::Ack),
            (0u8..50).prop_map(Step::Keepalive),
            Just(Step::Reconnect),
            Just(Step::Confirm),
        ]
    }

    /// The model: every commit with its end LSN and the batch that carries it.
    #[derive(Default)]
    struct Model {
        /// WAL seen so far (commits get increasing end LSNs).
        wal: Lsn,
        open: bool,
        /// Commits in the unsent batch, and whether it holds anything.
        unsent_commits: Vec<Lsn>,
        unsent: bool,
        /// Commits by batch sequence number: (seq, commit end LSNs).
        sent: Vec<(u64, Vec<Lsn>)>,
        acked: u64,
        /// The server's latest keepalive in this session.
        keepalive: Option<Lsn>,
    }

    impl Model {
        fn holding(&self) -> bool {
            self.open || self.unsent
        }

        /// The first commit not yet acknowledged by the sink, if any.
        fn first_unacked_commit(&self) -> Option<Lsn> {
            self.sent
                .iter()
                .filter(|(seq, _)| *seq > self.acked)
                .flat_map(|(_, c)| c.iter().copied())
                .chain(self.unsent_commits.iter().copied())
                .min()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_confirmed_position_is_never_unsafe(steps in proptest::collection::vec(step(), 1..80)) {
            let start = 1000;
            let mut ack = Ack::new(start, false);
            let mut m = Model { wal: start, ..Model::default() };
            let mut last = start;
            for s in steps {
                match s {
                    Step::Begin if !m.open => {
                        m.open = true;
                        m.wal += 10;
                    }
                    Step::Part if m.open => {
                        m.wal += 10;
                        m.unsent = true;
                    }
                    Step::Commit if m.open => {
                        m.wal += 10;
                        m.open = false;
                        m.unsent = true;
                        m.unsent_commits.push(m.wal);
                    }
                    Step::Send if m.unsent => {
                        let covers = m.unsent_commits.iter().copied().max().unwrap_or(0);
                        let seq = ack.sent(covers);
                        m.sent.push((seq, std::mem::take(&mut m.unsent_commits)));
                        m.unsent = false;
                    }
                    Step::Ack(n) => {
                        let upto = (m.acked + u64::from(n)).min(ack.sent_batches());
                        m.acked = upto;
                        ack.acknowledged(upto);
                    }
                    Step::Keepalive(ahead) => {
                        // The server's WAL end is past everything it sent, possibly
                        // inside a transaction still open (not yet committed).
                        let at = m.wal + Lsn::from(ahead);
                        m.wal = at;
                        m.keepalive = Some(at);
                        ack.keepalive(at);
                    }
                    Step::Reconnect => {
                        // The open transaction is replayed whole by the new session.
                        m.open = false;
                        m.keepalive = None;
                        ack.reconnected();
                    }
                    Step::Confirm => {
                        let before = ack.confirmed();
                        let now = ack.confirm(m.holding());
                        prop_assert!(now >= before, "went backwards: {before} -> {now}");
                        last = now;
                    }
                    _ => {}
                }
                let may = ack.confirmable(m.holding());
                prop_assert!(may >= last, "confirmable {may} below the confirmed {last}");
                // Never past a commit the sink has not acknowledged — parts of an
                // open transaction included, since its commit comes later still.
                if let Some(first) = m.first_unacked_commit() {
                    prop_assert!(may < first, "confirmable {may} passes unacknowledged commit {first}");
                }
                if m.open {
                    // The open transaction's COMMIT is past the WAL seen so far.
                    prop_assert!(may <= m.wal);
                }
                // An idle slot advances to the server's position.
                if !m.holding() && m.first_unacked_commit().is_none() && m.acked == ack.sent_batches() {
                    if let Some(k) = m.keepalive {
                        prop_assert!(may >= k, "idle, yet {may} stays below the keepalive {k}");
                    }
                }
            }
        }
    }
}
