//! The one mapping from errors to HTTP responses: every error a client sees
//! is JSON `{"detail": "...", "code": "..."}` with the matching status.
//! Internal details (SQL, panics, IO paths) are logged, never sent.

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::error::JsonPayloadError;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};

/// The body of every error response (shared with the audit endpoints).
pub use nox_audit_web::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PathEscape(String),
    #[error("{0}")]
    InvalidPath(String),
    /// 400: `/cat` or `/download` of a directory, FIFO, socket or device.
    #[error("{0}")]
    NotARegularFile(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 429 with a `Retry-After` header.
    #[error("{detail}")]
    RateLimited {
        detail: String,
        retry_after_secs: u64,
    },
    /// 429 (windowed quotas, with `Retry-After`) or 403 (storage, files).
    #[error("quota exceeded: {} {}/{}", .0.quota_type, .0.current_usage, .0.limit)]
    QuotaExceeded(nox_quota::Violation),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    ServiceUnavailable(String),
    /// 503: `POST /run` lacks isolation layers it needs (named in the detail).
    #[error("{0}")]
    SandboxUnavailable(String),
    /// 507: the data directory's filesystem is below `NOX_MIN_FREE_MB`.
    #[error("{0}")]
    InsufficientStorage(String),
    /// The client went away before the answer (nginx's 499); recorded,
    /// though nobody reads the response.
    #[error("{0}")]
    ClientClosed(String),
    /// Anything unexpected: logged with its cause chain, answered as 500.
    #[error("internal server error")]
    Internal(#[source] anyhow::Error),
}

/// Refuses a NUL in a value bound for PostgreSQL, whose text cannot hold
/// one (it would be a 500); `name` says which.
pub fn refuse_nul(name: &str, text: &str) -> Result<(), ApiError> {
    match text.contains('\0') {
        true => Err(ApiError::InvalidParameter(format!(
            "{name}: must not contain a NUL byte"
        ))),
        false => Ok(()),
    }
}

impl ApiError {
    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(error.into())
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PathEscape(_) => "path_escape",
            ApiError::InvalidPath(_) => "invalid_path",
            ApiError::NotARegularFile(_) => "not_a_regular_file",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::ServiceUnavailable(_) => "service_unavailable",
            ApiError::SandboxUnavailable(_) => "sandbox_unavailable",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::ClientClosed(_) => "client_closed_request",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PathEscape(_) | ApiError::InvalidPath(_) | ApiError::NotARegularFile(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::QuotaExceeded(violation) if violation.retry_after_secs.is_some() => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::QuotaExceeded(_) => StatusCode::FORBIDDEN,
            ApiError::InvalidParameter(_) => StatusCode::BAD_REQUEST,
            ApiError::ServiceUnavailable(_) | ApiError::SandboxUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::ClientClosed(_) => {
                StatusCode::from_u16(nox_audit_actix::CLIENT_CLOSED_REQUEST)
                    .expect("a valid status")
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(source) = self {
            tracing::error!(error = format!("{source:#}"), "internal error");
        }
        let violation = match self {
            ApiError::QuotaExceeded(violation) => Some(violation),
            _ => None,
        };
        let retry_after = match self {
            ApiError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ApiError::QuotaExceeded(violation) => violation.retry_after_secs,
            _ => None,
        };
        let mut response = HttpResponse::build(self.status_code()).json(ErrorBody {
            detail: self.to_string(),
            code: self.code(),
            retry_after,
            quota_type: violation.map(|v| v.quota_type),
            current_usage: violation.map(|v| v.current_usage),
            limit: violation.map(|v| v.limit),
        });
        if let ApiError::Unauthorized(_) = self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<nox_sandbox::SandboxError> for ApiError {
    fn from(error: nox_sandbox::SandboxError) -> Self {
        use nox_sandbox::SandboxError;
        match error {
            SandboxError::NotFound => ApiError::NotFound("path not found".into()),
            SandboxError::PathEscape(detail) => ApiError::PathEscape(detail),
            SandboxError::InvalidPath(detail) => ApiError::InvalidPath(detail),
            SandboxError::NotARegularFile(detail) => ApiError::NotARegularFile(detail),
            SandboxError::Io(error) => ApiError::internal(error),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        tracing::warn!(%error, "no database connection");
        ApiError::ServiceUnavailable("the database is unavailable".into())
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(error: actix_web::error::BlockingError) -> Self {
        ApiError::internal(anyhow::anyhow!("a blocking task failed: {error}"))
    }
}

impl From<nox_auth::StoreError> for ApiError {
    fn from(error: nox_auth::StoreError) -> Self {
        use nox_auth::StoreError;
        if error.is_unavailable() {
            tracing::warn!(error = format!("{error:#}"), "database unavailable");
            return ApiError::ServiceUnavailable("the database is unavailable".into());
        }
        match error {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(detail) => ApiError::Conflict(detail),
            other => ApiError::internal(other),
        }
    }
}

pub fn json_error(
    status: StatusCode,
    detail: impl Into<String>,
    code: &'static str,
) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody::new(detail, code))
}

/// The code used for a status when nothing more specific is known.
fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_parameter",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "service_unavailable",
        507 => "insufficient_storage",
        _ if status.is_client_error() => "bad_request",
        _ => "internal",
    }
}

/// The default service: a known path asked with a method it does not
/// answer gets a JSON 405 with `Allow`; anything else a JSON 404.
pub async fn not_found(request: HttpRequest) -> HttpResponse {
    let allowed = crate::openapi::allowed_methods(request.path());
    // (A documented method that still reached here: no route took it after
    // all, so 404 rather than a 405 naming the method itself.)
    if allowed.is_empty() || allowed.contains(request.method()) {
        return json_error(StatusCode::NOT_FOUND, "Not Found", "not_found");
    }
    let allow = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut response = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed here; use {allow}", request.method()),
        "method_not_allowed",
    );
    if let Ok(value) = HeaderValue::from_str(&allow) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

/// Rewrites any error response that is not already JSON (actix's own 405s,
/// extractor and payload errors) into the `{"detail","code"}` shape. Client
/// errors keep actix's message, which describes the input; server errors get
/// a generic one.
pub fn json_error_handlers<B: MessageBody + 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(|response: ServiceResponse<B>| {
        let is_json = response
            .response()
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
        if is_json {
            return Ok(ErrorHandlerResponse::Response(
                response.map_into_left_body(),
            ));
        }
        let status = response.status();
        let detail = match response.response().error() {
            Some(error) if status.is_client_error() => error.to_string(),
            _ => status
                .canonical_reason()
                .unwrap_or("Request failed")
                .to_owned(),
        };
        let (request, old) = response.into_parts();
        let mut new = json_error(status, detail, code_for_status(status));
        // Keep headers such as `Allow` or `Retry-After` that explain the error.
        for (name, value) in old.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                new.headers_mut().insert(name.clone(), value.clone());
            }
        }
        new.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(ErrorHandlerResponse::Response(
            ServiceResponse::new(request, new).map_into_right_body::<B>(),
        ))
    })
}

/// Makes query-string, path and JSON-body extraction failures answer 400
/// `invalid_parameter` with the parser's message.
pub fn configure_extractors(config: &mut web::ServiceConfig) {
    config
        .app_data(
            web::QueryConfig::default()
                .error_handler(|error, _| ApiError::InvalidParameter(error.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|error, _| ApiError::InvalidParameter(error.to_string()).into()),
        )
        .app_data(web::JsonConfig::default().error_handler(|error, _| {
            match error {
                JsonPayloadError::ContentType => ApiError::InvalidParameter(
                    "the body must be JSON, sent with Content-Type: application/json".to_owned(),
                ),
                JsonPayloadError::Overflow { limit }
                | JsonPayloadError::OverflowKnownLength { limit, .. } => {
                    ApiError::PayloadTooLarge(format!("a JSON body is limited to {limit} bytes"))
                }
                other => ApiError::InvalidParameter(format!("invalid JSON body: {other}")),
            }
            .into()
        }));
}
