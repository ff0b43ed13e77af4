//! The connection to Redis as one node, as the master Redis Sentinel names, or as a
//! Redis Cluster: routes what the sink sends (by hash slot on a cluster, through
//! redis-rs' async cluster client, which follows MOVED and ASK), and reaches each
//! primary for what has no key (SCAN, INFO).
//!
//! Decides nothing about what to send or when to retry: that is `redis`'s.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::{join_all, try_join_all};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, Cmd, ConnectionInfo, RedisFuture, RedisResult, Value};

/// Keys per UNLINK command.
const KEYS_PER_UNLINK: usize = 256;
/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;
/// From this many commands on, a batch goes to a cluster as one pipeline per primary
/// (reading the slot map first costs a round trip, which a few commands do not repay).
const PIPELINE_FROM: usize = 32;

/// Where the cache lives: one node, or the seed nodes of a cluster.
#[derive(Clone)]
pub enum Target {
    /// One server (or whatever answers at its address).
    Node(Client),
    /// A Redis Cluster, found through its seed nodes.
    Cluster {
        /// The cluster client.
        client: Box<ClusterClient>,
        /// The first seed alone, to ask what it is.
        seed: Client,
    },
    /// The master that Redis Sentinel names, asked at each connection.
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

/// An open connection to a [`Target`]. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub enum Conn {
    /// One multiplexed connection to the node.
    Node(MultiplexedConnection),
    /// The cluster client's connections to every node.
    Cluster(ClusterConnection),
}

/// The slots of a cluster at one moment (see [`Conn::topology`]).
#[derive(Debug, PartialEq)]
pub struct Topology {
    /// The primaries.
    pub primaries: Vec<Primary>,
    /// Each primary's own account of its slots.
    pub slots: Vec<String>,
    /// No slot was migrating or importing.
    pub settled: bool,
}

/// One primary of the target: `None` for a single node, its address on a cluster.
pub type Primary = Option<(String, u16)>;

