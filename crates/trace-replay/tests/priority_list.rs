//! A priority list against a real ext4 image (upstream's interop stack,
//! flattened to a raw file so `debugfs` can read it without a device): the
//! listed files' blocks are found, mapped to layer-file ranges, and those
//! ranges hold exactly the files' bytes.

mod common;
use common::replay_all;

use overlaybd_core::image::Image;
use sha2::{Digest, Sha256};
use trace_replay::parse_priority_list;
use trace_replay::priority::{device_ranges_to_trace, ext4_block_size, ext4_ranges};
use zfile::ReadAt;

fn have_debugfs() -> bool {
    std::process::Command::new("debugfs")
        .arg("-V")
        .output()
        .is_ok()
}

#[test]
fn listed_files_map_to_their_bytes_in_the_layers() {
    if !have_debugfs() {
        eprintln!("SKIPPED: debugfs (e2fsprogs) is not installed");
        return;
    }
    let img =
        Image::open_config_file(fixtures::interop().join("stack-lz4/config.v1.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("raw");
    let out = std::fs::File::create(&raw_path).unwrap();
    img.flatten_to(&out, 2, 1 << 20).unwrap();
    drop(out);
    let raw = zfile::FileSource::open(&raw_path).unwrap();
    let bs = ext4_block_size(&raw).expect("an ext4");
    assert!(ext4_block_size(&img.layer_readers()[0]).is_none());

    // One big file: its blocks hold its bytes (sha256 from the recorded tree).
    let entries = parse_priority_list(b"/opt/data/big.log\n").unwrap();
    let ranges = ext4_ranges(&raw_path, bs, &entries).unwrap();
    let size = 2_097_485u64;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(total, size.div_ceil(bs) * bs);
    let mut data = Vec::new();
    for &(o, n) in &ranges {
        let mut b = vec![0u8; n as usize];
        raw.read_exact_at(&mut b, o).unwrap();
        data.extend_from_slice(&b);
    }
    data.truncate(size as usize);
    assert_eq!(
        hex::encode(Sha256::digest(&data)),
        "a319ec77ccc10c35892a6ce915ea8bb1d2c131ae15fcfbf4dd45211b178a6bed"
    );

    // The mapped layer ranges hold the same bytes, where the disk has data.
    let trace = device_ranges_to_trace(img.index(), img.layers().len(), &ranges);
    assert!(!trace.records.is_empty());
    assert!(trace.records.iter().all(|r| r.count <= 1 << 20));
    let readers = img.layer_readers();
    let mut from_layers = Vec::new();
    for r in &trace.records {
        let mut b = vec![0u8; r.count as usize];
        readers[r.layer as usize]
            .read_exact_at(&mut b, r.offset as u64)
            .unwrap();
        from_layers.extend_from_slice(&b);
    }
    let mut from_disk = Vec::new();
    for &(o, n) in &ranges {
        let mut b = vec![0u8; n as usize];
        raw.read_exact_at(&mut b, o).unwrap();
        from_disk.extend_from_slice(&b);
    }
    assert_eq!(trace.total_bytes(), total, "no zeroed parts in this file");
    assert!(from_layers == from_disk);

    // Whole directories expand recursively; the plan replays cleanly.
    let entries = parse_priority_list(b"/etc/\n/usr/*\n/opt/data/big.log\n").unwrap();
    let ranges = ext4_ranges(&raw_path, bs, &entries).unwrap();
    let trace = device_ranges_to_trace(img.index(), img.layers().len(), &ranges);
    let layers: Vec<&dyn ReadAt> = readers.iter().map(|b| &**b as &dyn ReadAt).collect();
    let report = replay_all(&trace, &layers);
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.skipped, 0);
    assert!(report.bytes > size, "{report}");
}
