//! Building and running the HTTP server.
//!
//! Shared state is built once in [`run`] (or by a test), outside
//! `HttpServer::new`'s factory, which actix runs once per worker.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use nox_audit_actix::{Audit, AuditConfig};
use nox_audit_model::{Clock, NOX_TAXONOMY, SystemClock};
use nox_audit_store::chain::Checkpointer;
use nox_audit_store::{AuditMode, AuditSink, AuditWriter, Spool, WriterConfig};
use nox_auth::{Authenticator, Secret};
use nox_quota::{QuotaBook, Rate, RateLimits};
use nox_sandbox::Workspaces;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::auth::resolve_identity;
use crate::config::Config;
use crate::db::Database;
use crate::error::{configure_extractors, json_error_handlers, not_found};
use crate::free_space::FreeSpaceFloor;
use crate::limits::{InFlight, rate_limit, shed_overload};
use crate::metrics::{MetricsEndpoint, record_http_metrics};
use crate::quotas::enforce_request_quota;
use crate::run_service::RunService;
use crate::{files, health, openapi, users};

/// State shared by every worker.
#[derive(Debug)]
pub struct AppState {
    pub pool: Pool,
    pub authenticator: Authenticator,
    /// Where audit records go.
    pub audit: AuditSink,
    pub audit_config: AuditConfig,
    /// Every user's workspace, under `<NOX_DATA_DIR>/sandboxes`.
    pub workspaces: Workspaces,
    /// `NOX_MIN_FREE_MB` on the data directory's filesystem.
    pub free_space: FreeSpaceFloor,
    pub max_upload_bytes: u64,
    /// Running commands (`POST /run`).
    pub runs: Arc<RunService>,
    /// Shared by every worker, so each limit holds for the whole process.
    pub rate_limits: Arc<RateLimits>,
    /// Requests in flight, all workers together (`NOX_MAX_INFLIGHT`).
    pub in_flight: Arc<InFlight>,
    /// Quota counters, flushed to the database about once a second.
    pub quotas: Arc<QuotaBook>,
    pub metrics: MetricsEndpoint,
    /// The runtime the state was built on (the server's main runtime): CPU
    /// work that must not stall an HTTP worker, like exports, runs there.
    pub work_runtime: tokio::runtime::Handle,
    /// Exports running at once, at most `NOX_EXPORT_CONCURRENCY`: each holds
    /// a database connection for its whole length.
    pub exports: Arc<tokio::sync::Semaphore>,
    /// Signs checkpoints of the audit hash chains.
    pub checkpointer: Arc<Checkpointer>,
    /// The OpenAPI document, rendered once.
    pub openapi: String,
    /// `GET /health`'s database probe, one at a time.
    pub health_probe: health::DatabaseProbe,
}

/// What [`AppState::build`] starts besides the state: the audit writer task,
/// which must be shut down after the server so queued records are written.
#[derive(Debug)]
pub struct Background {
    pub audit_writer: AuditWriter,
    pub quotas: Arc<QuotaBook>,
    pub checkpoints: CheckpointTask,
}

impl Background {
    pub async fn shutdown(self) {
        if let Err(error) = self.quotas.flush().await {
            tracing::error!(%error, "the last quota counts could not be written");
        }
        self.quotas.close();
        self.audit_writer.shutdown().await;
        // After the writer's last batch, so the checkpoint covers every row.
        self.checkpoints.shutdown().await;
    }
}

/// Signs a checkpoint of each chain whose head moved, every
/// `NOX_AUDIT_CHECKPOINT_SECS`, and once more at shutdown.
#[derive(Debug)]
pub struct CheckpointTask {
    pool: Pool,
    checkpointer: Arc<Checkpointer>,
    task: tokio::task::JoinHandle<()>,
}

impl CheckpointTask {
    fn start(pool: Pool, checkpointer: Arc<Checkpointer>, every_secs: u64) -> CheckpointTask {
        let (task_pool, signer) = (pool.clone(), Arc::clone(&checkpointer));
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(every_secs));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                checkpoint(&task_pool, &signer, "interval").await;
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
        checkpoint(&self.pool, &self.checkpointer, "shutdown").await;
    }
}

async fn checkpoint(pool: &Pool, checkpointer: &Checkpointer, reason: &str) {
    let result = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        checkpointer
            .checkpoint_heads(&**client, reason, false)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(written) => {
            for checkpoint in written {
                tracing::info!(chain = %checkpoint.chain, seq = checkpoint.seq, reason, "audit checkpoint signed");
            }
        }
        Err(error) => {
            tracing::warn!(%error, reason, "audit checkpoint not written; retrying at the next one")
        }
    }
}

