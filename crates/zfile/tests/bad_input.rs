//! Damaged and hostile inputs: each is a typed error, never a panic or a huge
//! allocation.

mod common;

use std::io;

use common::{build_raw, patch, trailer_off, write_zfile};
use zfile::{flags, validate_strict, Algorithm, Error, OpenOptions, ReadAt, ZFileReader};

fn sample() -> Vec<u8> {
    fixtures::image_like(21, 30_000)
}

/// Small `overlaybd-zfile`-style file (header 0x13, trailer needed).
fn plain() -> Vec<u8> {
    build_raw(&sample(), Algorithm::Lz4, 4096, flags::HEADER_PLAIN)
}

fn open_err(f: &[u8]) -> Error {
    ZFileReader::open(f).expect_err("must not open")
}

fn read_all<R: ReadAt>(r: &ZFileReader<R>) -> zfile::Result<Vec<u8>> {
    let mut out = vec![0u8; r.info().original_size as usize];
    r.read_at(&mut out, 0).map(|_| out)
}

#[test]
fn every_truncation_of_a_plain_file() {
    let f = plain();
    ZFileReader::open(&f[..]).unwrap();
    for cut in 0..f.len() {
        let e = open_err(&f[..cut]);
        assert!(
            matches!(
                e,
                Error::Truncated { .. } | Error::BadMagic { .. } | Error::BadFlags { .. }
            ),
            "cut {cut}: {e}"
        );
    }
}

#[test]
fn every_truncation_of_an_overwritten_header_file() {
    // The fast path never reads the trailer, so cuts that keep the jump table open
    // (as upstream would) but fail strict validation; shorter cuts fail to open.
    let data = sample();
    let f = write_zfile(&data, Algorithm::Zstd, 4096, 1);
    let table_end = trailer_off(&f);
    for cut in 0..f.len() {
        match ZFileReader::open(&f[..cut]) {
            Ok(r) => {
                assert!(cut >= table_end, "cut {cut} opened");
                assert_eq!(read_all(&r).unwrap(), data);
                assert!(validate_strict(&r).is_err());
            }
            Err(e) => {
                assert!(cut < table_end, "cut {cut}: {e}");
                assert!(
                    matches!(e, Error::Truncated { .. } | Error::IndexSize { .. }),
                    "cut {cut}: {e}"
                );
            }
        }
    }
}

#[test]
fn wrong_magic() {
    for off in [0, 5, 8, 23] {
        let mut f = plain();
        f[off] ^= 0x20;
        assert!(matches!(open_err(&f), Error::BadMagic { offset: 0, .. }));
    }
    let mut f = plain();
    let t = trailer_off(&f);
    f[t + 10] ^= 1;
    assert!(matches!(
        open_err(&f),
        Error::BadMagic {
            what: "trailer",
            ..
        }
    ));
    assert!(matches!(open_err(&[0u8; 600]), Error::BadMagic { .. }));
}

#[test]
fn bad_header_and_trailer_digest() {
    let mut f = plain();
    f[100] = 1; // reserved byte, covered by the digest
    assert!(matches!(open_err(&f), Error::HeaderDigest { .. }));
    let mut f = plain();
    f[28] ^= 0xFF;
    assert!(matches!(open_err(&f), Error::HeaderDigest { .. }));
    let mut f = plain();
    let t = trailer_off(&f);
    f[t + 300] = 7;
    assert!(matches!(open_err(&f), Error::TrailerDigest { .. }));
}

#[test]
fn bad_flags() {
    let mut f = plain();
    patch(&mut f, 0, |h| h.flags &= !flags::HEADER);
    assert!(matches!(
        open_err(&f),
        Error::BadFlags { what: "header", .. }
    ));
    // Trailer flags: SEALED or TYPE cleared, or HEADER set.
    let bad_trailer_flags: [fn(&mut u64); 3] = [
        |f| *f &= !flags::SEALED,
        |f| *f &= !flags::TYPE,
        |f| *f |= flags::HEADER,
    ];
    for change in bad_trailer_flags {
        let mut f = plain();
        let t = trailer_off(&f);
        patch(&mut f, t, |h| change(&mut h.flags));
        assert!(matches!(
            open_err(&f),
            Error::BadFlags {
                what: "trailer",
                ..
            }
        ));
    }
    let mut f = plain();
    let t = trailer_off(&f);
    patch(&mut f, t, |h| h.flags |= flags::IDX_COMP);
    assert!(matches!(open_err(&f), Error::Unsupported(_)));
}

