//! File operations confined to one workspace by the kernel.
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! from a descriptor of the workspace root: resolution can neither leave the
//! workspace nor follow a symbolic link, whatever is swapped in while a
//! request runs. Names are then used relative to descriptors (`*at` calls),
//! never re-resolved from strings. Deleting works on the link itself.
//! Reading refuses anything but a regular file without ever waiting on it
//! (a FIFO opened for reading would wait for a writer). Tree walks (usage,
//! hand-over, delete) are loops over an explicit stack holding at most
//! [`MAX_OPEN_DIRS`] descriptors, however deep the tree a command made.
//! All of this blocks: call it from a blocking thread.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, FcntlArg, OFlag, OpenHow, ResolveFlag, fcntl, openat2, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::path::SandboxPath;
use crate::{SandboxError, Usage};

/// Prefix of in-progress uploads; such names are refused from clients.
pub const UPLOAD_PREFIX: &str = ".nox-upload-";

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_BENEATH.union(ResolveFlag::RESOLVE_NO_SYMLINKS);

/// The most descriptors one tree walk holds at once, its starting
/// directory's included (a delete also holds the parent of what it
/// deletes). Deeper than that, a walk closes the shallowest ones and, on
/// its way back up, reopens each parent as `..` of its child, checked to be
/// the same directory (device and inode) it left, as fts(3) does.
pub const MAX_OPEN_DIRS: usize = 32;

/// How many levels below the workspace root [`Workspace::usage`] and
/// [`Workspace::hand_over`] go. Nothing the server makes is that deep (a
/// client path has at most 4096 bytes, so 2048 levels); only a command can
/// go deeper. Deeper entries are not handed over (what a command made is
/// its run user's already), and a workspace that goes deeper is measured
/// as incomplete, which the quotas count as over every limit (fail
/// closed): a walk holds a frame per level, so stopping here keeps its
/// memory small whatever a command builds. [`Workspace::delete`] has no
/// depth limit.
pub const MAX_WALK_DEPTH: usize = 4096;

/// The most entries (files, directories, anything) [`Workspace::usage`]
/// and the hand-over read before they give up (usage then measures the
/// workspace as incomplete): it bounds the time and the memory a walk takes
/// (a name is held until visited: some 60 MB at most) whatever a command
/// made. Far beyond any files quota of a tier.
pub const MAX_USAGE_ENTRIES: u64 = 200_000;

/// A delete does not descend below this many levels under the directory it
/// deletes: it moves a deeper subtree up to that directory's top level
/// (renamed [`DELETE_PREFIX`]`<uuid>`) and deletes it from there, so it
/// deletes a tree of any depth with a stack this short, all of it open.
const DELETE_HOIST_DEPTH: usize = MAX_OPEN_DIRS - 2;

/// Prefix of subtrees a delete moved up (inside the directory it deletes).
pub const DELETE_PREFIX: &str = ".nox-delete-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub modified: OffsetDateTime,
}

/// A user's workspace, held open by a descriptor of its root.
#[derive(Debug)]
pub struct Workspace {
    root: OwnedFd,
    root_path: PathBuf,
}

fn map_errno(errno: Errno) -> SandboxError {
    match errno {
        Errno::ENOENT => SandboxError::NotFound,
        Errno::ELOOP | Errno::EXDEV => SandboxError::PathEscape(
            "the path leads through a symbolic link or out of the workspace".into(),
        ),
        Errno::ENOTDIR => {
            SandboxError::InvalidPath("a component of the path is not a directory".into())
        }
        Errno::EISDIR => SandboxError::InvalidPath("the path is a directory".into()),
        Errno::ENAMETOOLONG => SandboxError::InvalidPath("the path is too long".into()),
        Errno::EAGAIN => {
            SandboxError::InvalidPath("the path changed while it was resolved; retry".into())
        }
        Errno::ENOTEMPTY => SandboxError::InvalidPath(
            "the directory kept gaining entries while it was deleted (is a command still \
             running in it?); retry"
                .into(),
        ),
        other => SandboxError::Io(std::io::Error::from(other)),
    }
}

fn kind_of(stat: &FileStat) -> EntryKind {
    match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => EntryKind::File,
        SFlag::S_IFDIR => EntryKind::Directory,
        SFlag::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

/// Refuses to read anything but a regular file: a link is never followed,
/// every other kind is `not_a_regular_file`.
fn refuse_unless_regular(stat: &FileStat) -> Result<(), SandboxError> {
    let what = match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => return Ok(()),
        SFlag::S_IFLNK => {
            return Err(SandboxError::PathEscape(
                "the path is a symbolic link, which is never followed".into(),
            ));
        }
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a FIFO (named pipe)",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        _ => "of an unknown kind",
    };
    Err(SandboxError::NotARegularFile(format!(
        "the path is {what}, not a regular file"
    )))
}

