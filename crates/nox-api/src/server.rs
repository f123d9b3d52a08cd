//! The server's lifecycle: [`serve`], [`run_server`] (database, migrations,
//! state, serving, shutdown), the shutdown signals, and the background tasks
//! that outlive requests (audit writer, quota flushes, rate-limit upkeep,
//! metrics upkeep, checkpoints, continuous verification).

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use nox_audit_actix::Audit;
use nox_audit_model::{Clock, SystemClock};
use nox_audit_store::AuditWriter;
use nox_audit_store::checkpoints::Checkpointer;
use nox_audit_store::verify::ContinuousVerifier;
use nox_quota::{QuotaBook, Rate, RateLimits};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::admission::{enforce_request_quota, rate_limit, shed_overload};
use crate::auth::resolve_identity;
use crate::cluster::Membership;
use crate::config::Config;
use crate::db::Database;
use crate::error::{configure_extractors, json_error_handlers, not_found};
use crate::metrics::record_http_metrics;
use crate::routes::routes;
use crate::state::AppState;

/// What [`AppState::build`] starts besides the state: the audit writer task,
/// which must be shut down after the server so queued records are written.
#[derive(Debug)]
pub struct Background {
    pub audit_writer: AuditWriter,
    pub quotas: Arc<QuotaBook>,
    pub checkpoints: CheckpointTask,
    /// The continuous verification (`NOX_AUDIT_VERIFY_SECS`), unless off.
    pub verifier: Option<ContinuousVerifier>,
    /// The heartbeat in `servers`.
    pub membership: Membership,
}

impl Background {
    pub async fn shutdown(self) {
        // The other servers take over this one's share of the rate limits.
        self.membership.shutdown().await;
        // A pass under way is abandoned, not left reading while the
        // database goes away.
        if let Some(verifier) = self.verifier {
            verifier.shutdown().await;
        }
        // With every lease's unspent units, so other servers can use them.
        if let Err(error) = self.quotas.flush_and_release().await {
            tracing::error!(%error, "the last quota counts could not be written");
        }
        self.quotas.close();
        self.audit_writer.shutdown().await;
        // After the writer's last batch, so the checkpoint covers every row.
        self.checkpoints.shutdown().await;
    }
}

/// Signs a checkpoint of each chain whose head moved, every
/// `NOX_AUDIT_CHECKPOINT_SECS`, and once more at shutdown; one server at a
/// time, and about once an interval for all servers together.
#[derive(Debug)]
pub struct CheckpointTask {
    pool: Pool,
    checkpointer: Arc<Checkpointer>,
    task: tokio::task::JoinHandle<()>,
}

impl CheckpointTask {
    pub(crate) fn start(
        pool: Pool,
        checkpointer: Arc<Checkpointer>,
        every_secs: u64,
    ) -> CheckpointTask {
        let (task_pool, signer) = (pool.clone(), Arc::clone(&checkpointer));
        let interval = std::time::Duration::from_secs(every_secs);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                // Another server's checkpoint in the last ~interval will do:
                // with the slack, servers whose ticks drift still sign one
                // per interval rather than skipping alternate ones.
                checkpoint(&task_pool, &signer, "interval", interval.mul_f64(0.9)).await;
            }
        });
        CheckpointTask {
            pool,
            checkpointer,
            task,
        }
    }

    async fn shutdown(self) {
        self.task.abort();
        checkpoint(
            &self.pool,
            &self.checkpointer,
            "shutdown",
            std::time::Duration::ZERO,
        )
        .await;
    }
}

/// Checkpoints under the cluster-wide lock. The periodic one skips when
/// another server holds it; the shutdown one (`min_age` zero) waits, since
/// it must cover this server's last rows.
async fn checkpoint(
    pool: &Pool,
    checkpointer: &Checkpointer,
    reason: &str,
    min_age: std::time::Duration,
) {
    let wait = min_age.is_zero();
    let result = async {
        let mut client = pool.get().await.map_err(|e| e.to_string())?;
        checkpointer
            .checkpoint_heads_exclusive(&mut client, reason, wait, min_age)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(written) => {
            for checkpoint in written.unwrap_or_default() {
                tracing::info!(chain = %checkpoint.chain, seq = checkpoint.seq, reason, "audit checkpoint signed");
            }
        }
        Err(error) => {
            tracing::warn!(%error, reason, "audit checkpoint not written; retrying at the next one")
        }
    }
}

/// The limiters, and a task that forgets idle keys every minute.
pub(crate) fn start_rate_limits(config: &Config) -> Arc<RateLimits> {
    let limits = Arc::new(RateLimits::new(
        Rate {
            per_minute: config.rate_limit_per_user,
            burst: config.rate_limit_burst_per_user,
        },
        Rate {
            per_minute: config.rate_limit_per_ip,
            burst: config.rate_limit_burst_per_ip,
        },
    ));
    let weak = Arc::downgrade(&limits);
    tokio::spawn(async move {
        let mut every_minute = tokio::time::interval(std::time::Duration::from_secs(60));
        every_minute.tick().await;
        loop {
            every_minute.tick().await;
            match weak.upgrade() {
                Some(limits) => limits.retain_recent(),
                None => break,
            }
        }
    });
    limits
}

