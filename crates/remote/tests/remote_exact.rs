//! Exact prefetch ([`RemoteBlob::fetch_exact`], and `will_need` of a range
//! that is not whole `min_fetch` units): only the cache blocks covering the
//! range are fetched, split at `max_request`, cached blocks are skipped, the
//! cache keeps what was fetched, and a reader of a unit that is partly being
//! fetched this way waits for it instead of fetching the unit again — unless
//! that request is long (then the reader fetches its unit itself).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use obd_remote::blob::{RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::sched::Scheduler;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::{ReadAt, Result};

const KIB: u64 = 1024;

/// In-memory blob; records requests; optionally holds the first request until
/// released (and says when it has started).
struct Fake {
    data: Vec<u8>,
    calls: Mutex<Vec<(u64, u64)>>,
    hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl Fake {
    fn new(len: usize) -> Arc<Self> {
        Arc::new(Self {
            data: (0..len).map(|i| (i * 7 + i / 4096) as u8).collect(),
            calls: Mutex::new(Vec::new()),
            hold: Mutex::new(None),
        })
    }
    fn calls(&self) -> Vec<(u64, u64)> {
        self.calls.lock().unwrap().clone()
    }
}

impl RangeFetcher for Fake {
    fn fetch(&self, _blob: &BlobRef, offset: u64, len: u64, _prio: Priority) -> Result<Vec<u8>> {
        self.calls.lock().unwrap().push((offset, len));
        let hold = self.hold.lock().unwrap().take();
        if let Some((started, release)) = hold {
            started.send(()).unwrap();
            release.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        Ok(self.data[offset as usize..(offset + len) as usize].to_vec())
    }
    fn blob_size(&self, _blob_url: &str) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
}

fn setup(
    fake: &Arc<Fake>,
    block: u64,
    opts: RemoteOptions,
) -> (tempfile::TempDir, Arc<BlockCache>, RemoteBlob) {
    let dir = tempfile::tempdir().unwrap();
    let mut copts = CacheOptions::new(dir.path());
    copts.block_size = block;
    let cache = BlockCache::open(copts).unwrap();
    let blob = RemoteBlob::new(
        BlobRef {
            url: "https://registry.test/v2/ns/repo/blobs/sha256:00".into(),
            digest: "sha256:00aa".into(),
            size: fake.data.len() as u64,
            verity: None,
        },
        Arc::clone(fake) as Arc<dyn RangeFetcher>,
        Arc::clone(&cache),
        Arc::new(Scheduler::new(4)),
        opts,
    )
    .unwrap();
    (dir, cache, blob)
}

/// Makes `fake` hold its next request: returns the receiver that hears when
/// it has started and the sender that releases it.
fn hold_first_request(fake: &Fake) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    *fake.hold.lock().unwrap() = Some((started_tx, release_rx));
    (started_rx, release_tx)
}

fn read(b: &RemoteBlob, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    b.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn will_need_of_an_unaligned_range_fetches_only_its_cache_blocks() {
    let fake = Fake::new(2 << 20);
    let (_d, cache, blob) = setup(&fake, 4 * KIB, RemoteOptions::default());
    // 10 KiB starting mid-block: blocks 25..=27 (100 KiB .. 112 KiB).
    blob.will_need(100 * KIB + 100, 10 * KIB);
    assert_eq!(fake.calls(), vec![(100 * KIB, 12 * KIB)]);
    assert!(cache.contains_range("sha256:00aa", 100 * KIB, 12 * KIB));
    assert!(!cache.contains_range("sha256:00aa", 96 * KIB, 4 * KIB));
    // A read inside is served from the cache.
    let got = read(&blob, 101 * KIB, 8 * KIB as usize);
    assert_eq!(
        got[..],
        fake.data[(101 * KIB) as usize..(109 * KIB) as usize]
    );
    assert_eq!(fake.calls().len(), 1);
    assert_eq!(blob.stats().fetched_bytes, 12 * KIB);
}

#[test]
fn will_need_of_whole_units_keeps_the_unit_path() {
    let fake = Fake::new(2 << 20);
    let (_d, _c, blob) = setup(&fake, 4 * KIB, RemoteOptions::default());
    blob.will_need(256 * KIB, 512 * KIB);
    assert_eq!(fake.calls(), vec![(256 * KIB, 512 * KIB)]);
}

#[test]
fn exact_fetch_skips_cached_blocks_and_is_cut_at_max_request() {
    let fake = Fake::new(2 << 20);
    let opts = RemoteOptions {
        min_fetch: 64 * KIB,
        max_request: 128 * KIB,
    };
    let (_d, _c, blob) = setup(&fake, 16 * KIB, opts);
    blob.fetch_exact(20 * KIB, 10 * KIB, Priority::Prefetch)
        .unwrap();
    assert_eq!(fake.calls(), vec![(16 * KIB, 16 * KIB)]);
    // 0 .. 300 KiB: block 1 is cached; the rest in runs of at most 128 KiB
    // (8 blocks), each run split where a cached block sits. The runs are
    // fetched in parallel, so their order is not fixed.
    blob.fetch_exact(0, 300 * KIB, Priority::Prefetch).unwrap();
    let mut runs = fake.calls()[1..].to_vec();
    runs.sort_unstable();
    assert_eq!(
        runs,
        [
            (0, 16 * KIB),
            (32 * KIB, 96 * KIB),
            (128 * KIB, 128 * KIB),
            (256 * KIB, 48 * KIB),
        ]
    );
    // The blob's last block may be short.
    let size = fake.data.len() as u64;
    blob.fetch_exact(size - 5, 100, Priority::Prefetch).unwrap();
    assert_eq!(fake.calls().last(), Some(&(size - 16 * KIB, 16 * KIB)));
    // Everything fetched is cached: nothing more.
    let n = fake.calls().len();
    blob.fetch_exact(0, 300 * KIB, Priority::Prefetch).unwrap();
    assert_eq!(fake.calls().len(), n);
}

/// Makes `fake` hold its next request and starts an exact prefetch of
/// `[offset, offset + size)` of `blob` on a thread of `s`; returns once that
/// request is held, with the sender that releases it.
fn held_prefetch<'scope>(
    s: &'scope thread::Scope<'scope, '_>,
    fake: &Arc<Fake>,
    blob: &Arc<RemoteBlob>,
    (offset, size): (u64, u64),
) -> (
    thread::ScopedJoinHandle<'scope, Result<()>>,
    mpsc::Sender<()>,
) {
    let (started_rx, release_tx) = hold_first_request(fake);
    let b = Arc::clone(blob);
    let pre = s.spawn(move || b.fetch_exact(offset, size, Priority::Prefetch));
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    (pre, release_tx)
}

/// Holds an exact prefetch of 300 KiB .. 320 KiB in flight while a reader
/// of `len` bytes at `offset` starts; once the reader joined the prefetch
/// (counted as joined), releases it. Checks the bytes read; returns the
/// fetcher's requests.
fn read_during_exact_prefetch(offset: u64, len: u64) -> Vec<(u64, u64)> {
    let fake = Fake::new(2 << 20);
    let (_d, _c, blob) = setup(&fake, 4 * KIB, RemoteOptions::default());
    let blob = Arc::new(blob);
    thread::scope(|s| {
        let (pre, release) = held_prefetch(s, &fake, &blob, (300 * KIB, 20 * KIB));
        let b = Arc::clone(&blob);
        let reader = s.spawn(move || read(&b, offset, len as usize));
        let t0 = Instant::now();
        while blob.stats().joined == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "reader never joined"
            );
            thread::yield_now();
        }
        release.send(()).unwrap();
        pre.join().unwrap().unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got[..], fake.data[offset as usize..(offset + len) as usize]);
    });
    fake.calls()
}

