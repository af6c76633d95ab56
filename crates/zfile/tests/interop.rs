//! Upstream-made vectors (fixtures/interop/zfile, expected values in manifest.json).

mod common;

use common::sha256_hex;
use serde_json::Value;
use zfile::{validate_strict, Algorithm, FileSource, ReadAt, Window, ZFileReader};

fn manifest() -> Value {
    let p = fixtures::interop().join("manifest.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn check_output<R: ReadAt>(o: &Value, src: R, source: &[u8]) {
    let name = o["file"].as_str().unwrap();
    let u = |k: &str| o[k].as_u64().unwrap_or_else(|| panic!("{name}: {k}"));
    let r = ZFileReader::open(src).unwrap_or_else(|e| panic!("{name}: {e}"));
    let i = r.info().clone();
    let algo = match o["algorithm"].as_str().unwrap() {
        "lz4" => Algorithm::Lz4,
        "zstd" => Algorithm::Zstd,
        a => panic!("{a}"),
    };
    assert_eq!(i.algorithm, algo, "{name}");
    assert_eq!(u64::from(i.block_size), u("block_size"), "{name}");
    assert_eq!(i.blocks, u("blocks"), "{name}");
    assert_eq!(i.original_size, u("decoded_size"), "{name}");
    assert_eq!(i.header_flags, u("header_flags"), "{name}");
    assert_eq!(i.trailer_flags, Some(u("trailer_flags")), "{name}");
    assert_eq!(i.index_offset, u("index_offset"), "{name}");
    assert_eq!(u64::from(i.index_crc), u("index_crc"), "{name}");
    assert_eq!(u64::from(i.header_digest), u("header_digest"), "{name}");
    assert_eq!(
        i.trailer_digest.map(u64::from),
        Some(u("trailer_digest")),
        "{name}"
    );
    assert_eq!(i.zfile_size, u("payload_size"), "{name}");
    assert!(i.verify && !i.header_overwritten, "{name}");
    let table: Vec<u8> = r.stored_lengths().flat_map(|l| l.to_le_bytes()).collect();
    assert_eq!(
        sha256_hex(&table),
        o["jump_table_sha256"].as_str().unwrap(),
        "{name}"
    );

    let rep = r.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(rep.block_crcs_checked && rep.header_digest_checked && rep.index_crc_checked);
    assert!(rep.trailer_digest_checked);
    validate_strict(&r).unwrap_or_else(|p| panic!("{name}: {p:?}"));

    // Whole decode.
    let mut out = vec![0u8; i.original_size as usize];
    assert_eq!(r.read_at(&mut out, 0).unwrap(), out.len());
    assert_eq!(
        sha256_hex(&out),
        o["decoded_sha256"].as_str().unwrap(),
        "{name}"
    );
    assert_eq!(out, source);

    // Unaligned ranges across block edges and the end.
    let mut rng = fixtures::Rng::new(u("blocks"));
    let mut buf = vec![0u8; 200_000];
    for _ in 0..200 {
        let off = rng.below(i.original_size + 10);
        let max = if rng.below(4) == 0 { 200_000 } else { 9000 };
        let len = rng.below(max) as usize;
        let n = r.read_at(&mut buf[..len], off).unwrap();
        let lo = (off as usize).min(source.len());
        let hi = (off as usize + len).min(source.len());
        assert_eq!(&buf[..n], &source[lo..hi], "{name} @{off}+{len}");
    }
}

#[test]
fn every_zfile_vector() {
    let m = manifest();
    let dir = fixtures::interop();
    let entries = m["zfile"].as_array().unwrap();
    let mut seen = 0;
    for e in entries {
        let source = std::fs::read(dir.join(e["source"].as_str().unwrap())).unwrap();
        assert_eq!(sha256_hex(&source), e["sha256"].as_str().unwrap());
        for o in e["outputs"].as_array().unwrap() {
            let path = dir.join(o["file"].as_str().unwrap());
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len() as u64, o["size"].as_u64().unwrap());
            assert_eq!(sha256_hex(&bytes), o["sha256"].as_str().unwrap());
            let off = o["payload_offset"].as_u64().unwrap();
            let size = o["payload_size"].as_u64().unwrap();
            if o["tar_wrapped"].as_bool().unwrap() {
                assert_eq!(off, 1536);
                assert!(!zfile::is_zfile(&bytes));
                check_output(o, Window::new(&bytes, off, size), &source);
                let file = FileSource::open(&path).unwrap();
                check_output(o, Window::new(file, off, size), &source);
            } else {
                assert!(zfile::is_zfile(&bytes));
                check_output(o, &bytes, &source);
                check_output(o, FileSource::open(&path).unwrap(), &source);
            }
            seen += 1;
        }
    }
    assert_eq!(seen, 7);
}

