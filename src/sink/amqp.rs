//! Entity events to an AMQP 0-9-1 broker (RabbitMQ), with publisher confirms.
//!
//! Every event of a unit is published persistent to one exchange, its routing key from
//! a template; the unit counts as delivered only once the broker confirmed every one of
//! them. Any failure drops the connection: the caller retries the whole unit on a
//! fresh one (each message carries its event id as `message-id`, so consumers can drop
//! the redelivery).

use std::ops::Range;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use serde::Deserialize;
use toml::Spanned;

use crate::rules::invalidation::Event;

use super::events::render_route;

/// `[events.amqp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:5672/vhost` (`amqps://` for TLS).
    pub url: Spanned<String>,
    /// A file holding the password (`PGINVAL_AMQP_PASSWORD` overrides it).
    #[serde(default)]
    pub password_file: Option<Spanned<String>>,
    /// The password from the environment or `password_file`, set by the configuration.
    #[serde(skip)]
    pub password: Option<String>,
    /// The exchange events go to, declared (durable) when missing.
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// `topic`, `direct`, `fanout` or `headers`.
    #[serde(default = "default_exchange_type")]
    pub exchange_type: Spanned<String>,
    /// Routing key template: `{entity}`, `{op}` and `{table}` are replaced.
    #[serde(default = "default_routing_key")]
    pub routing_key: Spanned<String>,
    /// Where the broker sends messages no queue is bound for (`alternate-exchange`,
    /// set when pginval declares the exchange). Without it RabbitMQ drops them.
    #[serde(default)]
    pub alternate_exchange: Option<String>,
}

fn default_exchange() -> String {
    "cache_invalidation".into()
}

fn default_exchange_type() -> Spanned<String> {
    Spanned::new(0..0, "topic".into())
}

fn default_routing_key() -> Spanned<String> {
    Spanned::new(0..0, "invalidate.{entity}".into())
}

impl AmqpConfig {
    /// What is wrong with the settings: where (the setting's span), what, the fix.
    pub fn problems(&self) -> Vec<(Range<usize>, String, String)> {
        let mut out = Vec::new();
        if let Err(e) = self.url.get_ref().parse::<AMQPUri>() {
            // The parser's message quotes the URL, password and all.
            let e = e.replace(self.url.get_ref().as_str(), "<the url>");
            out.push((
                self.url.span(),
                format!("[events.amqp] url is not an AMQP URL: {e}"),
                "use amqp://user:password@host:5672/vhost (amqps:// for TLS)".into(),
            ));
        }
        if self.exchange.len() > 255 {
            out.push((
                self.url.span(),
                "[events.amqp] exchange is longer than AMQP's 255 bytes".into(),
                "use a shorter exchange name".into(),
            ));
        }
        if kind(self.exchange_type.get_ref()).is_none() {
            out.push((
                self.exchange_type.span(),
                format!(
                    "[events.amqp] exchange_type {:?} is not an exchange type",
                    self.exchange_type.get_ref()
                ),
                "use topic, direct, fanout or headers".into(),
            ));
        }
        if let Err(e) = render_route(self.routing_key.get_ref(), None) {
            out.push((
                self.routing_key.span(),
                format!("[events.amqp] routing_key: {e}"),
                ROUTE_FIX.into(),
            ));
        }
        out
    }
}

/// How to write a routing key or subject template.
pub const ROUTE_FIX: &str =
    "use the placeholders {entity}, {op} and {table}, e.g. \"invalidate.{entity}\"";

fn kind(name: &str) -> Option<ExchangeKind> {
    Some(match name {
        "topic" => ExchangeKind::Topic,
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        _ => return None,
    })
}

/// Why the broker could not be used.
#[derive(Debug)]
pub struct Failure {
    /// The broker answered and refused (credentials, permissions, a declaration that
    /// conflicts with the existing exchange), rather than being unreachable.
    pub refused: bool,
    /// What happened.
    pub message: String,
}

impl From<lapin::Error> for Failure {
    fn from(e: lapin::Error) -> Failure {
        let refused = matches!(
            e.kind(),
            lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::AuthProviderError(_)
        );
        Failure {
            refused,
            message: e.to_string(),
        }
    }
}

/// Events published before their writes are awaited together.
const PUBLISH_WINDOW: usize = 1000;

/// Longest wait for a connection, the declaration and the confirms of a unit of
/// `events`: 30 s, and 1 ms more per event, so a big unit after an outage is not cut
/// short (and republished whole) by a broker that is merely busy confirming it.
pub fn unit_timeout(events: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(events as u64)
}

