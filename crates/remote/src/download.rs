//! Background whole-blob download and the [`SwitchBlob`] a layer reads through
//! (upstream `bk_download.cpp` + `SwitchFile`, integration.md §8).
//!
//! A remote layer is read through a [`SwitchBlob`] wrapping its remote source.
//! [`Downloader::start`] runs one blob's download on its own thread:
//! 1. wait `delay + rand(0..delay_extra)` (cancellable at once);
//! 2. if `<dir>/overlaybd.commit` already exists and its sha256 matches the
//!    digest, switch to it without downloading;
//! 3. fetch the blob in `block_size` chunks at [`Priority::Background`]
//!    (holding a [`Scheduler`] slot at that priority when one is given),
//!    throttled to `max_mbps` MiB/s, each chunk tried up to `try_cnt` times,
//!    written in place (`pwrite`) into `<dir>/.download`;
//! 4. verify the sha256 of the whole file against the digest (a mismatch
//!    deletes the file and fails with [`Error::Integrity`]);
//! 5. fsync, rename to `<dir>/overlaybd.commit`, fsync the directory;
//! 6. [`SwitchBlob::switch_to`] a [`FileSource`] of the committed file, so
//!    every later read is local.
//!
//! Failure or cancellation before the rename removes `.download` (this
//! implementation does not resume partial downloads, so a partial file has no
//! use) and never leaves an `overlaybd.commit`. Once the file is renamed the
//! download is complete: a later cancel changes nothing. Dropping the
//! [`DownloadHandle`] cancels; [`DownloadHandle::detach`] does not.
//!
//! The caller decides whether to download at all (`Download::enable`, and
//! upstream skips it while a trace is recorded).

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use zfile::{FileSource, ReadAt};

use super::blob::RemoteBlob;
use super::sched::Scheduler;
use super::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::config::Download;
use overlaybd_core::error::{Context, Error, Result};
use zfile::sync::{recover, MutexExt};

/// Name of the in-progress download file inside the layer directory.
pub const DOWNLOAD_FILE: &str = ".download";
/// Name of the finished, verified layer file inside the layer directory.
pub const COMMIT_FILE: &str = "overlaybd.commit";

/// Bytes per "MB" of `max_mbps` (MiB).
const MB: u64 = 1 << 20;
/// Read buffer of the sha256 pass.
const HASH_BUF: usize = 1 << 20;

// ---------------------------------------------------------------------------
// SwitchBlob
// ---------------------------------------------------------------------------

/// A [`ReadAt`] that reads from its initial (remote) source until
/// [`SwitchBlob::switch_to`] installs a replacement (the downloaded local file),
/// and from the replacement afterwards.
///
/// The switch is atomic and happens once (remote → local, as upstream's
/// `SwitchFile`): each call picks the source current when it starts and
/// finishes on it, so reads in flight during the switch complete on the old
/// source. Both sources live as long as the `SwitchBlob`, which is what lets
/// [`ReadAt::slice_at`] and [`ReadAt::local_file`] hand out borrows of the
/// current source soundly (an arbitrarily re-swappable `RwLock<Arc<_>>` could
/// not).
pub struct SwitchBlob {
    initial: Arc<dyn ReadAt>,
    switched: OnceLock<Arc<dyn ReadAt>>,
}

impl std::fmt::Debug for SwitchBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchBlob")
            .field("size", &self.initial.size())
            .field("local", &self.is_local())
            .finish()
    }
}

impl SwitchBlob {
    /// Reads from `initial` until switched.
    pub fn new(initial: Arc<dyn ReadAt>) -> Self {
        Self {
            initial,
            switched: OnceLock::new(),
        }
    }

    /// The source reads go to now.
    pub fn current(&self) -> &Arc<dyn ReadAt> {
        self.switched.get().unwrap_or(&self.initial)
    }

    /// The source given to [`SwitchBlob::new`].
    pub fn initial(&self) -> &Arc<dyn ReadAt> {
        &self.initial
    }

