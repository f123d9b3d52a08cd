//! `POST /run`: a `bash -c` command in the caller's workspace, contained by
//! the `nox-sandbox-exec` launcher and measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, post, web};
use nox_sandbox::run::{RunError, RunOutcome, RunRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorBody, refuse_nul};
use crate::run_service::Availability;
use crate::state::AppState;

/// As long as the audit row stores whole.
const MAX_COMMAND_CHARS: usize = nox_audit_model::storable::MAX_COMMAND_TEXT_CHARS;
const MAX_TIMEOUT_SECS: u64 = 300;
const MAX_STDIN_BYTES: usize = 1024 * 1024;

pub fn routes(config: &mut web::ServiceConfig) {
    config.service(run_command);
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// Run with `bash -c`, 1 to 10,000 characters, no NUL.
    #[schema(min_length = 1, max_length = 10000)]
    pub command: String,
    /// Seconds, 1 to 300 (default `NOX_TIMEOUT`).
    #[schema(minimum = 1, maximum = 300)]
    pub timeout: Option<u64>,
    /// Fed to the command's standard input, at most 1 MiB; recorded as its
    /// size and SHA-256, never its content.
    pub stdin: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Truncated {
    pub stdout: bool,
    pub stderr: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunResponse {
    pub stdout: String,
    pub stderr: String,
    /// Bash's exit code: a command killed by signal N gives 128 + N.
    pub exit_code: Option<i32>,
    /// The signal that killed bash itself.
    pub signal: Option<i32>,
    pub success: bool,
    pub execution_time_ms: f64,
    pub cpu_time_ms: f64,
    pub memory_peak_kb: u64,
    pub timeout_used: u64,
    pub timed_out: bool,
    pub truncated: Truncated,
    /// The first limit the run hit, of: `time` (the deadline ended it),
    /// `disk` (it took free space below `NOX_MIN_FREE_MB`: stopped),
    /// `memory` (the memory limit killed any of its processes), `cpu`,
    /// `processes` (a fork was refused); else null.
    pub limit_hit: Option<String>,
    /// `python`, `nodejs` or `bash`, from the first word.
    pub command_type: &'static str,
}

/// As the older API derived it: from the first word's prefix.
pub fn command_type(command: &str) -> &'static str {
    let first = command.split_whitespace().next().unwrap_or("");
    if first.starts_with("python") {
        "python"
    } else if first.starts_with("node") || first.starts_with("npm") || first.starts_with("npx") {
        "nodejs"
    } else {
        "bash"
    }
}

#[utoipa::path(
    request_body = RunBody,
    responses(
        (status = 200, body = RunResponse),
        (status = 408, description = "Timed out: the same fields, with `detail` and `code: timeout`"),
        (status = 400, body = ErrorBody),
        (status = 429, description = "Too many runs at once; see Retry-After", body = ErrorBody),
        (status = 403, description = "`quota_exceeded`: the workspace is over its storage or files quota (an earlier run left it there); delete files first", body = ErrorBody),
        (status = 503, description = "`sandbox_unavailable`: an isolation layer runs need is missing on this server (named in `detail`; `GET /health` shows which)", body = ErrorBody),
        (status = 507, description = "`insufficient_storage`: the server's disk is below `NOX_MIN_FREE_MB` free", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "run"
)]
#[post("/run")]
pub async fn run_command(
    caller: Authenticated,
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<RunBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let kind = command_type(&body.command);
    nox_audit_actix::record(&request, |details| {
        details.command_type = Some(kind.to_owned());
        // Whole: the column holds MAX_COMMAND_CHARS. A longer one, refused
        // below, is cut with its size and hash kept.
        details.command_text = Some(body.command.clone());
        if let Some(stdin) = &body.stdin {
            // What was fed, never its content.
            details.metadata_mut().insert(
                "stdin".into(),
                serde_json::json!({
                    "bytes": stdin.len(),
                    "sha256": nox_audit_model::storable::sha256_hex(stdin.as_bytes()),
                }),
            );
        }
    });
    let length = body.command.chars().count();
    if length == 0 || length > MAX_COMMAND_CHARS {
        return Err(ApiError::InvalidParameter(format!(
            "command must be 1 to {MAX_COMMAND_CHARS} characters"
        )));
    }
    refuse_nul("command", &body.command)?;
    let service = Arc::clone(&state.runs);
    let timeout = match body.timeout {
        None => service.default_timeout,
        Some(secs @ 1..=MAX_TIMEOUT_SECS) => Duration::from_secs(secs),
        Some(_) => {
            return Err(ApiError::InvalidParameter(format!(
                "timeout must be 1 to {MAX_TIMEOUT_SECS} seconds"
            )));
        }
    };
    if body
        .stdin
        .as_ref()
        .is_some_and(|s| s.len() > MAX_STDIN_BYTES)
    {
        return Err(ApiError::PayloadTooLarge(
            "stdin is limited to 1 MiB".into(),
        ));
    }
    let launcher = match (&service.launcher, &service.availability) {
        (Some(launcher), Availability::Ready { .. }) => launcher.clone(),
        (_, Availability::Unavailable { detail, .. }) => {
            return Err(ApiError::SandboxUnavailable(detail.clone()));
        }
        (None, _) => {
            return Err(ApiError::SandboxUnavailable(
                "the command sandbox is not available on this server".into(),
            ));
        }
    };
    state.free_space.check()?;
    let caller = caller.0;
    let limits = crate::admission::limits_of(&state, &caller).await;
    if let Err(violation) = state.quotas.check_cpu(caller.user_id, &limits) {
        crate::admission::record_violation(&request, &violation);
        return Err(ApiError::QuotaExceeded(violation));
    }
    crate::storage_quota::refuse_run_over_storage(&request, &state, caller.user_id, &limits)
        .await?;
    let _slot = service.admit(caller.user_id)?;

    let user = caller.user_id;
    let run_user = service.uid_of(&state.pool, user).await?;
    let handler_state = state.clone();
    let owner = run_user.clone();
    let workspace = web::block(move || -> Result<PathBuf, ApiError> {
        let workspace = handler_state.workspaces.open(user)?;
        if let Some(owner) = &owner {
            workspace.hand_over(owner.uid, owner.gid)?;
        }
        Ok(workspace.root_path().to_path_buf())
    })
    .await??;
    // The user's memory quota per run, capped by the server's maximum.
    let memory_mb = limits.mem_mb.map_or(service.max_memory_mb, |quota| {
        quota.min(service.max_memory_mb)
    });
    let run = RunRequest {
        workspace,
        command: body.command,
        stdin: body.stdin,
        limits: service.limits(timeout, memory_mb),
        user: run_user,
        hidden: service.hidden.clone(),
        relaxed: service.relaxed,
        cgroup_parent: service.cgroup_parent.clone(),
    };
    // A client that leaves ends its run (within ~100 ms), like a reset
    // connection, which drops this handler and the run with it.
    let gone = crate::connection::client_gone(request.clone());
    let storage = crate::storage_quota::RunStorage::begin(&state, user);
    let outcome = match nox_sandbox::run::run(&launcher, &service.report_dir, &run, gone).await {
        Ok(outcome) => outcome,
        // A layer the probe had is gone (say, no cgroup could be made).
        Err(RunError::Unavailable(missing)) => {
            return Err(ApiError::SandboxUnavailable(format!(
                "the command sandbox lacks isolation layers: {}",
                missing.join(", ")
            )));
        }
        Err(error) => return Err(ApiError::internal(error)),
    };
    // The command may have changed anything in the workspace.
    storage.settle(&request, &limits).await;
    state
        .quotas
        .charge_cpu(user, outcome.cpu_time_ms.round() as u64);
    record_outcome(&request, &outcome);
    if outcome.cancelled {
        return Err(ApiError::ClientClosed(
            "the client closed the connection; the command was stopped".into(),
        ));
    }
    Ok(respond(outcome, timeout, kind))
}

fn record_outcome(request: &HttpRequest, outcome: &RunOutcome) {
    let kind = if outcome.cancelled {
        "cancelled"
    } else if outcome.timed_out {
        "timeout"
    } else if outcome.limit_hit.is_some() {
        "limit"
    } else if outcome.exit_code == Some(0) {
        "ok"
    } else {
        "error"
    };
    crate::metrics::record_run(
        kind,
        outcome.execution_time_ms / 1000.0,
        outcome.cpu_time_ms / 1000.0,
    );
    nox_audit_actix::record(request, |details| {
        details.exit_code = outcome.exit_code;
        details.stdout_size = Some(outcome.stdout.total_bytes as i64);
        details.stderr_size = Some(outcome.stderr.total_bytes as i64);
        details.cpu_time_ms = Some(outcome.cpu_time_ms);
        details.memory_peak_mb = Some(outcome.memory_peak_kb as f64 / 1024.0);
        if let Some(limit) = &outcome.limit_hit {
            details
                .metadata_mut()
                .insert("limit_hit".into(), limit.clone().into());
        }
    });
}

fn respond(outcome: RunOutcome, timeout: Duration, kind: &'static str) -> HttpResponse {
    let body = RunResponse {
        success: outcome.exit_code == Some(0),
        stdout: outcome.stdout.text,
        stderr: outcome.stderr.text,
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        execution_time_ms: outcome.execution_time_ms,
        cpu_time_ms: outcome.cpu_time_ms,
        memory_peak_kb: outcome.memory_peak_kb,
        timeout_used: timeout.as_secs(),
        timed_out: outcome.timed_out,
        truncated: Truncated {
            stdout: outcome.stdout.truncated,
            stderr: outcome.stderr.truncated,
        },
        limit_hit: outcome.limit_hit,
        command_type: kind,
    };
    if !body.timed_out {
        return HttpResponse::Ok().json(body);
    }
    let mut value = serde_json::to_value(&body).unwrap_or_default();
    value["detail"] = "Command timed out".into();
    value["code"] = "timeout".into();
    HttpResponse::RequestTimeout().json(value)
}

#[cfg(test)]
mod tests {
    use super::command_type;

    #[test]
    fn command_types_follow_the_first_word() {
        assert_eq!(command_type("python3 -c 'print(1)'"), "python");
        assert_eq!(command_type("  node x.js"), "nodejs");
        assert_eq!(command_type("npx thing"), "nodejs");
        assert_eq!(command_type("echo python"), "bash");
        assert_eq!(command_type(""), "bash");
    }
}
