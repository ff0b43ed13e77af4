//! RabbitMQ's own ceiling, the reference of the events benchmark (`scripts/bench.sh`,
//! phase `events`): N persistent messages of the size of pginval's events to a durable
//! queue bound to a topic exchange, with publisher confirms, published in windows of
//! 1,000 as pginval does, by a client doing nothing else. Prints the time to the last
//! confirm.
//!
//!     cargo run --release --example amqp_ceiling -- 40000 [amqp-url]
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(40000, |s| s.parse().unwrap());
    let url = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "pginval_ceiling_x".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "pginval_ceiling_q".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "pginval_ceiling_q".into(),
        "pginval_ceiling_x".into(),
        "invalidate.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_purge("pginval_ceiling_q".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = br#"{"commit_time":"2026-12-03T10:35:55.897788Z","entity":"account","event_id":"bench_ev_amqp:0/153F590:0","fields":{"aid":"12345","abalance":"-4321"},"id":"12345","lsn":"0/153F590","op":"update","table":"public.pgbench_accounts"}"#;
    let t = std::time::Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for w in 0..n.div_ceil(1000) {
        let mut sends = Vec::new();
        for i in w * 1000..((w + 1) * 1000).min(n) {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(format!("id{i}").into());
            sends.push(ch.basic_publish(
                "pginval_ceiling_x".into(),
                "invalidate.account".into(),
                BasicPublishOptions::default(),
                body,
                props,
            ));
        }
        for s in futures_util::future::join_all(sends).await {
            confirms.push(s.unwrap());
        }
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    println!(
        "{n} persistent messages confirmed in {:.3} s",
        t.elapsed().as_secs_f64()
    );
    ch.queue_delete("pginval_ceiling_q".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    ch.exchange_delete("pginval_ceiling_x".into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}
