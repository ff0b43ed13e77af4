//! Rendering bound rules against row events into an `Invalidation`: the deduplicated
//! keys, tags, patterns and entity events one transaction (or a batch of them) makes
//! stale or announces.
//!
//! Never talks to Redis. Where exact invalidation is impossible (a value that was not
//! sent, a column gone from the table, a TRUNCATE, too many rows in one transaction)
//! the rule's fallback is used instead (over-invalidation), and counted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use crate::replication::event::{Cell, Op, RowEvent};
use crate::replication::relation::ReplicaIdentity;

use super::compile::{Action, BoundPart, BoundRule, BoundTemplate, Fallback, Rule};
use super::template::{ImageSelector, push_glob_escaped, push_value};

/// What to do with a tag's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagAction {
    /// Delete them.
    Delete,
    /// Lower their TTL to this many milliseconds.
    Expire(u64),
}

/// Why a fallback was used (a metric and log label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FallbackReason {
    /// A needed value was not sent.
    ValueNotSent,
    /// A template's column is missing from the table.
    SchemaChange,
    /// TRUNCATE.
    Truncate,
    /// More rows in one transaction than the rule's limit.
    TooManyRows,
    /// The replication slot was lost: changes in the gap are unknown.
    SlotLost,
    /// The managed publication changed: changes before it were filtered by the old one.
    PublicationChanged,
    /// A rule table was renamed or replaced.
    TableRenamed,
    /// A partition was truncated, detached, attached or dropped (told by the triggers
    /// of `sql/partitions.sql`; PostgreSQL sends nothing of it).
    PartitionChanged,
    /// A streamed transaction committed whose changes pginval did not see.
    StreamUnseen,
}

impl FallbackReason {
    /// Short label.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::ValueNotSent => "value_not_sent",
            FallbackReason::SchemaChange => "schema_change",
            FallbackReason::Truncate => "truncate",
            FallbackReason::TooManyRows => "too_many_rows",
            FallbackReason::SlotLost => "slot_lost",
            FallbackReason::PublicationChanged => "publication_changed",
            FallbackReason::TableRenamed => "table_renamed",
            FallbackReason::PartitionChanged => "partition_changed",
            FallbackReason::StreamUnseen => "stream_unseen",
        }
    }
}

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

/// What goes to the sink: the Redis work of one or more transactions, deduplicated.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Work {
    /// Cache keys to delete.
    pub keys: HashSet<String>,
    /// Cache keys whose TTL is to be lowered to this many milliseconds.
    pub expire_keys: HashMap<String, u64>,
    /// Tags to flush.
    pub tags: HashMap<String, TagAction>,
    /// Key globs to delete by SCAN.
    pub key_patterns: HashSet<String>,
    /// Tag globs whose tags are to be flushed, found by SCAN.
    pub tag_patterns: HashSet<String>,
    /// Keys to delete a second time after this many milliseconds.
    pub redelete: HashMap<String, u64>,
    /// Those of `keys` whose fence is written before they are deleted (`fence = true`).
    /// Not counted in [`Work::len`]: each is one of `keys`.
    pub fenced: HashSet<String>,
}

impl Work {
    /// Nothing to do in Redis.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of distinct entries.
    pub fn len(&self) -> usize {
        self.keys.len()
            + self.expire_keys.len()
            + self.tags.len()
            + self.key_patterns.len()
            + self.tag_patterns.len()
            + self.redelete.len()
    }

    /// Adds everything of `other`, deduplicating. Deleting a key wins over expiring it;
    /// the lowest TTL and the latest second delete win.
    pub fn merge(&mut self, other: Work) {
        // (A held part's keys are packed apart from its work, its fenced keys not.)
        if self.is_empty() && self.fenced.is_empty() {
            *self = other;
            return;
        }
        self.keys.extend(other.keys);
        for (k, ms) in other.expire_keys {
            let e = self.expire_keys.entry(k).or_insert(ms);
            *e = (*e).min(ms);
        }
        for (t, a) in other.tags {
            add_tag(&mut self.tags, t, a);
        }
        self.key_patterns.extend(other.key_patterns);
        self.tag_patterns.extend(other.tag_patterns);
        for (k, ms) in other.redelete {
            let e = self.redelete.entry(k).or_insert(ms);
            *e = (*e).max(ms);
        }
        self.fenced.extend(other.fenced);
    }

