//! The sections of `rules.toml` as serde reads them, with their defaults: every field's
//! doc comment is the user documentation. `Config::parse` validates them.

use serde::Deserialize;
use toml::Spanned;

use super::STATE_KEY_PREFIX;

/// `[source]`: the PostgreSQL database to follow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style DSN, URL (`postgres://user:pw@host:5432/db`) or key=value form.
    /// `PGINVAL_SOURCE_URL` overrides it. Required (here or in the environment).
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// Logical replication slot; created with the pgoutput plugin when missing.
    #[serde(default = "default_name")]
    pub slot: Spanned<String>,
    /// Publication; created `FOR TABLE` the rules' tables when missing.
    #[serde(default = "default_name")]
    pub publication: Spanned<String>,
    /// How often a standby status update is sent even when nothing changes, in
    /// seconds; keep it well below the server's `wal_sender_timeout` (60 s default).
    #[serde(default = "default_status_interval")]
    pub status_interval_secs: Spanned<u64>,
    /// Seconds without any data from the server after which the replication
    /// connection counts as dead and is reopened, like PostgreSQL's
    /// `wal_receiver_timeout` (60 s default); at half of it pginval asks the server for
    /// a keepalive. 0 disables it.
    #[serde(default = "default_receive_timeout")]
    pub receive_timeout_secs: Spanned<u64>,
    /// File holding the password (trailing newline ignored); overrides one in `url`.
    /// `PGINVAL_SOURCE_PASSWORD` overrides both.
    #[serde(default)]
    pub password_file: Option<Spanned<String>>,
    /// When the slot is lost (dropped, or invalidated by `max_slot_wal_keep_size`):
    /// "flush" (default) recreates it and applies every rule's fallback, so no stale
    /// key survives the gap; "fail" stops pginval with an error.
    #[serde(default = "default_on_slot_lost")]
    pub on_slot_lost: Spanned<String>,
    /// Every this many seconds, write a tiny WAL record into this database
    /// (`pg_logical_emit_message`) so the slot advances even when all WAL comes from
    /// other databases. 0 (default) disables it.
    #[serde(default)]
    pub heartbeat_secs: u64,
    /// When pginval creates or manages the publication (PostgreSQL 15+): publish per
    /// table only the columns the rules read plus the replica identity columns, so
    /// the walsender sends less. Off by default: while on, changing a table's REPLICA
    /// IDENTITY before pginval updates the list makes the application's UPDATE and
    /// DELETE on that table fail.
    #[serde(default)]
    pub column_lists: bool,
    /// PostgreSQL 17+: create the slot with `failover = true`, so that a standby with
    /// `sync_replication_slots = on` keeps a copy of it and pginval resumes on the
    /// promoted standby without a gap (list both servers in `url`, like
    /// `host=a,b target_session_attrs=read-write`). Off by default: without it a
    /// failover loses the slot, and pginval applies every rule's fallback there.
    #[serde(default)]
    pub failover_slot: bool,
    /// With a standby as the source: a connection string of its primary. While pginval
    /// creates its slot on the standby (PostgreSQL waits there for the primary to log
    /// its running transactions, which an idle primary may not do for minutes), it runs
    /// `SELECT pg_log_standby_snapshot()` on the primary every second; and `check`
    /// reads there whether it is a primary with `wal_level = logical`. Needs a role allowed to
    /// run that function (superuser, or `GRANT EXECUTE ON FUNCTION
    /// pg_log_standby_snapshot() TO ...`); connected with the source's TLS settings.
    pub standby_primary_url: Option<Spanned<String>>,
    /// PostgreSQL 14+: ask for transactions to be streamed while they run (protocol
    /// version 2, `streaming = on`) once they outgrow the server's
    /// `logical_decoding_work_mem`. pginval holds a streamed transaction's work until
    /// its commit (see `[limits] max_streamed_entries`), so a million-row UPDATE is
    /// invalidated right after its commit instead of after the walsender decoded it
    /// all. On by default; `false` keeps protocol version 1.
    #[serde(default = "yes")]
    pub streaming: bool,
    /// With `streaming`: the `logical_decoding_work_mem` of pginval's walsender (only
    /// that session's, sent when it connects), past which an open transaction is
    /// streamed. What is still unstreamed at the commit is what the walsender sends
    /// after it, so it bounds the commit-to-invalidation time of a big transaction
    /// (about 1.5 s for a million rows at 8MB, 3 s at PostgreSQL's default 64MB).
    /// A size like "8MB" or "512kB" (64kB at least), or "server" for the server's own
    /// setting. Default "8MB".
    #[serde(default = "default_decoding_work_mem")]
    pub logical_decoding_work_mem: Spanned<String>,
}

