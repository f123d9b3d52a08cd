//! The workspace's tests: confinement, walks of any depth, uploads.

use std::ffi::CStr;
use std::os::unix::fs::MetadataExt;

use nix::unistd::{Gid, Uid};

use super::walk::{DirStack, child_names, open_child_dir};
use super::*;

/// Depth of the chains below: far deeper than a recursion with a
/// descriptor per level could go with a default stack or descriptor
/// limit, and deeper than [`MAX_WALK_DEPTH`].
const DEEP: usize = 10_000;

/// A temporary workspace whose tree is removed by [`remove_tree`]
/// before the directory is: `std::fs::remove_dir_all` recurses.
struct Scratch {
    dir: tempfile::TempDir,
    workspace: Workspace,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let workspace = Workspace::open(&dir.path().join("ws")).expect("workspace");
        Scratch { dir, workspace }
    }

    fn root(&self) -> OwnedFd {
        self.workspace.open_dir(&SandboxPath::root()).expect("root")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let root = self.root();
        let (names, _) = child_names(root.try_clone().expect("dup"), u64::MAX).expect("names");
        for name in names {
            let _ = remove_tree(&root, &name);
        }
    }
}

/// The directory `levels` levels down a chain of `d`s.
fn descend(root: &OwnedFd, levels: usize) -> OwnedFd {
    let mut dir = root.try_clone().expect("dup");
    for _ in 0..levels {
        dir = open_child_dir(&dir, c"d").expect("a level of the chain");
    }
    dir
}

fn write_at(dir: &OwnedFd, name: &CStr, bytes: &[u8]) {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .expect("create");
    std::io::Write::write_all(&mut File::from(fd), bytes).expect("write");
}

/// A chain `d/d/…` `depth` deep under `root`, made level by level with
/// `mkdirat` and `openat` (its paths are far beyond `PATH_MAX`). Inside
/// the directory at each level in `files_in` (1 is `d`), a file `f` of
/// as many bytes as its level.
fn chain(root: &OwnedFd, depth: usize, files_in: &[usize]) {
    let mut dir = root.try_clone().expect("dup");
    for level in 1..=depth {
        mkdirat(&dir, c"d", Mode::from_bits_truncate(0o755)).expect("mkdirat");
        dir = open_child_dir(&dir, c"d").expect("openat");
        if files_in.contains(&level) {
            write_at(&dir, c"f", &vec![b'x'; level]);
        }
    }
}

fn owner(dir: &OwnedFd, name: &CStr) -> (u32, u32) {
    let stat = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).expect("stat");
    (stat.st_uid, stat.st_gid)
}

#[test]
fn usage_counts_a_tree_to_the_depth_limit_and_fails_closed_below() {
    // Directories down to level 4095 are entered: files at levels 2,
    // 101 and 4096 (in the 4095th directory) are counted.
    let within = Scratch::new();
    let root = within.root();
    let limit = MAX_WALK_DEPTH;
    chain(&root, limit - 1, &[1, 100, limit - 1]);
    write_at(&root, c"top", b"1234");
    let walked = usage_of(root.try_clone().expect("dup"), u64::MAX).expect("usage");
    let counted = [1, 100, limit - 1].iter().sum::<usize>() as u64 + 4;
    assert_eq!((walked.counts, walked.truncated), ((counted, 4), false));
    assert!(
        walked.peak_open <= MAX_OPEN_DIRS,
        "{} descriptors",
        walked.peak_open
    );
    let usage = within.workspace.usage().expect("usage");
    assert_eq!(
        (usage.bytes, usage.files, usage.incomplete),
        (counted, 4, false)
    );

    // One level more, and what is below is not walked: the whole usage
    // is incomplete, whatever the counts so far.
    let deeper = Scratch::new();
    chain(&deeper.root(), DEEP, &[1, limit, DEEP]);
    let walked = usage_of(deeper.root(), u64::MAX).expect("usage");
    assert!(walked.truncated);
    assert!(
        walked.peak_open <= MAX_OPEN_DIRS,
        "{} descriptors",
        walked.peak_open
    );
    assert!(deeper.workspace.usage().expect("usage").incomplete);

    // A shallow tree is walked whole, without reopening anything.
    let shallow = Scratch::new();
    chain(&shallow.root(), 5, &[5]);
    let walked = usage_of(shallow.root(), u64::MAX).expect("usage");
    assert_eq!((walked.counts, walked.truncated), ((5, 1), false));
}

