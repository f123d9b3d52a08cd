//! The audit trail: one correct row per request, sessions, request ids.

use std::collections::HashMap;

use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, send, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

const ADMIN: &str = TEST_ADMIN_TOKEN;

/// Sends a request tagged with a fresh X-Request-ID; returns the id and status.
async fn tagged(request: reqwest::RequestBuilder) -> (Uuid, StatusCode) {
    let id = Uuid::now_v7();
    let response = send(
        request
            .header("X-Request-ID", id.to_string())
            .header("User-Agent", "nox-it/1"),
    )
    .await;
    assert_eq!(response.headers()["x-request-id"], id.to_string().as_str());
    (id, response.status())
}

async fn rows_by_request_id(app: &TestApp) -> HashMap<Uuid, Row> {
    app.db
        .client()
        .await
        .query(
            "SELECT *, client_ip::text AS client_ip_text FROM audit_actions",
            &[],
        )
        .await
        .expect("query")
        .into_iter()
        .map(|row| (row.get("request_id"), row))
        .collect()
}

async fn admin_id(app: &TestApp) -> Uuid {
    let me: Value = app.get_as("/me", ADMIN).await.json().await.expect("json");
    me["id"].as_str().expect("id").parse().expect("uuid")
}

#[tokio::test]
async fn every_request_leaves_exactly_one_correct_row() {
    let app = spawn_app().await;
    let admin = admin_id(&app).await;
    let created: Value = send(
        app.request(Method::POST, "/admin/users", ADMIN)
            .json(&json!({"name": "uma"})),
    )
    .await
    .json()
    .await
    .expect("json");
    let user_token = created["token"].as_str().expect("token").to_owned();
    let user: Uuid = created["id"].as_str().expect("id").parse().expect("uuid");
    // What happened so far is recorded too; look only at what follows.
    let before = rows_by_request_id(&app).await.len();

    let ok = tagged(app.request(Method::GET, "/me?secret=hunter2", ADMIN)).await;
    let anonymous = tagged(app.client.get(app.url("/me"))).await;
    let bad_token = tagged(app.request(Method::GET, "/me", "nox_not-a-real-token")).await;
    let forbidden = tagged(app.request(Method::GET, "/admin/users", &user_token)).await;
    let not_found = tagged(app.request(Method::GET, "/no/such/route", &user_token)).await;
    let bad_input = tagged(
        app.request(Method::POST, "/admin/users", ADMIN)
            .json(&json!({"name": "Not Valid"})),
    )
    .await;
    let created = tagged(
        app.request(Method::POST, "/admin/users", ADMIN)
            .json(&json!({"name": "vic"})),
    )
    .await;
    let health = tagged(app.client.get(app.url("/health"))).await;

    let statuses = [
        ok.1,
        anonymous.1,
        bad_token.1,
        forbidden.1,
        not_found.1,
        bad_input.1,
        created.1,
        health.1,
    ];
    assert_eq!(
        statuses.map(|s| s.as_u16()),
        [200, 401, 401, 403, 404, 400, 201, 200]
    );

    let rows = rows_by_request_id(&app).await;
    assert_eq!(
        rows.len(),
        before + 7,
        "one row per request, /health skipped"
    );
    assert!(!rows.contains_key(&health.0));

    let check = |id: Uuid, user: Option<Uuid>, route: &str, kind: (&str, &str), status: i16| {
        let row = rows.get(&id).unwrap_or_else(|| panic!("no row for {id}"));
        assert_eq!(row.get::<_, Option<Uuid>>("user_id"), user, "{route}");
        assert_eq!(row.get::<_, String>("route"), route);
        assert_eq!(row.get::<_, String>("action_type"), kind.0, "{route}");
        assert_eq!(row.get::<_, String>("action_category"), kind.1, "{route}");
        assert_eq!(row.get::<_, i16>("status_code"), status);
        assert_eq!(row.get::<_, bool>("success"), (200..400).contains(&status));
        assert_eq!(row.get::<_, String>("client_ip_text"), "127.0.0.1/32");
        assert_eq!(
            row.get::<_, Option<String>>("user_agent").as_deref(),
            Some("nox-it/1")
        );
        assert!(row.get::<_, i64>("request_size") > 50, "{route}");
        assert!(row.get::<_, i64>("response_size") > 50, "{route}");
        assert!(row.get::<_, f64>("response_time_ms") > 0.0);
        assert!(row.get::<_, Option<f64>>("cpu_time_ms").expect("cpu") >= 0.0);
        assert_eq!(
            row.get::<_, Option<Uuid>>("session_id").is_some(),
            user.is_some(),
            "sessions exist for authenticated callers only"
        );
        let error: Option<String> = row.get("error_details");
        assert_eq!(error.is_some(), status >= 400, "{route}: {error:?}");
        row
    };
    let ok_row = check(ok.0, Some(admin), "/me", ("auth", "auth"), 200);
    assert_eq!(
        ok_row.get::<_, String>("endpoint"),
        "/me",
        "no query string"
    );
    assert_eq!(ok_row.get::<_, String>("http_method"), "GET");
    check(anonymous.0, None, "/me", ("auth", "auth"), 401);
    check(bad_token.0, None, "/me", ("auth", "auth"), 401);
    let forbidden_row = check(
        forbidden.0,
        Some(user),
        "/admin/users",
        ("admin_read", "admin"),
        403,
    );
    assert!(
        forbidden_row
            .get::<_, String>("error_details")
            .contains("requires the auditor role"),
        "the error's detail is kept"
    );
    let not_found_row = check(
        not_found.0,
        Some(user),
        "unmatched",
        ("api_call", "general"),
        404,
    );
    assert_eq!(not_found_row.get::<_, String>("endpoint"), "/no/such/route");
    check(
        bad_input.0,
        Some(admin),
        "/admin/users",
        ("admin_write", "admin"),
        400,
    );
    let created_row = check(
        created.0,
        Some(admin),
        "/admin/users",
        ("admin_write", "admin"),
        201,
    );
    assert!(
        created_row.get::<_, i64>("request_size") > ok_row.get::<_, i64>("request_size"),
        "the body counts"
    );

    // The admin's requests share one session; the user's is another.
    let session = |id: Uuid| rows[&id].get::<_, Option<Uuid>>("session_id");
    assert_eq!(session(ok.0), session(created.0));
    assert_ne!(session(ok.0), session(forbidden.0));
    assert_eq!(session(forbidden.0), session(not_found.0));

    // Nothing secret reached the rows.
    let text: String = app
        .db
        .client()
        .await
        .query_one("SELECT string_agg(a::text, ' ') FROM audit_actions a", &[])
        .await
        .expect("rows")
        .get(0);
    for secret in ["hunter2", ADMIN, user_token.as_str()] {
        assert!(!text.contains(secret), "{secret} leaked into audit_actions");
    }
}

