//! Unit tests of `rules.toml` loading and validation.
use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("rules.toml"), text, |_| None)
}

const GOOD: &str = r#"
[source]
url = "postgres://postgres@127.0.0.1:5432/app"

[[rules]]
table = "users"
keys = ["user:{id}", "user_full:{id}"]
tags = ["user:{id}"]

[[rules]]
table = "blog.posts"
keys = ["post:{id}", "user_posts:{author_id}"]
"#;

#[test]
fn a_good_file_loads_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.source.slot, "pginval");
    assert_eq!(c.source.publication, "pginval");
    assert_eq!(
        c.tags,
        TagLayout::Set {
            key: "cache_tag:{tag}".into()
        }
    );
    assert_eq!(c.redis.addr().to_string(), "127.0.0.1:6379");
    assert_eq!(c.rules.rules.len(), 2);
    assert_eq!(c.rules.rules[1].schema, "blog");
    assert_eq!(c.rules.rules[1].line, 10);
}

#[test]
fn streaming_defaults_to_on_with_8mb_and_a_bad_size_is_a_problem_on_its_line() {
    let c = parse(GOOD).unwrap();
    assert!(c.source.streaming);
    assert_eq!(c.source.decoding_work_mem_kb, Some(8192));
    assert_eq!(c.max_streamed_entries, 1_000_000);
    let server = GOOD.replace(
        "[source]\n",
        "[source]\nlogical_decoding_work_mem = \"server\"\n",
    );
    assert_eq!(parse(&server).unwrap().source.decoding_work_mem_kb, None);
    let bad = GOOD.replace(
        "[source]\n",
        "[source]\nlogical_decoding_work_mem = \"8 MiB\"\n",
    );
    let err = parse(&bad).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].line, Some(3));
    assert!(err.problems[0].message.contains("\"8 MiB\""), "{err}");
}

#[test]
fn a_cluster_takes_seed_nodes_and_keeps_pginvals_state_in_its_one_database() {
    let text = format!(
        "[redis]\nurl = \"redis://:pw@10.0.0.1:7000\"\ncluster = true\nnodes = [\"10.0.0.2:7000\", \"redis://10.0.0.3:7000\"]\n{GOOD}"
    );
    let c = parse(&text).unwrap();
    assert!(c.redis_cluster);
    let seeds: Vec<String> = c
        .redis_seeds()
        .iter()
        .map(|s| s.addr().to_string())
        .collect();
    assert_eq!(seeds, ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]);
    // The URL's password applies to every seed.
    assert!(
        c.redis_seeds()
            .iter()
            .all(|s| s.redis_settings().password() == Some("pw"))
    );
    assert_eq!(c.state_seeds().len(), 3);
    assert_eq!(c.state_redis.redis_settings().db(), 0);
    // There, a hint that every prefix allows still cannot delete pginval's state.
    let open = format!("{text}\n[hints]\nenabled = true\nkey_prefixes = [\"\"]\n");
    let c = parse(&open).unwrap();
    assert!(c.hints.refusal(&["report:1".into()], &[]).is_none());
    let refused = c
        .hints
        .refusal(&["pginval:slot-state:app:pginval".into()], &[]);
    assert!(refused.is_some_and(|r| r.contains("pginval's own state")));
}

#[test]
fn sentinel_needs_a_master_name_and_sentinels_and_excludes_cluster() {
    let text = format!(
        "[redis]\nsentinel_master = \"pgm\"\nsentinels = [\"10.0.0.5:26379\", \"redis://10.0.0.6:26379\"]\n{GOOD}"
    );
    let c = parse(&text).unwrap();
    match c.redis_topology() {
        Topology::Sentinel(s) => {
            assert_eq!(s.master, "pgm");
            let addrs: Vec<String> = s.sentinels.iter().map(|i| i.addr().to_string()).collect();
            assert_eq!(addrs, ["10.0.0.5:26379", "10.0.0.6:26379"]);
        }
        other => panic!("{other:?}"),
    }
    for (text, line, message) in [
        (
            "sentinel_master = \"pgm\"\n",
            2,
            "sentinels names no Sentinel",
        ),
        (
            "sentinels = [\"10.0.0.5:26379\"]\n",
            2,
            "sentinel_master is not set",
        ),
        (
            "cluster = true\nsentinel_master = \"pgm\"\nsentinels = [\"h:1\"]\n",
            3,
            "exclude each other",
        ),
    ] {
        let e = parse(&format!("[redis]\n{text}{GOOD}")).unwrap_err();
        assert!(
            e.problems[0].line == Some(line) && e.problems[0].message.contains(message),
            "{e}"
        );
    }
}

