//! `pginval status`: the slot, the publication and each rule's coverage by the
//! table's replica identity, for a terminal or as JSON.
//!
//! Reads the catalog only.

use serde::Serialize;
use tokio_postgres::Client;

use crate::check;
use crate::config::Config;
use crate::replication::catalog;

/// The slot as the server reports it.
#[derive(Debug, Serialize)]
pub struct SlotStatus {
    /// Slot name.
    pub name: String,
    /// Whether it exists.
    pub exists: bool,
    /// Whether a process streams from it.
    pub active: bool,
    /// Confirmed flush position.
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the slot retains, in bytes.
    pub retained_wal_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// The publication.
#[derive(Debug, Serialize)]
pub struct PublicationStatus {
    /// Publication name.
    pub name: String,
    /// Whether it exists.
    pub exists: bool,
    /// Published tables, `schema.table`.
    pub tables: Vec<String>,
}

/// One rule's coverage.
#[derive(Debug, Serialize)]
pub struct RuleStatus {
    /// `#N`.
    pub rule: usize,
    /// `schema.table`.
    pub table: String,
    /// Whether `check` finds nothing wrong with it.
    pub ok: bool,
    /// The problems, with fixes.
    pub problems: Vec<String>,
}

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The server's wal_level.
    pub wal_level: String,
    /// The slot.
    pub slot: SlotStatus,
    /// The publication.
    pub publication: PublicationStatus,
    /// Each rule.
    pub rules: Vec<RuleStatus>,
}

/// Reads the status of the database behind `client`.
pub async fn status(client: &Client, config: &Config) -> Result<Status, tokio_postgres::Error> {
    let slot_name = &config.source.slot;
    let slot = catalog::slot(client, slot_name).await?;
    let retained = catalog::slot_retained_wal(client, slot_name).await?;
    let publ = catalog::publication(client, &config.source.publication).await?;
    let snapshot = catalog::Snapshot::read(client, config.rules.tables()).await?;
    let report = check::check_with(client, config, &snapshot).await?;
    let rules = config
        .rules
        .rules
        .iter()
        .map(|r| {
            let problems: Vec<String> = report
                .problems
                .iter()
                .filter(|p| p.message.starts_with(&format!("rule #{} ", r.number)))
                .map(|p| match &p.fix {
                    Some(fix) => format!("{} (fix: {})", p.message, fix.replace('\n', " ")),
                    None => p.message.clone(),
                })
                .collect();
            RuleStatus {
                rule: r.number,
                table: r.qualified_table(),
                ok: problems.is_empty(),
                problems,
            }
        })
        .collect();
    Ok(Status {
        wal_level: catalog::wal_level(client).await?,
        slot: SlotStatus {
            name: slot_name.clone(),
            exists: slot.is_some(),
            active: slot.as_ref().is_some_and(|s| s.active),
            confirmed_flush_lsn: slot.as_ref().and_then(|s| s.confirmed_flush_lsn.clone()),
            retained_wal_bytes: retained,
            wal_status: slot.and_then(|s| s.wal_status),
        },
        publication: PublicationStatus {
            name: config.source.publication.clone(),
            exists: publ.is_some(),
            tables: publ
                .map(|p| p.tables.iter().map(|(s, t)| format!("{s}.{t}")).collect())
                .unwrap_or_default(),
        },
        rules,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "wal_level      {}", self.wal_level)?;
        let s = &self.slot;
        if s.exists {
            writeln!(
                f,
                "slot           {} ({}), confirmed {}, retains {} of WAL, wal_status {}",
                s.name,
                if s.active { "active" } else { "inactive" },
                s.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                s.retained_wal_bytes.map_or("-".to_owned(), |b| format!(
                    "{:.1} MiB",
                    b as f64 / 1048576.0
                )),
                s.wal_status.as_deref().unwrap_or("-"),
            )?;
        } else {
            writeln!(
                f,
                "slot           {} does not exist (run creates it)",
                s.name
            )?;
        }
        let p = &self.publication;
        if p.exists {
            writeln!(f, "publication    {}: {}", p.name, p.tables.join(", "))?;
        } else {
            writeln!(
                f,
                "publication    {} does not exist (run creates it)",
                p.name
            )?;
        }
        for r in &self.rules {
            if r.ok {
                writeln!(f, "rule #{:<8} {}: covered", r.rule, r.table)?;
            } else {
                writeln!(
                    f,
                    "rule #{:<8} {}: {}",
                    r.rule,
                    r.table,
                    r.problems.join("; ")
                )?;
            }
        }
        Ok(())
    }
}
