//! The storage and files quotas: what a write may add, and what a run
//! left. A run may write anything; afterwards its workspace is measured
//! again and, if over a quota, the run's audit row records the violation
//! and the user's next writes and runs are refused until they delete enough
//! (`/delete`, `/ls`, `/cat` and `/download` keep working).

use actix_web::{HttpRequest, web};
use nox_quota::{Limits, Violation};
use uuid::Uuid;

use crate::admission::record_violation;
use crate::error::ApiError;
use crate::state::AppState;

pub(crate) const MIB: u64 = 1024 * 1024;

/// Refuses a write that would take the caller past the storage or file
/// quota, or that finds them past it already (a run can leave them there).
/// `new_file` is whether the write adds a file. With nothing added, it
/// refuses a workspace over its quota.
pub fn check_storage(
    limits: &Limits,
    usage: nox_sandbox::Usage,
    adding_bytes: u64,
    new_file: bool,
) -> Result<(), Violation> {
    if usage.incomplete {
        return refuse_unmeasured(limits, usage);
    }
    if let Some(limit_mb) = limits.storage_mb
        && usage.bytes + adding_bytes > limit_mb * MIB
    {
        return Err(Violation {
            quota_type: "storage_mb",
            current_usage: usage.bytes.div_ceil(MIB),
            limit: limit_mb,
            retry_after_secs: None,
        });
    }
    if let Some(limit) = limits.files_max
        && usage.files + u64::from(new_file) > limit
    {
        return Err(Violation {
            quota_type: "files_max",
            current_usage: usage.files,
            limit,
            retry_after_secs: None,
        });
    }
    Ok(())
}

/// A workspace too deep or too large to measure whole counts as one over
/// whichever of its limits is set (fail closed): its counts are only lower
/// bounds. Without a storage or files limit, nothing is refused.
fn refuse_unmeasured(limits: &Limits, usage: nox_sandbox::Usage) -> Result<(), Violation> {
    let (quota_type, counted, limit) = match (limits.storage_mb, limits.files_max) {
        (Some(limit_mb), _) => ("storage_mb", usage.bytes.div_ceil(MIB), limit_mb),
        (None, Some(limit)) => ("files_max", usage.files, limit),
        (None, None) => return Ok(()),
    };
    Err(Violation {
        quota_type,
        current_usage: counted.max(limit.saturating_add(1)),
        limit,
        retry_after_secs: None,
    })
}

/// Refuses a run when the caller's workspace is already over its storage
/// or files quota (an earlier run left it there): recorded as a violation.
pub async fn refuse_run_over_storage(
    request: &HttpRequest,
    state: &web::Data<AppState>,
    user: Uuid,
    limits: &Limits,
) -> Result<(), ApiError> {
    let measuring = state.clone();
    let usage = crate::blocking::block(request, move || -> Result<_, ApiError> {
        let workspace = measuring.workspaces.open(user)?;
        Ok(measuring.workspaces.usage(user, &workspace)?)
    })
    .await??;
    if let Err(violation) = check_storage(limits, usage, 0, false) {
        record_violation(request, &violation);
        return Err(ApiError::QuotaExceeded(violation));
    }
    Ok(())
}

/// A run's effect on its user's storage accounting: begun before the run,
/// settled after it. Dropped unsettled (a reset connection drops the
/// handler mid-run), it forgets the user's usage, so the next request walks
/// the workspace and counts what the run wrote.
#[derive(Debug)]
pub struct RunStorage {
    state: web::Data<AppState>,
    user: Uuid,
    settled: bool,
}

impl RunStorage {
    pub fn begin(state: &web::Data<AppState>, user: Uuid) -> RunStorage {
        RunStorage {
            state: state.clone(),
            user,
            settled: false,
        }
    }

    /// Walks the workspace again (bounded, see
    /// `nox_sandbox::Workspace::usage`) and records a violation in the
    /// run's audit row when it ended over the storage or files quota: the
    /// next write or run is then refused until the user deletes enough. A
    /// walk that fails leaves the usage unknown, so the next request walks.
    pub async fn settle(mut self, request: &HttpRequest, limits: &Limits) {
        let (measuring, user) = (self.state.clone(), self.user);
        let measured = crate::blocking::block(request, move || -> Result<_, ApiError> {
            let workspace = measuring.workspaces.open(user)?;
            Ok(measuring.workspaces.remeasure(user, &workspace)?)
        })
        .await
        .and_then(|measured| measured);
        match measured {
            Ok(usage) => {
                self.settled = true;
                if let Err(violation) = check_storage(limits, usage, 0, false) {
                    record_violation(request, &violation);
                }
            }
            Err(error) => {
                tracing::warn!(%error, %user, "the workspace could not be measured after a run");
            }
        }
    }
}

impl Drop for RunStorage {
    fn drop(&mut self) {
        if !self.settled {
            self.state.workspaces.invalidate(self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use nox_sandbox::Usage;

    use super::*;

    const LIMITS: Limits = Limits {
        req_hour: None,
        req_day: None,
        cpu_seconds: None,
        mem_mb: None,
        storage_mb: Some(1),
        files_max: Some(2),
    };

    fn usage(bytes: u64, files: u64, incomplete: bool) -> Usage {
        Usage {
            bytes,
            files,
            incomplete,
        }
    }

    fn refused(usage: Usage, adding_bytes: u64, new_file: bool) -> Option<(&'static str, u64)> {
        check_storage(&LIMITS, usage, adding_bytes, new_file)
            .err()
            .map(|violation| (violation.quota_type, violation.current_usage))
    }

    #[test]
    fn at_the_limit_fits_and_over_it_nothing_more_does() {
        // At the limits: replacing a file with one no larger fits.
        assert_eq!(refused(usage(MIB, 2, false), 0, false), None);
        assert_eq!(
            refused(usage(MIB, 2, false), 0, true),
            Some(("files_max", 2))
        );
        // Over them (a run left it there): even nothing more is refused.
        assert_eq!(
            refused(usage(MIB + 1, 1, false), 0, false),
            Some(("storage_mb", 2))
        );
        assert_eq!(
            refused(usage(0, 3, false), 0, false),
            Some(("files_max", 3))
        );
    }

    #[test]
    fn an_unmeasured_workspace_counts_as_over_a_set_limit() {
        assert_eq!(
            refused(usage(10, 0, true), 0, false),
            Some(("storage_mb", 2))
        );
        let files_only = Limits {
            storage_mb: None,
            ..LIMITS
        };
        let violation = check_storage(&files_only, usage(0, 1, true), 0, false);
        assert_eq!(
            violation.map_err(|v| (v.quota_type, v.current_usage)),
            Err(("files_max", 3))
        );
        assert!(check_storage(&Limits::default(), usage(0, 0, true), 0, false).is_ok());
    }
}
