//! Merged-index lookups: the radix-table index against a binary search over the same
//! segments, at 10k and 1M segments.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fixtures::Rng;
use overlaybd_core::index::MergedIndex;
use overlaybd_core::lsmt::Segment;
use std::hint::black_box;

fn layer(rng: &mut Rng, n: usize) -> Vec<Segment> {
    let mut segs = Vec::with_capacity(n);
    let (mut cur, mut m) = (0u64, 8u64);
    for _ in 0..n {
        cur += rng.below(33);
        let len = 1 + rng.below(32);
        segs.push(Segment::data(cur, len as u32, m));
        m += len;
        cur += len;
    }
    segs
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("index_lookup");
    for n in [10_000usize, 1_000_000] {
        let mut rng = Rng::new(7);
        let idx = MergedIndex::build(&[layer(&mut rng, n)]);
        let end = idx.segments().last().unwrap().end();
        let queries: Vec<u64> = (0..4096).map(|_| rng.below(end)).collect();
        g.throughput(Throughput::Elements(queries.len() as u64));
        g.bench_with_input(BenchmarkId::new("radix", n), &n, |b, _| {
            b.iter(|| {
                let mut acc = 0u64;
                for &q in &queries {
                    acc = acc.wrapping_add(idx.lookup(q, 8).next().map_or(0, |s| s.moffset));
                }
                black_box(acc)
            })
        });
        let segs = idx.segments();
        g.bench_with_input(BenchmarkId::new("binary_search", n), &n, |b, _| {
            b.iter(|| {
                let mut acc = 0u64;
                for &q in &queries {
                    let i = segs.partition_point(|s| s.end() <= q);
                    acc = acc.wrapping_add(
                        segs.get(i)
                            .filter(|s| s.offset < q + 8)
                            .map_or(0, |s| s.moffset),
                    );
                }
                black_box(acc)
            })
        });
    }
    g.finish();
}

fn merge(c: &mut Criterion) {
    let mut rng = Rng::new(9);
    let stack: Vec<Vec<Segment>> = (0..10).map(|_| layer(&mut rng, 100_000)).collect();
    c.bench_function("index_build_10x100k", |b| {
        b.iter(|| black_box(MergedIndex::build(&stack)).len())
    });
}

criterion_group!(benches, lookups, merge);
criterion_main!(benches);
