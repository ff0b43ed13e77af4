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
    // A file per call: the tests of this file run at once.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "pginval-test-standby-{}-{n}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    crate::check_file(&path)
}

/// A private primary with a database `app` holding `users` (ids 1..10) and, with
/// `publication`, the publication pginval streams; and a client of `app`.
async fn primary_with_app(publication: bool) -> (PrivatePostgres, tokio_postgres::Client) {
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
    if publication {
        app.batch_execute("CREATE PUBLICATION pginval FOR TABLE users")
            .await
            .unwrap();
    }
    (primary, app)
}

/// Whether pginval streams from its slot on the server `client` is connected to.
async fn streams_from(client: &tokio_postgres::Client) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = 'from_standby'",
            &[],
        )
        .await
        .map(|r| r.is_some())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_source_is_checked_for_what_run_needs_then_streams() {
    let (primary, app) = primary_with_app(false).await;
    let standby = primary.start_standby("hot_standby_feedback = off").await;
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

    // A heartbeat writes WAL, which a standby cannot.
    let (code, out) = check(&text.replace(
        "status_interval_secs = 1",
        "status_interval_secs = 1\nheartbeat_secs = 5",
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("heartbeat_secs is set, but a heartbeat writes a WAL message"),
        "{out}"
    );
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
    assert!(
        out.contains("it can only be created on the primary") && out.contains("CREATE PUBLICATION"),
        "{out}"
    );

    // Both fixed as check says: feedback on the standby, the publication on the primary.
    for sql in [
        "ALTER SYSTEM SET hot_standby_feedback = on",
        "SELECT pg_reload_conf()",
    ] {
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
            publication && feedback == "on"
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
        streams_from(&on_standby).await
    })
    .await;
    cache(&redis, &["user:3", "user:4"]).await;
    app.batch_execute("UPDATE users SET name = 'via the standby' WHERE id = 3")
        .await
        .unwrap();
    wait_gone(&redis, &["user:3"]).await;
    // A later commit as a barrier: once it is applied, so is everything before it.
    cache(&redis, &["user:9"]).await;
    app.batch_execute("UPDATE users SET name = 'barrier' WHERE id = 9")
        .await
        .unwrap();
    wait_gone(&redis, &["user:9"]).await;
    assert!(
        crate::exists(&redis, "user:4").await,
        "exact: user:4 was not changed"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// A primary that fails over to its standby (PostgreSQL 17+ failover slots): with
/// `failover_slot = true` the standby keeps a copy of pginval's slot and pginval, given
/// both servers in its URL, resumes on the promoted standby where it was: a change made
/// there is invalidated exactly, with no fallback. Without it the promoted standby has
/// no slot: pginval takes that for a lost slot and applies every rule's fallback (no
/// gap either, at the cost of flushing).
async fn primary_failover(failover_slot: bool) {
    if !crate::support::requires_pg(17, "failover slots") {
        return;
    }
    let (primary, app) = primary_with_app(true).await;
    let standby = primary
        .start_standby(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres'\nsync_replication_slots = on\nhot_standby_feedback = on",
            primary.port()
        ))
        .await;
    let redis = Redis::start();
    // With the failover slot the standby comes first: pginval must pass it over
    // (read-only) for the primary. Without, the primary comes first: after the crash
    // pginval finds only a read-only server until the promotion, and must keep trying.
    let ports = if failover_slot {
        (standby.port(), primary.port())
    } else {
        (primary.port(), standby.port())
    };
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=app target_session_attrs=read-write",
        ports.0, ports.1
    );
    let text = standby_config(&url, &redis).replace(
        "status_interval_secs = 1",
        &format!("status_interval_secs = 1\nfailover_slot = {failover_slot}"),
    );
    if failover_slot {
        let (code, out) = check(&text);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("synchronized_standby_slots is empty"), "{out}");
        // As check advises: pginval never gets ahead of the standby.
        let admin = connect(&primary.url("postgres")).await;
        let physical: String = admin
            .query_one(
                "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        for sql in [
            format!("ALTER SYSTEM SET synchronized_standby_slots = '{physical}'"),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        wait_until("check sees the setting", WAIT, || async {
            let (code, out) = check(&text);
            code == Some(0)
                && !out.contains("synchronized_standby_slots is empty")
                && out.contains("failover slot: the standby needs")
        })
        .await;
    }
    let path = std::env::temp_dir().join(format!(
        "pginval-test-failover-{failover_slot}-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, &text).unwrap();
    let log = path.with_extension("log");
    let mut child = crate::spawn_run(&path, &log);
    let on_primary = connect(&primary.url("app")).await;
    wait_until("pginval streams from the primary", WAIT, || {
        streams_from(&on_primary)
    })
    .await;
    cache(&redis, &["user:1"]).await;
    app.batch_execute("UPDATE users SET name = 'before' WHERE id = 1")
        .await
        .unwrap();
    wait_gone(&redis, &["user:1"]).await;
    let on_standby = connect(&standby.url("app")).await;
    if failover_slot {
        // The standby's copy of the slot has caught up with what pginval confirmed.
        let confirmed: String = on_primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        // The slot sync worker naps up to 30 s between rounds.
        let sync_wait = std::time::Duration::from_secs(90);
        wait_until("the standby's copy of the slot caught up", sync_wait, || async {
            let _ = app.execute("SELECT pg_log_standby_snapshot()", &[]).await;
            on_standby
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'from_standby' AND synced AND NOT temporary AND confirmed_flush_lsn >= $1::text::pg_lsn",
                    &[&confirmed],
                )
                .await
                .map(|r| r.is_some())
                .unwrap_or(false)
        })
        .await;
    }
    // The primary dies; its standby is promoted.
    drop(on_primary);
    primary.crash();
    if !failover_slot {
        // Until the promotion only a read-only server answers: pginval keeps trying.
        wait_until("pginval finds only a read-only server", WAIT, || async {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("the server is read-only"))
        })
        .await;
    }
    standby.promote();
    // Cached after the failover: an exact invalidation leaves user:5 alone, the
    // lost-slot fallback (user:*) takes it too.
    cache(&redis, &["user:2", "user:5"]).await;
    let new_primary = connect(&standby.url("app")).await;
    new_primary
        .batch_execute("UPDATE users SET name = 'after' WHERE id = 2")
        .await
        .unwrap();
    wait_gone(&redis, &["user:2"]).await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    if failover_slot {
        crate::assert_cached(&redis, &["user:5"]).await;
        assert!(
            !log_text.contains("fallback"),
            "no fallback after a failover with a synchronized slot:\n{log_text}"
        );
    } else {
        wait_gone(&redis, &["user:5"]).await;
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            log_text.contains("the replication slot was lost"),
            "{log_text}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_slot_resumes_on_the_promoted_standby_without_a_fallback() {
    primary_failover(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_failover_slot_the_promoted_standby_costs_the_lost_slot_fallback() {
    primary_failover(false).await;
}

/// With `standby_primary_url`, pginval ends the slot creation's wait itself: an idle
/// primary logs its running transactions only when asked (or every 15 s while WAL is
/// written), so without it creating the slot on the standby waits; with it pginval
/// asks every second and streams within a few seconds. `check` reads the primary's
/// settings there and refuses a URL that names a standby or another cluster's server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_primary_url_ends_the_slot_creation_wait() {
    if !crate::support::requires_pg(16, "logical decoding on a standby") {
        return;
    }
    let (primary, app) = primary_with_app(true).await;
    // An idle primary: no autovacuum writing WAL (and so standby snapshots) meanwhile.
    for sql in [
        "ALTER SYSTEM SET autovacuum = off",
        "SELECT pg_reload_conf()",
    ] {
        app.batch_execute(sql).await.unwrap();
    }
    let standby = primary.start_standby("hot_standby_feedback = on").await;
    let on_standby = connect(&standby.url("app")).await;
    wait_until("the standby has the publication", WAIT, || async {
        on_standby
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = 'pginval'",
                &[],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
    })
    .await;
    let redis = Redis::start();
    let with_primary = |url: &str| {
        standby_config(&standby.url("app"), &redis).replace(
            "status_interval_secs = 1",
            &format!("status_interval_secs = 1\nstandby_primary_url = \"{url}\""),
        )
    };
    let (code, out) = check(&with_primary(&standby.url("app")));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("names a server in recovery, not the primary"),
        "{out}"
    );
    // Another cluster's primary (the suite's shared server) is refused by its identity.
    let elsewhere = crate::support::postgres()
        .create_database("otherprimary")
        .await;
    let (code, out) = check(&with_primary(&elsewhere.url));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("names a server of another cluster"), "{out}");
    let text = with_primary(&primary.url("app"));
    let (code, out) = check(&text);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("the primary (standby_primary_url) runs with wal_level = logical"),
        "{out}"
    );

    let path = std::env::temp_dir().join(format!(
        "pginval-test-standby-primary-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, &text).unwrap();
    let log = path.with_extension("log");
    let mut child = crate::spawn_run(&path, &log);
    // Nothing here asks the primary for a snapshot: pginval does, every second.
    wait_until(
        "pginval streams from the standby",
        std::time::Duration::from_secs(10),
        || streams_from(&on_standby),
    )
    .await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("pginval has the primary log every second"),
        "{log_text}"
    );
    cache(&redis, &["user:3"]).await;
    app.batch_execute("UPDATE users SET name = 'x' WHERE id = 3")
        .await
        .unwrap();
    wait_gone(&redis, &["user:3"]).await;
    let _ = child.kill();
    let _ = child.wait();
}

