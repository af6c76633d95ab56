//! Which snapshot labels each `ctr image pull` path passes to the snapshotter,
//! and whether it pulls an obd image lazily, on whichever containerd runs
//! (`scripts/containerd-matrix.sh env 1.7|2.1`; the system's 1.6 otherwise).
//! The labels are logged (`prepare labels`, debug) and printed here.
//! - 2.x `ctr image pull` goes through the transfer service: with our config
//!   (`exports.enable_remote_snapshot_annotations = "true"`) it passes the
//!   image reference and layer digests (`containerd.io/snapshot/cri.*`), so
//!   the layers are committed remotely (lazy).
//! - 2.x `ctr image pull --local` and 1.x `ctr image pull` go through the
//!   client, which passes no image reference: the layers are downloaded, and
//!   running the image logs and counts the fallback.
//!
//! Needs root, containerd, runc, docker-registry, FUSE and the
//! obd-snapshotter binary next to obd; otherwise skipped loudly.

#[allow(dead_code)]
#[path = "../src/testbed.rs"]
mod testbed;

use testbed::{build_sample, run_ok, Options, Testbed};

mod common;
use common::testbed_bins;

/// The label keys of every `prepare labels` line in `log` (one list per
/// Prepare/View).
fn prepare_labels(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("prepare labels"))
        .map(|l| l.split_once("labels=").map_or("", |(_, v)| v).to_string())
        .collect()
}

#[test]
fn ctr_pull_paths_labels_and_laziness() {
    let tools = ["containerd", "ctr", "runc", "docker-registry"];
    let Some((obd, sn)) = testbed_bins("pull paths test", &tools) else {
        return;
    };
    let mut opts = Options::new(obd, sn);
    opts.prefix = "obd-paths-".into();
    opts.extra_toml = "log_level = \"debug\"\n".into();
    let mut tb = Testbed::new(opts).unwrap();
    tb.start_registry().unwrap();
    let layout = tb.dir.join("oci");
    build_sample(&layout, 2, 4 << 20).unwrap();
    let image = format!("{}/obd-test/paths:obd", tb.reg);
    tb.convert_push(&layout, "demo", &image).unwrap();
    tb.start_runtime().unwrap();
    let version = fixtures::containerd::installed().unwrap().version;
    let v2 = version.major >= 2;
    let log_path = tb.dir.join("snapshotter.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // (namespace, extra ctr pull flags, lazy?)
    let mut paths = vec![("client", vec!["--local"], false)];
    if v2 {
        paths.push(("transfer", vec![], true));
    } else {
        // 1.x: the client is the only path, and --local does not exist.
        paths[0].1.clear();
    }
    let expected = format!("{}\n{}", testbed::EXPECTED, testbed::WRITTEN);
    for (ns, flags, lazy) in paths {
        let before = log().len();
        run_ok(
            tb.ctr()
                .args([
                    "-n",
                    ns,
                    "image",
                    "pull",
                    "--plain-http",
                    "--snapshotter",
                    "obd",
                ])
                .args(&flags)
                .arg(&image),
        )
        .unwrap();
        let id = tb.cid(&format!("paths-{ns}"));
        let out =
            run_ok(
                tb.ctr()
                    .args(["-n", ns, "run", "--rm", "--snapshotter", "obd", &image, &id]),
            )
            .unwrap();
        assert_eq!(out.trim(), expected, "{ns}: container output");
        let text = log();
        let new = &text[before..];
        let labels = prepare_labels(new);
        eprintln!("containerd {version}, ctr image pull {flags:?} (ns {ns}):");
        for l in &labels {
            eprintln!("  Prepare labels: {l}");
        }
        let remote = new
            .matches("remote snapshot committed without download")
            .count();
        let fallback = new.matches("obd layer was downloaded in full").count();
        eprintln!("  remote commits: {remote}, fallbacks: {fallback}");
        let with_ref = labels
            .iter()
            .filter(|l| l.contains("containerd.io/snapshot/cri.image-ref"))
            .count();
        if lazy {
            assert_eq!(remote, 2, "{ns}: both layers remote:\n{new}");
            assert_eq!(fallback, 0, "{ns}");
            assert_eq!(with_ref, 2, "{ns}: image ref on each layer's Prepare");
            assert!(labels.iter().all(
                |l| !l.contains("containerd.io/snapshot.ref") || l.contains("cri.layer-digest")
            ));
        } else {
            assert_eq!(remote, 0, "{ns}: nothing remote:\n{new}");
            assert_eq!(with_ref, 0, "{ns}: no image ref");
            assert!(fallback >= 1, "{ns}: the fallback is logged:\n{new}");
        }
    }
}
