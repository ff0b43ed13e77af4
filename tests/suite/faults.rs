//! Faults and hostile input: after any single fault, once pginval runs again and has
//! caught up, no cached key of a changed row is left.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pginval::config::Config;

use crate::support::{PrivatePostgres, Redis, TestDb, wait_until};
use crate::{
    Daemon, RULES, WAIT, bin, cache, config, config_file, config_text, confirmed_lsn, current_lsn,
    setup, spawn_run, wait_gone, wait_streaming,
};

/// Rows updated exactly once each, so a lost commit cannot hide behind a later one.
const ITEMS: i64 = 3000;

async fn items_db(hint: &str) -> (TestDb, Redis) {
    let (db, redis) = setup(hint).await;
    db.execute_batch(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO items SELECT g FROM generate_series(1, {ITEMS}) g;"
    ))
    .await;
    (db, redis)
}

const ITEM_RULES: &str = "[[rules]]\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

fn item_keys() -> Vec<String> {
    (1..=ITEMS).map(|i| format!("item:{i}")).collect()
}

/// Updates every item once, one transaction each, at a steady pace.
fn steady_writer(db: &TestDb, per_second: u64) -> tokio::task::JoinHandle<()> {
    let db = db.clone();
    tokio::spawn(async move {
        let client = db.client().await;
        let start = Instant::now();
        for i in 1..=ITEMS {
            client
                .execute("UPDATE items SET n = n + 1 WHERE id = $1", &[&i])
                .await
                .unwrap();
            let due = start + Duration::from_micros(i as u64 * 1_000_000 / per_second);
            tokio::time::sleep_until(due.into()).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkill_under_steady_load_loses_nothing() {
    let (db, redis) = items_db("killloop").await;
    let path = config_file(&db, &config_text(&db, &redis, ITEM_RULES));
    let keys = item_keys();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    cache(&redis, &refs).await;

    let log = |n: usize| path.with_extension(format!("{n}.log"));
    let mut child = spawn_run(&path, &log(0));
    wait_streaming(&db).await;
    let writer = steady_writer(&db, 1000);
    for n in 1..=4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        child = spawn_run(&path, &log(n));
    }
    writer.await.unwrap();
    wait_gone(&redis, &refs).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// Key-only batches go to Redis several at a time; a connection dropped under them
/// (CLIENT KILL, ten times under a steady 1,000 tps of single-row commits) must not
/// acknowledge any batch Redis did not take: every key goes, and the slot catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_dropped_under_load_lose_nothing() {
    let (db, redis) = items_db("dropload").await;
    let daemon = Daemon::start(&db, config(&db, &redis, ITEM_RULES)).await;
    let keys = item_keys();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    cache(&redis, &refs).await;
    let writer = steady_writer(&db, 1000);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut conn = redis.connection().await;
        let _: () = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    writer.await.unwrap();
    let written = current_lsn(&db).await;
    wait_gone(&redis, &refs).await;
    wait_until("the flush position passes the writes", WAIT, || async {
        confirmed_lsn(&db).await >= written
    })
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsender_terminated_mid_stream_reconnects() {
    let (db, redis) = setup("termwal").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    cache(&redis, &["user:1", "user:2"]).await;
    let client = db.client().await;
    client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    db.execute_batch("UPDATE users SET name = 't' WHERE id IN (1, 2)")
        .await;
    wait_gone(&redis, &["user:1", "user:2"]).await;
    assert!(!daemon.finished());
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_restart_is_survived() {
    let pg = PrivatePostgres::start();
    let db = pg.create_database("pgrestart").await;
    db.execute_batch(crate::SCHEMA).await;
    let redis = Redis::start();
    let daemon = Daemon::spawn(config(&db, &redis, RULES));
    wait_streaming(&db).await;
    cache(&redis, &["user:1", "user:3"]).await;
    db.execute_batch("UPDATE users SET name = 'before' WHERE id = 1")
        .await;
    pg.restart("fast");
    db.execute_batch("UPDATE users SET name = 'after' WHERE id = 3")
        .await;
    wait_gone(&redis, &["user:1", "user:3"]).await;
    assert!(!daemon.finished());
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_standby_takes_over_when_the_first_instance_dies() {
    let (db, redis) = setup("standby").await;
    let first = Daemon::start(&db, config(&db, &redis, RULES)).await;
    let second = Daemon::spawn(config(&db, &redis, RULES));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!second.finished(), "the standby waits instead of failing");
    cache(&redis, &["user:5"]).await;
    db.execute_batch("UPDATE users SET name = 'first' WHERE id = 5")
        .await;
    wait_gone(&redis, &["user:5"]).await;

    first.stop().await.unwrap();
    let took_over = Instant::now();
    cache(&redis, &["user:6"]).await;
    db.execute_batch("UPDATE users SET name = 'second' WHERE id = 6")
        .await;
    wait_gone(&redis, &["user:6"]).await;
    assert!(
        took_over.elapsed() < Duration::from_secs(10),
        "took over in {:?}",
        took_over.elapsed()
    );
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_slot_is_recreated_and_everything_flushed() {
    let (db, redis) = setup("slotlost").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    daemon.stop().await.unwrap();
    let client = db.client().await;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.name])
        .await
        .unwrap();
    // Changes nobody streams: the gap.
    db.execute_batch(
        "UPDATE users SET name = 'gap' WHERE id = 7; UPDATE posts SET title = 'gap' WHERE id = 9",
    )
    .await;
    cache(&redis, &["user:7", "user_full:8", "post:9", "user_posts:1"]).await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    // Every rule's fallback: user:*, user_full:*, post:*, user_posts:* all go.
    wait_gone(&redis, &["user:7", "user_full:8", "post:9", "user_posts:1"]).await;
    let mut conn = redis.state_connection().await;
    let marker: String = redis::AsyncCommands::get(
        &mut conn,
        format!("pginval:slot-state:{}:{}", db.name, db.name),
    )
    .await
    .unwrap();
    assert_eq!(marker, "active");
    // And it streams on from the new slot.
    cache(&redis, &["user:8"]).await;
    db.execute_batch("UPDATE users SET name = 'new' WHERE id = 8")
        .await;
    wait_gone(&redis, &["user:8"]).await;
    daemon.stop().await.unwrap();
}

/// Entity event consumers keep caches of their own: after a lost slot they are told to
/// refresh everything of each entity, not left with what they had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_slot_tells_event_consumers_to_refresh_every_entity() {
    let (db, redis) = setup("slotlostev").await;
    let rules = "[events]\nstream = \"pginval:events\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\nentity = \"user\"\n\n[[rules]]\ntable = \"posts\"\nkeys = [\"post:{id}\"]\nentity = \"post\"\n\n[[rules]]\ntable = \"posts\"\nkeys = [\"posts_by:{author_id}\"]\nentity = \"post\"\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    daemon.stop().await.unwrap();
    let client = db.client().await;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.name])
        .await
        .unwrap();
    db.execute_batch("UPDATE users SET name = 'gap' WHERE id = 7")
        .await;
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    let mut conn = redis.connection().await;
    let entries: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut conn, "pginval:events")
            .await
            .unwrap();
    let events: Vec<serde_json::Value> = entries
        .ids
        .iter()
        .map(|e| serde_json::from_str(&e.get::<String>("event").unwrap()).unwrap())
        .collect();
    // Streaming starts after recovery: the events are there once the slot streams.
    let mut entities: Vec<&str> = events
        .iter()
        .map(|e| e["entity"].as_str().unwrap())
        .collect();
    entities.sort();
    assert_eq!(
        entities,
        ["post", "user"],
        "one overflow event per entity: {events:?}"
    );
    for e in &events {
        assert_eq!(e["op"], "overflow");
        assert_eq!(e["fields"], serde_json::Value::Null);
        assert!(
            e["event_id"].as_str().unwrap().contains(":slot-lost-"),
            "{e}"
        );
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_slot_with_fail_policy_stops_with_the_reason() {
    let (db, redis) = setup("slotfail").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    daemon.stop().await.unwrap();
    db.client()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.name])
        .await
        .unwrap();
    let text = config_text(&db, &redis, RULES).replace(
        "status_interval_secs = 1",
        "status_interval_secs = 1\non_slot_lost = \"fail\"",
    );
    let cfg = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
    let err = tokio::time::timeout(WAIT, pginval::pipeline::run(cfg, std::future::pending()))
        .await
        .expect("fails fast")
        .unwrap_err()
        .to_string();
    assert!(err.contains("was lost"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_invalidated_by_max_slot_wal_keep_size_is_flushed() {
    let pg = PrivatePostgres::start();
    let db = pg.create_database("walkeep").await;
    db.execute_batch(crate::SCHEMA).await;
    db.execute_batch("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await;
    db.execute_batch("SELECT pg_reload_conf()").await;
    let redis = Redis::start();
    let daemon = Daemon::spawn(config(&db, &redis, RULES));
    wait_streaming(&db).await;
    daemon.stop().await.unwrap();
    // Far more WAL than the slot may keep, then checkpoints to remove it.
    let client = db.client().await;
    for _ in 0..4 {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS filler (v text);
                 INSERT INTO filler SELECT repeat('x', 500) FROM generate_series(1, 40000);
                 SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await
            .unwrap();
    }
    wait_until("the slot is lost", WAIT, || async {
        client
            .query_one(
                "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .map(|r| r.get::<_, String>(0) == "lost")
            .unwrap_or(false)
    })
    .await;
    cache(&redis, &["user:9", "post:2"]).await;
    let daemon = Daemon::spawn(config(&db, &redis, RULES));
    wait_gone(&redis, &["user:9", "post:2"]).await;
    wait_streaming(&db).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_advances_while_other_databases_write() {
    let (db, redis) = setup("otherdb").await;
    let other = crate::support::postgres().create_database("busy").await;
    let text = config_text(&db, &redis, RULES).replace(
        "status_interval_secs = 1",
        "status_interval_secs = 1\nheartbeat_secs = 1",
    );
    let cfg = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
    let daemon = Daemon::start(&db, cfg).await;
    other
        .execute_batch("CREATE TABLE t (v text); INSERT INTO t SELECT repeat('y', 200) FROM generate_series(1, 20000)")
        .await;
    let written = current_lsn(&db).await;
    wait_until(
        "the slot confirms past the other database's WAL",
        WAIT,
        || async { confirmed_lsn(&db).await >= written },
    )
    .await;
    let retained = || async {
        db.client()
            .await
            .query_one(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // restart_lsn follows once running-xacts records are decoded (heartbeats help).
    wait_until("retained WAL stays small", WAIT, || async {
        retained().await < 4 * 1024 * 1024
    })
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_from_files_and_env_are_never_logged() {
    let (db, redis) = setup("secrets").await;
    let secret_dir = std::env::temp_dir().join(format!("pginval-secret-{}", db.name));
    std::fs::create_dir_all(&secret_dir).unwrap();
    let pw_file = secret_dir.join("pg-password");
    std::fs::write(&pw_file, format!("{}\n", crate::support::AUTH_PASSWORD)).unwrap();
    db.execute_batch(&format!(
        "CREATE PUBLICATION pginval FOR TABLE users, posts; GRANT SELECT ON users, posts TO {}",
        crate::support::SCRAM_ROLE
    ))
    .await;
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}",
        crate::support::SCRAM_ROLE,
        crate::support::postgres().port(),
        db.name
    );
    let text = config_text(&db, &redis, RULES)
        .replace(&db.url, &url)
        .replace(
            "status_interval_secs = 1",
            &format!(
                "status_interval_secs = 1\npassword_file = \"{}\"",
                pw_file.display()
            ),
        );
    let path = config_file(&db, &text);
    let log = path.with_extension("log");
    let mut child = spawn_run(&path, &log);
    wait_streaming(&db).await;
    cache(&redis, &["user:11"]).await;
    db.execute_batch("UPDATE users SET name = 's' WHERE id = 11")
        .await;
    wait_gone(&redis, &["user:11"]).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());

    // A wrong password from the environment: refused, and not printed either.
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&path)
        .env("PGINVAL_SOURCE_PASSWORD", "hunter2-wrong")
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let check = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let logs = format!(
        "{}{}{}{}{}",
        std::fs::read_to_string(&log).unwrap(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr),
    );
    assert!(logs.contains("password authentication failed"), "{logs}");
    for secret in [crate::support::AUTH_PASSWORD, "hunter2-wrong"] {
        assert!(!logs.contains(secret), "{secret} leaked:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_role_is_told_exactly_what_is_missing() {
    let (db, redis) = setup("leastpriv").await;
    let role = crate::support::MD5_ROLE;
    let url = db.url_as(role, crate::support::AUTH_PASSWORD);
    let path = config_file(&db, &config_text(&db, &redis, RULES).replace(&db.url, &url));
    let check = || {
        let out = Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // Without a publication, a role that owns nothing cannot create one.
    let (code, text) = check();
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("cannot create it"), "{text}");
    assert!(
        text.contains("CREATE PUBLICATION \"pginval\" FOR TABLE"),
        "{text}"
    );

    // Prepared by the owner the way sql/setup.sql does it: REPLICATION + SELECT suffice.
    db.execute_batch(&format!(
        "CREATE PUBLICATION pginval FOR TABLE users, posts;
         GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON users, posts TO {role};"
    ))
    .await;
    let (code, text) = check();
    assert_eq!(code, Some(0), "{text}");
    let cfg = Config::parse(
        Path::new("t.toml"),
        &config_text(&db, &redis, RULES).replace(&db.url, &url),
        |_| None,
    )
    .unwrap();
    let daemon = Daemon::start(&db, cfg).await;
    cache(&redis, &["user:12"]).await;
    db.execute_batch("UPDATE users SET name = 'lp' WHERE id = 12")
        .await;
    wait_gone(&redis, &["user:12"]).await;
    daemon.stop().await.unwrap();
}

/// `failover_slot = true` where PostgreSQL cannot keep a copy of the slot: before 17
/// check refuses it; on 17+ it refuses a slot made without the flag, naming the
/// replication command that sets it, and warns of a lone host and of no standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_failover_slot_where_postgresql_cannot_keep_it() {
    let (db, redis) = setup("failover_check").await;
    let text = config_text(&db, &redis, RULES).replace(
        "status_interval_secs = 1",
        "status_interval_secs = 1\nfailover_slot = true",
    );
    let path = config_file(&db, &text);
    if crate::support::postgres().major_version() < 17 {
        let (code, out) = crate::check_file(&path);
        assert_eq!(code, Some(2), "{out}");
        assert!(
            out.contains("failover_slot = true needs PostgreSQL 17 or newer"),
            "{out}"
        );
        return;
    }
    // setup plans the slot as run creates it.
    let planned = Command::new(bin())
        .args(["setup", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let planned = String::from_utf8_lossy(&planned.stdout);
    assert!(
        planned.contains(&format!(
            "pg_create_logical_replication_slot('{}', 'pgoutput', false, false, true)",
            db.name
        )),
        "{planned}"
    );
    db.execute_batch(&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
        db.name
    ))
    .await;
    let (code, out) = crate::check_file(&path);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("exists without the failover flag")
            && out.contains(&format!(
                "ALTER_REPLICATION_SLOT \"{}\" (FAILOVER true)",
                db.name
            )),
        "{out}"
    );
    assert!(
        out.contains("no standby streams through a physical slot"),
        "{out}"
    );
    assert!(out.contains("with one host in url"), "{out}");
}

/// On Amazon RDS and Aurora no role has REPLICATION: membership in rds_replication
/// gives the right. A server with RDS' administrative roles (made here by hand: the
/// roles are what pginval tells the service by) gets RDS' fix, and a member passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_rds_replication_on_amazon_rds() {
    let pg = PrivatePostgres::start();
    let db = pg.create_database("rds").await;
    db.execute_batch(crate::SCHEMA).await;
    db.execute_batch(
        "CREATE ROLE rds_superuser NOLOGIN; CREATE ROLE rds_replication NOLOGIN;
         CREATE ROLE rds_app LOGIN NOREPLICATION;
         CREATE PUBLICATION pginval FOR TABLE users, posts;
         GRANT SELECT ON users, posts TO rds_app;",
    )
    .await;
    let redis = Redis::start();
    let url = db
        .url
        .replacen("postgres://postgres@", "postgres://rds_app@", 1);
    let path = config_file(&db, &config_text(&db, &redis, RULES).replace(&db.url, &url));
    let check = || crate::check_file(&path);
    let (code, text) = check();
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("managed service: Amazon RDS or Aurora"),
        "{text}"
    );
    assert!(
        text.contains("nor membership in rds_replication")
            && text.contains("fix: GRANT rds_replication TO <the role in [source] url>;"),
        "{text}"
    );
    db.execute_batch("GRANT rds_replication TO rds_app").await;
    let (code, text) = check();
    assert!(
        !text.contains("nor membership in rds_replication"),
        "{text}"
    );
    assert_eq!(code, Some(0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_configuration_names_its_line_and_fix() {
    let dir = std::env::temp_dir().join(format!("pginval-badcfgs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let head = "[source]\nurl = \"postgres://u@h/db\"\n\n";
    let cases: &[(&str, String, &str)] = &[
        ("unknown field", format!("{head}[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\ncolum = [\"x\"]\n"), "rules.toml:7: rule #1: unknown field `colum`"),
        ("wrong type", format!("{head}[[rules]]\ntable = \"users\"\nkeys = \"u:{{id}}\"\n"), "rules.toml:6:"),
        ("unclosed brace", format!("{head}[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id\"]\n"), "unclosed '{'"),
        ("bad selector", format!("{head}[[rules]]\ntable = \"users\"\nkeys = [\"u:{{older.id}}\"]\n"), "is not a column name"),
        ("conflicting rules", format!("{head}[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\naction = \"expire\"\nexpire_in = \"5s\"\n"), "with different actions"),
        ("bad postgres url", "[source]\nurl = \"postgres://u@h:notaport/db\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{id}\"]\n".to_owned(), "rules.toml:2: [source] url is not a valid PostgreSQL connection string"),
        ("bad redis url", format!("{head}[redis]\nurl = \"http://nope\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\n"), "rules.toml:5: [redis] url is not a valid Redis URL"),
        ("bad duration", format!("{head}[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\nredelete_after = \"soon\"\n"), "is not a duration"),
        ("bad operation", format!("{head}[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\non = [\"upsert\"]\n"), "unknown operation \"upsert\""),
        ("status interval out of range", "[source]\nurl = \"postgres://u@h/db\"\nstatus_interval_secs = 0\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{id}\"]\n".to_owned(), "rules.toml:3: [source] status_interval_secs must be between 1 and 3600"),
        ("receive timeout too short", "[source]\nurl = \"postgres://u@h/db\"\nreceive_timeout_secs = 1\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{id}\"]\n".to_owned(), "rules.toml:3: [source] receive_timeout_secs must be 0 (off) or between 2 and 3600"),
        ("no keys per transaction", format!("{head}[limits]\nmax_keys_per_transaction = 0\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\n"), "rules.toml:5: [limits] max_keys_per_transaction must be at least 1"),
        ("events without entity", format!("{head}[events]\nchannel = \"c\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\n"), "rules.toml:4: [events] is configured but no rule sets `entity`"),
        ("bad amqp url", format!("{head}[events.amqp]\nurl = \"http://broker\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\nentity = \"user\"\n"), "rules.toml:5: [events.amqp] url is not an AMQP URL"),
        ("bad exchange type", format!("{head}[events.amqp]\nurl = \"amqp://h\"\nexchange_type = \"queue\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\nentity = \"user\"\n"), "rules.toml:6: [events.amqp] exchange_type \"queue\" is not an exchange type"),
        ("bad routing key", format!("{head}[events.amqp]\nurl = \"amqp://h\"\nrouting_key = \"invalidate.{{id}}\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\nentity = \"user\"\n"), "rules.toml:6: [events.amqp] routing_key: \"invalidate.{id}\" names {id}, which is not an event field"),
        ("bad nats subject", format!("{head}[events.nats]\nurl = \"nats://h:4222\"\nsubject = \"invalidate-{{entity}}\"\nstream = \"S\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\nentity = \"user\"\n"), "rules.toml:6: [events.nats] subject \"invalidate-{entity}\" is not a NATS subject"),
        ("routing key too long", format!("{head}[events.amqp]\nurl = \"amqp://h\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\nentity = \"{}\"\n", "e".repeat(300)), "rules.toml:7: rule #1: its events' AMQP routing key would be 311 bytes"),
        ("events without destination", format!("{head}[events]\nstream_maxlen = 5\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\nentity = \"user\"\n"), "rules.toml:4: [events] names no destination"),
        ("no source url", "[source]\nslot = \"s\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{id}\"]\n".to_owned(), "rules.toml:1: no source database"),
        ("empty template", format!("{head}[[rules]]\ntable = \"users\"\nkeys = [\"\"]\n"), "rules.toml:6: rule #1"),
    ];
    for (what, text, expected) in cases {
        let path = dir.join("rules.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("PGINVAL_SOURCE_URL")
            .env_remove("PGINVAL_REDIS_URL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{what}: expected {expected:?} in\n{stderr}"
        );
        assert!(
            stderr.contains("fix:") || *what == "unclosed brace" || *what == "bad selector",
            "{what}: no fix in\n{stderr}"
        );
    }
}

/// Resident memory of process `pid` in bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap()
}

/// A 64 MB value under REPLICA IDENTITY FULL arrives as one message of old and new
/// row (about 128 MB): pginval needs that memory while it decodes it, and gives it
/// back once the change is applied instead of keeping its buffers at their peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_a_huge_row_is_released_once_applied() {
    let (db, redis) = setup("hugerow").await;
    db.execute_batch(
        "CREATE TABLE docs (id bigint PRIMARY KEY, body text);
         ALTER TABLE docs REPLICA IDENTITY FULL;
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO docs VALUES (1, 'small');",
    )
    .await;
    let rules = "[[rules]]\ntable = \"docs\"\nkeys = [\"doc:{id}\"]\n";
    let path = config_file(&db, &config_text(&db, &redis, rules));
    let mut child = spawn_run(&path, &path.with_extension("log"));
    wait_streaming(&db).await;
    let pid = child.id();
    let before = rss(pid);
    for round in 0..2 {
        cache(&redis, &["doc:1"]).await;
        db.execute_batch(&format!(
            "UPDATE docs SET body = repeat('{}', 64 * 1024 * 1024) WHERE id = 1",
            ["x", "y"][round]
        ))
        .await;
        wait_gone(&redis, &["doc:1"]).await;
    }
    let limit = before + 32 * 1024 * 1024;
    wait_until(
        "pginval's memory is back near where it started",
        WAIT,
        || async { rss(pid) < limit },
    )
    .await;
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// PostgreSQL 18 can invalidate a slot that was idle for `idle_replication_slot_timeout`:
/// `check` warns that a pginval outage that long loses the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_of_an_idle_slot_timeout() {
    if !crate::support::requires_pg(18, "idle_replication_slot_timeout") {
        return;
    }
    let pg = crate::support::PrivatePostgres::start();
    let admin = crate::support::connect(&pg.url("postgres")).await;
    for sql in [
        "ALTER SYSTEM SET idle_replication_slot_timeout = '1h'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE users (id bigint PRIMARY KEY)",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    // pg_reload_conf() only signals: wait until new sessions see the setting.
    wait_until("the server applied the setting", crate::WAIT, || async {
        let c = crate::support::connect(&pg.url("postgres")).await;
        let v: String = c
            .query_one(
                "SELECT current_setting('idle_replication_slot_timeout')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        v == "1h"
    })
    .await;
    let redis = Redis::start();
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"idle\"\n\n[redis]\nurl = \"{}\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{{id}}\"]\n",
        pg.url("postgres"),
        redis.url()
    );
    let path = std::env::temp_dir().join(format!("pginval-test-idle-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let (code, all) = crate::check_file(&path);
    assert_eq!(code, Some(0), "a warning, not a problem: {all}");
    assert!(
        all.contains("idle_replication_slot_timeout = 1h: PostgreSQL invalidates a slot"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_failed_the_replay_window_deletes_again_what_a_replica_may_lack() {
    let (db, mut redis) = setup("replay_single").await;
    let port = crate::support::free_port();
    let text = crate::suite::ops::with_metrics(&config_text(&db, &redis, RULES), port);
    let cfg = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, cfg).await;
    cache(&redis, &["user:1"]).await;
    db.execute_batch("UPDATE users SET name = 'x' WHERE id = 1")
        .await;
    wait_gone(&redis, &["user:1"]).await;
    // What a promoted replica that never got that delete looks like: the server comes
    // back holding the stale entry (locked, so pginval fails until it is unlocked).
    redis.restart_locked("failover-test");
    cache(&redis, &["user:1"]).await;
    db.execute_batch("UPDATE users SET name = 'x' WHERE id = 2")
        .await;
    wait_until("pginval failed to reach redis", WAIT, || async {
        let metrics = crate::suite::ops::get(port, "/metrics").await;
        metrics.is_some_and(|(_, m)| {
            crate::suite::ops::sample(&m, "pginval_redis_errors_total") >= 1.0
        })
    })
    .await;
    redis.unlock().await;
    // Once Redis answers again, the window (30 s by default) is applied again.
    wait_gone(&redis, &["user:1"]).await;
    let metrics = crate::suite::ops::get(port, "/metrics").await.unwrap().1;
    assert!(
        crate::suite::ops::sample(&metrics, "pginval_redis_failover_replays_total") >= 1.0,
        "{metrics}"
    );
    daemon.stop().await.unwrap();
}
