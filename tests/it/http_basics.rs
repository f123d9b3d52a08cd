//! The server skeleton: health, errors, the OpenAPI document.

use nox_testkit::spawn_app;
use serde_json::Value;

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
        (reqwest::Method::DELETE, "/health", "GET"),
        (reqwest::Method::POST, "/ls", "GET"),
        (reqwest::Method::GET, "/write", "PUT"),
        (reqwest::Method::PUT, "/admin/users/7", "GET, PATCH"),
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
        let body: Value = response.json().await.expect("json error body");
        assert_eq!(body["code"], "method_not_allowed", "{method} {path}");
        assert!(
            body["detail"].as_str().expect("detail").contains(allow),
            "{body}"
        );
    }
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
}
