//! `nox-sandbox-exec`: runs one `bash -c` command for `POST /run`, contained.
//!
//! The server spawns this small, single-threaded program instead of doing
//! the work between `fork` and `exec` itself (unsafe in a multi-threaded
//! process). It:
//! 1. creates the run's memory and pids cgroups (v1, or v2 under
//!    `--cgroup-parent`: see [`cgroups`]) when it can;
//! 2. enters new PID and network namespaces (network: unless allowed);
//! 3. forks the namespace's init, which enters mount and IPC namespaces with
//!    a root of its own (see [`root`]), sets rlimits, drops to the run user,
//!    applies Landlock (read-only system directories, read-write workspace
//!    and private `/tmp`), forks `bash -c`, reaps everything, and kills every
//!    process left when bash exits;
//! 4. enforces the wall-clock timeout by killing init, which takes the whole
//!    namespace with it; SIGTERM (the server's client went away) ends the
//!    run the same way, and the launcher still cleans up and reports;
//! 5. writes a JSON report (status, CPU, peak memory, the limit the run hit,
//!    the layers applied) to the file named by `--report`.
//!
//! The command is never an argument (arguments are world-readable in
//! `/proc/<pid>/cmdline`): standard input starts with its length in bytes,
//! in decimal, and a newline, then the command itself; the rest of standard
//! input is the command's. Bash gets it the same way, from a memfd on
//! descriptor 3 that it reads, closes and `eval`s (see [`SHELL`]); every
//! other descriptor but 0, 1 and 2 is closed before `exec`.
//!
//! Output goes straight to the inherited stdout and stderr.
//!
//! It fails closed: unless `--relaxed`, a run that would lack any layer
//! (the namespaces, a run user other than root, Landlock, the memory and
//! process cgroups) does not start, and the report names what is missing.

#![allow(unsafe_code)] // fork(2), in a single-threaded process.

mod cgroups;
mod confinement;
mod disk;
mod root;
mod syscalls;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cgroups::Cgroups;
use clap::Parser;
use nix::errno::Errno;
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, UsageWho, getrusage, setrlimit};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, pipe, setgid, setgroups, setuid};

#[derive(Debug, Parser)]
#[command(
    name = "nox-sandbox-exec",
    about = "Runs one command for Nox, contained and measured."
)]
struct Args {
    /// The workspace: the working directory, and the only writable place.
    #[arg(long)]
    workspace: PathBuf,
    /// Where to write the JSON report.
    #[arg(long)]
    report: PathBuf,
    #[arg(long)]
    timeout_ms: u64,
    #[arg(long)]
    cpu_secs: u64,
    #[arg(long)]
    memory_mb: u64,
    #[arg(long, default_value_t = 256)]
    max_processes: u64,
    #[arg(long, default_value_t = 1024)]
    max_file_mb: u64,
    #[arg(long, default_value_t = 256)]
    max_open_files: u64,
    /// Run as this user (when started as root); with `--gid`.
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    #[arg(long)]
    user_name: Option<String>,
    /// Give the command the host's network.
    #[arg(long)]
    allow_network: bool,
    /// A unique name for this run's cgroups.
    #[arg(long)]
    run_id: String,
    /// A directory the command must not see (Nox's data directory);
    /// repeatable.
    #[arg(long)]
    hide: Vec<PathBuf>,
    /// Stop the run when the workspace's filesystem has less free than
    /// this, in MiB (`NOX_MIN_FREE_MB`; 0: never).
    #[arg(long, default_value_t = 0)]
    min_free_mb: u64,
    /// Run even when isolation layers are missing (`NOX_RUN_ISOLATION=relaxed`).
    #[arg(long)]
    relaxed: bool,
    /// cgroup v2: the delegated directory the run's cgroup goes in (the
    /// server prepares it); without it, the v1 hierarchies.
    #[arg(long)]
    cgroup_parent: Option<PathBuf>,
}

/// The longest command accepted on standard input (`POST /run` allows
/// 10,000 characters, at most 40,000 bytes).
const MAX_COMMAND_BYTES: usize = 1024 * 1024;

