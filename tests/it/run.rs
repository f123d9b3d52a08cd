//! `POST /run`: isolation and accounting, each asserted on the outcome.
//!
//! These need root (namespaces, cgroups, switching to the user's own uid);
//! as another user they print why they skip.

use std::time::{Duration, Instant};

use nox_testkit::{TestApp, send, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn can_isolate() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: /run isolation needs root (namespaces, cgroups, setuid)");
        return false;
    }
    true
}

async fn run(app: &TestApp, token: &str, body: Value) -> (StatusCode, Value) {
    let response = send(app.request(Method::POST, "/run", token).json(&body)).await;
    let status = response.status();
    (status, response.json().await.expect("json"))
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(marker) && !cmdline.contains("bash -c"))
        .collect()
}

#[tokio::test]
async fn a_command_runs_in_the_workspace_with_a_clean_environment() {
    if !can_isolate() {
        return;
    }
    let app = spawn_app().await;
    let token = app.new_user("alice").await.token;
    let (status, body) = run(
        &app,
        &token,
        json!({"command": "echo hello; echo made > made.txt; pwd"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["stdout"]
            .as_str()
            .expect("stdout")
            .starts_with("hello\n"),
        "{body}"
    );
    assert_eq!(
        (body["exit_code"].as_i64(), body["success"].as_bool()),
        (Some(0), Some(true))
    );
    assert_eq!(body["command_type"], "bash");
    assert_eq!(body["timed_out"], false);
    let listing: Value = app
        .get_as("/ls?path=.", &token)
        .await
        .json()
        .await
        .expect("json");
    assert!(
        listing["files"]
            .as_array()
            .expect("files")
            .iter()
            .any(|f| f["name"] == "made.txt")
    );

    let (_, body) = run(&app, &token, json!({"command": "env"})).await;
    let names: Vec<&str> = body["stdout"]
        .as_str()
        .expect("stdout")
        .lines()
        .filter_map(|line| line.split('=').next())
        .collect();
    for name in &names {
        assert!(
            [
                "PATH", "HOME", "TMPDIR", "LANG", "USER", "PWD", "SHLVL", "_"
            ]
            .contains(name),
            "unexpected variable {name}: {names:?}"
        );
    }
    let (_, body) = run(
        &app,
        &token,
        json!({"command": "id -u; cat", "stdin": "from stdin"}),
    )
    .await;
    let range = app.state.runs.uid_range().expect("root: a uid per user");
    let (uid, input) = body["stdout"]
        .as_str()
        .and_then(|out| out.split_once('\n'))
        .expect("two lines");
    let uid: u32 = uid.parse().expect("a uid");
    assert!(range.contains(uid), "{uid} outside {range:?}");
    assert_eq!(input, "from stdin");
}

#[tokio::test]
async fn a_command_cannot_read_or_write_outside_its_workspace() {
    if !can_isolate() {
        return;
    }
    let app = spawn_app().await;
    let alice = app.new_user("alice").await.token;
    let bob_user = app.new_user("bob").await;
    let (bob_id, bob) = (bob_user.id, bob_user.token);
    run(
        &app,
        &bob,
        json!({"command": "echo bob-secret > secret.txt"}),
    )
    .await;
    let bob_file = app
        .data_dir
        .path()
        .join("sandboxes")
        .join(&bob_id)
        .join("secret.txt");
    assert!(bob_file.exists());
    let data_dir = app.data_dir.path().display().to_string();
    let outside = tempfile::tempdir().expect("outside");
    let target = outside.path().join("written");
    for command in [
        format!("cat {}", bob_file.display()),
        format!("ls {data_dir}/audit-spool"),
        "ls /root".to_owned(),
        format!("echo x > {}", target.display()),
    ] {
        let (status, body) = run(&app, &alice, json!({ "command": command })).await;
        assert_eq!(status, StatusCode::OK);
        assert_ne!(body["exit_code"], 0, "{command} succeeded: {body}");
        assert!(
            !body["stdout"]
                .as_str()
                .expect("stdout")
                .contains("bob-secret")
        );
    }
    assert!(!target.exists());
    // Of the data directory, only the path to the workspace shows.
    let (_, body) = run(
        &app,
        &alice,
        json!({ "command": format!("ls -A {data_dir} {data_dir}/sandboxes") }),
    )
    .await;
    let shown: Vec<&str> = body["stdout"]
        .as_str()
        .expect("stdout")
        .lines()
        .filter(|line| !line.is_empty() && !line.ends_with(':'))
        .collect();
    assert_eq!(shown.len(), 2, "{body}");
    assert_eq!(shown[0], "sandboxes", "{body}");
    assert_ne!(shown[1], bob_id, "{body}");
    // Its /tmp is its own.
    let (_, body) = run(
        &app,
        &alice,
        json!({"command": "echo x > /tmp/nox-run-escape"}),
    )
    .await;
    assert_eq!(body["exit_code"], 0, "{body}");
    assert!(!std::path::Path::new("/tmp/nox-run-escape").exists());
}

#[tokio::test]
async fn nothing_a_command_started_outlives_it() {
    if !can_isolate() {
        return;
    }
    let app = spawn_app().await;
    let token = app.new_user("alice").await.token;
    // Timed out, with children in the background, one of them in its own session.
    let started = Instant::now();
    let (status, body) = run(
        &app,
        &token,
        json!({"command": "sleep 1001.25 & setsid sleep 1001.25 & (sleep 1001.25 &); echo started; sleep 1001.25", "timeout": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
    assert_eq!(
        (body["timed_out"].as_bool(), body["code"].as_str()),
        (Some(true), Some("timeout"))
    );
    assert_eq!(body["limit_hit"], "time");
    assert_eq!(
        body["stdout"], "started\n",
        "output before the timeout is kept"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        processes_with("1001.25").is_empty(),
        "{:?}",
        processes_with("1001.25")
    );

    // Exited normally, leaving background work behind: killed too.
    let (status, _) = run(
        &app,
        &token,
        json!({"command": "setsid sleep 1002.5 & nohup sleep 1002.5 >/dev/null & echo ok"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        processes_with("1002.5").is_empty(),
        "{:?}",
        processes_with("1002.5")
    );
}

#[tokio::test]
async fn floods_hogs_and_bombs_are_contained() {
    if !can_isolate() {
        return;
    }
    let app = spawn_app().await;
    let token = app.new_user("alice").await.token;

    let started = Instant::now();
    let (status, body) = run(
        &app,
        &token,
        json!({"command": "head -c 104857600 /dev/zero | tr '\\0' a", "timeout": 20}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["truncated"]["stdout"], true);
    assert_eq!(body["stdout"].as_str().expect("stdout").len(), 1024 * 1024);
    assert!(started.elapsed() < Duration::from_secs(20));

    // The standard tier allows 512 MiB per run.
    let (_, body) = run(
        &app,
        &token,
        json!({"command": "python3 -c 'x = bytearray(1536 * 1024 * 1024); print(len(x))'"}),
    )
    .await;
    assert_eq!(body["limit_hit"], "memory", "{body}");
    assert_ne!(body["exit_code"], 0);

    let bomb = tokio::spawn({
        let request = app
            .request(Method::POST, "/run", &token)
            .json(&json!({"command": "f() { f | f & }; f; exec sleep 2", "timeout": 5}));
        async move { send(request).await.json::<Value>().await.expect("json") }
    });
    // The server keeps answering meanwhile.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(app.get("/health").await.status(), StatusCode::OK);
    }
    let body = bomb.await.expect("join");
    assert_eq!(body["limit_hit"], "processes", "{body}");
}

#[tokio::test]
async fn the_network_is_denied_and_cpu_is_measured() {
    if !can_isolate() {
        return;
    }
    let app = spawn_app().await;
    let token = app.new_user("alice").await.token;
    let (_, body) = run(
        &app,
        &token,
        json!({"command": "exec 3<>/dev/tcp/127.0.0.1/5432 && echo connected"}),
    )
    .await;
    assert_ne!(body["exit_code"], 0, "{body}");
    assert!(
        !body["stdout"]
            .as_str()
            .expect("stdout")
            .contains("connected")
    );

    let (_, body) = run(
        &app,
        &token,
        json!({"command": "python3 -c 'import time\nwhile time.process_time() < 1.0: pass'"}),
    )
    .await;
    let cpu = body["cpu_time_ms"].as_f64().expect("cpu");
    assert!((800.0..=1200.0).contains(&cpu), "cpu_time_ms {cpu}: {body}");
    assert_eq!(body["command_type"], "python");
}

#[tokio::test]
async fn runs_are_audited_with_the_commands_facts() {
    if !can_isolate() {
        return;
    }
    let app = spawn_app().await;
    let token = app.new_user("alice").await.token;
    let (_, body) = run(
        &app,
        &token,
        json!({"command": "printf abc; printf de >&2; exit 4"}),
    )
    .await;
    assert_eq!(body["exit_code"], 4);
    let row = app
        .db
        .client()
        .await
        .query_one(
            "SELECT action_type, command_type, command_text, exit_code, stdout_size, stderr_size, cpu_time_ms, memory_peak_mb
             FROM audit_actions WHERE route = '/run'",
            &[],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "code_exec");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("bash"));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("printf abc; printf de >&2; exit 4")
    );
    assert_eq!(row.get::<_, Option<i32>>(3), Some(4));
    assert_eq!(
        (row.get::<_, Option<i64>>(4), row.get::<_, Option<i64>>(5)),
        (Some(3), Some(2))
    );
    assert!(row.get::<_, Option<f64>>(6).is_some() && row.get::<_, Option<f64>>(7).is_some());

    let (status, body) = run(&app, &token, json!({"command": ""})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_parameter"))
    );
    let (status, _) = run(&app, &token, json!({"command": "true", "timeout": 301})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let health: Value = app.get("/health").await.json().await.expect("json");
    assert_eq!(health["sandbox"]["status"], "ready", "{health}");
    assert_eq!(
        health["sandbox"]["layers"]["pid_namespace"], true,
        "{health}"
    );
    assert_eq!(health["sandbox"]["missing"], json!([]), "{health}");
}

#[tokio::test]
async fn at_most_two_runs_per_user_at_once() {
    if !can_isolate() {
        return;
    }
    let app = spawn_app().await;
    let token = app.new_user("alice").await.token;
    let other = app.new_user("bob").await.token;
    let slow = || {
        let request = app
            .request(Method::POST, "/run", &token)
            .json(&json!({"command": "sleep 1.5"}));
        tokio::spawn(async move { send(request).await.status() })
    };
    let (first, second) = (slow(), slow());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let third = send(
        app.request(Method::POST, "/run", &token)
            .json(&json!({"command": "true"})),
    )
    .await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(third.headers().contains_key("retry-after"));
    assert_eq!(
        third.json::<Value>().await.expect("json")["code"],
        "rate_limited"
    );
    // Another user is not held up.
    let (status, _) = run(&app, &other, json!({"command": "true"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first.await.expect("join"), StatusCode::OK);
    assert_eq!(second.await.expect("join"), StatusCode::OK);
    let (status, _) = run(&app, &token, json!({"command": "true"})).await;
    assert_eq!(status, StatusCode::OK, "slots are given back");
}
