//! Setups that `check` approves must never lose an invalidation silently: partitions
//! with identities of their own, identities changed while running, templates whose
//! value was not sent, renamed tables — end to end against PostgreSQL and Redis.

use redis::AsyncCommands;

use crate::{Daemon, barrier, bin, cache, config, config_file, config_text, setup, wait_gone};

const PARTITIONED: &str = "
    CREATE TABLE pposts (id bigint, author_id bigint, title text, PRIMARY KEY (id))
        PARTITION BY RANGE (id);
    CREATE TABLE pposts_1 PARTITION OF pposts FOR VALUES FROM (0) TO (1000);
    ALTER TABLE pposts REPLICA IDENTITY FULL;
    INSERT INTO pposts SELECT g, g % 10, 'p' || g FROM generate_series(1, 50) g;
";

const PARTITIONED_RULES: &str = r#"
[[rules]]
table = "users"
keys = ["user:{id}"]

[[rules]]
table = "pposts"
keys = ["ppost:{id}", "user_pposts:{author_id}"]
"#;

/// `sql/partitions.sql`, as a user runs it.
fn partitions_sql() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/partitions.sql"),
    )
    .unwrap()
}

fn check(db: &crate::support::TestDb, redis: &crate::support::Redis, rules: &str) -> (i32, String) {
    let path = config_file(db, &config_text(db, redis, rules));
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The root says FULL, the partition logged only its key: `check` names the partition,
/// and once running, a partition created later without FULL gets its author moves and
/// deletes applied as wildcards instead of rendering NULL or the new value only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_without_full_identity_is_refused_then_covered_by_wildcards() {
    let (db, redis) = setup("partident").await;
    db.execute_batch(PARTITIONED).await;
    let (code, stdout) = check(&db, &redis, PARTITIONED_RULES);
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stdout.contains(r#"ALTER TABLE "public"."pposts_1" REPLICA IDENTITY FULL;"#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"REPLICA IDENTITY DEFAULT (in "public"."pposts_1")"#),
        "{stdout}"
    );

    db.execute_batch("ALTER TABLE pposts_1 REPLICA IDENTITY FULL")
        .await;
    let (code, stdout) = check(&db, &redis, PARTITIONED_RULES);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("partitioned")
            && stdout.contains("TRUNCATE, DETACH, ATTACH or DROP")
            && stdout.contains("sql/partitions.sql"),
        "check says what partitions leave uncovered: {stdout}"
    );

    let daemon = Daemon::start(&db, config(&db, &redis, PARTITIONED_RULES)).await;
    // A FULL partition: exact old and new keys.
    cache(&redis, &["user_pposts:1", "user_pposts:8", "user_pposts:5"]).await;
    db.execute_batch("UPDATE pposts SET author_id = 8 WHERE id = 1")
        .await;
    wait_gone(&redis, &["user_pposts:1", "user_pposts:8"]).await;
    barrier(&db, &redis).await;
    assert!(
        crate::exists(&redis, "user_pposts:5").await,
        "a FULL partition is invalidated exactly"
    );

    // A partition created while running keeps DEFAULT: key-only old rows.
    db.execute_batch(
        "CREATE TABLE pposts_2 PARTITION OF pposts FOR VALUES FROM (1000) TO (2000);
         INSERT INTO pposts VALUES (1003, 3, 'x'), (1004, 4, 'y');",
    )
    .await;
    barrier(&db, &redis).await;
    cache(&redis, &["user_pposts:3", "user_pposts:4", "ppost:1003"]).await;
    db.execute_batch("UPDATE pposts SET author_id = 7 WHERE id = 1003")
        .await;
    wait_gone(&redis, &["user_pposts:3", "ppost:1003"]).await;
    cache(&redis, &["user_pposts:3"]).await;
    db.execute_batch("DELETE FROM pposts WHERE id = 1004").await;
    wait_gone(&redis, &["user_pposts:4", "user_pposts:3"]).await;
    daemon.stop().await.unwrap();
}

