//! The admin audit endpoints of the Nox audit trail, for any actix-web
//! service that writes the trail with `nox-audit-store`: pipeline status,
//! checkpoints, today's statistics, activity per user, daily rollups, admin
//! actions, the audit metrics, the rows (`/admin/audit/logs`, filtered and
//! keyset-paged) and their streamed export. The queries are
//! `nox-audit-query`'s.
//!
//! The embedder builds one [`AuditApi`] (a pool, the writer's sink, the
//! checkpoint signer and an [`Authorize`] hook), adds it as app data and
//! registers [`services`]; [`AuditApi::read_replica`] sends the reads to a
//! streaming replica. Every endpoint asks the hook first; errors are
//! JSON `{"detail","code"}` ([`ErrorBody`]). The handlers ([`handlers`],
//! [`export`]) carry their `#[utoipa::path]` annotations: list them in the
//! embedder's `OpenApi` (`paths(nox_audit_web::handlers::logs, …)`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use actix_web::{App, HttpRequest, HttpServer, web};
//! use nox_audit_store::AuditSink;
//! use nox_audit_store::checkpoints::Checkpointer;
//! use nox_audit_web::{Access, AuditApi, Reader};
//!
//! async fn serve(pool: deadpool_postgres::Pool, sink: AuditSink, signer: Arc<Checkpointer>) -> std::io::Result<()> {
//!     // Only requests from the admin network may read; nobody may export.
//!     let hook = |request: &HttpRequest, access: Access| {
//!         let internal = request.peer_addr().is_some_and(|peer| peer.ip().is_loopback());
//!         match (internal, access) {
//!             (true, Access::Read) => Ok(Reader::default()),
//!             _ => Err(nox_audit_web::WebError::Forbidden("not from here".into()).into()),
//!         }
//!     };
//!     let api = web::Data::new(AuditApi::new(pool, sink, signer, hook).version("1.2.3"));
//!     HttpServer::new(move || App::new().app_data(api.clone()).configure(nox_audit_web::services))
//!         .bind(("127.0.0.1", 8080))?
//!         .run()
//!         .await
//! }
//! ```

mod authorize;
mod error;
pub mod export;
pub mod handlers;
mod query_params;
mod reads;
pub mod stream;

use std::sync::Arc;

use actix_web::web;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use nox_audit_model::{Clock, SystemClock};
use nox_audit_query::UserNames;
use nox_audit_store::checkpoints::Checkpointer;
use nox_audit_store::commit_feed::CommitFeed;
use nox_audit_store::{AuditMode, AuditSink};
use tokio::sync::Semaphore;

pub use authorize::{Access, Authorize, Reader};
pub use error::{ErrorBody, WebError};
pub use reads::{LAG_HEADER, ReadSource, SOURCE_HEADER};
pub use stream::StreamLimits;

/// Everything the endpoints use, shared by every worker (add it as
/// `web::Data<AuditApi>`).
pub struct AuditApi {
    /// The primary: writes, and reads that must see them.
    pool: Pool,
    /// The read endpoints' servers: the primary, or a replica.
    reads: reads::Reads,
    authorize: Box<dyn Authorize>,
    sink: AuditSink,
    checkpointer: Arc<Checkpointer>,
    mode: AuditMode,
    version: &'static str,
    metrics: Option<PrometheusHandle>,
    clock: Arc<dyn Clock>,
    exports: Arc<Semaphore>,
    work_runtime: Option<tokio::runtime::Handle>,
    user_names: Option<UserNames>,
    verification_interval: Option<std::time::Duration>,
    streams: stream::Streams,
}

impl std::fmt::Debug for AuditApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditApi")
            .field("mode", &self.mode)
            .field("version", &self.version)
            .field("user_names", &self.user_names)
            .field("verification_interval", &self.verification_interval)
            .finish_non_exhaustive()
    }
}

