//! The PostgreSQL side of the Nox audit trail.
//!
//! - [`pool`]: a deadpool-postgres pool with time-outs set (deadpool has none
//!   by default, so a `get()` could otherwise wait forever).
//! - [`migrate`]: an ordered, checksummed, lock-protected migration runner
//!   that takes migrations as data, so a service embedding the audit crates
//!   runs the same SQL Nox does.
//! - [`schema`]: the audit tables' migrations, as data.
//! - [`admin_actions`]: recording admin mutations inside the caller's
//!   transaction.
//! - [`checkpoints`]: the hash chains' heads and signed checkpoints;
//!   [`verify`] recomputes the chains.
//! - [`writer`]: the batched, never-dropping writer of `audit_actions`, with
//!   its [`spool`] and [`sessions`] tracking.
//! - [`summaries`]: rebuilding and checking the daily rollups.
//! - [`seed`]: synthetic rows for benchmarks.

pub mod admin_actions;
pub mod checkpoints;
pub mod migrate;
pub mod pool;
pub mod retention;
mod row;
pub mod schema;
pub mod seed;
pub mod sessions;
pub mod spool;
pub mod summaries;
pub mod verify;
pub mod writer;

/// The former name of [`checkpoints`], still used by `nox-api`; to go once
/// its users say `checkpoints`.
pub use checkpoints as chain;

pub use migrate::{MigrateError, Migration, MigrationState, MigrationStatus, Migrator};
pub use pool::{PoolOptions, build_pool};
pub use spool::Spool;
pub use writer::{AuditMode, AuditSink, AuditWriter, SinkError, WriterConfig};
