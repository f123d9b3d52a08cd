//! A seccomp filter for the command: the system calls a tenant's command
//! has no use for and that open the kernel's least-trodden paths answer
//! `EPERM`: new namespaces (a user namespace would hand the command
//! capabilities over netfilter and the rest), keyrings, BPF,
//! `userfaultfd`, `perf_event_open`, `io_uring`, mounting, modules.
//! `clone3` answers `ENOSYS`, so libc falls back to `clone`, whose flags
//! the filter can see. The arch check `seccompiler` puts first kills a
//! process that calls through another ABI (i386), and on x86_64 the x32
//! numbers of the same calls are refused too, so neither bypasses the list.

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Refused whatever their arguments.
const DENIED: &[i64] = &[
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_userfaultfd,
    libc::SYS_perf_event_open,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
];

/// `clone` flags that make a namespace.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// x32 system calls are the x86_64 numbers with this bit set.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// Installs the filter on this process; what it starts inherits it.
pub fn restrict() -> Result<(), String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("seccomp: no filter for this architecture: {e}"))?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in DENIED {
        for number in numbers(call) {
            denied.insert(number, Vec::new());
        }
    }
    let mut namespace_rules = Vec::new();
    for &flag in NAMESPACE_FLAGS {
        let condition = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(|e| format!("seccomp: {e}"))?;
        namespace_rules
            .push(SeccompRule::new(vec![condition]).map_err(|e| format!("seccomp: {e}"))?);
    }
    for number in numbers(libc::SYS_clone) {
        denied.insert(number, namespace_rules.clone());
    }
    let mut clone3 = BTreeMap::new();
    for number in numbers(libc::SYS_clone3) {
        clone3.insert(number, Vec::new());
    }
    // Two filters: each has one answer for what it matches.
    for (rules, answer) in [
        (denied, SeccompAction::Errno(libc::EPERM as u32)),
        (clone3, SeccompAction::Errno(libc::ENOSYS as u32)),
    ] {
        let program: BpfProgram = SeccompFilter::new(rules, SeccompAction::Allow, answer, arch)
            .and_then(BpfProgram::try_from)
            .map_err(|e| format!("seccomp: {e}"))?;
        seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}

/// The numbers a call has on this architecture's ABIs.
fn numbers(call: i64) -> Vec<i64> {
    #[cfg(target_arch = "x86_64")]
    {
        vec![call, call | X32_SYSCALL_BIT]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec![call]
    }
}
