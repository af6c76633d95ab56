//! Background download + SwitchBlob, against an in-memory fake fetcher:
//! commit and switch, sha256 verification, per-chunk retries, rate limit,
//! cancellation, background priority and scheduler gating.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use obd_remote::blob::{RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::download::{
    is_cancelled, CachedFetcher, DownloadHandle, DownloadOptions, DownloadPhase, Downloader,
    SwitchBlob, COMMIT_FILE, DOWNLOAD_FILE,
};
use obd_remote::sched::Scheduler;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::config::Download;
use overlaybd_core::{Error, ReadAt, Result};
use sha2::{Digest, Sha256};
use support::calls::Calls;

const KIB: u64 = 1024;

fn digest_of(d: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(d)))
}

/// A blocking point inside one fetch: the fetcher reports reaching it and
/// waits for a go.
struct Gate {
    offset: u64,
    reached: Sender<()>,
    resume: Mutex<Receiver<()>>,
}

/// An in-memory blob server recording every request.
#[derive(Default)]
struct Fake {
    data: Vec<u8>,
    calls: Calls,
    /// Chunk offset → failures left (u32::MAX: fail forever).
    fail: Mutex<HashMap<u64, u32>>,
    /// Flip a byte of every response.
    corrupt: AtomicBool,
    gate: Mutex<Option<Gate>>,
}

impl Fake {
    fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            data,
            ..Self::default()
        })
    }
    fn fail_first(&self, offset: u64, n: u32) {
        self.fail.lock().unwrap().insert(offset, n);
    }
    fn blob(&self) -> BlobRef {
        BlobRef {
            url: "https://registry.test/v2/ns/repo/blobs/x".into(),
            digest: digest_of(&self.data),
            size: self.data.len() as u64,
            verity: None,
        }
    }
}

impl RangeFetcher for Fake {
    fn fetch(&self, blob: &BlobRef, offset: u64, len: u64, prio: Priority) -> Result<Vec<u8>> {
        self.calls.record(offset, len, prio);
        let gate = self.gate.lock().unwrap().take();
        if let Some(g) = gate {
            if g.offset == offset {
                g.reached.send(()).unwrap();
                g.resume.lock().unwrap().recv().unwrap();
            } else {
                *self.gate.lock().unwrap() = Some(g);
            }
        }
        if let Some(left) = self.fail.lock().unwrap().get_mut(&offset) {
            if *left > 0 {
                if *left != u32::MAX {
                    *left -= 1;
                }
                return Err(Error::Remote {
                    url: blob.url.clone(),
                    offset,
                    end: offset + len,
                    detail: "HTTP 503".into(),
                });
            }
        }
        let mut v = self.data[offset as usize..(offset + len) as usize].to_vec();
        if self.corrupt.load(Ordering::Relaxed) {
            v[0] ^= 0xff;
        }
        Ok(v)
    }
    fn blob_size(&self, _blob_url: &str) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
}

/// The "remote" source: every read goes to the fake at Foreground.
struct Remote(Arc<Fake>);

impl ReadAt for Remote {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let size = self.0.data.len() as u64;
        if offset >= size {
            return Ok(0);
        }
        let n = (size - offset).min(buf.len() as u64);
        let v = self
            .0
            .fetch(&self.0.blob(), offset, n, Priority::Foreground)
            .map_err(Error::into_io)?;
        buf[..n as usize].copy_from_slice(&v);
        Ok(n as usize)
    }
    fn size(&self) -> u64 {
        self.0.data.len() as u64
    }
}

fn opts(block: u64) -> DownloadOptions {
    DownloadOptions {
        delay: Duration::ZERO,
        delay_extra: Duration::ZERO,
        max_mbps: 0,
        try_cnt: 3,
        block_size: block,
        retry_backoff: Duration::ZERO,
        scheduler: None,
    }
}

fn setup(len: usize) -> (Arc<Fake>, Arc<SwitchBlob>, tempfile::TempDir) {
    let fake = Fake::new(fixtures::random_bytes(len as u64, len));
    let sw = Arc::new(SwitchBlob::new(Arc::new(Remote(Arc::clone(&fake)))));
    (fake, sw, tempfile::tempdir().unwrap())
}

