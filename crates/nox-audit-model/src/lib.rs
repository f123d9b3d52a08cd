//! The audit trail's data model: records, the action taxonomy, admin
//! actions and the hash chains' encoding. Plain data and pure functions
//! only; this crate does no IO, so any service (and any verifier) can
//! depend on it cheaply.
//!
//! An [`ActionRecord`] is one row of `audit_actions`: the middleware starts
//! it when a request arrives ([`ActionRecord::arrived`]), sets its kind from
//! a [`Taxonomy`] of the service's own rules, and makes it storable
//! ([`ActionRecord::make_storable`]: NUL replaced, over-long values cut,
//! `metadata.sanitized` naming what was altered) before the writer queues
//! it. [`chain`] has the canonical encoding the hash chains link
//! (`SHA-256(prev ‖ encoding)`), for the writer and for any verifier.
//!
//! ```
//! use nox_audit_model::chain::GENESIS;
//! use nox_audit_model::taxonomy::{API_CALL, FILE_READ, RouteMatch, rule};
//! use nox_audit_model::{ActionRecord, GENERIC_TAXONOMY, Taxonomy};
//! use time::OffsetDateTime;
//! use uuid::Uuid;
//!
//! // A service's own rules: the first match decides, on route templates.
//! const FILES: Taxonomy = Taxonomy {
//!     rules: &[rule(Some("GET"), RouteMatch::Under("/files"), FILE_READ)],
//!     fallback: API_CALL,
//! };
//! let kind = FILES.classify("get", Some("/files/{name}"));
//! assert_eq!((kind.action_type, kind.category), ("file_read", "filesystem"));
//! assert_eq!(FILES.classify("GET", Some("/filesystem")), API_CALL); // whole segments
//! assert_eq!(FILES.classify("DELETE", Some("/files/{name}")), API_CALL);
//! // With no rules of its own, a service's requests are all `api_call`.
//! assert_eq!(GENERIC_TAXONOMY.classify("GET", Some("/files/{name}")), API_CALL);
//!
//! let mut record = ActionRecord::arrived(
//!     Uuid::now_v7(),
//!     OffsetDateTime::UNIX_EPOCH,
//!     "GET",
//!     "/files/a%00b",
//! );
//! assert_eq!(record.route, "unmatched");
//! record.set_outcome(kind, 200);
//! assert!(record.success);
//!
//! // A NUL would make PostgreSQL refuse the row (and its whole batch).
//! record.file_path = Some("a\0b".to_owned());
//! record.make_storable();
//! assert_eq!(record.file_path.as_deref(), Some("a\u{FFFD}b"));
//! let metadata = record.metadata.as_ref().unwrap();
//! assert_eq!(metadata["sanitized"], serde_json::json!(["file_path"]));
//!
//! // The row's link in the actions chain, after the chain's start.
//! let link = record.canonical(1).link(&GENESIS);
//! assert_eq!(link, record.canonical(1).link(&GENESIS));
//! assert_ne!(link, record.canonical(2).link(&GENESIS), "the position is hashed");
//! record.status_code = 500;
//! assert_ne!(link, record.canonical(1).link(&GENESIS), "so is every column");
//! ```

mod admin_action;
pub mod chain;
pub mod clock;
pub mod record;
pub mod row;
pub mod storable;
pub mod taxonomy;

pub use admin_action::{AdminAction, AdminActionType};
pub use clock::{Clock, ManualClock, SystemClock};
pub use record::{ACTION_COLUMN_DEFS, ACTION_COLUMNS, ActionRecord};
pub use row::{Column, ColumnValue};
pub use taxonomy::{ActionKind, GENERIC_TAXONOMY, Taxonomy};