/// sql/partitions.sql gives partitions created or attached later the root's FULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_event_trigger_gives_new_partitions_full_identity() {
    let (db, _redis) = setup("parttrigger").await;
    db.execute_batch(PARTITIONED).await;
    db.execute_batch(&partitions_sql()).await;
    db.execute_batch(
        "CREATE TABLE pposts_2 PARTITION OF pposts FOR VALUES FROM (1000) TO (2000);
         CREATE TABLE pposts_3 (LIKE pposts);
         ALTER TABLE pposts ATTACH PARTITION pposts_3 FOR VALUES FROM (2000) TO (3000);",
    )
    .await;
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT relname::text, relreplident::text FROM pg_class
              WHERE relname IN ('pposts_2', 'pposts_3') ORDER BY relname",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            ("pposts_2".to_string(), "f".to_string()),
            ("pposts_3".to_string(), "f".to_string())
        ]
    );
}

/// With `sql/partitions.sql`, a partition's TRUNCATE, DETACH and DROP — which
/// PostgreSQL does not send when publishing via the root — reach pginval as messages,
/// and the root's rules apply their fallbacks; `check` says so. Other tables' keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_truncate_detach_and_drop_reach_pginval_through_sql_partitions() {
    let (db, redis) = setup("partchanges").await;
    db.execute_batch(PARTITIONED).await;
    db.execute_batch("ALTER TABLE pposts_1 REPLICA IDENTITY FULL")
        .await;
    db.execute_batch(&partitions_sql()).await;
    db.execute_batch(
        "CREATE TABLE pposts_2 PARTITION OF pposts FOR VALUES FROM (1000) TO (2000);
         CREATE TABLE pposts_3 PARTITION OF pposts FOR VALUES FROM (2000) TO (3000);
         INSERT INTO pposts VALUES (1500, 3, 'two'), (2500, 4, 'three');",
    )
    .await;
    let (code, stdout) = check(&db, &redis, PARTITIONED_RULES);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("sql/partitions.sql is installed")
            && !stdout.contains("is partitioned: each partition"),
        "{stdout}"
    );
    // A look-alike of pg_partition_root taking `oid` would match the triggers' calls
    // better than PostgreSQL's (which takes regclass) if they resolved it through
    // `public`: they run as superuser, so they must not.
    db.execute_batch(
        "CREATE FUNCTION public.pg_partition_root(oid) RETURNS regclass LANGUAGE plpgsql
           AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$;",
    )
    .await;
    // The application's role, where pg_logical_emit_message is revoked from PUBLIC
    // (sql/setup.sql, section 6): the triggers still tell pginval.
    let app = format!("{}_app", db.name);
    db.execute_batch(&format!(
        "DO $$ DECLARE f regprocedure; BEGIN
           FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname = 'pg_logical_emit_message'
           LOOP EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f); END LOOP;
         END $$;
         CREATE ROLE {app};
         GRANT TRUNCATE ON pposts_1 TO {app};"
    ))
    .await;
    let daemon = Daemon::start(&db, config(&db, &redis, PARTITIONED_RULES)).await;
    let truncate_as_app = format!("SET ROLE {app}; TRUNCATE pposts_1; RESET ROLE;");
    for (what, sql) in [
        ("TRUNCATE of a partition", truncate_as_app.as_str()),
        (
            "DETACH PARTITION",
            "ALTER TABLE pposts DETACH PARTITION pposts_2",
        ),
        ("DROP of a partition", "DROP TABLE pposts_3"),
    ] {
        cache(
            &redis,
            &["ppost:1", "user_pposts:1", "ppost:2500", "user:5"],
        )
        .await;
        db.execute_batch(sql).await;
        wait_gone(&redis, &["ppost:1", "user_pposts:1", "ppost:2500"]).await;
        crate::assert_cached(&redis, &["user:5"]).await;
        assert!(!daemon.finished(), "{what}");
    }
    daemon.stop().await.unwrap();
}