#[test]
fn bad_options() {
    let mut f = plain();
    let t = trailer_off(&f);
    patch(&mut f, t, |h| h.algo = 0);
    assert!(matches!(open_err(&f), Error::UnsupportedAlgorithm(0)));
    for bs in [0, 512, 4097, 1 << 17, u32::MAX] {
        let mut f = plain();
        patch(&mut f, t, |h| h.block_size = bs);
        assert!(matches!(open_err(&f), Error::BadBlockSize(b) if b == bs));
    }
    let mut f = plain();
    patch(&mut f, t, |h| h.use_dict = 1);
    assert!(matches!(open_err(&f), Error::Unsupported(_)));
    // A dictionary area that would overlap the jump table.
    let mut f = plain();
    patch(&mut f, t, |h| h.dict_size = u32::MAX);
    assert!(matches!(open_err(&f), Error::IndexSize { .. }));
}

#[test]
fn bad_index_crc() {
    let mut f = plain();
    let t = trailer_off(&f);
    patch(&mut f, t, |h| h.index_crc ^= 1);
    assert!(matches!(open_err(&f), Error::IndexCrc { .. }));
    // Without CALC_DIGEST the CRC is not checked (upstream behaviour).
    patch(&mut f, t, |h| h.flags &= !flags::CALC_DIGEST);
    ZFileReader::open(&f).unwrap();
}

#[test]
fn flipped_block_byte_names_the_block() {
    let data = sample();
    let f0 = write_zfile(&data, Algorithm::Lz4, 4096, 1);
    let r0 = ZFileReader::open(&f0).unwrap();
    for block in [0u64, 3, r0.info().blocks - 1] {
        let (off, len) = r0.block_extent(block);
        for k in [0, len as u64 / 2, len as u64 - 1] {
            let mut f = f0.clone();
            f[(off + k) as usize] ^= 0x40;
            let r = ZFileReader::open(&f).unwrap();
            let e = read_all(&r).unwrap_err();
            assert!(
                matches!(e, Error::BlockCrc { block: b, offset: o, .. } if b == block && o == off),
                "{e}"
            );
            // A read of that block alone, and the verify pass, say the same.
            let mut buf = [0u8; 10];
            let e = r.read_at(&mut buf, block * 4096 + 5).unwrap_err();
            assert!(matches!(e, Error::BlockCrc { block: b, .. } if b == block));
            let e = r.verify().unwrap_err();
            assert!(matches!(e, Error::BlockCrc { block: b, .. } if b == block));
            let p = validate_strict(&r).unwrap_err();
            assert!(
                p.iter().any(|s| s.contains(&format!("block {block} "))),
                "{p:?}"
            );
            // Through ReadAt it is InvalidData carrying the typed error.
            let e = ReadAt::read_at(&r, &mut buf, block * 4096).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(matches!(
                e.get_ref().and_then(|x| x.downcast_ref::<Error>()),
                Some(Error::BlockCrc { .. })
            ));
            // Other blocks still read fine.
            let other = if block == 0 { 1 } else { 0 };
            r.read_at(&mut buf, other * 4096).unwrap();
            // With CRC checks off the damage surfaces (if at all) as a decode error.
            let r = ZFileReader::open_with(
                &f,
                OpenOptions {
                    check_block_crc: false,
                },
            )
            .unwrap();
            // (A flip inside the stored CRC itself leaves the data intact.)
            match read_all(&r) {
                Ok(out) => assert!((out == data) == (k >= u64::from(len) - 4)),
                Err(e) => assert!(matches!(e, Error::Decompress { block: b, .. } if b == block)),
            }
        }
    }
}

#[test]
fn lying_index_size() {
    for n in [
        u64::MAX,
        1 << 62,
        1 << 40,
        2_000_000_000,
        1_000_000_000,
        100_000,
        9,
    ] {
        let mut f = plain();
        let t = trailer_off(&f);
        patch(&mut f, t, |h| h.index_size = n);
        let e = open_err(&f);
        assert!(
            matches!(e, Error::IndexSize { index_size, .. } if index_size == n),
            "{n}: {e}"
        );
    }
    // Original size that disagrees with the block count.
    for orig in [0, 1, 30_000 + 4096, u64::MAX] {
        let mut f = plain();
        let t = trailer_off(&f);
        patch(&mut f, t, |h| h.original_size = orig);
        assert!(matches!(open_err(&f), Error::IndexSize { .. }), "{orig}");
    }
    // index_offset past the trailer, or so low the blocks overrun it.
    for io in [u64::MAX, 1 << 40, 0, 511, 600] {
        let mut f = plain();
        let t = trailer_off(&f);
        patch(&mut f, t, |h| h.index_offset = io);
        let e = open_err(&f);
        assert!(
            matches!(
                e,
                Error::IndexSize { .. } | Error::JumpTable { .. } | Error::BlockTooLarge { .. }
            ),
            "{io}: {e}"
        );
    }
    // The same lies in an overwritten header (no trailer to bound them).
    let mut f = write_zfile(&sample(), Algorithm::Lz4, 4096, 1);
    patch(&mut f, 0, |h| h.index_size = 1 << 40);
    assert!(matches!(open_err(&f), Error::IndexSize { .. }));
}

