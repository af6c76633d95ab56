//! `obd trace record` end to end, with a real registry, containerd, runc and
//! obd-snapshotter (the testbed of `obd demo`): the demo image is recorded
//! into a new image whose top layer is the acceleration layer (annotated,
//! its diffID in the config, a one-file tar holding a valid trace of the
//! container's reads). With `--no-pack` that is all, as upstream's; by
//! default the working set is packed into a layer under it, and the trace
//! replays exactly that layer. `obd pull` + `ctr run` of the new image
//! prints what the app prints, and the image's device replays the trace at
//! attach (its worker log says so, without errors). Needs root, containerd, runc,
//! docker-registry, FUSE and the obd-snapshotter binary next to obd;
//! otherwise skipped loudly.

#[allow(dead_code)]
#[path = "../src/testbed.rs"]
mod testbed;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use obd_device::open::trace_replay::warm::{WarmList, WARM_FILE};
use obd_device::open::trace_replay::Trace;
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::registry::RegistryOptions;
use testbed::{build_sample, run_ok, Options, Testbed};

mod common;
use common::testbed_bins;

const ACCEL: &str = "containerd.io/snapshot/overlaybd/acceleration-layer";
const WORKING_SET: &str = "containerd.io/snapshot/overlaybd/working-set";

/// The `worker.log`s of the devices under the snapshotter root.
fn worker_logs(root: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(root.join("devices"))
        .into_iter()
        .flatten()
        .flatten()
    {
        s += &std::fs::read_to_string(e.path().join("worker.log")).unwrap_or_default();
    }
    s
}

fn registry(reg: &str) -> Arc<Distribution> {
    let mut o = RegistryOptions::default();
    o.hosts.entry(reg.to_string()).or_default().plain_http = true;
    Arc::new(Distribution::new(o).unwrap())
}

