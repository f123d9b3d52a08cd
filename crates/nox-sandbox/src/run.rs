//! Running a command through the `nox-sandbox-exec` launcher, which applies
//! the isolation (namespaces, cgroups, rlimits, Landlock, unprivileged user)
//! before `exec`. This side spawns it with an empty environment, sends the
//! command and then the command's input on its stdin (never in its
//! arguments, which every host user can read in `ps`), captures stdout and
//! stderr up to a limit each (draining the rest so the command never
//! blocks), and reads the launcher's report. A run is
//! cancelled (its caller's client went away, or its future was dropped) by
//! SIGTERM to the launcher, which kills the run, removes its cgroups and
//! still reports.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Limits of one run.
#[derive(Debug, Clone)]
pub struct RunLimits {
    pub timeout: Duration,
    pub memory_mb: u64,
    pub output_limit: usize,
    pub max_processes: u64,
    pub allow_network: bool,
    /// Stop the run when the workspace's filesystem has less free than
    /// this, in MiB (0: never).
    pub min_free_mb: u64,
}

/// Who the command runs as when the server is root.
#[derive(Debug, Clone)]
pub struct RunUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone)]
pub struct RunRequest {
    pub workspace: PathBuf,
    pub command: String,
    pub stdin: Option<String>,
    pub limits: RunLimits,
    pub user: Option<RunUser>,
    /// Directories the command must not see (the server's data directory).
    pub hidden: Vec<PathBuf>,
    /// Run even when isolation layers are missing; otherwise such a run
    /// does not start ([`RunError::Unavailable`]).
    pub relaxed: bool,
    /// cgroup v2: the directory the run's cgroup goes under (see
    /// [`crate::cgroup::prepare`]); none: the v1 hierarchies, if any.
    pub cgroup_parent: Option<PathBuf>,
}

/// The isolation layers a run got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Layers {
    pub pid_namespace: bool,
    pub network_namespace: bool,
    /// A root of the run's own: private `/tmp` and `/dev/shm`, its own
    /// `/proc`, system directories read-only, nothing of Nox's data.
    #[serde(default)]
    pub mount_namespace: bool,
    #[serde(default)]
    pub ipc_namespace: bool,
    /// A seccomp filter refuses namespaces, keyrings, BPF, `io_uring`,
    /// mounting and the like.
    #[serde(default)]
    pub seccomp: bool,
    pub memory_cgroup: bool,
    pub pids_cgroup: bool,
    /// Runs as an unprivileged uid (not root).
    pub run_as_user: bool,
    pub landlock: bool,
    pub rlimits: bool,
}

impl Layers {
    /// The layers a strict run needs that these lack (`network_namespace`
    /// only when the network is denied).
    pub fn missing(&self, network_denied: bool) -> Vec<&'static str> {
        [
            ("pid_namespace", self.pid_namespace),
            (
                "network_namespace",
                self.network_namespace || !network_denied,
            ),
            ("mount_namespace", self.mount_namespace),
            ("ipc_namespace", self.ipc_namespace),
            ("seccomp", self.seccomp),
            ("memory_cgroup", self.memory_cgroup),
            ("pids_cgroup", self.pids_cgroup),
            ("run_as_user", self.run_as_user),
            ("landlock", self.landlock),
        ]
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| name)
        .collect()
    }
}

/// The launcher's report; one that did not run the command holds only
/// `error` (and `missing`), hence the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Report {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    cancelled: bool,
    execution_time_ms: f64,
    cpu_time_ms: f64,
    memory_peak_kb: u64,
    limit_hit: Option<String>,
    #[serde(default)]
    cgroup: Option<String>,
    layers: Layers,
    error: Option<String>,
    /// Set when the run did not start for want of these layers.
    missing: Vec<String>,
}

/// One stream's captured output.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// Up to the output limit, invalid UTF-8 replaced.
    pub text: String,
    /// Every byte the command wrote to the stream.
    pub total_bytes: u64,
    pub truncated: bool,
}

