//! Per-user workspaces: file operations the kernel confines to the user's
//! directory (see [`workspace`]), client paths checked before any system
//! call (see [`path`]), and storage accounting kept current without walking
//! the tree on every request ([`Workspaces`]).

pub mod cgroup;
pub mod leftovers;
pub mod path;
pub mod run;
pub mod workspace;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

pub use path::SandboxPath;
pub use workspace::{
    DELETE_PREFIX, Entry, EntryKind, MAX_OPEN_DIRS, MAX_USAGE_ENTRIES, MAX_WALK_DEPTH, Replaced,
    Upload, Workspace,
};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("path not found")]
    NotFound,
    /// The path tries to leave the workspace (`..`, a symbolic link).
    #[error("{0}")]
    PathEscape(String),
    /// The path is malformed or names the wrong kind of thing.
    #[error("{0}")]
    InvalidPath(String),
    /// Reading something that is not a regular file: a directory, FIFO,
    /// socket or device (refused without opening it for long).
    #[error("{0}")]
    NotARegularFile(String),
    #[error("file system error: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes and regular files in a workspace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub files: u64,
    /// The walk could not see the whole workspace (too deep or too many
    /// entries, see [`Workspace::usage`]): `bytes` and `files` are lower
    /// bounds, and quotas count such a workspace as over its limits.
    pub incomplete: bool,
}

/// Every user's workspace under one base directory, with their usage.
#[derive(Debug)]
pub struct Workspaces {
    base: PathBuf,
    usage: Mutex<HashMap<Uuid, Known>>,
    /// Milliseconds after which a usage is measured again (0: never), for
    /// workspaces other servers write too ([`Workspaces::remeasure_every`]).
    remeasure_after_ms: AtomicU64,
}

/// A user's usage, and when the workspace was last walked.
#[derive(Debug, Clone, Copy)]
struct Known {
    usage: Usage,
    measured_at: Instant,
}

impl Known {
    fn now(usage: Usage) -> Known {
        Known {
            usage,
            measured_at: Instant::now(),
        }
    }
}

