//! A database on a primary of the tests' own with a streaming replica of it,
//! both from the system's PostgreSQL binaries, for tests of the read
//! replica. One primary serves the whole test process (started on first
//! use, like the throwaway cluster); each [`Replicated`] has its replica,
//! made with `pg_basebackup -R`, so a test may stop or pause it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

use anyhow::Context;
use nox_pg_embed::{Binaries, Cluster, EmbedError};
use tokio::sync::OnceCell;
use tokio_postgres::{Client, Config, NoTls};

use crate::server::{TestDb, cluster_config, cluster_dir, conninfo, start_throwaway_cluster};

#[derive(Debug)]
struct Primary {
    socket_dir: PathBuf,
    password: String,
}

static PRIMARY: OnceCell<Primary> = OnceCell::const_new();

/// A migrated test database on the primary, and the replica that streams it.
#[derive(Debug)]
pub struct Replicated {
    /// The database, on the primary.
    pub db: Arc<TestDb>,
    /// The same database on the replica (read-only).
    pub replica: Config,
    /// Dropping it (or sending) stops the replica.
    stop: mpsc::Sender<()>,
    stopped: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Replicated {
    /// `None`, after printing why, where the PostgreSQL server binaries or
    /// `pg_basebackup` are missing; any other failure panics.
    pub async fn start() -> Option<Replicated> {
        if let Err(error) = Binaries::find(None) {
            eprintln!("skipped: no streaming replica here: {error}");
            return None;
        }
        let primary = PRIMARY
            .get_or_try_init(|| async {
                let (socket_dir, password) =
                    tokio::task::spawn_blocking(|| start_throwaway_cluster("-primary")).await??;
                anyhow::Ok(Primary {
                    socket_dir,
                    password,
                })
            })
            .await
            .expect("start the primary");
        let server = cluster_config(&primary.socket_dir, &primary.password);
        let db = TestDb::on_server(&server)
            .await
            .expect("a database on the primary");
        let (socket_dir, stop, thread) = match start_replica(primary).await {
            Ok(started) => started,
            Err(EmbedError::ToolNotFound(dir, tool)) => {
                eprintln!(
                    "skipped: no streaming replica here: {} has no {tool}",
                    dir.display()
                );
                return None;
            }
            Err(error) => panic!("starting a replica: {error}"),
        };
        let mut replica = cluster_config(&socket_dir, &primary.password);
        replica.dbname(&db.name);
        Some(Replicated {
            db: Arc::new(db),
            replica,
            stop,
            stopped: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// The replica's connection string for the database (libpq key/value
    /// form), e.g. for `NOX_DATABASE_READ_URL`.
    pub fn replica_url(&self) -> String {
        conninfo(&self.replica)
    }

    /// A connection to the database on the replica.
    pub async fn replica_client(&self) -> Client {
        let (client, connection) = self
            .replica
            .connect(NoTls)
            .await
            .context("connecting to the replica")
            .unwrap_or_else(|error| panic!("{error:#}"));
        tokio::spawn(connection);
        client
    }

    /// Stops the replica (fast shutdown) and returns once it is down.
    pub async fn stop_replica(&self) {
        let _ = self.stop.send(());
        let thread = self.stopped.lock().expect("not poisoned").take();
        if let Some(thread) = thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("join")
                .expect("the replica's thread panicked");
        }
    }
}

/// Starts a replica on a thread of its own, which keeps it (the postgres
/// process dies with the thread that started it) until told to stop or
/// until the sender is dropped; then it stops the replica and removes its
/// directory. Returns the replica's socket directory.
async fn start_replica(
    primary: &Primary,
) -> Result<(PathBuf, mpsc::Sender<()>, std::thread::JoinHandle<()>), EmbedError> {
    let dir = cluster_dir(&format!("-replica-{}", uuid::Uuid::new_v4().simple()));
    let (primary_socket, password) = (primary.socket_dir.clone(), primary.password.clone());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (stop, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("nox-test-replica".into())
        .spawn(move || {
            match Cluster::start_ephemeral_replica(&dir, &primary_socket, &password) {
                Ok(mut replica) => {
                    let _ = started_tx.send(Ok(replica.socket_dir().to_path_buf()));
                    let _ = stop_rx.recv();
                    if let Err(error) = replica.stop() {
                        eprintln!("nox-testkit: stopping a replica: {error}");
                    }
                }
                Err(error) => {
                    let _ = started_tx.send(Err(error));
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        })
        .expect("spawn the replica's thread");
    let socket_dir = started_rx.await.expect("the replica's thread died")?;
    Ok((socket_dir, stop, thread))
}
