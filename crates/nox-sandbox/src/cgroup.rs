//! cgroup v2 for runs: which hierarchy the machine has, and the one-time
//! preparation of the directory runs' cgroups go under.
//!
//! In cgroup v2 a cgroup that hands controllers down to its children may
//! hold no processes itself (the "no internal processes" rule). When the
//! configured parent is the server's own cgroup (a systemd unit with
//! `Delegate=yes`), the server therefore moves itself, and whatever else
//! lives there (the embedded PostgreSQL), into a leaf `<parent>/server`,
//! and runs go to `<parent>/runs/<run id>`. Otherwise (the default
//! `/sys/fs/cgroup/nox`, holding no process) runs go to `<parent>/<run id>`.
//!
//! The launcher gets the runs' directory as `--cgroup-parent` and checks
//! each run's controllers for itself; what is prepared here only enables
//! them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where the cgroup file system is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The default `NOX_CGROUP_PARENT`.
pub const DEFAULT_PARENT: &str = "/sys/fs/cgroup/nox";
/// The controllers a run's limits need.
pub const RUN_CONTROLLERS: [&str; 2] = ["memory", "pids"];

/// Whether `root` is the unified (v2) hierarchy; else runs use the v1
/// hierarchies mounted below it, if any.
pub fn is_unified(root: &Path) -> bool {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    statfs(root).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

/// Where runs' cgroups go, and which of their controllers are enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCgroups {
    /// The launcher's `--cgroup-parent`.
    pub parent: PathBuf,
    pub memory: bool,
    pub pids: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct CgroupError {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn failed(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError { what, path, source }
}

/// The server's own cgroup directory under `root`, from `/proc/self/cgroup`.
pub fn own_cgroup(root: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    Some(root.join(unified_path(&text)?.trim_start_matches('/')))
}

/// The cgroup v2 path in a `/proc/<pid>/cgroup` listing (its `0::` line).
fn unified_path(listing: &str) -> Option<&str> {
    listing
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .filter(|path| path.starts_with('/'))
}

/// Prepares `parent` (made if missing) for runs; `own` is the server's own
/// cgroup directory. Idempotent: a restarted server finds its leaf made.
pub fn prepare(parent: &Path, own: Option<&Path>) -> Result<RunCgroups, CgroupError> {
    fs::create_dir_all(parent).map_err(failed("cannot make", parent))?;
    let leaf = parent.join("server");
    let shares_the_parent = own.is_some_and(|own| own == parent || own == leaf);
    if !shares_the_parent {
        let enabled = enable_controllers(parent, &available(parent))?;
        return Ok(RunCgroups::new(parent.to_path_buf(), &enabled));
    }
    make_dir(&leaf)?;
    // Processes may start meanwhile (the embedded PostgreSQL's): a few
    // rounds of moving everything out, then enabling.
    let mut attempt = 0;
    let enabled = loop {
        attempt += 1;
        move_processes(parent, &leaf)?;
        match enable_controllers(parent, &available(parent)) {
            Ok(enabled) => break enabled,
            Err(error) if attempt >= 3 => return Err(error),
            Err(_) => {}
        }
    };
    let runs = parent.join("runs");
    make_dir(&runs)?;
    // What the parent enabled is what `runs` has to hand down.
    let enabled = enable_controllers(&runs, &enabled)?;
    Ok(RunCgroups::new(runs, &enabled))
}

impl RunCgroups {
    fn new(parent: PathBuf, enabled: &[&str]) -> RunCgroups {
        RunCgroups {
            parent,
            memory: enabled.contains(&"memory"),
            pids: enabled.contains(&"pids"),
        }
    }
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
            Err(failed("cannot make", dir)(error))
        }
        _ => Ok(()),
    }
}

/// The run controllers `dir` may hand down (its `cgroup.controllers`).
fn available(dir: &Path) -> Vec<&'static str> {
    let listed = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    RUN_CONTROLLERS
        .into_iter()
        .filter(|wanted| listed.split_whitespace().any(|c| c == *wanted))
        .collect()
}

/// Enables `controllers` for the children of `dir`, in one write (the kernel
/// refuses the whole write if one is unavailable); returns them.
fn enable_controllers<'a>(
    dir: &Path,
    controllers: &[&'a str],
) -> Result<Vec<&'a str>, CgroupError> {
    if controllers.is_empty() {
        return Ok(Vec::new());
    }
    let line = controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let file = dir.join("cgroup.subtree_control");
    fs::write(&file, line).map_err(failed("cannot enable controllers in", &file))?;
    Ok(controllers.to_vec())
}

