//! Physical replicas the application reads from (`[replicas]`): a batch Redis has
//! acknowledged waits here until every replica has replayed its commit, is applied
//! again (a reader there may have filled the cache from the old row after the first
//! delete), and only then counts as acknowledged for the ack rule, so a crash before
//! that sends it again. [`ReplicaWait`] is the bookkeeping (pure, no IO);
//! [`watch_positions`] reads the replicas' replay positions on a task of its own, so a
//! replica that does not answer never holds up the sink task.
//!
//! A replica that has not replayed the oldest waiting batch within `give_up_after`
//! (down, or that far behind) is given up: logged, counted, and not waited for until it
//! has replayed that batch's commit. Batches released meanwhile are not applied again
//! for its readers.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::Batch;
use crate::config::{ReadReplicas, Source};
use crate::replication::catalog;
use crate::replication::pgoutput::Lsn;
use crate::rules::invalidation::Work;

/// Most entries (keys, tags, patterns, events) waiting for the replicas; past it the
/// sink task takes no new batch (the stream then stops reading, PostgreSQL keeps the
/// WAL). The oldest batch still goes on after `give_up_after` at the latest.
const MAX_WAITING: usize = 200_000;
/// How often the replicas' positions are read.
pub(super) const POLL: Duration = Duration::from_millis(10);
/// Bound of one connection attempt or position query.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a replica that did not answer is left alone before the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Each replica's replay position as last read; `None` until read, or while it does
/// not answer. `Lsn::MAX` for a server not in recovery (a promoted replica holds
/// everything it will ever have).
pub(super) type Positions = Vec<Option<Lsn>>;

/// The batches waiting for the replicas, and what is known of the replicas.
pub(super) struct ReplicaWait {
    replicas: Vec<Waited>,
    waiting: VecDeque<Waiting>,
    entries: usize,
    give_up_after: Duration,
}

struct Waited {
    /// `host:port`, for the log.
    name: String,
    replayed: Option<Lsn>,
    /// Given up: not waited for until it has replayed this position.
    given_up: Option<Lsn>,
}

struct Waiting {
    batch: Batch,
    since: Instant,
}

/// What one release found.
#[derive(Debug, Default)]
pub(super) struct Released {
    /// The batches every replica (not given up) replayed, or that waited too long, in
    /// order.
    pub batches: Vec<Batch>,
    /// Replicas given up now, by name.
    pub given_up: Vec<String>,
    /// Replicas waited for again, having caught up, by name.
    pub back: Vec<String>,
}

impl ReplicaWait {
    /// The bookkeeping for `settings`' replicas, and the task that reads their
    /// positions (reached with `source`'s TLS settings) into the channel the sink task
    /// reads; `None` when there are none.
    pub(super) fn new(
        settings: &ReadReplicas,
        source: &Source,
    ) -> Option<(
        ReplicaWait,
        watch::Receiver<Positions>,
        impl Future<Output = ()> + Send + 'static,
    )> {
        if settings.replicas.is_empty() {
            return None;
        }
        let sources: Vec<(String, Source)> = settings
            .replicas
            .iter()
            .map(|pg| {
                let mut source = source.clone();
                source.pg = pg.clone();
                (catalog::server_name(pg), source)
            })
            .collect();
        let wait = ReplicaWait::of(
            sources.iter().map(|(name, _)| name.clone()).collect(),
            settings.give_up_after,
        );
        let (tx, rx) = watch::channel(vec![None; sources.len()]);
        Some((wait, rx, watch_positions(sources, tx)))
    }

    /// The bookkeeping for replicas named `names`.
    pub(super) fn of(names: Vec<String>, give_up_after: Duration) -> ReplicaWait {
        ReplicaWait {
            replicas: names
                .into_iter()
                .map(|name| Waited {
                    name,
                    replayed: None,
                    given_up: None,
                })
                .collect(),
            waiting: VecDeque::new(),
            entries: 0,
            give_up_after,
        }
    }

    /// A batch Redis acknowledged starts waiting for the replicas.
    pub(super) fn push(&mut self, batch: Batch, now: Instant) {
        self.entries += batch.len();
        self.waiting.push_back(Waiting { batch, since: now });
    }

