//! End-to-end tests: pginval against a real PostgreSQL (one server for the run, a
//! database and a slot per test) and a real Redis (one per test).

mod suite;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pginval::config::Config;
use pginval::pipeline::{self, RunError};
use redis::AsyncCommands;
use support::{Redis, TestDb, postgres, wait_until};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest wait for any expected effect.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
    CREATE TABLE users (id bigint PRIMARY KEY, name text, role text);
    CREATE TABLE posts (id bigint PRIMARY KEY, author_id bigint, category_id bigint, title text);
    ALTER TABLE posts REPLICA IDENTITY FULL;
    CREATE TABLE unrelated (id bigint PRIMARY KEY, v text);
    INSERT INTO users SELECT g, 'user ' || g, 'member' FROM generate_series(1, 300) g;
    INSERT INTO posts SELECT g, g % 10, g % 3, 'post ' || g FROM generate_series(1, 50) g;
";

const RULES: &str = r#"
[[rules]]
table = "users"
keys = ["user:{id}", "user_full:{id}"]
tags = ["user:{id}"]

[[rules]]
table = "posts"
keys = ["post:{id}", "user_posts:{author_id}"]
tags = ["category:{category_id}"]
"#;

/// The configuration text for a test: its database, its own slot, its Redis.
fn config_text(db: &TestDb, redis: &Redis, rules: &str) -> String {
    config_text_url(db, &redis.url(), rules)
}

/// Like [`config_text`], for a Redis given by URL.
fn config_text_url(db: &TestDb, redis_url: &str, rules: &str) -> String {
    format!(
        "[source]\nurl = \"{}\"\nslot = \"{}\"\nstatus_interval_secs = 1\n\n[redis]\nurl = \"{}\"\n{rules}",
        db.url, db.name, redis_url
    )
}

fn config(db: &TestDb, redis: &Redis, rules: &str) -> Config {
    Config::parse(
        Path::new("test.toml"),
        &config_text(db, redis, rules),
        |_| None,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// pginval running inside the test process.
struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl Daemon {
    /// Starts pginval and waits until its slot is streaming.
    async fn start(db: &TestDb, config: Config) -> Daemon {
        let daemon = Daemon::spawn(config);
        wait_streaming(db).await;
        daemon
    }

    /// Starts pginval without waiting for anything.
    fn spawn(config: Config) -> Daemon {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pginval=debug")
            .with_test_writer()
            .try_init();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pipeline::run(config, async {
            let _ = stopped.await;
        }));
        Daemon {
            stop: Some(stop),
            task,
        }
    }

    /// Whether `run` has returned.
    fn finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Asks pginval to stop and returns what `run` returned.
    async fn stop(mut self) -> Result<(), RunError> {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("pginval stops in time")
            .expect("the task did not panic")
    }
}

async fn wait_streaming(db: &TestDb) {
    let client = db.client().await;
    let slot = db.name.clone();
    wait_until("the slot is streaming", WAIT, || {
        let client = &client;
        let slot = slot.clone();
        async move {
            client
                // A slot being created is active too (its creator holds it while it
                // waits for a consistent snapshot): look for the walsender instead.
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots s
                       JOIN pg_stat_replication r ON r.pid = s.active_pid
                      WHERE s.slot_name = $1",
                    &[&slot],
                )
                .await
                .map(|r| r.is_some())
                .unwrap_or(false)
        }
    })
    .await;
}

async fn setup(hint: &str) -> (TestDb, Redis) {
    let db = postgres().create_database(hint).await;
    db.execute_batch(SCHEMA).await;
    (db, Redis::start())
}

/// Caches `keys` the way an application would.
async fn cache(redis: &Redis, keys: &[&str]) {
    let mut conn = redis.connection().await;
    for key in keys {
        let _: () = conn.set(*key, "cached").await.unwrap();
    }
}

async fn exists(redis: &Redis, key: &str) -> bool {
    let mut conn = redis.connection().await;
    conn.exists(key).await.unwrap()
}

async fn wait_gone(redis: &Redis, keys: &[&str]) {
    let conn = redis.connection().await;
    let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    let what = format!("{keys:?} are invalidated");
    wait_until(&what, WAIT, || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let n: usize = conn.exists(&keys).await.unwrap_or(usize::MAX);
            n == 0
        }
    })
    .await;
}

async fn assert_cached(redis: &Redis, keys: &[&str]) {
    for key in keys {
        assert!(exists(redis, key).await, "{key} should still be cached");
    }
}

