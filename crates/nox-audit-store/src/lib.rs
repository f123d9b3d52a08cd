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
//!   [`verify`] recomputes the chains, whole or continuously
//!   ([`verify::Verifier`]: one server at a time, from the last verified
//!   checkpoint, results in `audit_verifications`).
//! - [`writer`]: the batched, never-dropping writer of `audit_actions`, with
//!   its [`spool`] and [`sessions`] tracking.
//! - [`rollup`]: keeping the daily rollups current after commit (the
//!   writer runs it); [`summaries`]: rebuilding and checking them.
//! - [`seed`]: synthetic rows for benchmarks.
//!
//! A service runs the audit migrations (on a migrations table of its own,
//! if it keeps one for its own SQL), then starts one [`AuditWriter`] and
//! hands its [`AuditSink`] to whatever records requests (the
//! `nox-audit-actix` middleware does):
//!
//! ```no_run
//! use std::sync::Arc;
//! use nox_audit_model::{ActionRecord, GENERIC_TAXONOMY, SystemClock};
//! use nox_audit_store::{AuditWriter, Migrator, PoolOptions, Spool, WriterConfig, build_pool, schema};
//!
//! # async fn example(pg_config: tokio_postgres::Config) -> Result<(), Box<dyn std::error::Error>> {
//! let (mut client, connection) = pg_config.connect(tokio_postgres::NoTls).await?;
//! tokio::spawn(connection);
//! let applied = Migrator::new(schema::MIGRATIONS)
//!     .with_table("my_service_audit_migrations")
//!     .up(&mut client)
//!     .await?;
//! println!("applied {applied:?}");
//!
//! // At least 2 connections: the writer's batches, and the rollup steps
//! // it runs beside them (Nox gives it 3).
//! let pool = build_pool(pg_config, &PoolOptions::default())?;
//! let spool = Spool::open("/var/lib/my-service/audit-spool")?;
//! let writer = AuditWriter::start(pool, spool, Arc::new(SystemClock), WriterConfig::default());
//! let sink = writer.sink();
//!
//! let mut record = ActionRecord::arrived(uuid::Uuid::now_v7(), time::OffsetDateTime::now_utc(), "POST", "/orders");
//! record.set_outcome(GENERIC_TAXONOMY.classify("POST", Some("/orders")), 201);
//! sink.submit(record, true).await?; // committed (or spooled) when this returns
//!
//! writer.shutdown().await; // writes what is queued, then stops
//! # Ok(())
//! # }
//! ```
//!
//! Without PostgreSQL the writer spools, and nothing is lost; settings and
//! modes need no database at all:
//!
//! ```
//! use std::sync::Arc;
//! use nox_audit_model::{ActionRecord, SystemClock};
//! use nox_audit_store::{AuditMode, AuditWriter, PoolOptions, Spool, WriterConfig, build_pool};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! assert_eq!("buffered".parse::<AuditMode>(), Ok(AuditMode::Buffered));
//! assert!("sometimes".parse::<AuditMode>().is_err());
//! let config = WriterConfig::default();
//! assert!(config.chained && config.queue_capacity >= config.max_batch);
//!
//! let dir = tempfile::tempdir()?;
//! // Connections open lazily: a pool on a socket that does not exist.
//! let mut pg_config = tokio_postgres::Config::new();
//! pg_config.host_path(dir.path().join("no-such-socket")).user("nobody").dbname("nothing");
//! let pool = build_pool(pg_config, &PoolOptions::default())?;
//! let spool = Spool::open(dir.path().join("spool"))?;
//! let writer = AuditWriter::start(pool, spool.clone(), Arc::new(SystemClock), config);
//! let sink = writer.sink();
//!
//! let record = ActionRecord::arrived(uuid::Uuid::now_v7(), time::OffsetDateTime::now_utc(), "GET", "/");
//! sink.submit(record, true).await?; // the database failed, so: spooled
//! assert!(!sink.status().database_up());
//! assert_eq!(sink.status().spool_rows(), 1);
//! assert_eq!(spool.count_actions()?, 1); // replayed once PostgreSQL is back
//! writer.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod admin_actions;
pub mod checkpoints;
pub mod commit_feed;
pub mod listen;
pub mod migrate;
pub mod pool;
pub mod retention;
pub mod rollup;
mod row;
pub mod schema;
pub mod seed;
pub mod sessions;
pub mod spool;
pub mod summaries;
pub mod verify;
pub mod writer;

pub use migrate::{MigrateError, Migration, MigrationState, MigrationStatus, Migrator};
pub use pool::{PoolOptions, build_pool};
pub use spool::Spool;
pub use writer::{AuditMode, AuditSink, AuditWriter, SinkError, WriterConfig};
