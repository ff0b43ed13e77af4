//! One reading of what the catalog says of the rule tables (their shape, identity,
//! generated columns) and the server's version, shared by `check`, `setup`, `status`
//! and start-up's publication policy, so each reads every table once.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::{TableInfo, generated_columns, server_version, table_info};

/// The catalog's facts about a set of tables, as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `server_version_num`.
    pub server_version: u32,
    tables: HashMap<(String, String), Table>,
}

#[derive(Debug, Clone)]
struct Table {
    info: Option<TableInfo>,
    /// Generated columns: name and kind (`s` stored, `v` virtual).
    generated: Vec<(String, String)>,
}

impl Snapshot {
    /// Reads `tables` (schema, name) and the server's version.
    pub async fn read(
        client: &Client,
        tables: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Snapshot, tokio_postgres::Error> {
        let mut snapshot = Snapshot {
            server_version: server_version(client).await?,
            tables: HashMap::new(),
        };
        for (schema, name) in tables {
            if snapshot
                .tables
                .contains_key(&(schema.clone(), name.clone()))
            {
                continue;
            }
            let info = table_info(client, &schema, &name).await?;
            let generated = match &info {
                Some(info) => generated_columns(client, info.oid).await?,
                None => Vec::new(),
            };
            snapshot
                .tables
                .insert((schema, name), Table { info, generated });
        }
        Ok(snapshot)
    }

    /// The table as the catalog described it; `None` when it does not exist (or was
    /// not read).
    pub fn table(&self, schema: &str, name: &str) -> Option<&TableInfo> {
        self.entry(schema, name)?.info.as_ref()
    }

    /// The table's generated columns: name and kind (`s` stored, `v` virtual).
    pub fn generated(&self, schema: &str, name: &str) -> &[(String, String)] {
        self.entry(schema, name)
            .map_or(&[], |t| t.generated.as_slice())
    }

    fn entry(&self, schema: &str, name: &str) -> Option<&Table> {
        self.tables.get(&(schema.to_owned(), name.to_owned()))
    }
}
