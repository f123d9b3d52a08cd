//! The real Nox app, served in-process on a random port.

use std::net::{SocketAddr, TcpListener};

use actix_web::dev::ServerHandle;
use actix_web::web;
use nox_api::{AppState, Config};

use crate::server::TestDb;

/// A running app with its own database and data directory.
#[derive(Debug)]
pub struct TestApp {
    pub address: SocketAddr,
    pub db: TestDb,
    pub data_dir: tempfile::TempDir,
    pub client: reqwest::Client,
    handle: ServerHandle,
}

impl TestApp {
    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        match self.client.get(self.url(path)).send().await {
            Ok(response) => response,
            Err(error) => panic!("GET {path} failed: {error}"),
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // The stop command is sent at once; nobody waits for completion.
        drop(self.handle.stop(false));
    }
}

/// Serves the app with the default test configuration.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Serves the app after `adjust` has changed the configuration.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let db = TestDb::new().await;
    let data_dir = tempfile::tempdir().expect("a temporary data dir");
    let mut config = Config::for_database(&db.url(), data_dir.path().to_path_buf());
    config.workers = Some(1);
    config.shutdown_timeout_secs = 5;
    adjust(&mut config);

    let database = nox_api::db::Database::open(&config.storage)
        .await
        .expect("open the test database");
    let pool = database
        .pool(config.storage.db_pool_size)
        .expect("build the pool");
    let state = web::Data::new(AppState::new(pool));
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a free port");
    let address = listener.local_addr().expect("local address");
    let server = nox_api::serve(listener, state, &config).expect("start the server");
    let handle = server.handle();
    tokio::spawn(server);
    TestApp {
        address,
        db,
        data_dir,
        client: reqwest::Client::new(),
        handle,
    }
}
