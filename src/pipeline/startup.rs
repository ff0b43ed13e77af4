//! Start-up, apart from streaming: the markers in pginval's state, the managed
//! publication brought to the rules, the slot created or its loss recovered from.

use super::RunError;
use crate::config::{Config, SlotLost};
use crate::replication::catalog;
use crate::replication::conn::ReplicationError;
use crate::replication::pgoutput::Lsn;
use crate::replication::protocol::parse_lsn;
use crate::replication::source::Source;
use crate::rules::invalidation::{Event, FallbackReason, Invalidation, PendingEvent, Work};
use crate::sink::Sink;
use crate::sink::events::Fanout;
use crate::sink::redis::RedisSink;

/// Value of the slot-state marker while the slot is in use.
pub(super) const MARK_ACTIVE: &str = "active";
/// Value of the slot-state marker while a flush after a lost slot is owed.
pub(super) const MARK_FLUSH_PENDING: &str = "flush-pending";

/// Key of pginval's marker in Redis for this database and slot: it tells a lost slot
/// (marker present, slot gone) from a first start, and survives a crash in the middle
/// of the flush that a lost slot requires.
pub(super) fn slot_marker(config: &Config) -> String {
    format!(
        "pginval:slot-state:{}:{}",
        config.source.pg.get_dbname().unwrap_or(""),
        config.source.slot
    )
}

/// Redis key (in pginval's state database) holding the WAL position pginval confirmed
/// last, as a decimal number: every commit before it has been invalidated. A writer
/// that reads `pg_current_wal_insert_lsn()` after its commit waits until this passes
/// it (read-your-writes through the cache).
pub(super) fn applied_key(config: &Config) -> String {
    format!(
        "pginval:applied:{}:{}",
        config.source.pg.get_dbname().unwrap_or(""),
        config.source.slot
    )
}

/// Redis key naming the tables whose rules' fallbacks are owed after a change of the
/// managed publication (set before the change, removed once the fallbacks applied).
pub(super) fn publication_marker(config: &Config) -> String {
    format!(
        "pginval:publication-changed:{}:{}",
        config.source.pg.get_dbname().unwrap_or(""),
        config.source.slot
    )
}

/// Brings a publication pginval manages to the rules' tables, columns and row filters.
/// The backlog before the change is decoded with the old definition, so a table that
/// may now send more (new table, wider columns, changed filter) gets its rules'
/// fallbacks once, after the change; a Redis marker makes that survive a crash.
pub(super) async fn sync_publication(
    control: &tokio_postgres::Client,
    config: &Config,
    snapshot: &catalog::Snapshot,
    sink: &mut RedisSink,
    own: &mut RedisSink,
    desired: &[catalog::PublishedTable],
) -> Result<(), RunError> {
    let source = &config.source;
    let drift =
        crate::publication::publication_drift(control, snapshot, &source.publication, desired)
            .await?;
    if !drift.differs || desired.is_empty() {
        return Ok(());
    }
    let owed = publication_marker(config);
    let tables: Vec<String> = drift
        .widened
        .iter()
        .map(|(s, t)| format!("{s}.{t}"))
        .collect();
    let tables = tables.join("\n");
    if !tables.is_empty() {
        own.set_until_ok(&owed, &tables).await;
    }
    catalog::execute(
        control,
        &crate::publication::set_publication_tables_sql(&source.publication, desired),
    )
    .await?;
    tracing::info!(publication = %source.publication, "updated the managed publication to the rules' tables, columns and row filters");
    if !tables.is_empty() {
        let lsn = slot_position(control, config).await?;
        apply_table_fallbacks(sink, own, config, &tables, &owed, &lsn).await;
    }
    Ok(())
}

