//! Errors as JSON `{"detail","code"}` with the matching status. Internal
//! causes (SQL errors included) are logged, never sent.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use nox_audit_query::{ErrorKind, QueryError};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A human-readable message.
    pub detail: String,
    /// A stable snake_case code for programs.
    pub code: &'static str,
    /// Seconds to wait before retrying (rate limits and windowed quotas).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// For quota refusals: which quota, the usage and the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_usage: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

impl ErrorBody {
    /// A body with only `detail` and `code`.
    pub fn new(detail: impl Into<String>, code: &'static str) -> ErrorBody {
        ErrorBody {
            detail: detail.into(),
            code,
            retry_after: None,
            quota_type: None,
            current_usage: None,
            limit: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Query(#[from] QueryError),
    /// 401, for an [`Authorize`](crate::Authorize) hook: who is asking is
    /// not known.
    #[error("{0}")]
    Unauthorized(String),
    /// 403, for an [`Authorize`](crate::Authorize) hook: the caller may not.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 503 (too many exports).
    #[error("{0}")]
    Busy(String),
    /// 500: the export task ended before reporting.
    #[error("internal server error")]
    Internal(&'static str),
}

impl From<deadpool_postgres::PoolError> for WebError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        WebError::Query(error.into())
    }
}

/// `error` and its causes, `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl WebError {
    fn kind(&self) -> (StatusCode, &'static str) {
        match self {
            WebError::Query(error) => match error.kind() {
                ErrorKind::InvalidParameter => (StatusCode::BAD_REQUEST, "invalid_parameter"),
                ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
                ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            WebError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            WebError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            WebError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            WebError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            WebError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// What the client reads: only invalid parameters and refusals say more
    /// than the status.
    fn detail(&self) -> String {
        match self {
            WebError::Query(error) => match error.kind() {
                ErrorKind::InvalidParameter => error.to_string(),
                ErrorKind::Unavailable => "the database is unavailable".to_owned(),
                ErrorKind::Internal => "internal server error".to_owned(),
            },
            other => other.to_string(),
        }
    }
}

impl ResponseError for WebError {
    fn status_code(&self) -> StatusCode {
        self.kind().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code) = self.kind();
        match self {
            WebError::Query(error) if error.kind() == ErrorKind::Unavailable => {
                tracing::warn!(error = chain(error), "no database connection");
            }
            WebError::Query(error) if error.kind() == ErrorKind::Internal => {
                tracing::error!(error = chain(error), "internal error");
            }
            WebError::Internal(what) => tracing::error!(error = *what, "internal error"),
            _ => {}
        }
        HttpResponse::build(status).json(ErrorBody::new(self.detail(), code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_stay_in_the_log() {
        let error = WebError::Query(QueryError::InvalidParameter("page: expected 1".into()));
        assert_eq!(error.status_code(), 400);
        assert_eq!(error.detail(), "page: expected 1");
        let busy = WebError::Busy("too many exports are running; retry".into());
        assert_eq!(busy.status_code(), 503);
        assert_eq!(busy.kind().1, "service_unavailable");
        assert_eq!(WebError::Internal("x").detail(), "internal server error");
        let refused = WebError::Forbidden("not you".into());
        assert_eq!(
            (refused.status_code(), refused.detail()),
            (StatusCode::FORBIDDEN, "not you".into())
        );
        assert_eq!(
            WebError::Unauthorized("who?".into()).kind(),
            (StatusCode::UNAUTHORIZED, "unauthorized")
        );
    }
}
