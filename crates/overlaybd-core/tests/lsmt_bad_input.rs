//! Malformed LSMT files: each is a typed error, never a panic or a huge
//! allocation.

use std::sync::Arc;

use overlaybd_core::lsmt::header::HeaderTrailer;
use overlaybd_core::lsmt::ro::RoOptions;
use overlaybd_core::lsmt::validate::{check_strict, validate_strict};
use overlaybd_core::lsmt::{RoLayer, Segment};
use overlaybd_core::{Error, ReadAt, Window};

const TRAILER: usize = 36864 - 4096;
const INDEX: usize = 28672;

fn discard_raw() -> Vec<u8> {
    std::fs::read(fixtures::interop().join("discard/layer.raw.lsmt")).unwrap()
}

fn open(b: Vec<u8>) -> overlaybd_core::Result<RoLayer> {
    RoLayer::from_bytes(b)
}

fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn set_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn set_entry(b: &mut [u8], i: usize, s: Segment) {
    b[INDEX + 16 * i..INDEX + 16 * i + 16].copy_from_slice(&s.encode());
}
fn entry(b: &[u8], i: usize) -> Segment {
    Segment::decode(b[INDEX + 16 * i..INDEX + 16 * i + 16].try_into().unwrap())
}

#[test]
fn truncated_at_many_cut_points() {
    for file in ["discard/layer.raw.lsmt", "sealed/overlaybd.sealed"] {
        let full: Arc<Vec<u8>> = Arc::new(std::fs::read(fixtures::interop().join(file)).unwrap());
        let len = full.len() as u64;
        let mut cuts: Vec<u64> = (0..64).map(|i| i * 97).collect();
        cuts.extend([
            4095,
            4096,
            4097,
            8191,
            8192,
            len / 2,
            len - 4097,
            len - 4096,
            len - 1,
        ]);
        let mut rng = fixtures::Rng::new(11);
        cuts.extend((0..64).map(|_| rng.below(len)));
        for cut in cuts {
            let w = Window::new(full.clone(), 0, cut);
            let r = RoLayer::open(Arc::new(w));
            assert!(r.is_err(), "{file} cut at {cut} opened");
        }
        // Trailing garbage moves the trailer: also rejected.
        let mut longer = (*full).clone();
        longer.extend_from_slice(&[0u8; 512]);
        assert!(matches!(
            open(longer),
            Err(Error::BadMagic { what: "trailer" })
        ));
    }
}

#[test]
fn wrong_magic() {
    let mut b = discard_raw();
    b[0] = b'X';
    assert!(matches!(open(b), Err(Error::BadMagic { what: "header" })));
    let mut b = discard_raw();
    b[8] ^= 0xFF;
    assert!(matches!(open(b), Err(Error::BadMagic { what: "header" })));
    let mut b = discard_raw();
    b[TRAILER + 20] ^= 1;
    assert!(matches!(open(b), Err(Error::BadMagic { what: "trailer" })));
    assert!(matches!(open(vec![0u8; 100]), Err(Error::Truncated { .. })));
    assert!(matches!(open(Vec::new()), Err(Error::Truncated { .. })));
}

#[test]
fn wrong_flags() {
    let cases: [(usize, u32, &str); 7] = [
        (28, 0x06, "header"),            // header bit clear
        (28, 0x01, "header"),            // index file
        (28, 0x05, "header"),            // index file, sealed
        (TRAILER + 28, 0x07, "trailer"), // header bit in trailer
        (TRAILER + 28, 0x02, "trailer"), // not sealed
        (TRAILER + 28, 0x04, "trailer"), // not data
        (TRAILER + 28, 0x00, "trailer"),
    ];
    for (at, v, what) in cases {
        let mut b = discard_raw();
        set_u32(&mut b, at, v);
        match open(b) {
            Err(Error::BadField {
                what: w,
                field: "flags",
                ..
            }) => assert_eq!(w, what),
            other => panic!("flags {v:#x} at {at}: {other:?}"),
        }
    }
    let mut b = discard_raw();
    set_u32(&mut b, 28, 0x13);
    assert!(matches!(open(b), Err(Error::Unsupported(_))));
}

#[test]
fn entries_out_of_order_or_overlapping() {
    let mut b = discard_raw();
    let (e0, e1) = (entry(&b, 0), entry(&b, 1));
    set_entry(&mut b, 0, e1);
    set_entry(&mut b, 1, e0);
    assert!(matches!(open(b), Err(Error::IndexOrder { index: 1, .. })));

    let mut b = discard_raw();
    let mut e1 = entry(&b, 1);
    e1.offset = 5600 + 127; // overlaps entry 0 (5600+128)
    set_entry(&mut b, 1, e1);
    assert!(matches!(
        open(b),
        Err(Error::IndexOrder {
            index: 1,
            prev_end: 5728,
            offset: 5727
        })
    ));

    // Invalid entries in the middle are dropped, not reordered.
    let mut b = discard_raw();
    let e4 = entry(&b, 4);
    set_entry(&mut b, 4, Segment::INVALID);
    set_entry(&mut b, 5, e4);
    assert_eq!(open(b).unwrap().segments().len(), 5);
}

