//! A Sentinel-managed Redis for a test: a primary, its replica and three Sentinels
//! (master name `pgm`), on free ports, stopped and removed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::cluster::{kill_server, node_connection, signal_server, wait_replicas_online};
use super::{free_port, ping, tail};

/// The master's name at the Sentinels.
pub const MASTER: &str = "pgm";

/// One running primary + replica + 3 Sentinels.
pub struct RedisSentinel {
    dir: PathBuf,
    /// (port, process) of the primary, the replica, then the Sentinels.
    nodes: Vec<(u16, Option<Child>)>,
}

impl RedisSentinel {
    /// Starts the servers and waits until every Sentinel knows the master, its replica
    /// and the two other Sentinels (60 s at most).
    pub fn start() -> RedisSentinel {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pginval-test-sentinel-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the sentinel directory");
        let mut set = RedisSentinel {
            dir,
            nodes: Vec::new(),
        };
        let primary = free_port();
        let child = set.spawn(primary, &[]);
        set.nodes.push((primary, Some(child)));
        let replica = free_port();
        let child = set.spawn(
            replica,
            &[
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.to_string(),
            ],
        );
        set.nodes.push((replica, Some(child)));
        wait_replicas_online(primary, 1, Duration::from_secs(60));
        for _ in 0..3 {
            let port = free_port();
            let conf = set.dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER} 127.0.0.1 {primary} 2\nsentinel down-after-milliseconds {MASTER} 3000\nsentinel failover-timeout {MASTER} 5000\n",
                    set.dir.display()
                ),
            )
            .expect("writing a sentinel config");
            let child = set.spawn_sentinel(port, &conf);
            set.nodes.push((port, Some(child)));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = set.sentinel_ports().iter().all(|s| {
                let replicas = redis_cli(*s, &["sentinel", "replicas", MASTER]);
                let others = redis_cli(*s, &["sentinel", "sentinels", MASTER]);
                replicas.contains(&replica.to_string()) && others.matches("127.0.0.1").count() >= 2
            });
            if ready {
                return set;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not all see the master, its replica and each other"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Port of the first primary.
    pub fn primary(&self) -> u16 {
        self.nodes[0].0
    }

    /// Port of the first replica.
    pub fn replica(&self) -> u16 {
        self.nodes[1].0
    }

    /// Ports of the Sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.nodes[2..].iter().map(|(p, _)| *p).collect()
    }

    /// The `[redis]` lines for pginval: the master's name and the Sentinels.
    pub fn redis_section(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinel_ports()
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        format!(
            "sentinel_master = \"{MASTER}\"\nsentinels = [{}]\n",
            sentinels.join(", ")
        )
    }

    /// The port of the master as the first running Sentinel names it.
    pub fn master_port(&self) -> Option<u16> {
        let out = redis_cli(
            self.sentinel_ports()[0],
            &["sentinel", "get-master-addr-by-name", MASTER],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// A plain connection to the server on `port`.
    pub async fn node(&self, port: u16) -> redis::aio::MultiplexedConnection {
        node_connection(port).await
    }

    /// Kills the server on `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        kill_server(&mut self.nodes, port);
    }

    /// Sends `signal` (like "STOP" or "CONT") to the server on `port`.
    pub fn signal(&self, port: u16, signal: &str) {
        signal_server(&self.nodes, port, signal);
    }

    fn program() -> PathBuf {
        std::env::var_os("PGINVAL_TEST_REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"))
    }

    fn spawn(&self, port: u16, extra: &[String]) -> Child {
        let log = self.dir.join(format!("redis-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("creating the server log");
        let mut child = Command::new(Self::program())
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            // The replica gets its first copy at once, not after Redis' default 5 s.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(extra)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("the server log"))
            .stderr(log_file)
            .spawn()
            .expect("running redis-server");
        wait_up(&mut child, port, &log);
        child
    }

    fn spawn_sentinel(&self, port: u16, conf: &std::path::Path) -> Child {
        let log = self.dir.join(format!("sentinel-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("creating the sentinel log");
        let mut child = Command::new(Self::program())
            .arg(conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("the sentinel log"))
            .stderr(log_file)
            .spawn()
            .expect("running redis-server --sentinel");
        wait_up(&mut child, port, &log);
        child
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for port in self.nodes.iter().map(|(p, _)| *p).collect::<Vec<_>>() {
            kill_server(&mut self.nodes, port);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until the server on `port` answers PING (10 s at most).
fn wait_up(child: &mut Child, port: u16, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ping(port) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server {port} exited with {status}:\n{}", tail(log, 20));
        }
        assert!(
            Instant::now() < deadline,
            "server {port} did not answer:\n{}",
            tail(log, 20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `redis-cli -p port <args>`: what it printed ("" when it could not run).
fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
