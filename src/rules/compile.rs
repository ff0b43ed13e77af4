//! Compiling rules: from the serde model to parsed templates (offline), and binding
//! them to a table as the stream describes it (column names → tuple positions).
//!
//! Never renders a key; that is `invalidation`.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use crate::diagnostics::{LineIndex, Problem};
use crate::replication::event::Op;
use crate::replication::relation::{ReplicaIdentity, Table};

use super::model::RuleModel;
use super::template::{ImageSelector, Part, Template};

/// Which operations fire a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ops {
    /// INSERT.
    pub insert: bool,
    /// UPDATE.
    pub update: bool,
    /// DELETE.
    pub delete: bool,
    /// TRUNCATE.
    pub truncate: bool,
}

impl Ops {
    /// Every operation.
    pub const ALL: Ops = Ops {
        insert: true,
        update: true,
        delete: true,
        truncate: true,
    };

    /// Whether `op` fires the rule.
    pub fn fires(&self, op: Op) -> bool {
        match op {
            Op::Insert => self.insert,
            Op::Update => self.update,
            Op::Delete => self.delete,
        }
    }
}

/// What a rule does to its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// UNLINK them.
    Delete,
    /// Lower their TTL to this (never extend it).
    Expire(Duration),
}

/// What a rule invalidates when exact invalidation is impossible.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fallback {
    /// Tags to flush.
    pub tags: Vec<String>,
    /// Key globs to delete.
    pub patterns: Vec<String>,
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// 1-based position in the file (rule #N).
    pub number: usize,
    /// Line of the `[[rules]]` entry.
    pub line: usize,
    /// Schema of the table.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Key templates.
    pub keys: Vec<Template>,
    /// Tag templates.
    pub tags: Vec<Template>,
    /// Key pattern templates.
    pub patterns: Vec<Template>,
    /// Condition columns: UPDATE fires only when one of them changed (empty: always).
    pub columns: Vec<String>,
    /// Operations that fire the rule.
    pub ops: Ops,
    /// Declared fallback, when there is one.
    pub fallback: Option<Fallback>,
    /// Rows one transaction may buffer for this rule before the fallback is used.
    pub max_keys_per_transaction: usize,
    /// Delete or expire.
    pub action: Action,
    /// Delete the keys again after this delay.
    pub redelete_after: Option<Duration>,
    /// Fence each key before deleting it (`fence = true`).
    pub fence: bool,
    /// Entity name for entity events.
    pub entity: Option<String>,
    /// `where`: the SQL row condition for the publication's row filter.
    pub row_filter: Option<String>,
}

impl Rule {
    /// Every template of the rule: keys, tags, patterns.
    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        self.keys.iter().chain(&self.tags).chain(&self.patterns)
    }

    /// The column names the rule's templates and conditions read.
    pub fn columns(&self) -> BTreeSet<&str> {
        self.templates()
            .flat_map(|t| t.columns().map(|(_, c)| c))
            .chain(self.columns.iter().map(String::as_str))
            .collect()
    }

    /// `schema.table`.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The fallback in force: the declared one, or every template with `{...}` as `*`.
    pub fn effective_fallback(&self) -> Fallback {
        self.fallback.clone().unwrap_or_else(|| Fallback {
            tags: self.tags.iter().map(Template::wildcard_pattern).collect(),
            patterns: self
                .keys
                .iter()
                .chain(&self.patterns)
                .map(Template::wildcard_pattern)
                .collect(),
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule #{} ({}.{})", self.number, self.schema, self.table)
    }
}

/// All rules of a configuration.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    /// In file order.
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// The distinct `(schema, table)` pairs the rules name, sorted.
    pub fn tables(&self) -> BTreeSet<(String, String)> {
        self.rules
            .iter()
            .map(|r| (r.schema.clone(), r.table.clone()))
            .collect()
    }

    /// Binds every rule for `table` to its columns.
    pub fn bind(&self, table: &Table) -> Vec<BoundRule> {
        self.rules
            .iter()
            .filter(|r| r.schema == table.schema && r.table == table.name)
            .map(|r| {
                let bind = |list: &[Template]| {
                    list.iter()
                        .map(|t| BoundTemplate::bind(t, table))
                        .collect::<Vec<_>>()
                };
                let keys = bind(&r.keys);
                let tags = bind(&r.tags);
                let patterns = bind(&r.patterns);
                let broken = keys
                    .iter()
                    .chain(&tags)
                    .chain(&patterns)
                    .any(BoundTemplate::is_broken);
                BoundRule {
                    rule: Arc::new(r.clone()),
                    keys,
                    tags,
                    patterns,
                    // A condition column missing from the stream: every update counts as a change.
                    condition: r.columns.iter().map(|c| table.column_index(c)).collect(),
                    broken,
                    fallback: r.effective_fallback(),
                }
            })
            .collect()
    }
}

