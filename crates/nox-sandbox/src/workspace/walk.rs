//! Tree walks over descriptors: usage, hand-over (chown) and delete, as
//! loops over an explicit stack of at most [`MAX_OPEN_DIRS`] descriptors,
//! never following a link.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, renameat};
use nix::sys::stat::{Mode, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use uuid::Uuid;

use super::*;

pub(super) fn open_child_dir(parent: &impl AsFd, name: &CStr) -> Result<OwnedFd, SandboxError> {
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
pub(super) fn child_names(dir: OwnedFd, limit: u64) -> Result<(Vec<CString>, bool), SandboxError> {
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
pub(super) struct Walked {
    /// Usage: (bytes, regular files); delete: (regular files, bytes).
    pub(super) counts: (u64, u64),
    /// The walk did not see everything: a directory at the depth limit
    /// was not entered, or (usage) the entry budget ran out.
    pub(super) truncated: bool,
    /// The most descriptors the walk held at once.
    pub(super) peak_open: usize,
}

/// One directory on a walk's path.
pub(super) struct Frame {
    /// `None` while closed to keep within [`MAX_OPEN_DIRS`].
    pub(super) fd: Option<OwnedFd>,
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// Its name in its parent.
    pub(super) name: CString,
    /// Entries still to visit.
    pub(super) pending: Vec<CString>,
}

/// The directories from a walk's start down to where it is: a loop over
/// this replaces a recursion, so no tree can exhaust the thread's stack,
/// and it holds at most [`MAX_OPEN_DIRS`] descriptors. The start and the
/// deepest directories stay open; the shallowest others are closed as the
/// walk goes deeper and reopened as `..` of their child on the way back,
/// checked to be the very directory left (device and inode), so a tree
/// moved meanwhile stops the walk instead of leading it elsewhere.
pub(super) struct DirStack {
    pub(super) frames: Vec<Frame>,
    /// Frames from this index (never the start's) to the top are open.
    pub(super) oldest_open: usize,
    pub(super) open: usize,
    pub(super) peak_open: usize,
    /// Names the walk may still read, over all its directories.
    pub(super) names_left: u64,
    /// A directory held more names than were left to read.
    pub(super) exhausted: bool,
}

impl DirStack {
    /// A walk from `start` that reads no more than `max_names` names in all
    /// (`u64::MAX`: no bound).
    pub(super) fn new(
        start: OwnedFd,
        name: CString,
        max_names: u64,
    ) -> Result<DirStack, SandboxError> {
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
    pub(super) fn depth(&self) -> usize {
        self.frames.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The directory being visited; always open.
    pub(super) fn top(&self) -> &OwnedFd {
        self.frames
            .last()
            .and_then(|frame| frame.fd.as_ref())
            .expect("the top of a walk is open")
    }

    /// The walk's starting directory; always open.
    pub(super) fn start(&self) -> &OwnedFd {
        self.frames
            .first()
            .and_then(|frame| frame.fd.as_ref())
            .expect("the start of a walk is open")
    }

    /// The next entry of the directory being visited, if any is left.
    pub(super) fn next_child(&mut self) -> Option<CString> {
        self.frames.last_mut()?.pending.pop()
    }

    pub(super) fn note_open(&mut self, transient: usize) {
        self.peak_open = self.peak_open.max(self.open + transient);
    }

    /// Enters `fd`, the directory `name` of the one being visited (its
    /// descriptor counts from the moment it was opened).
    pub(super) fn push(&mut self, name: CString, fd: OwnedFd) -> Result<(), SandboxError> {
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
    pub(super) fn leave(&mut self) -> Result<CString, SandboxError> {
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

/// How many times a delete reads again a directory that gained entries
/// while it was being emptied.
const MAX_DELETE_REREADS: u32 = 8;

/// Removes `name` (a directory) under `parent` and everything in it, at any
/// depth, through descriptors only: links inside are removed, never
/// followed. Counts (regular files, bytes).
pub(super) fn remove_tree(parent: &OwnedFd, name: &CStr) -> Result<Walked, SandboxError> {
    let dir = open_child_dir(parent, name)?;
    let mut stack = DirStack::new(dir, name.to_owned(), u64::MAX)?;
    let (mut files, mut bytes) = (0, 0);
    let mut rereads = 0;
    while !stack.is_empty() {
        let Some(child) = stack.next_child() else {
            let done = stack.leave()?;
            let holder = if stack.is_empty() {
                parent
            } else {
                stack.top()
            };
            match unlinkat(holder, done.as_c_str(), UnlinkatFlags::RemoveDir) {
                // Entries arrived after the directory was read (a command
                // still running in the workspace): read it again, a few
                // times at most (then ENOTEMPTY is the caller's refusal).
                Err(Errno::ENOTEMPTY) if rereads < MAX_DELETE_REREADS => {
                    rereads += 1;
                    let again = open_child_dir(holder, &done)?;
                    stack.push(done, again)?;
                }
                result => result.map_err(map_errno)?,
            }
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
pub(super) fn chown_tree(
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
pub(super) fn usage_of(root: OwnedFd, max_entries: u64) -> Result<Walked, SandboxError> {
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
