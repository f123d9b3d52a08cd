//! Real clusters from the system binaries. Each test skips (and says so)
//! when no PostgreSQL is installed.

use std::sync::{Arc, Mutex};

use super::*;

fn have_postgres() -> bool {
    let found = Binaries::find(None).is_ok();
    if !found {
        eprintln!("skipped: no PostgreSQL server binaries on this machine");
    }
    found
}

/// A directory the cluster's user (not us, when we are root) can enter.
fn root_dir() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    root
}

/// `SELECT current_user` through psql, as `run_as` (else as us), giving
/// `password` if any. Never prompts, reads no ~/.pgpass.
fn psql(cluster: &Cluster, run_as: Option<&RunAs>, password: Option<&str>) -> Output {
    let tool = cluster.binaries.tool("psql");
    let mut command = Command::new(if tool.is_file() {
        tool
    } else {
        PathBuf::from("psql")
    });
    command
        .args(["-X", "-w", "-A", "-t", "-h"])
        .arg(cluster.socket_dir())
        .args(["-p", &SOCKET_PORT.to_string(), "-U", SUPERUSER, "-d"])
        .args(["postgres", "-c", "SELECT current_user"])
        .env_remove("PGPASSWORD")
        .env("PGPASSFILE", "/nonexistent")
        .stdin(Stdio::null());
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    if let Some(run_as) = run_as {
        run_as.apply(&mut command);
    }
    command.output().expect("run psql")
}

/// Connecting without the password (or with a wrong one) is an
/// authentication failure, from us and from the cluster's own uid (the uid a
/// sandboxed command would have if it shared it); with it, it works.
fn assert_password_required(cluster: &Cluster) {
    let as_cluster_user = cluster.run_as.as_ref();
    for run_as in [None, as_cluster_user] {
        let who = run_as.map_or("this process's user", |r| r.name.as_str());
        for wrong in [None, Some("not-the-password-at-all")] {
            let output = psql(cluster, run_as, wrong);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                !output.status.success(),
                "{who} got in with password {wrong:?}: {}",
                String::from_utf8_lossy(&output.stdout)
            );
            assert!(
                stderr.contains("no password supplied")
                    || stderr.contains("password authentication failed"),
                "{who}, password {wrong:?}: not an authentication failure: {stderr}"
            );
        }
        let output = psql(cluster, run_as, Some(cluster.password()));
        assert!(
            output.status.success(),
            "{who} with the password: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), SUPERUSER);
    }
}

fn assert_private_file(path: &Path) {
    let metadata = fs::symlink_metadata(path).expect("the password file exists");
    assert!(metadata.is_file());
    assert_eq!(metadata.mode() & 0o777, 0o600, "{}", path.display());
    assert_eq!(metadata.uid(), Uid::effective().as_raw());
}

/// Collects what this thread logs through `tracing` while `f` runs.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buffer);
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || Sink(Arc::clone(&sink)))
        .finish();
    let value = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8_lossy(&buffer.lock().expect("lock")).into_owned();
    (value, logs)
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl io::Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn assert_secret_kept(cluster: &Cluster, logs: &str) {
    let password = cluster.password();
    assert!(!logs.contains(password), "the password was logged: {logs}");
    assert!(!format!("{cluster:?}").contains(password), "Debug shows it");
    assert!(!format!("{:?}", cluster.password).contains(password));
}

#[test]
fn a_new_cluster_requires_the_password_kept_in_a_private_file() {
    if !have_postgres() {
        return;
    }
    let root = root_dir();
    let pg = root.path().join("pg");
    let (cluster, logs) = with_logs(|| Cluster::start(&pg, None).expect("start"));
    assert!(
        logs.contains("creating the embedded PostgreSQL cluster"),
        "{logs}"
    );
    let password_path = root.path().join("pg.password");
    assert_eq!(password_file(&pg), password_path);
    assert_private_file(&password_path);
    assert_eq!(
        fs::read_to_string(&password_path).expect("read").trim(),
        cluster.password()
    );
    assert_eq!(
        fs::read_to_string(pg.join("pg_hba.conf")).expect("hba"),
        HBA_CONF
    );
    assert_password_required(&cluster);
    assert_secret_kept(&cluster, &logs);
    assert_eq!(cluster.uid(), service_uid().expect("service uid"));
    if Uid::effective().is_root() {
        assert_ne!(cluster.uid(), 0, "the cluster never runs as root");
    }
}

