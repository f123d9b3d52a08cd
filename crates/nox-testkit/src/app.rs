//! The real Nox app, served in-process on a random port.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::dev::ServerHandle;
use actix_web::web;
use nox_api::server::Background;
use nox_api::{AppState, Config};
use nox_audit_model::ManualClock;
use nox_auth::Secret;
use reqwest::{Method, RequestBuilder};

/// The bootstrap admin's token in every test app (unless a test changes the
/// configuration).
pub const TEST_ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef-0123456789";

use crate::server::TestDb;

/// A user made by [`TestApp::new_user`].
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub token: String,
}

/// A running app with its own database and data directory.
#[derive(Debug)]
pub struct TestApp {
    pub address: SocketAddr,
    pub db: Arc<TestDb>,
    pub data_dir: tempfile::TempDir,
    pub client: reqwest::Client,
    /// The clock the audit layer stamps records with: advance it to move time.
    pub clock: Arc<ManualClock>,
    pub state: web::Data<AppState>,
    handle: ServerHandle,
    background: tokio::sync::Mutex<Option<Background>>,
}

impl TestApp {
    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        send(self.client.get(self.url(path))).await
    }

    /// A request carrying `Authorization: Bearer <token>`.
    pub fn request(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token)
    }

    /// GET with a token.
    pub async fn get_as(&self, path: &str, token: &str) -> reqwest::Response {
        send(self.request(Method::GET, path, token)).await
    }

    /// Creates a user (role `user`) through the admin API.
    pub async fn new_user(&self, name: &str) -> TestUser {
        let response = send(
            self.request(Method::POST, "/admin/users", TEST_ADMIN_TOKEN)
                .json(&serde_json::json!({ "name": name })),
        )
        .await;
        assert_eq!(
            response.status(),
            reqwest::StatusCode::CREATED,
            "creating {name}"
        );
        let created: serde_json::Value = response.json().await.expect("json");
        let field = |name: &str| created[name].as_str().expect("a string field").to_owned();
        TestUser {
            id: field("id"),
            token: field("token"),
        }
    }

    /// Stops the server gracefully, then drains the audit writer.
    pub async fn stop(&self) {
        self.state.commit_feed.close();
        self.state.admin_changes.close();
        self.handle.stop(true).await;
        if let Some(background) = self.background.lock().await.take() {
            background.shutdown().await;
        }
    }
}

/// The `nox-sandbox-exec` built beside the test binary
/// (`target/<profile>/deps/<test>` → `target/<profile>/nox-sandbox-exec`).
/// `cargo test --workspace` builds it: the launcher has tests of its own.
pub fn sandbox_launcher() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("nox-sandbox-exec");
    path.is_file().then_some(path)
}

/// Sends a request; a transport failure fails the test.
pub async fn send(request: RequestBuilder) -> reqwest::Response {
    match request.send().await {
        Ok(response) => response,
        Err(error) => panic!("request failed: {error}"),
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
    spawn_app_on(Arc::new(TestDb::new().await), adjust).await
}

/// Serves another app instance on an existing database, as a second server
/// sharing one PostgreSQL would.
pub async fn spawn_app_on(db: Arc<TestDb>, adjust: impl FnOnce(&mut Config)) -> TestApp {
    let data_dir = tempfile::tempdir().expect("a temporary data dir");
    let mut config = Config::for_database(&db.url(), data_dir.path().to_path_buf());
    config.admin_token = Some(Secret::new(TEST_ADMIN_TOKEN));
    config.workers = Some(1);
    config.sandbox_exec = sandbox_launcher();
    // Tests make requests in quick bursts: limits only where a test sets them.
    config.rate_limit_per_user = 0;
    config.rate_limit_per_ip = 0;
    config.shutdown_timeout_secs = 5;
    adjust(&mut config);

    let database = nox_api::db::Database::open(&config.storage)
        .await
        .expect("open the test database");
    let clock = Arc::new(ManualClock::default());
    let (state, background) = AppState::build(&config, &database, clock.clone(), None)
        .await
        .expect("build the app state");
    let state = web::Data::new(state);
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a free port");
    let address = listener.local_addr().expect("local address");
    let state_for_test = state.clone();
    let server = nox_api::serve(listener, state, &config).expect("start the server");
    let handle = server.handle();
    tokio::spawn(server);
    TestApp {
        address,
        db,
        data_dir,
        client: reqwest::Client::new(),
        clock,
        state: state_for_test,
        handle,
        background: tokio::sync::Mutex::new(Some(background)),
    }
}
