//! Entity events to NATS JetStream, each publish acknowledged by the stream.
//!
//! Every event of a unit is published with `Nats-Msg-Id` set to its event id, so a
//! redelivered unit is dropped by the stream's de-duplication window; the unit counts
//! as delivered only once the stream acknowledged every message.

use std::ops::Range;
use std::time::Duration;

use async_nats::jetstream;
use serde::Deserialize;
use toml::Spanned;

use crate::rules::invalidation::Event;

use super::amqp::{Failure, ROUTE_FIX, unit_timeout};
use super::events::render_route;

/// `[events.nats]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://[user:password@]host:4222`.
    pub url: Spanned<String>,
    /// A file holding the password of the URL's user (`PGINVAL_NATS_PASSWORD`
    /// overrides it).
    #[serde(default)]
    pub password_file: Option<Spanned<String>>,
    /// The password from the environment or `password_file`, set by the configuration.
    #[serde(skip)]
    pub password: Option<String>,
    /// Subject template: `{entity}`, `{op}` and `{table}` are replaced (values with
    /// `.`, `*`, `>` or spaces get `_` there).
    #[serde(default = "default_subject")]
    pub subject: Spanned<String>,
    /// A JetStream stream to create, when missing, over the subjects the template
    /// yields (its placeholders as `*`). Without it a stream must already cover them.
    #[serde(default)]
    pub stream: Option<String>,
}

fn default_subject() -> Spanned<String> {
    Spanned::new(0..0, "invalidate.{entity}".into())
}

impl NatsConfig {
    /// What is wrong with the settings: where (the setting's span), what, the fix.
    pub fn problems(&self) -> Vec<(Range<usize>, String, String)> {
        let mut out = Vec::new();
        if let Err(e) = self.url.get_ref().parse::<async_nats::ServerAddr>() {
            out.push((
                self.url.span(),
                format!("[events.nats] url is not a NATS URL: {e}"),
                "use nats://[user:password@]host:4222".into(),
            ));
        }
        match render_route(self.subject.get_ref(), None) {
            Err(e) => out.push((
                self.subject.span(),
                format!("[events.nats] subject: {e}"),
                ROUTE_FIX.into(),
            )),
            Ok(wildcard) => {
                let tokens_ok = wildcard
                    .split('.')
                    .all(|t| !t.is_empty() && (t == "*" || !t.contains(['*', '>', ' '])));
                if !tokens_ok {
                    out.push((
                        self.subject.span(),
                        format!(
                            "[events.nats] subject {:?} is not a NATS subject: each placeholder must be a whole `.`-separated token",
                            self.subject.get_ref()
                        ),
                        "write it like \"invalidate.{entity}\" or \"db.{table}.{op}\"".into(),
                    ));
                }
            }
        }
        if let Some(stream) = &self.stream
            && (stream.is_empty() || stream.contains(['.', ' ', '*', '>', '\t']))
        {
            out.push((
                self.url.span(),
                format!("[events.nats] stream {stream:?} is not a stream name"),
                "use letters, digits, - and _, e.g. \"CACHE_INVALIDATION\"".into(),
            ));
        }
        out
    }

    /// The subjects the template yields, placeholders as `*`.
    fn wildcard(&self) -> String {
        render_route(self.subject.get_ref(), None).unwrap_or_default()
    }
}

/// Most publishes waiting for their acknowledgement at once (async-nats allows 5,000).
const IN_FLIGHT: usize = 1000;

/// A JetStream context, opened on first use.
pub struct NatsSink {
    config: NatsConfig,
    context: Option<jetstream::Context>,
}

impl NatsSink {
    /// A sink for `config` (checked by [`NatsConfig::problems`]); connects on first use.
    pub fn new(config: NatsConfig) -> NatsSink {
        NatsSink {
            config,
            context: None,
        }
    }

