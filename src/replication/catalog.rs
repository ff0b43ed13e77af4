//! Catalog queries and DDL on the ordinary control connection (tokio-postgres):
//! server settings, tables and their replica identity, the publication and the slot.
//!
//! Never streams changes; that is `conn`. Every identifier it interpolates is quoted.

use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::source::Source;

use super::relation::ReplicaIdentity;

mod publication;
mod slots;
mod snapshot;

pub use publication::*;
pub use slots::*;
pub use snapshot::Snapshot;

/// A table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table OID.
    pub oid: u32,
    /// Column names (not dropped, not system), in order.
    pub columns: Vec<String>,
    /// REPLICA IDENTITY.
    pub replica_identity: ReplicaIdentity,
    /// The columns Postgres sends in old images: the primary key for DEFAULT, the
    /// index's columns for USING INDEX, all for FULL, none for NOTHING.
    pub identity_columns: Vec<String>,
    /// The primary key's columns (empty when there is none).
    pub primary_key: Vec<String>,
    /// Whether Postgres can publish UPDATE and DELETE for it.
    pub replicates_updates: bool,
    /// A partitioned table (its changes are published under the partitions' names
    /// unless the publication has `publish_via_partition_root`).
    pub partitioned: bool,
    /// The tables whose own REPLICA IDENTITY is not FULL, quoted: the table itself,
    /// and for a partitioned table each partition (their identities decide what old
    /// rows carry; the root's only labels them).
    pub not_full: Vec<String>,
    /// For a partitioned table: whether its partitions' TRUNCATE, DETACH, ATTACH and
    /// DROP reach pginval (`sql/partitions.sql`'s event triggers are enabled and
    /// every partition has its TRUNCATE trigger).
    pub partition_changes_sent: bool,
    /// The partitions without that TRUNCATE trigger, quoted.
    pub untracked_partitions: Vec<String>,
}

