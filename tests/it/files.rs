//! The per-user file sandbox: round trips, limits, confinement.

use std::os::unix::fs::symlink;
use std::path::PathBuf;

use nox_testkit::{TestApp, TestUser, send, spawn_app, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn workspace(app: &TestApp, user: &TestUser) -> PathBuf {
    app.data_dir.path().join("sandboxes").join(&user.id)
}

fn q(path: &str) -> String {
    // Encode as a client library would: the server decodes once.
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

async fn write(app: &TestApp, user: &TestUser, path: &str, body: Vec<u8>) -> reqwest::Response {
    send(
        app.request(
            Method::PUT,
            &format!("/write?path={}", q(path)),
            &user.token,
        )
        .body(body),
    )
    .await
}

async fn call(
    app: &TestApp,
    user: &TestUser,
    method: Method,
    endpoint: &str,
    path: &str,
) -> reqwest::Response {
    send(app.request(method, &format!("{endpoint}?path={}", q(path)), &user.token)).await
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("json")
}

#[tokio::test]
async fn write_list_read_download_delete_round_trips() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let big: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();

    for (path, body) in [
        ("notes/hello.txt", b"hello\n".to_vec()),
        ("/bin.dat", binary.clone()),
        ("empty", Vec::new()),
        ("deep/a/b/c/big.bin", big.clone()),
    ] {
        let response = write(&app, &alice, path, body.clone()).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let written = json_of(response).await;
        assert_eq!(written["size"], body.len());
        assert_eq!(written["file_path"], path.trim_start_matches('/'));

        let download = call(&app, &alice, Method::GET, "/download", path).await;
        assert_eq!(download.status(), StatusCode::OK);
        assert_eq!(
            download.headers()["content-type"],
            "application/octet-stream"
        );
        assert_eq!(
            download.headers()["content-length"],
            body.len().to_string().as_str()
        );
        assert_eq!(
            download.bytes().await.expect("bytes").to_vec(),
            body,
            "{path}"
        );
    }
    // HEAD answers the GET's headers without the file.
    let head = call(
        &app,
        &alice,
        Method::HEAD,
        "/download",
        "deep/a/b/c/big.bin",
    )
    .await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        big.len().to_string().as_str()
    );
    assert!(head.bytes().await.expect("body").is_empty());
    // Every download left one clean record of the bytes it sent, committed
    // before the client had the whole response: a streamed body's when it
    // ended; the empty file's (whose body is never polled) and the HEAD's
    // before the response went out.
    let rows = app
        .db
        .client()
        .await
        .query(
            "SELECT http_method, file_path, response_size, error_details FROM audit_actions
             WHERE route = '/download' AND user_id::text = $1 ORDER BY \"timestamp\", id",
            &[&alice.id],
        )
        .await
        .expect("download rows");
    let downloads: Vec<(String, String, i64, Option<String>)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let expected = [
        ("GET", "notes/hello.txt", 6),
        ("GET", "bin.dat", binary.len()),
        ("GET", "empty", 0),
        ("GET", "deep/a/b/c/big.bin", big.len()),
        ("HEAD", "deep/a/b/c/big.bin", 0),
    ];
    assert_eq!(downloads.len(), expected.len(), "{downloads:?}");
    for ((method, path, size, error), (want_method, want_path, body_len)) in
        downloads.iter().zip(expected)
    {
        assert_eq!((method.as_str(), path.as_str()), (want_method, want_path));
        assert_eq!(*error, None, "{path}");
        let head_len = *size - body_len as i64;
        assert!((150..400).contains(&head_len), "{path}: {size} bytes");
    }

    let text = json_of(call(&app, &alice, Method::GET, "/cat", "notes/hello.txt").await).await;
    assert_eq!(
        text,
        json!({"file_path": "notes/hello.txt", "size": 6, "encoding": "utf-8", "content": "hello\n"})
    );
    let raw = json_of(call(&app, &alice, Method::GET, "/cat", "bin.dat").await).await;
    assert_eq!(raw["encoding"], "base64");
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(raw["content"].as_str().expect("content"))
        .expect("base64");
    assert_eq!(decoded, binary);
    let empty = json_of(call(&app, &alice, Method::GET, "/cat", "empty").await).await;
    assert_eq!(
        (empty["size"].as_u64(), empty["content"].as_str()),
        (Some(0), Some(""))
    );
    let too_big = call(&app, &alice, Method::GET, "/cat", "deep/a/b/c/big.bin").await;
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        json_of(too_big).await["detail"]
            .as_str()
            .expect("detail")
            .contains("/download")
    );

    let root = json_of(call(&app, &alice, Method::GET, "/ls", ".").await).await;
    assert_eq!(root["type"], "directory");
    let names: Vec<&str> = root["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["bin.dat", "deep/", "empty", "notes/"]);
    let deep = &root["files"][1];
    assert_eq!(
        (deep["type"].as_str(), deep["size"].is_null()),
        (Some("directory"), true)
    );
    assert!(
        root["files"][0]["modified"]
            .as_str()
            .expect("modified")
            .ends_with('Z')
    );
    let file = json_of(call(&app, &alice, Method::GET, "/ls", "notes/hello.txt").await).await;
    assert_eq!(
        (file["type"].as_str(), file["size"].as_u64()),
        (Some("file"), Some(6))
    );

    // Overwrite replaces the content atomically.
    assert_eq!(
        write(&app, &alice, "empty", b"now full".to_vec())
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        json_of(call(&app, &alice, Method::GET, "/cat", "empty").await).await["content"],
        "now full"
    );

    let deleted = json_of(call(&app, &alice, Method::DELETE, "/delete", "deep").await).await;
    assert_eq!(deleted["files_deleted"], 1);
    assert_eq!(deleted["bytes_freed"], big.len());
    assert_eq!(deleted["message"], "Deleted directory deep");
    let deleted = json_of(call(&app, &alice, Method::DELETE, "/delete", "bin.dat").await).await;
    assert_eq!(deleted["message"], "Deleted file bin.dat");
    assert_eq!(
        call(&app, &alice, Method::GET, "/cat", "bin.dat")
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let missing = call(&app, &alice, Method::DELETE, "/delete", "bin.dat").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(missing).await["code"], "not_found");
}

