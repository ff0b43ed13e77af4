//! Physical replicas the application reads from (`[replicas]`): a batch Redis has
//! acknowledged waits here until every replica has replayed its commit, is applied
//! again (a reader there may have filled the cache from the old row after the first
//! delete), and only then counts as acknowledged for the ack rule, so a crash before
//! that sends it again. Owns the waiting batches and the replicas' replay positions;
//! never talks to Redis.
//!
//! A replica that has not replayed a batch within `give_up_after` (down, or that far
//! behind) is given up: logged, counted, and not waited for until it has replayed
//! every batch released meanwhile. So a lost replica delays the slot by
//! `give_up_after` once, not forever.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use super::Batch;
use crate::config::Source;
use crate::replication::catalog;
use crate::replication::pgoutput::Lsn;
use crate::replication::protocol::format_lsn;
use crate::rules::invalidation::Work;

/// Most entries (keys, tags, patterns, events) waiting for the replicas; past it the
/// sink task takes no new batch (the stream then stops reading, PostgreSQL keeps the
/// WAL).
const MAX_WAITING: usize = 200_000;
/// How often the replicas' positions are read while batches wait.
pub(super) const POLL: Duration = Duration::from_millis(10);
/// Bound of one connection attempt or position query.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The batches waiting for the replicas, and the replicas.
pub(super) struct Replicas {
    replicas: Vec<Replica>,
    waiting: VecDeque<Waiting>,
    entries: usize,
    give_up_after: Duration,
}

struct Replica {
    /// `host:port`, for the log.
    name: String,
    source: Source,
    client: Option<Client>,
    /// Its replay position (`Lsn::MAX` when it is not in recovery: a promoted
    /// replica holds everything it will ever have).
    replayed: Lsn,
    /// Given up: not waited for until it has replayed this position.
    given_up: Option<Lsn>,
    /// The log said it is unreachable.
    told_unreachable: bool,
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
}

