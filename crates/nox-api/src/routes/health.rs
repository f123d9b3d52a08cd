//! `GET /health`: is the process up, and can it reach its database?

use std::time::{Duration, Instant};

use actix_web::{HttpResponse, get, web};
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// How long the database probe may take before the database counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `healthy` when every dependency answers, else `degraded`.
    pub status: &'static str,
    pub version: &'static str,
    /// `up` or `down`.
    pub database: &'static str,
    /// Whether `POST /run` serves: `ready` with the isolation layers a
    /// probe run got (and, relaxed, those missing), or `unavailable` with
    /// the layers missing and why.
    pub sandbox: crate::run_service::Availability,
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
    let database_up = state.health_probe.database_up(&state.pool).await;
    let body = HealthResponse {
        status: if database_up { "healthy" } else { "degraded" },
        version: crate::VERSION,
        database: if database_up { "up" } else { "down" },
        sandbox: state.runs.availability.clone(),
    };
    if database_up {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Probes the database for `/health`, one probe at a time: requests that
/// arrive while a probe runs wait for it, then share the answer of one probe
/// started after they arrived, so a flood of unauthenticated health checks
/// costs the database one query at a time, not one per request.
#[derive(Debug, Default)]
pub struct DatabaseProbe {
    /// When the last probe started, and what it found.
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl DatabaseProbe {
    pub async fn database_up(&self, pool: &deadpool_postgres::Pool) -> bool {
        self.answer(|| probe(pool)).await
    }

    async fn answer<F: Future<Output = bool>>(&self, probe: impl FnOnce() -> F) -> bool {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, up)) = *last
            && started >= asked
        {
            return up;
        }
        let started = Instant::now();
        let up = tokio::time::timeout(PROBE_TIMEOUT, probe())
            .await
            .unwrap_or(false);
        *last = Some((started, up));
        up
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_checks_share_one_probe_and_later_ones_probe_again() {
        let probe = Arc::new(DatabaseProbe::default());
        let probes = Arc::new(AtomicUsize::new(0));
        let check = |probe: Arc<DatabaseProbe>, probes: Arc<AtomicUsize>| async move {
            probe
                .answer(|| async {
                    probes.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    true
                })
                .await
        };
        let burst: Vec<_> = (0..20)
            .map(|_| tokio::spawn(check(Arc::clone(&probe), Arc::clone(&probes))))
            .collect();
        for answer in burst {
            assert!(answer.await.expect("check"));
        }
        // The first probe answers those who arrived before it started; all
        // the others share one more.
        assert!(probes.load(Ordering::SeqCst) <= 2, "{probes:?}");
        let before = probes.load(Ordering::SeqCst);
        assert!(check(Arc::clone(&probe), Arc::clone(&probes)).await);
        assert_eq!(
            probes.load(Ordering::SeqCst),
            before + 1,
            "a later check probes anew"
        );
    }
}
