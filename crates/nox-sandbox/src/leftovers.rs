//! What a run leaves behind when its launcher could not clean up (it was
//! killed with SIGKILL, or the server died): its cgroups, and its report
//! file. The server sweeps both at start and then periodically.
//!
//! A run's cgroups are `<CGROUP_ROOT>/<controller>/nox/<run id>` in the v1
//! `memory` and `pids` hierarchies, or `<runs parent>/<run id>` in v2 (see
//! [`crate::cgroup`]), as `nox-sandbox-exec` makes them (its integration
//! tests and `tests/it/run.rs` check the layout). A live run's
//! cgroup always holds its init, except in the moment between the
//! launcher's `mkdir` and its moving init in; so a sweep removes only
//! cgroups that are empty (the kernel refuses to remove any other) and
//! older than [`MIN_AGE`], which also leaves other servers' runs on the
//! same host alone.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The controllers a run gets a cgroup in.
pub const CONTROLLERS: &[&str] = &["memory", "pids"];
/// Younger leftovers may belong to a run that is starting.
pub const MIN_AGE: Duration = Duration::from_secs(60);
/// A report this old was never read: its run's server request is gone.
pub const REPORT_MAX_AGE: Duration = Duration::from_secs(3600);

/// Removes empty run cgroups older than `min_age` under `cgroup_root`;
/// returns how many were removed.
pub fn sweep_cgroups(cgroup_root: &Path, min_age: Duration) -> usize {
    CONTROLLERS
        .iter()
        .map(|controller| {
            // rmdir of a cgroup fails while it has processes or children.
            remove_old(
                &cgroup_root.join(controller).join("nox"),
                min_age,
                Kind::Dir,
            )
        })
        .sum()
}

/// Removes empty run cgroups older than `min_age` from the cgroup v2
/// directory `runs_parent`; returns how many were removed. Only directories
/// named like a run id: the parent may be shared (the server's own cgroup
/// holds its `server` leaf, an operator's parent may hold other cgroups).
pub fn sweep_v2_cgroups(runs_parent: &Path, min_age: Duration) -> usize {
    let Ok(entries) = fs::read_dir(runs_parent) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(is_run_id))
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter(|entry| is_older_than(&entry.path(), min_age))
        .filter(|entry| fs::remove_dir(entry.path()).is_ok())
        .count()
}

/// A run id as `run::run` makes it: a UUID's 32 lowercase hex digits.
pub fn is_run_id(name: &str) -> bool {
    name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Removes report files older than `max_age` from `report_dir`.
pub fn sweep_reports(report_dir: &Path, max_age: Duration) -> usize {
    remove_old(report_dir, max_age, Kind::File)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    File,
    Dir,
}

/// Removes the entries of `parent` of `kind` older than `age`.
fn remove_old(parent: &Path, age: Duration, kind: Kind) -> usize {
    let Ok(entries) = fs::read_dir(parent) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            entry.file_type().is_ok_and(|found| match kind {
                Kind::File => found.is_file(),
                Kind::Dir => found.is_dir(),
            })
        })
        .filter(|entry| is_older_than(&entry.path(), age))
        .filter(|entry| match kind {
            Kind::File => fs::remove_file(entry.path()).is_ok(),
            Kind::Dir => fs::remove_dir(entry.path()).is_ok(),
        })
        .count()
}

fn is_older_than(path: &Path, age: Duration) -> bool {
    fs::symlink_metadata(path)
        .and_then(|meta| meta.modified())
        .is_ok_and(|modified| {
            SystemTime::now()
                .duration_since(modified)
                .is_ok_and(|elapsed| elapsed >= age)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_empty_directories_are_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let nox = root.path().join("memory/nox");
        fs::create_dir_all(nox.join("left-behind")).expect("dir");
        fs::create_dir_all(nox.join("busy/child")).expect("dir");
        fs::write(nox.join("memory.limit_in_bytes"), "1").expect("file");
        assert_eq!(
            sweep_cgroups(root.path(), Duration::from_secs(3600)),
            0,
            "too young"
        );
        assert_eq!(sweep_cgroups(root.path(), Duration::ZERO), 1);
        assert!(!nox.join("left-behind").exists());
        assert!(nox.join("busy").exists(), "not empty: the kernel keeps it");
        assert!(nox.join("memory.limit_in_bytes").exists());
    }

    #[test]
    fn only_old_empty_run_cgroups_are_removed_in_v2() {
        let runs = tempfile::tempdir().expect("tempdir");
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let busy = uuid::Uuid::new_v4().simple().to_string();
        fs::create_dir(runs.path().join(&run_id)).expect("dir");
        fs::create_dir_all(runs.path().join(&busy).join("child")).expect("dir");
        // Not runs: the server's leaf, an operator's cgroup, a look-alike.
        for other in ["server", "runs", "system.slice", &run_id.to_uppercase()] {
            fs::create_dir(runs.path().join(other)).expect("dir");
        }
        fs::write(runs.path().join("cgroup.procs"), "").expect("file");
        assert_eq!(
            sweep_v2_cgroups(runs.path(), Duration::from_secs(3600)),
            0,
            "too young"
        );
        assert_eq!(sweep_v2_cgroups(runs.path(), Duration::ZERO), 1);
        assert!(!runs.path().join(&run_id).exists());
        assert!(runs.path().join(&busy).exists(), "not empty");
        for other in ["server", "runs", "system.slice", &run_id.to_uppercase()] {
            assert!(runs.path().join(other).exists(), "{other}");
        }
        assert_eq!(
            sweep_v2_cgroups(&runs.path().join("missing"), Duration::ZERO),
            0
        );
    }

    #[test]
    fn old_reports_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("run.json"), "{}").expect("report");
        assert_eq!(sweep_reports(dir.path(), Duration::from_secs(3600)), 0);
        assert_eq!(sweep_reports(dir.path(), Duration::ZERO), 1);
    }
}
