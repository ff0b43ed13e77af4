//! Loading `rules.toml`: parsing with positions, environment overrides and offline
//! validation that reports every problem at once, each with its line and a fix.
//!
//! Never connects anywhere: checks against the live database are in `check`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IntoDeserializer;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostics::{LineIndex, Problem, write_problem};
pub use crate::replication::source::{SlotLost, Source};
use crate::replication::tls::{TlsSettings, split_tls_params, tokio_postgres_mode};
use crate::rules::compile::{self, RuleSet};
use crate::rules::model::RuleModel;
pub use crate::sink::events::EventsConfig;
use crate::sink::tags::TagLayout;

/// Environment variable that overrides `[source] url`.
pub const ENV_SOURCE_URL: &str = "PGINVAL_SOURCE_URL";
/// Environment variable that overrides `[redis] url`.
pub const ENV_REDIS_URL: &str = "PGINVAL_REDIS_URL";
/// Environment variable holding the source database password.
pub const ENV_SOURCE_PASSWORD: &str = "PGINVAL_SOURCE_PASSWORD";
/// Environment variable holding the Redis password.
pub const ENV_REDIS_PASSWORD: &str = "PGINVAL_REDIS_PASSWORD";
/// Environment variable holding the AMQP broker's password (`[events.amqp]`).
pub const ENV_AMQP_PASSWORD: &str = "PGINVAL_AMQP_PASSWORD";
/// Environment variable holding the NATS password (`[events.nats]`).
pub const ENV_NATS_PASSWORD: &str = "PGINVAL_NATS_PASSWORD";

/// `[source]`: the PostgreSQL database to follow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style DSN, URL (`postgres://user:pw@host:5432/db`) or key=value form.
    /// `PGINVAL_SOURCE_URL` overrides it. Required (here or in the environment).
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// Logical replication slot; created with the pgoutput plugin when missing.
    #[serde(default = "default_name")]
    pub slot: Spanned<String>,
    /// Publication; created `FOR TABLE` the rules' tables when missing.
    #[serde(default = "default_name")]
    pub publication: Spanned<String>,
    /// How often a standby status update is sent even when nothing changes, in
    /// seconds; keep it well below the server's `wal_sender_timeout` (60 s default).
    #[serde(default = "default_status_interval")]
    pub status_interval_secs: Spanned<u64>,
    /// Seconds without any data from the server after which the replication
    /// connection counts as dead and is reopened, like PostgreSQL's
    /// `wal_receiver_timeout` (60 s default); at half of it pginval asks the server for
    /// a keepalive. 0 disables it.
    #[serde(default = "default_receive_timeout")]
    pub receive_timeout_secs: Spanned<u64>,
    /// File holding the password (trailing newline ignored); overrides one in `url`.
    /// `PGINVAL_SOURCE_PASSWORD` overrides both.
    #[serde(default)]
    pub password_file: Option<Spanned<String>>,
    /// When the slot is lost (dropped, or invalidated by `max_slot_wal_keep_size`):
    /// "flush" (default) recreates it and applies every rule's fallback, so no stale
    /// key survives the gap; "fail" stops pginval with an error.
    #[serde(default = "default_on_slot_lost")]
    pub on_slot_lost: Spanned<String>,
    /// Every this many seconds, write a tiny WAL record into this database
    /// (`pg_logical_emit_message`) so the slot advances even when all WAL comes from
    /// other databases. 0 (default) disables it.
    #[serde(default)]
    pub heartbeat_secs: u64,
    /// When pginval creates or manages the publication (PostgreSQL 15+): publish per
    /// table only the columns the rules read plus the replica identity columns, so
    /// the walsender sends less. Off by default: while on, changing a table's REPLICA
    /// IDENTITY before pginval updates the list makes the application's UPDATE and
    /// DELETE on that table fail.
    #[serde(default)]
    pub column_lists: bool,
    /// PostgreSQL 17+: create the slot with `failover = true`, so that a standby with
    /// `sync_replication_slots = on` keeps a copy of it and pginval resumes on the
    /// promoted standby without a gap (list both servers in `url`, like
    /// `host=a,b target_session_attrs=read-write`). Off by default: without it a
    /// failover loses the slot, and pginval applies every rule's fallback there.
    #[serde(default)]
    pub failover_slot: bool,
    /// With a standby as the source: a connection string of its primary. While pginval
    /// creates its slot on the standby (PostgreSQL waits there for the primary to log
    /// its running transactions, which an idle primary may not do for minutes), it runs
    /// `SELECT pg_log_standby_snapshot()` on the primary every second; and `check`
    /// reads there whether it is a primary with `wal_level = logical`. Needs a role allowed to
    /// run that function (superuser, or `GRANT EXECUTE ON FUNCTION
    /// pg_log_standby_snapshot() TO ...`); connected with the source's TLS settings.
    pub standby_primary_url: Option<Spanned<String>>,
    /// PostgreSQL 14+: ask for transactions to be streamed while they run (protocol
    /// version 2, `streaming = on`) once they outgrow the server's
    /// `logical_decoding_work_mem`. pginval holds a streamed transaction's work until
    /// its commit (see `[limits] max_streamed_entries`), so a million-row UPDATE is
    /// invalidated right after its commit instead of after the walsender decoded it
    /// all. On by default; `false` keeps protocol version 1.
    #[serde(default = "yes")]
    pub streaming: bool,
    /// With `streaming`: the `logical_decoding_work_mem` of pginval's walsender (only
    /// that session's, sent when it connects), past which an open transaction is
    /// streamed. What is still unstreamed at the commit is what the walsender sends
    /// after it, so it bounds the commit-to-invalidation time of a big transaction
    /// (about 1.5 s for a million rows at 8MB, 3 s at PostgreSQL's default 64MB).
    /// A size like "8MB" or "512kB" (64kB at least), or "server" for the server's own
    /// setting. Default "8MB".
    #[serde(default = "default_decoding_work_mem")]
    pub logical_decoding_work_mem: Spanned<String>,
}

fn default_decoding_work_mem() -> Spanned<String> {
    Spanned::new(0..0, "8MB".to_owned())
}

fn yes() -> bool {
    true
}

fn default_on_slot_lost() -> Spanned<String> {
    Spanned::new(0..0, "flush".to_owned())
}

/// `[redis]`: where the cache lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`; `PGINVAL_REDIS_URL` overrides it.
    #[serde(default = "default_redis_url")]
    pub url: Spanned<String>,
    /// File holding the password (trailing newline ignored); overrides one in `url`.
    /// `PGINVAL_REDIS_PASSWORD` overrides both.
    #[serde(default)]
    pub password_file: Option<Spanned<String>>,
    /// With `rediss://`: PEM file of the roots to verify the server with (default: the
    /// public web PKI roots).
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
    /// The server is a Redis Cluster (`url` and `nodes` are seed nodes): keys are
    /// routed by hash slot, patterns scan every primary. `check` refuses a mismatch.
    #[serde(default = "default_false")]
    pub cluster: Spanned<bool>,
    /// More cluster seed nodes besides `url`, as URLs or `host:port` (the password and
    /// TLS of `url` apply to them).
    #[serde(default)]
    pub nodes: Vec<Spanned<String>>,
    /// After Redis failed (or a cluster's primaries changed), apply what was sent in
    /// this last stretch again: a delete the old primary acknowledged but had not
    /// replicated is otherwise lost on failover. Default "30s" (Redis Cluster's default
    /// `cluster-node-timeout` is 15 s); "0s" turns it off.
    #[serde(default)]
    pub replay_window: Option<Spanned<String>>,
    /// A batch counts as applied only once this many replicas of each primary have it
    /// (`WAIT`); default 0 (off).
    #[serde(default)]
    pub wait_replicas: Option<Spanned<u32>>,
    /// How long one `WAIT` may take before the batch is retried; default "1s".
    #[serde(default)]
    pub wait_timeout: Option<Spanned<String>>,
    /// A Sentinel-managed Redis: the master's name at the `sentinels`. pginval asks
    /// them where the master is, connects there, and asks again after an error or
    /// when they name another master. `url` then gives only the master's password,
    /// database and TLS.
    #[serde(default)]
    pub sentinel_master: Option<Spanned<String>>,
    /// The Sentinels' addresses (`host:port` or URLs), with `sentinel_master`.
    #[serde(default)]
    pub sentinels: Vec<Spanned<String>>,
}

