#![allow(unsafe_code)] // keyctl(2) and add_key(2) in the keyring test: no wrapper in nix.

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
    launch_with(workspace, cwd, command, input, &[])
}

/// [`launch`], with more arguments for the launcher.
fn launch_with(
    workspace: &Path,
    cwd: Option<&Path>,
    command: &str,
    input: &[u8],
    extra: &[&std::ffi::OsStr],
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
        .args(extra)
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

/// A cgroup2 mount to try the v2 path on: `/sys/fs/cgroup` on a unified
/// system, or the controller-less `/sys/fs/cgroup/unified` of a hybrid one.
fn cgroup2_mount() -> Option<&'static Path> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(Path::new)
        .find(|path| statfs(*path).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC))
}

/// The v2 path against the kernel's cgroup2: the run's cgroup is made under
/// `--cgroup-parent`, holds the run while it lives, and is gone afterwards;
/// the parent hands down no controller here, so no cgroup limit is claimed
/// and, unless relaxed, the run does not start.
#[test]
fn a_v2_run_lives_in_its_own_cgroup_under_the_given_parent() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: making cgroups needs root");
        return;
    }
    let Some(mount) = cgroup2_mount() else {
        eprintln!("skipped: no cgroup2 mount here");
        return;
    };
    let parent = mount.join(format!("nox-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&parent).expect("parent cgroup");
    let handed_down =
        std::fs::read_to_string(parent.join("cgroup.subtree_control")).expect("subtree");
    let workspace = tempfile::tempdir().expect("workspace");
    // While the command sleeps, its cgroup is the one child of the parent.
    let watcher = {
        let parent = parent.clone();
        std::thread::spawn(move || {
            for _ in 0..300 {
                let runs: Vec<_> = std::fs::read_dir(&parent)
                    .expect("parent")
                    .flatten()
                    .filter(|entry| entry.path().is_dir())
                    .collect();
                if let [run] = &runs[..]
                    && let Ok(procs) = std::fs::read_to_string(run.path().join("cgroup.procs"))
                    && !procs.trim().is_empty()
                {
                    return procs.lines().count();
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            0
        })
    };
    let limits_handed_down = handed_down.contains("memory") && handed_down.contains("pids");
    if !limits_handed_down {
        // Strict: a run without its cgroup limits does not start.
        let (output, report) = launch_with(
            workspace.path(),
            None,
            "echo ran",
            b"",
            &["--cgroup-parent".as_ref(), parent.as_os_str()],
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), "", "{report}");
        assert_eq!(
            report["missing"],
            serde_json::json!(["memory_cgroup", "pids_cgroup"]),
            "{report}"
        );
    }
    let (output, report) = launch_with(
        workspace.path(),
        None,
        "sleep 1; echo done",
        b"",
        &[
            "--cgroup-parent".as_ref(),
            parent.as_os_str(),
            "--relaxed".as_ref(),
        ],
    );
    let processes_seen = watcher.join().expect("watcher");
    let leftovers = std::fs::read_dir(&parent)
        .expect("parent")
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    std::fs::remove_dir(&parent).expect("remove the parent: the run's cgroup is gone");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "done\n",
        "{report} {output:?}"
    );
    assert_eq!(report["cgroup"], "v2", "{report}");
    assert!(processes_seen >= 1, "the run was in its cgroup: {report}");
    assert_eq!(leftovers, 0, "the run's cgroup was removed");
    let layers = &report["layers"];
    assert_eq!(
        layers["memory_cgroup"],
        handed_down.contains("memory"),
        "{report}"
    );
    assert_eq!(
        layers["pids_cgroup"],
        handed_down.contains("pids"),
        "{report}"
    );
}

/// A run that takes its filesystem's free space below `--min-free-mb` is
/// stopped, so PostgreSQL and the spool beside it keep room.
#[test]
fn a_run_that_eats_the_free_space_floor_is_stopped() {
    let workspace = tempfile::tempdir().expect("workspace");
    let stat = nix::sys::statvfs::statvfs(workspace.path()).expect("statvfs");
    let free_mb = stat.blocks_available() * stat.fragment_size() / (1024 * 1024);
    if free_mb < 512 {
        eprintln!("skipped: {free_mb} MiB free here, too little to write past a floor");
        return;
    }
    // The floor 64 MiB below what is free now; the run writes 192 MiB.
    let floor = (free_mb - 64).to_string();
    let (output, report) = launch_with(
        workspace.path(),
        None,
        "head -c 201326592 /dev/zero > big && sync big; sleep 20; echo not stopped",
        b"",
        &["--min-free-mb".as_ref(), floor.as_ref()],
    );
    assert_eq!(report["limit_hit"], "disk", "{report} {output:?}");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("not stopped"),
        "{report}"
    );
}

