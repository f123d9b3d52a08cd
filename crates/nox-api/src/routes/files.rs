//! The file endpoints: `/ls`, `/cat`, `/download`, `/write`, `/delete`, each
//! confined to the caller's own workspace (see `nox_sandbox`).

use actix_multipart::{Multipart, MultipartError};
use actix_web::error::PayloadError;
use actix_web::http::header::{self, ContentDisposition, DispositionParam, DispositionType};
use actix_web::{HttpRequest, HttpResponse, delete, get, put, web};
use base64::Engine;
use futures_util::{Stream, StreamExt};
use nox_audit_model::storable::mark_sanitized;
use nox_sandbox::{EntryKind, SandboxPath, Workspace};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Larger files are refused by `/cat`: fetch them with `/download`.
const MAX_CAT_BYTES: u64 = 1024 * 1024;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(ls)
        .service(cat)
        .service(download)
        .service(write)
        .service(delete_path);
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PathQuery {
    /// Relative to your workspace; a leading `/` means its root.
    pub path: Option<String>,
}

/// [`PathQuery`] as documented where `path` is required (the handlers
/// still extract `PathQuery`, so a missing path is refused with its row).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub struct RequiredPath {
    /// Relative to your workspace; a leading `/` means its root.
    path: String,
}

impl PathQuery {
    /// The path, which the audit row records as requested (even when it is
    /// refused); `default` applies when the parameter is absent.
    fn parse(&self, request: &HttpRequest, default: Option<&str>) -> Result<SandboxPath, ApiError> {
        let Some(raw) = self.path.as_deref().or(default) else {
            return Err(ApiError::InvalidParameter(
                "the query parameter 'path' is required".into(),
            ));
        };
        let utf8 = raw_path_is_utf8(request.query_string());
        nox_audit_actix::record(request, |details| {
            details.file_path = Some(raw.to_owned());
            details.files_affected = Some(0);
            if !utf8 {
                mark_sanitized(details.metadata_mut(), "file_path");
            }
        });
        if !utf8 {
            return Err(ApiError::InvalidPath("path is not valid UTF-8".into()));
        }
        Ok(SandboxPath::parse(raw)?)
    }
}

/// Whether every `path` parameter of a raw query string decodes to UTF-8
/// (the query extractor replaces invalid bytes with U+FFFD silently).
fn raw_path_is_utf8(query: &str) -> bool {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| percent_decode_str(key).decode_utf8_lossy() == "path")
        .all(|(_, value)| percent_decode_str(value).decode_utf8().is_ok())
}

/// Records the file facts of this request in its audit row.
fn audit_file(request: &HttpRequest, path: &SandboxPath, size: Option<u64>, affected: u64) {
    nox_audit_actix::record(request, |details| {
        details.file_path = Some(path.display());
        details.file_size_bytes = size.map(|s| s as i64);
        details.files_affected = Some(affected.min(i32::MAX as u64) as i32);
    });
}

/// Runs workspace work on a blocking thread (its CPU charged to the
/// request's audit record).
async fn in_workspace<T: Send + 'static>(
    request: &HttpRequest,
    state: &web::Data<AppState>,
    user: Uuid,
    work: impl FnOnce(&Workspace) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    crate::blocking::block(request, move || {
        let workspace = state.workspaces.open(user)?;
        // The first use of a workspace measures it, for storage accounting.
        state.workspaces.usage(user, &workspace)?;
        work(&workspace)
    })
    .await?
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListEntry {
    /// Directories end with `/`.
    pub name: String,
    /// `file`, `directory`, `symlink` (symbolic links are listed, never
    /// followed) or `other` (a FIFO, socket or device).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `null` for all but regular files.
    pub size: Option<u64>,
    #[serde(with = "time::serde::rfc3339")]
    pub modified: OffsetDateTime,
}

fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::File => "file",
        EntryKind::Directory => "directory",
        EntryKind::Symlink => "symlink",
        EntryKind::Other => "other",
    }
}

#[utoipa::path(
    params(PathQuery),
    responses(
        (status = 200, description = "A directory listing (`type: directory`, sorted by name) or one entry: a file (`type: file`) or a FIFO, socket or device (`type: other`, `size: null`; never opened)"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "files"
)]
#[get("/ls")]
pub async fn ls(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<PathQuery>,
) -> Result<HttpResponse, ApiError> {
    let path = query.parse(&request, Some("."))?;
    let target = path.clone();
    let (entry, listing) = in_workspace(&request, &state, caller.0.user_id, move |workspace| {
        let entry = workspace.stat(&target)?;
        let listing = match entry.kind {
            EntryKind::Directory => Some(workspace.list(&target)?),
            // A FIFO, socket or device is described, never opened.
            EntryKind::File | EntryKind::Other => None,
            EntryKind::Symlink => {
                return Err(ApiError::PathEscape(
                    "the path is a symbolic link, which is never followed".into(),
                ));
            }
        };
        Ok((entry, listing))
    })
    .await?;
    let body = match listing {
        None => {
            let size = (entry.kind == EntryKind::File).then_some(entry.size);
            audit_file(&request, &path, size, 1);
            serde_json::json!({
                "type": kind_name(entry.kind),
                "path": path.display(),
                "size": size,
                "modified": nox_audit_export::rfc3339_json(entry.modified),
            })
        }
        Some(entries) => {
            audit_file(&request, &path, None, entries.len() as u64);
            let files: Vec<ListEntry> = entries
                .into_iter()
                .map(|e| ListEntry {
                    name: if e.kind == EntryKind::Directory {
                        format!("{}/", e.name)
                    } else {
                        e.name
                    },
                    kind: kind_name(e.kind),
                    size: (e.kind == EntryKind::File).then_some(e.size),
                    modified: e.modified,
                })
                .collect();
            serde_json::json!({ "type": "directory", "path": path.display(), "files": files })
        }
    };
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CatResponse {
    pub file_path: String,
    pub size: u64,
    /// `utf-8`, or `base64` for content that is not valid UTF-8.
    pub encoding: &'static str,
    pub content: String,
}

#[utoipa::path(
    params(RequiredPath),
    responses(
        (status = 200, body = CatResponse),
        (status = 400, description = "`not_a_regular_file`: a directory, FIFO, socket or device (refused without waiting on it); or a refused path", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, description = "Over 1 MiB: use /download", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "files"
)]
#[get("/cat")]
pub async fn cat(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<PathQuery>,
) -> Result<HttpResponse, ApiError> {
    let path = query.parse(&request, None)?;
    let target = path.clone();
    let (size, bytes) = in_workspace(&request, &state, caller.0.user_id, move |workspace| {
        let (mut file, size) = workspace.open_file(&target)?;
        if size > MAX_CAT_BYTES {
            return Ok((size, None));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        std::io::Read::read_to_end(&mut file, &mut bytes).map_err(ApiError::internal)?;
        Ok((size, Some(bytes)))
    })
    .await?;
    audit_file(&request, &path, Some(size), 1);
    let Some(bytes) = bytes else {
        return Err(ApiError::PayloadTooLarge(format!(
            "the file is {size} bytes; /cat returns files up to 1 MiB: use /download"
        )));
    };
    let size = bytes.len() as u64;
    let (encoding, content) = match String::from_utf8(bytes) {
        Ok(text) => ("utf-8", text),
        Err(error) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(error.into_bytes()),
        ),
    };
    Ok(HttpResponse::Ok().json(CatResponse {
        file_path: path.display(),
        size,
        encoding,
        content,
    }))
}

#[utoipa::path(
    params(RequiredPath),
    responses(
        (status = 200, description = "The raw bytes, streamed", content_type = "application/octet-stream"),
        (status = 400, description = "`not_a_regular_file`: a directory, FIFO, socket or device (refused without waiting on it); or a refused path", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "files"
)]
#[get("/download")]
pub async fn download(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<PathQuery>,
) -> Result<HttpResponse, ApiError> {
    let path = query.parse(&request, None)?;
    let target = path.clone();
    let (file, size) = in_workspace(&request, &state, caller.0.user_id, move |workspace| {
        Ok(workspace.open_file(&target)?)
    })
    .await?;
    audit_file(&request, &path, Some(size), 1);
    let name = path
        .display()
        .rsplit('/')
        .next()
        .unwrap_or("download")
        .to_owned();
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header(ContentDisposition {
            disposition: DispositionType::Attachment,
            parameters: vec![DispositionParam::Filename(name)],
        })
        .no_chunking(size)
        .streaming(stream))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WriteResponse {
    pub message: String,
    pub file_path: String,
    pub size: u64,
}

#[utoipa::path(
    params(RequiredPath),
    request_body(
        description = "Either multipart/form-data with the field `file`, or the raw bytes with any other content type",
        content = Vec<u8>, content_type = "application/octet-stream"
    ),
    responses(
        (status = 200, body = WriteResponse),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 403, description = "`quota_exceeded`: the write would take the workspace over its storage or files quota, or it is over one already", body = ErrorBody),
        (status = 507, description = "`insufficient_storage`: the server's disk is below `NOX_MIN_FREE_MB` free", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "files"
)]
#[put("/write")]
pub async fn write(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<PathQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let path = query.parse(&request, None)?;
    state.free_space.check()?;
    let max = state.max_upload_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max + MULTIPART_OVERHEAD) {
        audit_file(&request, &path, declared, 0);
        return Err(too_large(max));
    }
    let user = caller.0.user_id;
    let limits = crate::admission::limits_of(&state, &caller.0).await;
    let target = path.clone();
    let handler_state = state.clone();
    let (mut upload, usage, replaced_size) =
        in_workspace(&request, &state, user, move |workspace| {
            let usage = handler_state.workspaces.usage(user, workspace)?;
            let replaced_size = workspace
                .stat(&target)
                .ok()
                .filter(|entry| entry.kind == EntryKind::File)
                .map(|entry| entry.size);
            Ok((workspace.start_upload(&target)?, usage, replaced_size))
        })
        .await?;
    // Storage and file quotas: refused before reading when the declared
    // size cannot fit, and again as the file is kept (below).
    let declared_fits = crate::storage_quota::check_storage(
        &limits,
        usage,
        declared
            .unwrap_or(0)
            .saturating_sub(replaced_size.unwrap_or(0)),
        replaced_size.is_none(),
    );
    if let Err(violation) = declared_fits {
        crate::admission::record_violation(&request, &violation);
        return Err(ApiError::QuotaExceeded(violation));
    }
    let file = upload
        .take_file()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("upload without a file")))?;
    let mut file = tokio::fs::File::from_std(file);

    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let written = if is_multipart {
        let mut multipart = Multipart::new(request.headers(), payload);
        let mut written = None;
        while let Some(field) = multipart.next().await {
            let field = field.map_err(|e| body_error("bad multipart body", &e))?;
            if written.is_none() && field.name() == Some("file") {
                written = Some(copy_body(field, &mut file, max).await?);
            } else {
                // Other fields are read and dropped.
                copy_body(field, &mut tokio::io::sink(), u64::MAX).await?;
            }
        }
        written.ok_or_else(|| {
            ApiError::InvalidParameter("the multipart body has no field named 'file'".into())
        })?
    } else {
        copy_body(payload, &mut file, max).await?
    };
    let written = match written {
        Some(bytes) => bytes,
        None => {
            audit_file(&request, &path, None, 0);
            // Dropping the upload removes its temporary file.
            return Err(too_large(max));
        }
    };
    file.flush().await.map_err(ApiError::internal)?;
    upload.put_file(file.into_std().await);
    // Checked against the usage at the moment of the rename, under the
    // accounting's lock: concurrent uploads cannot together overrun it.
    let accounting = state.clone();
    let kept = in_workspace(&request, &state, user, move |workspace| {
        let fits = |usage, replacing: Option<u64>| {
            let added = written.saturating_sub(replacing.unwrap_or(0));
            crate::storage_quota::check_storage(&limits, usage, added, replacing.is_none())
        };
        Ok(accounting
            .workspaces
            .commit_upload(user, workspace, upload, written, fits)?)
    })
    .await?;
    if let Err(violation) = kept {
        crate::admission::record_violation(&request, &violation);
        return Err(ApiError::QuotaExceeded(violation));
    }
    audit_file(&request, &path, Some(written), 1);
    Ok(HttpResponse::Ok().json(WriteResponse {
        message: format!("File written to {}", path.display()),
        file_path: path.display(),
        size: written,
    }))
}

