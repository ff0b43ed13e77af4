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

mod sections;

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

pub use sections::*;

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
    /// How long a fence lives (`fence = true`).
    pub fence_ttl: Duration,
}

impl Default for Durability {
    fn default() -> Durability {
        Durability {
            replay_window: Duration::from_secs(30),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            fence_ttl: Duration::from_secs(60),
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
    /// Physical replicas the application reads from (`[replicas]`).
    pub read_replicas: ReadReplicas,
    /// The readiness lag threshold.
    pub max_lag: Duration,
    /// Log what would be invalidated instead of doing it, and never move the slot
    /// (`run --dry-run`; not a file setting).
    pub dry_run: bool,
}

/// Physical replicas the application reads from: batches are applied again once each
/// has replayed them.
#[derive(Debug, Clone, Default)]
pub struct ReadReplicas {
    /// Their connection settings (the source's TLS settings apply).
    pub replicas: Vec<tokio_postgres::Config>,
    /// How long a batch waits for a replica that has not replayed it.
    pub give_up_after: Duration,
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
        let mut replicas = ReplicasConfig::default();
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
                "replicas" => section(value, &lines, &mut problems, "[replicas]", &mut replicas),
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
            match other_server(url.get_ref()) {
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
        let read_replicas = read_replicas(&replicas, &lines, &mut problems);
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
                read_replicas,
                dry_run: false,
            }),
            _ => Err(fail(problems)),
        }
    }
}

/// Connection settings of another server of the source's cluster (a standby's
/// primary, a read replica), its `sslmode` kept.
fn other_server(url: &str) -> Result<tokio_postgres::Config, String> {
    let (plain, tls) = split_tls_params(url).map_err(|e| e.to_string())?;
    let mut pg = tokio_postgres::Config::from_str(&plain).map_err(|e| e.to_string())?;
    pg.ssl_mode(tokio_postgres_mode(tls.mode));
    Ok(pg)
}

/// `[replicas]`, with a problem for each URL that is not one and a bad give-up time.
fn read_replicas(
    section: &ReplicasConfig,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> ReadReplicas {
    let mut replicas = Vec::new();
    for url in &section.urls {
        match other_server(url.get_ref()) {
            Ok(pg) => replicas.push(pg),
            Err(e) => problems.push(Problem::new(
                lines.line_of(&url.span()),
                format!("[replicas] urls: not a valid PostgreSQL connection string: {e}"),
                Some(
                    "use postgres://user:password@replica:5432/dbname or host=... dbname=..."
                        .into(),
                ),
            )),
        }
    }
    let give_up_after = match &section.give_up_after {
        None => Duration::from_secs(30),
        Some(value) => match humantime::parse_duration(value.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                problems.push(Problem::new(
                    lines.line_of(&value.span()),
                    format!(
                        "[replicas] give_up_after \"{}\" is not a positive duration",
                        value.get_ref()
                    ),
                    Some("write a duration like \"30s\"".into()),
                ));
                Duration::from_secs(30)
            }
        },
    };
    ReadReplicas {
        replicas,
        give_up_after,
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
    let fence_ttl = duration(&redis.fence_ttl, "fence_ttl", Duration::from_secs(60));
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
    if let Some(value) = &redis.fence_ttl
        && fence_ttl < Duration::from_secs(2)
    {
        problems.push(Problem::new(
            lines.line_of(&value.span()),
            format!(
                "[redis] fence_ttl {} is under 2 s: a fill may then come no later than {} after its read",
                humantime::format_duration(fence_ttl),
                humantime::format_duration(fence_ttl / 2)
            ),
            Some("give a duration well above your longest read-to-fill time, like \"60s\"".into()),
        ));
    }
    Durability {
        replay_window,
        wait_replicas: redis.wait_replicas.as_ref().map_or(0, |n| *n.get_ref()),
        wait_timeout,
        fence_ttl,
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
mod tests;
