//! Compiling rules: from the serde model to parsed templates (offline), and binding
//! them to a table as the stream describes it (column names → tuple positions).
//!
//! Never renders a key; that is `invalidation`.

use std::collections::BTreeSet;
use std::fmt;

use crate::config::{LineIndex, Problem};
use crate::replication::relation::Table;

use super::model::RuleModel;
use super::template::{ImageSelector, Part, Template};

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
}

impl Rule {
    /// Every template of the rule, keys then tags.
    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        self.keys.iter().chain(&self.tags)
    }

    /// The column names the rule's templates read.
    pub fn columns(&self) -> BTreeSet<&str> {
        self.templates()
            .flat_map(|t| t.columns().map(|(_, c)| c))
            .collect()
    }

    /// `schema.table`.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
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
            .map(|r| BoundRule {
                number: r.number,
                keys: r
                    .keys
                    .iter()
                    .map(|t| BoundTemplate::bind(t, table))
                    .collect(),
                tags: r
                    .tags
                    .iter()
                    .map(|t| BoundTemplate::bind(t, table))
                    .collect(),
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

impl BoundTemplate {
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

/// The rules of one table, bound to its columns.
#[derive(Debug, Clone)]
pub struct BoundRule {
    /// Rule number, for logs.
    pub number: usize,
    /// Key templates.
    pub keys: Vec<BoundTemplate>,
    /// Tag templates.
    pub tags: Vec<BoundTemplate>,
}

/// Validates rule models into rules, recording problems with their lines.
pub fn compile(
    models: Vec<(usize, RuleModel)>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> RuleSet {
    let mut rules = Vec::new();
    for (i, (line, model)) in models.into_iter().enumerate() {
        let number = i + 1;
        let table_line = lines.line_of(&model.table.span()).or(Some(line));
        let (schema, table) = match split_table(model.table.get_ref()) {
            Some(pair) => pair,
            None => {
                problems.push(Problem::new(
                    table_line,
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
        if model.keys.is_empty() && model.tags.is_empty() {
            problems.push(Problem::new(
                Some(line),
                format!("rule #{number} ({schema}.{table}) has neither keys nor tags"),
                Some("add keys = [\"...:{id}\"] or tags = [\"...\"]".into()),
            ));
        }
        let mut parse_all = |list: Vec<toml::Spanned<String>>, what: &str| -> Vec<Template> {
            list.into_iter()
                .filter_map(|t| match Template::parse(t.get_ref()) {
                    Ok(tpl) => Some(tpl),
                    Err(e) => {
                        problems.push(Problem::new(
                            lines.line_of(&t.span()).or(Some(line)),
                            format!(
                                "rule #{number} ({schema}.{table}): {what} template \"{}\": {e}",
                                t.get_ref()
                            ),
                            None,
                        ));
                        None
                    }
                })
                .collect()
        };
        let keys = parse_all(model.keys, "key");
        let tags = parse_all(model.tags, "tag");
        for t in keys.iter().chain(&tags) {
            if t.source().is_empty() {
                problems.push(Problem::new(
                    Some(line),
                    format!("rule #{number} ({schema}.{table}): empty template"),
                    Some("remove it or write a key such as \"user:{id}\"".into()),
                ));
            }
        }
        rules.push(Rule {
            number,
            line,
            schema,
            table,
            keys,
            tags,
        });
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
