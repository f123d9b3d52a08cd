//! `nox-server` as an operator runs it: a real process, real signals.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nox_testkit::TestDb;

mod support;
use support::{Server, get, post_json};

#[tokio::test]
async fn sigterm_and_sigint_stop_the_server_gracefully_with_exit_0() {
    let db = TestDb::new().await;
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let url = db.url();
        let (status, log) = tokio::task::spawn_blocking(move || {
            let mut server = Server::start(&[("DATABASE_URL", &url)]);
            let (code, body) = get(&format!("{}/health", server.base));
            assert_eq!((code, &body["database"]), (200, &serde_json::json!("up")));
            server.signal(signal);
            let status = server.wait_exit(Duration::from_secs(30));
            (status, server.log.clone())
        })
        .await
        .expect("join");
        assert!(status.success(), "{signal}: {status:?} {log:#?}");
        assert!(
            log.iter().any(|l| l.contains("shutting down gracefully")),
            "{log:#?}"
        );
    }
}

/// The README's run command on the embedded default: it creates a cluster,
/// serves, stops it with the server, and reuses it on the next start.
#[test]
fn embedded_postgres_is_created_stopped_and_reused() {
    let root = tempfile::tempdir().expect("tempdir");
    // The cluster may run as another user (when we are root): let it in.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data_dir = root.path().join("data");
    let data_dir_str = data_dir.to_str().expect("utf-8 path");
    let pg = data_dir.join("pg");

    let mut first = Server::start(&[("NOX_DATA_DIR", data_dir_str)]);
    let (code, body) = get(&format!("{}/health", first.base));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["database"], "up");
    assert!(pg.join("postmaster.pid").exists(), "the cluster runs");
    first.signal(Signal::SIGTERM);
    assert!(
        first.wait_exit(Duration::from_secs(60)).success(),
        "{:#?}",
        first.log
    );
    assert!(
        first
            .log
            .iter()
            .any(|l| l.contains("creating the embedded PostgreSQL cluster")),
        "{:#?}",
        first.log
    );
    assert!(
        !pg.join("postmaster.pid").exists(),
        "PostgreSQL must be stopped with the server: {:#?}",
        first.log
    );
    assert_no_postgres_for(&pg);
    let password = assert_private_password(&data_dir.join("pg.password"));
    assert!(
        !first.log.iter().any(|l| l.contains(&password)),
        "the database password was logged: {:#?}",
        first.log
    );

    let mut second = Server::start(&[("NOX_DATA_DIR", data_dir_str)]);
    let (code, _) = get(&format!("{}/health", second.base));
    assert_eq!(code, 200);
    second.signal(Signal::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(60)).success());
    assert!(
        !second
            .log
            .iter()
            .any(|l| l.contains("creating the embedded")),
        "the second start must reuse the cluster: {:#?}",
        second.log
    );
    assert!(
        second
            .log
            .iter()
            .any(|l| l.contains("schema is current applied=0")),
        "the reused cluster keeps its schema: {:#?}",
        second.log
    );
    assert_no_postgres_for(&pg);
    assert!(!second.log.iter().any(|l| l.contains(&password)));
}

/// The embedded cluster's password file: ours, mode 0600. Returns the password.
fn assert_private_password(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).expect("the password file exists");
    assert_eq!(metadata.mode() & 0o777, 0o600, "{}", path.display());
    assert_eq!(metadata.uid(), nix::unistd::Uid::effective().as_raw());
    let password = std::fs::read_to_string(path).expect("read");
    let password = password.trim();
    assert!(password.len() >= 32, "a generated password");
    password.to_owned()
}

/// No process has the cluster's data directory on its command line.
fn assert_no_postgres_for(pg: &Path) {
    let needle = pg.to_str().expect("utf-8");
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !(cmdline.contains("postgres") && cmdline.contains(needle)),
                "still running: {cmdline}"
            );
        }
    }
}

#[test]
fn missing_postgres_binaries_are_one_clear_line() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_nox-server"));
    command
        .env("NOX_DATA_DIR", root.path().join("data"))
        .env("NOX_PG_BIN_DIR", root.path().join("no-such-bin"));
    let (success, stderr) = run_expecting_exit(command);
    assert!(!success, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("nox-server: ") && last.contains("install PostgreSQL or set DATABASE_URL"),
        "{stderr}"
    );
}

#[test]
fn an_untraversable_data_dir_is_reported_clearly_when_root() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: only root hands the cluster to another user");
        return;
    }
    // A root-owned 0700 directory: the service user cannot enter it.
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut command = Command::new(env!("CARGO_BIN_EXE_nox-server"));
    command.env("NOX_DATA_DIR", root.path().join("data"));
    let (success, stderr) = run_expecting_exit(command);
    assert!(!success, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("is not traversable") && last.contains(root.path().to_str().expect("utf-8")),
        "{stderr}"
    );
}

/// Runs a server that is expected to exit on its own; kills it (and fails)
/// if it is still running after 60 s. Returns success and stderr.
fn run_expecting_exit(mut command: Command) -> (bool, String) {
    command.env_remove("DATABASE_URL");
    run_expecting_exit_keeping_env(command)
}

fn run_expecting_exit_keeping_env(mut command: Command) -> (bool, String) {
    let mut child = command
        .env("NOX_PORT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nox-server");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nox-server kept running although it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    (status.success(), stderr)
}

