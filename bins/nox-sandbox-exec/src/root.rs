//! The run's own view of the file system: a mount and an IPC namespace, and
//! a new root holding only what a command needs.
//!
//! The new root is an empty tmpfs with, at their usual paths: the system
//! directories bound read-only (set-user-ID bits ignored), a few devices, a
//! private size-capped tmpfs at `/tmp` and `/dev/shm`, a `/proc` of the
//! run's PID namespace, and the workspace, bound at its own path and the
//! only other writable place. Nothing else of the host is there: not Nox's
//! data directory (other workspaces, the spool, the embedded PostgreSQL's
//! socket), not `/run`, `/var` or `/home`. A data directory that lies under
//! a system directory (say `/opt/nox`) is covered by an empty tmpfs.
//!
//! Called by the run's init (PID 1 of its namespace), as root, before it
//! drops privileges; the launcher itself stays in the host's namespaces so
//! that it can write its report.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;

/// Read-only for the command: what a shell and interpreters need.
pub const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/opt",
];
/// Devices the command may read and write.
pub const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/dev/full",
];
/// Where the new root is assembled: any directory serves as a mount point
/// in the run's private namespace; the host's `/tmp` is not touched.
const ASSEMBLY: &str = "/tmp";

/// What the run's root holds besides the system.
pub struct RootPlan<'a> {
    /// Bound at its own path, read-write.
    pub workspace: &'a Path,
    /// Covered wherever they would otherwise show (the data directory).
    pub hidden: &'a [PathBuf],
    /// The size of each private tmpfs (`/tmp`, `/dev/shm`); what is written
    /// there is charged to the run's memory cgroup too.
    pub tmpfs_bytes: u64,
}

/// Enters new mount and IPC namespaces and switches to the run's root.
/// `Err(None)`: the kernel or our privileges do not allow the namespaces
/// (the layer is missing); `Err(Some(reason))`: entering them worked but
/// building the root failed, and this process must not run anything.
pub fn enter(plan: &RootPlan) -> Result<(), Option<String>> {
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC).map_err(|_| None)?;
    build(plan).map_err(Some)
}

fn build(plan: &RootPlan) -> Result<(), String> {
    // Nothing mounted from here on propagates back to the host.
    mount_at(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    // Held before the assembly tmpfs covers `/tmp`, where a workspace may lie.
    let workspace = open(
        plan.workspace,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening the workspace: {e}"))?;
    let root = Path::new(ASSEMBLY);
    mount_tmpfs(root, "mode=0755,size=1m")?;

    for dir in SYSTEM_DIRS {
        let source = Path::new(dir);
        let Ok(meta) = fs::symlink_metadata(source) else {
            continue;
        };
        let target = inside(root, source);
        if meta.file_type().is_symlink() {
            // `/bin -> usr/bin` on merged-/usr systems: the same link.
            let link = fs::read_link(source).map_err(|e| format!("{dir}: {e}"))?;
            std::os::unix::fs::symlink(link, &target).map_err(|e| format!("{dir}: {e}"))?;
        } else if meta.is_dir() {
            make_dir(&target, 0o755)?;
            bind_read_only(source, &target)?;
        }
    }

    let dev = root.join("dev");
    make_dir(&dev, 0o755)?;
    for device in DEVICES {
        let target = inside(root, Path::new(device));
        fs::File::create(&target).map_err(|e| format!("{device}: {e}"))?;
        // Bound as it is on the host: the node keeps its device mount's flags.
        mount_at(
            Some(Path::new(device)),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| format!("/dev/{name}: {e}"))?;
    }
    let private = format!("mode=1777,size={}", plan.tmpfs_bytes.max(1024 * 1024));
    for dir in ["tmp", "dev/shm"] {
        let target = root.join(dir);
        make_dir(&target, 0o1777)?;
        mount_tmpfs(&target, &private)?;
    }
    let proc = root.join("proc");
    make_dir(&proc, 0o555)?;
    // A proc of the PID namespace this process is init of: `ps` shows the run.
    mount_at(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;

    // A hidden directory reached through a system directory (the data
    // directory under `/opt`): covered by an empty, read-only tmpfs.
    let mut covers = Vec::new();
    for hidden in plan.hidden {
        let target = inside(root, hidden);
        if target.is_dir() {
            mount_tmpfs(&target, "mode=0755,size=64k")?;
            covers.push(target);
        }
    }
    let workspace_target = inside(root, plan.workspace);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&workspace_target)
        .map_err(|e| format!("the workspace's mount point: {e}"))?;
    bind_workspace(&workspace, &workspace_target)?;
    for cover in covers {
        remount_read_only(&cover, MsFlags::empty())?;
    }
    remount_read_only(root, MsFlags::empty())?;

    // The new root replaces the old, which is then detached (pivot_root(2):
    // "pivot_root(".", ".")" stacks the old root on the new one).
    std::env::set_current_dir(root).map_err(|e| format!("chdir: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// `path` (absolute) re-rooted under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn make_dir(path: &Path, mode: u32) -> Result<(), String> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
        .map_err(|e| format!("mkdir {}: {e}", path.display()))
}

fn mount_at(
    source: Option<&Path>,
    target: impl AsRef<Path>,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let target = target.as_ref();
    mount(source, target, fstype, flags, data)
        .map_err(|e| format!("mount {}: {e}", target.display()))
}

fn mount_tmpfs(target: &Path, options: &str) -> Result<(), String> {
    mount_at(
        Some(Path::new("tmpfs")),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
}

/// Binds `source` with everything mounted below it, all read-only and
/// without set-user-ID or device files.
fn bind_read_only(source: &Path, target: &Path) -> Result<(), String> {
    mount_at(
        Some(source),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    if set_read_only_recursively(target) {
        return Ok(());
    }
    // Kernels before 5.12: the top mount only (the usual case: `/usr` and
    // friends have nothing mounted below them).
    remount_read_only(target, MsFlags::MS_BIND)
}

fn remount_read_only(target: &Path, extra: MsFlags) -> Result<(), String> {
    mount_at(
        None,
        target,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | extra,
        None,
    )
}

/// `mount_setattr(2)` with `AT_RECURSIVE`: read-only, no set-user-ID, no
/// devices, for `target` and every mount below it. False where the kernel
/// lacks the call.
fn set_read_only_recursively(target: &Path) -> bool {
    /// `struct mount_attr` (linux/mount.h).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    let Ok(path) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a plain system call with a NUL-terminated path and a struct
    // laid out as the kernel's, both alive for the call.
    let result = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_mount_setattr,
            nix::libc::AT_FDCWD,
            path.as_ptr(),
            nix::libc::AT_RECURSIVE as nix::libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    result == 0
}

/// Binds the workspace held open as `workspace` at `target`, read-write,
/// without set-user-ID or device files.
fn bind_workspace(workspace: &OwnedFd, target: &Path) -> Result<(), String> {
    // The host's /proc is still this process's: its descriptor names the
    // directory even where `/tmp` now covers its path.
    let source = PathBuf::from(format!("/proc/self/fd/{}", workspace.as_raw_fd()));
    mount_at(Some(&source), target, None, MsFlags::MS_BIND, None)?;
    mount_at(
        None,
        target,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )
}