fn start(fake: &Arc<Fake>, sw: &Arc<SwitchBlob>, dir: &Path, o: DownloadOptions) -> Result<()> {
    start_blob(fake, fake.blob(), sw, dir, o)
}

/// Starts downloading `fake`'s blob into `dir` for `sw`; does not wait.
fn spawn(fake: &Arc<Fake>, sw: &Arc<SwitchBlob>, dir: &Path, o: DownloadOptions) -> DownloadHandle {
    let f: Arc<dyn RangeFetcher> = Arc::clone(fake) as _;
    Downloader::start(fake.blob(), f, dir.to_path_buf(), o, Arc::clone(sw))
}

/// Makes `fake` stop inside its request at `offset`: returns the receiver
/// that hears when it got there and the sender that lets it go on.
fn gate(fake: &Fake, offset: u64) -> (Receiver<()>, Sender<()>) {
    let (reached_tx, reached_rx) = channel();
    let (resume_tx, resume_rx) = channel();
    *fake.gate.lock().unwrap() = Some(Gate {
        offset,
        reached: reached_tx,
        resume: Mutex::new(resume_rx),
    });
    (reached_rx, resume_tx)
}

fn start_blob(
    fake: &Arc<Fake>,
    blob: BlobRef,
    sw: &Arc<SwitchBlob>,
    dir: &Path,
    o: DownloadOptions,
) -> Result<()> {
    let f: Arc<dyn RangeFetcher> = Arc::clone(fake) as _;
    Downloader::start(blob, f, dir.to_path_buf(), o, Arc::clone(sw))
        .wait()
        .map(|_| ())
}

