//! The run's cgroups: a memory and a process-count limit on the whole run,
//! its peak memory, whether either limit was hit, and its teardown.
//!
//! Two layouts, chosen by the server and passed down:
//! - cgroup v1 (no `--cgroup-parent`): one cgroup per controller,
//!   `/sys/fs/cgroup/{memory,pids}/nox/<run id>`, made only where that
//!   controller's v1 hierarchy is mounted;
//! - cgroup v2 (`--cgroup-parent DIR`, a delegated directory the server
//!   prepared): one cgroup `DIR/<run id>` with `memory.max`,
//!   `memory.swap.max` and `pids.max`. A controller the parent does not hand
//!   down is a limit not enforced: its layer is reported absent.
//!
//! Every file read here may hold anything (a stand-in directory in tests, a
//! kernel with another format): unreadable or unparsable values count as
//! absent, never as a panic.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP_SUPER_MAGIC, statfs};
use nix::unistd::Pid;

/// Where the v1 hierarchies are mounted.
pub const CGROUP_V1_ROOT: &str = "/sys/fs/cgroup";

/// How long teardown waits for the kernel to let a cgroup go (its killed
/// processes must exit first).
const REMOVE_ATTEMPTS: u32 = 50;
const REMOVE_PAUSE: Duration = Duration::from_millis(10);

/// The run's cgroups, whichever hierarchy they are in.
#[derive(Debug)]
pub enum Cgroups {
    /// None could be made (not root, nothing mounted, a bad run id).
    Absent,
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
    V2(V2Cgroup),
}

/// One cgroup v2 directory holding the whole run.
#[derive(Debug)]
pub struct V2Cgroup {
    dir: PathBuf,
    /// `memory.max` (and `memory.swap.max`, where swap is accounted) set.
    memory: bool,
    /// `pids.max` set.
    pids: bool,
    /// The kernel keeps the peak (`memory.peak`, Linux ≥ 5.19); else the
    /// launcher samples `memory.current` while it waits.
    kernel_peak: bool,
    sampled_peak_bytes: u64,
}

impl Cgroups {
    /// Makes the run's cgroups: v2 under `v2_parent` when given, else v1.
    pub fn create(
        v2_parent: Option<&Path>,
        run_id: &str,
        memory_bytes: u64,
        max_processes: u64,
    ) -> Cgroups {
        if !is_safe_name(run_id) {
            return Cgroups::Absent;
        }
        match v2_parent {
            Some(parent) => {
                let dir = parent.join(run_id);
                match fs::create_dir(&dir) {
                    Ok(()) => Cgroups::V2(V2Cgroup::configure(dir, memory_bytes, max_processes)),
                    Err(_) => Cgroups::Absent,
                }
            }
            None => Cgroups::create_v1(
                Path::new(CGROUP_V1_ROOT),
                run_id,
                memory_bytes,
                max_processes,
            ),
        }
    }

    fn create_v1(root: &Path, run_id: &str, memory_bytes: u64, max_processes: u64) -> Cgroups {
        let make = |controller: &str, settings: &[(&str, String)]| -> Option<PathBuf> {
            // Only in a mounted v1 hierarchy: on a v2 system `mkdir` here
            // would make a stray cgroup named after the controller.
            let mount = root.join(controller);
            if !statfs(&mount).is_ok_and(|fs| fs.filesystem_type() == CGROUP_SUPER_MAGIC) {
                return None;
            }
            let dir = mount.join("nox").join(run_id);
            fs::create_dir_all(&dir).ok()?;
            for (file, value) in settings {
                if !write_existing(&dir.join(file), value) {
                    let _ = fs::remove_dir(&dir);
                    return None;
                }
            }
            Some(dir)
        };
        let memory = make(
            "memory",
            &[
                ("memory.limit_in_bytes", memory_bytes.to_string()),
                // No swap either, where the kernel accounts it.
                ("memory.swappiness", "0".into()),
            ],
        );
        let pids = make("pids", &[("pids.max", max_processes.to_string())]);
        if memory.is_none() && pids.is_none() {
            Cgroups::Absent
        } else {
            Cgroups::V1 { memory, pids }
        }
    }