#[tokio::test]
async fn multipart_and_raw_uploads_both_work() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let form = reqwest::multipart::Form::new()
        .text("comment", "ignored")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"from a form".to_vec()).file_name("x.txt"),
        );
    let response = send(
        app.request(Method::PUT, "/write?path=form.txt", &alice.token)
            .multipart(form),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        json_of(call(&app, &alice, Method::GET, "/cat", "form.txt").await).await["content"],
        "from a form"
    );

    let no_file = reqwest::multipart::Form::new().text("other", "x");
    let response = send(
        app.request(Method::PUT, "/write?path=none.txt", &alice.token)
            .multipart(no_file),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let response = send(
        app.request(Method::PUT, "/write?path=raw.json", &alice.token)
            .header("content-type", "application/json")
            .body("{\"a\":1}"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        json_of(call(&app, &alice, Method::GET, "/cat", "raw.json").await).await["content"],
        "{\"a\":1}"
    );
    assert!(
        std::fs::read_dir(workspace(&app, &alice))
            .expect("dir")
            .count()
            == 2
    );
}

#[tokio::test]
async fn an_upload_over_the_limit_is_413_and_leaves_nothing() {
    let app = spawn_app_with(|config| config.max_upload_mb = 1).await;
    let alice = app.new_user("alice").await;
    let too_big = vec![7u8; 2 * 1024 * 1024];

    // Declared length: refused before reading.
    let response = write(&app, &alice, "big/declared.bin", too_big.clone()).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json_of(response).await["code"], "payload_too_large");

    // Chunked, no length: refused while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        too_big.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let stream = futures_util::stream::iter(chunks);
    let response = send(
        app.request(Method::PUT, "/write?path=streamed.bin", &alice.token)
            .body(reqwest::Body::wrap_stream(stream)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let leftovers: Vec<String> = walk(&workspace(&app, &alice));
    assert!(
        leftovers
            .iter()
            .all(|p| !p.ends_with(".bin") && !p.contains(".nox-upload-")),
        "{leftovers:?}"
    );
    // Just under the limit is fine.
    assert_eq!(
        write(&app, &alice, "ok.bin", vec![1u8; 1024 * 1024])
            .await
            .status(),
        StatusCode::OK
    );

    // Both refusals are in the audit trail, attributed to the caller.
    let refused: Vec<(String, Option<String>)> = app
        .db
        .client()
        .await
        .query(
            "SELECT user_id::text, file_path FROM audit_actions WHERE status_code = 413 ORDER BY timestamp",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|row| (row.get::<_, Option<String>>(0).unwrap_or_default(), row.get(1)))
        .collect();
    assert_eq!(
        refused,
        vec![
            (alice.id.clone(), Some("big/declared.bin".to_owned())),
            (alice.id.clone(), Some("streamed.bin".to_owned())),
        ]
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        found.push(path.display().to_string());
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            found.extend(walk(&path));
        }
    }
    found
}

#[tokio::test]
async fn deleting_the_workspace_root_is_refused() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    assert_eq!(
        write(&app, &alice, "keep.txt", b"x".to_vec())
            .await
            .status(),
        StatusCode::OK
    );
    for root in [".", "/", "", "./", "//", "/./"] {
        let response = call(&app, &alice, Method::DELETE, "/delete", root).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{root:?}");
        assert_eq!(json_of(response).await["code"], "invalid_path");
    }
    assert!(workspace(&app, &alice).join("keep.txt").exists());
}

