//! The PostgreSQL side of the Nox audit trail.
//!
//! - [`pool`]: a deadpool-postgres pool with time-outs set (deadpool has none
//!   by default, so a `get()` could otherwise wait forever).
//! - [`migrate`]: an ordered, checksummed, lock-protected migration runner
//!   that takes migrations as data, so a service embedding the audit crates
//!   runs the same SQL Nox does.

pub mod migrate;
pub mod pool;

pub use migrate::{MigrateError, Migration, MigrationState, MigrationStatus, Migrator};
pub use pool::{PoolOptions, build_pool};
