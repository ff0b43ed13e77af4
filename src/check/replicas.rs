//! `check` of `[replicas]`: each read replica reachable, in recovery, and of the
//! source's cluster (same system identifier), as `run` needs to wait for it.

use std::time::Duration;

use super::CheckReport;
use super::standby::system_identifier;
use crate::config::Config;
use crate::diagnostics::Problem;
use crate::replication::catalog;

/// Bound of one replica's connection and questions.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Checks every `[replicas]` URL; `source_id` is the source's system identifier.
pub(super) async fn check_replicas(
    config: &Config,
    source_id: Option<i64>,
    report: &mut CheckReport,
) {
    for pg in &config.read_replicas.replicas {
        let mut source = config.source.clone();
        source.pg = pg.clone();
        let name = format!("[replicas] {}", catalog::server_name(pg));
        let client = match tokio::time::timeout(TIMEOUT, catalog::connect(&source)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                report.warnings.push(Problem::new(
                    None,
                    format!("cannot connect to {name}: {}; run waits for it up to give_up_after, then goes on without it until it has caught up", catalog::describe_error(&e)),
                    Some("check the URL, the role and pg_hba.conf of the replica".into()),
                ));
                continue;
            }
            Err(_) => {
                report.warnings.push(Problem::new(
                    None,
                    format!("{name} did not answer within {TIMEOUT:?}; run waits for it up to give_up_after, then goes on without it until it has caught up"),
                    None,
                ));
                continue;
            }
        };
        let theirs = tokio::time::timeout(TIMEOUT, system_identifier(&client))
            .await
            .ok()
            .flatten();
        if let (Some(ours), Some(theirs)) = (source_id, theirs)
            && ours != theirs
        {
            report.problems.push(Problem::new(
                None,
                format!("{name} is a server of another cluster (system identifier {theirs}; the source's is {ours}): its replay position says nothing of the source's commits"),
                Some("list physical replicas of the source's primary".into()),
            ));
            continue;
        }
        let asked = client.query_one("SELECT pg_is_in_recovery()", &[]);
        let Ok(answer) = tokio::time::timeout(TIMEOUT, asked).await else {
            report.warnings.push(Problem::new(
                None,
                format!("{name} did not answer within {TIMEOUT:?} whether it is in recovery"),
                None,
            ));
            continue;
        };
        match answer.and_then(|row| row.try_get::<_, bool>(0)) {
            Ok(true) => report.notes.push(format!(
                "{name} is a replica of the source's cluster; each batch is applied again once it replayed it"
            )),
            Ok(false) => report.problems.push(Problem::new(
                None,
                format!("{name} is not in recovery: a primary has every commit it will ever replay, there is nothing to wait for"),
                Some("list the physical replicas applications read from, not the primary".into()),
            )),
            Err(e) => report.warnings.push(Problem::new(
                None,
                format!("cannot ask {name} whether it is in recovery: {}", catalog::describe_error(&e)),
                None,
            )),
        }
    }
}
