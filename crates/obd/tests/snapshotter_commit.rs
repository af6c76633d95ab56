//! A writable (rw_mode dir) snapshot on an obd image, committed through
//! containerd: its private device is sealed into `fs/overlaybd.sealed`, and
//! a view of the committed snapshot shows what was written plus the image.
//! Uses `obd demo --keep` for the registry, containerd and obd-snapshotter.
//! Needs root and the demo's tools; otherwise skipped loudly.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use fixtures::procs::run;

mod common;
use common::testbed_ready;

/// Stops what `obd demo --keep` left running under `dir` and removes it.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let d = self.0.display().to_string();
        let _ = Command::new("pkill")
            .args(["-f", &format!("{d}/")])
            .status();
        // Wait (bounded) for them to go before unmounting.
        for _ in 0..500 {
            let alive = Command::new("pgrep")
                .args(["-f", &format!("{d}/")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !alive {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Devices outlive the snapshotter by design: detach them.
        let root = obd_device::state::Root::new(self.0.join("w/snapshotter"));
        for id in root.ids().unwrap_or_default() {
            let _ = obd_device::service::cleanup_device(&root, &id);
        }
        obd_device::mount::unmount_below(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dir_mode_snapshot_commits_into_a_sealed_layer() {
    let tools = [
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "pkill",
        "pgrep",
    ];
    if !testbed_ready("snapshotter commit test", &tools) {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("obd-commit-")
        .tempdir_in("/tmp")
        .unwrap()
        .keep();
    let _cleanup = Cleanup(tmp.clone());
    let dir = tmp.join("w");
    run(Command::new(env!("CARGO_BIN_EXE_obd"))
        .args([
            "demo",
            "--data",
            "1M",
            "--keep",
            "--rw-mode",
            "dir",
            "--workdir",
        ])
        .arg(&dir)
        .stdout(Stdio::null()));
    let sock = dir.join("containerd.sock");
    let ctr = || {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&sock)
            .args(["snapshots", "--snapshotter", "obd"]);
        c
    };
    // The image's top layer: the committed snapshot nothing else names as parent.
    let ls = run(ctr().arg("ls"));
    let rows: Vec<Vec<&str>> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let top = rows
        .iter()
        .find(|r| r.len() >= 2 && !rows.iter().any(|o| o.len() == 3 && o[1] == r[0]))
        .map(|r| r[0].to_string())
        .expect("a top layer");
    run(ctr().args(["prepare", "k1", &top]));
    let m1 = tmp.join("m1");
    std::fs::create_dir_all(&m1).unwrap();
    let mounts = run(ctr().arg("mounts").arg(&m1).arg("k1"));
    assert!(
        mounts.contains("-t bind") && mounts.contains("block/mountpoint"),
        "{mounts}"
    );
    let src = mounts.split_whitespace().nth(3).unwrap().to_string();
    run(Command::new("mount").args(["--bind", &src]).arg(&m1));
    std::fs::write(m1.join("root/written"), b"kept across commit\n").unwrap();
    run(Command::new("umount").arg(&m1));
    run(ctr().args(["commit", "c1", "k1"]));
    let snaps = dir.join("snapshotter/snapshots");
    let sealed: Vec<_> = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs/overlaybd.sealed"))
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(
        sealed.len(),
        1,
        "one sealed layer under {}",
        snaps.display()
    );
    run(ctr().args(["view", "v1", "c1"]));
    let m2 = tmp.join("m2");
    std::fs::create_dir_all(&m2).unwrap();
    let mounts = run(ctr().arg("mounts").arg(&m2).arg("v1"));
    assert!(mounts.contains("ro"), "{mounts}");
    let src = mounts.split_whitespace().nth(3).unwrap().to_string();
    run(Command::new("mount")
        .args(["--bind", "-o", "ro", &src])
        .arg(&m2));
    let got = std::fs::read_to_string(m2.join("root/written"));
    let msg = std::fs::read_to_string(m2.join("app/message"));
    run(Command::new("umount").arg(&m2));
    assert_eq!(got.unwrap(), "kept across commit\n");
    assert!(msg.unwrap().starts_with("hello from"));
}