/// Moves every process of cgroup `from` into cgroup `to`.
fn move_processes(from: &Path, to: &Path) -> Result<(), CgroupError> {
    let listing = from.join("cgroup.procs");
    let listed = fs::read_to_string(&listing).map_err(failed("cannot read", &listing))?;
    let target = to.join("cgroup.procs");
    for pid in listed
        .lines()
        .filter_map(|line| line.trim().parse::<u32>().ok())
        .filter(|&pid| pid > 0)
    {
        match fs::write(&target, pid.to_string()) {
            Ok(()) => {}
            // It exited meanwhile.
            Err(error) if error.raw_os_error() == Some(nix::libc::ESRCH) => {}
            Err(error) => return Err(failed("cannot move a process into", &target)(error)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in cgroup v2 directory with the files the kernel makes.
    fn cgroup_dir(dir: &Path, controllers: &str, procs: &str) {
        fs::create_dir_all(dir).expect("dir");
        fs::write(dir.join("cgroup.controllers"), format!("{controllers}\n")).expect("file");
        fs::write(dir.join("cgroup.subtree_control"), "").expect("file");
        fs::write(dir.join("cgroup.procs"), procs).expect("file");
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn the_server_leaves_its_own_cgroup_for_a_leaf_and_runs_get_their_own() {
        let root = tempfile::tempdir().expect("tempdir");
        let parent = root.path().join("system.slice/nox.service");
        let me = std::process::id().to_string();
        cgroup_dir(
            &parent,
            "cpuset cpu io memory hugetlb pids rdma",
            &format!("{me}\n"),
        );
        let prepared = prepare(&parent, Some(&parent)).expect("prepare");
        assert_eq!(
            prepared,
            RunCgroups {
                parent: parent.join("runs"),
                memory: true,
                pids: true
            }
        );
        assert_eq!(read(&parent.join("server/cgroup.procs")), me, "moved");
        assert_eq!(
            read(&parent.join("cgroup.subtree_control")),
            "+memory +pids"
        );
        assert_eq!(
            read(&parent.join("runs/cgroup.subtree_control")),
            "+memory +pids"
        );
        // Again, as a restarted server finds it (already in its leaf).
        let again = prepare(&parent, Some(&parent.join("server"))).expect("again");
        assert_eq!(again, prepared);
    }

    #[test]
    fn a_parent_of_its_own_takes_runs_directly() {
        let root = tempfile::tempdir().expect("tempdir");
        let parent = root.path().join("nox");
        cgroup_dir(&parent, "memory pids", "");
        let own = root.path().join("user.slice");
        let prepared = prepare(&parent, Some(&own)).expect("prepare");
        assert_eq!(prepared.parent, parent);
        assert!(prepared.memory && prepared.pids);
        assert_eq!(
            read(&parent.join("cgroup.subtree_control")),
            "+memory +pids"
        );
        assert!(!parent.join("server").exists() && !parent.join("runs").exists());
    }

    #[test]
    fn a_missing_controller_is_not_enabled_nor_claimed() {
        let root = tempfile::tempdir().expect("tempdir");
        let parent = root.path().join("nox.service");
        cgroup_dir(&parent, "cpu io pids", "");
        let prepared = prepare(&parent, Some(&parent)).expect("prepare");
        assert!(!prepared.memory);
        assert!(prepared.pids);
        assert_eq!(read(&parent.join("cgroup.subtree_control")), "+pids");
        assert_eq!(read(&parent.join("runs/cgroup.subtree_control")), "+pids");

        let bare = root.path().join("bare");
        cgroup_dir(&bare, "", "");
        let prepared = prepare(&bare, None).expect("prepare");
        assert!(!prepared.memory && !prepared.pids);
        assert_eq!(
            read(&bare.join("cgroup.subtree_control")),
            "",
            "nothing written"
        );
    }

    #[test]
    fn garbage_in_the_listings_does_not_panic() {
        let root = tempfile::tempdir().expect("tempdir");
        let parent = root.path().join("nox.service");
        cgroup_dir(
            &parent,
            "memoryx\u{0} pid",
            "-1\n0\nabc\n99999999999999999999\n\n",
        );
        let prepared = prepare(&parent, Some(&parent)).expect("prepare");
        assert!(!prepared.memory && !prepared.pids, "no such controllers");
        // No line named a process: nothing was written into the leaf.
        assert!(!parent.join("server/cgroup.procs").exists());
    }

    #[test]
    fn a_parent_that_cannot_be_made_is_an_error() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::write(root.path().join("file"), "").expect("file");
        assert!(prepare(&root.path().join("file/nox"), None).is_err());
    }

    #[test]
    fn the_unified_path_is_read_from_the_0_line() {
        let hybrid = "4:memory:/a\n1:name=systemd:/x\n0::/system.slice/nox.service\n";
        assert_eq!(unified_path(hybrid), Some("/system.slice/nox.service"));
        assert_eq!(unified_path("0::/\n"), Some("/"));
        assert_eq!(unified_path("4:memory:/a\n"), None);
        assert_eq!(unified_path("0::garbage\n"), None);
        assert_eq!(unified_path(""), None);
    }

    /// The preparation against the kernel's cgroup2 (on a hybrid machine its
    /// controller-less mount): a process in the parent really moves to the
    /// leaf, and no controller is claimed where none is offered.
    #[test]
    fn the_processes_of_a_real_cgroup2_parent_move_to_the_leaf() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: making cgroups needs root");
            return;
        }
        let Some(mount) = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|path| is_unified(path))
        else {
            eprintln!("skipped: no cgroup2 mount here");
            return;
        };
        let parent = mount.join(format!("nox-test-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir(&parent).expect("parent");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        let pid = sleeper.id().to_string();
        fs::write(parent.join("cgroup.procs"), &pid).expect("into the parent");
        let prepared = prepare(&parent, Some(&parent));
        let in_parent = read(&parent.join("cgroup.procs"));
        let in_leaf = fs::read_to_string(parent.join("server/cgroup.procs")).unwrap_or_default();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        for dir in ["runs", "server", ""] {
            let _ = fs::remove_dir(parent.join(dir));
        }
        let prepared = prepared.expect("prepare");
        let offered = read(&mount.join("cgroup.subtree_control"));
        assert_eq!(in_parent, "", "the parent holds no process");
        assert_eq!(in_leaf.trim(), pid);
        assert_eq!(prepared.parent, parent.join("runs"));
        assert_eq!(prepared.memory, offered.contains("memory"));
        assert_eq!(prepared.pids, offered.contains("pids"));
        assert!(!parent.exists(), "cleaned up");
    }

    #[test]
    fn a_plain_directory_is_not_the_unified_hierarchy() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_unified(dir.path()));
    }
}