/// Creates the slot (with the failover flag when configured). On a standby PostgreSQL
/// waits for the primary to log its running transactions, which an idle primary may
/// not do for minutes: with `standby_primary_url` pginval asks the primary for that
/// every second; without, it says so, with the statement that ends the wait, at once
/// and every 15 s while it lasts.
async fn create_slot(control: &tokio_postgres::Client, source: &Source) -> Result<(), RunError> {
    let slot = source.slot.as_str();
    if !catalog::in_recovery(control).await? {
        return Ok(catalog::create_slot(control, slot, source.failover_slot).await?);
    }
    let create = catalog::create_slot(control, slot, source.failover_slot);
    tokio::pin!(create);
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(15));
    let Some(primary) = &source.standby_primary else {
        loop {
            tokio::select! {
                done = &mut create => return Ok(done?),
                _ = ticks.tick() => tracing::warn!(
                    slot,
                    "creating the slot on a standby: PostgreSQL waits for the primary to log its running transactions; to end the wait now, run on the primary: SELECT pg_log_standby_snapshot(); (or set [source] standby_primary_url)"
                ),
            }
        }
    };
    // The primary is asked to log its running transactions every second until the
    // standby has replayed one and the creation ends.
    let mut on_primary = source.clone();
    on_primary.pg = primary.clone();
    let mut snapshots = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut client = None;
    loop {
        tokio::select! {
            done = &mut create => return Ok(done?),
            _ = snapshots.tick() => {
                if client.as_ref().is_none_or(|c: &tokio_postgres::Client| c.is_closed()) {
                    // Bounded: a primary that drops packets must not hold up the
                    // creation's own end.
                    let connecting = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        catalog::connect(&on_primary),
                    );
                    client = match connecting.await {
                        Ok(Ok(c)) => Some(c),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %catalog::describe_error(&e), "cannot reach [source] standby_primary_url to end the slot creation's wait; retrying");
                            None
                        }
                        Err(_) => {
                            tracing::warn!("[source] standby_primary_url did not answer within 5 s; retrying");
                            None
                        }
                    };
                }
                if let Some(c) = &client
                    && let Err(e) = c.execute("SELECT pg_log_standby_snapshot()", &[]).await
                {
                    tracing::warn!(error = %catalog::describe_error(&e), "SELECT pg_log_standby_snapshot() on [source] standby_primary_url failed; retrying");
                    client = None;
                }
            }
            _ = ticks.tick() => tracing::info!(
                slot,
                "creating the slot on a standby: waiting for it to replay the running transactions pginval has the primary log every second"
            ),
        }
    }
}

/// The slot's confirmed position as text (`0/0` when there is no slot yet).
async fn slot_position(
    control: &tokio_postgres::Client,
    config: &Config,
) -> Result<String, RunError> {
    Ok(catalog::slot(control, &config.source.slot)
        .await?
        .and_then(|s| s.confirmed_flush_lsn)
        .unwrap_or_else(|| "0/0".into()))
}

/// Applies the fallbacks of every rule of `tables` (`schema.table` lines), then
/// removes `marker` from pginval's state.
pub(super) async fn apply_table_fallbacks(
    sink: &mut RedisSink,
    own: &mut RedisSink,
    config: &Config,
    tables: &str,
    marker: &str,
    lsn: &str,
) {
    let tables: Vec<&str> = tables.lines().collect();
    let mut inv = Invalidation::default();
    for rule in &config.rules.rules {
        if tables.contains(&rule.qualified_table().as_str()) {
            inv.add_rule_fallback(
                &rule.effective_fallback(),
                FallbackReason::PublicationChanged,
            );
        }
    }
    tracing::warn!(
        tables = %tables.join(","),
        "the publication now sends these tables' changes differently; changes before that were filtered by the old definition: applying their rules' fallbacks (over-invalidation)"
    );
    sink.apply_until_ok(&inv.work, &[]).await;
    let affected = config
        .rules
        .rules
        .iter()
        .filter(|r| tables.contains(&r.qualified_table().as_str()));
    tell_event_consumers(sink, config, affected, lsn, "publication-changed").await;
    let mut done = Work::default();
    done.keys.insert(marker.to_owned());
    own.apply_until_ok(&done, &[]).await;
}