/// Room for multipart framing around a file of the maximum size.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

fn too_large(max: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "uploads are limited to {} MiB (NOX_MAX_UPLOAD_MB)",
        max / (1024 * 1024)
    ))
}

/// Streams a body into `out`; `None` once it exceeds `max` bytes.
/// Whether a request body's error means its client went away before
/// sending all of it (rather than sending a malformed one).
trait EndedEarly {
    fn client_left(&self) -> bool;
}

impl EndedEarly for PayloadError {
    fn client_left(&self) -> bool {
        matches!(self, PayloadError::Incomplete(_))
    }
}

impl EndedEarly for MultipartError {
    fn client_left(&self) -> bool {
        matches!(
            self,
            MultipartError::Incomplete | MultipartError::Payload(PayloadError::Incomplete(_))
        )
    }
}

/// 499 when the client left mid-body, else 400.
fn body_error(what: &str, error: &(impl std::fmt::Display + EndedEarly)) -> ApiError {
    let detail = format!("{what}: {error}");
    match error.client_left() {
        true => ApiError::ClientClosed(detail),
        false => ApiError::InvalidParameter(detail),
    }
}

async fn copy_body<S, E, W>(mut body: S, out: &mut W, max: u64) -> Result<Option<u64>, ApiError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display + EndedEarly,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| body_error("the upload was interrupted", &e))?;
        written += chunk.len() as u64;
        if written > max {
            return Ok(None);
        }
        out.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    Ok(Some(written))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteResponse {
    pub message: String,
    /// Regular files deleted, as the files quota counts them (links,
    /// special files and directories are removed, not counted).
    pub files_deleted: u64,
    pub bytes_freed: u64,
}

#[utoipa::path(
    params(RequiredPath),
    responses(
        (status = 200, body = DeleteResponse),
        (status = 400, description = "Includes the workspace root itself", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "files"
)]
#[delete("/delete")]
pub async fn delete_path(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<PathQuery>,
) -> Result<HttpResponse, ApiError> {
    let path = query.parse(&request, None)?;
    if path.is_root() {
        return Err(ApiError::InvalidPath(
            "the workspace root cannot be deleted".into(),
        ));
    }
    let user = caller.0.user_id;
    let target = path.clone();
    let (was_directory, files, bytes) = in_workspace(&request, &state, user, move |workspace| {
        let is_directory = workspace.stat(&target)?.kind == EntryKind::Directory;
        let (files, bytes) = workspace.delete(&target)?;
        Ok((is_directory, files, bytes))
    })
    .await?;
    state.workspaces.record_delete(user, files, bytes);
    audit_file(&request, &path, Some(bytes), files);
    let what = if was_directory { "directory" } else { "file" };
    Ok(HttpResponse::Ok().json(DeleteResponse {
        message: format!("Deleted {what} {}", path.display()),
        files_deleted: files,
        bytes_freed: bytes,
    }))
}
