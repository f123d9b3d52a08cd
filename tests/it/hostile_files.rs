//! What a tenant's run can leave in a workspace to hurt the server: special
//! files that block whoever opens them for reading, and directory trees deep
//! enough to exhaust a recursion. Every wait is bounded, as a detector of a
//! server that hangs, never as a timing assertion.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, TestUser, send, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Longest wait for any one answer (or group of answers): far beyond what a
/// working server needs, so only a hung one reaches it.
const PATIENCE: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: no answer within {limit:?}: the server hangs"),
    }
}

/// A user whose request quotas cannot get in the way of hundreds of requests.
async fn unlimited_user(app: &TestApp, name: &str) -> TestUser {
    let response = send(
        app.request(Method::POST, "/admin/users", TEST_ADMIN_TOKEN)
            .json(&json!({ "name": name, "tier": "unlimited" })),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED, "creating {name}");
    let created: Value = response.json().await.expect("json");
    TestUser {
        id: created["id"].as_str().expect("id").to_owned(),
        token: created["token"].as_str().expect("token").to_owned(),
    }
}

fn workspace(app: &TestApp, user: &TestUser) -> PathBuf {
    app.data_dir.path().join("sandboxes").join(&user.id)
}

/// Whether `/run` works here; if not, says why.
fn runs_available(app: &TestApp) -> bool {
    if app.state.runs.layers().is_none() {
        println!("the command sandbox is not available here (no nox-sandbox-exec)");
        return false;
    }
    true
}

async fn run(app: &TestApp, user: &TestUser, command: &str, timeout: u64) -> Value {
    let response = within(
        "/run",
        Duration::from_secs(timeout) + PATIENCE,
        send(
            app.request(Method::POST, "/run", &user.token)
                .json(&json!({ "command": command, "timeout": timeout })),
        ),
    )
    .await;
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert_eq!(status, StatusCode::OK, "{command}: {body}");
    assert_eq!(body["exit_code"], 0, "{command}: {body}");
    body
}

async fn call(app: &TestApp, user: &TestUser, method: Method, path: &str) -> (StatusCode, Value) {
    call_within(PATIENCE, app, user, method, path).await
}

async fn call_within(
    limit: Duration,
    app: &TestApp,
    user: &TestUser,
    method: Method,
    path: &str,
) -> (StatusCode, Value) {
    let what = format!("{method} {path}");
    let response = within(
        &what,
        limit,
        send(app.request(method.clone(), path, &user.token)),
    )
    .await;
    let status = response.status();
    let bytes = within(&what, limit, response.bytes()).await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body)
}