/// Commits a change to users.id = 300 and waits for pginval to apply it: everything
/// committed before it has been applied too. Returns a WAL position inside the
/// transaction, before its commit record.
async fn barrier(db: &TestDb, redis: &Redis) -> u64 {
    cache(redis, &["user:300"]).await;
    let client = db.client().await;
    let row = client
        .query_one(
            "UPDATE users SET name = name || '.' WHERE id = 300
             RETURNING (pg_current_wal_insert_lsn() - '0/0')::bigint",
            &[],
        )
        .await
        .unwrap();
    wait_gone(redis, &["user:300"]).await;
    row.get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_invalidates_the_new_rows_keys() {
    let (db, redis) = setup("insert").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    cache(&redis, &["user:1000", "user_full:1000", "user:1"]).await;
    db.execute_batch("INSERT INTO users VALUES (1000, 'new', 'member')")
        .await;
    wait_gone(&redis, &["user:1000", "user_full:1000"]).await;
    assert_cached(&redis, &["user:1"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_invalidates_keys_and_flushes_tag_members() {
    let (db, redis) = setup("update").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    cache(
        &redis,
        &["user:1", "user_full:1", "page:home", "page:about", "user:2"],
    )
    .await;
    let mut conn = redis.connection().await;
    let _: () = conn
        .sadd("cache_tag:user:1", &["page:home", "page:about"])
        .await
        .unwrap();
    db.execute_batch("UPDATE users SET name = 'renamed' WHERE id = 1")
        .await;
    wait_gone(
        &redis,
        &[
            "user:1",
            "user_full:1",
            "page:home",
            "page:about",
            "cache_tag:user:1",
        ],
    )
    .await;
    assert_cached(&redis, &["user:2"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_invalidates_the_deleted_rows_keys() {
    let (db, redis) = setup("delete").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    cache(&redis, &["user:5", "user_full:5", "post:7", "user_posts:7"]).await;
    db.execute_batch("DELETE FROM users WHERE id = 5; DELETE FROM posts WHERE id = 7")
        .await;
    // posts has REPLICA IDENTITY FULL: the deleted row's author_id is known.
    wait_gone(&redis, &["user:5", "user_full:5", "post:7", "user_posts:7"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_moving_key_invalidates_old_and_new() {
    let (db, redis) = setup("moving").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    // post 3 belongs to author 3 and category 0.
    cache(
        &redis,
        &["post:3", "user_posts:3", "user_posts:7", "user_posts:4"],
    )
    .await;
    let mut conn = redis.connection().await;
    let _: () = conn
        .sadd("cache_tag:category:0", "list:cat0")
        .await
        .unwrap();
    let _: () = conn
        .sadd("cache_tag:category:2", "list:cat2")
        .await
        .unwrap();
    cache(&redis, &["list:cat0", "list:cat2"]).await;
    db.execute_batch("UPDATE posts SET author_id = 7, category_id = 2 WHERE id = 3")
        .await;
    wait_gone(
        &redis,
        &[
            "post:3",
            "user_posts:3",
            "user_posts:7",
            "list:cat0",
            "list:cat2",
        ],
    )
    .await;
    assert_cached(&redis, &["user_posts:4"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_key_change_invalidates_old_and_new_key_with_default_identity() {
    let (db, redis) = setup("pkchange").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    cache(&redis, &["user:10", "user:2000", "user_full:10"]).await;
    db.execute_batch("UPDATE users SET id = 2000 WHERE id = 10")
        .await;
    wait_gone(&redis, &["user:10", "user:2000", "user_full:10"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statement_transaction_invalidates_every_change() {
    let (db, redis) = setup("multi").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    let keys = [
        "user:20",
        "user:21",
        "user_full:22",
        "post:4",
        "user_posts:4",
    ];
    cache(&redis, &keys).await;
    db.execute_batch(
        "BEGIN;
         UPDATE users SET role = 'admin' WHERE id = 20;
         UPDATE users SET name = 'x' WHERE id IN (21, 22);
         DELETE FROM posts WHERE id = 4;
         INSERT INTO unrelated VALUES (1, 'no rule');
         COMMIT;",
    )
    .await;
    wait_gone(&redis, &keys).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transaction_invalidates_nothing() {
    let (db, redis) = setup("rollback").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    cache(&redis, &["user:30", "user_full:30", "post:5"]).await;
    db.execute_batch(
        "BEGIN;
         UPDATE users SET name = 'never' WHERE id = 30;
         DELETE FROM posts WHERE id = 5;
         ROLLBACK;",
    )
    .await;
    barrier(&db, &redis).await;
    assert_cached(&redis, &["user:30", "user_full:30", "post:5"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_waits_for_commit() {
    let (db, redis) = setup("commitwait").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    cache(&redis, &["user:40"]).await;
    let client = db.client().await;
    client
        .batch_execute("BEGIN; UPDATE users SET name = 'pending' WHERE id = 40")
        .await
        .unwrap();
    barrier(&db, &redis).await;
    assert_cached(&redis, &["user:40"]).await;
    client.batch_execute("COMMIT").await.unwrap();
    wait_gone(&redis, &["user:40"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_over_invalidates_by_pattern() {
    let (db, redis) = setup("truncate").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    cache(
        &redis,
        &["post:1", "post:2", "user_posts:1", "user:1", "list:x"],
    )
    .await;
    let mut conn = redis.connection().await;
    let _: () = conn.sadd("cache_tag:category:1", "list:x").await.unwrap();
    db.execute_batch("TRUNCATE posts").await;
    wait_gone(
        &redis,
        &[
            "post:1",
            "post:2",
            "user_posts:1",
            "list:x",
            "cache_tag:category:1",
        ],
    )
    .await;
    assert_cached(&redis, &["user:1"]).await;
    daemon.stop().await.unwrap();
}

/// Waits until pginval (status_interval_secs = 1) has reported its position on slot
/// `slot` twice more to the server of `primary`: had it counted a batch, its position
/// would be past that batch's commit by then.
pub(crate) async fn reported_twice_more(primary: &tokio_postgres::Client, slot: &str) {
    let since: String = primary
        .query_one("SELECT now()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_until("pginval reported its position twice more", WAIT, || async {
        primary
            .query_opt(
                "SELECT 1 FROM pg_stat_replication r
                   JOIN pg_replication_slots s ON s.active_pid = r.pid
                  WHERE s.slot_name = $1 AND r.reply_time > $2::text::timestamptz + interval '2 s'",
                &[&slot, &since],
            )
            .await
            .is_ok_and(|r| r.is_some())
    })
    .await;
}

/// The slot's confirmed flush position.
async fn confirmed_lsn(db: &TestDb) -> u64 {
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

async fn current_lsn(db: &TestDb) -> u64 {
    let client = db.client().await;
    let row = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_holds_the_flush_position_and_catches_up() {
    let (db, mut redis) = setup("outage").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    barrier(&db, &redis).await;
    let keys = ["user:50", "user_full:50", "user:51", "post:6"];
    cache(&redis, &keys).await;
    // Persist the cache so the restarted Redis comes back with the stale keys.
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    drop(conn);
    redis.stop();

    // Where the first write's commit ends, read through a test_decoding slot of this
    // database (its COMMIT rows carry the commit's end): an idle slot may follow WAL
    // other databases write, but never that far while Redis has not acknowledged.
    let client = db.client().await;
    let aux = format!("{}_aux", db.name);
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&aux],
        )
        .await
        .unwrap();
    db.execute_batch("UPDATE users SET name = 'during outage' WHERE id IN (50, 51)")
        .await;
    db.execute_batch("DELETE FROM posts WHERE id = 6").await;
    let written = current_lsn(&db).await;
    // (The test server commits asynchronously: decoding sees a commit once the WAL
    // writer flushed it.)
    let peek_first_commit = || async {
        client
            .query_one(
                "SELECT min((lsn - '0/0')::bigint) FROM pg_logical_slot_peek_changes($1, NULL, NULL)
                  WHERE data LIKE 'COMMIT%'",
                &[&aux],
            )
            .await
            .unwrap()
            .get::<_, Option<i64>>(0)
    };
    wait_until("the writes are decodable", WAIT, || async {
        peek_first_commit().await.is_some()
    })
    .await;
    let first_commit_end = peek_first_commit().await.unwrap();
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&aux])
        .await
        .unwrap();
    let first_commit_end = first_commit_end as u64;
    // Redis stays down for 10 s, ten status intervals: the flush position must stay
    // before the writes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let confirmed = confirmed_lsn(&db).await;
    assert!(
        confirmed < first_commit_end,
        "confirmed {confirmed:X} moved past the first write's commit (ends at {first_commit_end:X}) while redis was down (writes end at {written:X})"
    );

    // Locked at first, so that pginval cannot delete the restored keys before they are
    // seen back.
    redis.restart_locked("outage-test");
    assert_cached(&redis, &keys).await;
    redis.unlock().await;
    wait_gone(&redis, &keys).await;
    // Once Redis acknowledged, the flush position moves past the writes.
    wait_until("the flush position passes the writes", WAIT, || async {
        confirmed_lsn(&db).await >= written
    })
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_confirms_the_servers_position() {
    let (db, redis) = setup("idle").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    // Changes to a table without rules are not published; the slot must still advance.
    db.execute_batch("INSERT INTO unrelated SELECT g, 'x' FROM generate_series(1, 1000) g")
        .await;
    let written = current_lsn(&db).await;
    wait_until(
        "the idle slot confirms past the unrelated writes",
        WAIT,
        || async { confirmed_lsn(&db).await >= written },
    )
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_confirms_applied_commits() {
    let (db, redis) = setup("graceful").await;
    let daemon = Daemon::start(&db, config(&db, &redis, RULES)).await;
    let inside = barrier(&db, &redis).await;
    daemon.stop().await.unwrap();
    let confirmed = confirmed_lsn(&db).await;
    assert!(
        confirmed > inside,
        "confirmed {confirmed:X} should pass the applied commit (after {inside:X})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_password_auth_method_streams() {
    let (db, redis) = setup("auth").await;
    db.execute_batch(&format!(
        "CREATE PUBLICATION pginval FOR TABLE users, posts;
         GRANT SELECT ON users, posts TO {md5}, {scram}, {plain};",
        md5 = support::MD5_ROLE,
        scram = support::SCRAM_ROLE,
        plain = support::PLAIN_ROLE
    ))
    .await;
    for (i, role) in [support::MD5_ROLE, support::SCRAM_ROLE, support::PLAIN_ROLE]
        .into_iter()
        .enumerate()
    {
        let url = db.url_as(role, support::AUTH_PASSWORD);
        let text = config_text(&db, &redis, RULES).replace(&db.url, &url);
        let config = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
        let daemon = Daemon::start(&db, config).await;
        let key = format!("user:{}", 60 + i);
        cache(&redis, &[&key]).await;
        db.execute_batch(&format!(
            "UPDATE users SET name = '{role}' WHERE id = {}",
            60 + i
        ))
        .await;
        wait_gone(&redis, &[&key]).await;
        daemon.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_final_error() {
    let (db, redis) = setup("badpw").await;
    let url = db.url_as(support::SCRAM_ROLE, "wrong");
    let text = config_text(&db, &redis, RULES).replace(&db.url, &url);
    let config = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
    let result = tokio::time::timeout(WAIT, pipeline::run(config, std::future::pending()))
        .await
        .expect("a wrong password fails fast");
    let err = result.unwrap_err().to_string();
    assert!(!err.contains("wrong"), "the password leaked into: {err}");
    // pginval's own replication client, apart from the control connection that `run`
    // opens first: every password method refuses, final, without the password.
    for role in [support::MD5_ROLE, support::SCRAM_ROLE, support::PLAIN_ROLE] {
        let url = db.url_as(role, "wrong-secret");
        let text = config_text(&db, &redis, RULES).replace(&db.url, &url);
        let config = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
        let err = tokio::time::timeout(
            WAIT,
            pginval::replication::conn::ReplicationConnection::connect(&config.source, "pginval"),
        )
        .await
        .expect("fails fast")
        .expect_err("a wrong password is refused");
        assert!(!err.is_retryable(), "{role}: {err}");
        let text = err.to_string();
        assert!(text.contains("28P01"), "{role}: {text}");
        assert!(
            !text.contains("wrong-secret"),
            "{role}: the password leaked into {text}"
        );
    }
}

// ---- the binary: check, run, kill, restart --------------------------------------

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pginval")
}

/// Writes a test's configuration into a file of its own.
fn config_file(db: &TestDb, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("pginval-test-{}.toml", db.name));
    std::fs::write(&path, text).unwrap();
    path
}

fn pginval(args: &[&str], config: &Path) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("PGINVAL_SOURCE_URL")
        .env_remove("PGINVAL_REDIS_URL")
        .output()
        .unwrap()
}

/// `pginval check` of the configuration at `path`: its exit code and all it printed.
fn check_file(path: &Path) -> (Option<i32>, String) {
    let out = pginval(&["check"], path);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), all)
}

fn spawn_run(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(bin())
        .args(["run", "--config"])
        .arg(config)
        .env_remove("PGINVAL_SOURCE_URL")
        .env_remove("PGINVAL_REDIS_URL")
        .env("RUST_LOG", "pginval=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_replica_identity_fix() {
    let (db, redis) = setup("checkri").await;
    db.execute_batch("ALTER TABLE posts REPLICA IDENTITY DEFAULT")
        .await;
    let path = config_file(&db, &config_text(&db, &redis, RULES));
    let out = pginval(&["check"], &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("ALTER TABLE \"public\".\"posts\" REPLICA IDENTITY FULL;"),
        "{stdout}"
    );
    // The rule for posts starts on line 14 of the generated file.
    assert!(
        stdout.contains(&format!("{}:14: rule #2", path.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("`author_id`") && stdout.contains("`category_id`"),
        "{stdout}"
    );

    // run refuses to start for the same reason, with exit code 2.
    let out = pginval(&["run"], &path);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("REPLICA IDENTITY FULL"));

    db.execute_batch("ALTER TABLE posts REPLICA IDENTITY FULL")
        .await;
    let out = pginval(&["check"], &path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_primary_key_is_never_published() {
    let (db, redis) = setup("nopk").await;
    db.execute_batch("CREATE TABLE logs (id bigint, msg text); INSERT INTO logs VALUES (1, 'a')")
        .await;
    let rules = format!("{RULES}\n[[rules]]\ntable = \"logs\"\nkeys = [\"log:{{id}}\"]\n");
    let path = config_file(&db, &config_text(&db, &redis, &rules));
    let out = pginval(&["check"], &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("no primary key"), "{stdout}");
    assert!(stdout.contains("ADD PRIMARY KEY"), "{stdout}");

    let out = pginval(&["run"], &path);
    assert_eq!(out.status.code(), Some(2));
    let client = db.client().await;
    let published = client
        .query(
            "SELECT 1 FROM pg_publication_tables WHERE tablename = 'logs'",
            &[],
        )
        .await
        .unwrap();
    assert!(published.is_empty(), "logs must not be published");
    // The application's own writes keep working.
    client
        .batch_execute("UPDATE logs SET msg = 'b'; DELETE FROM logs")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_unknown_tables_and_columns() {
    let (db, redis) = setup("checkcols").await;
    let rules = "[[rules]]\ntable = \"userz\"\nkeys = [\"u:{id}\"]\n\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{nmae}\"]\n";
    let path = config_file(&db, &config_text(&db, &redis, rules));
    let out = pginval(&["check"], &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("public.userz does not exist"), "{stdout}");
    assert!(stdout.contains("column `nmae` does not exist"), "{stdout}");
    assert!(stdout.contains("use one of: id, name, role"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_config_exits_2_listing_every_problem() {
    let dir = std::env::temp_dir().join(format!("pginval-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rules.toml");
    std::fs::write(
        &path,
        "[source]\nurl = \"postgres://u@h/db\"\nslot = \"Bad Slot\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{id\"]\n\n[[rules]]\ntabel = \"x\"\n",
    )
    .unwrap();
    let out = pginval(&["check"], &path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("has 3 problems"), "{stderr}");
    assert!(stderr.contains("rules.toml:3:"), "{stderr}");
    assert!(stderr.contains("rules.toml:7:"), "{stderr}");
    assert!(stderr.contains("rules.toml:10:"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_rules_pass_check_against_the_example_schema() {
    let db = postgres().create_database("example").await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    db.execute_batch(&std::fs::read_to_string(root.join("sql/example-schema.sql")).unwrap())
        .await;
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(root.join("rules.toml"))
        .env("PGINVAL_SOURCE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let (db, redis) = setup("sigkill").await;
    let path = config_file(&db, &config_text(&db, &redis, RULES));
    let log = path.with_extension("log");
    let keys: Vec<String> = (1..=200)
        .flat_map(|i| [format!("user:{i}"), format!("user_full:{i}")])
        .collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    cache(&redis, &key_refs).await;

    let mut child = spawn_run(&path, &log);
    wait_streaming(&db).await;
    // Writes in flight while pginval is killed: one transaction per row, paced so
    // the stream is still going when the kill lands.
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            let client = db.client().await;
            for i in 1..=100 {
                client
                    .execute(
                        "UPDATE users SET name = name || '!' WHERE id = $1",
                        &[&(i as i64)],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Kill once pginval has applied part of the writes, not before and not after.
    let first: Vec<&str> = key_refs[..200].to_vec();
    let remaining = || async {
        let mut conn = redis.connection().await;
        let n: usize = conn.exists(&first).await.unwrap();
        n
    };
    wait_until("pginval applied some of the writes", WAIT, || async {
        remaining().await < first.len()
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !writer.is_finished() && remaining().await > 0,
        "the kill did not land mid-stream"
    );
    writer.await.unwrap();
    // More changes while pginval is down.
    db.execute_batch("UPDATE users SET role = 'down' WHERE id BETWEEN 101 AND 200")
        .await;

    let mut child = spawn_run(&path, &log.with_extension("2.log"));
    wait_gone(&redis, &key_refs).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM ends pginval with exit 0: {status}"
    );
}