/// FULL → DEFAULT while streaming: the Relation message carries the new identity, and
/// `{author_id}` can no longer get its old value. It is applied as its wildcard — even
/// though the rule declares a fallback naming something else — and the declared
/// fallback is applied too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_weakened_while_running_applies_old_value_templates_as_wildcards() {
    let (db, redis) = setup("identchange").await;
    let rules = r#"
[[rules]]
table = "users"
keys = ["user:{id}"]

[[rules]]
table = "posts"
keys = ["post:{id}", "user_posts:{author_id}"]
fallback = { tags = ["all_posts"] }
"#;
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    db.execute_batch("ALTER TABLE posts REPLICA IDENTITY DEFAULT")
        .await;
    cache(&redis, &["user_posts:3", "user_posts:4", "page:posts"]).await;
    let mut conn = redis.connection().await;
    let _: () = conn
        .sadd("cache_tag:all_posts", "page:posts")
        .await
        .unwrap();
    // Post 3 belongs to author 3; it moves to author 7 and no old row is sent.
    db.execute_batch("UPDATE posts SET author_id = 7 WHERE id = 3")
        .await;
    wait_gone(&redis, &["user_posts:3", "page:posts"]).await;
    // Post 4 (author 4) is deleted: only its key is sent.
    cache(&redis, &["user_posts:3"]).await;
    db.execute_batch("DELETE FROM posts WHERE id = 4").await;
    wait_gone(&redis, &["user_posts:4", "user_posts:3"]).await;
    daemon.stop().await.unwrap();
}

/// Any role may call `pg_logical_emit_message`: a role with no privilege on any table
/// must not delete `session:secret`. Hints apply only when enabled, within the listed
/// prefixes and the entry cap; a refused hint is logged and counted, never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_are_refused_unless_enabled_and_within_prefixes_and_cap() {
    let (db, redis) = setup("hintdoor").await;
    let role = format!("nobody_{}", db.name);
    db.execute_batch(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await;
    let intruder = crate::support::connect(&db.url_as(&role, "pw")).await;
    let emit = |json: &'static str| {
        let intruder = &intruder;
        async move {
            intruder
                .execute(
                    "SELECT pg_logical_emit_message(true, 'pginval', $1::text)",
                    &[&json],
                )
                .await
                .unwrap();
        }
    };

    let daemon = Daemon::start(&db, config(&db, &redis, crate::RULES)).await;
    cache(
        &redis,
        &["session:secret", "report:1", "report:2", "report:3"],
    )
    .await;
    emit(r#"{"keys":["session:secret","report:1"]}"#).await;
    barrier(&db, &redis).await;
    for key in ["session:secret", "report:1"] {
        assert!(
            crate::exists(&redis, key).await,
            "{key}: hints are off by default"
        );
    }
    daemon.stop().await.unwrap();

    let rules = format!(
        "[hints]\nenabled = true\nkey_prefixes = [\"report:\"]\nmax_entries = 2\n{}",
        crate::RULES
    );
    let daemon = Daemon::start(&db, config(&db, &redis, &rules)).await;
    emit(r#"{"keys":["session:secret","report:1"]}"#).await;
    emit(r#"{"keys":["report:1","report:2","report:3"]}"#).await;
    emit(r#"{"keys":["report:2"]}"#).await;
    wait_gone(&redis, &["report:2"]).await;
    barrier(&db, &redis).await;
    for key in ["session:secret", "report:1", "report:3"] {
        assert!(
            crate::exists(&redis, key).await,
            "{key}: its hint was refused whole"
        );
    }
    daemon.stop().await.unwrap();
}

/// `FLUSHDB` on the cache database (Django's `cache.clear()`, Laravel's and Symfony's
/// flush) must not erase pginval's record of its slot: a slot dropped while pginval
/// was down is still told from a first start, and the gap is over-invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_flush_keeps_pginvals_state_so_a_lost_slot_is_still_flushed() {
    let (db, redis) = setup("flushstate").await;
    let daemon = Daemon::start(&db, config(&db, &redis, crate::RULES)).await;
    daemon.stop().await.unwrap();
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
    db.client()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.name])
        .await
        .unwrap();
    db.execute_batch("UPDATE users SET name = 'gap' WHERE id = 7")
        .await;
    cache(&redis, &["user:7", "post:9"]).await;
    let daemon = Daemon::start(&db, config(&db, &redis, crate::RULES)).await;
    wait_gone(&redis, &["user:7", "post:9"]).await;
    daemon.stop().await.unwrap();
}

