//! `[replicas]` (issue 14 item 3): physical replicas the application reads from.
//! A reader on a lagging replica fills the cache from the old row after pginval's
//! delete; with the replica listed, pginval deletes again once the replica replayed
//! the commit, and the slot waits for that. A replica that is down is given up.

use redis::AsyncCommands;

use crate::support::{PrivatePostgres, Redis, connect, wait_until};
use crate::{Daemon, WAIT, check_file, config_file, config_text, setup, wait_gone};

/// `[source]` on the primary, one rule on users, and `extra` sections.
fn primary_config(
    primary: &PrivatePostgres,
    redis: &Redis,
    extra: &str,
) -> pginval::config::Config {
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"replica_race\"\nstatus_interval_secs = 1\n\n[redis]\nurl = \"{}\"\n\n{extra}\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{{id}}\"]\n",
        primary.url("app"),
        redis.url()
    );
    pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn confirmed(primary: &tokio_postgres::Client) -> u64 {
    primary
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'replica_race'",
            &[],
        )
        .await
        .unwrap()
        .map_or(0, |r| r.get::<_, i64>(0) as u64)
}

async fn streaming(primary: &tokio_postgres::Client) {
    wait_until("pginval streams from the primary", WAIT, || async {
        primary
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = 'replica_race'",
                &[],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
    })
    .await;
}

/// Commits a rename of user `id` on the primary; returns a position at or past its
/// commit.
async fn rename(primary: &tokio_postgres::Client, id: i64) -> u64 {
    primary
        .execute("UPDATE users SET name = 'new' WHERE id = $1", &[&id])
        .await
        .unwrap();
    primary
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get::<_, i64>(0) as u64
}

async fn name_on(client: &tokio_postgres::Client, id: i64) -> String {
    client
        .query_one("SELECT name FROM users WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Pauses the replica's replay (`pause`) or resumes it.
async fn replay(replica: &tokio_postgres::Client, pause: bool) {
    let call = if pause {
        "SELECT pg_wal_replay_pause()"
    } else {
        "SELECT pg_wal_replay_resume()"
    };
    replica.batch_execute(call).await.unwrap();
    if pause {
        wait_until("the replica's replay is paused", WAIT, || async {
            replica
                .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
                .await
                .is_ok_and(|r| r.get::<_, String>(0) == "paused")
        })
        .await;
    }
}

/// The race on a replica whose replay is paused: without `[replicas]` the reader's
/// fill from the replica stays stale after pginval's only delete; with it, pginval
/// holds the slot until the replica replayed the commit, then deletes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_read_replica_leaves_a_stale_key_unless_listed() {
    let primary = PrivatePostgres::start();
    connect(&primary.url("postgres"))
        .await
        .batch_execute("CREATE DATABASE app")
        .await
        .unwrap();
    let app = connect(&primary.url("app")).await;
    app.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text);
         INSERT INTO users SELECT g, 'old' FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    let replica = primary.start_standby("").await;
    let reader = connect(&replica.url("app")).await;
    wait_until("the replica has the rows", WAIT, || async {
        reader
            .query_opt("SELECT 1 FROM users WHERE id = 10", &[])
            .await
            .is_ok_and(|r| r.is_some())
    })
    .await;
    let redis = Redis::start();
    let mut conn = redis.connection().await;

    // Without [replicas]: one delete, then the reader's stale fill stays.
    let daemon = Daemon::spawn(primary_config(&primary, &redis, ""));
    streaming(&app).await;
    let _: () = conn.set("user:1", "old").await.unwrap();
    replay(&reader, true).await;
    let after = rename(&app, 1).await;
    wait_gone(&redis, &["user:1"]).await;
    let read = name_on(&reader, 1).await;
    assert_eq!(read, "old", "the replica has not replayed the rename");
    let _: () = conn.set("user:1", &read).await.unwrap();
    replay(&reader, false).await;
    wait_until("the replica replayed the rename", WAIT, || async {
        name_on(&reader, 1).await == "new"
    })
    .await;
    wait_until("pginval confirmed the rename", WAIT, || async {
        confirmed(&app).await >= after
    })
    .await;
    let cached: String = conn.get("user:1").await.unwrap();
    assert_eq!(cached, "old", "stale until its TTL without [replicas]");
    daemon.stop().await.unwrap();

    // With the replica listed: the slot waits for it, then the key goes again.
    let daemon = Daemon::spawn(primary_config(
        &primary,
        &redis,
        &format!("[replicas]\nurls = [\"{}\"]\n", replica.url("app")),
    ));
    streaming(&app).await;
    let _: () = conn.set("user:2", "old").await.unwrap();
    replay(&reader, true).await;
    let after = rename(&app, 2).await;
    wait_gone(&redis, &["user:2"]).await;
    let read = name_on(&reader, 2).await;
    assert_eq!(read, "old", "the replica has not replayed the rename");
    let _: () = conn.set("user:2", &read).await.unwrap();
    crate::reported_twice_more(&app, "replica_race").await;
    assert!(
        confirmed(&app).await < after,
        "the slot waits for the replica"
    );
    let cached: String = conn.get("user:2").await.unwrap();
    assert_eq!(
        cached, "old",
        "not deleted again before the replica replayed"
    );
    replay(&reader, false).await;
    wait_gone(&redis, &["user:2"]).await;
    assert_eq!(
        name_on(&reader, 2).await,
        "new",
        "deleted again once replayed"
    );
    wait_until("pginval confirmed the rename", WAIT, || async {
        confirmed(&app).await >= after
    })
    .await;
    daemon.stop().await.unwrap();
}

