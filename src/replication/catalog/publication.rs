//! Catalog queries about publications: what a publication holds (tables, column lists,
//! row filters), whether pginval manages it, and whether a role may publish.

use tokio_postgres::Client;

use super::{describe_error, quote_ident, quote_table, server_version};

/// A publication.
#[derive(Debug, Clone)]
pub struct PublicationInfo {
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// Published `(schema, table)` pairs.
    pub tables: Vec<(String, String)>,
    /// Which operations it publishes.
    pub insert: bool,
    /// Publishes UPDATE.
    pub update: bool,
    /// Publishes DELETE.
    pub delete: bool,
    /// Publishes TRUNCATE.
    pub truncate: bool,
    /// `publish_via_partition_root`.
    pub via_root: bool,
}

/// Which of `tables` the publication does not publish (now, by name): a rule table
/// renamed away, or replaced by a table of the same name that is not in it. None
/// while the publication does not exist (start-up creates it).
pub async fn unpublished(
    client: &Client,
    publication: &str,
    tables: &[(String, String)],
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, t)| (s.as_str(), t.as_str())).unzip();
    Ok(client
        .query(
            "SELECT t.s, t.n FROM unnest($2::text[], $3::text[]) AS t(s, n)
              WHERE EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)
                AND NOT EXISTS (SELECT 1 FROM pg_publication_tables p
                                 WHERE p.pubname = $1 AND p.schemaname = t.s AND p.tablename = t.n)",
            &[&publication, &schemas, &names],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A publication, or `None` when it does not exist.
pub async fn publication(
    client: &Client,
    name: &str,
) -> Result<Option<PublicationInfo>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot
               FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(None);
    };
    let tables = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Some(PublicationInfo {
        all_tables: row.get(0),
        insert: row.get(1),
        update: row.get(2),
        delete: row.get(3),
        truncate: row.get(4),
        via_root: row.get(5),
        tables,
    }))
}

/// A table as pginval publishes it: with a column list, or whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTable {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// The published columns; `None` publishes every column.
    pub columns: Option<Vec<String>>,
    /// The row filter (a SQL condition); `None` publishes every row.
    pub row_filter: Option<String>,
}

impl PublishedTable {
    /// A whole table.
    pub fn whole(schema: &str, table: &str) -> PublishedTable {
        PublishedTable {
            schema: schema.to_owned(),
            table: table.to_owned(),
            columns: None,
            row_filter: None,
        }
    }

    /// The table as a publication lists it: `schema.table (columns) WHERE (filter)`.
    pub fn sql(&self) -> String {
        let mut sql = quote_table(&self.schema, &self.table);
        if let Some(cols) = &self.columns {
            let cols: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
            sql.push_str(&format!(" ({})", cols.join(", ")));
        }
        if let Some(filter) = &self.row_filter {
            sql.push_str(&format!(" WHERE ({filter})"));
        }
        sql
    }
}

/// Whether the publication carries pginval's "managed" comment.
pub async fn publication_is_managed(
    client: &Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
        .and_then(|r| r.get::<_, Option<String>>(0))
        .is_some_and(|c| c == crate::publication::MANAGED_COMMENT))
}

/// The published columns and row filter of each table of a publication; before
/// PostgreSQL 15 (no column lists, no row filters) both are `None`.
pub async fn publication_tables(
    client: &Client,
    name: &str,
) -> Result<Vec<PublishedTable>, tokio_postgres::Error> {
    let query = if server_version(client).await? >= 150000 {
        "SELECT schemaname::text, tablename::text, attnames::text[], rowfilter
           FROM pg_publication_tables WHERE pubname = $1"
    } else {
        "SELECT schemaname::text, tablename::text, NULL::text[], NULL::text
           FROM pg_publication_tables WHERE pubname = $1"
    };
    Ok(client
        .query(query, &[&name])
        .await?
        .iter()
        .map(|r| PublishedTable {
            schema: r.get(0),
            table: r.get(1),
            columns: r.get(2),
            row_filter: r.get(3),
        })
        .collect())
}

/// What PostgreSQL makes of a rule's `where` as a publication row filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFilter {
    /// The condition as PostgreSQL prints it back (`pg_publication_tables.rowfilter`).
    pub canonical: String,
    /// The columns it reads.
    pub columns: Vec<String>,
}

/// Tries `filter` as the row filter of `schema.table` in a publication created and
/// rolled back at once: `Ok(Err(reason))` when PostgreSQL refuses it (reason given as
/// PostgreSQL says it), otherwise its canonical form and the columns it reads. Needs
/// the right to create a publication for the table (its owner).
pub async fn probe_row_filter(
    client: &Client,
    schema: &str,
    table: &str,
    filter: &str,
) -> Result<Result<RowFilter, String>, tokio_postgres::Error> {
    let probe = format!("pginval_probe_{}", std::process::id());
    client.batch_execute("BEGIN").await?;
    let probed = async {
        // One statement through the extended protocol: a filter cannot smuggle in
        // a second one.
        let create = format!(
            "CREATE PUBLICATION {} FOR TABLE {} WHERE ({filter}) WITH (publish_via_partition_root = true)",
            quote_ident(&probe),
            quote_table(schema, table)
        );
        if let Err(e) = client.execute(create.as_str(), &[]).await {
            return Ok(Err(describe_error(&e)));
        }
        let rows = client
            .query(
                "SELECT pg_get_expr(pr.prqual, pr.prrelid), pr.prqual::text, pr.prrelid
                   FROM pg_publication p
                   JOIN pg_publication_rel pr ON pr.prpubid = p.oid
                  WHERE p.pubname = $1",
                &[&probe],
            )
            .await?;
        // Exactly the one table, with a condition: a filter cannot reach further.
        let [row] = rows.as_slice() else {
            return Ok(Err(format!(
                "`{filter}` is not one condition on {schema}.{table}"
            )));
        };
        let (Some(canonical), Some(tree)) =
            (row.get::<_, Option<String>>(0), row.get::<_, Option<String>>(1))
        else {
            return Ok(Err(format!("`{filter}` is not a condition")));
        };
        let relid: u32 = row.get(2);
        // The stored expression tree names each column it reads as `:varattno N`.
        let attnums: Vec<i16> = tree
            .split(":varattno ")
            .skip(1)
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect();
        let columns = client
            .query(
                "SELECT attname::text FROM pg_attribute
                  WHERE attrelid = $1 AND attnum = ANY($2) ORDER BY attnum",
                &[&relid, &attnums],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Ok(RowFilter { canonical, columns }))
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    probed
}

/// Whether the current role may create a publication for `tables`: superuser, or
/// member of every table's owner role.
pub async fn can_publish(
    client: &Client,
    tables: &[(String, String)],
) -> Result<bool, tokio_postgres::Error> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, t)| (s.as_str(), t.as_str())).unzip();
    Ok(client
        .query_one(
            "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 OR coalesce(bool_and(pg_has_role(c.relowner, 'USAGE')), true)
               FROM unnest($1::text[], $2::text[]) AS t(s, n)
               JOIN pg_namespace ns ON ns.nspname = t.s
               JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t.n",
            &[&schemas, &names],
        )
        .await?
        .get(0))
}

/// Whether publication `name` publishes stored generated columns
/// (`publish_generated_columns = stored`, PostgreSQL 18+; false before).
pub async fn publishes_generated_columns(
    client: &Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    if server_version(client).await? < 180000 {
        return Ok(false);
    }
    Ok(client
        .query_opt(
            "SELECT pubgencols::text FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
        .map(|r| r.get::<_, String>(0))
        .is_some_and(|v| matches!(v.as_str(), "s" | "t" | "true")))
}
