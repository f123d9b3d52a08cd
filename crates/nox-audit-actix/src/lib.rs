//! actix-web middleware for the Nox audit trail: one `audit_actions` row per
//! request, written through [`nox_audit_store::AuditWriter`].
//!
//! Mount [`Audit`] as the outermost layer (`wrap` it last) so requests that
//! inner layers refuse are recorded too. Handlers add what only they know
//! (a file path, a command's exit code) with [`record`]; the middleware
//! fills in the rest: request id (`X-Request-ID`, kept when the client sends
//! a valid UUID, echoed always), timing, the CPU the worker spent on the
//! request (plus what handlers [`charge_cpu`] for work on other threads), sizes, status, matched route and its classification by a
//! [`nox_audit_model::Taxonomy`].
//!
//! `nox-audit-web`'s `examples/shop.rs` is a whole service built on it.

mod client_ip;
mod cpu;
mod middleware;
mod request_record;

pub use client_ip::client_ip;
pub use cpu::{charge_cpu, is_metered, thread_cpu_time};
pub use middleware::{Audit, AuditConfig, CLIENT_CLOSED_REQUEST, REQUEST_ID_HEADER};
pub use request_record::{RequestId, record, request_id};
