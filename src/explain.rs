//! `pginval explain`: what one row change would invalidate and publish under the
//! configured rules, without touching PostgreSQL or Redis.
//!
//! Builds a `RowEvent` from JSON row images and runs the same rule code as `run`.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value as Json;

use crate::config::Config;
use crate::replication::event::{Cell, Op, RowEvent};
use crate::replication::relation::{ReplicaIdentity, Table, TableColumn};
use crate::rules::invalidation::{Invalidation, TagAction};

/// Why a change could not be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// A row image is not a JSON object.
    #[error("--{which} must be a JSON object of column values, like '{{\"id\": 1}}': {reason}")]
    BadRow {
        /// `old` or `new`.
        which: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The operation needs an image that was not given.
    #[error("--op {op} needs --{which}")]
    MissingRow {
        /// The operation.
        op: String,
        /// The missing image.
        which: &'static str,
    },
    /// The table name is not valid.
    #[error("no rule names table {0}")]
    UnknownTable(String),
}

/// One change to explain.
#[derive(Debug, Clone)]
pub struct Change {
    /// `table` or `schema.table`.
    pub table: String,
    /// insert, update, delete or truncate.
    pub op: String,
    /// Old row image (JSON object), as Postgres would send it.
    pub old: Option<String>,
    /// New row image (JSON object).
    pub new: Option<String>,
}

fn parse_row(
    text: Option<&str>,
    which: &'static str,
) -> Result<Option<serde_json::Map<String, Json>>, ExplainError> {
    let Some(text) = text else { return Ok(None) };
    match serde_json::from_str::<Json>(text) {
        Ok(Json::Object(m)) => Ok(Some(m)),
        Ok(other) => Err(ExplainError::BadRow {
            which,
            reason: format!("got {other}"),
        }),
        Err(e) => Err(ExplainError::BadRow {
            which,
            reason: e.to_string(),
        }),
    }
}

/// Postgres' text form of a JSON value: booleans as `t`/`f`, numbers as written.
fn cell(value: Option<&Json>) -> Cell {
    match value {
        None => Cell::Unknown,
        Some(Json::Null) => Cell::Null,
        Some(Json::Bool(b)) => Cell::Text(Bytes::from_static(if *b { b"t" } else { b"f" })),
        Some(Json::String(s)) => Cell::Text(Bytes::from(s.clone())),
        Some(other) => Cell::Text(Bytes::from(other.to_string())),
    }
}

/// Explains `change` under `config`'s rules; returns the report text.
pub fn explain(config: &Config, change: &Change) -> Result<String, ExplainError> {
    let (schema, name) = match change.table.split_once('.') {
        Some((s, t)) => (s.to_owned(), t.to_owned()),
        None => ("public".to_owned(), change.table.clone()),
    };
    let rules: Vec<_> = config
        .rules
        .rules
        .iter()
        .filter(|r| r.schema == schema && r.table == name)
        .collect();
    if rules.is_empty() {
        return Err(ExplainError::UnknownTable(format!("{schema}.{name}")));
    }
    let old = parse_row(change.old.as_deref(), "old")?;
    let new = parse_row(change.new.as_deref(), "new")?;

    // Every column the rules read or the images name; a column an image leaves out
    // is "not sent", exactly as with a real stream.
    let mut columns: Vec<String> = Vec::new();
    let names = rules
        .iter()
        .flat_map(|r| {
            r.columns()
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .chain(old.iter().flat_map(|m| m.keys().cloned()))
        .chain(new.iter().flat_map(|m| m.keys().cloned()));
    for n in names {
        if !columns.contains(&n) {
            columns.push(n);
        }
    }
    let table = Arc::new(Table {
        oid: 0,
        schema,
        name,
        columns: columns
            .iter()
            .map(|c| TableColumn {
                name: c.clone(),
                is_key: c == "id",
                type_oid: 25,
            })
            .collect(),
        replica_identity: ReplicaIdentity::Full,
    });
    let image = |m: &Option<serde_json::Map<String, Json>>| {
        m.as_ref()
            .map(|m| columns.iter().map(|c| cell(m.get(c))).collect::<Vec<_>>())
    };
    let bound = config.rules.bind(&table);
    let id_columns: Vec<usize> = table.column_index("id").into_iter().collect();
    let mut inv = Invalidation::default();
    let op = match change.op.as_str() {
        "truncate" => {
            inv.add_truncate(&bound);
            None
        }
        "insert" => Some(Op::Insert),
        "update" => Some(Op::Update),
        "delete" => Some(Op::Delete),
        other => {
            return Err(ExplainError::BadRow {
                which: "op",
                reason: format!(
                    "unknown operation {other}: use insert, update, delete or truncate"
                ),
            });
        }
    };
    if let Some(op) = op {
        let needs = |present: bool, which| {
            if present {
                Ok(())
            } else {
                Err(ExplainError::MissingRow {
                    op: change.op.clone(),
                    which,
                })
            }
        };
        match op {
            Op::Insert | Op::Update => needs(new.is_some(), "new")?,
            Op::Delete => needs(old.is_some(), "old")?,
        }
        let event = RowEvent {
            table: table.clone(),
            op,
            old: if op == Op::Insert { None } else { image(&old) },
            new: if op == Op::Delete { None } else { image(&new) },
        };
        inv.add_row(&bound, &event, &id_columns);
    }

    let mut out = String::new();
    let sorted = |it: &mut dyn Iterator<Item = String>| {
        let mut v: Vec<String> = it.collect();
        v.sort();
        v
    };
    for key in sorted(&mut inv.work.keys.iter().cloned()) {
        let _ = writeln!(out, "delete key      {key}");
    }
    for key in sorted(&mut inv.work.fenced.iter().cloned()) {
        let _ = writeln!(
            out,
            "delete key      {key} (fenced: {} first)",
            crate::sink::fence::fence_key(&key)
        );
    }
    let mut expire: Vec<_> = inv.work.expire_keys.iter().collect();
    expire.sort();
    for (key, ms) in expire {
        let _ = writeln!(out, "expire key      {key} (TTL lowered to {ms} ms)");
    }
    for (tag, action) in {
        let mut v: Vec<_> = inv.work.tags.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    } {
        let what = match action {
            TagAction::Delete => "flush tag      ",
            TagAction::Expire(_) => "expire tag     ",
        };
        let _ = writeln!(
            out,
            "{what} {tag} ({})",
            config.tags.tag_key(tag).escape_debug()
        );
    }
    for p in sorted(&mut inv.work.key_patterns.iter().cloned()) {
        let _ = writeln!(out, "delete pattern  {p} (SCAN + UNLINK)");
    }
    for p in sorted(&mut inv.work.tag_patterns.iter().cloned()) {
        let _ = writeln!(out, "flush tags like {p}");
    }
    for (key, ms) in &inv.work.redelete {
        let _ = writeln!(out, "delete again    {key} after {ms} ms");
    }
    for e in &inv.events {
        let _ = writeln!(
            out,
            "event           {}",
            e.stamp("<slot>", "<commit lsn>", "<commit time>", 0).json
        );
    }
    for (reason, n) in &inv.fallbacks {
        let _ = writeln!(out, "fallback used   {} ({n}x)", reason.as_str());
    }
    if out.is_empty() {
        out.push_str("nothing: no rule fires for this change\n");
    }
    Ok(out)
}
