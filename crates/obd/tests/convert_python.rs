//! The realistic image of `fixtures/scripts/make-python-image.sh` (Debian's
//! python3.11 and its standard library in four layers, with whiteouts),
//! converted twice (same digest), every blob strictly validated, the
//! flattened ext4 `e2fsck -fn` clean and equal to `umoci unpack` of the
//! source. Skipped loudly when apt cannot fetch the packages.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

#[path = "../../converter/tests/common/mod.rs"]
mod common;
use common::*;

const OBD: &str = env!("CARGO_BIN_EXE_obd");

fn python_image() -> Option<PathBuf> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/scripts/make-python-image.sh");
    let out = Command::new("bash").arg(&script).output().unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIPPED: make-python-image.sh failed (apt cannot fetch packages?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn convert_json(src: &Path, dst: &Path) -> Value {
    let out = fixtures::procs::run(
        Command::new(OBD)
            .arg("convert")
            .arg(format!("oci:{}:python", src.display()))
            .arg(format!("oci:{}:obd", dst.display()))
            .args(["--oci", "--json"]),
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn python_image_converts_exactly() {
    let Some(src) = python_image() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let a = convert_json(&src, &tmp.path().join("a"));
    let b = convert_json(&src, &tmp.path().join("b"));
    assert_eq!(a["digest"], b["digest"], "deterministic");
    assert_eq!(a["layers"].as_array().unwrap().len(), 4);
    let blobs = output_blobs(&tmp.path().join("a"), "obd");
    let raw = tmp.path().join("raw");
    flatten(&blobs, &raw);
    e2fsck_clean(&raw);
    let ext = ext4_tree(&raw);
    assert!(ext.contains_key(b"usr/bin/python3.11".as_slice()));
    assert!(ext.contains_key(b"app/main.py".as_slice()));
    assert!(
        !ext.contains_key(b"usr/lib/python3.11/LICENSE.txt".as_slice()),
        "whiteout"
    );
    if let Some(host) = umoci_tree(&src, "python", tmp.path()) {
        compare(&ext, &host);
        // The source image really runs (chroot into umoci's bundle, as root).
        let out = Command::new("chroot")
            .arg(tmp.path().join("bundle/rootfs"))
            .args(["/usr/bin/python3", "/app/main.py"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ready");
        // The kernel's view: the flattened disk loop-mounted read-only has the
        // same tree, and the app runs from it.
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let lo = fixtures::procs::run(
            Command::new("losetup")
                .args(["-f", "--show", "-r"])
                .arg(&raw),
        );
        let dev = lo.trim().to_string();
        let st = Command::new("mount")
            .args(["-t", "ext4", "-o", "ro", &dev])
            .arg(&mnt)
            .status()
            .unwrap();
        let result = std::panic::catch_unwind(|| {
            assert!(st.success(), "mount {dev}");
            let mut mounted = host_tree(&mnt);
            mounted.retain(|k, _| !k.starts_with(b"lost+found"));
            compare(&mounted, &host);
            let out = Command::new("chroot")
                .arg(&mnt)
                .args(["/usr/bin/python3", "/app/main.py"])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ready");
        });
        let _ = Command::new("umount").arg(&mnt).status();
        let _ = Command::new("losetup").args(["-d", &dev]).status();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}
