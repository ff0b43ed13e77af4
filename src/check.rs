//! `pginval check`: the configuration against the live database — wal_level, the
//! rules' tables and columns, whether REPLICA IDENTITY sends what each rule needs,
//! the publication and the slot. `run` performs the same checks before it streams.
//!
//! Reads the catalog only; never creates or alters anything.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use tokio_postgres::Client;

use crate::config::{Config, SlotLost};
use crate::diagnostics::{Problem, write_problem};
use crate::replication::catalog::{self, ManagedService, quote_ident, quote_table};
use crate::replication::relation::ReplicaIdentity;
use crate::rules::template::ImageSelector;

mod replicas;
mod sinks;
mod standby;
mod tables;

use sinks::{check_brokers, check_redis};
use standby::{check_failover_slot, check_standby, system_identifier};
use tables::{check_row_filters, identity_fix, identity_label, join_ticked};

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Errors: `run` refuses to start while any is present.
    pub problems: Vec<Problem>,
    /// Facts worth knowing that do not stop `run`.
    pub notes: Vec<String>,
    /// Warnings: `run` starts, but a rule is weaker than it looks.
    pub warnings: Vec<Problem>,
    /// Primary key columns of the rules' tables, by `(schema, table)`.
    pub primary_keys: HashMap<(String, String), Vec<String>>,
    /// The rules' tables that are partitioned, by `(schema, table)`.
    pub partitioned: BTreeSet<(String, String)>,
}

/// `check` could not complete.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The database could not be reached or a catalog query failed.
    #[error("cannot check the source database: {}", catalog::describe_error(.0))]
    Database(#[from] tokio_postgres::Error),
}

impl CheckReport {
    /// Writes the report, problems with their lines and fixes.
    pub fn display<'a>(&'a self, config: &'a Config) -> impl fmt::Display + 'a {
        struct Shown<'a>(&'a CheckReport, &'a Config);
        impl fmt::Display for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for note in &self.0.notes {
                    writeln!(f, "  ok: {note}")?;
                }
                for w in &self.0.warnings {
                    let mut warned = w.clone();
                    warned.message = format!("warning: {}", w.message);
                    write_problem(f, &self.1.path, &warned)?;
                }
                for p in &self.0.problems {
                    write_problem(f, &self.1.path, p)?;
                }
                Ok(())
            }
        }
        Shown(self, config)
    }
}

/// Connects with the configuration's source settings and checks everything.
pub async fn check(config: &Config) -> Result<CheckReport, CheckError> {
    let client = catalog::connect(&config.source).await?;
    let snapshot = catalog::Snapshot::read(&client, config.rules.tables()).await?;
    Ok(check_with(&client, config, &snapshot).await?)
}

