//! `[redis]`, `[state]` and `[tags]` into the cache's and pginval's own Redis
//! addresses, topology (node, cluster, Sentinel), durability and tag layout. Reports
//! every problem; connects to nothing.

use std::time::Duration;

use toml::Spanned;

use super::{
    Durability, ENV_REDIS_PASSWORD, ENV_REDIS_URL, RedisConfig, SentinelConfig, StateConfig,
    TagsConfig, redact, secret,
};
use crate::diagnostics::{LineIndex, Problem};
use crate::sink::tags::TagLayout;

/// What `[redis]` and `[state]` give.
pub(super) struct RedisParts {
    /// The cache's server; `None` when its URL is unusable.
    pub info: Option<redis::ConnectionInfo>,
    /// `[redis] ca_file`'s PEM roots.
    pub ca: Option<Vec<u8>>,
    pub cluster: bool,
    pub nodes: Vec<redis::ConnectionInfo>,
    pub sentinel: Option<SentinelConfig>,
    pub durability: Durability,
    /// Where pginval's own state lives.
    pub state: Option<redis::ConnectionInfo>,
}

/// `[redis]` and `[state]`, the environment overriding the URL and password.
pub(super) fn redis(
    redis: &RedisConfig,
    state: &StateConfig,
    env: &impl Fn(&str) -> Option<String>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> RedisParts {
    let redis_url = env(ENV_REDIS_URL).unwrap_or_else(|| redis.url.get_ref().clone());
    let redis_info = match redis::IntoConnectionInfo::into_connection_info(redis_url.as_str()) {
        Ok(info) => {
            match secret(
                &env,
                ENV_REDIS_PASSWORD,
                redis.password_file.as_ref(),
                lines,
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
    let redis_durability = durability(redis, lines, problems);
    let state_db = *state.redis_db.get_ref();
    let cluster = *redis.cluster.get_ref();
    let redis_nodes = cluster_seeds(redis, redis_info.as_ref(), lines, problems);
    let redis_sentinel = sentinel(redis, lines, problems);
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
                "use a number from 0 to 15 (the server's `databases` setting is the limit)".into(),
            ),
        ));
    }
    RedisParts {
        info: redis_info,
        ca: redis_ca,
        cluster,
        nodes: redis_nodes,
        sentinel: redis_sentinel,
        durability: redis_durability,
        state: state_redis,
    }
}

/// `[tags]`: how the application's cache library stores tags.
pub(super) fn tag_layout(
    tags: &TagsConfig,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> TagLayout {
    match tags.layout.get_ref().as_str() {
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
        && fence_ttl > Duration::from_secs(86_400)
    {
        problems.push(Problem::new(
            lines.line_of(&value.span()),
            format!(
                "[redis] fence_ttl {} is over a day: every fenced key's fence would stay that long",
                humantime::format_duration(fence_ttl)
            ),
            Some("give a duration well above your longest read-to-fill time, like \"60s\"".into()),
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

/// A Redis URL error message with the URL's password removed.
fn redact_redis_error(message: &str, url: &str) -> String {
    let redacted = redact(url);
    message.replace(url, &redacted)
}