    /// Adds keys and tags an application named in a `pg_logical_emit_message` hint.
    pub fn add_hint(
        &mut self,
        keys: impl IntoIterator<Item = String>,
        tags: impl IntoIterator<Item = String>,
    ) {
        self.keys.extend(keys);
        for t in tags {
            add_tag(&mut self.tags, t, TagAction::Delete);
        }
    }
}

/// What an open transaction accumulates while it streams: the work for the sink and
/// its entity events so far, plus its bookkeeping (fallbacks used, keys rendered per
/// rule, rows per rule against `max_keys_per_transaction`), which stays with the
/// transaction when its work goes on in parts.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Invalidation {
    /// The Redis work not yet handed on.
    pub work: Work,
    /// Entity events, in change order.
    pub events: Vec<PendingEvent>,
    /// Fallbacks used, by reason.
    pub fallbacks: HashMap<FallbackReason, u64>,
    /// Keys and tags rendered, by rule number (before deduplication; for metrics).
    pub rendered: HashMap<usize, (u64, u64)>,
    /// Rows seen per rule in the open transaction (for `max_keys_per_transaction`).
    rows: HashMap<usize, usize>,
    /// Rules whose fallback replaces their exact keys for the rest of the transaction.
    overflowed: HashSet<usize>,
    /// Every rule's next row switches it to its fallback (see [`Invalidation::cap`]).
    capped: bool,
}

impl Invalidation {
    /// Nothing waits to be handed on: no Redis work, no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries waiting to be handed on: Redis work and events.
    pub fn len(&self) -> usize {
        self.work.len() + self.events.len()
    }

    /// Total fallbacks used.
    pub fn fallback_count(&self) -> u64 {
        self.fallbacks.values().sum()
    }

    /// Takes the work and events so far (a part of a big transaction goes on before
    /// its COMMIT); the bookkeeping stays.
    pub fn take_work(&mut self) -> (Work, Vec<PendingEvent>) {
        (
            std::mem::take(&mut self.work),
            std::mem::take(&mut self.events),
        )
    }

    /// Every rule of `rules` has passed its row limit in this transaction (its
    /// fallback is in place): further rows of the table change nothing.
    pub fn saturated(&self, rules: &[BoundRule]) -> bool {
        rules
            .iter()
            .all(|r| self.overflowed.contains(&r.rule.number))
    }

    /// From now on each rule's next row applies the rule's fallback instead of exact
    /// keys, as past `max_keys_per_transaction`: the memory bound of a transaction
    /// held until its commit (streamed by PostgreSQL before it commits).
    pub fn cap(&mut self) {
        self.capped = true;
    }

