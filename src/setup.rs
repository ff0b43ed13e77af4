//! `pginval setup`: the SQL that prepares a database for the configured rules —
//! publication, REPLICA IDENTITY, slot — computed from what is already there, so
//! running it twice does nothing the second time.
//!
//! Plans from the catalog; executes only when asked (`--apply`).

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::config::Config;
use crate::publication::{desired_publication, row_filter};
use crate::replication::catalog::{self, PublishedTable, quote_ident, quote_table};
use crate::replication::relation::ReplicaIdentity;
use crate::rules::template::ImageSelector;

/// What `setup` would do.
#[derive(Debug, Default)]
pub struct Plan {
    /// Statements to run, in order.
    pub statements: Vec<String>,
    /// Things setup cannot do by itself, as SQL comments.
    pub notes: Vec<String>,
}

impl Plan {
    /// The plan as a SQL script.
    pub fn to_sql(&self) -> String {
        let mut out = String::new();
        for n in &self.notes {
            out.push_str(&format!("-- {n}\n"));
        }
        if self.statements.is_empty() {
            out.push_str("-- nothing to do: the database is prepared for these rules\n");
        }
        for s in &self.statements {
            out.push_str(s);
            out.push('\n');
        }
        out
    }
}

/// Computes the statements that prepare the database behind `client` for `config`.
pub async fn plan(client: &Client, config: &Config) -> Result<Plan, tokio_postgres::Error> {
    let mut plan = Plan::default();
    let wal_level = catalog::wal_level(client).await?;
    if wal_level != "logical" {
        plan.notes.push(format!(
            "wal_level is {wal_level}: run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL (setup does not restart servers)"
        ));
    }
    let snapshot = catalog::Snapshot::read(client, config.rules.tables()).await?;
    let pg15 = snapshot.server_version >= 150000;
    let mut refused = BTreeSet::new();
    let mut publishable = Vec::new();
    let mut partitioned = false;
    let mut full = BTreeSet::new();
    let mut full_sql = Vec::new();
    for (schema, table) in config.rules.tables() {
        let Some(info) = snapshot.table(&schema, &table) else {
            plan.notes.push(format!(
                "table {schema}.{table} does not exist: create it first"
            ));
            continue;
        };
        partitioned |= info.partitioned;
        let rules = config
            .rules
            .rules
            .iter()
            .filter(|r| r.schema == schema && r.table == table);
        let needs_old: BTreeSet<&str> = rules
            .flat_map(|r| r.templates().flat_map(|t| t.columns()).collect::<Vec<_>>())
            .filter(|(image, _)| *image != ImageSelector::New)
            .map(|(_, c)| c)
            .collect();
        let mut uncovered = needs_old
            .iter()
            .any(|c| !info.identity_columns.iter().any(|x| x == c));
        // A row filter's columns must be in the replica identity, or PostgreSQL
        // refuses UPDATE and DELETE on the table.
        if let Some(filter) = row_filter(config, &schema, &table).filter(|_| pg15) {
            match catalog::probe_row_filter(client, &schema, &table, &filter).await? {
                Ok(probed) => {
                    uncovered |= probed
                        .columns
                        .iter()
                        .any(|c| !info.identity_columns.contains(c))
                }
                Err(reason) => {
                    plan.notes.push(format!(
                        "the row filter of {schema}.{table} ({filter}) was refused, so the table is published without one: {reason}"
                    ));
                    refused.insert((schema.clone(), table.clone()));
                }
            }
        }
        if info.replica_identity != ReplicaIdentity::Full && (uncovered || !info.replicates_updates)
        {
            full.insert((schema.clone(), table.clone()));
            // A partitioned table: the root and every partition not yet FULL.
            full_sql.push(info.full_identity_sql());
        }
        publishable.push((schema, table));
    }
    plan.statements.extend(full_sql);
    if partitioned {
        plan.notes.push(
            "partitioned tables: a partition created or attached later needs REPLICA IDENTITY FULL too; sql/partitions.sql installs an event trigger that gives it (as a superuser)".into(),
        );
    }
    let pub_name = &config.source.publication;
    let desired = desired_publication(&snapshot, config);
    match catalog::publication(client, pub_name).await? {
        None if !publishable.is_empty() => {
            // Tables whose identity setup changes to FULL are published whole (and
            // those without a key become publishable once they have it).
            let mut desired = desired;
            for (schema, table) in &full {
                if !desired
                    .iter()
                    .any(|t| t.schema == *schema && t.table == *table)
                {
                    desired.push(PublishedTable::whole(schema, table));
                }
            }
            let tables: Vec<PublishedTable> = desired
                .into_iter()
                .map(|mut t| {
                    let id = (t.schema.clone(), t.table.clone());
                    if full.contains(&id) {
                        t.columns = None;
                    }
                    if refused.contains(&id) {
                        t.row_filter = None;
                    }
                    t
                })
                .collect();
            plan.statements
                .push(crate::publication::create_publication_sql(
                    pub_name, &tables,
                ));
        }
        None => {}
        Some(publ) => {
            let missing: Vec<String> = publishable
                .iter()
                .filter(|t| !publ.all_tables && !publ.tables.contains(t))
                .map(|(s, t)| quote_table(s, t))
                .collect();
            if !missing.is_empty() {
                plan.statements.push(format!(
                    "ALTER PUBLICATION {} ADD TABLE {};",
                    quote_ident(pub_name),
                    missing.join(", ")
                ));
            }
            if !(publ.insert && publ.update && publ.delete && publ.truncate) {
                plan.statements.push(format!(
                    "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                    quote_ident(pub_name)
                ));
            }
            if partitioned && !publ.via_root {
                plan.statements.push(format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                    quote_ident(pub_name)
                ));
            }
        }
    }
    if catalog::slot(client, &config.source.slot).await?.is_none() {
        // (name, plugin, temporary, twophase, failover): as run creates it.
        let failover = if config.source.failover_slot {
            ", false, false, true"
        } else {
            ""
        };
        plan.statements.push(format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput'{failover});",
            config.source.slot
        ));
    }
    Ok(plan)
}

/// Runs the plan's statements one by one (a slot cannot be created inside a
/// transaction that wrote, so there is no surrounding transaction).
pub async fn apply(client: &Client, plan: &Plan) -> Result<(), tokio_postgres::Error> {
    for s in &plan.statements {
        client.batch_execute(s).await?;
    }
    Ok(())
}
