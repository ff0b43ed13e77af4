//! `check` of a standby as the source: what logical decoding there needs (slot,
//! feedback, the primary it streams from), and failover slots.

use tokio_postgres::Client;

use super::CheckReport;
use crate::config::Config;
use crate::diagnostics::Problem;
use crate::replication::catalog;

/// What a standby needs as a source: PostgreSQL 16+ (logical decoding in recovery) and
/// `hot_standby_feedback`, without which the primary removes catalog rows the slot
/// still needs and the standby invalidates the slot (a lost slot: every fallback).
pub(super) async fn check_standby(
    client: &Client,
    config: &Config,
    version: u32,
    report: &mut CheckReport,
) -> Result<(), tokio_postgres::Error> {
    if config.source.heartbeat.is_some() {
        report.problems.push(Problem::new(
            None,
            "[source] heartbeat_secs is set, but a heartbeat writes a WAL message, which a standby cannot: every heartbeat would fail",
            Some("remove heartbeat_secs (or set 0): on a standby the primary's WAL moves the slot".into()),
        ));
    }
    if version < 160000 {
        report.problems.push(Problem::new(
            None,
            format!(
                "this server is a standby (in recovery) running PostgreSQL {}: logical decoding on a standby needs PostgreSQL 16 or newer",
                version / 10000
            ),
            Some("point [source] url at the primary, or upgrade the primary and the standby to 16+".into()),
        ));
        return Ok(());
    }
    report.notes.push(
        "standby: pginval invalidates once this standby replayed each commit (its readers never refill from an older state); the primary needs wal_level = logical, which a standby cannot read: the slot's creation fails with PostgreSQL's message if it is not".into(),
    );
    if catalog::setting(client, "primary_slot_name")
        .await?
        .is_empty()
    {
        report.warnings.push(Problem::new(
            None,
            "this standby streams from the primary without a physical slot (primary_slot_name is empty): hot_standby_feedback protects pginval's slot only while the standby is connected",
            Some("on the primary: SELECT pg_create_physical_replication_slot('<name>'); on the standby: ALTER SYSTEM SET primary_slot_name = '<name>'; SELECT pg_reload_conf();".into()),
        ));
    }
    if catalog::setting(client, "hot_standby_feedback").await? != "on" {
        report.problems.push(Problem::new(
            None,
            "this standby runs with hot_standby_feedback = off: the primary may remove catalog rows pginval's slot still needs, and the standby then invalidates the slot (changes lost until every rule's fallback)",
            Some("on the standby: ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf();".into()),
        ));
    }
    if let Some(primary) = &config.source.standby_primary {
        let standby_id = system_identifier(client).await;
        check_standby_primary(config, primary, standby_id, report).await;
    }
    Ok(())
}

/// The server's cluster identity (`pg_control_system()`), shared by a primary and its
/// physical standbys; `None` when the role may not read it.
pub(super) async fn system_identifier(client: &Client) -> Option<i64> {
    client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .ok()
        .and_then(|row| row.try_get(0).ok())
}

