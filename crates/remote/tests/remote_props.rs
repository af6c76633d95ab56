//! Property test: any sequence of reads, prefetches, invalidations, evictions
//! and restarts over a RemoteBlob with a small cache returns the source bytes,
//! keeps usage within the budget, and only issues aligned, capped requests.

use std::sync::{Arc, Mutex};

use obd_remote::blob::{RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::sched::Scheduler;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::{ReadAt, Result};
use proptest::prelude::*;

const DIGEST: &str = "sha256:feedface";
const BS: u64 = 4096;
const UNIT: u64 = 16384;
const MAX_REQ: u64 = 65536;

struct Mem {
    data: Vec<u8>,
    calls: Mutex<Vec<(u64, u64)>>,
}

impl RangeFetcher for Mem {
    fn fetch(&self, _: &BlobRef, offset: u64, len: u64, _: Priority) -> Result<Vec<u8>> {
        self.calls.lock().unwrap().push((offset, len));
        Ok(self.data[offset as usize..(offset + len) as usize].to_vec())
    }
    fn blob_size(&self, _: &str) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Read(u64, usize),
    Prefetch(u64, u64),
    Invalidate(u64, u64),
    Restart,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..size + 10, 0usize..100_000).prop_map(|(o, l)| Op::Read(o, l)),
        1 => (0..size, 0..200_000u64).prop_map(|(o, l)| Op::Prefetch(o, l)),
        1 => (0..size, 1..50_000u64).prop_map(|(o, l)| Op::Invalidate(o, l)),
        1 => Just(Op::Restart),
    ]
}

fn open(dir: &std::path::Path, budget: u64, src: &Arc<Mem>) -> (Arc<BlockCache>, RemoteBlob) {
    let cache = BlockCache::open(CacheOptions {
        block_size: BS,
        budget,
        flush_every: 3,
        ..CacheOptions::new(dir)
    })
    .unwrap();
    let blob = RemoteBlob::new(
        BlobRef {
            url: "mem://blob".into(),
            digest: DIGEST.into(),
            size: src.data.len() as u64,
            verity: None,
        },
        Arc::clone(src) as Arc<dyn RangeFetcher>,
        Arc::clone(&cache),
        Arc::new(Scheduler::new(2)),
        RemoteOptions {
            min_fetch: UNIT,
            max_request: MAX_REQ,
        },
    )
    .unwrap();
    (cache, blob)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn remote_blob_model(
        size in 1u64..400_000,
        budget_blocks in 1u64..40,
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(400_000), 1..40),
    ) {
        let mut data = vec![0u8; size as usize];
        fixtures::Rng::new(seed).fill(&mut data);
        let src = Arc::new(Mem { data, calls: Mutex::new(Vec::new()) });
        let dir = tempfile::tempdir().unwrap();
        let budget = budget_blocks * BS;
        let (mut cache, mut blob) = open(dir.path(), budget, &src);
        for op in ops {
            match op {
                Op::Read(o, l) => {
                    let o = o % (size + 10);
                    let mut buf = vec![0u8; l];
                    let n = blob.read_at(&mut buf, o).unwrap();
                    let want = (l as u64).min(size.saturating_sub(o)) as usize;
                    prop_assert_eq!(n, want);
                    if n > 0 {
                        prop_assert!(buf[..n] == src.data[o as usize..o as usize + n]);
                    }
                }
                Op::Prefetch(o, l) => blob.prefetch(o % size, l).unwrap(),
                Op::Invalidate(o, l) => {
                    prop_assert!(blob.invalidate(o % size, l));
                    prop_assert!(!cache.contains_range(DIGEST, o % size, l));
                }
                Op::Restart => {
                    drop(blob);
                    drop(cache);
                    (cache, blob) = open(dir.path(), budget, &src);
                }
            }
            prop_assert!(cache.usage() <= budget, "usage {} > budget {}", cache.usage(), budget);
        }
        // Whole units, less the whole cache blocks at either end that were
        // cached already: cache-block aligned, within a unit-aligned span.
        for &(o, l) in src.calls.lock().unwrap().iter() {
            prop_assert_eq!(o % BS, 0);
            prop_assert!(l <= MAX_REQ && l > 0);
            prop_assert!(l % BS == 0 || o + l == size);
            let span = (o + l).next_multiple_of(UNIT).min(size) - o / UNIT * UNIT;
            prop_assert!(span <= MAX_REQ);
        }
    }
}

/// Readers racing with evictions (tiny budget) and invalidations never see
/// wrong bytes.
#[test]
fn concurrent_reads_evictions_and_invalidations_stay_correct() {
    let size = 1 << 20;
    let mut data = vec![0u8; size];
    fixtures::Rng::new(99).fill(&mut data);
    let src = Arc::new(Mem {
        data,
        calls: Mutex::new(Vec::new()),
    });
    let dir = tempfile::tempdir().unwrap();
    let (cache, blob) = open(dir.path(), 12 * BS, &src);
    let blob = Arc::new(blob);
    let barrier = Arc::new(std::sync::Barrier::new(6));
    let handles: Vec<_> = (0..6u64)
        .map(|t| {
            let (blob, src, barrier) = (Arc::clone(&blob), Arc::clone(&src), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut rng = fixtures::Rng::new(t + 1);
                barrier.wait();
                for _ in 0..300 {
                    let o = rng.below(size as u64);
                    let l = rng.below(40_000) as usize;
                    if t == 0 && rng.below(3) == 0 {
                        blob.invalidate(o, l as u64 + 1);
                        continue;
                    }
                    let mut buf = vec![0u8; l];
                    let n = blob.read_at(&mut buf, o).unwrap();
                    assert!(buf[..n] == src.data[o as usize..o as usize + n]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(cache.usage() <= 12 * BS);
}
