//! Entity events on message brokers: RabbitMQ (AMQP 0-9-1, publisher confirms) and NATS
//! JetStream, against the real servers. RabbitMQ is the machine's (127.0.0.1:5672,
//! guest/guest), each test on an exchange and queue of its own; NATS is a server each
//! test starts (so a test can restart it). A test whose server is not installed says
//! so and passes; `.ci/run` starts the installed ones.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

use crate::suite::ops::{get, with_metrics};
use crate::support::{FaultProxy, free_port, postgres, wait_until};
use crate::{Daemon, WAIT, config_file, config_text, confirmed_lsn, current_lsn, setup, spawn_run};

const RABBITMQ_PORT: u16 = 5672;

/// Whether something listens on 127.0.0.1:`port`; says why the test is skipped if not.
fn listening(port: u16, what: &str) -> bool {
    let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    if !up {
        crate::support::skipped(&format!(
            "no {what} on 127.0.0.1:{port} (scripts/install-deps.sh installs and starts it)"
        ));
    }
    up
}

/// The machine's RabbitMQ is shared by the tests of this process: most use it side by
/// side (read), the one that restarts it has it alone (write).
static RABBITMQ: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// RabbitMQ for a test that uses it beside others, or `None` (said) when it is absent.
async fn rabbitmq() -> Option<tokio::sync::RwLockReadGuard<'static, ()>> {
    let guard = RABBITMQ.read().await;
    listening(RABBITMQ_PORT, "RabbitMQ").then_some(guard)
}

/// An LSN as the events print it (`0/16B3F40`), as a number.
fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `rules` for the users table publishing entity `user` through `[events.amqp]`.
fn amqp_rules(url: &str, exchange: &str) -> String {
    format!(
        "[events.amqp]\nurl = \"{url}\"\nexchange = \"{exchange}\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{{id}}\"]\nentity = \"user\"\n"
    )
}

fn amqp_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// A subscriber of the hand-written approach: a queue of its own bound to
/// `invalidate.*` on `exchange` (declared the way pginval declares it).
struct Subscriber {
    conn: Connection,
    consumer: lapin::Consumer,
    exchange: String,
    /// The durable queue's name, deleted with the exchange.
    queue: Option<String>,
}

/// One message as the subscriber got it.
#[derive(Debug)]
struct Received {
    routing_key: String,
    message_id: String,
    content_type: String,
    persistent: bool,
    body: Value,
}

impl Subscriber {
    /// An exclusive queue of its own, gone with the connection.
    async fn bind(exchange: &str) -> Subscriber {
        Subscriber::bind_queue(exchange, None).await
    }