    /// `"v1"`, `"v2"`, or none, for the report.
    pub fn version(&self) -> Option<&'static str> {
        match self {
            Cgroups::Absent => None,
            Cgroups::V1 { .. } => Some("v1"),
            Cgroups::V2(_) => Some("v2"),
        }
    }

    /// Whether a cgroup enforces the run's memory limit.
    pub fn limits_memory(&self) -> bool {
        match self {
            Cgroups::Absent => false,
            Cgroups::V1 { memory, .. } => memory.is_some(),
            Cgroups::V2(cgroup) => cgroup.memory,
        }
    }

    /// Whether a cgroup enforces the run's process limit.
    pub fn limits_processes(&self) -> bool {
        match self {
            Cgroups::Absent => false,
            Cgroups::V1 { pids, .. } => pids.is_some(),
            Cgroups::V2(cgroup) => cgroup.pids,
        }
    }

    /// Moves `pid` (the run's init, before it does anything) into every
    /// cgroup made; false if one refused it.
    pub fn add(&self, pid: Pid) -> bool {
        let join = |dir: &Path| write_existing(&dir.join("cgroup.procs"), &pid.to_string());
        match self {
            Cgroups::Absent => true,
            Cgroups::V1 { memory, pids } => {
                [memory, pids].into_iter().flatten().all(|dir| join(dir))
            }
            Cgroups::V2(cgroup) => join(&cgroup.dir),
        }
    }

    /// Called while the run goes on: keeps the highest memory use seen
    /// where the kernel keeps no peak.
    pub fn sample_memory(&mut self) {
        if let Cgroups::V2(cgroup) = self
            && cgroup.memory
            && !cgroup.kernel_peak
            && let Some(current) = read_number(&cgroup.dir.join("memory.current"))
        {
            cgroup.sampled_peak_bytes = cgroup.sampled_peak_bytes.max(current);
        }
    }

    /// The run's peak memory use, in KiB, when a cgroup measured it.
    pub fn memory_peak_kb(&self) -> Option<u64> {
        let bytes = match self {
            Cgroups::Absent => None,
            Cgroups::V1 { memory, .. } => {
                read_number(&memory.as_ref()?.join("memory.max_usage_in_bytes"))
            }
            Cgroups::V2(cgroup) if cgroup.memory => read_number(&cgroup.dir.join("memory.peak"))
                .or((cgroup.sampled_peak_bytes > 0).then_some(cgroup.sampled_peak_bytes)),
            Cgroups::V2(_) => None,
        }?;
        Some(bytes / 1024)
    }

    /// Whether the run's memory cgroup killed one of its processes,
    /// whichever (bash itself, or a child bash outlived: then bash usually
    /// exits 137). `killed_by_sigkill`: bash, or its last command, died of
    /// SIGKILL (used only where the kernel does not count OOM kills).
    pub fn memory_limited(&self, killed_by_sigkill: bool) -> bool {
        match self {
            Cgroups::Absent => false,
            Cgroups::V1 { memory: None, .. } => false,
            Cgroups::V1 {
                memory: Some(dir), ..
            } => match counter(&dir.join("memory.oom_control"), "oom_kill") {
                Some(kills) => kills > 0,
                // Kernels before 4.13 do not count OOM kills per cgroup: the
                // limit was reached (which reclaiming the page cache also
                // counts) and something died of SIGKILL.
                None => {
                    read_number(&dir.join("memory.failcnt")).unwrap_or(0) > 0 && killed_by_sigkill
                }
            },
            Cgroups::V2(cgroup) => {
                cgroup.memory
                    && counter(&cgroup.dir.join("memory.events"), "oom_kill").unwrap_or(0) > 0
            }
        }
    }

    /// Whether the process limit refused a fork.
    pub fn processes_limited(&self) -> bool {
        let dir = match self {
            Cgroups::Absent => return false,
            Cgroups::V1 { pids, .. } => pids.as_deref(),
            Cgroups::V2(cgroup) => cgroup.pids.then_some(cgroup.dir.as_path()),
        };
        dir.is_some_and(|dir| counter(&dir.join("pids.events"), "max").unwrap_or(0) > 0)
    }

    /// Kills whatever is left in the run's cgroups and removes them.
    pub fn remove(&self) {
        match self {
            Cgroups::Absent => {}
            Cgroups::V1 { memory, pids } => {
                // Empty by now: every process of the run is dead and reaped.
                for dir in [memory, pids].into_iter().flatten() {
                    remove_with_retries(dir);
                }
            }
            Cgroups::V2(cgroup) => {
                kill_everything_in(&cgroup.dir);
                remove_with_retries(&cgroup.dir);
            }
        }
    }
}

