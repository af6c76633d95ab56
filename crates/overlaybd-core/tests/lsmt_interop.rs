//! LSMT files made by the upstream v1.0.18 tools: header/trailer fields, index,
//! byte-exact commit of the sealed vector, strict validation.

use std::sync::Arc;

use overlaybd_core::lsmt::commit::CommitOptions;
use overlaybd_core::lsmt::header::{HeaderTrailer, Uuid};
use overlaybd_core::lsmt::validate::{check_strict, validate_strict};
use overlaybd_core::lsmt::{RoKind, RoLayer, Segment};
use overlaybd_core::{FileSource, ReadAt};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn manifest() -> Value {
    let p = fixtures::interop().join("manifest.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn open(rel: &str) -> RoLayer {
    let src = FileSource::open(fixtures::interop().join(rel)).unwrap();
    RoLayer::open(Arc::new(src)).unwrap()
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn check_ht(ht: &HeaderTrailer, want: &Value) {
    assert_eq!(ht.flags as u64, want["flags"].as_u64().unwrap(), "flags");
    assert_eq!(
        ht.index_offset,
        want["index_offset"].as_u64().unwrap(),
        "index_offset"
    );
    assert_eq!(
        ht.index_size,
        want["index_size"].as_u64().unwrap(),
        "index_size"
    );
    assert_eq!(
        ht.virtual_size,
        want["virtual_size"].as_u64().unwrap(),
        "virtual_size"
    );
    assert_eq!(ht.uuid_str(), want["uuid"].as_str().unwrap());
    assert_eq!(ht.parent_uuid_str(), want["parent_uuid"].as_str().unwrap());
    let v = want["version"].as_array().unwrap();
    assert_eq!(
        (ht.version as u64, ht.sub_version as u64),
        (v[0].as_u64().unwrap(), v[1].as_u64().unwrap())
    );
    assert_eq!(
        ht.user_tag_bytes(),
        want["user_tag"].as_str().unwrap().as_bytes()
    );
    assert_eq!(ht.size, 390);
    // Parsed UUIDs print back identically (stored upper case).
    assert_eq!(ht.uuid().unwrap().to_string(), ht.uuid_str());
}

/// Opens the interop file `rel`; checks its header and trailer against the
/// manifest's entry `key` (two levels); returns the layer and that entry.
fn open_checked(rel: &str, [k1, k2]: [&str; 2]) -> (RoLayer, Value) {
    let want = manifest()[k1][k2].clone();
    let l = open(rel);
    check_ht(l.header(), &want["header"]);
    check_ht(l.trailer(), &want["trailer"]);
    (l, want)
}

#[test]
fn sealed_header_trailer_and_index() {
    let (l, want) = open_checked("sealed/overlaybd.sealed", ["sealed", "sealed_file"]);
    assert_eq!(l.kind(), RoKind::Sealed);
    assert_eq!(
        l.segments().len() as u64,
        want["valid_entries"].as_u64().unwrap()
    );
    assert_eq!(
        l.data_sectors(),
        want["live_data_sectors"].as_u64().unwrap()
    );
    assert_eq!(l.virtual_size(), 1 << 30);
    assert!(l.segments().windows(2).all(|w| w[0].end() <= w[1].offset));
    assert!(l.segments().iter().all(|s| s.tag == 0 && !s.zeroed));

    // Strict validation: sealed is reported, not failed.
    let r = validate_strict(&l).unwrap();
    assert_eq!(r.kind, RoKind::Sealed);
    assert_eq!(r.entries, 11);
    assert!(r.to_string().starts_with("sealed (not committed)"));
}

#[test]
fn discard_header_trailer_and_index() {
    let (l, want) = open_checked("discard/layer.raw.lsmt", ["discard", "raw_lsmt"]);
    assert_eq!(l.kind(), RoKind::Committed);
    let got: Vec<Segment> = l.segments().to_vec();
    let expect: Vec<Segment> = want["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Segment {
            offset: e["offset"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap() as u32,
            moffset: e["moffset"].as_u64().unwrap(),
            zeroed: e["zeroed"].as_u64().unwrap() == 1,
            tag: e["tag"].as_u64().unwrap() as u8,
        })
        .collect();
    assert_eq!(got, expect);
    // README §6 table, literally.
    assert_eq!(
        got,
        vec![
            Segment {
                offset: 5600,
                length: 128,
                moffset: 8,
                zeroed: true,
                tag: 0
            },
            Segment::data(6400, 32, 8),
            Segment {
                offset: 9632,
                length: 8,
                moffset: 40,
                zeroed: true,
                tag: 0
            },
            Segment {
                offset: 1200000,
                length: 64,
                moffset: 40,
                zeroed: true,
                tag: 0
            },
            Segment::data(1200800, 16, 40),
        ]
    );

    // Reads: zeroed ranges are zeros; the 0xA5 / 0x5A data patterns of the vector.
    let mut buf = vec![1u8; 32 * 512];
    assert_eq!(l.read_at(&mut buf, 6400 * 512).unwrap(), buf.len());
    assert!(buf.iter().all(|&b| b == 0xA5));
    let mut buf = vec![1u8; 16 * 512];
    l.read_at(&mut buf, 1200800 * 512).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5A));
    let mut buf = vec![1u8; 128 * 512];
    l.read_at(&mut buf, 5600 * 512).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // Unaligned read straddling a zeroed/unmapped/data boundary.
    let mut buf = vec![1u8; 1000];
    l.read_at(&mut buf, 6400 * 512 - 500).unwrap();
    assert!(buf[..500].iter().all(|&b| b == 0));
    assert!(buf[500..].iter().all(|&b| b == 0xA5));
    // Past the end.
    assert_eq!(l.read_at(&mut buf, 1 << 30).unwrap(), 0);

    // An upstream committed file passes every strict rule.
    let r = validate_strict(&l).unwrap();
    assert!(r.is_clean(), "{r}");
    assert_eq!((r.entries, r.padding, r.zeroed), (5, 251, 3));
}

