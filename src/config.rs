//! Loading `rules.toml`: parsing with positions, environment overrides and offline
//! validation that reports every problem at once, each with its line and a fix.
//!
//! Never connects anywhere: checks against the live database are in `check`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IntoDeserializer;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostics::{LineIndex, Problem, write_problem};
pub use crate::replication::source::{SlotLost, Source};
use crate::rules::compile::{self, RuleSet};
use crate::rules::model::RuleModel;
pub use crate::sink::events::EventsConfig;
use crate::sink::tags::TagLayout;

mod cache;
mod sections;
mod source;

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

pub use crate::sink::redis::{Durability, STATE_KEY_PREFIX, SentinelConfig, Topology};
pub use sections::*;

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
                    Some("the sections are [source], [replicas], [redis], [state], [tags], [events], [hints], [limits], [metrics] and [[rules]]".into()),
                )),
            }
        }

        let source = source::source(source, source_line, &env, &lines, &mut problems);
        let read_replicas = source::read_replicas(&replicas, &lines, &mut problems);
        let redis = cache::redis(&redis, &state, &env, &lines, &mut problems);
        let tag_layout = cache::tag_layout(&tags, &lines, &mut problems);
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
        match (problems.is_empty(), source, redis.info, redis.state) {
            (true, Some(source), Some(info), Some(state_redis)) => Ok(Config {
                path: path.to_owned(),
                source,
                redis_ca: redis.ca,
                redis: info,
                tags: tag_layout,
                events,
                hints,
                state_redis,
                redis_cluster: redis.cluster,
                redis_nodes: redis.nodes,
                redis_sentinel: redis.sentinel,
                redis_durability: redis.durability,
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
