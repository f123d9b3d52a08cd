//! `GET /openapi.json`: the OpenAPI 3 document every endpoint joins.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_web::dev::{ResourceDef, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{HttpResponse, get, web};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Nox API",
        description = "Sandboxed files and command execution with an audit trail."
    ),
    paths(
        crate::routes::health::health,
        openapi_json,
        crate::routes::metrics::metrics,
        crate::routes::me::me,
        crate::routes::users::create_user,
        crate::routes::users::list_users,
        crate::routes::users::get_user,
        crate::routes::users::update_user,
        crate::routes::users::create_token,
        crate::routes::users::list_tokens,
        crate::routes::users::revoke_token,
        crate::routes::files::ls,
        crate::routes::files::cat,
        crate::routes::files::download,
        crate::routes::files::write,
        crate::routes::files::delete_path,
        crate::routes::run::run_command,
        crate::routes::quotas::my_quotas,
        crate::routes::quotas::my_usage,
        crate::routes::quotas::my_violations,
        crate::routes::quotas::admin_get_quotas,
        crate::routes::quotas::admin_put_quotas,
        crate::routes::quotas::admin_violations,
        crate::routes::quotas::admin_statistics,
        crate::routes::quotas::admin_reset,
        nox_audit_web::handlers::logs,
        nox_audit_web::export::export,
        nox_audit_web::stream::stream,
        nox_audit_web::handlers::status,
        nox_audit_web::handlers::checkpoints,
        nox_audit_web::handlers::stats,
        nox_audit_web::handlers::users,
        nox_audit_web::handlers::daily_summaries,
        nox_audit_web::handlers::admin_actions,
        nox_audit_web::handlers::audit_metrics,
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&BearerAuth, &CommonResponses)
)]
#[derive(Debug)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the endpoints refer to.
#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Paths that are neither rate limited nor audited (the defaults of
/// `limits::EXEMPT` and `NOX_AUDIT_SKIP_PATHS`).
const UNLIMITED: &[&str] = &["/health", "/metrics"];

/// Adds to every operation the error responses that layers in front of its
/// handler can give, so the document lists every status a client can see
/// (the API fuzzing in CI, `scripts/fuzz-api.sh`, holds every response to
/// it). An operation's own description of a status is kept.
///
/// - 401: an operation that takes a token, when none valid was sent.
/// - 400 `invalid_parameter`: an operation with parameters or a body, when
///   one does not parse (the extractors answer before the handler runs).
/// - 429 `rate_limited` (or `quota_exceeded`, for the request quotas) and
///   503 `service_unavailable` (the audit trail can take no record, or the
///   database is down): every path but [`UNLIMITED`].
#[derive(Debug)]
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let limited = !UNLIMITED.contains(&path.as_str());
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                add_common_responses(operation, limited);
            }
        }
    }
}

fn add_common_responses(operation: &mut Operation, limited: bool) {
    let secured = operation
        .security
        .as_ref()
        .is_some_and(|requirements| !requirements.is_empty());
    let takes_input = operation
        .parameters
        .as_ref()
        .is_some_and(|parameters| !parameters.is_empty())
        || operation.request_body.is_some();
    let mut add = |status: &str, description: &str| {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| {
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build()
                    .into()
            });
    };
    if takes_input {
        add(
            "400",
            "A parameter or the body is invalid (`invalid_parameter`)",
        );
    }
    if secured {
        add(
            "401",
            "No valid token (missing, malformed, unknown, revoked or expired, or its user deactivated)",
        );
    }
    if limited {
        add(
            "429",
            "Rate limited (`rate_limited`) or over a request quota (`quota_exceeded`); `Retry-After` says when to retry",
        );
        add(
            "503",
            "The audit trail can take no record of the request, or the database is unavailable (`service_unavailable`)",
        );
    }
}

/// GET endpoints whose GET does work a `HEAD` must not set off: an export
/// reads the whole trail and records an admin action.
const NO_HEAD: &[&str] = &["/admin/audit/export"];

/// The methods each documented path template answers, from the OpenAPI
/// document (which lists every endpoint): how the default service tells a
/// wrong method on a known path (405) from an unknown path (404).
static ROUTE_METHODS: LazyLock<Vec<(ResourceDef, Vec<Method>)>> = LazyLock::new(|| {
    ApiDoc::openapi()
        .paths
        .paths
        .iter()
        .map(|(template, item)| {
            let methods = [
                (Method::GET, item.get.is_some()),
                // GET endpoints answer HEAD too (see `answer_head_as_get`).
                (
                    Method::HEAD,
                    item.head.is_some()
                        || (item.get.is_some() && !NO_HEAD.contains(&template.as_str())),
                ),
                (Method::POST, item.post.is_some()),
                (Method::PUT, item.put.is_some()),
                (Method::PATCH, item.patch.is_some()),
                (Method::DELETE, item.delete.is_some()),
                (Method::OPTIONS, item.options.is_some()),
            ]
            .into_iter()
            .filter_map(|(method, answered)| answered.then_some(method))
            .collect();
            (ResourceDef::new(template.as_str()), methods)
        })
        .collect()
});

