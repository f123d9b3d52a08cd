//! What a run can see of Nox, and what the host can see of a run: the
//! command gets only descriptors 0 to 2, its text is in no process's
//! argument list, and its `HOME` is absolute.
//!
//! These need the launcher with the machine's isolation layers; without it
//! they print why they skip.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nox_testkit::{TestApp, send, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

/// The app, if `/run` works on this machine.
pub(crate) async fn app_with_runs(
    adjust: impl FnOnce(&mut nox_api::config::Config),
) -> Option<TestApp> {
    let app = spawn_app_with(adjust).await;
    if app.state.runs.layers().is_none() {
        eprintln!(
            "skipped: POST /run is unavailable here (no nox-sandbox-exec beside the test binary, \
             or its probe run failed; build it with `cargo build -p nox-sandbox-exec`)"
        );
        return None;
    }
    Some(app)
}

/// `POST /run` with `body`: the status and the JSON answer.
pub(crate) async fn run(app: &TestApp, token: &str, body: Value) -> (StatusCode, Value) {
    let response = send(app.request(Method::POST, "/run", token).json(&body)).await;
    let status = response.status();
    (status, response.json().await.expect("json"))
}

/// Every process's argument list, by pid.
pub(crate) fn command_lines() -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .collect()
}

/// The descriptors `pid` has open, sorted.
fn descriptors(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's descriptors")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // `pid (comm) state ppid ...`: comm may hold spaces, so from the last ')'.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after
        .split(' ')
        .nth(1)
        .and_then(|ppid| ppid.parse().ok())
        .expect("ppid")
}

#[tokio::test]
async fn the_command_gets_only_descriptors_0_to_2() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let token = app.new_user("alice").await.token;
    // `test -e /dev/fd/N` is a stat of /proc/self/fd/N, which Landlock
    // allows (it refuses listing /proc); bash opens nothing for it, so this
    // is bash's own table, the one every child inherits.
    let (status, body) = run(
        &app,
        &token,
        json!({"command": "for ((fd = 0; fd < 4096; fd++)); do [ -e /dev/fd/$fd ] && printf '%s ' $fd; done; echo"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stdout"], "0 1 2 \n", "{body}");

    // Writing junk where the launcher's status pipe used to be (fd 4)
    // fails in the command and cannot garble the report.
    let (status, body) = run(
        &app,
        &token,
        json!({"command": "printf junk >&4; printf junk >&3; echo \"still here $?\""}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            body["exit_code"].as_i64(),
            body["signal"].as_i64(),
            body["success"].as_bool()
        ),
        (Some(0), None, Some(true)),
        "{body}"
    );
    assert_eq!(body["stdout"], "still here 1\n", "{body}");
    assert!(
        body["stderr"]
            .as_str()
            .expect("stderr")
            .contains("Bad file descriptor"),
        "{body}"
    );
}

#[tokio::test]
async fn the_host_sees_neither_the_command_nor_extra_descriptors() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let token = app.new_user("alice").await.token;
    let marker = format!("marker-{}", Uuid::new_v4().simple());
    // The sleep's own argument shows in its argument list, which is fine: it
    // is only how this test finds the run.
    let sleep = format!("sleep 297.{}", std::process::id());
    let command = format!(": {marker}; echo \"{marker}\" >/dev/null; {sleep}; echo done");
    let request = app
        .request(Method::POST, "/run", &token)
        .json(&json!({"command": command, "timeout": 300}));
    let pending = tokio::spawn(async move { send(request).await.status() });

    // Until the run is sleeping (a bound, not a timing assertion).
    let deadline = Instant::now() + Duration::from_secs(60);
    let sleeper = loop {
        if let Some((pid, _)) = command_lines()
            .into_iter()
            .find(|(_, cmdline)| cmdline.trim_end() == sleep)
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the run never started its sleep");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let showing: Vec<(i32, String)> = command_lines()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(&marker))
        .collect();
    assert!(
        showing.is_empty(),
        "the command is in argument lists: {showing:?}"
    );
    // The sleeping child and bash, its parent, hold 0, 1 and 2 only.
    let bash = parent_of(sleeper);
    assert_eq!(descriptors(sleeper), [0, 1, 2], "the sleep's descriptors");
    assert_eq!(descriptors(bash), [0, 1, 2], "bash's descriptors");

    // Done: the client leaves, which ends the run.
    pending.abort();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Path::new(&format!("/proc/{sleeper}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `path` relative to the current directory (`..` up to the root, then down).
fn relative_to_cwd(path: &Path) -> PathBuf {
    let cwd = std::env::current_dir().expect("cwd");
    let mut relative = PathBuf::new();
    for component in cwd.components() {
        if matches!(component, Component::Normal(_)) {
            relative.push("..");
        }
    }
    relative.join(path.strip_prefix("/").expect("an absolute path"))
}

#[tokio::test]
async fn home_is_absolute_even_with_a_relative_data_directory() {
    // The default NOX_DATA_DIR is `./nox-data`: relative.
    let Some(app) = app_with_runs(|config| {
        config.storage.data_dir = relative_to_cwd(&config.storage.data_dir);
        assert!(config.storage.data_dir.is_relative());
    })
    .await
    else {
        return;
    };
    let user = app.new_user("alice").await;
    let (status, body) = run(
        &app,
        &user.token,
        json!({"command": "echo \"$HOME\"; echo \"$TMPDIR\"; pwd -P"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stdout = body["stdout"].as_str().expect("stdout");
    let lines: Vec<&str> = stdout.lines().collect();
    let workspace = app
        .data_dir
        .path()
        .join("sandboxes")
        .join(&user.id)
        .canonicalize()
        .expect("the workspace");
    assert_eq!(
        lines,
        [
            workspace.display().to_string(),
            // The run's own /tmp (see run_isolation.rs).
            "/tmp".to_owned(),
            workspace.display().to_string(),
        ],
        "{body}"
    );
}