/// `standby_primary_url`: reachable, this standby's cluster (its system identifier), a
/// primary, with `wal_level = logical` (which the standby cannot tell), and a role that
/// may run `pg_log_standby_snapshot()`.
async fn check_standby_primary(
    config: &Config,
    primary: &tokio_postgres::Config,
    standby_id: Option<i64>,
    report: &mut CheckReport,
) {
    let mut source = config.source.clone();
    source.pg = primary.clone();
    let client = match catalog::connect(&source).await {
        Ok(client) => client,
        Err(e) => {
            report.warnings.push(Problem::new(
                None,
                format!("cannot connect to [source] standby_primary_url: {}; creating the slot may then wait for the primary", catalog::describe_error(&e)),
                None,
            ));
            return;
        }
    };
    if let (Some(standby), Some(other)) = (standby_id, system_identifier(&client).await)
        && standby != other
    {
        report.problems.push(Problem::new(
            None,
            format!("[source] standby_primary_url names a server of another cluster (system identifier {other}; this standby's is {standby}): its snapshots would not end the slot creation's wait, and what check reads there says nothing of this standby's primary"),
            Some("point standby_primary_url at the primary this standby replicates (its primary_conninfo)".into()),
        ));
        return;
    }
    let facts = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('wal_level'),
                    has_function_privilege('pg_log_standby_snapshot()', 'EXECUTE')",
            &[],
        )
        .await;
    match facts {
        Ok(row) => {
            let (in_recovery, wal_level, may_snapshot): (bool, String, bool) =
                (row.get(0), row.get(1), row.get(2));
            if in_recovery {
                report.problems.push(Problem::new(
                    None,
                    "[source] standby_primary_url names a server in recovery, not the primary",
                    Some(
                        "point standby_primary_url at the primary the standby streams from".into(),
                    ),
                ));
            } else if wal_level != "logical" {
                report.problems.push(Problem::new(
                    None,
                    format!("the primary runs with wal_level = {wal_level}: a standby can decode only what a primary with wal_level = logical writes"),
                    Some("on the primary: ALTER SYSTEM SET wal_level = logical; then restart it".into()),
                ));
            } else if !may_snapshot {
                report.problems.push(Problem::new(
                    None,
                    "the role of [source] standby_primary_url may not run pg_log_standby_snapshot()",
                    Some("on the primary: GRANT EXECUTE ON FUNCTION pg_log_standby_snapshot() TO <that role>;".into()),
                ));
            } else {
                report.notes.push(
                    "the primary (standby_primary_url) runs with wal_level = logical; pginval ends the slot creation's wait there".into(),
                );
            }
        }
        Err(e) => report.warnings.push(Problem::new(
            None,
            format!(
                "cannot read the primary's settings: {}",
                catalog::describe_error(&e)
            ),
            None,
        )),
    }
}

/// `failover_slot = true`: PostgreSQL 17+, on a primary, a slot that has (or will get)
/// the failover flag, and a standby that could keep a copy of it.
pub(super) async fn check_failover_slot(
    client: &Client,
    config: &Config,
    server_version: u32,
    standby: bool,
    report: &mut CheckReport,
) -> Result<(), tokio_postgres::Error> {
    let slot = &config.source.slot;
    if server_version < 170000 {
        report.problems.push(Problem::new(
            None,
            format!("failover_slot = true needs PostgreSQL 17 or newer (this server is {}); before 17 a failover loses the slot and pginval applies every rule's fallback", server_version / 10000),
            Some("remove failover_slot from [source]".into()),
        ));
        return Ok(());
    }
    if standby {
        report.problems.push(Problem::new(
            None,
            "failover_slot = true on a standby: PostgreSQL creates failover slots only on a primary (a standby source already follows its primary)",
            Some("remove failover_slot from [source], or point url at the primary".into()),
        ));
        return Ok(());
    }
    if catalog::slot_failover(client, slot).await? == Some(false) {
        report.problems.push(Problem::new(
            None,
            format!("slot {slot} exists without the failover flag: a standby keeps no copy of it"),
            Some(format!(
                "psql \"<the [source] url> replication=database\" -c 'ALTER_REPLICATION_SLOT \"{slot}\" (FAILOVER true)'"
            )),
        ));
    }
    if catalog::setting(client, "synchronized_standby_slots")
        .await?
        .is_empty()
    {
        report.warnings.push(Problem::new(
            None,
            "synchronized_standby_slots is empty: pginval may confirm changes the standby has not received yet, and the standby's copy of the slot is then synchronized late (a failover before that costs the lost-slot fallback)",
            Some("on the primary: ALTER SYSTEM SET synchronized_standby_slots = '<the standby's physical slot>'; SELECT pg_reload_conf();".into()),
        ));
    }
    if !catalog::has_physical_standby_slot(client).await? {
        report.warnings.push(Problem::new(
            None,
            "failover_slot = true, but no standby streams through a physical slot here: nothing keeps a copy of pginval's slot",
            Some("on the standby: primary_slot_name set, sync_replication_slots = on, hot_standby_feedback = on, and dbname in primary_conninfo".into()),
        ));
    } else {
        report.notes.push(
            "failover slot: the standby needs sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name and dbname in primary_conninfo (check it there); list both servers in url with target_session_attrs=read-write".into(),
        );
    }
    if config.source.pg.get_hosts().len() < 2 {
        report.warnings.push(Problem::new(
            None,
            "failover_slot = true with one host in url: after a failover pginval keeps trying the old primary",
            Some("list the standby too, like host=a,b target_session_attrs=read-write (or use an address that follows the primary)".into()),
        ));
    }
    Ok(())
}
