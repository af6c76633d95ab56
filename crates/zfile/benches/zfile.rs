//! ZFile benchmarks.
//!
//! * `random_read_4k/*`: random aligned 4 KiB reads through [`ZFileReader`] (from
//!   memory and from a page-cached file) against the bare codec decoding the same
//!   blocks from memory (`raw_decode`, the baseline; goal: reader >= 85% of it) and,
//!   for the file case, a pread of the block plus the bare codec (`raw_decode_pread`).
//!   `zfile_mem_nocrc` shows the cost of the block CRC.
//! * `compress/*`: 64 MiB of image-like data, 1 vs 2 threads. Goal: 2 threads >=
//!   1.6x one thread.

use std::hint::black_box;
use std::io::{Cursor, Write};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use zfile::codec::decompress_block;
use zfile::{Algorithm, FileSource, Options, ReadAt, ZFileReader, ZFileWriter};

const DATA_LEN: usize = 64 << 20;
const READS: usize = 4096;

fn build(data: &[u8], algorithm: Algorithm, threads: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    build_into(data, algorithm, threads, &mut out);
    out
}

/// Compresses into `out` (cleared first; reusing it keeps page faults of a fresh
/// output buffer out of the measurement).
fn build_into(data: &[u8], algorithm: Algorithm, threads: usize, out: &mut Vec<u8>) {
    out.clear();
    let opts = Options {
        algorithm,
        block_size: 4096,
        threads,
        ..Default::default()
    };
    let mut w = ZFileWriter::new(Cursor::new(out), opts).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap();
}

fn random_reads(c: &mut Criterion) {
    let data = fixtures::image_like(1, DATA_LEN);
    for algo in [Algorithm::Lz4, Algorithm::Zstd] {
        let file = build(&data, algo, 0);
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &file).unwrap();
        let mem = ZFileReader::open(&file[..]).unwrap();
        let disk = ZFileReader::open(FileSource::open(tmp.path()).unwrap()).unwrap();
        let mut rng = fixtures::Rng::new(42);
        let blocks: Vec<u64> = (0..READS).map(|_| rng.below(mem.info().blocks)).collect();
        let mut buf = vec![0u8; 4096];
        // Sanity: the reader returns the source bytes.
        for &b in &blocks[..64] {
            disk.read_exact_at(&mut buf, b * 4096).unwrap();
            assert!(buf[..] == data[b as usize * 4096..][..4096]);
        }

        let mut g = c.benchmark_group(format!("random_read_4k/{algo}"));
        g.throughput(Throughput::Bytes((READS * 4096) as u64));
        g.bench_function("raw_decode", |bch| {
            bch.iter(|| {
                for &b in &blocks {
                    let (off, len) = mem.block_extent(b);
                    let src = &file[off as usize..(off + u64::from(len)) as usize - 4];
                    decompress_block(algo, src, &mut buf).unwrap();
                    black_box(&buf);
                }
            })
        });
        let mut cbuf = vec![0u8; 8192];
        g.bench_function("raw_decode_pread", |bch| {
            bch.iter(|| {
                for &b in &blocks {
                    let (off, len) = disk.block_extent(b);
                    let c = &mut cbuf[..len as usize];
                    disk.inner().read_exact_at(c, off).unwrap();
                    decompress_block(algo, &c[..len as usize - 4], &mut buf).unwrap();
                    black_box(&buf);
                }
            })
        });
        g.bench_function("zfile_mem", |bch| {
            bch.iter(|| {
                for &b in &blocks {
                    mem.read_at(&mut buf, b * 4096).unwrap();
                    black_box(&buf);
                }
            })
        });
        let nocrc = ZFileReader::open_with(
            &file[..],
            zfile::OpenOptions {
                check_block_crc: false,
            },
        )
        .unwrap();
        g.bench_function("zfile_mem_nocrc", |bch| {
            bch.iter(|| {
                for &b in &blocks {
                    nocrc.read_at(&mut buf, b * 4096).unwrap();
                    black_box(&buf);
                }
            })
        });
        g.bench_function("zfile_file", |bch| {
            bch.iter(|| {
                for &b in &blocks {
                    disk.read_at(&mut buf, b * 4096).unwrap();
                    black_box(&buf);
                }
            })
        });
        g.finish();
    }
}

fn compression(c: &mut Criterion) {
    let data = fixtures::image_like(2, DATA_LEN);
    for algo in [Algorithm::Lz4, Algorithm::Zstd] {
        let mut g = c.benchmark_group(format!("compress/{algo}"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(DATA_LEN as u64));
        let mut out = Vec::new();
        for threads in [1usize, 2] {
            g.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, &t| {
                b.iter(|| build_into(&data, algo, t, black_box(&mut out)))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, random_reads, compression);
criterion_main!(benches);
