//! `GET /admin/audit/export`: the rows `/admin/audit/logs` would list for the
//! same filters, streamed from the database to the client as one CSV, JSON or
//! NDJSON file, optionally gzipped, in constant memory.
//!
//! The query, encoding and compression run on the server's main runtime, not
//! on the HTTP workers; chunks reach the response through a small bounded
//! channel, so a slow client slows the query instead of filling memory.
//! When the stream ends (completely, by a failure, or because the client
//! went away) a `log_export` admin action records the filters and the rows
//! sent.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::http::header::{ContentDisposition, DispositionParam, DispositionType};
use actix_web::{HttpRequest, HttpResponse, get, web};
use bytes::Bytes;
use deadpool_postgres::Pool;
use futures_util::{Stream, StreamExt};
use nox_audit_export::{Columns, Format, Progress};
use nox_audit_model::{AdminAction, AdminActionType};
use nox_auth::Role;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::audit_logs::{build_filters, invalid, parse_bool};
use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// `/export`'s own parameters, besides `/logs`'s filters.
const OWN: &[&str] = &["format", "compress", "limit"];

/// Encoded chunks waiting for the client: at most this many (of about
/// 64 KiB each) per export.
const CHANNEL_CHUNKS: usize = 4;

/// What the spawned export needs.
struct Job {
    pool: Pool,
    sql: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
    format: Format,
    gzip: bool,
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
        (status = 200, description = "The file, streamed"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "Too many exports running"),
    ),
    security(("bearer" = [])),
    tag = "admin-audit"
)]
#[get("/admin/audit/export")]
pub async fn export(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller.require(Role::Auditor)?;
    let query = query.into_inner();
    let filters = build_filters(&query, OWN)?;
    let format = match query.get("format") {
        None => Format::Csv,
        Some(text) => {
            Format::parse(text).ok_or_else(|| invalid("format", "expected csv, json or ndjson"))?
        }
    };
    let gzip = query
        .get("compress")
        .map(|text| parse_bool("compress", text))
        .transpose()?
        .unwrap_or(false);
    let limit: Option<i64> = query
        .get("limit")
        .map(|text| {
            text.parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| invalid("limit", "expected 1 or more"))
        })
        .transpose()?;
    let justification = crate::routes::users::justification(&request)?;
    let permit = Arc::clone(&state.exports)
        .try_acquire_owned()
        .map_err(|_| ApiError::ServiceUnavailable("too many exports are running; retry".into()))?;

    let mut record = AdminAction::new(AdminActionType::LogExport, Some(caller.user_id))
        .justification(justification);
    if let Some(user) = query.get("user_id").and_then(|t| Uuid::parse_str(t).ok()) {
        record = record.target(user);
    }
    record = record.new_values(json!({
        "format": format.as_str(),
        "compress": gzip,
        "limit": limit,
        "filters": Value::Object(filters.applied.clone()),
    }));
    let sql = format!(
        "SELECT a.* FROM audit_actions a WHERE {} ORDER BY a.\"timestamp\" DESC, a.id DESC{}",
        filters.sql(),
        limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default()
    );
    let job = Job {
        pool: state.pool.clone(),
        sql,
        params: filters.params,
        format,
        gzip,
        record,
        _permit: permit,
    };

    let (started_tx, started_rx) = oneshot::channel();
    let (chunks_tx, chunks_rx) = mpsc::channel(CHANNEL_CHUNKS);
    state
        .work_runtime
        .spawn(run_export(job, started_tx, chunks_tx));
    started_rx
        .await
        .map_err(|_| ApiError::internal(anyhow::anyhow!("the export task ended early")))??;

    // A compressed export is a gzip file, not a Content-Encoding.
    let content_type = if gzip {
        "application/gzip"
    } else {
        format.content_type()
    };
    let name = nox_audit_export::file_name(state.audit_config.clock.now(), format, gzip);
    let body = futures_util::stream::unfold(chunks_rx, |mut chunks| async move {
        chunks.recv().await.map(|chunk| (chunk, chunks))
    });
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(ContentDisposition {
            disposition: DispositionType::Attachment,
            parameters: vec![DispositionParam::Filename(name)],
        })
        .streaming(body))
}

type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Runs the query and streams its encoded rows into `chunks`; reports
/// through `started` whether the query could start (so a failure before the
/// first byte is still a JSON error), and records the export at the end.
async fn run_export(
    job: Job,
    started: oneshot::Sender<Result<(), ApiError>>,
    chunks: mpsc::Sender<io::Result<Bytes>>,
) {
    let progress = Progress::default();
    let opened = open(&job, progress.clone()).await;
    let (client, mut bytes) = match opened {
        Ok(opened) => {
            let _ = started.send(Ok(()));
            opened
        }
        Err(error) => {
            let _ = started.send(Err(error));
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

async fn open(
    job: &Job,
    progress: Progress,
) -> Result<(deadpool_postgres::Object, ByteStream), ApiError> {
    let client = job.pool.get().await?;
    let statement = client.prepare(&job.sql).await.map_err(ApiError::internal)?;
    let columns = Columns::new(statement.columns()).map_err(ApiError::internal)?;
    let params = job.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync));
    let rows = client
        .query_raw(&statement, params)
        .await
        .map_err(ApiError::internal)?;
    let encoded = nox_audit_export::encode(job.format, columns, rows, progress)
        .map_err(ApiError::internal)?;
    let bytes: ByteStream = if job.gzip {
        Box::pin(nox_audit_export::gzip(encoded))
    } else {
        Box::pin(encoded)
    };
    Ok((client, bytes))
}

async fn write_record(pool: &Pool, record: &AdminAction) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    nox_audit_store::admin_actions::record_alone(&mut client, record).await?;
    Ok(())
}
