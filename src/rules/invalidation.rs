//! Rendering bound rules against row events into an `Invalidation`: the deduplicated
//! keys, tags and fallback patterns one transaction (or a batch of them) makes stale.
//!
//! Never talks to Redis. Where a template cannot render exactly, it yields its
//! wildcard pattern instead (over-invalidation), and counts that as a fallback.

use std::collections::HashSet;

use crate::replication::event::{Cell, Op, RowEvent};

use super::compile::{BoundPart, BoundRule, BoundTemplate};
use super::template::{ImageSelector, push_value};

/// What a set of committed changes makes stale.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// Cache keys to delete.
    pub keys: HashSet<String>,
    /// Tags whose sets are to be flushed.
    pub tags: HashSet<String>,
    /// Key globs to delete by SCAN (fallback).
    pub key_patterns: HashSet<String>,
    /// Tag globs whose sets are to be flushed by SCAN (fallback).
    pub tag_patterns: HashSet<String>,
    /// How many times exact invalidation was impossible and a pattern was used.
    pub fallbacks: u64,
}

impl Invalidation {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.tags.is_empty()
            && self.key_patterns.is_empty()
            && self.tag_patterns.is_empty()
    }

    /// Adds everything of `other`, deduplicating.
    pub fn merge(&mut self, other: Invalidation) {
        if self.is_empty() && self.fallbacks == 0 {
            *self = other;
            return;
        }
        self.keys.extend(other.keys);
        self.tags.extend(other.tags);
        self.key_patterns.extend(other.key_patterns);
        self.tag_patterns.extend(other.tag_patterns);
        self.fallbacks += other.fallbacks;
    }

    /// Number of distinct entries (keys + tags + patterns).
    pub fn len(&self) -> usize {
        self.keys.len() + self.tags.len() + self.key_patterns.len() + self.tag_patterns.len()
    }

    /// Applies `rules` to one row change.
    pub fn add_row(&mut self, rules: &[BoundRule], event: &RowEvent) {
        for rule in rules {
            for t in &rule.keys {
                render(
                    t,
                    event,
                    &mut self.keys,
                    &mut self.key_patterns,
                    &mut self.fallbacks,
                );
            }
            for t in &rule.tags {
                render(
                    t,
                    event,
                    &mut self.tags,
                    &mut self.tag_patterns,
                    &mut self.fallbacks,
                );
            }
        }
    }

    /// TRUNCATE: no rows are sent, so every key and tag a rule could produce goes,
    /// by pattern.
    pub fn add_truncate(&mut self, rules: &[BoundRule]) {
        for rule in rules {
            for t in &rule.keys {
                self.key_patterns.insert(t.template.wildcard_pattern());
                self.fallbacks += 1;
            }
            for t in &rule.tags {
                self.tag_patterns.insert(t.template.wildcard_pattern());
                self.fallbacks += 1;
            }
        }
    }
}

/// The images a change carries, in the order `{col}` reads them.
#[derive(Clone, Copy)]
enum Image {
    New,
    Old,
}