/// What Nox did before passwords: `initdb --auth=trust`.
fn create_trust_cluster(pg: &Path) -> Cluster {
    fs::create_dir_all(pg).expect("mkdir");
    let cluster = Cluster {
        binaries: Binaries::find(None).expect("binaries"),
        data_dir: pg.canonicalize().expect("canonical"),
        run_as: RunAs::for_current_process().expect("service user"),
        password: Password("unused-in-a-trust-cluster".into()),
        owned: false,
        child: None,
    };
    if let Some(run_as) = &cluster.run_as {
        cluster.check_reachable(run_as).expect("reachable");
    }
    fs::set_permissions(pg, fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut command = Command::new(cluster.binaries.tool("initdb"));
    command
        .arg("--pgdata")
        .arg(pg)
        .args(["--username", SUPERUSER, "--auth=trust", "--encoding=UTF8"])
        .args(["--locale=C", "--no-instructions"]);
    cluster.run(command, "initdb").expect("initdb");
    cluster.append_settings("").expect("settings");
    cluster
}

fn pg_ctl(cluster: &Cluster, action: &str) {
    let mut command = Command::new(cluster.binaries.tool("pg_ctl"));
    command
        .arg(action)
        .arg("--pgdata")
        .arg(&cluster.data_dir)
        .args(["--wait", "--silent"]);
    if action == "start" {
        command
            .arg("--log")
            .arg(cluster.data_dir.join("server.log"));
    }
    cluster.run(command, action).expect("pg_ctl");
}

#[test]
fn a_trust_cluster_is_upgraded_and_no_crash_between_the_steps_locks_nox_out() {
    if !have_postgres() {
        return;
    }
    let root = root_dir();
    let pg = root.path().join("pg");
    let old = create_trust_cluster(&pg);
    let trust_hba = fs::read_to_string(pg.join("pg_hba.conf")).expect("hba");
    // As deployed so far: anyone who reaches the socket is the superuser.
    pg_ctl(&old, "start");
    let output = psql(&old, old.run_as.as_ref(), None);
    assert!(output.status.success(), "the old cluster trusts");
    pg_ctl(&old, "stop");

    let (mut cluster, logs) = with_logs(|| Cluster::start(&pg, None).expect("upgrade"));
    assert!(logs.contains("now requires a password"), "{logs}");
    assert_private_file(&password_file(&pg));
    assert_password_required(&cluster);
    assert_secret_kept(&cluster, &logs);
    let first_password = cluster.password().to_owned();
    cluster.stop().expect("stop");

    // A crash after the password was set but before pg_hba.conf was
    // replaced: the next start finishes the job with the same password.
    fs::write(pg.join("pg_hba.conf"), &trust_hba).expect("restore trust");
    let mut cluster = Cluster::start(&pg, None).expect("start after a crash");
    assert_eq!(cluster.password(), first_password);
    assert_password_required(&cluster);
    cluster.stop().expect("stop");

    // A crash right after the password file was written (or the file lost
    // later): a new password is set from the file, whatever pg_hba says.
    fs::remove_file(password_file(&pg)).expect("lose the password file");
    let (mut cluster, logs) = with_logs(|| Cluster::start(&pg, None).expect("start"));
    assert_ne!(cluster.password(), first_password);
    assert_password_required(&cluster);
    assert_secret_kept(&cluster, &logs);
    let output = psql(&cluster, None, Some(&first_password));
    assert!(!output.status.success(), "the old password is gone");
    cluster.stop().expect("stop");

    // A cluster left running with trust by a process that died is restarted
    // through the same path rather than adopted as it is.
    fs::write(pg.join("pg_hba.conf"), &trust_hba).expect("restore trust");
    pg_ctl(&old, "start");
    let cluster = Cluster::start(&pg, None).expect("adopt");
    assert!(cluster.is_owned());
    assert_password_required(&cluster);
}

#[test]
fn a_password_file_others_can_read_is_restricted_and_a_foreign_one_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    // NOX_DATA_DIR itself may not exist yet.
    let path = root.path().join("data").join("pg.password");
    let created = Password::load_or_create(&path).expect("create");
    assert_private_file(&path);
    assert_eq!(created.0.len(), 64);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    let loaded = Password::load_or_create(&path).expect("load");
    assert_eq!(loaded, created);
    assert_private_file(&path);
    assert!(!format!("{loaded:?}").contains(&loaded.0));

    fs::write(&path, "short\n").expect("write");
    let error = Password::load_or_create(&path).expect_err("too short");
    assert!(!error.to_string().contains("short\n"), "{error}");
    if Uid::effective().is_root() {
        fs::write(&path, "a-long-enough-password-but-not-ours\n").expect("write");
        nix::unistd::chown(&path, Some(Uid::from_raw(65534)), None).expect("chown");
        let error = Password::load_or_create(&path).expect_err("foreign owner");
        assert!(
            error.to_string().contains("is owned by uid 65534"),
            "{error}"
        );
    }
}