/// `[tags]`: how cache tags are stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsConfig {
    /// "set" (default: a SET per tag at `key` whose members are cache keys),
    /// "laravel" (Laravel 10+ Redis tagged cache: a ZSET `<prefix>tag:<tag>:entries`
    /// whose members are item keys under `prefix`), "symfony" (RedisTagAwareAdapter
    /// of symfony/cache 6.3 and later: a SET `<prefix><namespace>:\x01tags\x01<tag>`
    /// whose members are item ids under `prefix`) or "symfony-legacy" (up to 6.2:
    /// `\0tags\0`).
    #[serde(default = "default_layout")]
    pub layout: Spanned<String>,
    /// With layout "set": key of a tag's SET; must contain `{tag}`.
    #[serde(default = "default_tag_key")]
    pub key: Spanned<String>,
    /// With "laravel" / "symfony": the key prefix of the cache store (Laravel: the
    /// Redis connection prefix plus the cache prefix; Symfony: the client's prefix).
    #[serde(default)]
    pub prefix: String,
    /// With "symfony": the adapter's namespace ("" when none).
    #[serde(default)]
    pub namespace: String,
}

/// `[hints]`: invalidations applications name themselves, with
/// `pg_logical_emit_message(true, 'pginval', '{"keys": [...], "tags": [...]}')`. Any
/// database role may emit such a message, so hints are refused unless enabled, and
/// then only for the listed key and tag prefixes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintsConfig {
    /// Apply hints (default false: every hint is refused, logged and counted).
    #[serde(default)]
    pub enabled: bool,
    /// Keys a hint may name must start with one of these, like "report:" ("" allows
    /// every key, to every role that can log in).
    #[serde(default)]
    pub key_prefixes: Vec<String>,
    /// Tags a hint may name must start with one of these.
    #[serde(default)]
    pub tag_prefixes: Vec<String>,
    /// Most keys plus tags one hint may name (default 1000); a bigger one is refused.
    #[serde(default = "default_hint_entries")]
    pub max_entries: usize,
}

fn default_hint_entries() -> usize {
    1000
}

impl Default for HintsConfig {
    fn default() -> Self {
        HintsConfig {
            enabled: false,
            key_prefixes: Vec::new(),
            tag_prefixes: Vec::new(),
            max_entries: default_hint_entries(),
        }
    }
}

impl HintsConfig {
    /// Why a hint naming `keys` and `tags` is refused, or `None` when it may apply.
    pub fn refusal(&self, keys: &[String], tags: &[String]) -> Option<String> {
        if !self.enabled {
            return Some("hints are not enabled ([hints] enabled = true)".into());
        }
        if keys.len() + tags.len() > self.max_entries {
            return Some(format!(
                "it names {} keys and tags, more than [hints] max_entries = {}",
                keys.len() + tags.len(),
                self.max_entries
            ));
        }
        let allowed = |name: &String, prefixes: &[String]| {
            prefixes.iter().any(|p| name.starts_with(p.as_str()))
        };
        if let Some(k) = keys.iter().find(|k| !allowed(k, &self.key_prefixes)) {
            return Some(format!("key {k:?} has none of the [hints] key_prefixes"));
        }
        // Whatever the prefixes allow, a hint never deletes pginval's own keys (on a
        // Redis Cluster they share the cache's one database).
        if let Some(k) = keys.iter().find(|k| k.starts_with(STATE_KEY_PREFIX)) {
            return Some(format!(
                "key {k:?} is in pginval's own state ({STATE_KEY_PREFIX}*)"
            ));
        }
        if let Some(t) = tags.iter().find(|t| !allowed(t, &self.tag_prefixes)) {
            return Some(format!("tag {t:?} has none of the [hints] tag_prefixes"));
        }
        None
    }
}

/// What every key of pginval's own state starts with.
pub const STATE_KEY_PREFIX: &str = "pginval:";

/// `[state]`: where pginval keeps its own state — the markers that tell a lost slot
/// from a first start and that owe fallbacks across a crash. Apart from the cache, so
/// that flushing the cache (`FLUSHDB`, a framework's `cache.clear()`), a `*` pattern
/// or a hint cannot remove it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Database number on the cache's Redis server for pginval's state (default 15);
    /// must differ from the cache's. `check` refuses a server whose maxmemory-policy
    /// could evict it (allkeys-*).
    #[serde(default = "default_state_db")]
    pub redis_db: Spanned<i64>,
}

fn default_false() -> Spanned<bool> {
    Spanned::new(0..0, false)
}

fn default_state_db() -> Spanned<i64> {
    Spanned::new(0..0, 15)
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            redis_db: default_state_db(),
        }
    }
}

/// `[metrics]`: the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to listen on, like "127.0.0.1:9187". Without it no endpoint is served.
    #[serde(default)]
    pub listen: Option<Spanned<String>>,
    /// `/readyz` reports unready when a committed change has waited longer than this
    /// many seconds for Redis.
    #[serde(default = "default_max_lag")]
    pub max_lag_secs: u64,
}

fn default_max_lag() -> u64 {
    30
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            max_lag_secs: default_max_lag(),
        }
    }
}

/// `[limits]`: when a big transaction is cheaper to over-invalidate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Rows of one rule in one transaction past which the rule's fallback replaces its
    /// exact keys (a rule may override it). Default: no limit — big transactions are
    /// applied exactly, in parts, with flat memory.
    #[serde(default = "default_max_keys")]
    pub max_keys_per_transaction: Spanned<usize>,
    /// Entries (keys, tags, patterns, events) pginval holds, over all transactions
    /// PostgreSQL streams before their commit (`[source] streaming`), until those
    /// commit. Past it, the growing transaction's rules switch to their fallbacks for
    /// its remaining rows, as past `max_keys_per_transaction`. Default 1,000,000
    /// (about 100 MB).
    #[serde(default = "default_max_streamed")]
    pub max_streamed_entries: Spanned<usize>,
}

fn default_max_streamed() -> Spanned<usize> {
    Spanned::new(0..0, 1_000_000)
}

fn default_layout() -> Spanned<String> {
    Spanned::new(0..0, "set".to_owned())
}
fn default_max_keys() -> Spanned<usize> {
    Spanned::new(0..0, usize::MAX)
}
impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_keys_per_transaction: default_max_keys(),
            max_streamed_entries: default_max_streamed(),
        }
    }
}

