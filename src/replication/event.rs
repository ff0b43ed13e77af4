//! RowEvent: one committed row change in domain terms, converted from pgoutput.
//!
//! The only place where wire tuples become domain rows; `rules/` sees `RowEvent`
//! and never a pgoutput type.

use std::sync::Arc;

use bytes::Bytes;

use super::pgoutput::{self, OldTuple};
use super::relation::{ReplicaIdentity, Table};

/// The kind of row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
}

impl Op {
    /// Lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// One column value of a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// Not sent: an unchanged TOAST value, a column outside the replica identity in a
    /// key-only old image, or a value in binary form. Never to be read as NULL.
    Unknown,
    /// The value in Postgres' text output form (`42`, `t`, a uuid's text).
    Text(Bytes),
}

/// A row change of a committed (or committing) transaction.
#[derive(Debug, Clone)]
pub struct RowEvent {
    /// The table, as the stream described it.
    pub table: Arc<Table>,
    /// What happened.
    pub op: Op,
    /// The old image, when Postgres sent one.
    pub old: Option<Vec<Cell>>,
    /// The new image (INSERT and UPDATE).
    pub new: Option<Vec<Cell>>,
}

fn cells(values: pgoutput::Tuple) -> Vec<Cell> {
    values
        .into_iter()
        .map(|v| match v {
            pgoutput::Value::Null => Cell::Null,
            pgoutput::Value::Text(b) => Cell::Text(b),
            // pginval asks for text; binary values cannot be rendered as text keys.
            pgoutput::Value::UnchangedToast | pgoutput::Value::Binary(_) => Cell::Unknown,
        })
        .collect()
}

/// A key-only image carries NULL for every column outside the identity: those are
/// unknown, not NULL. So does a "full" image when the identity in force is not FULL:
/// a partition with its own REPLICA IDENTITY logs only its key, and PostgreSQL labels
/// that image by the root's identity (the relation cache knows the partitions').
fn old_cells(table: &Table, old: OldTuple) -> Vec<Cell> {
    let (key_only, t) = match old {
        OldTuple::Full(t) => (table.replica_identity != ReplicaIdentity::Full, t),
        OldTuple::Key(t) => (true, t),
    };
    let mut out = cells(t);
    if key_only {
        for (cell, column) in out.iter_mut().zip(&table.columns) {
            if !column.is_key {
                *cell = Cell::Unknown;
            }
        }
    }
    out
}

impl RowEvent {
    /// From an `Insert` message.
    pub fn insert(table: Arc<Table>, msg: pgoutput::Insert) -> RowEvent {
        RowEvent {
            table,
            op: Op::Insert,
            old: None,
            new: Some(cells(msg.new)),
        }
    }

    /// From an `Update` message.
    pub fn update(table: Arc<Table>, msg: pgoutput::Update) -> RowEvent {
        let old = msg.old.map(|o| old_cells(&table, o));
        RowEvent {
            op: Op::Update,
            old,
            new: Some(cells(msg.new)),
            table,
        }
    }

    /// From a `Delete` message.
    pub fn delete(table: Arc<Table>, msg: pgoutput::Delete) -> RowEvent {
        let old = old_cells(&table, msg.old);
        RowEvent {
            table,
            op: Op::Delete,
            old: Some(old),
            new: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::relation::TableColumn;

    fn table() -> Arc<Table> {
        let col = |name: &str, is_key| TableColumn {
            name: name.into(),
            is_key,
            type_oid: 23,
        };
        Arc::new(Table {
            oid: 1,
            schema: "public".into(),
            name: "posts".into(),
            columns: vec![col("id", true), col("author_id", false)],
            replica_identity: ReplicaIdentity::Default,
        })
    }

    #[test]
    fn key_only_old_image_marks_non_key_columns_unknown_not_null() {
        let ev = RowEvent::delete(
            table(),
            pgoutput::Delete {
                relation: 1,
                old: OldTuple::Key(vec![
                    pgoutput::Value::Text(Bytes::from_static(b"7")),
                    pgoutput::Value::Null,
                ]),
            },
        );
        assert_eq!(
            ev.old.unwrap(),
            vec![Cell::Text(Bytes::from_static(b"7")), Cell::Unknown]
        );
    }

    #[test]
    fn full_image_under_a_weaker_identity_in_force_is_key_only() {
        // A partition with DEFAULT identity under a FULL root: PostgreSQL labels the
        // key-only old row as full, with NULL for what it did not log.
        let ev = RowEvent::delete(
            table(),
            pgoutput::Delete {
                relation: 1,
                old: OldTuple::Full(vec![
                    pgoutput::Value::Text(Bytes::from_static(b"7")),
                    pgoutput::Value::Null,
                ]),
            },
        );
        assert_eq!(
            ev.old.unwrap(),
            vec![Cell::Text(Bytes::from_static(b"7")), Cell::Unknown]
        );
    }

    #[test]
    fn unchanged_toast_is_unknown() {
        let ev = RowEvent::insert(
            table(),
            pgoutput::Insert {
                relation: 1,
                new: vec![pgoutput::Value::Null, pgoutput::Value::UnchangedToast],
            },
        );
        assert_eq!(ev.new.unwrap(), vec![Cell::Null, Cell::Unknown]);
    }
}
