//! The database schema: every migration Nox applies, in order.
//!
//! Nox's own SQL lives in the workspace's `migrations/` directory, the audit
//! tables' in `crates/nox-audit-store/migrations/`; both are embedded at
//! compile time, and `nox-migrate` and `nox-server` apply the same list.

use nox_audit_store::Migration;

const IDENTITY: Migration = Migration {
    version: 1,
    name: "identity",
    sql: include_str!("../../../migrations/0001_identity.sql"),
};

const QUOTAS: Migration = Migration {
    version: 4,
    name: "quotas",
    sql: include_str!("../../../migrations/0004_quotas.sql"),
};

const RUN_UIDS: Migration = Migration {
    version: 9,
    name: "run_uids",
    sql: include_str!("../../../migrations/0009_run_uids.sql"),
};

const QUOTA_LEASES: Migration = Migration {
    version: 12,
    name: "quota_leases",
    sql: include_str!("../../../migrations/0012_quota_leases.sql"),
};

const ADMIN_CHANGE_NOTIFY: Migration = Migration {
    version: 14,
    name: "admin_change_notify",
    sql: include_str!("../../../migrations/0014_admin_change_notify.sql"),
};

const SERVERS: Migration = Migration {
    version: 15,
    name: "servers",
    sql: include_str!("../../../migrations/0015_servers.sql"),
};

/// Nox's own migrations and the audit crates', in version order. The test
/// below checks this list against the files.
pub const MIGRATIONS: &[Migration] = &[
    IDENTITY,
    nox_audit_store::schema::ADMIN_ACTIONS,
    nox_audit_store::schema::AUDIT_TRAIL,
    QUOTAS,
    nox_audit_store::schema::AUDIT_CHAIN,
    nox_audit_store::schema::AUDIT_SESSION_INDEX,
    nox_audit_store::schema::AUDIT_CHAIN_ADVANCE,
    nox_audit_store::schema::AUDIT_COMMAND_TEXT,
    RUN_UIDS,
    nox_audit_store::schema::AUDIT_COMMIT_NOTIFY,
    nox_audit_store::schema::AUDIT_VERIFICATIONS,
    QUOTA_LEASES,
    nox_audit_store::schema::AUDIT_SESSIONS_SHARED,
    ADMIN_CHANGE_NOTIFY,
    SERVERS,
    nox_audit_store::schema::AUDIT_ROLLUP_AFTER_COMMIT,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.sql` files in `dir` (relative to this crate).
    fn sql_files(dir: &str) -> Vec<String> {
        let dir = format!("{}/{dir}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("{dir}: {error}"))
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .into_string()
                    .expect("utf-8")
            })
            .filter(|name| name.ends_with(".sql"))
            .collect()
    }

    /// Every file in migrations/ (Nox's) and in nox-audit-store's
    /// migrations/ (the audit tables') is listed, under its own number and
    /// name, and each directory holds only its own crate's migrations.
    #[test]
    fn every_migration_file_is_listed() {
        let own = sql_files("../../migrations");
        let audit = sql_files("../nox-audit-store/migrations");
        let mut files: Vec<String> = own.iter().chain(&audit).cloned().collect();
        files.sort();
        let name = |m: &Migration| format!("{:04}_{}.sql", m.version, m.name);
        let listed: Vec<String> = MIGRATIONS.iter().map(name).collect();
        assert_eq!(files, listed);
        let mut audit = audit;
        audit.sort();
        let store: Vec<String> = nox_audit_store::schema::MIGRATIONS
            .iter()
            .map(name)
            .collect();
        assert_eq!(
            audit, store,
            "nox-audit-store/migrations/ holds the audit migrations"
        );
    }
}
