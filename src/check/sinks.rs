//! `check` of the sinks: the cache's Redis (version, topology, eviction of pginval's
//! state) and the event brokers, connected to as `run` would.

use super::CheckReport;
use crate::config::Config;
use crate::diagnostics::Problem;
use crate::sink::amqp::{AmqpSink, Failure};
use crate::sink::nats::NatsSink;
use crate::sink::redis::RedisSink;

/// The event brokers, connected to as the first publish would (the AMQP exchange is
/// declared, a NATS stream created when configured): a broker that refuses is a
/// problem (run could never publish), one that cannot be reached a warning (run waits).
pub(super) async fn check_brokers(config: &Config, report: &mut CheckReport) {
    let Some(events) = &config.events else { return };
    let mut outcomes = Vec::new();
    if let Some(amqp) = &events.amqp {
        let result = AmqpSink::new(amqp.clone()).verify().await;
        outcomes.push(("amqp", format!("exchange {:?}", amqp.exchange), result));
    }
    if let Some(nats) = &events.nats {
        let result = NatsSink::new(nats.clone()).verify().await;
        let what = match &nats.stream {
            Some(stream) => format!("stream {stream:?}"),
            None => format!("subjects {:?}", nats.subject.get_ref()),
        };
        outcomes.push(("nats", what, result));
    }
    for (sink, what, result) in outcomes {
        match result {
            Ok(()) => report.notes.push(format!("{sink} broker answers; {what} ready")),
            Err(Failure { refused: true, message }) => report.problems.push(Problem::new(
                None,
                format!("the {sink} broker refuses pginval: {message}"),
                Some(format!("fix the [events.{sink}] settings (credentials, permissions, the exchange's or stream's declaration) or the broker's")),
            )),
            Err(Failure { refused: false, message }) => report.warnings.push(Problem::new(
                None,
                format!("cannot reach the {sink} broker ({message}); run waits for it and holds the slot meanwhile"),
                Some(format!("start the broker, or correct [events.{sink}] url")),
            )),
        }
    }
}

