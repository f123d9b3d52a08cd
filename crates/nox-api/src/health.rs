//! `GET /health`: is the process up, and can it reach its database?

use std::time::Duration;

use actix_web::{HttpResponse, get, web};
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;

/// How long the database probe may take before the database counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `healthy` when every dependency answers, else `degraded`.
    pub status: &'static str,
    pub version: &'static str,
    /// `up` or `down`.
    pub database: &'static str,
    /// The command sandbox's isolation layers on this machine (`null`:
    /// `POST /run` is unavailable).
    #[schema(value_type = Object)]
    pub sandbox: Option<nox_sandbox::run::Layers>,
}

#[utoipa::path(
    responses(
        (status = 200, description = "The database answers", body = HealthResponse),
        (status = 503, description = "The database does not answer", body = HealthResponse),
    ),
    tag = "system"
)]
#[get("/health")]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let database_up = tokio::time::timeout(PROBE_TIMEOUT, probe(&state.pool))
        .await
        .unwrap_or(false);
    let body = HealthResponse {
        status: if database_up { "healthy" } else { "degraded" },
        version: crate::VERSION,
        database: if database_up { "up" } else { "down" },
        sandbox: state.runs.layers.clone(),
    };
    if database_up {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn probe(pool: &deadpool_postgres::Pool) -> bool {
    match pool.get().await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(error) => {
            tracing::debug!(%error, "health probe could not get a connection");
            false
        }
    }
}
