//! The free-space floor during a run: a command that writes the data
//! directory's filesystem below `--min-free-mb` is stopped, so PostgreSQL
//! and the audit spool, which share it, keep room.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::statvfs::statvfs;

/// How often the filesystem is looked at (one `statvfs`).
const EVERY: Duration = Duration::from_millis(50);

pub struct FreeSpaceWatch<'a> {
    path: &'a Path,
    min_free_bytes: u64,
    next: Instant,
}

impl<'a> FreeSpaceWatch<'a> {
    /// Watches the filesystem holding `path`; `min_free_mb` 0: never stops.
    pub fn new(path: &'a Path, min_free_mb: u64) -> FreeSpaceWatch<'a> {
        FreeSpaceWatch {
            path,
            min_free_bytes: min_free_mb.saturating_mul(1024 * 1024),
            next: Instant::now(),
        }
    }

    /// Whether the run must stop: free space below the floor. Looks at
    /// most every [`EVERY`]; a filesystem that cannot be measured counts as
    /// full (fail closed).
    pub fn below_floor(&mut self) -> bool {
        if self.min_free_bytes == 0 || Instant::now() < self.next {
            return false;
        }
        self.next = Instant::now() + EVERY;
        match statvfs(self.path) {
            Ok(stat) => {
                let free = stat.blocks_available().saturating_mul(stat.fragment_size());
                free < self.min_free_bytes
            }
            Err(_) => true,
        }
    }
}
