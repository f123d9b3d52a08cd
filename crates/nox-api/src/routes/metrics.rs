//! `GET /metrics`. The server binary installs the Prometheus recorder and
//! hands its handle in; without one (tests, embedders with their own
//! recorder) `/metrics` answers 404.

use actix_web::http::header::AUTHORIZATION;
use actix_web::{HttpRequest, HttpResponse, get, web};
use metrics_exporter_prometheus::PrometheusHandle;
use nox_auth::Secret;
use nox_auth::token::parse_bearer;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// The recorder's handle and the optional scrape token.
#[derive(Debug, Default)]
pub struct MetricsEndpoint {
    pub handle: Option<PrometheusHandle>,
    pub token: Option<Secret>,
}

/// Compares secrets through their digests, in time independent of where
/// they differ.
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[utoipa::path(
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
        (status = 401, description = "NOX_METRICS_TOKEN is set and was not sent"),
    ),
    tag = "system"
)]
#[get("/metrics")]
pub async fn metrics(
    request: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let endpoint = &state.metrics;
    if let Some(token) = &endpoint.token {
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_bearer);
        if !given.is_some_and(|given| same_secret(given, token.expose())) {
            return Err(ApiError::Unauthorized(
                "GET /metrics needs the metrics token",
            ));
        }
    }
    let Some(handle) = &endpoint.handle else {
        return Err(ApiError::NotFound(
            "metrics are not exported by this process".into(),
        ));
    };
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render()))
}
