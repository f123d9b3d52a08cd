//! The state every worker shares, built once by [`AppState::build`] (from
//! [`crate::server::run_server`] or a test), outside `HttpServer::new`'s
//! factory, which actix runs once per worker.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use nox_audit_actix::AuditConfig;
use nox_audit_model::Clock;
use nox_audit_store::checkpoints::Checkpointer;
use nox_audit_store::verify::Verifier;
use nox_audit_store::{AuditMode, AuditSink, AuditWriter, Spool, WriterConfig};
use nox_auth::{Authenticator, Secret};
use nox_quota::{QuotaBook, RateLimits};
use nox_sandbox::Workspaces;

use crate::admin_changes::AdminChanges;
use crate::admission::InFlight;
use crate::cluster::Membership;
use crate::config::Config;
use crate::db::Database;
use crate::free_space::FreeSpaceFloor;
use crate::openapi;
use crate::routes::health;
use crate::routes::metrics::MetricsEndpoint;
use crate::run_service::RunService;
use crate::server::{Background, CheckpointTask, start_quota_book, start_rate_limits};
use crate::taxonomy::NOX_TAXONOMY;
use crate::telemetry::Console;
use nox_audit_store::commit_feed::CommitFeed;
use nox_audit_web::StreamLimits;

/// State shared by every worker.
#[derive(Debug)]
pub struct AppState {
    pub pool: Pool,
    /// `NOX_DATABASE_READ_URL`'s pool, for the audit read endpoints.
    pub read_pool: Option<Pool>,
    /// `NOX_READ_MAX_LAG_MS`.
    pub read_max_lag: std::time::Duration,
    pub authenticator: Authenticator,
    /// Where audit records go.
    pub audit: AuditSink,
    pub audit_config: AuditConfig,
    /// Every user's workspace, under `NOX_SANDBOX_DIR`.
    pub workspaces: Arc<Workspaces>,
    /// `NOX_MIN_FREE_MB` on the data directory's filesystem.
    pub free_space: FreeSpaceFloor,
    pub max_upload_bytes: u64,
    /// Running commands (`POST /run`).
    pub runs: Arc<RunService>,
    /// Shared by every worker, so each limit holds for the whole process;
    /// the per-user rate is divided among the live servers.
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
    /// `NOX_AUDIT_VERIFY_SECS` (none: off), shown by the status endpoint.
    pub audit_verify_interval: Option<std::time::Duration>,
    /// The OpenAPI document, rendered once.
    pub openapi: String,
    /// `GET /health`'s database probe, one at a time.
    pub health_probe: health::DatabaseProbe,
    /// Commits of the audit trail as any server makes them, for the live
    /// stream (one connection of its own; closed at shutdown).
    pub commit_feed: CommitFeed,
    /// Admin changes made on any server, applied here at once (one
    /// connection of its own; closed at shutdown).
    pub admin_changes: AdminChanges,
    /// `NOX_AUDIT_STREAM_MAX`, `NOX_AUDIT_STREAM_STALL_SECS`.
    pub stream_limits: StreamLimits,
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
            announce_admin_token(&token, &config.storage.data_dir, Console(config.log_format))?;
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
        Console(config.log_format).show(
            "audit checkpoint public key",
            "public_key",
            &checkpointer.public_key_hex(),
        );
        tracing::info!(public_key = %checkpointer.public_key_hex(), "audit checkpoints are signed with this key");
        let checkpoints = CheckpointTask::start(
            database.pool(1)?,
            Arc::clone(&checkpointer),
            config.audit_checkpoint_secs,
        );
        // Checkpoint signatures are checked against this server's own key.
        let verifier = config.audit_verify_interval().map(|every| {
            Ok::<_, anyhow::Error>(
                Verifier::new(database.pool(1)?, checkpointer.public_key()).start(every),
            )
        });
        let verifier = verifier.transpose()?;
        let audit_config = AuditConfig {
            taxonomy: NOX_TAXONOMY,
            // The console's files are never audited (its API calls are).
            skip_paths: config
                .audit_skip_paths
                .iter()
                .cloned()
                .chain(crate::routes::console::asset_paths().map(String::from))
                .collect(),
            trusted_proxies: config.trusted_proxies.clone(),
            mode: config.audit_mode,
            clock,
        };
        let rate_limits = start_rate_limits(config);
        let workspaces = Arc::new(Workspaces::new(config.storage.sandbox_dir()));
        let membership = Membership::start(
            database.pool(1)?,
            Arc::clone(&rate_limits),
            Arc::clone(&workspaces),
        );
        let authenticator = Authenticator::new(config.auth_cache_ttl());
        let admin_changes = AdminChanges::start(
            listener_config(database, "nox-admin-changes"),
            authenticator.clone(),
            Arc::clone(&quotas),
        );
        let read_pool = crate::db::read_replica_pool(&config.storage)?;
        if read_pool.is_some() {
            tracing::info!(
                max_lag_ms = config.storage.read_max_lag_ms,
                "audit reads go to the read replica (NOX_DATABASE_READ_URL) while it is within the lag"
            );
        }
        let state = AppState {
            pool,
            read_pool,
            read_max_lag: std::time::Duration::from_millis(config.storage.read_max_lag_ms),
            authenticator,
            audit: audit_writer.sink(),
            audit_config,
            workspaces,
            free_space: FreeSpaceFloor::new(&config.storage.data_dir, config.min_free_mb),
            max_upload_bytes: config.max_upload_mb * 1024 * 1024,
            runs: Arc::new(RunService::start(config).await?),
            rate_limits,
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
            audit_verify_interval: config.audit_verify_interval(),
            openapi: openapi::render(),
            health_probe: health::DatabaseProbe::default(),
            commit_feed: CommitFeed::start(
                listener_config(database, "nox-commit-feed"),
                COMMIT_FEED_POLL,
            ),
            admin_changes,
            stream_limits: StreamLimits {
                max_streams: config.audit_stream_max as usize,
                stall: std::time::Duration::from_secs(config.audit_stream_stall_secs),
                ..StreamLimits::default()
            },
        };
        Ok((
            state,
            Background {
                audit_writer,
                quotas,
                checkpoints,
                verifier,
                membership,
            },
        ))
    }
}

/// How often the commit feed reads the chain's head besides listening: the
/// longest a lost notification delays the live stream.
const COMMIT_FEED_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// The database's settings for a listening connection, named `name` in
/// `pg_stat_activity` unless the operator named the connections.
fn listener_config(database: &Database, name: &str) -> tokio_postgres::Config {
    let mut pg_config = database.pg_config.clone();
    if pg_config.get_application_name().is_none() {
        pg_config.application_name(name);
    }
    pg_config
}

/// The writer needs one connection; a second lets a spool replay and a
/// partition check overlap a slow batch; a third serves the rollup steps.
const AUDIT_WRITER_CONNECTIONS: usize = 3;

/// In buffered mode the writer waits this long for a batch to fill: records
/// reach the database up to 10 ms later, and each transaction's fixed cost
/// is shared by ~10× more rows under load (BENCHMARKS.md, audit modes).
const BUFFERED_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// Shows a generated admin token exactly once (stdout, never the log) and
/// keeps it in a file only root and the server's user can read.
fn announce_admin_token(token: &Secret, data_dir: &Path, console: Console) -> anyhow::Result<()> {
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
    console.show("admin token", "token", token.expose());
    tracing::info!(file = %path.display(), "generated the first admin's token (printed on stdout)");
    Ok(())
}