/// Streaming from a standby through what happens to real deployments: pginval killed
/// (SIGKILL) while the primary writes, the standby restarted, then the standby promoted.
/// Each time the change made meanwhile is invalidated once pginval is back, and the
/// promoted standby keeps pginval's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_source_survives_a_kill_a_restart_and_its_promotion() {
    if !crate::support::requires_pg(16, "logical decoding on a standby") {
        return;
    }
    let (primary, app) = primary_with_app(true).await;
    let standby = primary.start_standby("hot_standby_feedback = on").await;
    let redis = Redis::start();
    let text = standby_config(&standby.url("app"), &redis).replace(
        "status_interval_secs = 1",
        &format!(
            "status_interval_secs = 1\nstandby_primary_url = \"{}\"",
            primary.url("app")
        ),
    );
    let path = std::env::temp_dir().join(format!(
        "pginval-test-standby-faults-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, &text).unwrap();
    let log = path.with_extension("log");
    let streaming = || async {
        match tokio_postgres::connect(&standby.url("app"), tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                streams_from(&client).await
            }
            Err(_) => false,
        }
    };
    let mut child = crate::spawn_run(&path, &log);
    wait_until("pginval streams from the standby", WAIT, streaming).await;
    cache(&redis, &["user:1"]).await;
    app.batch_execute("UPDATE users SET name = 'a' WHERE id = 1")
        .await
        .unwrap();
    wait_gone(&redis, &["user:1"]).await;

    // SIGKILL; a change while pginval is down is invalidated once it is back.
    child.kill().unwrap();
    child.wait().unwrap();
    cache(&redis, &["user:2"]).await;
    app.batch_execute("UPDATE users SET name = 'b' WHERE id = 2")
        .await
        .unwrap();
    let mut child = crate::spawn_run(&path, &log);
    wait_gone(&redis, &["user:2"]).await;

    // The standby restarts; pginval reconnects and goes on.
    standby.restart("fast");
    wait_until(
        "pginval streams from the restarted standby",
        WAIT,
        streaming,
    )
    .await;
    cache(&redis, &["user:3"]).await;
    app.batch_execute("UPDATE users SET name = 'c' WHERE id = 3")
        .await
        .unwrap();
    wait_gone(&redis, &["user:3"]).await;

    // The primary goes away and the standby is promoted: its slot stays, and pginval
    // streams the new primary's changes.
    drop(app);
    primary.crash();
    standby.promote();
    let promoted = connect(&standby.url("app")).await;
    cache(&redis, &["user:4", "user:5"]).await;
    promoted
        .batch_execute("UPDATE users SET name = 'd' WHERE id = 4")
        .await
        .unwrap();
    wait_gone(&redis, &["user:4"]).await;
    crate::assert_cached(&redis, &["user:5"]).await;
    let _ = child.kill();
    let _ = child.wait();
}
