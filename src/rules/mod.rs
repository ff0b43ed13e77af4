//! Domain → intent: rules from `rules.toml`, compiled against the tables in the
//! stream, turn each `RowEvent` into keys, tags and patterns to invalidate.
//! Never talks to Redis (that is `sink/`) nor reads the wire (that is `replication/`).

pub mod compile;
pub mod entity;
pub mod invalidation;
pub mod model;
pub mod template;
