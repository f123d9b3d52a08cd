//! Tenants apart from each other and from Nox: a uid per user with a 0700
//! workspace, and a root of the run's own (mount and IPC namespaces, a
//! private `/tmp`, its own `/proc`, nothing of the data directory or the
//! host's sockets). Each case is what a hostile tenant tries.
//!
//! These need the launcher with every isolation layer (root); elsewhere
//! they print why they skip.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nox_testkit::{TestApp, TestUser};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::run_leaks::{app_with_runs, run};

/// Runs `command` as `user`; the answer must be 200.
async fn run_ok(app: &TestApp, user: &TestUser, command: &str) -> Value {
    let (status, body) = run(app, &user.token, json!({ "command": command })).await;
    assert_eq!(status, StatusCode::OK, "{command}: {body}");
    body
}

fn stdout(body: &Value) -> &str {
    body["stdout"].as_str().expect("stdout")
}

/// The uid `user`'s commands run as.
async fn run_uid(app: &TestApp, user: &TestUser) -> u32 {
    let body = run_ok(app, user, "id -u").await;
    stdout(&body).trim().parse().expect("a uid")
}

fn workspace(app: &TestApp, user: &TestUser) -> PathBuf {
    app.data_dir.path().join("sandboxes").join(&user.id)
}

/// `program args` on the host as `uid` (no Landlock, no namespaces): what
/// plain permissions allow that uid. Its exit status and output.
fn as_uid(uid: u32, program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .output()
        .expect("run as the tenant's uid");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test]
async fn two_tenants_have_uids_of_their_own_and_plain_permissions_keep_them_apart() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    run_ok(&app, &bob, "echo bob-secret > secret.txt").await;
    let (alice_uid, bob_uid) = (run_uid(&app, &alice).await, run_uid(&app, &bob).await);
    let range = app.state.runs.uid_range().expect("root: a uid per user");
    assert_ne!(alice_uid, bob_uid);
    assert!(range.contains(alice_uid) && range.contains(bob_uid));
    assert_eq!(run_uid(&app, &alice).await, alice_uid, "stable");
    let recorded = app
        .db
        .scalar(&format!(
            "SELECT uid FROM run_uids WHERE user_id = '{}'",
            alice.id
        ))
        .await;
    assert_eq!(recorded, i64::from(alice_uid));

    for (user, uid) in [(&alice, alice_uid), (&bob, bob_uid)] {
        let meta = std::fs::metadata(workspace(&app, user)).expect("workspace");
        assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
    }
    // Without Landlock or namespaces (a plain process of alice's uid on the
    // host): bob's workspace is closed to her, hers is open.
    let bob_secret = workspace(&app, &bob).join("secret.txt");
    let (read, output) = as_uid(alice_uid, "cat", &[bob_secret.to_str().expect("utf-8")]);
    assert!(!read, "alice's uid read bob's file: {output}");
    assert!(output.contains("Permission denied"), "{output}");
    let alice_home = workspace(&app, &alice);
    let (listed, output) = as_uid(alice_uid, "ls", &[alice_home.to_str().expect("utf-8")]);
    assert!(
        listed,
        "alice's uid cannot list her own workspace: {output}"
    );
}

#[tokio::test]
async fn kill_minus_one_reaches_only_the_run() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let alice = app.new_user("alice").await;
    let uid = run_uid(&app, &alice).await;
    // A process of the same uid outside the run, as another of alice's
    // runs would be; the server and its database are the other bystanders.
    let mut bystander = Command::new("sleep")
        .arg("300")
        .uid(uid)
        .gid(uid)
        .spawn()
        .expect("bystander");
    let body = run_ok(&app, &alice, "kill -9 -1; echo after").await;
    let survived = bystander.try_wait().expect("bystander").is_none();
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(survived, "kill -9 -1 in a run killed a process outside it");
    assert_eq!(stdout(&body), "after\n", "{body}");
    let health = app.get("/health").await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(stdout(&run_ok(&app, &alice, "echo next").await), "next\n");
}

