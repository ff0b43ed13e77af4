//! The replication connection's errors: what the server or the socket said, and
//! which of them a reconnect may cure.

use std::io;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend;

/// An error on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed or closed.
    #[error("replication connection to {target}: {source}")]
    Io {
        /// Where to.
        target: String,
        /// The IO error.
        source: io::Error,
    },
    /// The server answered with an error.
    #[error("server error {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        /// SQLSTATE.
        code: String,
        /// Primary message.
        message: String,
        /// Detail, when given.
        detail: Option<String>,
    },
    /// The server asked for something pginval does not do.
    #[error("replication connection: {0}")]
    Unsupported(String),
    /// The server broke the protocol.
    #[error("replication protocol error: {0}")]
    Protocol(String),
    /// The server ended the stream (CopyDone) without being asked to.
    #[error("the server ended the replication stream")]
    StreamEnded,
    /// Every host takes only read-only transactions while target_session_attrs asks
    /// for read-write: during a failover, until a standby is promoted.
    #[error(
        "replication connection to {0}: the server is read-only (target_session_attrs=read-write); waiting for a primary"
    )]
    ReadOnly(String),
}

impl ReplicationError {
    /// Whether another process streams from the slot (55006): the warm-standby case.
    pub fn is_slot_busy(&self) -> bool {
        matches!(self, ReplicationError::Server { code, .. } if code == "55006")
    }

    /// Whether the server says the slot is gone: dropped (42704) or invalidated
    /// because it exceeded `max_slot_wal_keep_size` (55000, "can no longer get changes";
    /// PostgreSQL 18 says "can no longer access replication slot").
    pub fn is_slot_lost(&self) -> bool {
        match self {
            ReplicationError::Server { code, message, .. } => {
                // Only the slot's own absence: a missing publication is also 42704.
                (code == "42704" && message.contains("replication slot"))
                    || (code == "55000"
                        && (message.contains("can no longer get changes")
                            // PostgreSQL 18: "can no longer access replication slot
                            // \"x\"", detail "...invalidated due to \"wal_removed\"".
                            || message.contains("can no longer access replication slot")
                            || message.contains("cannot read from logical replication slot")))
                    || (code == "58P01" && message.contains("has already been removed"))
            }
            _ => false,
        }
    }

    /// Whether reconnecting may help: connection loss, server shutdown or start-up, a
    /// slot still held by another process. Authentication, permission and
    /// configuration errors are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Io { .. }
            | ReplicationError::StreamEnded
            | ReplicationError::ReadOnly(_) => true,
            ReplicationError::Server { code, .. } => {
                code.starts_with("08")
                    || code.starts_with("57P")
                    || matches!(
                        code.as_str(),
                        "55006" | "53300" | "53100" | "40001" | "XX000"
                    )
            }
            ReplicationError::Unsupported(_) | ReplicationError::Protocol(_) => false,
        }
    }
}

/// The error the server's ErrorResponse names.
pub(super) fn server_error(body: &backend::ErrorResponseBody) -> ReplicationError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let value = || String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => code = value(),
            b'M' => message = value(),
            b'D' => detail = Some(value()),
            _ => {}
        }
    }
    ReplicationError::Server {
        code,
        message,
        detail,
    }
}
