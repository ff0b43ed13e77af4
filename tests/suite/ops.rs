//! Operating pginval: /metrics, /healthz, /readyz, `status --json`, `setup`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{free_port, wait_until};
use crate::{Daemon, RULES, WAIT, bin, cache, config_file, config_text, setup, wait_gone};

/// GETs `path` from 127.0.0.1:`port`; returns (status code, body).
pub(crate) async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

/// The value of the first sample line starting with `prefix`.
pub(crate) fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub(crate) fn with_metrics(text: &str, port: u16) -> String {
    text.replace(
        "\n[redis]",
        &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nmax_lag_secs = 5\n\n[redis]"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let (db, redis) = setup("metrics").await;
    let port = free_port();
    let text = with_metrics(&config_text(&db, &redis, RULES), port);
    let cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, cfg).await;
    let (code, _) = get(port, "/healthz").await.expect("healthz answers");
    assert_eq!(code, 200);
    cache(&redis, &["user:1", "user:2"]).await;
    db.execute_batch(
        "UPDATE users SET name = 'm' WHERE id IN (1, 2); DELETE FROM posts WHERE id = 1",
    )
    .await;
    wait_gone(&redis, &["user:1", "user:2"]).await;
    // The keys are gone once Redis ran the batch; its acknowledgement (and the
    // histograms recorded with it) may come a moment later.
    wait_until("metrics show the applied transaction", WAIT, || async {
        let body = get(port, "/metrics").await.map(|r| r.1).unwrap_or_default();
        sample(&body, "pginval_transactions_total") >= 1.0
            // Recorded last when a batch is acknowledged.
            && sample(&body, "pginval_read_to_invalidation_seconds_count") >= 1.0
    })
    .await;
    let body = get(port, "/metrics").await.unwrap().1;
    assert_eq!(
        sample(
            &body,
            "pginval_row_changes_total{table=\"public.users\",op=\"update\"}"
        ),
        2.0,
        "{body}"
    );
    // Staleness per table: the users update and the posts delete, one commit each
    // table's rules fired in.
    for table in ["public.users", "public.posts"] {
        assert_eq!(
            sample(
                &body,
                &format!("pginval_table_commit_to_invalidation_seconds_count{{table=\"{table}\"}}")
            ),
            1.0,
            "{body}"
        );
    }
    assert_eq!(
        sample(
            &body,
            "pginval_row_changes_total{table=\"public.posts\",op=\"delete\"}"
        ),
        1.0
    );
    // users: two keys per row (user:, user_full:) → 4 rendered keys, 2 tags.
    assert_eq!(
        sample(
            &body,
            "pginval_keys_invalidated_total{rule=\"#1 public.users\"}"
        ),
        4.0,
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "pginval_tags_invalidated_total{rule=\"#1 public.users\"}"
        ),
        2.0
    );
    assert!(sample(&body, "pginval_redis_commands_total") >= 1.0);
    assert!(
        sample(&body, "pginval_commit_to_invalidation_seconds_count") >= 1.0
            && sample(&body, "pginval_read_to_invalidation_seconds_count") >= 1.0,
        "{body}"
    );
    assert!(sample(&body, "pginval_batch_entries_count") >= 1.0);
    wait_until("the confirmed position is exported", WAIT, || async {
        let body = get(port, "/metrics").await.map(|r| r.1).unwrap_or_default();
        sample(&body, "pginval_confirmed_lsn") > 0.0
    })
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_while_redis_is_down() {
    let (db, mut redis) = setup("readyz").await;
    let port = free_port();
    let text = with_metrics(&config_text(&db, &redis, RULES), port);
    let cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, cfg).await;
    let ready =
        |want: u16| move || async move { get(port, "/readyz").await.map(|r| r.0) == Some(want) };
    wait_until("ready", WAIT, ready(200)).await;
    redis.stop();
    wait_until("unready while redis is down", WAIT, ready(503)).await;
    let (_, why) = get(port, "/readyz").await.unwrap();
    assert!(why.contains("redis"), "{why}");
    redis.restart();
    wait_until("ready again", WAIT, ready(200)).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_the_slot_and_rules() {
    let (db, redis) = setup("status").await;
    let path = config_file(&db, &config_text(&db, &redis, RULES));
    let daemon = Daemon::start(&db, crate::config(&db, &redis, RULES)).await;
    let out = std::process::Command::new(bin())
        .args(["status", "--json", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["slot"]["name"], db.name.as_str());
    assert_eq!(json["slot"]["exists"], true);
    assert_eq!(json["slot"]["active"], true);
    assert!(
        json["slot"]["confirmed_flush_lsn"]
            .as_str()
            .unwrap()
            .contains('/')
    );
    assert!(json["slot"]["retained_wal_bytes"].as_i64().is_some());
    assert_eq!(json["publication"]["exists"], true);
    assert_eq!(json["rules"][0]["ok"], true);
    assert_eq!(json["rules"].as_array().unwrap().len(), 2);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_prepares_the_database_once() {
    let (db, redis) = setup("setupcmd").await;
    db.execute_batch("ALTER TABLE posts REPLICA IDENTITY DEFAULT")
        .await;
    let path = config_file(&db, &config_text(&db, &redis, RULES));
    let run = |apply: bool| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["setup", "--config"]).arg(&path);
        if apply {
            cmd.arg("--apply");
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let planned = run(false);
    assert!(
        planned.contains("ALTER TABLE \"public\".\"posts\" REPLICA IDENTITY FULL;"),
        "{planned}"
    );
    assert!(
        planned.contains("CREATE PUBLICATION \"pginval\""),
        "{planned}"
    );
    assert!(
        planned.contains("pg_create_logical_replication_slot"),
        "{planned}"
    );
    assert!(
        !planned.contains("\"users\" REPLICA IDENTITY"),
        "users needs no FULL: {planned}"
    );
    run(true);
    assert!(run(false).contains("nothing to do"));
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

async fn published_columns(db: &crate::support::TestDb, table: &str) -> Vec<String> {
    let mut cols: Vec<String> = db
        .client()
        .await
        .query_one(
            "SELECT attnames::text[] FROM pg_publication_tables WHERE pubname = 'pginval' AND tablename = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    cols.sort();
    cols
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_publication_carries_only_the_columns_rules_need() {
    if !crate::support::requires_pg(15, "publication column lists") {
        return;
    }
    let (db, redis) = setup("collists").await;
    let with_lists = |rules: &str| {
        let text = crate::config_text(&db, &redis, rules).replace(
            "status_interval_secs = 1",
            "status_interval_secs = 1\ncolumn_lists = true",
        );
        pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None).unwrap()
    };
    let daemon = Daemon::start(&db, with_lists(RULES)).await;
    // users: DEFAULT identity, rules read only the key; posts: FULL identity, whole.
    assert_eq!(published_columns(&db, "users").await, vec!["id"]);
    assert_eq!(
        published_columns(&db, "posts").await,
        vec!["author_id", "category_id", "id", "title"]
    );
    cache(&redis, &["user:3"]).await;
    db.execute_batch("UPDATE users SET name = 'narrow' WHERE id = 3")
        .await;
    wait_gone(&redis, &["user:3"]).await;
    daemon.stop().await.unwrap();

    // Changed rules: the managed publication follows at the next start.
    let rules =
        format!("{RULES}\n[[rules]]\ntable = \"users\"\nkeys = [\"by_name:{{new.name}}\"]\n");
    let daemon = Daemon::start(&db, with_lists(&rules)).await;
    assert_eq!(published_columns(&db, "users").await, vec!["id", "name"]);
    cache(&redis, &["by_name:renamed"]).await;
    db.execute_batch("UPDATE users SET name = 'renamed' WHERE id = 4")
        .await;
    wait_gone(&redis, &["by_name:renamed"]).await;
    daemon.stop().await.unwrap();
}

/// Read-your-writes through the cache: a writer reads `pg_current_wal_insert_lsn()`
/// after its commit and waits until the position pginval publishes in its state
/// database passes it; by then the commit's keys are gone, with no other wait. (Not
/// `pg_current_wal_lsn()`: with `synchronous_commit = off`, as on the test server, the
/// write position may still be short of the commit record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_position_lets_a_writer_wait_for_its_invalidation() {
    let (db, redis) = setup("applied").await;
    let daemon = Daemon::start(&db, crate::config(&db, &redis, RULES)).await;
    let key = format!("pginval:applied:{}:{}", db.name, db.name);
    let writer = db.client().await;
    let state = redis.state_connection().await;
    for id in 1..=5 {
        cache(&redis, &[&format!("user:{id}")]).await;
        writer
            .execute(
                "UPDATE users SET name = 'ryw' WHERE id = $1",
                &[&(id as i64)],
            )
            .await
            .unwrap();
        let after_commit: i64 = writer
            .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
            .await
            .unwrap()
            .get(0);
        wait_until("pginval published a position past the commit", WAIT, || {
            let mut state = state.clone();
            let key = key.clone();
            async move {
                let published: Option<String> = redis::AsyncCommands::get(&mut state, &key)
                    .await
                    .unwrap_or(None);
                published
                    .and_then(|p| p.parse::<i64>().ok())
                    .is_some_and(|p| p >= after_commit)
            }
        })
        .await;
        assert!(
            !crate::exists(&redis, &format!("user:{id}")).await,
            "user:{id} is gone once the published position passed its commit"
        );
    }
    daemon.stop().await.unwrap();
}