    /// The rules a row of the transaction fired (numbers).
    pub fn rules_fired(&self) -> impl Iterator<Item = usize> + '_ {
        self.rows.keys().copied()
    }

    /// Whether [`Invalidation::cap`] was called.
    pub fn capped(&self) -> bool {
        self.capped
    }

    /// Applies again the fallback (and overflow event) of every rule past its limit:
    /// the part that held them was dropped (an aborted subtransaction's), and the rows
    /// those rules skip from then on are covered only by them. `rules`: every rule.
    pub fn reapply_overflows(&mut self, rules: &[Rule]) {
        let overflowed: Vec<&Rule> = rules
            .iter()
            .filter(|r| self.overflowed.contains(&r.number))
            .collect();
        for rule in overflowed {
            self.add_rule_fallback(&rule.effective_fallback(), FallbackReason::TooManyRows);
            if let Some(entity) = &rule.entity {
                self.events.push(PendingEvent::overflow(entity, rule));
            }
        }
    }

    /// Applies `rules` to one row change. `id_columns` are the tuple positions of the
    /// table's primary key (for entity events).
    pub fn add_row(&mut self, rules: &[BoundRule], event: &RowEvent, id_columns: &[usize]) {
        for rule in rules {
            if !rule.rule.ops.fires(event.op) || !condition_holds(rule, event) {
                continue;
            }
            let rows = self.rows.entry(rule.rule.number).or_default();
            *rows += 1;
            let rows = *rows;
            if rows > rule.rule.max_keys_per_transaction || self.capped {
                if self.overflowed.insert(rule.rule.number) {
                    self.add_fallback(rule, FallbackReason::TooManyRows);
                    if let Some(entity) = &rule.rule.entity {
                        self.events.push(PendingEvent::overflow(entity, &rule.rule));
                    }
                }
                continue;
            }
            // Templates that cannot render exactly (a value not sent, a column gone from
            // the table) are applied as their own wildcards: a declared fallback that
            // names something else must not leave them stale. The declared fallback is
            // applied on top, as the rule asks for whenever exact invalidation fails.
            let mut inexact = Vec::new();
            let (mut rendered_keys, mut rendered_tags) = (0u64, 0u64);
            for t in &rule.keys {
                let unknown = match rule.rule.action {
                    Action::Delete => render(t, event, false, &mut |key| {
                        rendered_keys += 1;
                        if let Some(delay) = rule.rule.redelete_after {
                            let ms = delay.as_millis() as u64;
                            let e = self.work.redelete.entry(key.clone()).or_insert(ms);
                            *e = (*e).max(ms);
                        }
                        if rule.rule.fence {
                            self.work.fenced.insert(key.clone());
                        }
                        self.work.keys.insert(key);
                    }),
                    Action::Expire(ttl) => {
                        let ms = ttl.as_millis() as u64;
                        render(t, event, false, &mut |key| {
                            rendered_keys += 1;
                            let e = self.work.expire_keys.entry(key).or_insert(ms);
                            *e = (*e).min(ms);
                        })
                    }
                };
                if unknown {
                    inexact.push((t, false));
                }
            }
            let tag_action = match rule.rule.action {
                Action::Delete => TagAction::Delete,
                Action::Expire(ttl) => TagAction::Expire(ttl.as_millis() as u64),
            };
            for t in &rule.tags {
                if render(t, event, false, &mut |tag| {
                    rendered_tags += 1;
                    add_tag(&mut self.work.tags, tag, tag_action)
                }) {
                    inexact.push((t, true));
                }
            }
            for t in &rule.patterns {
                if render(t, event, true, &mut |p| {
                    self.work.key_patterns.insert(p);
                }) {
                    inexact.push((t, false));
                }
            }
            let counts = self.rendered.entry(rule.rule.number).or_default();
            counts.0 += rendered_keys;
            counts.1 += rendered_tags;
            if !inexact.is_empty() {
                let reason = if rule.broken {
                    FallbackReason::SchemaChange
                } else {
                    FallbackReason::ValueNotSent
                };
                for (t, is_tag) in inexact {
                    let glob = t.template.wildcard_pattern();
                    if is_tag {
                        self.work.tag_patterns.insert(glob);
                    } else {
                        self.work.key_patterns.insert(glob);
                    }
                }
                match &rule.rule.fallback {
                    Some(declared) => self.add_rule_fallback(declared, reason),
                    None => *self.fallbacks.entry(reason).or_default() += 1,
                }
            }
            if let Some(entity) = &rule.rule.entity {
                self.events
                    .push(entity_event(entity, rule, event, id_columns));
            }
        }
    }

    /// TRUNCATE: no rows are sent, so every rule that fires on truncate uses its fallback.
    pub fn add_truncate(&mut self, rules: &[BoundRule]) {
        for rule in rules.iter().filter(|r| r.rule.ops.truncate) {
            self.add_fallback(rule, FallbackReason::Truncate);
            self.add_truncate_event(&rule.rule);
        }
    }

    /// A partition of `rule`'s table was truncated, detached, attached or dropped:
    /// rows left (or joined) the table unseen, so the rule is applied as for a
    /// TRUNCATE of the table, whatever its `on` says (the rows did not go by TRUNCATE
    /// of the table itself).
    pub fn add_partition_change(&mut self, rule: &Rule) {
        self.add_rule_fallback(&rule.effective_fallback(), FallbackReason::PartitionChanged);
        self.add_truncate_event(rule);
    }

    fn add_truncate_event(&mut self, rule: &Rule) {
        if let Some(entity) = &rule.entity {
            self.events.push(PendingEvent {
                entity: entity.as_str().into(),
                op: "truncate",
                id: Json::Null,
                fields: Json::Null,
                table: rule.qualified_table().into(),
            });
        }
    }

    fn add_fallback(&mut self, rule: &BoundRule, reason: FallbackReason) {
        self.add_rule_fallback(&rule.fallback, reason);
    }

    /// Applies a rule's fallback (its declared one or its wildcards), counting `reason`.
    pub fn add_rule_fallback(&mut self, fallback: &Fallback, reason: FallbackReason) {
        *self.fallbacks.entry(reason).or_default() += 1;
        for t in &fallback.tags {
            if t.contains(['*', '?', '[']) {
                self.work.tag_patterns.insert(t.clone());
            } else {
                add_tag(&mut self.work.tags, t.clone(), TagAction::Delete);
            }
        }
        self.work
            .key_patterns
            .extend(fallback.patterns.iter().cloned());
    }
}

