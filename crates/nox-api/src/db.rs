//! Reaching PostgreSQL: the `DATABASE_URL` server, or the embedded cluster
//! started from the system binaries when no URL is given.

use std::str::FromStr;

use anyhow::Context;
use deadpool_postgres::Pool;
use nox_audit_store::{MigrationState, Migrator, PoolOptions, build_pool};
use nox_pg_embed::Cluster;

use crate::config::StorageConfig;
use crate::migrations;

/// The database name Nox uses inside its embedded cluster.
const EMBEDDED_DATABASE: &str = "nox";

/// A connection target, plus the embedded cluster when Nox runs its own.
/// Dropping it stops a cluster this process started.
#[derive(Debug)]
pub struct Database {
    pub pg_config: tokio_postgres::Config,
    cluster: Option<Cluster>,
}

impl Database {
    /// Resolves the target; starts the embedded cluster if needed. Blocking:
    /// call it before serving, or from `spawn_blocking`.
    pub fn open_blocking(storage: &StorageConfig) -> anyhow::Result<Database> {
        if let Some(url) = &storage.database_url {
            // The parse error never echoes the URL, which may hold a password.
            let pg_config = tokio_postgres::Config::from_str(url.expose())
                .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL URL"))?;
            return Ok(Database {
                pg_config,
                cluster: None,
            });
        }
        let cluster = Cluster::start(&storage.data_dir.join("pg"), storage.pg_bin_dir.as_deref())?;
        let mut pg_config = tokio_postgres::Config::new();
        pg_config
            .host_path(cluster.socket_dir())
            .port(nox_pg_embed::SOCKET_PORT)
            .user(nox_pg_embed::SUPERUSER)
            .password(cluster.password())
            .dbname(EMBEDDED_DATABASE);
        Ok(Database {
            pg_config,
            cluster: Some(cluster),
        })
    }

    /// Async wrapper around [`Database::open_blocking`] that also creates the
    /// embedded cluster's database on first use.
    pub async fn open(storage: &StorageConfig) -> anyhow::Result<Database> {
        let storage = storage.clone();
        let database = tokio::task::spawn_blocking(move || Database::open_blocking(&storage))
            .await
            .context("the database start-up task failed")??;
        if database.cluster.is_some() {
            database.create_embedded_database().await?;
        }
        Ok(database)
    }

    pub fn is_embedded(&self) -> bool {
        self.cluster.is_some()
    }

    async fn create_embedded_database(&self) -> anyhow::Result<()> {
        let mut maintenance = self.pg_config.clone();
        maintenance.dbname("postgres");
        let client = connect(&maintenance).await?;
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&EMBEDDED_DATABASE],
            )
            .await?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {EMBEDDED_DATABASE}"))
                .await?;
        }
        Ok(())
    }

    pub fn pool(&self, size: usize) -> anyhow::Result<Pool> {
        let options = PoolOptions {
            max_size: size,
            ..PoolOptions::default()
        };
        build_pool(self.pg_config.clone(), &options).context("building the connection pool")
    }

    /// Applies every pending migration; returns the versions applied.
    pub async fn migrate(&self) -> anyhow::Result<Vec<i64>> {
        let mut client = connect(&self.pg_config).await?;
        Ok(Migrator::new(migrations::MIGRATIONS)
            .up(&mut client)
            .await?)
    }

    /// How many migrations are not applied as this binary knows them.
    pub async fn pending_migrations(&self) -> anyhow::Result<usize> {
        let client = connect(&self.pg_config).await?;
        let statuses = Migrator::new(migrations::MIGRATIONS)
            .status(&client)
            .await?;
        Ok(statuses
            .iter()
            .filter(|s| s.state != MigrationState::Applied && s.state != MigrationState::Unknown)
            .count())
    }

    /// Stops the embedded cluster if this process started it.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(mut cluster) = self.cluster.take() {
            cluster.stop()?;
        }
        Ok(())
    }
}

/// The read replica's pool (`NOX_DATABASE_READ_URL`), when one is set.
/// Its connections open lazily and are named `nox-read` in
/// `pg_stat_activity`; its short timeouts keep a dead or saturated replica
/// cheap, since reads then go to the primary.
pub fn read_replica_pool(storage: &StorageConfig) -> anyhow::Result<Option<Pool>> {
    let Some(url) = &storage.database_read_url else {
        return Ok(None);
    };
    // The parse error never echoes the URL, which may hold a password.
    let mut pg_config = tokio_postgres::Config::from_str(url.expose())
        .map_err(|_| anyhow::anyhow!("NOX_DATABASE_READ_URL is not a valid PostgreSQL URL"))?;
    if pg_config.get_application_name().is_none() {
        pg_config.application_name(READ_APPLICATION_NAME);
    }
    let options = PoolOptions {
        max_size: storage.db_pool_size,
        wait_timeout: std::time::Duration::from_secs(1),
        connect_timeout: std::time::Duration::from_secs(1),
    };
    let pool = build_pool(pg_config, &options).context("building the read replica's pool")?;
    Ok(Some(pool))
}

/// The read replica pool's `application_name`, unless its URL sets one.
pub const READ_APPLICATION_NAME: &str = "nox-read";

/// One dedicated connection (not pooled), for migrations and maintenance.
pub async fn connect(pg_config: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = pg_config
        .connect(tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "database connection closed with an error");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(read_url: Option<&str>) -> StorageConfig {
        let mut config = crate::Config::for_database("host=/nowhere", "/nonexistent".into());
        config.storage.database_read_url = read_url.map(nox_auth::Secret::new);
        config.storage
    }

    #[test]
    fn a_bad_read_url_is_refused_without_echoing_it() {
        let error = read_replica_pool(&storage(Some("postgres://nox:s3cret@db:port/nox")))
            .expect_err("not a URL");
        let shown = format!("{error:#}");
        assert!(shown.contains("NOX_DATABASE_READ_URL"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn no_read_url_means_no_replica_pool() {
        assert!(read_replica_pool(&storage(None)).expect("fine").is_none());
    }
}
