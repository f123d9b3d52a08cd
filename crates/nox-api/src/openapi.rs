//! `GET /openapi.json`: the OpenAPI 3 document every endpoint joins.

use actix_web::{HttpResponse, get, web};
use utoipa::OpenApi;

use crate::app::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Nox API",
        description = "Sandboxed files and command execution with an audit trail."
    ),
    paths(crate::health::health, openapi_json),
    components(schemas(crate::error::ErrorBody))
)]
#[derive(Debug)]
pub struct ApiDoc;

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
