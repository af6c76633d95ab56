//! `ctr image rm` releases what an obd image held, on whichever containerd
//! runs (`scripts/containerd-matrix.sh env 1.7|2.1`; the system's 1.6
//! otherwise): an obd image pulled lazily (`obd pull`), run twice (the
//! second container on the first one's device, kept by `device_idle_secs`,
//! whose mount learns the image's page-cache warm list), then
//! removed; afterwards no device, device worker, mount or snapshot directory
//! of the snapshotter is left. containerd 2.1.9 kept them all until the
//! snapshotter answered its garbage collector, which calls without a
//! namespace. Needs root, containerd, runc, docker-registry, FUSE and the
//! obd-snapshotter binary next to obd; otherwise skipped loudly.

#[allow(dead_code)]
#[path = "../src/testbed.rs"]
mod testbed;

use std::time::Duration;

use tcmu_target::mountinfo::mount_points_below;
use testbed::{build_sample, run_ok, wait_until, Options, Testbed};

mod common;
use common::{device_dirs, testbed_bins, workers};

#[test]
fn image_rm_releases_devices_mounts_and_workers() {
    let tools = ["containerd", "ctr", "runc", "docker-registry"];
    let Some((obd, sn)) = testbed_bins("image rm test", &tools) else {
        return;
    };
    let mut opts = Options::new(obd, sn);
    opts.prefix = "obd-imgrm-".into();
    // The default linger, stated: removing the image must release the
    // device all the same.
    opts.extra_toml = "device_idle_secs = 600\n".into();
    let mut tb = Testbed::new(opts).unwrap();
    let root = tb.snroot.clone();
    tb.start_registry().unwrap();
    let layout = tb.dir.join("oci");
    build_sample(&layout, 2, 4 << 20).unwrap();
    let image = format!("{}/obd-test/imgrm:obd", tb.reg);
    tb.convert_push(&layout, "demo", &image).unwrap();
    tb.start_runtime().unwrap();
    eprintln!(
        "containerd {}",
        fixtures::containerd::installed().unwrap().version
    );
    run_ok(&mut tb.obd_pull("default", &image)).unwrap();
    let expected = format!("{}\n{}", testbed::EXPECTED, testbed::WRITTEN);
    let mut served_by = Vec::new();
    for n in ["imgrm-1", "imgrm-2"] {
        let id = tb.cid(n);
        let out = run_ok(
            tb.ctr()
                .args(["run", "--rm", "--snapshotter", "obd", &image, &id]),
        )
        .unwrap();
        assert_eq!(out.trim(), expected, "container {id}");
        served_by.push(workers(&root));
    }
    // The image's device outlives its containers (`device_idle_secs`, 600 s
    // by default): the second container ran on the device of the first,
    // its worker the same process.
    assert!(
        !device_dirs(&root).is_empty(),
        "the image's device is attached"
    );
    assert_eq!(served_by[0].len(), 1, "{served_by:?}");
    assert_eq!(served_by[0], served_by[1], "the device was attached again");
    // The second container's mount learned the image's warm list from the
    // files the first opened (a plain obd image has none of its own).
    let learned = wait_until("a learned warm list", Duration::from_secs(30), || {
        std::fs::read_to_string(tb.dir.join("snapshotter.log"))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.contains("page-cache warm list learned from the image's first container")
                    && !l.contains(" files=0 ")
            })
    });
    assert!(
        learned.is_ok(),
        "{}",
        std::fs::read_to_string(tb.dir.join("snapshotter.log")).unwrap_or_default()
    );

    run_ok(tb.ctr().args(["image", "rm", "--sync", &image])).unwrap();
    // containerd's garbage collection removes the snapshots after answering
    // (asynchronously in 1.x); then the snapshotter releases the device.
    let left = || {
        let snaps = std::fs::read_dir(root.join("snapshots"))
            .map(|d| d.count())
            .unwrap_or(0);
        (
            device_dirs(&root),
            workers(&root),
            mount_points_below(&root),
            snaps,
        )
    };
    let released = wait_until(
        "the image's resources to go",
        Duration::from_secs(30),
        || {
            let (d, w, m, s) = left();
            d.is_empty() && w.is_empty() && m.is_empty() && s == 0
        },
    );
    let (d, w, m, s) = left();
    assert!(
        released.is_ok(),
        "after ctr image rm: devices {d:?}, workers {w:?}, mounts {m:?}, {s} snapshot directories"
    );
}
