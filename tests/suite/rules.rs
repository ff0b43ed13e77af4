//! Rules that fit real cache layouts: conditions, operation filters, fallbacks,
//! patterns, framework tag layouts, soft invalidation, second deletes, entity events,
//! hints, explain and dry runs — end to end against PostgreSQL and Redis.

use redis::AsyncCommands;

use crate::support::{Redis, skipped, wait_until};
use crate::{
    Daemon, WAIT, assert_cached, barrier, bin, cache, check_file, config, config_file, config_text,
    confirmed_lsn, exists, setup, wait_gone,
};

/// RULES plus a users rule that only fires when `role` changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_condition_fires_only_when_the_column_changed() {
    let (db, redis) = setup("cond").await;
    db.execute_batch("ALTER TABLE users REPLICA IDENTITY FULL")
        .await;
    let rules = format!(
        "{}\n[[rules]]\ntable = \"users\"\nkeys = [\"perm:{{id}}\"]\ncolumns = [\"role\"]\n",
        crate::RULES
    );
    let daemon = Daemon::start(&db, config(&db, &redis, &rules)).await;
    cache(&redis, &["perm:1", "perm:2", "user:1", "user:2"]).await;
    db.execute_batch("UPDATE users SET name = 'renamed' WHERE id = 1")
        .await;
    db.execute_batch("UPDATE users SET role = 'admin' WHERE id = 2")
        .await;
    wait_gone(&redis, &["user:1", "user:2", "perm:2"]).await;
    barrier(&db, &redis).await;
    assert_cached(&redis, &["perm:1"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_condition_without_old_image_fires_and_check_warns() {
    let (db, redis) = setup("condwarn").await;
    let rules = "[[rules]]\ntable = \"users\"\nkeys = [\"perm:{id}\"]\ncolumns = [\"role\"]\n";
    let path = config_file(&db, &config_text(&db, &redis, rules));
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("warning:") && stdout.contains("role"),
        "{stdout}"
    );
    assert!(stdout.contains("REPLICA IDENTITY FULL"), "{stdout}");

    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    cache(&redis, &["perm:3"]).await;
    db.execute_batch("UPDATE users SET name = 'x' WHERE id = 3")
        .await;
    // DEFAULT identity: the old role is unknown, so the rule fires (fail-safe).
    wait_gone(&redis, &["perm:3"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_filter_limits_the_rule() {
    let (db, redis) = setup("onfilter").await;
    let rules = "[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\n\n[[rules]]\ntable = \"users\"\nkeys = [\"directory\"]\non = [\"insert\", \"delete\"]\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    cache(&redis, &["directory"]).await;
    db.execute_batch("UPDATE users SET name = 'x' WHERE id = 4")
        .await;
    barrier(&db, &redis).await;
    assert_cached(&redis, &["directory"]).await;
    db.execute_batch("INSERT INTO users VALUES (5000, 'new', 'member')")
        .await;
    wait_gone(&redis, &["directory"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_applies_the_declared_fallback() {
    let (db, redis) = setup("fbtrunc").await;
    let rules = "[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\n\n[[rules]]\ntable = \"posts\"\nkeys = [\"post:{id}\"]\nfallback = { tags = [\"all_posts\"], patterns = [\"post:*\", \"feed:*\"] }\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    cache(
        &redis,
        &["post:1", "post:99", "feed:home", "page:archive", "user:1"],
    )
    .await;
    let mut conn = redis.connection().await;
    let _: () = conn
        .sadd("cache_tag:all_posts", "page:archive")
        .await
        .unwrap();
    db.execute_batch("TRUNCATE posts").await;
    wait_gone(&redis, &["post:1", "post:99", "feed:home", "page:archive"]).await;
    assert_cached(&redis, &["user:1"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_over_the_row_limit_uses_the_fallback() {
    let (db, redis) = setup("fblimit").await;
    let rules = "[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\nmax_keys_per_transaction = 50\nfallback = { patterns = [\"user:*\"] }\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    // user:299 is not among the updated rows: only the fallback pattern removes it.
    cache(&redis, &["user:1", "user:200", "user:299"]).await;
    db.execute_batch("UPDATE users SET name = name || '+' WHERE id <= 200")
        .await;
    wait_gone(&redis, &["user:1", "user:200", "user:299"]).await;
    daemon.stop().await.unwrap();
}

/// 25,000 rows in one transaction are over the 10,000-entry part size: the keys and the
/// events go to Redis in parts, exactly (no fallback), each event stamped with the
/// transaction's commit, and the slot moves past the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_transaction_is_applied_exactly_in_parts() {
    let (db, redis) = setup("bigtx").await;
    let rules = "[events]\nstream = \"pginval:stream\"\nstream_maxlen = 100000\n\n[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\nentity = \"user\"\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    let rows = 25_000;
    let keys: Vec<String> = (1..=rows).map(|i| format!("user:{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    cache(&redis, &refs).await;
    // Not a row: only a fallback pattern (user:*) would delete it.
    cache(&redis, &["user:0"]).await;
    db.execute_batch(&format!(
        "INSERT INTO users SELECT g, 'u', 'member' FROM generate_series(301, {rows}) g;
         UPDATE users SET name = name || '+' WHERE id <= 300;"
    ))
    .await;
    wait_gone(&redis, &refs).await;
    let end = crate::current_lsn(&db).await;
    wait_until("the slot passes the big commit", WAIT, || async {
        confirmed_lsn(&db).await >= end
    })
    .await;
    assert_cached(&redis, &["user:0"]).await;
    let mut conn = redis.connection().await;
    let entries: redis::streams::StreamRangeReply = conn
        .xrange_count("pginval:stream", "-", "+", rows + 10)
        .await
        .unwrap();
    assert_eq!(entries.ids.len(), rows);
    let lsns: std::collections::HashSet<String> = entries
        .ids
        .iter()
        .map(|e| {
            let json: String = e.get("event").unwrap();
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            v["lsn"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(lsns.len(), 1, "every part carries the one commit: {lsns:?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_column_switches_the_rule_to_its_fallback() {
    let (db, redis) = setup("fbschema").await;
    let rules =
        "[[rules]]\ntable = \"posts\"\nkeys = [\"post:{id}\", \"cat_posts:{category_id}\"]\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    cache(&redis, &["post:8", "cat_posts:1", "cat_posts:2"]).await;
    db.execute_batch(
        "ALTER TABLE posts DROP COLUMN category_id; UPDATE posts SET title = 't' WHERE id = 8",
    )
    .await;
    // Without the column, every template of the rule goes by pattern.
    wait_gone(&redis, &["post:8", "cat_posts:1", "cat_posts:2"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_patterns_delete_matching_keys_only() {
    let (db, redis) = setup("patterns").await;
    let rules = "[[rules]]\ntable = \"users\"\npatterns = [\"user:{id}:*\"]\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    let many: Vec<String> = (0..3000).map(|i| format!("user:7:page:{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    cache(&redis, &refs).await;
    cache(&redis, &["user:70:page:1", "user:7"]).await;
    db.execute_batch("UPDATE users SET name = 'p' WHERE id = 7")
        .await;
    wait_gone(&redis, &refs).await;
    assert_cached(&redis, &["user:70:page:1", "user:7"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laravel_tagged_cache_is_flushed_like_laravel_does() {
    let (db, redis) = setup("laravel").await;
    let rules = "[tags]\nlayout = \"laravel\"\nprefix = \"laravel_database_app_cache_\"\n\n[[rules]]\ntable = \"users\"\ntags = [\"user:{id}\"]\n";
    let text = config_text(&db, &redis, "").replace("\n[redis]", &format!("\n{rules}\n[redis]"));
    let cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, cfg).await;
    // What Cache::tags(['user:1'])->put('profile', ...) leaves in Redis: the item under
    // the prefix, and the tag's ZSET of entries (score = expiry, -1 for forever).
    let p = "laravel_database_app_cache_";
    let item = format!("{p}a1b2c3:profile");
    let other = format!("{p}d4e5f6:profile");
    cache(&redis, &[&item, &other]).await;
    let mut conn = redis.connection().await;
    let _: () = conn
        .zadd(format!("{p}tag:user:1:entries"), "a1b2c3:profile", -1)
        .await
        .unwrap();
    let _: () = conn
        .zadd(format!("{p}tag:user:2:entries"), "d4e5f6:profile", -1)
        .await
        .unwrap();
    db.execute_batch("UPDATE users SET name = 'l' WHERE id = 1")
        .await;
    wait_gone(&redis, &[&item, &format!("{p}tag:user:1:entries")]).await;
    assert_cached(&redis, &[&other, &format!("{p}tag:user:2:entries")]).await;
    daemon.stop().await.unwrap();
}

/// symfony/cache 6.3 and later mark tag sets with `\x01tags\x01` (layout "symfony"),
/// up to 6.2 with `\0tags\0` (layout "symfony-legacy").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symfony_tag_aware_cache_is_flushed_like_symfony_does() {
    symfony_flush("symfony", '\x01').await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symfony_6_2_tag_aware_cache_is_flushed_with_the_legacy_layout() {
    symfony_flush("symfony-legacy", '\0').await;
}

async fn symfony_flush(layout: &str, mark: char) {
    let (db, redis) = setup("symfony").await;
    let rules = format!(
        "[tags]\nlayout = \"{layout}\"\nprefix = \"app:\"\nnamespace = \"pool\"\n\n[[rules]]\ntable = \"users\"\ntags = [\"user_{{id}}\"]\n"
    );
    let text = config_text(&db, &redis, "").replace("\n[redis]", &format!("\n{rules}\n[redis]"));
    let cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::start(&db, cfg).await;
    // RedisTagAwareAdapter: item ids are "<namespace>:<key>" under the client prefix;
    // the tag set is "<namespace>:<mark>tags<mark><tag>" under the prefix, members are ids.
    let tag = |t: &str| format!("app:pool:{mark}tags{mark}{t}");
    cache(&redis, &["app:pool:profile_1", "app:pool:profile_2"]).await;
    let mut conn = redis.connection().await;
    let _: () = conn.sadd(tag("user_1"), "pool:profile_1").await.unwrap();
    let _: () = conn.sadd(tag("user_2"), "pool:profile_2").await.unwrap();
    db.execute_batch("UPDATE users SET name = 's' WHERE id = 1")
        .await;
    wait_gone(&redis, &["app:pool:profile_1", &tag("user_1")]).await;
    assert_cached(&redis, &["app:pool:profile_2", &tag("user_2")]).await;
    daemon.stop().await.unwrap();

    // `check` with the other Symfony layout finds none of its tags but these, and says
    // which setting fits.
    let other = if layout == "symfony" {
        "symfony-legacy"
    } else {
        "symfony"
    };
    let text = text.replace(
        &format!("layout = \"{layout}\""),
        &format!("layout = \"{other}\""),
    );
    let path = config_file(&db, &text);
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tag flushes would find nothing")
            && stdout.contains(&format!("layout = \"{layout}\"")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_tag_is_flushed_in_chunks() {
    let (db, redis) = setup("bigtag").await;
    let daemon = Daemon::start(&db, config(&db, &redis, crate::RULES)).await;
    let members: Vec<String> = (0..12_000).map(|i| format!("page:{i}")).collect();
    let mut conn = redis.connection().await;
    for chunk in members.chunks(1000) {
        let _: () = conn
            .mset(&chunk.iter().map(|k| (k.as_str(), "v")).collect::<Vec<_>>())
            .await
            .unwrap();
        let _: () = conn.sadd("cache_tag:user:9", chunk).await.unwrap();
    }
    db.execute_batch("UPDATE users SET name = 'b' WHERE id = 9")
        .await;
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    wait_gone(&redis, &refs).await;
    wait_gone(
        &redis,
        &["cache_tag:user:9", "cache_tag:user:9:pginval-flushing"],
    )
    .await;
    daemon.stop().await.unwrap();
}

/// A tag wildcard (TRUNCATE applies every tag template as one) flushes thousands of
/// tags, more than one SCAN page, each page in one pipeline; a big tag among them is
/// moved aside with an O(1) RENAME, not copied member by member (SUNIONSTORE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_wildcard_flushes_many_tags_and_moves_a_big_one_by_rename() {
    let (db, redis) = setup("tagpages").await;
    let daemon = Daemon::start(&db, config(&db, &redis, crate::RULES)).await;
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut gone: Vec<String> = Vec::new();
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.sadd(format!("cache_tag:category:{i}"), format!("cat_item:{i}"))
            .ignore()
            .set(format!("cat_item:{i}"), "v")
            .ignore();
        gone.push(format!("cat_item:{i}"));
        gone.push(format!("cache_tag:category:{i}"));
    }
    for j in 0..6000 {
        pipe.sadd("cache_tag:category:big", format!("big_item:{j}"))
            .ignore()
            .set(format!("big_item:{j}"), "v")
            .ignore();
        gone.push(format!("big_item:{j}"));
    }
    gone.push("cache_tag:category:big".into());
    gone.push("cache_tag:category:big:pginval-flushing".into());
    pipe.sadd("cache_tag:user:1", "keep:1")
        .ignore()
        .set("keep:1", "v")
        .ignore();
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    db.execute_batch("TRUNCATE posts").await;
    let refs: Vec<&str> = gone.iter().map(String::as_str).collect();
    wait_gone(&redis, &refs).await;
    assert_cached(&redis, &["keep:1", "cache_tag:user:1"]).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(stats.contains("cmdstat_rename:"), "{stats}");
    assert!(!stats.contains("cmdstat_sunionstore:"), "{stats}");
    daemon.stop().await.unwrap();
}

async fn pttl(redis: &Redis, key: &str) -> i64 {
    let mut conn = redis.connection().await;
    conn.pttl(key).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_action_lowers_ttls_and_never_extends_them() {
    let (db, redis) = setup("expire").await;
    let rules = "[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\naction = \"expire\"\nexpire_in = \"30s\"\n";
    if redis.major_version().await < 7 {
        // PEXPIRE ... LT is Redis 7's: check refuses the rule, naming its line, and
        // run refuses to start rather than extend TTLs or fail each batch.
        let text = config_text(&db, &redis, rules);
        let line = 1 + text.lines().position(|l| l == "[[rules]]").unwrap();
        let (code, out) = check_file(&config_file(&db, &text));
        assert_eq!(code, Some(2), "{out}");
        assert!(
            out.contains(&format!(
                ":{line}: rule #1 has action = \"expire\", which needs Redis 7"
            )),
            "{out}"
        );
        let daemon = Daemon::spawn(config(&db, &redis, rules));
        wait_until("run refuses to start", WAIT, || async { daemon.finished() }).await;
        match daemon.stop().await {
            Err(pginval::pipeline::RunError::Check(report)) => assert!(
                report
                    .problems
                    .iter()
                    .any(|p| p.message.contains("which needs Redis 7 or newer")),
                "{:?}",
                report.problems
            ),
            // Check's version query is bounded (5 s): under load run may find the
            // version only when it prepares, and refuses there.
            Err(pginval::pipeline::RunError::Replication(e))
                if e.to_string().contains("need Redis 7 or newer") => {}
            other => panic!("run must refuse the expire rule, not {other:?}"),
        }
        skipped("PEXPIRE ... LT needs Redis 7: checked the refusals instead");
        return;
    }
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    let mut conn = redis.connection().await;
    let _: () = conn.set("user:11", "no ttl").await.unwrap();
    let _: () = conn.set_ex("user:12", "long ttl", 3600).await.unwrap();
    let _: () = conn.set_ex("user:13", "short ttl", 5).await.unwrap();
    db.execute_batch("UPDATE users SET name = 'e' WHERE id IN (11, 12, 13)")
        .await;
    // One transaction, one batch: once user:11 has its TTL, the others were handled.
    wait_until("user:11 gets a TTL", WAIT, || async {
        pttl(&redis, "user:11").await > 0
    })
    .await;
    let (t11, t12, t13) = (
        pttl(&redis, "user:11").await,
        pttl(&redis, "user:12").await,
        pttl(&redis, "user:13").await,
    );
    assert!(t11 > 0 && t11 <= 30_000, "no TTL → 30 s: {t11}");
    assert!(t12 > 0 && t12 <= 30_000, "1 h → lowered to 30 s: {t12}");
    assert!(
        t13 > 0 && t13 <= 5_000,
        "5 s stays 5 s (never extended): {t13}"
    );
    assert!(
        exists(&redis, "user:11").await,
        "expire keeps serving the value"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_delete_removes_a_key_recached_from_a_stale_read() {
    let (db, redis) = setup("redelete").await;
    let rules =
        "[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\nredelete_after = \"1500ms\"\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    cache(&redis, &["user:14"]).await;
    db.execute_batch("UPDATE users SET name = 'r' WHERE id = 14")
        .await;
    wait_gone(&redis, &["user:14"]).await;
    // A reader that fetched the old row before the commit caches it just now.
    cache(&redis, &["user:14"]).await;
    wait_gone(&redis, &["user:14"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_events_go_to_pubsub_and_stream() {
    let (db, redis) = setup("events").await;
    let rules = "[events]\nchannel = \"pginval:events\"\nstream = \"pginval:stream\"\nstream_maxlen = 1000\n\n[[rules]]\ntable = \"posts\"\nkeys = [\"post:{id}\"]\nentity = \"post\"\n";
    let daemon = Daemon::start(&db, config(&db, &redis, rules)).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("pginval:events").await.unwrap();
    db.execute_batch("UPDATE posts SET author_id = 9 WHERE id = 12")
        .await;
    let msg = tokio::time::timeout(WAIT, futures_next(&mut pubsub))
        .await
        .expect("an event is published");
    let json: serde_json::Value = serde_json::from_str(&msg).unwrap();
    assert_eq!(json["entity"], "post");
    assert_eq!(json["op"], "update");
    assert_eq!(json["id"], "12");
    assert_eq!(json["fields"], serde_json::json!({"author_id": "9"}));
    assert_eq!(json["table"], "public.posts");
    assert!(json["lsn"].as_str().unwrap().contains('/'));
    assert!(json["commit_time"].as_str().unwrap().starts_with("20"));

    let mut conn = redis.connection().await;
    let entries: redis::streams::StreamRangeReply =
        conn.xrange_all("pginval:stream").await.unwrap();
    assert_eq!(entries.ids.len(), 1);
    let event: String = entries.ids[0].get("event").unwrap();
    assert_eq!(event, msg);
    daemon.stop().await.unwrap();
}

async fn futures_next(pubsub: &mut redis::aio::PubSub) -> String {
    use futures_util::StreamExt;
    let msg = pubsub.on_message().next().await.unwrap();
    msg.get_payload().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_hints_apply_at_commit_and_vanish_on_rollback() {
    let (db, redis) = setup("hints").await;
    let rules = format!(
        "[hints]\nenabled = true\nkey_prefixes = [\"report:\"]\ntag_prefixes = [\"reports\"]\n{}",
        crate::RULES
    );
    let daemon = Daemon::start(&db, config(&db, &redis, &rules)).await;
    cache(&redis, &["report:1", "report:2", "page:hinted"]).await;
    let mut conn = redis.connection().await;
    let _: () = conn.sadd("cache_tag:reports", "page:hinted").await.unwrap();
    db.execute_batch(
        "BEGIN;
         SELECT pg_logical_emit_message(true, 'pginval', '{\"keys\":[\"report:2\"]}');
         ROLLBACK;
         BEGIN;
         SELECT pg_logical_emit_message(true, 'pginval', '{\"keys\":[\"report:1\"],\"tags\":[\"reports\"]}');
         COMMIT;",
    )
    .await;
    wait_gone(&redis, &["report:1", "page:hinted"]).await;
    barrier(&db, &redis).await;
    assert_cached(&redis, &["report:2"]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_prints_what_a_change_would_do() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(bin())
        .args(["explain", "--config"])
        .arg(root.join("rules.toml"))
        .args([
            "--table",
            "posts",
            "--op",
            "update",
            "--old",
            r#"{"id":1,"author_id":3,"category_id":1}"#,
            "--new",
            r#"{"id":1,"author_id":7,"category_id":2}"#,
        ])
        .env("PGINVAL_SOURCE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for line in [
        "delete key      post:1",
        "delete key      user_posts:3",
        "delete key      user_posts:7",
        "flush tag       category:1",
        "flush tag       category:2",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_touches_neither_redis_nor_the_slot() {
    let (db, redis) = setup("dryrun").await;
    // The real slot and publication exist (a real run made them) and stay put.
    let daemon = Daemon::start(&db, config(&db, &redis, crate::RULES)).await;
    daemon.stop().await.unwrap();
    let before = confirmed_lsn(&db).await;
    let port = crate::support::free_port();
    let text = crate::suite::ops::with_metrics(&config_text(&db, &redis, crate::RULES), port);
    let mut cfg = pginval::config::Config::parse(std::path::Path::new("t.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    cfg.dry_run = true;
    let dry = Daemon::spawn(cfg);
    let client = db.client().await;
    wait_until("the dry run streams from a temporary slot", WAIT, || async {
        client
            .query_opt(
                // A slot being created is active too, before its consistent point (its
                // walsender is still in `startup`): wait for START_REPLICATION.
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
                  WHERE s.temporary AND s.slot_name LIKE $1 AND r.state <> 'startup'",
                &[&format!("{}_dry_run_%", db.name)],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
    })
    .await;
    cache(&redis, &["user:15"]).await;
    db.execute_batch("UPDATE users SET name = 'dry' WHERE id = 15")
        .await;
    // The dry run has handled the change once the users rule rendered its keys and
    // a batch counts as applied (where a real run would have deleted the key).
    wait_until("the dry run handled the change", WAIT, || async {
        let Some((_, metrics)) = crate::suite::ops::get(port, "/metrics").await else {
            return false;
        };
        crate::suite::ops::sample(
            &metrics,
            "pginval_keys_invalidated_total{rule=\"#1 public.users\"}",
        ) >= 2.0
            && crate::suite::ops::sample(&metrics, "pginval_commit_to_invalidation_seconds_count")
                >= 1.0
    })
    .await;
    assert_cached(&redis, &["user:15"]).await;
    dry.stop().await.unwrap();
    assert_eq!(
        confirmed_lsn(&db).await,
        before,
        "a dry run must not move the slot"
    );
    // A real run afterwards still sees the change.
    let daemon = Daemon::start(&db, config(&db, &redis, crate::RULES)).await;
    wait_gone(&redis, &["user:15"]).await;
    daemon.stop().await.unwrap();
}

/// The publication's row filter for a table, as PostgreSQL prints it.
async fn published_row_filter(db: &crate::support::TestDb, table: &str) -> Option<String> {
    db.client()
        .await
        .query_one(
            "SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'pginval' AND tablename = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0)
}

/// `where` becomes the publication's row filter: rows outside it are never sent, rows
/// that enter or leave it (sent as INSERT / DELETE) still invalidate; check refuses a
/// filter PostgreSQL would refuse and one whose columns the replica identity lacks; a
/// changed `where` updates the managed publication on the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_becomes_the_publication_row_filter() {
    if !crate::support::requires_pg(15, "publication row filters (`where`)") {
        return;
    }
    let (db, redis) = setup("rowfilter").await;
    // users.role is not in users' REPLICA IDENTITY (the primary key); random() is volatile.
    let bad = "[[rules]]\ntable = \"users\"\nkeys = [\"user:{id}\"]\nwhere = \"role = 'admin'\"\n\n[[rules]]\ntable = \"posts\"\nkeys = [\"post:{id}\"]\nwhere = \"random() > 0.5\"\n";
    let path = config_file(&db, &config_text(&db, &redis, bad));
    let out = crate::pginval(&["check"], &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains(&format!("{}:8: rule #1", path.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("`role`")
            && stdout.contains("ALTER TABLE \"public\".\"users\" REPLICA IDENTITY FULL;"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{}:13: rule #2", path.display()))
            && stdout.contains("refuses `where`"),
        "{stdout}"
    );

    let rules = |filter: &str| {
        format!(
            "[[rules]]\ntable = \"users\"\nkeys = [\"user:{{id}}\"]\n\n[[rules]]\ntable = \"posts\"\nkeys = [\"post:{{id}}\"]\nwhere = \"{filter}\"\n"
        )
    };
    let daemon = Daemon::start(&db, config(&db, &redis, &rules("category_id = 1"))).await;
    assert_eq!(
        published_row_filter(&db, "posts").await.as_deref(),
        Some("(category_id = 1)")
    );
    assert_eq!(published_row_filter(&db, "users").await, None);
    // post 3 is in category 0, post 4 in category 1.
    cache(&redis, &["post:3", "post:4"]).await;
    db.execute_batch("UPDATE posts SET title = 'x' WHERE id IN (3, 4)")
        .await;
    wait_gone(&redis, &["post:4"]).await;
    barrier(&db, &redis).await;
    assert_cached(&redis, &["post:3"]).await;
    // Leaving the filter arrives as a DELETE, entering it as an INSERT.
    cache(&redis, &["post:4"]).await;
    db.execute_batch("UPDATE posts SET category_id = 2 WHERE id = 4")
        .await;
    wait_gone(&redis, &["post:4"]).await;
    db.execute_batch("UPDATE posts SET category_id = 1 WHERE id = 3")
        .await;
    wait_gone(&redis, &["post:3"]).await;
    daemon.stop().await.unwrap();

    // Changes made while pginval was away are decoded with the filter of their time:
    // the changed table's fallback (post:*) runs once after the publication changes.
    cache(&redis, &["post:50"]).await;
    let daemon = Daemon::start(&db, config(&db, &redis, &rules("category_id = 2"))).await;
    assert_eq!(
        published_row_filter(&db, "posts").await.as_deref(),
        Some("(category_id = 2)")
    );
    wait_gone(&redis, &["post:50"]).await;
    let marker = format!("pginval:publication-changed:{}:{}", db.name, db.name);
    let owed: bool = redis
        .state_connection()
        .await
        .exists(&marker)
        .await
        .unwrap();
    assert!(!owed);
    cache(&redis, &["post:4", "post:3"]).await;
    db.execute_batch("UPDATE posts SET title = 'y' WHERE id IN (3, 4)")
        .await;
    wait_gone(&redis, &["post:4"]).await;
    barrier(&db, &redis).await;
    assert_cached(&redis, &["post:3"]).await;
    daemon.stop().await.unwrap();
}
