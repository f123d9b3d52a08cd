//! The launcher on its own: a report for every run, the command read from
//! standard input, and refusal of bad arguments. (The HTTP-level isolation
//! tests live in `tests/it/run.rs` and its neighbours.)

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `command` through the launcher in `workspace` (relative to `cwd`
/// when given), with `input` after the command on stdin. Returns the
/// launcher's output and its report.
fn launch(
    workspace: &Path,
    cwd: Option<&Path>,
    command: &str,
    input: &[u8],
) -> (Output, serde_json::Value) {
    let reports = tempfile::tempdir().expect("reports");
    let report = reports.path().join("report.json");
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_nox-sandbox-exec"));
    launcher
        .arg("--workspace")
        .arg(workspace)
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
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = cwd {
        launcher.current_dir(cwd);
    }
    // Strict isolation needs root (and a run uid); elsewhere, relaxed.
    if nix::unistd::Uid::effective().is_root() {
        launcher.args(["--uid", "65534", "--gid", "65534"]);
        let _ = std::os::unix::fs::chown(
            cwd.unwrap_or(Path::new("/")).join(workspace),
            Some(65534),
            Some(65534),
        );
    } else {
        launcher.arg("--relaxed");
    }
    let mut child = launcher.spawn().expect("run the launcher");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut head = format!("{}\n", command.len()).into_bytes();
    head.extend_from_slice(command.as_bytes());
    head.extend_from_slice(input);
    // The command may not read its input: a broken pipe is fine.
    let _ = stdin.write_all(&head);
    drop(stdin);
    let output = child.wait_with_output().expect("wait");
    let text = std::fs::read_to_string(&report).expect("report");
    (output, serde_json::from_str(&text).expect("json"))
}

#[test]
fn a_simple_run_reports_its_exit_and_usage() {
    let workspace = tempfile::tempdir().expect("workspace");
    let (output, report) = launch(
        workspace.path(),
        None,
        "echo out; echo err >&2; exit 3",
        b"",
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "err\n");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["timed_out"], false);
    assert!(report["cpu_time_ms"].as_f64().expect("cpu") >= 0.0);
    assert!(report["layers"]["rlimits"].as_bool().expect("layers"));
}

#[test]
fn the_command_comes_from_stdin_and_the_rest_of_stdin_is_its_input() {
    let workspace = tempfile::tempdir().expect("workspace");
    // Quotes, a multi-byte character, several lines and a trailing newline
    // arrive exactly; the input right after it is the command's.
    let command = "printf '%s|' \"a  b\" 'é'\nread -r line; echo \"[$line]\"; cat\n";
    let (output, report) = launch(workspace.path(), None, command, b"first\nsecond\n");
    assert_eq!(report["exit_code"], 0, "{report} {output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "a  b|é|[first]\nsecond\n"
    );
}

#[test]
fn only_descriptors_0_to_2_reach_the_command() {
    let workspace = tempfile::tempdir().expect("workspace");
    let (output, report) = launch(
        workspace.path(),
        None,
        "for ((fd = 0; fd < 4096; fd++)); do [ -e /dev/fd/$fd ] && printf '%s ' $fd; done; \
         printf junk >&4; echo",
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "0 1 2 \n");
    assert_eq!(report["exit_code"], 0, "{report} {output:?}");
}

#[test]
fn home_is_absolute_when_the_workspace_is_given_relative() {
    let parent = tempfile::tempdir().expect("parent");
    std::fs::create_dir(parent.path().join("ws")).expect("workspace");
    let (output, report) = launch(
        Path::new("ws"),
        Some(parent.path()),
        "echo \"$HOME\"; echo \"$TMPDIR\"",
        b"",
    );
    assert_eq!(report["exit_code"], 0, "{report} {output:?}");
    let workspace = parent.path().join("ws").canonicalize().expect("canonical");
    // The run's own /tmp, or (relaxed, without a mount namespace) one in
    // the workspace.
    let tmp = match report["layers"]["mount_namespace"].as_bool() {
        Some(true) => "/tmp".to_owned(),
        _ => format!("{}/.tmp", workspace.display()),
    };
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{}\n{tmp}\n", workspace.display())
    );
}

#[test]
fn a_missing_or_malformed_command_is_reported() {
    let workspace = tempfile::tempdir().expect("workspace");
    for stdin in [&b""[..], b"12\nshort", b"x\necho", b"123456789\n"] {
        let report_dir = tempfile::tempdir().expect("reports");
        let report = report_dir.path().join("report.json");
        let mut child = Command::new(env!("CARGO_BIN_EXE_nox-sandbox-exec"))
            .arg("--workspace")
            .arg(workspace.path())
            .arg("--report")
            .arg(&report)
            .args(["--timeout-ms", "10000", "--cpu-secs", "11"])
            .args(["--memory-mb", "128", "--run-id", "malformed"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("run");
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(stdin).expect("write");
        drop(pipe);
        child.wait().expect("wait");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
        assert!(report["error"].is_string(), "{stdin:?}: {report}");
    }
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
