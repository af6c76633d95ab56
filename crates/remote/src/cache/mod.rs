//! The host-wide block cache of remote blobs: one copy per host, shared by
//! every process (device workers, `obd image flatten`, `obd trace replay`)
//! at once, bounded by one byte budget and collected.
//!
//! Layout under the cache directory, per blob (a *stem*: the digest with `:`
//! replaced by `_`, plus `-o<hash of the origin>` for bytes not verified
//! against a digest table, see [`BlockCache::blob_scoped`]):
//! - `<stem>.data`: a sparse file as long as the blob; cached bytes sit at
//!   their blob offsets;
//! - `<stem>.map`: the shared presence map (one bit and one last-use tick per
//!   cache block, counters, an eviction generation), mapped by every process
//!   that uses the blob (`map.rs`);
//! - `<stem>.meta`: the durable checkpoint of the bitmap (`meta.rs`).
//!
//! plus `cache.state` (a host-wide use clock and the bytes cached) and
//! `EVICT` (the lock of the process running an eviction pass).
//!
//! **Concurrency.** A block's bytes are written (`pwrite`) before its bit is
//! set, so a process that sees the bit reads the bytes. An eviction makes the
//! blob's generation odd, clears the bits, persists the checkpoint, punches
//! the holes and makes the generation even again, holding the map's `flock`.
//! A reader checks the generation before the bits and after reading the
//! bytes, and an inserter before writing and after setting its bits: any
//! overlap with an eviction turns into a miss (the inserter clears what it
//! set), never into wrong bytes. Two processes missing the same block at once
//! may both fetch it; both write the same bytes.
//!
//! **Crashes.** After `kill -9` of any process the live bits are exact (they
//! only claim bytes already written to the page cache). After a reboot (the
//! map's boot id differs) the live bits are replaced by the checkpoint, which
//! is written only after the data file was `fdatasync`ed and never claims a
//! block whose bytes were punched out; blocks inserted after the last
//! checkpoint are fetched again.
//!
//! **Budget.** Bytes of present blocks across all blobs are counted in
//! `cache.state`; when an insert takes the total over the budget, one process
//! evicts the least recently used blocks host-wide (by their ticks) down to
//! [`CacheOptions::low_water_pct`]. Blobs that no process uses and no caller
//! keeps are removed whole by [`BlockCache::gc`] after a grace period.
//!
//! **Full disk.** A failed data write (`ENOSPC`) is not an error for the
//! reader: the bytes are served from the network and inserts pause for a
//! second; the cache recovers once space frees. A map that cannot be created
//! leaves the blob uncached in this process.

mod file;
mod map;
mod meta;
mod scan;
mod shm;

use std::any::Any;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use overlaybd_core::error::{Error, Result};
use zfile::sync::MutexExt;

use map::{BlobMap, Counter, MapHeader, StateFile};
pub use scan::{BlobInfo, GcReport};
use shm::FlockGuard;

/// Default cache block (presence granularity): 64 KiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 << 10;
/// Default grace period before a blob nobody uses is collected: 1 hour.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);
/// Name of the cache-wide state file.
const STATE_FILE: &str = "cache.state";
/// Name of the eviction lock file.
const EVICT_FILE: &str = "EVICT";
/// Locked (shared) while a process fetches a container's read
/// ([`ForegroundFlag`]).
const FOREGROUND_FILE: &str = "FOREGROUND";

/// The default byte budget for a cache on a file system of `fs_bytes`: 10 %
/// of it, at least 1 GiB (but never more than half the file system), at most
/// 64 GiB.
pub fn default_budget(fs_bytes: u64) -> u64 {
    let floor = (1u64 << 30).min(fs_bytes / 2);
    (fs_bytes / 10).clamp(floor, 64 << 30)
}

/// Options of a [`BlockCache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// Cache directory (created if missing).
    pub dir: PathBuf,
    /// Presence and eviction granularity in bytes; a power of two, at least
    /// 4096. Default [`DEFAULT_BLOCK_SIZE`] (64 KiB). Blobs cached with
    /// another block size are reset.
    pub block_size: u64,
    /// Bytes of cached data allowed across all blobs of the host; 0 (the
    /// default) picks [`default_budget`] of the cache's file system.
    pub budget: u64,
    /// Eviction stops once usage is at most this percentage of the budget.
    /// Default 90.
    pub low_water_pct: u8,
    /// Checkpoint a blob's bitmap after this many blocks inserted by this
    /// process (also on eviction, [`BlockCache::flush`] and drop). Default
    /// 1024: each checkpoint `fdatasync`s the data file; after a reboot at
    /// most this many blocks per blob and process are fetched again.
    pub flush_every: u32,
    /// The boot id the live bits are trusted for; `None` (the default) reads
    /// `/proc/sys/kernel/random/boot_id`. Tests set it to simulate a reboot.
    #[doc(hidden)]
    pub boot_id: Option<[u8; 40]>,
}

