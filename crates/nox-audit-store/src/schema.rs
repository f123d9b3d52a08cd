//! The audit tables' migrations (the SQL is in this crate's `migrations/`,
//! embedded at compile time). A host service runs these with
//! [`crate::Migrator`]; Nox includes them in its own ordered list.

use crate::Migration;

pub const ADMIN_ACTIONS: Migration = Migration {
    version: 2,
    name: "audit_admin_actions",
    sql: include_str!("../migrations/0002_audit_admin_actions.sql"),
};

pub const AUDIT_TRAIL: Migration = Migration {
    version: 3,
    name: "audit_trail",
    sql: include_str!("../migrations/0003_audit_trail.sql"),
};

pub const AUDIT_CHAIN: Migration = Migration {
    version: 5,
    name: "audit_chain",
    sql: include_str!("../migrations/0005_audit_chain.sql"),
};

pub const AUDIT_SESSION_INDEX: Migration = Migration {
    version: 6,
    name: "audit_session_index",
    sql: include_str!("../migrations/0006_audit_session_index.sql"),
};

pub const AUDIT_CHAIN_ADVANCE: Migration = Migration {
    version: 7,
    name: "audit_chain_advance",
    sql: include_str!("../migrations/0007_audit_chain_advance.sql"),
};

pub const AUDIT_COMMAND_TEXT: Migration = Migration {
    version: 8,
    name: "audit_command_text",
    sql: include_str!("../migrations/0008_audit_command_text.sql"),
};

pub const AUDIT_COMMIT_NOTIFY: Migration = Migration {
    version: 10,
    name: "audit_commit_notify",
    sql: include_str!("../migrations/0010_audit_commit_notify.sql"),
};

pub const AUDIT_VERIFICATIONS: Migration = Migration {
    version: 11,
    name: "audit_verifications",
    sql: include_str!("../migrations/0011_audit_verifications.sql"),
};

pub const AUDIT_SESSIONS_SHARED: Migration = Migration {
    version: 13,
    name: "audit_sessions_shared",
    sql: include_str!("../migrations/0013_audit_sessions_shared.sql"),
};

pub const AUDIT_ROLLUP_AFTER_COMMIT: Migration = Migration {
    version: 16,
    name: "audit_rollup_after_commit",
    sql: include_str!("../migrations/0016_audit_rollup_after_commit.sql"),
};

/// Every audit migration, in version order.
pub const MIGRATIONS: &[Migration] = &[
    ADMIN_ACTIONS,
    AUDIT_TRAIL,
    AUDIT_CHAIN,
    AUDIT_SESSION_INDEX,
    AUDIT_CHAIN_ADVANCE,
    AUDIT_COMMAND_TEXT,
    AUDIT_COMMIT_NOTIFY,
    AUDIT_VERIFICATIONS,
    AUDIT_SESSIONS_SHARED,
    AUDIT_ROLLUP_AFTER_COMMIT,
];