#[test]
fn usage_stops_at_its_entry_budget() {
    let scratch = Scratch::new();
    let root = scratch.root();
    // Ten entries: the directory `d` (the chain), `d/f` and eight files.
    chain(&root, 1, &[1]);
    for name in [c"1", c"2", c"3", c"4", c"5", c"6", c"7", c"8"] {
        write_at(&root, name, b"x");
    }
    let whole = usage_of(scratch.root(), 10).expect("usage");
    assert_eq!((whole.counts, whole.truncated), ((9, 9), false));
    let cut = usage_of(scratch.root(), 9).expect("usage");
    assert!(cut.truncated, "{cut:?}");
}

#[test]
fn a_huge_directory_is_read_no_further_than_the_budget() {
    let scratch = Scratch::new();
    let root = scratch.root();
    for index in 0..50 {
        write_at(
            &root,
            &CString::new(format!("f{index}")).expect("name"),
            b"x",
        );
    }
    let stack = DirStack::new(scratch.root(), CString::default(), 10).expect("stack");
    assert!(stack.exhausted);
    assert_eq!(stack.frames[0].pending.len(), 10, "names held");
    let cut = usage_of(scratch.root(), 10).expect("usage");
    assert!(cut.truncated, "{cut:?}");
    let whole = usage_of(scratch.root(), 50).expect("usage");
    assert_eq!((whole.counts, whole.truncated), ((50, 50), false));
}

#[test]
fn space_kept_beyond_a_files_size_counts() {
    let scratch = Scratch::new();
    let root = scratch.root();
    write_at(&root, c"small", b"12345");
    write_at(&root, c"kept", b"");
    let kept = nix::fcntl::openat(&root, c"kept", OFlag::O_WRONLY, Mode::empty()).expect("open");
    // `fallocate --keep-size`: blocks held, size still 0.
    let held = nix::fcntl::fallocate(
        &kept,
        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        8 * 1024 * 1024,
    );
    if held.is_err() {
        eprintln!("skipped: this filesystem cannot keep space beyond a file's size");
        return;
    }
    let walked = usage_of(scratch.root(), u64::MAX).expect("usage");
    let (bytes, files) = walked.counts;
    assert_eq!(files, 2);
    assert!(
        (8 * 1024 * 1024 + 5..=8 * 1024 * 1024 + 4096 + 5).contains(&bytes),
        "{bytes}: the 8 MiB held count, the small file at its size"
    );
}

#[test]
fn hand_over_walks_a_deep_tree_to_the_depth_limit_never_following_links() {
    if !Uid::effective().is_root() {
        eprintln!("skipped: changing owners needs root");
        return;
    }
    let scratch = Scratch::new();
    let root = scratch.root();
    chain(&root, DEEP, &[limit_minus_one(), MAX_WALK_DEPTH]);
    // A link deep inside, to a file outside the workspace.
    let outside = scratch.dir.path().join("outside");
    std::fs::write(&outside, b"not yours").expect("outside");
    let before = std::fs::metadata(&outside).expect("meta");
    let deep = descend(&root, 3000);
    nix::unistd::symlinkat(&outside, &deep, c"link").expect("symlinkat");
    drop(deep);

    let (uid, gid) = (Uid::from_raw(65534), Gid::from_raw(65534));
    let walked = chown_tree(root.try_clone().expect("dup"), uid, gid).expect("hand over");
    assert!(walked.truncated);
    assert!(
        walked.peak_open <= MAX_OPEN_DIRS,
        "{} descriptors",
        walked.peak_open
    );
    scratch
        .workspace
        .hand_over(65534, 65534)
        .expect("hand over");

    let given = (65534, 65534);
    assert_eq!(owner(&descend(&root, 3000), c"link"), given);
    let after = std::fs::metadata(&outside).expect("meta");
    assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    // Entries down to the limit are handed over, deeper ones are not.
    let last = descend(&root, MAX_WALK_DEPTH - 1);
    assert_eq!(owner(&last, c"f"), given);
    assert_eq!(owner(&last, c"d"), given);
    let below = descend(&last, 1);
    assert_eq!(owner(&below, c"f"), (0, 0));
    assert_eq!(owner(&below, c"d"), (0, 0));
}

fn limit_minus_one() -> usize {
    MAX_WALK_DEPTH - 1
}

