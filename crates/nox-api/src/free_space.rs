//! The free-space floor (`NOX_MIN_FREE_MB`): the data directory's
//! filesystem also holds the embedded PostgreSQL and the audit spool, so
//! what would write more for a tenant (`PUT /write`, `POST /run`) is refused
//! with 507 once less than the floor is free, while reads, listings and
//! deletes, which free space, keep working.

use std::path::PathBuf;

use crate::error::ApiError;

const MIB: u64 = 1024 * 1024;

#[derive(Debug)]
pub struct FreeSpaceFloor {
    data_dir: PathBuf,
    min_free_bytes: u64,
}

impl FreeSpaceFloor {
    pub fn new(data_dir: impl Into<PathBuf>, min_free_mb: u64) -> FreeSpaceFloor {
        FreeSpaceFloor {
            data_dir: data_dir.into(),
            min_free_bytes: min_free_mb.saturating_mul(MIB),
        }
    }

    /// Bytes an unprivileged writer can still use on the data directory's
    /// filesystem (`f_bavail * f_frsize`: root's reserved blocks are not
    /// counted). One `statvfs`, a few microseconds.
    pub fn available_bytes(&self) -> std::io::Result<u64> {
        let stat = nix::sys::statvfs::statvfs(&self.data_dir)?;
        Ok((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
    }

    /// 507 `insufficient_storage` below the floor, and when free space
    /// cannot be measured (fail closed); a floor of 0 never refuses.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let available = self.available_bytes().map_err(|error| {
            tracing::warn!(%error, data_dir = %self.data_dir.display(), "free space cannot be measured");
            ApiError::InsufficientStorage(
                "the server cannot measure its free disk space; retry later".into(),
            )
        })?;
        if available < self.min_free_bytes {
            return Err(ApiError::InsufficientStorage(format!(
                "the server is low on disk space ({} MiB free, {} MiB kept free): \
                 delete files or retry later",
                available / MIB,
                self.min_free_bytes / MIB
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_floor_and_when_unmeasurable() {
        let dir = std::env::temp_dir();
        assert!(FreeSpaceFloor::new(&dir, 0).check().is_ok());
        assert!(FreeSpaceFloor::new(&dir, 1).check().is_ok());
        let never_enough = FreeSpaceFloor::new(&dir, u64::MAX);
        assert!(matches!(
            never_enough.check(),
            Err(ApiError::InsufficientStorage(_))
        ));
        let missing = FreeSpaceFloor::new(dir.join("nox-no-such-directory"), 1);
        assert!(matches!(
            missing.check(),
            Err(ApiError::InsufficientStorage(_))
        ));
    }
}
