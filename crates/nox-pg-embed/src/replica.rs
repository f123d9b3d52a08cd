//! A throwaway streaming replica of a running cluster, for tests of a
//! service's read replica: `pg_basebackup -R` copies the primary and writes
//! `standby.signal` and `primary_conninfo`, then the copy starts as a hot
//! standby on a socket in its own data directory.

use super::*;

impl Cluster {
    /// Starts a streaming replica, in `data_dir` (empty or absent), of the
    /// running cluster whose socket is in `primary_socket_dir`, connecting as
    /// [`SUPERUSER`] with `password` (the primary's `pg_hba.conf` allows
    /// replication with the password; the replica keeps it in its
    /// `primary_conninfo`). The replica is a direct child of this process
    /// with the primary's password, under the same rule as
    /// [`Cluster::start_ephemeral`]: call it from a thread that outlives it.
    pub fn start_ephemeral_replica(
        data_dir: &Path,
        primary_socket_dir: &Path,
        password: &str,
    ) -> Result<Cluster, EmbedError> {
        let mut replica = Cluster::locate(data_dir, None, Password(password.to_owned()))?;
        let basebackup = replica.binaries.tool("pg_basebackup");
        if !basebackup.is_file() {
            return Err(EmbedError::ToolNotFound(
                replica.binaries.bin_dir.clone(),
                "pg_basebackup",
            ));
        }
        // The server refuses a data directory others may enter.
        fs::set_permissions(&replica.data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("restricting the replica's data directory"))?;
        let mut command = Command::new(basebackup);
        command
            .arg("--host")
            .arg(primary_socket_dir)
            .arg("--port")
            .arg(SOCKET_PORT.to_string())
            .arg("--username")
            .arg(SUPERUSER)
            .arg("--pgdata")
            .arg(&replica.data_dir)
            .args(["--write-recovery-conf", "--wal-method=stream"])
            .args(["--checkpoint=fast", "--no-sync"])
            // The environment, not argv, where `ps` would show it.
            .env("PGPASSWORD", password);
        replica.run(command, "pg_basebackup")?;
        // The copy holds the primary's socket lock file (its socket lives in
        // its data directory): the replica's own socket needs it gone.
        let lock = replica
            .data_dir
            .join(format!(".s.PGSQL.{SOCKET_PORT}.lock"));
        let _ = fs::remove_file(lock);
        let socket_dir = format!("unix_socket_directories={}", replica.data_dir.display());
        replica.spawn_child(&["-c".to_owned(), socket_dir])?;
        Ok(replica)
    }
}
