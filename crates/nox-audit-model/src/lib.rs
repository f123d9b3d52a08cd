//! The audit trail's data model: records, the action taxonomy, filters and
//! cursors. Plain data and pure functions only; this crate does no IO, so any
//! service (and any verifier) can depend on it cheaply.

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
