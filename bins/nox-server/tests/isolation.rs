//! The command sandbox fails closed: a server that cannot give runs every
//! isolation layer (here: one started as an unprivileged user, which can
//! make no namespaces, cgroups or uid switches) refuses `POST /run` with
//! 503 `sandbox_unavailable` naming what is missing, and says so in
//! `/health`; `NOX_RUN_ISOLATION=relaxed` runs anyway.

use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use nox_testkit::TestDb;

mod support;
use support::{Server, get, post_json_status};

const TOKEN: &str = "isolation-admin-token-0123456789abcdef-0123";
const NOBODY: u32 = 65534;

/// The launcher `cargo build` puts beside the server binary.
fn launcher() -> Option<PathBuf> {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_nox-server"));
    let launcher = server.parent()?.join("nox-sandbox-exec");
    launcher.is_file().then_some(launcher)
}

#[tokio::test]
async fn a_server_that_is_not_root_refuses_runs_unless_relaxed() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: starting the server as another user needs root");
        return;
    }
    let Some(launcher) = launcher() else {
        eprintln!(
            "skipped: no nox-sandbox-exec beside nox-server (cargo build -p nox-sandbox-exec)"
        );
        return;
    };
    let db = TestDb::new().await;
    let url = db.url();
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers = Vec::new();
        for isolation in ["strict", "relaxed"] {
            let data_dir = tempfile::tempdir().expect("tempdir");
            chown(data_dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
            let data = data_dir.path().to_str().expect("utf-8").to_owned();
            let launcher = launcher.to_str().expect("utf-8").to_owned();
            let envs = [
                ("DATABASE_URL", url.as_str()),
                ("NOX_DATA_DIR", data.as_str()),
                ("NOX_ADMIN_TOKEN", TOKEN),
                ("NOX_SANDBOX_EXEC", launcher.as_str()),
                ("NOX_RUN_ISOLATION", isolation),
            ];
            let mut server = Server::start_with(&envs, |command| {
                // std drops the supplementary groups when root sets a uid.
                command.uid(NOBODY).gid(NOBODY);
            });
            let (_, health) = get(&format!("{}/health", server.base));
            let run = post_json_status(
                &format!("{}/run", server.base),
                TOKEN,
                serde_json::json!({"command": "echo ran"}),
            );
            server.signal(Signal::SIGTERM);
            server.wait_exit(Duration::from_secs(30));
            answers.push((isolation, health, run, server.log.join("\n")));
        }
        answers
    })
    .await
    .expect("join");

    let (_, health, (status, body), log) = &answers[0];
    assert_eq!(*status, 503, "{body}");
    assert_eq!(body["code"], "sandbox_unavailable", "{body}");
    let detail = body["detail"].as_str().expect("detail");
    for layer in ["pid_namespace", "memory_cgroup", "run_as_user"] {
        assert!(detail.contains(layer), "{layer} not named: {detail}");
    }
    assert_eq!(health["sandbox"]["status"], "unavailable", "{health}");
    assert!(
        health["sandbox"]["missing"]
            .as_array()
            .is_some_and(|missing| missing.contains(&"run_as_user".into())),
        "{health}"
    );
    assert!(log.contains("POST /run is unavailable"), "{log}");

    let (_, health, (status, body), log) = &answers[1];
    assert_eq!(*status, 200, "{body}");
    assert_eq!(body["stdout"], "ran\n", "{body}");
    assert_eq!(health["sandbox"]["status"], "ready", "{health}");
    assert!(
        health["sandbox"]["missing"]
            .as_array()
            .is_some_and(|missing| missing.contains(&"pid_namespace".into())),
        "{health}"
    );
    assert!(
        log.contains("NOX_RUN_ISOLATION=relaxed"),
        "the start is loud: {log}"
    );
}
