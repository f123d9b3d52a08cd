//! `GET /admin/audit/export`: the rows `/admin/audit/logs` would list for
//! the same filters, streamed from the database to the client as one CSV,
//! JSON or NDJSON file, optionally gzipped, in constant memory.
//!
//! The query, encoding and compression run on the embedder's work runtime
//! (not on the HTTP workers) when it gave one; chunks reach the response
//! through a small bounded channel, so a slow client slows the query
//! instead of filling memory. The rows come from the read replica when
//! one is set and fresh enough (see [`crate::AuditApi::read_replica`]).
//! When the stream ends (completely, by a
//! failure, or because the client went away) a `log_export` admin action
//! records the filters and the rows sent.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use actix_web::http::header::{ContentDisposition, DispositionParam, DispositionType};
use actix_web::{HttpRequest, HttpResponse, get, web};
use bytes::Bytes;
use deadpool_postgres::{Object, Pool};
use futures_util::StreamExt;
use nox_audit_export::Progress;
use nox_audit_model::{AdminAction, AdminActionType};
use nox_audit_query::{ExportQuery, Statement};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use crate::AuditApi;
use crate::authorize::{Access, Authenticated};
use crate::error::{ErrorBody, WebError};

/// Encoded chunks waiting for the client: at most this many (of about
/// 64 KiB each) per export.
const CHANNEL_CHUNKS: usize = 4;

/// What the spawned export needs.
struct Job {
    /// The read's connection (primary or replica), held for the export.
    client: Object,
    /// The primary, where the record is written.
    pool: Pool,
    statement: Statement,
    /// The admin action written at the end, without the outcome yet.
    record: AdminAction,
    /// Held until the export ends: bounds concurrent exports.
    _permit: OwnedSemaphorePermit,
}

#[utoipa::path(
    params(
        ("format" = Option<String>, Query, pattern = "^(csv|json|ndjson)$", description = "csv (default), json or ndjson"),
        ("compress" = Option<bool>, Query, description = "A gzip file (application/gzip)"),
        ("limit" = Option<u64>, Query, minimum = 1, description = "At most this many rows, newest first"),
        ("user_id" = Option<Uuid>, Query), ("session_id" = Option<Uuid>, Query), ("request_id" = Option<Uuid>, Query),
        ("action_type" = Option<String>, Query), ("action_category" = Option<String>, Query),
        ("endpoint" = Option<String>, Query), ("status_code" = Option<i16>, Query, minimum = 100, maximum = 599), ("success" = Option<bool>, Query),
        ("quota_violation" = Option<bool>, Query), ("client_ip" = Option<String>, Query),
        ("start_date" = Option<String>, Query), ("end_date" = Option<String>, Query), ("search" = Option<String>, Query),
    ),
    responses(
        (status = 200, description = "The file, streamed", headers(("X-Nox-Read-Source" = String, description = "replica or primary"), ("X-Nox-Replica-Lag-Ms" = i64, description = "How stale the answer may be, in ms (0 from the primary)"))),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "Too many exports running"),
    ),
    security(("bearer" = [])),
    tag = "admin-audit"
)]
#[get("/admin/audit/export")]
pub async fn export(
    _: Authenticated,
    request: HttpRequest,
    api: web::Data<AuditApi>,
    query: web::Query<HashMap<String, String>>,
) -> actix_web::Result<HttpResponse> {
    let reader = api.authorize.authorize(&request, Access::Export)?;
    let query = ExportQuery::parse(&query).map_err(WebError::from)?;
    let justification = api.authorize.justification(&request)?;
    let permit = Arc::clone(&api.exports)
        .try_acquire_owned()
        .map_err(|_| WebError::Busy("too many exports are running; retry".into()))?;

    let mut record =
        AdminAction::new(AdminActionType::LogExport, reader.user_id).justification(justification);
    if let Some(user) = query.user_id {
        record = record.target(user);
    }
    record = record.new_values(query.description());
    let content_type = query.content_type();
    let (format, gzip) = (query.format, query.gzip);
    let read = api.reads.connection().await?;
    let job = Job {
        client: read.client,
        pool: api.pool.clone(),
        statement: query.into_statement(),
        record,
        _permit: permit,
    };

    let (started_tx, started_rx) = oneshot::channel();
    let (chunks_tx, chunks_rx) = mpsc::channel(CHANNEL_CHUNKS);
    let task = run_export(job, started_tx, chunks_tx);
    match &api.work_runtime {
        Some(runtime) => drop(runtime.spawn(task)),
        None => drop(tokio::spawn(task)),
    }
    started_rx
        .await
        .map_err(|_| WebError::Internal("the export task ended early"))??;

    let name = nox_audit_export::file_name(api.clock.now(), format, gzip);
    let body = futures_util::stream::unfold(chunks_rx, |mut chunks| async move {
        chunks.recv().await.map(|chunk| (chunk, chunks))
    });
    Ok(read
        .source
        .ok()
        .content_type(content_type)
        .insert_header(ContentDisposition {
            disposition: DispositionType::Attachment,
            parameters: vec![DispositionParam::Filename(name)],
        })
        .streaming(body))
}

/// Runs the query and streams its encoded rows into `chunks`; reports
/// through `started` whether the query could start (so a failure before the
/// first byte is still a JSON error), and records the export at the end.
async fn run_export(
    job: Job,
    started: oneshot::Sender<Result<(), WebError>>,
    chunks: mpsc::Sender<io::Result<Bytes>>,
) {
    let progress = Progress::default();
    let client = job.client;
    let mut bytes = match job.statement.open(&client, progress.clone()).await {
        Ok(bytes) => {
            let _ = started.send(Ok(()));
            bytes
        }
        Err(error) => {
            let _ = started.send(Err(error.into()));
            return;
        }
    };
    let mut outcome = "completed";
    while let Some(chunk) = bytes.next().await {
        if let Err(error) = &chunk {
            tracing::error!(%error, "an export failed while streaming");
            outcome = "failed";
        }
        let failed = chunk.is_err();
        if chunks.send(chunk).await.is_err() {
            outcome = "client_disconnected";
            break;
        }
        if failed {
            break;
        }
    }
    // Release the export's connection before taking one for the record.
    drop(bytes);
    drop(client);
    let mut record = job.record;
    if let Some(Value::Object(values)) = &mut record.new_values {
        values.insert("rows".into(), json!(progress.rows()));
        values.insert("outcome".into(), json!(outcome));
    }
    if let Err(error) = write_record(&job.pool, &record).await {
        tracing::error!(%error, rows = progress.rows(), "the log_export admin action could not be written");
    }
}

async fn write_record(
    pool: &Pool,
    record: &AdminAction,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut client = pool.get().await?;
    nox_audit_store::admin_actions::record_alone(&mut client, record).await?;
    Ok(())
}