/// The state database must differ from the cache's, and `check` refuses a Redis that
/// may evict it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_state_database_that_can_be_flushed_or_evicted() {
    let (db, redis) = setup("statecheck").await;
    let same = format!("[state]\nredis_db = 0\n{}", crate::RULES);
    let (code, stdout) = check(&db, &redis, &same);
    let path = config_file(&db, &config_text(&db, &redis, &same));
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stderr.contains("[state] redis_db 0 is the cache's own database"),
        "{stderr}"
    );

    let mut conn = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (code, stdout) = check(&db, &redis, crate::RULES);
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("maxmemory-policy allkeys-lru"), "{stdout}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (code, stdout) = check(&db, &redis, crate::RULES);
    assert_eq!(code, 0, "{stdout}");
}

/// The online-schema-change swap (`posts` → `posts_old`, `posts_new` → `posts`): the
/// publication holds the old table, so the new `posts` would send nothing. pginval
/// notices that the rule's name left the publication, applies the rules' fallbacks,
/// brings its managed publication to the table now bearing the name, and streams it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_table_is_followed_by_name_after_the_fallbacks() {
    let (db, redis) = setup("swap").await;
    let daemon = Daemon::start(&db, config(&db, &redis, crate::RULES)).await;
    db.execute_batch(
        "CREATE TABLE posts_new (LIKE posts INCLUDING ALL);
         ALTER TABLE posts_new REPLICA IDENTITY FULL;
         INSERT INTO posts_new SELECT * FROM posts;",
    )
    .await;
    barrier(&db, &redis).await;
    cache(&redis, &["post:3", "post:40", "user_posts:9"]).await;
    db.execute_batch(
        "BEGIN;
         ALTER TABLE posts RENAME TO posts_old;
         ALTER TABLE posts_new RENAME TO posts;
         COMMIT;
         UPDATE posts SET title = 'after the swap' WHERE id = 3;",
    )
    .await;
    // Not streamed (the new table was not in the publication): the fallbacks cover it.
    wait_gone(&redis, &["post:3", "post:40", "user_posts:9"]).await;
    // And from then on the table bearing the name is streamed exactly.
    let client = db.client().await;
    crate::support::wait_until("the publication follows the name", crate::WAIT, || {
        let client = &client;
        async move {
            client
                .query_opt(
                    "SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                      WHERE p.pubname = 'pginval' AND r.prrelid = 'public.posts'::regclass",
                    &[],
                )
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;
    barrier(&db, &redis).await;
    cache(&redis, &["post:5", "post:6"]).await;
    db.execute_batch("UPDATE posts SET title = 'streamed' WHERE id = 5")
        .await;
    wait_gone(&redis, &["post:5"]).await;
    barrier(&db, &redis).await;
    assert!(
        crate::exists(&redis, "post:6").await,
        "exact again, no fallback"
    );
    daemon.stop().await.unwrap();
}

/// A replication connection that stops delivering without closing (here a proxy
/// that stops forwarding) is given up after `receive_timeout_secs` of silence,
/// counted, and reopened: the change committed meanwhile still invalidates its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connection_that_goes_silent_is_reopened() {
    let (db, redis) = setup("silentconn").await;
    let pg_port = crate::support::postgres().port();
    let proxy = crate::support::StallingProxy::start(pg_port).await;
    let port = crate::support::free_port();
    let text = crate::suite::ops::with_metrics(&config_text(&db, &redis, crate::RULES), port)
        .replace(
            &format!("127.0.0.1:{pg_port}/"),
            &format!("127.0.0.1:{}/", proxy.port()),
        )
        .replace(
            "status_interval_secs = 1",
            "status_interval_secs = 1\nreceive_timeout_secs = 2",
        );
    let cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, cfg).await;
    assert!(
        proxy.accepted() > 0,
        "pginval does not go through the proxy"
    );
    // Streaming for sure (not still starting) before the connection goes silent.
    barrier(&db, &redis).await;
    cache(&redis, &["user:1", "user:2"]).await;
    proxy.stall_open_connections();
    db.execute_batch("UPDATE users SET name = 'during the stall' WHERE id = 1")
        .await;
    wait_gone(&redis, &["user:1"]).await;
    let metrics = crate::suite::ops::get(port, "/metrics").await.unwrap().1;
    assert!(
        crate::suite::ops::sample(&metrics, "pginval_receive_timeouts_total") >= 1.0,
        "{metrics}"
    );
    // And the new connection carries on.
    db.execute_batch("UPDATE users SET name = 'after' WHERE id = 2")
        .await;
    wait_gone(&redis, &["user:2"]).await;
    assert!(!daemon.finished());
    daemon.stop().await.unwrap();
}

