//! A Redis Cluster for a test: three primaries with one replica each, started on free
//! ports (`redis-server --cluster-enabled yes` × 6, joined by `redis-cli --cluster
//! create`), stopped and removed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{free_port, ping, tail};

/// How long a node may be silent before the others fail it over: Redis' default. The
/// failover tests promote by hand (`CLUSTER FAILOVER TAKEOVER`); a short timeout made
/// a loaded CI machine fail nodes over by itself (seen at 2 s).
const NODE_TIMEOUT_MS: u32 = 15_000;

/// One running cluster.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<(u16, Option<Child>)>,
}

impl RedisCluster {
    /// Starts three primaries and three replicas and waits until the cluster is ok
    /// and every node sees every slot served (60 s at most).
    pub fn start() -> RedisCluster {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pginval-test-cluster-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the cluster directory");
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
        };
        for _ in 0..6 {
            let port = cluster_port();
            let child = cluster.spawn(port);
            cluster.nodes.push((port, Some(child)));
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok(Duration::from_secs(60));
        // A replica listed in CLUSTER NODES may not have its first copy yet (WAIT
        // then counts none): the tests that lose a delete on purpose need it online.
        for primary in cluster.primaries() {
            wait_replicas_online(primary, 1, Duration::from_secs(60));
        }
        cluster
    }