impl TableInfo {
    /// `ALTER TABLE ... REPLICA IDENTITY FULL;` for the table and every partition
    /// that needs it, one per line.
    pub fn full_identity_sql(&self) -> String {
        self.not_full
            .iter()
            .map(|t| format!("ALTER TABLE {t} REPLICA IDENTITY FULL;"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Opens the control connection (with the source's TLS settings) and drives it on a
/// background task.
pub async fn connect(source: &Source) -> Result<Client, tokio_postgres::Error> {
    let mut pg = source.pg.clone();
    if pg.get_application_name().is_none() {
        pg.application_name("pginval-control");
    }
    let client = match &source.tls_config {
        None => {
            let (client, connection) = pg.connect(NoTls).await?;
            tokio::spawn(drive(connection));
            client
        }
        Some(config) => {
            let (client, connection) = pg
                .connect(MakeRustlsConnect::new((**config).clone()))
                .await?;
            tokio::spawn(drive(connection));
            client
        }
    };
    Ok(client)
}

async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "control connection closed");
    }
}

/// `host:port` of a connection's first host, for messages.
pub fn server_name(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// A database error with the server's message, detail and hint (the `Display` of
/// `tokio_postgres::Error` alone often says just "db error").
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            // "invalid configuration", "error connecting to server": the cause says why.
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            s
        }
    }
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table`, quoted.
pub fn quote_table(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// The server's `wal_level`.
pub async fn wal_level(client: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await?
        .get(0))
}

/// The generated columns of table `oid`, with their kind: `s` stored, `v` virtual
/// (PostgreSQL 18+).
pub async fn generated_columns(
    client: &Client,
    oid: u32,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT attname::text, attgenerated::text FROM pg_attribute
              WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated <> ''",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A server setting's current value (`current_setting`).
pub async fn setting(client: &Client, name: &str) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?
        .get(0))
}

/// Whether the current role may start replication (REPLICATION or superuser).
pub async fn can_replicate(client: &Client) -> Result<bool, tokio_postgres::Error> {
    // Amazon RDS and Aurora give the right through membership in rds_replication (their
    // roles have neither attribute); the role exists only there. CASE keeps
    // pg_has_role from being asked about a role that does not exist.
    Ok(client
        .query_one(
            "SELECT rolreplication OR rolsuper OR CASE
                 WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_superuser')
                  AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication')
                 THEN pg_has_role(current_user, 'rds_replication', 'MEMBER')
                 ELSE false END
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0))
}

/// A managed PostgreSQL service, told by the administrative role it creates on every
/// server, so that `check` can name its own setting instead of `ALTER SYSTEM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedService {
    /// Amazon RDS for PostgreSQL or Aurora PostgreSQL (`rds_superuser`).
    Rds,
    /// Google Cloud SQL for PostgreSQL (`cloudsqlsuperuser`).
    CloudSql,
    /// Azure Database for PostgreSQL flexible server (`azure_pg_admin`).
    Azure,
    /// Supabase (`supabase_admin`).
    Supabase,
    /// Neon (`neon_superuser`).
    Neon,
}

/// Which managed service this server is, if any.
pub async fn managed_service(
    client: &Client,
) -> Result<Option<ManagedService>, tokio_postgres::Error> {
    let roles: Vec<String> = client
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname IN
               ('rds_superuser', 'cloudsqlsuperuser', 'azure_pg_admin', 'supabase_admin', 'neon_superuser')",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let has = |name: &str| roles.iter().any(|r| r == name);
    Ok(if has("rds_superuser") {
        Some(ManagedService::Rds)
    } else if has("cloudsqlsuperuser") {
        Some(ManagedService::CloudSql)
    } else if has("azure_pg_admin") {
        Some(ManagedService::Azure)
    } else if has("supabase_admin") {
        Some(ManagedService::Supabase)
    } else if has("neon_superuser") {
        Some(ManagedService::Neon)
    } else {
        None
    })
}

/// A table's columns and replica identity, or `None` when it does not exist. For a
/// partitioned table the identity is what every partition sends: the weakest of the
/// root's and the leaf partitions' identities, and the columns all of them send.
pub async fn table_info(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.relkind::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let relkind: String = row.get(1);
    let columns: Vec<String> = client
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let own = identity(client, oid, &columns).await?;
    let partitioned = relkind == "p";
    let mut replica_identity = own.replica_identity;
    let mut identity_columns = own.columns;
    let mut not_full = Vec::new();
    let mut untracked_partitions = Vec::new();
    let mut partition_changes_sent = false;
    if own.replica_identity != ReplicaIdentity::Full {
        not_full.push(quote_table(schema, table));
    }
    if partitioned {
        let leaves = client
            .query(
                "SELECT c.oid, n.nspname::text, c.relname::text,
                        EXISTS (SELECT 1 FROM pg_trigger g
                                 WHERE g.tgrelid = c.oid AND g.tgenabled <> 'D'
                                   AND g.tgname = 'pginval_truncate_' || $1::oid::text)
                   FROM pg_partition_tree($1::oid::regclass) p
                   JOIN pg_class c ON c.oid = p.relid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE p.isleaf AND c.oid <> $1 ORDER BY c.relname",
                &[&oid],
            )
            .await?;
        let event_triggers: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_event_trigger
                  WHERE evtname IN ('pginval_partition_identity', 'pginval_partition_dropped')
                    AND evtenabled <> 'D'",
                &[],
            )
            .await?
            .get(0);
        for leaf in &leaves {
            if !leaf.get::<_, bool>(3) {
                untracked_partitions.push(quote_table(
                    &leaf.get::<_, String>(1),
                    &leaf.get::<_, String>(2),
                ));
            }
        }
        partition_changes_sent = event_triggers == 2 && untracked_partitions.is_empty();
        for leaf in leaves {
            let leaf_oid: u32 = leaf.get(0);
            let leaf_columns: Vec<String> = client
                .query(
                    "SELECT attname::text FROM pg_attribute
                      WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                    &[&leaf_oid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let id = identity(client, leaf_oid, &leaf_columns).await?;
            if id.replica_identity != ReplicaIdentity::Full {
                not_full.push(quote_table(
                    &leaf.get::<_, String>(1),
                    &leaf.get::<_, String>(2),
                ));
            }
            if id.replica_identity.strength() < replica_identity.strength() {
                replica_identity = id.replica_identity;
            }
            identity_columns.retain(|c| id.columns.contains(c));
        }
    }
    let replicates_updates = !identity_columns.is_empty();
    Ok(Some(TableInfo {
        oid,
        columns,
        replica_identity,
        identity_columns,
        primary_key: own.primary_key,
        partitioned,
        replicates_updates,
        not_full,
        partition_changes_sent,
        untracked_partitions,
    }))
}

/// One relation's own REPLICA IDENTITY, the columns it sends in old rows, and its
/// primary key.
struct Identity {
    replica_identity: ReplicaIdentity,
    columns: Vec<String>,
    primary_key: Vec<String>,
}

async fn identity(
    client: &Client,
    oid: u32,
    columns: &[String],
) -> Result<Identity, tokio_postgres::Error> {
    let ident: String = client
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = $1",
            &[&oid],
        )
        .await?
        .get(0);
    let index_columns = |flag: &'static str| {
        format!(
            "SELECT a.attname::text FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
              WHERE i.indrelid = $1 AND i.{flag} ORDER BY a.attnum"
        )
    };
    let primary_key: Vec<String> = client
        .query(&index_columns("indisprimary"), &[&oid])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let replica_identity =
        ReplicaIdentity::from_code(ident.as_bytes().first().copied().unwrap_or(b'd'))
            .unwrap_or(ReplicaIdentity::Default);
    let columns = match replica_identity {
        ReplicaIdentity::Default => primary_key.clone(),
        ReplicaIdentity::Full => columns.to_vec(),
        ReplicaIdentity::Nothing => Vec::new(),
        ReplicaIdentity::Index => client
            .query(&index_columns("indisreplident"), &[&oid])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    Ok(Identity {
        replica_identity,
        columns,
        primary_key,
    })
}

/// The current database's name.
pub async fn current_database(client: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0))
}

/// Runs SQL (DDL made by `publication`, say).
pub async fn execute(client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(sql).await
}

/// Whether the server is a standby (in recovery).
pub async fn in_recovery(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0))
}

/// `server_version_num`, like 150004.
pub async fn server_version(client: &Client) -> Result<u32, tokio_postgres::Error> {
    let v: String = client
        .query_one("SELECT current_setting('server_version_num')", &[])
        .await?
        .get(0);
    Ok(v.parse().unwrap_or(0))
}

/// Writes a tiny non-transactional WAL record into this database, so a slot advances
/// even when all other WAL comes from other databases.
pub async fn heartbeat(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_logical_emit_message(false, 'pginval-heartbeat', '')",
            &[],
        )
        .await
        .map(drop)
}