/// Checks the configuration against the database behind `client`.
pub async fn check_with(
    client: &Client,
    config: &Config,
    snapshot: &catalog::Snapshot,
) -> Result<CheckReport, tokio_postgres::Error> {
    let mut report = CheckReport::default();
    let problems = &mut report.problems;

    let service = catalog::managed_service(client).await?;
    if let Some(service) = service {
        report.notes.push(format!(
            "managed service: {} (docs/sources.md says what it needs)",
            service_name(service)
        ));
    }
    let wal_level = catalog::wal_level(client).await?;
    if wal_level == "logical" {
        report.notes.push("wal_level = logical".into());
    } else {
        problems.push(Problem::new(
            None,
            format!(
                "the server runs with wal_level = {wal_level}; logical replication needs logical"
            ),
            Some(wal_level_fix(service).into()),
        ));
    }
    let server_version = snapshot.server_version;
    let standby = catalog::in_recovery(client).await?;
    if standby {
        check_standby(client, config, server_version, &mut report).await?;
    }
    if !config.read_replicas.replicas.is_empty() {
        let id = system_identifier(client).await;
        replicas::check_replicas(config, id, &mut report).await;
    }
    if server_version >= 180000 {
        let idle = catalog::setting(client, "idle_replication_slot_timeout").await?;
        if idle != "0" {
            report.warnings.push(Problem::new(
                None,
                format!("idle_replication_slot_timeout = {idle}: PostgreSQL invalidates a slot nobody streamed from for that long, so a pginval outage longer than {idle} loses its slot (every rule's fallback when it is back)"),
                Some("ALTER SYSTEM SET idle_replication_slot_timeout = 0; SELECT pg_reload_conf(); or keep it well above the longest outage you plan for".into()),
            ));
        }
    }
    let problems = &mut report.problems;
    if !catalog::can_replicate(client).await? {
        problems.push(Problem::new(
            None,
            match service {
                Some(ManagedService::Rds) => {
                    "the configured role has neither REPLICATION nor SUPERUSER nor membership in rds_replication".to_string()
                }
                _ => "the configured role has neither REPLICATION nor SUPERUSER".to_string(),
            },
            Some(replication_fix(service).into()),
        ));
    }

    let mut unpublishable = BTreeSet::new();
    let mut partitioned = Vec::new();
    // A rule reads a stored generated column (PostgreSQL 18+): the publication must
    // publish those.
    let mut publish_generated = false;
    for rule in &config.rules.rules {
        let line = Some(rule.line);
        let qualified = quote_table(&rule.schema, &rule.table);
        let Some(info) = snapshot.table(&rule.schema, &rule.table) else {
            problems.push(Problem::new(
                line,
                format!("{rule}: table {} does not exist", rule.qualified_table()),
                Some("create the table, or fix `table` (write it as \"schema.table\" when it is not in public)".into()),
            ));
            continue;
        };
        if info.partitioned {
            partitioned.push(rule.qualified_table());
            report
                .partitioned
                .insert((rule.schema.clone(), rule.table.clone()));
        }
        report.primary_keys.insert(
            (rule.schema.clone(), rule.table.clone()),
            info.primary_key.clone(),
        );
        for column in rule.columns() {
            if !info.columns.iter().any(|c| c == column) {
                problems.push(Problem::new(
                    line,
                    format!(
                        "{rule}: column `{column}` does not exist in {}",
                        rule.qualified_table()
                    ),
                    Some(format!("use one of: {}", info.columns.join(", "))),
                ));
            }
        }
        let generated = snapshot.generated(&rule.schema, &rule.table);
        for column in rule.columns() {
            let Some((_, kind)) = generated.iter().find(|(g, _)| g == column) else {
                continue;
            };
            if kind == "v" {
                problems.push(Problem::new(
                    line,
                    format!("{rule}: column `{column}` is a virtual generated column: PostgreSQL cannot publish it, so its value never reaches pginval"),
                    Some(format!("build the template from the columns `{column}` is computed from, or make it STORED (ALTER TABLE {qualified} DROP COLUMN {column}, ADD COLUMN {column} ... GENERATED ALWAYS AS (...) STORED)")),
                ));
            } else if server_version < 180000 {
                problems.push(Problem::new(
                    line,
                    format!("{rule}: column `{column}` is a generated column: PostgreSQL before 18 does not publish generated columns, so its value never reaches pginval"),
                    Some(format!("build the template from the columns `{column}` is computed from (PostgreSQL 18 can publish stored generated columns)")),
                ));
            } else {
                publish_generated = true;
            }
        }
        if !info.replicates_updates {
            unpublishable.insert((rule.schema.clone(), rule.table.clone()));
            let why = match info.replica_identity {
                ReplicaIdentity::Nothing => "its REPLICA IDENTITY is NOTHING".to_string(),
                ReplicaIdentity::Index => "its REPLICA IDENTITY index is gone".to_string(),
                _ => "it has no primary key".to_string(),
            };
            problems.push(Problem::new(
                line,
                format!(
                    "{rule}: PostgreSQL cannot replicate UPDATE and DELETE of {} because {why}; pginval will not publish it (publishing it would make the application's own UPDATE and DELETE fail)",
                    rule.qualified_table()
                ),
                Some(format!(
                    "ALTER TABLE {qualified} ADD PRIMARY KEY (<key columns>);\nor: ALTER TABLE {qualified} REPLICA IDENTITY FULL;\nor: ALTER TABLE {qualified} REPLICA IDENTITY USING INDEX <unique index>;"
                )),
            ));
            continue;
        }
        if info.replica_identity != ReplicaIdentity::Full {
            // `{col}` and `{old.col}` need the old value of `col` on UPDATE and DELETE;
            // Postgres sends old values only for the identity columns.
            let missing: BTreeSet<&str> = rule
                .templates()
                .flat_map(|t| t.columns())
                .filter(|(image, _)| *image != ImageSelector::New)
                .map(|(_, c)| c)
                .filter(|c| info.columns.iter().any(|x| x == c))
                .filter(|c| !info.identity_columns.iter().any(|x| x == c))
                .collect();
            if !missing.is_empty() {
                problems.push(Problem::new(
                    line,
                    format!(
                        "{rule}: templates read {} but REPLICA IDENTITY {} of {} sends only ({}) in old rows, so an UPDATE that changes {} or a DELETE could not invalidate the old key",
                        join_ticked(&missing),
                        identity_label(info),
                        rule.qualified_table(),
                        info.identity_columns.join(", "),
                        if missing.len() == 1 { "it" } else { "them" },
                    ),
                    Some(identity_fix(info)),
                ));
                continue;
            }
        }
        if info.replica_identity != ReplicaIdentity::Full {
            let blind: Vec<&str> = rule
                .columns
                .iter()
                .map(String::as_str)
                .filter(|c| !info.identity_columns.iter().any(|x| x == c))
                .collect();
            if !blind.is_empty() {
                report.warnings.push(Problem::new(
                    line,
                    format!(
                        "{rule}: without the old row Postgres cannot tell whether {} changed, so every UPDATE fires the rule",
                        blind.join(", ")
                    ),
                    Some(identity_fix(info)),
                ));
            }
        }
        report.notes.push(format!(
            "{rule}: table found, REPLICA IDENTITY {} covers every template",
            identity_label(info)
        ));
        if info.partitioned && info.partition_changes_sent {
            report.notes.push(format!(
                "{rule}: {} is partitioned; sql/partitions.sql is installed: new partitions get its identity, and a partition's TRUNCATE, DETACH, ATTACH or DROP applies the rules' fallbacks",
                rule.qualified_table()
            ));
        } else if info.partitioned {
            let untracked = if info.untracked_partitions.is_empty() {
                String::new()
            } else {
                format!(
                    " (partitions without pginval's TRUNCATE trigger: {})",
                    info.untracked_partitions.join(", ")
                )
            };
            report.warnings.push(Problem::new(
                line,
                format!(
                    "{rule}: {} is partitioned: each partition has its own REPLICA IDENTITY, so a partition created or attached later must get the same (until it does, pginval applies the templates it cannot render as wildcards); and PostgreSQL does not send a partition's TRUNCATE, DETACH, ATTACH or DROP to pginval{untracked}",
                    rule.qualified_table()
                ),
                Some("run sql/partitions.sql once as a superuser: its triggers keep new partitions' identity and tell pginval of those partition changes (it then applies the rules' fallbacks); without it, invalidate by hand after them".into()),
            ));
        }
    }

    check_row_filters(client, config, snapshot, &mut report).await?;
    check_redis(config, &mut report).await;
    check_brokers(config, &mut report).await;
    let problems = &mut report.problems;

    let pub_name = &config.source.publication;
    match catalog::publication(client, pub_name).await? {
        None => {
            let tables: Vec<(String, String)> = config
                .rules
                .tables()
                .into_iter()
                .filter(|t| !unpublishable.contains(t))
                .collect();
            let create = crate::publication::create_publication_sql(
                pub_name,
                &tables
                    .iter()
                    .map(|(s, t)| catalog::PublishedTable::whole(s, t))
                    .collect::<Vec<_>>(),
            );
            if standby {
                // A standby's catalog is the primary's, and read-only.
                problems.push(Problem::new(
                    None,
                    format!(
                        "publication {pub_name} does not exist, and this server is a standby: it can only be created on the primary"
                    ),
                    Some(format!(
                        "on the primary, as the tables' owner: {create}"
                    )),
                ));
            } else if catalog::can_publish(client, &tables).await? {
                report.notes.push(format!(
                    "publication {pub_name} does not exist yet; run creates it for the rules' tables"
                ));
            } else {
                problems.push(Problem::new(
                    None,
                    format!(
                        "publication {pub_name} does not exist, and the configured role cannot create it: creating a publication needs ownership of {}",
                        tables.iter().map(|(s, t)| format!("{s}.{t}")).collect::<Vec<_>>().join(", ")
                    ),
                    Some(format!(
                        "as the tables' owner: {}\n(or run `pginval setup --apply` / sql/setup.sql as the owner)",
                        crate::publication::create_publication_sql(
                            pub_name,
                            &tables
                                .iter()
                                .map(|(s, t)| catalog::PublishedTable::whole(s, t))
                                .collect::<Vec<_>>()
                        )
                    )),
                ));
            }
        }
        Some(publ) => {
            if publish_generated && !catalog::publishes_generated_columns(client, pub_name).await? {
                if catalog::publication_is_managed(client, pub_name).await? && !standby {
                    report.notes.push(format!(
                        "publication {pub_name} (managed by pginval) does not publish generated columns yet; run sets publish_generated_columns = stored"
                    ));
                } else {
                    problems.push(Problem::new(
                        None,
                        format!("rules read stored generated columns, but publication {pub_name} does not publish them: their values would never reach pginval"),
                        Some(crate::publication::publish_generated_columns_sql(pub_name)),
                    ));
                }
            }
            let missing: Vec<String> = config
                .rules
                .tables()
                .into_iter()
                .filter(|t| !unpublishable.contains(t))
                .filter(|t| !publ.all_tables && !publ.tables.contains(t))
                .map(|(s, t)| quote_table(&s, &t))
                .collect();
            // A publication pginval manages on a primary is brought to the rules'
            // tables by run (and setup) before streaming.
            let synced = !missing.is_empty()
                && catalog::publication_is_managed(client, pub_name).await?
                && !catalog::in_recovery(client).await?;
            if synced {
                report.notes.push(format!(
                    "publication {pub_name} (managed by pginval) does not include {} yet; run adds them and applies their rules' fallbacks once",
                    missing.join(", ")
                ));
            } else if !missing.is_empty() {
                problems.push(Problem::new(
                    None,
                    format!(
                        "publication {pub_name} does not include {}: their changes would never reach pginval",
                        missing.join(", ")
                    ),
                    Some(format!(
                        "ALTER PUBLICATION {} ADD TABLE {};",
                        quote_ident(pub_name),
                        missing.join(", ")
                    )),
                ));
            }
            let ops = [
                ("insert", publ.insert),
                ("update", publ.update),
                ("delete", publ.delete),
                ("truncate", publ.truncate),
            ];
            let off: Vec<&str> = ops.iter().filter(|(_, on)| !on).map(|(n, _)| *n).collect();
            if !off.is_empty() {
                problems.push(Problem::new(
                    None,
                    format!("publication {pub_name} does not publish {}", off.join(", ")),
                    Some(format!(
                        "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                        quote_ident(pub_name)
                    )),
                ));
            }
            if !partitioned.is_empty() && !publ.via_root {
                problems.push(Problem::new(
                    None,
                    format!(
                        "{} partitioned, but publication {pub_name} publishes changes under the partitions' names, which no rule matches",
                        partitioned.join(", ")
                    ),
                    Some(format!(
                        "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                        quote_ident(pub_name)
                    )),
                ));
            }
            if (missing.is_empty() || synced) && off.is_empty() {
                report
                    .notes
                    .push(format!("publication {pub_name} covers the rules' tables"));
            }
        }
    }

    if config.source.failover_slot {
        check_failover_slot(client, config, server_version, standby, &mut report).await?;
    }
    let problems = &mut report.problems;
    let slot_name = &config.source.slot;
    let database = catalog::current_database(client).await?;
    match catalog::slot(client, slot_name).await? {
        None => report.notes.push(format!(
            "slot {slot_name} does not exist yet; run creates it (pgoutput)"
        )),
        Some(slot) => {
            if slot.slot_type != "logical" || slot.plugin.as_deref() != Some("pgoutput") {
                problems.push(Problem::new(
                    None,
                    format!(
                        "slot {slot_name} is a {} slot with plugin {}; pginval needs a logical pgoutput slot",
                        slot.slot_type,
                        slot.plugin.as_deref().unwrap_or("none")
                    ),
                    Some(format!("choose another `slot` under [source], or drop it: SELECT pg_drop_replication_slot('{slot_name}');")),
                ));
            } else if slot.database.as_deref() != Some(database.as_str()) {
                problems.push(Problem::new(
                    None,
                    format!(
                        "slot {slot_name} belongs to database {}, not {database}",
                        slot.database.as_deref().unwrap_or("?")
                    ),
                    Some("choose another `slot` name under [source]".into()),
                ));
            } else if slot.wal_status.as_deref() == Some("lost") {
                let lost = format!(
                    "slot {slot_name} is lost: the WAL it needed was removed, changes were missed"
                );
                if config.source.on_slot_lost == SlotLost::Flush {
                    report.warnings.push(Problem::new(
                        None,
                        format!("{lost}; run will recreate it and apply every rule's fallback (on_slot_lost = \"flush\")"),
                        None,
                    ));
                } else {
                    problems.push(Problem::new(
                        None,
                        lost,
                        Some(format!(
                            "flush the cache, drop the slot (SELECT pg_drop_replication_slot('{slot_name}');), or set on_slot_lost = \"flush\""
                        )),
                    ));
                }
            } else {
                report.notes.push(format!(
                    "slot {slot_name} exists (confirmed {}{})",
                    slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                    if slot.active {
                        ", in use by another process"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    Ok(report)
}

/// The service's name as its users know it.
fn service_name(service: ManagedService) -> &'static str {
    match service {
        ManagedService::Rds => "Amazon RDS or Aurora PostgreSQL",
        ManagedService::CloudSql => "Google Cloud SQL for PostgreSQL",
        ManagedService::Azure => "Azure Database for PostgreSQL flexible server",
        ManagedService::Supabase => "Supabase",
        ManagedService::Neon => "Neon",
    }
}

/// How to turn on logical decoding where `ALTER SYSTEM` is not allowed.
fn wal_level_fix(service: Option<ManagedService>) -> &'static str {
    match service {
        None => "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        Some(ManagedService::Rds) => {
            "set rds.logical_replication = 1 in the instance's DB parameter group (Aurora: the DB cluster parameter group), then reboot the instance (Aurora: the writer)"
        }
        Some(ManagedService::CloudSql) => {
            "set the database flag cloudsql.logical_decoding = on (gcloud sql instances patch <instance> --database-flags=cloudsql.logical_decoding=on)"
        }
        Some(ManagedService::Azure) => {
            "set the server parameter wal_level = logical (portal: Server parameters, or az postgres flexible-server parameter set --name wal_level --value logical), then restart the server"
        }
        Some(ManagedService::Supabase) => {
            "Supabase runs with wal_level = logical: make sure [source] url is the direct connection (db.<project>.supabase.co:5432), not the pooler"
        }
        Some(ManagedService::Neon) => {
            "enable logical replication in the Neon project's Settings (Logical Replication), which restarts its computes"
        }
    }
}

/// How to give pginval's role the right to replicate.
fn replication_fix(service: Option<ManagedService>) -> &'static str {
    match service {
        None => "ALTER ROLE <the role in [source] url> WITH REPLICATION;",
        Some(ManagedService::Rds) => "GRANT rds_replication TO <the role in [source] url>;",
        Some(ManagedService::CloudSql) => {
            "as a cloudsqlsuperuser member: ALTER ROLE <the role in [source] url> WITH REPLICATION;"
        }
        Some(ManagedService::Azure) => {
            "as the server admin (azure_pg_admin): ALTER ROLE <the role in [source] url> WITH REPLICATION;"
        }
        Some(ManagedService::Supabase) => {
            "use the postgres role, or as postgres: ALTER ROLE <the role in [source] url> WITH REPLICATION;"
        }
        Some(ManagedService::Neon) => {
            "use a role created in the Neon Console, CLI or API (a neon_superuser member, which has REPLICATION)"
        }
    }
}