impl CacheOptions {
    /// Defaults with `dir` as the cache directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            block_size: DEFAULT_BLOCK_SIZE,
            budget: 0,
            low_water_pct: 90,
            flush_every: 1024,
            boot_id: None,
        }
    }
}

/// The cache of one blob (in one origin scope); get it with
/// [`BlockCache::blob_scoped`].
#[derive(Debug)]
pub struct CachedBlob {
    digest: String,
    scope: Option<String>,
    size: u64,
    bs: u64,
    blocks: u64,
    data_path: PathBuf,
    meta_path: PathBuf,
    map_path: PathBuf,
    /// The data file and the shared map; `None` when the blob could not be
    /// cached (e.g. a full disk): every read is then a miss.
    live: Option<(File, BlobMap)>,
    /// Blocks this process inserted since the last checkpoint.
    unflushed: AtomicU32,
    /// Serialises this process's checkpoints and evictions of the blob (the
    /// map's `flock` does so between processes).
    persist_lock: Mutex<()>,
    /// Reset and replaced: must not touch the files at its paths any more.
    detached: AtomicBool,
    /// State that users of this blob share (see [`CachedBlob::shared`]).
    shared: Mutex<Option<Arc<dyn Any + Send + Sync>>>,
}

impl CachedBlob {
    /// The blob digest.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The blob size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The origin scope (`None` for verified bytes shared by every origin).
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Whether the blob is cached at all (false after a failed creation).
    pub fn is_cached(&self) -> bool {
        self.live.is_some()
    }

    /// A value of type `T` shared by every user of this blob's cache in this
    /// process (all [`RemoteBlob`](super::blob::RemoteBlob)s of the same blob
    /// share their in-flight requests through it). Created with
    /// `T::default()` on first use; a reset blob starts a new one.
    pub fn shared<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let mut g = self.shared.locked();
        if let Some(t) = g.as_ref().and_then(|a| Arc::clone(a).downcast::<T>().ok()) {
            return t;
        }
        let t = Arc::new(T::default());
        *g = Some(Arc::clone(&t) as Arc<dyn Any + Send + Sync>);
        t
    }

    /// A blob of the cache at `paths` (`[map, data, meta]`), with its files
    /// (`None`: uncached in this process).
    fn new(h: MapHeader, paths: [PathBuf; 3], live: Option<(File, BlobMap)>) -> Self {
        let [map_path, data_path, meta_path] = paths;
        CachedBlob {
            scope: (!h.scope.is_empty()).then(|| h.scope.clone()),
            blocks: h.size.div_ceil(h.bs),
            digest: h.digest,
            size: h.size,
            bs: h.bs,
            data_path,
            meta_path,
            map_path,
            live,
            unflushed: AtomicU32::new(0),
            persist_lock: Mutex::new(()),
            detached: AtomicBool::new(false),
            shared: Mutex::new(None),
        }
    }

    fn block_len(&self, i: u64) -> u64 {
        (self.size - i * self.bs).min(self.bs)
    }

    /// Blocks overlapping `[offset, offset + len)`, clamped to the blob.
    fn block_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset / self.bs, (end - 1) / self.bs))
    }

    fn cache_err(&self, path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Cache {
            path: path.to_owned(),
            detail: format!("{what} ({}): {e}", self.digest),
        }
    }

    /// Makes the eviction generation even (an evicter killed mid-way leaves
    /// it odd); call with the map's `flock` held.
    fn settle_gen(m: &BlobMap) {
        if m.gen().load(Ordering::Acquire) & 1 == 1 {
            m.gen().fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Checkpoints the bitmap: a snapshot of the live bits, taken with the
    /// map's lock held (so no eviction runs meanwhile), written after the
    /// data file is synced.
    fn checkpoint(&self) -> Result<()> {
        let Some((data, m)) = &self.live else {
            return Ok(());
        };
        if self.detached.load(Ordering::Acquire) {
            return Ok(());
        }
        let _p = self.persist_lock.locked();
        let _f = FlockGuard::exclusive(&m.file)
            .map_err(|e| self.cache_err(&self.map_path, "locking the map", e))?;
        Self::settle_gen(m);
        self.unflushed.store(0, Ordering::Relaxed);
        self.write_meta(data, &m.snapshot())
    }

    /// Syncs the data file, then atomically replaces the checkpoint file.
    fn write_meta(&self, data: &File, present: &[u64]) -> Result<()> {
        data.sync_data()
            .map_err(|e| self.cache_err(&self.data_path, "fdatasync", e))?;
        let bytes = meta::encode_meta(&self.digest, self.bs, self.size, self.blocks, present);
        let tmp = self
            .meta_path
            .with_extension(format!("meta.{}.tmp", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.meta_path)?;
            if let Some(dir) = self.meta_path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.cache_err(&self.meta_path, "writing the checkpoint", e)
        })
    }
}

