//! A Sentinel-managed Redis: pginval finds the master through the Sentinels, and after
//! a failover (the primary killed, its replica promoted by the Sentinels) follows the
//! new master and repairs the delete the replica never got.

use redis::AsyncCommands;

use crate::support::{RedisSentinel, TestDb, postgres, wait_until};
use crate::{Daemon, RULES, SCHEMA, WAIT, config_text_url};

async fn exists_on(set: &RedisSentinel, port: u16, key: &str) -> bool {
    let mut node = set.node(port).await;
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<bool>(&mut node)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_and_the_lost_delete_replayed() {
    let db: TestDb = postgres().create_database("sentinel").await;
    db.execute_batch(SCHEMA).await;
    let mut set = tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .expect("the sentinel start did not panic");
    let (primary, replica) = (set.primary(), set.replica());
    // The URL's host is not used: the Sentinels name the master.
    let text = config_text_url(
        &db,
        "redis://127.0.0.1:1/0",
        &format!("{}{RULES}", set.redis_section()),
    );
    let config = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, config).await;

    let mut on_primary = set.node(primary).await;
    let _: () = on_primary.set("user:1", "cached").await.unwrap();
    let _: () = on_primary.set("user:2", "cached").await.unwrap();
    db.execute_batch("UPDATE users SET name = 'x' WHERE id = 1")
        .await;
    wait_until("pginval deleted user:1 on the master", WAIT, || async {
        !exists_on(&set, primary, "user:1").await
    })
    .await;
    crate::support::assert_replicated(&mut on_primary, "user:2").await;

    // The replica stops and the master drops its link: the next delete stays with
    // the master, which acknowledges it and dies.
    set.signal(replica, "STOP");
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("slave")
        .query_async(&mut on_primary)
        .await
        .unwrap();
    db.execute_batch("UPDATE users SET name = 'x' WHERE id = 2")
        .await;
    wait_until("pginval deleted user:2 on the master", WAIT, || async {
        !exists_on(&set, primary, "user:2").await
    })
    .await;
    set.kill(primary);
    set.signal(replica, "CONT");
    wait_until("the sentinels promoted the replica", WAIT, || async {
        set.master_port() == Some(replica)
    })
    .await;
    assert!(
        exists_on(&set, replica, "user:2").await,
        "the promoted replica lacks the delete (the loss this test is about)"
    );
    wait_until(
        "the replay deleted user:2 on the new master",
        WAIT,
        || async { !exists_on(&set, replica, "user:2").await },
    )
    .await;

    // And later changes go to the new master.
    let mut on_new = set.node(replica).await;
    let _: () = on_new.set("user:3", "cached").await.unwrap();
    db.execute_batch("UPDATE users SET name = 'x' WHERE id = 3")
        .await;
    wait_until("pginval deleted user:3 on the new master", WAIT, || async {
        !exists_on(&set, replica, "user:3").await
    })
    .await;
    daemon.stop().await.unwrap();
}