impl V2Cgroup {
    /// Sets the limits of the freshly made cgroup `dir` (the kernel has
    /// filled it with its interface files), as far as its controllers go.
    pub fn configure(dir: PathBuf, memory_bytes: u64, max_processes: u64) -> V2Cgroup {
        let controllers = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let has = |name: &str| controllers.split_whitespace().any(|c| c == name);
        let set = |file: &str, value: &str| write_existing(&dir.join(file), value);
        let memory = has("memory")
            && set("memory.max", &memory_bytes.to_string())
            // No swap either; without the file the kernel accounts no swap
            // per cgroup (`swapaccount=0`), and memory.max still holds.
            && (!dir.join("memory.swap.max").exists() || set("memory.swap.max", "0"));
        let pids = has("pids") && set("pids.max", &max_processes.to_string());
        let kernel_peak = dir.join("memory.peak").exists();
        V2Cgroup {
            dir,
            memory,
            pids,
            kernel_peak,
            sampled_peak_bytes: 0,
        }
    }
}

/// Kills every process in the v2 cgroup `dir`: one write to `cgroup.kill`
/// (Linux ≥ 5.14), else SIGKILL to each process it lists, a few rounds in
/// case one forked meanwhile.
fn kill_everything_in(dir: &Path) {
    if write_existing(&dir.join("cgroup.kill"), "1") {
        return;
    }
    for _ in 0..10 {
        let Ok(listed) = fs::read_to_string(dir.join("cgroup.procs")) else {
            return;
        };
        let pids = pids_in(&listed);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(REMOVE_PAUSE);
    }
}

/// The processes a `cgroup.procs` lists. Only real process ids: never 0,
/// a negative number or this process (`kill` would read those as "my
/// group", "every process", or suicide).
fn pids_in(listed: &str) -> Vec<Pid> {
    let me = std::process::id();
    listed
        .lines()
        .filter_map(|line| line.trim().parse::<u32>().ok())
        .filter(|&pid| pid > 0 && pid != me)
        .filter_map(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw)
        .collect()
}

/// `rmdir`, retried while the kernel still holds the cgroup (its last
/// processes are exiting).
fn remove_with_retries(dir: &Path) {
    for _ in 0..REMOVE_ATTEMPTS {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(REMOVE_PAUSE);
    }
}

/// A run id names a directory: letters, digits, `-` and `_` only.
fn is_safe_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes an interface file the kernel made; never creates one (a missing
/// file is a feature this kernel lacks, such as `cgroup.kill`).
fn write_existing(path: &Path, value: &str) -> bool {
    use std::io::Write;
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut file| file.write_all(value.as_bytes()))
        .is_ok()
}

fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of the line `<key> <number>` in a flat-keyed cgroup file
/// (`memory.events`, `pids.events`, `memory.oom_control`).
fn counter(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A stand-in for a run's cgroup v2 directory, with the files the
    /// kernel would make. `controllers`: what the parent hands down.
    fn stand_in(controllers: &str) -> (tempfile::TempDir, PathBuf) {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("run1");
        fs::create_dir(&dir).expect("run dir");
        let files = [
            ("cgroup.controllers", format!("{controllers}\n")),
            ("cgroup.procs", String::new()),
            ("memory.max", "max\n".into()),
            ("memory.swap.max", "max\n".into()),
            ("memory.current", "0\n".into()),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n".into(),
            ),
            ("pids.max", "max\n".into()),
            ("pids.events", "max 0\n".into()),
        ];
        for (name, content) in files {
            fs::write(dir.join(name), content).expect("file");
        }
        (parent, dir)
    }

    fn read(dir: &Path, file: &str) -> String {
        fs::read_to_string(dir.join(file)).expect(file)
    }

    fn v2(dir: &Path) -> Cgroups {
        Cgroups::V2(V2Cgroup::configure(dir.to_path_buf(), 64 * MIB, 256))
    }

    #[test]
    fn v2_limits_are_written_and_claimed() {
        let (_parent, dir) = stand_in("cpu io memory pids");
        let cgroups = v2(&dir);
        assert_eq!(read(&dir, "memory.max"), (64 * MIB).to_string());
        assert_eq!(read(&dir, "memory.swap.max"), "0");
        assert_eq!(read(&dir, "pids.max"), "256");
        assert!(cgroups.limits_memory() && cgroups.limits_processes());
        assert_eq!(cgroups.version(), Some("v2"));
        assert!(cgroups.add(Pid::from_raw(4242)));
        assert_eq!(read(&dir, "cgroup.procs"), "4242");
        assert!(!cgroups.memory_limited(false));
        assert!(!cgroups.processes_limited());
    }

    #[test]
    fn a_controller_the_parent_does_not_hand_down_is_not_claimed() {
        let (_parent, dir) = stand_in("cpu pids");
        let cgroups = v2(&dir);
        assert!(!cgroups.limits_memory());
        assert!(cgroups.limits_processes());
        assert_eq!(read(&dir, "memory.max"), "max\n", "left alone");
        // Even an OOM kill counted there is not this run's memory limit.
        fs::write(dir.join("memory.events"), "oom_kill 1\n").expect("events");
        assert!(!cgroups.memory_limited(true));
        assert_eq!(cgroups.memory_peak_kb(), None);

        let (_parent, dir) = stand_in("");
        let cgroups = v2(&dir);
        assert!(!cgroups.limits_memory() && !cgroups.limits_processes());
        fs::write(dir.join("pids.events"), "max 3\n").expect("events");
        assert!(!cgroups.processes_limited());
    }

    #[test]
    fn a_refused_limit_or_move_is_not_claimed() {
        let (_parent, dir) = stand_in("memory pids");
        // A directory where the file should be: every write to it fails.
        fs::remove_file(dir.join("pids.max")).expect("rm");
        fs::create_dir(dir.join("pids.max")).expect("dir");
        let cgroups = v2(&dir);
        assert!(cgroups.limits_memory());
        assert!(!cgroups.limits_processes());
        fs::remove_file(dir.join("cgroup.procs")).expect("rm");
        fs::create_dir(dir.join("cgroup.procs")).expect("dir");
        assert!(!cgroups.add(Pid::from_raw(4242)), "a refused move is told");
    }

    #[test]
    fn without_swap_accounting_the_memory_limit_still_holds() {
        let (_parent, dir) = stand_in("memory pids");
        fs::remove_file(dir.join("memory.swap.max")).expect("rm");
        let cgroups = v2(&dir);
        assert!(cgroups.limits_memory());
        assert!(!dir.join("memory.swap.max").exists(), "not invented");
    }

    #[test]
    fn an_oom_kill_is_a_memory_limit_and_a_refused_fork_a_process_limit() {
        let (_parent, dir) = stand_in("memory pids");
        let cgroups = v2(&dir);
        // Reaching memory.max (`max`) and reclaiming is no kill.
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 0\noom_kill 0\n",
        )
        .expect("events");
        assert!(!cgroups.memory_limited(true));
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 40\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .expect("events");
        assert!(cgroups.memory_limited(false), "whichever process it hit");
        assert!(!cgroups.processes_limited());
        fs::write(dir.join("pids.events"), "max 3\n").expect("events");
        assert!(cgroups.processes_limited());
    }

    #[test]
    fn the_peak_comes_from_memory_peak_else_from_samples() {
        let (_parent, dir) = stand_in("memory pids");
        fs::write(dir.join("memory.peak"), "10485760\n").expect("peak");
        let mut cgroups = v2(&dir);
        fs::write(dir.join("memory.current"), "99999999\n").expect("current");
        cgroups.sample_memory();
        assert_eq!(cgroups.memory_peak_kb(), Some(10 * 1024), "the kernel's");

        // Before Linux 5.19: the highest sample.
        let (_parent, dir) = stand_in("memory pids");
        let mut cgroups = v2(&dir);
        assert_eq!(cgroups.memory_peak_kb(), None, "nothing sampled yet");
        for current in [MIB, 5 * MIB, 2 * MIB] {
            fs::write(dir.join("memory.current"), format!("{current}\n")).expect("current");
            cgroups.sample_memory();
        }
        assert_eq!(cgroups.memory_peak_kb(), Some(5 * 1024));
    }

    #[test]
    fn teardown_kills_through_cgroup_kill_then_removes_the_directory() {
        let (_parent, dir) = stand_in("memory pids");
        let cgroups = v2(&dir);
        for file in fs::read_dir(&dir).expect("list").flatten() {
            fs::remove_file(file.path()).expect("rm");
        }
        // The kernel's cgroup.kill: a FIFO whose reader, like the kernel,
        // lets the directory go once the write arrives.
        let kill_file = dir.join("cgroup.kill");
        nix::unistd::mkfifo(&kill_file, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("fifo");
        let kernel = std::thread::spawn(move || {
            let written = fs::read_to_string(&kill_file).expect("read cgroup.kill");
            fs::remove_file(&kill_file).expect("rm");
            written
        });
        cgroups.remove();
        assert_eq!(kernel.join().expect("kernel"), "1");
        assert!(!dir.exists(), "removed after the kill");
    }

    #[test]
    fn without_cgroup_kill_each_listed_process_is_killed() {
        let (_parent, dir) = stand_in("memory pids");
        let cgroups = v2(&dir);
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        fs::write(dir.join("cgroup.procs"), format!("{}\n", sleeper.id())).expect("procs");
        cgroups.remove();
        let status = sleeper.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    }

    #[test]
    fn only_real_process_ids_are_killed() {
        let me = std::process::id();
        assert_eq!(
            pids_in(&format!(
                "-1\n0\n{me}\nabc\n\n 17 \n99999999999\n4294967295\n2147483647\n"
            )),
            vec![Pid::from_raw(17), Pid::from_raw(i32::MAX)]
        );
    }

    #[test]
    fn garbage_in_the_cgroup_files_is_absent_not_a_panic() {
        let garbage = [
            "",
            "\n",
            "max",
            "-5",
            "oom_kill",
            "oom_kill \n",
            "oom_kill -1\n",
            "oom_kill 99999999999999999999999999\n",
            "max 1e9\n",
            "\u{0}\u{ff}",
            "18446744073709551615",
            "18446744073709551616",
        ];
        for text in garbage {
            let (_parent, dir) = stand_in("memory pids");
            let mut cgroups = v2(&dir);
            for file in [
                "memory.events",
                "pids.events",
                "memory.current",
                "memory.peak",
            ] {
                fs::write(dir.join(file), text).expect("garbage");
            }
            cgroups.sample_memory();
            assert!(!cgroups.memory_limited(true), "{text:?}");
            assert!(!cgroups.processes_limited(), "{text:?}");
            let peak = cgroups.memory_peak_kb();
            if text == "18446744073709551615" {
                assert_eq!(peak, Some(u64::MAX / 1024));
            } else {
                assert_eq!(peak, None, "{text:?}");
            }
        }
        // Garbage in cgroup.controllers claims nothing.
        let (_parent, dir) = stand_in("memoryx pid \u{0}");
        let cgroups = v2(&dir);
        assert!(!cgroups.limits_memory() && !cgroups.limits_processes());
    }

    #[test]
    fn a_run_id_that_is_not_a_plain_name_gets_no_cgroup() {
        let parent = tempfile::tempdir().expect("tempdir");
        for bad in ["", "../escape", "a/b", ".", "..", &"x".repeat(65)] {
            let cgroups = Cgroups::create(Some(parent.path()), bad, MIB, 1);
            assert!(matches!(cgroups, Cgroups::Absent), "{bad:?}");
        }
        assert_eq!(fs::read_dir(parent.path()).expect("list").count(), 0);
        let made = Cgroups::create(Some(parent.path()), "0123abc-_", MIB, 1);
        assert_eq!(made.version(), Some("v2"));
        assert!(parent.path().join("0123abc-_").is_dir());
        assert!(!made.limits_memory(), "no controllers in a plain directory");
    }

    #[test]
    fn v1_is_made_only_where_its_hierarchy_is_mounted() {
        // A plain directory is no cgroup v1 mount: nothing is made in it.
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(root.path().join("memory")).expect("memory");
        fs::create_dir_all(root.path().join("pids")).expect("pids");
        let cgroups = Cgroups::create_v1(root.path(), "run1", MIB, 1);
        assert!(matches!(cgroups, Cgroups::Absent));
        assert!(!root.path().join("memory/nox").exists());
    }
}