impl Drop for CachedBlob {
    fn drop(&mut self) {
        if self.unflushed.load(Ordering::Relaxed) > 0 {
            // Best effort: a lost checkpoint only means refetching after a
            // reboot.
            let _ = self.checkpoint();
        }
    }
}

/// The block cache of all remote blobs under one directory, shared by every
/// process on the host that opens the same directory. Thread-safe.
#[derive(Debug)]
pub struct BlockCache {
    opts: CacheOptions,
    budget: u64,
    boot: [u8; 40],
    state: StateFile,
    evict_lock: File,
    /// Serialises this process's eviction passes.
    evicting: Mutex<()>,
    /// This process's open blobs, by stem.
    blobs: Mutex<HashMap<String, Arc<CachedBlob>>>,
    /// Blobs reset because their files were stale or corrupt (diagnostics).
    resets: AtomicU64,
    /// Inserts skipped because the disk was full.
    skipped: AtomicU64,
    /// After `ENOSPC`: no inserts before this instant.
    full_until: Mutex<Option<Instant>>,
    tmp_seq: AtomicU64,
}

impl BlockCache {
    /// Opens (creating if needed) the cache directory. The first process to
    /// open it (none holds it) checks every blob: maps from an earlier boot
    /// fall back to their checkpoints, stale or corrupt files and the
    /// per-device directories of earlier versions are removed, and the usage
    /// is recounted.
    pub fn open(opts: CacheOptions) -> Result<Arc<Self>> {
        let dir = opts.dir.clone();
        let derr = |detail: String| Error::Cache {
            path: dir.clone(),
            detail,
        };
        if !opts.block_size.is_power_of_two() || opts.block_size < 4096 {
            return Err(derr(format!(
                "block size {} is not a power of two of at least 4096",
                opts.block_size
            )));
        }
        fs::create_dir_all(&dir).map_err(|e| derr(format!("creating the directory: {e}")))?;
        let state = StateFile::open(&dir.join(STATE_FILE))
            .map_err(|e| derr(format!("opening {STATE_FILE}: {e}")))?;
        let evict_lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(EVICT_FILE))
            .map_err(|e| derr(format!("opening {EVICT_FILE}: {e}")))?;
        let budget = match opts.budget {
            0 => default_budget(fs_size(&dir).unwrap_or(40 << 30)),
            b => b,
        };
        let boot = opts.boot_id.unwrap_or_else(shm::boot_id);
        let alone = match shm::flock(&state.file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => false,
            Err(e) => return Err(derr(format!("locking {STATE_FILE}: {e}"))),
        };
        let cache = Self {
            opts,
            budget,
            boot,
            state,
            evict_lock,
            evicting: Mutex::new(()),
            blobs: Mutex::new(HashMap::new()),
            resets: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            full_until: Mutex::new(None),
            tmp_seq: AtomicU64::new(0),
        };
        if alone {
            scan::recover(&cache)?;
        }
        // Every user holds the state file shared; the first opener's
        // exclusive lock (kept until its recovery is done) converts here.
        shm::flock(&cache.state.file, libc::LOCK_SH)
            .map_err(|e| derr(format!("locking {STATE_FILE}: {e}")))?;
        let cache = Arc::new(cache);
        cache.evict_over_budget()?;
        Ok(cache)
    }

    /// The options in use.
    pub fn options(&self) -> &CacheOptions {
        &self.opts
    }

    /// The byte budget in force (the default resolved).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The cache block size.
    pub fn block_size(&self) -> u64 {
        self.opts.block_size
    }

    /// Bytes of cached data across all blobs, host-wide.
    pub fn usage(&self) -> u64 {
        self.state.used().load(Ordering::Relaxed)
    }

    /// How many blobs had their cache reset because the files on disk were
    /// stale or corrupt (by this process).
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// Inserts skipped because the cache's file system was full.
    pub fn skipped_full(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    fn tmp_name(&self, stem: &str, what: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.opts
            .dir
            .join(format!(".{stem}.{what}.{}.{n}.tmp", std::process::id()))
    }

    fn paths(&self, stem: &str) -> [PathBuf; 3] {
        let d = &self.opts.dir;
        ["map", "data", "meta"].map(|x| d.join(format!("{stem}.{x}")))
    }

    /// Unlinks a blob's files (processes that have them open keep their
    /// copy; new users start afresh).
    fn unlink(&self, stem: &str) {
        for p in self.paths(stem) {
            let _ = fs::remove_file(p);
        }
    }

    /// The cache of blob `digest` of `size` bytes shared by every origin: for
    /// bytes checked against a digest table. Same as `blob_scoped(…, None)`.
    pub fn blob(&self, digest: &str, size: u64) -> Result<Arc<CachedBlob>> {
        self.blob_scoped(digest, size, None)
    }

    /// The cache of blob `digest` of `size` bytes, created empty if absent.
    /// `scope` names the origin (registry and repository) of bytes that were
    /// not verified against a digest table: they are kept apart per origin,
    /// so bytes one registry served never reach a reader of another. A copy
    /// recorded with another size or block size is reset.
    pub fn blob_scoped(
        &self,
        digest: &str,
        size: u64,
        scope: Option<&str>,
    ) -> Result<Arc<CachedBlob>> {
        let stem = stem_for(digest, scope).ok_or_else(|| Error::Cache {
            path: self.opts.dir.clone(),
            detail: format!("digest {digest:?} is not usable as a file name"),
        })?;
        let mut blobs = self.blobs.locked();
        if let Some(b) = blobs.get(&stem) {
            if b.size == size && !b.detached.load(Ordering::Acquire) {
                return Ok(Arc::clone(b));
            }
            let old = blobs.remove(&stem).expect("present");
            old.detached.store(true, Ordering::Release);
            self.resets.fetch_add(1, Ordering::Relaxed);
            self.unlink(&stem);
        }
        let b = Arc::new(self.open_blob(&stem, digest, size, scope));
        blobs.insert(stem, Arc::clone(&b));
        Ok(b)
    }

    /// Opens or creates a blob's files, as a user (holding it in use); on
    /// failure the blob is left uncached in this process.
    fn open_blob(&self, stem: &str, digest: &str, size: u64, scope: Option<&str>) -> CachedBlob {
        let mut live = None;
        for _ in 0..4 {
            match self.try_open(stem, digest, size, scope) {
                Ok(Some(l)) => {
                    live = Some(l);
                    break;
                }
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(
                        "block cache {}: {digest} stays uncached in this process: {e}",
                        self.opts.dir.display()
                    );
                    break;
                }
            }
        }
        let h = self.header_for(digest, size, scope);
        CachedBlob::new(h, self.paths(stem), live)
    }

    /// The map header of blob `digest` of `size` bytes in `scope`.
    fn header_for(&self, digest: &str, size: u64, scope: Option<&str>) -> MapHeader {
        MapHeader {
            bs: self.opts.block_size,
            size,
            digest: digest.to_owned(),
            scope: scope.unwrap_or_default().to_owned(),
        }
    }

    /// One attempt: `Ok(None)` to try again (a race with another process
    /// creating, resetting or collecting the blob).
    fn try_open(
        &self,
        stem: &str,
        digest: &str,
        size: u64,
        scope: Option<&str>,
    ) -> io::Result<Option<(File, BlobMap)>> {
        let [map_path, data_path, meta_path] = self.paths(stem);
        let want = self.header_for(digest, size, scope);
        let m = match BlobMap::open(&map_path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The data file first: a map is never there without one.
                let data = open_data(&data_path, size)?;
                let tmp = self.tmp_name(stem, "map");
                return match BlobMap::create(&map_path, &tmp, &want, &self.boot)? {
                    Some(m) => {
                        shm::hold_in_use(&m.file)?;
                        Ok(Some((data, m)))
                    }
                    None => Ok(None),
                };
            }
            Err(_) => {
                self.reset_files(stem);
                return Ok(None);
            }
        };
        if m.header != want {
            self.reset_files(stem);
            return Ok(None);
        }
        let data = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(f) if f.metadata()?.len() == size => f,
            _ => {
                self.reset_files(stem);
                return Ok(None);
            }
        };
        shm::hold_in_use(&m.file)?;
        {
            let _f = FlockGuard::exclusive(&m.file)?;
            // Collected or reset since we opened it: start again.
            let linked = fs::metadata(&map_path).map(|p| p.ino());
            if linked.ok() != Some(m.file.metadata()?.ino()) {
                return Ok(None);
            }
            CachedBlob::settle_gen(&m);
            if m.boot() != self.boot {
                self.restore_checkpoint(&m, &data, &meta_path);
            }
        }
        Ok(Some((data, m)))
    }

    /// Replaces the live bits of a map from an earlier boot with the blob's
    /// checkpoint (or nothing, if it is missing, stale or claims holes).
    /// Call with the map's `flock` held.
    fn restore_checkpoint(&self, m: &BlobMap, data: &File, meta_path: &Path) {
        let h = &m.header;
        let checkpoint = fs::read(meta_path).ok();
        let present = checkpoint
            .as_deref()
            .and_then(|b| meta::decode_meta(b).ok())
            .filter(|(d, bs, size, p)| {
                *d == h.digest
                    && *bs == h.bs
                    && *size == h.size
                    && file::runs_allocated(data, p, h.bs, h.size)
            })
            .map(|(_, _, _, p)| p);
        if checkpoint.is_some() && present.is_none() {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        let present = present.unwrap_or_default();
        let (old, new) = (m.cached_bytes(), m.bytes_in(&present));
        m.restore(&present);
        m.set_boot(&self.boot);
        let used = self.state.used();
        used.fetch_add(new, Ordering::AcqRel);
        let _ = used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            Some(u.saturating_sub(old))
        });
    }

    /// Removes a blob's files after a mismatch (counted as a reset).
    fn reset_files(&self, stem: &str) {
        self.resets.fetch_add(1, Ordering::Relaxed);
        if let Ok(m) = BlobMap::open(&self.paths(stem)[0]) {
            if let Ok(_f) = FlockGuard::exclusive(&m.file) {
                let freed = release_bits(&m);
                sub_used(&self.state, freed);
                self.unlink(stem);
                return;
            }
        }
        self.unlink(stem);
    }

    /// Bytes of `b` cached now (0 when it cannot be cached).
    pub fn cached_bytes(&self, b: &CachedBlob) -> u64 {
        b.live.as_ref().map_or(0, |(_, m)| m.cached_bytes())
    }

    /// True when every byte of `[offset, offset + len)` (clamped to the blob)
    /// is cached.
    pub fn contains(&self, b: &CachedBlob, offset: u64, len: u64) -> bool {
        let Some((first, last)) = b.block_range(offset, len) else {
            return true;
        };
        match &b.live {
            Some((_, m)) => m.gen().load(Ordering::Acquire) & 1 == 0 && m.all(first, last),
            None => false,
        }
    }

    /// [`BlockCache::contains`] for blob `digest` in any scope this process
    /// has open; `false` for an unknown blob.
    pub fn contains_range(&self, digest: &str, offset: u64, len: u64) -> bool {
        self.open_by_digest(digest)
            .iter()
            .any(|b| self.contains(b, offset, len))
    }

    fn open_by_digest(&self, digest: &str) -> Vec<Arc<CachedBlob>> {
        self.blobs
            .locked()
            .values()
            .filter(|b| b.digest == digest)
            .cloned()
            .collect()
    }

    /// Fills `buf` from the cache if every byte of it is cached (then returns
    /// `true` and marks the blocks used); otherwise returns `false` and leaves
    /// `buf` unspecified. `buf` must lie inside the blob.
    pub fn read(&self, b: &Arc<CachedBlob>, buf: &mut [u8], offset: u64) -> Result<bool> {
        let Some((first, last)) = b.block_range(offset, buf.len() as u64) else {
            return Ok(buf.is_empty());
        };
        let Some((data, m)) = &b.live else {
            return Ok(false);
        };
        if offset + buf.len() as u64 > b.size {
            return Ok(false);
        }
        let g1 = m.gen().load(Ordering::Acquire);
        if g1 & 1 == 1 || !m.all(first, last) {
            m.counter(Counter::Misses).fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        data.read_exact_at(buf, offset)
            .map_err(|e| b.cache_err(&b.data_path, "reading", e))?;
        // An eviction of this blob overlapped the read: the bytes may be a
        // punched hole.
        if m.gen().load(Ordering::SeqCst) != g1 {
            m.counter(Counter::Misses).fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let t = self.state.clock().fetch_add(1, Ordering::Relaxed);
        for i in first..=last {
            m.tick(i).store(t, Ordering::Relaxed);
        }
        m.touch_time();
        m.counter(Counter::Hits).fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Stores `data` at `offset` (a multiple of the block size). Only whole
    /// blocks (or the blob's short last block) are stored; may evict other
    /// blocks to stay within the budget. A full disk skips the insert.
    pub fn insert(&self, b: &Arc<CachedBlob>, offset: u64, data: &[u8]) -> Result<()> {
        if offset % b.bs != 0 || offset >= b.size {
            return Err(Error::BadRequest(format!(
                "cache insert at {offset}: not a block boundary inside the blob ({})",
                b.digest
            )));
        }
        let Some((file, m)) = &b.live else {
            return Ok(());
        };
        if b.detached.load(Ordering::Acquire) || self.paused() {
            return Ok(());
        }
        let end = (offset + data.len() as u64).min(b.size);
        // Whole blocks only; the blob's last block may be short.
        let last_end = if end == b.size {
            end
        } else {
            end / b.bs * b.bs
        };
        if last_end <= offset {
            return Ok(());
        }
        let (first, last) = (offset / b.bs, (last_end - 1) / b.bs);
        let bytes = &data[..(last_end - offset) as usize];
        let g1 = m.gen().load(Ordering::Acquire);
        if g1 & 1 == 1 {
            return Ok(());
        }
        if let Err(e) = file.write_all_at(bytes, offset) {
            if is_full(&e) {
                self.pause(&b.data_path);
                file::punch_hole(file, offset, bytes.len() as u64);
                return Ok(());
            }
            return Err(b.cache_err(&b.data_path, "writing", e));
        }
        let t = self.state.clock().fetch_add(1, Ordering::Relaxed);
        let mut mine = Vec::new();
        for i in first..=last {
            m.tick(i).store(t, Ordering::Relaxed);
            if !m.set(i) {
                mine.push(i);
            }
        }
        if m.gen().load(Ordering::SeqCst) != g1 {
            // An eviction overlapped the write: it may have punched our bytes
            // after we wrote them. Take back what we set (not counted yet).
            for &i in &mine {
                m.clear(i);
            }
            return Ok(());
        }
        let added: u64 = mine.iter().map(|&i| b.block_len(i)).sum();
        self.state.used().fetch_add(added, Ordering::AcqRel);
        m.counter(Counter::Fetched)
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        m.touch_time();
        // Start writing the bytes back now, without waiting: the next
        // checkpoint's `fdatasync` then finds them (mostly) on disk.
        file::start_writeback(file, offset, bytes.len() as u64);
        let n = mine.len() as u32;
        if b.unflushed.fetch_add(n, Ordering::Relaxed) + n >= self.opts.flush_every.max(1) {
            b.checkpoint()?;
        }
        self.evict_over_budget()
    }

    fn paused(&self) -> bool {
        let mut g = self.full_until.locked();
        match *g {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *g = None;
                false
            }
            None => false,
        }
    }

    fn pause(&self, path: &Path) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        let mut g = self.full_until.locked();
        if g.is_none() {
            tracing::warn!(
                "block cache: {} is on a full file system; reads go to the network until space frees",
                path.display()
            );
        }
        *g = Some(Instant::now() + Duration::from_secs(1));
    }

    /// Drops the cached blocks overlapping `[offset, offset + len)` of blob
    /// `digest` in every scope this process has open (whole cache blocks).
    /// Returns whether any were cached.
    pub fn evict(&self, digest: &str, offset: u64, len: u64) -> Result<bool> {
        let mut any = false;
        for b in self.open_by_digest(digest) {
            any |= self.evict_in(&b, offset, len)?;
        }
        Ok(any)
    }

    /// Drops the cached blocks of `b` overlapping `[offset, offset + len)`.
    pub fn evict_in(&self, b: &CachedBlob, offset: u64, len: u64) -> Result<bool> {
        let Some((first, last)) = b.block_range(offset, len) else {
            return Ok(false);
        };
        let blocks: Vec<u64> = (first..=last).collect();
        self.drop_blocks(b, &blocks)
    }

    /// Drops every cached block of blob `digest`.
    pub fn evict_blob(&self, digest: &str) -> Result<bool> {
        self.evict(digest, 0, u64::MAX)
    }

    /// Clears the bits of `blocks` (sorted), checkpoints, then punches the
    /// bytes out of the data file, inside an odd generation. Returns whether
    /// any bit was set.
    fn drop_blocks(&self, b: &CachedBlob, blocks: &[u64]) -> Result<bool> {
        let Some((data, m)) = &b.live else {
            return Ok(false);
        };
        let _p = b.persist_lock.locked();
        let _f = FlockGuard::exclusive(&m.file)
            .map_err(|e| b.cache_err(&b.map_path, "locking the map", e))?;
        CachedBlob::settle_gen(m);
        m.gen().fetch_add(1, Ordering::AcqRel);
        let mut gone = Vec::new();
        for &i in blocks {
            if m.clear(i) {
                gone.push(i);
            }
        }
        let res = (|| {
            if gone.is_empty() {
                return Ok(false);
            }
            let freed: u64 = gone.iter().map(|&i| b.block_len(i)).sum();
            sub_used(&self.state, freed);
            m.counter(Counter::Evicted)
                .fetch_add(freed, Ordering::Relaxed);
            if !b.detached.load(Ordering::Acquire) {
                b.write_meta(data, &m.snapshot())?;
            }
            punch_runs(b, data, &gone);
            Ok(true)
        })();
        m.gen().fetch_add(1, Ordering::AcqRel);
        res
    }

    /// Evicts least recently used blocks host-wide while usage is over the
    /// budget. One thread of a process does it while the others wait (their
    /// inserts are then counted when it checks again); one process of the
    /// host does it while the others go on.
    fn evict_over_budget(&self) -> Result<()> {
        if self.usage() <= self.budget {
            return Ok(());
        }
        let _g = self.evicting.locked();
        // A few passes at most: each one recounts and evicts to the low-water
        // mark, so a second is needed only for inserts that raced the first.
        for _ in 0..3 {
            if self.usage() <= self.budget {
                break;
            }
            let Some(_f) = FlockGuard::try_exclusive(&self.evict_lock).ok().flatten() else {
                break;
            };
            scan::evict_lru(self)?;
        }
        Ok(())
    }

    /// Claims the cache blocks of `b` covering `[offset, offset + len)` for
    /// one fetch, waiting while another process holds any of them (it is
    /// fetching them: check the cache again once the claim is yours). The
    /// claim ends when dropped, or with its process. Without a live cache
    /// it claims nothing.
    pub fn claim<'a>(&self, b: &'a CachedBlob, offset: u64, len: u64) -> Claim<'a> {
        let Some((first, last)) = b.block_range(offset, len) else {
            return Claim(None);
        };
        let Some((_, m)) = &b.live else {
            return Claim(None);
        };
        let range = (CLAIM_BASE + first, last - first + 1);
        match shm::range_lock(&m.file, range.0, range.1, false) {
            Ok(()) => Claim(Some((&m.file, range))),
            Err(e) => {
                tracing::debug!("block cache: no claim on {}: {e}", b.digest);
                Claim(None)
            }
        }
    }

    /// Checkpoints every blob this process changed.
    pub fn flush(&self) -> Result<()> {
        let blobs: Vec<Arc<CachedBlob>> = self.blobs.locked().values().cloned().collect();
        for b in blobs {
            if b.unflushed.load(Ordering::Relaxed) > 0 {
                b.checkpoint()?;
            }
        }
        Ok(())
    }

    /// Every blob in the cache, with its counters (host-wide).
    pub fn list(&self) -> Result<Vec<BlobInfo>> {
        scan::list(self)
    }

    /// Removes whole blobs that no process has open, `keep` does not keep
    /// (by digest) and nobody used for `grace`.
    pub fn gc(&self, keep: &dyn Fn(&str) -> bool, grace: Duration) -> Result<GcReport> {
        scan::gc(self, keep, grace)
    }
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Host-wide: whether some process using this cache directory is fetching
/// a container's read now. Each flag is its own open file description of
/// the directory's `FOREGROUND` file: [`ForegroundFlag::raise`] takes a
/// shared lock on it, which the kernel drops with the process, so a crash
/// cannot leave it raised; [`ForegroundFlag::raised_elsewhere`] sees every
/// other flag's. The fetch scheduler holds its prefetches while any is
/// raised ([`crate::sched`]): the host's link is shared by all of them.
#[derive(Debug)]
pub struct ForegroundFlag {
    file: File,
}

