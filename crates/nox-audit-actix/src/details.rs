//! What handlers and inner middleware add to the current request's record.

use std::cell::RefCell;
use std::rc::Rc;

use actix_web::HttpMessage;
use serde_json::{Map, Value};
use uuid::Uuid;

/// Facts about a request that only the application knows. Everything is
/// optional; the middleware fills the rest (timing, sizes, status, route).
#[derive(Debug, Default, Clone)]
pub struct AuditDetails {
    /// The authenticated caller, whatever the response turns out to be.
    pub user_id: Option<Uuid>,
    /// The first 16 hex digits of SHA-256(token): identifies the session.
    pub session_token_hash: Option<String>,
    pub file_path: Option<String>,
    pub file_size_bytes: Option<i64>,
    pub files_affected: Option<i32>,
    pub command_type: Option<String>,
    pub command_text: Option<String>,
    pub exit_code: Option<i32>,
    pub stdout_size: Option<i64>,
    pub stderr_size: Option<i64>,
    /// Replaces the measured server CPU (a run reports its child's).
    pub cpu_time_ms: Option<f64>,
    pub memory_peak_mb: Option<f64>,
    pub quota_violation: bool,
    pub quota_consumed: Option<Value>,
    pub quota_remaining: Option<Value>,
    pub metadata: Map<String, Value>,
    /// Set when the handler knows better than the response's `detail`.
    pub error_details: Option<String>,
}

/// The shared cell the middleware puts into each request's extensions.
#[derive(Debug, Clone, Default)]
pub(crate) struct DetailsCell(pub(crate) Rc<RefCell<AuditDetails>>);

/// Adds facts to the audit record of the request `message` belongs to (an
/// `HttpRequest` in a handler, a `ServiceRequest` in middleware). Does
/// nothing when the request is not audited.
pub fn record<M: HttpMessage>(message: &M, add: impl FnOnce(&mut AuditDetails)) {
    let cell = message.extensions().get::<DetailsCell>().cloned();
    if let Some(cell) = cell {
        add(&mut cell.0.borrow_mut());
    }
}

/// The request id of an audited request (also sent back as `X-Request-ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(pub Uuid);

pub fn request_id<M: HttpMessage>(message: &M) -> Option<Uuid> {
    message.extensions().get::<RequestId>().map(|id| id.0)
}