#[test]
fn a_throwaway_cluster_requires_its_password_too() {
    if !have_postgres() {
        return;
    }
    let root = root_dir();
    let (mut cluster, logs) =
        with_logs(|| Cluster::start_ephemeral(&root.path().join("pg")).expect("start ephemeral"));
    assert_password_required(&cluster);
    assert_secret_kept(&cluster, &logs);
    assert!(
        !root.path().join("pg.password").exists(),
        "its password lives in memory only"
    );
    cluster.stop().expect("stop");
}

/// `query`'s output (unaligned, tuples only) through psql with the password.
fn sql(cluster: &Cluster, query: &str) -> String {
    let mut command = Command::new(cluster.binaries.tool("psql"));
    command
        .args(["-X", "-w", "-A", "-t", "-h"])
        .arg(cluster.socket_dir())
        .args(["-p", &SOCKET_PORT.to_string(), "-U", SUPERUSER, "-d"])
        .args(["postgres", "-c", query])
        .env("PGPASSWORD", cluster.password())
        .env("PGPASSFILE", "/nonexistent")
        .stdin(Stdio::null());
    let output = command.output().expect("run psql");
    assert!(
        output.status.success(),
        "{query}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn a_replica_streams_the_primarys_commits() {
    if !have_postgres() {
        return;
    }
    let root = root_dir();
    let mut primary = Cluster::start_ephemeral(&root.path().join("primary")).expect("primary");
    let (replica, logs) = with_logs(|| {
        Cluster::start_ephemeral_replica(
            &root.path().join("replica"),
            primary.socket_dir(),
            primary.password(),
        )
    });
    let mut replica = match replica {
        Err(EmbedError::ToolNotFound(dir, tool)) => {
            eprintln!("skipped: {} has no {tool}", dir.display());
            return;
        }
        result => result.expect("replica"),
    };
    assert_password_required(&replica);
    assert_secret_kept(&replica, &logs);
    assert_eq!(sql(&replica, "SELECT pg_is_in_recovery()"), "t");
    sql(&primary, "CREATE TABLE streamed AS SELECT 42 AS answer");
    let deadline = Instant::now() + Duration::from_secs(60);
    while sql(
        &replica,
        "SELECT count(*) FROM pg_class WHERE relname = 'streamed'",
    ) != "1"
    {
        assert!(
            Instant::now() < deadline,
            "the replica never replayed the table"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sql(&replica, "SELECT answer FROM streamed"), "42");
    replica.stop().expect("stop the replica");
    primary.stop().expect("stop the primary");
}
