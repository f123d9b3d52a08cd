//! actix-web middleware for the Nox audit trail: one `audit_actions` row per
//! request, written through [`nox_audit_store::AuditWriter`].
//!
//! Mount [`Audit`] as the outermost layer (`wrap` it last) so requests that
//! inner layers refuse are recorded too. Handlers add what only they know
//! (a file path, a command's exit code) with [`record`]; the middleware
//! fills in the rest: request id (`X-Request-ID`, kept when the client sends
//! a valid UUID, echoed always), timing, the CPU the worker spent on the
//! request (plus what handlers [`charge_cpu`] for work on other threads),
//! sizes, status, matched route and its classification by a
//! [`nox_audit_model::Taxonomy`].
//!
//! In [`AuditMode::Durable`](nox_audit_store::AuditMode) (the default) a
//! response waits until its row is committed or spooled; in `Buffered` it
//! does not wait. While neither the database nor the spool takes rows,
//! requests that are not read-only are refused with 503.
//!
//! Below, the writer's pool cannot connect, so the row goes to the spool
//! (where the writer would replay it from once PostgreSQL is back):
//!
//! ```
//! use std::sync::Arc;
//! use actix_web::{App, HttpRequest, HttpResponse, test, web};
//! use nox_audit_actix::{Audit, AuditConfig, REQUEST_ID_HEADER, record};
//! use nox_audit_model::SystemClock;
//! use nox_audit_store::{AuditMode, AuditWriter, PoolOptions, Spool, WriterConfig, build_pool};
//!
//! async fn download(request: HttpRequest, name: web::Path<String>) -> HttpResponse {
//!     record(&request, |row| row.file_path = Some(name.clone()));
//!     HttpResponse::Ok().body("contents")
//! }
//!
//! # actix_web::rt::System::new().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let mut pg_config = tokio_postgres::Config::new();
//! pg_config.host_path(dir.path().join("no-such-socket")).user("nobody").dbname("nothing");
//! let pool = build_pool(pg_config, &PoolOptions::default()).unwrap();
//! let spool = Spool::open(dir.path().join("spool")).unwrap();
//! let writer = AuditWriter::start(pool, spool.clone(), Arc::new(SystemClock), WriterConfig::default());
//!
//! let config = AuditConfig { mode: AuditMode::Buffered, ..AuditConfig::default() };
//! let app = test::init_service(
//!     App::new()
//!         .route("/files/{name}", web::get().to(download))
//!         .wrap(Audit::new(config, writer.sink())),
//! )
//! .await;
//! let id = uuid::Uuid::now_v7();
//! let request = test::TestRequest::get()
//!     .uri("/files/report.txt")
//!     .insert_header((REQUEST_ID_HEADER, id.to_string()))
//!     .to_request();
//! let response = test::call_service(&app, request).await;
//! assert_eq!(response.status(), 200);
//! let echoed = response.headers().get(REQUEST_ID_HEADER).unwrap();
//! assert_eq!(echoed.to_str().unwrap(), id.to_string());
//! assert_eq!(test::read_body(response).await, "contents");
//!
//! writer.shutdown().await; // writes what is queued: here, to the spool
//! let files = spool.pending().unwrap();
//! let row = &Spool::read(&files[0]).unwrap().actions[0];
//! assert_eq!(row.request_id, id);
//! assert_eq!((row.route.as_str(), row.status_code), ("/files/{name}", 200));
//! assert_eq!(row.file_path.as_deref(), Some("report.txt"));
//! # });
//! ```
//!
//! `nox-audit-web`'s `examples/shop.rs` is a whole service built on it.

mod client_ip;
mod cpu;
mod middleware;
mod request_record;

pub use client_ip::client_ip;
pub use cpu::{charge_cpu, is_metered, thread_cpu_time};
pub use middleware::{Audit, AuditConfig, CLIENT_CLOSED_REQUEST, REQUEST_ID_HEADER};
pub use request_record::{RequestId, record, request_id};
