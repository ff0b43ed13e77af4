//! Transactions PostgreSQL streams before they commit (protocol version 2): applied at
//! their commit and never before, dropped at their abort (a rolled-back savepoint
//! drops its part only), replayed whole after a crash, bounded in memory.
//!
//! Each test's pginval sets its walsender's `logical_decoding_work_mem` to the minimum
//! (`[source] logical_decoding_work_mem = "64kB"`), so a transaction of a few hundred
//! rows is streamed while it runs.

use std::ops::Range;
use std::path::PathBuf;
use std::process::Child;

use redis::AsyncCommands;

use crate::support::{Redis, TestDb, wait_until};
use crate::{
    Daemon, WAIT, barrier, cache, config_file, config_text, confirmed_lsn, setup, spawn_run,
    wait_gone, wait_streaming,
};

const RULES: &str = "[events]\nstream = \"pginval:stream\"\nstream_maxlen = 100000\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\nentity = \"user\"\n";

/// A test's database with users 1 to `users`, and its Redis.
async fn streaming_setup(hint: &str, users: i64) -> (TestDb, Redis) {
    let (db, redis) = setup(hint).await;
    db.execute_batch(&format!(
        "INSERT INTO users SELECT g, 'u', 'member' FROM generate_series(301, {users}) g;"
    ))
    .await;
    (db, redis)
}

/// The test's configuration, its walsender streaming every transaction past 64 kB.
fn streaming_text(db: &TestDb, redis: &Redis, rules: &str) -> String {
    config_text(db, redis, rules).replacen(
        "[source]\n",
        "[source]\nlogical_decoding_work_mem = \"64kB\"\n",
        1,
    )
}

