//! The sink task: applies the batches the stream hands over, in order, and tells the
//! stream what Redis acknowledged; performs the delayed second deletes.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};

use super::{Applied, Batch};
use crate::metrics::Metrics;
use crate::replication::protocol::{self, format_lsn};
use crate::rules::invalidation::Invalidation;
use crate::sink::redelete::Redelete;
use crate::sink::redis::RedisSink;

/// The sink task: applies batches, publishes what Redis acknowledged (in order), and
/// performs the delayed second deletes.
///
/// Batches that only delete keys or lower TTLs commute, so up to `MAX_IN_FLIGHT` of
/// them go to Redis without waiting for each other's replies (a commit arriving while
/// Redis answers the previous batch is not held back). Any other batch waits until
/// everything before it is acknowledged and then goes alone, so tag flushes, patterns
/// and events keep commit order.
pub(super) async fn apply_batches(
    mut sink: RedisSink,
    mut rx: mpsc::Receiver<Batch>,
    acked: watch::Sender<Applied>,
    metrics: Arc<Metrics>,
) {
    let mut done = Done {
        redelete: Redelete::default(),
        dropped_reported: 0,
        acked,
        metrics,
    };
    let mut flying = FuturesOrdered::new();
    let mut open = true;
    while open || !flying.is_empty() {
        let due = done.redelete.next_due();
        // Second deletes that are due go first, so a steady stream of batches cannot
        // postpone them.
        if due.is_some_and(|d| d <= tokio::time::Instant::now()) {
            done.second_deletes(&mut sink).await;
            continue;
        }
        tokio::select! {
            biased;
            Some(sent) = flying.next(), if !flying.is_empty() => done.sent(&mut sink, sent).await,
            batch = rx.recv(), if open && flying.len() < MAX_IN_FLIGHT => {
                let Some(batch) = batch else {
                    open = false;
                    continue;
                };
                match sink.send_commuting(&batch.inv, &batch.events) {
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
                        sink.apply_until_ok(&batch.inv, &batch.events).await;
                        done.batch(batch);
                    }
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                done.second_deletes(&mut sink).await;
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
}

impl Done {
    /// Metrics, second-delete schedule, and the acknowledgement the flush position
    /// follows. Called in batch order.
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
        if let Some((last, _)) = batch.commit_times.last() {
            metrics.lag_seconds.set((now_pg - last).max(0) as f64 / 1e6);
        }
        let now = tokio::time::Instant::now();
        for (key, ms) in &batch.inv.redelete {
            self.redelete.schedule(now, key, Duration::from_millis(*ms));
        }
        if self.redelete.dropped > self.dropped_reported {
            tracing::warn!(
                dropped = self.redelete.dropped,
                "second-delete schedule full; some second deletes skipped"
            );
            self.dropped_reported = self.redelete.dropped;
        }
        self.acked.send_modify(|a| {
            a.batches += 1;
            a.lsn = a.lsn.max(batch.end_lsn);
        });
    }

    /// A batch sent without waiting has its answer: acknowledged, or retried until
    /// Redis takes it (on a new connection) and then acknowledged. In batch order.
    async fn sent(&mut self, sink: &mut RedisSink, sent: InFlight) {
        if let Err(e) = &sent.result {
            self.metrics.redis_errors.inc();
            if sink.discard_connection(sent.generation) {
                tracing::warn!(error = %e, "redis failed under batches in flight; retrying them");
            }
            sink.apply_until_ok(&sent.batch.inv, &sent.batch.events)
                .await;
        }
        self.batch(sent.batch);
    }

    /// Deletes the keys whose second delete is due.
    async fn second_deletes(&mut self, sink: &mut RedisSink) {
        let keys = self.redelete.take_due(tokio::time::Instant::now());
        let count = keys.len();
        let mut inv = Invalidation::default();
        inv.keys.extend(keys);
        sink.apply_until_ok(&inv, &[]).await;
        self.metrics.second_deletes.inc_by(count as u64);
        tracing::debug!(keys = count, "second delete applied");
    }
}
