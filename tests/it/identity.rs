//! Users, tokens, roles and the admin API.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nox_testkit::{TEST_ADMIN_TOKEN, TestApp, send, spawn_app, spawn_app_on, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const ADMIN: &str = TEST_ADMIN_TOKEN;

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

/// Creates a user through the API; returns its record (with `token`).
async fn create_user(app: &TestApp, body: Value) -> Value {
    let response = send(app.request(Method::POST, "/admin/users", ADMIN).json(&body)).await;
    assert_eq!(response.status(), StatusCode::CREATED, "{body}");
    json_of(response).await
}

async fn admin_actions(
    app: &TestApp,
) -> Vec<(
    String,
    Option<String>,
    Option<Value>,
    Option<Value>,
    Option<String>,
)> {
    app.db
        .client()
        .await
        .query(
            "SELECT admin_action_type, target_user_id::text, old_values, new_values, justification
             FROM audit_admin_actions ORDER BY id",
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .collect()
}

async fn assert_unauthorized(response: reqwest::Response) {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body = json_of(response).await;
    assert_eq!(body["code"], "unauthorized", "{body}");
    assert!(body["detail"].is_string());
}

#[tokio::test]
async fn bootstrap_with_an_operator_token_creates_one_admin() {
    let app = spawn_app().await;
    let me = json_of(app.get_as("/me", ADMIN).await).await;
    assert_eq!(me["name"], "admin");
    assert_eq!(me["role"], "admin");
    assert_eq!(me["tier"], "unlimited");
    assert_eq!(me["is_active"], true);
    assert!(
        !app.data_dir.path().join("admin-token").exists(),
        "only generated tokens are saved"
    );

    let actions = admin_actions(&app).await;
    assert_eq!(actions.len(), 1, "{actions:?}");
    let (kind, target, _, new_values, justification) = &actions[0];
    assert_eq!(kind, "user_create");
    assert_eq!(target.as_deref(), me["id"].as_str());
    assert_eq!(justification.as_deref(), Some("bootstrap"));
    let admin_user: Option<String> = app
        .db
        .client()
        .await
        .query_one("SELECT admin_user_id::text FROM audit_admin_actions", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(admin_user, None, "the server itself acted");
    assert!(
        !new_values
            .as_ref()
            .expect("values")
            .to_string()
            .contains(ADMIN)
    );
}

#[tokio::test]
async fn bootstrap_without_a_token_generates_saves_and_never_repeats() {
    let app = spawn_app_with(|config| config.admin_token = None).await;
    let path = app.data_dir.path().join("admin-token");
    let token = std::fs::read_to_string(&path).expect("admin-token file");
    let token = token.trim();
    assert!(token.starts_with("nox_") && token.len() == 68, "{token}");
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(app.get_as("/me", token).await.status(), StatusCode::OK);

    // A second server on the same database finds the admin and adds none.
    let second = spawn_app_on(Arc::clone(&app.db), |config| config.admin_token = None).await;
    assert!(!second.data_dir.path().join("admin-token").exists());
    assert_eq!(app.db.scalar("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM audit_admin_actions")
            .await,
        1
    );
}

#[tokio::test]
async fn created_users_and_their_tokens_work_until_revoked() {
    let app = spawn_app().await;
    let user = create_user(&app, json!({"name": "alice", "email": "alice@example.com"})).await;
    for field in [
        "id",
        "name",
        "email",
        "role",
        "tier",
        "is_active",
        "created_at",
        "token",
    ] {
        assert!(user.get(field).is_some(), "missing {field}: {user}");
    }
    assert_eq!(user["role"], "user");
    assert_eq!(user["tier"], "standard");
    let first = user["token"].as_str().expect("token").to_owned();
    let me = json_of(app.get_as("/me", &first).await).await;
    assert_eq!(me["name"], "alice");
    assert!(me.get("token").is_none());

    let id = user["id"].as_str().expect("id");
    let response = send(
        app.request(Method::POST, &format!("/admin/users/{id}/tokens"), ADMIN)
            .json(&json!({"name": "ci", "expires_in_days": 30})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let second = json_of(response).await;
    let second_token = second["token"].as_str().expect("token").to_owned();
    assert!(second["expires_at"].is_string());
    assert_eq!(second["prefix"], &second_token[..12]);
    assert_eq!(
        app.get_as("/me", &second_token).await.status(),
        StatusCode::OK
    );

    // Token lists never show a secret or a hash.
    let listing = app
        .get_as(&format!("/admin/users/{id}/tokens"), ADMIN)
        .await;
    let text = listing.text().await.expect("body");
    assert!(
        !text.contains(&first) && !text.contains(&second_token),
        "{text}"
    );
    assert!(!text.contains("hash"), "{text}");
    let tokens: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(tokens["tokens"].as_array().expect("array").len(), 2);

    // Revocation applies at once on this instance; the other token lives on.
    let token_id = second["id"].as_str().expect("id");
    let response =
        send(app.request(Method::DELETE, &format!("/admin/tokens/{token_id}"), ADMIN)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_unauthorized(app.get_as("/me", &second_token).await).await;
    assert_eq!(app.get_as("/me", &first).await.status(), StatusCode::OK);

    // Revoking again changes nothing and records nothing.
    let before = app
        .db
        .scalar("SELECT count(*) FROM audit_admin_actions")
        .await;
    let again =
        send(app.request(Method::DELETE, &format!("/admin/tokens/{token_id}"), ADMIN)).await;
    assert_eq!(again.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM audit_admin_actions")
            .await,
        before
    );

    // Deactivation locks every token of the user out.
    let response = send(
        app.request(Method::PATCH, &format!("/admin/users/{id}"), ADMIN)
            .json(&json!({"is_active": false})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_unauthorized(app.get_as("/me", &first).await).await;
    // Refused again (from memory now; see nox-auth's cache tests).
    assert_unauthorized(app.get_as("/me", &first).await).await;

    // Reactivation lets them in again at once on this instance, although
    // the token was just refused.
    let response = send(
        app.request(Method::PATCH, &format!("/admin/users/{id}"), ADMIN)
            .json(&json!({"is_active": true})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.get_as("/me", &first).await.status(), StatusCode::OK);

    // The body is optional: none, or a JSON `null` (which the document
    // allows; the API fuzzing found it refused), gives a token that works.
    for body in ["", "null"] {
        let response = send(
            app.request(Method::POST, &format!("/admin/users/{id}/tokens"), ADMIN)
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!(response.status(), StatusCode::CREATED, "{body:?}");
        let issued = json_of(response).await;
        let token = issued["token"].as_str().expect("token");
        assert_eq!(app.get_as("/me", token).await.status(), StatusCode::OK);
    }

    // Nothing issued ever reached the audit trail.
    let all: String = app
        .db
        .client()
        .await
        .query_one(
            "SELECT coalesce(string_agg(t::text, ' '), '') FROM audit_admin_actions t",
            &[],
        )
        .await
        .expect("rows")
        .get(0);
    for secret in [first.as_str(), second_token.as_str(), ADMIN] {
        assert!(
            !all.contains(secret),
            "a token leaked into audit_admin_actions"
        );
    }
}

#[tokio::test]
async fn missing_malformed_unknown_expired_and_inactive_tokens_get_401() {
    let app = spawn_app().await;
    assert_unauthorized(app.get("/me").await).await;
    for header in [
        "Basic YWRtaW46YWRtaW4=",
        "Bearer",
        "Bearer ",
        "Bearer a b",
        "nox_abc",
    ] {
        let response = send(
            app.client
                .get(app.url("/me"))
                .header("authorization", header),
        )
        .await;
        assert_unauthorized(response).await;
    }
    assert_unauthorized(
        app.get_as(
            "/me",
            "nox_0000000000000000000000000000000000000000000000000000000000000000",
        )
        .await,
    )
    .await;

    let user = create_user(&app, json!({"name": "expiring"})).await;
    let token = user["token"].as_str().expect("token");
    assert_eq!(app.get_as("/me", token).await.status(), StatusCode::OK);
    // Expire it behind the server's back, then wait out the cache.
    app.db
        .client()
        .await
        .execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE prefix = $1",
            &[&&token[..12]],
        )
        .await
        .expect("expire");
    let app2 = spawn_app_on(Arc::clone(&app.db), |_| {}).await;
    assert_unauthorized(app2.get_as("/me", token).await).await;
}

#[tokio::test]
async fn roles_gate_the_admin_api() {
    let app = spawn_app().await;
    let user = create_user(&app, json!({"name": "uma"})).await;
    let auditor = create_user(&app, json!({"name": "audrey", "role": "auditor"})).await;
    let user_token = user["token"].as_str().expect("token");
    let auditor_token = auditor["token"].as_str().expect("token");
    let user_id = user["id"].as_str().expect("id");

    let forbidden = |response: reqwest::Response| async move {
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(json_of(response).await["code"], "forbidden");
    };
    forbidden(app.get_as("/admin/users", user_token).await).await;
    forbidden(
        app.get_as(&format!("/admin/users/{user_id}"), user_token)
            .await,
    )
    .await;
    forbidden(
        send(
            app.request(Method::POST, "/admin/users", auditor_token)
                .json(&json!({"name": "x"})),
        )
        .await,
    )
    .await;
    forbidden(
        send(
            app.request(
                Method::PATCH,
                &format!("/admin/users/{user_id}"),
                auditor_token,
            )
            .json(&json!({"tier": "free"})),
        )
        .await,
    )
    .await;
    forbidden(
        send(app.request(
            Method::POST,
            &format!("/admin/users/{user_id}/tokens"),
            auditor_token,
        ))
        .await,
    )
    .await;
    forbidden(
        app.get_as(&format!("/admin/users/{user_id}/tokens"), auditor_token)
            .await,
    )
    .await;

    let listing = app.get_as("/admin/users", auditor_token).await;
    assert_eq!(listing.status(), StatusCode::OK);
    let names: Vec<String> = json_of(listing).await["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(names, ["admin", "audrey", "uma"]);
    assert_eq!(
        app.get_as(&format!("/admin/users/{user_id}"), auditor_token)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        app.get_as("/me", auditor_token).await.status(),
        StatusCode::OK
    );
    // The refused calls changed nothing.
    assert_eq!(app.db.scalar("SELECT count(*) FROM users").await, 3);
}

#[tokio::test]
async fn every_mutation_leaves_exactly_one_admin_action_with_its_justification() {
    let app = spawn_app().await;
    let justify = |request: reqwest::RequestBuilder, why: &str| {
        request.header("X-Nox-Justification", why.to_owned())
    };
    let user = json_of(
        send(justify(
            app.request(Method::POST, "/admin/users", ADMIN)
                .json(&json!({"name": "bob", "tier": "free"})),
            "ticket-1",
        ))
        .await,
    )
    .await;
    let id = user["id"].as_str().expect("id").to_owned();
    let patched = send(justify(
        app.request(Method::PATCH, &format!("/admin/users/{id}"), ADMIN)
            .json(&json!({"tier": "premium", "email": "bob@example.com"})),
        "ticket-2",
    ))
    .await;
    assert_eq!(patched.status(), StatusCode::OK);
    let patched = json_of(patched).await;
    assert_eq!(
        (patched["tier"].as_str(), patched["email"].as_str()),
        (Some("premium"), Some("bob@example.com"))
    );
    let token = json_of(
        send(justify(
            app.request(Method::POST, &format!("/admin/users/{id}/tokens"), ADMIN),
            "ticket-3",
        ))
        .await,
    )
    .await;
    let token_id = token["id"].as_str().expect("id");
    let revoked = send(justify(
        app.request(Method::DELETE, &format!("/admin/tokens/{token_id}"), ADMIN),
        "ticket-4",
    ))
    .await;
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    // A patch that changes nothing is not a mutation.
    let same = send(
        app.request(Method::PATCH, &format!("/admin/users/{id}"), ADMIN)
            .json(&json!({"tier": "premium"})),
    )
    .await;
    assert_eq!(same.status(), StatusCode::OK);

    let actions = admin_actions(&app).await;
    let kinds: Vec<&str> = actions.iter().map(|a| a.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "user_create",
            "user_create",
            "user_update",
            "token_create",
            "token_revoke"
        ]
    );
    for (index, why) in ["ticket-1", "ticket-2", "ticket-3", "ticket-4"]
        .iter()
        .enumerate()
    {
        let action = &actions[index + 1];
        assert_eq!(
            action.1.as_deref(),
            Some(id.as_str()),
            "target of {}",
            action.0
        );
        assert_eq!(action.4.as_deref(), Some(*why));
    }
    let update = &actions[2];
    assert_eq!(update.2, Some(json!({"tier": "free", "email": null})));
    assert_eq!(
        update.3,
        Some(json!({"tier": "premium", "email": "bob@example.com"}))
    );
    let admin_user_ids = app
        .db
        .scalar(
            "SELECT count(*) FROM audit_admin_actions a
             JOIN users u ON u.id = a.admin_user_id WHERE u.name = 'admin'",
        )
        .await;
    assert_eq!(admin_user_ids, 4, "the acting admin is recorded");
}

#[tokio::test]
async fn bad_input_is_a_clear_400_or_409_and_writes_nothing() {
    let app = spawn_app().await;
    let alice = create_user(&app, json!({"name": "alice"})).await;
    let alice_id = alice["id"].as_str().expect("id").to_owned();
    let admin_id = json_of(app.get_as("/me", ADMIN).await).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let users_before = app.db.scalar("SELECT count(*) FROM users").await;
    let actions_before = app
        .db
        .scalar("SELECT count(*) FROM audit_admin_actions")
        .await;

    let cases: Vec<(Method, String, Option<Value>, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": "x", "is_admin": true})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": "Bad Name"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": ""})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": "a".repeat(65)})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": "ok", "role": "root"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": "ok", "tier": "gold"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": "ok", "email": "no-at-sign"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        // A NUL cannot be stored in PostgreSQL text: refused up front (the
        // API fuzzing found these three answering 500).
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": "ok", "email": "a@b\u{0}c"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::PATCH,
            format!("/admin/users/{alice_id}"),
            Some(json!({"email": "a@b\u{0}"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            format!("/admin/users/{alice_id}/tokens"),
            Some(json!({"name": "t\u{0}"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            "/admin/users".into(),
            Some(json!({"name": "alice"})),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            Method::GET,
            "/admin/users/not-a-uuid".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::PATCH,
            "/admin/users/not-a-uuid".into(),
            Some(json!({"tier": "free"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::DELETE,
            "/admin/tokens/123".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::GET,
            "/admin/users/00000000-0000-0000-0000-000000000000".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            "/admin/tokens/00000000-0000-0000-0000-000000000000".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::PATCH,
            format!("/admin/users/{alice_id}"),
            Some(json!({"name": "renamed"})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::POST,
            format!("/admin/users/{alice_id}/tokens"),
            Some(json!({"expires_in_days": 0})),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            Method::PATCH,
            format!("/admin/users/{admin_id}"),
            Some(json!({"role": "user"})),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            Method::PATCH,
            format!("/admin/users/{admin_id}"),
            Some(json!({"is_active": false})),
            StatusCode::CONFLICT,
            "conflict",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let mut request = app.request(method.clone(), &path, ADMIN);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = send(request).await;
        assert_eq!(response.status(), status, "{method} {path} {body:?}");
        let error = json_of(response).await;
        assert_eq!(error["code"], code, "{method} {path}: {error}");
        let detail = error["detail"].as_str().expect("detail");
        assert!(
            !detail.to_lowercase().contains("sql") && !detail.contains("violates"),
            "{detail}"
        );
    }
    // A malformed JSON body and a wrong content type are 400s too.
    let garbage = send(
        app.request(Method::POST, "/admin/users", ADMIN)
            .header("content-type", "application/json")
            .body("{"),
    )
    .await;
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(garbage).await["code"], "invalid_parameter");

    assert_eq!(
        app.db.scalar("SELECT count(*) FROM users").await,
        users_before
    );
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM audit_admin_actions")
            .await,
        actions_before
    );

    // With a second admin, the first may step down.
    create_user(&app, json!({"name": "root2", "role": "admin"})).await;
    let response = send(
        app.request(Method::PATCH, &format!("/admin/users/{admin_id}"), ADMIN)
            .json(&json!({"role": "auditor"})),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    // The demotion applies to the cached token at once.
    let response = app
        .get_as(
            "/admin/users/00000000-0000-0000-0000-000000000000/tokens",
            ADMIN,
        )
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn revocation_reaches_another_instance_within_the_cache_ttl() {
    let ttl = |config: &mut nox_api::Config| config.auth_cache_ttl_ms = 300;
    let a = spawn_app_with(ttl).await;
    let b = spawn_app_on(Arc::clone(&a.db), ttl).await;
    let user = create_user(&a, json!({"name": "carol"})).await;
    let token = user["token"].as_str().expect("token");
    assert_eq!(b.get_as("/me", token).await.status(), StatusCode::OK);

    let tokens = json_of(
        a.get_as(
            &format!("/admin/users/{}/tokens", user["id"].as_str().expect("id")),
            ADMIN,
        )
        .await,
    )
    .await;
    let token_id = tokens["tokens"][0]["id"].as_str().expect("id");
    let response =
        send(a.request(Method::DELETE, &format!("/admin/tokens/{token_id}"), ADMIN)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        a.get_as("/me", token).await.status(),
        StatusCode::UNAUTHORIZED
    );

    let revoked_at = Instant::now();
    loop {
        let status = b.get_as("/me", token).await.status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(3),
            "instance B still accepts a revoked token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_the_database_gone_cached_tokens_stay_valid_and_unknown_ones_get_503() {
    // A 1 ms TTL: every cached entry is stale, so each request tries the database.
    let app = spawn_app_with(|config| config.auth_cache_ttl_ms = 1).await;
    assert_eq!(app.get_as("/me", ADMIN).await.status(), StatusCode::OK);
    app.db.drop_now().await.expect("drop the database");

    // The cached admin passes authentication and reaches path parsing (400);
    // an unknown token cannot be checked (503).
    let known = app.get_as("/admin/users/not-a-uuid", ADMIN).await;
    assert_eq!(known.status(), StatusCode::BAD_REQUEST);
    let unknown = app
        .get_as(
            "/admin/users/not-a-uuid",
            "nox_1111111111111111111111111111111111111111111111111111111111111111",
        )
        .await;
    assert_eq!(unknown.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json_of(unknown).await["code"], "service_unavailable");
}
