//! The replication connection: startup with `replication=database`, authentication
//! (trust, cleartext, MD5, SCRAM-SHA-256), `START_REPLICATION`, then CopyBoth.
//!
//! Owns the socket and the framing of backend messages; knows nothing of pgoutput.
//! Reads in large chunks and hands out CopyData payloads as slices of the read buffer.
//! It never sends CopyFail: a stream is ended with CopyDone.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, TargetSessionAttrs};

use super::source::Source;
use super::tls::{self, SslMode};

mod error;

pub use error::ReplicationError;
use error::server_error;

/// How much the read buffer grows by at least: big reads keep the walsender from
/// being woken per message.
const READ_CHUNK: usize = 256 * 1024;
/// Largest backend message accepted; a bigger length is a corrupt stream, not a
/// reason to allocate gigabytes. (A walsender message holds at most one WAL record's
/// decoded change, bounded by Postgres' 1 GB value limit.)
const MAX_MESSAGE: usize = 1 << 30;
/// A message bigger than this made the read buffer grow past its usual size; the
/// buffer is given up after it (see `buffered_message`).
const BIG_MESSAGE: usize = 4 * READ_CHUNK;
/// While catching up, the kernel wakes pginval only once this much stream data is
/// waiting (`SO_RCVLOWAT`): one wake-up per 64 KiB instead of one per walsender send,
/// which also spares the walsender waking a reader per message.
const PACED_READ_BYTES: usize = 64 * 1024;
/// A paced read that has waited this long takes whatever has arrived.
const PACED_READ_WAIT: Duration = Duration::from_millis(2);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A backend message as the replication client needs it.
pub enum Backend {
    /// CopyData payload (a replication frame), sliced from the read buffer.
    CopyData(Bytes),
    /// CopyBothResponse: the stream has started.
    CopyBoth,
    /// Any other message, parsed by `postgres-protocol`.
    Other(backend::Message),
}

