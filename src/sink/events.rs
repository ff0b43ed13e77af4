//! Where entity events go: the `[events]` settings, the message-broker sinks, and
//! [`Fanout`], the sink that hands a unit to Redis and then to every broker.
//!
//! Every destination gets the same [`Event`] (the same JSON, the same id); a unit is
//! acknowledged to the pipeline only once Redis and every broker confirmed it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::metrics::{Health, Metrics, SinkLabel};
use crate::rules::invalidation::{Event, Work};

use super::Sink;
use super::amqp::{AmqpConfig, AmqpSink};
use super::nats::{NatsConfig, NatsSink};
use super::redis::{RedisSink, SinkError};

/// `[events]`: entity events for rules with `entity`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Redis Pub/Sub channel to PUBLISH each event to.
    #[serde(default)]
    pub channel: Option<String>,
    /// Redis Stream to XADD each event to (field `event`, the JSON).
    #[serde(default)]
    pub stream: Option<String>,
    /// Approximate length the stream is trimmed to (`MAXLEN ~`).
    #[serde(default = "default_stream_maxlen")]
    pub stream_maxlen: u64,
    /// `[events.amqp]`: an AMQP 0-9-1 exchange (RabbitMQ).
    #[serde(default)]
    pub amqp: Option<AmqpConfig>,
    /// `[events.nats]`: NATS JetStream subjects.
    #[serde(default)]
    pub nats: Option<NatsConfig>,
}

fn default_stream_maxlen() -> u64 {
    100_000
}

impl EventsConfig {
    /// Whether any destination is named.
    pub fn has_destination(&self) -> bool {
        self.channel.is_some()
            || self.stream.is_some()
            || self.amqp.is_some()
            || self.nats.is_some()
    }
}

/// `template` with `{entity}`, `{op}` and `{table}` replaced by `event`'s values, or
/// by `*` when there is no event (to check a template, or for a wildcard).
pub fn render_route(template: &str, event: Option<&Event>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        out.push_str(&rest[..open]);
        if rest.as_bytes()[open] == b'}' {
            return Err(format!("{template:?} has a `}}` without its `{{`"));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("{template:?} has a `{{` without its `}}`"));
        };
        let name = &rest[open + 1..open + close];
        let value = match (name, event) {
            ("entity" | "op" | "table", None) => "*",
            ("entity", Some(e)) => &e.entity,
            ("op", Some(e)) => e.op,
            ("table", Some(e)) => &e.table,
            _ => {
                return Err(format!(
                    "{template:?} names {{{name}}}, which is not an event field"
                ));
            }
        };
        out.push_str(value);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err("the template is empty".into());
    }
    Ok(out)
}

/// A message broker events go to.
enum Broker {
    Amqp(AmqpSink),
    Nats(NatsSink),
}

impl Broker {
    fn name(&self) -> &'static str {
        match self {
            Broker::Amqp(_) => "amqp",
            Broker::Nats(_) => "nats",
        }
    }

    async fn publish(&mut self, events: &[Event]) -> Result<(), String> {
        match self {
            Broker::Amqp(s) => s.publish(events).await,
            Broker::Nats(s) => s.publish(events).await,
        }
    }
}