#[test]
fn delete_removes_a_tree_of_any_depth_with_few_descriptors() {
    let scratch = Scratch::new();
    let root = scratch.root();
    let with_files = [1, 29, 30, 31, 500, 5_000, DEEP];
    chain(&root, DEEP, &with_files);
    // Besides the chain: a side branch, a link out, a FIFO, deep down.
    let outside = scratch.dir.path().join("outside");
    std::fs::write(&outside, b"kept").expect("outside");
    let deep = descend(&root, 7_000);
    mkdirat(&deep, c"side", Mode::from_bits_truncate(0o755)).expect("side");
    write_at(&open_child_dir(&deep, c"side").expect("side"), c"g", b"12");
    nix::unistd::symlinkat(&outside, &deep, c"link").expect("symlinkat");
    nix::unistd::mkfifoat(&deep, c"fifo", Mode::from_bits_truncate(0o644)).expect("mkfifo");
    drop(deep);
    write_at(&root, c"kept", b"kept");

    let walked = remove_tree(&root, c"d").expect("delete");
    let bytes = with_files.iter().sum::<usize>() as u64 + 2;
    assert_eq!(walked.counts, (with_files.len() as u64 + 1, bytes));
    assert!(
        walked.peak_open <= MAX_OPEN_DIRS,
        "{} descriptors",
        walked.peak_open
    );
    assert_eq!(
        child_names(root.try_clone().expect("dup"), u64::MAX).expect("names"),
        (vec![CString::from(c"kept")], false),
        "the chain is gone, and nothing it was moved through is left"
    );
    assert_eq!(std::fs::read(&outside).expect("outside"), b"kept");

    // Through the public call, as `/delete` makes it.
    chain(&root, DEEP, &[DEEP]);
    let deleted = scratch
        .workspace
        .delete(&SandboxPath::parse("d").expect("path"))
        .expect("delete");
    assert_eq!(deleted, (1, DEEP as u64));
    assert!(fstatat(&root, c"d", AtFlags::AT_SYMLINK_NOFOLLOW).is_err());
}

#[test]
fn a_walk_stops_when_a_closed_parent_was_moved_away() {
    let scratch = Scratch::new();
    let root = scratch.root();
    let depth = MAX_OPEN_DIRS + 8;
    chain(&root, depth, &[]);
    let mut stack =
        DirStack::new(root.try_clone().expect("dup"), CString::default(), u64::MAX).expect("stack");
    while stack.depth() <= depth {
        let sub = open_child_dir(stack.top(), c"d").expect("down");
        stack.push(CString::from(c"d"), sub).expect("push");
    }
    assert!(stack.peak_open <= MAX_OPEN_DIRS);
    assert!(stack.frames[5].fd.is_none(), "shallow levels are closed");
    // Level 5 (closed) goes elsewhere: its `..` is no longer level 4.
    let level4 = descend(&root, 4);
    renameat(&level4, c"d", &root, c"moved").expect("move");
    let error = loop {
        match stack.leave() {
            Ok(_) => assert!(stack.depth() > 5, "left level 5 into the wrong parent"),
            Err(error) => break error,
        }
    };
    assert!(
        matches!(&error, SandboxError::InvalidPath(detail) if detail.contains("moved")),
        "{error}"
    );
}

#[test]
fn only_regular_files_are_opened_for_reading() {
    let scratch = Scratch::new();
    let root = scratch.root();
    write_at(&root, c"file", b"abc");
    mkdirat(&root, c"dir", Mode::from_bits_truncate(0o755)).expect("dir");
    nix::unistd::mkfifoat(&root, c"fifo", Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let _socket =
        std::os::unix::net::UnixListener::bind(scratch.workspace.root_path().join("socket"))
            .expect("socket");
    let open = |path: &str| {
        scratch
            .workspace
            .open_file(&SandboxPath::parse(path).expect("path"))
    };
    let (mut file, size) = open("file").expect("a regular file");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).expect("read");
    assert_eq!((text.as_str(), size), ("abc", 3));
    let flags = fcntl(&file, FcntlArg::F_GETFL).expect("flags");
    assert!(!OFlag::from_bits_retain(flags).contains(OFlag::O_NONBLOCK));
    for path in ["dir", "fifo", "socket", "/"] {
        assert!(
            matches!(open(path), Err(SandboxError::NotARegularFile(_))),
            "{path}"
        );
    }
}

/// A command still running in the workspace keeps creating files in a
/// directory being deleted: the delete answers with a clear refusal (or
/// succeeds), never a raw file-system error (a 500).
#[test]
fn a_directory_that_keeps_filling_is_not_a_file_system_error() {
    let scratch = Scratch::new();
    let dir = scratch.dir.path().join("ws/busy");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (dir.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0_u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::create_dir(&dir);
                let _ = std::fs::write(dir.join(n.to_string()), b"x");
                n += 1;
            }
        })
    };
    let path = SandboxPath::parse("busy").expect("path");
    let mut refused = 0;
    for _ in 0..300 {
        match scratch.workspace.delete(&path) {
            Ok(_) | Err(SandboxError::NotFound) => {}
            Err(SandboxError::InvalidPath(_)) => refused += 1,
            Err(other) => panic!("a raw error reached the caller: {other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
    println!("{refused} of 300 deletes refused while the directory kept filling");
}