fn default_decoding_work_mem() -> Spanned<String> {
    Spanned::new(0..0, "8MB".to_owned())
}

fn yes() -> bool {
    true
}

fn default_on_slot_lost() -> Spanned<String> {
    Spanned::new(0..0, "flush".to_owned())
}

/// `[redis]`: where the cache lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`; `PGINVAL_REDIS_URL` overrides it.
    #[serde(default = "default_redis_url")]
    pub url: Spanned<String>,
    /// File holding the password (trailing newline ignored); overrides one in `url`.
    /// `PGINVAL_REDIS_PASSWORD` overrides both.
    #[serde(default)]
    pub password_file: Option<Spanned<String>>,
    /// With `rediss://`: PEM file of the roots to verify the server with (default: the
    /// public web PKI roots).
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
    /// The server is a Redis Cluster (`url` and `nodes` are seed nodes): keys are
    /// routed by hash slot, patterns scan every primary. `check` refuses a mismatch.
    #[serde(default = "default_false")]
    pub cluster: Spanned<bool>,
    /// More cluster seed nodes besides `url`, as URLs or `host:port` (the password and
    /// TLS of `url` apply to them).
    #[serde(default)]
    pub nodes: Vec<Spanned<String>>,
    /// After Redis failed (or a cluster's primaries changed), apply what was sent in
    /// this last stretch again: a delete the old primary acknowledged but had not
    /// replicated is otherwise lost on failover. Default "30s" (Redis Cluster's default
    /// `cluster-node-timeout` is 15 s); "0s" turns it off.
    #[serde(default)]
    pub replay_window: Option<Spanned<String>>,
    /// A batch counts as applied only once this many replicas of each primary have it
    /// (`WAIT`); default 0 (off).
    #[serde(default)]
    pub wait_replicas: Option<Spanned<u32>>,
    /// How long one `WAIT` may take before the batch is retried; default "1s".
    #[serde(default)]
    pub wait_timeout: Option<Spanned<String>>,
    /// How long a fence (rules with `fence = true`) lives. An application fills only
    /// if less than half of it passed since its read missed; default "60s".
    #[serde(default)]
    pub fence_ttl: Option<Spanned<String>>,
    /// A Sentinel-managed Redis: the master's name at the `sentinels`. pginval asks
    /// them where the master is, connects there, and asks again after an error or
    /// when they name another master. `url` then gives only the master's password,
    /// database and TLS.
    #[serde(default)]
    pub sentinel_master: Option<Spanned<String>>,
    /// The Sentinels' addresses (`host:port` or URLs), with `sentinel_master`.
    #[serde(default)]
    pub sentinels: Vec<Spanned<String>>,
}

/// `[tags]`: how cache tags are stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsConfig {
    /// "set" (default: a SET per tag at `key` whose members are cache keys),
    /// "laravel" (Laravel 10+ Redis tagged cache: a ZSET `<prefix>tag:<tag>:entries`
    /// whose members are item keys under `prefix`), "symfony" (RedisTagAwareAdapter
    /// of symfony/cache 6.3 and later: a SET `<prefix><namespace>:\x01tags\x01<tag>`
    /// whose members are item ids under `prefix`) or "symfony-legacy" (up to 6.2:
    /// `\0tags\0`).
    #[serde(default = "default_layout")]
    pub layout: Spanned<String>,
    /// With layout "set": key of a tag's SET; must contain `{tag}`.
    #[serde(default = "default_tag_key")]
    pub key: Spanned<String>,
    /// With "laravel" / "symfony": the key prefix of the cache store (Laravel: the
    /// Redis connection prefix plus the cache prefix; Symfony: the client's prefix).
    #[serde(default)]
    pub prefix: String,
    /// With "symfony": the adapter's namespace ("" when none).
    #[serde(default)]
    pub namespace: String,
}

