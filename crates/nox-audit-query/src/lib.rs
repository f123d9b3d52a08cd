//! The read side of the Nox audit trail, for any service that writes one
//! with `nox-audit-store`: filters validated into parameterised SQL, keyset
//! paging, today's statistics, activity per user, the daily rollups, the
//! admin actions, the chains' state and the export query; and what a
//! streaming replica says of its freshness ([`replica_lag`]).
//!
//! Each request is validated first (`*Query::parse`/`new`, no IO; errors are
//! [`QueryError::InvalidParameter`] with a message for the client), then run
//! by a plain async function over a `tokio_postgres::Client` (a
//! `deadpool_postgres` connection derefs to one). [`QueryError::kind`] tells
//! the web layer which status to answer; no error shows SQL to a client.
//!
//! ```no_run
//! use std::collections::HashMap;
//! use nox_audit_query::{LogsQuery, UserNames, logs};
//!
//! # async fn example(pool: deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
//! let params = HashMap::from([
//!     ("action_category".to_owned(), "filesystem".to_owned()),
//!     ("page_size".to_owned(), "20".to_owned()),
//! ]);
//! let query = LogsQuery::parse(&params)?;
//! let users = UserNames::new("users", "id", "name")?;
//! let client = pool.get().await?;
//! let page = logs(&client, query, Some(&users)).await?;
//! println!("{} rows, next: {:?}", page.logs.len(), page.next_cursor);
//! # Ok(())
//! # }
//! ```
//!
//! Validation needs no database:
//!
//! ```
//! use std::collections::HashMap;
//! use nox_audit_query::{ErrorKind, LogsQuery};
//!
//! let params = HashMap::from([("status_code".to_owned(), "1; DROP TABLE x".to_owned())]);
//! let error = LogsQuery::parse(&params).unwrap_err();
//! assert_eq!(error.kind(), ErrorKind::InvalidParameter);
//! assert_eq!(error.to_string(), "status_code: expected 100 to 599");
//! ```

mod activity;
mod cursor;
mod error;
mod export;
mod filter;
mod json_time;
mod logs;
mod replica;
mod stats;
mod stream;

pub use activity::{
    ActivityQuery, AdminActionRow, AdminActionsQuery, DailySummary, EndpointCount, SummariesQuery,
    UserActivity, admin_actions, daily_summaries, user_activity,
};
pub use cursor::Cursor;
pub use error::{ErrorKind, QueryError};
pub use export::{ByteStream, EXPORT_PARAMS, ExportQuery, Statement};
pub use filter::{FILTERS, Filters, Param, days_back, parse_bool, refuse_nul};
pub use logs::{LogsPage, LogsQuery, PAGING, logs};
pub use replica::{replayed_head, replica_lag};
pub use stats::{
    ChainHead, ChainState, TodayStats, chain_state, checkpoint_limit, checkpoints, today,
};
pub use stream::{SCAN_SPAN, STREAM_PARAMS, StreamPage, StreamQuery};

/// The embedder's user table, for the names beside user ids (`/logs`'
/// `user_name`, the activity's `name`). Without one those are null.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNames {
    table: String,
    id: String,
    name: String,
}

impl UserNames {
    /// The table and its id (uuid) and name (text) columns: plain SQL
    /// identifiers (letters, digits, `_`, optionally `schema.table`), as
    /// they are written into the statements.
    pub fn new(table: &str, id: &str, name: &str) -> Result<UserNames, QueryError> {
        let identifier = |text: &str| {
            text.split('.').all(|part| {
                part.bytes().next().is_some_and(|b| !b.is_ascii_digit())
                    && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
        };
        let columns_plain = !id.contains('.') && !name.contains('.');
        if !(identifier(table) && identifier(id) && identifier(name) && columns_plain) {
            return Err(QueryError::InvalidParameter(
                "user table: expected plain SQL identifiers".into(),
            ));
        }
        Ok(UserNames {
            table: table.to_owned(),
            id: id.to_owned(),
            name: name.to_owned(),
        })
    }

    /// ` LEFT JOIN <table> u ON u.<id> = <user_id>`.
    fn join_on(&self, user_id: &str) -> String {
        format!(" LEFT JOIN {} u ON u.{} = {user_id}", self.table, self.id)
    }
}
