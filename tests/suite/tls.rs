//! TLS: sslmode disable / prefer / require / verify-ca / verify-full for both
//! PostgreSQL connections, and `rediss://` for Redis, with certificates made here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use pginval::config::Config;

use crate::support::{PrivatePostgres, Redis, TestDb, free_port, wait_until};
use crate::{Daemon, RULES, WAIT, cache, config_text_url, wait_gone, wait_streaming};

/// A CA and a server certificate for `localhost` / 127.0.0.1 (and a second, unrelated CA).
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make(name: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("pginval-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sh = |script: &str| {
            let out = Command::new("sh")
                .arg("-ec")
                .arg(script)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=pginval-test-ca \
              -keyout ca.key -out ca.crt 2>/dev/null
            openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=other-ca \
              -keyout other.key -out other.crt 2>/dev/null
            openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
              -keyout server.key -out server.csr 2>/dev/null
            printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
              -days 2 -extfile san.ext -out server.crt 2>/dev/null
            openssl req -newkey rsa:2048 -nodes -subj /CN=elsewhere.example \
              -keyout wrongname.key -out wrongname.csr 2>/dev/null
            printf 'subjectAltName=DNS:elsewhere.example\\n' > wrong.ext
            openssl x509 -req -in wrongname.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
              -days 2 -extfile wrong.ext -out wrongname.crt 2>/dev/null
            chmod 600 *.key
            chown postgres *.key *.crt 2>/dev/null || true
            chmod 755 .",
        );
        Certs { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_postgres(certs: &Certs, cert: &str) -> (PrivatePostgres, TestDb) {
    let pg = PrivatePostgres::start();
    let db = pg.create_database("tls").await;
    db.execute_batch(crate::SCHEMA).await;
    for setting in [
        format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}'",
            certs.path(&format!("{cert}.crt")).display()
        ),
        format!(
            "ALTER SYSTEM SET ssl_key_file = '{}'",
            certs.path(&format!("{cert}.key")).display()
        ),
        "ALTER SYSTEM SET ssl = on".to_owned(),
    ] {
        db.execute_batch(&setting).await;
    }
    db.execute_batch("SELECT pg_reload_conf()").await;
    let client = db.client().await;
    wait_until("ssl is on", WAIT, || async {
        client
            .query_one("SHOW ssl", &[])
            .await
            .map(|r| r.get::<_, String>(0) == "on")
            .unwrap_or(false)
    })
    .await;
    (pg, db)
}

fn tls_config(db: &TestDb, redis_url: &str, host: &str, params: &str) -> String {
    let url = format!(
        "postgres://postgres@{host}:{}/{}?{params}",
        db.url
            .rsplit_once(':')
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap(),
        db.name
    );
    config_text_url(db, redis_url, RULES).replace(&db.url, &url)
}

/// Whether pginval's walsender connection uses TLS.
async fn walsender_uses_ssl(db: &TestDb) -> bool {
    db.client()
        .await
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
            &[],
        )
        .await
        .unwrap()
        .get::<_, Option<bool>>(0)
        .unwrap_or(false)
}

