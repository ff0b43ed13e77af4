//! Flushing tags by pattern (what TRUNCATE, or a tag template whose value was not
//! sent, does): pginval's sink against the straightforward way, side by side on one
//! redis-server.
//!
//! The reference collects every matching tag key first (SCAN) and then flushes them
//! one round trip each (SMEMBERS + UNLINK in one script per tag) — what pginval did
//! before it flushed page by page. Both are timed until the last tag and member is
//! gone (checked with DBSIZE), over the same data, alternating, several runs.
//!
//! `cargo bench --bench tag_flush [-- TAGS RUNS]` (default 20000 tags, 5 runs); needs
//! `redis-server` on PATH (or PGINVAL_TEST_REDIS_SERVER).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pginval::metrics::{Health, Metrics};
use pginval::rules::invalidation::Work;
use pginval::sink::redis::RedisSink;
use pginval::sink::tags::TagLayout;

const REFERENCE_LUA: &str = "local m = redis.call('SMEMBERS', KEYS[1]) \
    for i = 1, #m, 500 do redis.call('UNLINK', unpack(m, i, math.min(i + 499, #m))) end \
    redis.call('UNLINK', KEYS[1]) return #m";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> (Server, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let program =
        std::env::var("PGINVAL_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let child = Command::new(program)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting redis-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Server(child), port)
}

async fn fill(conn: &mut redis::aio::MultiplexedConnection, tags: usize) {
    let mut pipe = redis::pipe();
    for i in 0..tags {
        pipe.cmd("SADD")
            .arg(format!("cache_tag:category:{i}"))
            .arg(format!("item:{i}"))
            .ignore()
            .cmd("SET")
            .arg(format!("item:{i}"))
            .arg("v")
            .ignore();
        if pipe.len() >= 10_000 {
            let _: () = pipe.query_async(conn).await.unwrap();
            pipe = redis::pipe();
        }
    }
    if !pipe.is_empty() {
        let _: () = pipe.query_async(conn).await.unwrap();
    }
}

async fn dbsize(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis::cmd("DBSIZE").query_async(conn).await.unwrap()
}

async fn reference(conn: &mut redis::aio::MultiplexedConnection) {
    let mut found = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("cache_tag:category:*")
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("set")
            .query_async(conn)
            .await
            .unwrap();
        found.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let script = redis::Script::new(REFERENCE_LUA);
    for key in &found {
        let _: i64 = script.key(key).invoke_async(conn).await.unwrap();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this too, without
    // it: then only a small smoke run (both ways still checked to leave nothing).
    let benching = std::env::args().any(|a| a == "--bench");
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (default_tags, default_runs) = if benching { (20_000, 5) } else { (500, 1) };
    let tags: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(default_tags);
    let runs: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default_runs);
    let (_server, port) = start_redis();
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut sink = RedisSink::new(
        vec![redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap()],
        pginval::config::Topology::Node,
        None,
        &Default::default(),
        TagLayout::Set {
            key: "cache_tag:{tag}".into(),
        },
        None,
        false,
        Arc::new(Metrics::new()),
        Arc::new(Health::new(Duration::from_secs(60))),
    )
    .unwrap();
    let mut inv = Work::default();
    inv.tag_patterns.insert("category:*".into());
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        fill(&mut conn, tags).await;
        let t = Instant::now();
        sink.apply(&inv, &[]).await.unwrap();
        assert_eq!(dbsize(&mut conn).await, 0, "pginval left keys behind");
        ours.push(t.elapsed().as_secs_f64());

        fill(&mut conn, tags).await;
        let t = Instant::now();
        reference(&mut conn).await;
        assert_eq!(dbsize(&mut conn).await, 0, "the reference left keys behind");
        theirs.push(t.elapsed().as_secs_f64());
    }
    let (ours, theirs) = (median(ours), median(theirs));
    println!("tag pattern flush of {tags} tags (1 member each), median of {runs} runs");
    println!("  pginval (page by page, one pipeline per SCAN page): {ours:.3} s");
    println!("  reference (collect all, one round trip per tag):    {theirs:.3} s");
    println!("  ratio pginval / reference: {:.2}", ours / theirs);
}