/// A listed replica that is down holds the first batch `give_up_after` (here 5 s),
/// is given up (counted), and later batches do not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_replica_that_is_down_is_given_up_and_does_not_hold_the_slot() {
    let (db, redis) = setup("replicadown").await;
    let port = crate::support::free_port();
    let dead = crate::support::free_port();
    let text = crate::suite::ops::with_metrics(
        &format!(
            "{}\n[replicas]\nurls = [\"postgres://postgres@127.0.0.1:{dead}/app\"]\ngive_up_after = \"5s\"\n",
            config_text(&db, &redis, crate::RULES)
        ),
        port,
    );
    let cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, cfg).await;
    let client = db.client().await;
    let given_up = || async {
        crate::suite::ops::get(port, "/metrics")
            .await
            .map_or(0.0, |(_, m)| {
                crate::suite::ops::sample(&m, "pginval_replica_given_up_total")
            })
    };
    crate::cache(&redis, &["user:1"]).await;
    let after = rename(&client, 1).await;
    wait_gone(&redis, &["user:1"]).await;
    crate::reported_twice_more(&client, &db.name).await;
    assert!(
        crate::confirmed_lsn(&db).await < after,
        "the first batch waits for the replica"
    );
    wait_until(
        "pginval gave the replica up and confirmed",
        WAIT,
        || async { crate::confirmed_lsn(&db).await >= after },
    )
    .await;
    assert_eq!(given_up().await, 1.0);
    let (_, metrics) = crate::suite::ops::get(port, "/metrics").await.unwrap();
    assert_eq!(
        crate::suite::ops::sample(&metrics, "pginval_replicas_given_up "),
        1.0
    );
    // Later batches do not wait for it: no second give-up.
    crate::cache(&redis, &["user:2"]).await;
    let after = rename(&client, 2).await;
    wait_gone(&redis, &["user:2"]).await;
    wait_until("pginval confirmed the next batch", WAIT, || async {
        crate::confirmed_lsn(&db).await >= after
    })
    .await;
    assert_eq!(given_up().await, 1.0);
    daemon.stop().await.unwrap();
}

/// `check` warns of a listed replica it cannot reach, and refuses one that is not in
/// recovery (nothing to wait for there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_read_replica_that_is_a_primary_and_warns_of_one_away() {
    let (db, redis) = setup("replicacheck").await;
    let dead = crate::support::free_port();
    let text = format!(
        "{}\n[replicas]\nurls = [\"{}\", \"postgres://postgres@127.0.0.1:{dead}/app\"]\n",
        config_text(&db, &redis, crate::RULES),
        db.url
    );
    let (code, out) = check_file(&config_file(&db, &text));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("is not in recovery"), "{out}");
    assert!(
        out.contains(&format!("cannot connect to [replicas] 127.0.0.1:{dead}")),
        "{out}"
    );
}
