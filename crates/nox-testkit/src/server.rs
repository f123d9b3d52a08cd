//! Choosing the PostgreSQL server and handing out per-test databases.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use nox_api::migrations::MIGRATIONS;
use nox_audit_store::{AuditWriter, Migrator, PoolOptions, Spool, WriterConfig, build_pool};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio_postgres::{Client, Config, NoTls};

/// Serialises template creation across concurrent test processes.
const TEMPLATE_LOCK_KEY: i64 = 0x6e6f_785f_7470_6c00; // "nox_tpl\0"

#[derive(Debug)]
struct Harness {
    /// Connects to the server's `postgres` database.
    admin: Config,
    template: String,
}

static HARNESS: OnceCell<Harness> = OnceCell::const_new();

async fn harness() -> anyhow::Result<&'static Harness> {
    HARNESS
        .get_or_try_init(|| async {
            let admin = choose_server().await?;
            let template = ensure_template(&admin).await?;
            Ok(Harness { admin, template })
        })
        .await
}

async fn choose_server() -> anyhow::Result<Config> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let mut config = Config::from_str(&url)
            .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL URL"))?;
        config.dbname("postgres");
        return Ok(config);
    }
    let mut local = Config::new();
    local
        .host("127.0.0.1")
        .port(5432)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    if local.connect(NoTls).await.is_ok() {
        return Ok(local);
    }
    eprintln!(
        "nox-testkit: no DATABASE_URL and no PostgreSQL on 127.0.0.1:5432; starting a throwaway cluster"
    );
    let (socket_dir, password) =
        tokio::task::spawn_blocking(|| start_throwaway_cluster("")).await??;
    Ok(cluster_config(&socket_dir, &password))
}

/// How to reach a cluster started here, as its superuser.
pub(crate) fn cluster_config(socket_dir: &Path, password: &str) -> Config {
    let mut config = Config::new();
    config
        .host_path(socket_dir)
        .port(nox_pg_embed::SOCKET_PORT)
        .user(nox_pg_embed::SUPERUSER)
        .password(password)
        .dbname("postgres");
    config
}

/// `/tmp/nox-testpg-<pid><suffix>`: removed by a later test process once
/// this one is gone.
pub(crate) fn cluster_dir(suffix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("nox-testpg-{}{suffix}", std::process::id()))
}

/// Starts a cluster in [`cluster_dir`]`(suffix)` on a thread that lives as
/// long as the process, so the cluster gets its shutdown signal exactly when
/// the test process exits (see `Cluster::start_ephemeral`). Returns its
/// socket directory and password.
pub(crate) fn start_throwaway_cluster(suffix: &str) -> anyhow::Result<(PathBuf, String)> {
    remove_stale_clusters();
    let dir = cluster_dir(suffix);
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nox-test-postgres".into())
        .spawn(move || {
            match nox_pg_embed::Cluster::start_ephemeral(&dir) {
                Ok(cluster) => {
                    let _ = sender.send(Ok((
                        cluster.socket_dir().to_path_buf(),
                        cluster.password().to_owned(),
                    )));
                    // Keep the cluster (and this thread) alive until exit.
                    loop {
                        std::thread::park();
                    }
                }
                Err(error) => {
                    let _ = sender.send(Err(error));
                }
            }
        })?;
    receiver
        .recv()
        .context("the cluster thread died")?
        .context("starting a throwaway PostgreSQL cluster")
}

/// Removes clusters left by test processes that no longer exist.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("nox-testpg-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The template's name changes whenever the migrations do.
fn template_name() -> String {
    let mut hasher = Sha256::new();
    for migration in MIGRATIONS {
        hasher.update(migration.version.to_be_bytes());
        hasher.update(migration.checksum().as_bytes());
    }
    format!("nox_tpl_{}", &hex::encode(hasher.finalize())[..16])
}

async fn ensure_template(admin: &Config) -> anyhow::Result<String> {
    let name = template_name();
    let client = connect(admin).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK_KEY])
        .await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // Build under a temporary name and rename when complete, so a crash
        // midway never leaves a half-migrated template behind.
        let building = format!("{name}_building");
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .await?;
        client
            .batch_execute(&format!("CREATE DATABASE {building}"))
            .await?;
        {
            let mut config = admin.clone();
            config.dbname(&building);
            let mut template = connect(&config).await?;
            Migrator::new(MIGRATIONS)
                .up(&mut template)
                .await
                .context("migrating the template database")?;
        }
        // Renaming waits for our just-closed connection to go away.
        client
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {name}"))
            .await?;
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK_KEY])
        .await?;
    Ok(name)
}

