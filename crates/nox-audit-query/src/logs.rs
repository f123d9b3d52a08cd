//! The audit rows, filtered, newest first, paged by keyset (`cursor`,
//! constant cost however deep) or by `page` (offset, for older clients).

use std::collections::HashMap;

use nox_audit_export::{Columns, RowJson};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::UserNames;
use crate::cursor::Cursor;
use crate::error::{QueryError, invalid};
use crate::filter::{Filters, borrowed, parse_bool};

/// The paging parameters, besides the filters.
pub const PAGING: &[&str] = &["page", "page_size", "cursor", "include_total"];

/// A validated request for one page of rows.
#[derive(Debug)]
pub struct LogsQuery {
    pub filters: Filters,
    /// 1 to 1000 (default 50).
    pub page_size: i64,
    /// 1 to `u32::MAX` (default 1); ignored with a cursor.
    pub page: i64,
    pub cursor: Option<Cursor>,
    pub include_total: bool,
}

impl LogsQuery {
    /// Validates the filters and the [`PAGING`] parameters; any other key
    /// is refused.
    pub fn parse(query: &HashMap<String, String>) -> Result<LogsQuery, QueryError> {
        let filters = Filters::parse(query, PAGING)?;
        let page_size = match query.get("page_size") {
            None => 50,
            Some(text) => text
                .parse()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| invalid("page_size", "expected 1 to 1000"))?,
        };
        // At most u32::MAX, as documented: the offset, (page - 1) * page_size,
        // then fits an i64 (a larger page overflowed: a panic, or in a
        // release build a negative OFFSET and a 500).
        let page = match query.get("page") {
            None => 1,
            Some(text) => text
                .parse()
                .ok()
                .filter(|n| (1..=i64::from(u32::MAX)).contains(n))
                .ok_or_else(|| invalid("page", "expected 1 to 4294967295"))?,
        };
        let include_total = query
            .get("include_total")
            .map(|t| parse_bool("include_total", t))
            .transpose()?
            .unwrap_or(false);
        let cursor = query.get("cursor").map(|t| Cursor::decode(t)).transpose()?;
        Ok(LogsQuery {
            filters,
            page_size,
            page,
            cursor,
            include_total,
        })
    }

    /// The page's statement: one row more than the page, to learn whether
    /// another follows. Its parameters are the filters', then the cursor's.
    pub fn sql(&self, users: Option<&UserNames>) -> String {
        let where_filters = self.filters.where_sql();
        let n = self.filters.params().len();
        let (paging, offset) = match self.cursor {
            Some(_) => (
                format!(" AND (a.\"timestamp\", a.id) < (${}, ${})", n + 1, n + 2),
                0,
            ),
            None => (String::new(), (self.page - 1) * self.page_size),
        };
        let (name, join) = match users {
            Some(users) => (format!("u.{}", users.name), users.join_on("a.user_id")),
            None => ("NULL::text".to_owned(), String::new()),
        };
        format!(
            "SELECT a.*, {name} AS user_name FROM audit_actions a{join}
         WHERE {where_filters}{paging}
         ORDER BY a.\"timestamp\" DESC, a.id DESC LIMIT {} OFFSET {offset}",
            self.page_size + 1
        )
    }

    /// The count of every matching row (filters only).
    pub fn count_sql(&self) -> String {
        format!(
            "SELECT count(*) FROM audit_actions a WHERE {}",
            self.filters.where_sql()
        )
    }
}

/// One page. Each row is a JSON object of every `audit_actions` column (as
/// the export writes them) plus `user_name`.
#[derive(Debug, Serialize)]
pub struct LogsPage {
    pub logs: Vec<Value>,
    pub page: i64,
    pub page_size: i64,
    pub has_next: bool,
    /// Pass as `cursor` for the next page.
    pub next_cursor: Option<String>,
    pub filters_applied: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_count: Option<i64>,
}

/// Runs `query`. `users` names the embedder's user table, for `user_name`.
pub async fn logs(
    client: &tokio_postgres::Client,
    query: LogsQuery,
    users: Option<&UserNames>,
) -> Result<LogsPage, QueryError> {
    let sql = query.sql(users);
    let count_sql = query.count_sql();
    let LogsQuery {
        filters,
        page_size,
        page,
        cursor,
        include_total,
    } = query;
    let applied = filters.applied().clone();
    let mut params = filters.into_params();
    let filter_params = params.len();
    if let Some(cursor) = cursor {
        params.push(Box::new(cursor.at));
        params.push(Box::new(cursor.id));
    }
    let params = borrowed(&params);
    let mut rows = client.query(&sql, &params).await?;
    let has_next = rows.len() as i64 > page_size;
    rows.truncate(page_size as usize);
    let next_cursor = match rows.last() {
        Some(last) if has_next => Some(
            Cursor {
                at: last.try_get("timestamp")?,
                id: last.try_get("id")?,
            }
            .encode(),
        ),
        _ => None,
    };
    let logs = match rows.first() {
        None => Vec::new(),
        Some(first) => {
            let columns = Columns::new(first.columns()).map_err(QueryError::internal)?;
            rows.iter()
                .map(|row| {
                    serde_json::to_value(RowJson {
                        columns: &columns,
                        row,
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(QueryError::internal)?
        }
    };
    let total_count = match include_total {
        true => Some(
            client
                .query_one(&count_sql, &params[..filter_params])
                .await?
                .try_get(0)?,
        ),
        false => None,
    };
    Ok(LogsPage {
        logs,
        page,
        page_size,
        has_next,
        next_cursor,
        filters_applied: applied,
        total_count,
    })
}
