//! `/console`: its files, their types and headers, their caching, that
//! serving them writes no audit row and is never rate limited, and that it
//! is not part of the API's OpenAPI document. (What the page does in a
//! browser is the `browser` test target's.)

use nox_testkit::{TEST_ADMIN_TOKEN, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const FILES: &[(&str, &str)] = &[
    ("/console", "text/html; charset=utf-8"),
    ("/console/", "text/html; charset=utf-8"),
    ("/console/console.js", "text/javascript; charset=utf-8"),
    ("/console/console.css", "text/css; charset=utf-8"),
    ("/console/favicon.svg", "image/svg+xml"),
];

fn assert_secure(response: &reqwest::Response, what: &str) {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no {name}"))
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    assert_eq!(header("content-security-policy"), CSP, "{what}");
    assert_eq!(header("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(header("referrer-policy"), "no-referrer", "{what}");
    assert_eq!(header("x-frame-options"), "DENY", "{what}");
}

async fn rows_of(app: &nox_testkit::TestApp, request_id: Uuid) -> i64 {
    app.db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM audit_actions WHERE request_id = $1",
            &[&request_id],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn the_console_is_served_with_its_types_and_security_headers() {
    let app = spawn_app().await;
    for (path, content_type) in FILES {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()["content-type"], *content_type, "{path}");
        assert_eq!(response.headers()["cache-control"], "no-cache", "{path}");
        assert!(response.headers().contains_key("etag"), "{path}");
        assert_secure(&response, path);
        assert!(!response.bytes().await.expect("body").is_empty(), "{path}");
    }
    let page = app.get("/console").await.text().await.expect("page");
    assert!(page.contains("<script src=\"/console/console.js\" defer></script>"));
    assert!(page.contains("/console/console.css"));
    // A HEAD answers the headers alone.
    let head = app
        .client
        .head(app.url("/console/console.js"))
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), StatusCode::OK);
    assert_secure(&head, "HEAD");
    assert!(head.bytes().await.expect("body").is_empty());
}

#[tokio::test]
async fn an_unchanged_file_is_revalidated_with_304() {
    let app = spawn_app().await;
    let first = app.get("/console/console.js").await;
    let etag = first.headers()["etag"].to_str().expect("etag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let again = app
        .client
        .get(app.url("/console/console.js"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .expect("request");
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(again.headers()["etag"], etag.as_str());
    assert_secure(&again, "304");
    assert!(again.bytes().await.expect("body").is_empty());
    // Another file's tag does not match.
    let css = app
        .client
        .get(app.url("/console/console.css"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .expect("request");
    assert_eq!(css.status(), StatusCode::OK);
}

#[tokio::test]
async fn serving_the_console_writes_no_audit_row_but_its_api_calls_do() {
    let app = spawn_app().await;
    let mut asset_ids = Vec::new();
    for (path, _) in FILES {
        let id = Uuid::new_v4();
        let response = app
            .client
            .get(app.url(path))
            .header("X-Request-ID", id.to_string())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        asset_ids.push((path, id));
    }
    // An API call the page makes, and a file that does not exist.
    let (api_id, missing_id) = (Uuid::new_v4(), Uuid::new_v4());
    let me = app
        .client
        .get(app.url("/me"))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .header("X-Request-ID", api_id.to_string())
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), StatusCode::OK);
    let missing = app
        .client
        .get(app.url("/console/nope.js"))
        .header("X-Request-ID", missing_id.to_string())
        .send()
        .await
        .expect("missing");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    // Durable mode: a response leaves once its row is committed.
    assert_eq!(rows_of(&app, api_id).await, 1, "the API call is audited");
    assert_eq!(
        rows_of(&app, missing_id).await,
        1,
        "a probe for a missing file is audited"
    );
    for (path, id) in asset_ids {
        assert_eq!(rows_of(&app, id).await, 0, "{path} was audited");
    }
}

#[tokio::test]
async fn an_unknown_console_file_is_a_json_404_with_the_headers() {
    let app = spawn_app().await;
    for path in [
        "/console/nope.js",
        "/console/index.html",
        "/console/../console.js",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], "not_found", "{path}");
    }
    let response = app.get("/console/deeper/console.js").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, json!({"detail": "Not Found", "code": "not_found"}));
    let nested = app.get("/console/nope.js").await;
    assert_secure(&nested, "404");
    // Only GET and HEAD.
    let post = app
        .client
        .post(app.url("/console"))
        .send()
        .await
        .expect("post");
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn the_console_is_never_rate_limited() {
    let app = spawn_app_with(|config| {
        config.rate_limit_per_ip = 1;
        config.rate_limit_burst_per_ip = 1;
    })
    .await;
    for _ in 0..20 {
        for (path, _) in FILES {
            assert_eq!(app.get(path).await.status(), StatusCode::OK, "{path}");
        }
    }
    // Anonymous API requests still are.
    let mut limited = false;
    for _ in 0..5 {
        limited |= app.get("/me").await.status() == StatusCode::TOO_MANY_REQUESTS;
    }
    assert!(limited, "the per-address limit is in force");
}

#[tokio::test]
async fn the_console_is_not_in_the_openapi_document() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.expect("json");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(
        paths.keys().all(|path| !path.starts_with("/console")),
        "{:?}",
        paths.keys().collect::<Vec<_>>()
    );
}
