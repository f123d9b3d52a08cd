//! The cluster's password and the private file it is kept in.

use super::*;

/// The cluster's password. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Password(pub(crate) String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl Password {
    /// 32 random bytes as hex: nothing to quote in SQL or a conninfo.
    pub(crate) fn generate() -> Result<Password, EmbedError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(Password(hex::encode(bytes)))
    }

    /// Reads the password file, creating it first if it is missing. Two
    /// processes starting at once agree: the file is published with a
    /// hard link, which never replaces one that appeared meanwhile.
    pub(crate) fn load_or_create(path: &Path) -> Result<Password, EmbedError> {
        let problem = |problem: String| EmbedError::PasswordFile {
            path: path.to_path_buf(),
            problem,
        };
        if fs::symlink_metadata(path).is_err() {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .map_err(io_err(format!("creating {}", parent.display())))?;
            }
            let password = Password::generate()?;
            let temp =
                path.with_file_name(format!(".{}.tmp-{}", file_name(path), std::process::id()));
            let _ = fs::remove_file(&temp);
            write_private(&temp, &format!("{}\n", password.0))
                .map_err(io_err(format!("writing {}", temp.display())))?;
            let linked = fs::hard_link(&temp, path);
            let _ = fs::remove_file(&temp);
            match linked {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "generated the embedded PostgreSQL password");
                    return Ok(password);
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(io_err(format!("creating {}", path.display()))(error)),
            }
        }
        let metadata =
            fs::symlink_metadata(path).map_err(io_err(format!("reading {}", path.display())))?;
        if !metadata.is_file() {
            return Err(problem("is not a regular file".into()));
        }
        if metadata.uid() != Uid::effective().as_raw() {
            return Err(problem(format!(
                "is owned by uid {}, not by this process's uid {}",
                metadata.uid(),
                Uid::effective()
            )));
        }
        if metadata.mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the PostgreSQL password file was readable by others: restricting it to mode 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .map_err(io_err(format!("restricting {}", path.display())))?;
        }
        let text =
            fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
        let password = text.trim_end_matches(['\n', '\r']);
        // Printable ASCII without spaces: it goes on one line of SQL.
        if password.len() < 16
            || password.len() > 512
            || !password.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(problem(
                "must hold one line of 16 to 512 printable ASCII characters without spaces".into(),
            ));
        }
        Ok(Password(password.to_owned()))
    }

    /// The password as an SQL string literal.
    pub(crate) fn sql_literal(&self) -> String {
        format!("'{}'", self.0.replace('\'', "''"))
    }
}

/// Creates `path` (which must not exist) with mode 0600 and `text`, durably.
pub(crate) fn write_private(path: &Path, text: &str) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Where the persistent cluster in `data_dir` keeps its password: beside it,
/// as `<data_dir>.password` (`<NOX_DATA_DIR>/pg.password`).
pub fn password_file(data_dir: &Path) -> PathBuf {
    data_dir.with_file_name(format!("{}.password", file_name(data_dir)))
}