#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub stdout: Captured,
    pub stderr: Captured,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Ended early because the caller cancelled it.
    pub cancelled: bool,
    pub execution_time_ms: f64,
    pub cpu_time_ms: f64,
    pub memory_peak_kb: u64,
    pub limit_hit: Option<String>,
    /// The cgroup hierarchy the run's limits were in: `v1`, `v2`, or none.
    pub cgroup: Option<String>,
    pub layers: Layers,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The run did not start: these isolation layers are not in force.
    #[error("the sandbox lacks isolation layers: {}", .0.join(", "))]
    Unavailable(Vec<String>),
    #[error("the sandbox launcher could not be started: {0}")]
    Launch(std::io::Error),
    #[error("the sandbox launcher failed: {0}")]
    Launcher(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs `request` with the launcher at `launcher`; `report_dir` holds the
/// launcher's report file for the run (outside any workspace). When
/// `cancel` resolves first, the run is ended and reported as cancelled.
pub async fn run(
    launcher: &Path,
    report_dir: &Path,
    request: &RunRequest,
    cancel: impl Future<Output = ()>,
) -> Result<RunOutcome, RunError> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let report = report_dir.join(format!("{run_id}.json"));
    let limits = &request.limits;
    let timeout_secs = limits.timeout.as_secs().max(1);
    let mut command = Command::new(launcher);
    command
        // Nothing of the server's environment reaches the command.
        .env_clear()
        .arg("--workspace")
        .arg(&request.workspace)
        .arg("--report")
        .arg(&report)
        .arg("--timeout-ms")
        .arg(limits.timeout.as_millis().to_string())
        .arg("--cpu-secs")
        .arg((timeout_secs + 1).to_string())
        .arg("--memory-mb")
        .arg(limits.memory_mb.to_string())
        .arg("--max-processes")
        .arg(limits.max_processes.to_string())
        .arg("--min-free-mb")
        .arg(limits.min_free_mb.to_string())
        .arg("--run-id")
        .arg(&run_id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if limits.allow_network {
        command.arg("--allow-network");
    }
    if request.relaxed {
        command.arg("--relaxed");
    }
    for hidden in &request.hidden {
        command.arg("--hide").arg(hidden);
    }
    if let Some(parent) = &request.cgroup_parent {
        command.arg("--cgroup-parent").arg(parent);
    }
    if let Some(user) = &request.user {
        command
            .arg("--uid")
            .arg(user.uid.to_string())
            .arg("--gid")
            .arg(user.gid.to_string())
            .arg("--user-name")
            .arg(&user.name);
    }
    let mut child = command.spawn().map_err(RunError::Launch)?;
    // Dropped before the launcher exits, the run is cancelled (the launcher
    // then cleans up on its own; Tokio reaps it). The pid is forgotten the
    // moment the launcher is reaped, after which it may name another process.
    let launcher = AtomicI32::new(child.id().map_or(0, |pid| pid as i32));
    let _terminate = TerminateOnDrop(&launcher);

    let stdin = child.stdin.take();
    // The launcher reads the command from the head of its stdin: the
    // length in bytes, a newline, the command. The rest is the command's.
    let mut input = format!("{}\n", request.command.len()).into_bytes();
    input.extend_from_slice(request.command.as_bytes());
    input.extend_from_slice(request.stdin.as_deref().unwrap_or_default().as_bytes());
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its input closes the pipe: fine.
            let _ = stdin.write_all(&input).await;
        }
    };
    let stdout = capture(child.stdout.take(), limits.output_limit);
    let stderr = capture(child.stderr.take(), limits.output_limit);
    // The launcher enforces the timeout; this is a safety net on top.
    let cancel = async {
        cancel.await;
        terminate(&launcher);
        std::future::pending::<()>().await
    };
    let waited = tokio::time::timeout(limits.timeout + Duration::from_secs(10), async {
        let wait = async {
            let status = child.wait().await;
            launcher.store(0, Ordering::SeqCst);
            status
        };
        let finished = async { tokio::join!(feed, stdout, stderr, wait) };
        tokio::select! {
            biased;
            ((), stdout, stderr, status) = finished => (stdout, stderr, status),
            () = cancel => unreachable!("pending forever once it has signalled"),
        }
    })
    .await;
    let (stdout, stderr, status) = match waited {
        Ok(result) => result,
        Err(_) => {
            let _ = child.kill().await;
            launcher.store(0, Ordering::SeqCst);
            return Err(RunError::Launcher(
                "the launcher did not finish in time".into(),
            ));
        }
    };
    let status = status?;
    let text = tokio::fs::read_to_string(&report).await;
    let _ = tokio::fs::remove_file(&report).await;
    let report: Report = match text {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| RunError::Launcher(format!("unreadable report: {e}")))?,
        Err(error) => {
            return Err(RunError::Launcher(format!("no report ({status}): {error}")));
        }
    };
    if !report.missing.is_empty() {
        return Err(RunError::Unavailable(report.missing));
    }
    if let Some(error) = report.error {
        return Err(RunError::Launcher(error));
    }
    Ok(RunOutcome {
        stdout: stdout?,
        stderr: stderr?,
        exit_code: report.exit_code,
        signal: report.signal,
        timed_out: report.timed_out,
        cancelled: report.cancelled,
        execution_time_ms: report.execution_time_ms,
        cpu_time_ms: report.cpu_time_ms,
        memory_peak_kb: report.memory_peak_kb,
        limit_hit: report.limit_hit,
        cgroup: report.cgroup,
        layers: report.layers,
    })
}

/// Sends SIGTERM to the launcher whose pid `launcher` holds (0 once it
/// has been reaped: then nothing).
fn terminate(launcher: &AtomicI32) {
    let pid = launcher.load(Ordering::SeqCst);
    if pid > 0 {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

/// [`terminate`] when dropped.
struct TerminateOnDrop<'a>(&'a AtomicI32);

impl Drop for TerminateOnDrop<'_> {
    fn drop(&mut self) {
        terminate(self.0);
    }
}

/// Reads a stream to its end, keeping the first `limit` bytes.
async fn capture(
    stream: Option<impl AsyncRead + Unpin>,
    limit: usize,
) -> std::io::Result<Captured> {
    let Some(mut stream) = stream else {
        return Ok(Captured::default());
    };
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        total += read as u64;
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..read.min(room)]);
    }
    Ok(Captured {
        truncated: total > kept.len() as u64,
        text: String::from_utf8_lossy(&kept).into_owned(),
        total_bytes: total,
    })
}