/// `[hints]`: invalidations applications name themselves, with
/// `pg_logical_emit_message(true, 'pginval', '{"keys": [...], "tags": [...]}')`. Any
/// database role may emit such a message, so hints are refused unless enabled, and
/// then only for the listed key and tag prefixes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintsConfig {
    /// Apply hints (default false: every hint is refused, logged and counted).
    #[serde(default)]
    pub enabled: bool,
    /// Keys a hint may name must start with one of these, like "report:" ("" allows
    /// every key, to every role that can log in).
    #[serde(default)]
    pub key_prefixes: Vec<String>,
    /// Tags a hint may name must start with one of these.
    #[serde(default)]
    pub tag_prefixes: Vec<String>,
    /// Most keys plus tags one hint may name (default 1000); a bigger one is refused.
    #[serde(default = "default_hint_entries")]
    pub max_entries: usize,
}

fn default_hint_entries() -> usize {
    1000
}

impl Default for HintsConfig {
    fn default() -> Self {
        HintsConfig {
            enabled: false,
            key_prefixes: Vec::new(),
            tag_prefixes: Vec::new(),
            max_entries: default_hint_entries(),
        }
    }
}

impl HintsConfig {
    /// Why a hint naming `keys` and `tags` is refused, or `None` when it may apply.
    pub fn refusal(&self, keys: &[String], tags: &[String]) -> Option<String> {
        if !self.enabled {
            return Some("hints are not enabled ([hints] enabled = true)".into());
        }
        if keys.len() + tags.len() > self.max_entries {
            return Some(format!(
                "it names {} keys and tags, more than [hints] max_entries = {}",
                keys.len() + tags.len(),
                self.max_entries
            ));
        }
        let allowed = |name: &String, prefixes: &[String]| {
            prefixes.iter().any(|p| name.starts_with(p.as_str()))
        };
        if let Some(k) = keys.iter().find(|k| !allowed(k, &self.key_prefixes)) {
            return Some(format!("key {k:?} has none of the [hints] key_prefixes"));
        }
        // Whatever the prefixes allow, a hint never deletes pginval's own keys (on a
        // Redis Cluster they share the cache's one database).
        if let Some(k) = keys.iter().find(|k| k.starts_with(STATE_KEY_PREFIX)) {
            return Some(format!(
                "key {k:?} is in pginval's own state ({STATE_KEY_PREFIX}*)"
            ));
        }
        if let Some(t) = tags.iter().find(|t| !allowed(t, &self.tag_prefixes)) {
            return Some(format!("tag {t:?} has none of the [hints] tag_prefixes"));
        }
        None
    }
}

/// `[replicas]`: physical replicas the application reads from (pginval reads the
/// primary). A reader there can fill the cache from a row its replica has not replayed
/// yet, after pginval's delete; so each batch is applied again once every listed
/// replica has replayed its commit, and the flush position waits for that.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasConfig {
    /// Connection strings of the replicas (like `[source] url`; the source's TLS
    /// settings apply). The role needs no privilege: pginval runs
    /// `pg_last_wal_replay_lsn()` there.
    #[serde(default)]
    pub urls: Vec<Spanned<String>>,
    /// How long a batch waits for a replica that has not replayed it (down, or that far
    /// behind) before pginval stops waiting for that replica, logs it and counts it in
    /// `pginval_replica_given_up_total`, until the replica has caught up. Default "30s".
    #[serde(default)]
    pub give_up_after: Option<Spanned<String>>,
}

