//! The serde mirror of a `[[rules]]` entry in `rules.toml`.
//!
//! Only shape and types live here; meaning (templates, tables, durations) is checked
//! in `compile`. Every field's doc comment is user documentation.

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
    /// Tag templates, like `category:{category_id}`: each rendered tag is flushed
    /// (its member keys are deleted, then the tag's own set), per `[tags]`.
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
    /// Key pattern templates, like `user:{id}:*`: rendered like keys (values are
    /// glob-escaped), then every matching key is deleted by SCAN + UNLINK. Costly on
    /// large keyspaces: prefer keys or tags.
    #[serde(default)]
    pub patterns: Vec<Spanned<String>>,
    /// Fire on UPDATE only when one of these columns changed (INSERT and DELETE always
    /// fire). Without the old row image the change counts as changed.
    #[serde(default)]
    pub columns: Vec<Spanned<String>>,
    /// Which operations fire the rule: any of "insert", "update", "delete",
    /// "truncate". Default: all.
    #[serde(default)]
    pub on: Option<Spanned<Vec<String>>>,
    /// What to invalidate when exact invalidation is impossible (TRUNCATE, more rows
    /// in one transaction than `max_keys_per_transaction`, a template whose column
    /// left the table). Default: every template of the rule with `{...}` as `*`.
    #[serde(default)]
    pub fallback: Option<Spanned<FallbackModel>>,
    /// Rows of this rule in one transaction past which the fallback replaces its exact
    /// keys. Default: `[limits] max_keys_per_transaction` (no limit).
    #[serde(default)]
    pub max_keys_per_transaction: Option<Spanned<usize>>,
    /// "delete" (default) or "expire": lower the keys' TTL to `expire_in` instead of
    /// deleting them (never extends a TTL), for stale-while-revalidate caches.
    #[serde(default)]
    pub action: Option<Spanned<String>>,
    /// With `action = "expire"`: the TTL to lower to, like "5s".
    #[serde(default)]
    pub expire_in: Option<Spanned<String>>,
    /// Delete the rule's keys a second time after this delay, like "500ms", against
    /// a reader that read the old row before the commit and caches it after.
    #[serde(default)]
    pub redelete_after: Option<Spanned<String>>,
    /// Write a fence beside each of the rule's keys before deleting it, so an
    /// application filling through `pginval fill-script` never stores a value it read
    /// before the commit (see docs/consistency.md). Default false.
    #[serde(default)]
    pub fence: Option<Spanned<bool>>,
    /// Entity name for entity events (`[events]`), like "user".
    #[serde(default)]
    pub entity: Option<Spanned<String>>,
    /// A SQL condition on the row, like "status = 'published'": the publication's row
    /// filter (PostgreSQL 15+), so the walsender sends only rows it holds for, before
    /// or after the change. Applied when every rule of the table has one (their OR).
    #[serde(default, rename = "where")]
    pub row_filter: Option<Spanned<String>>,
}

/// A rule's declared fallback.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackModel {
    /// Tags to flush.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Key globs to delete by SCAN + UNLINK, like "user:*".
    #[serde(default)]
    pub patterns: Vec<String>,
}