impl ForegroundFlag {
    /// Raises the flag (idempotent).
    pub fn raise(&self) {
        let _ = shm::hold_in_use(&self.file);
    }

    /// Lowers it.
    pub fn lower(&self) {
        let _ = shm::release_in_use(&self.file);
    }

    /// Whether another flag on the directory is raised (false if that
    /// cannot be told).
    pub fn raised_elsewhere(&self) -> bool {
        shm::in_use(&self.file).unwrap_or(false)
    }
}

impl BlockCache {
    /// A new [`ForegroundFlag`] of this cache's directory.
    pub fn foreground_flag(&self) -> Result<ForegroundFlag> {
        let path = self.opts.dir.join(FOREGROUND_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Cache {
                path,
                detail: format!("opening: {e}"),
            })?;
        Ok(ForegroundFlag { file })
    }
}

/// Claims are range locks on the map file from this byte on (one byte per
/// cache block), far past its end; byte 0 is the in-use lock.
const CLAIM_BASE: u64 = 1 << 40;

/// The blocks one fetch claims host-wide ([`BlockCache::claim`]).
#[derive(Debug)]
pub struct Claim<'a>(Option<(&'a File, (u64, u64))>);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some((f, (start, len))) = self.0 {
            let _ = shm::range_lock(f, start, len, true);
        }
    }
}

