//! The audit spool: where batches go while PostgreSQL is unreachable.
//!
//! One file per batch, `<uuid v7>.ndjson`, written under a temporary name,
//! fsynced, renamed into place and the directory fsynced: a file that exists
//! under its final name is complete. Replay (see the writer) inserts a file's
//! records idempotently by id and then deletes the file, so replaying twice,
//! or after a crash midway, adds nothing twice.
//!
//! `rejected/` keeps what could not be written at all: a spool file that
//! cannot be read, and rows PostgreSQL refused even in their minimal form.
//! Nothing replays it; an operator reads it (`GET /admin/audit/status`
//! counts it, and an alert rule watches `nox_audit_rejected_total`).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use nox_audit_model::ActionRecord;

use crate::sessions::SessionRow;

/// The spool's subdirectory for what could not be written at all.
pub const REJECTED_DIR: &str = "rejected";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpoolEntry {
    Session(SessionRow),
    Action(Box<ActionRecord>),
}

/// A spooled batch: its sessions and its records.
#[derive(Debug, Default)]
pub struct SpooledBatch {
    pub sessions: Vec<SessionRow>,
    pub actions: Vec<ActionRecord>,
}

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Spool> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        // Leftovers of a write interrupted before its rename are incomplete
        // and were never acknowledged: drop them.
        for entry in fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Spool { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a batch durably; returns once it is on disk.
    pub fn append(&self, sessions: &[SessionRow], actions: &[ActionRecord]) -> io::Result<PathBuf> {
        write_durably(&self.dir, sessions, actions)
    }

    /// Where what could not be written at all is kept.
    pub fn rejected_dir(&self) -> PathBuf {
        self.dir.join(REJECTED_DIR)
    }

    /// Keeps rows the database refused even in minimal form, durably.
    pub fn reject_rows(&self, actions: &[ActionRecord]) -> io::Result<PathBuf> {
        let dir = self.rejected_dir();
        fs::create_dir_all(&dir)?;
        write_durably(&dir, &[], actions)
    }

    /// Moves a spool file that cannot be read into `rejected/`.
    pub fn reject_file(&self, path: &Path) -> io::Result<PathBuf> {
        let dir = self.rejected_dir();
        fs::create_dir_all(&dir)?;
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::other("no file name"))?;
        let target = dir.join(name);
        fs::rename(path, &target)?;
        File::open(&dir)?.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        Ok(target)
    }

    /// Files in `rejected/`.
    pub fn rejected_files(&self) -> io::Result<u64> {
        match fs::read_dir(self.rejected_dir()) {
            Ok(entries) => Ok(entries.flatten().count() as u64),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(error) => Err(error),
        }
    }

    /// Complete spool files, oldest first.
    pub fn pending(&self) -> io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.extension().is_some_and(|ext| ext == "ndjson")
                    && !path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    pub fn read(path: &Path) -> io::Result<SpooledBatch> {
        let mut batch = SpooledBatch::default();
        for line in BufReader::new(File::open(path)?).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(&line)? {
                SpoolEntry::Session(session) => batch.sessions.push(session),
                SpoolEntry::Action(action) => batch.actions.push(*action),
            }
        }
        Ok(batch)
    }

    /// Removes a replayed file.
    pub fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)?;
        File::open(&self.dir)?.sync_all()
    }

    /// How many action records the spool holds.
    pub fn count_actions(&self) -> io::Result<u64> {
        let mut count = 0;
        for path in self.pending()? {
            // An unreadable file is rejected at its replay.
            count += Spool::read(&path).map_or(0, |batch| batch.actions.len() as u64);
        }
        Ok(count)
    }
}

/// Writes one file of entries into `dir`: under a temporary name, fsynced,
/// renamed, the directory fsynced.
fn write_durably(
    dir: &Path,
    sessions: &[SessionRow],
    actions: &[ActionRecord],
) -> io::Result<PathBuf> {
    let name = format!("{}.ndjson", Uuid::now_v7());
    let temporary = dir.join(format!(".tmp-{name}"));
    let path = dir.join(&name);
    let file = File::create(&temporary)?;
    let mut out = BufWriter::new(file);
    for session in sessions {
        serde_json::to_writer(&mut out, &SpoolEntry::Session(session.clone()))?;
        out.write_all(b"\n")?;
    }
    for action in actions {
        serde_json::to_writer(&mut out, &SpoolEntry::Action(Box::new(action.clone())))?;
        out.write_all(b"\n")?;
    }
    let file = out.into_inner().map_err(|error| error.into_error())?;
    file.sync_all()?;
    fs::rename(&temporary, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(path)
}