/// An open replication connection.
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    target: String,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// The TCP socket under `io` (none for a Unix socket), for read pacing.
    tcp_fd: Option<RawFd>,
    /// The socket's current receive low-water mark.
    low_water: usize,
    /// The walsender's process id (BackendKeyData), once started up.
    backend_pid: Option<i32>,
    /// `server_version_num`-style version (170002), from the start-up's ParameterStatus.
    server_version: Option<u32>,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Connects, authenticates and waits for ReadyForQuery. Tries each host of the
    /// configuration in turn.
    pub async fn connect(
        source: &Source,
        application_name: &str,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let pg = &source.pg;
        let user = pg.get_user().ok_or_else(|| {
            ReplicationError::Unsupported("the connection string names no user".into())
        })?;
        let mut last_err = None;
        let mut read_only = None;
        let hosts = pg.get_hosts();
        if hosts.is_empty() {
            return Err(ReplicationError::Unsupported(
                "the connection string names no host".into(),
            ));
        }
        for (i, host) in hosts.iter().enumerate() {
            let port = pg
                .get_ports()
                .get(i)
                .or(pg.get_ports().first())
                .copied()
                .unwrap_or(5432);
            let connect_timeout = pg
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(30));
            let opened = tokio::time::timeout(connect_timeout, open(host, port, source)).await;
            let (io, target, tcp_fd) = match opened {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => {
                    last_err = Some(e);
                    continue;
                }
                Err(_) => {
                    last_err = Some(ReplicationError::Io {
                        target: format!("{host:?}:{port}"),
                        source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                    });
                    continue;
                }
            };
            let mut conn = ReplicationConnection {
                io,
                target,
                rbuf: BytesMut::with_capacity(READ_CHUNK),
                wbuf: BytesMut::with_capacity(1024),
                tcp_fd,
                low_water: 1,
                backend_pid: None,
                server_version: None,
            };
            let work_mem = source
                .streaming
                .then_some(source.decoding_work_mem_kb)
                .flatten()
                .map(|kb| format!("{kb}kB"));
            match conn
                .startup(pg, user, application_name, work_mem.as_deref())
                .await
            {
                // With target_session_attrs=read-write (libpq's way to name a primary
                // among its standbys), a server in recovery is passed over: after a
                // failover the promoted standby is the one to stream from. Read-only
                // everywhere is worth retrying: a promotion may be under way.
                Ok(()) if pg.get_target_session_attrs() == TargetSessionAttrs::ReadWrite => {
                    match conn.read_only().await {
                        Ok(false) => return Ok(conn),
                        Ok(true) => read_only = Some(conn.target.clone()),
                        Err(e) => last_err = Some(e),
                    }
                }
                Ok(()) => return Ok(conn),
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(target) = read_only {
            return Err(ReplicationError::ReadOnly(target));
        }
        Err(last_err.unwrap_or_else(|| ReplicationError::Unsupported("no host".into())))
    }

    async fn startup(
        &mut self,
        pg: &tokio_postgres::Config,
        user: &str,
        application_name: &str,
        decoding_work_mem: Option<&str>,
    ) -> Result<(), ReplicationError> {
        let dbname = pg.get_dbname().unwrap_or(user);
        let app = pg.get_application_name().unwrap_or(application_name);
        let mut params = vec![
            ("user", user),
            ("database", dbname),
            ("replication", "database"),
            ("application_name", app),
            ("client_encoding", "UTF8"),
        ];
        // The walsender's own setting: past it, an open transaction is streamed.
        if let Some(size) = decoding_work_mem {
            params.push(("logical_decoding_work_mem", size));
        }
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)
            .map_err(|e| self.io_err(e))?;
        self.flush().await?;

        let password = pg.get_password();
        let need_password = || {
            password.ok_or_else(|| {
                ReplicationError::Unsupported(
                    "the server asks for a password and none is configured (put it in the URL or PGPASSWORD-style `password=`)".into(),
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_message().await? {
                Backend::Other(backend::Message::AuthenticationOk) => break,
                Backend::Other(backend::Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(need_password()?, &mut self.wbuf)
                        .map_err(|e| self.io_err(e))?;
                }
                Backend::Other(backend::Message::AuthenticationMd5Password(body)) => {
                    let hash = md5_hash(user.as_bytes(), need_password()?, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                        .map_err(|e| self.io_err(e))?;
                }
                Backend::Other(backend::Message::AuthenticationSasl(body)) => {
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next().map_err(|e| self.io_err(e))? {
                        has_scram |= m == SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(ReplicationError::Unsupported(
                            "the server offers no SASL mechanism pginval supports (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    let s = ScramSha256::new(need_password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)
                        .map_err(|e| self.io_err(e))?;
                    scram = Some(s);
                }
                Backend::Other(backend::Message::AuthenticationSaslContinue(body)) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| ReplicationError::Protocol(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)
                        .map_err(|e| self.io_err(e))?;
                }
                Backend::Other(backend::Message::AuthenticationSaslFinal(body)) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data())
                        .map_err(|e| ReplicationError::Protocol(format!("SCRAM: {e}")))?;
                    continue;
                }
                Backend::Other(_) => {
                    return Err(ReplicationError::Unsupported(
                        "the server asks for an authentication method pginval does not support (use trust, password, md5 or scram-sha-256)".into(),
                    ));
                }
                Backend::CopyData(_) | Backend::CopyBoth => {
                    return Err(ReplicationError::Protocol(
                        "copy data during startup".into(),
                    ));
                }
            }
            self.flush().await?;
        }
        loop {
            match self.next_message().await? {
                Backend::Other(backend::Message::ReadyForQuery(_)) => return Ok(()),
                Backend::Other(backend::Message::BackendKeyData(key)) => {
                    self.backend_pid = Some(key.process_id());
                }
                Backend::Other(backend::Message::ParameterStatus(p))
                    if p.name().ok() == Some("server_version") =>
                {
                    self.server_version = p.value().ok().and_then(version_num);
                }
                _ => {}
            }
        }
    }

    /// The server's version as `server_version_num` spells it (170002 for 17.2), as it
    /// announced it at start-up.
    pub fn server_version(&self) -> Option<u32> {
        self.server_version
    }

    /// The walsender's process id, as the server announced it at start-up.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// Whether the server takes only read-only transactions (`transaction_read_only`,
    /// as libpq asks it for target_session_attrs=read-write): a standby, or a primary
    /// set read-only.
    async fn read_only(&mut self) -> Result<bool, ReplicationError> {
        frontend::query("SHOW transaction_read_only", &mut self.wbuf)
            .map_err(|e| self.io_err(e))?;
        self.flush().await?;
        let mut value = None;
        loop {
            match self.next_message().await? {
                Backend::Other(backend::Message::DataRow(row)) => {
                    let mut ranges = row.ranges();
                    if let Ok(Some(Some(range))) = ranges.next() {
                        value = Some(row.buffer()[range] == *b"on");
                    }
                }
                Backend::Other(backend::Message::ReadyForQuery(_)) => {
                    return value.ok_or_else(|| {
                        ReplicationError::Unsupported(
                            "SHOW transaction_read_only returned no row".into(),
                        )
                    });
                }
                _ => {}
            }
        }
    }

    /// Creates a temporary pgoutput slot, dropped by the server when this connection
    /// ends (used by dry runs, which must not touch the real slot).
    pub async fn create_temporary_slot(&mut self, name: &str) -> Result<(), ReplicationError> {
        let sql = format!("CREATE_REPLICATION_SLOT \"{name}\" TEMPORARY LOGICAL pgoutput");
        frontend::query(&sql, &mut self.wbuf).map_err(|e| self.io_err(e))?;
        self.flush().await?;
        loop {
            if let Backend::Other(backend::Message::ReadyForQuery(_)) = self.next_message().await? {
                return Ok(());
            }
        }
    }

    /// Sends `START_REPLICATION SLOT ... LOGICAL` and waits for CopyBothResponse.
    pub async fn start_logical(
        &mut self,
        slot: &str,
        start: u64,
        options: &[(&str, &str)],
    ) -> Result<(), ReplicationError> {
        let opts = options
            .iter()
            .map(|(k, v)| format!("\"{k}\" '{}'", v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT \"{slot}\" LOGICAL {} ({opts})",
            super::protocol::format_lsn(start)
        );
        frontend::query(&sql, &mut self.wbuf).map_err(|e| self.io_err(e))?;
        self.flush().await?;
        loop {
            match self.next_message().await? {
                Backend::CopyBoth => return Ok(()),
                Backend::Other(
                    backend::Message::NoticeResponse(_) | backend::Message::ParameterStatus(_),
                ) => {}
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected answer to START_REPLICATION".into(),
                    ));
                }
            }
        }
    }

    /// The next complete message already in the read buffer, without any IO. An
    /// ErrorResponse is returned as the error it carries.
    pub fn buffered_message(&mut self) -> Result<Option<Backend>, ReplicationError> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let tag = self.rbuf[0];
        let len =
            u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(ReplicationError::Protocol(format!(
                "message {:?} with length {len}",
                tag as char
            )));
        }
        let total = len + 1;
        if self.rbuf.len() < total {
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        match tag {
            b'd' => {
                let mut frame = self.rbuf.split_to(total).freeze();
                frame.advance(5);
                if total > BIG_MESSAGE {
                    // The buffer grew to hold this message and would keep that size
                    // for good (its remainder shares the allocation): start a new one
                    // with what is left, so the memory goes once the frame is dropped.
                    let mut fresh = BytesMut::with_capacity(READ_CHUNK.max(self.rbuf.len()));
                    fresh.extend_from_slice(&self.rbuf);
                    self.rbuf = fresh;
                }
                Ok(Some(Backend::CopyData(frame)))
            }
            b'W' => {
                self.rbuf.advance(total);
                Ok(Some(Backend::CopyBoth))
            }
            _ => match backend::Message::parse(&mut self.rbuf) {
                Ok(Some(backend::Message::ErrorResponse(body))) => Err(server_error(&body)),
                Ok(Some(m)) => Ok(Some(Backend::Other(m))),
                Ok(None) => Ok(None),
                Err(e) => Err(ReplicationError::Protocol(e.to_string())),
            },
        }
    }

    /// Reads more bytes from the socket into the buffer. Cancel-safe: when dropped
    /// before completion nothing was read. An orderly close is an error here, since
    /// the server never closes a stream it wants to continue.
    pub async fn fill(&mut self) -> Result<(), ReplicationError> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let (fd, paced) = (self.tcp_fd, self.low_water > 1);
        let mut read = std::pin::pin!(self.io.read_buf(&mut self.rbuf));
        let read = if paced {
            tokio::select! {
                biased;
                r = &mut read => r,
                // Not enough for a paced read came: take what is there. Lowering the
                // mark makes the kernel signal data that is already waiting.
                _ = tokio::time::sleep(PACED_READ_WAIT) => {
                    if fd.is_some_and(|fd| set_low_water(fd, 1).is_ok()) {
                        self.low_water = 1;
                    }
                    read.await
                }
            }
        } else {
            read.await
        };
        match read {
            Ok(0) => Err(self.io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ))),
            Ok(_) => Ok(()),
            Err(e) => Err(self.io_err(e)),
        }
    }

    /// Paces reads for a catch-up (`true`: wake only for 64 KiB of data or after 2 ms)
    /// or for live changes (`false`: wake for every byte, the default).
    pub fn pace_reads(&mut self, catching_up: bool) {
        let want = if catching_up { PACED_READ_BYTES } else { 1 };
        if want == self.low_water {
            return;
        }
        if let Some(fd) = self.tcp_fd {
            match set_low_water(fd, want) {
                Ok(()) => self.low_water = want,
                // The mark stays as it was; the next call tries again.
                Err(e) => tracing::debug!(error = %e, "SO_RCVLOWAT refused"),
            }
        }
    }

    /// The next message, reading as needed.
    pub async fn next_message(&mut self) -> Result<Backend, ReplicationError> {
        loop {
            if let Some(m) = self.buffered_message()? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Sends one CopyData message with `payload`.
    pub async fn send_copy_data(&mut self, payload: &[u8]) -> Result<(), ReplicationError> {
        frontend::CopyData::new(payload)
            .map_err(|e| self.io_err(e))?
            .write(&mut self.wbuf);
        self.flush().await
    }

    /// Ends the stream with CopyDone, waits (bounded) for the server to finish, then
    /// closes the connection with Terminate.
    pub async fn finish(mut self, wait: Duration) -> Result<(), ReplicationError> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        let drain = async {
            loop {
                if let Backend::Other(backend::Message::ReadyForQuery(_)) =
                    self.next_message().await?
                {
                    return Ok(());
                }
            }
        };
        let result = tokio::time::timeout(wait, drain).await.unwrap_or(Ok(()));
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
        result
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        let buf = self.wbuf.split();
        self.io.write_all(&buf).await.map_err(|e| self.io_err(e))?;
        self.io.flush().await.map_err(|e| self.io_err(e))
    }

    /// The connection counts as dead: `what` did not happen in time.
    pub fn timed_out(&self, what: String) -> ReplicationError {
        self.io_err(io::Error::new(io::ErrorKind::TimedOut, what))
    }

    fn io_err(&self, source: io::Error) -> ReplicationError {
        ReplicationError::Io {
            target: self.target.clone(),
            source,
        }
    }
}

