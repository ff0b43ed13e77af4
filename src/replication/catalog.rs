//! Catalog queries and DDL on the ordinary control connection (tokio-postgres):
//! server settings, tables and their replica identity, the publication and the slot.
//!
//! Never streams changes; that is `conn`. Every identifier it interpolates is quoted.

use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::source::Source;

use super::relation::ReplicaIdentity;

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

/// A publication.
#[derive(Debug, Clone)]
pub struct PublicationInfo {
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// Published `(schema, table)` pairs.
    pub tables: Vec<(String, String)>,
    /// Which operations it publishes.
    pub insert: bool,
    /// Publishes UPDATE.
    pub update: bool,
    /// Publishes DELETE.
    pub delete: bool,
    /// Publishes TRUNCATE.
    pub truncate: bool,
    /// `publish_via_partition_root`.
    pub via_root: bool,
}

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

/// Whether publication `name` publishes stored generated columns
/// (`publish_generated_columns = stored`, PostgreSQL 18+; false before).
pub async fn publishes_generated_columns(
    client: &Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    if server_version(client).await? < 180000 {
        return Ok(false);
    }
    Ok(client
        .query_opt(
            "SELECT pubgencols::text FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
        .map(|r| r.get::<_, String>(0))
        .is_some_and(|v| matches!(v.as_str(), "s" | "t" | "true")))
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

/// Which of `tables` the publication does not publish (now, by name): a rule table
/// renamed away, or replaced by a table of the same name that is not in it. None
/// while the publication does not exist (start-up creates it).
pub async fn unpublished(
    client: &Client,
    publication: &str,
    tables: &[(String, String)],
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, t)| (s.as_str(), t.as_str())).unzip();
    Ok(client
        .query(
            "SELECT t.s, t.n FROM unnest($2::text[], $3::text[]) AS t(s, n)
              WHERE EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)
                AND NOT EXISTS (SELECT 1 FROM pg_publication_tables p
                                 WHERE p.pubname = $1 AND p.schemaname = t.s AND p.tablename = t.n)",
            &[&publication, &schemas, &names],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A publication, or `None` when it does not exist.
pub async fn publication(
    client: &Client,
    name: &str,
) -> Result<Option<PublicationInfo>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot
               FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(None);
    };
    let tables = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Some(PublicationInfo {
        all_tables: row.get(0),
        insert: row.get(1),
        update: row.get(2),
        delete: row.get(3),
        truncate: row.get(4),
        via_root: row.get(5),
        tables,
    }))
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

/// The current database's name.
pub async fn current_database(client: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0))
}

/// A table as pginval publishes it: with a column list, or whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTable {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// The published columns; `None` publishes every column.
    pub columns: Option<Vec<String>>,
    /// The row filter (a SQL condition); `None` publishes every row.
    pub row_filter: Option<String>,
}

impl PublishedTable {
    /// A whole table.
    pub fn whole(schema: &str, table: &str) -> PublishedTable {
        PublishedTable {
            schema: schema.to_owned(),
            table: table.to_owned(),
            columns: None,
            row_filter: None,
        }
    }

    /// The table as a publication lists it: `schema.table (columns) WHERE (filter)`.
    pub fn sql(&self) -> String {
        let mut sql = quote_table(&self.schema, &self.table);
        if let Some(cols) = &self.columns {
            let cols: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
            sql.push_str(&format!(" ({})", cols.join(", ")));
        }
        if let Some(filter) = &self.row_filter {
            sql.push_str(&format!(" WHERE ({filter})"));
        }
        sql
    }
}

/// Runs SQL (DDL made by `publication`, say).
pub async fn execute(client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(sql).await
}

/// Whether the publication carries pginval's "managed" comment.
pub async fn publication_is_managed(
    client: &Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
        .and_then(|r| r.get::<_, Option<String>>(0))
        .is_some_and(|c| c == crate::publication::MANAGED_COMMENT))
}