    /// Sends every later read to `new`. Fails (leaving reads where they go)
    /// when `new` has a different size or the blob was switched already.
    pub fn switch_to(&self, new: Arc<dyn ReadAt>) -> Result<()> {
        let (have, want) = (new.size(), self.initial.size());
        if have != want {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("switch: replacement holds {have} bytes, the blob {want}"),
            )));
        }
        self.switched.set(new).map_err(|_| {
            Error::Io(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "switch: the blob was switched already",
            ))
        })
    }

    /// Whether reads go to the replacement (the downloaded local file) now.
    pub fn is_local(&self) -> bool {
        self.switched.get().is_some()
    }
}

impl ReadAt for SwitchBlob {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.current().read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.initial.size()
    }
    fn slice_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.current().slice_at(offset, len)
    }
    fn local_file(&self) -> Option<(&File, u64)> {
        self.current().local_file()
    }
    fn will_need(&self, offset: u64, len: u64) {
        self.current().will_need(offset, len)
    }
    fn invalidate(&self, offset: u64, len: u64) -> bool {
        self.current().invalidate(offset, len)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // The whole read on one source.
        self.current().read_exact_at(buf, offset)
    }
}

// ---------------------------------------------------------------------------
// Downloading through the block cache
// ---------------------------------------------------------------------------

/// A [`RangeFetcher`] reading one blob through its [`RemoteBlob`]: a range is
/// brought into the block cache at the requested priority (single-flight with
/// foreground reads, admitted by the blob's [`Scheduler`], skipping what is
/// cached already), then copied out of the cache.
///
/// Give this to [`Downloader::start`] to download through the cache (as
/// upstream does): blocks foreground reads fetched are not fetched again.
/// Leave [`DownloadOptions::scheduler`] `None` then: the blob's own scheduler
/// already orders the requests. Caveats: the downloaded blob also fills the
/// cache budget; a range the cache could not keep is re-read at
/// [`Priority::Foreground`]; corrupt cached bytes make the sha256 check fail.
#[derive(Debug, Clone)]
pub struct CachedFetcher {
    remote: Arc<RemoteBlob>,
}

impl CachedFetcher {
    /// Fetches through `remote`.
    pub fn new(remote: Arc<RemoteBlob>) -> Self {
        Self { remote }
    }
}

impl RangeFetcher for CachedFetcher {
    fn fetch(&self, blob: &BlobRef, offset: u64, len: u64, prio: Priority) -> Result<Vec<u8>> {
        let mine = self.remote.blob();
        let fail = |detail: String| Error::Remote {
            url: blob.url.clone(),
            offset,
            end: offset + len,
            detail,
        };
        if blob.digest != mine.digest {
            return Err(fail(format!(
                "cached fetcher serves {}, asked for {}",
                mine.digest, blob.digest
            )));
        }
        self.remote.fetch_into_cache(offset, len, prio)?;
        let mut v = vec![0u8; len as usize];
        let n = self.remote.read(&mut v, offset)?;
        if n as u64 != len {
            return Err(fail(format!("blob ends after {n} of {len} bytes")));
        }
        Ok(v)
    }

    fn blob_size(&self, _blob_url: &str) -> Result<u64> {
        Ok(self.remote.blob().size)
    }
}

// ---------------------------------------------------------------------------
// Options, progress, report
// ---------------------------------------------------------------------------

/// How one background download runs.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Wait before starting.
    pub delay: Duration,
    /// Upper bound (exclusive) of a random extra wait added to `delay`.
    pub delay_extra: Duration,
    /// Rate limit in MiB/s; 0 = unlimited.
    pub max_mbps: u64,
    /// Attempts per chunk, the first included (0 is treated as 1).
    pub try_cnt: u32,
    /// Bytes per request (0 is treated as the default 256 KiB).
    pub block_size: u64,
    /// Wait between attempts of a chunk (cancellable).
    pub retry_backoff: Duration,
    /// When set, each request holds a slot of this scheduler at
    /// [`Priority::Background`], so foreground reads sharing it go first.
    /// Leave `None` when the fetcher itself goes through the same scheduler
    /// (taking two slots of a one-slot scheduler would deadlock).
    pub scheduler: Option<Arc<Scheduler>>,
}