/// What bash runs: the command, read from descriptor 3 up to the NUL that
/// ends it, then descriptor 3 closed and the command `eval`ed, so it is
/// parsed and run as `bash -c` would. Differences: the command can see its
/// own text in the (unexported) variable `__nox_command`, a syntax error is
/// reported by `eval` rather than `-c`, and bash stays the parent of its
/// last command instead of `exec`ing it (a command killed by signal N makes
/// bash exit with 128 + N). No process's argument list holds the command.
const SHELL: &str =
    "IFS= read -r -d '' -u 3 __nox_command || exit 126; exec 3<&-; eval \"$__nox_command\"";

fn main() {
    // SIGTERM cancels a run (see `run`): blocked from the start, so one that
    // arrives early waits for the wait loop instead of killing the launcher
    // before it can clean up and report.
    if let Err(error) = sigterm().thread_block() {
        eprintln!("nox-sandbox-exec: cannot block SIGTERM: {error}");
        std::process::exit(70);
    }
    let mut args = Args::parse();
    let report = match read_command().and_then(|command| {
        // Absolute, so the command's `HOME` and `TMPDIR` are too.
        args.workspace = fs::canonicalize(&args.workspace)
            .map_err(|e| format!("the workspace {}: {e}", args.workspace.display()))?;
        run(&args, &command)
    }) {
        Ok(report) => report,
        Err(error) => serde_json::json!({ "error": error }),
    };
    if let Err(error) = fs::write(&args.report, report.to_string()) {
        eprintln!("nox-sandbox-exec: cannot write the report: {error}");
        std::process::exit(70);
    }
}

fn sigterm() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set
}

