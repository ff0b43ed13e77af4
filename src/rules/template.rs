//! Key and tag templates: `user:{id}`, `user_posts:{old.author_id}`.
//!
//! Parsing is pure and reports the column (character position) of a mistake.
//! Rendering takes a row image through a small trait, so this file never knows
//! about the replication wire format.

use std::fmt::Write as _;

/// Which row image a placeholder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageSelector {
    /// `{col}`: every image the change carries (new and old).
    Any,
    /// `{old.col}`: only the old image.
    Old,
    /// `{new.col}`: only the new image.
    New,
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text.
    Literal(String),
    /// A column placeholder.
    Column {
        /// Which image to read.
        image: ImageSelector,
        /// The column name.
        name: String,
    },
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// What is wrong with a template; `at` is the 1-based character position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{` without a matching `}`.
    #[error(
        "unclosed '{{' at character {at}; close it with '}}' or write '{{{{' for a literal brace"
    )]
    Unclosed {
        /// Position of the `{`.
        at: usize,
    },
    /// `}` without a `{`.
    #[error("unmatched '}}' at character {at}; write '}}}}' for a literal brace")]
    Unmatched {
        /// Position of the `}`.
        at: usize,
    },
    /// `{}` or `{old.}`.
    #[error("empty placeholder at character {at}; name a column, like '{{id}}'")]
    Empty {
        /// Position of the `{`.
        at: usize,
    },
    /// A placeholder name that is not a plain column name.
    #[error(
        "placeholder '{{{name}}}' at character {at} is not a column name; use '{{column}}', '{{old.column}}' or '{{new.column}}'"
    )]
    BadName {
        /// The text between the braces.
        name: String,
        /// Position of the `{`.
        at: usize,
    },
}

impl Template {
    /// Parses a template. `{{` and `}}` stand for literal braces.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().enumerate().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(TemplateError::Unmatched { at: i + 1 }),
                '{' => {
                    let mut inner = String::new();
                    let mut closed = false;
                    for (_, c) in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        inner.push(c);
                    }
                    if !closed {
                        return Err(TemplateError::Unclosed { at: i + 1 });
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(parse_placeholder(inner.trim(), i + 1)?);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The parsed pieces.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The columns the template reads, with the image each one reads.
    pub fn columns(&self) -> impl Iterator<Item = (ImageSelector, &str)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column { image, name } => Some((*image, name.as_str())),
            Part::Literal(_) => None,
        })
    }

    /// The Redis glob that matches every key this template can render: each placeholder
    /// becomes `*`, glob characters in literal text are escaped.
    pub fn wildcard_pattern(&self) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => push_glob_escaped(&mut out, text),
                Part::Column { .. } => out.push('*'),
            }
        }
        out
    }
}

fn parse_placeholder(inner: &str, at: usize) -> Result<Part, TemplateError> {
    if inner.is_empty() {
        return Err(TemplateError::Empty { at });
    }
    let (image, name) = match inner.split_once('.') {
        Some(("old", name)) => (ImageSelector::Old, name),
        Some(("new", name)) => (ImageSelector::New, name),
        Some(_) => {
            return Err(TemplateError::BadName {
                name: inner.to_owned(),
                at,
            });
        }
        None => (ImageSelector::Any, inner),
    };
    if name.is_empty() {
        return Err(TemplateError::Empty { at });
    }
    if name.contains(['{', '.', '"']) || name.chars().any(char::is_whitespace) {
        return Err(TemplateError::BadName {
            name: inner.to_owned(),
            at,
        });
    }
    Ok(Part::Column {
        image,
        name: name.to_owned(),
    })
}

/// Appends `text` with Redis glob metacharacters escaped.
pub fn push_glob_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Writes a value's text into `out`; kept here so every renderer formats alike.
pub(crate) fn push_value(out: &mut String, text: &[u8]) {
    match std::str::from_utf8(text) {
        Ok(s) => out.push_str(s),
        Err(_) => {
            for b in text {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_literals_and_placeholders() {
        let t = Template::parse("user_posts:{author_id}:{new.id}").unwrap();
        assert_eq!(
            t.parts(),
            &[
                Part::Literal("user_posts:".into()),
                Part::Column {
                    image: ImageSelector::Any,
                    name: "author_id".into()
                },
                Part::Literal(":".into()),
                Part::Column {
                    image: ImageSelector::New,
                    name: "id".into()
                },
            ]
        );
    }

    #[test]
    fn doubled_braces_are_literal() {
        let t = Template::parse("{{x}}:{id}").unwrap();
        assert_eq!(t.parts()[0], Part::Literal("{x}:".into()));
    }

    #[test]
    fn mistakes_name_their_position() {
        assert_eq!(
            Template::parse("user:{id"),
            Err(TemplateError::Unclosed { at: 6 })
        );
        assert_eq!(
            Template::parse("user:id}"),
            Err(TemplateError::Unmatched { at: 8 })
        );
        assert_eq!(
            Template::parse("user:{}"),
            Err(TemplateError::Empty { at: 6 })
        );
        assert!(matches!(
            Template::parse("user:{older.id}"),
            Err(TemplateError::BadName { .. })
        ));
    }

    #[test]
    fn wildcard_pattern_replaces_placeholders_and_escapes_globs() {
        let t = Template::parse("q[1]*:{id}:{old.x}").unwrap();
        assert_eq!(t.wildcard_pattern(), "q\\[1\\]\\*:*:*");
    }

    #[test]
    fn template_fuzz_corpus_and_regressions_parse_without_panic() {
        for (path, bytes) in crate::fuzz_inputs::fuzz_inputs("template_parse") {
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let result = std::panic::catch_unwind(|| {
                    Template::parse(text).map(|t| t.wildcard_pattern())
                });
                assert!(result.is_ok(), "{} panicked", path.display());
            }
        }
    }
}
