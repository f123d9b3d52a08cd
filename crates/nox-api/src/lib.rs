//! The Nox HTTP API as a library: the server binary is a thin wrapper around
//! [`run`], and the integration tests build the same app through [`app`].

pub mod admin_audit;
pub mod app;
pub mod auth;
mod blocking;
pub mod config;
mod connection;
pub mod db;
pub mod error;
pub mod files;
pub mod free_space;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod quotas;
pub mod run;
pub mod run_service;
pub mod schema;
pub mod storage_quota;
pub mod telemetry;
pub mod users;

pub use app::{AppState, run, serve};
pub use config::Config;
pub use error::ApiError;

/// The version reported by `/health` and the OpenAPI document.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A timestamp as the API writes it: RFC 3339 (null when absent).
pub(crate) fn timestamp_json(at: impl Into<Option<time::OffsetDateTime>>) -> serde_json::Value {
    at.into().map_or(serde_json::Value::Null, |t| {
        serde_json::Value::String(nox_audit_export::rfc3339(t))
    })
}
