//! Quota limits: the tiers' defaults, overridden field by field per user.

use serde::{Deserialize, Serialize};

/// Limits of one user; `None` is unlimited. Also the shape of per-user
/// overrides, where `None` means "the tier's".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub req_hour: Option<u64>,
    pub req_day: Option<u64>,
    pub cpu_seconds: Option<u64>,
    pub mem_mb: Option<u64>,
    pub storage_mb: Option<u64>,
    pub files_max: Option<u64>,
}

const fn limits(
    req_hour: u64,
    req_day: u64,
    cpu_seconds: u64,
    mem_mb: u64,
    storage_mb: u64,
    files_max: u64,
) -> Limits {
    Limits {
        req_hour: Some(req_hour),
        req_day: Some(req_day),
        cpu_seconds: Some(cpu_seconds),
        mem_mb: Some(mem_mb),
        storage_mb: Some(storage_mb),
        files_max: Some(files_max),
    }
}

/// The limits of a tier (an unknown name gets `standard`'s).
pub fn tier_limits(tier: &str) -> Limits {
    match tier {
        "free" => limits(100, 1_000, 300, 256, 512, 25),
        "premium" => limits(2_000, 20_000, 3_600, 1_024, 10_240, 500),
        "developer" => limits(1_000, 10_000, 7_200, 2_048, 5_120, 200),
        "unlimited" => Limits::default(),
        _ => limits(500, 5_000, 1_800, 512, 2_048, 100),
    }
}

impl Limits {
    /// `self` (a tier's limits) with `overrides` applied where set.
    pub fn with_overrides(self, overrides: &Limits) -> Limits {
        Limits {
            req_hour: overrides.req_hour.or(self.req_hour),
            req_day: overrides.req_day.or(self.req_day),
            cpu_seconds: overrides.cpu_seconds.or(self.cpu_seconds),
            mem_mb: overrides.mem_mb.or(self.mem_mb),
            storage_mb: overrides.storage_mb.or(self.storage_mb),
            files_max: overrides.files_max.or(self.files_max),
        }
    }
}

/// A quota that refuses a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `req_hour`, `req_day`, `cpu_seconds`, `storage_mb` or `files_max`.
    pub quota_type: &'static str,
    pub current_usage: u64,
    pub limit: u64,
    /// Seconds until the window resets; `None` for storage and files, which
    /// do not reset by themselves.
    pub retry_after_secs: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_and_overrides() {
        assert_eq!(tier_limits("free").req_hour, Some(100));
        assert_eq!(tier_limits("standard").storage_mb, Some(2_048));
        assert_eq!(tier_limits("premium").files_max, Some(500));
        assert_eq!(tier_limits("developer").cpu_seconds, Some(7_200));
        assert_eq!(tier_limits("unlimited"), Limits::default());
        let overridden = tier_limits("free").with_overrides(&Limits {
            req_hour: Some(5),
            ..Limits::default()
        });
        assert_eq!(
            (overridden.req_hour, overridden.req_day),
            (Some(5), Some(1_000))
        );
    }
}
