//! Run a private PostgreSQL cluster from the system's own PostgreSQL binaries.
//!
//! Nox uses this when no `DATABASE_URL` is given: the server keeps a persistent
//! cluster in `<NOX_DATA_DIR>/pg` ([`Cluster::start`]), and the test harness
//! runs a throwaway one that dies with the test process
//! ([`Cluster::start_ephemeral`]). The cluster listens only on a Unix socket
//! inside its data directory (no TCP port), and every connection must give
//! a password (`scram-sha-256`): whoever can reach the socket, a sandboxed
//! command running as the cluster's own uid included, still needs it.
//!
//! The persistent cluster's password is generated once and kept in
//! `<data_dir>.password` (`<NOX_DATA_DIR>/pg.password`), mode 0600, owned by
//! this process's uid: beside the data directory rather than in it, because
//! the data directory belongs to the cluster's user and `initdb` wants it
//! empty. It is the source of truth: every start that finds the cluster
//! stopped sets the role's password from it in single-user mode (no socket
//! open, no authentication involved) and then rewrites `pg_hba.conf`, so a
//! cluster created with `trust` by an older Nox is upgraded, a crash between
//! the steps is repaired by the next start, and a lost file is replaced.
//!
//! `initdb` and `postgres` refuse to run as root. When this process is root,
//! the cluster runs as an unprivileged system user (`postgres` if it exists,
//! else `nobody`) that owns the data directory ([`service_uid`]).
//!
//! Everything here is synchronous: it runs once at start-up and shutdown.

#![allow(unsafe_code)] // One `pre_exec` hook, see `start_ephemeral`.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid, User};

mod binaries;
mod password;
mod replica;
mod service_user;

pub use binaries::Binaries;
pub use password::password_file;
use password::{Password, file_name, write_private};
pub use service_user::service_uid;
use service_user::{RunAs, chown_recursive};

