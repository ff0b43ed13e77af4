//! Unit tests of the Redis connection: slots, routing keys, spill tags.

use super::*;

#[test]
fn slot_tags_put_a_key_in_the_slot_they_name() {
    for slot in [0, 1, 866, 12539, 16383] {
        assert_eq!(slot_of(&format!("{{{}}}anything", slot_tag(slot))), slot);
    }
}

#[test]
fn hash_tags_decide_the_slot() {
    assert_eq!(slot_of("{user:1}:profile"), slot_of("user:1"));
    // The reference value from the Redis Cluster specification.
    assert_eq!(slot_of("123456789"), 12739);
}

#[test]
fn cluster_slots_reply_names_each_primary() {
    let node = |host: &str, port: i64| {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    };
    let reply = Value::Array(vec![
        Value::Array(vec![
            Value::Int(0),
            Value::Int(5460),
            node("10.0.0.1", 7000),
            node("10.0.0.4", 7003),
        ]),
        Value::Array(vec![
            Value::Int(5461),
            Value::Int(16383),
            node("10.0.0.2", 7001),
        ]),
        Value::Int(3),
    ]);
    assert_eq!(
        parse_cluster_slots(&reply),
        vec![
            (("10.0.0.1".to_owned(), 7000), 0),
            (("10.0.0.2".to_owned(), 7001), 5461)
        ]
    );
    assert_eq!(
        parse_slot_ranges(&reply),
        vec![
            (0, 5460, ("10.0.0.1".to_owned(), 7000)),
            (5461, 16383, ("10.0.0.2".to_owned(), 7001))
        ]
    );
}

#[test]
fn batched_commands_are_routed_by_their_first_key() {
    let key = |cmd: &Cmd| routing_key(cmd).map(|k| String::from_utf8_lossy(k).into_owned());
    let mut unlink = redis::cmd("UNLINK");
    unlink.arg("a").arg("b");
    assert_eq!(key(&unlink).as_deref(), Some("a"));
    let mut pexpire = redis::cmd("pexpire");
    pexpire.arg("k").arg(30_000).arg("LT");
    assert_eq!(key(&pexpire).as_deref(), Some("k"));
    let mut eval = redis::cmd("EVAL");
    eval.arg("return 1").arg(2).arg("tag").arg("spill");
    assert_eq!(key(&eval).as_deref(), Some("tag"));
    let mut keyless = redis::cmd("EVAL");
    keyless.arg("return 1").arg(0);
    assert_eq!(key(&keyless), None);
    let mut publish = redis::cmd("PUBLISH");
    publish.arg("channel").arg("message");
    assert_eq!(
        key(&publish),
        None,
        "PUBLISH has no key: not batched per primary"
    );
    assert_eq!(key(&redis::cmd("UNLINK")), None);
}
