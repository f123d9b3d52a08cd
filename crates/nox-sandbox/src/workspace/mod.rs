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

use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
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

fn open_child_dir(parent: &impl AsFd, name: &CStr) -> Result<OwnedFd, SandboxError> {
    nix::fcntl::openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(map_errno)
}

/// The names in `dir`, at most `limit` of them; true when there were more
/// (so a directory of millions of entries costs no more memory than the
/// walk's budget).
fn child_names(dir: OwnedFd, limit: u64) -> Result<(Vec<CString>, bool), SandboxError> {
    let mut dir = Dir::from_fd(dir).map_err(map_errno)?;
    let mut names = Vec::new();
    for item in dir.iter() {
        let item = item.map_err(map_errno)?;
        let name = item.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            if names.len() as u64 == limit {
                return Ok((names, true));
            }
            names.push(name.to_owned());
        }
    }
    Ok((names, false))
}

/// What a walk found, and how it went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Walked {
    /// Usage: (bytes, regular files); delete: (regular files, bytes).
    counts: (u64, u64),
    /// The walk did not see everything: a directory at the depth limit
    /// was not entered, or (usage) the entry budget ran out.
    truncated: bool,
    /// The most descriptors the walk held at once.
    peak_open: usize,
}

/// One directory on a walk's path.
struct Frame {
    /// `None` while closed to keep within [`MAX_OPEN_DIRS`].
    fd: Option<OwnedFd>,
    dev: u64,
    ino: u64,
    /// Its name in its parent.
    name: CString,
    /// Entries still to visit.
    pending: Vec<CString>,
}

/// The directories from a walk's start down to where it is: a loop over
/// this replaces a recursion, so no tree can exhaust the thread's stack,
/// and it holds at most [`MAX_OPEN_DIRS`] descriptors. The start and the
/// deepest directories stay open; the shallowest others are closed as the
/// walk goes deeper and reopened as `..` of their child on the way back,
/// checked to be the very directory left (device and inode), so a tree
/// moved meanwhile stops the walk instead of leading it elsewhere.
struct DirStack {
    frames: Vec<Frame>,
    /// Frames from this index (never the start's) to the top are open.
    oldest_open: usize,
    open: usize,
    peak_open: usize,
    /// Names the walk may still read, over all its directories.
    names_left: u64,
    /// A directory held more names than were left to read.
    exhausted: bool,
}

impl DirStack {
    /// A walk from `start` that reads no more than `max_names` names in all
    /// (`u64::MAX`: no bound).
    fn new(start: OwnedFd, name: CString, max_names: u64) -> Result<DirStack, SandboxError> {
        let mut stack = DirStack {
            frames: Vec::new(),
            oldest_open: 1,
            open: 0,
            peak_open: 0,
            names_left: max_names,
            exhausted: false,
        };
        stack.push(name, start)?;
        Ok(stack)
    }

