//! Quick, noise-tolerant check of the two performance goals (min of interleaved
//! runs, so other load on the machine mostly cancels out):
//!
//! `cargo run --release -p zfile --example timing [MiB]`
//!
//! * random 4 KiB reads through `ZFileReader` vs the raw codec on the same blocks
//!   (goal >= 85%);
//! * compression with 2 threads vs 1 (goal >= 1.6x).

use std::hint::black_box;
use std::io::{Cursor, Write};
use std::time::{Duration, Instant};

use zfile::codec::decompress_block;
use zfile::{Algorithm, FileSource, Options, ReadAt, ZFileReader, ZFileWriter};

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
    };
    let mut w = ZFileWriter::new(Cursor::new(out), opts).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap();
}

fn time(f: &mut dyn FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Runs every closure `rounds` times, interleaved; returns each one's best time.
fn best_of(rounds: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Duration> {
    let mut best = vec![Duration::MAX; fs.len()];
    for _ in 0..rounds {
        for (k, f) in fs.iter_mut().enumerate() {
            best[k] = best[k].min(time(*f));
        }
    }
    best
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let data = fixtures::image_like(1, mib << 20);
    let reads = 4096;
    for algo in [Algorithm::Lz4, Algorithm::Zstd] {
        let file = build(&data, algo, 0);
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &file).unwrap();
        let mem = ZFileReader::open(&file[..]).unwrap();
        let disk = ZFileReader::open(FileSource::open(tmp.path()).unwrap()).unwrap();
        let mut rng = fixtures::Rng::new(42);
        let blocks: Vec<u64> = (0..reads).map(|_| rng.below(mem.info().blocks)).collect();
        let mut b1 = vec![0u8; 4096];
        let mut b2 = vec![0u8; 4096];
        let mut b3 = vec![0u8; 4096];
        let mut b4 = vec![0u8; 4096];
        let mut b5 = vec![0u8; 4096];
        let mut cbuf = vec![0u8; 8192];
        let nocrc = ZFileReader::open_with(
            &file[..],
            zfile::OpenOptions {
                check_block_crc: false,
            },
        )
        .unwrap();
        let t = best_of(
            40,
            &mut [
                &mut || {
                    for &b in &blocks {
                        let (off, len) = mem.block_extent(b);
                        let src = &file[off as usize..(off + u64::from(len)) as usize - 4];
                        decompress_block(algo, src, &mut b1).unwrap();
                        black_box(&b1);
                    }
                },
                &mut || {
                    for &b in &blocks {
                        mem.read_at(&mut b2, b * 4096).unwrap();
                        black_box(&b2);
                    }
                },
                &mut || {
                    for &b in &blocks {
                        disk.read_at(&mut b3, b * 4096).unwrap();
                        black_box(&b3);
                    }
                },
                &mut || {
                    for &b in &blocks {
                        nocrc.read_at(&mut b4, b * 4096).unwrap();
                        black_box(&b4);
                    }
                },
                &mut || {
                    for &b in &blocks {
                        let (off, len) = disk.block_extent(b);
                        let c = &mut cbuf[..len as usize];
                        disk.inner().read_exact_at(c, off).unwrap();
                        decompress_block(algo, &c[..len as usize - 4], &mut b5).unwrap();
                        black_box(&b5);
                    }
                },
            ],
        );
        let mbps = |d: Duration| (reads * 4096) as f64 / d.as_secs_f64() / 1e6;
        println!(
            "{algo:4} random 4 KiB reads: raw decode {:5.0} MB/s | reader (memory) {:5.0} MB/s = {:5.1}% | reader (file) {:5.0} MB/s = {:5.1}% (vs pread + raw decode {:5.1}%) | memory, CRC off {:5.1}%",
            mbps(t[0]),
            mbps(t[1]),
            100.0 * t[0].as_secs_f64() / t[1].as_secs_f64(),
            mbps(t[2]),
            100.0 * t[0].as_secs_f64() / t[2].as_secs_f64(),
            100.0 * t[4].as_secs_f64() / t[2].as_secs_f64(),
            100.0 * t[0].as_secs_f64() / t[3].as_secs_f64(),
        );
    }
    for algo in [Algorithm::Lz4, Algorithm::Zstd] {
        let rounds = if algo == Algorithm::Lz4 { 16 } else { 8 };
        let (mut o1, mut o2) = (Vec::new(), Vec::new());
        let t = best_of(
            rounds,
            &mut [
                &mut || build_into(&data, algo, 1, black_box(&mut o1)),
                &mut || build_into(&data, algo, 2, black_box(&mut o2)),
            ],
        );
        assert!(o1 == o2);
        let mbps = |d: Duration| data.len() as f64 / d.as_secs_f64() / 1e6;
        println!(
            "{algo:4} compress {mib} MiB (write_all): 1 thread {:6.0} MB/s | 2 threads {:6.0} MB/s = {:.2}x",
            mbps(t[0]),
            mbps(t[1]),
            t[0].as_secs_f64() / t[1].as_secs_f64()
        );
        // The same through `zfile::compress` reading from a `Read`.
        let via_read = |threads: usize, out: &mut Vec<u8>| {
            out.clear();
            let opts = Options {
                algorithm: algo,
                block_size: 4096,
                threads,
            };
            zfile::compress(&data[..], Cursor::new(out), opts).unwrap();
        };
        let t = best_of(
            rounds,
            &mut [&mut || via_read(1, black_box(&mut o1)), &mut || {
                via_read(2, black_box(&mut o2))
            }],
        );
        println!(
            "{algo:4} compress {mib} MiB (compress()): 1 thread {:6.0} MB/s | 2 threads {:6.0} MB/s = {:.2}x",
            mbps(t[0]),
            mbps(t[1]),
            t[0].as_secs_f64() / t[1].as_secs_f64()
        );
    }
}
