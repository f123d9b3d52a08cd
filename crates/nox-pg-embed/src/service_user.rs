//! The OS user the cluster runs as when this process is root.

use super::*;

/// The uid the embedded cluster runs as when this process starts it: the
/// `postgres` user (else `nobody`) when this process is root, this process's
/// own uid otherwise. Sandboxed commands must never run as this uid: it owns
/// the cluster's data files. [`Cluster::uid`] gives the same for a cluster.
pub fn service_uid() -> Result<u32, EmbedError> {
    Ok(match RunAs::for_current_process()? {
        Some(run_as) => run_as.uid.as_raw(),
        None => Uid::effective().as_raw(),
    })
}

/// The OS user the cluster's processes run as.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub(crate) name: String,
    pub(crate) uid: Uid,
    pub(crate) gid: Gid,
}

impl RunAs {
    /// `None` when this process is not root: the cluster then runs as us.
    pub(crate) fn for_current_process() -> Result<Option<RunAs>, EmbedError> {
        if !Uid::effective().is_root() {
            return Ok(None);
        }
        for name in ["postgres", "nobody"] {
            if let Ok(Some(user)) = User::from_name(name) {
                return Ok(Some(RunAs {
                    name: user.name,
                    uid: user.uid,
                    gid: user.gid,
                }));
            }
        }
        Err(EmbedError::NoServiceUser)
    }

    pub(crate) fn apply(&self, command: &mut Command) {
        command.uid(self.uid.as_raw()).gid(self.gid.as_raw());
        // Tools look at HOME; root's is not readable for the service user.
        command.env("HOME", "/");
    }
}

pub(crate) fn chown_recursive(path: &Path, run_as: &RunAs) -> Result<(), EmbedError> {
    nix::unistd::chown(path, Some(run_as.uid), Some(run_as.gid)).map_err(|errno| {
        EmbedError::Io {
            context: format!("handing {} to user {}", path.display(), run_as.name),
            source: errno.into(),
        }
    })?;
    let metadata =
        fs::symlink_metadata(path).map_err(io_err(format!("reading {}", path.display())))?;
    if metadata.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(format!("listing {}", path.display())))? {
            let entry = entry.map_err(io_err(format!("listing {}", path.display())))?;
            chown_recursive(&entry.path(), run_as)?;
        }
    }
    Ok(())
}