/// The methods `path` answers (none: it matches no documented endpoint).
pub fn allowed_methods(path: &str) -> Vec<Method> {
    let mut allowed: Vec<Method> = Vec::new();
    let matching = ROUTE_METHODS
        .iter()
        .filter(|(resource, _)| resource.is_match(path));
    for method in matching.flat_map(|(_, methods)| methods) {
        if !allowed.contains(method) {
            allowed.push(method.clone());
        }
    }
    allowed
}

/// Routes a `HEAD` on a `GET` endpoint (but those in [`NO_HEAD`]) to that
/// endpoint, which runs as for `GET`. Its response goes out without a body:
/// actix's HTTP/1 codec remembers the request was `HEAD` and writes the
/// headers only, `Content-Length` included. But the codec would still pull
/// the GET's body to discard it (a `HEAD` on a large download would read
/// the whole file), so a streamed body is replaced by its size alone. The
/// audit layer, outside this one, still records the request as `HEAD`.
pub async fn answer_head_as_get<B: MessageBody + 'static>(
    mut request: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    if request.method() != Method::HEAD || !allowed_methods(request.path()).contains(&Method::HEAD)
    {
        return Ok(next.call(request).await?.map_into_left_body());
    }
    request.head_mut().method = Method::GET;
    let response = next.call(request).await?;
    Ok(response.map_body(|_, body| {
        if body.size() == BodySize::None {
            return EitherBody::left(body); // no body, no `Content-Length`
        }
        EitherBody::right(match body.try_into_bytes() {
            Ok(bytes) => BoxBody::new(bytes),
            Err(streamed) => BoxBody::new(SizeOnly(streamed.size())),
        })
    }))
}

/// A `HEAD` response's body: the size the `GET` would send, and no bytes.
struct SizeOnly(BodySize);

impl MessageBody for SizeOnly {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        self.0
    }

    fn poll_next(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<actix_web::web::Bytes, Infallible>>> {
        Poll::Ready(None)
    }
}

/// The document, rendered once at start-up.
pub fn render() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = crate::VERSION.to_owned();
    doc.to_json().unwrap_or_else(|_| "{}".to_owned())
}

#[utoipa::path(
    responses((status = 200, description = "This API's OpenAPI 3 document", content_type = "application/json")),
    tag = "system"
)]
#[get("/openapi.json")]
pub async fn openapi_json(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.openapi.clone())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use actix_web::body::{BodySize, MessageBody};
    use actix_web::http::Method;
    use actix_web::middleware::from_fn;
    use actix_web::web::Bytes;
    use actix_web::{App, HttpResponse, test, web};

    #[actix_web::test]
    async fn every_operation_documents_the_statuses_its_layers_can_give() {
        use utoipa::OpenApi;
        let doc = super::ApiDoc::openapi();
        let mut checked = 0;
        for (path, item) in &doc.paths.paths {
            let operations = [&item.get, &item.put, &item.post, &item.delete, &item.patch];
            for operation in operations.into_iter().flatten() {
                let has = |status: &str| operation.responses.responses.contains_key(status);
                if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    assert!(has("401"), "{path}: 401");
                }
                if operation.parameters.as_ref().is_some_and(|p| !p.is_empty())
                    || operation.request_body.is_some()
                {
                    assert!(has("400"), "{path}: 400");
                }
                if !super::UNLIMITED.contains(&path.as_str()) {
                    assert!(has("429") && has("503"), "{path}: 429, 503");
                }
                checked += 1;
            }
        }
        assert!(checked > 30, "{checked} operations");
        // An operation's own description of a status is kept.
        let run = doc.paths.paths["/run"].post.as_ref().expect("POST /run");
        let utoipa::openapi::RefOr::T(busy) = &run.responses.responses["429"] else {
            panic!("an inline response");
        };
        assert!(
            busy.description.contains("Too many runs"),
            "{}",
            busy.description
        );
    }

    #[actix_web::test]
    async fn head_answers_the_get_size_without_producing_its_body() {
        // A `/download` whose streamed body notes whether it was produced.
        let produced = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&produced);
        let app = test::init_service(
            App::new()
                .wrap(from_fn(super::answer_head_as_get))
                .route(
                    "/download",
                    web::get().to(move || {
                        let flag = Arc::clone(&flag);
                        async move {
                            let body = futures_util::stream::once(async move {
                                flag.store(true, Ordering::SeqCst);
                                Ok::<_, std::io::Error>(Bytes::from_static(b"hello"))
                            });
                            HttpResponse::Ok().no_chunking(5).streaming(body)
                        }
                    }),
                )
                .route(
                    "/health",
                    web::get()
                        .to(|| async { HttpResponse::Ok().body(actix_web::body::None::new()) }),
                ),
        )
        .await;
        let request = test::TestRequest::default()
            .method(Method::HEAD)
            .uri("/download?path=a")
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.response().body().size(), BodySize::Sized(5));
        assert!(test::read_body(response).await.is_empty());
        assert!(!produced.load(Ordering::SeqCst), "the GET's body was read");

        // A response without a body stays without one (no `Content-Length`).
        let request = test::TestRequest::default()
            .method(Method::HEAD)
            .uri("/health")
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_eq!(response.response().body().size(), BodySize::None);

        // The GET itself still streams it.
        let request = test::TestRequest::get()
            .uri("/download?path=a")
            .to_request();
        let body = test::read_body(test::call_service(&app, request).await).await;
        assert_eq!(&body[..], b"hello");
        assert!(produced.load(Ordering::SeqCst));
    }
}