/// Renders `t` against every image of `event` into `out`; when some value is not
/// known, inserts the template's wildcard into `patterns` instead.
fn render(
    t: &BoundTemplate,
    event: &RowEvent,
    out: &mut HashSet<String>,
    patterns: &mut HashSet<String>,
    fallbacks: &mut u64,
) {
    let primaries = [
        event.new.as_ref().map(|_| Image::New),
        event.old.as_ref().map(|_| Image::Old),
    ];
    for primary in primaries.into_iter().flatten() {
        match render_one(t, event, primary) {
            Rendered::Key(key) => {
                out.insert(key);
            }
            Rendered::Nothing => {}
            Rendered::Unknown => {
                patterns.insert(t.template.wildcard_pattern());
                *fallbacks += 1;
                return;
            }
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
}

enum Rendered {
    Key(String),
    /// A value is NULL or the chosen image is absent: this image names no cache entry.
    Nothing,
    /// A needed value was not sent: exact rendering is impossible.
    Unknown,
}

fn render_one(t: &BoundTemplate, event: &RowEvent, primary: Image) -> Rendered {
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

fn lookup(event: &RowEvent, image: Image, index: usize) -> Lookup<'_> {
    fn cell(row: &Option<Vec<Cell>>, index: usize) -> Option<Option<&Cell>> {
        row.as_ref().map(|r| r.get(index))
    }
    let found = match image {
        Image::New => cell(&event.new, index),
        Image::Old => cell(&event.old, index),
    };
    match found {
        None => {
            // `{old.x}` on an INSERT (or `{new.x}` on a DELETE): that image does not exist.
            Lookup::Absent
        }
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

    use bytes::Bytes;

    use super::*;
    use crate::replication::relation::{ReplicaIdentity, Table, TableColumn};
    use crate::rules::compile::{Rule, RuleSet};
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

    fn rules(keys: &[&str], tags: &[&str]) -> Vec<BoundRule> {
        let set = RuleSet {
            rules: vec![Rule {
                number: 1,
                line: 1,
                schema: "public".into(),
                table: "posts".into(),
                keys: keys.iter().map(|k| Template::parse(k).unwrap()).collect(),
                tags: tags.iter().map(|k| Template::parse(k).unwrap()).collect(),
            }],
        };
        set.bind(&table())
    }

    fn text(s: &'static str) -> Cell {
        Cell::Text(Bytes::from_static(s.as_bytes()))
    }

    fn keys(inv: &Invalidation) -> Vec<&str> {
        let mut v: Vec<_> = inv.keys.iter().map(String::as_str).collect();
        v.sort();
        v
    }

    #[test]
    fn update_moving_author_invalidates_old_and_new_author_keys() {
        let ev = RowEvent {
            table: table(),
            op: Op::Update,
            old: Some(vec![text("1"), text("3"), text("b")]),
            new: Some(vec![text("1"), text("7"), text("b")]),
        };
        let mut inv = Invalidation::default();
        inv.add_row(&rules(&["post:{id}", "user_posts:{author_id}"], &[]), &ev);
        assert_eq!(keys(&inv), vec!["post:1", "user_posts:3", "user_posts:7"]);
        assert_eq!(inv.fallbacks, 0);
    }

    #[test]
    fn explicit_images_pick_one_side() {
        let ev = RowEvent {
            table: table(),
            op: Op::Update,
            old: Some(vec![text("1"), text("3"), text("b")]),
            new: Some(vec![text("1"), text("7"), text("b")]),
        };
        let mut inv = Invalidation::default();
        inv.add_row(
            &rules(&["was:{old.author_id}", "now:{new.author_id}"], &[]),
            &ev,
        );
        assert_eq!(keys(&inv), vec!["now:7", "was:3"]);
    }

    #[test]
    fn unchanged_toast_renders_from_the_old_image() {
        let ev = RowEvent {
            table: table(),
            op: Op::Update,
            old: Some(vec![text("1"), text("3"), text("long")]),
            new: Some(vec![text("1"), text("3"), Cell::Unknown]),
        };
        let mut inv = Invalidation::default();
        inv.add_row(&rules(&["b:{body}"], &[]), &ev);
        assert_eq!(keys(&inv), vec!["b:long"]);
    }

    #[test]
    fn unknown_value_falls_back_to_the_wildcard_pattern() {
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
        );
        assert_eq!(keys(&inv), vec!["post:1"]);
        assert!(inv.key_patterns.contains("user_posts:*"));
        assert!(inv.tag_patterns.contains("a:*"));
        assert_eq!(inv.fallbacks, 2);
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
        inv.add_row(&rules(&["user_posts:{author_id}"], &["post:{id}"]), &ev);
        assert!(inv.keys.is_empty());
        assert_eq!(inv.tags.len(), 1);
        assert_eq!(inv.fallbacks, 0);
    }

    #[test]
    fn truncate_uses_every_template_as_a_pattern() {
        let mut inv = Invalidation::default();
        inv.add_truncate(&rules(&["post:{id}"], &["category:{author_id}"]));
        assert!(inv.key_patterns.contains("post:*"));
        assert!(inv.tag_patterns.contains("category:*"));
    }
}