fn modified(stat: &FileStat) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(stat.st_mtime)
        .map(|t| t + time::Duration::nanoseconds(stat.st_mtime_nsec))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Workspace {
    /// Opens (creating it if needed) the workspace rooted at `root_path`.
    pub fn open(root_path: &Path) -> Result<Workspace, SandboxError> {
        std::fs::create_dir_all(root_path)?;
        let root = nix::fcntl::open(
            root_path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SandboxError::Io(e.into()))?;
        Ok(Workspace {
            root,
            root_path: root_path.to_path_buf(),
        })
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    fn open_at(&self, path: &SandboxPath, flags: OFlag) -> Result<OwnedFd, SandboxError> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(RESOLVE);
        openat2(&self.root, path.relative().as_str(), how).map_err(map_errno)
    }

    fn open_dir(&self, path: &SandboxPath) -> Result<OwnedFd, SandboxError> {
        self.open_at(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
    }

    /// What is at `path`, not following a final symbolic link.
    pub fn stat(&self, path: &SandboxPath) -> Result<Entry, SandboxError> {
        let Some((parent, name)) = path.split_last() else {
            let stat = fstat(&self.root).map_err(map_errno)?;
            return Ok(entry(".", &stat));
        };
        let parent = self.open_dir(&parent)?;
        let stat = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(map_errno)?;
        Ok(entry(name, &stat))
    }

    /// The entries of a directory, sorted by name.
    pub fn list(&self, path: &SandboxPath) -> Result<Vec<Entry>, SandboxError> {
        let fd = self.open_dir(path)?;
        let stats_fd = fd.try_clone()?;
        let mut dir = Dir::from_fd(fd).map_err(map_errno)?;
        let mut entries = Vec::new();
        for item in dir.iter() {
            let item = item.map_err(map_errno)?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." || name.starts_with(UPLOAD_PREFIX) {
                continue;
            }
            // An entry may vanish while we list: skip it.
            if let Ok(stat) = fstatat(&stats_fd, item.file_name(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                entries.push(entry(&name, &stat));
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Opens a regular file for reading; returns it and its size. Anything
    /// else is refused (`not_a_regular_file`) without waiting on it: the
    /// entry is looked at before it is opened (a device is never opened),
    /// and opened with `O_NONBLOCK`, so a FIFO swapped in meanwhile does not
    /// wait for a writer, then checked again on the descriptor.
    pub fn open_file(&self, path: &SandboxPath) -> Result<(File, u64), SandboxError> {
        let Some((parent, name)) = path.split_last() else {
            return Err(SandboxError::NotARegularFile(
                "the path is the workspace root, a directory, not a regular file".into(),
            ));
        };
        let parent = self.open_dir(&parent)?;
        let stat = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(map_errno)?;
        refuse_unless_regular(&stat)?;
        let fd = nix::fcntl::openat(
            &parent,
            name,
            OFlag::O_RDONLY
                | OFlag::O_NONBLOCK
                | OFlag::O_NOFOLLOW
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| match errno {
            // A socket swapped in meanwhile cannot be opened.
            Errno::ENXIO => {
                SandboxError::NotARegularFile("the path is a socket, not a regular file".into())
            }
            other => map_errno(other),
        })?;
        let stat = fstat(&fd).map_err(map_errno)?;
        refuse_unless_regular(&stat)?;
        // A regular file's reads never wait; the flag is cleared all the
        // same, so the file behaves as any other.
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(map_errno)?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) & !OFlag::O_NONBLOCK),
        )
        .map_err(map_errno)?;
        Ok((File::from(fd), stat.st_size as u64))
    }

    /// Creates the parent directories of `path` and a temporary file next to
    /// it; [`Upload::commit`] renames it into place.
    pub fn start_upload(&self, path: &SandboxPath) -> Result<Upload, SandboxError> {
        let Some((parent, name)) = path.split_last() else {
            return Err(SandboxError::InvalidPath(
                "the path is the workspace itself".into(),
            ));
        };
        if name.starts_with(UPLOAD_PREFIX) {
            return Err(SandboxError::InvalidPath(format!(
                "names starting with {UPLOAD_PREFIX} are reserved"
            )));
        }
        let parent_fd = self.make_dirs(&parent)?;
        let temp_name = format!("{UPLOAD_PREFIX}{}", Uuid::new_v4().simple());
        let file_fd = nix::fcntl::openat(
            &parent_fd,
            temp_name.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(map_errno)?;
        Ok(Upload {
            parent: parent_fd,
            temp_name,
            final_name: name.to_owned(),
            file: Some(File::from(file_fd)),
            committed: false,
        })
    }

    /// `mkdir -p`, one component at a time, each opened beneath the last.
    fn make_dirs(&self, path: &SandboxPath) -> Result<OwnedFd, SandboxError> {
        let mut current = self.open_dir(&SandboxPath::root())?;
        for component in path.components() {
            match mkdirat(
                &current,
                component.as_str(),
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(errno) => return Err(map_errno(errno)),
            }
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(RESOLVE);
            current = openat2(&current, component.as_str(), how).map_err(map_errno)?;
        }
        Ok(current)
    }

    /// Deletes a file, a symbolic link (the link, not its target), a special
    /// file or a directory tree of any depth. Returns (regular files
    /// deleted, bytes freed): what the storage accounting counts. The
    /// workspace root itself is refused.
    pub fn delete(&self, path: &SandboxPath) -> Result<(u64, u64), SandboxError> {
        let Some((parent, name)) = path.split_last() else {
            return Err(SandboxError::InvalidPath(
                "the workspace root cannot be deleted".into(),
            ));
        };
        let parent = self.open_dir(&parent)?;
        let stat = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(map_errno)?;
        if kind_of(&stat) == EntryKind::Directory {
            let name = CString::new(name)
                .map_err(|_| SandboxError::InvalidPath("the path contains a NUL byte".into()))?;
            let walk = remove_tree(&parent, &name)?;
            debug_assert!(walk.peak_open <= MAX_OPEN_DIRS);
            Ok(walk.counts)
        } else {
            unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir).map_err(map_errno)?;
            Ok((regular_files(&stat), regular_size(&stat)))
        }
    }

    /// Gives the workspace (mode 0700) and everything in it, down to
    /// [`MAX_WALK_DEPTH`] levels, to the user commands run as (root only),
    /// walking by descriptors and never following links, so a link planted
    /// by an earlier command cannot redirect the change.
    pub fn hand_over(&self, uid: u32, gid: u32) -> Result<(), SandboxError> {
        let root = self.open_dir(&SandboxPath::root())?;
        let (uid, gid) = (
            nix::unistd::Uid::from_raw(uid),
            nix::unistd::Gid::from_raw(gid),
        );
        nix::unistd::fchown(&root, Some(uid), Some(gid)).map_err(map_errno)?;
        // Only its owner (and the server) may enter: tenants are apart by
        // plain permissions too, not by Landlock alone.
        nix::sys::stat::fchmod(&root, nix::sys::stat::Mode::from_bits_truncate(0o700))
            .map_err(map_errno)?;
        let walk = chown_tree(root, uid, gid)?;
        debug_assert!(walk.peak_open <= MAX_OPEN_DIRS);
        if walk.truncated {
            tracing::warn!(
                workspace = %self.root_path.display(),
                max_depth = MAX_WALK_DEPTH,
                "the workspace is deeper than a walk goes: deeper entries were not handed over"
            );
        }
        Ok(())
    }

    /// Bytes and number of regular files in the workspace: a full walk,
    /// done when a workspace is first used and after each run (and kept
    /// current incrementally in between). A workspace deeper than
    /// [`MAX_WALK_DEPTH`] or with more than [`MAX_USAGE_ENTRIES`] entries
    /// is not walked to the end: its usage is [`Usage::incomplete`].
    pub fn usage(&self) -> Result<Usage, SandboxError> {
        let root = self.open_dir(&SandboxPath::root())?;
        let walk = usage_of(root, MAX_USAGE_ENTRIES)?;
        debug_assert!(walk.peak_open <= MAX_OPEN_DIRS);
        if walk.truncated {
            tracing::warn!(
                workspace = %self.root_path.display(),
                max_depth = MAX_WALK_DEPTH,
                max_entries = MAX_USAGE_ENTRIES,
                "the workspace is deeper or larger than a walk goes: its usage counts as over quota"
            );
        }
        let (bytes, files) = walk.counts;
        Ok(Usage {
            bytes,
            files,
            incomplete: walk.truncated,
        })
    }
}

fn entry(name: &str, stat: &FileStat) -> Entry {
    Entry {
        name: name.to_owned(),
        kind: kind_of(stat),
        size: stat.st_size as u64,
        modified: modified(stat),
    }
}

fn regular_files(stat: &FileStat) -> u64 {
    u64::from(kind_of(stat) == EntryKind::File)
}

fn regular_size(stat: &FileStat) -> u64 {
    if kind_of(stat) == EntryKind::File {
        stat.st_size as u64
    } else {
        0
    }
}

/// What a regular file costs the storage quota: its size, or the blocks it
/// holds beyond its size rounded up to whole blocks, when more (space kept
/// by `fallocate --keep-size` shows in no size; a sparse file counts at its
/// size).
fn charged_bytes(stat: &FileStat) -> u64 {
    const BLOCK: u64 = 4096;
    let size = stat.st_size as u64;
    let allocated = (stat.st_blocks as u64).saturating_mul(512);
    let rounded = size.div_ceil(BLOCK).saturating_mul(BLOCK);
    if allocated > rounded {
        size + (allocated - rounded)
    } else {
        size
    }
}

mod upload;
mod walk;

#[cfg(test)]
mod tests;

pub use upload::{Replaced, Upload};
use walk::{chown_tree, remove_tree, usage_of};
