//! How the Redis sink reaches its server and makes deletes survive a failover: the
//! settings `config` fills in from `[redis]`, the sink's own types.

use std::time::Duration;

/// A Sentinel-managed Redis.
#[derive(Debug, Clone)]
pub struct SentinelConfig {
    /// The master's name at the Sentinels.
    pub master: String,
    /// The Sentinels.
    pub sentinels: Vec<redis::ConnectionInfo>,
}

/// How the cache's Redis is reached.
#[derive(Debug, Clone)]
pub enum Topology {
    /// One server at the URL.
    Node,
    /// A Redis Cluster, through seed nodes.
    Cluster,
    /// The master the Sentinels name.
    Sentinel(SentinelConfig),
}

/// What makes deletes survive a Redis failover.
#[derive(Debug, Clone, PartialEq)]
pub struct Durability {
    /// What was sent this long before a failure is applied again after it.
    pub replay_window: Duration,
    /// Replicas of each primary that must have a batch before it counts (`WAIT`).
    pub wait_replicas: u32,
    /// Bound of one `WAIT`.
    pub wait_timeout: Duration,
    /// How long a fence lives (`fence = true`).
    pub fence_ttl: Duration,
}

impl Default for Durability {
    fn default() -> Durability {
        Durability {
            replay_window: Duration::from_secs(30),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            fence_ttl: Duration::from_secs(60),
        }
    }
}
