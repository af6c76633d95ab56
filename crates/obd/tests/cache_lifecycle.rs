//! The host-wide block cache through real containerd, runc and registry
//! (the testbed of `obd demo`), in rw mode `dir`:
//! (a) a second container of a started image fetches nothing from the
//! registry: its blocks are in the one cache of the host, whichever device
//! worker fetched them;
//! (b) after the image is removed and containerd's garbage collection ran,
//! the snapshotter root holds no device, no per-device cache directory and
//! at most 10 MiB besides what the cache's retention (`gc_grace`) keeps;
//! once `obd cache gc --grace 0` ran, the whole root is under 10 MiB.
//! Needs root, containerd, runc, docker-registry, FUSE and the
//! obd-snapshotter binary next to obd; otherwise skipped loudly.

#[allow(dead_code)]
#[path = "../src/testbed.rs"]
mod testbed;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use testbed::{blob_traffic, build_sample, run_ok, wait_until, Options, Testbed};

mod common;
use common::{subdirs, testbed_bins};

/// Bytes the files under `dir` occupy on disk (sparse files count what
/// they hold, as `du` does).
fn disk_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            }
            n += m.blocks() * 512;
        }
    }
    n
}

/// Registry blob bytes and requests logged since `from` (a byte offset of
/// the access log); returns them and the log's new length.
fn fetched_since(tb: &Testbed, from: usize) -> (u64, u64, usize) {
    let text = std::fs::read_to_string(&tb.access_log).unwrap_or_default();
    let tail = tb.dir.join("access.tail.log");
    std::fs::write(&tail, &text.as_bytes()[from.min(text.len())..]).unwrap();
    let (bytes, reqs) = blob_traffic(&tail);
    (bytes, reqs, text.len())
}

#[test]
fn second_container_fetches_nothing_and_removal_leaves_a_small_root() {
    let tools = ["containerd", "ctr", "runc", "docker-registry"];
    let Some((obd, sn)) = testbed_bins("cache lifecycle test", &tools) else {
        return;
    };
    let mut opts = Options::new(obd, sn);
    opts.prefix = "obd-cachelife-".into();
    opts.rw_mode = "dir".into();
    let mut tb = Testbed::new(opts).unwrap();
    let root = tb.snroot.clone();
    eprintln!("work dir {}", tb.dir.display());
    tb.start_registry().unwrap();
    let layout = tb.dir.join("oci");
    build_sample(&layout, 3, 24 << 20).unwrap();
    let image = format!("{}/cachelife/app:obd", tb.reg);
    tb.convert_push(&layout, "demo", &image).unwrap();
    tb.start_runtime().unwrap();
    let (_, _, mark) = fetched_since(&tb, 0);

    // (a) Two containers in turn, each with a device worker of its own.
    run_ok(&mut tb.obd_pull("default", &image)).expect("obd pull");
    tb.run_sample(&image, "c1");
    let (b1, r1, mark) = fetched_since(&tb, mark);
    eprintln!("(a) pull + first container: {b1} blob bytes in {r1} requests");
    assert!(b1 > 0, "the first container fetched nothing?");
    assert!(
        b1 < 12 << 20,
        "the first container fetched {b1} bytes of a 24 MiB image: not lazy"
    );
    tb.run_sample(&image, "c2");
    let (b2, r2, _) = fetched_since(&tb, mark);
    eprintln!("(a) second container: {b2} blob bytes in {r2} requests");
    assert_eq!(
        (b2, r2),
        (0, 0),
        "a second container of the image fetched from the registry"
    );
    let cached = disk_bytes(&root.join("cache"));
    assert!(cached > 0, "nothing in the host cache");

    // (b) Remove the image; `--sync` waits for containerd's garbage
    // collection, which removes the snapshots, and the last Remove
    // releases the device.
    run_ok(tb.ctr().args(["image", "rm", "--sync", &image])).expect("ctr image rm");
    wait_until(
        "the devices to be released",
        Duration::from_secs(30),
        || subdirs(&root.join("devices")).is_empty(),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", subdirs(&root.join("devices"))));
    wait_until(
        "the snapshots to be removed",
        Duration::from_secs(30),
        || subdirs(&root.join("snapshots")).is_empty(),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", subdirs(&root.join("snapshots"))));
    // The per-blob files of the cache sit directly in cache/; the only
    // directory there is the piece-table store.
    let per_device: Vec<String> = subdirs(&root.join("cache"))
        .into_iter()
        .filter(|d| d != "tables")
        .collect();
    assert_eq!(per_device, Vec::<String>::new(), "per-device cache dirs");
    let total = disk_bytes(&root);
    let kept = disk_bytes(&root.join("cache"));
    eprintln!(
        "(b) after image rm + GC: root {total} bytes, of which the cache keeps {kept} (gc_grace)"
    );
    assert!(
        total - kept <= 10 << 20,
        "the root holds {} bytes besides the cache",
        total - kept
    );

    // The retention: an explicit collection with no grace frees the blobs
    // no snapshot references.
    let out = run_ok(
        tb.obd()
            .args(["cache", "gc", "--grace", "0", "--root"])
            .arg(&root),
    )
    .expect("obd cache gc");
    eprintln!("obd cache gc --grace 0: {}", out.trim());
    let total = disk_bytes(&root);
    eprintln!("(b) after obd cache gc --grace 0: root {total} bytes");
    assert!(total <= 10 << 20, "the root holds {total} bytes");
    assert!(
        disk_bytes(&root.join("cache")) < kept.max(1),
        "gc freed nothing"
    );
}
