//! No audit record is lost: PostgreSQL restarting under load, and the server
//! killed with SIGKILL under load.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nox_pg_embed::Cluster;
use nox_testkit::TestDb;
use uuid::Uuid;

mod support;
use support::Server;

const TOKEN: &str = "fault-test-admin-token-0123456789abcdef";

/// Clients sending `GET /me` in a loop, each request tagged with its own id.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<(Uuid, u16)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(base: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
                let url = format!("{base}/me");
                tokio::spawn(async move {
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(15))
                        .build()
                        .expect("client");
                    while !stop.load(Ordering::Relaxed) {
                        let id = Uuid::now_v7();
                        let response = client
                            .get(&url)
                            .bearer_auth(TOKEN)
                            .header("X-Request-ID", id.to_string())
                            .send()
                            .await;
                        match response {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                // Only a complete response counts as answered.
                                if response.bytes().await.is_ok() {
                                    answered.lock().expect("lock").push((id, status));
                                }
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            answered,
            tasks,
        }
    }

    async fn finish(self) -> Vec<(Uuid, u16)> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.answered.lock().expect("lock").clone()
    }
}

/// Waits until the spool holds no complete batch file.
async fn wait_for_empty_spool(spool: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending = std::fs::read_dir(spool)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".ndjson"))
                    .count()
            })
            .unwrap_or(0);
        if pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the spool was not replayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that every answered request has exactly one row.
async fn assert_all_recorded(client: &tokio_postgres::Client, answered: &[(Uuid, u16)]) {
    let ids: Vec<Uuid> = answered.iter().map(|(id, _)| *id).collect();
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT request_id) FROM audit_actions WHERE request_id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("count");
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        distinct,
        ids.len() as i64,
        "every answered request has its row"
    );
    assert_eq!(rows, distinct, "and only one");
}

/// The replayed rows joined the hash chain: it still verifies end to end.
async fn assert_chain_verifies(mut client: tokio_postgres::Client) {
    let options = nox_audit_store::verify::VerifyOptions::default();
    match nox_audit_store::verify::verify(&mut client, &options).await {
        Ok(chains) => eprintln!("chains verified: {chains:?}"),
        Err(error) => panic!("the audit chain does not verify after a replay: {error}"),
    }
}

fn data_dir(root: &Path) -> PathBuf {
    root.join("data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarting_under_load_loses_no_record() {
    let root = tempfile::tempdir().expect("tempdir");
    // The cluster may run as another user (we may be root): let it in.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let pg_dir = root.path().join("pg");
    let pg = pg_dir.clone();
    let mut cluster = tokio::task::spawn_blocking(move || Cluster::start(&pg, None))
        .await
        .expect("join")
        .expect("start a private PostgreSQL");
    let url = format!(
        "host={} port={} user={} password={} dbname=postgres",
        cluster.socket_dir().display(),
        nox_pg_embed::SOCKET_PORT,
        nox_pg_embed::SUPERUSER,
        cluster.password()
    );
    let data = data_dir(root.path());
    let envs = [
        ("DATABASE_URL", url.clone()),
        ("NOX_DATA_DIR", data.display().to_string()),
        ("NOX_ADMIN_TOKEN", TOKEN.to_owned()),
        ("NOX_RATE_LIMIT_PER_USER", "0".to_owned()),
    ];
    let mut server = Server::start_async(envs.to_vec()).await;

    let load = Load::start(&server.base, 4);
    tokio::time::sleep(Duration::from_millis(400)).await;
    tokio::task::spawn_blocking(move || {
        cluster.stop().expect("stop PostgreSQL");
        cluster
    })
    .await
    .expect("join");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pg = pg_dir.clone();
    let mut cluster = tokio::task::spawn_blocking(move || Cluster::start(&pg, None))
        .await
        .expect("join")
        .expect("restart PostgreSQL");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let answered = load.finish().await;

    let statuses: Vec<u16> = answered.iter().map(|(_, s)| *s).collect();
    eprintln!(
        "answered {} requests: {} ok, {} unavailable",
        statuses.len(),
        statuses.iter().filter(|s| **s == 200).count(),
        statuses.iter().filter(|s| **s == 503).count()
    );
    assert!(statuses.contains(&200), "some requests succeeded");
    assert!(
        statuses.contains(&503),
        "some requests met the database down: {statuses:?}"
    );
    wait_for_empty_spool(&data.join("audit-spool")).await;

    let mut config: tokio_postgres::Config = url.parse().expect("url");
    config.dbname("postgres");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    assert_all_recorded(&client, &answered).await;
    assert_chain_verifies(client).await;

    server.signal(Signal::SIGTERM);
    assert!(
        server.wait_exit(Duration::from_secs(30)).success(),
        "{:#?}",
        server.log
    );
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .expect("join")
        .expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_under_load_loses_no_acknowledged_record() {
    let db = TestDb::new().await;
    let root = tempfile::tempdir().expect("tempdir");
    let data = data_dir(root.path());
    let envs = [
        ("DATABASE_URL", db.url()),
        ("NOX_DATA_DIR", data.display().to_string()),
        ("NOX_ADMIN_TOKEN", TOKEN.to_owned()),
        ("NOX_AUDIT_MODE", "durable".to_owned()),
        ("NOX_RATE_LIMIT_PER_USER", "0".to_owned()),
    ];
    let mut server = Server::start_async(envs.to_vec()).await;
    let load = Load::start(&server.base, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.signal(Signal::SIGKILL);
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let answered = load.finish().await;
    let ok: Vec<(Uuid, u16)> = answered.into_iter().filter(|(_, s)| *s == 200).collect();
    assert!(ok.len() > 10, "the load got answers: {}", ok.len());
    eprintln!("{} requests answered 200 before the kill", ok.len());

    // Whatever was spooled is replayed by the next start.
    let mut restarted = Server::start_async(envs.to_vec()).await;
    wait_for_empty_spool(&data.join("audit-spool")).await;
    assert_all_recorded(&db.client().await, &ok).await;
    assert_chain_verifies(db.client().await).await;
    restarted.signal(Signal::SIGTERM);
    assert!(restarted.wait_exit(Duration::from_secs(30)).success());
}
