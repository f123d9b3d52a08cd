//! One audit record per request: a row of `audit_actions`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// Every column of `audit_actions`, in the table's order. Serialisable so
/// the writer can spool records to disk while the database is away. Values
/// a client controls are made storable before the record is queued
/// ([`ActionRecord::make_storable`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub request_id: Uuid,
    pub session_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub endpoint: String,
    pub route: String,
    pub http_method: String,
    pub action_type: String,
    pub action_category: String,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub request_size: i64,
    pub response_size: i64,
    pub status_code: i16,
    pub success: bool,
    pub response_time_ms: f64,
    pub cpu_time_ms: Option<f64>,
    pub memory_peak_mb: Option<f64>,
    pub file_path: Option<String>,
    pub file_size_bytes: Option<i64>,
    pub files_affected: Option<i32>,
    pub command_type: Option<String>,
    pub command_text: Option<String>,
    pub exit_code: Option<i32>,
    pub stdout_size: Option<i64>,
    pub stderr_size: Option<i64>,
    pub quota_violation: bool,
    pub quota_consumed: Option<Value>,
    pub quota_remaining: Option<Value>,
    pub metadata: Option<Value>,
    pub error_details: Option<String>,
    /// Not a column: the first 16 hex digits of SHA-256(token), which with
    /// `user_id` identifies the session. The writer assigns `session_id`.
    pub session_token_hash: Option<String>,
}

impl ActionRecord {
    /// A record of a request that has just arrived: a fresh UUIDv7 id, and
    /// every fact not known yet empty (`route` is `unmatched` until routing
    /// says otherwise).
    pub fn arrived(
        request_id: Uuid,
        timestamp: OffsetDateTime,
        http_method: &str,
        endpoint: &str,
    ) -> ActionRecord {
        ActionRecord {
            id: Uuid::now_v7(),
            timestamp,
            request_id,
            session_id: None,
            user_id: None,
            endpoint: endpoint.to_owned(),
            route: "unmatched".to_owned(),
            http_method: http_method.to_owned(),
            action_type: String::new(),
            action_category: String::new(),
            client_ip: None,
            user_agent: None,
            request_size: 0,
            response_size: 0,
            status_code: 0,
            success: false,
            response_time_ms: 0.0,
            cpu_time_ms: None,
            memory_peak_mb: None,
            file_path: None,
            file_size_bytes: None,
            files_affected: None,
            command_type: None,
            command_text: None,
            exit_code: None,
            stdout_size: None,
            stderr_size: None,
            quota_violation: false,
            quota_consumed: None,
            quota_remaining: None,
            metadata: None,
            error_details: None,
            session_token_hash: None,
        }
    }

    /// Sets the kind, status and success flag.
    pub fn set_outcome(&mut self, kind: crate::ActionKind, status: u16) {
        self.action_type = kind.action_type.to_owned();
        self.action_category = kind.category.to_owned();
        self.status_code = status as i16;
        self.success = is_success(status);
    }
}

/// The column names of `audit_actions`, in order.
pub const ACTION_COLUMNS: &[&str] = &[
    "id",
    "timestamp",
    "request_id",
    "session_id",
    "user_id",
    "endpoint",
    "route",
    "http_method",
    "action_type",
    "action_category",
    "client_ip",
    "user_agent",
    "request_size",
    "response_size",
    "status_code",
    "success",
    "response_time_ms",
    "cpu_time_ms",
    "memory_peak_mb",
    "file_path",
    "file_size_bytes",
    "files_affected",
    "command_type",
    "command_text",
    "exit_code",
    "stdout_size",
    "stderr_size",
    "quota_violation",
    "quota_consumed",
    "quota_remaining",
    "metadata",
    "error_details",
];

/// `2xx` and `3xx` count as success.
pub fn is_success(status: u16) -> bool {
    (200..400).contains(&status)
}

/// Milliseconds with microsecond precision, as stored.
pub fn millis_from_micros(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_is_2xx_and_3xx() {
        assert!(!is_success(199));
        assert!(is_success(200) && is_success(304) && is_success(399));
        assert!(!is_success(400) && !is_success(503));
    }

    #[test]
    fn microsecond_precision() {
        assert_eq!(millis_from_micros(1_234), 1.234);
        assert_eq!(millis_from_micros(0), 0.0);
    }
}