/// Sets the socket's receive low-water mark: readiness is signalled only once `bytes`
/// are waiting (Linux also signals when the receive buffer runs short of room).
fn set_low_water(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is the open socket owned by this connection's stream, and the option
    // value is a c_int that lives across the call, as SO_RCVLOWAT expects.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

async fn open(
    host: &Host,
    port: u16,
    source: &Source,
) -> Result<(Box<dyn Io>, String, Option<RawFd>), ReplicationError> {
    match host {
        Host::Tcp(name) => {
            let target = format!("{name}:{port}");
            let io_err = |source| ReplicationError::Io {
                target: target.clone(),
                source,
            };
            let mut stream = TcpStream::connect((name.as_str(), port))
                .await
                .map_err(io_err)?;
            let _ = stream.set_nodelay(true);
            let fd = Some(stream.as_raw_fd());
            let Some(config) = &source.tls_config else {
                return Ok((Box::new(stream), target, fd));
            };
            // SSLRequest, then the server answers 'S' (go ahead) or 'N' (no TLS here).
            let mut request = BytesMut::new();
            frontend::ssl_request(&mut request);
            stream.write_all(&request).await.map_err(io_err)?;
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).await.map_err(io_err)?;
            match answer[0] {
                b'S' => {
                    let server = tls::server_name(name)
                        .map_err(|e| ReplicationError::Unsupported(e.to_string()))?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(server, stream)
                        .await
                        .map_err(io_err)?;
                    Ok((Box::new(tls), target, fd))
                }
                b'N' if source.tls.mode == SslMode::Prefer => Ok((Box::new(stream), target, fd)),
                b'N' => Err(ReplicationError::Unsupported(format!(
                    "{target} does not accept TLS, but sslmode asks for it"
                ))),
                other => Err(ReplicationError::Protocol(format!(
                    "unexpected answer {other:#x} to SSLRequest"
                ))),
            }
        }
        Host::Unix(dir) => {
            // As with libpq, a Unix socket never uses TLS.
            let path = Path::new(dir).join(format!(".s.PGSQL.{port}"));
            let target = path.display().to_string();
            let stream =
                UnixStream::connect(&path)
                    .await
                    .map_err(|source| ReplicationError::Io {
                        target: target.clone(),
                        source,
                    })?;
            Ok((Box::new(stream), target, None))
        }
    }
}

/// `server_version` ("17.2", "16.4 (Debian 16.4-1.pgdg120+1)", "18beta1") as
/// `server_version_num` would say it (170002); `None` when it has no leading number.
fn version_num(version: &str) -> Option<u32> {
    let number = |s: &str| -> (Option<u32>, usize) {
        let len = s.bytes().take_while(u8::is_ascii_digit).count();
        (s[..len].parse().ok(), len)
    };
    let (major, len) = number(version);
    let minor = version[len..]
        .strip_prefix('.')
        .and_then(|rest| number(rest).0)
        .unwrap_or(0);
    Some(major? * 10_000 + minor)
}

#[cfg(test)]
mod tests;
