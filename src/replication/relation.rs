//! The relation cache: what each table OID in the stream looks like, as the last
//! `Relation` message described it.
//!
//! Owns the conversion from the wire `Relation` to the domain `Table`; never queries
//! the catalog (the stream itself is the source of truth for the decoded rows).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::pgoutput::Relation;

/// A table's REPLICA IDENTITY setting: which old values Postgres sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// Primary key columns (old key sent only when it changed, and on DELETE).
    Default,
    /// No old values at all.
    Nothing,
    /// The whole old row.
    Full,
    /// The columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// From the `relreplident` character (`d`, `n`, `f`, `i`).
    pub fn from_code(code: u8) -> Option<ReplicaIdentity> {
        Some(match code {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return None,
        })
    }
}

impl ReplicaIdentity {
    /// How much of the old row it sends: FULL everything, DEFAULT and USING INDEX a
    /// key, NOTHING nothing.
    pub fn strength(self) -> u8 {
        match self {
            ReplicaIdentity::Full => 2,
            ReplicaIdentity::Default | ReplicaIdentity::Index => 1,
            ReplicaIdentity::Nothing => 0,
        }
    }
}

impl fmt::Display for ReplicaIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicaIdentity::Default => "DEFAULT",
            ReplicaIdentity::Nothing => "NOTHING",
            ReplicaIdentity::Full => "FULL",
            ReplicaIdentity::Index => "USING INDEX",
        })
    }
}

/// A published column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumn {
    /// Column name.
    pub name: String,
    /// Part of the replica identity.
    pub is_key: bool,
    /// Type OID.
    pub type_oid: u32,
}

/// A table as the stream describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Table OID.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// The published columns, in tuple order.
    pub columns: Vec<TableColumn>,
    /// REPLICA IDENTITY.
    pub replica_identity: ReplicaIdentity,
}

impl Table {
    /// Position of a column in the tuple.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl From<&Relation> for Table {
    fn from(rel: &Relation) -> Table {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Table {
            oid: rel.oid,
            schema: if rel.namespace.is_empty() {
                "pg_catalog".to_owned()
            } else {
                text(&rel.namespace)
            },
            name: text(&rel.name),
            columns: rel
                .columns
                .iter()
                .map(|c| TableColumn {
                    name: text(&c.name),
                    is_key: c.is_key(),
                    type_oid: c.type_oid,
                })
                .collect(),
            replica_identity: ReplicaIdentity::from_code(rel.replica_identity)
                .unwrap_or(ReplicaIdentity::Default),
        }
    }
}

/// What a partitioned table's old rows really carry, from the catalog: PostgreSQL
/// labels them by the root's identity, but each partition logs by its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveIdentity {
    /// The weakest identity among the root and its partitions.
    pub replica_identity: ReplicaIdentity,
    /// The columns every one of them sends in old rows.
    pub columns: Vec<String>,
}

impl Table {
    /// The table as its partitions really send it: old values outside `identity`
    /// count as not sent.
    pub fn with_identity(mut self, identity: &EffectiveIdentity) -> Table {
        if identity.replica_identity != ReplicaIdentity::Full {
            self.replica_identity = identity.replica_identity;
            for column in &mut self.columns {
                column.is_key = identity.columns.contains(&column.name);
            }
        }
        self
    }
}

/// Tables seen in the stream, by OID.
#[derive(Debug, Default)]
pub struct RelationCache {
    tables: HashMap<u32, Arc<Table>>,
}

impl RelationCache {
    /// Records (or replaces, after a schema change) a table's description; for a
    /// partitioned table, `identity` is what its partitions really send.
    pub fn update(&mut self, rel: &Relation, identity: Option<&EffectiveIdentity>) -> Arc<Table> {
        let table = Table::from(rel);
        let table = Arc::new(match identity {
            Some(identity) => table.with_identity(identity),
            None => table,
        });
        self.tables.insert(rel.oid, table.clone());
        table
    }

    /// The table with this OID, if a `Relation` message described it.
    pub fn get(&self, oid: u32) -> Option<&Arc<Table>> {
        self.tables.get(&oid)
    }

    /// Forgets everything (a new replication session resends every `Relation`).
    pub fn clear(&mut self) {
        self.tables.clear();
    }
}
