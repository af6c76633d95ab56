//! Writer -> reader round trips.

mod common;

use std::io::Cursor;

use common::write_zfile;
use proptest::prelude::*;
use zfile::{flags, validate_strict, Algorithm, Error, Options, ZFileReader, ZFileWriter};

const ALGOS: [Algorithm; 2] = [Algorithm::Lz4, Algorithm::Zstd];
const SIZES: [u32; 4] = [4096, 8192, 16384, 32768];

fn check_all(data: &[u8], f: &[u8], algo: Algorithm, bs: u32) {
    let r = ZFileReader::open(f).unwrap();
    let i = r.info();
    assert_eq!((i.algorithm, i.block_size), (algo, bs));
    assert_eq!(i.original_size, data.len() as u64);
    assert_eq!(i.blocks, (data.len() as u64).div_ceil(u64::from(bs)));
    assert_eq!(
        (i.header_flags, i.trailer_flags),
        (flags::HEADER_FINAL, None)
    );
    assert!(i.header_overwritten);
    validate_strict(&r).unwrap();
    r.verify().unwrap();
    let mut out = vec![0u8; data.len() + 7];
    assert_eq!(r.read_at(&mut out, 0).unwrap(), data.len());
    assert!(out[..data.len()] == *data);
    assert_eq!(r.read_at(&mut out, data.len() as u64).unwrap(), 0);
}

#[test]
fn edge_lengths_all_codecs_and_block_sizes() {
    let big = fixtures::image_like(11, (5 << 20) + 123);
    for algo in ALGOS {
        for bs in SIZES {
            let b = bs as usize;
            let mut lens = vec![0, 1, b - 1, b, b + 1, 3 * b, (1 << 20) - 1, (1 << 20) + 1];
            if algo == Algorithm::Lz4 || bs == 32768 {
                lens.push(big.len());
            }
            for len in lens {
                let data = &big[..len];
                let f = write_zfile(data, algo, bs, 1);
                check_all(data, &f, algo, bs);
            }
        }
    }
}

#[test]
fn output_independent_of_thread_count() {
    let data = fixtures::image_like(5, (3 << 20) + 4321);
    for algo in ALGOS {
        let one = write_zfile(&data, algo, 4096, 1);
        for t in [2, 4, 0] {
            assert!(
                write_zfile(&data, algo, 4096, t) == one,
                "{algo} threads {t}"
            );
        }
        check_all(&data, &one, algo, 4096);
    }
}

#[test]
fn writes_at_a_base_offset_and_stays_at_the_end() {
    let data = fixtures::image_like(2, 300_000);
    let mut cur = Cursor::new(b"prefix".to_vec());
    cur.set_position(6);
    let (mut cur, info) = ZFileWriter::new(cur, Options::default())
        .and_then(|mut w| {
            w.append(&data)?;
            w.finish()
        })
        .unwrap();
    assert_eq!(cur.position(), 6 + info.zfile_size);
    std::io::Write::write_all(&mut cur, b"suffix").unwrap();
    let all = cur.into_inner();
    assert_eq!(&all[..6], b"prefix");
    let z = &all[6..all.len() - 6];
    let r = ZFileReader::open(z).unwrap();
    let mut out = Vec::new();
    zfile::decompress(z, &mut out).unwrap();
    assert_eq!(out, data);
    // The Info from finish() matches what the reader sees, trailer fields aside.
    let mut ri = r.info().clone();
    ri.trailer_flags = Some(flags::TRAILER);
    ri.trailer_digest = info.trailer_digest;
    assert_eq!(ri, info);
}

#[test]
fn compress_helper_and_writer_agree() {
    let data = fixtures::image_like(3, 2_000_000);
    let opts = Options {
        algorithm: Algorithm::Zstd,
        block_size: 16384,
        threads: 2,
        ..Default::default()
    };
    let mut a = Cursor::new(Vec::new());
    let info = zfile::compress(&data[..], &mut a, opts).unwrap();
    assert_eq!(info.zfile_size, a.get_ref().len() as u64);
    assert!(a.into_inner() == write_zfile(&data, Algorithm::Zstd, 16384, 1));
}