#[tokio::test]
async fn system_v_shared_memory_does_not_survive_the_run() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    let uid = run_uid(&app, &alice).await;
    // One segment made and left behind, shown inside the run.
    let body = run_ok(
        &app,
        &alice,
        "ipcmk -M 1048576 >/dev/null && ipcs -m | grep -c '^0x'",
    )
    .await;
    assert_eq!(stdout(&body), "1\n", "{body}");
    // Gone for the next run, for another tenant, and on the host.
    for user in [&alice, &bob] {
        let body = run_ok(&app, user, "ipcs -m | grep -c '^0x' || true").await;
        assert_eq!(stdout(&body), "0\n", "{body}");
    }
    let host = std::fs::read_to_string("/proc/sysvipc/shm").expect("/proc/sysvipc/shm");
    let owned = host
        .lines()
        .skip(1)
        .filter(|line| line.split_whitespace().nth(7) == Some(&uid.to_string()))
        .count();
    assert_eq!(owned, 0, "a segment of the run's uid outlived it:\n{host}");
}

#[tokio::test]
async fn tmp_and_dev_shm_are_private_to_each_run() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    let marker = format!("nox-mark-{}", uuid::Uuid::new_v4().simple());
    let body = run_ok(
        &app,
        &alice,
        &format!("echo x > /tmp/{marker} && echo x > /dev/shm/{marker} && ls /tmp /dev/shm"),
    )
    .await;
    assert_eq!(stdout(&body).matches(marker.as_str()).count(), 2, "{body}");
    for user in [&alice, &bob] {
        let body = run_ok(&app, user, "ls -A /tmp /dev/shm").await;
        assert!(!stdout(&body).contains(&marker), "{body}");
    }
    assert!(!Path::new("/tmp").join(&marker).exists());
    assert!(!Path::new("/dev/shm").join(&marker).exists());
    // Capped: a run cannot fill the host's memory through /tmp beyond its
    // own memory limit.
    let body = run_ok(&app, &alice, "df -k --output=size /tmp | tail -1").await;
    let size_kb: u64 = stdout(&body).trim().parse().expect("size");
    assert!(size_kb > 0 && size_kb <= 2048 * 1024, "{body}");
}

#[tokio::test]
async fn the_run_sees_its_own_processes_and_nothing_of_the_hosts_services() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let alice = app.new_user("alice").await;
    // `ps` works and shows the run only: init, bash, ps.
    let body = run_ok(&app, &alice, "ps -e -o pid=,comm=").await;
    let processes: Vec<&str> = stdout(&body).lines().collect();
    assert!(
        (2..=4).contains(&processes.len()),
        "not the run's processes: {body}"
    );
    assert!(
        processes
            .iter()
            .any(|line| line.trim_end().ends_with(" ps")),
        "{body}"
    );
    // No host directory with sockets or home directories is there.
    let body = run_ok(
        &app,
        &alice,
        "ls -d /run /var /home /root /srv /sys 2>&1; true",
    )
    .await;
    assert_eq!(
        stdout(&body).matches("No such file or directory").count(),
        6,
        "{body}"
    );
}

#[tokio::test]
async fn postgresql_sockets_are_out_of_reach() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let alice = app.new_user("alice").await;
    // An embedded cluster in the data directory, as the server keeps one.
    let pg_dir = app.data_dir.path().join("pg");
    let cluster = match tokio::task::spawn_blocking({
        let pg_dir = pg_dir.clone();
        move || nox_pg_embed::Cluster::start_ephemeral(&pg_dir)
    })
    .await
    .expect("join")
    {
        Ok(cluster) => cluster,
        Err(error) => {
            eprintln!("skipped: no embedded PostgreSQL here: {error}");
            return;
        }
    };
    let socket_dir = cluster.socket_dir().display().to_string();
    // The host's own PostgreSQL socket, where one is (it may trust local
    // connections, as on the machines this runs on).
    let mut socket_dirs = vec![socket_dir];
    for dir in ["/var/run/postgresql", "/run/postgresql"] {
        if Path::new(dir).join(".s.PGSQL.5432").exists() {
            socket_dirs.push(dir.to_owned());
        }
    }
    for dir in &socket_dirs {
        let command = format!(
            "psql -h {dir} -U postgres -d postgres -c 'select 1' 2>&1 || \
             psql -h {dir} -U nox -d postgres -c 'select 1' 2>&1; echo \"exit $?\""
        );
        let body = run_ok(&app, &alice, &command).await;
        let out = stdout(&body);
        assert!(
            !out.ends_with("exit 0\n") && !out.contains("(1 row)"),
            "a run reached the PostgreSQL socket in {dir}: {body}"
        );
    }
    drop(cluster);
}

