//! Micro-benchmark: pgoutput decoding and rule rendering on captured bytes
//! (`tests/fixtures/pgoutput/text.hex`), in messages per second.
//!
//! `cargo bench --bench decode`

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pginval::config::Config;
use pginval::replication::event::RowEvent;
use pginval::replication::pgoutput::{Message, decode};
use pginval::replication::relation::{RelationCache, Table};
use pginval::rules::invalidation::Invalidation;

fn fixture() -> Vec<Bytes> {
    let text = include_str!("../tests/fixtures/pgoutput/text.hex");
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(_, hex)| {
            Bytes::from(
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect::<Vec<u8>>(),
            )
        })
        .collect()
}

const RULES: &str = r#"
[source]
url = "postgres://bench@127.0.0.1/bench"

[[rules]]
table = "account"
keys = ["account:{id}", "account_email:{email}"]
tags = ["mood:{mood}"]

[[rules]]
table = "audit_full"
keys = ["audit:{id}"]
"#;

fn bench(c: &mut Criterion) {
    let messages = fixture();
    let mut group = c.benchmark_group("pgoutput");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("decode", |b| {
        b.iter(|| {
            for m in &messages {
                std::hint::black_box(decode(m).unwrap());
            }
        })
    });

    let config = Config::parse(Path::new("bench.toml"), RULES, |_| None).unwrap();
    group.bench_function("decode_and_render", |b| {
        b.iter(|| {
            let mut relations = RelationCache::default();
            let mut bound = std::collections::HashMap::new();
            let mut inv = Invalidation::default();
            for m in &messages {
                match decode(m).unwrap() {
                    Message::Relation(r) => {
                        let table: Arc<Table> = relations.update(&r, None);
                        bound.insert(r.oid, (table.clone(), config.rules.bind(&table)));
                    }
                    Message::Insert(i) => {
                        if let Some((t, rules)) = bound.get(&i.relation) {
                            inv.add_row(rules, &RowEvent::insert(t.clone(), i), &[0]);
                        }
                    }
                    Message::Update(u) => {
                        if let Some((t, rules)) = bound.get(&u.relation) {
                            inv.add_row(rules, &RowEvent::update(t.clone(), u), &[0]);
                        }
                    }
                    Message::Delete(d) => {
                        if let Some((t, rules)) = bound.get(&d.relation) {
                            inv.add_row(rules, &RowEvent::delete(t.clone(), d), &[0]);
                        }
                    }
                    _ => {}
                }
            }
            std::hint::black_box(inv.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