#[test]
fn trailer_path_reads_our_output() {
    // Our output with the header turned back into an `overlaybd-zfile`-style 0x13
    // header (index fields zero) must be read through the trailer.
    let data = fixtures::image_like(4, 100_000);
    let mut f = write_zfile(&data, Algorithm::Lz4, 8192, 1);
    common::patch(&mut f, 0, |h| {
        h.flags = flags::HEADER_PLAIN;
        h.index_offset = 0;
        h.index_size = 0;
        h.original_size = 0;
        h.index_crc = 0;
    });
    let r = ZFileReader::open(&f).unwrap();
    assert_eq!(r.info().trailer_flags, Some(flags::TRAILER));
    validate_strict(&r).unwrap();
    let mut out = vec![0u8; data.len()];
    r.read_at(&mut out, 0).unwrap();
    assert_eq!(out, data);
}

#[test]
fn block_size_64k_is_read_only() {
    let w = ZFileWriter::new(
        Cursor::new(Vec::new()),
        Options {
            block_size: 65536,
            ..Options::default()
        },
    );
    assert!(matches!(w, Err(Error::BadBlockSize(65536))));
    for bs in [0, 1000, 2048, 131072] {
        let o = Options {
            block_size: bs,
            ..Options::default()
        };
        assert!(ZFileWriter::new(Cursor::new(Vec::new()), o).is_err());
    }

    // Hand-built 64 KiB-block files with incompressible blocks (stored > 65,536 B,
    // which upstream cannot read): we read them, strict validation flags them.
    let mut data = vec![0u8; 200_000];
    fixtures::Rng::new(9).fill(&mut data);
    for algo in ALGOS {
        let f = common::build_raw(&data, algo, 65536, flags::HEADER_PLAIN);
        let r = ZFileReader::open(&f).unwrap();
        assert!(r.block_extent(0).1 > 65536);
        r.verify().unwrap();
        let mut out = vec![0u8; data.len()];
        r.read_at(&mut out, 0).unwrap();
        assert_eq!(out, data);
        let problems = validate_strict(&r).unwrap_err();
        assert!(problems.iter().any(|p| p.contains("block_size 65536")));
        assert!(problems.iter().any(|p| p.contains("> 65536")));
    }
}

#[test]
fn reader_is_shareable_across_threads() {
    let data = fixtures::image_like(8, 1 << 20);
    let f = write_zfile(&data, Algorithm::Lz4, 4096, 1);
    let r = ZFileReader::open(&f).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (r, data) = (&r, &data);
            s.spawn(move || {
                let mut rng = fixtures::Rng::new(t);
                let mut buf = vec![0u8; 10_000];
                for _ in 0..300 {
                    let off = rng.below(data.len() as u64);
                    let n = r.read_at(&mut buf, off).unwrap();
                    assert_eq!(&buf[..n], &data[off as usize..off as usize + n]);
                }
            });
        }
    });
}

#[test]
fn nested_zfile_source() {
    // A ZFile whose content is itself a ZFile: the inner reader reads through the
    // outer one on the same thread (thread-local scratch must not conflict).
    let data = fixtures::image_like(12, 200_000);
    let inner = write_zfile(&data, Algorithm::Zstd, 4096, 1);
    let outer = write_zfile(&inner, Algorithm::Lz4, 8192, 1);
    let r = ZFileReader::open(ZFileReader::open(outer).unwrap()).unwrap();
    let mut out = vec![0u8; data.len()];
    assert_eq!(r.read_at(&mut out, 0).unwrap(), data.len());
    assert_eq!(out, data);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_reads_match(
        seed in any::<u64>(),
        len in prop_oneof![0usize..20_000, 20_000usize..1_500_000],
        algo in prop::sample::select(ALGOS.to_vec()),
        bs in prop::sample::select(SIZES.to_vec()),
        threads in 1usize..4,
        reads in prop::collection::vec((any::<u64>(), 0usize..100_000), 1..40),
    ) {
        let data = fixtures::image_like(seed, len);
        let f = write_zfile(&data, algo, bs, threads);
        let r = ZFileReader::open(&f).unwrap();
        prop_assert!(validate_strict(&r).is_ok());
        let mut buf = vec![0u8; 100_000];
        for (off, n) in reads {
            let off = off % (len as u64 + 100);
            let got = r.read_at(&mut buf[..n], off).unwrap();
            let lo = (off as usize).min(len);
            let hi = (off as usize + n).min(len);
            prop_assert_eq!(got, hi - lo);
            prop_assert!(buf[..got] == data[lo..hi]);
        }
    }
}