/// A template whose placeholders point at tuple positions.
#[derive(Debug, Clone)]
pub struct BoundTemplate {
    /// The template as parsed.
    pub template: Template,
    /// Its parts, with column positions resolved.
    pub parts: Vec<BoundPart>,
}

/// A resolved template part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundPart {
    /// Literal text.
    Literal(String),
    /// A column at this tuple position.
    Column {
        /// Which image to read.
        image: ImageSelector,
        /// Tuple position.
        index: usize,
    },
    /// The column is not in the stream's description of the table (dropped,
    /// renamed, or left out of the publication): the template cannot render.
    Missing(String),
}

impl BoundRule {
    /// Every bound template: keys, tags, patterns.
    pub fn templates(&self) -> impl Iterator<Item = &BoundTemplate> {
        self.keys.iter().chain(&self.tags).chain(&self.patterns)
    }
}

impl BoundTemplate {
    /// Whether the template reads an old value (`{col}`, `{old.col}`) of a column
    /// outside the replica identity the stream describes for `table`.
    pub fn reads_old_outside_identity(&self, table: &Table) -> bool {
        table.replica_identity != ReplicaIdentity::Full
            && self.parts.iter().any(|p| match p {
                BoundPart::Column { image, index } => {
                    *image != ImageSelector::New
                        && table.columns.get(*index).is_some_and(|c| !c.is_key)
                }
                _ => false,
            })
    }

    /// Whether a placeholder's column is missing from the table.
    pub fn is_broken(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, BoundPart::Missing(_)))
    }

    fn bind(template: &Template, table: &Table) -> BoundTemplate {
        let parts = template
            .parts()
            .iter()
            .map(|p| match p {
                Part::Literal(s) => BoundPart::Literal(s.clone()),
                Part::Column { image, name } => match table.column_index(name) {
                    Some(index) => BoundPart::Column {
                        image: *image,
                        index,
                    },
                    None => BoundPart::Missing(name.clone()),
                },
            })
            .collect();
        BoundTemplate {
            template: template.clone(),
            parts,
        }
    }
}

/// A rule bound to the columns of its table as the stream describes it.
#[derive(Debug, Clone)]
pub struct BoundRule {
    /// The rule.
    pub rule: Arc<Rule>,
    /// Key templates.
    pub keys: Vec<BoundTemplate>,
    /// Tag templates.
    pub tags: Vec<BoundTemplate>,
    /// Key pattern templates.
    pub patterns: Vec<BoundTemplate>,
    /// Tuple positions of the condition columns (`None`: missing from the stream).
    pub condition: Vec<Option<usize>>,
    /// Some template reads a column missing from the stream (a schema change).
    pub broken: bool,
    /// The fallback in force.
    pub fallback: Fallback,
}

/// Defaults for every rule, from the rest of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RuleDefaults {
    /// `[limits] max_keys_per_transaction`.
    pub max_keys_per_transaction: usize,
}

