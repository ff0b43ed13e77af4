//! The sink task: applies the batches the stream hands over, in order, and tells the
//! stream what Redis acknowledged; performs the delayed second deletes.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};

use super::replicas::{self, Positions, ReplicaWait};
use super::{Applied, Batch};
use crate::metrics::{Metrics, TableLabel};
use crate::replication::protocol::{self, format_lsn};
use crate::rules::invalidation::Work;
use crate::sink::Sink;
use crate::sink::redelete::Redelete;

/// The sink task: applies batches, publishes what Redis acknowledged (in order), and
/// performs the delayed second deletes.
///
/// Batches that only delete keys or lower TTLs commute, so up to `MAX_IN_FLIGHT` of
/// them go to Redis without waiting for each other's replies (a commit arriving while
/// Redis answers the previous batch is not held back). Any other batch waits until
/// everything before it is acknowledged and then goes alone, so tag flushes, patterns
/// and events keep commit order.
pub(super) async fn apply_batches<S: Sink>(
    mut sink: S,
    mut rx: mpsc::Receiver<Batch>,
    acked: watch::Sender<Applied>,
    metrics: Arc<Metrics>,
    replicas: Option<(ReplicaWait, watch::Receiver<Positions>)>,
) {
    let mut done = Done {
        redelete: Redelete::default(),
        dropped_reported: 0,
        acked,
        metrics,
        replicas,
        next_poll: tokio::time::Instant::now(),
    };
    let mut flying = FuturesOrdered::new();
    let mut open = true;
    while open || !flying.is_empty() || done.waiting_for_replicas() {
        let due = done.redelete.next_due();
        // Second deletes that are due go first, so a steady stream of batches cannot
        // postpone them.
        if due.is_some_and(|d| d <= tokio::time::Instant::now()) {
            done.second_deletes(&mut sink).await;
            continue;
        }
        // So are the batches the read replicas have replayed.
        let poll = done.next_replica_poll();
        if poll.is_some_and(|p| p <= tokio::time::Instant::now()) {
            done.poll_replicas(&mut sink).await;
            continue;
        }
        tokio::select! {
            biased;
            Some(sent) = flying.next(), if !flying.is_empty() => done.sent(&mut sink, sent).await,
            batch = rx.recv(), if open && flying.len() < MAX_IN_FLIGHT && !done.replicas_full() => {
                let Some(batch) = batch else {
                    open = false;
                    continue;
                };
                match sink.send_commuting(&batch.work, &batch.events) {
                    Some((generation, send)) => {
                        // Its own task: the pipeline is written at once, whatever this
                        // loop awaits meanwhile.
                        let sent = tokio::spawn(send).map(move |joined| InFlight {
                            batch,
                            generation,
                            result: joined
                                .map_err(|e| e.to_string())
                                .and_then(|r| r.map_err(|e| e.to_string())),
                        });
                        flying.push_back(sent);
                    }
                    None => {
                        while let Some(sent) = flying.next().await {
                            done.sent(&mut sink, sent).await;
                        }
                        sink.deliver(&batch.work, &batch.events).await;
                        done.batch(batch);
                    }
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                done.second_deletes(&mut sink).await;
            }
            // Batches wait for the read replicas: look again.
            _ = tokio::time::sleep_until(poll.unwrap_or_else(tokio::time::Instant::now)), if poll.is_some() => {
                done.poll_replicas(&mut sink).await;
            }
        }
    }
}

/// Most batches in flight to Redis at once.
pub(super) const MAX_IN_FLIGHT: usize = 4;

/// A batch sent without waiting, with how its sending ended.
pub(super) struct InFlight {
    batch: Batch,
    /// The Redis connection it went on.
    generation: u64,
    result: Result<(), String>,
}

/// What happens once Redis acknowledged a batch.
pub(super) struct Done {
    redelete: Redelete,
    dropped_reported: u64,
    acked: watch::Sender<Applied>,
    metrics: Arc<Metrics>,
    /// The read replicas each batch waits for before it counts (`[replicas]`), and
    /// their positions as the watcher last read them.
    replicas: Option<(ReplicaWait, watch::Receiver<Positions>)>,
    /// When the replicas' positions are looked at next.
    next_poll: tokio::time::Instant,
}

impl Done {
    /// Metrics, second-delete schedule, and the acknowledgement the flush position
    /// follows (after the read replicas, when there are any). Called in batch order.
    fn batch(&mut self, batch: Batch) {
        let metrics = &self.metrics;
        tracing::debug!(
            lsn = %format_lsn(batch.end_lsn),
            transactions = batch.transactions,
            entries = batch.len(),
            "batch applied"
        );
        metrics.batch_entries.observe(batch.len() as f64);
        metrics
            .batch_transactions
            .observe(batch.transactions as f64);
        let now_pg = protocol::pg_now_micros();
        for (t, read_at) in &batch.commit_times {
            metrics
                .commit_to_invalidation
                .observe((now_pg - t).max(0) as f64 / 1e6);
            metrics
                .read_to_invalidation
                .observe(read_at.elapsed().as_secs_f64());
        }
        for (t, table) in &batch.table_commits {
            metrics
                .table_commit_to_invalidation
                .get_or_create(&TableLabel {
                    table: table.to_string(),
                })
                .observe((now_pg - t).max(0) as f64 / 1e6);
        }
        if let Some((last, _)) = batch.commit_times.last() {
            metrics.lag_seconds.set((now_pg - last).max(0) as f64 / 1e6);
        }
        let now = tokio::time::Instant::now();
        for (key, ms) in &batch.work.redelete {
            self.redelete.schedule(now, key, Duration::from_millis(*ms));
        }
        if self.redelete.dropped > self.dropped_reported {
            tracing::warn!(
                dropped = self.redelete.dropped,
                "second-delete schedule full; some second deletes skipped"
            );
            self.dropped_reported = self.redelete.dropped;
        }
        match &mut self.replicas {
            Some((replicas, _)) => replicas.push(batch, now),
            None => self.acknowledge(&batch),
        }
    }

    /// The flush position may pass `batch`.
    fn acknowledge(&self, batch: &Batch) {
        self.acked.send_modify(|a| {
            a.batches += 1;
            a.lsn = a.lsn.max(batch.end_lsn);
        });
    }

    fn waiting_for_replicas(&self) -> bool {
        self.replicas.as_ref().is_some_and(|(r, _)| !r.is_empty())
    }

    /// When the read replicas' positions are looked at next; `None` when no batch waits
    /// and no replica is given up.
    fn next_replica_poll(&self) -> Option<tokio::time::Instant> {
        // While a replica is given up too, so its return is seen (and logged) when
        // nothing waits.
        let watching = self
            .replicas
            .as_ref()
            .is_some_and(|(r, _)| !r.is_empty() || r.given_up() > 0);
        watching.then_some(self.next_poll)
    }

    fn replicas_full(&self) -> bool {
        self.replicas.as_ref().is_some_and(|(r, _)| r.full())
    }

    /// Looks at the read replicas' latest positions; applies again the batches they
    /// all replayed (or that waited too long), then acknowledges them.
    async fn poll_replicas<S: Sink>(&mut self, sink: &mut S) {
        self.next_poll = tokio::time::Instant::now() + replicas::POLL;
        let Some((replicas, positions)) = &mut self.replicas else {
            return;
        };
        let released = replicas.release(&positions.borrow(), tokio::time::Instant::now());
        self.metrics
            .replicas_given_up_now
            .set(replicas.given_up() as i64);
        for name in &released.back {
            tracing::info!(replica = %name, "read replica caught up; waiting for it again");
        }
        for name in &released.given_up {
            self.metrics.replica_given_up.inc();
            tracing::warn!(
                replica = %name,
                "read replica has not replayed a batch within [replicas] give_up_after; not waiting for it until it catches up (its readers may cache stale rows meanwhile)"
            );
        }
        if released.batches.is_empty() {
            return;
        }
        let work = released.work();
        if !work.is_empty() {
            sink.deliver(&work, &[]).await;
        }
        self.metrics
            .replica_redeletes
            .inc_by(released.batches.len() as u64);
        for batch in &released.batches {
            self.acknowledge(batch);
        }
    }

    /// A batch sent without waiting has its answer: acknowledged, or retried until
    /// Redis takes it (on a new connection) and then acknowledged. In batch order.
    async fn sent<S: Sink>(&mut self, sink: &mut S, sent: InFlight) {
        if let Err(e) = &sent.result {
            self.metrics.redis_errors.inc();
            if sink.discard_connection(sent.generation) {
                tracing::warn!(error = %e, "redis failed under batches in flight; retrying them");
            }
            sink.deliver(&sent.batch.work, &sent.batch.events).await;
        }
        self.batch(sent.batch);
    }

    /// Deletes the keys whose second delete is due.
    async fn second_deletes<S: Sink>(&mut self, sink: &mut S) {
        let keys = self.redelete.take_due(tokio::time::Instant::now());
        let count = keys.len();
        let mut inv = Work::default();
        inv.keys.extend(keys);
        sink.deliver(&inv, &[]).await;
        self.metrics.second_deletes.inc_by(count as u64);
        tracing::debug!(keys = count, "second delete applied");
    }
}

#[cfg(test)]
mod tests {
    //! The sink task against an in-memory sink whose commuting sends the test finishes
    //! one by one, in any order: ordering and acknowledgements without timing.

    use std::collections::VecDeque;
    use std::future::Future;
    use std::sync::Mutex;

    use tokio::sync::oneshot;

    use super::*;
    use crate::replication::pgoutput::Lsn;
    use crate::rules::invalidation::{Event, TagAction};

    type Log = Arc<Mutex<Vec<String>>>;

    /// Records what it is asked to do. A commuting send waits for the next gate the
    /// test holds (true: acknowledged, false: failed).
    struct FakeSink {
        log: Log,
        gates: Arc<Mutex<VecDeque<oneshot::Receiver<bool>>>>,
        generation: u64,
    }

    fn name(work: &Work) -> String {
        work.keys.iter().next().cloned().unwrap_or_default()
    }

    impl Sink for FakeSink {
        type Error = String;

        fn send_commuting(
            &self,
            work: &Work,
            events: &[Event],
        ) -> Option<(
            u64,
            impl Future<Output = Result<(), String>> + Send + 'static,
        )> {
            if !events.is_empty() || !work.tags.is_empty() {
                return None;
            }
            let gate = self.gates.lock().unwrap().pop_front()?;
            let (log, name) = (self.log.clone(), name(work));
            log.lock().unwrap().push(format!("send {name}"));
            Some((self.generation, async move {
                let ok = gate.await.unwrap_or(false);
                let what = if ok { "acked" } else { "failed" };
                log.lock().unwrap().push(format!("{what} {name}"));
                if ok { Ok(()) } else { Err("injected".into()) }
            }))
        }

        fn deliver(&mut self, work: &Work, _events: &[Event]) -> impl Future<Output = ()> + Send {
            let (log, name) = (self.log.clone(), name(work));
            async move { log.lock().unwrap().push(format!("deliver {name}")) }
        }

        fn discard_connection(&mut self, generation: u64) -> bool {
            self.log
                .lock()
                .unwrap()
                .push(format!("discard {generation}"));
            self.generation += 1;
            true
        }
    }

    fn batch(key: &str, end_lsn: Lsn, commuting: bool) -> Batch {
        let mut inv = Work::default();
        inv.keys.insert(key.to_owned());
        if !commuting {
            inv.tags.insert("t".into(), TagAction::Delete);
        }
        Batch {
            work: inv,
            end_lsn,
            transactions: 1,
            ..Batch::default()
        }
    }

    struct Harness {
        log: Log,
        tx: mpsc::Sender<Batch>,
        acked: watch::Receiver<Applied>,
        gates: Vec<oneshot::Sender<bool>>,
    }

    /// The sink task with `gates` commuting sends to hold.
    fn start(gates: usize) -> Harness {
        start_with(gates, None)
    }

    /// [`start`], with read replicas.
    fn start_with(
        gates: usize,
        replicas: Option<(ReplicaWait, watch::Receiver<Positions>)>,
    ) -> Harness {
        let log = Log::default();
        let (senders, receivers): (Vec<_>, VecDeque<_>) =
            (0..gates).map(|_| oneshot::channel()).unzip();
        let sink = FakeSink {
            log: log.clone(),
            gates: Arc::new(Mutex::new(receivers)),
            generation: 0,
        };
        let (tx, rx) = mpsc::channel(1);
        let (acked_tx, acked) = watch::channel(Applied::default());
        tokio::spawn(apply_batches(
            sink,
            rx,
            acked_tx,
            Arc::new(Metrics::new()),
            replicas,
        ));
        Harness {
            log,
            tx,
            acked,
            gates: senders,
        }
    }

    /// Lets every task that can run do so (current-thread runtime: nothing else runs
    /// meanwhile), so that what has not happened after it cannot happen without a
    /// further event.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    impl Harness {
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }

        async fn acked_up_to(&mut self, batches: u64) -> Applied {
            *self.acked.wait_for(|a| a.batches >= batches).await.unwrap()
        }
    }

    /// With a read replica: Redis' acknowledgement is not enough; the batch counts once
    /// the replica replayed its commit, after it went to Redis again. A replica that
    /// never answers is given up after `give_up_after`.
    #[tokio::test(start_paused = true)]
    async fn acknowledgements_wait_for_the_read_replicas_then_the_batch_goes_again() {
        let (positions, watched) = watch::channel(vec![None]);
        let wait = ReplicaWait::of(vec!["r".into()], Duration::from_secs(30));
        let mut h = start_with(0, Some((wait, watched)));
        let mut b1 = batch("b1", 10, false);
        b1.replay_lsn = 10;
        h.tx.send(b1).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(h.log(), ["deliver b1"]);
        assert_eq!(
            *h.acked.borrow(),
            Applied::default(),
            "the replica lacks it"
        );
        positions.send(vec![Some(9)]).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(*h.acked.borrow(), Applied::default(), "9 is short of 10");
        positions.send(vec![Some(10)]).unwrap();
        assert_eq!(
            h.acked_up_to(1).await,
            Applied {
                batches: 1,
                lsn: 10
            }
        );
        assert_eq!(h.log(), ["deliver b1", "deliver b1"], "applied again");
        // The replica stops answering: the next batch goes on after 30 s.
        positions.send(vec![None]).unwrap();
        let mut b2 = batch("b2", 20, false);
        b2.replay_lsn = 20;
        h.tx.send(b2).await.unwrap();
        tokio::time::advance(Duration::from_secs(29)).await;
        settle().await;
        assert_eq!(h.acked.borrow().batches, 1);
        assert_eq!(
            h.acked_up_to(2).await,
            Applied {
                batches: 2,
                lsn: 20
            }
        );
    }

    #[tokio::test]
    async fn acknowledgements_follow_batch_order_whatever_order_the_sink_finishes_in() {
        let mut h = start(2);
        h.tx.send(batch("b1", 10, true)).await.unwrap();
        h.tx.send(batch("b2", 20, true)).await.unwrap();
        settle().await;
        assert_eq!(h.log(), ["send b1", "send b2"], "both in flight at once");
        let (first, second) = (h.gates.remove(0), h.gates.remove(0));
        second.send(true).unwrap();
        settle().await;
        assert_eq!(
            *h.acked.borrow(),
            Applied::default(),
            "b2 acknowledged before b1"
        );
        first.send(true).unwrap();
        assert_eq!(
            h.acked_up_to(2).await,
            Applied {
                batches: 2,
                lsn: 20
            }
        );
        assert_eq!(h.log(), ["send b1", "send b2", "acked b2", "acked b1"]);
    }

    #[tokio::test]
    async fn a_batch_that_does_not_commute_waits_for_those_in_flight() {
        let mut h = start(1);
        h.tx.send(batch("b1", 10, true)).await.unwrap();
        h.tx.send(batch("b2", 20, false)).await.unwrap();
        settle().await;
        assert_eq!(h.log(), ["send b1"], "b2 went before b1 was acknowledged");
        h.gates.remove(0).send(true).unwrap();
        assert_eq!(
            h.acked_up_to(2).await,
            Applied {
                batches: 2,
                lsn: 20
            }
        );
        assert_eq!(h.log(), ["send b1", "acked b1", "deliver b2"]);
    }

    #[tokio::test]
    async fn a_failed_batch_in_flight_is_delivered_again_before_it_counts() {
        let mut h = start(1);
        h.tx.send(batch("b1", 10, true)).await.unwrap();
        settle().await;
        h.gates.remove(0).send(false).unwrap();
        assert_eq!(
            h.acked_up_to(1).await,
            Applied {
                batches: 1,
                lsn: 10
            }
        );
        assert_eq!(
            h.log(),
            ["send b1", "failed b1", "discard 0", "deliver b1"],
            "retried on a fresh connection, then acknowledged"
        );
    }
}