fn run(args: &Args, command: &str) -> Result<serde_json::Value, String> {
    let is_root = Uid::effective().is_root();
    let memory_bytes = args.memory_mb * 1024 * 1024;
    let mut cgroups = if is_root {
        Cgroups::create(
            args.cgroup_parent.as_deref(),
            &args.run_id,
            memory_bytes,
            args.max_processes,
        )
    } else {
        Cgroups::Absent
    };

    let mut namespaces = CloneFlags::CLONE_NEWPID;
    if !args.allow_network {
        namespaces |= CloneFlags::CLONE_NEWNET;
    }
    let namespaced = unshare(namespaces).is_ok();
    let run_as_user = is_root && args.uid.is_some_and(|uid| uid != 0);
    let landlock = confinement::available();

    // Fail closed: what is missing already is named before anything runs
    // (the mount and IPC namespaces are entered by init, which refuses on
    // its own when they fail).
    let missing: Vec<&str> = [
        ("pid_namespace", namespaced),
        ("network_namespace", namespaced || args.allow_network),
        ("memory_cgroup", cgroups.limits_memory()),
        ("pids_cgroup", cgroups.limits_processes()),
        ("run_as_user", run_as_user),
        ("landlock", landlock),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() && !args.relaxed {
        cgroups.remove();
        return Ok(unavailable(&missing));
    }

    // SIGTERM cancels the run: blocked since `main`, taken from a
    // descriptor in the wait loop below rather than by a handler, so the
    // launcher still reports and removes the cgroups. Unblocked in init.
    let terminate = sigterm();
    let cancel = SignalFd::with_flags(&terminate, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("signalfd: {e}"))?;

    // The command, for bash to read from descriptor 3 (see SHELL).
    let script = command_file(command)?;
    // Status of bash, from init to us; and a go signal once init is in its cgroups.
    let (status_read, status_write) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let (go_read, go_write) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let started = Instant::now();
    // SAFETY: this process is single-threaded; the child only calls
    // async-signal-safe functions until it execs or exits.
    let init = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(status_read);
            drop(go_write);
            let _ = terminate.thread_unblock();
            let code = init_process(args, &cgroups, namespaced, go_read, status_write, script);
            std::process::exit(code);
        }
        ForkResult::Parent { child } => child,
    };
    drop(script);
    drop(status_write);
    drop(go_read);
    if !cgroups.add(init) {
        // Init checked its limits before the fork: it would run believing
        // a cgroup holds it. Stop rather than run it unlimited.
        let _ = kill(init, Signal::SIGKILL);
        let _ = waitpid(init, None);
        cgroups.remove();
        return Err("cannot move the run into its cgroup".into());
    }
    let mut go = fs::File::from(go_write);
    let _ = go.write_all(b"g");
    drop(go);

    // Wait for init, killing it (and so its whole namespace) at the deadline.
    let deadline = started + Duration::from_millis(args.timeout_ms);
    let mut timed_out = false;
    let mut cancelled = false;
    let mut out_of_disk = false;
    let mut free_space = disk::FreeSpaceWatch::new(&args.workspace, args.min_free_mb);
    let end_run = || {
        let _ = kill(init, Signal::SIGKILL);
        if !namespaced {
            // Init leads the run's session: its group is the run.
            let _ = nix::sys::signal::killpg(init, Signal::SIGKILL);
        }
    };
    while let Ok(WaitStatus::StillAlive) = waitpid(init, Some(WaitPidFlag::WNOHANG)) {
        if Instant::now() >= deadline && !timed_out && !cancelled {
            timed_out = true;
            end_run();
        }
        if !cancelled && !timed_out && matches!(cancel.read_signal(), Ok(Some(_))) {
            cancelled = true;
            end_run();
        }
        if !cancelled && !timed_out && !out_of_disk && free_space.below_floor() {
            out_of_disk = true;
            end_run();
        }
        cgroups.sample_memory();
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;

    let mut status_bytes = Vec::new();
    let _ = fs::File::from(status_read).read_to_end(&mut status_bytes);
    let status = InitStatus::decode(&status_bytes);
    if let Some(reason) = &status.refused {
        cgroups.remove();
        return match reason.as_str() {
            "" => Ok(unavailable(&["mount_namespace", "ipc_namespace"])),
            reason => Err(format!("the run could not be contained: {reason}")),
        };
    }
    let (exit_code, signal) = (status.exit_code, status.signal);

    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).map_err(|e| format!("getrusage: {e}"))?;
    let cpu_us = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    let cpu_time_ms = (cpu_us(usage.user_time()) + cpu_us(usage.system_time())) as f64 / 1000.0;
    let memory_peak_kb = cgroups.memory_peak_kb().unwrap_or(usage.max_rss() as u64);

    // Time first: the deadline kills everything, whatever else happened.
    let limit_hit = if timed_out {
        Some("time")
    } else if out_of_disk {
        Some("disk")
    } else if cgroups.memory_limited(died_of(Signal::SIGKILL, exit_code, signal)) {
        Some("memory")
    } else if (died_of(Signal::SIGXCPU, exit_code, signal)
        || died_of(Signal::SIGKILL, exit_code, signal))
        && cpu_time_ms >= (args.cpu_secs * 1000) as f64 * 0.99
    {
        // The CPU limit signals a process that used it up (`exit 152`
        // alone, 128 + SIGXCPU, is not that).
        Some("cpu")
    } else if cgroups.processes_limited() {
        Some("processes")
    } else {
        None
    };
    cgroups.remove();

    Ok(serde_json::json!({
        "exit_code": exit_code,
        "signal": signal,
        "timed_out": timed_out,
        "cancelled": cancelled,
        "execution_time_ms": (wall_ms * 1000.0).round() / 1000.0,
        "cpu_time_ms": cpu_time_ms,
        "memory_peak_kb": memory_peak_kb,
        "limit_hit": limit_hit,
        "cgroup": cgroups.version(),
        "layers": {
            "pid_namespace": namespaced,
            "network_namespace": namespaced && !args.allow_network,
            "mount_namespace": status.own_root,
            "ipc_namespace": status.own_root,
            "seccomp": status.filtered,
            "memory_cgroup": cgroups.limits_memory(),
            "pids_cgroup": cgroups.limits_processes(),
            "run_as_user": run_as_user,
            "landlock": landlock,
            "rlimits": true,
        },
    }))
}

/// Whether bash, or the command it ran last, died of `wanted`: bash exits
/// with 128 + N when its last command was killed by signal N.
fn died_of(wanted: Signal, exit_code: Option<i32>, signal: Option<i32>) -> bool {
    signal == Some(wanted as i32) || exit_code == Some(128 + wanted as i32)
}

