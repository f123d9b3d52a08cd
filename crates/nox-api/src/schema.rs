//! The database schema: every migration Nox applies, in order.
//!
//! The SQL lives in the workspace's `migrations/` directory and is embedded
//! at compile time; `nox-migrate` and `nox-server` apply the same list.

use nox_audit_store::Migration;

macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!(
                "../../../migrations/",
                stringify!($version),
                "_",
                $name,
                ".sql"
            )),
        }
    };
}

pub const MIGRATIONS: &[Migration] = &[migration!(0001, "identity")];

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