impl Target {
    /// A target for `seeds` (the first is the URL; more are further cluster seeds);
    /// connects lazily. `ca_pem` replaces the public roots for `rediss://`.
    pub fn new(
        seeds: Vec<ConnectionInfo>,
        topology: super::Topology,
        ca_pem: Option<&[u8]>,
    ) -> RedisResult<Target> {
        // Pipelines are written as soon as a batch is ready: Nagle's algorithm would
        // hold a small write back behind an unacknowledged one (redis-rs leaves
        // TCP_NODELAY off by default; hiredis and most clients turn it on).
        let seeds: Vec<ConnectionInfo> = seeds
            .into_iter()
            .map(|info| {
                let nodelay = info.tcp_settings().clone().set_nodelay(true);
                info.set_tcp_settings(nodelay)
            })
            .collect();
        let certs = ca_pem.map(|pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        });
        let open = |info: ConnectionInfo| match &certs {
            Some(certs) => Client::build_with_tls(info, certs.clone()),
            None => Client::open(info),
        };
        if let super::Topology::Sentinel(sentinel) = topology {
            let url = seeds.first().expect("a target has a URL");
            let settings = url.redis_settings();
            let addrs = sentinel.sentinels.iter().map(|s| s.addr().clone());
            let mut builder =
                SentinelClientBuilder::new(addrs, &sentinel.master, SentinelServerType::Master)?
                    .set_client_to_redis_db(settings.db())
                    .set_client_to_redis_tcp_settings(url.tcp_settings().clone());
            if let Some(user) = settings.username() {
                builder = builder.set_client_to_redis_username(user);
            }
            if let Some(password) = settings.password() {
                builder = builder.set_client_to_redis_password(password);
            }
            if matches!(url.addr(), redis::ConnectionAddr::TcpTls { .. }) {
                builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
                if let Some(certs) = certs {
                    builder = builder.set_client_to_redis_certificates(certs);
                }
            }
            return Ok(Target::Sentinel(Arc::new(tokio::sync::Mutex::new(
                builder.build()?,
            ))));
        }
        if matches!(topology, super::Topology::Cluster) {
            let seed = open(seeds.first().expect("a target has a URL").clone())?;
            let mut builder = ClusterClient::builder(seeds)
                .connection_timeout(Duration::from_secs(5))
                // Short: while slots migrate, the async cluster client (redis-rs 1.8)
                // sometimes loses a request's answer, which then waits for this
                // timeout before the sink retries it (seen in the resharding test).
                .response_timeout(Duration::from_secs(5))
                // Redirects are followed within these; anything longer is an outage
                // that the sink's own retry loop waits out, logs and reports.
                .retries(3);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            return Ok(Target::Cluster {
                client: Box::new(builder.build()?),
                seed,
            });
        }
        let info = seeds.into_iter().next().expect("a target has a URL");
        Ok(Target::Node(open(info)?))
    }

    /// Whether this is a cluster target.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster { .. })
    }

    /// The master's address as the Sentinels name it now; `None` for other targets.
    pub async fn sentinel_master(&self) -> Option<RedisResult<(String, u16)>> {
        let Target::Sentinel(sentinel) = self else {
            return None;
        };
        let client = sentinel.lock().await.async_get_client().await;
        Some(client.map(|c| match c.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
            other => (other.to_string(), 0),
        }))
    }

    /// Sends `cmd` to the node at the (first) configured address alone (for a
    /// Sentinel target: the master it names), on a connection of its own.
    pub async fn ask_seed<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        let client = match self {
            Target::Node(client) | Target::Cluster { seed: client, .. } => client.clone(),
            Target::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await?,
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        cmd.query_async(&mut conn).await
    }

    /// Opens a connection.
    pub async fn connect(&self) -> RedisResult<Conn> {
        match self {
            Target::Node(client) => open_node(client).await,
            Target::Cluster { client, .. } => {
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
            Target::Sentinel(sentinel) => {
                // Asked anew at every connection: after a failover the next
                // connection goes to the new master.
                let client = sentinel.lock().await.async_get_client().await?;
                open_node(&client).await
            }
        }
    }
}