/// `[state]`: where pginval keeps its own state — the markers that tell a lost slot
/// from a first start and that owe fallbacks across a crash. Apart from the cache, so
/// that flushing the cache (`FLUSHDB`, a framework's `cache.clear()`), a `*` pattern
/// or a hint cannot remove it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Database number on the cache's Redis server for pginval's state (default 15);
    /// must differ from the cache's. `check` refuses a server whose maxmemory-policy
    /// could evict it (allkeys-*).
    #[serde(default = "default_state_db")]
    pub redis_db: Spanned<i64>,
}

fn default_false() -> Spanned<bool> {
    Spanned::new(0..0, false)
}

fn default_state_db() -> Spanned<i64> {
    Spanned::new(0..0, 15)
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            redis_db: default_state_db(),
        }
    }
}

/// `[metrics]`: the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to listen on, like "127.0.0.1:9187". Without it no endpoint is served.
    #[serde(default)]
    pub listen: Option<Spanned<String>>,
    /// `/readyz` reports unready when a committed change has waited longer than this
    /// many seconds for Redis.
    #[serde(default = "default_max_lag")]
    pub max_lag_secs: u64,
}

fn default_max_lag() -> u64 {
    30
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            max_lag_secs: default_max_lag(),
        }
    }
}

/// `[limits]`: when a big transaction is cheaper to over-invalidate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Rows of one rule in one transaction past which the rule's fallback replaces its
    /// exact keys (a rule may override it). Default: no limit — big transactions are
    /// applied exactly, in parts, with flat memory.
    #[serde(default = "default_max_keys")]
    pub max_keys_per_transaction: Spanned<usize>,
    /// Entries (keys, tags, patterns, events) pginval holds, over all transactions
    /// PostgreSQL streams before their commit (`[source] streaming`), until those
    /// commit. Past it, the growing transaction's rules switch to their fallbacks for
    /// its remaining rows, as past `max_keys_per_transaction`. Default 1,000,000
    /// (about 100 MB).
    #[serde(default = "default_max_streamed")]
    pub max_streamed_entries: Spanned<usize>,
}

fn default_max_streamed() -> Spanned<usize> {
    Spanned::new(0..0, 1_000_000)
}

fn default_layout() -> Spanned<String> {
    Spanned::new(0..0, "set".to_owned())
}
fn default_max_keys() -> Spanned<usize> {
    Spanned::new(0..0, usize::MAX)
}
impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_keys_per_transaction: default_max_keys(),
            max_streamed_entries: default_max_streamed(),
        }
    }
}

fn default_name() -> Spanned<String> {
    Spanned::new(0..0, "pginval".to_owned())
}
fn default_status_interval() -> Spanned<u64> {
    Spanned::new(0..0, 10)
}
fn default_receive_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 60)
}
fn default_redis_url() -> Spanned<String> {
    Spanned::new(0..0, "redis://127.0.0.1:6379/0".to_owned())
}
fn default_tag_key() -> Spanned<String> {
    Spanned::new(0..0, "cache_tag:{tag}".to_owned())
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            url: None,
            slot: default_name(),
            publication: default_name(),
            status_interval_secs: default_status_interval(),
            receive_timeout_secs: default_receive_timeout(),
            password_file: None,
            on_slot_lost: default_on_slot_lost(),
            heartbeat_secs: 0,
            column_lists: false,
            failover_slot: false,
            standby_primary_url: None,
            streaming: true,
            logical_decoding_work_mem: default_decoding_work_mem(),
        }
    }
}
impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: default_redis_url(),
            password_file: None,
            ca_file: None,
            cluster: default_false(),
            nodes: Vec::new(),
            replay_window: None,
            wait_replicas: None,
            wait_timeout: None,
            fence_ttl: None,
            sentinel_master: None,
            sentinels: Vec::new(),
        }
    }
}
impl Default for TagsConfig {
    fn default() -> Self {
        TagsConfig {
            layout: default_layout(),
            key: default_tag_key(),
            prefix: String::new(),
            namespace: String::new(),
        }
    }
}