    /// No batch waits.
    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// As many entries wait as may.
    pub(super) fn full(&self) -> bool {
        self.entries >= MAX_WAITING
    }

    /// Takes the waiting batches that may go on at `now`, in order, given the
    /// replicas' `positions`: those every replica not given up has replayed, or (the
    /// oldest) that waited `give_up_after`, giving up the replicas still behind it.
    pub(super) fn release(&mut self, positions: &[Option<Lsn>], now: Instant) -> Released {
        let mut out = Released::default();
        for (r, position) in self.replicas.iter_mut().zip(positions) {
            r.replayed = *position;
            if let (Some(at), Some(lsn)) = (r.given_up, r.replayed)
                && lsn >= at
            {
                r.given_up = None;
                out.back.push(r.name.clone());
            }
        }
        while let Some(head) = self.waiting.front() {
            let target = head.batch.replay_lsn;
            let behind =
                |r: &Waited| r.given_up.is_none() && r.replayed.is_none_or(|lsn| lsn < target);
            if self.replicas.iter().any(behind) {
                if now.duration_since(head.since) < self.give_up_after {
                    break;
                }
                for r in self.replicas.iter_mut().filter(|r| behind(r)) {
                    r.given_up = Some(target);
                    out.given_up.push(r.name.clone());
                }
            }
            let w = self.waiting.pop_front().expect("the head");
            self.entries -= w.batch.len();
            out.batches.push(w.batch);
        }
        out
    }

    /// How many replicas are given up now.
    pub(super) fn given_up(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| r.given_up.is_some())
            .count()
    }
}

impl Released {
    /// What to apply again: the batches' Redis work (no events, no second deletes).
    pub(super) fn work(&self) -> Work {
        let mut all = Work::default();
        for batch in &self.batches {
            let mut work = batch.work.clone();
            work.redelete.clear();
            all.merge(work);
        }
        all
    }
}

/// Reads each replica's replay position every [`POLL`], each on its own (a replica
/// that does not answer delays no other), and publishes it to its place in `tx`; a
/// replica that does not answer is `None` and asked again after [`RETRY_AFTER`].
/// Ends when the receiver is gone.
pub(super) async fn watch_positions(replicas: Vec<(String, Source)>, tx: watch::Sender<Positions>) {
    let readers = replicas.into_iter().enumerate().map(|(i, (name, source))| {
        let tx = tx.clone();
        let mut reader = Reader {
            name,
            source,
            client: None,
            retry_at: Instant::now(),
            told_unreachable: false,
            told_primary: false,
        };
        async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !tx.is_closed() {
                tick.tick().await;
                let position = reader.read().await;
                tx.send_modify(|positions| positions[i] = position);
            }
        }
    });
    join_all(readers).await;
}

/// One replica's connection, for [`watch_positions`].
struct Reader {
    name: String,
    source: Source,
    client: Option<Client>,
    retry_at: Instant,
    told_unreachable: bool,
    told_primary: bool,
}

impl Reader {
    async fn read(&mut self) -> Option<Lsn> {
        if self.client.is_none() && Instant::now() < self.retry_at {
            return None;
        }
        match self.position().await {
            Ok(lsn) => {
                if self.told_unreachable {
                    tracing::info!(replica = %self.name, "read replica answers again");
                    self.told_unreachable = false;
                }
                if lsn == Lsn::MAX && !self.told_primary {
                    tracing::warn!(replica = %self.name, "[replicas]: this server is not in recovery (promoted?); not waiting for it");
                }
                self.told_primary = lsn == Lsn::MAX;
                Some(lsn)
            }
            Err(e) => {
                self.client = None;
                self.retry_at = Instant::now() + RETRY_AFTER;
                if !self.told_unreachable {
                    tracing::warn!(replica = %self.name, error = %e, "read replica unreachable; batches wait for it up to [replicas] give_up_after");
                    self.told_unreachable = true;
                }
                None
            }
        }
    }

