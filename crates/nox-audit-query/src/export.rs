//! The export query: the rows `/logs` would list for the same filters,
//! newest first, every `audit_actions` column, encoded as a byte stream.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use nox_audit_export::{Columns, Format, Progress};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::error::{QueryError, invalid};
use crate::filter::{Filters, Param, parse_bool};

/// The export's own parameters, besides the filters.
pub const EXPORT_PARAMS: &[&str] = &["format", "compress", "limit"];

/// The encoded file, chunk by chunk; an error ends it (visibly incomplete).
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// A validated export request.
#[derive(Debug)]
pub struct ExportQuery {
    pub filters: Filters,
    /// csv (default), json or ndjson.
    pub format: Format,
    /// A gzip file.
    pub gzip: bool,
    /// At most this many rows (at least 1), newest first.
    pub limit: Option<i64>,
    /// The `user_id` filter, if any: the export's target user.
    pub user_id: Option<Uuid>,
}

impl ExportQuery {
    /// Validates the filters and the [`EXPORT_PARAMS`]; any other key is
    /// refused.
    pub fn parse(query: &HashMap<String, String>) -> Result<ExportQuery, QueryError> {
        let filters = Filters::parse(query, EXPORT_PARAMS)?;
        let format = match query.get("format") {
            None => Format::Csv,
            Some(text) => Format::parse(text)
                .ok_or_else(|| invalid("format", "expected csv, json or ndjson"))?,
        };
        let gzip = query
            .get("compress")
            .map(|text| parse_bool("compress", text))
            .transpose()?
            .unwrap_or(false);
        let limit = query
            .get("limit")
            .map(|text| {
                text.parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| invalid("limit", "expected 1 or more"))
            })
            .transpose()?;
        let user_id = query.get("user_id").and_then(|t| Uuid::parse_str(t).ok());
        Ok(ExportQuery {
            filters,
            format,
            gzip,
            limit,
            user_id,
        })
    }

    /// The statement; its parameters are the filters'.
    pub fn sql(&self) -> String {
        format!(
            "SELECT a.* FROM audit_actions a WHERE {} ORDER BY a.\"timestamp\" DESC, a.id DESC{}",
            self.filters.where_sql(),
            self.limit
                .map(|n| format!(" LIMIT {n}"))
                .unwrap_or_default()
        )
    }

    /// What an export record keeps of the request.
    pub fn description(&self) -> Value {
        json!({
            "format": self.format.as_str(),
            "compress": self.gzip,
            "limit": self.limit,
            "filters": Value::Object(self.filters.applied().clone()),
        })
    }

    /// The MIME type of the file (a compressed export is a gzip file, not
    /// a `Content-Encoding`).
    pub fn content_type(&self) -> &'static str {
        match self.gzip {
            true => "application/gzip",
            false => self.format.content_type(),
        }
    }

    /// The statement and its parameters, for a task that outlives `self`.
    pub fn into_statement(self) -> Statement {
        Statement {
            sql: self.sql(),
            format: self.format,
            gzip: self.gzip,
            params: self.filters.into_params(),
        }
    }
}

/// An export ready to run (see [`ExportQuery::into_statement`]).
pub struct Statement {
    sql: String,
    format: Format,
    gzip: bool,
    params: Vec<Param>,
}

impl std::fmt::Debug for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statement")
            .field("sql", &self.sql)
            .field("format", &self.format)
            .field("gzip", &self.gzip)
            .finish_non_exhaustive()
    }
}

impl Statement {
    /// Starts the query on `client` and returns the encoded rows; `progress`
    /// counts them. Errors before the first row are returned here, later
    /// ones end the stream.
    pub async fn open(
        &self,
        client: &tokio_postgres::Client,
        progress: Progress,
    ) -> Result<ByteStream, QueryError> {
        let statement = client.prepare(&self.sql).await?;
        let columns = Columns::new(statement.columns()).map_err(QueryError::internal)?;
        let params = self
            .params
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync));
        let rows = client.query_raw(&statement, params).await?;
        let encoded = nox_audit_export::encode(self.format, columns, rows, progress)
            .map_err(QueryError::internal)?;
        Ok(match self.gzip {
            true => Box::pin(nox_audit_export::gzip(encoded)),
            false => Box::pin(encoded),
        })
    }
}
