//! Rendering bound rules against row events into an `Invalidation`: the deduplicated
//! keys, tags, patterns and entity events one transaction (or a batch of them) makes
//! stale or announces.
//!
//! Never talks to Redis. Where exact invalidation is impossible (a value that was not
//! sent, a column gone from the table, a TRUNCATE, too many rows in one transaction)
//! the rule's fallback is used instead (over-invalidation), and counted.

use std::collections::{HashMap, HashSet};

use serde_json::Value as Json;

use crate::replication::event::{Cell, Op, RowEvent};
use crate::replication::relation::ReplicaIdentity;

use super::compile::{Action, BoundPart, BoundRule, BoundTemplate, Fallback, Rule};
use super::entity::entity_event;
pub use super::entity::{Event, PendingEvent};
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
    /// Cache keys to delete with their fence written first (`fence = true`); never
    /// also in `keys` (a key one rule fences and another deletes is fenced).
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
            + self.fenced.len()
            + self.expire_keys.len()
            + self.tags.len()
            + self.key_patterns.len()
            + self.tag_patterns.len()
            + self.redelete.len()
    }

    /// Adds everything of `other`, deduplicating. Deleting a key wins over expiring it;
    /// the lowest TTL and the latest second delete win.
    pub fn merge(&mut self, other: Work) {
        if self.is_empty() {
            *self = other;
            return;
        }
        for key in other.fenced {
            self.keys.remove(&key);
            self.fenced.insert(key);
        }
        for key in other.keys {
            if !self.fenced.contains(&key) {
                self.keys.insert(key);
            }
        }
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
    }

    /// Adds keys and tags an application named in a `pg_logical_emit_message` hint.
    pub fn add_hint(
        &mut self,
        keys: impl IntoIterator<Item = String>,
        tags: impl IntoIterator<Item = String>,
    ) {
        for key in keys {
            if !self.fenced.contains(&key) {
                self.keys.insert(key);
            }
        }
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
                            self.work.keys.remove(&key);
                            self.work.fenced.insert(key);
                        } else if !self.work.fenced.contains(&key) {
                            self.work.keys.insert(key);
                        }
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
mod tests;
