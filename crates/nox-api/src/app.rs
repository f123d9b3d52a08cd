//! Building and running the HTTP server.
//!
//! Shared state is built once in [`run`] (or by a test), outside
//! `HttpServer::new`'s factory, which actix runs once per worker.

use std::net::TcpListener;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use deadpool_postgres::Pool;

use crate::config::Config;
use crate::db::Database;
use crate::error::{configure_extractors, json_error_handlers, not_found};
use crate::{health, openapi};

/// State shared by every worker.
#[derive(Debug)]
pub struct AppState {
    pub pool: Pool,
    /// The OpenAPI document, rendered once.
    pub openapi: String,
}

impl AppState {
    pub fn new(pool: Pool) -> Self {
        AppState {
            pool,
            openapi: openapi::render(),
        }
    }
}

/// Registers every route; shared by the server and the tests.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(health::health)
        .service(openapi::openapi_json);
}

/// Starts serving on `listener`. The returned server is a future that
/// completes once the server has stopped; it does not react to signals
/// (see [`stop_on_signal`]).
pub fn serve(
    listener: TcpListener,
    state: web::Data<AppState>,
    config: &Config,
) -> std::io::Result<Server> {
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(configure_extractors)
            .configure(routes)
            .default_service(web::to(not_found))
            .wrap(json_error_handlers())
    })
    .shutdown_timeout(config.shutdown_timeout_secs)
    .disable_signals();
    if let Some(workers) = config.workers {
        server = server.workers(workers);
    }
    Ok(server.listen(listener)?.run())
}

/// Waits for SIGTERM or SIGINT, then stops the server gracefully: it stops
/// accepting and lets in-flight requests finish within the shutdown timeout.
pub async fn stop_on_signal(handle: ServerHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for shutdown signals");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down gracefully");
    handle.stop(true).await;
}

/// Runs the server until a shutdown signal: opens (or starts) the database,
/// applies migrations, serves, then drains and stops what it started.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let database = Database::open(&config.storage).await?;
    if database.is_embedded() {
        tracing::info!(data_dir = %config.storage.data_dir.display(), "using the embedded PostgreSQL");
    }
    if config.no_migrate {
        tracing::info!("not applying migrations (--no-migrate)");
    } else {
        let applied = database.migrate().await?;
        tracing::info!(applied = applied.len(), "schema is current");
    }
    let pool = database.pool(config.storage.db_pool_size)?;
    let state = web::Data::new(AppState::new(pool));

    let listener = TcpListener::bind((config.bind_addr, config.port))
        .with_context(|| format!("binding {}:{}", config.bind_addr, config.port))?;
    let address = listener.local_addr()?;
    let server = serve(listener, state.clone(), &config)?;
    tracing::info!("listening on http://{address}");
    tokio::spawn(stop_on_signal(server.handle()));
    server.await.context("the HTTP server failed")?;

    state.pool.close();
    tokio::task::spawn_blocking(move || database.shutdown())
        .await
        .context("the database shutdown task failed")??;
    tracing::info!("stopped");
    Ok(())
}