/// Reads the command from the head of standard input: its length in bytes,
/// in decimal, a newline, then the command. Unbuffered reads of exactly that
/// much, so the rest of standard input is left for the command.
fn read_command() -> Result<String, String> {
    let stdin = std::io::stdin();
    let fd = stdin.as_fd();
    let read_some = |buffer: &mut [u8]| -> Result<usize, String> {
        loop {
            match nix::unistd::read(fd, buffer) {
                Ok(0) => return Err("standard input ended before the command".into()),
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(format!("reading the command: {e}")),
            }
        }
    };
    let mut length = 0usize;
    let mut digits = 0;
    loop {
        let mut byte = [0u8; 1];
        read_some(&mut byte)?;
        match byte[0] {
            b'\n' if digits > 0 => break,
            digit @ b'0'..=b'9' if digits < 8 => {
                length = length * 10 + usize::from(digit - b'0');
                digits += 1;
            }
            _ => return Err("standard input does not start with the command's length".into()),
        }
    }
    if length > MAX_COMMAND_BYTES {
        return Err(format!(
            "the command is longer than {MAX_COMMAND_BYTES} bytes"
        ));
    }
    let mut command = vec![0u8; length];
    let mut filled = 0;
    while filled < length {
        filled += read_some(&mut command[filled..])?;
    }
    let command = String::from_utf8(command).map_err(|_| "the command is not UTF-8")?;
    if command.contains('\0') {
        return Err("the command contains a NUL byte".into());
    }
    Ok(command)
}

/// A memfd holding the command and the NUL that ends it, positioned at its
/// start. A memfd rather than a pipe: bash reads a seekable descriptor in
/// blocks, a pipe one byte per system call.
fn command_file(command: &str) -> Result<OwnedFd, String> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(c"nox-command", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    let mut file = fs::File::from(fd);
    file.write_all(command.as_bytes())
        .and_then(|()| file.write_all(b"\0"))
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
        .map_err(|e| format!("writing the command: {e}"))?;
    Ok(OwnedFd::from(file))
}

/// What init reports on the status pipe: first whether the run got its own
/// root (`R`), ran without (`N`, relaxed only) or was refused (`X` and the
/// reason, empty when the namespaces are not available); `F` when the
/// seccomp filter is in force; then bash's exit, `e<code>` or `s<signal>`.
#[derive(Debug, Default, PartialEq)]
struct InitStatus {
    own_root: bool,
    /// The seccomp filter is in force.
    filtered: bool,
    refused: Option<String>,
    exit_code: Option<i32>,
    signal: Option<i32>,
}

impl InitStatus {
    fn decode(bytes: &[u8]) -> InitStatus {
        let text = String::from_utf8_lossy(bytes);
        let mut status = InitStatus::default();
        let rest = match text.chars().next() {
            Some('X') => {
                status.refused = Some(text[1..].to_owned());
                return status;
            }
            Some('R') => {
                status.own_root = true;
                &text[1..]
            }
            Some('N') => &text[1..],
            _ => return status,
        };
        let rest = match rest.strip_prefix('F') {
            Some(rest) => {
                status.filtered = true;
                rest
            }
            None => rest,
        };
        let value = rest.get(1..).and_then(|n| n.parse::<i32>().ok());
        match rest.chars().next() {
            Some('e') => status.exit_code = value,
            Some('s') => status.signal = value,
            _ => {}
        }
        status
    }
}

/// The report of a run that did not start because isolation layers are
/// missing: the server answers 503 `sandbox_unavailable` naming them.
fn unavailable(missing: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "error": format!("the sandbox lacks isolation layers: {}", missing.join(", ")),
        "missing": missing,
    })
}