fn blob(d: &Arc<Distribution>, r: &ImageRef, digest: &str) -> Vec<u8> {
    let mut v = Vec::new();
    d.open_blob(r, digest, 0)
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

#[test]
fn record_pushes_an_acceleration_layer_that_is_replayed_at_attach() {
    let tools = ["containerd", "ctr", "runc", "docker-registry", "mount"];
    let Some((obd, sn)) = testbed_bins("obd trace record test", &tools) else {
        return;
    };
    let mut opts = Options::new(obd.clone(), sn);
    opts.prefix = "obd-trace-rec-".into();
    // The page-cache warm is off by default; this test checks it.
    opts.extra_toml = "warm_page_cache = true\n".into();
    let mut tb = Testbed::new(opts).unwrap();
    tb.start_registry().unwrap();
    let layout = tb.dir.join("oci");
    build_sample(&layout, 3, 16 << 20).unwrap();
    let image = format!("{}/rec/app:obd", tb.reg);
    let accel = format!("{}/rec/app:obd-trace", tb.reg);
    tb.convert_push(&layout, "demo", &image).unwrap();
    tb.start_runtime().unwrap();

    // Record (the app exits by itself, well before --time), once as
    // upstream does and once packing the working set. The working set is
    // read through the snapshotter's cache, where the recording put it.
    let record = |new: &str, trace: &Path, extra: &[&str]| -> serde_json::Value {
        let out = run_ok(
            Command::new(&obd)
                .args(["trace", "record", "--plain-http", "--json", "--time", "60"])
                .arg("--address")
                .arg(&tb.sock)
                .arg("--cache-dir")
                .arg(tb.snroot.join("cache"))
                .arg("--trace-out")
                .arg(trace)
                .args(extra)
                .args([&image, new]),
        )
        .unwrap_or_else(|e| panic!("obd trace record: {e:#}"));
        eprintln!("obd trace record: {out}");
        let rep: serde_json::Value =
            serde_json::from_str(out.lines().last().expect("a report")).expect("JSON report");
        assert!(rep["trace_records"].as_u64().unwrap() > 0, "{rep}");
        assert_eq!(rep["exit_code"], 0, "the app ran to its end: {rep}");
        assert!(Path::new(&format!("{}.ok", trace.display())).exists());
        rep
    };
    let plain = format!("{}/rec/app:obd-trace-plain", tb.reg);
    let plain_trace = tb.dir.join("kept-trace-plain");
    let rep = record(&plain, &plain_trace, &["--no-pack"]);
    assert!(rep["working_set_layer"].is_null(), "{rep}");

    // The new image: the old layers plus the acceleration layer on top.
    let d = registry(&tb.reg);
    let r0 = ImageRef::parse(&image).unwrap();
    let manifest = |r: &ImageRef| -> serde_json::Value {
        serde_json::from_slice(&d.get_manifest(r, r.reference()).unwrap().bytes).unwrap()
    };
    let m0 = manifest(&r0);
    let l0 = m0["layers"].as_array().unwrap();
    // Checks the acceleration layer on top of `r` and returns its trace and
    // warm list, if it has one.
    let accel_files = |r: &ImageRef, rep: &serde_json::Value| -> (Vec<u8>, Option<Vec<u8>>) {
        let m1 = manifest(r);
        let l1 = m1["layers"].as_array().unwrap();
        let top = l1.last().unwrap();
        let digest = top["digest"].as_str().unwrap();
        assert_eq!(top["annotations"][ACCEL], "yes");
        assert_eq!(
            top["annotations"]["containerd.io/snapshot/overlaybd/version"],
            "0.1.0"
        );
        assert_eq!(
            top["annotations"]["containerd.io/snapshot/overlaybd/blob-digest"],
            digest
        );
        assert_eq!(
            top["annotations"]["containerd.io/snapshot/overlaybd/blob-size"],
            top["size"].to_string()
        );
        assert_eq!(top["digest"], rep["acceleration_layer"]);
        let cfg: serde_json::Value =
            serde_json::from_slice(&blob(&d, r, m1["config"]["digest"].as_str().unwrap())).unwrap();
        let ids = cfg["rootfs"]["diff_ids"].as_array().unwrap();
        assert_eq!(ids.len(), l1.len());
        for (id, l) in ids.iter().zip(l1) {
            assert_eq!(id, &l["digest"], "obd layers are uncompressed tars");
        }
        // The layer is a tar of `trace` and, packed, the warm list, 0444.
        let tar = blob(&d, r, digest);
        let mut ar = tar::Archive::new(&tar[..]);
        let mut files = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            files.push((path, e.header().mode().unwrap(), body));
        }
        assert!(matches!(files.len(), 1 | 2), "{:?}", files.len());
        let warm = (files.len() == 2).then(|| files.pop().unwrap());
        let (path, mode, body) = files.pop().unwrap();
        assert_eq!((path.as_str(), mode), ("trace", 0o444));
        let warm = warm.map(|(path, mode, body)| {
            assert_eq!((path.as_str(), mode), (WARM_FILE, 0o444));
            body
        });
        (body, warm)
    };
    let accel_trace = |r: &ImageRef, rep: &serde_json::Value| -> Vec<u8> {
        let (trace, warm) = accel_files(r, rep);
        assert!(warm.is_none(), "--no-pack is upstream's one-file tar");
        trace
    };
    let rp = ImageRef::parse(&plain).unwrap();
    let lp = manifest(&rp)["layers"].as_array().unwrap().clone();
    assert_eq!(lp.len(), l0.len() + 1);
    assert_eq!(&lp[..l0.len()], &l0[..]);
    assert_eq!(
        accel_trace(&rp, &rep),
        std::fs::read(&plain_trace).unwrap(),
        "--no-pack pushes the recorded trace as it is"
    );

    // Packed: the working set sits between the layers and the trace, and
    // the trace reads all of it and nothing else.
    let trace = tb.dir.join("kept-trace");
    let rep = record(&accel, &trace, &[]);
    let r1 = ImageRef::parse(&accel).unwrap();
    let l1 = manifest(&r1)["layers"].as_array().unwrap().clone();
    assert_eq!(l1.len(), l0.len() + 2);
    assert_eq!(&l1[..l0.len()], &l0[..]);
    let ws = &l1[l0.len()];
    assert_eq!(ws["digest"], rep["working_set_layer"]);
    assert_eq!(ws["annotations"][WORKING_SET], "yes");
    assert_eq!(
        ws["annotations"]["containerd.io/snapshot/overlaybd/blob-digest"],
        ws["digest"]
    );
    assert!(
        ws["annotations"]["containerd.io/snapshot/overlaybd/verity.digest"].is_string(),
        "the working set has a piece table: {ws}"
    );
    let (packed, warm) = accel_files(&r1, &rep);
    let packed = Trace::parse(&packed).unwrap();
    // The warm list names the files the app read, by range.
    let warm = WarmList::parse(&warm.expect("a packed image has a warm list")).unwrap();
    assert!(!warm.files.is_empty() && warm.bytes() > 0, "{warm:?}");
    assert_eq!(rep["warm_files"], warm.distinct_files());
    assert_eq!(rep["warm_bytes"], warm.bytes());
    let recorded = Trace::read_file(&trace).unwrap();
    let ws_bytes = rep["working_set_bytes"].as_u64().unwrap();
    assert!(packed.records.iter().all(|r| r.layer as usize == l0.len()));
    assert!(packed.records.iter().all(|r| r.count <= 1 << 20));
    assert_eq!(packed.total_bytes(), ws_bytes);
    assert!(ws_bytes > 0 && ws_bytes <= recorded.total_bytes(), "{rep}");
    eprintln!(
        "recorded {} reads, {} bytes; packed {} bytes into a {}-byte layer, replayed in {} records",
        recorded.records.len(),
        recorded.total_bytes(),
        ws_bytes,
        ws["size"],
        packed.records.len()
    );

    // Pull and run the new image: same output, and the device replays.
    run_ok(&mut tb.obd_pull("default", &accel)).unwrap();
    // The pull committed the acceleration layer: its device is attached at
    // once (prefetch_at_pull), before any container asks for it.
    let sn_log = || std::fs::read_to_string(tb.dir.join("snapshotter.log")).unwrap_or_default();
    testbed::wait_until(
        "the device attached at pull",
        std::time::Duration::from_secs(30),
        || sn_log().contains("device attached at pull"),
    )
    .unwrap_or_else(|e| panic!("{e:#}; snapshotter log:\n{}", sn_log()));
    // The snapshotter unpacked the acceleration layer itself, from the
    // blob it fetched at the manifest read: containerd did not download it.
    assert!(
        sn_log().contains("acceleration layer unpacked by the snapshotter")
            && !sn_log().contains("left to containerd's unpack"),
        "snapshotter log:\n{}",
        sn_log()
    );
    // The working set was fetched whole as the pull committed its layer,
    // ahead of the device.
    let ws_digest = ws["digest"].as_str().unwrap().to_string();
    testbed::wait_until(
        "the working set fetched ahead",
        std::time::Duration::from_secs(30),
        || {
            sn_log().lines().any(|l| {
                l.contains("working set fetched ahead of its device") && l.contains(&ws_digest)
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}; snapshotter log:\n{}", sn_log()));
    // ... and its mount's page cache is warmed from the list, every file found.
    testbed::wait_until(
        "the page-cache warm",
        std::time::Duration::from_secs(30),
        || sn_log().contains("page cache warmed"),
    )
    .unwrap_or_else(|e| panic!("{e:#}; snapshotter log:\n{}", sn_log()));
    let log = sn_log();
    let line = log
        .lines()
        .find(|l| l.contains("page cache warmed"))
        .unwrap();
    eprintln!("{line}");
    assert!(
        line.contains("skipped=0") && line.contains(&format!("files={}", warm.distinct_files())),
        "{line}"
    );
    let attaches = || sn_log().matches("device attached").count();
    let before = attaches();
    // runc's state (/run/containerd/runc/<ns>/<id>) is shared by every
    // containerd on the machine: an id of this work dir's own.
    let id = format!(
        "accel-run-{}",
        tb.dir.file_name().unwrap_or_default().to_string_lossy()
    );
    let out = run_ok(tb.ctr().args(["run", "--snapshotter", "obd", &accel, &id]))
        .unwrap_or_else(|e| panic!("ctr run: {e:#}"));
    assert_eq!(
        out.trim(),
        format!("{}\n{}", testbed::EXPECTED, testbed::WRITTEN)
    );
    assert_eq!(
        attaches(),
        before,
        "the container used the device attached at pull; snapshotter log:\n{}",
        sn_log()
    );
    // The device stays while the container (and its snapshot) exists; the
    // replay thread logs when it is done.
    let mut logs = String::new();
    testbed::wait_until(
        "the replay's log line",
        std::time::Duration::from_secs(30),
        || {
            logs = worker_logs(&tb.snroot);
            logs.contains("replayed ")
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}; worker logs:\n{logs}"));
    let line = logs.lines().find(|l| l.contains("replayed ")).unwrap();
    eprintln!("{line}");
    assert!(line.contains(" 0 errors"), "{line}");
    let _ = tb
        .ctr()
        .args(["containers", "rm", &id])
        .stdout(Stdio::null())
        .status();
}
