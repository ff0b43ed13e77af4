//! The validated settings of the source database, as the replication and catalog
//! code use them (built by `config` from `[source]` and the environment).

use std::fmt;
use std::time::Duration;

use super::tls::TlsSettings;

/// The validated `[source]` section.
#[derive(Clone)]
pub struct Source {
    /// Parsed connection settings (the password stays inside, never printed).
    pub pg: tokio_postgres::Config,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Interval of unprompted standby status updates.
    pub status_interval: Duration,
    /// Silence on the replication connection after which it is reopened, when enabled.
    pub receive_timeout: Option<Duration>,
    /// What to do when the slot is lost.
    pub on_slot_lost: SlotLost,
    /// Heartbeat interval, when enabled.
    pub heartbeat: Option<Duration>,
    /// TLS (`sslmode`, `sslrootcert` from the connection string).
    pub tls: TlsSettings,
    /// Column lists in a publication pginval creates or manages.
    pub column_lists: bool,
    /// Create the slot with `failover = true` (PostgreSQL 17+).
    pub failover_slot: bool,
    /// Ask for in-progress transactions to be streamed (protocol version 2, 14+).
    pub streaming: bool,
    /// With `streaming`, the walsender's `logical_decoding_work_mem` in kB (`None`:
    /// the server's).
    pub decoding_work_mem_kb: Option<u32>,
    /// With a standby as the source: its primary, to end the wait of a slot creation
    /// (`pg_log_standby_snapshot()`) and for `check` to read there.
    pub standby_primary: Option<tokio_postgres::Config>,
    /// The rustls configuration for those settings (`None` with sslmode=disable).
    pub tls_config: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// A PostgreSQL memory size ("8MB", "512kB", "1GB", "2048": kB without a unit) in kB.
pub fn memory_kb(size: &str) -> Option<u32> {
    let size = size.trim();
    let digits = size.bytes().take_while(u8::is_ascii_digit).count();
    let number: u64 = size[..digits].parse().ok()?;
    let unit = match size[digits..].trim() {
        "" | "kB" => 1,
        "MB" => 1024,
        "GB" => 1024 * 1024,
        _ => return None,
    };
    u32::try_from(number.checked_mul(unit)?).ok()
}

/// `on_slot_lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotLost {
    /// Recreate the slot and apply every rule's fallback.
    Flush,
    /// Stop with an error.
    Fail,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("host", &self.pg.get_hosts())
            .field("user", &self.pg.get_user())
            .field("dbname", &self.pg.get_dbname())
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::memory_kb;

    #[test]
    fn memory_sizes_read_as_postgresql_reads_them() {
        assert_eq!(memory_kb("8MB"), Some(8192));
        assert_eq!(memory_kb("512kB"), Some(512));
        assert_eq!(memory_kb("1 GB"), Some(1024 * 1024));
        assert_eq!(memory_kb("2048"), Some(2048));
        assert_eq!(memory_kb("8mb"), None);
        assert_eq!(memory_kb("MB"), None);
        assert_eq!(memory_kb("99999999GB"), None);
    }
}