/// Default [`DownloadOptions::retry_backoff`].
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// Default [`DownloadOptions::block_size`] (upstream `blockSize`).
pub const DEFAULT_BLOCK_SIZE: u64 = 256 << 10;

impl From<&Download> for DownloadOptions {
    fn from(d: &Download) -> Self {
        Self {
            delay: Duration::from_secs(d.delay),
            delay_extra: Duration::from_secs(d.delay_extra),
            max_mbps: d.max_mbps,
            try_cnt: d.try_cnt,
            block_size: d.block_size,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            scheduler: None,
        }
    }
}

impl From<Download> for DownloadOptions {
    fn from(d: Download) -> Self {
        Self::from(&d)
    }
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self::from(&Download::default())
    }
}

impl DownloadOptions {
    /// The same options with requests admitted by `sched`.
    pub fn with_scheduler(mut self, sched: Arc<Scheduler>) -> Self {
        self.scheduler = Some(sched);
        self
    }
}

/// Where a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadPhase {
    /// In the initial delay.
    Waiting,
    /// Fetching chunks.
    Downloading,
    /// Hashing the downloaded file.
    Verifying,
    /// Committed and switched.
    Done,
    /// Stopped by an error.
    Failed,
    /// Stopped by [`DownloadHandle::cancel`].
    Cancelled,
}

/// A snapshot of a download's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadProgress {
    /// The phase.
    pub phase: DownloadPhase,
    /// Bytes fetched and written so far.
    pub bytes: u64,
    /// Blob size (0 until known).
    pub total: u64,
    /// Fetch attempts so far (retries included).
    pub attempts: u32,
}

/// The outcome of a finished download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadReport {
    /// Bytes fetched (0 when an existing verified commit file was reused).
    pub bytes: u64,
    /// Time from the end of the delay to the switch.
    pub duration: Duration,
    /// The delay actually waited.
    pub waited: Duration,
    /// Fetch attempts (retries included).
    pub attempts: u32,
    /// The committed file reads now go to.
    pub path: PathBuf,
    /// Whether an existing verified `overlaybd.commit` was used instead.
    pub reused: bool,
}

/// Whether `e` is the error of a cancelled download.
pub fn is_cancelled(e: &Error) -> bool {
    matches!(e, Error::Io(io) if io.kind() == io::ErrorKind::Interrupted)
}

fn cancelled_err(blob: &BlobRef) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::Interrupted,
        format!("background download of {} cancelled", blob.url),
    ))
}

// ---------------------------------------------------------------------------
// Shared state between the handle and the worker
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Ctl {
    phase: DownloadPhase,
    cancelled: bool,
}

#[derive(Debug)]
struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    bytes: AtomicU64,
    total: AtomicU64,
    attempts: AtomicU32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.locked()
    }

    fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    fn set_phase(&self, p: DownloadPhase) {
        self.lock().phase = p;
        self.cv.notify_all();
    }

    /// Waits `d` unless cancelled first; returns whether cancelled.
    fn pause(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = self.lock();
        loop {
            if g.cancelled {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = recover(self.cv.wait_timeout(g, deadline - now)).0;
        }
    }
}

// ---------------------------------------------------------------------------
// Handle
// ---------------------------------------------------------------------------

/// A running background download. Dropping it cancels the download (without
/// waiting); [`DownloadHandle::detach`] lets it run on instead.
#[derive(Debug)]
pub struct DownloadHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<DownloadReport>>>,
    /// Why no worker thread runs (it could not be spawned).
    spawn_error: Option<Error>,
}

impl DownloadHandle {
    /// Asks the download to stop. Returns at once: the delay, rate-limit and
    /// retry waits end immediately; a request in flight (or queued for a
    /// scheduler slot) is finished first. The worker checks the flag under
    /// the same lock it renames `overlaybd.commit` under, so after `cancel`
    /// either [`DownloadHandle::wait`] reports the cancellation and no
    /// `overlaybd.commit` was made, or the download had already committed
    /// (then `cancel` changes nothing and `wait` returns the report).
    pub fn cancel(&self) {
        self.shared.lock().cancelled = true;
        self.shared.cv.notify_all();
    }

