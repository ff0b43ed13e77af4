//! The command line: commands, global options and exit codes.
//!
//! Parsing only; what each command does lives in `main` and the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: a runtime failure (database or Redis unreachable, stream error).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad configuration or usage.
pub const EXIT_CONFIG: u8 = 2;

/// Keeps Redis caches in step with PostgreSQL through logical replication.
#[derive(Debug, Parser)]
#[command(
    name = "pginval",
    version,
    about,
    long_about = None,
    after_help = "Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.\nEnvironment: PGINVAL_CONFIG, PGINVAL_SOURCE_URL, PGINVAL_REDIS_URL, RUST_LOG."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log level or filter (e.g. `info`, `pginval=debug`); `RUST_LOG` is used when unset.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream changes and invalidate Redis until stopped (SIGINT/SIGTERM).
    #[command(
        after_help = "Example:\n  pginval run --config rules.toml\n  PGINVAL_SOURCE_URL=postgres://pginval:pw@db/app pginval run"
    )]
    Run(RunArgs),
    /// Validate the configuration and check it against the live database.
    #[command(
        after_help = "Exit codes: 0 ok, 2 configuration problems, 1 other failures.\n\nExample:\n  pginval check --config rules.toml"
    )]
    Check(ConfigArg),
    /// Show what one row change would invalidate and publish, without touching
    /// PostgreSQL or Redis.
    #[command(
        after_help = "Columns left out of --old/--new count as not sent by Postgres.\n\nExample:\n  pginval explain --table posts --op update \\\n    --old '{\"id\":1,\"author_id\":3}' --new '{\"id\":1,\"author_id\":7}'"
    )]
    Explain(ExplainArgs),
    /// Show the slot (state, confirmed LSN, retained WAL), the publication's tables
    /// and whether each rule is covered by its table's replica identity.
    #[command(
        after_help = "Example:\n  pginval status --config rules.toml\n  pginval status --json | jq .slot"
    )]
    Status(StatusArgs),
    /// Print (and with --apply, run) the SQL that prepares the database for the rules:
    /// publication, REPLICA IDENTITY changes, slot. Idempotent.
    #[command(
        after_help = "Example:\n  pginval setup --config rules.toml           # review the SQL\n  pginval setup --config rules.toml --apply   # run it"
    )]
    Setup(SetupArgs),
    /// Print the Lua script applications fill fenced keys with (rules with
    /// `fence = true`), and how to name a key's fence.
    #[command(
        after_help = "Read with MGET key fence; on a miss read the database, then EVAL this script\n(or EVALSHA after SCRIPT LOAD) if less than half of [redis] fence_ttl passed.\n\nExample:\n  pginval fill-script --config rules.toml > fill.lua"
    )]
    FillScript(ConfigArg),
}

/// Options of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `setup`.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Run the statements instead of only printing them.
    #[arg(long)]
    pub apply: bool,
}

/// Options of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Stream and log what would be invalidated, without touching Redis and without
    /// moving the slot.
    #[arg(long)]
    pub dry_run: bool,
}

/// Options of `explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// The table, `table` or `schema.table`.
    #[arg(long)]
    pub table: String,
    /// insert, update, delete or truncate.
    #[arg(long, value_parser = ["insert", "update", "delete", "truncate"])]
    pub op: String,
    /// The old row image as JSON (what Postgres sends for UPDATE/DELETE).
    #[arg(long)]
    pub old: Option<String>,
    /// The new row image as JSON.
    #[arg(long)]
    pub new: Option<String>,
}

/// The `--config` option shared by every command.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path of the configuration file.
    #[arg(long, short, env = "PGINVAL_CONFIG", default_value = "rules.toml")]
    pub config: PathBuf,
}