#[tokio::test]
async fn a_generated_admin_token_is_printed_once_and_never_logged() {
    let db = TestDb::new().await;
    let url = db.url();
    let data_dir = tempfile::tempdir().expect("tempdir");
    let data = data_dir.path().to_str().expect("utf-8").to_owned();
    let (stdout, log, second_stdout) = tokio::task::spawn_blocking(move || {
        let envs = [
            ("DATABASE_URL", url.as_str()),
            ("NOX_DATA_DIR", data.as_str()),
        ];
        let mut first = Server::start(&envs);
        // Create a user and a token over HTTP: their secrets must not reach
        // the log either.
        let admin_token = std::fs::read_to_string(std::path::Path::new(&data).join("admin-token"))
            .expect("admin-token file");
        let created = post_json(
            &format!("{}/admin/users", first.base),
            admin_token.trim(),
            serde_json::json!({"name": "alice"}),
        );
        let user_token = created["token"].as_str().expect("token").to_owned();
        first.signal(Signal::SIGTERM);
        let status = first.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{status:?} {:#?}", first.log);
        let log = first.log.join("\n");
        assert!(!log.contains(&user_token), "a user token reached the log");
        let stdout = first.take_stdout();
        assert!(!stdout.contains(&user_token), "a user token reached stdout");
        let mut second = Server::start(&envs);
        second.signal(Signal::SIGTERM);
        assert!(second.wait_exit(Duration::from_secs(30)).success());
        (stdout, log, second.take_stdout())
    })
    .await
    .expect("join");
    let token = stdout
        .lines()
        .find_map(|line| line.strip_prefix("admin token: "))
        .unwrap_or_else(|| panic!("no admin token line in {stdout:?}"));
    assert!(token.starts_with("nox_") && token.len() == 68, "{token}");
    assert!(!log.contains(token), "the token reached the log");
    assert!(
        !second_stdout.contains("admin token"),
        "an existing admin gets no new token: {second_stdout}"
    );
}

/// With `NOX_LOG_FORMAT=json` every line the server prints, on stdout and
/// stderr, is one JSON object: the log, and the lines shown on purpose (the
/// generated admin token, once, and the checkpoint public key).
#[tokio::test]
async fn json_log_format_prints_only_json_lines_admin_token_included() {
    let db = TestDb::new().await;
    let url = db.url();
    let data_dir = tempfile::tempdir().expect("tempdir");
    let data = data_dir.path().to_str().expect("utf-8").to_owned();
    let (stdout, log, saved_token) = tokio::task::spawn_blocking(move || {
        let mut server = Server::start(&[
            ("DATABASE_URL", url.as_str()),
            ("NOX_DATA_DIR", data.as_str()),
            ("NOX_LOG_FORMAT", "json"),
        ]);
        server.signal(Signal::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{status:?} {:#?}", server.log);
        let saved = std::fs::read_to_string(Path::new(&data).join("admin-token"))
            .expect("admin-token file");
        (server.take_stdout(), server.log.clone(), saved)
    })
    .await
    .expect("join");
    let parse = |stream: &str, line: &str| -> serde_json::Map<String, serde_json::Value> {
        match serde_json::from_str(line) {
            Ok(serde_json::Value::Object(object)) => object,
            _ => panic!("a {stream} line is not a JSON object: {line:?}"),
        }
    };
    let logged: Vec<_> = log.iter().map(|line| parse("stderr", line)).collect();
    assert!(
        logged.iter().any(|line| line["message"]
            .as_str()
            .is_some_and(|m| m.contains("listening on http://"))),
        "{log:#?}"
    );
    let shown: Vec<_> = stdout.lines().map(|line| parse("stdout", line)).collect();
    let token_lines: Vec<_> = shown
        .iter()
        .filter(|line| line["message"] == "admin token")
        .collect();
    assert_eq!(token_lines.len(), 1, "one admin token line: {stdout}");
    let token = token_lines[0]["token"].as_str().expect("the token field");
    assert!(token.starts_with("nox_") && token.len() == 68, "{token}");
    assert_eq!(
        token,
        saved_token.trim(),
        "the token shown is the one saved"
    );
    assert!(
        !log.iter().any(|line| line.contains(token)),
        "the token reached the log"
    );
    let key_line = shown
        .iter()
        .find(|line| line["message"] == "audit checkpoint public key")
        .unwrap_or_else(|| panic!("no public key line: {stdout}"));
    let key = key_line["public_key"]
        .as_str()
        .expect("the public_key field");
    assert!(
        key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );
}

#[tokio::test]
async fn a_short_admin_token_is_refused_at_start() {
    let db = TestDb::new().await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_nox-server"));
    command
        .env("NOX_ADMIN_TOKEN", "short-secret")
        .env("NOX_DATA_DIR", std::env::temp_dir().join("nox-unused"));
    let url = db.url();
    let (success, stderr) = tokio::task::spawn_blocking(move || {
        command.env("DATABASE_URL", url);
        run_expecting_exit_keeping_env(command)
    })
    .await
    .expect("join");
    assert!(!success);
    assert!(stderr.contains("at least 32 characters"), "{stderr}");
    assert!(!stderr.contains("short-secret"), "{stderr}");
}

#[tokio::test]
async fn no_migrate_on_an_unmigrated_database_is_refused_clearly() {
    let db = TestDb::empty().await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_nox-server"));
    command
        .arg("--no-migrate")
        .env("DATABASE_URL", db.url())
        .env("NOX_DATA_DIR", std::env::temp_dir().join("nox-unused"));
    let (success, stderr) =
        tokio::task::spawn_blocking(move || run_expecting_exit_keeping_env(command))
            .await
            .expect("join");
    assert!(!success);
    assert!(stderr.contains("nox-migrate up"), "{stderr}");
}