    /// Progress now.
    pub fn progress(&self) -> DownloadProgress {
        let s = &self.shared;
        DownloadProgress {
            phase: s.lock().phase,
            bytes: s.bytes.load(Ordering::Relaxed),
            total: s.total.load(Ordering::Relaxed),
            attempts: s.attempts.load(Ordering::Relaxed),
        }
    }

    /// Whether the worker has ended (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the end; the report, or why it failed ([`is_cancelled`]
    /// tells a cancellation).
    pub fn wait(mut self) -> Result<DownloadReport> {
        let Some(t) = self.thread.take() else {
            return Err(self.spawn_error.take().unwrap_or_else(|| {
                Error::Io(io::Error::other("background download has no worker"))
            }));
        };
        t.join().unwrap_or_else(|_| {
            Err(Error::Io(io::Error::other(
                "background download thread panicked",
            )))
        })
    }

    /// Lets the download run to its end unobserved.
    pub fn detach(mut self) {
        self.thread.take();
    }
}

impl Drop for DownloadHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.cancel();
        }
    }
}

// ---------------------------------------------------------------------------
// Downloader
// ---------------------------------------------------------------------------

/// Starts background downloads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Downloader;

impl Downloader {
    /// Downloads `blob` through `fetcher` into `target_dir` on a new thread
    /// (see the module docs), then switches `switch` to the committed file.
    pub fn start(
        blob: BlobRef,
        fetcher: Arc<dyn RangeFetcher>,
        target_dir: PathBuf,
        opts: DownloadOptions,
        switch: Arc<SwitchBlob>,
    ) -> DownloadHandle {
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                phase: DownloadPhase::Waiting,
                cancelled: false,
            }),
            cv: Condvar::new(),
            bytes: AtomicU64::new(0),
            total: AtomicU64::new(blob.size),
            attempts: AtomicU32::new(0),
        });
        let job = Job {
            blob,
            fetcher,
            dir: target_dir,
            opts,
            switch,
            shared: Arc::clone(&shared),
        };
        let thread = std::thread::Builder::new()
            .name("obd-download".into())
            .spawn(move || {
                let r = job.run();
                let phase = match &r {
                    Ok(_) => DownloadPhase::Done,
                    Err(e) if is_cancelled(e) => DownloadPhase::Cancelled,
                    Err(_) => DownloadPhase::Failed,
                };
                job.shared.set_phase(phase);
                r
            });
        match thread {
            Ok(t) => DownloadHandle {
                shared,
                thread: Some(t),
                spawn_error: None,
            },
            Err(e) => {
                // No thread: `wait` reports why.
                shared.set_phase(DownloadPhase::Failed);
                DownloadHandle {
                    shared,
                    thread: None,
                    spawn_error: Some(Error::Io(e)),
                }
            }
        }
    }
}

/// A uniformly-ish random duration in `[0, max)`.
fn random_below(max: Duration) -> Duration {
    let n = max.as_nanos().min(u64::MAX as u128) as u64;
    if n == 0 {
        return Duration::ZERO;
    }
    let mut h = RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    Duration::from_nanos(h.finish() % n)
}

/// The lowercase hex of a `sha256:<64 hex>` digest.
fn sha256_hex(digest: &str) -> Result<String> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(h.to_ascii_lowercase())
        }
        _ => Err(Error::Unsupported(format!(
            "background download needs a sha256:<64 hex> digest, got {digest:?}"
        ))),
    }
}