impl Replicas {
    /// The replicas of `settings` (reached with `source`'s TLS settings); `None` when
    /// there are none.
    pub(super) fn new(settings: &crate::config::ReadReplicas, source: &Source) -> Option<Replicas> {
        if settings.replicas.is_empty() {
            return None;
        }
        let replicas = settings
            .replicas
            .iter()
            .map(|pg| {
                let mut source = source.clone();
                source.pg = pg.clone();
                Replica {
                    name: server_name(pg),
                    source,
                    client: None,
                    replayed: 0,
                    given_up: None,
                    told_unreachable: false,
                }
            })
            .collect();
        Some(Replicas {
            replicas,
            waiting: VecDeque::new(),
            entries: 0,
            give_up_after: settings.give_up_after,
        })
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

    /// Reads each replica's replay position (reconnecting as needed); one that does
    /// not answer keeps its last position.
    pub(super) async fn poll(&mut self) {
        for r in &mut self.replicas {
            match r.position().await {
                Ok(lsn) => {
                    if r.told_unreachable {
                        tracing::info!(replica = %r.name, "read replica answers again");
                        r.told_unreachable = false;
                    }
                    if lsn == Lsn::MAX && r.replayed != Lsn::MAX {
                        tracing::warn!(replica = %r.name, "[replicas]: this server is not in recovery (promoted?); not waiting for it");
                    }
                    if r.observed(lsn) {
                        tracing::info!(replica = %r.name, lsn = %format_lsn(lsn), "read replica caught up; waiting for it again");
                    }
                }
                Err(e) => {
                    r.client = None;
                    if !r.told_unreachable {
                        tracing::warn!(replica = %r.name, error = %e, "read replica unreachable; batches wait for it up to [replicas] give_up_after");
                        r.told_unreachable = true;
                    }
                }
            }
        }
    }

    /// Takes the waiting batches that may go on at `now`, in order: those whose commit
    /// every replica not given up has replayed, or that waited `give_up_after` (giving
    /// up the replicas still behind). A part of a transaction goes with the batch of
    /// its commit.
    pub(super) fn release(&mut self, now: Instant) -> Released {
        let mut out = Released::default();
        while let Some(head) = self.waiting.front() {
            // What the head waits for: its commit's end, or (parts) the next commit's.
            let Some(target) = self
                .waiting
                .iter()
                .map(|w| w.batch.end_lsn)
                .find(|lsn| *lsn > 0)
            else {
                break;
            };
            let behind = |r: &Replica| r.given_up.is_none() && r.replayed < target;
            if self.replicas.iter().any(behind) {
                if now.duration_since(head.since) < self.give_up_after {
                    break;
                }
                for r in self.replicas.iter_mut().filter(|r| behind(r)) {
                    r.given_up = Some(target);
                    out.given_up.push(r.name.clone());
                }
            }
            // Given-up replicas wait for everything released.
            for r in &mut self.replicas {
                if let Some(at) = &mut r.given_up {
                    *at = (*at).max(target);
                }
            }
            let w = self.waiting.pop_front().expect("the head");
            self.entries -= w.batch.len();
            out.batches.push(w.batch);
        }
        out
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

impl Replica {
    /// Its replay position is `lsn`; true when that ends its being given up.
    fn observed(&mut self, lsn: Lsn) -> bool {
        self.replayed = lsn;
        let caught_up = self.given_up.is_some_and(|at| lsn >= at);
        if caught_up {
            self.given_up = None;
        }
        caught_up
    }

    async fn position(&mut self) -> Result<Lsn, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let connecting = tokio::time::timeout(ANSWER_TIMEOUT, catalog::connect(&self.source));
            self.client = Some(
                connecting
                    .await
                    .map_err(|_| format!("no answer within {ANSWER_TIMEOUT:?}"))?
                    .map_err(|e| catalog::describe_error(&e))?,
            );
        }
        let client = self.client.as_ref().expect("connected");
        let query = client.query_one(
            "SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint, pg_is_in_recovery()",
            &[],
        );
        let row = tokio::time::timeout(ANSWER_TIMEOUT, query)
            .await
            .map_err(|_| format!("no answer within {ANSWER_TIMEOUT:?}"))?
            .map_err(|e| catalog::describe_error(&e))?;
        let in_recovery: bool = row.get(1);
        Ok(match (in_recovery, row.get::<_, Option<i64>>(0)) {
            (false, _) => Lsn::MAX,
            (true, lsn) => lsn.unwrap_or(0) as Lsn,
        })
    }
}

/// `host:port` of a connection's first host, for the log.
fn server_name(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: usize) -> Replicas {
        let source = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            "[source]\nurl = \"postgres://u@db/app\"\n\n[[rules]]\ntable = \"t\"\nkeys = [\"k:{id}\"]\n",
            |_| None,
        )
        .unwrap()
        .source;
        let pg: tokio_postgres::Config = "host=replica port=5433".parse().unwrap();
        let settings = crate::config::ReadReplicas {
            replicas: vec![pg; n],
            give_up_after: Duration::from_secs(30),
        };
        Replicas::new(&settings, &source).unwrap()
    }

    fn batch(key: &str, end_lsn: Lsn) -> Batch {
        let mut batch = Batch {
            end_lsn,
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
        let mut r = replicas(2);
        let t0 = Instant::now();
        r.push(batch("a", 100), t0);
        r.push(batch("b", 200), t0);
        assert!(r.release(t0).batches.is_empty());
        r.replicas[0].replayed = 250;
        r.replicas[1].replayed = 150;
        let released = r.release(t0);
        assert_eq!(keys(&released), ["a"]);
        assert!(released.given_up.is_empty());
        // Again without second deletes or events.
        let work = released.work();
        assert!(work.keys.contains("a") && work.redelete.is_empty());
        r.replicas[1].replayed = 200;
        assert_eq!(keys(&r.release(t0)), ["b"]);
        assert!(r.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn parts_wait_for_their_commit_and_go_with_it() {
        let mut r = replicas(1);
        let t0 = Instant::now();
        r.replicas[0].replayed = 1_000;
        r.push(batch("part", 0), t0);
        assert!(
            r.release(t0).batches.is_empty(),
            "its commit is not known yet"
        );
        r.push(batch("commit", 500), t0);
        assert_eq!(keys(&r.release(t0)), ["part", "commit"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_behind_is_given_up_after_the_wait_then_waited_for_once_caught_up() {
        let mut r = replicas(2);
        let t0 = Instant::now();
        r.replicas[0].replayed = 1_000;
        r.push(batch("a", 100), t0);
        let later = t0 + Duration::from_secs(29);
        r.push(batch("b", 200), later);
        assert!(r.release(later).batches.is_empty());
        let expired = t0 + Duration::from_secs(30);
        let released = r.release(expired);
        // Given up at "a": "b" no longer waits for it.
        assert_eq!(keys(&released), ["a", "b"]);
        assert_eq!(released.given_up.len(), 1);
        assert_eq!(r.replicas[1].given_up, Some(200));
        // Caught up with what was released: waited for again.
        assert!(!r.replicas[1].observed(150));
        assert!(r.replicas[1].observed(200));
        r.push(batch("c", 300), expired);
        assert!(r.release(expired).batches.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_entries_are_bounded() {
        let mut r = replicas(1);
        let t0 = Instant::now();
        let mut big = batch("x", 100);
        big.work
            .keys
            .extend((0..MAX_WAITING).map(|i| format!("k{i}")));
        r.push(big, t0);
        assert!(r.full());
        r.replicas[0].replayed = 100;
        r.release(t0);
        assert!(!r.full());
    }
}
