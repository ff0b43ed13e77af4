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
use crate::sink::amqp::{AmqpSink, Failure};
use crate::sink::nats::NatsSink;
use crate::sink::redis::RedisSink;

mod replicas;

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
    Ok(check_with(&client, config).await?)
}

/// Checks the configuration against the database behind `client`.
pub async fn check_with(
    client: &Client,
    config: &Config,
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
    let server_version = catalog::server_version(client).await?;
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
        let Some(info) = catalog::table_info(client, &rule.schema, &rule.table).await? else {
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
        let generated = catalog::generated_columns(client, info.oid).await?;
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
                        identity_label(&info),
                        rule.qualified_table(),
                        info.identity_columns.join(", "),
                        if missing.len() == 1 { "it" } else { "them" },
                    ),
                    Some(identity_fix(&info)),
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
                    Some(identity_fix(&info)),
                ));
            }
        }
        report.notes.push(format!(
            "{rule}: table found, REPLICA IDENTITY {} covers every template",
            identity_label(&info)
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

    check_row_filters(client, config, &mut report).await?;
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

/// What a standby needs as a source: PostgreSQL 16+ (logical decoding in recovery) and
/// `hot_standby_feedback`, without which the primary removes catalog rows the slot
/// still needs and the standby invalidates the slot (a lost slot: every fallback).
async fn check_standby(
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
async fn system_identifier(client: &Client) -> Option<i64> {
    client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .ok()
        .map(|row| row.get(0))
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

/// The event brokers, connected to as the first publish would (the AMQP exchange is
/// declared, a NATS stream created when configured): a broker that refuses is a
/// problem (run could never publish), one that cannot be reached a warning (run waits).
async fn check_brokers(config: &Config, report: &mut CheckReport) {
    let Some(events) = &config.events else { return };
    let mut outcomes = Vec::new();
    if let Some(amqp) = &events.amqp {
        let result = AmqpSink::new(amqp.clone()).verify().await;
        outcomes.push(("amqp", format!("exchange {:?}", amqp.exchange), result));
    }
    if let Some(nats) = &events.nats {
        let result = NatsSink::new(nats.clone()).verify().await;
        let what = match &nats.stream {
            Some(stream) => format!("stream {stream:?}"),
            None => format!("subjects {:?}", nats.subject.get_ref()),
        };
        outcomes.push(("nats", what, result));
    }
    for (sink, what, result) in outcomes {
        match result {
            Ok(()) => report.notes.push(format!("{sink} broker answers; {what} ready")),
            Err(Failure { refused: true, message }) => report.problems.push(Problem::new(
                None,
                format!("the {sink} broker refuses pginval: {message}"),
                Some(format!("fix the [events.{sink}] settings (credentials, permissions, the exchange's or stream's declaration) or the broker's")),
            )),
            Err(Failure { refused: false, message }) => report.warnings.push(Problem::new(
                None,
                format!("cannot reach the {sink} broker ({message}); run waits for it and holds the slot meanwhile"),
                Some(format!("start the broker, or correct [events.{sink}] url")),
            )),
        }
    }
}

/// pginval's state database (reachable, not evictable) and, for framework tag
/// layouts, whether Redis holds tags of the configured form. Redis being down is a
/// warning: `run` waits for it.
async fn check_redis(config: &Config, report: &mut CheckReport) {
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let health = std::sync::Arc::new(crate::metrics::Health::new(config.max_lag));
    let open = |seeds: Vec<redis::ConnectionInfo>| {
        RedisSink::new(
            seeds,
            config.redis_topology(),
            config.redis_ca.as_deref(),
            &config.redis_durability,
            config.tags.clone(),
            None,
            true,
            metrics.clone(),
            health.clone(),
        )
    };
    let (Ok(mut own), Ok(mut cache)) = (open(config.state_seeds()), open(config.redis_seeds()))
    else {
        return;
    };
    let five_secs = std::time::Duration::from_secs(5);
    if let Ok(Ok(is_cluster)) = tokio::time::timeout(five_secs, cache.server_is_cluster()).await
        && is_cluster != config.redis_cluster
    {
        let addr = config.redis.addr();
        report.problems.push(if is_cluster {
            Problem::new(
                None,
                format!("redis at {addr} is a node of a Redis Cluster: sent to one node, most keys would be answered MOVED and never deleted"),
                Some("set cluster = true in [redis] (url and nodes are then the cluster's seed nodes)".into()),
            )
        } else {
            Problem::new(
                None,
                format!("[redis] cluster = true, but redis at {addr} is not a cluster node (cluster_enabled:0)"),
                Some("remove cluster = true from [redis], or point url at a node of the cluster".into()),
            )
        });
        return;
    }
    let state_db = config.state_redis.redis_settings().db();
    let checked = tokio::time::timeout(std::time::Duration::from_secs(5), own.ping()).await;
    match checked {
        Ok(Ok(())) if config.redis_cluster => report.notes.push(
            "the redis cluster answers; pginval's state lives in its database 0, under pginval: keys".into(),
        ),
        Ok(Ok(())) => report.notes.push(format!(
            "redis answers; pginval's state lives in database {state_db}"
        )),
        Ok(Err(e)) => {
            report.warnings.push(Problem::new(
                None,
                format!("cannot reach redis database {state_db} for pginval's state: {e}; run waits for it"),
                Some("start Redis, or give [state] redis_db a database the server has (its `databases` setting)".into()),
            ));
            return;
        }
        Err(_) => {
            report.warnings.push(Problem::new(
                None,
                "redis did not answer within 5 s; its settings were not checked (run waits for it)",
                None,
            ));
            return;
        }
    }
    if let Ok(Ok(version)) = tokio::time::timeout(five_secs, cache.major_version()).await {
        check_redis_version(config, version, report);
    }
    let policies = own.config_get("maxmemory-policy").await;
    let evicting = policies.as_ref().map(|p| {
        p.iter()
            .flatten()
            .find(|policy| policy.starts_with("allkeys-"))
            .cloned()
    });
    match evicting {
        Ok(Some(policy)) => report.problems.push(Problem::new(
            None,
            format!("redis runs with maxmemory-policy {policy}: it may evict pginval's state (database {state_db}), after which a lost slot would be taken for a first start and its gap never invalidated"),
            Some("CONFIG SET maxmemory-policy volatile-lru (and in redis.conf); cache entries with a TTL are still evicted, pginval's state (no TTL) is not".into()),
        )),
        Ok(_) => {}
        Err(e) => report.warnings.push(Problem::new(
            None,
            format!("cannot read redis' maxmemory-policy ({e}): make sure it is not allkeys-*, which may evict pginval's state"),
            None,
        )),
    }
    if let Some((layout, other, fix)) = config.tags.other_form()
        && matches!(
            cache
                .any_key_matches(&config.tags.tag_key_pattern("*"), 100_000)
                .await,
            Ok(false)
        )
        && matches!(
            cache
                .any_key_matches(&other.tag_key_pattern("*"), 100_000)
                .await,
            Ok(true)
        )
    {
        report.warnings.push(Problem::new(
            None,
            format!("redis holds no tag of the configured {layout} layout ({}) but holds tags of another form ({}): tag flushes would find nothing", escape(&config.tags.tag_key_pattern("*")), escape(&other.tag_key_pattern("*"))),
            Some(fix.into()),
        ));
    }
}

/// `failover_slot = true`: PostgreSQL 17+, on a primary, a slot that has (or will get)
/// the failover flag, and a standby that could keep a copy of it.
async fn check_failover_slot(
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

/// What this Redis major can do: 6 is needed (6.2 is the oldest tested), and rules with
/// `action = "expire"` need 7 (`PEXPIRE ... LT`). Valkey reports `redis_version:7.2.4`
/// whatever its own version, so it passes as the 7 it is compatible with.
fn check_redis_version(config: &Config, major: u32, report: &mut CheckReport) {
    if major < 6 {
        report.problems.push(Problem::new(
            None,
            format!("redis is version {major}; pginval needs Redis 6 or newer (SCAN ... TYPE for tag wildcards and patterns; 6.2 is the oldest tested)"),
            Some("upgrade Redis to 6.2 or newer (7 for rules with action = \"expire\"), or use Valkey".into()),
        ));
        return;
    }
    if major >= 7 {
        return;
    }
    for rule in config
        .rules
        .rules
        .iter()
        .filter(|r| matches!(r.action, crate::rules::compile::Action::Expire(_)))
    {
        report.problems.push(Problem::new(
            Some(rule.line),
            format!("rule #{} has action = \"expire\", which needs Redis 7 or newer (PEXPIRE ... LT, never extending a TTL); this Redis is {major} (run would refuse to start)", rule.number),
            Some("use action = \"delete\" on Redis 6, or upgrade Redis to 7 or newer (or Valkey)".into()),
        ));
    }
}

/// Control characters (Symfony's tag markers) shown as escapes.
fn escape(key: &str) -> String {
    key.escape_debug().to_string()
}

/// Each rule's `where` as PostgreSQL takes it: a valid row filter, and one whose
/// columns the replica identity covers (otherwise PostgreSQL refuses the application's
/// UPDATE and DELETE on the table once the filter is in the publication).
async fn check_row_filters(
    client: &Client,
    config: &Config,
    report: &mut CheckReport,
) -> Result<(), tokio_postgres::Error> {
    let filtered: Vec<_> = config
        .rules
        .rules
        .iter()
        .filter_map(|r| Some((r, r.row_filter.as_deref()?)))
        .collect();
    if filtered.is_empty() {
        return Ok(());
    }
    if catalog::in_recovery(client).await? {
        report.notes.push(
            "standby: row filters (`where`) are checked and applied by pginval on the primary"
                .into(),
        );
        return Ok(());
    }
    let pub_name = &config.source.publication;
    let unmanaged = catalog::publication(client, pub_name).await?.is_some()
        && !catalog::publication_is_managed(client, pub_name).await?;
    let pg15 = catalog::server_version(client).await? >= 150000;
    for (rule, filter) in filtered {
        let line = Some(rule.line);
        let qualified = quote_table(&rule.schema, &rule.table);
        if !pg15 {
            report.warnings.push(Problem::new(
                line,
                format!("{rule}: `where` needs PostgreSQL 15 or later (publication row filters); the rule fires for every row"),
                None,
            ));
            continue;
        }
        // The filter in force for the table: the OR of its rules' conditions, none when
        // one of its rules has no `where`.
        let applied = crate::publication::row_filter(config, &rule.schema, &rule.table);
        if applied.is_none() {
            report.warnings.push(Problem::new(
                line,
                format!("{rule}: `where` is not applied: another rule of {} has none, so every row is sent (the rule fires for all of them)", rule.qualified_table()),
                None,
            ));
        } else if unmanaged {
            report.warnings.push(Problem::new(
                line,
                format!("{rule}: publication {pub_name} was not created by pginval, so pginval does not set its row filters; the rule fires for every row it sends"),
                Some(format!(
                    "as the owner, give {qualified} the row filter ({}) in {pub_name} (ALTER PUBLICATION {} SET TABLE lists every table)",
                    applied.as_deref().unwrap_or_default(),
                    quote_ident(pub_name)
                )),
            ));
        }
        let enforced = applied.is_some() && !unmanaged;
        let Some(info) = catalog::table_info(client, &rule.schema, &rule.table).await? else {
            continue;
        };
        match catalog::probe_row_filter(client, &rule.schema, &rule.table, filter).await? {
            Err(reason) if reason.contains("(42501)") => report.warnings.push(Problem::new(
                line,
                format!("{rule}: cannot try `where` as a row filter: {reason}"),
                Some("run `pginval check` as the table's owner to verify it".into()),
            )),
            Err(reason) => report.problems.push(Problem::new(
                line,
                format!("{rule}: PostgreSQL refuses `where` as a publication row filter: {reason}"),
                Some("a row filter is a simple condition on the table's own columns: no subqueries, no user-defined or volatile functions".into()),
            )),
            Ok(probed) => {
                let uncovered: BTreeSet<&str> = probed
                    .columns
                    .iter()
                    .map(String::as_str)
                    .filter(|c| !info.identity_columns.iter().any(|x| x == c))
                    .collect();
                if enforced
                    && info.replica_identity != ReplicaIdentity::Full
                    && !uncovered.is_empty()
                {
                    report.problems.push(Problem::new(
                        line,
                        format!(
                            "{rule}: `where` reads {}, which REPLICA IDENTITY {} of {} does not send: with that row filter PostgreSQL refuses the application's UPDATE and DELETE on the table",
                            join_ticked(&uncovered),
                            info.replica_identity,
                            rule.qualified_table()
                        ),
                        Some(format!("ALTER TABLE {qualified} REPLICA IDENTITY FULL;")),
                    ));
                } else {
                    report
                        .notes
                        .push(format!("{rule}: row filter ({}) accepted", probed.canonical));
                }
            }
        }
    }
    Ok(())
}

/// `ALTER TABLE ... REPLICA IDENTITY FULL;` for the table and each partition that
/// needs it.
fn identity_fix(info: &catalog::TableInfo) -> String {
    info.full_identity_sql()
}

/// The identity in force, naming the partitions that decide it.
fn identity_label(info: &catalog::TableInfo) -> String {
    if info.partitioned && info.replica_identity != ReplicaIdentity::Full {
        format!(
            "{} (in {})",
            info.replica_identity,
            info.not_full.join(", ")
        )
    } else {
        info.replica_identity.to_string()
    }
}

fn join_ticked(items: &BTreeSet<&str>) -> String {
    items
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
