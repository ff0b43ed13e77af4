//! Catalog queries about replication slots: their state, failover flag and retained
//! WAL, creating and dropping them, and ending the walsender that holds one.

use tokio_postgres::Client;

/// A replication slot.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// Output plugin (pgoutput for pginval's).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// Database of a logical slot.
    pub database: Option<String>,
    /// Whether a process is streaming from it.
    pub active: bool,
    /// The position confirmed by its consumer.
    pub confirmed_flush_lsn: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// A replication slot, or `None` when it does not exist.
pub async fn slot(client: &Client, name: &str) -> Result<Option<SlotInfo>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active,
                    confirmed_flush_lsn::text, wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?
        .map(|r| SlotInfo {
            plugin: r.get(0),
            slot_type: r.get(1),
            database: r.get(2),
            active: r.get(3),
            confirmed_flush_lsn: r.get(4),
            wal_status: r.get(5),
        }))
}

/// Whether the slot has the failover flag (PostgreSQL 17+); `None` when it does not
/// exist.
pub async fn slot_failover(
    client: &Client,
    name: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?
        .map(|r| r.get(0)))
}

/// Whether an active physical slot exists: a standby streams through it.
pub async fn has_physical_standby_slot(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_type = 'physical' AND active)",
            &[],
        )
        .await?
        .get(0))
}

/// Bytes of WAL the slot retains on the server (current WAL position minus the
/// slot's restart position), or `None` when the slot does not exist.
pub async fn slot_retained_wal(
    client: &Client,
    slot: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END
                     - restart_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// Drops a replication slot.
pub async fn drop_slot(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .map(drop)
}

/// Creates a logical slot with the pgoutput plugin; with `failover` (PostgreSQL 17+) one
/// that standbys with `sync_replication_slots` keep a copy of.
pub async fn create_slot(
    client: &Client,
    name: &str,
    failover: bool,
) -> Result<(), tokio_postgres::Error> {
    let sql = if failover {
        // (name, plugin, temporary, twophase, failover)
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    client.execute(sql, &[&name]).await.map(drop)
}

/// Ends the walsender `pid` if it still holds slot `name`: a connection pginval gave
/// up as silent keeps its walsender (and so the slot) until the server's own
/// `wal_sender_timeout`. True when it was ended. Needs no privilege beyond being
/// the walsender's role.
pub async fn end_walsender(
    client: &Client,
    name: &str,
    pid: i32,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
              WHERE slot_name = $1 AND active_pid = $2",
            &[&name, &pid],
        )
        .await?
        .is_some_and(|r| r.get::<_, bool>(0)))
}
