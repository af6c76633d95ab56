//! RemoteBlob over the block cache, with an in-memory counting fetcher:
//! request shaping, single flight, restart reuse, self-healing of corrupt
//! cache data and metadata, LRU budget, error surfacing, end to end through
//! ZFile and LSMT.

mod support;

use std::collections::HashSet;
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use fixtures::{random_bytes, Rng};
use obd_remote::blob::{RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::sched::Scheduler;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::{Error, ReadAt, Result};
use support::calls::Calls;
use zfile::{ZFileReader, ZFileWriter};

const KIB: u64 = 1024;
const DIGEST: &str = "sha256:0123456789abcdef";

/// An in-memory blob server that records every request and can corrupt or
/// fail responses.
#[derive(Default)]
struct Fake {
    data: Vec<u8>,
    calls: Calls,
    /// `(start, end, remaining)`: the next `remaining` responses overlapping
    /// `[start, end)` have that overlap bit-flipped.
    corrupt: Mutex<Vec<(u64, u64, u32)>>,
    /// Fail every request with this message.
    fail: Mutex<Option<String>>,
    /// When set, each request waits (up to 10 s) until another one is in
    /// flight too; records the most seen at once.
    pair_up: std::sync::atomic::AtomicBool,
    inflight: Mutex<(usize, usize)>,
    inflight_cv: std::sync::Condvar,
}

impl Fake {
    fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            data,
            ..Self::default()
        })
    }
    fn corrupt_next(&self, start: u64, end: u64, times: u32) {
        self.corrupt.lock().unwrap().push((start, end, times));
    }
}

impl RangeFetcher for Fake {
    fn fetch(&self, blob: &BlobRef, offset: u64, len: u64, prio: Priority) -> Result<Vec<u8>> {
        self.calls.record(offset, len, prio);
        if self.pair_up.load(std::sync::atomic::Ordering::SeqCst) {
            let mut g = self.inflight.lock().unwrap();
            g.0 += 1;
            g.1 = g.1.max(g.0);
            self.inflight_cv.notify_all();
            let (mut g, _) = self
                .inflight_cv
                .wait_timeout_while(g, std::time::Duration::from_secs(10), |g| g.1 < 2)
                .unwrap();
            g.0 -= 1;
        }
        if let Some(msg) = self.fail.lock().unwrap().clone() {
            return Err(Error::Remote {
                url: blob.url.clone(),
                offset,
                end: offset + len,
                detail: msg,
            });
        }
        let end = offset + len;
        assert!(end <= self.data.len() as u64, "request past the blob end");
        let mut out = self.data[offset as usize..end as usize].to_vec();
        for (s, e, n) in self.corrupt.lock().unwrap().iter_mut() {
            if *n > 0 && *s < end && *e > offset {
                *n -= 1;
                let (lo, hi) = ((*s).max(offset) - offset, (*e).min(end) - offset);
                for b in &mut out[lo as usize..hi as usize] {
                    *b ^= 0x5a;
                }
            }
        }
        Ok(out)
    }
    fn blob_size(&self, _blob_url: &str) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
}

fn blob_ref(size: u64) -> BlobRef {
    BlobRef {
        url: format!("https://registry.test/v2/ns/repo/blobs/{DIGEST}"),
        digest: DIGEST.into(),
        size,
        verity: None,
    }
}

fn cache_opts(dir: &Path) -> CacheOptions {
    CacheOptions::new(dir)
}

/// `fake`'s blob over `cache` with the default remote options.
fn default_blob(fake: &Arc<Fake>, cache: &Arc<BlockCache>) -> RemoteBlob {
    open_blob(fake, cache, RemoteOptions::default())
}

/// The block cache in `dir` with the default options.
fn open_cache(dir: &Path) -> Arc<BlockCache> {
    BlockCache::open(cache_opts(dir)).unwrap()
}

/// A fake of `len` random bytes (seed `seed`) and a new, empty cache in a
/// directory kept while the cache is used.
fn cached_fake(seed: u64, len: usize) -> (Arc<Fake>, tempfile::TempDir, Arc<BlockCache>) {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    (Fake::new(random_bytes(seed, len)), dir, cache)
}