impl AppState {
    /// Builds the shared state, starts the audit writer and makes sure an
    /// admin exists: on a database with none, creates the user `admin` with
    /// the operator's token, or with a generated one that is printed once
    /// and saved to `<NOX_DATA_DIR>/admin-token`.
    pub async fn build(
        config: &Config,
        database: &Database,
        clock: Arc<dyn Clock>,
        metrics: Option<PrometheusHandle>,
    ) -> anyhow::Result<(AppState, Background)> {
        let admin_token = config.admin_token()?;
        let pool = database.pool(config.storage.db_pool_size)?;
        let generated = nox_auth::store::bootstrap_admin(&pool, admin_token)
            .await
            .context("creating the first admin")?;
        if let Some(token) = generated {
            announce_admin_token(&token, &config.storage.data_dir)?;
        }
        let spool_dir = config.storage.data_dir.join("audit-spool");
        let spool = Spool::open(&spool_dir)
            .with_context(|| format!("opening the audit spool {}", spool_dir.display()))?;
        if config.audit_mode == AuditMode::Off {
            tracing::warn!(
                "NOX_AUDIT_MODE=off: requests are NOT audited; use this for benchmarks only"
            );
        }
        let audit_writer = AuditWriter::start(
            database.pool(AUDIT_WRITER_CONNECTIONS)?,
            spool,
            Arc::clone(&clock),
            WriterConfig {
                session_idle: time::Duration::seconds(config.session_idle_secs as i64),
                max_user_labels: config.metrics_max_users,
                linger: match config.audit_mode {
                    AuditMode::Buffered => BUFFERED_LINGER,
                    AuditMode::Durable | AuditMode::Off => std::time::Duration::ZERO,
                },
                ..WriterConfig::default()
            },
        );
        let quotas = start_quota_book(database.pool(2)?, Arc::clone(&clock));
        let checkpointer = Arc::new(
            config
                .storage
                .checkpointer()
                .context("opening the audit checkpoint signing key")?,
        );
        println!(
            "audit checkpoint public key: {}",
            checkpointer.public_key_hex()
        );
        tracing::info!(public_key = %checkpointer.public_key_hex(), "audit checkpoints are signed with this key");
        let checkpoints = CheckpointTask::start(
            database.pool(1)?,
            Arc::clone(&checkpointer),
            config.audit_checkpoint_secs,
        );
        let audit_config = AuditConfig {
            taxonomy: NOX_TAXONOMY,
            skip_paths: config.audit_skip_paths.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            mode: config.audit_mode,
            clock,
        };
        let state = AppState {
            pool,
            authenticator: Authenticator::new(config.auth_cache_ttl()),
            audit: audit_writer.sink(),
            audit_config,
            workspaces: Workspaces::new(config.storage.data_dir.join("sandboxes")),
            free_space: FreeSpaceFloor::new(&config.storage.data_dir, config.min_free_mb),
            max_upload_bytes: config.max_upload_mb * 1024 * 1024,
            runs: Arc::new(RunService::start(config).await?),
            rate_limits: start_rate_limits(config),
            in_flight: InFlight::new(config.max_inflight()),
            quotas: Arc::clone(&quotas),
            metrics: MetricsEndpoint {
                handle: metrics,
                token: config.metrics_token.clone(),
            },
            work_runtime: tokio::runtime::Handle::current(),
            exports: Arc::new(tokio::sync::Semaphore::new(
                config.export_concurrency as usize,
            )),
            checkpointer,
            openapi: openapi::render(),
            health_probe: health::DatabaseProbe::default(),
        };
        Ok((
            state,
            Background {
                audit_writer,
                quotas,
                checkpoints,
            },
        ))
    }
}

/// The writer needs one connection; a second lets a spool replay and a
/// partition check overlap a slow batch.
const AUDIT_WRITER_CONNECTIONS: usize = 2;

/// In buffered mode the writer waits this long for a batch to fill: records
/// reach the database up to 10 ms later, and each transaction's fixed cost
/// is shared by ~10× more rows under load (BENCHMARKS.md, audit modes).
const BUFFERED_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// The limiters, and a task that forgets idle keys every minute.
fn start_rate_limits(config: &Config) -> Arc<RateLimits> {
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
        nox_audit_metrics::set_sandbox_usage(usage.files, usage.bytes);
        nox_audit_metrics::set_queue_depth(state.audit.queue_depth() as usize);
    }
}

/// The quota book, and a task that flushes it every second.
fn start_quota_book(pool: Pool, clock: Arc<dyn Clock>) -> Arc<QuotaBook> {
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

/// Shows a generated admin token exactly once (stdout, never the log) and
/// keeps it in a file only root and the server's user can read.
fn announce_admin_token(token: &Secret, data_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join("admin-token");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    // `mode` applies only to a new file: tighten an existing one too.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(file, "{}", token.expose())?;
    println!("admin token: {}", token.expose());
    tracing::info!(file = %path.display(), "generated the first admin's token (printed on stdout)");
    Ok(())
}

/// Registers every route; shared by the server and the tests.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(health::health)
        .service(openapi::openapi_json)
        .service(crate::metrics::metrics)
        .configure(users::routes)
        .configure(files::routes)
        .configure(crate::run::routes)
        .configure(crate::quotas::routes)
        .configure(nox_audit_web::services);
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

/// SIGTERM and SIGINT, listened for from the very start of [`run`], so a
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
    pub async fn stop_server_on_signal(mut self, handle: ServerHandle) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down gracefully");
        handle.stop(true).await;
    }
}

/// Runs the server until a shutdown signal: opens (or starts) the database,
/// applies migrations, serves, then drains and stops what it started.
pub async fn run(config: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<()> {
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
    tokio::spawn(signals.stop_server_on_signal(server.handle()));
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