    /// `durable`: a named durable queue instead, whose messages outlive a broker
    /// restart, as a real subscriber's would.
    async fn bind_queue(exchange: &str, durable: Option<&str>) -> Subscriber {
        let conn = Connection::connect(&amqp_url(RABBITMQ_PORT), ConnectionProperties::default())
            .await
            .expect("connecting to RabbitMQ");
        let channel = conn.create_channel().await.unwrap();
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let queue = channel
            .queue_declare(
                durable.unwrap_or("").into(),
                QueueDeclareOptions {
                    exclusive: durable.is_none(),
                    durable: durable.is_some(),
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                "invalidate.*".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Subscriber {
            conn,
            consumer,
            exchange: exchange.to_owned(),
            queue: durable.map(str::to_owned),
        }
    }

    /// The next message, waiting at most [`WAIT`].
    async fn next(&mut self) -> Received {
        let delivery = tokio::time::timeout(WAIT, self.consumer.next())
            .await
            .expect("a message arrives in time")
            .expect("the consumer is open")
            .expect("a delivery");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        let p = &delivery.properties;
        Received {
            routing_key: delivery.routing_key.to_string(),
            message_id: p
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            content_type: p
                .content_type()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            persistent: *p.delivery_mode() == Some(2),
            body: serde_json::from_slice(&delivery.data).expect("the body is JSON"),
        }
    }

    /// Messages until one arrived for each of `ids` (event ids), with repeats.
    async fn until_ids(&mut self, ids: &BTreeSet<String>) -> Vec<Received> {
        let mut got = Vec::new();
        let mut seen = BTreeSet::new();
        while !ids.is_subset(&seen) {
            let m = self.next().await;
            seen.insert(m.message_id.clone());
            got.push(m);
        }
        got
    }

    async fn delete(self) {
        let channel = self.conn.create_channel().await.unwrap();
        if let Some(queue) = &self.queue {
            let _ = channel
                .queue_delete(
                    queue.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_topic_subscriber_gets_each_change_confirmed_before_the_slot_moves() {
    let Some(_rabbitmq) = rabbitmq().await else {
        return;
    };
    let (db, redis) = setup("amqp").await;
    let exchange = format!("pginval_test_{}", db.name);
    let mut sub = Subscriber::bind(&exchange).await;
    // The password comes from PGINVAL_AMQP_PASSWORD, not from the URL.
    let url = amqp_url(RABBITMQ_PORT).replace("guest:guest", "guest:wrong");
    let text = config_text(&db, &redis, &amqp_rules(&url, &exchange));
    let config = pginval::config::Config::parse(Path::new("t.toml"), &text, |var| {
        (var == "PGINVAL_AMQP_PASSWORD").then(|| "guest".to_owned())
    })
    .unwrap();
    let daemon = Daemon::start(&db, config).await;

    db.execute_batch("INSERT INTO users VALUES (1000, 'new', 'member')")
        .await;
    db.execute_batch("UPDATE users SET role = 'admin' WHERE id = 1000")
        .await;
    db.execute_batch("DELETE FROM users WHERE id = 1000").await;
    db.execute_batch("TRUNCATE users").await;
    let end = current_lsn(&db).await;

    let mut ops = Vec::new();
    for _ in 0..4 {
        let m = sub.next().await;
        assert_eq!(m.routing_key, "invalidate.user", "{m:?}");
        assert_eq!(m.content_type, "application/json");
        assert!(m.persistent, "{m:?}");
        assert_eq!(m.body["entity"], "user");
        assert_eq!(m.body["event_id"], m.message_id.as_str());
        let op = m.body["op"].as_str().unwrap().to_owned();
        // The message id is the commit position and the place in the transaction.
        let lsn = m.body["lsn"].as_str().unwrap();
        assert_eq!(m.message_id, format!("{}:{lsn}:0", db.name));
        match op.as_str() {
            "insert" => {
                assert_eq!(m.body["id"], "1000");
                assert_eq!(m.body["fields"]["role"], "member");
            }
            // The subscriber's test: `'role' in event['fields']`.
            "update" => assert_eq!(m.body["fields"]["role"], "admin", "{m:?}"),
            "delete" => assert_eq!(m.body["id"], "1000"),
            "truncate" => assert_eq!(m.body["fields"], Value::Null),
            other => panic!("unexpected op {other}"),
        }
        ops.push(op);
    }
    assert_eq!(ops, ["insert", "update", "delete", "truncate"]);
    wait_until("the slot passes the confirmed events", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    daemon.stop().await.unwrap();
    sub.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_outage_holds_the_slot_and_loses_no_event() {
    let Some(_rabbitmq) = rabbitmq().await else {
        return;
    };
    let (db, redis) = setup("amqpdown").await;
    let exchange = format!("pginval_test_{}", db.name);
    let mut sub = Subscriber::bind(&exchange).await;
    let broker = FaultProxy::start(RABBITMQ_PORT).await;
    let metrics_port = free_port();
    let text = with_metrics(
        &config_text(
            &db,
            &redis,
            &amqp_rules(&amqp_url(broker.port()), &exchange),
        ),
        metrics_port,
    );
    let config = pginval::config::Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
    let daemon = Daemon::start(&db, config).await;
    db.execute_batch("UPDATE users SET name = 'first' WHERE id = 1")
        .await;
    assert_eq!(sub.next().await.body["id"], "1");
    wait_until("the first event is confirmed", WAIT, || async {
        confirmed_lsn(&db).await >= current_lsn(&db).await
    })
    .await;

    // The broker goes away: its connection is closed and new ones are refused.
    broker.cut();
    let client = db.client().await;
    for id in 2..=21i64 {
        client
            .execute("UPDATE users SET name = 'down' WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
    wait_until("pginval retried the broker", WAIT, || async {
        broker.refused() >= 3
    })
    .await;
    wait_until("/readyz names the event sink", WAIT, || async {
        matches!(get(metrics_port, "/readyz").await,
            Some((503, body)) if body.contains("amqp event sink"))
    })
    .await;
    // Idle, the slot may follow the server's WAL (other databases write); with events
    // waiting, never past the first unconfirmed commit.
    let held = confirmed_lsn(&db).await;

    broker.restore();
    let mut ids = BTreeSet::new();
    let mut seen = Vec::new();
    while ids.len() < 20 {
        let m = sub.next().await;
        assert_eq!(m.body["fields"]["name"], "down");
        ids.insert(m.body["id"].as_str().unwrap().to_owned());
        seen.push(m);
    }
    assert_eq!(ids, (2..=21).map(|i| i.to_string()).collect());
    let first_unconfirmed = seen
        .iter()
        .map(|m| lsn(m.body["lsn"].as_str().unwrap()))
        .min()
        .unwrap();
    assert!(
        held < first_unconfirmed,
        "the slot ({held}) moved past events the broker never confirmed (commit at {first_unconfirmed})"
    );
    let end = current_lsn(&db).await;
    wait_until("the slot passes the republished events", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    daemon.stop().await.unwrap();
    sub.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_redelivery_after_sigkill_keeps_the_message_ids() {
    let Some(_rabbitmq) = rabbitmq().await else {
        return;
    };
    let (db, redis) = setup("amqpkill").await;
    let exchange = format!("pginval_test_{}", db.name);
    let mut sub = Subscriber::bind(&exchange).await;
    // PostgreSQL behind a proxy: pginval's replies (its flush position) can be muted
    // while the WAL still reaches it.
    let pg = FaultProxy::start(postgres().port()).await;
    let url = db.url.replace(
        &format!(":{}/", postgres().port()),
        &format!(":{}/", pg.port()),
    );
    assert_ne!(url, db.url, "the proxy is in the URL");
    let text = config_text(
        &db,
        &redis,
        &amqp_rules(&amqp_url(RABBITMQ_PORT), &exchange),
    )
    .replace(&db.url, &url);
    let path = config_file(&db, &text);
    let log = path.with_extension("log");
    let mut child = spawn_run(&path, &log);
    crate::wait_streaming(&db).await;

    pg.mute_upstream();
    db.execute_batch(
        "BEGIN;
         UPDATE users SET role = 'x' WHERE id = 1;
         UPDATE users SET role = 'x' WHERE id = 2;
         UPDATE users SET role = 'x' WHERE id = 3;
         COMMIT;",
    )
    .await;
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(sub.next().await);
    }
    let first_ids: BTreeSet<String> = first.iter().map(|m| m.message_id.clone()).collect();
    let lsn = first[0].body["lsn"].as_str().unwrap().to_owned();
    assert_eq!(
        first_ids,
        (0..3).map(|i| format!("{}:{lsn}:{i}", db.name)).collect(),
        "one commit, three places"
    );
    // Confirmed by the broker (the subscriber has them), not yet by PostgreSQL.
    let commit = self::lsn(&lsn);
    assert!(
        confirmed_lsn(&db).await < commit,
        "the slot passed the commit"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        confirmed_lsn(&db).await < commit,
        "the slot passed the commit"
    );

    // Restarted, pginval replays the transaction: the same events, the same ids.
    let mut child = spawn_run(&path, &log.with_extension("2.log"));
    let again = sub.until_ids(&first_ids).await;
    let again_ids: BTreeSet<String> = again.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(again_ids, first_ids);
    for (a, b) in first.iter().zip(&again) {
        assert_eq!(a.body, b.body, "a redelivery is the same event");
    }
    let end = current_lsn(&db).await;
    wait_until("the slot passes the redelivered commit", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    sub.delete().await;
}

// ---- NATS JetStream ------------------------------------------------------------

/// The password of the NATS test user `pginval`.
const NATS_PASSWORD: &str = "nats-pw";

/// A nats-server with JetStream of one test, on its own port and store; restartable.
struct Nats {
    port: u16,
    store: PathBuf,
    child: Option<Child>,
}

impl Nats {
    fn binary() -> Option<PathBuf> {
        [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    }

    fn start() -> Option<Nats> {
        let Some(_) = Self::binary() else {
            crate::support::skipped(
                "nats-server is not installed (scripts/install-deps.sh installs it)",
            );
            return None;
        };
        let port = free_port();
        let store =
            std::env::temp_dir().join(format!("pginval-test-nats-{port}-{}", std::process::id()));
        let mut nats = Nats {
            port,
            store,
            child: None,
        };
        nats.restart();
        Some(nats)
    }

    fn restart(&mut self) {
        self.stop();
        let child = Command::new(Self::binary().unwrap())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The URL with the user and its password.
    fn url(&self) -> String {
        format!("nats://pginval:{NATS_PASSWORD}@127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// The stream's messages as (subject, Nats-Msg-Id, body), in stream order.
async fn stream_messages(url: &str, stream: &str) -> Vec<(String, String, Value)> {
    let client = async_nats::connect(url).await.expect("connecting to NATS");
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let last = stream
        .info()
        .await
        .map(|i| i.state.last_sequence)
        .unwrap_or(0);
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let id = m
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        out.push((
            m.subject.to_string(),
            id,
            serde_json::from_slice(&m.payload).unwrap(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_gets_each_change_and_a_restart_loses_nothing() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let (db, redis) = setup("nats").await;
    let stream = "PGINVAL_TEST";
    let metrics_port = free_port();
    // The URL names the user; the password is in a file.
    let password_file = std::env::temp_dir().join(format!("pginval-test-{}.natspw", db.name));
    std::fs::write(&password_file, format!("{NATS_PASSWORD}\n")).unwrap();
    let rules = format!(
        "[events.nats]\nurl = \"nats://pginval@127.0.0.1:{}\"\npassword_file = \"{}\"\nstream = \"{stream}\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{{id}}\"]\nentity = \"user\"\n",
        nats.port,
        password_file.display()
    );
    let text = with_metrics(&config_text(&db, &redis, &rules), metrics_port);
    let config = pginval::config::Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
    let daemon = Daemon::start(&db, config).await;

    db.execute_batch("INSERT INTO users VALUES (1000, 'new', 'member')")
        .await;
    db.execute_batch("UPDATE users SET role = 'admin' WHERE id = 1000")
        .await;
    db.execute_batch("DELETE FROM users WHERE id = 1000").await;
    db.execute_batch("TRUNCATE users").await;
    let end = current_lsn(&db).await;
    wait_until("the slot passes the acknowledged events", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    let got = stream_messages(&nats.url(), stream).await;
    let ops: Vec<&str> = got
        .iter()
        .map(|(_, _, b)| b["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["insert", "update", "delete", "truncate"]);
    for (subject, id, body) in &got {
        assert_eq!(subject, "invalidate.user");
        assert_eq!(body["event_id"], id.as_str());
        assert!(id.ends_with(":0"), "{id}");
    }
    assert_eq!(got[1].2["fields"]["role"], "admin");

    // The server goes down: the slot waits; it comes back: everything arrives once.
    nats.stop();
    db.execute_batch("INSERT INTO users SELECT g, 'again', 'member' FROM generate_series(1, 10) g")
        .await;
    wait_until("/readyz names the event sink", WAIT, || async {
        matches!(get(metrics_port, "/readyz").await,
            Some((503, body)) if body.contains("nats event sink"))
    })
    .await;
    let held = confirmed_lsn(&db).await;
    nats.restart();
    let end = current_lsn(&db).await;
    wait_until("the slot passes the republished events", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    let got = stream_messages(&nats.url(), stream).await;
    let inserted: BTreeSet<String> = got[4..]
        .iter()
        .map(|(_, _, b)| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(inserted, (1..=10).map(|i| i.to_string()).collect());
    let commit = lsn(got[4].2["lsn"].as_str().unwrap());
    assert!(
        held < commit,
        "the slot ({held}) moved past unacknowledged events (commit at {commit})"
    );
    let ids: BTreeSet<&String> = got.iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids.len(), got.len(), "the stream dropped redelivered ids");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_gets_the_same_event_and_the_slot_waits_for_the_last() {
    let Some(_rabbitmq) = rabbitmq().await else {
        return;
    };
    let Some(nats) = Nats::start() else { return };
    let (db, redis) = setup("allsinks").await;
    let exchange = format!("pginval_test_{}", db.name);
    let mut sub = Subscriber::bind(&exchange).await;
    let broker = FaultProxy::start(RABBITMQ_PORT).await;
    let stream = "PGINVAL_ALL";
    let rules = format!(
        "[events]\nstream = \"pginval:events\"\n\n[events.amqp]\nurl = \"{}\"\nexchange = \"{exchange}\"\n\n[events.nats]\nurl = \"{}\"\nstream = \"{stream}\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{{id}}\"]\nentity = \"user\"\n",
        amqp_url(broker.port()),
        nats.url()
    );
    let daemon = Daemon::start(&db, crate::config(&db, &redis, &rules)).await;
    // RabbitMQ is away; Redis and NATS are not.
    broker.cut();
    db.execute_batch("UPDATE users SET role = 'admin' WHERE id = 7")
        .await;
    let mut conn = redis.connection().await;
    wait_until("the Redis stream has the event", WAIT, || async {
        let n: usize = redis::cmd("XLEN")
            .arg("pginval:events")
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        n == 1
    })
    .await;
    wait_until("pginval retried RabbitMQ", WAIT, || async {
        broker.refused() >= 3
    })
    .await;
    let held = confirmed_lsn(&db).await;
    assert!(
        stream_messages(&nats.url(), stream).await.is_empty(),
        "the brokers get a unit in turn: NATS after RabbitMQ"
    );

    broker.restore();
    let from_amqp = sub.next().await;
    let commit = lsn(from_amqp.body["lsn"].as_str().unwrap());
    assert!(
        held < commit,
        "the slot ({held}) moved while RabbitMQ had not confirmed (commit at {commit})"
    );
    let end = current_lsn(&db).await;
    wait_until("the slot passes the event", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    let entries: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut conn, "pginval:events")
            .await
            .unwrap();
    let from_redis: String = entries.ids[0].get("event").unwrap();
    let from_nats = stream_messages(&nats.url(), stream).await;
    assert_eq!(from_nats.len(), 1);
    let from_redis: Value = serde_json::from_str(&from_redis).unwrap();
    assert_eq!(from_amqp.body, from_redis, "one event model");
    assert_eq!(from_nats[0].2, from_redis, "one event model");
    assert_eq!(from_nats[0].1, from_amqp.message_id);
    daemon.stop().await.unwrap();
    sub.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_what_a_broker_would_refuse_and_warns_when_it_is_away() {
    let Some(_rabbitmq) = rabbitmq().await else {
        return;
    };
    let Some(nats) = Nats::start() else { return };
    let (db, redis) = setup("brokercheck").await;
    let exchange = format!("pginval_test_{}", db.name);
    let check =
        |rules: String| crate::check_file(&config_file(&db, &config_text(&db, &redis, &rules)));

    // Everything right: the exchange is declared, the stream created.
    let (code, out) = check(format!(
        "{}\n[events.nats]\nurl = \"{}\"\nstream = \"PGINVAL_CHECK\"\n",
        amqp_rules(&amqp_url(RABBITMQ_PORT), &exchange).replace("\n[[rules]]", "[[rules]]"),
        nats.url()
    ));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "amqp broker answers; exchange \"{exchange}\" ready"
        )),
        "{out}"
    );
    assert!(
        out.contains("nats broker answers; stream \"PGINVAL_CHECK\" ready"),
        "{out}"
    );

    // The exchange exists with another type: every publish would fail.
    let (code, out) = check(
        amqp_rules(&amqp_url(RABBITMQ_PORT), &exchange)
            .replace("[[rules]]", "exchange_type = \"fanout\"\n\n[[rules]]"),
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("the amqp broker refuses pginval"), "{out}");
    assert!(out.contains("PRECONDITION_FAILED"), "{out}");

    // Wrong credentials.
    let (code, out) = check(amqp_rules(
        &amqp_url(RABBITMQ_PORT).replace("guest:guest", "guest:wrong"),
        &exchange,
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("the amqp broker refuses pginval"), "{out}");

    // No stream covers the subjects.
    let (code, out) = check(format!(
        "[events.nats]\nurl = \"{}\"\nsubject = \"nowhere.{{entity}}\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{{id}}\"]\nentity = \"user\"\n",
        nats.url()
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("no JetStream stream covers subjects \"nowhere.*\""),
        "{out}"
    );

    // A broker that is away is a warning: run waits for it.
    let away = free_port();
    let (code, out) = check(amqp_rules(&amqp_url(away), &exchange));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("cannot reach the amqp broker"), "{out}");
    Subscriber::bind(&exchange).await.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_unroutable_events_go_to_the_alternate_exchange() {
    let Some(_rabbitmq) = rabbitmq().await else {
        return;
    };
    let (db, redis) = setup("amqpalt").await;
    let exchange = format!("pginval_test_{}", db.name);
    let alternate = format!("{exchange}_unrouted");
    // The operator's alternate exchange, with a queue catching everything; no queue is
    // bound to pginval's exchange itself.
    let conn = Connection::connect(&amqp_url(RABBITMQ_PORT), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .exchange_declare(
            alternate.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            alternate.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "alt".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let rules = amqp_rules(&amqp_url(RABBITMQ_PORT), &exchange).replace(
        "[[rules]]",
        &format!("alternate_exchange = \"{alternate}\"\n\n[[rules]]"),
    );
    let daemon = Daemon::start(&db, crate::config(&db, &redis, &rules)).await;
    db.execute_batch("UPDATE users SET role = 'admin' WHERE id = 5")
        .await;
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("the unroutable event reaches the alternate exchange")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.routing_key.as_str(), "invalidate.user");
    let body: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(body["id"], "5");
    daemon.stop().await.unwrap();
    for name in [&exchange, &alternate] {
        let _ = channel
            .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

fn rabbitmqctl(args: &[&str]) {
    let program = ["/usr/sbin/rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("rabbitmqctl");
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("running rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The broker itself stops (`rabbitmqctl stop_app`: every connection closed, new ones
/// refused) while changes stream, and starts again: every event arrives at least once,
/// pginval reconnecting by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_restart_mid_stream_loses_no_event() {
    let _alone = RABBITMQ.write().await;
    if !listening(RABBITMQ_PORT, "RabbitMQ") {
        return;
    }
    let (db, redis) = setup("amqprestart").await;
    let exchange = format!("pginval_test_{}", db.name);
    let queue = format!("{exchange}_q");
    let mut sub = Subscriber::bind_queue(&exchange, Some(&queue)).await;
    let rules = amqp_rules(&amqp_url(RABBITMQ_PORT), &exchange);
    let daemon = Daemon::start(&db, crate::config(&db, &redis, &rules)).await;
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            let client = db.client().await;
            for id in 1..=200i64 {
                client
                    .execute("UPDATE users SET name = 'restart' WHERE id = $1", &[&id])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut ids = BTreeSet::new();
    while ids.len() < 20 {
        ids.insert(sub.next().await.body["id"].as_str().unwrap().to_owned());
    }
    // Mid-stream: the writer is still going.
    assert!(!writer.is_finished(), "the restart did not land mid-stream");
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    drop(sub);
    tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
        .await
        .unwrap();
    wait_until("RabbitMQ listens again", WAIT, || async {
        std::net::TcpStream::connect(("127.0.0.1", RABBITMQ_PORT)).is_ok()
    })
    .await;
    writer.await.unwrap();
    // The durable queue kept what was not yet taken; the rest pginval republishes.
    let mut sub = Subscriber::bind_queue(&exchange, Some(&queue)).await;
    while ids.len() < 200 {
        ids.insert(sub.next().await.body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids, (1..=200).map(|i| i.to_string()).collect());
    let end = current_lsn(&db).await;
    wait_until("the slot passes the last event", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    daemon.stop().await.unwrap();
    sub.delete().await;
}