    /// `redis://127.0.0.1:PORT` of the first node (a seed).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].0)
    }

    /// The `[redis]` lines for pginval: the seed URL, `cluster = true` and the other
    /// nodes as further seeds.
    pub fn redis_section(&self) -> String {
        let others: Vec<String> = self.nodes[1..]
            .iter()
            .map(|(p, _)| format!("\"127.0.0.1:{p}\""))
            .collect();
        format!("cluster = true\nnodes = [{}]\n", others.join(", "))
    }

    /// Ports of the nodes, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|(p, _)| *p).collect()
    }

    /// A cluster connection for the test's own reads and writes.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect();
        redis::cluster::ClusterClient::builder(seeds)
            .connection_timeout(Duration::from_secs(10))
            .response_timeout(Duration::from_secs(10))
            .build()
            .expect("a valid cluster client")
            .get_async_connection()
            .await
            .expect("connecting to the test cluster")
    }

    /// A plain connection to the node on `port`.
    pub async fn node(&self, port: u16) -> redis::aio::MultiplexedConnection {
        node_connection(port).await
    }

    /// Ports of the nodes that are primaries serving slots now, as `CLUSTER NODES` of
    /// the first running node says.
    pub fn primaries(&self) -> Vec<u16> {
        let ask = self
            .nodes
            .iter()
            .find(|(_, c)| c.is_some())
            .expect("a node runs")
            .0;
        primaries_in(&self.cluster_nodes(ask))
    }

    /// The ports of the primary serving `key`'s slot and of its replica.
    pub fn owner_of(&self, key: &str) -> (u16, u16) {
        let ask = self
            .nodes
            .iter()
            .find(|(_, c)| c.is_some())
            .expect("a node runs")
            .0;
        let slot: u16 = cluster_command(ask, &["keyslot", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number");
        let nodes = self.cluster_nodes(ask);
        let port_of = |line: &str| -> u16 {
            let addr = line.split_whitespace().nth(1).expect("an address");
            addr.split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .expect("a port")
        };
        let primary = nodes
            .lines()
            .find(|l| {
                role_of(l) == Some("master")
                    && l.split_whitespace().skip(8).any(|range| {
                        let (a, b) = range.split_once('-').unwrap_or((range, range));
                        matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                    })
            })
            .expect("a primary serves the slot");
        let id = primary.split_whitespace().next().expect("an id");
        let replica = nodes
            .lines()
            .find(|l| role_of(l) == Some("slave") && l.split_whitespace().nth(3) == Some(id))
            .expect("the primary has a replica");
        (port_of(primary), port_of(replica))
    }

    /// How many slots the node on `port` serves, as it says itself.
    pub fn slot_count(&self, port: u16) -> usize {
        cluster_command(port, &["nodes"])
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .nth(2)
                    .is_some_and(|f| f.contains("myself"))
            })
            .map(|l| {
                l.split_whitespace()
                    .skip(8)
                    .filter(|r| !r.starts_with('['))
                    .map(|r| match r.split_once('-') {
                        Some((a, b)) => {
                            b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0)
                        }
                        None => 1,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Whether the node on `port` is a primary serving slots and sees the cluster ok.
    pub fn serves_as_primary(&self, port: u16) -> bool {
        let out = cluster_command(port, &["info"]);
        out.contains("cluster_state:ok") && primaries_in(&self.cluster_nodes(port)).contains(&port)
    }

    /// `redis-cli -p port CLUSTER NODES`.
    fn cluster_nodes(&self, port: u16) -> String {
        cluster_command(port, &["nodes"])
    }

    /// Runs `redis-cli --cluster <args>` against the first running node and returns
    /// whether it succeeded, with its output.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let ask = self
            .nodes
            .iter()
            .find(|(_, c)| c.is_some())
            .expect("a node runs")
            .0;
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg(args[0])
            .arg(format!("127.0.0.1:{ask}"))
            .args(&args[1..])
            .output()
            .expect("running redis-cli --cluster");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Node id of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        cluster_command(port, &["myid"]).trim().to_owned()
    }

    /// Kills the node on `port` (SIGKILL: what it had not replicated is lost).
    pub fn kill(&mut self, port: u16) {
        kill_server(&mut self.nodes, port);
    }

    /// Starts the killed node on `port` again with its cluster configuration: a former
    /// primary whose slots were taken over comes back as a replica of the new owner.
    /// Returns once the node answers.
    pub fn restart(&mut self, port: u16) {
        let at = self
            .nodes
            .iter()
            .position(|(p, _)| *p == port)
            .expect("a node of this cluster");
        self.nodes[at].1 = Some(self.spawn(port));
    }

    /// Waits until the primary on `port` has `count` replicas past their first copy.
    pub fn wait_replicas_online(&self, port: u16, count: usize) {
        wait_replicas_online(port, count, Duration::from_secs(60));
    }

    /// Sends `signal` (like "STOP" or "CONT") to the node on `port`.
    pub fn signal(&self, port: u16, signal: &str) {
        signal_server(&self.nodes, port, signal);
    }

    /// Waits until every running node says `cluster_state:ok` and agrees on the
    /// primaries of all 16384 slots, and `redis-cli --cluster check` finds nothing.
    pub fn wait_ok(&self, timeout: Duration) {
        self.wait_state(timeout, true);
    }

    /// Like [`RedisCluster::wait_ok`] without `redis-cli --cluster check`, which (Debian's
    /// redis-cli 7.0) keeps seeing a slot a resharding moved as open on a Valkey
    /// replica.
    pub fn wait_serving(&self, timeout: Duration) {
        self.wait_state(timeout, false);
    }

    fn wait_state(&self, timeout: Duration, with_check: bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<u16> = self
                .nodes
                .iter()
                .filter(|(_, c)| c.is_some())
                .map(|(p, _)| *p)
                .collect();
            let ok = running.iter().all(|p| {
                let out = cluster_command(*p, &["info"]);
                // A node that is to become a replica starts as a primary without
                // slots: ok once each node sees three primaries and every replica.
                let nodes = self.cluster_nodes(*p);
                out.contains("cluster_state:ok")
                    && out.contains("cluster_slots_ok:16384")
                    && primaries_in(&nodes).len() == 3
                    && nodes
                        .lines()
                        .filter(|l| role_of(l) == Some("slave"))
                        .count()
                        == running.len() - 3
            });
            if ok && (!with_check || self.cli(&["check"]).0) {
                return;
            }
            if Instant::now() >= deadline {
                let logs: String = running
                    .iter()
                    .map(|p| tail(&self.dir.join(format!("redis-{p}.log")), 10))
                    .collect();
                panic!("the test cluster did not become ok within {timeout:?}:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn(&self, port: u16) -> Child {
        let program = std::env::var_os("PGINVAL_TEST_REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let log = self.dir.join(format!("redis-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("creating the node log");
        let mut child = Command::new(&program)
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            // Replicas get their first copy at once, not after Redis' default 5 s.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("the node log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(port) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "cluster node {port} exited with {status}:\n{}",
                    tail(&log, 20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "cluster node {port} did not answer:\n{}",
                tail(&log, 20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for port in self.nodes.iter().map(|(p, _)| *p).collect::<Vec<_>>() {
            kill_server(&mut self.nodes, port);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain connection to the server on `port`, with generous timeouts.
pub(super) async fn node_connection(port: u16) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("a valid URL")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("connecting to {port}: {e}"))
}

/// Waits (5 s at most) until one replica has every write made so far on `primary`
/// (`WAIT 1`), and asserts it did: `what` says what the replica must hold.
pub async fn assert_replicated(primary: &mut redis::aio::MultiplexedConnection, what: &str) {
    let replicated: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query_async(primary)
        .await
        .unwrap();
    assert_eq!(replicated, 1, "the replica has {what}");
}

/// Kills (SIGKILL) and reaps the server on `port` among `servers`, if it runs.
pub(super) fn kill_server(servers: &mut [(u16, Option<Child>)], port: u16) {
    for (p, child) in servers {
        if *p == port
            && let Some(mut c) = child.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `signal` (like "STOP" or "CONT") to the running server on `port`.
pub(super) fn signal_server(servers: &[(u16, Option<Child>)], port: u16, signal: &str) {
    let (_, child) = servers
        .iter()
        .find(|(p, _)| *p == port)
        .expect("a server of this set");
    let pid = child.as_ref().expect("the server runs").id();
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Waits until the primary on `port` reports `count` replicas online, that is past
/// their first full copy (`INFO replication`).
pub(super) fn wait_replicas_online(port: u16, count: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "replication"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let online = out
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count();
        if online >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the primary on {port} has {online} of {count} replicas online after {timeout:?}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `redis-cli -p port CLUSTER <args>`: what it printed ("" when it could not run).
fn cluster_command(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster"])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The ports of the primaries serving slots in a `CLUSTER NODES` reply.
fn primaries_in(nodes: &str) -> Vec<u16> {
    nodes
        .lines()
        .filter(|l| role_of(l) == Some("master") && l.split_whitespace().count() > 8)
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|addr| addr.split(['@', ':']).nth(1)?.parse().ok())
        .collect()
}

/// "master" or "slave" from a `CLUSTER NODES` line; `None` for a failed node.
fn role_of(line: &str) -> Option<&str> {
    let flags: Vec<&str> = line.split_whitespace().nth(2)?.split(',').collect();
    if flags.iter().any(|f| f.starts_with("fail")) {
        return None;
    }
    flags.into_iter().find(|f| *f == "master" || *f == "slave")
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}