#[test]
fn decompress_helper_on_vectors() {
    let dir = fixtures::interop().join("zfile");
    let source = std::fs::read(dir.join("source.bin")).unwrap();
    for name in ["source.lz4-4k.zfile", "source.zstd-16k.zfile"] {
        let mut out = Vec::new();
        let n = zfile::decompress(FileSource::open(dir.join(name)).unwrap(), &mut out).unwrap();
        assert_eq!(n, source.len() as u64);
        assert_eq!(out, source);
    }
}

#[test]
fn our_output_of_the_source_is_valid() {
    let source = std::fs::read(fixtures::interop().join("zfile/source.bin")).unwrap();
    for algo in [Algorithm::Lz4, Algorithm::Zstd] {
        for bs in [4096, 16384, 32768] {
            let f = common::write_zfile(&source, algo, bs, 2);
            let r = ZFileReader::open(&f).unwrap();
            validate_strict(&r).unwrap();
            let mut out = Vec::new();
            zfile::decompress(&f, &mut out).unwrap();
            assert_eq!(out, source);
        }
    }
}

/// Every object in the manifest describing a `tar(zfile(lsmt))` blob.
fn committed_blobs(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(m) => {
            if m.get("container").and_then(Value::as_str) == Some("tar(zfile(lsmt))") {
                out.push(v.clone());
            }
            m.values().for_each(|x| committed_blobs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| committed_blobs(x, out)),
        _ => {}
    }
}

#[test]
fn committed_layers_use_the_overwritten_header() {
    // `overlaybd-commit -z` output: header 0x1B carries the index fields, so the
    // trailer is never read on open; strict validation still checks it (0x16).
    let dir = fixtures::interop();
    let mut blobs = Vec::new();
    committed_blobs(&manifest(), &mut blobs);
    assert!(blobs.len() >= 8, "{}", blobs.len());
    for b in &blobs {
        let name = b["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let (off, size) = (
            b["tar"]["payload_offset"].as_u64().unwrap(),
            b["tar"]["payload_size"].as_u64().unwrap(),
        );
        let z = &b["zfile"];
        let u = |k: &str| z[k].as_u64().unwrap_or_else(|| panic!("{name}: {k}"));
        let r = ZFileReader::open(Window::new(&bytes, off, size)).unwrap();
        let i = r.info();
        assert!(i.header_overwritten && i.trailer_flags.is_none(), "{name}");
        assert_eq!(i.header_flags, u("header_flags"), "{name}");
        assert_eq!(i.blocks, u("blocks"), "{name}");
        assert_eq!(u64::from(i.block_size), u("block_size"), "{name}");
        assert_eq!(i.original_size, u("original_file_size"), "{name}");
        assert_eq!(i.index_offset, u("index_offset"), "{name}");
        assert_eq!(u64::from(i.index_crc), u("index_crc"), "{name}");
        assert_eq!(u64::from(i.header_digest), u("header_digest"), "{name}");
        assert_eq!(u("trailer_flags"), 0x16);
        r.verify().unwrap();
        validate_strict(&r).unwrap_or_else(|p| panic!("{name}: {p:?}"));
        let mut out = Vec::new();
        zfile::decompress(Window::new(&bytes, off, size), &mut out).unwrap();
        assert_eq!(
            sha256_hex(&out),
            b["lsmt"]["sha256"].as_str().unwrap(),
            "{name}"
        );
    }
}