impl AuditApi {
    /// Defaults: durable mode, this crate's version, no metrics, the system
    /// clock, two exports at once on the worker's runtime, no user names, no
    /// continuous verification here.
    pub fn new(
        pool: Pool,
        sink: AuditSink,
        checkpointer: Arc<Checkpointer>,
        authorize: impl Authorize,
    ) -> AuditApi {
        AuditApi {
            reads: reads::Reads::primary(pool.clone()),
            pool,
            authorize: Box::new(authorize),
            sink,
            checkpointer,
            mode: AuditMode::Durable,
            version: env!("CARGO_PKG_VERSION"),
            metrics: None,
            clock: Arc::new(SystemClock),
            exports: Arc::new(Semaphore::new(2)),
            work_runtime: None,
            user_names: None,
            verification_interval: None,
            streams: stream::Streams::new(None, StreamLimits::default()),
        }
    }

    /// The writer's mode, shown by the status endpoint.
    pub fn mode(mut self, mode: AuditMode) -> Self {
        self.mode = mode;
        self
    }

    /// The service's version, shown by the status endpoint.
    pub fn version(mut self, version: &'static str) -> Self {
        self.version = version;
        self
    }

    /// The Prometheus recorder's handle; without one the metrics endpoint
    /// answers 404.
    pub fn metrics(mut self, handle: Option<PrometheusHandle>) -> Self {
        self.metrics = handle;
        self
    }

    /// Names export files after this clock's time.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Exports running at once (each holds a connection); more get 503.
    pub fn exports(mut self, permits: Arc<Semaphore>) -> Self {
        self.exports = permits;
        self
    }

    /// Where exports run, off the HTTP workers.
    pub fn work_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.work_runtime = Some(runtime);
        self
    }

    /// The live stream's source of commits; without one the stream
    /// endpoint answers 503.
    pub fn commit_feed(mut self, feed: CommitFeed) -> Self {
        self.streams = stream::Streams::new(Some(feed), self.streams.limits().clone());
        self
    }

    /// The live stream's bounds (set before [`AuditApi::commit_feed`] or
    /// after; both are kept).
    pub fn stream_limits(mut self, limits: StreamLimits) -> Self {
        self.streams = stream::Streams::new(self.streams.feed().cloned(), limits);
        self
    }

    /// Ends every open live stream and refuses new ones: call when the
    /// server starts shutting down (a stream otherwise never ends, and a
    /// graceful shutdown would wait for it).
    pub fn close_streams(&self) {
        self.streams.close_all();
    }

    /// A streaming replica of the database for the read endpoints: the
    /// rows, export, statistics, per-user activity, daily summaries, admin
    /// actions and the live stream's reads. A read goes there while the
    /// replica answers and its lag (`nox_audit_query::replica_lag`) is at
    /// most `max_lag`, else to the primary, counted by
    /// `nox_audit_read_fallback_total{reason}`; a replica that fails is
    /// left alone for 5 s. Responses say which served them and how stale
    /// they may be ([`SOURCE_HEADER`], [`LAG_HEADER`]). Writes, the status
    /// and the checkpoints stay on the primary. Give the pool short
    /// connect and wait timeouts: a wait past its wait timeout also reads
    /// from the primary.
    pub fn read_replica(mut self, pool: Pool, max_lag: std::time::Duration) -> Self {
        self.reads = self.reads.with_replica(pool, max_lag);
        self
    }

    /// The embedder's user table, for names beside user ids.
    pub fn user_names(mut self, users: UserNames) -> Self {
        self.user_names = Some(users);
        self
    }

    /// The interval of this service's continuous verification
    /// (`nox_audit_store::verify::Verifier::start`), shown by the status
    /// endpoint; `None`: it does not verify (the status still shows results
    /// other servers recorded).
    pub fn verification_interval(mut self, interval: Option<std::time::Duration>) -> Self {
        self.verification_interval = interval;
        self
    }
}

/// Registers every endpoint, at its absolute path (`/admin/audit/*` and
/// `/admin/stats`). The app must hold a `web::Data<AuditApi>`.
pub fn services(config: &mut web::ServiceConfig) {
    use handlers::*;
    config
        .service(logs)
        .service(export::export)
        .service(stream::stream)
        .service(status)
        .service(checkpoints)
        .service(stats)
        .service(users)
        .service(daily_summaries)
        .service(admin_actions)
        .service(audit_metrics);
}