/// An AMQP short string (at most 255 bytes), or why `what` cannot be one.
fn short(s: &str, what: &str) -> Result<ShortString, String> {
    ShortString::try_new(s).map_err(|_| format!("the {what} {s:?} is longer than AMQP's 255 bytes"))
}

/// An AMQP connection with a confirming channel, opened on first use.
pub struct AmqpSink {
    config: AmqpConfig,
    open: Option<(Connection, Channel)>,
}

impl AmqpSink {
    /// A sink for `config` (checked by [`AmqpConfig::problems`]); connects on first use.
    pub fn new(config: AmqpConfig) -> AmqpSink {
        AmqpSink { config, open: None }
    }

    /// Publishes `events` and waits until the broker confirmed every one. On error the
    /// connection is dropped, so a retry starts afresh.
    pub async fn publish(&mut self, events: &[Event]) -> Result<(), String> {
        let limit = unit_timeout(events.len());
        let result = match tokio::time::timeout(limit, self.try_publish(events)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no confirms for {} events within {limit:?}",
                events.len()
            )),
        };
        if result.is_err()
            && let Some((conn, _)) = self.open.take()
        {
            // Best effort: a broker that is gone does not answer the close.
            let _ =
                tokio::time::timeout(Duration::from_secs(1), conn.close(200, "retrying".into()))
                    .await;
        }
        result
    }

    async fn try_publish(&mut self, events: &[Event]) -> Result<(), String> {
        let channel = self.channel().await.map_err(|f| f.message)?;
        let exchange = short(&self.config.exchange, "exchange")?;
        let mut confirms = Vec::with_capacity(events.len());
        // lapin's publish future ends once its I/O loop took the frames: publishing a
        // window at a time (polled in order, so the frames keep the events' order)
        // instead of one by one saves a round trip to that loop per event.
        for window in events.chunks(PUBLISH_WINDOW) {
            let mut sends = Vec::with_capacity(window.len());
            for event in window {
                let key = short(
                    &render_route(self.config.routing_key.get_ref(), Some(event))?,
                    "routing key",
                )?;
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(short(&event.id, "message id")?)
                    .with_app_id("pginval".into())
                    .with_type(event.op.into());
                sends.push(channel.basic_publish(
                    exchange.clone(),
                    key,
                    BasicPublishOptions::default(),
                    event.json.as_bytes(),
                    properties,
                ));
            }
            for sent in futures_util::future::join_all(sends).await {
                confirms.push(sent.map_err(|e| e.to_string())?);
            }
        }
        for confirm in confirms {
            match confirm.await.map_err(|e| e.to_string())? {
                Confirmation::Ack(_) => {}
                Confirmation::Nack(_) => return Err("the broker refused a message (nack)".into()),
                Confirmation::NotRequested => {
                    return Err("the channel is not in confirm mode".into());
                }
            }
        }
        Ok(())
    }

    /// Connects and declares the exchange, as the first publish does, then closes:
    /// for `check`.
    pub async fn verify(&mut self) -> Result<(), Failure> {
        let result = match tokio::time::timeout(Duration::from_secs(5), self.channel()).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(Failure {
                refused: false,
                message: "no answer within 5 s".into(),
            }),
        };
        if let Some((conn, _)) = self.open.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "checked".into()))
                .await;
        }
        result
    }

    async fn channel(&mut self) -> Result<Channel, Failure> {
        if let Some((conn, channel)) = &self.open
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        self.open = None;
        let mut uri: AMQPUri = self.config.url.get_ref().parse().map_err(|_| Failure {
            refused: true,
            message: "the url is not an AMQP URL".into(),
        })?;
        if let Some(pw) = &self.config.password {
            uri.authority.userinfo.password = pw.clone();
        }
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from("pginval"));
        let conn = Connection::connect_uri(uri, properties)
            .await
            .map_err(Failure::from)?;
        let channel = conn.create_channel().await.map_err(Failure::from)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(Failure::from)?;
        let mut arguments = FieldTable::default();
        if let Some(alternate) = &self.config.alternate_exchange {
            arguments.insert(
                "alternate-exchange".into(),
                AMQPValue::LongString(alternate.as_str().into()),
            );
        }
        let exchange = short(&self.config.exchange, "exchange").map_err(|message| Failure {
            refused: true,
            message,
        })?;
        channel
            .exchange_declare(
                exchange,
                kind(self.config.exchange_type.get_ref()).unwrap_or(ExchangeKind::Topic),
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(|e| {
                let mut f = Failure::from(e);
                f.message = format!(
                    "declaring exchange {:?}: {}",
                    self.config.exchange, f.message
                );
                f
            })?;
        self.open = Some((conn, channel.clone()));
        Ok(channel)
    }
}