/// PID 1 of the run's namespace. Returns its exit code.
fn init_process(
    args: &Args,
    cgroups: &Cgroups,
    namespaced: bool,
    go: OwnedFd,
    status: OwnedFd,
    script: OwnedFd,
) -> i32 {
    // Die with the launcher, and with it every process of the run.
    let _ = nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL));
    // Wait until the parent has put us into the run's cgroups.
    let mut byte = [0u8; 1];
    let _ = fs::File::from(go).read(&mut byte);
    // Without a PID namespace, a process group is all we can kill at once;
    // kill(-1) outside a namespace would reach every process of the user.
    let group = if namespaced {
        Pid::from_raw(-1)
    } else {
        match nix::unistd::setsid() {
            Ok(session) => Pid::from_raw(-session.as_raw()),
            Err(_) => return 73,
        }
    };

    let mut status = fs::File::from(status);
    let plan = root::RootPlan {
        workspace: &args.workspace,
        hidden: &args.hide,
        tmpfs_bytes: args.memory_mb * 1024 * 1024,
    };
    let own_root = match root::enter(&plan) {
        Ok(()) => true,
        Err(None) if args.relaxed => false,
        Err(reason) => {
            let _ = write!(status, "X{}", reason.unwrap_or_default());
            return 74;
        }
    };
    // A layer that cannot be applied means no run, reported as such (not
    // as a command that printed an error).
    let filtered = match contain(args, cgroups, own_root) {
        Ok(filtered) => filtered,
        Err(error) => {
            let _ = write!(status, "X{error}");
            return 71;
        }
    };
    let Some(bash) = BashExec::prepare(args, own_root) else {
        let _ = write!(status, "Xan argument or variable contains a NUL byte");
        return 71;
    };
    let _ = status.write_all(if own_root { b"R" } else { b"N" });
    if filtered {
        let _ = status.write_all(b"F");
    }
    // SAFETY: still single-threaded.
    let bash = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let error = bash.exec(&script);
            eprintln!("nox-sandbox-exec: cannot run bash: {error}");
            std::process::exit(127);
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(error) => {
            eprintln!("nox-sandbox-exec: fork: {error}");
            return 71;
        }
    };
    drop(script);
    // Reap everything; once bash is gone, nothing else may live on.
    let mut reported = false;
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == bash => {
                let _ = status.write_all(format!("e{code}").as_bytes());
                reported = true;
                kill_all(group);
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == bash => {
                let _ = status.write_all(format!("s{}", signal as i32).as_bytes());
                reported = true;
                kill_all(group);
            }
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => break,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    if reported { 0 } else { 72 }
}

/// Kills every process of the run but init: `-1` inside the namespace, or
/// the run's process group without one.
fn kill_all(group: Pid) {
    if group.as_raw() == -1 {
        let _ = kill(group, Signal::SIGKILL);
    } else {
        // A negative pid names a process group; init leads it, so spare it.
        let _ = nix::sys::signal::killpg(Pid::from_raw(-group.as_raw()), Signal::SIGTERM);
        let _ = kill(group, Signal::SIGKILL);
    }
}

/// `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`: a new, empty, anonymous
/// session keyring for this process and what it starts.
fn join_own_session_keyring() -> bool {
    const KEYCTL_JOIN_SESSION_KEYRING: nix::libc::c_long = 1;
    // SAFETY: a plain system call; a NULL name asks for an anonymous keyring.
    let keyring = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<nix::libc::c_char>(),
        )
    };
    keyring >= 0
}

/// Limits, user and Landlock, applied to init and inherited by the command.
/// Returns whether the seccomp filter is in force (relaxed runs go on
/// without one).
fn contain(args: &Args, cgroups: &Cgroups, own_root: bool) -> Result<bool, String> {
    let cpu = args.cpu_secs;
    let limits: &[(Resource, u64, u64)] = &[
        (Resource::RLIMIT_CPU, cpu, cpu + 1),
        (
            Resource::RLIMIT_FSIZE,
            args.max_file_mb * 1024 * 1024,
            args.max_file_mb * 1024 * 1024,
        ),
        (
            Resource::RLIMIT_NOFILE,
            args.max_open_files,
            args.max_open_files,
        ),
        (Resource::RLIMIT_CORE, 0, 0),
    ];
    for (resource, soft, hard) in limits {
        setrlimit(*resource, *soft, *hard).map_err(|e| format!("setrlimit {resource:?}: {e}"))?;
    }
    if !cgroups.limits_memory() {
        // No memory cgroup (relaxed): bound each process's address space.
        let bytes = args.memory_mb * 1024 * 1024;
        setrlimit(Resource::RLIMIT_AS, bytes, bytes).map_err(|e| format!("setrlimit AS: {e}"))?;
    }
    if !cgroups.limits_processes() {
        // Per user, not per run: with a uid per tenant, per tenant.
        setrlimit(
            Resource::RLIMIT_NPROC,
            args.max_processes,
            args.max_processes,
        )
        .map_err(|e| format!("setrlimit NPROC: {e}"))?;
    }
    if let (Some(uid), Some(gid)) = (args.uid, args.gid)
        && Uid::effective().is_root()
    {
        setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
        setgid(Gid::from_raw(gid)).map_err(|e| format!("setgid: {e}"))?;
        setuid(Uid::from_raw(uid)).map_err(|e| format!("setuid: {e}"))?;
        // Changing credentials cleared the parent-death signal: set it again.
        let _ = nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL));
    }
    // Keys are not namespaced: without a session keyring of its own the run
    // would share (and possess) the server's, and every other run's.
    if !join_own_session_keyring() && !args.relaxed {
        return Err("cannot make the run a session keyring of its own".into());
    }
    let enforced = confinement::restrict(&args.workspace, own_root)?;
    if !enforced && !args.relaxed {
        return Err("Landlock is not enforced".into());
    }
    std::env::set_current_dir(&args.workspace).map_err(|e| format!("chdir: {e}"))?;
    // Last: init needs none of what it refuses.
    match syscalls::restrict() {
        Ok(()) => Ok(true),
        Err(_) if args.relaxed => Ok(false),
        Err(error) => Err(error),
    }
}