#[tokio::test]
async fn a_data_directory_under_a_system_directory_stays_hidden() {
    // Landlock's read-only system rules used to expose /opt, and with it a
    // data directory there.
    let opt = tempfile::Builder::new()
        .prefix("nox-test-")
        .tempdir_in("/opt")
        .ok();
    let Some(opt) = opt else {
        eprintln!("skipped: cannot make a directory under /opt");
        return;
    };
    let data_dir = opt.path().to_path_buf();
    // The signing key and the checkpoints kept apart from it, under /opt too.
    let keys = tempfile::Builder::new()
        .prefix("nox-keys-")
        .tempdir_in("/opt")
        .expect("a key directory");
    let key_dir = keys.path().to_path_buf();
    let Some(app) = app_with_runs(|config| {
        config.storage.data_dir = data_dir;
        config.storage.audit_signing_key_file = Some(key_dir.join("signing.key"));
        config.storage.audit_checkpoint_dir = Some(key_dir.join("checkpoints"));
    })
    .await
    else {
        return;
    };
    let alice = app.new_user("alice").await;
    let data = opt.path().display();
    let body = run_ok(
        &app,
        &alice,
        &format!("ls -A {data}; ls -A {data}/sandboxes | wc -l; ls {data}/audit-spool 2>&1; true"),
    )
    .await;
    assert_eq!(
        stdout(&body).lines().collect::<Vec<_>>(),
        [
            "sandboxes",
            "1",
            &format!("ls: cannot access '{data}/audit-spool': No such file or directory"),
        ],
        "{body}"
    );
    assert!(
        opt.path().join("audit-spool").exists(),
        "the host still has it"
    );
    let keys_shown = keys.path().display();
    let body = run_ok(&app, &alice, &format!("ls -A {keys_shown} | wc -l")).await;
    assert_eq!(stdout(&body), "0\n", "the key directory shows: {body}");
    assert!(
        keys.path().join("signing.key").exists(),
        "the host still has it"
    );
}

#[tokio::test]
async fn workspaces_kept_outside_the_data_directory_stay_hidden() {
    // Several servers share one NOX_SANDBOX_DIR; it must hide like the data
    // directory does.
    let shared = tempfile::Builder::new()
        .prefix("nox-workspaces-")
        .tempdir_in("/opt")
        .ok();
    let Some(shared) = shared else {
        eprintln!("skipped: cannot make a directory under /opt");
        return;
    };
    let sandbox_dir = shared.path().to_path_buf();
    let Some(app) = app_with_runs(|config| config.storage.sandbox_dir = Some(sandbox_dir)).await
    else {
        return;
    };
    let (alice, bob) = (app.new_user("alice").await, app.new_user("bob").await);
    run_ok(&app, &bob, "echo secret > note.txt").await;
    assert!(shared.path().join(&bob.id).join("note.txt").exists());
    let body = run_ok(
        &app,
        &alice,
        &format!("ls -A {}; pwd", shared.path().display()),
    )
    .await;
    let lines: Vec<&str> = stdout(&body).lines().collect();
    assert_eq!(lines.len(), 2, "only her own workspace shows: {body}");
    assert_eq!(lines[0], alice.id, "{body}");
}