#[test]
fn moffset_out_of_range() {
    let limit = INDEX as u64 / 512; // 56
    for (i, moffset) in [
        (1usize, 7u64),
        (1, 56),
        (1, 50),
        (4, 1 << 40),
        (0, 57),
        (0, 3),
    ] {
        let mut b = discard_raw();
        let mut e = entry(&b, i);
        e.moffset = moffset;
        set_entry(&mut b, i, e);
        match open(b) {
            Err(Error::MoffsetRange {
                index, limit: l, ..
            }) => {
                assert_eq!((index, l), (i, limit));
            }
            other => panic!("entry {i} moffset {moffset}: {other:?}"),
        }
    }
    // A zeroed entry may sit exactly at the limit.
    let mut b = discard_raw();
    let mut e = entry(&b, 0);
    e.moffset = limit;
    set_entry(&mut b, 0, e);
    assert!(open(b).is_ok());
}

#[test]
fn lying_index_size() {
    // Huge: above the RO limit.
    let mut b = discard_raw();
    set_u64(&mut b, TRAILER + 40, 1 << 40);
    assert!(
        matches!(open(b), Err(Error::TooManyEntries { count, max: 1_000_000, .. }) if count == 1 << 40)
    );
    // Under the limit but larger than the file holds; one entry too many for
    // the room before the trailer.
    for count in [999_999, 257] {
        let mut b = discard_raw();
        set_u64(&mut b, TRAILER + 40, count);
        assert!(
            matches!(
                open(b),
                Err(Error::BadField {
                    field: "index_size",
                    ..
                })
            ),
            "{count}"
        );
    }
    // With the limit lifted, u64::MAX entries must not overflow or allocate.
    let mut b = discard_raw();
    set_u64(&mut b, TRAILER + 40, u64::MAX);
    let r = RoLayer::open_with(
        Arc::new(b),
        &RoOptions {
            max_index_size: u64::MAX,
        },
    );
    assert!(matches!(
        r,
        Err(Error::BadField {
            field: "index_size",
            ..
        })
    ));
    // index_offset past the trailer.
    let mut b = discard_raw();
    set_u64(&mut b, TRAILER + 32, u64::MAX);
    assert!(matches!(
        open(b),
        Err(Error::BadField {
            field: "index_offset",
            ..
        })
    ));
    // A custom, lower limit.
    let r = RoLayer::open_with(
        Arc::new(discard_raw()),
        &RoOptions {
            max_index_size: 255,
        },
    );
    assert!(matches!(
        r,
        Err(Error::TooManyEntries {
            count: 256,
            max: 255,
            ..
        })
    ));
}

#[test]
fn tags_are_forced_to_zero() {
    let mut b = discard_raw();
    let mut e = entry(&b, 1);
    e.tag = 3;
    set_entry(&mut b, 1, e);
    let l = open(b).unwrap();
    assert!(l.segments().iter().all(|s| s.tag == 0));
    // ... but strict validation reports the stored tag.
    let r = check_strict(&l).unwrap();
    assert!(r.violations.iter().any(|v| v.contains("tag 3")), "{r}");
}

#[test]
fn strict_rules() {
    // Each mutation keeps the file readable but breaks a writer rule.
    type Mutate = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Mutate)> = vec![
        ("header flags", |b| set_u32(b, 28, 0x03 | 0x04 | 0x08)),
        ("index_offset/index_size", |b| set_u64(b, 40, 1)),
        ("size field", |b| set_u32(b, 24, 391)),
        ("version", |b| b[133] = 2),
        ("reserved", |b| b[130] = 1),
        ("uuid", |b| b[TRAILER + 93] = b'g'),
        ("user_tag", |b| b[134 + 200] = b'x'),
        ("disagree", |b| set_u64(b, 48, 1 << 20)),
        ("should have been merged", |b| {
            // Split the first zeroed entry (5600+128) in two adjacent halves,
            // using the padding slot after the last valid entry.
            let e: Vec<Segment> = (0..5).map(|i| entry(b, i)).collect();
            let mut a = e[0];
            a.length = 64;
            let mut c = e[0];
            c.offset += 64;
            c.length = 64;
            set_entry(b, 0, a);
            set_entry(b, 1, c);
            for (i, s) in e[1..].iter().enumerate() {
                set_entry(b, i + 2, *s);
            }
        }),
        ("data cursor", |b| {
            // Data entry 1 (6400+32 at 8) moved to moffset 9: still in range.
            let mut e = entry(b, 1);
            e.moffset = 9;
            set_entry(b, 1, e);
        }),
        ("padding", |b| {
            // A valid entry after padding (past all others, data at 8).
            set_entry(b, 200, Segment::data(2_000_000, 1, 8));
        }),
    ];
    for (what, f) in cases {
        let mut b = discard_raw();
        f(&mut b);
        let l = open(b).unwrap_or_else(|e| panic!("{what}: {e}"));
        match validate_strict(&l) {
            Err(Error::Rule(msg)) => assert!(msg.contains(what), "{what}: {msg}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let base = discard_raw();
    let mut rng = fixtures::Rng::new(5);
    for _ in 0..400 {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(8) {
            // Bias towards the structured regions.
            let at = match rng.below(3) {
                0 => rng.below(390),
                1 => INDEX as u64 + rng.below(16 * 8),
                _ => TRAILER as u64 + rng.below(390),
            } as usize;
            b[at] = rng.next_u64() as u8;
        }
        if let Ok(l) = open(b) {
            let mut buf = vec![0u8; 8192];
            for off in [
                0u64,
                5600 * 512 - 100,
                1200800 * 512,
                l.extent().saturating_sub(10),
            ] {
                let _ = l.read_at(&mut buf, off);
            }
            let _ = check_strict(&l);
            let _ = HeaderTrailer::parse(&l.header().encode(), "header").unwrap();
            assert!(l.source().size() > 0);
        }
    }
}
