//! End to end through real components: `obd demo` starts docker-registry,
//! builds and converts a sample image, runs containerd with obd-snapshotter,
//! pulls (lazily with `obd pull`; with `ctr image pull` in full on 1.x,
//! lazily on 2.x) and runs
//! the container, which writes to its rootfs. Checked in every rw_mode, and
//! the lazy pull must fetch far less than the image holds. Needs root,
//! containerd, runc, docker-registry, FUSE and the obd-snapshotter binary
//! (built by `cargo test --workspace`); otherwise skipped loudly.

use std::process::Command;

mod common;
use common::testbed_ready;

fn demo(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_obd"))
        .args(["demo", "--data", "16M", "--json"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "obd demo {args:?}:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "obd demo {args:?} failed");
    let last = stdout.lines().last().expect("output");
    serde_json::from_str(last).expect("the JSON figures")
}

#[test]
fn demo_runs_lazily_in_every_rw_mode_and_plain_pull_falls_back() {
    if !testbed_ready(
        "obd demo test",
        &["containerd", "ctr", "runc", "docker-registry"],
    ) {
        return;
    }
    let lazy = demo(&[]);
    let (fetched, obd) = (
        lazy["fetched_bytes"].as_u64().unwrap(),
        lazy["obd_bytes"].as_u64().unwrap(),
    );
    assert!(fetched > 0, "nothing fetched? {lazy}");
    assert!(
        fetched * 3 < obd,
        "a lazy pull fetched {fetched} of {obd} bytes: {lazy}"
    );
    for mode in ["dir", "dev"] {
        let v = demo(&["--rw-mode", mode]);
        assert_eq!(v["rw_mode"], mode);
    }
    // Plain `ctr image pull`. containerd 1.x pulls through the client,
    // which sends the snapshotter no image reference: it downloads
    // everything, and the tar-wrapped layers still work. 2.x pulls through
    // the transfer service, which passes the remote-snapshot labels when the
    // snapshotter exports enable_remote_snapshot_annotations (our config):
    // lazy like `obd pull`.
    let plain = demo(&["--plain-pull"]);
    let fetched = plain["fetched_bytes"].as_u64().unwrap();
    let version = fixtures::containerd::installed().unwrap().version;
    if version.major >= 2 {
        assert!(
            fetched * 3 < obd,
            "containerd {version}: ctr image pull should be lazy: {plain}"
        );
    } else {
        assert!(
            fetched * 10 >= obd * 9,
            "containerd {version}: a plain pull should download the image: {plain}"
        );
    }
}