/// START_REPLICATION that never gets its answer (a connection that dies at that very
/// moment) is given up after its bound; its walsender, which already holds the slot, is
/// ended, so the next start gets the slot at once instead of after the server's
/// wal_sender_timeout (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_replication_without_an_answer_frees_the_slot_for_the_retry() {
    let (db, redis) = setup("silentstart").await;
    let pg_port = crate::support::postgres().port();
    let proxy = crate::support::FaultProxy::start(pg_port).await;
    proxy.hold_replies_once(b"START_REPLICATION");
    let text = config_text(&db, &redis, crate::RULES)
        .replace(
            &format!("127.0.0.1:{pg_port}/"),
            &format!("127.0.0.1:{}/", proxy.port()),
        )
        .replace(
            "status_interval_secs = 1",
            "status_interval_secs = 1\nreceive_timeout_secs = 2",
        );
    let cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::spawn(cfg);
    crate::support::wait_until("START_REPLICATION is held", crate::WAIT, || async {
        proxy.held() == 1
    })
    .await;
    cache(&redis, &["user:1"]).await;
    db.execute_batch("UPDATE users SET name = 'after a lost start' WHERE id = 1")
        .await;
    // 10 s for the start to count as failed, then a new session on the freed slot.
    wait_gone(&redis, &["user:1"]).await;
    assert!(!daemon.finished());
    daemon.stop().await.unwrap();
}

/// The heartbeat's control connection dies with a PostgreSQL restart; the next
/// heartbeat opens a new one (seen as pginval's messages in the WAL written after the
/// restart, through a test_decoding slot created then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_reconnects_after_a_postgres_restart() {
    let pg = crate::support::PrivatePostgres::start();
    let db = pg.create_database("hbrestart").await;
    db.execute_batch(crate::SCHEMA).await;
    let redis = crate::support::Redis::start();
    let text = config_text(&db, &redis, crate::RULES).replace(
        "status_interval_secs = 1",
        "status_interval_secs = 1\nheartbeat_secs = 1",
    );
    let cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, cfg).await;
    pg.restart("fast");
    let client = db.client().await;
    client
        .execute(
            "SELECT pg_create_logical_replication_slot('heartbeat_probe', 'test_decoding')",
            &[],
        )
        .await
        .unwrap();
    crate::support::wait_until(
        "a heartbeat is written after the restart",
        crate::WAIT,
        || async {
            client
                .query(
                    "SELECT data FROM pg_logical_slot_get_changes('heartbeat_probe', NULL, NULL)",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .any(|r| r.get::<_, String>(0).contains("prefix: pginval-heartbeat"))
        },
    )
    .await;
    client
        .execute("SELECT pg_drop_replication_slot('heartbeat_probe')", &[])
        .await
        .unwrap();
    assert!(!daemon.finished());
    daemon.stop().await.unwrap();
}

