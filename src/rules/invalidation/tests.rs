//! Unit tests of rendering rules into an `Invalidation`.

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
    let json: Json = serde_json::from_str(&inv.events[0].stamp("s", "0/1", "t", 0).json).unwrap();
    assert_eq!(json["entity"], "post");
    assert_eq!(json["op"], "update");
    assert_eq!(json["id"], "1");
    assert_eq!(json["fields"], serde_json::json!({"author_id": "7"}));
    assert_eq!(json["table"], "public.posts");
    assert_eq!(json["lsn"], "0/1");
}

/// A key one rule fences and another deletes is fenced, once, whichever comes first,
/// in a transaction and across merged work; entries count it once.
#[test]
fn a_key_both_fenced_and_deleted_is_fenced_once() {
    let ev = update(
        vec![text("1"), text("3"), text("b")],
        vec![text("1"), text("3"), text("b")],
    );
    let mut fenced = rule(&["post:{id}"], &[]);
    fenced.fence = true;
    let mut plain = rule(&["post:{id}", "other:{id}"], &[]);
    plain.number = 2;
    for order in [
        [fenced.clone(), plain.clone()],
        [plain.clone(), fenced.clone()],
    ] {
        let bound = RuleSet {
            rules: order.to_vec(),
        }
        .bind(&table());
        let mut inv = Invalidation::default();
        inv.add_row(&bound, &ev, &[0]);
        assert_eq!(keys(&inv), ["other:1"]);
        assert_eq!(
            inv.work.fenced,
            HashSet::from(["post:1".to_owned()]),
            "fenced whatever the rules' order"
        );
        assert_eq!(inv.work.len(), 2);
    }
    let mut a = Work::default();
    a.keys.insert("k".into());
    a.keys.insert("x".into());
    let mut b = Work::default();
    b.fenced.insert("k".into());
    a.merge(b);
    let mut c = Work::default();
    c.keys.insert("k".into());
    a.merge(c);
    assert_eq!(a.keys, HashSet::from(["x".to_owned()]));
    assert_eq!(a.fenced, HashSet::from(["k".to_owned()]));
    assert_eq!(a.len(), 2);
}