fn streaming_config(db: &TestDb, redis: &Redis, rules: &str) -> pginval::config::Config {
    pginval::config::Config::parse(
        std::path::Path::new("test.toml"),
        &streaming_text(db, redis, rules),
        |_| None,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn keys(ids: Range<i64>) -> Vec<String> {
    ids.map(|i| format!("user:{i}")).collect()
}

fn refs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

/// How many of `keys` are cached.
async fn cached(redis: &Redis, keys: &[String]) -> usize {
    let mut conn = redis.connection().await;
    conn.exists(keys).await.unwrap()
}

/// Transactions the slot's walsender streamed before their commit.
async fn streamed_transactions(db: &TestDb) -> i64 {
    let client = db.client().await;
    client
        .query_opt(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .map_or(0, |r| r.get(0))
}

async fn wait_streamed(db: &TestDb, at_least: i64) {
    wait_until("PostgreSQL streams the open transactions", WAIT, || async {
        streamed_transactions(db).await >= at_least
    })
    .await;
}

/// The WAL insert position: past every commit made so far (the write position may
/// lag with `synchronous_commit = off`).
async fn insert_lsn(db: &TestDb) -> u64 {
    let client = db.client().await;
    let row = client
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

/// Caches users 1000..2999 and runs pginval as a process; returns its configuration
/// file, the process and the cached keys.
async fn run_process(db: &TestDb, redis: &Redis) -> (PathBuf, Child, Vec<String>) {
    let path = config_file(db, &streaming_text(db, redis, RULES));
    let big = keys(1000..3000);
    cache(redis, &refs(&big)).await;
    let child = spawn_run(&path, &path.with_extension("log"));
    wait_streaming(db).await;
    (path, child, big)
}

/// Opens a transaction that updates users 1000..2999, and waits until PostgreSQL
/// streamed it.
async fn open_streamed_update<'a>(
    db: &TestDb,
    client: &'a mut tokio_postgres::Client,
) -> tokio_postgres::Transaction<'a> {
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("UPDATE users SET name = name || '+' WHERE id BETWEEN 1000 AND 2999")
        .await
        .unwrap();
    wait_streamed(db, 1).await;
    tx
}

/// Kills pginval (SIGKILL) while `tx` is open, starts it again from `config`, commits
/// `tx` and waits for `keys` to go; then stops pginval, which must exit cleanly.
async fn restart_then_commit(
    db: &TestDb,
    redis: &Redis,
    mut child: Child,
    config: &std::path::Path,
    tx: tokio_postgres::Transaction<'_>,
    keys: &[String],
) {
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn_run(config, &config.with_extension("2.log"));
    wait_streaming(db).await;
    tx.commit().await.unwrap();
    wait_gone(redis, &refs(keys)).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// The entity events in the stream: (id, lsn) of each.
async fn events(redis: &Redis) -> Vec<(i64, String)> {
    let mut conn = redis.connection().await;
    let entries: redis::streams::StreamRangeReply = conn
        .xrange_count("pginval:stream", "-", "+", 100_000)
        .await
        .unwrap();
    entries
        .ids
        .iter()
        .map(|e| {
            let json: String = e.get("event").unwrap();
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            (
                v["id"].as_str().unwrap().parse().unwrap(),
                v["lsn"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A streamed transaction's changes reach pginval while it runs, but nothing of it
/// reaches Redis before its commit (a key deleted early is filled again from the old
/// row); at its commit every key goes, with one event per row stamped with the commit,
/// and the slot moves past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_is_invalidated_at_its_commit_and_not_before() {
    let (db, redis) = streaming_setup("streamed", 4000).await;
    let daemon = Daemon::start(&db, streaming_config(&db, &redis, RULES)).await;
    let big = keys(1000..3000);
    cache(&redis, &refs(&big)).await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("UPDATE users SET name = name || '+' WHERE id BETWEEN 1000 AND 2999")
        .await
        .unwrap();
    wait_streamed(&db, 1).await;
    // A later commit applied: pginval has read every block streamed before it.
    barrier(&db, &redis).await;
    assert_eq!(
        cached(&redis, &big).await,
        big.len(),
        "applied before COMMIT"
    );
    assert_eq!(events(&redis).await.len(), 1, "only the barrier's event");
    tx.commit().await.unwrap();
    let end = insert_lsn(&db).await;
    wait_gone(&redis, &refs(&big)).await;
    // Confirmed once every sink acknowledged: the events are out too.
    wait_until("the slot passes the streamed commit", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    let events = events(&redis).await;
    let big_events: Vec<_> = events.iter().filter(|(id, _)| *id != 300).collect();
    assert_eq!(big_events.len(), big.len());
    let lsns: std::collections::HashSet<&String> = big_events.iter().map(|(_, l)| l).collect();
    assert_eq!(lsns.len(), 1, "every part carries the one commit: {lsns:?}");
    daemon.stop().await.unwrap();
}

/// Two streamed transactions interleave: one rolls back a savepoint whose rows were
/// streamed and then commits, the other rolls back. Only the committed rows' keys go,
/// and only their events are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_streamed_transactions_and_savepoints_invalidate_nothing_of_theirs() {
    let (db, redis) = streaming_setup("streamabort", 5000).await;
    let daemon = Daemon::start(&db, streaming_config(&db, &redis, RULES)).await;
    let (committed, rolled_back, aborted) = (keys(1000..2000), keys(2000..3000), keys(3000..4000));
    for k in [&committed, &rolled_back, &aborted] {
        cache(&redis, &refs(k)).await;
    }
    cache(&redis, &["user:301"]).await;
    let (mut a, mut b) = (db.client().await, db.client().await);
    let a = a.transaction().await.unwrap();
    let b = b.transaction().await.unwrap();
    a.batch_execute("UPDATE users SET name = 'a' WHERE id BETWEEN 1000 AND 1999")
        .await
        .unwrap();
    b.batch_execute("UPDATE users SET name = 'b' WHERE id BETWEEN 3000 AND 3999")
        .await
        .unwrap();
    a.batch_execute("SAVEPOINT s; UPDATE users SET name = 's' WHERE id BETWEEN 2000 AND 2999")
        .await
        .unwrap();
    wait_streamed(&db, 2).await;
    barrier(&db, &redis).await;
    a.batch_execute("ROLLBACK TO SAVEPOINT s; UPDATE users SET name = 'a' WHERE id = 301")
        .await
        .unwrap();
    b.rollback().await.unwrap();
    a.commit().await.unwrap();
    let mut gone = refs(&committed);
    gone.push("user:301");
    wait_gone(&redis, &gone).await;
    // Everything committed before it is applied, the aborts included, and confirmed
    // once every sink acknowledged: the events are out too.
    barrier(&db, &redis).await;
    let end = insert_lsn(&db).await;
    wait_until("the slot passes the barrier", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    assert_eq!(cached(&redis, &rolled_back).await, rolled_back.len());
    assert_eq!(cached(&redis, &aborted).await, aborted.len());
    let ids: Vec<i64> = events(&redis).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids.iter().filter(|id| (1000..2000).contains(*id)).count(),
        1000
    );
    assert!(ids.contains(&301));
    let stray: Vec<&i64> = ids.iter().filter(|id| (2000..4000).contains(*id)).collect();
    assert!(
        stray.is_empty(),
        "events of aborted rows: {} of them",
        stray.len()
    );
    daemon.stop().await.unwrap();
}

/// pginval is killed while a transaction is being streamed to it; the server streams it
/// again to the next pginval, which applies it at its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_replays_the_streamed_transaction_whole() {
    let (db, redis) = streaming_setup("streamcrash", 4000).await;
    let (path, child, big) = run_process(&db, &redis).await;
    let mut client = db.client().await;
    let tx = open_streamed_update(&db, &mut client).await;
    barrier(&db, &redis).await;
    restart_then_commit(&db, &redis, child, &path, tx, &big).await;
}

/// Past `[limits] max_streamed_entries`, the streamed transaction's rule switches to
/// its fallback for the remaining rows: every key goes (user:0 only by the pattern).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_past_the_memory_limit_uses_the_rules_fallback() {
    let (db, redis) = streaming_setup("streamcap", 4000).await;
    let rules = "[limits]\nmax_streamed_entries = 500\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\nfallback = { patterns = [\"user:*\"] }\n";
    let daemon = Daemon::start(&db, streaming_config(&db, &redis, rules)).await;
    let big = keys(1000..3000);
    cache(&redis, &refs(&big)).await;
    cache(&redis, &["user:0"]).await;
    db.execute_batch("UPDATE users SET name = name || '+' WHERE id BETWEEN 1000 AND 2999")
        .await;
    let mut all = refs(&big);
    all.push("user:0");
    wait_gone(&redis, &all).await;
    assert!(streamed_transactions(&db).await >= 1, "it was streamed");
    daemon.stop().await.unwrap();
}

/// An open streamed transaction does not hold the slot: the slot follows the server
/// past its start (unrelated writes), and a pginval killed and started again then gets
/// the whole transaction once more, from its start, and applies it at its commit. (On
/// PostgreSQL 14, which sends the unrelated write's empty transaction, its commit
/// moves the slot either way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_moves_past_an_open_streamed_transaction_which_comes_again_whole_after_a_restart()
{
    let (db, redis) = streaming_setup("streamhold", 4000).await;
    let (path, child, big) = run_process(&db, &redis).await;
    let mut client = db.client().await;
    let tx = open_streamed_update(&db, &mut client).await;
    // A write the publication does not carry, too small to be streamed: PostgreSQL
    // 15+ sends nothing of it, so only the server's keepalive moves the slot past it.
    db.execute_batch("INSERT INTO unrelated VALUES (1, 'x')")
        .await;
    let written = insert_lsn(&db).await;
    wait_until(
        "the slot confirms past the open streamed transaction's start",
        WAIT,
        || async { confirmed_lsn(&db).await >= written },
    )
    .await;
    restart_then_commit(&db, &redis, child, &path, tx, &big).await;
}

/// A rule table renamed in a streamed transaction whose first change to it came in a
/// savepoint that rolled back: the Relation message came tagged with the savepoint,
/// but the rename committed, so its fallback (the rule's wildcard `user:*`) applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_seen_inside_a_rolled_back_savepoint_still_applies_its_fallback() {
    let (db, redis) = streaming_setup("streamrename", 4000).await;
    let rules = "[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\n";
    let daemon = Daemon::start(&db, streaming_config(&db, &redis, rules)).await;
    // pginval has seen the table under its name.
    barrier(&db, &redis).await;
    cache(&redis, &["user:5"]).await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(
        "ALTER TABLE users RENAME TO users_old;
         SAVEPOINT s;
         UPDATE users_old SET name = 'r' WHERE id BETWEEN 1000 AND 2999;",
    )
    .await
    .unwrap();
    wait_streamed(&db, 1).await;
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    tx.commit().await.unwrap();
    wait_gone(&redis, &["user:5"]).await;
    // The rule's table is gone: pginval stops at its next publication check.
    drop(daemon);
}