/// A multiplexed connection to one server.
async fn open_node(client: &Client) -> RedisResult<Conn> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    Ok(Conn::Node(
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await?,
    ))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Whether this connection is to a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Runs `cmds` and returns their replies in order; the first error fails the
    /// whole (what the sink sends is safe to repeat: deletes and TTLs are idempotent,
    /// events are delivered at least once). On a node: one pipeline. On a cluster
    /// (a command's keys must share a slot): from [`PIPELINE_FROM`] commands on, one
    /// pipeline per primary; fewer, or when that fails, each command alone, routed by
    /// its key by the cluster client (which follows MOVED and ASK), all at once.
    pub async fn run(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Conn::Node(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(c).await
            }
            Conn::Cluster(c) => {
                // A big batch (a catch-up) goes as one pipeline per primary: a future,
                // a routing and a channel message per command cost five times the CPU.
                if cmds.len() >= PIPELINE_FROM {
                    match per_primary_pipelines(c, &cmds).await {
                        Some(values) => return Ok(values),
                        None => tracing::debug!(
                            commands = cmds.len(),
                            "a batch could not go as one pipeline per primary; sending its commands one by one"
                        ),
                    }
                }
                try_join_all(cmds.into_iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                }))
                .await
            }
        }
    }

    /// UNLINK commands for `keys`, in chunks; on a cluster, one per hash slot (and
    /// chunk), so that each can be routed to the node owning its slot.
    pub fn unlinks<'k>(&self, keys: impl IntoIterator<Item = &'k str>) -> Vec<Cmd> {
        self.by_slot(keys)
            .into_iter()
            .map(|chunk| {
                let mut cmd = redis::cmd("UNLINK");
                cmd.arg(chunk);
                cmd
            })
            .collect()
    }

    /// `keys` in chunks for one command each: on a cluster, each chunk in one hash
    /// slot.
    pub fn by_slot<'k>(&self, keys: impl IntoIterator<Item = &'k str>) -> Vec<Vec<&'k str>> {
        let chunked = |keys: Vec<&'k str>| {
            keys.chunks(KEYS_PER_UNLINK)
                .map(<[&str]>::to_vec)
                .collect::<Vec<_>>()
        };
        match self {
            Conn::Node(_) => chunked(keys.into_iter().collect()),
            Conn::Cluster(_) => {
                let mut by_slot: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
                for key in keys {
                    by_slot.entry(slot_of(key)).or_default().push(key);
                }
                by_slot.into_values().flat_map(chunked).collect()
            }
        }
    }

    /// Every primary, for commands about the whole keyspace (SCAN, INFO): `[None]` on
    /// a node; on a cluster, each primary's address as `CLUSTER SLOTS` tells it now.
    pub async fn primaries(&mut self) -> RedisResult<Vec<Primary>> {
        Ok(self
            .primaries_and_slots()
            .await?
            .into_iter()
            .map(|(primary, _)| primary)
            .collect())
    }

    /// Like [`Conn::primaries`], each with one hash slot it serves (0 on a node).
    pub async fn primaries_and_slots(&mut self) -> RedisResult<Vec<(Primary, u16)>> {
        let Conn::Cluster(c) = self else {
            return Ok(vec![(None, 0)]);
        };
        let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
        let mut primaries = parse_cluster_slots(&slots);
        primaries.sort();
        primaries.dedup_by(|a, b| a.0 == b.0);
        if primaries.is_empty() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                "CLUSTER SLOTS names no primary",
            )));
        }
        Ok(primaries
            .into_iter()
            .map(|(addr, slot)| (Some(addr), slot))
            .collect())
    }

    /// Where the slots are: every primary with its slots as it tells them itself
    /// (`CLUSTER NODES`, with the markers of slots migrating or importing), and whether
    /// no slot is on the move. On a node: one primary, settled.
    pub async fn topology(&mut self) -> RedisResult<Topology> {
        if !self.is_cluster() {
            return Ok(Topology {
                primaries: vec![None],
                slots: Vec::new(),
                settled: true,
            });
        }
        let primaries = self.primaries().await?;
        let mut slots = Vec::new();
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("NODES");
        for primary in &primaries {
            let nodes: String = self.on(primary, &cmd).await?;
            let own = nodes
                .lines()
                .find(|l| {
                    l.split_whitespace()
                        .nth(2)
                        .is_some_and(|f| f.contains("myself"))
                })
                .map(|l| l.split_whitespace().skip(8).collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            slots.push(own);
        }
        let settled = !slots.iter().any(|s| s.contains("->-") || s.contains("-<-"));
        Ok(Topology {
            primaries,
            slots,
            settled,
        })
    }

    /// Sends `cmd` to `primary` (from [`Conn::primaries`]).
    pub async fn on<T: redis::FromRedisValue>(
        &mut self,
        primary: &Primary,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match (self, primary) {
            (Conn::Cluster(c), Some((host, port))) => {
                let value = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?
                    .extract_error()?;
                Ok(redis::from_redis_value(value)?)
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

/// The hash slot of `key` (its `{hash tag}` if it has one).
pub fn slot_of(key: &str) -> u16 {
    slot_of_bytes(key.as_bytes())
}

/// [`slot_of`] for a key as bytes.
fn slot_of_bytes(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS
}

/// A short string whose hash slot is `slot`: `{tag}` in a key puts it in that slot.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); SLOTS as usize];
        let mut left = SLOTS as usize;
        let mut n = 0u32;
        while left > 0 {
            let tag = n.to_string();
            let s = slot_of(&tag) as usize;
            if tags[s].is_empty() {
                tags[s] = tag;
                left -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot % SLOTS)]
}

/// The primaries' addresses in a `CLUSTER SLOTS` reply, each with the first slot of the
/// range: each entry is `[start, end, [host, port, id, ...], replicas...]`. Entries of
/// another shape are skipped.
fn parse_cluster_slots(reply: &Value) -> Vec<((String, u16), u16)> {
    parse_slot_ranges(reply)
        .into_iter()
        .map(|(start, _, addr)| (addr, start))
        .collect()
}

/// Each slot range of a `CLUSTER SLOTS` reply with its primary's address: (first slot,
/// last slot, address).
fn parse_slot_ranges(reply: &Value) -> Vec<(u16, u16, (String, u16))> {
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(fields) = range else {
                return None;
            };
            let slot = |v: &Value| match v {
                Value::Int(s) => u16::try_from(*s).ok(),
                _ => None,
            };
            let start = slot(fields.first()?)?;
            let end = slot(fields.get(1)?)?;
            let Some(Value::Array(primary)) = fields.get(2) else {
                return None;
            };
            let host = match primary.first()? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let port = match primary.get(1)? {
                Value::Int(p) => u16::try_from(*p).ok()?,
                _ => return None,
            };
            Some((start, end, (host, port)))
        })
        .collect()
}

/// The key a command is routed by, for the commands the sink sends in batches; `None`
/// for any other (such a batch goes command by command).
fn routing_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|a| match a {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()??;
    if [&b"UNLINK"[..], b"DEL", b"PEXPIRE", b"XADD", b"SET"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
    {
        return args.next()?;
    }
    if name.eq_ignore_ascii_case(b"EVAL") || name.eq_ignore_ascii_case(b"EVALSHA") {
        let _script = args.next()??;
        let numkeys = args.next()??;
        if numkeys == b"0" {
            return None;
        }
        return args.next()?;
    }
    None
}

/// Sends `cmds` as one pipeline per primary, all at once, each primary found by the
/// slot of the command's key in the slot map `CLUSTER SLOTS` gives now. `None` when
/// that is not possible or did not work: a command without a key to route it by, a slot
/// without a primary, a node that failed or answered a command with an error (a
/// redirect while slots move, say); the caller then sends them one by one through the
/// cluster client, which follows redirects. What was sent is safe to send again.
async fn per_primary_pipelines(c: &ClusterConnection, cmds: &[Cmd]) -> Option<Vec<Value>> {
    let mut c0 = c.clone();
    let slots: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut c0)
        .await
        .ok()?;
    let mut owner: Vec<Option<usize>> = vec![None; usize::from(SLOTS)];
    let mut primaries: Vec<(String, u16)> = Vec::new();
    for (start, end, addr) in parse_slot_ranges(&slots) {
        let at = match primaries.iter().position(|p| *p == addr) {
            Some(at) => at,
            None => {
                primaries.push(addr);
                primaries.len() - 1
            }
        };
        for slot in start..=end.min(SLOTS - 1) {
            owner[usize::from(slot)] = Some(at);
        }
    }
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); primaries.len()];
    for (i, cmd) in cmds.iter().enumerate() {
        let slot = slot_of_bytes(routing_key(cmd)?);
        groups[owner[usize::from(slot)]?].push(i);
    }
    let sends = groups
        .iter()
        .enumerate()
        .filter(|(_, members)| !members.is_empty())
        .map(|(at, members)| {
            let mut pipe = redis::pipe();
            for &i in members {
                pipe.add_command(cmds[i].clone());
            }
            let (host, port) = primaries[at].clone();
            let mut c = c.clone();
            async move {
                c.route_pipeline(
                    pipe,
                    0,
                    members.len(),
                    SingleNodeRoutingInfo::ByAddress { host, port },
                )
                .await
            }
        });
    let replies = join_all(sends).await;
    let mut out = vec![Value::Nil; cmds.len()];
    for (members, values) in groups.iter().filter(|m| !m.is_empty()).zip(replies) {
        let values = values.ok()?;
        if values.len() != members.len() {
            return None;
        }
        for (&i, value) in members.iter().zip(values) {
            // An error anywhere in a reply (nested ones too) sends the batch the
            // other way, where the error is retried or reported as such.
            out[i] = value.extract_error().ok()?;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