    async fn position(&mut self) -> Result<Lsn, String> {
        let timed_out = || format!("no answer within {ANSWER_TIMEOUT:?}");
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let connecting = tokio::time::timeout(ANSWER_TIMEOUT, catalog::connect(&self.source));
            let client = connecting
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| catalog::describe_error(&e))?;
            self.client = Some(client);
        }
        let Some(client) = &self.client else {
            return Err("not connected".into());
        };
        let query = client.query_one(
            "SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint, pg_is_in_recovery()",
            &[],
        );
        let row = tokio::time::timeout(ANSWER_TIMEOUT, query)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| catalog::describe_error(&e))?;
        let in_recovery: bool = row.try_get(1).map_err(|e| e.to_string())?;
        let replayed: Option<i64> = row.try_get(0).map_err(|e| e.to_string())?;
        Ok(match (in_recovery, replayed) {
            (false, _) => Lsn::MAX,
            (true, lsn) => lsn.map_or(0, |l| l.max(0) as Lsn),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(n: usize) -> ReplicaWait {
        ReplicaWait::of(
            (0..n).map(|i| format!("replica{i}")).collect(),
            Duration::from_secs(30),
        )
    }

    fn batch(key: &str, replay_lsn: Lsn) -> Batch {
        let mut batch = Batch {
            end_lsn: replay_lsn,
            replay_lsn,
            ..Batch::default()
        };
        batch.work.keys.insert(key.into());
        batch.work.redelete.insert(key.into(), 50);
        batch
    }

    fn keys(released: &Released) -> Vec<String> {
        released
            .batches
            .iter()
            .flat_map(|b| b.work.keys.iter().cloned())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_on_once_every_replica_replayed_its_commit() {
        let mut w = wait(2);
        let t0 = Instant::now();
        w.push(batch("a", 100), t0);
        w.push(batch("b", 200), t0);
        assert!(w.release(&[None, None], t0).batches.is_empty());
        assert!(w.release(&[Some(250), Some(99)], t0).batches.is_empty());
        let released = w.release(&[Some(250), Some(150)], t0);
        assert_eq!(keys(&released), ["a"]);
        assert!(released.given_up.is_empty());
        // Again without second deletes or events.
        let work = released.work();
        assert!(work.keys.contains("a") && work.redelete.is_empty());
        assert_eq!(keys(&w.release(&[Some(250), Some(200)], t0)), ["b"]);
        assert!(w.is_empty());
    }

    /// A part sent before its commit waits for that commit record (BEGIN's final LSN +
    /// 1), even when the batch it joined also holds an earlier commit.
    #[tokio::test(start_paused = true)]
    async fn a_part_waits_for_its_own_commit_not_an_earlier_one_in_its_batch() {
        let mut w = wait(1);
        let t0 = Instant::now();
        let mut part = batch("part", 501);
        part.end_lsn = 100; // the earlier commit it shares the batch with
        w.push(part, t0);
        assert!(w.release(&[Some(100)], t0).batches.is_empty());
        assert!(w.release(&[Some(500)], t0).batches.is_empty());
        assert_eq!(keys(&w.release(&[Some(501)], t0)), ["part"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_behind_is_given_up_after_the_wait_then_waited_for_once_caught_up() {
        let mut w = wait(2);
        let t0 = Instant::now();
        w.push(batch("a", 100), t0);
        let later = t0 + Duration::from_secs(29);
        w.push(batch("b", 200), later);
        assert!(w.release(&[Some(1_000), None], later).batches.is_empty());
        let expired = t0 + Duration::from_secs(30);
        let released = w.release(&[Some(1_000), None], expired);
        // Given up at "a": "b" no longer waits for it.
        assert_eq!(keys(&released), ["a", "b"]);
        assert_eq!(released.given_up, ["replica1"]);
        assert_eq!(w.given_up(), 1);
        // It replays the commit it was given up at (not every later one): waited for
        // again.
        w.push(batch("c", 300), expired);
        let released = w.release(&[Some(1_000), Some(100)], expired);
        assert_eq!(released.back, ["replica1"]);
        assert!(released.batches.is_empty(), "c waits for it again");
        assert_eq!(w.given_up(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_entries_are_bounded_and_the_oldest_goes_on_after_the_wait() {
        let mut w = wait(1);
        let t0 = Instant::now();
        let mut big = batch("x", 100);
        big.work
            .keys
            .extend((0..MAX_WAITING).map(|i| format!("k{i}")));
        w.push(big, t0);
        assert!(w.full());
        let released = w.release(&[None], t0 + Duration::from_secs(30));
        assert_eq!(released.batches.len(), 1);
        assert!(!w.full());
    }
}
