//! `check` of the rules' tables as the publication sees them: row filters, replica
//! identities and their fixes.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::CheckReport;
use crate::config::Config;
use crate::diagnostics::Problem;
use crate::replication::catalog::{self, quote_ident, quote_table};
use crate::replication::relation::ReplicaIdentity;

/// Each rule's `where` as PostgreSQL takes it: a valid row filter, and one whose
/// columns the replica identity covers (otherwise PostgreSQL refuses the application's
/// UPDATE and DELETE on the table once the filter is in the publication).
pub(super) async fn check_row_filters(
    client: &Client,
    config: &Config,
    snapshot: &catalog::Snapshot,
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
    let pg15 = snapshot.server_version >= 150000;
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
        let Some(info) = snapshot.table(&rule.schema, &rule.table) else {
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
pub(super) fn identity_fix(info: &catalog::TableInfo) -> String {
    info.full_identity_sql()
}

/// The identity in force, naming the partitions that decide it.
pub(super) fn identity_label(info: &catalog::TableInfo) -> String {
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

pub(super) fn join_ticked(items: &BTreeSet<&str>) -> String {
    items
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
