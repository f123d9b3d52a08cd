//! Finding the PostgreSQL server binaries.

use super::*;

/// The directory that holds `initdb`, `pg_ctl`, `postgres` and `pg_isready`.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub(crate) bin_dir: PathBuf,
}

impl Binaries {
    /// Uses `bin_dir` when given; otherwise looks on `PATH` first, then
    /// under `/usr/lib/postgresql/<version>/bin`, newest version first
    /// (Debian does not put the server binaries on PATH).
    pub fn find(bin_dir: Option<&Path>) -> Result<Self, EmbedError> {
        if let Some(dir) = bin_dir {
            return if has_tools(dir) {
                Ok(Binaries {
                    bin_dir: dir.to_path_buf(),
                })
            } else {
                Err(EmbedError::BinariesNotFoundIn(dir.to_path_buf()))
            };
        }
        let on_path = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .unwrap_or_default();
        let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .collect();
        versioned.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
        on_path
            .into_iter()
            .chain(versioned.into_iter().map(|(_, dir)| dir))
            .find(|dir| has_tools(dir))
            .map(|bin_dir| Binaries { bin_dir })
            .ok_or(EmbedError::BinariesNotFound)
    }

    pub(crate) fn tool(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

pub(crate) fn has_tools(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres", "pg_isready"]
        .iter()
        .all(|tool| dir.join(tool).is_file())
}