fn default_name() -> Spanned<String> {
    Spanned::new(0..0, "pginval".to_owned())
}
fn default_status_interval() -> Spanned<u64> {
    Spanned::new(0..0, 10)
}
fn default_receive_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 60)
}
fn default_redis_url() -> Spanned<String> {
    Spanned::new(0..0, "redis://127.0.0.1:6379/0".to_owned())
}
fn default_tag_key() -> Spanned<String> {
    Spanned::new(0..0, "cache_tag:{tag}".to_owned())
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            url: None,
            slot: default_name(),
            publication: default_name(),
            status_interval_secs: default_status_interval(),
            receive_timeout_secs: default_receive_timeout(),
            password_file: None,
            on_slot_lost: default_on_slot_lost(),
            heartbeat_secs: 0,
            column_lists: false,
            failover_slot: false,
            standby_primary_url: None,
            streaming: true,
            logical_decoding_work_mem: default_decoding_work_mem(),
        }
    }
}
impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: default_redis_url(),
            password_file: None,
            ca_file: None,
            cluster: default_false(),
            nodes: Vec::new(),
            replay_window: None,
            wait_replicas: None,
            wait_timeout: None,
            sentinel_master: None,
            sentinels: Vec::new(),
        }
    }
}
impl Default for TagsConfig {
    fn default() -> Self {
        TagsConfig {
            layout: default_layout(),
            key: default_tag_key(),
            prefix: String::new(),
            namespace: String::new(),
        }
    }
}

/// A Sentinel-managed Redis.
#[derive(Debug, Clone)]
pub struct SentinelConfig {
    /// The master's name at the Sentinels.
    pub master: String,
    /// The Sentinels.
    pub sentinels: Vec<redis::ConnectionInfo>,
}

/// How the cache's Redis is reached.
#[derive(Debug, Clone)]
pub enum Topology {
    /// One server at the URL.
    Node,
    /// A Redis Cluster, through seed nodes.
    Cluster,
    /// The master the Sentinels name.
    Sentinel(SentinelConfig),
}

/// What makes deletes survive a Redis failover.
#[derive(Debug, Clone, PartialEq)]
pub struct Durability {
    /// What was sent this long before a failure is applied again after it.
    pub replay_window: Duration,
    /// Replicas of each primary that must have a batch before it counts (`WAIT`).
    pub wait_replicas: u32,
    /// Bound of one `WAIT`.
    pub wait_timeout: Duration,
}

impl Default for Durability {
    fn default() -> Durability {
        Durability {
            replay_window: Duration::from_secs(30),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// The addresses the cache's sink starts from: `[redis] url`, then the cluster's
    /// further seed nodes.
    pub fn redis_seeds(&self) -> Vec<redis::ConnectionInfo> {
        std::iter::once(self.redis.clone())
            .chain(self.redis_nodes.iter().cloned())
            .collect()
    }

    /// How the cache's Redis is reached.
    pub fn redis_topology(&self) -> Topology {
        match (&self.redis_sentinel, self.redis_cluster) {
            (Some(sentinel), _) => Topology::Sentinel(sentinel.clone()),
            (None, true) => Topology::Cluster,
            (None, false) => Topology::Node,
        }
    }

    /// The addresses of pginval's own state: its database of the cache's server, or on
    /// a cluster the cluster itself.
    pub fn state_seeds(&self) -> Vec<redis::ConnectionInfo> {
        if self.redis_cluster {
            return self.redis_seeds();
        }
        vec![self.state_redis.clone()]
    }
}

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages).
    pub path: PathBuf,
    /// The source database.
    pub source: Source,
    /// The Redis server (the password, if any, stays inside, never printed).
    pub redis: redis::ConnectionInfo,
    /// PEM roots to verify a `rediss://` server with (`[redis] ca_file`).
    pub redis_ca: Option<Vec<u8>>,
    /// How tags are stored.
    pub tags: TagLayout,
    /// Entity events, when `[events]` names a channel or a stream.
    pub events: Option<EventsConfig>,
    /// Which hints are applied.
    pub hints: HintsConfig,
    /// Where pginval's own state lives: the cache's server, another database (on a
    /// cluster, which has one database: the cache's, under `pginval:` keys).
    pub state_redis: redis::ConnectionInfo,
    /// The Redis server is a cluster (`[redis] cluster`).
    pub redis_cluster: bool,
    /// Cluster seed nodes besides `redis` (`[redis] nodes`).
    pub redis_nodes: Vec<redis::ConnectionInfo>,
    /// A Sentinel-managed Redis (`[redis] sentinel_master`, `sentinels`).
    pub redis_sentinel: Option<SentinelConfig>,
    /// What makes deletes survive a Redis failover (`[redis] replay_window`,
    /// `wait_replicas`, `wait_timeout`).
    pub redis_durability: Durability,
    /// The compiled rules.
    pub rules: RuleSet,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `[limits] max_streamed_entries`.
    pub max_streamed_entries: usize,
    /// The readiness lag threshold.
    pub max_lag: Duration,
    /// Log what would be invalidated instead of doing it, and never move the slot
    /// (`run --dry-run`; not a file setting).
    pub dry_run: bool,
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// All problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{} has {n} problem{}:",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write_problem(f, &self.path, p)?;
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file has problems.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl Config {
    /// Reads, parses and validates a configuration file, applying environment overrides.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Config::parse(path, &text, |name| std::env::var(name).ok())?)
    }

    /// Parses and validates configuration text; `env` supplies override variables.
    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let lines = LineIndex::new(text);
        let mut problems = Vec::new();
        let fail = |problems| ConfigError {
            path: path.to_owned(),
            problems,
        };