#[test]
fn a_cluster_refuses_databases_and_nodes_need_cluster() {
    let text = format!(
        "[redis]\nurl = \"redis://10.0.0.1:7000/2\"\ncluster = true\n\n[state]\nredis_db = 15\n{GOOD}"
    );
    let e = parse(&text).unwrap_err();
    let messages: Vec<(Option<usize>, &str)> = e
        .problems
        .iter()
        .map(|p| (p.line, p.message.as_str()))
        .collect();
    assert!(
        messages[0].0 == Some(2)
            && messages[0]
                .1
                .contains("a Redis Cluster has database 0 only"),
        "{e}"
    );
    assert!(
        messages[1].0 == Some(6) && messages[1].1.contains("[state] redis_db does not apply"),
        "{e}"
    );
    let text = format!(
        "[redis]\nreplay_window = \"soon\"\nwait_replicas = 1\nwait_timeout = \"0s\"\n{GOOD}"
    );
    let e = parse(&text).unwrap_err();
    assert!(
        e.problems[0].line == Some(2)
            && e.problems[0]
                .message
                .contains("replay_window \"soon\" is not a duration"),
        "{e}"
    );
    assert!(
        e.problems[1].line == Some(4) && e.problems[1].message.contains("wait_timeout is 0"),
        "{e}"
    );
    let ok = parse(&format!(
        "[redis]\nreplay_window = \"0s\"\nwait_replicas = 2\n{GOOD}"
    ))
    .unwrap();
    assert_eq!(ok.redis_durability.replay_window, Duration::ZERO);
    assert_eq!(ok.redis_durability.wait_replicas, 2);
    assert_eq!(parse(GOOD).unwrap().redis_durability, Durability::default());
    let text = format!("[redis]\nnodes = [\"10.0.0.2:7000\", \"no such:port\"]\n{GOOD}");
    let e = parse(&text).unwrap_err();
    assert!(
        e.problems
            .iter()
            .any(|p| p.message.contains("cluster is not set")),
        "{e}"
    );
    assert!(
        e.problems
            .iter()
            .any(|p| p.message.contains("is not a Redis address")),
        "{e}"
    );
}

#[test]
fn state_lives_in_its_own_database_and_hints_are_off_by_default() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.state_redis.redis_settings().db(), 15);
    assert_eq!(c.state_redis.addr().to_string(), "127.0.0.1:6379");
    assert!(c.hints.refusal(&["report:1".into()], &[]).is_some());
    let same = format!("[state]\nredis_db = 0\n{GOOD}");
    let e = parse(&same).unwrap_err();
    assert!(
        e.problems[0].message.contains("the cache's own database"),
        "{e}"
    );
    let open = format!("[hints]\nenabled = true\n{GOOD}");
    let e = parse(&open).unwrap_err();
    assert!(
        e.problems[0]
            .message
            .contains("every hint would be refused"),
        "{e}"
    );
}

#[test]
fn redelete_after_with_expire_is_refused_not_ignored() {
    let text = format!(
        "{GOOD}\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\naction = \"expire\"\nexpire_in = \"5s\"\nredelete_after = \"1s\"\n"
    );
    let e = parse(&text).unwrap_err();
    assert!(
        e.problems
            .iter()
            .any(|p| p.message.contains("never deletes them")
                && p.line.is_some()
                && p.fix.is_some()),
        "{e}"
    );
}

