//! Background jobs beside the stream: the heartbeat, the poll of the slot's retained
//! WAL, Redis' keyspace statistics and the rule tables' publication, and the
//! publication of the confirmed position in Redis.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{POLL_INTERVAL, bounded};
use crate::config::{Config, Source};
use crate::metrics::{Health, Metrics};
use crate::replication::catalog;
use crate::sink::redis::RedisSink;

/// Writes each newly confirmed position to `key` in pginval's state database (the
/// latest one when several came meanwhile; retried while Redis is away). Runs until
/// the stream's end drops the sender.
pub(super) async fn publish_applied(
    mut own: RedisSink,
    key: String,
    mut applied: watch::Receiver<crate::replication::pgoutput::Lsn>,
) {
    while applied.changed().await.is_ok() {
        let lsn = *applied.borrow_and_update();
        own.set_until_ok(&key, &lsn.to_string()).await;
    }
}

/// Every few seconds: the slot's retained WAL, and Redis' keyspace hits and misses
/// (which also tell `/readyz` whether Redis answers while no change flows).
///
/// Also watches that every rule table is still in the publication by name: a table
/// renamed away (or replaced by one outside the publication) would otherwise send
/// nothing, silently.
pub(super) async fn poll_stats(
    config: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    unpublished: watch::Sender<Vec<(String, String)>>,
) {
    let tables: Vec<(String, String)> = config.rules.tables().into_iter().collect();
    let Ok(mut redis) = RedisSink::new(
        config.redis_seeds(),
        config.redis_topology(),
        config.redis_ca.as_deref(),
        &config.redis_durability,
        config.tags.clone(),
        None,
        true,
        metrics.clone(),
        health.clone(),
    ) else {
        return;
    };
    let mut control = None;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tick.tick().await;
        match redis.keyspace_stats().await {
            Ok((hits, misses)) => {
                health.set_redis_ok(true);
                metrics.redis_hits.set(hits as i64);
                metrics.redis_misses.set(misses as i64);
                if hits + misses > 0 {
                    metrics
                        .redis_hit_ratio
                        .set(hits as f64 / (hits + misses) as f64);
                }
            }
            Err(_) => health.set_redis_ok(false),
        }
        // Every catalog step is bounded: a connection that hangs without closing is
        // dropped and the next round opens another.
        if control.is_none() {
            control = bounded(catalog::connect(&config.source)).await.ok();
        }
        if let Some(client) = &control {
            match bounded(catalog::slot_retained_wal(client, &config.source.slot)).await {
                Ok(bytes) => {
                    metrics.retained_wal.set(bytes.unwrap_or(0));
                }
                Err(_) => control = None,
            }
            if let Some(client) = &control
                && !config.dry_run
            {
                match bounded(catalog::unpublished(
                    client,
                    &config.source.publication,
                    &tables,
                ))
                .await
                {
                    Ok(missing) => {
                        unpublished.send_if_modified(|seen| {
                            let changed = *seen != missing;
                            *seen = missing;
                            changed && !seen.is_empty()
                        });
                    }
                    Err(_) => control = None,
                }
            }
        }
    }
}

/// Writes a heartbeat WAL record every `every`, logging failures once per change.
///
/// A failed heartbeat drops its control connection and the next one opens a new one:
/// after a PostgreSQL restart the old connection is dead for good. Each step is
/// bounded, so a connection that hangs without closing is given up too.
pub(super) async fn heartbeat(
    source: Source,
    mut control: Option<tokio_postgres::Client>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let beat = async {
            if control.is_none() {
                control = Some(bounded(catalog::connect(&source)).await?);
            }
            let client = control.as_ref().expect("connected above");
            bounded(catalog::heartbeat(client)).await
        };
        match beat.await {
            Ok(()) if failing => {
                tracing::info!("heartbeat works again");
                failing = false;
            }
            Ok(()) => {}
            Err(error) => {
                control = None;
                if !failing {
                    tracing::warn!(%error, "heartbeat failed; reconnecting for the next one");
                    failing = true;
                }
            }
        }
    }
}