        let doc = match DeTable::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                let line = e.span().map(|s| lines.line(s.start));
                return Err(fail(vec![Problem::new(
                    line,
                    format!("not valid TOML: {}", e.message()),
                    Some("fix the TOML syntax at that line".into()),
                )]));
            }
        };

        let mut source = SourceConfig::default();
        let mut redis = RedisConfig::default();
        let mut tags = TagsConfig::default();
        let mut events: Option<EventsConfig> = None;
        let mut limits = LimitsConfig::default();
        let mut metrics = MetricsConfig::default();
        let mut hints = HintsConfig::default();
        let mut state = StateConfig::default();
        let mut hints_line = None;
        let mut events_line = None;
        let mut source_line = None;
        let mut rule_models = Vec::new();
        for (key, value) in doc.get_ref() {
            let line = lines.line_of(&key.span());
            match key.get_ref().as_ref() {
                "source" => {
                    source_line = line;
                    section(value, &lines, &mut problems, "[source]", &mut source)
                }
                "redis" => section(value, &lines, &mut problems, "[redis]", &mut redis),
                "tags" => section(value, &lines, &mut problems, "[tags]", &mut tags),
                "limits" => section(value, &lines, &mut problems, "[limits]", &mut limits),
                "metrics" => section(value, &lines, &mut problems, "[metrics]", &mut metrics),
                "hints" => {
                    hints_line = line;
                    section(value, &lines, &mut problems, "[hints]", &mut hints)
                }
                "state" => section(value, &lines, &mut problems, "[state]", &mut state),
                "events" => {
                    events_line = line;
                    let mut e = EventsConfig::default();
                    section(value, &lines, &mut problems, "[events]", &mut e);
                    if !e.has_destination() {
                        problems.push(Problem::new(
                            lines.line_of(&key.span()),
                            "[events] names no destination",
                            Some("add channel = \"pginval:events\" and/or stream = \"pginval:events\" (Redis), or an [events.amqp] or [events.nats] section".into()),
                        ));
                    }
                    broker_settings(&mut e, &env, &lines, &mut problems);
                    events = Some(e);
                }
                "rules" => match value.get_ref() {
                    DeValue::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            let rule_line = lines.line_of(&item.span()).unwrap_or(1);
                            match RuleModel::deserialize(item.clone().into_deserializer()) {
                                Ok(m) => rule_models.push((rule_line, m)),
                                Err(e) => problems.push(Problem::new(
                                    e.span().map(|s| lines.line(s.start)).or(Some(rule_line)),
                                    format!("rule #{}: {}", i + 1, one_line(e.message())),
                                    Some(RULE_FIELDS_HINT.into()),
                                )),
                            }
                        }
                    }
                    other => problems.push(Problem::new(
                        line,
                        format!(
                            "`rules` must be an array of tables, found {}",
                            other.type_str()
                        ),
                        Some("write each rule as a [[rules]] table".into()),
                    )),
                },
                other => problems.push(Problem::new(
                    line,
                    format!("unknown section `{other}`"),
                    Some("the sections are [source], [redis], [state], [tags], [events], [hints], [limits], [metrics] and [[rules]]".into()),
                )),
            }
        }

        // Environment overrides, then validation of the final values.
        let url_line = source.url.as_ref().and_then(|u| lines.line_of(&u.span()));
        let source_url =
            env(ENV_SOURCE_URL).or_else(|| source.url.as_ref().map(|u| u.get_ref().clone()));
        let mut source_tls = TlsSettings::default();
        let pg = match source_url {
            None => {
                problems.push(Problem::new(
                    source_line,
                    "no source database: [source] url is missing",
                    Some(format!(
                        "add `url = \"postgres://user@host:5432/db\"` under [source], or set {ENV_SOURCE_URL}"
                    )),
                ));
                None
            }
            Some(url) => {
                let (url, tls) = match split_tls_params(&url) {
                    Ok(pair) => pair,
                    Err(e) => {
                        problems.push(Problem::new(
                            url_line,
                            format!("[source] url: {e}"),
                            Some(
                                "use sslmode=disable, prefer, require, verify-ca or verify-full"
                                    .into(),
                            ),
                        ));
                        (url.clone(), TlsSettings::default())
                    }
                };
                source_tls = tls;
                match tokio_postgres::Config::from_str(&url) {
                    Ok(mut pg) => {
                        pg.ssl_mode(tokio_postgres_mode(source_tls.mode));
                        match secret(
                            &env,
                            ENV_SOURCE_PASSWORD,
                            source.password_file.as_ref(),
                            &lines,
                            "[source]",
                        ) {
                            Ok(Some(pw)) => {
                                pg.password(pw);
                            }
                            Ok(None) => {}
                            Err(p) => problems.push(p),
                        }
                        Some(pg)
                    }
                    Err(e) => {
                        problems.push(Problem::new(
                        url_line,
                        format!("[source] url is not a valid PostgreSQL connection string: {e}"),
                        Some("use postgres://user:password@host:5432/dbname or host=... dbname=...".into()),
                    ));
                        None
                    }
                }
            }
        };
        let standby_primary = source.standby_primary_url.as_ref().and_then(|url| {
            let line = lines.line_of(&url.span());
            let parsed = split_tls_params(url.get_ref())
                .map_err(|e| e.to_string())
                .and_then(|(plain, tls)| {
                    let mut pg =
                        tokio_postgres::Config::from_str(&plain).map_err(|e| e.to_string())?;
                    pg.ssl_mode(tokio_postgres_mode(tls.mode));
                    Ok(pg)
                });
            match parsed {
                Ok(pg) => Some(pg),
                Err(e) => {
                    problems.push(Problem::new(
                        line,
                        format!("[source] standby_primary_url is not a valid PostgreSQL connection string: {e}"),
                        Some("use postgres://user:password@primary:5432/dbname or host=... dbname=...".into()),
                    ));
                    None
                }
            }
        });
        let work_mem = source.logical_decoding_work_mem.get_ref();
        let decoding_work_mem_kb = match crate::replication::source::memory_kb(work_mem) {
            _ if work_mem == "server" => None,
            Some(kb) if kb >= 64 => Some(kb),
            _ => {
                problems.push(Problem::new(
                    lines.line_of(&source.logical_decoding_work_mem.span()),
                    format!("[source] logical_decoding_work_mem \"{work_mem}\" is not a size of 64kB or more"),
                    Some("write a size like \"8MB\" or \"512kB\", or \"server\" for the server's own setting".into()),
                ));
                None
            }
        };
        for (what, name) in [("slot", &source.slot), ("publication", &source.publication)] {
            if !valid_identifier(name.get_ref()) {
                problems.push(Problem::new(
                    lines.line_of(&name.span()),
                    format!("[source] {what} `{}` is not a valid name", name.get_ref()),
                    Some("use 1 to 63 lower-case letters, digits and underscores".into()),
                ));
            }
        }
        let status_secs = *source.status_interval_secs.get_ref();
        if status_secs == 0 || status_secs > 3600 {
            problems.push(Problem::new(
                lines.line_of(&source.status_interval_secs.span()),
                "[source] status_interval_secs must be between 1 and 3600",
                Some("the default, 10, suits the default wal_sender_timeout of 60 s".into()),
            ));
        }
        let receive_secs = *source.receive_timeout_secs.get_ref();
        if receive_secs != 0 && !(2..=3600).contains(&receive_secs) {
            problems.push(Problem::new(
                lines.line_of(&source.receive_timeout_secs.span()),
                "[source] receive_timeout_secs must be 0 (off) or between 2 and 3600",
                Some(
                    "the default, 60, is PostgreSQL's wal_receiver_timeout; half of it passes before pginval asks the server for a keepalive"
                        .into(),
                ),
            ));
        }

        let redis_url = env(ENV_REDIS_URL).unwrap_or_else(|| redis.url.get_ref().clone());
        let redis_info = match redis::IntoConnectionInfo::into_connection_info(redis_url.as_str()) {
            Ok(info) => {
                match secret(
                    &env,
                    ENV_REDIS_PASSWORD,
                    redis.password_file.as_ref(),
                    &lines,
                    "[redis]",
                ) {
                    Ok(Some(pw)) => {
                        let settings = info.redis_settings().clone().set_password(pw);
                        Some(info.set_redis_settings(settings))
                    }
                    Ok(None) => Some(info),
                    Err(p) => {
                        problems.push(p);
                        None
                    }
                }
            }
            Err(e) => {
                problems.push(Problem::new(
                    lines.line_of(&redis.url.span()),
                    format!(
                        "[redis] url is not a valid Redis URL: {}",
                        redact_redis_error(&e.to_string(), &redis_url)
                    ),
                    Some("use redis://[user:password@]host:6379/0".into()),
                ));
                None
            }
        };
        let tls_config = if source_tls.mode == crate::replication::tls::SslMode::Disable {
            None
        } else {
            match crate::replication::tls::client_config(&source_tls) {
                Ok(c) => Some(c),
                Err(e) => {
                    problems.push(Problem::new(
                        url_line,
                        format!("[source] url: {e}"),
                        Some("point sslrootcert at a readable PEM file of CA certificates".into()),
                    ));
                    None
                }
            }
        };
        let redis_ca = match &redis.ca_file {
            None => None,
            Some(file) => match std::fs::read(file.get_ref()) {
                Ok(pem) => Some(pem),
                Err(e) => {
                    problems.push(Problem::new(
                        lines.line_of(&file.span()),
                        format!("[redis] ca_file {}: {e}", file.get_ref()),
                        Some("point ca_file at a readable PEM file of CA certificates".into()),
                    ));
                    None
                }
            },
        };
        let on_slot_lost = match source.on_slot_lost.get_ref().as_str() {
            "flush" => SlotLost::Flush,
            "fail" => SlotLost::Fail,
            other => {
                problems.push(Problem::new(
                    lines.line_of(&source.on_slot_lost.span()),
                    format!("[source] on_slot_lost `{other}` is not known"),
                    Some(
                        "use \"flush\" (recreate the slot and over-invalidate) or \"fail\"".into(),
                    ),
                ));
                SlotLost::Flush
            }
        };
        let tag_layout = match tags.layout.get_ref().as_str() {
            "set" => {
                if tags.key.get_ref().matches("{tag}").count() != 1 {
                    problems.push(Problem::new(
                        lines.line_of(&tags.key.span()),
                        format!(
                            "[tags] key `{}` must contain `{{tag}}` exactly once",
                            tags.key.get_ref()
                        ),
                        Some("for example key = \"cache_tag:{tag}\"".into()),
                    ));
                }
                TagLayout::Set {
                    key: tags.key.get_ref().clone(),
                }
            }
            "laravel" => TagLayout::Laravel {
                prefix: tags.prefix.clone(),
            },
            "symfony" | "symfony-legacy" => TagLayout::Symfony {
                prefix: tags.prefix.clone(),
                namespace: tags.namespace.clone(),
                legacy: tags.layout.get_ref() == "symfony-legacy",
            },
            other => {
                problems.push(Problem::new(
                    lines.line_of(&tags.layout.span()),
                    format!("[tags] layout `{other}` is not known"),
                    Some("use \"set\", \"laravel\", \"symfony\" (symfony/cache 6.3+) or \"symfony-legacy\" (up to 6.2)".into()),
                ));
                TagLayout::Set {
                    key: tags.key.get_ref().clone(),
                }
            }
        };
        let metrics_listen = match &metrics.listen {
            None => None,
            Some(addr) => match addr.get_ref().parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    problems.push(Problem::new(
                        lines.line_of(&addr.span()),
                        format!("[metrics] listen `{}` is not an address", addr.get_ref()),
                        Some("write ip:port, like \"127.0.0.1:9187\" or \"0.0.0.0:9187\"".into()),
                    ));
                    None
                }
            },
        };
        if *limits.max_keys_per_transaction.get_ref() == 0 {
            problems.push(Problem::new(
                lines.line_of(&limits.max_keys_per_transaction.span()),
                "[limits] max_keys_per_transaction must be at least 1",
                Some("leave it out for no limit (big transactions are applied exactly)".into()),
            ));
        }
        if rule_models.is_empty() && !problems.iter().any(|p| p.message.starts_with("rule #")) {
            problems.push(Problem::new(
                None,
                "no [[rules]]: nothing would ever be invalidated",
                Some(
                    "add a rule such as\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]"
                        .into(),
                ),
            ));
        }
        if hints.enabled && hints.key_prefixes.is_empty() && hints.tag_prefixes.is_empty() {
            problems.push(Problem::new(
                hints_line,
                "[hints] enabled = true but no key_prefixes or tag_prefixes: every hint would be refused",
                Some("list what hints may name, like key_prefixes = [\"report:\"] (\"\" allows every key to every role that can log in)".into()),
            ));
        }
        let redis_durability = durability(&redis, &lines, &mut problems);
        let state_db = *state.redis_db.get_ref();
        let cluster = *redis.cluster.get_ref();
        let redis_nodes = cluster_seeds(&redis, redis_info.as_ref(), &lines, &mut problems);
        let redis_sentinel = sentinel(&redis, &lines, &mut problems);
        let state_redis = redis_info.as_ref().map(|info| {
            if cluster {
                return info.clone();
            }
            let settings = info.redis_settings().clone().set_db(state_db);
            info.clone().set_redis_settings(settings)
        });
        if cluster {
            if let Some(info) = &redis_info
                && info.redis_settings().db() != 0
            {
                problems.push(Problem::new(
                    lines.line_of(&redis.url.span()),
                    format!(
                        "[redis] url names database {}, but a Redis Cluster has database 0 only",
                        info.redis_settings().db()
                    ),
                    Some("drop the database from the URL (redis://host:port)".into()),
                ));
            }
            if !state.redis_db.span().is_empty() {
                problems.push(Problem::new(
                    lines.line_of(&state.redis_db.span()),
                    "[state] redis_db does not apply to a Redis Cluster (it has database 0 only): pginval's state lives there, under pginval: keys",
                    Some("remove redis_db from [state]".into()),
                ));
            }
        } else if let Some(info) = &redis_info
            && info.redis_settings().db() == state_db
        {
            problems.push(Problem::new(
                lines.line_of(&state.redis_db.span()),
                format!("[state] redis_db {state_db} is the cache's own database: flushing the cache would erase pginval's state (the record that tells a lost slot from a first start)"),
                Some("give [state] redis_db another database number (default 15), or the cache another database in [redis] url".into()),
            ));
        }
        if state_db < 0 {
            problems.push(Problem::new(
                lines.line_of(&state.redis_db.span()),
                format!("[state] redis_db {state_db} is not a database number"),
                Some(
                    "use a number from 0 to 15 (the server's `databases` setting is the limit)"
                        .into(),
                ),
            ));
        }
        let defaults = compile::RuleDefaults {
            max_keys_per_transaction: (*limits.max_keys_per_transaction.get_ref()).max(1),
        };
        let rules = compile::compile(rule_models, defaults, &lines, &mut problems);
        if events.is_some() && !rules.rules.iter().any(|r| r.entity.is_some()) {
            problems.push(Problem::new(
                events_line,
                "[events] is configured but no rule sets `entity`, so no event is ever published",
                Some(
                    "add entity = \"user\" (the entity name) to the rules whose changes are events"
                        .into(),
                ),
            ));
        }

        if let Some(amqp) = events.as_ref().and_then(|e| e.amqp.as_ref()) {
            for rule in &rules.rules {
                let Some(entity) = &rule.entity else { continue };
                // The longest key this rule's events can get: op "truncate"/"overflow".
                let longest = crate::rules::invalidation::Event {
                    id: String::new(),
                    entity: entity.as_str().into(),
                    op: "overflow",
                    table: rule.qualified_table().into(),
                    json: String::new(),
                };
                if let Ok(key) =
                    crate::sink::events::render_route(amqp.routing_key.get_ref(), Some(&longest))
                    && key.len() > 255
                {
                    problems.push(Problem::new(
                        Some(rule.line),
                        format!(
                            "rule #{}: its events' AMQP routing key would be {} bytes, over AMQP's 255",
                            rule.number,
                            key.len()
                        ),
                        Some("use a shorter entity name or [events.amqp] routing_key".into()),
                    ));
                }
            }
        }
        problems.sort_by_key(|p| p.line.unwrap_or(0));
        match (problems.is_empty(), pg, redis_info, state_redis) {
            (true, Some(pg), Some(redis), Some(state_redis)) => Ok(Config {
                path: path.to_owned(),
                source: Source {
                    pg,
                    slot: source.slot.into_inner(),
                    publication: source.publication.into_inner(),
                    status_interval: Duration::from_secs(status_secs),
                    receive_timeout: (receive_secs > 0).then(|| Duration::from_secs(receive_secs)),
                    on_slot_lost,
                    heartbeat: (source.heartbeat_secs > 0)
                        .then(|| Duration::from_secs(source.heartbeat_secs)),
                    tls: source_tls,
                    column_lists: source.column_lists,
                    failover_slot: source.failover_slot,
                    streaming: source.streaming,
                    decoding_work_mem_kb,
                    standby_primary,
                    tls_config,
                },
                redis_ca,
                redis,
                tags: tag_layout,
                events,
                hints,
                state_redis,
                redis_cluster: cluster,
                redis_nodes,
                redis_sentinel,
                redis_durability,
                rules,
                metrics_listen,
                max_lag: Duration::from_secs(metrics.max_lag_secs.max(1)),
                max_streamed_entries: *limits.max_streamed_entries.get_ref(),
                dry_run: false,
            }),
            _ => Err(fail(problems)),
        }
    }
}

