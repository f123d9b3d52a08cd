//! The live stream's reads: the rows of the actions chain after a sequence
//! number, filtered as `/logs` filters, in chain (commit) order.
//!
//! The chain's `seq` is gapless and assigned in commit order, so the rows
//! with `seq <= head` are all committed once the head is, and "after seq N"
//! is an exact resume point. Each read covers at most [`SCAN_SPAN`]
//! sequence numbers, so a selective filter over a long gap costs many small
//! indexed reads instead of one that walks the whole gap.

use std::collections::HashMap;

use nox_audit_export::{Columns, RowJson};

use crate::UserNames;
use crate::error::{QueryError, invalid};
use crate::filter::{Filters, borrowed};

/// The stream's own parameter, besides the filters: resume after this
/// `seq` (the `Last-Event-ID` header does the same and wins).
pub const STREAM_PARAMS: &[&str] = &["after"];

/// The most sequence numbers one read covers.
pub const SCAN_SPAN: i64 = 10_000;

/// A validated stream request.
#[derive(Debug)]
pub struct StreamQuery {
    pub filters: Filters,
    /// Resume after this `seq`; `None`: from the records committed next.
    pub after: Option<i64>,
    sql: String,
}

/// The matching records of one read, and how far it looked.
#[derive(Debug)]
pub struct StreamPage {
    /// `(seq, the row as /logs shows it, as JSON text)`, in `seq` order.
    pub records: Vec<(i64, String)>,
    /// Every row up to this `seq` has been considered: the next read
    /// starts after it.
    pub scanned_to: i64,
}

impl StreamQuery {
    /// Validates the filters and `after`; `last_event_id` is the header's
    /// value, which takes precedence.
    pub fn parse(
        query: &HashMap<String, String>,
        last_event_id: Option<&str>,
        users: Option<&UserNames>,
    ) -> Result<StreamQuery, QueryError> {
        let filters = Filters::parse(query, STREAM_PARAMS)?;
        let after = match (last_event_id, query.get("after")) {
            (Some(text), _) => Some(parse_seq("Last-Event-ID", text)?),
            (None, Some(text)) => Some(parse_seq("after", text)?),
            (None, None) => None,
        };
        let sql = read_sql(&filters, users);
        Ok(StreamQuery {
            filters,
            after,
            sql,
        })
    }

    /// The matching rows with `after < seq <= min(head, after + SCAN_SPAN)`,
    /// at most `limit` of them.
    pub async fn read(
        &self,
        client: &tokio_postgres::Client,
        after: i64,
        head: i64,
        limit: usize,
    ) -> Result<StreamPage, QueryError> {
        let upto = head.min(after.saturating_add(SCAN_SPAN));
        let limit = limit.max(1) as i64;
        let mut params = borrowed(self.filters.params());
        params.push(&after);
        params.push(&upto);
        params.push(&limit);
        let rows = client.query(&self.sql, &params).await?;
        let full = rows.len() as i64 == limit;
        let Some(first) = rows.first() else {
            return Ok(StreamPage {
                records: Vec::new(),
                scanned_to: upto,
            });
        };
        let columns = Columns::new(first.columns()).map_err(QueryError::internal)?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            // Straight to text: one pass, no intermediate `Value`.
            let json = serde_json::to_string(&RowJson {
                columns: &columns,
                row,
            })
            .map_err(QueryError::internal)?;
            records.push((seq, json));
        }
        // A full page may have more matches before `upto`.
        let scanned_to = match full {
            true => records.last().map_or(upto, |(seq, _)| *seq),
            false => upto,
        };
        Ok(StreamPage {
            records,
            scanned_to,
        })
    }
}

/// A sequence number: 0 (before the first row) up to `i64::MAX`.
fn parse_seq(name: &str, text: &str) -> Result<i64, QueryError> {
    text.trim()
        .parse()
        .ok()
        .filter(|seq: &i64| *seq >= 0)
        .ok_or_else(|| invalid(name, "expected a sequence number (0 or more)"))
}

/// The filters' conditions, then the range and the limit as the last three
/// parameters; the `seq` index serves the range.
fn read_sql(filters: &Filters, users: Option<&UserNames>) -> String {
    let n = filters.params().len();
    let (name, join) = match users {
        Some(users) => (format!("u.{}", users.name), users.join_on("a.user_id")),
        None => ("NULL::text".to_owned(), String::new()),
    };
    format!(
        "SELECT a.*, {name} AS user_name FROM audit_actions a{join}
         WHERE a.seq > ${} AND a.seq <= ${} AND {}
         ORDER BY a.seq LIMIT ${}",
        n + 1,
        n + 2,
        filters.where_sql(),
        n + 3
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_header_wins_over_after() {
        let parsed = StreamQuery::parse(&query(&[("after", "5")]), Some("9"), None).unwrap();
        assert_eq!(parsed.after, Some(9));
        let parsed = StreamQuery::parse(&query(&[("after", "5")]), None, None).unwrap();
        assert_eq!(parsed.after, Some(5));
        let parsed = StreamQuery::parse(&query(&[]), None, None).unwrap();
        assert_eq!(parsed.after, None);
    }

    #[test]
    fn hostile_resume_points_are_one_clear_error() {
        for text in ["-1", "abc", "1e3", "", "9223372036854775808", "1; --"] {
            let error = StreamQuery::parse(&query(&[("after", text)]), None, None).unwrap_err();
            assert_eq!(
                error.to_string(),
                "after: expected a sequence number (0 or more)",
                "{text:?}"
            );
            let error = StreamQuery::parse(&query(&[]), Some(text), None).unwrap_err();
            assert!(error.to_string().starts_with("Last-Event-ID: "), "{text:?}");
        }
    }

    #[test]
    fn the_filters_are_those_of_logs_and_paging_is_refused() {
        let error = StreamQuery::parse(&query(&[("cursor", "x")]), None, None).unwrap_err();
        assert_eq!(error.to_string(), "cursor: unknown parameter");
        let parsed =
            StreamQuery::parse(&query(&[("action_type", "file_read")]), None, None).unwrap();
        assert!(parsed.sql.contains("a.action_type = $1"), "{}", parsed.sql);
        assert!(parsed.sql.contains("a.seq > $2 AND a.seq <= $3"));
        assert!(parsed.sql.ends_with("LIMIT $4"));
    }
}