/// Clears every bit of `m`; returns the bytes they held. Call with its lock.
fn release_bits(m: &BlobMap) -> u64 {
    m.gen().fetch_add(1, Ordering::AcqRel);
    let mut freed = 0;
    for i in 0..m.blocks() {
        if m.clear(i) {
            freed += m.header.block_len(i);
        }
    }
    m.gen().fetch_add(1, Ordering::AcqRel);
    freed
}

fn sub_used(state: &StateFile, n: u64) {
    let _ = state
        .used()
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            Some(u.saturating_sub(n))
        });
}

/// Punches runs of consecutive blocks out of `data`.
fn punch_runs(b: &CachedBlob, data: &File, blocks: &[u64]) {
    let mut k = 0;
    while k < blocks.len() {
        let mut j = k + 1;
        while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
            j += 1;
        }
        let off = blocks[k] * b.bs;
        let end = ((blocks[j - 1] + 1) * b.bs).min(b.size);
        file::punch_hole(data, off, end - off);
        k = j;
    }
}

/// Opens (creating) a blob's data file at its size.
fn open_data(path: &Path, size: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if f.metadata()?.len() != size {
        f.set_len(size)?;
    }
    Ok(f)
}

fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Total bytes of the file system holding `dir`.
fn fs_size(dir: &Path) -> Option<u64> {
    fs_space(dir).map(|(total, _)| total)
}