/// A fake of `len` random bytes (seed `seed`) and a cache directory holding
/// all of its blob, read through a cache that is closed again.
fn cache_dir_with(seed: u64, len: usize) -> (Arc<Fake>, tempfile::TempDir) {
    let fake = Fake::new(random_bytes(seed, len));
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    read_exact(&default_blob(&fake, &cache), 0, len);
    (fake, dir)
}

/// `fake`'s blob over a new, empty cache with the default options; keep the
/// directory while the blob is used.
fn fresh_blob(fake: &Arc<Fake>) -> (tempfile::TempDir, Arc<BlockCache>, RemoteBlob) {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let blob = open_blob(fake, &cache, RemoteOptions::default());
    (dir, cache, blob)
}

fn open_blob(fake: &Arc<Fake>, cache: &Arc<BlockCache>, opts: RemoteOptions) -> RemoteBlob {
    RemoteBlob::new(
        blob_ref(fake.data.len() as u64),
        Arc::clone(fake) as Arc<dyn RangeFetcher>,
        Arc::clone(cache),
        Arc::new(Scheduler::new(8)),
        opts,
    )
    .unwrap()
}

fn read_exact(b: &impl ReadAt, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    b.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn random_reads_match_and_requests_are_aligned_and_capped() {
    let size = (5 << 20) + 12_345;
    let (fake, _dir, cache) = cached_fake(1, size);
    let opts = RemoteOptions {
        min_fetch: 256 * KIB,
        max_request: 1 << 20,
    };
    let blob = open_blob(&fake, &cache, opts);
    assert_eq!(blob.size(), size as u64);

    // A small read fetches exactly one aligned unit.
    assert_eq!(read_exact(&blob, 300_000, 10), fake.data[300_000..300_010]);
    assert_eq!(
        fake.calls.all(),
        vec![(256 * KIB, 256 * KIB, Priority::Foreground)]
    );

    // One large read over missing data: adjacent units merged, capped at 1 MiB.
    fake.calls.clear();
    let got = read_exact(&blob, 600_000, 3_000_000);
    assert!(got == fake.data[600_000..3_600_000]);
    let calls = fake.calls.all();
    assert!(
        calls.iter().any(|c| c.1 == 1 << 20),
        "no merged request: {calls:?}"
    );

    let mut rng = Rng::new(7);
    for _ in 0..300 {
        let off = rng.below(size as u64 + 100);
        let max = if rng.below(4) == 0 { 3 << 20 } else { 70_000 };
        let len = rng.below(max) as usize;
        let mut buf = vec![0u8; len];
        let n = blob.read_at(&mut buf, off).unwrap();
        let want = len.min((size as u64).saturating_sub(off) as usize);
        assert_eq!(n, want);
        assert!(buf[..n] == fake.data[off as usize..off as usize + n]);
    }
    let calls = fake.calls.all();
    assert!(!calls.is_empty());
    for &(off, len, prio) in &calls {
        assert_eq!(prio, Priority::Foreground);
        assert_eq!(off % (256 * KIB), 0, "unaligned request at {off}");
        assert!(len <= 1 << 20, "request of {len} bytes over the cap");
        assert!(
            len % (256 * KIB) == 0 || off + len == size as u64,
            "request {off}+{len} not whole units"
        );
    }
    // Nothing is fetched twice: the whole blob fits the (default 4 GiB) budget.
    let mut seen = HashSet::new();
    for &(off, len, _) in &calls {
        for u in off / (256 * KIB)..(off + len).div_ceil(256 * KIB) {
            assert!(seen.insert(u), "unit {u} fetched twice");
        }
    }
    // Everything read so far is cached now: a full read fetches only the rest.
    fake.calls.clear();
    let all = read_exact(&blob, 0, size);
    assert!(all == fake.data);
    for &(off, len, _) in &fake.calls.all() {
        for u in off / (256 * KIB)..(off + len).div_ceil(256 * KIB) {
            assert!(seen.insert(u), "unit {u} fetched again");
        }
    }
}

#[test]
fn a_read_larger_than_max_request_runs_its_requests_in_parallel() {
    let size = 6 << 20;
    let fake = Fake::new(random_bytes(21, size));
    fake.pair_up
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let opts = RemoteOptions {
        min_fetch: 256 * KIB,
        max_request: 1 << 20,
    };
    let blob = open_blob(&fake, &cache, opts);
    let t0 = std::time::Instant::now();
    assert!(read_exact(&blob, 100, size - 200)[..] == fake.data[100..size - 100]);
    assert_eq!(fake.calls.count(), 6);
    assert!(
        fake.inflight.lock().unwrap().1 >= 2,
        "requests ran one by one"
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn concurrent_readers_fetch_each_block_once() {
    let size = 4 << 20;
    let (fake, _dir, cache) = cached_fake(2, size);
    let blob = Arc::new(default_blob(&fake, &cache));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let (blob, barrier, fake) =
                (Arc::clone(&blob), Arc::clone(&barrier), Arc::clone(&fake));
            thread::spawn(move || {
                barrier.wait();
                // Every thread reads every 64 KiB piece, in a thread-specific order.
                let pieces = (size as u64) / (64 * KIB);
                for k in 0..pieces {
                    let p = (k * (2 * t + 1) + t) % pieces;
                    let off = p * 64 * KIB;
                    let got = read_exact(&*blob, off, 64 * KIB as usize);
                    assert!(got[..] == fake.data[off as usize..(off + 64 * KIB) as usize]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let calls = fake.calls.all();
    let mut fetched = vec![0u32; size / (256 << 10)];
    for (off, len, _) in calls {
        for u in off / (256 * KIB)..(off + len) / (256 * KIB) {
            fetched[u as usize] += 1;
        }
    }
    assert!(
        fetched.iter().all(|&n| n == 1),
        "fetch counts per unit: {fetched:?}"
    );
}

#[test]
fn two_remote_blobs_of_one_digest_share_requests() {
    let size = 2 << 20;
    let (fake, _dir, cache) = cached_fake(22, size);
    // Two devices using the same layer, each with its own scheduler.
    let blobs = [
        Arc::new(default_blob(&fake, &cache)),
        Arc::new(default_blob(&fake, &cache)),
    ];
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let blob = Arc::clone(&blobs[t as usize % 2]);
            let (barrier, fake) = (Arc::clone(&barrier), Arc::clone(&fake));
            thread::spawn(move || {
                barrier.wait();
                let pieces = size as u64 / (64 * KIB);
                for k in 0..pieces {
                    let off = ((k * (2 * t + 1) + t) % pieces) * 64 * KIB;
                    let got = read_exact(&*blob, off, 64 * KIB as usize);
                    assert!(got[..] == fake.data[off as usize..(off + 64 * KIB) as usize]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut units: Vec<u64> = fake.calls.all().iter().map(|c| c.0 / (256 * KIB)).collect();
    units.sort_unstable();
    assert_eq!(units, (0..8).collect::<Vec<_>>(), "{:?}", fake.calls.all());
}

#[test]
fn concurrent_identical_reads_share_one_request() {
    let (fake, _dir, cache) = cached_fake(3, 1 << 20);
    let blob = Arc::new(default_blob(&fake, &cache));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (blob, barrier) = (Arc::clone(&blob), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                read_exact(&*blob, 1000, 200_000)
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap()[..] == fake.data[1000..201_000]);
    }
    assert_eq!(fake.calls.all(), vec![(0, 256 * KIB, Priority::Foreground)]);
    let st = blob.stats();
    assert_eq!((st.loads, st.requests, st.errors), (8, 1, 0));
    assert_eq!(st.fetched_bytes, 256 * KIB);
    // The other 7 readers joined the request or, arriving after it
    // finished, read the cache.
    assert!(st.joined + st.cache_hits <= 7, "{st:?}");
}

#[test]
fn restart_reuses_cached_blocks() {
    let size = 3 << 20;
    let fake = Fake::new(random_bytes(4, size));
    let dir = tempfile::tempdir().unwrap();
    let ranges = [(0u64, 100usize), (700_000, 300_000), (2_900_000, 245_728)];
    {
        let cache = open_cache(dir.path());
        let blob = default_blob(&fake, &cache);
        for &(o, l) in &ranges {
            assert!(read_exact(&blob, o, l)[..] == fake.data[o as usize..o as usize + l]);
        }
        assert!(fake.calls.count() > 0);
    }
    fake.calls.clear();
    let cache = open_cache(dir.path());
    assert_eq!(cache.resets(), 0);
    assert!(cache.usage() > 0);
    let blob = default_blob(&fake, &cache);
    for &(o, l) in &ranges {
        assert!(read_exact(&blob, o, l)[..] == fake.data[o as usize..o as usize + l]);
    }
    assert_eq!(
        fake.calls.count(),
        0,
        "restart refetched: {:?}",
        fake.calls.all()
    );
}

/// A ZFile of `len` compressible pseudo-random bytes (4 KiB blocks, CRCs on).
fn zfile_of(seed: u64, len: usize) -> (Vec<u8>, Vec<u8>) {
    let plain = fixtures::image_like(seed, len);
    let mut w = ZFileWriter::new(Cursor::new(Vec::new()), zfile::Options::default()).unwrap();
    w.append(&plain).unwrap();
    (plain, w.finish().unwrap().0.into_inner())
}

/// The one cached blob's file with extension `ext` in `dir`.
fn blob_file(dir: &Path, ext: &str) -> std::path::PathBuf {
    let stem = DIGEST.replace(':', "_");
    let found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&stem) && n.ends_with(&format!(".{ext}"))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{ext} files in {}: {found:?}",
        dir.display()
    );
    found[0].clone()
}

fn data_file(dir: &Path) -> std::path::PathBuf {
    blob_file(dir, "data")
}

/// The cache in `dir` as a process sees it after a reboot: only what was
/// checkpointed is trusted.
fn open_cache_after_reboot(dir: &Path) -> Arc<BlockCache> {
    BlockCache::open(CacheOptions {
        boot_id: Some([b'r'; 40]),
        ..cache_opts(dir)
    })
    .unwrap()
}

/// The cached blob's sparse data file, open for reading and writing.
fn open_data_file(dir: &Path) -> std::fs::File {
    let p = data_file(dir);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn meta_file(dir: &Path) -> std::path::PathBuf {
    blob_file(dir, "meta")
}

#[test]
fn corrupt_cache_data_is_detected_by_zfile_crc_evicted_and_refetched() {
    let (plain, z) = zfile_of(5, 3 << 20);
    let fake = Fake::new(z);
    let dir = tempfile::tempdir().unwrap();
    let bad_block = 300u64;
    let bad_off;
    {
        let cache = open_cache(dir.path());
        let r = ZFileReader::open(default_blob(&fake, &cache)).unwrap();
        bad_off = r.block_extent(bad_block).0;
        let mut all = vec![0u8; plain.len()];
        r.read_at(&mut all, 0).unwrap();
        assert!(all == plain);
    }
    // Flip bytes of one ZFile block inside the cached sparse file.
    {
        use std::os::unix::fs::FileExt;
        let f = open_data_file(dir.path());
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, bad_off + 3).unwrap();
        for x in &mut b {
            *x ^= 0xff;
        }
        f.write_all_at(&b, bad_off + 3).unwrap();
    }
    fake.calls.clear();
    let cache = open_cache(dir.path());
    let r = ZFileReader::open(default_blob(&fake, &cache)).unwrap();
    assert_eq!(fake.calls.count(), 0, "open must be served from the cache");
    let at = bad_block * 4096;
    let mut buf = vec![0u8; 3 * 4096];
    r.read_at(&mut buf, at - 4096).unwrap();
    assert!(buf[..] == plain[(at - 4096) as usize..(at + 2 * 4096) as usize]);
    // Exactly the cache block holding the bad block was fetched again, once
    // (the rest of its unit is still cached; it is not fetched again).
    let block = bad_off / (64 * KIB) * (64 * KIB);
    let block_len = (64 * KIB).min(fake.data.len() as u64 - block);
    let calls = fake.calls.all();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (o, l, p) = calls[0];
    assert_eq!(p, Priority::Foreground);
    assert!(
        o <= block && block + block_len <= o + l && l <= 2 * 64 * KIB,
        "{calls:?}: the bad block at {bad_off}, its cache block and at most its neighbour"
    );
    // And the cache now holds good bytes: a fresh reader needs no fetch.
    fake.calls.clear();
    let mut all = vec![0u8; plain.len()];
    r.read_at(&mut all, 0).unwrap();
    assert!(all == plain);
    assert_eq!(fake.calls.count(), 0);
}

#[test]
fn corrupt_remote_response_is_refetched_up_to_three_tries() {
    let (plain, z) = zfile_of(6, 1 << 20);
    let fake = Fake::new(z);
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let r = ZFileReader::open(default_blob(&fake, &cache)).unwrap();
    let (off, len) = r.block_extent(100);
    let (off2, len2) = r.block_extent(200);
    // Block 100: the first two responses are corrupt, the third is good.
    fake.corrupt_next(off + 1, off + u64::from(len) - 1, 2);
    // Block 200: always corrupt.
    fake.corrupt_next(off2, off2 + u64::from(len2), u32::MAX);
    // Start from an empty cache (open cached the header region).
    cache.evict(DIGEST, 0, u64::MAX).unwrap();
    fake.calls.clear();
    let mut buf = vec![0u8; 4096];
    r.read_at(&mut buf, 100 * 4096).unwrap();
    assert!(buf[..] == plain[100 * 4096..101 * 4096]);
    assert_eq!(fake.calls.count(), 3, "{:?}", fake.calls.all());
    assert_eq!(r.inner().stats().invalidations, 2);

    cache.evict(DIGEST, 0, u64::MAX).unwrap();
    fake.calls.clear();
    let e = r.read_at(&mut buf, 200 * 4096).unwrap_err();
    assert!(
        matches!(e, zfile::Error::BlockCrc { block: 200, offset, .. } if offset == off2),
        "{e}"
    );
    assert_eq!(fake.calls.count(), zfile::BLOCK_TRIES as usize);
}

#[test]
fn corrupt_cached_jump_table_is_refetched_on_open() {
    let (plain, z) = zfile_of(18, 1 << 20);
    let zlen = z.len();
    let fake = Fake::new(z);
    let dir = tempfile::tempdir().unwrap();
    let index_offset;
    {
        let cache = open_cache(dir.path());
        let r = ZFileReader::open(default_blob(&fake, &cache)).unwrap();
        index_offset = r.info().index_offset;
    }
    // Corrupt the cached jump table (the blob's metadata, no block CRC).
    {
        use std::os::unix::fs::FileExt;
        let f = open_data_file(dir.path());
        f.write_all_at(&[0xEE; 8], index_offset + 4).unwrap();
    }
    fake.calls.clear();
    let cache = open_cache(dir.path());
    let blob = Arc::new(default_blob(&fake, &cache));
    assert!(
        ZFileReader::open(Arc::clone(&blob)).is_err(),
        "corruption not seen"
    );
    let r = blob
        .retry_open(|| Ok(ZFileReader::open(Arc::clone(&blob))?))
        .unwrap();
    let mut all = vec![0u8; plain.len()];
    r.read_at(&mut all, 0).unwrap();
    assert!(all == plain);
    assert!(fake.calls.count() >= 1);
    assert!(fake.calls.all().iter().all(|c| c.0 + c.1 <= zlen as u64));

    // A header that is corrupt at the registry fails after OPEN_TRIES tries,
    // naming the blob.
    fake.corrupt_next(40, 41, u32::MAX);
    cache.evict_blob(DIGEST).unwrap();
    fake.calls.clear();
    let e = blob
        .retry_open(|| Ok(ZFileReader::open(Arc::clone(&blob))?))
        .unwrap_err();
    assert!(
        matches!(&e, Error::Integrity { tries: 3, what, .. } if what.contains("registry.test")),
        "{e}"
    );
    assert_eq!(fake.calls.count(), 3);

    // Remote failures are not retried.
    *fake.fail.lock().unwrap() = Some("connection reset".into());
    cache.evict_blob(DIGEST).unwrap();
    fake.calls.clear();
    let e = blob
        .retry_open(|| Ok(ZFileReader::open(Arc::clone(&blob))?))
        .unwrap_err();
    assert!(e.to_string().contains("connection reset"), "{e}");
    assert_eq!(fake.calls.count(), 1);
}

/// Copies the cache files as they are on disk now (what a crash would leave).
fn snapshot_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn the_files_on_disk_are_a_valid_cache_at_any_moment() {
    let size = 2 << 20;
    let fake = Fake::new(random_bytes(19, size));
    for flush_every in [1, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let crash = tempfile::tempdir().unwrap();
        let opts = CacheOptions {
            flush_every,
            ..cache_opts(dir.path())
        };
        let cache = BlockCache::open(opts).unwrap();
        let blob = default_blob(&fake, &cache);
        read_exact(&blob, 0, 700_000);
        // "Crash" while the cache is live.
        snapshot_dir(dir.path(), crash.path());
        fake.calls.clear();
        // A power loss: the live bits belong to the boot that ended.
        let cache2 = open_cache_after_reboot(crash.path());
        let blob2 = open_blob(&fake, &cache2, RemoteOptions::default());
        assert!(read_exact(&blob2, 0, 700_000)[..] == fake.data[..700_000]);
        if flush_every == 1 {
            assert_eq!(fake.calls.count(), 0, "persisted blocks were not reused");
        } else {
            // Nothing was persisted yet: nothing is trusted, all refetched.
            assert_eq!(fake.calls.count(), 1);
        }
        drop((blob, cache));
    }
}

#[test]
fn self_heal_works_through_a_window_as_in_a_tar_wrapper() {
    let (plain, z) = zfile_of(23, 1 << 20);
    // tar(ZFile): a 512-byte header, the ZFile, padding.
    let mut wrapped = vec![0u8; 512];
    wrapped.extend_from_slice(&z);
    wrapped.resize(wrapped.len().next_multiple_of(512) + 1024, 0);
    let fake = Fake::new(wrapped);
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let blob = Arc::new(default_blob(&fake, &cache));
    let r = ZFileReader::open(zfile::Window::new(Arc::clone(&blob), 512, z.len() as u64)).unwrap();
    let (off, len) = r.block_extent(150);
    // The blob offset of block 150 is 512 past its ZFile offset.
    fake.corrupt_next(512 + off, 512 + off + u64::from(len), 1);
    cache.evict_blob(DIGEST).unwrap();
    fake.calls.clear();
    let mut buf = vec![0u8; 4096];
    r.read_at(&mut buf, 150 * 4096).unwrap();
    assert!(buf[..] == plain[150 * 4096..151 * 4096]);
    assert_eq!(blob.stats().invalidations, 1);
    assert_eq!(fake.calls.count(), 2);
}

#[test]
fn corrupt_bitmap_resets_the_blob_cache() {
    let size = 2 << 20;
    let (fake, dir) = cache_dir_with(8, size);
    // Corrupt the cached data too: a trusted (bad) bitmap would serve it.
    {
        use std::os::unix::fs::FileExt;
        let f = open_data_file(dir.path());
        f.write_all_at(&[0xAA; 4096], 8192).unwrap();
    }
    let mut meta = std::fs::read(meta_file(dir.path())).unwrap();
    let k = meta.len() - 10;
    meta[k] ^= 0x01;
    std::fs::write(meta_file(dir.path()), &meta).unwrap();

    fake.calls.clear();
    // The checkpoint is what a reboot falls back to.
    let cache = open_cache_after_reboot(dir.path());
    assert_eq!(cache.resets(), 1);
    assert_eq!(cache.usage(), 0);
    let blob = default_blob(&fake, &cache);
    assert!(read_exact(&blob, 0, size) == fake.data);
    assert_eq!(
        fake.calls.all(),
        vec![(0, size as u64, Priority::Foreground)]
    );
}

#[test]
fn stale_bitmap_for_another_size_is_not_trusted() {
    let (_fake, dir) = cache_dir_with(9, 1 << 20);
    // Same digest, different size (a stale entry): reset, not trusted.
    let fake2 = Fake::new(random_bytes(10, (1 << 20) + 5));
    let cache = open_cache(dir.path());
    let blob = default_blob(&fake2, &cache);
    assert_eq!(cache.resets(), 1);
    assert!(read_exact(&blob, 0, (1 << 20) + 5) == fake2.data);
    assert!(fake2.calls.count() > 0);
    // A missing data file also resets the blob.
    drop(blob);
    drop(cache);
    std::fs::remove_file(data_file(dir.path())).unwrap();
    let cache = open_cache(dir.path());
    assert_eq!((cache.resets(), cache.usage()), (1, 0));
}

#[test]
fn hole_where_the_bitmap_claims_data_resets_the_blob_cache() {
    let size = 1 << 20;
    let (fake, dir) = cache_dir_with(17, size);
    // Valid bitmap, but the data file was emptied behind our back (same length).
    let f = open_data_file(dir.path());
    f.set_len(0).unwrap();
    f.set_len(size as u64).unwrap();
    drop(f);
    fake.calls.clear();
    let cache = open_cache(dir.path());
    assert_eq!((cache.resets(), cache.usage()), (1, 0));
    let blob = default_blob(&fake, &cache);
    assert!(read_exact(&blob, 0, size) == fake.data);
    assert_eq!(fake.calls.count(), 1);
}

#[test]
fn lru_keeps_usage_within_budget_and_evicts_least_recent() {
    let unit = 256 * KIB;
    let fake = Fake::new(random_bytes(11, 8 * unit as usize));
    let dir = tempfile::tempdir().unwrap();
    let opts = CacheOptions {
        budget: 4 * unit,
        low_water_pct: 100,
        ..cache_opts(dir.path())
    };
    let cache = BlockCache::open(opts).unwrap();
    let blob = default_blob(&fake, &cache);
    let cb = |u: u64| cache.contains_range(DIGEST, u * unit, unit);
    // Units 0..4 fill the budget exactly.
    for u in 0..4 {
        read_exact(&blob, u * unit, unit as usize);
    }
    assert_eq!(cache.usage(), 4 * unit);
    // Use unit 0 again (a cache hit), so unit 1 is now the least recent.
    fake.calls.clear();
    read_exact(&blob, 0, unit as usize);
    assert_eq!(fake.calls.count(), 0);
    read_exact(&blob, 4 * unit, unit as usize);
    assert!(cache.usage() <= 4 * unit);
    assert!(cb(0) && !cb(1) && cb(2) && cb(3) && cb(4));
    read_exact(&blob, 5 * unit, 1);
    assert!(cb(0) && !cb(2) && cb(3) && cb(4) && cb(5));

    // Random reads of far more than the budget: usage stays within it and
    // the bytes stay right.
    let mut rng = Rng::new(12);
    for _ in 0..200 {
        let off = rng.below(8 * unit);
        let len = rng.below(600_000).min(8 * unit - off) as usize;
        assert!(read_exact(&blob, off, len)[..] == fake.data[off as usize..off as usize + len]);
        assert!(cache.usage() <= 4 * unit, "usage {}", cache.usage());
    }
    // Evicted bytes are released from the sparse file (hole punching).
    let f = std::fs::metadata(data_file(dir.path())).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        f.blocks() * 512 <= 5 * unit,
        "allocated {}",
        f.blocks() * 512
    );
}

#[test]
fn fetch_errors_surface_as_remote_errors() {
    let fake = Fake::new(random_bytes(13, 1 << 20));
    *fake.fail.lock().unwrap() = Some("503 Service Unavailable".into());
    let (_dir, _cache, blob) = fresh_blob(&fake);
    let mut buf = vec![7u8; 1000];
    let e = blob.read_at(&mut buf, 5000).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("503 Service Unavailable"), "{e}");
    assert!(e.to_string().contains("registry.test"), "{e}");
    let inner = e
        .get_ref()
        .and_then(|x| x.downcast_ref::<Error>())
        .expect("typed");
    assert!(
        matches!(inner, Error::Remote { offset: 0, end, .. } if *end == 256 * KIB),
        "{inner}"
    );
    // Errors are not cached: once the registry recovers, the read succeeds.
    *fake.fail.lock().unwrap() = None;
    assert!(read_exact(&blob, 5000, 1000)[..] == fake.data[5000..6000]);

    // A short response is an error too, never short or wrong bytes.
    struct Short;
    impl RangeFetcher for Short {
        fn fetch(&self, _: &BlobRef, _: u64, len: u64, _: Priority) -> Result<Vec<u8>> {
            Ok(vec![0; len as usize - 1])
        }
        fn blob_size(&self, _: &str) -> Result<u64> {
            Ok(0)
        }
    }
    let dir2 = tempfile::tempdir().unwrap();
    let cache2 = open_cache(dir2.path());
    let blob2 = RemoteBlob::new(
        blob_ref(1 << 20),
        Arc::new(Short),
        cache2,
        Arc::new(Scheduler::default()),
        RemoteOptions::default(),
    )
    .unwrap();
    let e = blob2.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("expected"), "{e}");
}

#[test]
fn prefetch_uses_prefetch_priority_and_fills_the_cache() {
    let fake = Fake::new(random_bytes(14, 3 << 20));
    let (_dir, _cache, blob) = fresh_blob(&fake);
    blob.prefetch(100_000, 2 << 20).unwrap();
    let calls = fake.calls.all();
    assert!(!calls.is_empty() && calls.iter().all(|c| c.2 == Priority::Prefetch));
    blob.prefetch(100_000, 2 << 20).unwrap();
    assert_eq!(
        fake.calls.count(),
        calls.len(),
        "second prefetch fetched again"
    );
    fake.calls.clear();
    assert!(read_exact(&blob, 0, 2 << 20) == fake.data[..2 << 20]);
    assert_eq!(fake.calls.count(), 0);
}

#[test]
fn foreground_reader_raises_the_queued_background_fetch_it_waits_for() {
    let unit = 256 * KIB;
    let (fake, _dir, cache) = cached_fake(16, 8 * unit as usize);
    let sched = Arc::new(Scheduler::new(1));
    let blob = Arc::new(
        RemoteBlob::new(
            blob_ref(fake.data.len() as u64),
            Arc::clone(&fake) as Arc<dyn RangeFetcher>,
            cache,
            Arc::clone(&sched),
            RemoteOptions::default(),
        )
        .unwrap(),
    );
    // The only slot is busy (a blocked in-flight fetch).
    let held = sched.acquire(Priority::Foreground);
    let bg = {
        let blob = Arc::clone(&blob);
        thread::spawn(move || blob.fetch_into_cache(0, unit, Priority::Background))
    };
    sched.wait_queued(1);
    let pf = {
        let blob = Arc::clone(&blob);
        thread::spawn(move || blob.prefetch(5 * unit, unit))
    };
    sched.wait_queued(2);
    let fg = {
        let blob = Arc::clone(&blob);
        thread::spawn(move || read_exact(&*blob, 1000, 5000))
    };
    // The reader joins the background flight and raises it.
    sched.wait_queued_at(Priority::Foreground, 1);
    assert_eq!(
        sched.queued(),
        2,
        "the reader must not issue its own request"
    );
    drop(held);
    assert!(fg.join().unwrap()[..] == fake.data[1000..6000]);
    bg.join().unwrap().unwrap();
    pf.join().unwrap().unwrap();
    assert_eq!(
        fake.calls.all(),
        vec![
            (0, unit, Priority::Foreground),
            (5 * unit, unit, Priority::Prefetch)
        ]
    );
}

#[test]
fn end_to_end_zfile_of_lsmt_through_remote_blob() {
    use overlaybd_core::lsmt::commit::CommitOptions;
    use overlaybd_core::lsmt::ro::RoLayer;
    use overlaybd_core::lsmt::writable::{CreateOptions, WritableLayer};

    let work = tempfile::tempdir().unwrap();
    let vsize = 16u64 << 20;
    let mut l = WritableLayer::create(
        work.path().join("data"),
        work.path().join("index"),
        CreateOptions {
            virtual_size: vsize,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; vsize as usize];
    let mut rng = Rng::new(15);
    for i in 0..200 {
        let off = rng.below(vsize / 512 - 64) * 512;
        let len = (rng.below(63) + 1) as usize * 512;
        let bytes = fixtures::image_like(i, len);
        l.write_at(&bytes, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&bytes);
    }
    let mut lsmt = Vec::new();
    l.commit(&CommitOptions::default(), &mut lsmt).unwrap();
    let mut w = ZFileWriter::new(Cursor::new(Vec::new()), zfile::Options::default()).unwrap();
    w.append(&lsmt).unwrap();
    let z = w.finish().unwrap().0.into_inner();

    let fake = Fake::new(z);
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(dir.path());
    let remote = default_blob(&fake, &cache);
    let zr = ZFileReader::open(remote).unwrap();
    let layer = RoLayer::open(Arc::new(zr)).unwrap();
    assert_eq!(layer.virtual_size(), vsize);
    let mut got = vec![0u8; vsize as usize];
    let mut off = 0;
    while off < vsize {
        let n = layer
            .read_at(&mut got[off as usize..(off + (1 << 20)) as usize], off)
            .unwrap();
        assert_eq!(n, 1 << 20);
        off += n as u64;
    }
    assert!(got == model, "LSMT over ZFile over RemoteBlob differs");
    // Whole units at the readers' priority, but for the jump table, which
    // the open asked for exactly (cache blocks, prefetch priority).
    let calls = fake.calls.all();
    let exact: Vec<_> = calls.iter().filter(|c| c.2 == Priority::Prefetch).collect();
    assert!(exact.len() <= 1, "{calls:?}");
    for &(o, _, p) in &calls {
        if p == Priority::Foreground {
            assert_eq!(o % (256 * KIB), 0);
        } else {
            assert_eq!(o % (64 * KIB), 0);
        }
    }
}