/// `dir` holds the blob's bytes as the commit file.
fn assert_committed(dir: &Path, fake: &Fake) {
    assert!(std::fs::read(dir.join(COMMIT_FILE)).unwrap() == fake.data);
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn read_all(r: &dyn ReadAt) -> Vec<u8> {
    let mut v = vec![0u8; r.size() as usize];
    r.read_exact_at(&mut v, 0).unwrap();
    v
}

#[test]
fn download_commits_verifies_and_switches() {
    let (fake, sw, dir) = setup(1_000_000 + 123);
    assert!(!sw.is_local());
    assert_eq!(read_all(&*sw), fake.data, "remote reads before the switch");
    let before = fake.calls.count();
    assert!(before > 0);

    let h = spawn(&fake, &sw, dir.path(), opts(64 * KIB));
    let report = h.wait().unwrap();
    let chunks = fake.data.len().div_ceil(64 * 1024);
    assert_eq!(report.bytes, fake.data.len() as u64);
    assert_eq!(report.attempts as usize, chunks);
    assert!(!report.reused);
    assert_eq!(report.path, dir.path().join(COMMIT_FILE));

    // Downloaded in block_size chunks, all at Background.
    let calls = &fake.calls.all()[before..];
    assert_eq!(calls.len(), chunks);
    for (i, (off, len, prio)) in calls.iter().enumerate() {
        assert_eq!(*off, i as u64 * 64 * KIB);
        assert_eq!(*len, (64 * KIB).min(fake.data.len() as u64 - off));
        assert_eq!(*prio, Priority::Background);
    }

    assert_eq!(files(dir.path()), vec![COMMIT_FILE.to_string()]);
    assert_committed(dir.path(), &fake);
    assert!(sw.is_local());
    assert!(sw.local_file().is_some());

    let n = fake.calls.count();
    assert_eq!(read_all(&*sw), fake.data);
    let mut buf = [0u8; 10];
    assert_eq!(sw.read_at(&mut buf, 999_999).unwrap(), 10);
    assert_eq!(&buf[..], &fake.data[999_999..1_000_009]);
    assert_eq!(fake.calls.count(), n, "no remote requests after the switch");
    assert!(!sw.invalidate(0, 10), "a local file holds no cache");
}

#[test]
fn wrong_digest_is_an_integrity_error_and_keeps_remote() {
    let (fake, sw, dir) = setup(300_000);
    let mut blob = fake.blob();
    blob.digest = digest_of(b"something else");
    let e = start_blob(&fake, blob, &sw, dir.path(), opts(64 * KIB)).unwrap_err();
    assert!(matches!(e, Error::Integrity { .. }), "{e}");
    assert!(e.to_string().contains("sha256:"), "{e}");
    assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    assert!(!sw.is_local());
    let n = fake.calls.count();
    assert_eq!(read_all(&*sw), fake.data);
    assert!(fake.calls.count() > n, "still served remotely");
}

#[test]
fn corrupted_bytes_are_an_integrity_error() {
    let (fake, sw, dir) = setup(200_000);
    fake.corrupt.store(true, Ordering::Relaxed);
    let e = start(&fake, &sw, dir.path(), opts(64 * KIB)).unwrap_err();
    assert!(matches!(e, Error::Integrity { .. }), "{e}");
    assert!(files(dir.path()).is_empty());
    assert!(!sw.is_local());
}

#[test]
fn transient_chunk_failures_are_retried() {
    let (fake, sw, dir) = setup(300_000);
    fake.fail_first(64 * KIB, 2);
    fake.fail_first(256 * KIB, 1);
    let h = spawn(&fake, &sw, dir.path(), opts(64 * KIB));
    let r = h.wait().unwrap();
    assert_eq!(r.attempts, 5 + 3);
    let at = |o: u64| fake.calls.all().iter().filter(|c| c.0 == o).count();
    assert_eq!(at(64 * KIB), 3);
    assert_eq!(at(256 * KIB), 2);
    assert_eq!(at(0), 1);
    assert!(sw.is_local());
    assert_committed(dir.path(), &fake);
}

#[test]
fn persistent_chunk_failure_gives_up_after_try_cnt() {
    let (fake, sw, dir) = setup(300_000);
    fake.fail_first(128 * KIB, u32::MAX);
    let mut o = opts(64 * KIB);
    o.try_cnt = 4;
    let e = start(&fake, &sw, dir.path(), o).unwrap_err();
    match &e {
        Error::Remote {
            offset,
            end,
            detail,
            ..
        } => {
            assert_eq!((*offset, *end), (128 * KIB, 192 * KIB));
            assert!(
                detail.contains("4 attempts") && detail.contains("503"),
                "{e}"
            );
        }
        other => panic!("not a remote error: {other}"),
    }
    assert_eq!(
        fake.calls.all().iter().filter(|c| c.0 == 128 * KIB).count(),
        4
    );
    assert!(
        !fake.calls.all().iter().any(|c| c.0 > 128 * KIB),
        "stops at the failed chunk"
    );
    assert!(files(dir.path()).is_empty(), "partial .download removed");
    assert!(!sw.is_local());
}

#[test]
fn rate_limit_bounds_the_duration() {
    // 384 KiB at 1 MiB/s: at least 375 ms.
    let (fake, sw, dir) = setup(384 * 1024);
    let mut o = opts(32 * KIB);
    o.max_mbps = 1;
    let t = Instant::now();
    let r = spawn(&fake, &sw, dir.path(), o).wait().unwrap();
    let elapsed = t.elapsed();
    assert!(r.duration >= Duration::from_millis(375), "{:?}", r.duration);
    assert!(elapsed >= Duration::from_millis(375), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(sw.is_local());
}

#[test]
fn cancel_during_delay_returns_promptly() {
    let (fake, sw, dir) = setup(100_000);
    let mut o = opts(64 * KIB);
    o.delay = Duration::from_secs(60);
    o.delay_extra = Duration::from_secs(30);
    let h = spawn(&fake, &sw, dir.path(), o);
    assert_eq!(h.progress().phase, DownloadPhase::Waiting);
    let t = Instant::now();
    h.cancel();
    let e = h.wait().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(is_cancelled(&e), "{e}");
    assert_eq!(fake.calls.count(), 0);
    assert!(files(dir.path()).is_empty());
    assert!(!sw.is_local());
}

#[test]
fn cancel_mid_download_leaves_no_commit() {
    let (fake, sw, dir) = setup(400_000);
    let (reached_rx, resume_tx) = gate(&fake, 128 * KIB);
    let h = spawn(&fake, &sw, dir.path(), opts(64 * KIB));
    reached_rx.recv().unwrap();
    let p = h.progress();
    assert_eq!(p.phase, DownloadPhase::Downloading);
    assert_eq!(p.bytes, 128 * KIB);
    assert_eq!(p.total, 400_000);
    h.cancel();
    resume_tx.send(()).unwrap();
    let e = h.wait().unwrap_err();
    assert!(is_cancelled(&e), "{e}");
    assert_eq!(fake.calls.count(), 3, "no request after the cancel");
    assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    assert!(!sw.is_local());
}

#[test]
fn scheduler_keeps_download_behind_foreground() {
    let (fake, sw, dir) = setup(200_000);
    let sched = Arc::new(Scheduler::new(1));
    let permit = sched.acquire(Priority::Foreground);
    let h = spawn(
        &fake,
        &sw,
        dir.path(),
        opts(64 * KIB).with_scheduler(Arc::clone(&sched)),
    );
    // The download is queued for a slot at Background and has fetched nothing.
    sched.wait_queued_at(Priority::Background, 1);
    assert_eq!(fake.calls.count(), 0);
    assert_eq!(h.progress().bytes, 0);
    drop(permit);
    h.wait().unwrap();
    assert_eq!(fake.calls.count(), 4);
    assert!(fake.calls.all().iter().all(|c| c.2 == Priority::Background));
    assert_eq!(sched.granted(Priority::Background), 4);
    assert!(sw.is_local());
}

#[test]
fn existing_verified_commit_is_reused() {
    let (fake, sw, dir) = setup(100_000);
    std::fs::write(dir.path().join(COMMIT_FILE), &fake.data).unwrap();
    let r = spawn(&fake, &sw, dir.path(), opts(64 * KIB))
        .wait()
        .unwrap();
    assert!(r.reused);
    assert_eq!(fake.calls.count(), 0);
    assert!(sw.is_local());

    // A stale one (wrong bytes) is replaced by a fresh download.
    let (fake, sw, dir) = setup(100_000);
    std::fs::write(dir.path().join(COMMIT_FILE), b"stale").unwrap();
    start(&fake, &sw, dir.path(), opts(64 * KIB)).unwrap();
    assert_committed(dir.path(), &fake);
    assert!(!dir.path().join(DOWNLOAD_FILE).exists());
}

#[test]
fn unknown_size_is_probed() {
    let (fake, sw, dir) = setup(70_000);
    let mut blob = fake.blob();
    blob.size = 0;
    start_blob(&fake, blob, &sw, dir.path(), opts(64 * KIB)).unwrap();
    assert_committed(dir.path(), &fake);
}

#[test]
fn non_sha256_digest_is_rejected() {
    let (fake, sw, dir) = setup(1000);
    let mut blob = fake.blob();
    blob.digest = "sha512:abcd".into();
    let e = start_blob(&fake, blob, &sw, dir.path(), opts(64 * KIB)).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert_eq!(fake.calls.count(), 0);
}

/// Blocks inside `read_at` until told to go.
struct Slow {
    data: Vec<u8>,
    entered: Mutex<Sender<()>>,
    go: Mutex<Receiver<()>>,
}

impl ReadAt for Slow {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.entered.lock().unwrap().send(()).unwrap();
        self.go.lock().unwrap().recv().unwrap();
        self.data.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
}

#[test]
fn switch_blob_in_flight_reads_finish_on_the_old_source() {
    let (entered_tx, entered_rx) = channel();
    let (go_tx, go_rx) = channel();
    let old = Arc::new(Slow {
        data: vec![1u8; 100],
        entered: Mutex::new(entered_tx),
        go: Mutex::new(go_rx),
    });
    let sw = Arc::new(SwitchBlob::new(old));
    let reader = {
        let sw = Arc::clone(&sw);
        std::thread::spawn(move || {
            let mut b = [0u8; 10];
            sw.read_exact_at(&mut b, 5).unwrap();
            b
        })
    };
    entered_rx.recv().unwrap();
    sw.switch_to(Arc::new(vec![2u8; 100])).unwrap();
    assert!(sw.is_local());
    let mut b = [0u8; 10];
    sw.read_exact_at(&mut b, 5).unwrap();
    assert_eq!(b, [2u8; 10], "new reads go to the new source");
    assert_eq!(sw.slice_at(0, 3), Some(&[2u8, 2, 2][..]));
    go_tx.send(()).unwrap();
    assert_eq!(reader.join().unwrap(), [1u8; 10], "in flight: old source");

    // Size mismatch and a second switch are refused.
    let sw = SwitchBlob::new(Arc::new(vec![0u8; 10]));
    assert!(sw.switch_to(Arc::new(vec![0u8; 11])).is_err());
    assert!(!sw.is_local());
    sw.switch_to(Arc::new(vec![3u8; 10])).unwrap();
    assert!(sw.switch_to(Arc::new(vec![4u8; 10])).is_err());
    assert_eq!(read_all(&sw), vec![3u8; 10]);
}

#[test]
fn options_from_config() {
    let d = Download {
        enable: true,
        delay: 2,
        delay_extra: 3,
        max_mbps: 7,
        try_cnt: 9,
        block_size: 1 << 20,
    };
    let o = DownloadOptions::from(&d);
    assert_eq!(o.delay, Duration::from_secs(2));
    assert_eq!(o.delay_extra, Duration::from_secs(3));
    assert_eq!((o.max_mbps, o.try_cnt, o.block_size), (7, 9, 1 << 20));
    assert!(o.scheduler.is_none());
    let o = DownloadOptions::default();
    assert_eq!(o.delay, Duration::from_secs(300));
    assert_eq!(o.try_cnt, 5);
    assert_eq!(o.block_size, 262_144);
}

#[test]
fn download_through_the_block_cache_skips_cached_ranges() {
    // 1 MiB + a bit: five 256 KiB fetch units.
    let fake = Fake::new(fixtures::random_bytes(7, (1 << 20) + 5000));
    let cache_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = BlockCache::open(CacheOptions::new(cache_dir.path())).unwrap();
    let sched = Arc::new(Scheduler::new(2));
    let f: Arc<dyn RangeFetcher> = Arc::clone(&fake) as _;
    let remote =
        Arc::new(RemoteBlob::new(fake.blob(), f, cache, sched, RemoteOptions::default()).unwrap());
    let sw = Arc::new(SwitchBlob::new(Arc::clone(&remote) as Arc<dyn ReadAt>));

    // A foreground read caches the second unit.
    let mut b = vec![0u8; 1000];
    sw.read_exact_at(&mut b, 300 * KIB).unwrap();
    assert_eq!(b, fake.data[300 * 1024..300 * 1024 + 1000]);
    let before = fake.calls.count();

    let cf: Arc<dyn RangeFetcher> = Arc::new(CachedFetcher::new(Arc::clone(&remote)));
    let r = Downloader::start(
        fake.blob(),
        cf,
        dir.path().to_path_buf(),
        opts(64 * KIB),
        Arc::clone(&sw),
    )
    .wait()
    .unwrap();
    assert_eq!(r.bytes, fake.data.len() as u64);
    let calls = &fake.calls.all()[before..];
    let mut offs: Vec<u64> = calls.iter().map(|c| c.0).collect();
    offs.sort();
    assert_eq!(
        offs,
        vec![0, 512 * KIB, 768 * KIB, 1024 * KIB],
        "the cached unit is not fetched again"
    );
    assert!(calls.iter().all(|c| c.2 == Priority::Background));
    assert!(sw.is_local());
    assert_eq!(read_all(&*sw), fake.data);
    assert_eq!(fake.calls.count(), before + 4);
}

#[test]
fn cancel_during_retry_backoff_returns_promptly() {
    let (fake, sw, dir) = setup(100_000);
    fake.fail_first(0, u32::MAX);
    let (reached_rx, resume_tx) = gate(&fake, 0);
    let mut o = opts(64 * KIB);
    o.try_cnt = 5;
    o.retry_backoff = Duration::from_secs(60);
    let h = spawn(&fake, &sw, dir.path(), o);
    reached_rx.recv().unwrap();
    resume_tx.send(()).unwrap();
    let t = Instant::now();
    h.cancel();
    let e = h.wait().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(is_cancelled(&e), "{e}");
    assert_eq!(fake.calls.count(), 1, "no retry after the cancel");
    assert!(files(dir.path()).is_empty());
}