/// Bash's `execve` arguments, made before the fork so that the child only
/// moves descriptors and execs.
struct BashExec {
    path: CString,
    // The strings the pointers below point into (their heap buffers do not
    // move with the vectors).
    _strings: Vec<CString>,
    argv: Vec<*const nix::libc::c_char>,
    envp: Vec<*const nix::libc::c_char>,
}

impl BashExec {
    fn prepare(args: &Args, own_root: bool) -> Option<BashExec> {
        // Absolute: `main` canonicalized it.
        let workspace = args.workspace.display().to_string();
        let user = args.user_name.clone().unwrap_or_else(|| "nox".into());
        let argv = ["bash".to_owned(), "-c".into(), SHELL.into()];
        // The run's own `/tmp`; without one (relaxed), a directory in the
        // workspace rather than the host's shared `/tmp`.
        let tmp = if own_root {
            "/tmp".to_owned()
        } else {
            let _ = fs::create_dir_all(args.workspace.join(".tmp"));
            format!("{workspace}/.tmp")
        };
        let env = [
            "PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
            format!("HOME={workspace}"),
            format!("TMPDIR={tmp}"),
            "LANG=C.UTF-8".to_owned(),
            format!("USER={user}"),
        ];
        let strings = argv
            .iter()
            .chain(&env)
            .map(|s| CString::new(s.as_bytes()).ok())
            .collect::<Option<Vec<CString>>>()?;
        let pointers = |range: std::ops::Range<usize>| {
            strings[range]
                .iter()
                .map(|s| s.as_ptr())
                .chain([std::ptr::null()])
                .collect()
        };
        Some(BashExec {
            path: CString::new("/bin/bash").ok()?,
            argv: pointers(0..argv.len()),
            envp: pointers(argv.len()..strings.len()),
            _strings: strings,
        })
    }

    /// In the forked child: the command's memfd becomes descriptor 3, every
    /// descriptor above it is closed (the status pipe, anything inherited),
    /// then bash. Only async-signal-safe system calls, no allocation.
    /// Returns only on failure.
    fn exec(&self, script: &OwnedFd) -> Errno {
        const SCRIPT_FD: i32 = 3;
        let raw = script.as_raw_fd();
        // SAFETY: plain system calls on descriptors this process holds, and
        // execve(2) with NULL-terminated arrays of pointers into `_strings`,
        // alive for as long as `self`.
        unsafe {
            let moved = if raw == SCRIPT_FD {
                // Already in place: only clear its close-on-exec flag.
                nix::libc::fcntl(raw, nix::libc::F_SETFD, 0)
            } else {
                // Replaces descriptor 3, whatever it was; the copy is not
                // close-on-exec.
                nix::libc::dup2(raw, SCRIPT_FD)
            };
            if moved < 0 {
                return Errno::last();
            }
            close_from(SCRIPT_FD + 1);
            nix::libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
        }
        Errno::last()
    }
}

/// Closes every descriptor from `first` up: `close_range(2)`, or one by one
/// on kernels before 5.9.
///
/// # Safety
/// Nothing may use those descriptors afterwards: call it just before exec.
unsafe fn close_from(first: i32) {
    // SAFETY: plain system calls; the caller gives the descriptors up.
    unsafe {
        let closed = nix::libc::syscall(
            nix::libc::SYS_close_range,
            first as nix::libc::c_uint,
            nix::libc::c_uint::MAX,
            0 as nix::libc::c_uint,
        );
        if closed != 0 {
            for fd in first..65_536 {
                nix::libc::close(fd);
            }
        }
    }
}