/// After a fallback at start-up (a lost slot, a changed publication), consumers of
/// entity events are told too: an `overflow` event per entity of `rules` ("refresh
/// everything of it"), to every event destination, before the marker that owes the
/// fallback is cleared (a crash in between repeats them). Their id is
/// `<slot>:<lsn>:<why>-<entity>-<unix micros>`, `lsn` the slot's position.
async fn tell_event_consumers<'a>(
    sink: &RedisSink,
    config: &Config,
    rules: impl Iterator<Item = &'a crate::rules::compile::Rule>,
    lsn: &str,
    why: &str,
) {
    let Some(events_config) = &config.events else {
        return;
    };
    let now = std::time::SystemTime::now();
    let time = humantime::format_rfc3339_micros(now).to_string();
    // Unique per occasion: two fallbacks at the same slot position are two events.
    let nonce = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let slot = &config.source.slot;
    let mut entities = std::collections::BTreeSet::new();
    let events: Vec<Event> = rules
        .filter_map(|r| Some((r.entity.as_deref()?, r)))
        .filter(|(entity, _)| entities.insert(entity.to_owned()))
        .map(|(entity, rule)| {
            PendingEvent::overflow(entity, rule).stamp_as(
                format!("{slot}:{lsn}:{why}-{entity}-{nonce}"),
                lsn,
                &time,
            )
        })
        .collect();
    if events.is_empty() {
        return;
    }
    let (metrics, health) = sink.reporting();
    let redis = match RedisSink::new(
        config.redis_seeds(),
        config.redis_topology(),
        config.redis_ca.as_deref(),
        &config.redis_durability,
        config.tags.clone(),
        Some(events_config.clone()),
        false,
        metrics.clone(),
        health.clone(),
    ) {
        Ok(redis) => redis,
        Err(e) => {
            // The same settings opened `sink`: not expected; say so rather than skip silently.
            tracing::error!(error = %e, "cannot open a sink for the entity events of the fallback");
            return;
        }
    };
    tracing::warn!(
        events = events.len(),
        "telling entity event consumers to refresh everything of the affected entities (overflow events)"
    );
    let mut fanout = Fanout::new(redis, Some(events_config), false, metrics, health);
    fanout.deliver(&Work::default(), &events).await;
}

/// Creates the publication and the slot when they are missing, and recovers from a
/// lost slot; returns the slot's confirmed position (where streaming resumes).
pub(super) async fn prepare(
    control: &tokio_postgres::Client,
    config: &Config,
    snapshot: &catalog::Snapshot,
    sink: &mut RedisSink,
    own: &mut RedisSink,
) -> Result<Lsn, RunError> {
    let source = &config.source;
    if config
        .rules
        .rules
        .iter()
        .any(|r| matches!(r.action, crate::rules::compile::Action::Expire(_)))
    {
        // PEXPIRE ... LT (never extend a TTL) arrived in Redis 7: known before the
        // first change, so a Redis that is down at start is waited for, not skipped.
        let version = sink.major_version_until_ok().await;
        if version < 7 {
            return Err(RunError::Replication(ReplicationError::Unsupported(
                format!(
                    "rules with action = \"expire\" need Redis 7 or newer (PEXPIRE ... LT); this Redis is {version}"
                ),
            )));
        }
    }
    if config.dry_run {
        // A dry run changes nothing: no DDL, no marker; it streams from a temporary
        // slot of its own (see `session`), so the real slot is neither moved nor held.
        if catalog::publication(control, &source.publication)
            .await?
            .is_none()
        {
            return Err(RunError::Replication(ReplicationError::Unsupported(
                format!(
                    "--dry-run needs the publication {} to exist; create it with `pginval setup --apply`",
                    source.publication
                ),
            )));
        }
        return Ok(0);
    }
    let desired = crate::publication::desired_publication(snapshot, config);
    if catalog::publication(control, &source.publication)
        .await?
        .is_none()
    {
        catalog::execute(
            control,
            &crate::publication::create_publication_sql(&source.publication, &desired),
        )
        .await?;
        tracing::info!(
            publication = %source.publication,
            tables = desired.len(),
            column_lists = desired.iter().filter(|t| t.columns.is_some()).count(),
            "created publication"
        );
    } else if catalog::publication_is_managed(control, &source.publication).await? {
        if catalog::in_recovery(control).await? {
            // A standby's catalog is the primary's: the publication changes there.
            tracing::info!(publication = %source.publication, "standby: the managed publication is kept up to date by a pginval on the primary");
        } else {
            sync_publication(control, config, snapshot, sink, own, &desired).await?;
        }
    }
    // Rules reading stored generated columns (PostgreSQL 18+): the managed publication
    // publishes them.
    if catalog::publication_is_managed(control, &source.publication).await?
        && !catalog::in_recovery(control).await?
        && crate::publication::needs_generated_columns(snapshot, config)
        && !catalog::publishes_generated_columns(control, &source.publication).await?
    {
        catalog::execute(
            control,
            &crate::publication::publish_generated_columns_sql(&source.publication),
        )
        .await?;
        tracing::info!(publication = %source.publication, "the managed publication now publishes stored generated columns (rules read them)");
    }
    // A change of the managed publication that a crash interrupted: its fallbacks.
    let owed = publication_marker(config);
    if let Some(tables) = state_get(sink, own, &owed).await {
        let lsn = slot_position(control, config).await?;
        apply_table_fallbacks(sink, own, config, &tables, &owed, &lsn).await;
    }
    let slot = catalog::slot(control, &source.slot).await?;
    {
        let marker_key = slot_marker(config);
        let marker = state_get(sink, own, &marker_key).await;
        let invalidated = slot
            .as_ref()
            .is_some_and(|s| s.wal_status.as_deref() == Some("lost"));
        let dropped = slot.is_none() && marker.is_some();
        let flush_owed = marker.as_deref() == Some(MARK_FLUSH_PENDING);
        if invalidated || dropped || flush_owed {
            recover_lost_slot(control, config, sink, own, slot.is_some()).await?;
        } else {
            if slot.is_none() {
                create_slot(control, source).await?;
                tracing::info!(slot = %source.slot, "created replication slot (pgoutput)");
            }
            if marker.is_none() {
                own.set_until_ok(&marker_key, MARK_ACTIVE).await;
            }
        }
    }
    let slot = catalog::slot(control, &source.slot)
        .await?
        .ok_or(RunError::Replication(ReplicationError::Protocol(
            "the slot vanished right after its creation".into(),
        )))?;
    Ok(slot
        .confirmed_flush_lsn
        .as_deref()
        .and_then(parse_lsn)
        .unwrap_or(0))
}