#[test]
fn commit_sealed_is_byte_exact() {
    let m = manifest();
    let l = open("sealed/overlaybd.sealed");
    let mut out = Vec::new();
    let info = l.commit(&CommitOptions::default(), &mut out).unwrap();
    assert_eq!(
        out.len() as u64,
        m["sealed"]["compacted_raw_lsmt_size"].as_u64().unwrap()
    );
    assert_eq!(info.bytes, out.len() as u64);
    assert_eq!(
        sha256(&out),
        m["sealed"]["compacted_raw_lsmt_sha256"].as_str().unwrap()
    );
    assert_eq!(
        (info.entries, info.padding, info.data_sectors),
        (11, 245, 2816)
    );

    // The output is a clean committed layer with the manifest's fields and the
    // same visible data as the sealed file.
    let c = RoLayer::from_bytes(out).unwrap();
    let want = &m["sealed"]["committed"]["lsmt"];
    check_ht(c.header(), &want["header"]);
    check_ht(c.trailer(), &want["trailer"]);
    assert!(validate_strict(&c).unwrap().is_clean());
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    for s in l.segments() {
        let (off, len) = (s.offset * 512, (s.length as usize * 512).min(a.len()));
        l.read_at(&mut a[..len], off).unwrap();
        c.read_at(&mut b[..len], off).unwrap();
        assert_eq!(a[..len], b[..len]);
    }
}

#[test]
fn commit_is_idempotent_on_committed_input() {
    // Re-compacting an upstream committed file reproduces it exactly.
    let raw = std::fs::read(fixtures::interop().join("discard/layer.raw.lsmt")).unwrap();
    let l = RoLayer::from_bytes(raw.clone()).unwrap();
    let opts = CommitOptions {
        user_tag: b"zeroed-entries vector".to_vec(),
        ..CommitOptions::default()
    };
    let mut out = Vec::new();
    l.commit(&opts, &mut out).unwrap();
    assert_eq!(out, raw);
}

#[test]
fn chain_id_uuids_match_stored() {
    let m = manifest();
    for stack in m["stacks"].as_array().unwrap() {
        for layer in stack["layers"].as_array().unwrap() {
            let chain = layer["chain_id"].as_str().unwrap();
            let stored = layer["lsmt"]["header"]["uuid"].as_str().unwrap();
            assert_eq!(Uuid::from_chain_id(chain).unwrap().to_string(), stored);
            let arg = layer["commit_uuid_arg"].as_str().unwrap();
            assert_eq!(Uuid::parse(arg).unwrap().to_string(), stored);
        }
    }
}

#[test]
fn check_strict_flags_a_tampered_file() {
    let mut raw = std::fs::read(fixtures::interop().join("discard/layer.raw.lsmt")).unwrap();
    // A lower-case uuid letter and a stray byte after the struct in the header.
    raw[56] = b'a';
    raw[1000] = 1;
    let l = RoLayer::from_bytes(raw).unwrap();
    let r = check_strict(&l).unwrap();
    assert!(r.violations.iter().any(|v| v.contains("uuid")), "{r}");
    assert!(
        r.violations.iter().any(|v| v.contains("non-zero byte")),
        "{r}"
    );
    assert!(validate_strict(&l).is_err());
    assert_eq!(l.source().size(), 36864);
}