/// Total bytes of the file system holding `dir`, and the bytes an
/// unprivileged writer may still use (statvfs `f_bavail`).
pub fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some((
        st.f_blocks.saturating_mul(st.f_frsize),
        st.f_bavail.saturating_mul(st.f_frsize),
    ))
}

/// File-name stem for a digest in a scope (`sha256:ab…` → `sha256_ab…`, plus
/// `-o<16 hex digits of sha256(scope)>`), or `None` when the digest holds
/// characters unsafe in a file name.
fn stem_for(digest: &str, scope: Option<&str>) -> Option<String> {
    let ok = !digest.is_empty()
        && digest.len() <= 200
        && !digest.starts_with('.')
        && digest
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b':' | b'_' | b'-' | b'+'));
    if !ok {
        return None;
    }
    let base = digest.replace(':', "_");
    Some(match scope {
        None => base,
        Some(s) => {
            use sha2::{Digest, Sha256};
            let h = Sha256::digest(s.as_bytes());
            format!("{base}-o{}", hex::encode(&h[..8]))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems() {
        assert_eq!(stem_for("sha256:0a", None).as_deref(), Some("sha256_0a"));
        let a = stem_for("sha256:0a", Some("reg-a/repo")).unwrap();
        let b = stem_for("sha256:0a", Some("reg-b/repo")).unwrap();
        assert!(a.starts_with("sha256_0a-o") && a != b, "{a} {b}");
        assert_eq!(stem_for("../x", None), None);
        assert_eq!(stem_for("a/b", None), None);
        assert_eq!(stem_for("sha256:a.b", None), None);
        assert_eq!(stem_for("", None), None);
    }

    #[test]
    fn default_budget_follows_the_file_system() {
        assert_eq!(default_budget(100 << 30), 10 << 30);
        assert_eq!(default_budget(4 << 30), 1 << 30);
        assert_eq!(default_budget(1 << 30), 512 << 20);
        assert_eq!(default_budget(10 << 40), 64 << 30);
    }
}
