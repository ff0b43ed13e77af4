//! A physical standby as the source (PostgreSQL 16+): what `check` says of it, and
//! streaming from it, against a real primary + standby pair the test starts.

use crate::support::{PrivatePostgres, Redis, connect, wait_until};
use crate::{WAIT, cache, wait_gone};

/// `[source]` on `url`, one rule on users.
fn standby_config(url: &str, redis: &Redis) -> String {
    format!(
        "[source]\nurl = \"{url}\"\nslot = \"from_standby\"\nstatus_interval_secs = 1\n\n[redis]\nurl = \"{}\"\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{{id}}\"]\n",
        redis.url()
    )
}

fn check(text: &str) -> (Option<i32>, String) {
    let path =
        std::env::temp_dir().join(format!("pginval-test-standby-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let out = crate::pginval(&["check"], &path);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_source_is_checked_for_what_run_needs_then_streams() {
    let primary = PrivatePostgres::start();
    connect(&primary.url("postgres"))
        .await
        .batch_execute("CREATE DATABASE app")
        .await
        .unwrap();
    let app = connect(&primary.url("app")).await;
    app.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text);
         INSERT INTO users SELECT g, 'u' FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    // As found in the field: feedback off, and (17+) a synchronized_standby_slots copied
    // from a server that had that slot.
    let pg17 = primary.major_version() >= 17;
    let settings = if pg17 {
        "hot_standby_feedback = off\nsynchronized_standby_slots = 'copied_slot'"
    } else {
        "hot_standby_feedback = off"
    };
    let standby = primary.start_standby(settings).await;
    let on_standby = connect(&standby.url("app")).await;
    wait_until("the standby has the table", WAIT, || async {
        on_standby
            .query_opt("SELECT 1 FROM pg_class WHERE relname = 'users'", &[])
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
    })
    .await;
    let redis = Redis::start();
    let text = standby_config(&standby.url("app"), &redis);

    let (code, out) = check(&text);
    assert_eq!(code, Some(2), "{out}");
    if primary.major_version() < 16 {
        assert!(
            out.contains("logical decoding on a standby needs PostgreSQL 16 or newer"),
            "{out}"
        );
        return;
    }
    assert!(out.contains("hot_standby_feedback = off"), "{out}");
    assert_eq!(
        out.contains("synchronized_standby_slots names copied_slot, which is not a physical slot of this server"),
        pg17,
        "{out}"
    );
    assert!(
        out.contains("it can only be created on the primary") && out.contains("CREATE PUBLICATION"),
        "{out}"
    );

    // Both fixed as check says: feedback on the standby, the publication on the primary.
    let mut fixes = vec!["ALTER SYSTEM SET hot_standby_feedback = on"];
    if pg17 {
        fixes.push("ALTER SYSTEM SET synchronized_standby_slots = ''");
    }
    fixes.push("SELECT pg_reload_conf()");
    for sql in fixes {
        on_standby.batch_execute(sql).await.unwrap();
    }
    app.batch_execute("CREATE PUBLICATION pginval FOR TABLE users")
        .await
        .unwrap();
    wait_until(
        "the standby has the publication and the setting",
        WAIT,
        || async {
            let publication = on_standby
                .query_opt(
                    "SELECT 1 FROM pg_publication WHERE pubname = 'pginval'",
                    &[],
                )
                .await
                .map(|r| r.is_some())
                .unwrap_or(false);
            let feedback: String = on_standby
                .query_one("SELECT current_setting('hot_standby_feedback')", &[])
                .await
                .unwrap()
                .get(0);
            let copied: Option<String> = if pg17 {
                on_standby
                    .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
                    .await
                    .ok()
                    .map(|r| r.get(0))
            } else {
                Some(String::new())
            };
            publication && feedback == "on" && copied.as_deref() == Some("")
        },
    )
    .await;
    let (code, out) = check(&text);
    assert_eq!(code, Some(0), "{out}");

    // And run streams from the standby: a commit on the primary, replayed by the
    // standby, invalidates. Creating the slot on a standby waits for the primary to log
    // its running transactions: pginval says so, naming the statement that ends it.
    let path = std::env::temp_dir().join(format!(
        "pginval-test-standby-run-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, &text).unwrap();
    let log = path.with_extension("log");
    let mut child = crate::spawn_run(&path, &log);
    wait_until(
        "pginval names the statement that ends the wait",
        WAIT,
        || async {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("SELECT pg_log_standby_snapshot();"))
        },
    )
    .await;
    wait_until("pginval streams from the standby", WAIT, || async {
        let _ = app.execute("SELECT pg_log_standby_snapshot()", &[]).await;
        on_standby
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = 'from_standby'",
                &[],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
    })
    .await;
    cache(&redis, &["user:3", "user:4"]).await;
    app.batch_execute("UPDATE users SET name = 'via the standby' WHERE id = 3")
        .await
        .unwrap();
    wait_gone(&redis, &["user:3"]).await;
    assert!(crate::exists(&redis, "user:4").await);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