/// First retry delay after a broker error; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Redis, then every configured broker: a unit is delivered when all confirmed it.
pub struct Fanout {
    redis: RedisSink,
    brokers: Vec<Broker>,
    dry_run: bool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Fanout {
    /// Redis and the brokers `events` names.
    pub fn new(
        redis: RedisSink,
        events: Option<&EventsConfig>,
        dry_run: bool,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Fanout {
        let mut brokers = Vec::new();
        if let Some(events) = events {
            if let Some(amqp) = &events.amqp {
                brokers.push(Broker::Amqp(AmqpSink::new(amqp.clone())));
            }
            if let Some(nats) = &events.nats {
                brokers.push(Broker::Nats(NatsSink::new(nats.clone())));
            }
        }
        Fanout {
            redis,
            brokers,
            dry_run,
            metrics,
            health,
        }
    }

    /// The Redis sink, for what goes to Redis alone (markers, recovery).
    pub fn redis(&mut self) -> &mut RedisSink {
        &mut self.redis
    }

    /// Publishes `events` to `broker` until it confirmed them all. Never gives up: an
    /// outage means waiting (the flush position stays put, `/readyz` is unready).
    async fn publish_until_confirmed(
        broker: &mut Broker,
        events: &[Event],
        metrics: &Metrics,
        health: &Health,
    ) {
        let name = broker.name();
        let label = SinkLabel { sink: name };
        let mut backoff = MIN_BACKOFF;
        let mut failing_since = None;
        let mut attempts = 0u64;
        loop {
            match broker.publish(events).await {
                Ok(()) => {
                    health.set_sink_ok(name, true);
                    metrics
                        .events_confirmed
                        .get_or_create(&label)
                        .inc_by(events.len() as u64);
                    if let Some(since) = failing_since {
                        let down: Duration = tokio::time::Instant::now() - since;
                        tracing::info!(
                            sink = name,
                            down_secs = down.as_secs_f64(),
                            "the event sink confirms again; events resumed"
                        );
                    }
                    return;
                }
                Err(e) => {
                    metrics.event_sink_errors.get_or_create(&label).inc();
                    health.set_sink_ok(name, false);
                    attempts += 1;
                    match failing_since {
                        None => {
                            tracing::warn!(
                                sink = name, error = %e, events = events.len(),
                                "the event sink failed; holding the flush position and republishing with backoff"
                            );
                            failing_since = Some(tokio::time::Instant::now());
                        }
                        // A refusal that lasts (a bad subject, a missing stream) is said
                        // again about once a minute, not only at debug level.
                        Some(since) if attempts % 12 == 0 => tracing::warn!(
                            sink = name, error = %e, events = events.len(),
                            failing_secs = (tokio::time::Instant::now() - since).as_secs(),
                            "the event sink still fails; the flush position still holds"
                        ),
                        Some(_) => {
                            tracing::debug!(sink = name, error = %e, ?backoff, "the event sink still fails")
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

impl Sink for Fanout {
    type Error = SinkError;

    /// Units with events never commute (events keep commit order); the rest is
    /// Redis' to decide.
    fn send_commuting(
        &self,
        work: &Work,
        events: &[Event],
    ) -> Option<(
        u64,
        impl Future<Output = Result<(), SinkError>> + Send + 'static,
    )> {
        if !events.is_empty() {
            return None;
        }
        self.redis.send_commuting(work, events)
    }

    async fn deliver(&mut self, work: &Work, events: &[Event]) {
        self.redis.deliver(work, events).await;
        if events.is_empty() || self.brokers.is_empty() {
            return;
        }
        if self.dry_run {
            tracing::info!(
                events = events.len(),
                "dry run: would publish events to the brokers"
            );
            return;
        }
        for broker in &mut self.brokers {
            Self::publish_until_confirmed(broker, events, &self.metrics, &self.health).await;
        }
    }

    fn discard_connection(&mut self, generation: u64) -> bool {
        self.redis.discard_connection(generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(entity: &str, op: &'static str, table: &str) -> Event {
        Event {
            id: "0/1:0".into(),
            entity: entity.into(),
            op,
            table: table.into(),
            json: "{}".into(),
        }
    }

    #[test]
    fn routes_render_the_event_fields() {
        let e = event("user", "update", "public.users");
        assert_eq!(
            render_route("invalidate.{entity}", Some(&e)).unwrap(),
            "invalidate.user"
        );
        assert_eq!(
            render_route("{table}.{op}", Some(&e)).unwrap(),
            "public.users.update"
        );
        assert_eq!(render_route("db.{table}.{op}", None).unwrap(), "db.*.*");
        assert_eq!(render_route("fixed", Some(&e)).unwrap(), "fixed");
    }

    #[test]
    fn bad_route_templates_are_refused() {
        for bad in ["invalidate.{id}", "a.{entity", "a}", ""] {
            assert!(render_route(bad, None).is_err(), "{bad}");
        }
    }
}
