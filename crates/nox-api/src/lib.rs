//! The Nox HTTP API as a library: the server binary is a thin wrapper around
//! [`run_server`], and the integration tests build the same app through
//! [`AppState`] and [`serve`].
//!
//! Map: [`state`] (the shared state, built once), [`server`] (serving,
//! shutdown, background tasks), [`routes`] (the handlers, by endpoint
//! group; the audit read endpoints are `nox-audit-web`'s, given Nox's
//! access rules and state by [`admin_audit`]), [`admission`] (shedding, rate limits, request quotas),
//! [`auth`] (identity), [`cluster`] (the servers sharing the database), [`metrics`] (Nox's metric families), [`taxonomy`]
//! (Nox's audit taxonomy), [`migrations`] (the ordered schema).

pub mod admin_audit;
pub mod admin_changes;
pub mod admission;
pub mod auth;
mod blocking;
pub mod cluster;
pub mod config;
mod connection;
pub mod db;
pub mod error;
pub mod free_space;
pub mod metrics;
pub mod migrations;
pub mod openapi;
pub mod routes;
pub mod run_service;
pub mod server;
pub mod state;
pub mod storage_quota;
pub mod taxonomy;
pub mod telemetry;

pub use config::Config;
pub use error::ApiError;
pub use server::{run_server, serve};
pub use state::AppState;

/// The version reported by `/health` and the OpenAPI document.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
