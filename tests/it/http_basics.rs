//! The server skeleton: health, errors, the OpenAPI document.

use nox_testkit::spawn_app;
use serde_json::{Value, json};

#[tokio::test]
async fn health_reports_the_database_up() {
    let app = spawn_app().await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["database"], "up");
    assert_eq!(body["version"], nox_api::VERSION);
}

#[tokio::test]
async fn health_reports_the_database_down_with_503() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health").await.status(), 200);
    app.db.drop_now().await.expect("drop the database");
    let response = app.get("/health").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["database"], "down");
}

#[tokio::test]
async fn unknown_routes_get_a_json_404() {
    let app = spawn_app().await;
    for path in ["/nope", "/health/extra", "/%2e%2e/etc/passwd", "/admin"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
        let body: Value = response.json().await.expect("json");
        assert_eq!(
            body,
            serde_json::json!({"detail": "Not Found", "code": "not_found"}),
            "{path}"
        );
    }
}

#[tokio::test]
async fn wrong_method_on_a_known_path_is_a_json_405_with_allow() {
    let app = spawn_app().await;
    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/health", "GET, HEAD"),
        (reqwest::Method::POST, "/ls", "GET, HEAD"),
        (reqwest::Method::GET, "/write", "PUT"),
        (reqwest::Method::HEAD, "/write", "PUT"),
        (reqwest::Method::HEAD, "/admin/audit/export", "GET"),
        (reqwest::Method::PUT, "/admin/users/7", "GET, HEAD, PATCH"),
        (reqwest::Method::GET, "/admin/tokens/7", "DELETE"),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(nox_testkit::TEST_ADMIN_TOKEN)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        if method == reqwest::Method::HEAD {
            continue; // no body
        }
        let body: Value = response.json().await.expect("json error body");
        assert_eq!(body["code"], "method_not_allowed", "{method} {path}");
        assert!(
            body["detail"].as_str().expect("detail").contains(allow),
            "{body}"
        );
    }
}

#[tokio::test]
async fn head_on_a_get_endpoint_answers_its_headers_without_the_body() {
    let app = spawn_app().await;
    let get = app
        .get_as("/ls?path=.", nox_testkit::TEST_ADMIN_TOKEN)
        .await;
    assert_eq!(get.status(), 200);
    let get_length = get.bytes().await.expect("body").len();
    assert!(get_length > 0);
    let head_id = uuid::Uuid::now_v7();
    let head = app
        .client
        .head(app.url("/ls?path=."))
        .bearer_auth(nox_testkit::TEST_ADMIN_TOKEN)
        .header("X-Request-ID", head_id.to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], "application/json");
    assert_eq!(
        head.headers()["content-length"],
        get_length.to_string().as_str()
    );
    assert!(head.bytes().await.expect("body").is_empty());
    // Unauthenticated, it is refused like the GET.
    let anonymous = app
        .client
        .head(app.url("/ls?path=."))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        app.client
            .head(app.url("/health"))
            .send()
            .await
            .expect("request")
            .status(),
        200
    );
    // Recorded as a HEAD that read files, with no body bytes sent.
    let row = app
        .db
        .client()
        .await
        .query_one(
            "SELECT http_method, route, action_type, status_code, response_size
             FROM audit_actions WHERE request_id = $1",
            &[&head_id],
        )
        .await
        .expect("the HEAD request's row");
    assert_eq!(row.get::<_, &str>("http_method"), "HEAD");
    assert_eq!(row.get::<_, &str>("route"), "/ls");
    assert_eq!(row.get::<_, &str>("action_type"), "file_read");
    assert_eq!(row.get::<_, i16>("status_code"), 200);
    let response_size: i64 = row.get("response_size");
    assert!(
        response_size > 0 && response_size < 400,
        "headers only: {response_size} bytes"
    );
}

#[tokio::test]
async fn openapi_document_lists_every_endpoint() {
    let app = spawn_app().await;
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.expect("json");
    assert!(
        doc["openapi"]
            .as_str()
            .expect("openapi version")
            .starts_with("3."),
        "{doc}"
    );
    assert_eq!(doc["info"]["version"], nox_api::VERSION);
    for (path, method) in [
        ("/health", "get"),
        ("/openapi.json", "get"),
        ("/me", "get"),
        ("/admin/users", "get"),
        ("/admin/users", "post"),
        ("/admin/users/{id}", "get"),
        ("/admin/users/{id}", "patch"),
        ("/admin/users/{id}/tokens", "get"),
        ("/admin/users/{id}/tokens", "post"),
        ("/admin/tokens/{id}", "delete"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "missing {method} {path}"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // `path` is required where the handler requires it, optional on /ls.
    let path_param =
        |route: &str, method: &str| doc["paths"][route][method]["parameters"][0].clone();
    for (route, method) in [
        ("/cat", "get"),
        ("/download", "get"),
        ("/write", "put"),
        ("/delete", "delete"),
    ] {
        let param = path_param(route, method);
        assert_eq!(
            (&param["name"], &param["in"], &param["required"]),
            (&json!("path"), &json!("query"), &json!(true)),
            "{route}: {param}"
        );
    }
    assert_ne!(path_param("/ls", "get")["required"], json!(true));
    let command = &doc["components"]["schemas"]["RunBody"]["properties"]["command"];
    assert_eq!(
        (&command["minLength"], &command["maxLength"]),
        (&json!(1), &json!(10_000)),
        "{command}"
    );
}