#[test]
fn fence_needs_deleted_keys_and_a_ttl_a_fill_can_live_with() {
    let text = format!(
        "[redis]\nfence_ttl = \"1s\"\n{GOOD}\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\naction = \"expire\"\nexpire_in = \"5s\"\nfence = true\n\n[[rules]]\ntable = \"users\"\ntags = [\"t:{{id}}\"]\nfence = true\n"
    );
    let e = parse(&text).unwrap_err();
    let lines = text.lines().collect::<Vec<_>>();
    for needle in [
        "fence_ttl 1s is under 2 s",
        "never deletes its keys",
        "but it has none",
    ] {
        let p = e
            .problems
            .iter()
            .find(|p| p.message.contains(needle))
            .unwrap_or_else(|| panic!("no problem says {needle:?}: {e}"));
        assert!(p.fix.is_some(), "{e}");
        let line = lines[p.line.expect("a line") - 1];
        assert!(line.contains("fence"), "{needle:?} points at {line:?}");
    }
    let ok = parse(&format!(
        "[redis]\nfence_ttl = \"2m\"\n{GOOD}\n[[rules]]\ntable = \"users\"\nkeys = [\"u:{{id}}\"]\nfence = true\n"
    ))
    .unwrap();
    assert_eq!(ok.redis_durability.fence_ttl, Duration::from_secs(120));
    let e = parse(&format!("[redis]\nfence_ttl = \"2days\"\n{GOOD}")).unwrap_err();
    assert!(
        e.problems[0].message.contains("is over a day") && e.problems[0].line == Some(2),
        "{e}"
    );
    assert!(ok.rules.rules.iter().any(|r| r.fence));
    assert!(!parse(GOOD).unwrap().rules.rules.iter().any(|r| r.fence));
}

#[test]
fn environment_overrides_urls() {
    let c = Config::parse(Path::new("r.toml"), GOOD, |k| match k {
        ENV_SOURCE_URL => Some("postgres://u@db:5433/other".into()),
        ENV_REDIS_URL => Some("redis://cache:6380/2".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(c.source.pg.get_dbname(), Some("other"));
    assert_eq!(c.redis.addr().to_string(), "cache:6380");
    assert_eq!(c.redis.redis_settings().db(), 2);
}

#[test]
fn every_problem_is_reported_at_once_with_its_line() {
    let text = r#"
[source]
url = "postgres://postgres@127.0.0.1:5432/app"
slot = "Bad-Slot"

[tags]
key = "no_placeholder"

[[rules]]
tabel = "users"

[[rules]]
table = "posts"
keys = ["post:{id"]
"#;
    let err = parse(text).unwrap_err();
    let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![Some(4), Some(7), Some(10), Some(14)], "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("rules.toml:10: rule #1: unknown field `tabel`"),
        "{shown}"
    );
    assert!(shown.contains("unclosed '{'"), "{shown}");
    assert!(shown.contains("fix: "), "{shown}");
}

#[test]
fn a_row_filter_needs_insert_and_delete_beside_update() {
    let text = r#"
[source]
url = "postgres://postgres@127.0.0.1:5432/app"

[[rules]]
table = "posts"
keys = ["post:{id}"]
where = "status = 'published'"

[[rules]]
table = "posts"
keys = ["post_title:{id}"]
on = ["update"]
where = "status = 'published'"

[[rules]]
table = "users"
keys = ["user:{id}"]
where = " "
"#;
    let err = parse(text).unwrap_err();
    let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![Some(14), Some(19)], "{err}");
    let shown = err.to_string();
    assert!(shown.contains("arrives as a DELETE"), "{shown}");
    assert!(shown.contains("`where` is empty"), "{shown}");
    let ok = parse(
        &text[..text
            .find("[[rules]]\ntable = \"posts\"\nkeys = [\"post_title")
            .unwrap()],
    )
    .unwrap();
    assert_eq!(
        ok.rules.rules[0].row_filter.as_deref(),
        Some("status = 'published'")
    );
}

#[test]
fn toml_syntax_errors_name_the_line() {
    let err = parse("[source]\nurl = \"x\n").unwrap_err();
    assert_eq!(err.problems[0].line, Some(2));
}

#[test]
fn missing_source_url_and_rules_are_problems() {
    let err = parse("").unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(
        redact("postgres://u:secret@h:5432/d"),
        "postgres://u:***@h:5432/d"
    );
    assert_eq!(
        redact("host=h password=secret user=u"),
        "host='h' password=*** user='u'"
    );
    assert_eq!(
        redact("host=h password = 'se cret' user=u"),
        "host='h' password=*** user='u'"
    );
    assert_eq!(
        redact("postgres://h/d?user=u&password=secret&sslmode=require"),
        "postgres://h/d?user=u&password=***&sslmode=require"
    );
    assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
}

#[test]
fn config_fuzz_corpus_and_regressions_parse_without_panic() {
    for (path, bytes) in crate::fuzz_inputs::fuzz_inputs("config_parse") {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let result = std::panic::catch_unwind(|| {
                Config::parse(&path, text, |_| None).map_err(|e| e.to_string())
            });
            assert!(result.is_ok(), "{} panicked", path.display());
        }
    }
}