/// pginval's state database (reachable, not evictable) and, for framework tag
/// layouts, whether Redis holds tags of the configured form. Redis being down is a
/// warning: `run` waits for it.
pub(super) async fn check_redis(config: &Config, report: &mut CheckReport) {
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let health = std::sync::Arc::new(crate::metrics::Health::new(config.max_lag));
    let open = |seeds: Vec<redis::ConnectionInfo>| {
        RedisSink::new(
            seeds,
            config.redis_topology(),
            config.redis_ca.as_deref(),
            &config.redis_durability,
            config.tags.clone(),
            None,
            true,
            metrics.clone(),
            health.clone(),
        )
    };
    let (Ok(mut own), Ok(mut cache)) = (open(config.state_seeds()), open(config.redis_seeds()))
    else {
        return;
    };
    let five_secs = std::time::Duration::from_secs(5);
    if let Ok(Ok(is_cluster)) = tokio::time::timeout(five_secs, cache.server_is_cluster()).await
        && is_cluster != config.redis_cluster
    {
        let addr = config.redis.addr();
        report.problems.push(if is_cluster {
            Problem::new(
                None,
                format!("redis at {addr} is a node of a Redis Cluster: sent to one node, most keys would be answered MOVED and never deleted"),
                Some("set cluster = true in [redis] (url and nodes are then the cluster's seed nodes)".into()),
            )
        } else {
            Problem::new(
                None,
                format!("[redis] cluster = true, but redis at {addr} is not a cluster node (cluster_enabled:0)"),
                Some("remove cluster = true from [redis], or point url at a node of the cluster".into()),
            )
        });
        return;
    }
    let state_db = config.state_redis.redis_settings().db();
    let checked = tokio::time::timeout(std::time::Duration::from_secs(5), own.ping()).await;
    match checked {
        Ok(Ok(())) if config.redis_cluster => report.notes.push(
            "the redis cluster answers; pginval's state lives in its database 0, under pginval: keys".into(),
        ),
        Ok(Ok(())) => report.notes.push(format!(
            "redis answers; pginval's state lives in database {state_db}"
        )),
        Ok(Err(e)) => {
            report.warnings.push(Problem::new(
                None,
                format!("cannot reach redis database {state_db} for pginval's state: {e}; run waits for it"),
                Some("start Redis, or give [state] redis_db a database the server has (its `databases` setting)".into()),
            ));
            return;
        }
        Err(_) => {
            report.warnings.push(Problem::new(
                None,
                "redis did not answer within 5 s; its settings were not checked (run waits for it)",
                None,
            ));
            return;
        }
    }
    if let Ok(Ok(version)) = tokio::time::timeout(five_secs, cache.major_version()).await {
        check_redis_version(config, version, report);
    }
    let policies = own.config_get("maxmemory-policy").await;
    let evicting = policies.as_ref().map(|p| {
        p.iter()
            .flatten()
            .find(|policy| policy.starts_with("allkeys-"))
            .cloned()
    });
    match evicting {
        Ok(Some(policy)) => report.problems.push(Problem::new(
            None,
            format!("redis runs with maxmemory-policy {policy}: it may evict pginval's state (database {state_db}), after which a lost slot would be taken for a first start and its gap never invalidated"),
            Some("CONFIG SET maxmemory-policy volatile-lru (and in redis.conf); cache entries with a TTL are still evicted, pginval's state (no TTL) is not".into()),
        )),
        Ok(_) => {}
        Err(e) => report.warnings.push(Problem::new(
            None,
            format!("cannot read redis' maxmemory-policy ({e}): make sure it is not allkeys-*, which may evict pginval's state"),
            None,
        )),
    }
    if let Some((layout, other, fix)) = config.tags.other_form()
        && matches!(
            cache
                .any_key_matches(&config.tags.tag_key_pattern("*"), 100_000)
                .await,
            Ok(false)
        )
        && matches!(
            cache
                .any_key_matches(&other.tag_key_pattern("*"), 100_000)
                .await,
            Ok(true)
        )
    {
        report.warnings.push(Problem::new(
            None,
            format!("redis holds no tag of the configured {layout} layout ({}) but holds tags of another form ({}): tag flushes would find nothing", escape(&config.tags.tag_key_pattern("*")), escape(&other.tag_key_pattern("*"))),
            Some(fix.into()),
        ));
    }
}

/// What this Redis major can do: 6 is needed (6.2 is the oldest tested), and rules with
/// `action = "expire"` need 7 (`PEXPIRE ... LT`). Valkey reports `redis_version:7.2.4`
/// whatever its own version, so it passes as the 7 it is compatible with.
fn check_redis_version(config: &Config, major: u32, report: &mut CheckReport) {
    if major < 6 {
        report.problems.push(Problem::new(
            None,
            format!("redis is version {major}; pginval needs Redis 6 or newer (SCAN ... TYPE for tag wildcards and patterns; 6.2 is the oldest tested)"),
            Some("upgrade Redis to 6.2 or newer (7 for rules with action = \"expire\"), or use Valkey".into()),
        ));
        return;
    }
    if major >= 7 {
        return;
    }
    for rule in config
        .rules
        .rules
        .iter()
        .filter(|r| matches!(r.action, crate::rules::compile::Action::Expire(_)))
    {
        report.problems.push(Problem::new(
            Some(rule.line),
            format!("rule #{} has action = \"expire\", which needs Redis 7 or newer (PEXPIRE ... LT, never extending a TTL); this Redis is {major} (run would refuse to start)", rule.number),
            Some("use action = \"delete\" on Redis 6, or upgrade Redis to 7 or newer (or Valkey)".into()),
        ));
    }
}

/// Control characters (Symfony's tag markers) shown as escapes.
fn escape(key: &str) -> String {
    key.escape_debug().to_string()
}
