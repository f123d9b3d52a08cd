//! The launcher on its own: a report for every run, and refusal of bad
//! arguments. (The HTTP-level isolation tests live in `tests/it/run.rs`.)

use std::process::Command;

#[test]
fn a_simple_run_reports_its_exit_and_usage() {
    let workspace = tempfile::tempdir().expect("workspace");
    let report = workspace.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_nox-sandbox-exec"))
        .arg("--workspace")
        .arg(workspace.path())
        .arg("--report")
        .arg(&report)
        .args([
            "--timeout-ms",
            "10000",
            "--cpu-secs",
            "11",
            "--memory-mb",
            "128",
        ])
        .args(["--run-id", &uuid::Uuid::new_v4().simple().to_string()])
        .arg("--")
        .arg("echo out; echo err >&2; exit 3")
        .env_clear()
        .output()
        .expect("run the launcher");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "err\n");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["timed_out"], false);
    assert!(report["cpu_time_ms"].as_f64().expect("cpu") >= 0.0);
    assert!(report["layers"]["rlimits"].as_bool().expect("layers"));
}

#[test]
fn missing_arguments_are_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_nox-sandbox-exec"))
        .arg("--workspace")
        .arg("/nonexistent")
        .output()
        .expect("run");
    assert!(!output.status.success());
}