    /// Publishes `events` and waits until the stream acknowledged every one. On error
    /// the connection is dropped, so a retry starts afresh.
    pub async fn publish(&mut self, events: &[Event]) -> Result<(), String> {
        let limit = unit_timeout(events.len());
        let result = match tokio::time::timeout(limit, self.try_publish(events)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no acknowledgements for {} events within {limit:?}",
                events.len()
            )),
        };
        if result.is_err() {
            self.context = None;
        }
        result
    }

    async fn try_publish(&mut self, events: &[Event]) -> Result<(), String> {
        let context = self.context().await.map_err(|f| f.message)?;
        for chunk in events.chunks(IN_FLIGHT) {
            let mut acks = Vec::with_capacity(chunk.len());
            for event in chunk {
                let subject = subject(self.config.subject.get_ref(), event)?;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", event.id.as_str());
                headers.insert("Content-Type", "application/json");
                let ack = context
                    .publish_with_headers(subject, headers, event.json.clone().into())
                    .await
                    .map_err(|e| e.to_string())?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Connects, and creates the stream or finds one over the subjects: for `check`.
    pub async fn verify(&mut self) -> Result<(), Failure> {
        let step = async {
            let context = self.context().await?;
            if self.config.stream.is_none() {
                let subjects = self.config.wildcard();
                context.stream_by_subject(subjects.as_str()).await.map_err(|e| Failure {
                    refused: true,
                    message: format!("no JetStream stream covers subjects {subjects:?} ({e}): set [events.nats] stream = \"CACHE_INVALIDATION\" for pginval to create one, or create it"),
                })?;
            }
            Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), step).await {
            Ok(r) => r,
            Err(_) => Err(Failure {
                refused: false,
                message: "no answer within 5 s".into(),
            }),
        }
    }

    async fn context(&mut self) -> Result<jetstream::Context, Failure> {
        if let Some(context) = &self.context
            && context.client().connection_state() == async_nats::connection::State::Connected
        {
            return Ok(context.clone());
        }
        self.context = None;
        let mut options = async_nats::ConnectOptions::new()
            .name("pginval")
            .connection_timeout(Duration::from_secs(10));
        // async-nats does not read credentials from the URL: they are taken from it
        // (the password from the environment or password_file wins), and the server
        // address goes without them, so no log line of the client can show them.
        let addr: async_nats::ServerAddr =
            self.config.url.get_ref().parse().map_err(|_| Failure {
                refused: true,
                message: "the url is not a NATS URL".into(),
            })?;
        let user = addr.username().map(str::to_owned);
        let password = self
            .config
            .password
            .clone()
            .or_else(|| addr.password().map(str::to_owned));
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            options = options.user_and_password(user, password.unwrap_or_default());
        }
        let host = match addr.host() {
            h if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
            h => h.to_owned(),
        };
        let bare = format!("{}://{host}:{}", addr.scheme(), addr.port());
        let client = options.connect(bare.as_str()).await.map_err(|e| {
            use async_nats::ConnectErrorKind as K;
            Failure {
                refused: matches!(e.kind(), K::Authentication | K::AuthorizationViolation),
                message: e.to_string(),
            }
        })?;
        let context = jetstream::new(client);
        if let Some(name) = &self.config.stream {
            context
                .get_or_create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![self.config.wildcard()],
                    ..Default::default()
                })
                .await
                .map_err(|e| Failure {
                    refused: true,
                    message: format!("stream {name:?}: {e}"),
                })?;
        }
        self.context = Some(context.clone());
        Ok(context)
    }
}

/// The subject of `event`: the template with each value made one subject token.
fn subject(template: &str, event: &Event) -> Result<String, String> {
    let token = |v: &str| {
        let t = v.replace(['.', '*', '>', ' ', '\t', '\r', '\n'], "_");
        if t.is_empty() { "_".to_owned() } else { t }
    };
    let safe = Event {
        id: String::new(),
        entity: token(&event.entity).into(),
        op: event.op,
        table: token(&event.table).into(),
        json: String::new(),
    };
    render_route(template, Some(&safe))
}