/// `[redis] replay_window`, `wait_replicas` and `wait_timeout`, with a problem for each
/// that is not a duration.
fn durability(redis: &RedisConfig, lines: &LineIndex, problems: &mut Vec<Problem>) -> Durability {
    let mut duration = |field: &Option<Spanned<String>>, name: &str, default: Duration| {
        let Some(value) = field else {
            return default;
        };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) => d,
            Err(_) => {
                problems.push(Problem::new(
                    lines.line_of(&value.span()),
                    format!("[redis] {name} \"{}\" is not a duration", value.get_ref()),
                    Some("write a duration like \"10s\" or \"500ms\"".into()),
                ));
                default
            }
        }
    };
    let replay_window = duration(
        &redis.replay_window,
        "replay_window",
        Duration::from_secs(30),
    );
    let wait_timeout = duration(&redis.wait_timeout, "wait_timeout", Duration::from_secs(1));
    let span = redis
        .wait_timeout
        .as_ref()
        .map(|v| v.span())
        .unwrap_or(0..0);
    if wait_timeout.is_zero() {
        problems.push(Problem::new(
            lines.line_of(&span),
            "[redis] wait_timeout is 0, which makes WAIT block until the replicas answer, however long",
            Some("give a bound like \"1s\"".into()),
        ));
    } else if wait_timeout >= Duration::from_secs(5) {
        problems.push(Problem::new(
            lines.line_of(&span),
            format!(
                "[redis] wait_timeout {} is not under 5 s, the longest pginval waits for any one Redis answer on a cluster",
                humantime::format_duration(wait_timeout)
            ),
            Some("give a bound under 5 s, like \"1s\"".into()),
        ));
    }
    Durability {
        replay_window,
        wait_replicas: redis.wait_replicas.as_ref().map_or(0, |n| *n.get_ref()),
        wait_timeout,
    }
}