async fn streams_with(db: &TestDb, redis: &Redis, text: &str, key: &str, id: i64) {
    let cfg = Config::parse(Path::new("t.toml"), text, |_| None).unwrap_or_else(|e| panic!("{e}"));
    let daemon = Daemon::spawn(cfg);
    wait_streaming(db).await;
    cache(redis, &[key]).await;
    db.execute_batch(&format!("UPDATE users SET name = 'tls' WHERE id = {id}"))
        .await;
    wait_gone(redis, &[key]).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_modes_encrypt_and_verify() {
    let certs = Certs::make("pg");
    let (_pg, db) = tls_postgres(&certs, "server").await;
    let redis = Redis::start();
    let ca = certs.path("ca.crt");

    for (i, params) in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
        format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ]
    .iter()
    .enumerate()
    {
        let text = tls_config(&db, &redis.url(), "localhost", params);
        let key = format!("user:{}", 20 + i);
        let cfg = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
        let daemon = Daemon::spawn(cfg);
        wait_streaming(&db).await;
        assert!(
            walsender_uses_ssl(&db).await,
            "{params}: the stream is encrypted"
        );
        cache(&redis, &[&key]).await;
        db.execute_batch(&format!(
            "UPDATE users SET name = 'tls' WHERE id = {}",
            20 + i
        ))
        .await;
        wait_gone(&redis, &[&key]).await;
        daemon.stop().await.unwrap();
    }

    // sslmode=disable: plain, even though the server offers TLS.
    let text = tls_config(&db, &redis.url(), "127.0.0.1", "sslmode=disable");
    let cfg = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
    let daemon = Daemon::spawn(cfg);
    wait_streaming(&db).await;
    assert!(!walsender_uses_ssl(&db).await);
    daemon.stop().await.unwrap();

    // A certificate from another CA is refused by verify-ca and verify-full.
    for mode in ["verify-ca", "verify-full"] {
        let params = format!(
            "sslmode={mode}&sslrootcert={}",
            certs.path("other.crt").display()
        );
        let text = tls_config(&db, &redis.url(), "localhost", &params);
        let cfg = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
        let replication = replication_refusal(&cfg).await;
        assert!(
            replication.to_lowercase().contains("certificate"),
            "{mode}, replication connection: {replication}"
        );
        let err = tokio::time::timeout(WAIT, pginval::pipeline::run(cfg, std::future::pending()))
            .await
            .expect("fails fast")
            .unwrap_err()
            .to_string();
        assert!(err.to_lowercase().contains("certificate"), "{mode}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let certs = Certs::make("name");
    let (_pg, db) = tls_postgres(&certs, "wrongname").await;
    let redis = Redis::start();
    let ca = certs.path("ca.crt").display().to_string();
    let text = tls_config(
        &db,
        &redis.url(),
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    streams_with(&db, &redis, &text, "user:30", 30).await;
    let text = tls_config(
        &db,
        &redis.url(),
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let cfg = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap();
    let replication = replication_refusal(&cfg).await;
    assert!(
        replication.to_lowercase().contains("certificate"),
        "replication connection: {replication}"
    );
    let err = tokio::time::timeout(WAIT, pginval::pipeline::run(cfg, std::future::pending()))
        .await
        .expect("fails fast")
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

/// The error of pginval's own replication client (not the control connection,
/// which `run` opens first and which would fail first) connecting with `cfg`.
async fn replication_refusal(cfg: &Config) -> String {
    tokio::time::timeout(
        WAIT,
        pginval::replication::conn::ReplicationConnection::connect(&cfg.source, "pginval"),
    )
    .await
    .expect("fails fast")
    .expect_err("the replication connection must be refused")
    .to_string()
}

/// redis-server with TLS only, on a free port.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    let certs = Certs::make("redis");
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(certs.path("server.crt"))
        .arg("--tls-key-file")
        .arg(certs.path("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(certs.path("ca.crt"))
        .arg("--dir")
        .arg(&certs.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server with TLS");
    let tls_redis = TlsRedis { child, port };
    wait_until("redis (TLS) listens", WAIT, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", tls_redis.port))
            .await
            .is_ok()
    })
    .await;

    let db = crate::support::postgres().create_database("rediss").await;
    db.execute_batch(crate::SCHEMA).await;
    let url = format!("rediss://localhost:{port}/0");
    let text = config_text_url(&db, &url, RULES).replace(
        &format!("url = \"{url}\"\n"),
        &format!(
            "url = \"{url}\"\nca_file = \"{}\"\n",
            certs.path("ca.crt").display()
        ),
    );
    let cfg = Config::parse(Path::new("t.toml"), &text, |_| None).unwrap_or_else(|e| panic!("{e}"));

    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(certs.path("ca.crt")).unwrap()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::AsyncCommands::set(&mut conn, "user:40", "v")
        .await
        .unwrap();

    let daemon = Daemon::start(&db, cfg).await;
    db.execute_batch("UPDATE users SET name = 'rediss' WHERE id = 40")
        .await;
    wait_until("user:40 is deleted over TLS", WAIT, || {
        let mut conn = conn.clone();
        async move {
            let n: usize = redis::AsyncCommands::exists(&mut conn, "user:40")
                .await
                .unwrap_or(1);
            n == 0
        }
    })
    .await;
    daemon.stop().await.unwrap();
}