/// `--uid` alone would leave the command root while the report claimed a
/// run user: refused before anything runs.
#[test]
fn a_uid_without_a_gid_is_refused() {
    let workspace = tempfile::tempdir().expect("workspace");
    let reports = tempfile::tempdir().expect("reports");
    let report = reports.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_nox-sandbox-exec"))
        .arg("--workspace")
        .arg(workspace.path())
        .arg("--report")
        .arg(&report)
        .args([
            "--timeout-ms",
            "1000",
            "--cpu-secs",
            "2",
            "--memory-mb",
            "64",
        ])
        .args(["--run-id", "uid-alone", "--uid", "65534"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--gid"),
        "{output:?}"
    );
    assert!(!report.exists(), "nothing ran");
}

/// Keys are not namespaced: a run must not share (possess) the session
/// keyring of whoever started the launcher, nor another run's.
#[test]
fn a_run_does_not_possess_the_launchers_session_keyring() {
    // This test thread gets a session keyring of its own (so nothing else
    // is touched) holding a key; the launcher it starts inherits it.
    const KEYCTL_JOIN_SESSION_KEYRING: nix::libc::c_long = 1;
    const KEY_SPEC_SESSION_KEYRING: nix::libc::c_long = -3;
    let description = format!("nox-test-{}", uuid::Uuid::new_v4().simple());
    let name = std::ffi::CString::new(description.clone()).expect("name");
    let payload = b"server secret";
    // SAFETY: plain system calls with NUL-terminated strings and a buffer
    // alive for the call.
    let key = unsafe {
        if nix::libc::syscall(
            nix::libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<nix::libc::c_char>(),
        ) < 0
        {
            eprintln!("skipped: no keyrings here");
            return;
        }
        nix::libc::syscall(
            nix::libc::SYS_add_key,
            c"user".as_ptr(),
            name.as_ptr(),
            payload.as_ptr(),
            payload.len(),
            KEY_SPEC_SESSION_KEYRING,
        )
    };
    assert!(key >= 0, "add_key failed");
    let keys = std::fs::read_to_string("/proc/keys").expect("/proc/keys");
    assert!(keys.contains(&description), "the test sees its own key");

    let workspace = tempfile::tempdir().expect("workspace");
    let (output, report) = launch(
        workspace.path(),
        None,
        "cat /proc/keys; keyctl show @s 2>&1; true",
        b"",
    );
    assert_eq!(report["exit_code"], 0, "{report} {output:?}");
    let seen = String::from_utf8_lossy(&output.stdout);
    assert!(
        !seen.contains(&description),
        "the run possesses the launcher's key: {seen}"
    );
}

/// An exit status that merely looks like a CPU-limit death (128 + SIGXCPU)
/// is not reported as one.
#[test]
fn exiting_152_is_not_a_cpu_limit() {
    let workspace = tempfile::tempdir().expect("workspace");
    let (output, report) = launch(workspace.path(), None, "exit 152", b"");
    assert_eq!(report["exit_code"], 152, "{report} {output:?}");
    assert_eq!(report["limit_hit"], serde_json::Value::Null, "{report}");
}

/// The seccomp filter: no new namespaces (a user namespace would give the
/// command capabilities over netfilter and the rest), no keyrings, no
/// io_uring; `clone3` says ENOSYS so that libc falls back to `clone`.
/// Ordinary work (processes, pipes, an interpreter) is untouched.
#[test]
#[cfg(target_arch = "x86_64")]
fn the_kernels_rarely_needed_doors_are_shut() {
    let workspace = tempfile::tempdir().expect("workspace");
    // x86_64 numbers: keyctl 250, io_uring_setup 425, clone3 435, and the
    // x32 variant of keyctl (250 | 0x40000000).
    let probe = "import ctypes\n\
                 libc = ctypes.CDLL(None, use_errno=True)\n\
                 for nr in (250, 425, 435, 250 | 0x40000000):\n\
                 \x20   ctypes.set_errno(0)\n\
                 \x20   r = libc.syscall(nr, 0, 0, 0, 0, 0)\n\
                 \x20   print(nr, r, ctypes.get_errno())\n";
    let command = format!(
        "unshare -U true 2>/dev/null; echo \"unshare $?\"; python3 -c '{probe}'; \
         (echo piped | tr a-z A-Z) & wait"
    );
    let (output, report) = launch(workspace.path(), None, &command, b"");
    assert_eq!(report["layers"]["seccomp"], true, "{report}");
    let (eperm, enosys) = (nix::libc::EPERM, nix::libc::ENOSYS);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!(
            "unshare 1\n250 -1 {eperm}\n425 -1 {eperm}\n435 -1 {enosys}\n{} -1 {eperm}\nPIPED\n",
            250 | 0x4000_0000
        ),
        "{report} {output:?}"
    );
}