async fn connect(config: &Config) -> anyhow::Result<Client> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .context("connecting to the test PostgreSQL server")?;
    tokio::spawn(connection);
    Ok(client)
}

/// A fresh database with every migration applied, dropped on drop.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub config: Config,
    /// Its server's `postgres` database, to drop it from.
    server: Config,
}

impl TestDb {
    pub async fn new() -> TestDb {
        match TestDb::try_new().await {
            Ok(db) => db,
            Err(error) => panic!("cannot create a test database: {error:#}"),
        }
    }

    /// A database with no schema at all, for testing migrations themselves.
    pub async fn empty() -> TestDb {
        match TestDb::try_new_from("template0").await {
            Ok(db) => db,
            Err(error) => panic!("cannot create a test database: {error:#}"),
        }
    }

    /// A migrated database on another server than the harness's, given by
    /// its `postgres` database (its role needs `CREATEDB`).
    pub async fn on_server(server: &Config) -> anyhow::Result<TestDb> {
        let template = ensure_template(server).await?;
        TestDb::create(server, &template).await
    }

    async fn try_new() -> anyhow::Result<TestDb> {
        let harness = harness().await?;
        TestDb::try_new_from(&harness.template).await
    }

    async fn try_new_from(template: &str) -> anyhow::Result<TestDb> {
        let harness = harness().await?;
        TestDb::create(&harness.admin, template).await
    }

    async fn create(server: &Config, template: &str) -> anyhow::Result<TestDb> {
        let name = format!("nox_test_{}", uuid::Uuid::new_v4().simple());
        let client = connect(server).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await?;
        let mut config = server.clone();
        config.dbname(&name);
        Ok(TestDb {
            name,
            config,
            server: server.clone(),
        })
    }

    /// A connection string for this database (libpq key/value form, which
    /// also works for Unix socket hosts), e.g. to pass as `DATABASE_URL`.
    pub fn url(&self) -> String {
        conninfo(&self.config)
    }

    pub async fn client(&self) -> Client {
        match connect(&self.config).await {
            Ok(client) => client,
            Err(error) => panic!("{error:#}"),
        }
    }

    /// An audit writer on this database (system clock), spooling to `spool`.
    pub fn audit_writer(&self, spool: Spool, config: WriterConfig) -> AuditWriter {
        let pool = build_pool(self.config.clone(), &PoolOptions::default()).expect("pool");
        AuditWriter::start(
            pool,
            spool,
            std::sync::Arc::new(nox_audit_model::SystemClock),
            config,
        )
    }

    /// Rolls every committed audit row up into the daily summaries, as the
    /// servers' rollup tasks do a few times a second; returns the new
    /// watermark (the last seq rolled up).
    pub async fn roll_up(&self) -> i64 {
        let client = self.client().await;
        nox_audit_store::rollup::catch_up(&client)
            .await
            .expect("rollup catch-up");
        nox_audit_store::rollup::RollupState::read(&client)
            .await
            .expect("rollup state")
            .rolled_seq
    }

    /// The one `bigint` a query returns, such as a `count(*)`.
    pub async fn scalar(&self, sql: &str) -> i64 {
        match self.client().await.query_one(sql, &[]).await {
            Ok(row) => row.get(0),
            Err(error) => panic!("{sql}: {error}"),
        }
    }

    /// Drops the database now (terminating its connections), as a test of
    /// "the database went away" needs.
    pub async fn drop_now(&self) -> anyhow::Result<()> {
        let client = connect(&self.server).await?;
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = self.server.clone();
        // Drop cannot await: do it on a thread with its own small runtime.
        let result = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let client = connect(&server).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                Ok(())
            })
        })
        .join();
        if let Ok(Err(error)) = result {
            eprintln!("nox-testkit: could not drop {}: {error:#}", self.name);
        }
    }
}

/// Renders a connection config as a libpq key/value string.
pub fn conninfo(config: &Config) -> String {
    fn quote(value: &str) -> String {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
    let mut parts = Vec::new();
    if let Some(host) = config.get_hosts().first() {
        let host = match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path_str(path),
        };
        parts.push(format!("host={}", quote(&host)));
    }
    if let Some(port) = config.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={}", quote(user)));
    }
    if let Some(password) = config.get_password() {
        parts.push(format!(
            "password={}",
            quote(&String::from_utf8_lossy(password))
        ));
    }
    if let Some(dbname) = config.get_dbname() {
        parts.push(format!("dbname={}", quote(dbname)));
    }
    parts.join(" ")
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