    /// How many directories are on the path (the start's included).
    fn depth(&self) -> usize {
        self.frames.len()
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The directory being visited; always open.
    fn top(&self) -> &OwnedFd {
        self.frames
            .last()
            .and_then(|frame| frame.fd.as_ref())
            .expect("the top of a walk is open")
    }

    /// The walk's starting directory; always open.
    fn start(&self) -> &OwnedFd {
        self.frames
            .first()
            .and_then(|frame| frame.fd.as_ref())
            .expect("the start of a walk is open")
    }

    /// The next entry of the directory being visited, if any is left.
    fn next_child(&mut self) -> Option<CString> {
        self.frames.last_mut()?.pending.pop()
    }

    fn note_open(&mut self, transient: usize) {
        self.peak_open = self.peak_open.max(self.open + transient);
    }

    /// Enters `fd`, the directory `name` of the one being visited (its
    /// descriptor counts from the moment it was opened).
    fn push(&mut self, name: CString, fd: OwnedFd) -> Result<(), SandboxError> {
        self.open += 1;
        self.note_open(0);
        if self.open > MAX_OPEN_DIRS - 1 {
            // The new one is not a frame yet: the oldest is below it.
            let oldest = self.oldest_open.max(1);
            debug_assert!(oldest < self.frames.len());
            self.frames[oldest].fd = None;
            self.oldest_open = oldest + 1;
            self.open -= 1;
        }
        let stat = fstat(&fd).map_err(map_errno)?;
        let names = fd.try_clone()?;
        self.note_open(1);
        let (pending, more) = child_names(names, self.names_left)?;
        self.names_left -= pending.len() as u64;
        self.exhausted |= more;
        self.frames.push(Frame {
            fd: Some(fd),
            dev: stat.st_dev,
            ino: stat.st_ino,
            name,
            pending,
        });
        Ok(())
    }

    /// Leaves the directory being visited, whose entries are all done;
    /// returns its name. Its parent (unless it was the start) is visited
    /// again, reopened if it had been closed.
    fn leave(&mut self) -> Result<CString, SandboxError> {
        let child = self.frames.pop().expect("a directory to leave");
        let child_fd = child.fd.expect("the top of a walk is open");
        let index = self.frames.len().saturating_sub(1);
        match self.frames.last_mut() {
            Some(parent) if parent.fd.is_none() => {
                let fd = open_child_dir(&child_fd, c"..")?;
                self.peak_open = self.peak_open.max(self.open + 1);
                let stat = fstat(&fd).map_err(map_errno)?;
                if (stat.st_dev, stat.st_ino) != (parent.dev, parent.ino) {
                    return Err(SandboxError::InvalidPath(
                        "the tree was moved while it was walked; retry".into(),
                    ));
                }
                parent.fd = Some(fd);
                self.oldest_open = index;
            }
            _ => self.open -= 1,
        }
        Ok(child.name)
    }
}

/// Removes `name` (a directory) under `parent` and everything in it, at any
/// depth, through descriptors only: links inside are removed, never
/// followed. Counts (regular files, bytes).
fn remove_tree(parent: &OwnedFd, name: &CStr) -> Result<Walked, SandboxError> {
    let dir = open_child_dir(parent, name)?;
    let mut stack = DirStack::new(dir, name.to_owned(), u64::MAX)?;
    let (mut files, mut bytes) = (0, 0);
    while !stack.is_empty() {
        let Some(child) = stack.next_child() else {
            let done = stack.leave()?;
            let holder = if stack.is_empty() {
                parent
            } else {
                stack.top()
            };
            unlinkat(holder, done.as_c_str(), UnlinkatFlags::RemoveDir).map_err(map_errno)?;
            continue;
        };
        let dir = stack.top();
        let stat = match fstatat(dir, child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => continue,
            Err(errno) => return Err(map_errno(errno)),
        };
        if kind_of(&stat) != EntryKind::Directory {
            match unlinkat(dir, child.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) => {
                    files += regular_files(&stat);
                    bytes += regular_size(&stat);
                }
                Err(Errno::ENOENT) => {}
                Err(errno) => return Err(map_errno(errno)),
            }
        } else if stack.depth() >= DELETE_HOIST_DEPTH {
            // Deeper than the stack goes: move the subtree up to the top of
            // the deleted directory and delete it from there.
            let hoisted = CString::new(format!("{DELETE_PREFIX}{}", Uuid::new_v4().simple()))
                .expect("no NUL in a generated name");
            renameat(dir, child.as_c_str(), stack.start(), hoisted.as_c_str())
                .map_err(map_errno)?;
            stack.frames[0].pending.push(hoisted);
        } else {
            match open_child_dir(dir, &child) {
                Ok(sub) => stack.push(child, sub)?,
                Err(SandboxError::NotFound) => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(Walked {
        counts: (files, bytes),
        truncated: false,
        peak_open: stack.peak_open,
    })
}

/// Gives every entry below `root`, down to [`MAX_WALK_DEPTH`] levels, to
/// `uid`:`gid`, never following a link.
fn chown_tree(
    root: OwnedFd,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
) -> Result<Walked, SandboxError> {
    let mut stack = DirStack::new(root, CString::default(), MAX_USAGE_ENTRIES)?;
    let mut truncated = false;
    while !stack.is_empty() {
        let Some(child) = stack.next_child() else {
            stack.leave()?;
            continue;
        };
        let dir = stack.top();
        let Ok(stat) = fstatat(dir, child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        if stat.st_uid != uid.as_raw() || stat.st_gid != gid.as_raw() {
            match nix::unistd::fchownat(
                dir,
                child.as_c_str(),
                Some(uid),
                Some(gid),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(errno) => return Err(map_errno(errno)),
            }
        }
        if kind_of(&stat) == EntryKind::Directory {
            if stack.depth() >= MAX_WALK_DEPTH {
                truncated = true;
            } else if let Ok(sub) = open_child_dir(dir, &child) {
                stack.push(child, sub)?;
            }
        }
    }
    Ok(Walked {
        counts: (0, 0),
        truncated: truncated || stack.exhausted,
        peak_open: stack.peak_open,
    })
}

/// (bytes, regular files) below `root`. Stops, truncated, at a directory
/// deeper than [`MAX_WALK_DEPTH`] levels or once `max_entries` entries
/// were looked at: the counts are then lower bounds.
fn usage_of(root: OwnedFd, max_entries: u64) -> Result<Walked, SandboxError> {
    let mut stack = DirStack::new(root, CString::default(), max_entries)?;
    let (mut bytes, mut files) = (0, 0);
    let mut entries = 0;
    let mut truncated = false;
    while !stack.is_empty() {
        let Some(child) = stack.next_child() else {
            stack.leave()?;
            continue;
        };
        // Uploads in progress count once they are kept, not before.
        if child.to_bytes().starts_with(UPLOAD_PREFIX.as_bytes()) {
            continue;
        }
        if entries == max_entries {
            truncated = true;
            break;
        }
        entries += 1;
        let dir = stack.top();
        let Ok(stat) = fstatat(dir, child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        match kind_of(&stat) {
            // Nothing below is counted: the whole walk is incomplete.
            EntryKind::Directory if stack.depth() >= MAX_WALK_DEPTH => {
                truncated = true;
                break;
            }
            EntryKind::Directory => {
                if let Ok(sub) = open_child_dir(dir, &child) {
                    stack.push(child, sub)?;
                }
            }
            EntryKind::File => {
                bytes += charged_bytes(&stat);
                files += 1;
            }
            _ => {}
        }
    }
    Ok(Walked {
        counts: (bytes, files),
        truncated: truncated || stack.exhausted,
        peak_open: stack.peak_open,
    })
}

/// An upload in progress: a temporary file beside its destination.
#[derive(Debug)]
pub struct Upload {
    parent: OwnedFd,
    temp_name: String,
    final_name: String,
    file: Option<File>,
    committed: bool,
}

/// What an upload replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replaced {
    /// Size of the file it replaced, if any.
    pub previous_size: Option<u64>,
}

impl Upload {
    /// Takes the file out (to write it asynchronously); put it back with
    /// [`Upload::put_file`] before committing.
    pub fn take_file(&mut self) -> Option<File> {
        self.file.take()
    }

    pub fn put_file(&mut self, file: File) {
        self.file = Some(file);
    }

    /// Flushes the data to disk. Blocking. [`Upload::commit`] does it too
    /// if it was not done before.
    pub fn sync(&mut self) -> Result<(), SandboxError> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
        }
        Ok(())
    }

    /// The size of the regular file the upload would replace, if any (a
    /// special file of that name, a FIFO say, is replaced without ever being
    /// opened, and was not counted as a file). A directory or a symbolic
    /// link of that name refuses the upload.
    pub fn replacing(&self) -> Result<Option<u64>, SandboxError> {
        match fstatat(
            &self.parent,
            self.final_name.as_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) if kind_of(&stat) == EntryKind::Directory => Err(SandboxError::InvalidPath(
                "a directory exists at that path".into(),
            )),
            Ok(stat) if kind_of(&stat) == EntryKind::Symlink => Err(SandboxError::PathEscape(
                "a symbolic link exists at that path; links are never written through or replaced"
                    .into(),
            )),
            Ok(stat) if kind_of(&stat) == EntryKind::File => Ok(Some(regular_size(&stat))),
            Ok(_) | Err(Errno::ENOENT) => Ok(None),
            Err(errno) => Err(map_errno(errno)),
        }
    }

    /// Flushes the data to disk and renames the file into place, replacing
    /// a regular file of that name. Blocking.
    pub fn commit(mut self) -> Result<Replaced, SandboxError> {
        self.sync()?;
        let previous = self.replacing()?;
        renameat(
            &self.parent,
            self.temp_name.as_str(),
            &self.parent,
            self.final_name.as_str(),
        )
        .map_err(map_errno)?;
        self.committed = true;
        Ok(Replaced {
            previous_size: previous,
        })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            // Nothing of a refused or failed upload stays behind.
            let _ = unlinkat(
                &self.parent,
                self.temp_name.as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use nix::unistd::{Gid, Uid};

    use super::*;

    /// Depth of the chains below: far deeper than a recursion with a
    /// descriptor per level could go with a default stack or descriptor
    /// limit, and deeper than [`MAX_WALK_DEPTH`].
    const DEEP: usize = 10_000;

    /// A temporary workspace whose tree is removed by [`remove_tree`]
    /// before the directory is: `std::fs::remove_dir_all` recurses.
    struct Scratch {
        dir: tempfile::TempDir,
        workspace: Workspace,
    }

    impl Scratch {
        fn new() -> Scratch {
            let dir = tempfile::tempdir().expect("tempdir");
            let workspace = Workspace::open(&dir.path().join("ws")).expect("workspace");
            Scratch { dir, workspace }
        }

        fn root(&self) -> OwnedFd {
            self.workspace.open_dir(&SandboxPath::root()).expect("root")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let root = self.root();
            let (names, _) = child_names(root.try_clone().expect("dup"), u64::MAX).expect("names");
            for name in names {
                let _ = remove_tree(&root, &name);
            }
        }
    }

    /// The directory `levels` levels down a chain of `d`s.
    fn descend(root: &OwnedFd, levels: usize) -> OwnedFd {
        let mut dir = root.try_clone().expect("dup");
        for _ in 0..levels {
            dir = open_child_dir(&dir, c"d").expect("a level of the chain");
        }
        dir
    }

    fn write_at(dir: &OwnedFd, name: &CStr, bytes: &[u8]) {
        let fd = nix::fcntl::openat(
            dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .expect("create");
        std::io::Write::write_all(&mut File::from(fd), bytes).expect("write");
    }

    /// A chain `d/d/…` `depth` deep under `root`, made level by level with
    /// `mkdirat` and `openat` (its paths are far beyond `PATH_MAX`). Inside
    /// the directory at each level in `files_in` (1 is `d`), a file `f` of
    /// as many bytes as its level.
    fn chain(root: &OwnedFd, depth: usize, files_in: &[usize]) {
        let mut dir = root.try_clone().expect("dup");
        for level in 1..=depth {
            mkdirat(&dir, c"d", Mode::from_bits_truncate(0o755)).expect("mkdirat");
            dir = open_child_dir(&dir, c"d").expect("openat");
            if files_in.contains(&level) {
                write_at(&dir, c"f", &vec![b'x'; level]);
            }
        }
    }

    fn owner(dir: &OwnedFd, name: &CStr) -> (u32, u32) {
        let stat = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).expect("stat");
        (stat.st_uid, stat.st_gid)
    }

    #[test]
    fn usage_counts_a_tree_to_the_depth_limit_and_fails_closed_below() {
        // Directories down to level 4095 are entered: files at levels 2,
        // 101 and 4096 (in the 4095th directory) are counted.
        let within = Scratch::new();
        let root = within.root();
        let limit = MAX_WALK_DEPTH;
        chain(&root, limit - 1, &[1, 100, limit - 1]);
        write_at(&root, c"top", b"1234");
        let walked = usage_of(root.try_clone().expect("dup"), u64::MAX).expect("usage");
        let counted = [1, 100, limit - 1].iter().sum::<usize>() as u64 + 4;
        assert_eq!((walked.counts, walked.truncated), ((counted, 4), false));
        assert!(
            walked.peak_open <= MAX_OPEN_DIRS,
            "{} descriptors",
            walked.peak_open
        );
        let usage = within.workspace.usage().expect("usage");
        assert_eq!(
            (usage.bytes, usage.files, usage.incomplete),
            (counted, 4, false)
        );

        // One level more, and what is below is not walked: the whole usage
        // is incomplete, whatever the counts so far.
        let deeper = Scratch::new();
        chain(&deeper.root(), DEEP, &[1, limit, DEEP]);
        let walked = usage_of(deeper.root(), u64::MAX).expect("usage");
        assert!(walked.truncated);
        assert!(
            walked.peak_open <= MAX_OPEN_DIRS,
            "{} descriptors",
            walked.peak_open
        );
        assert!(deeper.workspace.usage().expect("usage").incomplete);

        // A shallow tree is walked whole, without reopening anything.
        let shallow = Scratch::new();
        chain(&shallow.root(), 5, &[5]);
        let walked = usage_of(shallow.root(), u64::MAX).expect("usage");
        assert_eq!((walked.counts, walked.truncated), ((5, 1), false));
    }

    #[test]
    fn usage_stops_at_its_entry_budget() {
        let scratch = Scratch::new();
        let root = scratch.root();
        // Ten entries: the directory `d` (the chain), `d/f` and eight files.
        chain(&root, 1, &[1]);
        for name in [c"1", c"2", c"3", c"4", c"5", c"6", c"7", c"8"] {
            write_at(&root, name, b"x");
        }
        let whole = usage_of(scratch.root(), 10).expect("usage");
        assert_eq!((whole.counts, whole.truncated), ((9, 9), false));
        let cut = usage_of(scratch.root(), 9).expect("usage");
        assert!(cut.truncated, "{cut:?}");
    }

    #[test]
    fn a_huge_directory_is_read_no_further_than_the_budget() {
        let scratch = Scratch::new();
        let root = scratch.root();
        for index in 0..50 {
            write_at(
                &root,
                &CString::new(format!("f{index}")).expect("name"),
                b"x",
            );
        }
        let stack = DirStack::new(scratch.root(), CString::default(), 10).expect("stack");
        assert!(stack.exhausted);
        assert_eq!(stack.frames[0].pending.len(), 10, "names held");
        let cut = usage_of(scratch.root(), 10).expect("usage");
        assert!(cut.truncated, "{cut:?}");
        let whole = usage_of(scratch.root(), 50).expect("usage");
        assert_eq!((whole.counts, whole.truncated), ((50, 50), false));
    }

    #[test]
    fn space_kept_beyond_a_files_size_counts() {
        let scratch = Scratch::new();
        let root = scratch.root();
        write_at(&root, c"small", b"12345");
        write_at(&root, c"kept", b"");
        let kept =
            nix::fcntl::openat(&root, c"kept", OFlag::O_WRONLY, Mode::empty()).expect("open");
        // `fallocate --keep-size`: blocks held, size still 0.
        let held = nix::fcntl::fallocate(
            &kept,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            8 * 1024 * 1024,
        );
        if held.is_err() {
            eprintln!("skipped: this filesystem cannot keep space beyond a file's size");
            return;
        }
        let walked = usage_of(scratch.root(), u64::MAX).expect("usage");
        let (bytes, files) = walked.counts;
        assert_eq!(files, 2);
        assert!(
            (8 * 1024 * 1024 + 5..=8 * 1024 * 1024 + 4096 + 5).contains(&bytes),
            "{bytes}: the 8 MiB held count, the small file at its size"
        );
    }

    #[test]
    fn hand_over_walks_a_deep_tree_to_the_depth_limit_never_following_links() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: changing owners needs root");
            return;
        }
        let scratch = Scratch::new();
        let root = scratch.root();
        chain(&root, DEEP, &[limit_minus_one(), MAX_WALK_DEPTH]);
        // A link deep inside, to a file outside the workspace.
        let outside = scratch.dir.path().join("outside");
        std::fs::write(&outside, b"not yours").expect("outside");
        let before = std::fs::metadata(&outside).expect("meta");
        let deep = descend(&root, 3000);
        nix::unistd::symlinkat(&outside, &deep, c"link").expect("symlinkat");
        drop(deep);

        let (uid, gid) = (Uid::from_raw(65534), Gid::from_raw(65534));
        let walked = chown_tree(root.try_clone().expect("dup"), uid, gid).expect("hand over");
        assert!(walked.truncated);
        assert!(
            walked.peak_open <= MAX_OPEN_DIRS,
            "{} descriptors",
            walked.peak_open
        );
        scratch
            .workspace
            .hand_over(65534, 65534)
            .expect("hand over");

        let given = (65534, 65534);
        assert_eq!(owner(&descend(&root, 3000), c"link"), given);
        let after = std::fs::metadata(&outside).expect("meta");
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        // Entries down to the limit are handed over, deeper ones are not.
        let last = descend(&root, MAX_WALK_DEPTH - 1);
        assert_eq!(owner(&last, c"f"), given);
        assert_eq!(owner(&last, c"d"), given);
        let below = descend(&last, 1);
        assert_eq!(owner(&below, c"f"), (0, 0));
        assert_eq!(owner(&below, c"d"), (0, 0));
    }

    fn limit_minus_one() -> usize {
        MAX_WALK_DEPTH - 1
    }

    #[test]
    fn delete_removes_a_tree_of_any_depth_with_few_descriptors() {
        let scratch = Scratch::new();
        let root = scratch.root();
        let with_files = [1, 29, 30, 31, 500, 5_000, DEEP];
        chain(&root, DEEP, &with_files);
        // Besides the chain: a side branch, a link out, a FIFO, deep down.
        let outside = scratch.dir.path().join("outside");
        std::fs::write(&outside, b"kept").expect("outside");
        let deep = descend(&root, 7_000);
        mkdirat(&deep, c"side", Mode::from_bits_truncate(0o755)).expect("side");
        write_at(&open_child_dir(&deep, c"side").expect("side"), c"g", b"12");
        nix::unistd::symlinkat(&outside, &deep, c"link").expect("symlinkat");
        nix::unistd::mkfifoat(&deep, c"fifo", Mode::from_bits_truncate(0o644)).expect("mkfifo");
        drop(deep);
        write_at(&root, c"kept", b"kept");

        let walked = remove_tree(&root, c"d").expect("delete");
        let bytes = with_files.iter().sum::<usize>() as u64 + 2;
        assert_eq!(walked.counts, (with_files.len() as u64 + 1, bytes));
        assert!(
            walked.peak_open <= MAX_OPEN_DIRS,
            "{} descriptors",
            walked.peak_open
        );
        assert_eq!(
            child_names(root.try_clone().expect("dup"), u64::MAX).expect("names"),
            (vec![CString::from(c"kept")], false),
            "the chain is gone, and nothing it was moved through is left"
        );
        assert_eq!(std::fs::read(&outside).expect("outside"), b"kept");

        // Through the public call, as `/delete` makes it.
        chain(&root, DEEP, &[DEEP]);
        let deleted = scratch
            .workspace
            .delete(&SandboxPath::parse("d").expect("path"))
            .expect("delete");
        assert_eq!(deleted, (1, DEEP as u64));
        assert!(fstatat(&root, c"d", AtFlags::AT_SYMLINK_NOFOLLOW).is_err());
    }

    #[test]
    fn a_walk_stops_when_a_closed_parent_was_moved_away() {
        let scratch = Scratch::new();
        let root = scratch.root();
        let depth = MAX_OPEN_DIRS + 8;
        chain(&root, depth, &[]);
        let mut stack = DirStack::new(root.try_clone().expect("dup"), CString::default(), u64::MAX)
            .expect("stack");
        while stack.depth() <= depth {
            let sub = open_child_dir(stack.top(), c"d").expect("down");
            stack.push(CString::from(c"d"), sub).expect("push");
        }
        assert!(stack.peak_open <= MAX_OPEN_DIRS);
        assert!(stack.frames[5].fd.is_none(), "shallow levels are closed");
        // Level 5 (closed) goes elsewhere: its `..` is no longer level 4.
        let level4 = descend(&root, 4);
        renameat(&level4, c"d", &root, c"moved").expect("move");
        let error = loop {
            match stack.leave() {
                Ok(_) => assert!(stack.depth() > 5, "left level 5 into the wrong parent"),
                Err(error) => break error,
            }
        };
        assert!(
            matches!(&error, SandboxError::InvalidPath(detail) if detail.contains("moved")),
            "{error}"
        );
    }

    #[test]
    fn only_regular_files_are_opened_for_reading() {
        let scratch = Scratch::new();
        let root = scratch.root();
        write_at(&root, c"file", b"abc");
        mkdirat(&root, c"dir", Mode::from_bits_truncate(0o755)).expect("dir");
        nix::unistd::mkfifoat(&root, c"fifo", Mode::from_bits_truncate(0o644)).expect("mkfifo");
        let _socket =
            std::os::unix::net::UnixListener::bind(scratch.workspace.root_path().join("socket"))
                .expect("socket");
        let open = |path: &str| {
            scratch
                .workspace
                .open_file(&SandboxPath::parse(path).expect("path"))
        };
        let (mut file, size) = open("file").expect("a regular file");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).expect("read");
        assert_eq!((text.as_str(), size), ("abc", 3));
        let flags = fcntl(&file, FcntlArg::F_GETFL).expect("flags");
        assert!(!OFlag::from_bits_retain(flags).contains(OFlag::O_NONBLOCK));
        for path in ["dir", "fifo", "socket", "/"] {
            assert!(
                matches!(open(path), Err(SandboxError::NotARegularFile(_))),
                "{path}"
            );
        }
    }
}
