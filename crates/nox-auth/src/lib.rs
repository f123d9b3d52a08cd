//! Identity for Nox: users with roles and tiers, API tokens (only their
//! SHA-256 is stored), and resolving a bearer token to a caller without a
//! database round trip per request.
//!
//! Every mutation here writes its `audit_admin_actions` row in the same
//! transaction as the change.

pub mod cache;
pub mod model;
pub mod run_uid;
pub mod secret;
pub mod store;
pub mod token;

pub use cache::{AuthFailure, Authenticator, Check, Lookup};
pub use model::{Caller, Role, Tier, TokenInfo, User};
pub use secret::Secret;
pub use store::StoreError;
