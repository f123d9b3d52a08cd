//! The audit writer: a bounded queue in front of one task that writes records
//! to PostgreSQL in batches (one transaction per batch: binary `COPY`, or for
//! a small batch an `INSERT` that lets the transaction go in one round trip).
//!
//! Nothing is ever dropped. A full queue makes senders wait. When PostgreSQL
//! cannot take a batch, the batch goes to the fsynced [`Spool`](crate::Spool)
//! and is replayed, idempotently by id, once PostgreSQL is back. Only when
//! neither can take a batch do its senders get an error (and the sink reports
//! itself down, so callers can refuse mutations up front).
//!
//! Each batch's rows join the actions hash chain inside the batch's
//! transaction, under the chain head's lock (see [`crate::checkpoints`]).
//!
//! - `sink`: what callers hold ([`AuditSink`]), its status and settings;
//! - `task`: the writer task ([`AuditWriter`]): batching, spooling, replay,
//!   refused rows;
//! - `insert`: the two ways a batch goes in (`COPY`, or one round trip);
//! - `sessions`: finding or opening sessions in the database, and writing
//!   their changes in a batch's transaction.

mod insert;
mod sessions;
mod sink;
mod task;

pub use insert::{InsertError, InsertTarget, insert};
pub use sink::{AuditMode, AuditSink, SinkError, SinkStatus, WriterConfig};
pub use task::AuditWriter;