fn add_tag(tags: &mut HashMap<String, TagAction>, tag: String, action: TagAction) {
    let e = tags.entry(tag).or_insert(action);
    *e = match (*e, action) {
        (TagAction::Delete, _) | (_, TagAction::Delete) => TagAction::Delete,
        (TagAction::Expire(a), TagAction::Expire(b)) => TagAction::Expire(a.min(b)),
    };
}

/// Column conditions: UPDATE fires only when a condition column changed. An unknown
/// old value counts as changed (fail-safe); an unchanged TOAST value as unchanged.
fn condition_holds(rule: &BoundRule, event: &RowEvent) -> bool {
    if rule.condition.is_empty() || event.op != Op::Update {
        return true;
    }
    let (Some(old), Some(new)) = (&event.old, &event.new) else {
        return true;
    };
    rule.condition.iter().any(|index| {
        let Some(i) = *index else { return true };
        match (old.get(i), new.get(i)) {
            (_, Some(Cell::Unknown)) => false,
            (Some(Cell::Unknown) | None, _) | (_, None) => true,
            (Some(a), Some(b)) => a != b,
        }
    })
}

fn cell_json(cell: Option<&Cell>) -> Option<Json> {
    match cell? {
        Cell::Null => Some(Json::Null),
        Cell::Text(b) => Some(Json::String(String::from_utf8_lossy(b).into_owned())),
        Cell::Unknown => None,
    }
}

