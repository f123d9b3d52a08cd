//! Uploads: a temporary file beside its destination, fsynced, then renamed
//! over it.

use std::fs::File;
use std::os::fd::OwnedFd;

use super::*;

/// An upload in progress: a temporary file beside its destination.
#[derive(Debug)]
pub struct Upload {
    pub(super) parent: OwnedFd,
    pub(super) temp_name: String,
    pub(super) final_name: String,
    pub(super) file: Option<File>,
    pub(super) committed: bool,
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
