//! Ordered SQL migrations, applied once each and guarded by checksums.
//!
//! Each migration runs in its own transaction together with the row that
//! records it, so a failing migration leaves nothing behind. The whole run
//! holds a PostgreSQL advisory lock: two processes starting at once apply
//! each migration exactly once. A migration already applied whose SQL has
//! since changed is a hard error, never silently skipped.

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_postgres::Client;

/// One migration: its SQL is embedded in the binary (`include_str!`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 of the SQL text, hex encoded.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    Applied,
    Pending,
    /// Applied, but the SQL in this binary differs from what was applied.
    ChecksumMismatch,
    /// Recorded in the database, but unknown to this binary (a newer one
    /// applied it).
    Unknown,
}

#[derive(Debug, Clone)]
pub struct MigrationStatus {
    pub version: i64,
    pub name: String,
    pub state: MigrationState,
    pub applied_at: Option<OffsetDateTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "migration {version} ({name}) was applied with checksum {applied} but this binary has {expected}: applied migrations must never change; add a new migration instead"
    )]
    ChecksumMismatch {
        version: i64,
        name: String,
        applied: String,
        expected: String,
    },
    #[error("the migration list is not strictly ordered by version at version {0}")]
    Unordered(i64),
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i64,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database error while migrating: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// Applies a set of migrations, recording them in `table`.
#[derive(Debug, Clone, Copy)]
pub struct Migrator<'a> {
    migrations: &'a [Migration],
    table: &'static str,
}

impl<'a> Migrator<'a> {
    /// A migrator recording into `schema_migrations`.
    pub fn new(migrations: &'a [Migration]) -> Self {
        Migrator {
            migrations,
            table: "schema_migrations",
        }
    }

    /// Records into another table, for a host service that keeps its own
    /// `schema_migrations` for its own SQL.
    pub fn with_table(self, table: &'static str) -> Self {
        Migrator { table, ..self }
    }

    pub fn migrations(&self) -> &'a [Migration] {
        self.migrations
    }

    /// Applies every pending migration in version order; returns the
    /// versions applied (empty when the schema was already current).
    pub async fn up(&self, client: &mut Client) -> Result<Vec<i64>, MigrateError> {
        self.check_order()?;
        let lock_key = self.lock_key();
        client
            .execute("SELECT pg_advisory_lock($1)", &[&lock_key])
            .await?;
        let result = self.up_locked(client).await;
        // Unlock even after a failure; closing the connection would as well.
        let unlock = client
            .execute("SELECT pg_advisory_unlock($1)", &[&lock_key])
            .await;
        let applied = result?;
        unlock?;
        Ok(applied)
    }

    async fn up_locked(&self, client: &mut Client) -> Result<Vec<i64>, MigrateError> {
        // Checked first: `IF NOT EXISTS` alone would log a notice on every run.
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table])
            .await?
            .get(0);
        if !exists {
            client
                .batch_execute(&format!(
                    "CREATE TABLE {} (
                    version bigint PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
                    self.table
                ))
                .await?;
        }
        let recorded = self.recorded(client).await?;
        let mut applied = Vec::new();
        for migration in self.migrations {
            if let Some((_, checksum, _)) = recorded.iter().find(|r| r.0 == migration.version) {
                self.verify(migration, checksum)?;
                continue;
            }
            let tx = client.transaction().await?;
            tx.batch_execute(migration.sql)
                .await
                .map_err(|source| MigrateError::Failed {
                    version: migration.version,
                    name: migration.name,
                    source,
                })?;
            tx.execute(
                &format!(
                    "INSERT INTO {} (version, name, checksum) VALUES ($1, $2, $3)",
                    self.table
                ),
                &[&migration.version, &migration.name, &migration.checksum()],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(
                version = migration.version,
                name = migration.name,
                "migration applied"
            );
            applied.push(migration.version);
        }
        Ok(applied)
    }

    /// Every known and recorded migration with its state, by version.
    pub async fn status(&self, client: &Client) -> Result<Vec<MigrationStatus>, MigrateError> {
        self.check_order()?;
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table])
            .await?
            .get(0);
        let recorded = if exists {
            self.recorded(client).await?
        } else {
            Vec::new()
        };
        let mut statuses: Vec<MigrationStatus> = self
            .migrations
            .iter()
            .map(|migration| {
                let found = recorded.iter().find(|r| r.0 == migration.version);
                let state = match found {
                    None => MigrationState::Pending,
                    Some((_, checksum, _)) if *checksum == migration.checksum() => {
                        MigrationState::Applied
                    }
                    Some(_) => MigrationState::ChecksumMismatch,
                };
                MigrationStatus {
                    version: migration.version,
                    name: migration.name.to_owned(),
                    state,
                    applied_at: found.map(|r| r.2),
                }
            })
            .collect();
        for (version, _, applied_at) in &recorded {
            if !self.migrations.iter().any(|m| m.version == *version) {
                let name: String = client
                    .query_one(
                        &format!("SELECT name FROM {} WHERE version = $1", self.table),
                        &[version],
                    )
                    .await?
                    .get(0);
                statuses.push(MigrationStatus {
                    version: *version,
                    name,
                    state: MigrationState::Unknown,
                    applied_at: Some(*applied_at),
                });
            }
        }
        statuses.sort_by_key(|s| s.version);
        Ok(statuses)
    }

    async fn recorded(
        &self,
        client: &Client,
    ) -> Result<Vec<(i64, String, OffsetDateTime)>, MigrateError> {
        Ok(client
            .query(
                &format!(
                    "SELECT version, checksum, applied_at FROM {} ORDER BY version",
                    self.table
                ),
                &[],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect())
    }

    fn verify(&self, migration: &Migration, applied: &str) -> Result<(), MigrateError> {
        let expected = migration.checksum();
        if applied == expected {
            Ok(())
        } else {
            Err(MigrateError::ChecksumMismatch {
                version: migration.version,
                name: migration.name.to_owned(),
                applied: applied.to_owned(),
                expected,
            })
        }
    }

    fn check_order(&self) -> Result<(), MigrateError> {
        match self
            .migrations
            .windows(2)
            .find(|pair| pair[0].version >= pair[1].version)
        {
            Some(pair) => Err(MigrateError::Unordered(pair[1].version)),
            None => Ok(()),
        }
    }

    /// One advisory lock per migrations table, so independent sets do not
    /// wait for each other.
    fn lock_key(&self) -> i64 {
        let digest = Sha256::digest(format!("nox-migrations:{}", self.table).as_bytes());
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Migration = Migration {
        version: 1,
        name: "a",
        sql: "SELECT 1",
    };
    const B: Migration = Migration {
        version: 2,
        name: "b",
        sql: "SELECT 2",
    };

    #[test]
    fn checksum_is_sha256_of_the_sql() {
        assert_eq!(
            A.checksum(),
            "e004ebd5b5532a4b85984a62f8ad48a81aa3460c1ca07701f386135d72cdecf5"
        );
    }

    #[test]
    fn unordered_lists_are_refused() {
        assert!(Migrator::new(&[A, B]).check_order().is_ok());
        assert!(matches!(
            Migrator::new(&[B, A]).check_order(),
            Err(MigrateError::Unordered(1))
        ));
        assert!(matches!(
            Migrator::new(&[A, A]).check_order(),
            Err(MigrateError::Unordered(1))
        ));
    }

    #[test]
    fn lock_keys_differ_per_table() {
        let m = Migrator::new(&[A]);
        assert_ne!(m.lock_key(), m.with_table("other_migrations").lock_key());
    }
}