/// The published columns and row filter of each table of a publication; before
/// PostgreSQL 15 (no column lists, no row filters) both are `None`.
pub async fn publication_tables(
    client: &Client,
    name: &str,
) -> Result<Vec<PublishedTable>, tokio_postgres::Error> {
    let query = if server_version(client).await? >= 150000 {
        "SELECT schemaname::text, tablename::text, attnames::text[], rowfilter
           FROM pg_publication_tables WHERE pubname = $1"
    } else {
        "SELECT schemaname::text, tablename::text, NULL::text[], NULL::text
           FROM pg_publication_tables WHERE pubname = $1"
    };
    Ok(client
        .query(query, &[&name])
        .await?
        .iter()
        .map(|r| PublishedTable {
            schema: r.get(0),
            table: r.get(1),
            columns: r.get(2),
            row_filter: r.get(3),
        })
        .collect())
}

/// What PostgreSQL makes of a rule's `where` as a publication row filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFilter {
    /// The condition as PostgreSQL prints it back (`pg_publication_tables.rowfilter`).
    pub canonical: String,
    /// The columns it reads.
    pub columns: Vec<String>,
}

/// Tries `filter` as the row filter of `schema.table` in a publication created and
/// rolled back at once: `Ok(Err(reason))` when PostgreSQL refuses it (reason given as
/// PostgreSQL says it), otherwise its canonical form and the columns it reads. Needs
/// the right to create a publication for the table (its owner).
pub async fn probe_row_filter(
    client: &Client,
    schema: &str,
    table: &str,
    filter: &str,
) -> Result<Result<RowFilter, String>, tokio_postgres::Error> {
    let probe = format!("pginval_probe_{}", std::process::id());
    client.batch_execute("BEGIN").await?;
    let probed = async {
        // One statement through the extended protocol: a filter cannot smuggle in
        // a second one.
        let create = format!(
            "CREATE PUBLICATION {} FOR TABLE {} WHERE ({filter}) WITH (publish_via_partition_root = true)",
            quote_ident(&probe),
            quote_table(schema, table)
        );
        if let Err(e) = client.execute(create.as_str(), &[]).await {
            return Ok(Err(describe_error(&e)));
        }
        let rows = client
            .query(
                "SELECT pg_get_expr(pr.prqual, pr.prrelid), pr.prqual::text, pr.prrelid
                   FROM pg_publication p
                   JOIN pg_publication_rel pr ON pr.prpubid = p.oid
                  WHERE p.pubname = $1",
                &[&probe],
            )
            .await?;
        // Exactly the one table, with a condition: a filter cannot reach further.
        let [row] = rows.as_slice() else {
            return Ok(Err(format!(
                "`{filter}` is not one condition on {schema}.{table}"
            )));
        };
        let (Some(canonical), Some(tree)) =
            (row.get::<_, Option<String>>(0), row.get::<_, Option<String>>(1))
        else {
            return Ok(Err(format!("`{filter}` is not a condition")));
        };
        let relid: u32 = row.get(2);
        // The stored expression tree names each column it reads as `:varattno N`.
        let attnums: Vec<i16> = tree
            .split(":varattno ")
            .skip(1)
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect();
        let columns = client
            .query(
                "SELECT attname::text FROM pg_attribute
                  WHERE attrelid = $1 AND attnum = ANY($2) ORDER BY attnum",
                &[&relid, &attnums],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Ok(RowFilter { canonical, columns }))
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    probed
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

/// Drops a replication slot.
pub async fn drop_slot(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .map(drop)
}

/// Whether the current role may create a publication for `tables`: superuser, or
/// member of every table's owner role.
pub async fn can_publish(
    client: &Client,
    tables: &[(String, String)],
) -> Result<bool, tokio_postgres::Error> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, t)| (s.as_str(), t.as_str())).unzip();
    Ok(client
        .query_one(
            "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 OR coalesce(bool_and(pg_has_role(c.relowner, 'USAGE')), true)
               FROM unnest($1::text[], $2::text[]) AS t(s, n)
               JOIN pg_namespace ns ON ns.nspname = t.s
               JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t.n",
            &[&schemas, &names],
        )
        .await?
        .get(0))
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
