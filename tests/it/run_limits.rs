//! `limit_hit` tells the truth: `memory` whenever the run's memory cgroup
//! killed one of its processes, whichever; `processes` when the process
//! limit refused a fork; in both cases also when bash itself survives.
//!
//! These need the launcher with the machine's cgroups; without them they
//! print why they skip.

use nox_testkit::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::run_leaks::{app_with_runs, run};

/// The app, if `/run` works here and has the cgroup the test needs.
async fn app_with_cgroup(
    cgroup: &str,
    adjust: impl FnOnce(&mut nox_api::config::Config),
) -> Option<TestApp> {
    let app = app_with_runs(adjust).await?;
    let layers = app.state.runs.layers()?;
    let present = match cgroup {
        "memory" => layers.memory_cgroup,
        _ => layers.pids_cgroup,
    };
    if !present {
        eprintln!("skipped: no {cgroup} cgroup for runs here (the server is not root?)");
        return None;
    }
    Some(app)
}

#[tokio::test]
async fn a_child_killed_by_the_memory_cgroup_is_a_memory_limit() {
    let Some(app) = app_with_cgroup("memory", |config| config.run_max_memory_mb = 64).await else {
        return;
    };
    let token = app.new_user("alice").await.token;
    // Python, a child of bash, touches 1 GB; the cgroup's OOM killer takes
    // it; bash carries on and exits 0.
    let (status, body) = run(
        &app,
        &token,
        json!({"command": "python3 -c 'a = bytearray(10**9)'; echo \"survived $?\""}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stdout"], "survived 137\n", "{body}");
    assert_eq!(body["exit_code"], 0, "{body}");
    assert_eq!(body["limit_hit"], "memory", "{body}");
    assert!(
        body["memory_peak_kb"].as_u64().expect("peak") <= 64 * 1024,
        "{body}"
    );

    // Reaching the limit by page cache alone (writing a file bigger than
    // the limit) kills nothing: no limit hit.
    let (status, body) = run(
        &app,
        &token,
        json!({"command": "head -c 100000000 /dev/zero > big; rm big; echo written"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["stdout"].as_str(), body["exit_code"].as_i64()),
        (Some("written\n"), Some(0)),
        "{body}"
    );
    assert_eq!(body["limit_hit"], Value::Null, "{body}");
}

#[tokio::test]
async fn a_fork_refused_by_the_process_limit_is_a_processes_limit() {
    let Some(app) = app_with_cgroup("pids", |_| {}).await else {
        return;
    };
    let token = app.new_user("alice").await.token;
    // Forks until refused (EAGAIN, 11), children asleep; bash survives.
    let script = [
        "import os, time",
        "try:",
        "    while True:",
        "        if os.fork() == 0:",
        "            time.sleep(600)",
        "            os._exit(0)",
        "except OSError as error:",
        "    print('refused', error.errno)",
    ]
    .join("\n");
    let (status, body) = run(
        &app,
        &token,
        json!({"command": format!("python3 -c \"{script}\"; echo \"survived $?\"")}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stdout"], "refused 11\nsurvived 0\n", "{body}");
    assert_eq!(body["exit_code"], 0, "{body}");
    assert_eq!(body["limit_hit"], "processes", "{body}");
}
