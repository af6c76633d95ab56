//! The snapshotter's root on a file system that fills up (issue 14, point
//! 5): a real containerd (Debian's 1.6) drives the real `obd-snapshotter`
//! through `ctr snapshots`, with the snapshotter's `--root` on a 48 MiB
//! loop-mounted ext4 ([`fixtures::smallfs`]). While the disk is full, each
//! Prepare, Commit, label Update and Remove that needs space fails on its
//! own with an error naming the path and "no space left on device"; once
//! the space is freed, the next ones succeed on the same snapshotter
//! process, and what was committed before is all there. Needs root, loop
//! devices, containerd and ctr; otherwise skipped with a loud message.

use std::path::Path;
use std::process::{Command, Output};

use fixtures::containerd::{self, ctr};
use fixtures::procs::{run, Needs};
use fixtures::smallfs::SmallFs;

mod common;
use common::Procs;

/// `ctr snapshots --snapshotter obd <args>`.
fn snaps(sock: &Path, args: &[&str]) -> Command {
    let mut c = ctr(sock);
    c.args(["snapshots", "--snapshotter", "obd"]).args(args);
    c
}

fn output(mut c: Command) -> Output {
    c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

/// Runs `c`, which must fail because the disk is full: returns its stderr,
/// checked to name `path` (a prefix) and ENOSPC.
fn fails_full(c: Command, path: &Path) -> String {
    let out = output(c);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "should fail on a full disk");
    assert!(
        err.to_lowercase().contains("no space left on device"),
        "not an ENOSPC error: {err}"
    );
    assert!(
        err.contains(&path.display().to_string()),
        "the error does not name {}: {err}",
        path.display()
    );
    assert!(!err.contains("Previous I/O error"), "{err}");
    err
}

/// The snapshot names `ctr snapshots ls` lists, sorted.
fn names(sock: &Path) -> Vec<String> {
    let out = run(&mut snaps(sock, &["ls"]));
    let mut v: Vec<String> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    v.sort();
    v
}

#[test]
fn full_root_fails_one_operation_and_recovers_without_restart() {
    const TEST: &str = "snapshotter full-disk test";
    if !Needs::root(&["containerd", "ctr"]).met(TEST) {
        return;
    }
    let tmp = fixtures::procs::short_tempdir("obd-full-");
    let dir = tmp.path().to_path_buf();
    let root = dir.join("snroot");
    let Some(fs) = SmallFs::at(TEST, 48, &root) else {
        return;
    };
    let mut procs = Procs::new(&dir);
    let bin = Path::new(env!("CARGO_BIN_EXE_obd-snapshotter"));
    let sn_sock = containerd::start_snapshotter(&mut procs.procs, bin, &dir);
    let sock = containerd::start_with(&mut procs.procs, &dir, &sn_sock);
    let ok = |args: &[&str]| run(&mut snaps(&sock, args));

    // Before: a committed layer, a container over it, one to remove later.
    ok(&["prepare", "a0"]);
    ok(&["commit", "c0", "a0"]);
    ok(&["prepare", "a1", "c0"]);
    ok(&["prepare", "v0", "c0"]);
    let before = names(&sock);
    assert_eq!(before, ["a1", "c0", "v0"]);

    let filled = fs.fill();
    assert_eq!(fs.available(), 0);
    eprintln!("filled {} with {filled} bytes", root.display());

    // Prepare: its directory cannot be made.
    let err = fails_full(
        snaps(&sock, &["prepare", "a2", "c0"]),
        &root.join("snapshots"),
    );
    eprintln!("Prepare on a full disk: {}", err.trim());
    // Updates that grow the metadata: the store itself runs out of space.
    // A few may fit in pages the store had free; none after that.
    let db = root.join("metadata.db");
    let big = "x".repeat(3000);
    let mut fitted = 0u32;
    let err = loop {
        let label = format!("containerd.io/snapshot/fill-{fitted}={big}");
        let out = output(snaps(&sock, &["label", "c0", &label]));
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        fitted += 1;
        assert!(fitted < 64, "the metadata store never ran out of space");
    };
    eprintln!("{fitted} label updates fitted; then: {}", err.trim());
    assert!(
        err.contains(&db.display().to_string()) && err.contains("No space left on device"),
        "{err}"
    );
    // Every later operation that needs space fails the same clear way,
    // not with redb's "Previous I/O error" (checked in fails_full).
    let label = format!("containerd.io/snapshot/again={big}");
    fails_full(snaps(&sock, &["label", "c0", &label]), &db);
    let err = fails_full(snaps(&sock, &["commit", "c1", "a1"]), &root);
    eprintln!("Commit on a full disk: {}", err.trim());
    // Reads still work.
    assert_eq!(names(&sock), before);

    fs.free();
    // The same snapshotter process serves again.
    ok(&["prepare", "a2", "c0"]);
    ok(&["commit", "c1", "a1"]);
    ok(&["label", "c0", &label]);
    ok(&["rm", "v0"]);
    ok(&["rm", "a2"]);
    ok(&["prepare", "a3", "c1"]);
    assert_eq!(names(&sock), ["a3", "c0", "c1"]);
    let info = ok(&["info", "c0"]);
    assert!(info.contains("containerd.io/snapshot/again"), "{info}");
    let fill0 = format!("containerd.io/snapshot/fill-{}", fitted.saturating_sub(1));
    assert!(
        fitted == 0 || info.contains(&fill0),
        "an acknowledged label is lost: {info}"
    );
    let log = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap();
    assert!(!log.contains("Previous I/O error"), "{log}");
    assert!(log.contains("metadata store reopened"), "{log}");
    drop(procs);
    drop(fs);
}