fn assert_not_regular(what: &str, (status, body): (StatusCode, Value)) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
    assert_eq!(body["code"], "not_a_regular_file", "{what}: {body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

/// Should a request still be blocked opening the FIFO when the test ends
/// (the server under test hangs), lets it go: a writer wakes every reader
/// blocked in open(2), unlinking stops new ones, closing the writer gives
/// them end of file. Opening a FIFO read-write never blocks on Linux.
struct ReleaseFifos(Vec<PathBuf>);

impl Drop for ReleaseFifos {
    fn drop(&mut self) {
        for fifo in &self.0 {
            let writer = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(fifo);
            let _ = std::fs::remove_file(fifo);
            drop(writer);
        }
    }
}

/// The names in a listing.
fn names(listing: &Value) -> Vec<String> {
    listing["files"]
        .as_array()
        .map(|files| {
            files
                .iter()
                .filter_map(|f| f["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn is_fifo(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

#[tokio::test]
async fn special_files_are_refused_at_once_and_never_block_the_server() {
    // Hundreds of requests at once: shedding is not what is tested here.
    let app = spawn_app_with(|config| config.max_inflight = Some(4096)).await;
    let alice = unlimited_user(&app, "alice").await;
    let bob = unlimited_user(&app, "bob").await;
    let (status, _) = call(&app, &alice, Method::PUT, "/write?path=dir/kept.txt").await;
    assert_eq!(status, StatusCode::OK);
    let ws = workspace(&app, &alice);
    let _release = ReleaseFifos(vec![ws.join("p"), ws.join("q")]);
    if runs_available(&app) {
        run(&app, &alice, "mkfifo p q", 30).await;
    } else {
        println!("making the FIFOs directly instead of with a run");
        for name in ["p", "q"] {
            nix::unistd::mkfifo(
                &ws.join(name),
                nix::sys::stat::Mode::from_bits_truncate(0o644),
            )
            .expect("mkfifo");
        }
    }
    assert!(is_fifo(&ws.join("p")) && is_fifo(&ws.join("q")));

    // A FIFO: refused at once, by both readers.
    assert_not_regular(
        "/cat p",
        call(&app, &alice, Method::GET, "/cat?path=p").await,
    );
    assert_not_regular(
        "/download p",
        call(&app, &alice, Method::GET, "/download?path=p").await,
    );

    // Every other kind that is not a regular file: directories (the root
    // too), a socket and, where it can be made, a device.
    let _socket = std::os::unix::net::UnixListener::bind(ws.join("sock")).expect("socket");
    let mut others = vec!["dir", "/", "sock"];
    match nix::sys::stat::mknod(
        &ws.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    ) {
        Ok(()) => others.push("null"),
        Err(errno) => println!("no device node tested: mknod: {errno}"),
    }
    for name in others {
        for endpoint in ["/cat", "/download"] {
            assert_not_regular(
                &format!("{endpoint} {name}"),
                call(
                    &app,
                    &alice,
                    Method::GET,
                    &format!("{endpoint}?path={name}"),
                )
                .await,
            );
        }
    }

    // 600 readers of the FIFO at once: all answered, none left blocked.
    let requests = (0..600).map(|_| call(&app, &alice, Method::GET, "/cat?path=p"));
    let answers = within(
        "600 parallel /cat of a FIFO",
        PATIENCE,
        futures_util::future::join_all(requests),
    )
    .await;
    for answer in answers {
        assert_not_regular("one of 600 /cat p", answer);
    }

    // Another user's file operations still answer.
    let (status, body) = call(&app, &bob, Method::GET, "/ls?path=.").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Listing shows special files without opening them.
    let (status, listing) = call(&app, &alice, Method::GET, "/ls?path=.").await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    let kinds: Vec<(String, String)> = listing["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_owned(),
                f["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for name in ["p", "q", "sock"] {
        assert!(
            kinds.contains(&(name.to_owned(), "other".to_owned())),
            "{kinds:?}"
        );
    }
    let (status, one) = call(&app, &alice, Method::GET, "/ls?path=p").await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(
        (one["type"].as_str(), one["size"].as_u64()),
        (Some("other"), None),
        "{one}"
    );

    // Writing onto a FIFO's name replaces it (a temporary file renamed into
    // place: the FIFO is never opened).
    let response = within(
        "/write onto a FIFO",
        PATIENCE,
        send(
            app.request(Method::PUT, "/write?path=p", &alice.token)
                .body("now a file"),
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (status, body) = call(&app, &alice, Method::GET, "/cat?path=p").await;
    assert_eq!(
        (status, body["content"].as_str()),
        (StatusCode::OK, Some("now a file"))
    );

    // Deleting a FIFO removes it.
    let (status, body) = call(&app, &alice, Method::DELETE, "/delete?path=q").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(std::fs::symlink_metadata(ws.join("q")).is_err());

    // The storage accounting counts the one file the FIFO became, not the
    // FIFOs.
    let (status, usage) = call(&app, &alice, Method::GET, "/quotas/my/usage").await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["usage"]["files_count"], 2, "{usage}");
}

/// A chain of directories `d/d/…` 200,000 deep: beyond any recursion's
/// stack and any process's descriptor limit.
const MAKE_CHAIN: &str = r#"perl -e '
my ($chains, $length) = (200, 1000);
my $down = join("/", ("d") x ($length - 1));
my $up = join("/", ("..") x $length);
for my $c (1..$chains) {
    mkdir "c$c" or die "mkdir: $!";
    chdir "c$c" or die "chdir: $!";
    for (2..$length) { mkdir "d" or die "mkdir: $!"; chdir "d" or die "chdir: $!" }
    chdir $up or die "chdir: $!";
}
for (my $c = $chains - 1; $c >= 1; $c--) {
    rename("c" . ($c + 1), "c$c/$down/d") or die "rename: $!";
}
rename("c1", "d") or die "rename: $!";
print "made\n"'"#;
const CHAIN_DEPTH: usize = 200_000;

/// Should the test fail with the chain still there, removes it before the
/// data directory is removed (`std::fs::remove_dir_all` recurses, so it
/// would overflow the test's stack); GNU `rm` walks any depth.
pub(crate) struct RemoveChain(pub(crate) PathBuf);

impl Drop for RemoveChain {
    fn drop(&mut self) {
        if std::thread::panicking() && self.0.exists() {
            let _ = std::process::Command::new("rm")
                .arg("-rf")
                .arg(&self.0)
                .status();
        }
    }
}

/// How many `d`s deep the chain under `dir` goes, counted one level at a
/// time (its paths are far beyond `PATH_MAX`).
fn chain_depth(dir: &Path) -> usize {
    use nix::fcntl::{OFlag, open, openat};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd = open(dir, flags, Mode::empty()).expect("open the workspace");
    let mut depth = 0;
    while let Ok(next) = openat(&fd, "d", flags, Mode::empty()) {
        fd = next;
        depth += 1;
    }
    depth
}

#[tokio::test]
async fn a_200_000_deep_directory_chain_is_listed_handed_over_measured_and_deleted() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: /run needs root here (namespaces, cgroups, setuid)");
        return;
    }
    let app = spawn_app_with(|_| {}).await;
    if !runs_available(&app) {
        println!("skipped: the chain is made by a run");
        return;
    }
    let alice = unlimited_user(&app, "alice").await;
    // Made as 200 chains of 1,000, each then moved to the bottom of the
    // previous one: Landlock checks each access by walking up to the
    // workspace, so making every level at the bottom of the chain would take
    // time quadratic in its depth (mkdir(1) in a loop also forks per level).
    let made = run(&app, &alice, MAKE_CHAIN, 300).await;
    let ws = workspace(&app, &alice);
    let _cleanup = RemoveChain(ws.join("d"));
    assert_eq!(made["stdout"], "made\n", "{made}");
    assert_eq!(chain_depth(&ws), CHAIN_DEPTH);
    // A long bound on each walk: removing 200,000 directories takes
    // minutes on a loaded machine with a slow disk.
    let walk = Duration::from_secs(1800);

    // The run measured the workspace after it ended: too deep to measure
    // whole, it counts as over quota (alice has none), and is listed.
    let (status, listing) = call_within(walk, &app, &alice, Method::GET, "/ls?path=.").await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert!(names(&listing).contains(&"d/".to_owned()), "{listing}");
    let (status, usage) = call_within(walk, &app, &alice, Method::GET, "/quotas/my/usage").await;
    assert_eq!(status, StatusCode::OK, "{usage}");

    // The next run first hands the whole workspace over to the run user.
    let after = run(&app, &alice, "echo next", 60).await;
    assert_eq!(after["stdout"], "next\n");

    let (status, deleted) = call_within(walk, &app, &alice, Method::DELETE, "/delete?path=d").await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert!(
        std::fs::symlink_metadata(ws.join("d")).is_err(),
        "the chain is gone"
    );
    let (status, listing) = call(&app, &alice, Method::GET, "/ls?path=.").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!names(&listing).contains(&"d/".to_owned()), "{listing}");
    let health = within("/health", PATIENCE, app.get("/health")).await;
    assert_eq!(health.status(), StatusCode::OK);
}
