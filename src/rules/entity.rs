//! Entity events: what a row change announces to applications with caches of their
//! own (entity, operation, id, changed fields), waiting for its commit and then stamped
//! with it. The one model every event sink sends; never sent from here.

use std::sync::Arc;

use serde_json::{Map, Value as Json};

use super::compile::BoundRule;
use crate::replication::event::{Cell, Op, RowEvent};

/// An entity event waiting for its transaction's commit position and time.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEvent {
    /// Entity name.
    pub entity: Arc<str>,
    /// insert, update, delete, truncate, or overflow (too many rows: refresh all).
    pub op: &'static str,
    /// Primary key value(s), `null` when unknown.
    pub id: Json,
    /// Changed columns with their new values (deleted rows: the old values), `null`
    /// when not known.
    pub fields: Json,
    /// `schema.table`.
    pub table: Arc<str>,
}

impl PendingEvent {
    /// "Refresh everything of this entity": what is known of its rows is not enough.
    pub fn overflow(entity: &str, rule: &crate::rules::compile::Rule) -> PendingEvent {
        PendingEvent {
            entity: entity.into(),
            op: "overflow",
            id: Json::Null,
            fields: Json::Null,
            table: rule.qualified_table().into(),
        }
    }

    /// The event stamped with its transaction's commit and its place in it; its id is
    /// `<slot>:<commit lsn>:<place>` (the slot keeps pginvals on one database apart).
    pub fn stamp(&self, slot: &str, lsn: &str, commit_time: &str, position: u64) -> Event {
        self.stamp_as(format!("{slot}:{lsn}:{position}"), lsn, commit_time)
    }

    /// The event with an id of its own, for events of no transaction.
    pub fn stamp_as(&self, id: String, lsn: &str, commit_time: &str) -> Event {
        let json = serde_json::json!({
            "entity": &*self.entity,
            "op": self.op,
            "id": self.id,
            "fields": self.fields,
            "table": &*self.table,
            "lsn": lsn,
            "commit_time": commit_time,
            "event_id": id,
        })
        .to_string();
        Event {
            id,
            entity: self.entity.clone(),
            op: self.op,
            table: self.table.clone(),
            json,
        }
    }
}

/// An entity event stamped with its commit: the one model every event sink (Redis
/// channel and stream, AMQP, NATS) sends, as the same JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `<slot>:<commit lsn>:<position in the transaction>`, the same on every
    /// redelivery of the transaction: consumers and brokers drop duplicates by it.
    pub id: String,
    /// Entity name, for routing keys and subjects.
    pub entity: Arc<str>,
    /// insert, update, delete, truncate or overflow.
    pub op: &'static str,
    /// `schema.table`.
    pub table: Arc<str>,
    /// The event as JSON.
    pub json: String,
}

fn cell_json(cell: Option<&Cell>) -> Option<Json> {
    match cell? {
        Cell::Null => Some(Json::Null),
        Cell::Text(b) => Some(Json::String(String::from_utf8_lossy(b).into_owned())),
        Cell::Unknown => None,
    }
}

/// The entity event of one row change under `rule` (`id_columns`: the primary key's
/// positions).
pub(super) fn entity_event(
    entity: &str,
    rule: &BoundRule,
    event: &RowEvent,
    id_columns: &[usize],
) -> PendingEvent {
    let columns = &event.table.columns;
    let row = event.new.as_ref().or(event.old.as_ref());
    let id_of = |i: usize| {
        let v = row.and_then(|r| cell_json(r.get(i)));
        // An unchanged-TOAST key in the new image: the old image has it.
        v.or_else(|| event.old.as_ref().and_then(|r| cell_json(r.get(i))))
    };
    let id = match id_columns {
        [] => Json::Null,
        [one] => id_of(*one).unwrap_or(Json::Null),
        many => Json::Object(
            many.iter()
                .filter_map(|&i| {
                    Some((columns.get(i)?.name.clone(), id_of(i).unwrap_or(Json::Null)))
                })
                .collect(),
        ),
    };
    let mut fields = Map::new();
    let known = match (event.op, &event.old, &event.new) {
        (Op::Insert, _, Some(new)) | (Op::Update, None, Some(new)) => {
            for (c, cell) in columns.iter().zip(new) {
                if let Some(v) = cell_json(Some(cell)) {
                    fields.insert(c.name.clone(), v);
                }
            }
            true
        }
        (Op::Update, Some(old), Some(new)) => {
            for ((c, o), n) in columns.iter().zip(old).zip(new) {
                let changed = match (o, n) {
                    (_, Cell::Unknown) => false,
                    (Cell::Unknown, _) => true,
                    (a, b) => a != b,
                };
                if changed && let Some(v) = cell_json(Some(n)) {
                    fields.insert(c.name.clone(), v);
                }
            }
            true
        }
        (Op::Delete, Some(old), _) => {
            for (c, cell) in columns.iter().zip(old) {
                if let Some(v) = cell_json(Some(cell)) {
                    fields.insert(c.name.clone(), v);
                }
            }
            true
        }
        _ => false,
    };
    PendingEvent {
        entity: entity.into(),
        op: event.op.as_str(),
        id,
        fields: if known {
            Json::Object(fields)
        } else {
            Json::Null
        },
        table: rule.rule.qualified_table().into(),
    }
}
