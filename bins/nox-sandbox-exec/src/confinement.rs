//! Landlock: what the command may touch in the file system, enforced by
//! the kernel for the command and everything it starts, whatever its uid.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, path_beneath_rules,
};

use crate::root::{DEVICES, SYSTEM_DIRS};

/// Whether the kernel can enforce a Landlock ruleset (creating one
/// restricts nothing).
pub fn available() -> bool {
    Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V1))
        .and_then(|ruleset| ruleset.create())
        .is_ok()
}

/// Restricts this process: system directories (and, in the run's own root,
/// `/proc`) read-only, a few devices read-write, the workspace (and the
/// private `/tmp` and `/dev/shm`) fully. Returns whether the kernel
/// enforces it.
pub fn restrict(workspace: &Path, own_root: bool) -> Result<bool, String> {
    let abi = ABI::V5;
    let read_only = AccessFs::from_read(abi);
    let everything = AccessFs::from_all(abi);
    let existing = |paths: &[&str]| -> Vec<PathBuf> {
        paths
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect()
    };
    // The host's /proc and /tmp are not the run's without its own root.
    // The run's own root holds nothing else, so listing it (and `/dev`)
    // shows nothing of the host's.
    let (listable, readable, writable): (&[&str], &[&str], &[&str]) = if own_root {
        (&["/"], &["/proc"], &["/tmp", "/dev/shm"])
    } else {
        (&[], &[], &[])
    };
    let status = Ruleset::default()
        .handle_access(everything)
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(existing(SYSTEM_DIRS), read_only)))
        .and_then(|r| r.add_rules(path_beneath_rules(existing(listable), AccessFs::ReadDir)))
        .and_then(|r| r.add_rules(path_beneath_rules(existing(readable), read_only)))
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                existing(DEVICES),
                AccessFs::ReadFile | AccessFs::WriteFile,
            ))
        })
        .and_then(|r| r.add_rules(path_beneath_rules(existing(writable), everything)))
        .and_then(|r| r.add_rules(path_beneath_rules([workspace], everything)))
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("landlock: {e}"))?;
    Ok(status.ruleset != RulesetStatus::NotEnforced)
}