impl Workspaces {
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Workspaces {
            base: base.into(),
            usage: Mutex::new(HashMap::new()),
            remeasure_after_ms: AtomicU64::new(0),
        }
    }

    /// With several servers on one shared base directory, each one's count
    /// misses the others' writes: `Some(every)` walks a workspace again
    /// when its count is older than that (`None`: this process is the only
    /// writer, and its count is kept current without walks).
    pub fn remeasure_every(&self, every: Option<Duration>) {
        let ms = every.map_or(0, |every| every.as_millis().max(1) as u64);
        self.remeasure_after_ms.store(ms, Ordering::Relaxed);
    }

    fn fresh(&self, known: &Known) -> bool {
        match self.remeasure_after_ms.load(Ordering::Relaxed) {
            0 => true,
            ms => known.measured_at.elapsed() < Duration::from_millis(ms),
        }
    }

    /// Opens (creating it on first use) the workspace of `user`. Blocking.
    pub fn open(&self, user: Uuid) -> Result<Workspace, SandboxError> {
        Workspace::open(&self.base.join(user.to_string()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Known>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user's usage; the first call walks the workspace once (and, on
    /// a shared base directory, again once the count is stale). Blocking.
    pub fn usage(&self, user: Uuid, workspace: &Workspace) -> Result<Usage, SandboxError> {
        if let Some(known) = self.lock().get(&user)
            && self.fresh(known)
        {
            return Ok(known.usage);
        }
        let usage = workspace.usage()?;
        let mut usages = self.lock();
        let known = usages.entry(user).or_insert(Known::now(usage));
        if !self.fresh(known) {
            *known = Known::now(usage);
        }
        Ok(known.usage)
    }

    /// Walks the workspace again and keeps what it finds: after a command,
    /// which may have changed anything in it. Blocking.
    pub fn remeasure(&self, user: Uuid, workspace: &Workspace) -> Result<Usage, SandboxError> {
        let usage = workspace.usage()?;
        self.lock().insert(user, Known::now(usage));
        Ok(usage)
    }

    /// Keeps `upload` (of `size` bytes) if `fits` accepts the user's usage
    /// at this moment and the size of the file it replaces. The check, the
    /// rename and the accounting happen under the usage lock, so concurrent
    /// uploads cannot together exceed a limit each fits alone. Blocking: the
    /// data is fsynced before the lock is taken (and not at all for an
    /// upload that already does not fit), so the lock covers a rename only.
    pub fn commit_upload<E>(
        &self,
        user: Uuid,
        workspace: &Workspace,
        mut upload: Upload,
        size: u64,
        mut fits: impl FnMut(Usage, Option<u64>) -> Result<(), E>,
    ) -> Result<Result<Replaced, E>, SandboxError> {
        // Dropping a refused upload removes its temporary file.
        let measured = self.usage(user, workspace)?;
        if let Err(refusal) = fits(measured, upload.replacing()?) {
            return Ok(Err(refusal));
        }
        upload.sync()?;
        let mut usages = self.lock();
        let current = usages.get(&user).map_or(measured, |known| known.usage);
        if let Err(refusal) = fits(current, upload.replacing()?) {
            return Ok(Err(refusal));
        }
        let replaced = upload.commit()?;
        // Forgotten meanwhile (`invalidate`): the next walk counts the file.
        if let Some(Known { usage, .. }) = usages.get_mut(&user) {
            match replaced.previous_size {
                Some(previous) => usage.bytes = (usage.bytes + size).saturating_sub(previous),
                None => {
                    usage.bytes += size;
                    usage.files += 1;
                }
            }
        }
        Ok(Ok(replaced))
    }

    /// `files` files holding `bytes` bytes were deleted.
    pub fn record_delete(&self, user: Uuid, files: u64, bytes: u64) {
        let mut usages = self.lock();
        match usages.get_mut(&user) {
            // What was not counted may be what was deleted: walk again.
            Some(known) if known.usage.incomplete => {
                usages.remove(&user);
            }
            Some(Known { usage, .. }) => {
                usage.files = usage.files.saturating_sub(files);
                usage.bytes = usage.bytes.saturating_sub(bytes);
            }
            None => {}
        }
    }

    /// Forgets a user's usage, so the next [`Workspaces::usage`] walks the
    /// workspace again (after a command changed it behind our back).
    pub fn invalidate(&self, user: Uuid) {
        self.lock().remove(&user);
    }

    /// The sum over every workspace whose usage is known.
    pub fn totals(&self) -> Usage {
        self.lock()
            .values()
            .map(|known| known.usage)
            .fold(Usage::default(), |total, usage| Usage {
                bytes: total.bytes + usage.bytes,
                files: total.files + usage.files,
                incomplete: total.incomplete || usage.incomplete,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn usage(bytes: u64, files: u64) -> Usage {
        Usage {
            bytes,
            files,
            incomplete: false,
        }
    }

    fn upload(workspace: &Workspace, path: &str, body: &[u8]) -> Upload {
        let mut upload = workspace
            .start_upload(&SandboxPath::parse(path).expect("path"))
            .expect("upload");
        let mut file = upload.take_file().expect("file");
        file.write_all(body).expect("write");
        upload.put_file(file);
        upload
    }

    /// Commits through the accounting, with a check that accepts anything.
    fn write(workspaces: &Workspaces, user: Uuid, path: &str, body: &[u8]) -> Replaced {
        let workspace = workspaces.open(user).expect("open");
        let upload = upload(&workspace, path, body);
        workspaces
            .commit_upload(user, &workspace, upload, body.len() as u64, |_, _| {
                Ok::<_, ()>(())
            })
            .expect("commit")
            .expect("fits")
    }

    #[test]
    fn usage_is_kept_current_without_rescanning() {
        let base = tempfile::tempdir().expect("tempdir");
        let workspaces = Workspaces::new(base.path());
        let user = Uuid::new_v4();
        let workspace = workspaces.open(user).expect("open");
        upload(&workspace, "before.txt", b"12345")
            .commit()
            .expect("commit");
        assert_eq!(
            workspaces.usage(user, &workspace).expect("scan"),
            usage(5, 1)
        );

        write(&workspaces, user, "a/b/new.txt", b"123");
        let replaced = write(&workspaces, user, "before.txt", b"1");
        assert_eq!(replaced.previous_size, Some(5));
        let (files, bytes) = workspace
            .delete(&SandboxPath::parse("a").expect("path"))
            .expect("delete");
        workspaces.record_delete(user, files, bytes);

        let kept = workspaces.usage(user, &workspace).expect("usage");
        assert_eq!(kept, workspace.usage().expect("rescan"));
        assert_eq!(kept, usage(1, 1));
        assert_eq!(workspaces.totals(), kept);
    }

    #[test]
    fn a_shared_base_is_measured_again_so_other_servers_writes_count() {
        let base = tempfile::tempdir().expect("tempdir");
        // Two servers on one base directory.
        let (here, there) = (Workspaces::new(base.path()), Workspaces::new(base.path()));
        let user = Uuid::new_v4();
        let workspace = here.open(user).expect("open");
        assert_eq!(here.usage(user, &workspace).expect("walk"), usage(0, 0));
        write(&there, user, "elsewhere.txt", b"12345");
        assert_eq!(
            here.usage(user, &workspace).expect("cached"),
            usage(0, 0),
            "alone, this server's count is trusted"
        );
        here.remeasure_every(Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            here.usage(user, &workspace).expect("walked again"),
            usage(5, 1)
        );
        here.remeasure_every(Some(Duration::from_secs(3600)));
        write(&there, user, "more.txt", b"1");
        assert_eq!(
            here.usage(user, &workspace).expect("fresh enough"),
            usage(5, 1)
        );
    }

    #[test]
    fn a_refused_upload_leaves_nothing_and_the_check_sees_what_it_replaces() {
        // Refused by the check before the fsync, then by the one under the lock.
        for refused_at_call in [1, 2] {
            let base = tempfile::tempdir().expect("tempdir");
            let workspaces = Workspaces::new(base.path());
            let user = Uuid::new_v4();
            let workspace = workspaces.open(user).expect("open");
            write(&workspaces, user, "kept.txt", b"12345");
            let mut seen = Vec::new();
            let refused = workspaces
                .commit_upload(
                    user,
                    &workspace,
                    upload(&workspace, "kept.txt", b"123456789"),
                    9,
                    |usage, replacing| {
                        seen.push((usage, replacing));
                        if seen.len() == refused_at_call {
                            Err("over quota")
                        } else {
                            Ok(())
                        }
                    },
                )
                .expect("no file system error");
            assert_eq!(refused, Err("over quota"));
            assert_eq!(seen, vec![(usage(5, 1), Some(5)); refused_at_call]);
            assert_eq!(
                workspace.usage().expect("rescan"),
                usage(5, 1),
                "the old file is intact and no temporary file is left"
            );
            assert_eq!(
                workspaces.usage(user, &workspace).expect("usage"),
                usage(5, 1)
            );
        }
    }

    #[test]
    fn a_workspace_deeper_than_a_walk_goes_is_incomplete_until_a_delete() {
        use nix::fcntl::{OFlag, open, openat};
        use nix::sys::stat::{Mode, mkdirat};
        let base = tempfile::tempdir().expect("tempdir");
        let workspaces = Workspaces::new(base.path());
        let user = Uuid::new_v4();
        let workspace = workspaces.open(user).expect("open");
        write(&workspaces, user, "kept.txt", b"123");
        // As a command makes it: `mkdir d && cd d`, one level too many.
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut dir = open(workspace.root_path(), flags, Mode::empty()).expect("root");
        for _ in 0..MAX_WALK_DEPTH {
            mkdirat(&dir, "d", Mode::from_bits_truncate(0o755)).expect("mkdir");
            dir = openat(&dir, "d", flags, Mode::empty()).expect("cd");
        }
        drop(dir);

        let measured = workspaces.remeasure(user, &workspace).expect("walk");
        assert!(measured.incomplete, "{measured:?}");
        assert_eq!(workspaces.usage(user, &workspace).expect("kept"), measured);
        let (files, bytes) = workspace
            .delete(&SandboxPath::parse("d").expect("path"))
            .expect("delete");
        workspaces.record_delete(user, files, bytes);
        assert_eq!(
            workspaces.usage(user, &workspace).expect("walked again"),
            usage(3, 1)
        );
    }
}
