//! `[source]` and `[replicas]` into the settings the replication and control
//! connections are opened with: the URL and its password, TLS, the standby's primary,
//! the read replicas, names and intervals. Reports every problem; opens nothing.

use std::str::FromStr;
use std::time::Duration;

use super::{
    ENV_SOURCE_PASSWORD, ENV_SOURCE_URL, ReadReplicas, ReplicasConfig, SourceConfig, secret,
};
use crate::diagnostics::{LineIndex, Problem};
use crate::replication::source::{SlotLost, Source};
use crate::replication::tls::{TlsSettings, split_tls_params, tokio_postgres_mode};

/// The source's settings from `[source]` (`line`: the section's), the environment
/// overriding its URL and password; `None` when there is no usable URL.
pub(super) fn source(
    source: SourceConfig,
    source_line: Option<usize>,
    env: &impl Fn(&str) -> Option<String>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Option<Source> {
    // Environment overrides, then validation of the final values.
    let url_line = source.url.as_ref().and_then(|u| lines.line_of(&u.span()));
    let source_url =
        env(ENV_SOURCE_URL).or_else(|| source.url.as_ref().map(|u| u.get_ref().clone()));
    let mut source_tls = TlsSettings::default();
    let pg = match source_url {
        None => {
            problems.push(Problem::new(
                source_line,
                "no source database: [source] url is missing",
                Some(format!(
                    "add `url = \"postgres://user@host:5432/db\"` under [source], or set {ENV_SOURCE_URL}"
                )),
            ));
            None
        }
        Some(url) => {
            let (url, tls) = match split_tls_params(&url) {
                Ok(pair) => pair,
                Err(e) => {
                    problems.push(Problem::new(
                        url_line,
                        format!("[source] url: {e}"),
                        Some(
                            "use sslmode=disable, prefer, require, verify-ca or verify-full".into(),
                        ),
                    ));
                    (url.clone(), TlsSettings::default())
                }
            };
            source_tls = tls;
            match tokio_postgres::Config::from_str(&url) {
                Ok(mut pg) => {
                    pg.ssl_mode(tokio_postgres_mode(source_tls.mode));
                    match secret(
                        &env,
                        ENV_SOURCE_PASSWORD,
                        source.password_file.as_ref(),
                        lines,
                        "[source]",
                    ) {
                        Ok(Some(pw)) => {
                            pg.password(pw);
                        }
                        Ok(None) => {}
                        Err(p) => problems.push(p),
                    }
                    Some(pg)
                }
                Err(e) => {
                    problems.push(Problem::new(
                        url_line,
                        format!("[source] url is not a valid PostgreSQL connection string: {e}"),
                        Some(
                            "use postgres://user:password@host:5432/dbname or host=... dbname=..."
                                .into(),
                        ),
                    ));
                    None
                }
            }
        }
    };
    let standby_primary = source.standby_primary_url.as_ref().and_then(|url| {
        let line = lines.line_of(&url.span());
        match other_server(url.get_ref()) {
            Ok(pg) => Some(pg),
            Err(e) => {
                problems.push(Problem::new(
                    line,
                    format!("[source] standby_primary_url is not a valid PostgreSQL connection string: {e}"),
                    Some("use postgres://user:password@primary:5432/dbname or host=... dbname=...".into()),
                ));
                None
            }
        }
    });
    let work_mem = source.logical_decoding_work_mem.get_ref();
    let decoding_work_mem_kb = match crate::replication::source::memory_kb(work_mem) {
        _ if work_mem == "server" => None,
        Some(kb) if kb >= 64 => Some(kb),
        _ => {
            problems.push(Problem::new(
                lines.line_of(&source.logical_decoding_work_mem.span()),
                format!("[source] logical_decoding_work_mem \"{work_mem}\" is not a size of 64kB or more"),
                Some("write a size like \"8MB\" or \"512kB\", or \"server\" for the server's own setting".into()),
            ));
            None
        }
    };
    for (what, name) in [("slot", &source.slot), ("publication", &source.publication)] {
        if !valid_identifier(name.get_ref()) {
            problems.push(Problem::new(
                lines.line_of(&name.span()),
                format!("[source] {what} `{}` is not a valid name", name.get_ref()),
                Some("use 1 to 63 lower-case letters, digits and underscores".into()),
            ));
        }
    }
    let status_secs = *source.status_interval_secs.get_ref();
    if status_secs == 0 || status_secs > 3600 {
        problems.push(Problem::new(
            lines.line_of(&source.status_interval_secs.span()),
            "[source] status_interval_secs must be between 1 and 3600",
            Some("the default, 10, suits the default wal_sender_timeout of 60 s".into()),
        ));
    }
    let receive_secs = *source.receive_timeout_secs.get_ref();
    if receive_secs != 0 && !(2..=3600).contains(&receive_secs) {
        problems.push(Problem::new(
            lines.line_of(&source.receive_timeout_secs.span()),
            "[source] receive_timeout_secs must be 0 (off) or between 2 and 3600",
            Some(
                "the default, 60, is PostgreSQL's wal_receiver_timeout; half of it passes before pginval asks the server for a keepalive"
                    .into(),
            ),
        ));
    }

    let tls_config = if source_tls.mode == crate::replication::tls::SslMode::Disable {
        None
    } else {
        match crate::replication::tls::client_config(&source_tls) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(Problem::new(
                    url_line,
                    format!("[source] url: {e}"),
                    Some("point sslrootcert at a readable PEM file of CA certificates".into()),
                ));
                None
            }
        }
    };
    let on_slot_lost = match source.on_slot_lost.get_ref().as_str() {
        "flush" => SlotLost::Flush,
        "fail" => SlotLost::Fail,
        other => {
            problems.push(Problem::new(
                lines.line_of(&source.on_slot_lost.span()),
                format!("[source] on_slot_lost `{other}` is not known"),
                Some("use \"flush\" (recreate the slot and over-invalidate) or \"fail\"".into()),
            ));
            SlotLost::Flush
        }
    };
    Some(Source {
        pg: pg?,
        slot: source.slot.into_inner(),
        publication: source.publication.into_inner(),
        status_interval: Duration::from_secs(status_secs),
        receive_timeout: (receive_secs > 0).then(|| Duration::from_secs(receive_secs)),
        on_slot_lost,
        heartbeat: (source.heartbeat_secs > 0).then(|| Duration::from_secs(source.heartbeat_secs)),
        tls: source_tls,
        column_lists: source.column_lists,
        failover_slot: source.failover_slot,
        streaming: source.streaming,
        decoding_work_mem_kb,
        standby_primary,
        tls_config,
    })
}