/// Every five seconds: the exporter's upkeep (without it histograms grow)
/// and the gauges that are sampled rather than recorded.
async fn metrics_upkeep(handle: PrometheusHandle, state: web::Data<AppState>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        every.tick().await;
        handle.run_upkeep();
        let usage = state.workspaces.totals();
        crate::metrics::set_sandbox_usage(usage.files, usage.bytes);
        nox_audit_metrics::set_queue_depth(state.audit.queue_depth() as usize);
    }
}

/// The quota book, and a task that flushes it every second.
pub(crate) fn start_quota_book(pool: Pool, clock: Arc<dyn Clock>) -> Arc<QuotaBook> {
    let book = Arc::new(QuotaBook::new(pool, clock));
    let weak = Arc::downgrade(&book);
    tokio::spawn(async move {
        let mut every_second = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            every_second.tick().await;
            let Some(book) = weak.upgrade() else { break };
            if let Err(error) = book.flush().await {
                tracing::warn!(%error, "quota counts not written yet");
            }
        }
    });
    book
}

/// Starts serving on `listener`. The returned server is a future that
/// completes once the server has stopped; it does not react to signals
/// (see [`ShutdownSignals`]).
pub fn serve(
    listener: TcpListener,
    state: web::Data<AppState>,
    config: &Config,
) -> std::io::Result<Server> {
    let audit = Audit::new(state.audit_config.clone(), state.audit.clone());
    let audit_api = crate::admin_audit::api(&state);
    let mut server = HttpServer::new(move || {
        // Wrapped last, so outermost: the audit layer sees every request,
        // including those inner layers refuse.
        App::new()
            .app_data(state.clone())
            .app_data(audit_api.clone())
            .configure(configure_extractors)
            .configure(routes)
            .default_service(web::to(not_found))
            .wrap(from_fn(crate::openapi::answer_head_as_get))
            .wrap(from_fn(enforce_request_quota))
            .wrap(from_fn(rate_limit))
            .wrap(from_fn(resolve_identity))
            .wrap(json_error_handlers())
            // Just inside the audit layer: a shed request does no work but
            // still gets its audit row.
            .wrap(from_fn(shed_overload))
            .wrap(audit.clone())
            .wrap(from_fn(record_http_metrics))
    })
    .on_connect(crate::connection::remember_socket)
    .shutdown_timeout(config.shutdown_timeout_secs)
    .disable_signals();
    if let Some(workers) = config.workers {
        server = server.workers(workers);
    }
    if let Some(threads) = config.blocking_threads {
        server = server.worker_max_blocking_threads(threads as usize);
    }
    Ok(server.listen(listener)?.run())
}

/// SIGTERM and SIGINT, listened for from the very start of [`run_server`], so a
/// signal that arrives while the server is still starting is not lost (nor
/// kills the process with the embedded PostgreSQL still running).
#[derive(Debug)]
pub struct ShutdownSignals {
    term: Signal,
    int: Signal,
}

impl ShutdownSignals {
    pub fn install() -> std::io::Result<Self> {
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for a signal, then stops the server gracefully: it stops
    /// accepting and lets in-flight requests finish within the shutdown
    /// timeout.
    pub async fn stop_server_on_signal(mut self, handle: ServerHandle, state: web::Data<AppState>) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down gracefully");
        // Live audit streams never end on their own.
        state.commit_feed.close();
        state.admin_changes.close();
        handle.stop(true).await;
    }
}

/// Runs the server until a shutdown signal: opens (or starts) the database,
/// applies migrations, serves, then drains and stops what it started.
pub async fn run_server(config: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<()> {
    let signals = ShutdownSignals::install().context("listening for shutdown signals")?;
    // Refuse a bad admin token before starting anything.
    config.admin_token()?;
    let database = Database::open(&config.storage).await?;
    if database.is_embedded() {
        tracing::info!(data_dir = %config.storage.data_dir.display(), "using the embedded PostgreSQL");
    }
    if config.no_migrate {
        let pending = database.pending_migrations().await?;
        if pending > 0 {
            anyhow::bail!(
                "the database schema is not current ({pending} migrations pending or changed): run `nox-migrate up`, or start without --no-migrate"
            );
        }
        tracing::info!("schema is current (--no-migrate: not applying migrations)");
    } else {
        let applied = database.migrate().await?;
        tracing::info!(applied = applied.len(), "schema is current");
    }
    let upkeep = metrics.clone();
    let (state, background) =
        AppState::build(&config, &database, Arc::new(SystemClock), metrics).await?;
    let state = web::Data::new(state);
    if let Some(handle) = upkeep {
        tokio::spawn(metrics_upkeep(handle, state.clone()));
    }

    let listener = TcpListener::bind((config.bind_addr, config.port))
        .with_context(|| format!("binding {}:{}", config.bind_addr, config.port))?;
    let address = listener.local_addr()?;
    let server = serve(listener, state.clone(), &config)?;
    tracing::info!("listening on http://{address}");
    tokio::spawn(signals.stop_server_on_signal(server.handle(), state.clone()));
    server.await.context("the HTTP server failed")?;

    // Write every queued audit record (and replay the spool if possible)
    // before the database goes away.
    background.shutdown().await;
    state.pool.close();
    tokio::task::spawn_blocking(move || database.shutdown())
        .await
        .context("the database shutdown task failed")??;
    tracing::info!("stopped");
    Ok(())
}
