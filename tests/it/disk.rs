//! Disk: what a run writes counts against the storage and files quotas
//! (recorded in the run's audit row; the next write and run are refused
//! until the user deletes enough), a tree deeper than a walk goes counts as
//! over quota, and below `NOX_MIN_FREE_MB` free, writes and runs get 507
//! while everything else keeps working. Each case failed before the runs'
//! writes were counted.

use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{Mode, mkdirat};
use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, TestUser, send, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::hostile_files::RemoveChain;
use crate::run_leaks::{app_with_runs, run};

async fn set_quotas(app: &TestApp, user: &TestUser, limits: Value) {
    let path = format!("/quotas/admin/users/{}/quotas", user.id);
    let response = send(
        app.request(Method::PUT, &path, TEST_ADMIN_TOKEN)
            .json(&limits),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

async fn answer(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = send(request).await;
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn call(app: &TestApp, user: &TestUser, method: Method, path: &str) -> (StatusCode, Value) {
    answer(app.request(method, path, &user.token)).await
}

/// Writes a few bytes to `path`.
async fn write(app: &TestApp, user: &TestUser, path: &str) -> (StatusCode, Value) {
    let path = format!("/write?path={path}");
    answer(app.request(Method::PUT, &path, &user.token).body("small")).await
}

fn assert_quota_refusal(what: &str, (status, body): (StatusCode, Value), quota_type: &str) {
    assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {body}");
    assert_eq!(body["code"], "quota_exceeded", "{what}: {body}");
    assert_eq!(body["quota_type"], quota_type, "{what}: {body}");
}

/// (quota_violation, the quota type) of the user's audit rows for `/run`,
/// oldest first.
async fn run_rows(app: &TestApp, user: &TestUser) -> Vec<(bool, Option<String>, i16)> {
    let user: Uuid = user.id.parse().expect("uuid");
    app.db
        .client()
        .await
        .query(
            "SELECT quota_violation, quota_consumed->>'quota_type', status_code
             FROM audit_actions WHERE user_id = $1 AND endpoint = '/run'
             ORDER BY \"timestamp\", seq",
            &[&user],
        )
        .await
        .expect("query")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

async fn run_ok(app: &TestApp, user: &TestUser, command: &str) -> Value {
    let (status, body) = run(app, &user.token, json!({ "command": command })).await;
    assert_eq!(status, StatusCode::OK, "{command}: {body}");
    assert_eq!(body["exit_code"], 0, "{command}: {body}");
    body
}

#[tokio::test]
async fn a_run_that_writes_past_the_storage_quota_is_recorded_and_blocks_writes_until_a_delete() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let alice = app.new_user("alice").await;
    set_quotas(&app, &alice, json!({ "storage_mb": 1 })).await;
    assert_eq!(write(&app, &alice, "note.txt").await.0, StatusCode::OK);

    run_ok(&app, &alice, "fallocate -l 2M big.bin").await;
    assert_eq!(
        run_rows(&app, &alice).await,
        [(true, Some("storage_mb".into()), 200)],
        "the run that ended over quota is recorded as a violation"
    );

    assert_quota_refusal("write", write(&app, &alice, "more.txt").await, "storage_mb");
    assert_quota_refusal(
        "overwrite",
        write(&app, &alice, "note.txt").await,
        "storage_mb",
    );
    let (status, body) = run(&app, &alice.token, json!({ "command": "true" })).await;
    assert_quota_refusal("run", (status, body), "storage_mb");
    // Reading, listing and deleting still work.
    for path in [
        "/ls?path=.",
        "/cat?path=note.txt",
        "/download?path=note.txt",
    ] {
        assert_eq!(
            call(&app, &alice, Method::GET, path).await.0,
            StatusCode::OK,
            "{path}"
        );
    }
    let (status, deleted) = call(&app, &alice, Method::DELETE, "/delete?path=big.bin").await;
    assert_eq!(status, StatusCode::OK, "{deleted}");

    assert_eq!(write(&app, &alice, "more.txt").await.0, StatusCode::OK);
    run_ok(&app, &alice, "true").await;
    let rows = run_rows(&app, &alice).await;
    assert_eq!(
        rows.iter().map(|row| row.0).collect::<Vec<_>>(),
        [true, true, false],
        "the refused run is a violation too; the last one is not: {rows:?}"
    );
    assert_eq!(rows[1].2, 403);
}

#[tokio::test]
async fn a_run_that_makes_more_files_than_the_quota_is_recorded_and_blocks_writes_until_a_delete() {
    let Some(app) = app_with_runs(|_| {}).await else {
        return;
    };
    let alice = app.new_user("alice").await;
    set_quotas(&app, &alice, json!({ "files_max": 3 })).await;

    run_ok(
        &app,
        &alice,
        "mkdir many && touch many/1 many/2 many/3 many/4 many/5",
    )
    .await;
    assert_eq!(
        run_rows(&app, &alice).await,
        [(true, Some("files_max".into()), 200)]
    );
    assert_quota_refusal("write", write(&app, &alice, "one.txt").await, "files_max");
    // Over the quota, even replacing a file is refused.
    assert_quota_refusal(
        "overwrite",
        write(&app, &alice, "many/1").await,
        "files_max",
    );
    let (status, body) = run(&app, &alice.token, json!({ "command": "true" })).await;
    assert_quota_refusal("run", (status, body), "files_max");
    assert_eq!(
        call(&app, &alice, Method::GET, "/ls?path=many").await.0,
        StatusCode::OK
    );

    let (status, deleted) = call(&app, &alice, Method::DELETE, "/delete?path=many").await;
    assert_eq!(
        (status, &deleted["files_deleted"]),
        (StatusCode::OK, &json!(5))
    );
    assert_eq!(write(&app, &alice, "one.txt").await.0, StatusCode::OK);
    run_ok(&app, &alice, "true").await;
}

/// A chain of `levels` directories `d` under `dir`, made one level at a
/// time (its paths are far beyond `PATH_MAX`), with a file of `bytes`
/// bytes at the bottom.
fn chain_with_a_file_at_the_bottom(dir: &std::path::Path, levels: usize, bytes: usize) {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd = open(dir, flags, Mode::empty()).expect("open the workspace");
    for _ in 0..levels {
        mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).expect("mkdir");
        fd = openat(&fd, "d", flags, Mode::empty()).expect("cd");
    }
    let file = openat(
        &fd,
        "deep.bin",
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .expect("create");
    std::io::Write::write_all(&mut std::fs::File::from(file), &vec![b'x'; bytes]).expect("write");
}

#[tokio::test]
async fn a_file_deeper_than_a_walk_goes_counts() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    set_quotas(&app, &alice, json!({ "storage_mb": 1 })).await;
    let workspace = app.data_dir.path().join("sandboxes").join(&alice.id);
    std::fs::create_dir_all(&workspace).expect("workspace");
    let _cleanup = RemoveChain(workspace.join("d"));
    // As a run would leave it: 2 MiB, 100 levels below the walk's limit.
    chain_with_a_file_at_the_bottom(&workspace, nox_sandbox::MAX_WALK_DEPTH + 100, 2 << 20);

    assert_quota_refusal("write", write(&app, &alice, "a.txt").await, "storage_mb");
    let complete = |usage: &Value| usage["usage"]["storage_complete"].clone();
    let (status, usage) = call(&app, &alice, Method::GET, "/quotas/my/usage").await;
    assert_eq!(
        (status, complete(&usage)),
        (StatusCode::OK, json!(false)),
        "{usage}"
    );
    assert_eq!(
        call(&app, &alice, Method::GET, "/ls?path=.").await.0,
        StatusCode::OK
    );
    let (status, deleted) = call(&app, &alice, Method::DELETE, "/delete?path=d").await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted["bytes_freed"], json!(2 << 20));
    assert_eq!(write(&app, &alice, "a.txt").await.0, StatusCode::OK);
    let (_, usage) = call(&app, &alice, Method::GET, "/quotas/my/usage").await;
    assert_eq!(complete(&usage), json!(true), "{usage}");
}

#[tokio::test]
async fn below_the_free_space_floor_writes_and_runs_get_507_and_the_rest_works() {
    // A floor no filesystem can meet: an exbibyte.
    let floor = |config: &mut nox_api::Config| config.min_free_mb = 1 << 40;
    let (app, runs) = match app_with_runs(floor).await {
        Some(app) => (app, true),
        None => (nox_testkit::spawn_app_with(floor).await, false),
    };
    let alice = app.new_user("alice").await;
    assert_eq!(
        call(&app, &alice, Method::GET, "/ls?path=.").await.0,
        StatusCode::OK
    );
    let workspace = app.data_dir.path().join("sandboxes").join(&alice.id);
    std::fs::write(workspace.join("kept.txt"), "kept").expect("a file");

    let (status, body) = write(&app, &alice, "new.txt").await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["code"], "insufficient_storage", "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    let mut refused = 1;
    if runs {
        let (status, body) = run(&app, &alice.token, json!({ "command": "true" })).await;
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
        assert_eq!(body["code"], "insufficient_storage", "{body}");
        refused += 1;
    } else {
        println!("/run not exercised: the command sandbox is not available here");
    }
    for path in ["/ls?path=.", "/cat?path=kept.txt", "/quotas/my/usage"] {
        assert_eq!(
            call(&app, &alice, Method::GET, path).await.0,
            StatusCode::OK,
            "{path}"
        );
    }
    let (status, _) = call(&app, &alice, Method::DELETE, "/delete?path=kept.txt").await;
    assert_eq!(status, StatusCode::OK);

    let user: Uuid = alice.id.parse().expect("uuid");
    let rows = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM audit_actions WHERE user_id = $1 AND status_code = 507",
            &[&user],
        )
        .await
        .expect("query");
    assert_eq!(rows.get::<_, i64>(0), refused, "each refusal is audited");
}
