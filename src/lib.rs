//! pginval keeps Redis caches in step with PostgreSQL: it follows the database through
//! logical replication (pgoutput), turns every committed row change into an entity
//! event, and applies the rules of `rules.toml` to delete keys and flush cache tags.
//!
//! # Layout
//!
//! The modules follow the data, in order:
//!
//! - [`diagnostics`]: problems with line and fix, and their printing (a leaf).
//! - [`config`]: `rules.toml`: parsing with line numbers, env overrides, validation.
//! - [`replication`]: wire → domain: the replication connection ([`replication::conn`]),
//!   its frames ([`replication::protocol`]), the pgoutput decoder
//!   ([`replication::pgoutput`]), the relation cache, `RowEvent`, and catalog queries.
//! - [`rules`]: domain → intent: templates, compiled rules, invalidation sets, entity
//!   events.
//! - [`sink`]: intent → effect: the `Sink` seam; Redis pipelines, tag flushes and
//!   fences; event brokers.
//! - [`pipeline`]: wires the stages: the streaming loop, with start-up, the sink
//!   task, the read-replica wait, background jobs and the pure acknowledgement rule in
//!   submodules.
//! - [`metrics`]: metric names, `/metrics`, `/healthz`, `/readyz`.
//! - [`publication`]: the publication policy: what the managed publication should be,
//!   its drift, the DDL (used by `check`, `setup` and start-up).
//! - [`check`]: the configuration against the live database.
//! - [`explain`]: what one row change would do, without any IO.
//! - [`setup`], [`status`]: preparing and inspecting the database.
//! - [`cli`]: the command line.

pub mod check;
pub mod cli;
pub mod config;
pub mod diagnostics;
pub mod explain;
#[cfg(test)]
mod fuzz_inputs;
pub mod metrics;
pub mod pipeline;
pub mod publication;
pub mod replication;
pub mod rules;
pub mod setup;
pub mod sink;
pub mod status;
