//! The fence (`fence = true`, issue 14 item 2) end to end: a reader that read the row
//! before the commit cannot fill after pginval's delete through `pginval
//! fill-script`'s script, a reader after the delete can; pattern fallbacks leave
//! fences alone; the fill script printed by the binary is the one tested.

use redis::AsyncCommands;

use crate::support::{Redis, wait_until};
use crate::{Daemon, WAIT, barrier, bin, cache, config, config_file, config_text, setup};

const FENCED: &str = "[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\nfence = true\n";

/// The fill script as `pginval fill-script` prints it.
fn fill_script(db: &crate::support::TestDb, redis: &Redis, rules: &str) -> redis::Script {
    let path = config_file(db, &config_text(db, redis, rules));
    let out = std::process::Command::new(bin())
        .args(["fill-script", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    redis::Script::new(&String::from_utf8(out.stdout).unwrap())
}

/// A cache-aside read that missed: what its MGET saw of the fence ("" for none).
async fn read_missed(redis: &Redis, key: &str, fence: &str) -> String {
    let mut conn = redis.connection().await;
    let (value, seen): (Option<String>, Option<String>) = redis::cmd("MGET")
        .arg(key)
        .arg(fence)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, None, "{key} should be a miss");
    seen.unwrap_or_default()
}

async fn fill(
    redis: &Redis,
    script: &redis::Script,
    key: &str,
    fence: &str,
    seen: &str,
    value: &str,
) -> i64 {
    let mut conn = redis.connection().await;
    script
        .key(key)
        .key(fence)
        .arg(seen)
        .arg(value)
        .arg(3_600_000)
        .invoke_async(&mut conn)
        .await
        .unwrap()
}

async fn name_of(db: &crate::support::TestDb, id: i64) -> String {
    db.client()
        .await
        .query_one("SELECT name FROM users WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// The read-then-set race, played out in order: the reader misses and reads the old
/// row, the writer commits, pginval fences and deletes; the reader's fill is refused
/// and the key stays absent. A reader that comes after the delete fills the new row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_read_before_the_commit_is_refused_after_the_fenced_delete() {
    let (db, redis) = setup("fence").await;
    let script = fill_script(&db, &redis, FENCED);
    let daemon = Daemon::start(&db, config(&db, &redis, FENCED)).await;
    let (key, fence) = ("user:1", "pginval-fence:{user:1}");
    // A reader misses and reads the row as it is before the commit.
    let seen = read_missed(&redis, key, fence).await;
    let old = name_of(&db, 1).await;
    // The writer commits; pginval fences the key, then deletes it.
    db.execute_batch("UPDATE users SET name = 'new' WHERE id = 1")
        .await;
    let mut conn = redis.connection().await;
    wait_until("pginval fenced user:1", WAIT, || {
        let mut conn = conn.clone();
        async move { conn.exists::<_, bool>(fence).await.unwrap() }
    })
    .await;
    let ttl: i64 = conn.pttl(fence).await.unwrap();
    assert!(
        (1..=60_000).contains(&ttl),
        "the fence lives [redis] fence_ttl (60 s): {ttl} ms"
    );
    // The late fill of the old row is refused.
    assert_eq!(fill(&redis, &script, key, fence, &seen, &old).await, 0);
    assert!(
        !conn.exists::<_, bool>(key).await.unwrap(),
        "no stale value"
    );
    // A read after the delete sees the new fence and fills the new row.
    let seen = read_missed(&redis, key, fence).await;
    assert!(!seen.is_empty());
    let new = name_of(&db, 1).await;
    assert_eq!(fill(&redis, &script, key, fence, &seen, &new).await, 1);
    let cached: String = conn.get(key).await.unwrap();
    assert_eq!(cached, "new");
    // The next commit writes a fence value never seen before.
    db.execute_batch("UPDATE users SET name = 'newer' WHERE id = 1")
        .await;
    let first = seen.clone();
    wait_until("pginval fenced user:1 again", WAIT, || {
        let (mut conn, first) = (conn.clone(), first.clone());
        async move { conn.get::<_, Option<String>>(fence).await.unwrap() != Some(first) }
    })
    .await;
    assert_eq!(fill(&redis, &script, key, fence, &seen, &new).await, 0);
    daemon.stop().await.unwrap();
}

/// Rules without `fence` write no fence; a fenced rule's TRUNCATE fallback deletes by
/// pattern, and a pattern that matches everything still leaves the fences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_fallbacks_leave_fences_and_unfenced_rules_write_none() {
    let (db, redis) = setup("fencepat").await;
    let rules = format!(
        "{FENCED}fallback = {{ patterns = [\"*\"] }}\n\n[[rules]]\ntable = \"posts\"\nkeys = [\"post:{{id}}\"]\n"
    );
    let daemon = Daemon::start(&db, config(&db, &redis, &rules)).await;
    cache(&redis, &["post:1"]).await;
    db.execute_batch(
        "UPDATE users SET name = 'x' WHERE id = 2; UPDATE posts SET title = 't' WHERE id = 1",
    )
    .await;
    let mut conn = redis.connection().await;
    wait_until("pginval fenced user:2", WAIT, || {
        let mut conn = conn.clone();
        async move {
            conn.exists::<_, bool>("pginval-fence:{user:2}")
                .await
                .unwrap()
        }
    })
    .await;
    barrier(&db, &redis).await;
    assert!(
        !conn
            .exists::<_, bool>("pginval-fence:{post:1}")
            .await
            .unwrap(),
        "posts' rule has no fence"
    );
    cache(&redis, &["other:1"]).await;
    db.execute_batch("TRUNCATE users CASCADE").await;
    crate::wait_gone(&redis, &["other:1"]).await;
    assert!(
        conn.exists::<_, bool>("pginval-fence:{user:2}")
            .await
            .unwrap(),
        "the fallback pattern * left the fence"
    );
    daemon.stop().await.unwrap();
}

/// `pginval fill-script | head -1`: the reader going away is no panic.
#[test]
fn fill_script_into_a_closed_pipe_exits_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(bin())
        .args(["fill-script", "--config", "rules.toml"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