/// A generated column's value reaches pginval only where PostgreSQL publishes it:
/// stored ones from PostgreSQL 18 with `publish_generated_columns = stored` (run sets it
/// on its managed publication), virtual ones never. `check` says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_are_refused_where_unpublishable_and_published_on_18() {
    let (db, redis) = setup("gencols").await;
    db.execute_batch(
        "CREATE TABLE items (id bigint PRIMARY KEY, price int,
                             band int GENERATED ALWAYS AS (price / 100) STORED);
         ALTER TABLE items REPLICA IDENTITY FULL",
    )
    .await;
    // (users: for the barrier.)
    let rules = "[[rules]]\ntable = \"items\"\nkeys = [\"item:{id}\", \"band:{band}\"]\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\n";
    let path = config_file(&db, &config_text(&db, &redis, rules));
    let (code, text) = crate::check_file(&path);
    if crate::support::postgres().major_version() < 18 {
        assert_eq!(code, Some(2), "{text}");
        assert!(
            text.contains("column `band` is a generated column: PostgreSQL before 18 does not publish generated columns"),
            "{text}"
        );
        return;
    }
    assert_eq!(code, Some(0), "{text}");
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    cache(&redis, &["band:7", "band:8", "item:1"]).await;
    db.execute_batch("INSERT INTO items (id, price) VALUES (1, 750)")
        .await;
    // Exact: the band pginval received is the one PostgreSQL computed, not `band:*`.
    wait_gone(&redis, &["band:7", "item:1"]).await;
    barrier(&db, &redis).await;
    assert!(crate::exists(&redis, "band:8").await, "exact, no wildcard");
    daemon.stop().await.unwrap();

    // A virtual generated column (18's default kind) is never published.
    db.execute_batch(
        "ALTER TABLE items ADD COLUMN half int GENERATED ALWAYS AS (price / 2) VIRTUAL",
    )
    .await;
    let rules = "[[rules]]\ntable = \"items\"\nkeys = [\"half:{half}\"]\n";
    let path = config_file(&db, &config_text(&db, &redis, rules));
    let (code, text) = crate::check_file(&path);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("column `half` is a virtual generated column"),
        "{text}"
    );
}

/// PostgreSQL leaves generated columns out of what it publishes of a whole table: the
/// managed publication must not look changed at every start because of them (each
/// "change" costs the table's rules their fallbacks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_do_not_make_the_publication_look_changed() {
    let (db, redis) = setup("gendrift").await;
    let virtual_column = if crate::support::postgres().major_version() >= 18 {
        ", half int GENERATED ALWAYS AS (price / 2) VIRTUAL"
    } else {
        ""
    };
    db.execute_batch(&format!(
        "CREATE TABLE goods (id bigint PRIMARY KEY, price int,
                             band int GENERATED ALWAYS AS (price / 100) STORED{virtual_column})"
    ))
    .await;
    let rules = "[[rules]]\ntable = \"goods\"\nkeys = [\"good:{id}\"]\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    daemon.stop().await.unwrap();
    cache(&redis, &["good:5"]).await;
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    barrier(&db, &redis).await;
    assert!(
        crate::exists(&redis, "good:5").await,
        "the second start applied goods' fallback (good:*): the publication looked changed"
    );
    daemon.stop().await.unwrap();
}