/// The slot was lost: what happened since its last confirmed position is unknown.
/// With `on_slot_lost = "flush"`: recreate the slot first (so every later change is
/// seen), then apply every rule's fallback, and only then mark the flush done — a
/// crash in between repeats the flush at the next start.
pub(super) async fn recover_lost_slot(
    control: &tokio_postgres::Client,
    config: &Config,
    sink: &mut RedisSink,
    own: &mut RedisSink,
    slot_exists: bool,
) -> Result<(), RunError> {
    let source = &config.source;
    let marker_key = slot_marker(config);
    if source.on_slot_lost == SlotLost::Fail {
        return Err(RunError::SlotLost(source.slot.clone(), marker_key));
    }
    tracing::error!(
        slot = %source.slot,
        "the replication slot was lost: changes since its last confirmed position are unknown; recreating it and applying every rule's fallback (over-invalidation)"
    );
    own.set_until_ok(&marker_key, MARK_FLUSH_PENDING).await;
    let slot = catalog::slot(control, &source.slot).await?;
    if slot_exists
        && slot
            .as_ref()
            .is_some_and(|s| s.wal_status.as_deref() == Some("lost"))
    {
        catalog::drop_slot(control, &source.slot).await?;
    }
    if catalog::slot(control, &source.slot).await?.is_none() {
        create_slot(control, source).await?;
        tracing::info!(slot = %source.slot, "recreated replication slot (pgoutput)");
    }
    let mut inv = Invalidation::default();
    for rule in &config.rules.rules {
        inv.add_rule_fallback(&rule.effective_fallback(), FallbackReason::SlotLost);
    }
    sink.apply_until_ok(&inv.work, &[]).await;
    let lsn = slot_position(control, config).await?;
    tell_event_consumers(sink, config, config.rules.rules.iter(), &lsn, "slot-lost").await;
    own.set_until_ok(&marker_key, MARK_ACTIVE).await;
    tracing::warn!(
        patterns = inv.work.key_patterns.len(),
        tags = inv.work.tags.len() + inv.work.tag_patterns.len(),
        "flush after the lost slot done; streaming from the new slot"
    );
    Ok(())
}

/// Reads one of pginval's markers from its state database. A marker that an older
/// pginval kept in the cache database is moved over first (read there, written to
/// the state, deleted from the cache).
pub(super) async fn state_get(
    sink: &mut RedisSink,
    own: &mut RedisSink,
    key: &str,
) -> Option<String> {
    if let Some(value) = own.get_until_ok(key).await {
        return Some(value);
    }
    let old = sink.get_until_ok(key).await?;
    own.set_until_ok(key, &old).await;
    let mut moved = Work::default();
    moved.keys.insert(key.to_owned());
    sink.apply_until_ok(&moved, &[]).await;
    tracing::info!(
        key,
        "moved pginval's marker from the cache database to its state database"
    );
    Some(old)
}