/// The superuser `initdb` creates; clients connect as this role.
pub const SUPERUSER: &str = "nox";
/// The port only names the socket file (`.s.PGSQL.5432`): TCP is off.
pub const SOCKET_PORT: u16 = 5432;
/// Unix socket paths are limited to 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Written next to `postmaster.pid`: the pid of the process that started the
/// cluster and is therefore responsible for stopping it.
const OWNER_FILE: &str = "nox-owner.pid";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The only client authentication the cluster accepts. The socket is the
/// only way in; the host lines keep a password required if TCP is enabled.
const HBA_CONF: &str = "\
# Written by Nox, which puts it back whenever it starts the stopped cluster.
# Every connection must give the password (kept beside the data directory).
local all all scram-sha-256
local replication all scram-sha-256
host all all all scram-sha-256
host replication all all scram-sha-256
";

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb and pg_ctl on PATH and under /usr/lib/postgresql/*/bin): install PostgreSQL or set DATABASE_URL"
    )]
    BinariesNotFound,
    #[error(
        "the PostgreSQL binary directory {0} lacks initdb, pg_ctl, postgres or pg_isready: install PostgreSQL or set DATABASE_URL"
    )]
    BinariesNotFoundIn(PathBuf),
    #[error("the PostgreSQL binary directory {0} has no {1}")]
    ToolNotFound(PathBuf, &'static str),
    #[error(
        "the PostgreSQL data directory {data_dir} is not reachable by the user '{user}' that must run the cluster: {blocked} is not traversable for it; choose a NOX_DATA_DIR outside it (for example /var/lib/nox) or set DATABASE_URL"
    )]
    NotTraversable {
        data_dir: PathBuf,
        user: String,
        blocked: PathBuf,
    },
    #[error(
        "the PostgreSQL socket path {0} is longer than the 107 bytes Unix sockets allow: choose a shorter NOX_DATA_DIR"
    )]
    SocketPathTooLong(PathBuf),
    #[error(
        "running as root, but neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL: create one or set DATABASE_URL"
    )]
    NoServiceUser,
    #[error("the PostgreSQL password file {path}: {problem}")]
    PasswordFile { path: PathBuf, problem: String },
    #[error("generating the PostgreSQL password: {0}")]
    Random(#[from] getrandom::Error),
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("PostgreSQL did not become ready within {0:?}; see {1}")]
    StartTimeout(Duration, PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EmbedError {
    let context = context.into();
    move |source| EmbedError::Io { context, source }
}

/// A running cluster, or the handle to one that another process started.
#[derive(Debug)]
pub struct Cluster {
    binaries: Binaries,
    data_dir: PathBuf,
    run_as: Option<RunAs>,
    password: Password,
    /// Set when this handle started the cluster and must stop it.
    owned: bool,
    /// For an ephemeral cluster: the postmaster, our direct child.
    child: Option<Child>,
}

/// Extra settings for a cluster whose data does not need to survive a crash.
/// The test harness streams replicas from such a cluster
/// ([`Cluster::start_ephemeral_replica`]): WAL for them (PostgreSQL's
/// default, stated), and kept a while, or a checkpoint (another replica's
/// base backup makes one) can remove what a new replica still needs.
const EPHEMERAL_SETTINGS: &str = "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nwal_level = replica\nmax_wal_senders = 10\nwal_keep_size = 256MB\n";

impl Cluster {
    /// Starts (creating it on first use) the persistent cluster in `data_dir`
    /// through `pg_ctl`, or attaches to it when another live process already
    /// started it. A cluster left running by a process that died is adopted,
    /// so whoever holds the returned handle stops it; it is restarted first,
    /// to pass through the same password set-up as a stopped cluster.
    ///
    /// The password is read from [`password_file`]`(data_dir)`, which is
    /// created on first use.
    pub fn start(data_dir: &Path, bin_dir: Option<&Path>) -> Result<Cluster, EmbedError> {
        let password = Password::load_or_create(&password_file(data_dir))?;
        let mut cluster = Cluster::prepare(data_dir, bin_dir, "", password)?;
        if cluster.is_running()? {
            match cluster.owner_pid() {
                Some(pid) if pid != std::process::id() && process_alive(pid) => {
                    tracing::info!(data_dir = %cluster.data_dir.display(), owner_pid = pid, "using the embedded PostgreSQL another process started");
                    if !cluster.hba_is_current()? {
                        tracing::warn!(data_dir = %cluster.data_dir.display(), "the running embedded PostgreSQL still accepts connections without a password: restart the process that started it to upgrade it");
                    }
                    return Ok(cluster);
                }
                _ => {
                    tracing::warn!(data_dir = %cluster.data_dir.display(), "restarting an embedded PostgreSQL left running by a process that exited");
                    cluster.owned = true;
                    cluster.stop()?;
                }
            }
        }
        cluster.require_password()?;
        let log = cluster.data_dir.join("server.log");
        let mut command = Command::new(cluster.binaries.tool("pg_ctl"));
        command
            .arg("start")
            .arg("--wait")
            .arg("--timeout")
            .arg(START_TIMEOUT.as_secs().to_string())
            .arg("--pgdata")
            .arg(&cluster.data_dir)
            .arg("--log")
            .arg(&log)
            .arg("--silent");
        cluster.run(command, "pg_ctl start")?;
        cluster.owned = true;
        cluster.write_owner_pid()?;
        Ok(cluster)
    }

    /// Starts a throwaway cluster in `data_dir` (which should be empty or
    /// absent) as a direct child of this process. It is told to shut down
    /// when the thread that started it exits, so call this from a thread that
    /// lives as long as the process (the test harness does). Durability
    /// settings are off: it is for tests.
    ///
    /// Its password is generated and kept in memory only: see
    /// [`Cluster::password`].
    pub fn start_ephemeral(data_dir: &Path) -> Result<Cluster, EmbedError> {
        let mut cluster =
            Cluster::prepare(data_dir, None, EPHEMERAL_SETTINGS, Password::generate()?)?;
        cluster.require_password()?;
        cluster.spawn_child(&[])?;
        Ok(cluster)
    }

    /// Runs `postgres` on this stopped cluster as a direct child (with
    /// `extra_args`), logging to `server.log`, and waits until it accepts
    /// connections. See [`Cluster::start_ephemeral`] for the thread rule.
    fn spawn_child(&mut self, extra_args: &[String]) -> Result<(), EmbedError> {
        let log = fs::File::create(self.data_dir.join("server.log"))
            .map_err(io_err("creating the PostgreSQL log file"))?;
        self.hand_over(&self.data_dir.join("server.log"))?;
        let mut command = Command::new(self.binaries.tool("postgres"));
        command
            .arg("-D")
            .arg(&self.data_dir)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("cloning a file handle"))?)
            .stderr(log);
        if let Some(run_as) = &self.run_as {
            run_as.apply(&mut command);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        // It runs after std has switched uid/gid (which would clear it), and
        // asks the kernel to send SIGQUIT (PostgreSQL's immediate shutdown)
        // when the spawning thread exits, so a killed test run leaves no
        // server behind.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGQUIT))
                    .map_err(io::Error::from)
            });
        }
        let child = command
            .spawn()
            .map_err(io_err("starting the postgres server process"))?;
        self.child = Some(child);
        self.owned = true;
        self.wait_ready()
    }

    /// Checks binaries, the service user, paths and permissions, and runs
    /// `initdb` if the cluster does not exist yet.
    fn prepare(
        data_dir: &Path,
        bin_dir: Option<&Path>,
        extra_settings: &str,
        password: Password,
    ) -> Result<Cluster, EmbedError> {
        let cluster = Cluster::locate(data_dir, bin_dir, password)?;
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.init(extra_settings)?;
        }
        Ok(cluster)
    }

    /// Checks binaries, the service user, paths and permissions; creates
    /// `data_dir` if needed.
    fn locate(
        data_dir: &Path,
        bin_dir: Option<&Path>,
        password: Password,
    ) -> Result<Cluster, EmbedError> {
        let binaries = Binaries::find(bin_dir)?;
        let run_as = RunAs::for_current_process()?;
        fs::create_dir_all(data_dir).map_err(io_err(format!("creating {}", data_dir.display())))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(io_err(format!("resolving {}", data_dir.display())))?;
        let socket = data_dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(EmbedError::SocketPathTooLong(socket));
        }
        let cluster = Cluster {
            binaries,
            data_dir,
            run_as,
            password,
            owned: false,
            child: None,
        };
        if let Some(run_as) = &cluster.run_as {
            cluster.check_reachable(run_as)?;
        }
        Ok(cluster)
    }

    fn init(&self, extra_settings: &str) -> Result<(), EmbedError> {
        tracing::info!(data_dir = %self.data_dir.display(), "creating the embedded PostgreSQL cluster");
        // initdb wants an empty directory it owns with mode 0700.
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("restricting the data directory"))?;
        // initdb reads the password from a file its user can open, and the
        // data directory must be empty: a short-lived file beside it.
        let pwfile = self.data_dir.with_file_name(format!(
            ".{}.initdb-{}",
            file_name(&self.data_dir),
            std::process::id()
        ));
        let _ = fs::remove_file(&pwfile);
        write_private(&pwfile, &format!("{}\n", self.password.0))
            .map_err(io_err("writing initdb's password file"))?;
        let mut command = Command::new(self.binaries.tool("initdb"));
        command
            .arg("--pgdata")
            .arg(&self.data_dir)
            .arg("--username")
            .arg(SUPERUSER)
            .arg("--auth=scram-sha-256")
            .arg("--pwfile")
            .arg(&pwfile)
            .arg("--encoding=UTF8")
            .arg("--locale=C")
            .arg("--no-instructions");
        let result = self
            .hand_over(&pwfile)
            .and_then(|()| self.run(command, "initdb"));
        let _ = fs::remove_file(&pwfile);
        result?;
        self.append_settings(extra_settings)
    }

    /// Nox's settings, appended to the `postgresql.conf` initdb wrote.
    fn append_settings(&self, extra_settings: &str) -> Result<(), EmbedError> {
        let settings = format!(
            "\n# Added by Nox: Unix socket only, inside the data directory.\nlisten_addresses = ''\nport = {SOCKET_PORT}\nunix_socket_directories = '{}'\nmax_connections = 200\n{extra_settings}",
            self.data_dir.display().to_string().replace('\'', "''")
        );
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(io_err("reading postgresql.conf"))?;
        text.push_str(&settings);
        fs::write(&conf, text).map_err(io_err("writing postgresql.conf"))?;
        Ok(())
    }

    /// Makes the cluster, which must be stopped, require the password: sets
    /// the role's password in single-user mode (which opens no socket and
    /// authenticates no one), then replaces `pg_hba.conf`. In this order a
    /// crash never leaves a password required that was not set, and the
    /// next start repeats both steps, so it is safe to run at every start.
    fn require_password(&self) -> Result<(), EmbedError> {
        self.set_password_offline()?;
        if self.hba_is_current()? {
            return Ok(());
        }
        let hba = self.data_dir.join("pg_hba.conf");
        let temp = self.data_dir.join("pg_hba.conf.nox-tmp");
        let _ = fs::remove_file(&temp);
        write_private(&temp, HBA_CONF).map_err(io_err("writing pg_hba.conf"))?;
        self.hand_over(&temp)?;
        fs::rename(&temp, &hba).map_err(io_err("replacing pg_hba.conf"))?;
        tracing::info!(data_dir = %self.data_dir.display(), "the embedded PostgreSQL now requires a password for every connection");
        Ok(())
    }

    fn hba_is_current(&self) -> Result<bool, EmbedError> {
        let text = fs::read_to_string(self.data_dir.join("pg_hba.conf"))
            .map_err(io_err("reading pg_hba.conf"))?;
        Ok(text == HBA_CONF)
    }

    /// `ALTER ROLE … PASSWORD` through `postgres --single`, the statement on
    /// stdin (never argv). Statements are kept out of its log output, and its
    /// stderr is redacted before it goes into an error.
    fn set_password_offline(&self) -> Result<(), EmbedError> {
        let mut command = Command::new(self.binaries.tool("postgres"));
        command
            .arg("--single")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-c", "log_min_error_statement=panic"])
            .args(["-c", "log_statement=none"])
            .args(["-c", "password_encryption=scram-sha-256"])
            .arg("postgres")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(run_as) = &self.run_as {
            run_as.apply(&mut command);
        }
        let mut child = command
            .spawn()
            .map_err(io_err("running postgres --single"))?;
        let statement = format!(
            "ALTER ROLE {SUPERUSER} PASSWORD {};\n",
            self.password.sql_literal()
        );
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(statement.as_bytes()));
        let output = child
            .wait_with_output()
            .map_err(io_err("running postgres --single"))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        // Single-user mode exits 0 even when the statement failed.
        let failed = ["ERROR:", "FATAL:", "PANIC:"]
            .iter()
            .any(|level| stderr.contains(level));
        if output.status.success() && !failed && matches!(written, Some(Ok(()))) {
            return Ok(());
        }
        Err(EmbedError::Command {
            command: "setting the PostgreSQL password (postgres --single)".into(),
            detail: format!(
                "{}: {}",
                output.status,
                stderr.replace(&self.password.0, "<redacted>").trim()
            ),
        })
    }

    /// Gives a file we created to the service user (when there is one).
    fn hand_over(&self, path: &Path) -> Result<(), EmbedError> {
        let Some(run_as) = &self.run_as else {
            return Ok(());
        };
        nix::unistd::chown(path, Some(run_as.uid), Some(run_as.gid)).map_err(|errno| {
            EmbedError::Io {
                context: format!("handing {} to user {}", path.display(), run_as.name),
                source: errno.into(),
            }
        })
    }

    /// Hands the data directory to the service user and checks that it can
    /// actually reach it: every ancestor must be traversable for that user.
    fn check_reachable(&self, run_as: &RunAs) -> Result<(), EmbedError> {
        let owner = fs::metadata(&self.data_dir)
            .map_err(io_err("reading the data directory"))?
            .uid();
        if owner != run_as.uid.as_raw() {
            chown_recursive(&self.data_dir, run_as)?;
        }
        if self.can_enter(run_as, &self.data_dir) {
            return Ok(());
        }
        let blocked = self
            .data_dir
            .ancestors()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find(|dir| !self.can_enter(run_as, dir))
            .unwrap_or(&self.data_dir)
            .to_path_buf();
        Err(EmbedError::NotTraversable {
            data_dir: self.data_dir.clone(),
            user: run_as.name.clone(),
            blocked,
        })
    }

    /// Asks the kernel rather than reading mode bits, so ACLs count too.
    fn can_enter(&self, run_as: &RunAs, dir: &Path) -> bool {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("cd \"$1\"")
            .arg("sh")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        run_as.apply(&mut command);
        command.status().map(|s| s.success()).unwrap_or(false)
    }

    fn run(&self, mut command: Command, what: &str) -> Result<Output, EmbedError> {
        if let Some(run_as) = &self.run_as {
            run_as.apply(&mut command);
        }
        command.stdin(Stdio::null());
        let output = command
            .output()
            .map_err(io_err(format!("running {what}")))?;
        if output.status.success() {
            Ok(output)
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(EmbedError::Command {
                command: what.to_owned(),
                detail: format!("{}: {}", output.status, stderr.trim()),
            })
        }
    }

    fn is_running(&self) -> Result<bool, EmbedError> {
        let mut command = Command::new(self.binaries.tool("pg_ctl"));
        command.arg("status").arg("--pgdata").arg(&self.data_dir);
        if let Some(run_as) = &self.run_as {
            run_as.apply(&mut command);
        }
        let status = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(io_err("running pg_ctl status"))?;
        // pg_ctl status: 0 running, 3 not running, 4 no data directory.
        Ok(status.success())
    }

    fn wait_ready(&mut self) -> Result<(), EmbedError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(EmbedError::Command {
                    command: "postgres".into(),
                    detail: format!(
                        "exited with {status}; see {}",
                        self.data_dir.join("server.log").display()
                    ),
                });
            }
            let ready = Command::new(self.binaries.tool("pg_isready"))
                .arg("--quiet")
                .arg("--host")
                .arg(&self.data_dir)
                .arg("--port")
                .arg(SOCKET_PORT.to_string())
                .stdin(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EmbedError::StartTimeout(
                    START_TIMEOUT,
                    self.data_dir.join("server.log"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn owner_pid(&self) -> Option<u32> {
        fs::read_to_string(self.data_dir.join(OWNER_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn write_owner_pid(&self) -> Result<(), EmbedError> {
        fs::write(
            self.data_dir.join(OWNER_FILE),
            std::process::id().to_string(),
        )
        .map_err(io_err("recording the cluster's owner"))
    }

    /// The directory holding the server's Unix socket: use it as the host.
    pub fn socket_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The password of [`SUPERUSER`]: put it in the connection config. Keep it
    /// out of logs and errors (the cluster's `Debug` redacts it).
    pub fn password(&self) -> &str {
        &self.password.0
    }

    /// The uid the cluster's processes run as (see [`service_uid`]).
    pub fn uid(&self) -> u32 {
        match &self.run_as {
            Some(run_as) => run_as.uid.as_raw(),
            None => Uid::effective().as_raw(),
        }
    }

    /// Whether this handle started (or adopted) the cluster and will stop it.
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// Stops the cluster if this handle owns it (fast shutdown: open
    /// sessions are ended, committed data is safe). Idempotent.
    pub fn stop(&mut self) -> Result<(), EmbedError> {
        if !self.owned {
            return Ok(());
        }
        self.owned = false;
        if let Some(mut child) = self.child.take() {
            // SIGINT is PostgreSQL's fast shutdown.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
            return Ok(());
        }
        let _ = fs::remove_file(self.data_dir.join(OWNER_FILE));
        let mut command = Command::new(self.binaries.tool("pg_ctl"));
        command
            .arg("stop")
            .arg("--pgdata")
            .arg(&self.data_dir)
            .arg("--mode=fast")
            .arg("--wait")
            .arg("--silent");
        self.run(command, "pg_ctl stop")?;
        tracing::info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL stopped");
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::error!(%error, "stopping the embedded PostgreSQL failed");
        }
    }
}

fn process_alive(pid: u32) -> bool {
    // Signal 0 checks for existence without sending anything.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

#[cfg(test)]
mod tests;
