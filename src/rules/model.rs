//! The serde mirror of a `[[rules]]` entry in `rules.toml`.
//!
//! Only shape and types live here; meaning (templates, tables) is checked in
//! `compile`. Every field's doc comment is user documentation.

use serde::Deserialize;
use toml::Spanned;

/// One `[[rules]]` entry: which cache entries a table's row changes make stale.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleModel {
    /// The table, as `schema.table`; without a schema, `public`.
    pub table: Spanned<String>,
    /// Key templates to delete, like `user:{id}`. `{col}` renders against every row
    /// image the change carries (new and old); `{old.col}` / `{new.col}` pick one.
    #[serde(default)]
    pub keys: Vec<Spanned<String>>,
    /// Tag templates, like `category:{category_id}`: each rendered tag's SET (see
    /// `[tags] key`) is flushed: its member keys are deleted, then the SET itself.
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
}
