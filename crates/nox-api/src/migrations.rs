//! The database schema: every migration Nox applies, in order.
//!
//! The SQL lives in the workspace's `migrations/` directory and is embedded
//! at compile time; `nox-migrate` and `nox-server` apply the same list.

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
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in migrations/ is listed, under its own number and name.
    #[test]
    fn every_migration_file_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("migrations directory")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .into_string()
                    .expect("utf-8")
            })
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(files, listed);
    }
}