/// Users never see each other's files, and no hostile path reaches outside
/// the caller's workspace, through any endpoint.
#[tokio::test]
async fn hostile_paths_are_refused_and_touch_nothing_outside() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    assert_eq!(
        write(&app, &bob, "secret.txt", b"bob's".to_vec())
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        write(&app, &alice, "mine.txt", b"alice's".to_vec())
            .await
            .status(),
        StatusCode::OK
    );

    // What /run could leave in a workspace: links leading out of it.
    let outside = tempfile::tempdir().expect("outside");
    let sentinel = outside.path().join("sentinel");
    std::fs::write(&sentinel, b"untouched").expect("sentinel");
    let alice_ws = workspace(&app, &alice);
    let bob_ws = workspace(&app, &bob);
    symlink("/etc", alice_ws.join("etc-link")).expect("link");
    symlink("/etc/hostname", alice_ws.join("hostname-link")).expect("link");
    symlink(&bob_ws, alice_ws.join("bob-link")).expect("link");
    symlink(bob_ws.join("secret.txt"), alice_ws.join("bob-secret")).expect("link");
    symlink(&sentinel, alice_ws.join("sentinel-link")).expect("link");
    symlink(outside.path(), alice_ws.join("outside-dir")).expect("link");
    symlink("mine.txt", alice_ws.join("inner-link")).expect("link");

    let bob_rel = format!("../{}/secret.txt", bob.id);
    let long_component = "a".repeat(256);
    let long_path = "a/".repeat(2100);
    let hostile: Vec<String> = vec![
        "..".into(),
        "../".into(),
        "../../etc/passwd".into(),
        "/../etc/passwd".into(),
        "a/../../etc/passwd".into(),
        "a/..".into(),
        "./..".into(),
        "mine.txt/..".into(),
        bob_rel.clone(),
        format!("/../{}/secret.txt", bob.id),
        "..\\etc\\passwd".into(),
        "a\\b".into(),
        "mine.txt\0.png".into(),
        "\0".into(),
        long_component.clone(),
        format!("dir/{long_component}"),
        long_path.clone(),
        "etc-link".into(),
        "etc-link/passwd".into(),
        "etc-link/hostname".into(),
        "hostname-link".into(),
        "bob-link/secret.txt".into(),
        "bob-link".into(),
        "bob-secret".into(),
        "sentinel-link".into(),
        "outside-dir/sentinel".into(),
        "outside-dir/new.txt".into(),
        "inner-link".into(),
        "etc-link/../mine.txt".into(),
        "/etc-link/shadow".into(),
    ];
    assert!(hostile.len() >= 30);
    for path in &hostile {
        for (method, endpoint) in [
            (Method::GET, "/ls"),
            (Method::GET, "/cat"),
            (Method::GET, "/download"),
            (Method::PUT, "/write"),
        ] {
            let request = app.request(
                method.clone(),
                &format!("{endpoint}?path={}", q(path)),
                &alice.token,
            );
            let request = if method == Method::PUT {
                request.body("pwned")
            } else {
                request
            };
            let response = send(request).await;
            let status = response.status();
            let body = json_of(response).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{endpoint} {path:?}: {body}"
            );
            let code = body["code"].as_str().expect("code");
            assert!(
                code == "path_escape" || code == "invalid_path",
                "{endpoint} {path:?}: {code}"
            );
        }
    }
    // Deleting a link removes the link, never its target.
    for link in [
        "etc-link",
        "hostname-link",
        "bob-link",
        "bob-secret",
        "sentinel-link",
        "outside-dir",
    ] {
        let response = call(&app, &alice, Method::DELETE, "/delete", link).await;
        assert_eq!(response.status(), StatusCode::OK, "{link}");
        assert!(
            !alice_ws.join(link).exists()
                && std::fs::symlink_metadata(alice_ws.join(link)).is_err()
        );
    }
    // Absolute-looking paths are names inside the workspace.
    assert_eq!(
        call(&app, &alice, Method::GET, "/cat", "/etc/passwd")
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    // A doubly encoded '..' arrives as the literal name "%2e%2e".
    let literal =
        send(app.request(Method::GET, "/cat?path=%252e%252e/etc/passwd", &alice.token)).await;
    assert_eq!(literal.status(), StatusCode::NOT_FOUND);
    let decoded = send(app.request(Method::GET, "/cat?path=%2e%2e/etc/passwd", &alice.token)).await;
    assert_eq!(json_of(decoded).await["code"], "path_escape");

    // Nothing outside was read, changed or removed.
    assert_eq!(std::fs::read(&sentinel).expect("sentinel"), b"untouched");
    assert_eq!(std::fs::read_dir(outside.path()).expect("dir").count(), 1);
    assert_eq!(
        std::fs::read(bob_ws.join("secret.txt")).expect("bob's file"),
        b"bob's"
    );
    assert!(std::path::Path::new("/etc/hostname").exists());
    // Bob's view is his own.
    let bobs = json_of(call(&app, &bob, Method::GET, "/ls", ".").await).await;
    assert_eq!(bobs["files"].as_array().expect("files").len(), 1);
    assert_eq!(
        call(&app, &bob, Method::GET, "/cat", "mine.txt")
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

/// action_type, status_code, file_path, file_size_bytes, files_affected
type FileRow = (String, i16, Option<String>, Option<i64>, Option<i32>);

#[tokio::test]
async fn file_actions_carry_their_details_in_the_audit_trail() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    write(&app, &alice, "a/b.txt", b"12345".to_vec()).await;
    write(&app, &alice, "a/c.txt", b"123".to_vec()).await;
    call(&app, &alice, Method::GET, "/cat", "a/b.txt").await;
    call(&app, &alice, Method::GET, "/ls", "a").await;
    call(&app, &alice, Method::GET, "/cat", "../x").await;
    call(&app, &alice, Method::DELETE, "/delete", "a").await;
    let rows = app
        .db
        .client()
        .await
        .query(
            "SELECT action_type, status_code, file_path, file_size_bytes, files_affected
             FROM audit_actions WHERE action_category = 'filesystem' ORDER BY timestamp",
            &[],
        )
        .await
        .expect("rows");
    let rows: Vec<FileRow> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "file_write".into(),
                200,
                Some("a/b.txt".into()),
                Some(5),
                Some(1)
            ),
            (
                "file_write".into(),
                200,
                Some("a/c.txt".into()),
                Some(3),
                Some(1)
            ),
            (
                "file_read".into(),
                200,
                Some("a/b.txt".into()),
                Some(5),
                Some(1)
            ),
            ("file_read".into(), 200, Some("a".into()), None, Some(2)),
            ("file_read".into(), 400, Some("../x".into()), None, Some(0)),
            (
                "file_delete".into(),
                200,
                Some("a".into()),
                Some(8),
                Some(2)
            ),
        ]
    );
}
