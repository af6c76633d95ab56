//! The read-write image backend against a byte-array model: random writes and
//! discards over an upstream-made lower stack, reads at random byte ranges,
//! and the same bytes again after the device is reopened.

use std::path::Path;

use obd_device::open::open_image;
use overlaybd_core::config::{ImageConfig, Upper};
use tcmu_target::BlockBackend;

const SPAN: u64 = 8 << 20;

fn rw_config(dir: &Path) -> std::path::PathBuf {
    let src = fixtures::interop().join("stack-lz4");
    let mut cfg = ImageConfig::load(src.join("config.v1.json")).unwrap();
    for l in &mut cfg.lowers {
        l.file = src.join(&l.file).to_string_lossy().into_owned();
    }
    cfg.upper = Upper {
        index: "upper.index".into(),
        data: "upper.data".into(),
        ..Default::default()
    };
    let p = dir.join("config.v1.json");
    cfg.save_atomic(&p).unwrap();
    p
}

fn read(b: &dyn BlockBackend, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    b.read_at(&mut v, off).unwrap();
    v
}

#[test]
fn writes_and_discards_merge_over_the_lowers_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = rw_config(dir.path());
    let o = open_image(&cfg, None).unwrap();
    assert!(o.fresh_upper);
    let b = o.backend;
    assert!(!b.read_only());
    assert_eq!(b.size(), 1 << 30, "the upper inherits the lowers' size");
    let mut model = read(&b, 0, SPAN as usize);
    let mut rng = fixtures::Rng::new(7);
    for step in 0..300 {
        let off = rng.below(SPAN / 512) * 512;
        let len = ((rng.below(64) + 1) * 512).min(SPAN - off);
        match rng.below(3) {
            0 => {
                b.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                b.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
        }
        let a = rng.below(SPAN - 1);
        let n = rng.below((SPAN - a).min(300_000)) as usize + 1;
        assert_eq!(
            read(&b, a, n),
            model[a as usize..a as usize + n],
            "step {step}: {n} at {a}"
        );
    }
    b.flush().unwrap();
    drop(b);
    let o = open_image(&cfg, None).unwrap();
    assert!(!o.fresh_upper);
    assert_eq!(read(&o.backend, 0, SPAN as usize), model, "after reopening");
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let o = open_image(&rw_config(dir.path()), None).unwrap();
    let b = o.backend;
    let end = b.size();
    assert!(b.write_at(&[0u8; 512], end).is_err(), "past the end");
    assert!(b.write_at(&[0u8; 100], 0).is_err(), "unaligned");
    assert!(b.discard(u64::MAX - 511, 512).is_err(), "overflow");
    let mut buf = [0u8; 10];
    assert!(b.read_at(&mut buf, end - 5).is_err());
    // A read-only image refuses writes.
    let ro = open_image(&fixtures::interop().join("stack-lz4/config.v1.json"), None).unwrap();
    assert!(ro.backend.read_only());
    let e = ro.backend.write_at(&[0u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
}
