//! The endpoints against hostile requests, without a database: every
//! refusal is a JSON `{"detail","code"}` that names the parameter, never
//! SQL; input that passes validation reaches the (absent) database and gets
//! a plain 503.

use std::sync::Arc;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::{App, HttpRequest, test, web};
use nox_audit_model::SystemClock;
use nox_audit_store::checkpoints::Checkpointer;
use nox_audit_store::{AuditWriter, PoolOptions, Spool, WriterConfig, build_pool};
use nox_audit_web::{Access, AuditApi, Authorize, Reader};
use serde_json::Value;

/// Knows the caller from an `X-Role` header: none is 401, `reader` may
/// read, `exporter` may also export.
struct RoleHeader;

fn role(request: &HttpRequest) -> Option<&str> {
    request.headers().get("x-role")?.to_str().ok()
}

impl Authorize for RoleHeader {
    fn authenticate(&self, request: &HttpRequest) -> Result<(), actix_web::Error> {
        match role(request) {
            Some(_) => Ok(()),
            None => Err(actix_web::error::ErrorUnauthorized("who are you?")),
        }
    }

    fn authorize(&self, request: &HttpRequest, access: Access) -> Result<Reader, actix_web::Error> {
        match (role(request), access) {
            (Some("exporter"), _) | (Some("reader"), Access::Read) => Ok(Reader::default()),
            _ => Err(actix_web::error::ErrorForbidden("not you")),
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    _writer: AuditWriter,
    api: web::Data<AuditApi>,
}

/// A pool whose connections can never open, and a writer on it.
fn fixture(exports: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(dir.path().join("no-such-socket"))
        .user("nobody")
        .dbname("nothing");
    let pool = build_pool(config, &PoolOptions::default()).unwrap();
    let spool = Spool::open(dir.path().join("spool")).unwrap();
    let writer = AuditWriter::start(
        pool.clone(),
        spool,
        Arc::new(SystemClock),
        WriterConfig::default(),
    );
    let checkpointer =
        Checkpointer::open(&dir.path().join("key"), &dir.path().join("checkpoints")).unwrap();
    let api = AuditApi::new(pool, writer.sink(), Arc::new(checkpointer), RoleHeader)
        .exports(Arc::new(tokio::sync::Semaphore::new(exports)));
    Fixture {
        _dir: dir,
        _writer: writer,
        api: web::Data::new(api),
    }
}

async fn call(fixture: &Fixture, role: Option<&str>, uri: &str) -> (u16, Value) {
    let app = test::init_service(
        App::new()
            .app_data(fixture.api.clone())
            .configure(nox_audit_web::services),
    )
    .await;
    let mut request = test::TestRequest::get().uri(uri);
    if let Some(role) = role {
        request = request.insert_header(("x-role", role));
    }
    let response: ServiceResponse = app.call(request.to_request()).await.unwrap();
    let status = response.status().as_u16();
    let body = test::read_body(response).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    assert!(!text.to_uppercase().contains("SELECT"), "{uri}: {text}");
    (
        status,
        serde_json::from_slice(&body).unwrap_or(Value::String(text)),
    )
}

fn invalid(body: &Value) -> &str {
    assert_eq!(body["code"], "invalid_parameter", "{body}");
    body["detail"].as_str().unwrap()
}

#[actix_web::test]
async fn the_hook_refuses_before_and_after_the_parameters() {
    let fixture = fixture(2);
    // Unauthenticated: refused before the malformed page size is seen.
    let (status, _) = call(&fixture, None, "/admin/audit/logs?page_size=0").await;
    assert_eq!(status, 401);
    let (status, _) = call(&fixture, Some("reader"), "/admin/audit/export").await;
    assert_eq!(status, 403);
    let (status, body) = call(&fixture, Some("reader"), "/admin/audit/logs?page_size=0").await;
    assert_eq!(
        (status, invalid(&body)),
        (400, "page_size: expected 1 to 1000")
    );
}

#[actix_web::test]
async fn hostile_parameters_get_clear_errors() {
    let fixture = fixture(2);
    let cases = [
        (
            "/admin/audit/logs?search=a%00b",
            "search: must not contain a NUL byte",
        ),
        (
            "/admin/audit/logs?user_id=%FF%FE",
            "user_id: expected a UUID",
        ),
        (
            "/admin/audit/logs?page_size=99999999999999999999",
            "page_size: expected 1 to 1000",
        ),
        ("/admin/audit/logs?page=0", "page: expected 1 to 4294967295"),
        (
            "/admin/audit/logs?cursor=%27%20OR%201%3D1",
            "cursor: not a cursor this API returned",
        ),
        (
            "/admin/audit/logs?status_code=200%3B%20DROP%20TABLE%20x",
            "status_code: expected 100 to 599",
        ),
        (
            "/admin/audit/logs?client_ip=1.2.3.4%27--",
            "client_ip: expected an address or a CIDR",
        ),
        (
            "/admin/audit/logs?a.user_id%3D1=x",
            "a.user_id=1: unknown parameter",
        ),
        ("/admin/audit/export?limit=0", "limit: expected 1 or more"),
        (
            "/admin/audit/export?format=xml%00",
            "format: must not contain a NUL byte",
        ),
        ("/admin/audit/users?days=100000", "days must be 1 to 365"),
        (
            "/admin/audit/users?min_actions=-1",
            "min_actions must be 0 or more",
        ),
        (
            "/admin/audit/checkpoints?limit=1001",
            "limit must be 1 to 1000",
        ),
        (
            "/admin/audit/admin-actions?admin_action_type=x%00",
            "admin_action_type: must not contain a NUL byte",
        ),
    ];
    for (uri, detail) in cases {
        let (status, body) = call(&fixture, Some("exporter"), uri).await;
        assert_eq!((status, invalid(&body)), (400, detail), "{uri}");
    }
}

#[actix_web::test]
async fn valid_input_reaches_the_database_and_only_a_503_comes_back() {
    let fixture = fixture(2);
    for uri in [
        "/admin/audit/logs?endpoint=%27%3B%20DROP%20TABLE%20audit_actions%3B--&search=%FF",
        "/admin/audit/export?action_type=%27%20OR%20%271%27%3D%271",
        "/admin/stats",
    ] {
        let (status, body) = call(&fixture, Some("exporter"), uri).await;
        assert_eq!(status, 503, "{uri}: {body}");
        assert_eq!(body["code"], "service_unavailable");
        assert_eq!(body["detail"], "the database is unavailable");
    }
    // The status endpoint reports the outage instead of failing.
    let (status, body) = call(&fixture, Some("reader"), "/admin/audit/status").await;
    assert_eq!(status, 200);
    assert_eq!(body["database_status"], "disconnected");
    assert_eq!(
        body["verification"],
        serde_json::json!({"interval_secs": null, "last_run_at": null, "outcome": "unknown", "chains": []})
    );
    // No recorder: no metrics.
    let (status, body) = call(&fixture, Some("reader"), "/admin/audit/metrics").await;
    assert_eq!((status, &body["code"]), (404, &Value::from("not_found")));
}

#[actix_web::test]
async fn exports_beyond_the_limit_are_refused() {
    let fixture = fixture(0);
    let (status, body) = call(&fixture, Some("exporter"), "/admin/audit/export").await;
    assert_eq!(status, 503);
    assert_eq!(body["detail"], "too many exports are running; retry");
}
