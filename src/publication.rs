//! The publication policy, in one place: what the publication pginval manages should
//! be for the rules (tables, column lists, row filters), how an existing one drifts
//! from that, and the DDL that creates or corrects it. `setup`, `check` and start-up
//! call it; none of them decides it on its own.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::config::Config;
use crate::replication::catalog::{self, PublishedTable, Snapshot, quote_ident};
use crate::replication::relation::ReplicaIdentity;

/// Comment that marks a publication pginval created and keeps up to date.
pub const MANAGED_COMMENT: &str = "managed by pginval";

/// The SQL that creates pginval's publication for `tables` and marks it as managed.
pub fn create_publication_sql(name: &str, tables: &[PublishedTable]) -> String {
    let list = tables
        .iter()
        .map(PublishedTable::sql)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "CREATE PUBLICATION {0} FOR TABLE {list} WITH (publish_via_partition_root = true);\nCOMMENT ON PUBLICATION {0} IS '{MANAGED_COMMENT}';",
        quote_ident(name)
    )
}

/// Whether the rules read a stored generated column on PostgreSQL 18+, which the
/// publication then has to publish (`publish_generated_columns = stored`).
pub fn needs_generated_columns(catalog: &Snapshot, config: &Config) -> bool {
    catalog.server_version >= 180000
        && config.rules.rules.iter().any(|rule| {
            let generated = catalog.generated(&rule.schema, &rule.table);
            rule.columns()
                .into_iter()
                .any(|c| generated.iter().any(|(g, kind)| g == c && kind == "s"))
        })
}

/// The SQL that makes a publication publish stored generated columns (PostgreSQL 18+).
pub fn publish_generated_columns_sql(name: &str) -> String {
    format!(
        "ALTER PUBLICATION {} SET (publish_generated_columns = stored);",
        quote_ident(name)
    )
}

/// The SQL that brings a managed publication to exactly `tables`.
pub fn set_publication_tables_sql(name: &str, tables: &[PublishedTable]) -> String {
    let list = tables
        .iter()
        .map(PublishedTable::sql)
        .collect::<Vec<_>>()
        .join(", ");
    format!("ALTER PUBLICATION {} SET TABLE {list};", quote_ident(name))
}

/// The publication pginval wants for `config`'s rules: every rule table Postgres can
/// replicate, each with a column list of the columns the rules read plus the replica
/// identity columns (PostgreSQL 15+). A table with REPLICA IDENTITY FULL is published
/// whole: Postgres requires a column list to cover the identity, which for FULL is
/// every column.
pub fn desired_publication(catalog: &Snapshot, config: &Config) -> Vec<PublishedTable> {
    let pg15 = catalog.server_version >= 150000;
    let lists = config.source.column_lists && pg15;
    let mut out = Vec::new();
    for (schema, table) in config.rules.tables() {
        let Some(info) = catalog.table(&schema, &table) else {
            continue;
        };
        if !info.replicates_updates {
            continue;
        }
        let columns =
            (lists && info.replica_identity != ReplicaIdentity::Full && !info.partitioned)
                .then(|| {
                    let needed: BTreeSet<&str> = config
                        .rules
                        .rules
                        .iter()
                        .filter(|r| r.schema == schema && r.table == table)
                        .flat_map(|r| r.columns())
                        .chain(info.identity_columns.iter().map(String::as_str))
                        .collect();
                    info.columns
                        .iter()
                        .filter(|c| needed.contains(c.as_str()))
                        .cloned()
                        .collect::<Vec<_>>()
                })
                .filter(|cols| cols.len() < info.columns.len());
        let row_filter = pg15.then(|| row_filter(config, &schema, &table)).flatten();
        out.push(PublishedTable {
            schema,
            table,
            columns,
            row_filter,
        });
    }
    out
}

/// How a managed publication differs from the rules' (PostgreSQL 15+).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PublicationDrift {
    /// Its tables, column lists or row filters differ: `ALTER PUBLICATION ... SET TABLE`.
    pub differs: bool,
    /// Tables that may now send rows or columns the old definition held back. The
    /// backlog before the change is decoded with the old definition, so these tables'
    /// rules apply their fallbacks once.
    pub widened: Vec<(String, String)>,
}

/// Compares publication `name` with `desired` (`snapshot`: the catalog's facts about
/// its tables).
pub async fn publication_drift(
    client: &Client,
    snapshot: &Snapshot,
    name: &str,
    desired: &[PublishedTable],
) -> Result<PublicationDrift, tokio_postgres::Error> {
    let current = catalog::publication_tables(client, name).await?;
    let mut drift = PublicationDrift {
        differs: current.len() != desired.len(),
        widened: Vec::new(),
    };
    let mut publishes_generated = None;
    let sorted = |v: Option<Vec<String>>| {
        v.map(|mut v| {
            v.sort();
            v
        })
    };
    for want in desired {
        let Some(now) = current
            .iter()
            .find(|c| c.schema == want.schema && c.table == want.table)
        else {
            drift.differs = true;
            drift
                .widened
                .push((want.schema.clone(), want.table.clone()));
            continue;
        };
        let want_columns = match &want.columns {
            Some(cols) => Some(cols.clone()),
            // A whole table: the columns pg_publication_tables lists for it, which leave
            // out virtual generated columns, and from 16 on stored ones unless the
            // publication publishes them.
            None => match snapshot.table(&want.schema, &want.table) {
                None => None,
                Some(info) => {
                    let generated = snapshot.generated(&want.schema, &want.table);
                    if publishes_generated.is_none() {
                        // pg_publication_tables lists stored generated columns on 15
                        // (though it sends none), not on 16 and 17, and on 18 only when
                        // the publication publishes them.
                        publishes_generated = Some(
                            snapshot.server_version < 160000
                                || catalog::publishes_generated_columns(client, name).await?,
                        );
                    }
                    let stored_published = publishes_generated == Some(true);
                    Some(
                        info.columns
                            .iter()
                            .filter(|c| {
                                !generated
                                    .iter()
                                    .any(|(g, kind)| g == *c && (kind == "v" || !stored_published))
                            })
                            .cloned()
                            .collect(),
                    )
                }
            },
        };
        // PostgreSQL keeps a filter in its own words: compare in those.
        let want_filter = match &want.row_filter {
            None => None,
            Some(f) => catalog::probe_row_filter(client, &want.schema, &want.table, f)
                .await?
                .ok()
                .map(|probed| probed.canonical),
        };
        // Before PostgreSQL 15 a table is published whole, unfiltered: only the set of
        // tables can differ.
        let columns_differ =
            now.columns.is_some() && sorted(now.columns.clone()) != sorted(want_columns);
        if columns_differ || now.row_filter != want_filter {
            drift.differs = true;
            drift
                .widened
                .push((want.schema.clone(), want.table.clone()));
        }
    }
    Ok(drift)
}

/// The row filter of a table: when every rule of the table has a `where`, their OR;
/// otherwise none (a rule without one needs every row).
pub fn row_filter(config: &Config, schema: &str, table: &str) -> Option<String> {
    let filters: Option<Vec<&str>> = config
        .rules
        .rules
        .iter()
        .filter(|r| r.schema == schema && r.table == table)
        .map(|r| r.row_filter.as_deref())
        .collect();
    let mut filters = filters?;
    filters.sort_unstable();
    filters.dedup();
    match filters.as_slice() {
        [] => None,
        [one] => Some((*one).to_owned()),
        many => Some(
            many.iter()
                .map(|f| format!("({f})"))
                .collect::<Vec<_>>()
                .join(" OR "),
        ),
    }
}