#[tokio::test]
async fn request_ids_are_kept_when_valid_and_generated_otherwise() {
    let app = spawn_app().await;
    let response = send(
        app.request(Method::GET, "/me", ADMIN)
            .header("X-Request-ID", "not-a-uuid"),
    )
    .await;
    let generated: Uuid = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a generated UUID");
    let anonymous = send(app.client.get(app.url("/me"))).await;
    assert!(anonymous.headers().contains_key("x-request-id"));
    let health = send(app.client.get(app.url("/health"))).await;
    assert!(
        health.headers().contains_key("x-request-id"),
        "skipped paths still get one"
    );

    let rows = rows_by_request_id(&app).await;
    assert!(rows.contains_key(&generated));
    let count: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM audit_actions WHERE request_id = $1",
            &[&generated],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 1);
}

#[tokio::test]
async fn a_new_session_starts_after_the_idle_timeout() {
    let app = spawn_app().await;
    let first = tagged(app.request(Method::GET, "/me", ADMIN)).await;
    let second = tagged(app.request(Method::GET, "/me", ADMIN)).await;
    app.clock.advance(time::Duration::minutes(31));
    let third = tagged(app.request(Method::GET, "/me", ADMIN)).await;

    let rows = rows_by_request_id(&app).await;
    let session = |id: Uuid| -> Uuid {
        rows[&id]
            .get::<_, Option<Uuid>>("session_id")
            .expect("session")
    };
    assert_eq!(session(first.0), session(second.0));
    assert_ne!(session(second.0), session(third.0));

    let client = app.db.client().await;
    let old = client
        .query_one(
            "SELECT is_active, ended_at IS NOT NULL, ended_at = last_activity FROM audit_sessions WHERE id = $1",
            &[&session(first.0)],
        )
        .await
        .expect("old session");
    assert_eq!(
        (
            old.get::<_, bool>(0),
            old.get::<_, bool>(1),
            old.get::<_, bool>(2)
        ),
        (false, true, true)
    );
    let new = client
        .query_one(
            "SELECT is_active, ended_at IS NULL, session_token_hash FROM audit_sessions WHERE id = $1",
            &[&session(third.0)],
        )
        .await
        .expect("new session");
    assert!(new.get::<_, bool>(0) && new.get::<_, bool>(1));
    let hash: String = new.get(2);
    assert_eq!(hash.len(), 16);
    assert!(
        !ADMIN.contains(&hash),
        "the hash is not a piece of the token"
    );
}

