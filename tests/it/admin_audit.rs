//! The admin audit API's read endpoints (the log search and export are not
//! built yet).

use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, send, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const ADMIN: &str = TEST_ADMIN_TOKEN;

async fn json_of(response: reqwest::Response) -> Value {
    let url = response.url().path().to_owned();
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    response.json().await.expect("json")
}

pub(crate) async fn auditor(app: &TestApp) -> String {
    let created: Value = send(
        app.request(Method::POST, "/admin/users", ADMIN)
            .json(&json!({"name": "audrey", "role": "auditor"})),
    )
    .await
    .json()
    .await
    .expect("json");
    created["token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn auditors_read_status_stats_users_summaries_and_admin_actions() {
    let app = spawn_app().await;
    let audrey = auditor(&app).await;
    let alice = app.new_user("alice").await;
    let bob = app.new_user("bob").await;
    for _ in 0..3 {
        app.get_as("/me", &alice.token).await;
    }
    app.get_as("/ls", &alice.token).await;
    app.get_as("/nope", &bob.token).await;

    let status = json_of(app.get_as("/admin/audit/status", &audrey).await).await;
    assert_eq!(status["audit_system"], "active");
    assert_eq!(status["mode"], "durable");
    assert_eq!(status["database_status"], "connected");
    assert!(status["rows_written"].as_u64().expect("rows") >= 5);
    assert_eq!(status["spool_rows"], 0);
    assert!(status["last_write_at"].is_string());
    let rollup = &status["rollup"];
    let (rolled, head) = (rollup["rolled_seq"].as_i64(), rollup["head_seq"].as_i64());
    assert!(rolled.is_some() && head >= rolled, "{rollup}");
    assert_eq!(
        rollup["rows_behind"].as_i64(),
        head.zip(rolled).map(|(h, r)| h - r)
    );
    assert!(rollup["lag_ms"].as_i64() >= Some(0), "{rollup}");

    let stats = json_of(app.get_as("/admin/stats", &audrey).await).await;
    assert!(stats["actions_today"].as_i64().expect("actions") >= 7);
    assert!(stats["users_today"].as_i64().expect("users") >= 3);
    assert!(stats["active_sessions"].as_i64().expect("sessions") >= 3);
    let rate = stats["error_rate_today"].as_f64().expect("rate");
    assert!(rate > 0.0 && rate < 100.0, "{rate}");

    let users = json_of(app.get_as("/admin/audit/users?days=1", &audrey).await).await;
    let alice_row = users["users"]
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["user_id"] == alice.id.as_str())
        .expect("alice")
        .clone();
    assert_eq!(alice_row["name"], "alice");
    assert_eq!(alice_row["total_actions"], 4);
    assert_eq!(alice_row["file_operations"], 1);
    assert_eq!(
        alice_row["top_endpoints"][0],
        json!({"endpoint": "/me", "count": 3})
    );
    assert_eq!(alice_row["unique_sessions"], 1);
    let bob_row = users["users"]
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["user_id"] == bob.id.as_str())
        .expect("bob")
        .clone();
    assert_eq!(
        (
            bob_row["failed_actions"].as_i64(),
            bob_row["total_actions"].as_i64()
        ),
        (Some(1), Some(1))
    );
    let busy = json_of(
        app.get_as("/admin/audit/users?days=1&min_actions=4", &audrey)
            .await,
    )
    .await;
    assert!(
        busy["users"]
            .as_array()
            .expect("users")
            .iter()
            .all(|u| u["total_actions"].as_i64() >= Some(4))
    );
    assert!(
        busy["users"]
            .as_array()
            .expect("users")
            .iter()
            .all(|u| u["user_id"] != bob.id.as_str())
    );

    // The rollups trail the commits by up to a step's interval.
    app.db.roll_up().await;
    let summaries = json_of(
        app.get_as(
            &format!("/admin/audit/daily-summaries?days=1&user_id={}", alice.id),
            &audrey,
        )
        .await,
    )
    .await;
    let rows = summaries["summaries"].as_array().expect("summaries");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0]["total_actions"].as_i64(),
            rows[0]["file_operations"].as_i64()
        ),
        (Some(4), Some(1))
    );
    let everyone = json_of(app.get_as("/admin/audit/daily-summaries", &audrey).await).await;
    assert!(everyone["summaries"].as_array().expect("summaries").len() >= 3);

    let all = json_of(app.get_as("/admin/audit/admin-actions", &audrey).await).await;
    assert_eq!(
        all["admin_actions"].as_array().expect("actions").len(),
        4,
        "bootstrap and three users"
    );
    let about_alice = json_of(
        app.get_as(
            &format!("/admin/audit/admin-actions?target_user_id={}", alice.id),
            &audrey,
        )
        .await,
    )
    .await;
    let list = about_alice["admin_actions"].as_array().expect("actions");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["admin_action_type"], "user_create");
    let none = json_of(
        app.get_as(
            "/admin/audit/admin-actions?admin_action_type=token_revoke",
            &audrey,
        )
        .await,
    )
    .await;
    assert!(
        none["admin_actions"]
            .as_array()
            .expect("actions")
            .is_empty()
    );
    let by_server = json_of(
        app.get_as(
            &format!("/admin/audit/admin-actions?admin_user_id={}", alice.id),
            &audrey,
        )
        .await,
    )
    .await;
    assert!(
        by_server["admin_actions"]
            .as_array()
            .expect("actions")
            .is_empty()
    );

    // Reading the trail is itself in the trail.
    let reads: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM audit_actions WHERE action_type = 'admin_read' AND route LIKE '/admin/%' AND status_code = 200",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(reads >= 10, "{reads}");
}

#[tokio::test]
async fn users_are_refused_and_bad_parameters_are_400() {
    let app = spawn_app().await;
    let alice = app.new_user("alice").await;
    for path in [
        "/admin/audit/status",
        "/admin/stats",
        "/admin/audit/users",
        "/admin/audit/daily-summaries",
        "/admin/audit/admin-actions",
        "/admin/audit/metrics",
    ] {
        assert_eq!(
            app.get_as(path, &alice.token).await.status(),
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    for path in [
        "/admin/audit/users?days=0",
        "/admin/audit/users?days=366",
        "/admin/audit/users?min_actions=-1",
        "/admin/audit/daily-summaries?user_id=not-a-uuid",
        "/admin/audit/admin-actions?days=abc",
        "/admin/audit/admin-actions?target_user_id=123",
        // A NUL cannot reach PostgreSQL's text (the API fuzzing found a 500).
        "/admin/audit/admin-actions?admin_action_type=a%00b",
    ] {
        let response = app.get_as(path, ADMIN).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], "invalid_parameter", "{path}");
    }
    // No recorder in this process: the audit metrics are not exported here.
    assert_eq!(
        app.get_as("/admin/audit/metrics", ADMIN).await.status(),
        StatusCode::NOT_FOUND
    );
}