#[test]
fn a_reader_waits_for_an_exact_request_instead_of_fetching_the_unit() {
    let calls = read_during_exact_prefetch(304 * KIB, 8 * KIB);
    // The reader joined the exact request and made no request of its own.
    assert_eq!(calls, vec![(300 * KIB, 20 * KIB)]);
}

#[test]
fn a_reader_needing_more_than_the_exact_request_fetches_the_rest_after_it() {
    let calls = read_during_exact_prefetch(310 * KIB, 40 * KIB);
    // The reader's unit (256 KiB .. 512 KiB) once, after the exact request.
    assert_eq!(calls, vec![(300 * KIB, 20 * KIB), (256 * KIB, 256 * KIB)]);
}

#[test]
fn a_reader_does_not_wait_for_a_long_exact_prefetch() {
    let fake = Fake::new(4 << 20);
    let (_d, _c, blob) = setup(&fake, 4 * KIB, RemoteOptions::default());
    let blob = Arc::new(blob);
    thread::scope(|s| {
        // A trace prefetch of 1 MiB (more than two 256 KiB units), held.
        let (pre, release) = held_prefetch(s, &fake, &blob, (100 * KIB, 1 << 20));
        // The container's read inside it fetches its own unit and returns
        // while the prefetch is still held.
        let got = read(&blob, 600 * KIB, 8 * KIB as usize);
        assert_eq!(
            got[..],
            fake.data[(600 * KIB) as usize..(608 * KIB) as usize]
        );
        assert_eq!(blob.stats().joined, 0);
        release.send(()).unwrap();
        pre.join().unwrap().unwrap();
    });
    assert_eq!(
        fake.calls(),
        vec![(100 * KIB, 1 << 20), (512 * KIB, 256 * KIB)]
    );
}
