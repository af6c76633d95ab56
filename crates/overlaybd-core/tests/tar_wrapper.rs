//! The tar wrapper against the upstream vectors: detection of every `.tar`
//! blob and byte-exact headers/footers from the writer.

use std::io::{Cursor, Seek, SeekFrom, Write};

use overlaybd_core::tar::{self, detect, TarPayload, TarWriter};
use overlaybd_core::Error;
use serde_json::Value;

fn manifest() -> Value {
    let p = fixtures::interop().join("manifest.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures::interop().join(rel)).unwrap()
}

/// Every wrapped blob in the manifest with its expected payload.
fn wrapped_vectors(m: &Value) -> Vec<(String, TarPayload)> {
    let mut out = Vec::new();
    let mut add = |file: &Value, tar: &Value| {
        out.push((
            file.as_str().unwrap().to_owned(),
            TarPayload {
                offset: tar["payload_offset"].as_u64().unwrap(),
                size: tar["payload_size"].as_u64().unwrap(),
            },
        ))
    };
    for src in m["zfile"].as_array().unwrap() {
        for o in src["outputs"].as_array().unwrap() {
            if o["tar_wrapped"].as_bool().unwrap() {
                add(&o["file"], o);
            }
        }
    }
    for stack in m["stacks"].as_array().unwrap() {
        for l in stack["layers"].as_array().unwrap() {
            add(&l["file"], &l["tar"]);
        }
    }
    add(
        &m["sealed"]["committed"]["file"],
        &m["sealed"]["committed"]["tar"],
    );
    add(
        &m["discard"]["committed"]["file"],
        &m["discard"]["committed"]["tar"],
    );
    out
}

#[test]
fn detect_every_tar_vector() {
    let m = manifest();
    let v = wrapped_vectors(&m);
    assert_eq!(v.len(), 9);
    for (file, want) in &v {
        let blob = read(file);
        assert_eq!(detect(&blob).unwrap(), Some(*want), "{file}");
        // Extra trailing zero blocks (ACI's content loader) change nothing.
        let mut longer = blob.clone();
        longer.extend_from_slice(&[0u8; 1024]);
        assert_eq!(detect(&longer).unwrap(), Some(*want), "{file} + footer");
    }
    // The `.tar` files in the set that are not wrappers, and non-tar blobs.
    for file in [
        "zfile/source.zstd-32k.zfile",
        "discard/layer.raw.lsmt",
        "sealed/overlaybd.sealed",
    ] {
        assert_eq!(detect(&read(file)).unwrap(), None, "{file}");
    }
    // Ordinary OCI layer tars (first entry a directory) are not wrappers.
    for file in [
        "oci-layers/layer0.tar",
        "oci-layers/layer2.tar",
        "sealed/step1.tar",
    ] {
        match detect(&read(file)) {
            Err(Error::Tar(msg)) => assert!(msg.contains("not a regular file"), "{msg}"),
            other => panic!("{file}: {other:?}"),
        }
    }
}

#[test]
fn writer_reproduces_upstream_bytes() {
    let m = manifest();
    for (file, want) in wrapped_vectors(&m) {
        let blob = read(&file);
        let head = tar::header_blocks(want.size);
        assert_eq!(&blob[..1536], &head[..], "{file}: headers");
        let end = (want.offset + want.size) as usize;
        assert_eq!(&blob[end..], &tar::footer(want.size)[..], "{file}: footer");
        assert_eq!(blob.len() as u64, tar::wrapped_size(want.size));
    }
}

#[test]
fn whole_file_reproduced_from_payload() {
    let payload = read("zfile/source.zstd-32k.zfile");
    let want = read("zfile/source.zstd-32k.zfile.tar");
    assert_eq!(&want[1536..1536 + payload.len()], &payload[..]);

    // Streaming writer into a seekable sink.
    let mut sink = Cursor::new(Vec::new());
    let tw = TarWriter::begin(&mut sink).unwrap();
    // The placeholder alone is reported as incomplete.
    assert!(matches!(detect(sink.get_ref()), Err(Error::TarIncomplete)));
    sink.write_all(&payload).unwrap();
    let total = tw.finish(&mut sink, payload.len() as u64).unwrap();
    assert_eq!(total, want.len() as u64);
    assert_eq!(sink.stream_position().unwrap(), total);
    assert_eq!(sink.get_ref(), &want);

    // Same through `wrap`.
    let mut out = Vec::new();
    tar::wrap(&payload[..], payload.len() as u64, &mut out).unwrap();
    assert_eq!(out, want);

    // A writer that does not start at offset 0 of its sink.
    let mut sink = Cursor::new(vec![9u8; 100]);
    sink.seek(SeekFrom::End(0)).unwrap();
    let tw = TarWriter::begin(&mut sink).unwrap();
    sink.write_all(&payload).unwrap();
    tw.finish(&mut sink, payload.len() as u64).unwrap();
    assert_eq!(&sink.get_ref()[100..], &want[..]);

    // A short payload is an error, not a short blob.
    assert!(tar::wrap(&payload[..10], 11, &mut Vec::new()).is_err());
}

#[test]
fn bad_wrappers_are_typed_errors() {
    let good = read("discard/layer.overlaybd.tar");

    // Bad checksum on a ustar header: error naming both sums.
    let mut bad = good.clone();
    bad[0] ^= 1; // name byte changes the sum
    match detect(&bad) {
        Err(Error::Tar(msg)) => {
            assert!(
                msg.contains("stored 5354") && msg.contains("computed"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    let mut bad = good.clone();
    bad[148..156].copy_from_slice(b"zzzzzzz\0");
    assert!(matches!(detect(&bad), Err(Error::Tar(_))));

    // PAX size past the end of the blob.
    let mut blob = tar::header_blocks(1_000_000);
    blob.extend_from_slice(&[0u8; 4096]);
    match detect(&blob) {
        Err(Error::Tar(msg)) => assert!(msg.contains("past the end"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // u64::MAX size must not overflow.
    let blob = tar::header_blocks(u64::MAX);
    assert!(matches!(detect(&blob), Err(Error::Tar(_))));

    // Truncated inside the headers.
    assert!(matches!(detect(&good[..1024].to_vec()), Err(Error::Tar(_))));
    assert_eq!(detect(&good[..511].to_vec()).unwrap(), None);

    // Garbage PAX records.
    for rec in [
        &b"xx size=1\n"[..],
        b"9 size=0",
        b"12 size=abc\n",
        b"8 path=x\n",
        b"99 size=1\n",
    ] {
        let mut h = tar::header_blocks(5);
        h[512..1024].fill(0);
        h[512..512 + rec.len()].copy_from_slice(rec);
        h.extend_from_slice(&[0u8; 2048]);
        assert!(
            matches!(detect(&h), Err(Error::Tar(_))),
            "{:?}",
            String::from_utf8_lossy(rec)
        );
    }

    // Placeholder on disk that was never patched.
    let mut ph = tar::placeholder_blocks();
    ph.extend_from_slice(&[1u8; 5000]);
    assert!(matches!(detect(&ph), Err(Error::TarIncomplete)));
}

#[test]
fn plain_ustar_without_pax() {
    // A minimal ustar header (typeflag '0', size 5) built by hand.
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"blob");
    h[124..136].copy_from_slice(b"00000000005\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if (148..156).contains(&i) {
                32
            } else {
                c as u32
            }
        })
        .sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h.extend_from_slice(b"hello");
    h.resize(2048, 0);
    assert_eq!(
        detect(&h).unwrap(),
        Some(TarPayload {
            offset: 512,
            size: 5
        })
    );
}
