//! The writable layer against a naive byte-array model: after writes and
//! discards, after reopen, after seal and after commit.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use overlaybd_core::lsmt::commit::CommitOptions;
use overlaybd_core::lsmt::header::Uuid;
use overlaybd_core::lsmt::validate::validate_strict;
use overlaybd_core::lsmt::{CreateOptions, RoKind, RoLayer, Segment, WritableLayer};
use overlaybd_core::{Error, FileSource};
use proptest::prelude::*;

const VSIZE_SECTORS: u64 = 4096; // 2 MiB device

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, len: u64, seed: u64 },
    Discard { sector: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..VSIZE_SECTORS, 1u64..300, any::<u64>()).prop_map(|(s, l, seed)| Op::Write {
            sector: s,
            len: l.min(VSIZE_SECTORS - s),
            seed
        }),
        1 => (0..VSIZE_SECTORS, 1u64..2000).prop_map(|(s, l)| Op::Discard {
            sector: s,
            len: l.min(VSIZE_SECTORS - s)
        }),
    ]
}

fn opts() -> CreateOptions {
    CreateOptions {
        virtual_size: VSIZE_SECTORS * 512,
        uuid: Uuid::parse("29c78dec-41b6-4019-9723-d4ddc4fa6113").unwrap(),
        parent_uuid: Uuid::parse("2C09DED6DE1C5AD909358B4C9726DF9B").unwrap(),
    }
}

fn apply(l: &mut WritableLayer, model: &mut [u8], op: &Op) {
    match *op {
        Op::Write { sector, len, seed } => {
            let mut buf = vec![0u8; (len * 512) as usize];
            fixtures::Rng::new(seed).fill(&mut buf);
            l.write_at(&buf, sector * 512).unwrap();
            model[(sector * 512) as usize..((sector + len) * 512) as usize].copy_from_slice(&buf);
        }
        Op::Discard { sector, len } => {
            l.discard(sector * 512, len * 512).unwrap();
            model[(sector * 512) as usize..((sector + len) * 512) as usize].fill(0);
        }
    }
}

fn check_sorted(segs: &[Segment]) {
    assert!(
        segs.windows(2).all(|w| w[0].end() <= w[1].offset),
        "{segs:?}"
    );
    assert!(segs
        .iter()
        .all(|s| s.length > 0 && s.length <= Segment::MAX_LENGTH && s.tag == 0));
}

fn read_all_w(l: &WritableLayer) -> Vec<u8> {
    let mut v = vec![0xEEu8; (VSIZE_SECTORS * 512) as usize];
    assert_eq!(l.read_at(&mut v, 0).unwrap(), v.len());
    v
}

fn read_all_r(l: &RoLayer) -> Vec<u8> {
    let mut v = vec![0xEEu8; (VSIZE_SECTORS * 512) as usize];
    assert_eq!(l.read_at(&mut v, 0).unwrap(), v.len());
    v
}

fn paths(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.join("data"), dir.join("index"))
}