/// A source that claims to be huge but holds only a real file at its start.
struct Liar(Vec<u8>);

impl ReadAt for Liar {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        1 << 50
    }
}

#[test]
fn lying_source_size_does_not_allocate_what_it_claims() {
    let mut f = write_zfile(&sample(), Algorithm::Lz4, 4096, 1);
    // 10^9 blocks "fit" in a 1 PiB source; reading the table must fail early.
    patch(&mut f, 0, |h| {
        h.index_size = 1_000_000_000;
        h.original_size = 4096 * 1_000_000_000;
    });
    let e = ZFileReader::open(Liar(f)).unwrap_err();
    assert!(
        matches!(e, Error::Truncated { .. } | Error::JumpTable { .. }),
        "{e}"
    );
}

#[test]
fn jump_table_entry_beyond_codec_bound() {
    let f0 = plain();
    let r = ZFileReader::open(&f0).unwrap();
    let io = r.info().index_offset as usize;
    for (block, len) in [
        (0usize, 70_000u32),
        (2, 4096 + 4096 / 255 + 17 + 500),
        (7, u32::MAX),
    ] {
        let mut f = f0.clone();
        f[io + 4 * block..io + 4 * block + 4].copy_from_slice(&len.to_le_bytes());
        let e = open_err(&f);
        assert!(
            matches!(e, Error::BlockTooLarge { block: b, len: l, .. } if b == block as u64 && l == len),
            "{e}"
        );
        assert!(e
            .to_string()
            .contains("compressed block larger than its buffer"));
    }
    for len in [0u32, 4] {
        let mut f = f0.clone();
        f[io..io + 4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(open_err(&f), Error::JumpTable { block: 0, .. }));
    }
    // Lengths whose sum runs past the jump table.
    let mut f = f0.clone();
    let l = u32::from_le_bytes(f[io..io + 4].try_into().unwrap());
    f[io..io + 4].copy_from_slice(&(l + 600).to_le_bytes());
    assert!(matches!(open_err(&f), Error::JumpTable { .. }));
}

#[test]
fn block_decoding_to_the_wrong_size() {
    let data = sample(); // 30,000 bytes: last block holds 1,328
    for algo in [Algorithm::Lz4, Algorithm::Zstd] {
        for delta in [-100i64, 100] {
            let mut f = build_raw(&data, algo, 4096, flags::HEADER_PLAIN);
            let t = trailer_off(&f);
            patch(&mut f, t, |h| h.original_size = (30_000 + delta) as u64);
            let r = ZFileReader::open(&f).unwrap();
            let e = read_all(&r).unwrap_err();
            assert!(
                matches!(e, Error::Decompress { block: 7, .. }),
                "{algo} {delta}: {e}"
            );
            // Earlier blocks are fine.
            let mut buf = vec![0u8; 4096];
            r.read_at(&mut buf, 4096).unwrap();
            assert_eq!(buf, data[4096..8192]);
        }
    }
}

#[test]
fn garbage_never_panics() {
    let f0 = plain();
    let mut rng = fixtures::Rng::new(77);
    for _ in 0..3000 {
        let mut f = f0.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(f.len() as u64) as usize;
            f[i] = rng.next_u64() as u8;
        }
        if rng.below(3) == 0 {
            // Keep the digests valid so deeper checks run.
            let t = trailer_off(&f);
            if zfile::Header::parse_at(&f[t..], "t", 0).is_ok() {
                patch(&mut f, t, |_| {});
            }
            if zfile::Header::parse(&f).is_ok() {
                patch(&mut f, 0, |_| {});
            }
        }
        if let Ok(r) = ZFileReader::open(&f) {
            let _ = read_all(&r);
            let _ = r.verify();
            let _ = validate_strict(&r);
            let mut buf = [0u8; 5000];
            let _ = r.read_at(&mut buf, rng.below(40_000));
        }
    }
}
