//! Clients that go away mid-request: whether they close their side (FIN) or
//! reset the connection (RST), the work stops (a command's whole process
//! tree, its cgroups) and the request still gets exactly one row, with
//! status 499.

use std::time::Duration;

use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, spawn_app};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// How the client leaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Leave {
    /// Closes its side: the server reads the end of the stream.
    Fin,
    /// Resets the connection.
    Rst,
}

/// Opens a connection and sends `head` (the request line and headers, ended
/// by the blank line) and `body`.
async fn connect_and_send(app: &TestApp, head: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(app.address).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(body).await.expect("body");
    stream
}

fn leave(stream: TcpStream, how: Leave) {
    if how == Leave::Rst {
        stream.set_zero_linger().expect("SO_LINGER 0");
    }
    drop(stream);
}

fn head(method: &str, path: &str, token: &str, request_id: Uuid, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         X-Request-ID: {request_id}\r\n{extra}\r\n"
    )
}

/// Waits (bounded) until `check` holds; false if it never did.
async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The rows of one request: (status, error_details, response_size).
async fn rows_of(app: &TestApp, request_id: Uuid) -> Vec<(i16, Option<String>, i64)> {
    app.db
        .client()
        .await
        .query(
            "SELECT status_code, error_details, response_size FROM audit_actions
              WHERE request_id = $1",
            &[&request_id],
        )
        .await
        .expect("query")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// Waits for the request's row; expects exactly one, with status 499.
async fn expect_one_client_closed_row(app: &TestApp, request_id: Uuid) -> (Option<String>, i64) {
    assert!(
        eventually(async || !rows_of(app, request_id).await.is_empty()).await,
        "no row for the request"
    );
    // Anything recorded twice would be written by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = rows_of(app, request_id).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (status, detail, size) = rows[0].clone();
    assert_eq!(status, 499, "{detail:?}");
    (detail, size)
}

/// PIDs of processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    crate::run_leaks::command_lines()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(marker))
        .map(|(pid, _)| pid as u32)
        .collect()
}

/// The run's memory cgroup directory, read from one of its processes.
fn memory_cgroup_of(pid: u32) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|line| {
        let (_, rest) = line.split_once(':')?;
        let (controllers, path) = rest.split_once(':')?;
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    })?;
    path.starts_with("/nox/")
        .then(|| std::path::Path::new("/sys/fs/cgroup/memory").join(&path[1..]))
}

async fn a_run_whose_client_leaves_is_stopped_and_recorded(how: Leave) {
    let app = spawn_app().await;
    if app.state.runs.layers().is_none() {
        println!("skipped: the command sandbox is not available here (no nox-sandbox-exec)");
        return;
    }
    let alice = app.new_user("alice").await;
    // A unique sleep length marks the run's processes (the command itself
    // is in no process's arguments).
    let marker = format!("300.{}", rand_digits());
    let body =
        json!({ "command": format!("sleep {marker} & sleep {marker}; wait"), "timeout": 300 })
            .to_string();
    let request_id = Uuid::now_v7();
    let extra = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    let stream = connect_and_send(
        &app,
        &head("POST", "/run", &alice.token, request_id, &extra),
        body.as_bytes(),
    )
    .await;
    assert!(
        eventually(async || processes_with(&marker).len() >= 2).await,
        "the command never started"
    );
    let cgroup = processes_with(&marker)
        .into_iter()
        .find_map(memory_cgroup_of);
    leave(stream, how);

    assert!(
        eventually(async || processes_with(&marker).is_empty()).await,
        "the run's processes outlived their client: {:?}",
        processes_with(&marker)
    );
    match cgroup {
        Some(cgroup) => assert!(
            eventually(async || !cgroup.exists()).await,
            "{} was left behind",
            cgroup.display()
        ),
        None => println!(
            "cgroup check skipped: the run had no memory cgroup (not root, or no cgroup v1)"
        ),
    }
    let (detail, _) = expect_one_client_closed_row(&app, request_id).await;
    assert!(
        detail.is_some_and(|d| d.contains("client")),
        "the row says why"
    );
}

fn rand_digits() -> String {
    format!("{:09}", Uuid::new_v4().as_u128() % 1_000_000_000)
}

#[tokio::test]
async fn a_run_whose_client_closes_its_side_is_stopped_and_recorded() {
    a_run_whose_client_leaves_is_stopped_and_recorded(Leave::Fin).await;
}

#[tokio::test]
async fn a_run_whose_client_resets_is_stopped_and_recorded() {
    a_run_whose_client_leaves_is_stopped_and_recorded(Leave::Rst).await;
}

async fn an_upload_cut_short_is_recorded_and_keeps_nothing(how: Leave) {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let request_id = Uuid::now_v7();
    let stream = connect_and_send(
        &app,
        &head(
            "PUT",
            "/write?path=partial.bin",
            &alice.token,
            request_id,
            "Content-Length: 1000000\r\n",
        ),
        &[7u8; 10_000],
    )
    .await;
    // Let the handler start reading the body.
    tokio::time::sleep(Duration::from_millis(300)).await;
    leave(stream, how);
    expect_one_client_closed_row(&app, request_id).await;
    let listed = app
        .get_as("/ls?path=.", &alice.token)
        .await
        .text()
        .await
        .expect("listing");
    assert!(!listed.contains("partial.bin"), "{listed}");
}

#[tokio::test]
async fn an_upload_whose_client_closes_its_side_is_recorded() {
    an_upload_cut_short_is_recorded_and_keeps_nothing(Leave::Fin).await;
}

#[tokio::test]
async fn an_upload_whose_client_resets_is_recorded() {
    an_upload_cut_short_is_recorded_and_keeps_nothing(Leave::Rst).await;
}

/// Sends a GET, reads the response's first bytes, then resets.
async fn reset_after_the_first_bytes(app: &TestApp, path: &str, token: &str) -> Uuid {
    let request_id = Uuid::now_v7();
    let mut stream = connect_and_send(app, &head("GET", path, token, request_id, ""), b"").await;
    let mut first = [0u8; 1024];
    let read = stream.read(&mut first).await.expect("read");
    assert!(
        String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..read])
    );
    leave(stream, Leave::Rst);
    request_id
}

#[tokio::test]
async fn a_download_whose_client_resets_is_recorded() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let size = 40 * 1024 * 1024;
    let response = app
        .request(reqwest::Method::PUT, "/write?path=big.bin", &alice.token)
        .body(vec![1u8; size])
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 200);
    let request_id =
        reset_after_the_first_bytes(&app, "/download?path=big.bin", &alice.token).await;
    let (_, sent) = expect_one_client_closed_row(&app, request_id).await;
    assert!(sent < size as i64, "{sent} bytes recorded as sent");
}

#[tokio::test]
async fn an_export_whose_client_resets_is_recorded() {
    let app = spawn_app().await;
    let now = time::OffsetDateTime::now_utc();
    nox_audit_store::seed::seed(&app.state.pool, 60_000, 1, &[Uuid::now_v7()], now, |_| {})
        .await
        .expect("seed");
    let request_id =
        reset_after_the_first_bytes(&app, "/admin/audit/export?format=ndjson", TEST_ADMIN_TOKEN)
            .await;
    expect_one_client_closed_row(&app, request_id).await;
}
