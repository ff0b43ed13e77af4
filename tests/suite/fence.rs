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

/// One read through a client snippet of `examples/fence/`, driven over its stdin and
/// stdout: it prints LOAD when its read missed and waits for the database value.
struct SnippetRead {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl SnippetRead {
    fn start(client: &[String], redis: &Redis, key: &str, fence_ttl_ms: u64) -> SnippetRead {
        let dir = std::env::var("PGINVAL_TEST_CLIENTS").unwrap();
        let mut child = std::process::Command::new(&client[0])
            .args(&client[1..])
            .env("NODE_PATH", format!("{dir}/node/node_modules"))
            .arg(redis.url())
            .arg(key)
            .arg(fence_ttl_ms.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{client:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        use std::io::BufRead;
        let lines = std::io::BufReader::new(stdout).lines();
        SnippetRead { child, lines }
    }

    fn line(&mut self) -> String {
        self.lines
            .next()
            .expect("the snippet printed a line")
            .unwrap()
    }

    /// Answers LOAD with `value`; returns the snippet's last line.
    fn load(mut self, value: &str) -> String {
        use std::io::Write;
        writeln!(self.child.stdin.as_mut().unwrap(), "{value}").unwrap();
        let last = self.line();
        assert!(self.child.wait().unwrap().success());
        last
    }
}

/// The client snippets (redis-py, ioredis, phpredis), each racing a real commit that
/// pginval fences: a fill of the old row is refused, a fill after the delete is
/// stored and then served, and a fill slower than half the fence TTL is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_snippets_refuse_the_fill_that_raced_a_fenced_delete() {
    let Ok(dir) = std::env::var("PGINVAL_TEST_CLIENTS") else {
        crate::support::skipped(
            "PGINVAL_TEST_CLIENTS is not set (scripts/install-clients.sh installs the clients)",
        );
        return;
    };
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fence");
    let clients: Vec<(&str, Vec<String>)> = vec![
        (
            "redis-py",
            vec![
                format!("{dir}/venv/bin/python"),
                format!("{examples}/fill.py"),
            ],
        ),
        (
            "ioredis",
            vec!["node".into(), format!("{examples}/fill.js")],
        ),
        (
            "phpredis",
            vec!["php".into(), format!("{examples}/fill.php")],
        ),
    ];
    let (db, redis) = setup("fencesnip").await;
    let daemon = Daemon::start(&db, config(&db, &redis, FENCED)).await;
    let mut conn = redis.connection().await;
    for (n, (name, client)) in clients.iter().enumerate() {
        let id = 10 + n as i64;
        let key = format!("user:{id}");
        let fence = format!("pginval-fence:{{{key}}}");
        // The read misses and loads the old row; the commit lands before its fill.
        let mut read = SnippetRead::start(client, &redis, &key, 60_000);
        assert_eq!(read.line(), "LOAD", "{name}");
        let old = name_of(&db, id).await;
        let before: Option<String> = conn.get(&fence).await.unwrap();
        db.execute_batch(&format!(
            "UPDATE users SET name = '{name}-new' WHERE id = {id}"
        ))
        .await;
        wait_until("pginval fenced the key", WAIT, || {
            let (mut conn, fence, before) = (conn.clone(), fence.clone(), before.clone());
            async move { conn.get::<_, Option<String>>(&fence).await.unwrap() != before }
        })
        .await;
        assert_eq!(read.load(&old), format!("not stored {old}"), "{name}");
        assert!(!conn.exists::<_, bool>(&key).await.unwrap(), "{name}");
        // A read after the delete stores the new row, and the next read hits it.
        let mut read = SnippetRead::start(client, &redis, &key, 60_000);
        assert_eq!(read.line(), "LOAD", "{name}");
        let new = name_of(&db, id).await;
        assert_eq!(read.load(&new), format!("stored {new}"), "{name}");
        let mut read = SnippetRead::start(client, &redis, &key, 60_000);
        assert_eq!(read.line(), format!("hit {new}"), "{name}");
        assert!(read.child.wait().unwrap().success());
        // A fill later than half the fence TTL (here 200 ms) is skipped.
        let _: () = conn.del(&key).await.unwrap();
        let mut read = SnippetRead::start(client, &redis, &key, 200);
        assert_eq!(read.line(), "LOAD", "{name}");
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert_eq!(read.load(&new), format!("not stored {new}"), "{name}");
    }
    daemon.stop().await.unwrap();
}

/// Each snippet carries the fill script `pginval fill-script` prints, line for line.
#[test]
fn client_snippets_carry_the_fill_script() {
    let body: Vec<&str> = pginval::sink::fence::FILL_LUA
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .collect();
    for file in ["fill.py", "fill.js", "fill.php", "fill.go"] {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fence/").to_owned() + file;
        let text = std::fs::read_to_string(&path).unwrap();
        let joined = body.join("\n");
        assert!(
            text.contains(&joined),
            "{file} lacks the fill script:\n{joined}"
        );
    }
}

/// Every snippet names a key's fence as pginval does, for the keys where the rule has
/// its edge cases: a hash tag, an empty tag, a `}` without a tag, a lone `{`, non-ASCII,
/// the empty key.
#[test]
fn client_snippets_name_fences_as_pginval_does() {
    let Ok(dir) = std::env::var("PGINVAL_TEST_CLIENTS") else {
        crate::support::skipped(
            "PGINVAL_TEST_CLIENTS is not set (scripts/install-clients.sh installs the clients)",
        );
        return;
    };
    let keys = [
        "user:1", "a{b}c", "a}b", "x{}y{z}", "{", "{t}:u:1", "ключ", "",
    ];
    let expected: Vec<String> = keys
        .iter()
        .map(|k| pginval::sink::fence::fence_key(k))
        .collect();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fence");
    for client in [
        vec![
            format!("{dir}/venv/bin/python"),
            format!("{examples}/fill.py"),
        ],
        vec!["node".into(), format!("{examples}/fill.js")],
        vec!["php".into(), format!("{examples}/fill.php")],
    ] {
        let out = std::process::Command::new(&client[0])
            .args(&client[1..])
            .arg("fence-key")
            .args(keys)
            .env("NODE_PATH", format!("{dir}/node/node_modules"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{client:?}: {out:?}");
        let names: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(names, expected, "{client:?}");
    }
}

/// Redis forgets its scripts (`SCRIPT FLUSH`, as after a restart): pginval's next
/// fenced delete still writes the fence and deletes the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_delete_survives_redis_forgetting_the_script() {
    let (db, redis) = setup("fencenoscript").await;
    let daemon = Daemon::start(&db, config(&db, &redis, FENCED)).await;
    cache(&redis, &["user:3"]).await;
    db.execute_batch("UPDATE users SET name = 'a' WHERE id = 3")
        .await;
    crate::wait_gone(&redis, &["user:3"]).await;
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    cache(&redis, &["user:4"]).await;
    db.execute_batch("UPDATE users SET name = 'b' WHERE id = 4")
        .await;
    crate::wait_gone(&redis, &["user:4"]).await;
    assert!(
        conn.exists::<_, bool>("pginval-fence:{user:4}")
            .await
            .unwrap()
    );
    daemon.stop().await.unwrap();
}
