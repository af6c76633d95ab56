//! Trace modes chosen by `open_image` (formats §5.1): an empty
//! `recordTracePath` records the device's layer reads, the written trace is
//! replayed on the next open, and an acceleration layer's `trace` is replayed
//! with that layer taken off the stack.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use obd_device::open::{open_image, TracePlan};
use overlaybd_core::config::{ImageConfig, Lower};
use overlaybd_core::ReadAt;
use tcmu_target::BlockBackend;

fn config(dir: &Path, edit: impl FnOnce(&mut ImageConfig)) -> PathBuf {
    let src = fixtures::interop().join("stack-lz4");
    let mut cfg = ImageConfig::load(src.join("config.v1.json")).unwrap();
    for l in &mut cfg.lowers {
        l.file = src.join(&l.file).to_string_lossy().into_owned();
    }
    edit(&mut cfg);
    let p = dir.join("config.v1.json");
    cfg.save_atomic(&p).unwrap();
    p
}

fn replay_plan(plan: &TracePlan) -> &trace_replay::Trace {
    match plan {
        TracePlan::Replay { trace, .. } => trace,
        other => panic!("expected a replay, got {other:?}"),
    }
}

#[test]
fn record_then_replay_through_open_image() {
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("trace");
    let cfg = config(dir.path(), |c| c.record_trace_path = "trace".into());

    // No file: disabled.
    assert!(matches!(
        open_image(&cfg, None).unwrap().trace,
        TracePlan::None
    ));

    // Empty file: record.
    std::fs::write(&trace_path, b"").unwrap();
    let o = open_image(&cfg, None).unwrap();
    let TracePlan::Record(rec) = &o.trace else {
        panic!("expected recording, got {:?}", o.trace);
    };
    assert_eq!(rec.path(), trace_path);
    assert!(rec.lock_path().exists());
    let mut buf = vec![0u8; 128 << 10];
    for off in [0u64, 1 << 20, 5 << 20, 300 << 20] {
        o.backend.read_at(&mut buf, off).unwrap();
    }
    assert!(!rec.is_empty(), "the device's reads reach the recorder");
    let n = rec.finish().unwrap();
    assert!(rec.ok_path().exists() && !rec.lock_path().exists());
    drop(o);

    // A trace: replay.
    let o = open_image(&cfg, None).unwrap();
    let trace = replay_plan(&o.trace);
    assert_eq!(trace.records.len(), n);
    let readers = o.backend.image().layer_readers();
    let layers: Vec<&dyn ReadAt> = readers.iter().map(|b| &**b as &dyn ReadAt).collect();
    let report = trace_replay::replay(
        trace,
        &layers,
        &trace_replay::ReplayOptions::default(),
        &AtomicBool::new(false),
    );
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.skipped, 0);
    assert!(report.requests >= 1 && report.requests <= n);

    // Anything else: a priority list.
    std::fs::write(&trace_path, b"/usr/bin/\n/etc/hosts\n").unwrap();
    match open_image(&cfg, None).unwrap().trace {
        TracePlan::PriorityList { entries, .. } => assert_eq!(entries.len(), 2),
        other => panic!("expected a priority list, got {other:?}"),
    }

    // A corrupt trace is ignored, not fatal.
    let mut bad = trace_replay::Trace::default().to_bytes();
    bad.push(0);
    std::fs::write(&trace_path, &bad).unwrap();
    assert!(matches!(
        open_image(&cfg, None).unwrap().trace,
        TracePlan::None
    ));
}

#[test]
fn a_failed_open_releases_the_recording_lock() {
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("trace");
    std::fs::write(&trace_path, b"").unwrap();
    let cfg = config(dir.path(), |c| {
        c.record_trace_path = "trace".into();
        // An upper whose data file exists but cannot be parsed.
        c.upper.index = "upper.index".into();
        c.upper.data = "upper.data".into();
    });
    std::fs::write(dir.path().join("upper.data"), b"not an lsmt file").unwrap();
    assert!(open_image(&cfg, None).is_err());
    assert!(!dir.path().join("trace.lock").exists());
}

#[test]
fn acceleration_layer_trace_is_replayed_and_unstacked() {
    let dir = tempfile::tempdir().unwrap();
    let accel = dir.path().join("accel");
    std::fs::create_dir(&accel).unwrap();
    let mut t = trace_replay::Trace::default();
    t.push_read(0, 0, 4096);
    t.push_read(2, 8192, 4096);
    std::fs::write(accel.join("trace"), t.to_bytes()).unwrap();
    let cfg = config(dir.path(), |c| {
        c.acceleration_layer = true;
        c.lowers.push(Lower {
            dir: "accel".into(),
            ..Default::default()
        });
    });
    let o = open_image(&cfg, None).unwrap();
    assert_eq!(o.backend.image().layers().len(), 3);
    assert_eq!(replay_plan(&o.trace), &t);

    // An empty acceleration trace is not a recording request.
    std::fs::write(accel.join("trace"), b"").unwrap();
    let o = open_image(&cfg, None).unwrap();
    assert!(matches!(o.trace, TracePlan::None));
    assert!(!accel.join("trace.lock").exists());
}