/// Hex sha256 of a whole file.
fn hash_file(path: &Path) -> Result<String> {
    let f = File::open(path).in_file(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut off = 0u64;
    loop {
        let n = match f.read_at(&mut buf, off) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Io(e).in_file(path)),
        };
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

struct Job {
    blob: BlobRef,
    fetcher: Arc<dyn RangeFetcher>,
    dir: PathBuf,
    opts: DownloadOptions,
    switch: Arc<SwitchBlob>,
    shared: Arc<Shared>,
}

impl Job {
    fn run(&self) -> Result<DownloadReport> {
        let want = sha256_hex(&self.blob.digest)?;
        let commit = self.dir.join(COMMIT_FILE);
        let partial = self.dir.join(DOWNLOAD_FILE);

        let waited = self.opts.delay + random_below(self.opts.delay_extra);
        if self.shared.pause(waited) {
            return Err(cancelled_err(&self.blob));
        }
        let t0 = Instant::now();

        // Downloaded before (e.g. by a previous run): verify and use it.
        if commit.is_file() && hash_file(&commit)? == want {
            self.switch_to(&commit)?;
            return Ok(DownloadReport {
                bytes: 0,
                duration: t0.elapsed(),
                waited,
                attempts: 0,
                path: commit,
                reused: true,
            });
        }

        self.shared.set_phase(DownloadPhase::Downloading);
        let r = self.download(&partial, &want);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }

        {
            // Under the control lock: a cancel either lands before the
            // rename (no commit file) or after it (ignored).
            let g = self.shared.lock();
            let r = if g.cancelled {
                Err(cancelled_err(&self.blob))
            } else {
                std::fs::rename(&partial, &commit).in_file(&commit)
            };
            drop(g);
            if let Err(e) = r {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .in_file(&self.dir)?;
        self.switch_to(&commit)?;
        Ok(DownloadReport {
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            duration: t0.elapsed(),
            waited,
            attempts: self.shared.attempts.load(Ordering::Relaxed),
            path: commit,
            reused: false,
        })
    }

    fn switch_to(&self, commit: &Path) -> Result<()> {
        let src = FileSource::open(commit).in_file(commit)?;
        self.switch.switch_to(Arc::new(src))
    }

    /// Fills, syncs and verifies `partial`.
    fn download(&self, partial: &Path, want: &str) -> Result<()> {
        let size = match self.blob.size {
            0 => self.fetcher.blob_size(&self.blob.url)?,
            s => s,
        };
        self.shared.total.store(size, Ordering::Relaxed);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(partial)
            .in_file(partial)?;
        file.set_len(size).in_file(partial)?;

        let block = match self.opts.block_size {
            0 => DEFAULT_BLOCK_SIZE,
            b => b,
        };
        let rate = self.opts.max_mbps.saturating_mul(MB);
        let start = Instant::now();
        let mut done = 0u64;
        while done < size {
            if self.shared.is_cancelled() {
                return Err(cancelled_err(&self.blob));
            }
            let len = block.min(size - done);
            let data = self.fetch_chunk(done, len)?;
            file.write_all_at(&data, done).in_file(partial)?;
            done += len;
            self.shared.bytes.store(done, Ordering::Relaxed);
            if rate > 0 {
                // Token bucket refilled at `rate`: sleep off the deficit.
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                let spent = start.elapsed();
                if due > spent && self.shared.pause(due - spent) {
                    return Err(cancelled_err(&self.blob));
                }
            }
        }

        self.shared.set_phase(DownloadPhase::Verifying);
        file.sync_all().in_file(partial)?;
        drop(file);
        let got = hash_file(partial)?;
        if got != want {
            return Err(Error::Integrity {
                what: self.blob.url.clone(),
                offset: 0,
                tries: 1,
                detail: format!(
                    "downloaded blob has sha256:{got}, expected {}",
                    self.blob.digest
                ),
            });
        }
        Ok(())
    }

    /// One chunk, tried up to `try_cnt` times.
    fn fetch_chunk(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let tries = self.opts.try_cnt.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.shared.attempts.fetch_add(1, Ordering::Relaxed);
            let r = {
                let _permit = self
                    .opts
                    .scheduler
                    .as_deref()
                    .map(|s| s.acquire(Priority::Background));
                self.fetcher
                    .fetch(&self.blob, offset, len, Priority::Background)
            };
            let last = match r {
                Ok(v) if v.len() as u64 == len => return Ok(v),
                Ok(v) => format!("short response: {} of {len} bytes", v.len()),
                Err(e) => e.to_string(),
            };
            if attempt >= tries {
                return Err(Error::Remote {
                    url: self.blob.url.clone(),
                    offset,
                    end: offset + len,
                    detail: format!("background download gave up after {attempt} attempts: {last}"),
                });
            }
            if self.shared.pause(self.opts.retry_backoff) {
                return Err(cancelled_err(&self.blob));
            }
        }
    }
}
