//! File operations confined to one workspace by the kernel.
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! from a descriptor of the workspace root: resolution can neither leave the
//! workspace nor follow a symbolic link, whatever is swapped in while a
//! request runs. Names are then used relative to descriptors (`*at` calls),
//! never re-resolved from strings. Deleting works on the link itself.
//! All of this blocks: call it from a blocking thread.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::SandboxError;
use crate::path::SandboxPath;

/// Prefix of in-progress uploads; such names are refused from clients.
pub const UPLOAD_PREFIX: &str = ".nox-upload-";

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_BENEATH.union(ResolveFlag::RESOLVE_NO_SYMLINKS);

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

    /// Opens a regular file for reading; returns it and its size.
    pub fn open_file(&self, path: &SandboxPath) -> Result<(File, u64), SandboxError> {
        if path.is_root() {
            return Err(SandboxError::InvalidPath("the path is a directory".into()));
        }
        let fd = self.open_at(path, OFlag::O_RDONLY)?;
        let stat = fstat(&fd).map_err(map_errno)?;
        match kind_of(&stat) {
            EntryKind::File => Ok((File::from(fd), stat.st_size as u64)),
            EntryKind::Directory => {
                Err(SandboxError::InvalidPath("the path is a directory".into()))
            }
            _ => Err(SandboxError::InvalidPath(
                "the path is not a regular file".into(),
            )),
        }
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

    /// Deletes a file, a symbolic link (the link, not its target) or a
    /// directory tree. Returns (files deleted, bytes freed). The workspace
    /// root itself is refused.
    pub fn delete(&self, path: &SandboxPath) -> Result<(u64, u64), SandboxError> {
        let Some((parent, name)) = path.split_last() else {
            return Err(SandboxError::InvalidPath(
                "the workspace root cannot be deleted".into(),
            ));
        };
        let parent = self.open_dir(&parent)?;
        let stat = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(map_errno)?;
        if kind_of(&stat) == EntryKind::Directory {
            remove_tree(&parent, name)
        } else {
            unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir).map_err(map_errno)?;
            Ok((1, regular_size(&stat)))
        }
    }

    /// Gives the workspace and everything in it to the user commands run as
    /// (root only), walking by descriptors and never following links, so a
    /// link planted by an earlier command cannot redirect the change.
    pub fn hand_over(&self, uid: u32, gid: u32) -> Result<(), SandboxError> {
        let root = self.open_dir(&SandboxPath::root())?;
        let (uid, gid) = (
            nix::unistd::Uid::from_raw(uid),
            nix::unistd::Gid::from_raw(gid),
        );
        nix::unistd::fchown(&root, Some(uid), Some(gid)).map_err(map_errno)?;
        chown_tree(root, uid, gid)
    }

    /// Bytes and number of regular files in the whole workspace (a full
    /// walk: used once per workspace, then kept current incrementally).
    pub fn usage(&self) -> Result<(u64, u64), SandboxError> {
        let root = self.open_dir(&SandboxPath::root())?;
        usage_of(root)
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

fn regular_size(stat: &FileStat) -> u64 {
    if kind_of(stat) == EntryKind::File {
        stat.st_size as u64
    } else {
        0
    }
}

fn open_child_dir(parent: &impl AsFd, name: &str) -> Result<OwnedFd, SandboxError> {
    nix::fcntl::openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(map_errno)
}

fn child_names(dir: OwnedFd) -> Result<Vec<std::ffi::CString>, SandboxError> {
    let mut dir = Dir::from_fd(dir).map_err(map_errno)?;
    let mut names = Vec::new();
    for item in dir.iter() {
        let item = item.map_err(map_errno)?;
        let name = item.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Removes `name` (a directory) under `parent` and everything in it,
/// through descriptors only: links inside are removed, never followed.
fn remove_tree(parent: &OwnedFd, name: &str) -> Result<(u64, u64), SandboxError> {
    let dir = open_child_dir(parent, name)?;
    let (mut files, mut bytes) = (0, 0);
    for child in child_names(dir.try_clone()?)? {
        let stat = match fstatat(&dir, child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => continue,
            Err(errno) => return Err(map_errno(errno)),
        };
        if kind_of(&stat) == EntryKind::Directory {
            let child = child.to_string_lossy().into_owned();
            let (f, b) = remove_tree(&dir, &child)?;
            files += f;
            bytes += b;
        } else {
            unlinkat(&dir, child.as_c_str(), UnlinkatFlags::NoRemoveDir).map_err(map_errno)?;
            files += 1;
            bytes += regular_size(&stat);
        }
    }
    unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(map_errno)?;
    Ok((files, bytes))
}

fn chown_tree(
    dir: OwnedFd,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
) -> Result<(), SandboxError> {
    for child in child_names(dir.try_clone()?)? {
        let Ok(stat) = fstatat(&dir, child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        if stat.st_uid != uid.as_raw() || stat.st_gid != gid.as_raw() {
            nix::unistd::fchownat(
                &dir,
                child.as_c_str(),
                Some(uid),
                Some(gid),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(map_errno)?;
        }
        if kind_of(&stat) == EntryKind::Directory
            && let Ok(sub) = open_child_dir(&dir, &child.to_string_lossy())
        {
            chown_tree(sub, uid, gid)?;
        }
    }
    Ok(())
}

fn usage_of(dir: OwnedFd) -> Result<(u64, u64), SandboxError> {
    let (mut bytes, mut files) = (0, 0);
    for child in child_names(dir.try_clone()?)? {
        // Uploads in progress count once they are kept, not before.
        if child.to_bytes().starts_with(UPLOAD_PREFIX.as_bytes()) {
            continue;
        }
        let Ok(stat) = fstatat(&dir, child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        match kind_of(&stat) {
            EntryKind::Directory => {
                if let Ok(sub) = open_child_dir(&dir, &child.to_string_lossy()) {
                    let (b, f) = usage_of(sub)?;
                    bytes += b;
                    files += f;
                }
            }
            EntryKind::File => {
                bytes += stat.st_size as u64;
                files += 1;
            }
            _ => {}
        }
    }
    Ok((bytes, files))
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

    /// The size of the file the upload would replace, if any. A directory
    /// or a symbolic link of that name refuses the upload.
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
            Ok(stat) => Ok(Some(regular_size(&stat))),
            Err(Errno::ENOENT) => Ok(None),
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