#[test]
fn write_patterns_and_thread_counts_give_identical_bytes() {
    // Large writes take the in-place (bulk) path, small ones the buffered path;
    // mixes switch between them. Every combination must produce the same file.
    let data = fixtures::image_like(31, (6 << 20) + 4097);
    let patterns: [&[usize]; 5] = [
        &[usize::MAX],
        &[100, usize::MAX],
        &[3 << 20, 10, 4 << 20, usize::MAX],
        &[(1 << 20) - 1, 2, (2 << 20) + 5, 1, usize::MAX],
        &[65_536; 200],
    ];
    for algo in ALGOS {
        let mut reference: Option<Vec<u8>> = None;
        for threads in [1, 2, 3] {
            for pattern in patterns {
                let opts = Options {
                    algorithm: algo,
                    block_size: 8192,
                    threads,
                    ..Default::default()
                };
                let mut w = ZFileWriter::new(Cursor::new(Vec::new()), opts).unwrap();
                let mut rest = &data[..];
                for &n in pattern.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (a, b) = rest.split_at(n.min(rest.len()));
                    std::io::Write::write_all(&mut w, a).unwrap();
                    rest = b;
                }
                let out = w.finish().unwrap().0.into_inner();
                match &reference {
                    None => {
                        check_all(&data, &out, algo, 8192);
                        reference = Some(out);
                    }
                    Some(r) => assert!(*r == out, "{algo} threads {threads} {pattern:?}"),
                }
            }
        }
        // The compress() helper agrees too, with whole and with trickling reads.
        let reference = reference.unwrap();
        for threads in [1, 2] {
            let opts = Options {
                algorithm: algo,
                block_size: 8192,
                threads,
                ..Default::default()
            };
            let mut c = Cursor::new(Vec::new());
            zfile::compress(&data[..], &mut c, opts).unwrap();
            assert!(c.into_inner() == reference);
            let mut c = Cursor::new(Vec::new());
            let info = zfile::compress(Trickle(&data[..]), &mut c, opts).unwrap();
            assert_eq!(info.original_size, data.len() as u64);
            assert!(c.into_inner() == reference);
        }
    }
}

/// A reader that returns at most 777 bytes per call.
struct Trickle<'a>(&'a [u8]);

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(777).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// A sink that fails after `limit` bytes.
struct FailingSink {
    inner: Cursor<Vec<u8>>,
    limit: u64,
}

impl std::io::Write for FailingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.inner.position() + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other("disk full"));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for FailingSink {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[test]
fn sink_errors_surface_and_poison_the_writer() {
    let data = fixtures::image_like(32, 5 << 20);
    for threads in [1, 2] {
        for limit in [100, 600_000, 2_000_000] {
            let sink = FailingSink {
                inner: Cursor::new(Vec::new()),
                limit,
            };
            let opts = Options {
                threads,
                ..Options::default()
            };
            let r = ZFileWriter::new(sink, opts).and_then(|mut w| {
                let first = w.append(&data);
                if first.is_err() {
                    assert!(matches!(w.append(b"more"), Err(Error::Poisoned)));
                }
                first?;
                w.finish().map(|_| ())
            });
            assert!(r.is_err(), "threads {threads} limit {limit}");
        }
    }
}

#[test]
fn zstd_levels_round_trip_and_higher_levels_are_no_larger() {
    let data = fixtures::image_like(9, (2 << 20) + 77);
    let enc = |level: i32, threads: usize| {
        let mut w = ZFileWriter::new(
            Cursor::new(Vec::new()),
            Options {
                algorithm: Algorithm::Zstd,
                block_size: 16384,
                threads,
                level,
            },
        )
        .unwrap();
        w.append(&data).unwrap();
        w.finish().unwrap().0.into_inner()
    };
    let default = enc(0, 1);
    assert!(default == enc(3, 1), "level 0 is upstream's 3");
    let high = enc(19, 2);
    assert!(
        high == enc(19, 1),
        "output independent of threads at level 19"
    );
    check_all(&data, &high, Algorithm::Zstd, 16384);
    assert!(
        high.len() <= default.len(),
        "{} > {}",
        high.len(),
        default.len()
    );
    // Out-of-range levels are clamped, not an error.
    check_all(&data, &enc(99, 1), Algorithm::Zstd, 16384);
}