/// Validates rule models into rules, recording problems with their lines.
pub fn compile(
    models: Vec<(usize, RuleModel)>,
    defaults: RuleDefaults,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> RuleSet {
    let mut rules = Vec::new();
    for (i, (line, model)) in models.into_iter().enumerate() {
        let number = i + 1;
        let at = |span: std::ops::Range<usize>| lines.line_of(&span).or(Some(line));
        let (schema, table) = match split_table(model.table.get_ref()) {
            Some(pair) => pair,
            None => {
                problems.push(Problem::new(
                    at(model.table.span()),
                    format!(
                        "rule #{number}: table `{}` is not `table` or `schema.table`",
                        model.table.get_ref()
                    ),
                    Some(
                        "write the name as Postgres stores it, e.g. \"posts\" or \"blog.posts\""
                            .into(),
                    ),
                ));
                continue;
            }
        };
        let name = format!("rule #{number} ({schema}.{table})");
        if model.keys.is_empty()
            && model.tags.is_empty()
            && model.patterns.is_empty()
            && model.entity.is_none()
        {
            problems.push(Problem::new(
                Some(line),
                format!("{name} has no keys, tags, patterns or entity"),
                Some(
                    "add keys = [\"...:{id}\"], tags = [\"...\"] or patterns = [\"...:*\"]".into(),
                ),
            ));
        }
        let mut parse_all = |list: Vec<Spanned<String>>, what: &str| -> Vec<Template> {
            list.into_iter()
                .filter_map(|t| {
                    // A parse error's message says how to fix the template itself.
                    let parsed = if t.get_ref().is_empty() {
                        Err((
                            format!("empty {what} template"),
                            Some(
                                "remove the empty entry or write one such as \"user:{id}\""
                                    .to_owned(),
                            ),
                        ))
                    } else {
                        Template::parse(t.get_ref()).map_err(|e| {
                            (format!("{what} template \"{}\": {e}", t.get_ref()), None)
                        })
                    };
                    match parsed {
                        Ok(tpl) => Some(tpl),
                        Err((e, fix)) => {
                            problems.push(Problem::new(at(t.span()), format!("{name}: {e}"), fix));
                            None
                        }
                    }
                })
                .collect()
        };
        let keys = parse_all(model.keys, "key");
        let tags = parse_all(model.tags, "tag");
        let patterns = parse_all(model.patterns, "pattern");

        let ops = match &model.on {
            None => Ops::ALL,
            Some(on) => {
                let mut ops = Ops {
                    insert: false,
                    update: false,
                    delete: false,
                    truncate: false,
                };
                for op in on.get_ref() {
                    match op.as_str() {
                        "insert" => ops.insert = true,
                        "update" => ops.update = true,
                        "delete" => ops.delete = true,
                        "truncate" => ops.truncate = true,
                        other => problems.push(Problem::new(
                            at(on.span()),
                            format!("{name}: `on` has unknown operation \"{other}\""),
                            Some(
                                "use any of \"insert\", \"update\", \"delete\", \"truncate\""
                                    .into(),
                            ),
                        )),
                    }
                }
                if on.get_ref().is_empty() {
                    problems.push(Problem::new(
                        at(on.span()),
                        format!("{name}: `on` is empty, so the rule never fires"),
                        Some("remove `on` to fire on every operation".into()),
                    ));
                }
                ops
            }
        };
        let mut duration = |field: &Option<Spanned<String>>, what: &str| -> Option<Duration> {
            let value = field.as_ref()?;
            match humantime::parse_duration(value.get_ref()) {
                Ok(d) if !d.is_zero() => Some(d),
                _ => {
                    problems.push(Problem::new(
                        at(value.span()),
                        format!("{name}: {what} \"{}\" is not a duration", value.get_ref()),
                        Some("write a positive duration like \"500ms\", \"5s\" or \"2m\"".into()),
                    ));
                    None
                }
            }
        };
        let expire_in = duration(&model.expire_in, "expire_in");
        let redelete_after = duration(&model.redelete_after, "redelete_after");
        let action = match model
            .action
            .as_ref()
            .map(|a| (a.get_ref().as_str(), a.span()))
        {
            None | Some(("delete", _)) => {
                if let Some(e) = &model.expire_in {
                    problems.push(Problem::new(
                        at(e.span()),
                        format!("{name}: expire_in is set but action is not \"expire\""),
                        Some("add action = \"expire\" or remove expire_in".into()),
                    ));
                }
                Action::Delete
            }
            Some(("expire", span)) => match expire_in {
                Some(d) => Action::Expire(d),
                None => {
                    if model.expire_in.is_none() {
                        problems.push(Problem::new(
                            at(span),
                            format!("{name}: action = \"expire\" needs expire_in"),
                            Some("add expire_in = \"5s\" (the TTL the keys are lowered to)".into()),
                        ));
                    }
                    Action::Delete
                }
            },
            Some((other, span)) => {
                problems.push(Problem::new(
                    at(span),
                    format!("{name}: unknown action \"{other}\""),
                    Some("use \"delete\" (default) or \"expire\"".into()),
                ));
                Action::Delete
            }
        };
        if let (Action::Expire(_), Some(r)) = (action, &model.redelete_after) {
            problems.push(Problem::new(
                at(r.span()),
                format!("{name}: redelete_after deletes keys a second time, but action = \"expire\" never deletes them"),
                Some("remove redelete_after, or use action = \"delete\"".into()),
            ));
        }
        let fence = model.fence.as_ref().is_some_and(|f| *f.get_ref());
        if let (true, Some(f)) = (fence, &model.fence) {
            if matches!(action, Action::Expire(_)) {
                problems.push(Problem::new(
                    at(f.span()),
                    format!("{name}: fence guards deletes, but action = \"expire\" never deletes its keys"),
                    Some("remove fence, or use action = \"delete\"".into()),
                ));
            } else if keys.is_empty() {
                problems.push(Problem::new(
                    at(f.span()),
                    format!("{name}: fence guards the rule's keys, but it has none (tags and patterns cannot be fenced)"),
                    Some("add keys = [\"...\"], or remove fence".into()),
                ));
            }
        }
        let max_keys_per_transaction = match &model.max_keys_per_transaction {
            Some(n) if *n.get_ref() == 0 => {
                problems.push(Problem::new(
                    at(n.span()),
                    format!("{name}: max_keys_per_transaction must be at least 1"),
                    Some(
                        "leave it out to use [limits] max_keys_per_transaction (default: no limit)"
                            .into(),
                    ),
                ));
                defaults.max_keys_per_transaction
            }
            Some(n) => *n.get_ref(),
            None => defaults.max_keys_per_transaction,
        };
        let fallback = model.fallback.map(|f| {
            let span = f.span();
            let f = f.into_inner();
            if f.tags.is_empty() && f.patterns.is_empty() {
                problems.push(Problem::new(
                    at(span),
                    format!("{name}: fallback names no tags and no patterns"),
                    Some("add fallback = { patterns = [\"user:*\"] } or remove it".into()),
                ));
            }
            Fallback {
                tags: f.tags,
                patterns: f.patterns,
            }
        });
        let row_filter = model.row_filter.and_then(|w| {
            if w.get_ref().trim().is_empty() {
                problems.push(Problem::new(
                    at(w.span()),
                    format!("{name}: `where` is empty"),
                    Some("write a condition like where = \"status = 'published'\", or remove it".into()),
                ));
                return None;
            }
            // PostgreSQL turns an UPDATE whose row leaves the filter into a DELETE, and
            // one whose row enters it into an INSERT: an update-only rule would miss them.
            if ops.update && !(ops.insert && ops.delete) {
                problems.push(Problem::new(
                    at(w.span()),
                    format!("{name}: with `where`, an UPDATE that moves a row out of (or into) the condition arrives as a DELETE (or an INSERT), which `on` does not fire on"),
                    Some("add \"insert\" and \"delete\" to `on`, or remove `on`".into()),
                ));
            }
            Some(w.into_inner())
        });
        let columns = model.columns.into_iter().map(Spanned::into_inner).collect();
        let entity = model.entity.map(Spanned::into_inner);
        rules.push(Rule {
            number,
            line,
            schema,
            table,
            keys,
            tags,
            patterns,
            columns,
            ops,
            fallback,
            max_keys_per_transaction,
            action,
            redelete_after,
            fence,
            entity,
            row_filter,
        });
    }
    // The same key of the same table deleted by one rule and expired by another:
    // which one wins would be an accident of ordering.
    let mut seen: std::collections::HashMap<(&str, &str, &str), (&Rule, Action)> =
        std::collections::HashMap::new();
    for rule in &rules {
        for key in &rule.keys {
            let id = (rule.schema.as_str(), rule.table.as_str(), key.source());
            match seen.get(&id) {
                Some((other, action)) if *action != rule.action => problems.push(Problem::new(
                    Some(rule.line),
                    format!(
                        "{rule} and {other} (line {}) both name key \"{}\" with different actions",
                        other.line,
                        key.source()
                    ),
                    Some("give the key one action: remove it from one of the rules".into()),
                )),
                Some(_) => {}
                None => {
                    seen.insert(id, (rule, rule.action));
                }
            }
        }
    }
    RuleSet { rules }
}

fn split_table(name: &str) -> Option<(String, String)> {
    let valid = |s: &str| !s.is_empty() && !s.contains(['.', '"']) && s.trim() == s;
    match name.split_once('.') {
        Some((schema, table)) if valid(schema) && valid(table) => {
            Some((schema.to_owned(), table.to_owned()))
        }
        None if valid(name) => Some(("public".to_owned(), name.to_owned())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_default_to_public() {
        assert_eq!(
            split_table("users"),
            Some(("public".into(), "users".into()))
        );
        assert_eq!(split_table("a.b"), Some(("a".into(), "b".into())));
        assert_eq!(split_table("a.b.c"), None);
        assert_eq!(split_table(""), None);
    }
}