fn entity_event(
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

/// The images a change carries, in the order `{col}` reads them.
#[derive(Clone, Copy)]
enum Image {
    New,
    Old,
}

/// Renders `t` against every image of `event`, calling `out` for each result.
/// Returns true when some value was not sent or a column is gone from the table, so
/// exact rendering was impossible.
/// `glob`: the template is a pattern; values are glob-escaped.
fn render(t: &BoundTemplate, event: &RowEvent, glob: bool, out: &mut dyn FnMut(String)) -> bool {
    if t.is_broken() {
        return true;
    }
    // An UPDATE without an old image still had an old row: `{col}` reads it too, and
    // `lookup` says which of its values are known (the unchanged identity) and which
    // are not (everything else: exact rendering is impossible).
    let has_old = event.old.is_some() || event.op == Op::Update;
    let primaries = [
        event.new.as_ref().map(|_| Image::New),
        has_old.then_some(Image::Old),
    ];
    let mut unknown = false;
    for primary in primaries.into_iter().flatten() {
        match render_one(t, event, primary, glob) {
            // Without an old image, what the old row can render is its unchanged
            // identity: the key the new row rendered already.
            Rendered::Key(_) if image_is_old(primary) && event.old.is_none() => {}
            Rendered::Key(key) => out(key),
            Rendered::Nothing => {}
            Rendered::Unknown => unknown = true,
        }
        // A template that names only explicit images renders the same for both primaries.
        if !t.parts.iter().any(|p| {
            matches!(
                p,
                BoundPart::Column {
                    image: ImageSelector::Any,
                    ..
                }
            )
        }) {
            break;
        }
    }
    unknown
}

enum Rendered {
    Key(String),
    /// A value is NULL or the chosen image is absent: this image names no cache entry.
    Nothing,
    /// A needed value was not sent: exact rendering is impossible.
    Unknown,
}

fn render_one(t: &BoundTemplate, event: &RowEvent, primary: Image, glob: bool) -> Rendered {
    let mut key = String::with_capacity(t.template.source().len() + 16);
    for part in &t.parts {
        match part {
            BoundPart::Literal(s) => key.push_str(s),
            BoundPart::Missing(_) => return Rendered::Unknown,
            BoundPart::Column { image, index } => {
                let image = match image {
                    ImageSelector::Any => primary,
                    ImageSelector::Old => Image::Old,
                    ImageSelector::New => Image::New,
                };
                match lookup(event, image, *index) {
                    Lookup::Text(text) if glob => {
                        push_glob_escaped(&mut key, &String::from_utf8_lossy(text))
                    }
                    Lookup::Text(text) => push_value(&mut key, text),
                    Lookup::Absent => return Rendered::Nothing,
                    Lookup::Unknown => return Rendered::Unknown,
                }
            }
        }
    }
    Rendered::Key(key)
}

enum Lookup<'a> {
    Text(&'a [u8]),
    /// NULL, or the image is not part of this change (INSERT has no old image).
    Absent,
    Unknown,
}

fn image_is_old(image: Image) -> bool {
    matches!(image, Image::Old)
}

fn lookup(event: &RowEvent, image: Image, index: usize) -> Lookup<'_> {
    fn cell(row: &Option<Vec<Cell>>, index: usize) -> Option<Option<&Cell>> {
        row.as_ref().map(|r| r.get(index))
    }
    let found = match image {
        Image::New => cell(&event.new, index),
        Image::Old => cell(&event.old, index),
    };
    match found {
        // An UPDATE without an old image (REPLICA IDENTITY DEFAULT, key unchanged): the
        // old key columns equal the new ones; other old values are unknown. Under FULL
        // the old row always comes, so its absence means the identity was not what the
        // stream says (a partition with its own identity): nothing old is known.
        None if image_is_old(image) && event.op == Op::Update => {
            let is_key = event.table.replica_identity != ReplicaIdentity::Full
                && event.table.columns.get(index).is_some_and(|c| c.is_key);
            match (is_key, cell(&event.new, index)) {
                (true, Some(Some(Cell::Text(b)))) => Lookup::Text(b),
                (true, Some(Some(Cell::Null))) => Lookup::Absent,
                _ => Lookup::Unknown,
            }
        }
        // `{old.x}` on an INSERT (or `{new.x}` on a DELETE): that image does not exist.
        None => Lookup::Absent,
        Some(None) => Lookup::Unknown,
        Some(Some(Cell::Text(b))) => Lookup::Text(b),
        Some(Some(Cell::Null)) => Lookup::Absent,
        Some(Some(Cell::Unknown)) => {
            // An unchanged TOAST value in the new image equals the old image's value.
            if let (Image::New, Op::Update, Some(Some(Cell::Text(b)))) =
                (image, event.op, cell(&event.old, index))
            {
                Lookup::Text(b)
            } else {
                Lookup::Unknown
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::replication::relation::{ReplicaIdentity, Table, TableColumn};
    use crate::rules::compile::{Action, Fallback, Ops, Rule, RuleSet};
    use crate::rules::template::Template;

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
            columns: vec![col("id", true), col("author_id", false), col("body", false)],
            replica_identity: ReplicaIdentity::Full,
        })
    }

    fn rule(keys: &[&str], tags: &[&str]) -> Rule {
        let parse = |list: &[&str]| list.iter().map(|k| Template::parse(k).unwrap()).collect();
        Rule {
            number: 1,
            line: 1,
            schema: "public".into(),
            table: "posts".into(),
            keys: parse(keys),
            tags: parse(tags),
            patterns: vec![],
            columns: vec![],
            ops: Ops::ALL,
            fallback: None,
            max_keys_per_transaction: 1000,
            action: Action::Delete,
            redelete_after: None,
            fence: false,
            row_filter: None,
            entity: None,
        }
    }

    fn bind(rule: Rule) -> Vec<BoundRule> {
        RuleSet { rules: vec![rule] }.bind(&table())
    }

    fn rules(keys: &[&str], tags: &[&str]) -> Vec<BoundRule> {
        bind(rule(keys, tags))
    }

    fn text(s: &'static str) -> Cell {
        Cell::Text(Bytes::from_static(s.as_bytes()))
    }

    fn keys(inv: &Invalidation) -> Vec<&str> {
        let mut v: Vec<_> = inv.work.keys.iter().map(String::as_str).collect();
        v.sort();
        v
    }

    fn update(old: Vec<Cell>, new: Vec<Cell>) -> RowEvent {
        RowEvent {
            table: table(),
            op: Op::Update,
            old: Some(old),
            new: Some(new),
        }
    }

    #[test]
    fn update_moving_author_invalidates_old_and_new_author_keys() {
        let ev = update(
            vec![text("1"), text("3"), text("b")],
            vec![text("1"), text("7"), text("b")],
        );
        let mut inv = Invalidation::default();
        inv.add_row(
            &rules(&["post:{id}", "user_posts:{author_id}"], &[]),
            &ev,
            &[0],
        );
        assert_eq!(keys(&inv), vec!["post:1", "user_posts:3", "user_posts:7"]);
        assert_eq!(inv.fallback_count(), 0);
    }

    #[test]
    fn explicit_images_pick_one_side() {
        let ev = update(
            vec![text("1"), text("3"), text("b")],
            vec![text("1"), text("7"), text("b")],
        );
        let mut inv = Invalidation::default();
        inv.add_row(
            &rules(&["was:{old.author_id}", "now:{new.author_id}"], &[]),
            &ev,
            &[0],
        );
        assert_eq!(keys(&inv), vec!["now:7", "was:3"]);
    }

    #[test]
    fn unchanged_toast_renders_from_the_old_image() {
        let ev = update(
            vec![text("1"), text("3"), text("long")],
            vec![text("1"), text("3"), Cell::Unknown],
        );
        let mut inv = Invalidation::default();
        inv.add_row(&rules(&["b:{body}"], &[]), &ev, &[0]);
        assert_eq!(keys(&inv), vec!["b:long"]);
    }

    #[test]
    fn unknown_value_falls_back_to_the_rules_wildcards() {
        let ev = RowEvent {
            table: table(),
            op: Op::Delete,
            old: Some(vec![text("1"), Cell::Unknown, Cell::Unknown]),
            new: None,
        };
        let mut inv = Invalidation::default();
        inv.add_row(
            &rules(&["post:{id}", "user_posts:{author_id}"], &["a:{author_id}"]),
            &ev,
            &[0],
        );
        assert_eq!(keys(&inv), vec!["post:1"]);
        assert!(inv.work.key_patterns.contains("user_posts:*"));
        assert!(inv.work.tag_patterns.contains("a:*"));
        assert_eq!(inv.fallbacks[&FallbackReason::ValueNotSent], 1);
    }

    #[test]
    fn old_key_of_an_update_without_old_image_is_the_new_key() {
        let ev = RowEvent {
            table: default_identity_table(),
            op: Op::Update,
            old: None,
            new: Some(vec![text("5"), text("3"), text("b")]),
        };
        let mut inv = Invalidation::default();
        inv.add_row(
            &RuleSet {
                rules: vec![rule(&["was:{old.id}", "by:{old.author_id}"], &[])],
            }
            .bind(&default_identity_table()),
            &ev,
            &[0],
        );
        assert_eq!(keys(&inv), vec!["was:5"]);
        assert!(
            inv.work.key_patterns.contains("by:*"),
            "old non-key value unknown: fallback"
        );
    }

    fn default_identity_table() -> Arc<Table> {
        let mut t = (*table()).clone();
        t.replica_identity = ReplicaIdentity::Default;
        Arc::new(t)
    }

    #[test]
    fn update_without_old_image_applies_non_key_templates_as_wildcards() {
        let ev = RowEvent {
            table: default_identity_table(),
            op: Op::Update,
            old: None,
            new: Some(vec![text("5"), text("7"), text("b")]),
        };
        let mut inv = Invalidation::default();
        inv.add_row(
            &RuleSet {
                rules: vec![rule(
                    &["post:{id}", "user_posts:{author_id}"],
                    &["a:{author_id}"],
                )],
            }
            .bind(&default_identity_table()),
            &ev,
            &[0],
        );
        // The new author's key exactly; the old author is unknown: the wildcard.
        assert_eq!(keys(&inv), vec!["post:5", "user_posts:7"]);
        assert!(inv.work.key_patterns.contains("user_posts:*"));
        assert!(inv.work.tag_patterns.contains("a:*"));
        assert!(
            !inv.work.key_patterns.contains("post:*"),
            "the key is known"
        );
        assert_eq!(inv.fallbacks[&FallbackReason::ValueNotSent], 1);
    }

    #[test]
    fn full_identity_without_old_image_knows_no_old_value() {
        // A partition with its own DEFAULT identity under a FULL root.
        let ev = RowEvent {
            table: table(),
            op: Op::Update,
            old: None,
            new: Some(vec![text("5"), text("7"), text("b")]),
        };
        let mut inv = Invalidation::default();
        inv.add_row(&rules(&["was:{old.id}"], &[]), &ev, &[0]);
        assert!(inv.work.keys.is_empty());
        assert!(inv.work.key_patterns.contains("was:*"));
    }

    #[test]
    fn declared_fallback_is_added_to_the_unrenderable_templates_wildcard() {
        let mut r = rule(&["post:{id}", "user_posts:{author_id}"], &[]);
        r.fallback = Some(Fallback {
            tags: vec!["all_posts".into()],
            patterns: vec![],
        });
        let ev = RowEvent {
            table: table(),
            op: Op::Delete,
            old: Some(vec![text("1"), Cell::Unknown, Cell::Unknown]),
            new: None,
        };
        let mut inv = Invalidation::default();
        inv.add_row(&bind(r), &ev, &[0]);
        assert_eq!(keys(&inv), vec!["post:1"]);
        assert!(inv.work.key_patterns.contains("user_posts:*"));
        assert!(inv.work.tags.contains_key("all_posts"));
        assert_eq!(inv.fallbacks[&FallbackReason::ValueNotSent], 1);
    }

    #[test]
    fn template_on_a_dropped_column_is_applied_as_its_wildcard_and_others_stay_exact() {
        let mut t = (*table()).clone();
        t.columns.retain(|c| c.name != "author_id");
        let bound = RuleSet {
            rules: vec![rule(&["post:{id}", "user_posts:{author_id}"], &[])],
        }
        .bind(&t);
        let ev = RowEvent {
            table: Arc::new(t),
            op: Op::Update,
            old: Some(vec![text("1"), text("b")]),
            new: Some(vec![text("1"), text("c")]),
        };
        let mut inv = Invalidation::default();
        inv.add_row(&bound, &ev, &[0]);
        assert_eq!(keys(&inv), vec!["post:1"]);
        assert!(inv.work.key_patterns.contains("user_posts:*"));
        assert_eq!(inv.fallbacks[&FallbackReason::SchemaChange], 1);
    }

    #[test]
    fn null_values_name_no_key() {
        let ev = RowEvent {
            table: table(),
            op: Op::Insert,
            old: None,
            new: Some(vec![text("1"), Cell::Null, text("x")]),
        };
        let mut inv = Invalidation::default();
        inv.add_row(
            &rules(&["user_posts:{author_id}"], &["post:{id}"]),
            &ev,
            &[0],
        );
        assert!(inv.work.keys.is_empty());
        assert_eq!(inv.work.tags.len(), 1);
        assert_eq!(inv.fallback_count(), 0);
    }

    #[test]
    fn truncate_uses_the_fallback() {
        let mut inv = Invalidation::default();
        inv.add_truncate(&rules(&["post:{id}"], &["category:{author_id}"]));
        assert!(inv.work.key_patterns.contains("post:*"));
        assert!(inv.work.tag_patterns.contains("category:*"));
        let mut declared = rule(&["post:{id}"], &[]);
        declared.fallback = Some(Fallback {
            tags: vec!["posts".into()],
            patterns: vec!["post:*".into(), "feed:*".into()],
        });
        let mut inv = Invalidation::default();
        inv.add_truncate(&bind(declared));
        assert!(inv.work.tags.contains_key("posts"));
        assert_eq!(inv.work.key_patterns.len(), 2);
    }

    #[test]
    fn column_conditions_fire_only_when_a_listed_column_changed() {
        let mut r = rule(&["post:{id}"], &[]);
        r.columns = vec!["author_id".into()];
        let bound = bind(r);
        let mut inv = Invalidation::default();
        let same = update(
            vec![text("1"), text("3"), text("a")],
            vec![text("1"), text("3"), text("b")],
        );
        inv.add_row(&bound, &same, &[0]);
        assert!(inv.work.keys.is_empty(), "body changed, author_id did not");
        let toast = update(
            vec![text("1"), text("3"), text("a")],
            vec![text("1"), Cell::Unknown, text("b")],
        );
        inv.add_row(&bound, &toast, &[0]);
        assert!(
            inv.work.keys.is_empty(),
            "unchanged TOAST counts as unchanged"
        );
        let no_old = RowEvent {
            old: None,
            ..same.clone()
        };
        inv.add_row(&bound, &no_old, &[0]);
        assert_eq!(keys(&inv), vec!["post:1"], "without the old image: changed");
        let moved = update(
            vec![text("2"), text("3"), text("a")],
            vec![text("2"), text("4"), text("a")],
        );
        inv.add_row(&bound, &moved, &[0]);
        assert_eq!(keys(&inv), vec!["post:1", "post:2"]);
    }

    #[test]
    fn operation_filter_skips_other_operations() {
        let mut r = rule(&["post:{id}"], &[]);
        r.ops = Ops {
            insert: false,
            update: false,
            delete: true,
            truncate: false,
        };
        let bound = bind(r);
        let mut inv = Invalidation::default();
        inv.add_row(
            &bound,
            &update(
                vec![text("1"), text("3"), text("a")],
                vec![text("1"), text("4"), text("a")],
            ),
            &[0],
        );
        inv.add_truncate(&bound);
        assert!(inv.is_empty());
    }

    #[test]
    fn too_many_rows_switch_to_the_fallback_and_stop_buffering() {
        let mut r = rule(&["post:{id}"], &[]);
        r.max_keys_per_transaction = 10;
        let bound = bind(r);
        let mut inv = Invalidation::default();
        for i in 0..1000 {
            let id = Cell::Text(Bytes::from(i.to_string()));
            let ev = RowEvent {
                table: table(),
                op: Op::Insert,
                old: None,
                new: Some(vec![id, text("1"), text("x")]),
            };
            inv.add_row(&bound, &ev, &[0]);
        }
        assert_eq!(inv.work.keys.len(), 10);
        assert!(inv.work.key_patterns.contains("post:*"));
        assert_eq!(inv.fallbacks[&FallbackReason::TooManyRows], 1);
    }

    fn insert(i: usize) -> RowEvent {
        RowEvent {
            table: table(),
            op: Op::Insert,
            old: None,
            new: Some(vec![
                Cell::Text(Bytes::from(i.to_string())),
                text("1"),
                text("x"),
            ]),
        }
    }

    #[test]
    fn a_capped_transaction_switches_each_rule_to_its_fallback_on_its_next_row() {
        let bound = rules(&["post:{id}"], &[]);
        let mut inv = Invalidation::default();
        inv.add_row(&bound, &insert(1), &[0]);
        inv.cap();
        for i in 2..100 {
            inv.add_row(&bound, &insert(i), &[0]);
        }
        assert_eq!(keys(&inv), ["post:1"]);
        assert!(inv.work.key_patterns.contains("post:*"));
        assert!(inv.saturated(&bound));
        assert_eq!(inv.fallbacks[&FallbackReason::TooManyRows], 1);
    }

    #[test]
    fn overflows_are_applied_again_once_the_work_holding_them_is_dropped() {
        let mut r = rule(&["post:{id}"], &[]);
        r.max_keys_per_transaction = 2;
        r.entity = Some("post".into());
        let all = vec![r.clone()];
        let bound = bind(r);
        let mut inv = Invalidation::default();
        for i in 0..5 {
            inv.add_row(&bound, &insert(i), &[0]);
        }
        // The part that held the fallback belonged to an aborted subtransaction.
        drop(inv.take_work());
        inv.add_row(&bound, &insert(9), &[0]);
        assert!(
            inv.work.is_empty(),
            "the rule is past its limit: rows add nothing"
        );
        inv.reapply_overflows(&all);
        assert!(inv.work.key_patterns.contains("post:*"));
        assert_eq!(inv.events.len(), 1);
        assert_eq!(inv.events[0].op, "overflow");
    }

    #[test]
    fn expire_rules_collect_ttls_and_delete_wins_on_merge() {
        let mut r = rule(&["post:{id}"], &[]);
        r.action = Action::Expire(Duration::from_secs(5));
        let ev = update(
            vec![text("1"), text("3"), text("a")],
            vec![text("1"), text("3"), text("b")],
        );
        let mut inv = Invalidation::default();
        inv.add_row(&bind(r), &ev, &[0]);
        assert_eq!(inv.work.expire_keys.get("post:1"), Some(&5000));
        assert!(inv.work.keys.is_empty());
    }

    #[test]
    fn patterns_escape_values() {
        let mut r = rule(&[], &[]);
        r.patterns = vec![Template::parse("user:{author_id}:*").unwrap()];
        let ev = update(
            vec![text("1"), text("a*"), text("a")],
            vec![text("1"), text("a*"), text("b")],
        );
        let mut inv = Invalidation::default();
        inv.add_row(&bind(r), &ev, &[0]);
        assert!(
            inv.work.key_patterns.contains("user:a\\*:*"),
            "{:?}",
            inv.work.key_patterns
        );
    }

    #[test]
    fn entity_events_carry_id_and_changed_fields() {
        let mut r = rule(&[], &[]);
        r.entity = Some("post".into());
        let ev = update(
            vec![text("1"), text("3"), text("a")],
            vec![text("1"), text("7"), text("a")],
        );
        let mut inv = Invalidation::default();
        inv.add_row(&bind(r), &ev, &[0]);
        let json: Json =
            serde_json::from_str(&inv.events[0].stamp("s", "0/1", "t", 0).json).unwrap();
        assert_eq!(json["entity"], "post");
        assert_eq!(json["op"], "update");
        assert_eq!(json["id"], "1");
        assert_eq!(json["fields"], serde_json::json!({"author_id": "7"}));
        assert_eq!(json["table"], "public.posts");
        assert_eq!(json["lsn"], "0/1");
    }
}