/// `[redis] sentinel_master` and `sentinels`, with a problem for each address that is
/// not one and for one without the other (or with `cluster`).
fn sentinel(
    redis: &RedisConfig,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Option<SentinelConfig> {
    let master = redis.sentinel_master.as_ref();
    match (master, redis.sentinels.first()) {
        (None, None) => return None,
        (Some(m), None) => {
            problems.push(Problem::new(
                lines.line_of(&m.span()),
                "[redis] sentinel_master is set but sentinels names no Sentinel",
                Some(
                    "list the Sentinels, like sentinels = [\"10.0.0.5:26379\", \"10.0.0.6:26379\"]"
                        .into(),
                ),
            ));
            return None;
        }
        (None, Some(first)) => {
            problems.push(Problem::new(
                lines.line_of(&first.span()),
                "[redis] sentinels are listed but sentinel_master is not set",
                Some("add the master's name, like sentinel_master = \"mymaster\"".into()),
            ));
            return None;
        }
        (Some(m), Some(_)) if *redis.cluster.get_ref() => {
            problems.push(Problem::new(
                lines.line_of(&m.span()),
                "[redis] sentinel_master and cluster = true exclude each other",
                Some("a Redis Cluster fails over by itself: remove sentinel_master and sentinels, or cluster".into()),
            ));
            return None;
        }
        (Some(_), Some(_)) => {}
    }
    let mut sentinels = Vec::new();
    for node in &redis.sentinels {
        let text = node.get_ref();
        let full = if text.contains("://") {
            text.clone()
        } else {
            format!("redis://{text}")
        };
        match redis::IntoConnectionInfo::into_connection_info(full.as_str()) {
            Ok(info) => sentinels.push(info),
            Err(e) => problems.push(Problem::new(
                lines.line_of(&node.span()),
                format!(
                    "[redis] sentinels: `{text}` is not an address: {}",
                    redact_redis_error(&e.to_string(), &full)
                ),
                Some("use host:port, like 10.0.0.5:26379".into()),
            )),
        }
    }
    Some(SentinelConfig {
        master: master?.get_ref().clone(),
        sentinels,
    })
}

/// `[redis] nodes` as connection infos with `url`'s password and TLS; a problem for
/// each that is not an address, and for nodes without `cluster = true`.
fn cluster_seeds(
    redis: &RedisConfig,
    url: Option<&redis::ConnectionInfo>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Vec<redis::ConnectionInfo> {
    if !redis.nodes.is_empty() && !*redis.cluster.get_ref() {
        problems.push(Problem::new(
            lines.line_of(&redis.nodes[0].span()),
            "[redis] nodes are the seed nodes of a Redis Cluster, but cluster is not set",
            Some("add cluster = true to [redis], or remove nodes".into()),
        ));
    }
    let mut seeds = Vec::new();
    for node in &redis.nodes {
        let text = node.get_ref();
        let tls = url.is_some_and(|u| matches!(u.addr(), redis::ConnectionAddr::TcpTls { .. }));
        let full = if text.contains("://") {
            text.clone()
        } else {
            format!("{}://{text}", if tls { "rediss" } else { "redis" })
        };
        match redis::IntoConnectionInfo::into_connection_info(full.as_str()) {
            Ok(info) => {
                let settings = match url {
                    Some(u) => u.redis_settings().clone(),
                    None => info.redis_settings().clone(),
                };
                seeds.push(info.set_redis_settings(settings));
            }
            Err(e) => problems.push(Problem::new(
                lines.line_of(&node.span()),
                format!(
                    "[redis] nodes: `{text}` is not a Redis address: {}",
                    redact_redis_error(&e.to_string(), &full)
                ),
                Some("use host:port or redis://host:port".into()),
            )),
        }
    }
    seeds
}

const RULE_FIELDS_HINT: &str = "a rule has `table` (\"schema.table\"), `keys` and `tags` (lists of templates like \"user:{id}\")";

/// Deserializes one `[section]`, recording a problem instead of failing.
fn section<T: for<'de> Deserialize<'de>>(
    value: &Spanned<DeValue<'_>>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
    name: &str,
    out: &mut T,
) {
    match T::deserialize(value.clone().into_deserializer()) {
        Ok(v) => *out = v,
        Err(e) => problems.push(Problem::new(
            e.span()
                .map(|s| lines.line(s.start))
                .or_else(|| lines.line_of(&value.span())),
            format!("{name}: {}", one_line(e.message())),
            Some(format!(
                "see the configuration reference in README.md for {name}"
            )),
        )),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A password from the environment variable `var`, else from `file`; `None` when
/// neither is set. A file that cannot be read is a problem.
fn secret(
    env: &impl Fn(&str) -> Option<String>,
    var: &str,
    file: Option<&Spanned<String>>,
    lines: &LineIndex,
    section: &str,
) -> Result<Option<String>, Problem> {
    if let Some(pw) = env(var) {
        return Ok(Some(pw));
    }
    let Some(file) = file else { return Ok(None) };
    match std::fs::read_to_string(file.get_ref()) {
        Ok(text) => Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned())),
        Err(e) => Err(Problem::new(
            lines.line_of(&file.span()),
            format!("{section} password_file {}: {e}", file.get_ref()),
            Some("point password_file at a readable file holding only the password".into()),
        )),
    }
}

/// Checks the `[events.amqp]` and `[events.nats]` settings of `events` and sets their
/// passwords from the environment or their `password_file`.
fn broker_settings(
    events: &mut EventsConfig,
    env: &impl Fn(&str) -> Option<String>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) {
    if let Some(amqp) = &mut events.amqp {
        let found = amqp.problems();
        let line = lines.line_of(&amqp.url.span());
        amqp.password = broker_secret(
            found,
            line,
            ENV_AMQP_PASSWORD,
            amqp.password_file.as_ref(),
            "[events.amqp]",
            env,
            lines,
            problems,
        );
    }
    if let Some(nats) = &mut events.nats {
        let found = nats.problems();
        let line = lines.line_of(&nats.url.span());
        nats.password = broker_secret(
            found,
            line,
            ENV_NATS_PASSWORD,
            nats.password_file.as_ref(),
            "[events.nats]",
            env,
            lines,
            problems,
        );
    }
}

/// Records a broker section's `found` problems (at their setting's line, else at
/// `url_line`) and returns its password from `var` or `file`.
#[allow(clippy::too_many_arguments)]
fn broker_secret(
    found: Vec<(std::ops::Range<usize>, String, String)>,
    url_line: Option<usize>,
    var: &str,
    file: Option<&Spanned<String>>,
    section: &str,
    env: &impl Fn(&str) -> Option<String>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Option<String> {
    for (span, message, fix) in found {
        problems.push(Problem::new(
            lines.line_of(&span).or(url_line),
            message,
            Some(fix),
        ));
    }
    secret(env, var, file, lines, section).unwrap_or_else(|p| {
        problems.push(p);
        None
    })
}

/// A Redis URL error message with the URL's password removed.
fn redact_redis_error(message: &str, url: &str) -> String {
    let redacted = redact(url);
    message.replace(url, &redacted)
}

/// A Postgres name pginval creates: lower-case, digits, underscores, at most 63 bytes.
fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// A connection string with any password replaced by `***`, safe to print.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (base, query) = match rest.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (rest, None),
        };
        let mut out = format!("{scheme}://");
        match base.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => out.push_str(&format!("{user}:***@{host}")),
                None => out.push_str(base),
            },
            None => out.push_str(base),
        }
        if let Some(query) = query {
            let params: Vec<&str> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***",
                    _ => kv,
                })
                .collect();
            out.push('?');
            out.push_str(&params.join("&"));
        }
        return out;
    }
    match crate::replication::tls::key_value_pairs(url) {
        Some(pairs) => pairs
            .iter()
            .map(|(k, v)| match k.as_str() {
                "password" => "password=***".to_owned(),
                _ => crate::replication::tls::key_value(k, v),
            })
            .collect::<Vec<_>>()
            .join(" "),
        // Not a connection string: nothing in it can be told apart as a password.
        None => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("rules.toml"), text, |_| None)
    }

    const GOOD: &str = r#"