#[tokio::test]
async fn rows_are_written_before_the_response_in_durable_mode() {
    let app = spawn_app().await;
    // No waiting, no flush: each response implies its row exists.
    for _ in 0..20 {
        let (id, status) = tagged(app.request(Method::GET, "/me", ADMIN)).await;
        assert_eq!(status, StatusCode::OK);
        let count: i64 = app
            .db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM audit_actions WHERE request_id = $1",
                &[&id],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(count, 1);
    }
}

/// A file operation's `cpu_time_ms` includes the CPU spent on the blocking
/// thread that did the filesystem work, not only the HTTP worker's.
#[tokio::test]
async fn cpu_time_includes_work_on_the_blocking_pool() {
    let app = spawn_app().await;
    let user = app.new_user("cpu").await;
    // Make the workspace, then fill a directory behind the server's back:
    // deleting 5,000 files is thousands of `unlink`s on the blocking pool.
    let made = send(
        app.request(Method::PUT, "/write?path=keep.txt", &user.token)
            .body("x"),
    )
    .await;
    assert_eq!(made.status(), StatusCode::OK);
    let many = app
        .data_dir
        .path()
        .join("sandboxes")
        .join(&user.id)
        .join("many");
    std::fs::create_dir(&many).expect("mkdir");
    for i in 0..5_000 {
        std::fs::write(many.join(format!("f{i}")), b"").expect("create");
    }
    let (small, status) =
        tagged(app.request(Method::DELETE, "/delete?path=keep.txt", &user.token)).await;
    assert_eq!(status, StatusCode::OK);
    let (big, status) = tagged(app.request(Method::DELETE, "/delete?path=many", &user.token)).await;
    assert_eq!(status, StatusCode::OK);

    let rows = rows_by_request_id(&app).await;
    let cpu = |id: &Uuid| -> f64 { rows[id].get::<_, Option<f64>>("cpu_time_ms").expect("cpu") };
    assert_eq!(
        rows[&big].get::<_, Option<i32>>("files_affected"),
        Some(5_000)
    );
    // 5,000 unlinks cost well over a millisecond of CPU wherever they run;
    // the HTTP worker's own part of either request is a fraction of that.
    assert!(
        cpu(&big) >= 2.0 && cpu(&big) > cpu(&small) + 1.0,
        "cpu_time_ms: deleting 5,000 files {}, one file {}",
        cpu(&big),
        cpu(&small)
    );
}
