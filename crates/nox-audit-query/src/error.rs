//! Errors of the read side. Only [`QueryError::InvalidParameter`] carries a
//! message meant for the client; the others keep their cause for the log.

/// What went wrong, as the web layer maps it to a status and a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A parameter is malformed or out of range (400 `invalid_parameter`).
    InvalidParameter,
    /// No database connection could be had (503 `service_unavailable`).
    Unavailable,
    /// Anything else: a failed query, an unexpected value (500 `internal`).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The message names the parameter and says what was expected; it never
    /// quotes SQL.
    #[error("{0}")]
    InvalidParameter(String),
    #[error("no database connection")]
    Unavailable(#[from] deadpool_postgres::PoolError),
    #[error("an audit query failed")]
    Database(#[from] tokio_postgres::Error),
    #[error("an audit row could not be read")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl QueryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            QueryError::InvalidParameter(_) => ErrorKind::InvalidParameter,
            QueryError::Unavailable(_) => ErrorKind::Unavailable,
            QueryError::Database(_) | QueryError::Internal(_) => ErrorKind::Internal,
        }
    }

    pub(crate) fn internal(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        QueryError::Internal(error.into())
    }
}

/// `name: why`, as a 400.
pub(crate) fn invalid(name: &str, why: &str) -> QueryError {
    QueryError::InvalidParameter(format!("{name}: {why}"))
}