/// Connection settings of another server of the source's cluster (a standby's
/// primary, a read replica), its `sslmode` kept.
fn other_server(url: &str) -> Result<tokio_postgres::Config, String> {
    let (plain, tls) = split_tls_params(url).map_err(|e| e.to_string())?;
    let mut pg = tokio_postgres::Config::from_str(&plain).map_err(|e| e.to_string())?;
    pg.ssl_mode(tokio_postgres_mode(tls.mode));
    Ok(pg)
}

/// `[replicas]`, with a problem for each URL that is not one and a bad give-up time.
pub(super) fn read_replicas(
    section: &ReplicasConfig,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> ReadReplicas {
    let mut replicas = Vec::new();
    for url in &section.urls {
        match other_server(url.get_ref()) {
            Ok(pg) => replicas.push(pg),
            Err(e) => problems.push(Problem::new(
                lines.line_of(&url.span()),
                format!("[replicas] urls: not a valid PostgreSQL connection string: {e}"),
                Some(
                    "use postgres://user:password@replica:5432/dbname or host=... dbname=..."
                        .into(),
                ),
            )),
        }
    }
    let give_up_after = match &section.give_up_after {
        None => Duration::from_secs(30),
        Some(value) => match humantime::parse_duration(value.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                problems.push(Problem::new(
                    lines.line_of(&value.span()),
                    format!(
                        "[replicas] give_up_after \"{}\" is not a positive duration",
                        value.get_ref()
                    ),
                    Some("write a duration like \"30s\"".into()),
                ));
                Duration::from_secs(30)
            }
        },
    };
    ReadReplicas {
        replicas,
        give_up_after,
    }
}

/// A Postgres name pginval creates: lower-case, digits, underscores, at most 63 bytes.
fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}