fn run(ops: &[Op], probes: &[(u64, usize)]) {
    let dir = tempfile::tempdir().unwrap();
    let (dp, ip) = paths(dir.path());
    let mut model = vec![0u8; (VSIZE_SECTORS * 512) as usize];
    let mut l = WritableLayer::create(&dp, &ip, opts()).unwrap();
    for op in ops {
        apply(&mut l, &mut model, op);
    }
    check_sorted(&l.segments());
    assert!(read_all_w(&l) == model, "writable read differs");
    // Unaligned probes.
    for &(off, len) in probes {
        let off = off % (VSIZE_SECTORS * 512);
        let len = len.min((VSIZE_SECTORS * 512 - off) as usize);
        let mut b = vec![0xEEu8; len];
        l.read_at(&mut b, off).unwrap();
        assert_eq!(b[..], model[off as usize..off as usize + len]);
    }
    l.fsync().unwrap();
    let segs = l.segments();

    // Commit straight from the RW pair.
    let mut committed = Vec::new();
    let co = CommitOptions {
        uuid: Some(opts().uuid),
        user_tag: b"prop".to_vec(),
        ..CommitOptions::default()
    };
    let info = l.commit(&co, &mut committed).unwrap();
    assert_eq!(info.bytes, committed.len() as u64);
    drop(l);

    // Reopen replays the log to the same index.
    let l = WritableLayer::open(&dp, &ip).unwrap();
    assert_eq!(l.segments(), segs);
    assert!(read_all_w(&l) == model, "reopened read differs");

    let c = RoLayer::from_bytes(committed.clone()).unwrap();
    assert!(read_all_r(&c) == model, "committed read differs");
    let r = validate_strict(&c).unwrap();
    assert!(r.is_clean(), "{r}");
    assert_eq!(c.header().uuid().unwrap(), opts().uuid);
    assert_eq!(c.header().parent_uuid().unwrap(), opts().parent_uuid);
    assert_eq!(c.virtual_size(), VSIZE_SECTORS * 512);

    // Seal; the data file is a read-only layer with the same content.
    let info = l.seal().unwrap();
    assert_eq!(info.index_size, segs.len() as u64);
    let s = RoLayer::open(Arc::new(FileSource::open(&dp).unwrap())).unwrap();
    assert_eq!(s.kind(), RoKind::Sealed);
    assert_eq!(s.segments(), &segs[..]);
    assert!(read_all_r(&s) == model, "sealed read differs");
    let r = validate_strict(&s).unwrap();
    assert_eq!(r.kind, RoKind::Sealed);
    // A sealed file can no longer be opened writable.
    assert!(WritableLayer::open(&dp, &ip).is_err());

    // --commit_sealed gives the same bytes as committing the RW pair.
    let mut again = Vec::new();
    s.commit(&co, &mut again).unwrap();
    assert!(
        again == committed,
        "commit of sealed differs from commit of RW"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn model_agrees(ops in prop::collection::vec(op(), 1..40),
                    probes in prop::collection::vec((any::<u64>(), 0usize..5000), 0..4)) {
        run(&ops, &probes);
    }
}

#[test]
fn empty_layer() {
    run(&[], &[(1, 1)]);
}

#[test]
fn large_write_and_discard_split() {
    let dir = tempfile::tempdir().unwrap();
    let (dp, ip) = paths(dir.path());
    let mut l = WritableLayer::create(
        &dp,
        &ip,
        CreateOptions {
            virtual_size: 64 << 20,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let data = fixtures::image_like(3, 9 << 20);
    l.write_at(&data, 1 << 20).unwrap();
    // 9 MiB -> 4 + 4 + 1 MiB entries.
    let segs = l.segments();
    assert_eq!(
        segs,
        vec![
            Segment::data(2048, 8192, 8),
            Segment::data(2048 + 8192, 8192, 8 + 8192),
            Segment::data(2048 + 16384, 2048, 8 + 16384),
        ]
    );
    // A 20 MiB discard -> pieces of 16383 sectors, moffset = data EOF.
    l.discard(30 << 20, 20 << 20).unwrap();
    let z: Vec<Segment> = l.segments().into_iter().filter(|s| s.zeroed).collect();
    assert_eq!(z.len(), 3);
    assert_eq!(z[0].length, 16383);
    assert_eq!(z[1].length, 16383);
    assert_eq!(z[2].length, 40960 - 2 * 16383);
    assert!(z.iter().all(|s| s.moffset == 8 + 18432));
    // Unaligned requests are rejected.
    assert!(matches!(
        l.write_at(&[0u8; 100], 0),
        Err(Error::BadRequest(_))
    ));
    assert!(matches!(
        l.write_at(&[0u8; 512], 1),
        Err(Error::BadRequest(_))
    ));
    assert!(matches!(l.discard(512, 100), Err(Error::BadRequest(_))));

    let mut out = Vec::new();
    let info = l.commit(&CommitOptions::default(), &mut out).unwrap();
    // Data: 18432 sectors in 64-sector pieces merged below 16383 -> 16320 + 2112.
    // Zeroed: 16383 + 16383 don't merge (sum >= 16383), nor does the tail.
    let c = RoLayer::from_bytes(out).unwrap();
    assert_eq!(
        c.segments(),
        &[
            Segment::data(2048, 16320, 8),
            Segment::data(2048 + 16320, 2112, 8 + 16320),
            Segment {
                offset: 61440,
                length: 16383,
                moffset: 8 + 18432,
                zeroed: true,
                tag: 0
            },
            Segment {
                offset: 61440 + 16383,
                length: 16383,
                moffset: 8 + 18432,
                zeroed: true,
                tag: 0
            },
            Segment {
                offset: 61440 + 32766,
                length: 40960 - 32766,
                moffset: 8 + 18432,
                zeroed: true,
                tag: 0
            },
        ]
    );
    assert_eq!(
        (info.entries, info.padding, info.data_sectors),
        (5, 251, 18432)
    );
    assert!(validate_strict(&c).unwrap().is_clean());
    let mut b = vec![0u8; data.len()];
    c.read_at(&mut b, 1 << 20).unwrap();
    assert!(b == data);
}

#[test]
fn torn_index_tail_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (dp, ip) = paths(dir.path());
    let mut model = vec![0u8; (VSIZE_SECTORS * 512) as usize];
    let mut l = WritableLayer::create(&dp, &ip, opts()).unwrap();
    apply(
        &mut l,
        &mut model,
        &Op::Write {
            sector: 10,
            len: 20,
            seed: 1,
        },
    );
    apply(&mut l, &mut model, &Op::Discard { sector: 15, len: 3 });
    drop(l);
    // A crash mid-append leaves 7 bytes of a partial entry.
    let mut f = OpenOptions::new().append(true).open(&ip).unwrap();
    f.write_all(&[0xAB; 7]).unwrap();
    drop(f);
    let mut l = WritableLayer::open(&dp, &ip).unwrap();
    assert!(read_all_w(&l) == model);
    // Later appends land on entry boundaries.
    apply(
        &mut l,
        &mut model,
        &Op::Write {
            sector: 100,
            len: 8,
            seed: 2,
        },
    );
    drop(l);
    assert_eq!(std::fs::metadata(&ip).unwrap().len(), 4096 + 3 * 16);
    let l = WritableLayer::open(&dp, &ip).unwrap();
    assert!(read_all_w(&l) == model);

    // Padding entries in the log (group commit) are skipped.
    drop(l);
    let mut f = OpenOptions::new().append(true).open(&ip).unwrap();
    f.write_all(&Segment::INVALID.encode()).unwrap();
    drop(f);
    let l = WritableLayer::open(&dp, &ip).unwrap();
    assert!(read_all_w(&l) == model);
}

#[test]
fn bad_rw_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let (dp, ip) = paths(dir.path());
    let l = WritableLayer::create(&dp, &ip, opts()).unwrap();
    drop(l);
    // Swapped files: the index header is not a data header.
    assert!(matches!(
        WritableLayer::open(&ip, &dp),
        Err(Error::InFile { .. })
    ));
    // An entry pointing past the data file.
    let mut f = OpenOptions::new().append(true).open(&ip).unwrap();
    f.write_all(&Segment::data(0, 8, 1000).encode()).unwrap();
    drop(f);
    match WritableLayer::open(&dp, &ip) {
        Err(e @ Error::InFile { .. }) => assert!(e.to_string().contains("moffset"), "{e}"),
        other => panic!("{other:?}"),
    }
    // Truncated headers.
    std::fs::write(&ip, [0u8; 100]).unwrap();
    assert!(WritableLayer::open(&dp, &ip).is_err());
}
