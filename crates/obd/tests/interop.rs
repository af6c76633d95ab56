//! Interop with upstream overlaybd v1.0.18, through the `obd` CLI: every ZFile
//! vector extracts to its recorded digest, and every layer stack flattens to its
//! recorded raw-disk digest (vectors copied into `fixtures/interop`).

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{obd, s};

fn manifest() -> Value {
    let p = fixtures::interop().join("manifest.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn every_zfile_vector_extracts_verifies_and_reports_its_fields() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for src in m["zfile"].as_array().unwrap() {
        for o in src["outputs"].as_array().unwrap() {
            let file = fixtures::interop().join(o["file"].as_str().unwrap());
            let out = dir.path().join("out.bin");
            obd(&["zfile", "extract", s(&file), s(&out)]);
            assert_eq!(
                sha256_file(&out),
                o["decoded_sha256"].as_str().unwrap(),
                "{}",
                file.display()
            );
            let v = obd(&["zfile", "verify", s(&file)]);
            assert!(v.contains("OK"), "{v}");
            let info: Value =
                serde_json::from_str(&obd(&["zfile", "info", "--json", s(&file)])).unwrap();
            for k in [
                "index_offset",
                "index_crc",
                "header_flags",
                "header_digest",
                "blocks",
            ] {
                assert_eq!(info[k], o[k], "{} field {k}", file.display());
            }
            assert_eq!(info["trailer_flags"], o["trailer_flags"]);
            assert_eq!(info["payload_offset"], o["payload_offset"]);
            n += 1;
        }
    }
    assert_eq!(n, 7);
}

/// Writes a config with absolute `file` paths for `lowers` (relative to interop/).
fn config_for(dir: &Path, name: &str, lowers: &[&str]) -> PathBuf {
    let lowers: Vec<Value> = lowers
        .iter()
        .map(|l| serde_json::json!({"file": fixtures::interop().join(l).to_str().unwrap()}))
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, serde_json::json!({"lowers": lowers}).to_string()).unwrap();
    p
}

fn flatten_sha(dir: &Path, config: &Path) -> String {
    let out = dir.join("disk.img");
    let sha = obd(&[
        "image",
        "flatten",
        "--config",
        s(config),
        "-o",
        s(&out),
        "--sha256",
    ]);
    let _ = std::fs::remove_file(&out);
    sha.trim().to_string()
}

#[test]
fn every_stack_prefix_flattens_to_its_recorded_disk_digest() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for stack in m["stacks"].as_array().unwrap() {
        for p in stack["prefixes"].as_array().unwrap() {
            let lowers: Vec<&str> = p["lowers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap())
                .collect();
            let cfg = config_for(dir.path(), "c.json", &lowers);
            assert_eq!(
                flatten_sha(dir.path(), &cfg),
                p["disk_sha256"].as_str().unwrap(),
                "{lowers:?}"
            );
            n += 1;
        }
        // The shipped config, with paths relative to its own folder.
        let shipped = fixtures::interop().join(stack["config"].as_str().unwrap());
        let full = stack["prefixes"].as_array().unwrap().last().unwrap();
        assert_eq!(
            flatten_sha(dir.path(), &shipped),
            full["disk_sha256"].as_str().unwrap()
        );
    }
    assert_eq!(n, 6);
}

#[test]
fn sealed_and_discard_stacks_flatten_to_their_recorded_digests() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let sealed = &m["sealed"];
    let cfg = fixtures::interop().join(sealed["config"].as_str().unwrap());
    assert_eq!(
        flatten_sha(dir.path(), &cfg),
        sealed["disk_sha256"].as_str().unwrap()
    );
    // Replacing the sealed file by its upstream-committed form gives the same disk.
    let base = [
        "stack-lz4/layer0.overlaybd.tar",
        "stack-lz4/layer1.overlaybd.tar",
        "stack-lz4/layer2.overlaybd.tar",
    ];
    let mut lowers = base.to_vec();
    lowers.push("sealed/overlaybd.sealed.committed.tar");
    let cfg = config_for(dir.path(), "c2.json", &lowers);
    assert_eq!(
        flatten_sha(dir.path(), &cfg),
        sealed["disk_sha256_via_committed"].as_str().unwrap()
    );
    // Our own commit of the sealed file (ZFile + tar) stacks to the same disk too.
    let ours = dir.path().join("ours.tar");
    obd(&[
        "layer",
        "commit",
        "--zfile",
        "--tar",
        s(&fixtures::interop().join("sealed/overlaybd.sealed")),
        s(&ours),
    ]);
    obd(&["layer", "verify", "--strict", s(&ours)]);
    let mut lowers: Vec<String> = base
        .iter()
        .map(|l| fixtures::interop().join(l).display().to_string())
        .collect();
    lowers.push(ours.display().to_string());
    let lowers: Vec<&str> = lowers.iter().map(|x| x.as_str()).collect();
    let cfg = config_for(dir.path(), "c3.json", &lowers);
    assert_eq!(
        flatten_sha(dir.path(), &cfg),
        sealed["disk_sha256"].as_str().unwrap()
    );

    let discard = &m["discard"];
    let cfg = fixtures::interop().join(discard["config"].as_str().unwrap());
    assert_eq!(
        flatten_sha(dir.path(), &cfg),
        discard["disk_sha256"].as_str().unwrap()
    );
}

#[test]
fn merged_index_matches_the_recorded_extents() {
    for stack in ["stack-lz4", "stack-zstd"] {
        let dir = fixtures::interop().join(stack);
        let img =
            overlaybd_core::image::Image::open_config_file(dir.join("config.v1.json")).unwrap();
        let want: Value =
            serde_json::from_slice(&std::fs::read(dir.join("merged-extents.json")).unwrap())
                .unwrap();
        let got: Vec<Value> = img
            .index()
            .segments()
            .iter()
            .map(|s| serde_json::json!([s.offset, s.length, s.tag, s.moffset, s.zeroed as u8]))
            .collect();
        assert_eq!(Value::Array(got), want["extents"], "{stack}");
    }
}

#[test]
fn layer_info_matches_the_manifest_for_every_blob() {
    let m = manifest();
    let mut blobs: Vec<&Value> = Vec::new();
    for st in m["stacks"].as_array().unwrap() {
        blobs.extend(st["layers"].as_array().unwrap());
    }
    blobs.push(&m["sealed"]["committed"]);
    blobs.push(&m["discard"]["committed"]);
    blobs.push(&m["discard"]["raw_lsmt"]);
    blobs.push(&m["sealed"]["sealed_file"]);
    for b in blobs {
        let file = fixtures::interop().join(b["file"].as_str().unwrap());
        let info: Value =
            serde_json::from_str(&obd(&["layer", "info", "--json", s(&file)])).unwrap();
        let lsmt = if b["lsmt"].is_object() { &b["lsmt"] } else { b };
        for part in ["header", "trailer"] {
            for k in [
                "flags",
                "index_offset",
                "index_size",
                "virtual_size",
                "uuid",
                "parent_uuid",
                "version",
                "user_tag",
            ] {
                assert_eq!(
                    info[part][k],
                    lsmt[part][k],
                    "{} {part}.{k}",
                    file.display()
                );
            }
        }
        if let Some(size) = lsmt.get("size") {
            assert_eq!(&info["lsmt_size"], size, "{}", file.display());
        }
        let v = obd(&["layer", "verify", s(&file)]);
        assert!(v.contains("OK"), "{v}");
    }
}
