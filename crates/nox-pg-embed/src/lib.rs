//! Run a private PostgreSQL cluster from the system's own PostgreSQL binaries.
//!
//! Nox uses this when no `DATABASE_URL` is given: the server keeps a persistent
//! cluster in `<NOX_DATA_DIR>/pg` ([`Cluster::start`]), and the test harness
//! runs a throwaway one that dies with the test process
//! ([`Cluster::start_ephemeral`]). The cluster listens only on a Unix socket
//! inside its data directory (no TCP port), with `trust` authentication, so
//! only its owner (and root) can reach it.
//!
//! `initdb` and `postgres` refuse to run as root. When this process is root,
//! the cluster runs as an unprivileged system user (`postgres` if it exists,
//! else `nobody`) that owns the data directory.
//!
//! Everything here is synchronous: it runs once at start-up and shutdown.

#![allow(unsafe_code)] // One `pre_exec` hook, see `start_ephemeral`.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid, User};

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

/// The directory that holds `initdb`, `pg_ctl`, `postgres` and `pg_isready`.
#[derive(Debug, Clone)]
pub struct Binaries {
    bin_dir: PathBuf,
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

    fn tool(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

fn has_tools(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres", "pg_isready"]
        .iter()
        .all(|tool| dir.join(tool).is_file())
}

/// The OS user the cluster's processes run as.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: Uid,
    gid: Gid,
}

impl RunAs {
    /// `None` when this process is not root: the cluster then runs as us.
    fn for_current_process() -> Result<Option<RunAs>, EmbedError> {
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

    fn apply(&self, command: &mut Command) {
        command.uid(self.uid.as_raw()).gid(self.gid.as_raw());
        // Tools look at HOME; root's is not readable for the service user.
        command.env("HOME", "/");
    }
}

/// A running cluster, or the handle to one that another process started.
#[derive(Debug)]
pub struct Cluster {
    binaries: Binaries,
    data_dir: PathBuf,
    run_as: Option<RunAs>,
    /// Set when this handle started the cluster and must stop it.
    owned: bool,
    /// For an ephemeral cluster: the postmaster, our direct child.
    child: Option<Child>,
}

/// Extra settings for a cluster whose data does not need to survive a crash.
const EPHEMERAL_SETTINGS: &str = "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n";

impl Cluster {
    /// Starts (creating it on first use) the persistent cluster in `data_dir`
    /// through `pg_ctl`, or attaches to it when another live process already
    /// started it. A cluster left running by a process that died is adopted,
    /// so whoever holds the returned handle stops it.
    pub fn start(data_dir: &Path, bin_dir: Option<&Path>) -> Result<Cluster, EmbedError> {
        let mut cluster = Cluster::prepare(data_dir, bin_dir, "")?;
        if cluster.is_running()? {
            match cluster.owner_pid() {
                Some(pid) if pid != std::process::id() && process_alive(pid) => {
                    tracing::info!(data_dir = %cluster.data_dir.display(), owner_pid = pid, "using the embedded PostgreSQL another process started");
                    return Ok(cluster);
                }
                _ => {
                    tracing::warn!(data_dir = %cluster.data_dir.display(), "adopting an embedded PostgreSQL left running by a process that exited");
                }
            }
        } else {
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
        }
        cluster.owned = true;
        cluster.write_owner_pid()?;
        Ok(cluster)
    }

    /// Starts a throwaway cluster in `data_dir` (which should be empty or
    /// absent) as a direct child of this process. It is told to shut down
    /// when the thread that started it exits, so call this from a thread that
    /// lives as long as the process (the test harness does). Durability
    /// settings are off: it is for tests.
    pub fn start_ephemeral(data_dir: &Path) -> Result<Cluster, EmbedError> {
        let mut cluster = Cluster::prepare(data_dir, None, EPHEMERAL_SETTINGS)?;
        let log = fs::File::create(cluster.data_dir.join("server.log"))
            .map_err(io_err("creating the PostgreSQL log file"))?;
        if let Some(run_as) = &cluster.run_as {
            nix::unistd::chown(
                &cluster.data_dir.join("server.log"),
                Some(run_as.uid),
                Some(run_as.gid),
            )
            .map_err(|errno| EmbedError::Io {
                context: "handing the log file to the service user".into(),
                source: errno.into(),
            })?;
        }
        let mut command = Command::new(cluster.binaries.tool("postgres"));
        command
            .arg("-D")
            .arg(&cluster.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("cloning a file handle"))?)
            .stderr(log);
        if let Some(run_as) = &cluster.run_as {
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
        cluster.child = Some(child);
        cluster.owned = true;
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Checks binaries, the service user, paths and permissions, and runs
    /// `initdb` if the cluster does not exist yet.
    fn prepare(
        data_dir: &Path,
        bin_dir: Option<&Path>,
        extra_settings: &str,
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
            owned: false,
            child: None,
        };
        if let Some(run_as) = &cluster.run_as {
            cluster.check_reachable(run_as)?;
        }
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.init(extra_settings)?;
        }
        Ok(cluster)
    }

    fn init(&self, extra_settings: &str) -> Result<(), EmbedError> {
        tracing::info!(data_dir = %self.data_dir.display(), "creating the embedded PostgreSQL cluster");
        // initdb wants an empty directory it owns with mode 0700.
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("restricting the data directory"))?;
        let mut command = Command::new(self.binaries.tool("initdb"));
        command
            .arg("--pgdata")
            .arg(&self.data_dir)
            .arg("--username")
            .arg(SUPERUSER)
            .arg("--auth=trust")
            .arg("--encoding=UTF8")
            .arg("--locale=C")
            .arg("--no-instructions");
        self.run(command, "initdb")?;
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

fn chown_recursive(path: &Path, run_as: &RunAs) -> Result<(), EmbedError> {
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