[source]
url = "postgres://postgres@127.0.0.1:5432/app"

[[rules]]
table = "users"
keys = ["user:{id}", "user_full:{id}"]
tags = ["user:{id}"]

[[rules]]
table = "blog.posts"
keys = ["post:{id}", "user_posts:{author_id}"]
"#;

    #[test]
    fn a_good_file_loads_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.source.slot, "pginval");
        assert_eq!(c.source.publication, "pginval");
        assert_eq!(
            c.tags,
            TagLayout::Set {
                key: "cache_tag:{tag}".into()
            }
        );
        assert_eq!(c.redis.addr().to_string(), "127.0.0.1:6379");
        assert_eq!(c.rules.rules.len(), 2);
        assert_eq!(c.rules.rules[1].schema, "blog");
        assert_eq!(c.rules.rules[1].line, 10);
    }

    #[test]
    fn streaming_defaults_to_on_with_8mb_and_a_bad_size_is_a_problem_on_its_line() {
        let c = parse(GOOD).unwrap();
        assert!(c.source.streaming);
        assert_eq!(c.source.decoding_work_mem_kb, Some(8192));
        assert_eq!(c.max_streamed_entries, 1_000_000);
        let server = GOOD.replace(
            "[source]\n",
            "[source]\nlogical_decoding_work_mem = \"server\"\n",
        );
        assert_eq!(parse(&server).unwrap().source.decoding_work_mem_kb, None);
        let bad = GOOD.replace(
            "[source]\n",
            "[source]\nlogical_decoding_work_mem = \"8 MiB\"\n",
        );
        let err = parse(&bad).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].line, Some(3));
        assert!(err.problems[0].message.contains("\"8 MiB\""), "{err}");
    }

    #[test]
    fn a_cluster_takes_seed_nodes_and_keeps_pginvals_state_in_its_one_database() {
        let text = format!(
            "[redis]\nurl = \"redis://:pw@10.0.0.1:7000\"\ncluster = true\nnodes = [\"10.0.0.2:7000\", \"redis://10.0.0.3:7000\"]\n{GOOD}"
        );
        let c = parse(&text).unwrap();
        assert!(c.redis_cluster);
        let seeds: Vec<String> = c
            .redis_seeds()
            .iter()
            .map(|s| s.addr().to_string())
            .collect();
        assert_eq!(seeds, ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]);
        // The URL's password applies to every seed.
        assert!(
            c.redis_seeds()
                .iter()
                .all(|s| s.redis_settings().password() == Some("pw"))
        );
        assert_eq!(c.state_seeds().len(), 3);
        assert_eq!(c.state_redis.redis_settings().db(), 0);
        // There, a hint that every prefix allows still cannot delete pginval's state.
        let open = format!("{text}\n[hints]\nenabled = true\nkey_prefixes = [\"\"]\n");
        let c = parse(&open).unwrap();
        assert!(c.hints.refusal(&["report:1".into()], &[]).is_none());
        let refused = c
            .hints
            .refusal(&["pginval:slot-state:app:pginval".into()], &[]);
        assert!(refused.is_some_and(|r| r.contains("pginval's own state")));
    }

    #[test]
    fn sentinel_needs_a_master_name_and_sentinels_and_excludes_cluster() {
        let text = format!(
            "[redis]\nsentinel_master = \"pgm\"\nsentinels = [\"10.0.0.5:26379\", \"redis://10.0.0.6:26379\"]\n{GOOD}"
        );
        let c = parse(&text).unwrap();
        match c.redis_topology() {
            Topology::Sentinel(s) => {
                assert_eq!(s.master, "pgm");
                let addrs: Vec<String> = s.sentinels.iter().map(|i| i.addr().to_string()).collect();
                assert_eq!(addrs, ["10.0.0.5:26379", "10.0.0.6:26379"]);
            }
            other => panic!("{other:?}"),
        }
        for (text, line, message) in [
            (
                "sentinel_master = \"pgm\"\n",
                2,
                "sentinels names no Sentinel",
            ),
            (
                "sentinels = [\"10.0.0.5:26379\"]\n",
                2,
                "sentinel_master is not set",
            ),
            (
                "cluster = true\nsentinel_master = \"pgm\"\nsentinels = [\"h:1\"]\n",
                3,
                "exclude each other",
            ),
        ] {
            let e = parse(&format!("[redis]\n{text}{GOOD}")).unwrap_err();
            assert!(
                e.problems[0].line == Some(line) && e.problems[0].message.contains(message),
                "{e}"
            );
        }
    }

    #[test]
    fn a_cluster_refuses_databases_and_nodes_need_cluster() {
        let text = format!(
            "[redis]\nurl = \"redis://10.0.0.1:7000/2\"\ncluster = true\n\n[state]\nredis_db = 15\n{GOOD}"
        );
        let e = parse(&text).unwrap_err();
        let messages: Vec<(Option<usize>, &str)> = e
            .problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        assert!(
            messages[0].0 == Some(2)
                && messages[0]
                    .1
                    .contains("a Redis Cluster has database 0 only"),
            "{e}"
        );
        assert!(
            messages[1].0 == Some(6) && messages[1].1.contains("[state] redis_db does not apply"),
            "{e}"
        );
        let text = format!(
            "[redis]\nreplay_window = \"soon\"\nwait_replicas = 1\nwait_timeout = \"0s\"\n{GOOD}"
        );
        let e = parse(&text).unwrap_err();
        assert!(
            e.problems[0].line == Some(2)
                && e.problems[0]
                    .message
                    .contains("replay_window \"soon\" is not a duration"),
            "{e}"
        );
        assert!(
            e.problems[1].line == Some(4) && e.problems[1].message.contains("wait_timeout is 0"),
            "{e}"
        );
        let ok = parse(&format!(
            "[redis]\nreplay_window = \"0s\"\nwait_replicas = 2\n{GOOD}"
        ))
        .unwrap();
        assert_eq!(ok.redis_durability.replay_window, Duration::ZERO);
        assert_eq!(ok.redis_durability.wait_replicas, 2);
        assert_eq!(parse(GOOD).unwrap().redis_durability, Durability::default());
        let text = format!("[redis]\nnodes = [\"10.0.0.2:7000\", \"no such:port\"]\n{GOOD}");
        let e = parse(&text).unwrap_err();
        assert!(
            e.problems
                .iter()
                .any(|p| p.message.contains("cluster is not set")),
            "{e}"
        );
        assert!(
            e.problems
                .iter()
                .any(|p| p.message.contains("is not a Redis address")),
            "{e}"
        );
    }

    #[test]
    fn state_lives_in_its_own_database_and_hints_are_off_by_default() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.state_redis.redis_settings().db(), 15);
        assert_eq!(c.state_redis.addr().to_string(), "127.0.0.1:6379");
        assert!(c.hints.refusal(&["report:1".into()], &[]).is_some());
        let same = format!("[state]\nredis_db = 0\n{GOOD}");
        let e = parse(&same).unwrap_err();
        assert!(
            e.problems[0].message.contains("the cache's own database"),
            "{e}"
        );
        let open = format!("[hints]\nenabled = true\n{GOOD}");
        let e = parse(&open).unwrap_err();
        assert!(
            e.problems[0]
                .message
                .contains("every hint would be refused"),
            "{e}"
        );
    }

    #[test]
    fn redelete_after_with_expire_is_refused_not_ignored() {
        let text = format!(
            "{GOOD}\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\naction = \"expire\"\nexpire_in = \"5s\"\nredelete_after = \"1s\"\n"
        );
        let e = parse(&text).unwrap_err();
        assert!(
            e.problems
                .iter()
                .any(|p| p.message.contains("never deletes them")
                    && p.line.is_some()
                    && p.fix.is_some()),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides_urls() {
        let c = Config::parse(Path::new("r.toml"), GOOD, |k| match k {
            ENV_SOURCE_URL => Some("postgres://u@db:5433/other".into()),
            ENV_REDIS_URL => Some("redis://cache:6380/2".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.source.pg.get_dbname(), Some("other"));
        assert_eq!(c.redis.addr().to_string(), "cache:6380");
        assert_eq!(c.redis.redis_settings().db(), 2);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_line() {
        let text = r#"
[source]
url = "postgres://postgres@127.0.0.1:5432/app"
slot = "Bad-Slot"

[tags]
key = "no_placeholder"

[[rules]]
tabel = "users"

[[rules]]
table = "posts"
keys = ["post:{id"]
"#;
        let err = parse(text).unwrap_err();
        let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(4), Some(7), Some(10), Some(14)], "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("rules.toml:10: rule #1: unknown field `tabel`"),
            "{shown}"
        );
        assert!(shown.contains("unclosed '{'"), "{shown}");
        assert!(shown.contains("fix: "), "{shown}");
    }

    #[test]
    fn a_row_filter_needs_insert_and_delete_beside_update() {
        let text = r#"
[source]
url = "postgres://postgres@127.0.0.1:5432/app"

[[rules]]
table = "posts"
keys = ["post:{id}"]
where = "status = 'published'"

[[rules]]
table = "posts"
keys = ["post_title:{id}"]
on = ["update"]
where = "status = 'published'"

[[rules]]
table = "users"
keys = ["user:{id}"]
where = " "
"#;
        let err = parse(text).unwrap_err();
        let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(14), Some(19)], "{err}");
        let shown = err.to_string();
        assert!(shown.contains("arrives as a DELETE"), "{shown}");
        assert!(shown.contains("`where` is empty"), "{shown}");
        let ok = parse(
            &text[..text
                .find("[[rules]]\ntable = \"posts\"\nkeys = [\"post_title")
                .unwrap()],
        )
        .unwrap();
        assert_eq!(
            ok.rules.rules[0].row_filter.as_deref(),
            Some("status = 'published'")
        );
    }

    #[test]
    fn toml_syntax_errors_name_the_line() {
        let err = parse("[source]\nurl = \"x\n").unwrap_err();
        assert_eq!(err.problems[0].line, Some(2));
    }

    #[test]
    fn missing_source_url_and_rules_are_problems() {
        let err = parse("").unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/d"),
            "postgres://u:***@h:5432/d"
        );
        assert_eq!(
            redact("host=h password=secret user=u"),
            "host='h' password=*** user='u'"
        );
        assert_eq!(
            redact("host=h password = 'se cret' user=u"),
            "host='h' password=*** user='u'"
        );
        assert_eq!(
            redact("postgres://h/d?user=u&password=secret&sslmode=require"),
            "postgres://h/d?user=u&password=***&sslmode=require"
        );
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
    }

    #[test]
    fn config_fuzz_corpus_and_regressions_parse_without_panic() {
        for (path, bytes) in crate::fuzz_inputs::fuzz_inputs("config_parse") {
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let result = std::panic::catch_unwind(|| {
                    Config::parse(&path, text, |_| None).map_err(|e| e.to_string())
                });
                assert!(result.is_ok(), "{} panicked", path.display());
            }
        }
    }
}
