//! The persistent block cache of remote blobs.
//!
//! Layout under the cache directory, per blob (named after its digest, `:`
//! replaced by `_`):
//! - `<name>.data`: a sparse file as long as the blob; cached bytes sit at their
//!   blob offsets;
//! - `<name>.meta`: the presence bitmap (one bit per cache block, default
//!   64 KiB) with the block size, blob size and digest, sealed by a CRC-32C.
//!   It is replaced atomically (write `<name>.meta.tmp`, fsync, rename), and only
//!   after the data file has been `fdatasync`ed, so after a crash it never claims
//!   a block whose bytes were not durable. Blocks inserted since the last flush
//!   are simply fetched again after a crash.
//!
//! Metadata that is unreadable, fails its CRC, or disagrees with the blob
//! (size, digest, block size, data-file length) is never trusted: that blob's
//! files are deleted and its cache starts empty.
//!
//! Budget: the bytes of all present blocks of all blobs are counted against
//! [`CacheOptions::budget`]. When an insert goes over it, whole **cache blocks**
//! (not whole blobs) are evicted in least-recently-used order (reads and
//! inserts both count as use) until usage is at most
//! [`CacheOptions::low_water_pct`] of the budget. An evicted block's bit is
//! cleared and persisted first, then its bytes are released with
//! `fallocate(PUNCH_HOLE)`. After a restart, blocks of blobs whose metadata was
//! written longer ago are evicted first.
//!
//! One process owns a cache directory at a time (an `flock` on `<dir>/LOCK`).

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use overlaybd_core::error::{Error, Result};
use zfile::sync::{MutexExt, RwLockExt};

/// Default cache block (presence granularity): 64 KiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 << 10;
/// Default byte budget: 4 GiB (upstream's `cacheSizeGB`).
pub const DEFAULT_BUDGET: u64 = 4 << 30;

const META_MAGIC: &[u8; 8] = b"OBDCMETA";
const META_VERSION: u32 = 1;

/// Options of a [`BlockCache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// Cache directory (created if missing).
    pub dir: PathBuf,
    /// Presence and eviction granularity in bytes; a power of two, at least
    /// 4096. Default [`DEFAULT_BLOCK_SIZE`] (64 KiB). Changing it resets every
    /// blob's cache.
    pub block_size: u64,
    /// Bytes of cached data allowed across all blobs. Default
    /// [`DEFAULT_BUDGET`] (4 GiB).
    pub budget: u64,
    /// Eviction stops once usage is at most this percentage of the budget.
    /// Default 90.
    pub low_water_pct: u8,
    /// Persist a blob's bitmap after this many newly inserted blocks (it is
    /// also persisted on eviction, [`BlockCache::flush`] and drop). Default
    /// 1024 (64 MiB of 64 KiB blocks): each persist `fdatasync`s the data
    /// file, so a small value stalls the inserting reader on the disk often;
    /// after a crash at most this many blocks per blob are fetched again.
    pub flush_every: u32,
}

impl CacheOptions {
    /// Defaults with `dir` as the cache directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            block_size: DEFAULT_BLOCK_SIZE,
            budget: DEFAULT_BUDGET,
            low_water_pct: 90,
            flush_every: 1024,
        }
    }
}

/// Presence state of one blob.
#[derive(Debug)]
struct BlobState {
    present: Vec<u64>,
    /// Blocks inserted since the bitmap was last persisted.
    unflushed: u32,
    /// The in-memory bitmap differs from the persisted one.
    dirty: bool,
    /// This blob's cache was reset and replaced; it must not touch the files
    /// at its paths any more.
    detached: bool,
    /// Bumped on every bitmap change.
    gen: u64,
}

impl BlobState {
    fn get(&self, i: u64) -> bool {
        self.present[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u64, on: bool) {
        let w = &mut self.present[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
    fn all(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|i| self.get(i))
    }
}

/// The cache of one blob; get it with [`BlockCache::blob`].
#[derive(Debug)]
pub struct CachedBlob {
    id: u64,
    digest: String,
    size: u64,
    bs: u64,
    blocks: u64,
    data_path: PathBuf,
    meta_path: PathBuf,
    file: File,
    state: RwLock<BlobState>,
    /// Serialises bitmap writes (taken before `state`), so a bitmap written
    /// from an older snapshot never replaces a newer one.
    persist_lock: Mutex<()>,
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

    /// A value of type `T` shared by every user of this blob's cache (all
    /// [`RemoteBlob`](super::blob::RemoteBlob)s of the same digest share their
    /// in-flight requests through it). Created with `T::default()` on first
    /// use; a reset blob starts a new one.
    pub fn shared<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let mut g = lock(&self.shared);
        if let Some(t) = g.as_ref().and_then(|a| Arc::clone(a).downcast::<T>().ok()) {
            return t;
        }
        let t = Arc::new(T::default());
        *g = Some(Arc::clone(&t) as Arc<dyn Any + Send + Sync>);
        t
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, BlobState> {
        self.state.read_locked()
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, BlobState> {
        self.state.write_locked()
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

    /// Persists the bitmap with the state lock held; the caller holds
    /// `persist_lock` too (eviction: the bitmap must be on disk before the
    /// bytes are punched out).
    fn persist(&self, st: &mut BlobState) -> Result<()> {
        if st.detached {
            return Ok(());
        }
        self.write_meta(&st.present)?;
        st.unflushed = 0;
        st.dirty = false;
        Ok(())
    }

    /// Persists a snapshot of the bitmap without holding the state lock across
    /// the syncs, so readers of this blob are not stalled by `fdatasync`.
    fn persist_snapshot(&self) -> Result<()> {
        let _p = lock(&self.persist_lock);
        let (snap, gen) = {
            let mut st = self.write_state();
            if st.detached || !st.dirty {
                return Ok(());
            }
            st.unflushed = 0;
            (st.present.clone(), st.gen)
        };
        // Every bit in `snap` was set after its bytes were written, so this
        // sync makes them durable before the bitmap claims them.
        self.write_meta(&snap)?;
        let mut st = self.write_state();
        if st.gen == gen {
            st.dirty = false;
        }
        Ok(())
    }

    /// Syncs the data file, then atomically replaces the bitmap file.
    fn write_meta(&self, present: &[u64]) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| self.cache_err(&self.data_path, "fdatasync", e))?;
        let bytes = encode_meta(&self.digest, self.bs, self.size, self.blocks, present);
        let tmp = self.meta_path.with_extension("meta.tmp");
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
        write().map_err(|e| self.cache_err(&self.meta_path, "writing the bitmap", e))
    }
}

impl Drop for CachedBlob {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if st.dirty {
            let mut st = std::mem::replace(
                st,
                BlobState {
                    present: Vec::new(),
                    unflushed: 0,
                    dirty: false,
                    detached: true,
                    gen: 0,
                },
            );
            // Best effort: a lost bitmap only means refetching.
            let _ = self.persist(&mut st);
        }
    }
}

fn encode_meta(digest: &str, bs: u64, size: u64, blocks: u64, present: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(40 + digest.len() + present.len() * 8);
    b.extend_from_slice(META_MAGIC);
    b.extend_from_slice(&META_VERSION.to_le_bytes());
    b.extend_from_slice(&bs.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&(digest.len() as u32).to_le_bytes());
    b.extend_from_slice(digest.as_bytes());
    for i in 0..blocks.div_ceil(8) as usize {
        b.push((present[i / 8] >> ((i % 8) * 8)) as u8);
    }
    let crc = zfile::crc32c_raw(0, &b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Parsed bitmap file: digest, block size, blob size, bitmap words.
type Meta = (String, u64, u64, Vec<u64>);

fn decode_meta(b: &[u8]) -> std::result::Result<Meta, String> {
    if b.len() < 36 + 4 {
        return Err(format!("{} bytes, too short", b.len()));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    let stored = u32::from_le_bytes(crc.try_into().unwrap_or_default());
    let computed = zfile::crc32c_raw(0, body);
    if stored != computed {
        return Err(format!(
            "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    if &body[..8] != META_MAGIC {
        return Err("bad magic".into());
    }
    let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().unwrap_or_default());
    let version = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
    if version != META_VERSION {
        return Err(format!("version {version}, expected {META_VERSION}"));
    }
    let bs = u64_at(12);
    let size = u64_at(20);
    let dlen = u32::from_le_bytes(body[28..32].try_into().unwrap_or_default()) as usize;
    let digest = body
        .get(32..32 + dlen)
        .and_then(|d| std::str::from_utf8(d).ok())
        .ok_or("bad digest field")?
        .to_owned();
    if bs == 0 {
        return Err("block size 0".into());
    }
    let blocks = size.div_ceil(bs);
    let bitmap = &body[32 + dlen..];
    if bitmap.len() as u64 != blocks.div_ceil(8) {
        return Err(format!(
            "bitmap of {} bytes for {blocks} blocks",
            bitmap.len()
        ));
    }
    let mut present = vec![0u64; blocks.div_ceil(64) as usize];
    for (i, &byte) in bitmap.iter().enumerate() {
        present[i / 8] |= u64::from(byte) << ((i % 8) * 8);
    }
    // Bits past the last block must be clear.
    if blocks % 64 != 0 {
        if let Some(last) = present.last() {
            if last >> (blocks % 64) != 0 {
                return Err("bits set past the last block".into());
            }
        }
    }
    Ok((digest, bs, size, present))
}

/// File-name stem for a digest (`sha256:ab…` → `sha256_ab…`), or `None` when
/// the digest holds characters unsafe in a file name.
fn file_stem(digest: &str) -> Option<String> {
    let ok = !digest.is_empty()
        && digest.len() <= 200
        && !digest.starts_with('.')
        && digest
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b':' | b'_' | b'-' | b'.' | b'+'));
    ok.then(|| digest.replace(':', "_"))
}

#[derive(Debug, Default)]
struct Lru {
    /// Use order: tick → (blob, block).
    by_tick: BTreeMap<u64, (Arc<CachedBlob>, u64)>,
    /// (blob id, block) → tick.
    tick_of: HashMap<(u64, u64), u64>,
    used: u64,
    next: u64,
}

impl Lru {
    fn touch(&mut self, b: &Arc<CachedBlob>, i: u64) -> bool {
        let t = self.next;
        match self.tick_of.get_mut(&(b.id, i)) {
            Some(old) => {
                let entry = self.by_tick.remove(old);
                *old = t;
                if let Some(e) = entry {
                    self.by_tick.insert(t, e);
                }
                self.next += 1;
                true
            }
            None => false,
        }
    }

    fn add(&mut self, b: &Arc<CachedBlob>, i: u64) {
        if self.touch(b, i) {
            return;
        }
        let t = self.next;
        self.next += 1;
        self.tick_of.insert((b.id, i), t);
        self.by_tick.insert(t, (Arc::clone(b), i));
        self.used += b.block_len(i);
    }

    fn remove(&mut self, b: &CachedBlob, i: u64) {
        if let Some(t) = self.tick_of.remove(&(b.id, i)) {
            self.by_tick.remove(&t);
            self.used -= b.block_len(i);
        }
    }

    fn remove_blob(&mut self, b: &CachedBlob) {
        let ticks: Vec<u64> = self
            .by_tick
            .iter()
            .filter(|(_, (x, _))| x.id == b.id)
            .map(|(t, _)| *t)
            .collect();
        for t in ticks {
            if let Some((x, i)) = self.by_tick.remove(&t) {
                self.tick_of.remove(&(x.id, i));
                self.used -= x.block_len(i);
            }
        }
    }
}

/// The block cache of all remote blobs under one directory. Thread-safe.
#[derive(Debug)]
pub struct BlockCache {
    opts: CacheOptions,
    blobs: Mutex<HashMap<String, Arc<CachedBlob>>>,
    lru: Mutex<Lru>,
    next_id: AtomicU64,
    /// Blobs reset because their metadata was stale or corrupt (diagnostics).
    resets: AtomicU64,
    _lock: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.locked()
}

impl BlockCache {
    /// Opens (creating if needed) the cache directory, loads every valid
    /// bitmap, and deletes the files of blobs whose metadata is stale or
    /// corrupt. Fails if another process holds the directory.
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
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| derr(format!("opening LOCK: {e}")))?;
        // SAFETY: flock takes a file descriptor that `lock_file` keeps open for
        // the duration of the call; no memory is passed.
        let r = unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(derr(format!(
                "locked by another process: {}",
                io::Error::last_os_error()
            )));
        }
        let cache = Self {
            opts,
            blobs: Mutex::new(HashMap::new()),
            lru: Mutex::new(Lru::default()),
            next_id: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            _lock: lock_file,
        };
        cache.load()?;
        Ok(Arc::new(cache))
    }

    /// Scans the directory: loads valid blobs (older bitmaps first in LRU
    /// order), removes everything else of ours.
    fn load(&self) -> Result<()> {
        let dir = &self.opts.dir;
        let entries = fs::read_dir(dir).map_err(|e| Error::Cache {
            path: dir.clone(),
            detail: format!("listing: {e}"),
        })?;
        let mut metas = Vec::new();
        let mut datas = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".meta.tmp") {
                let _ = fs::remove_file(e.path());
            } else if let Some(stem) = name.strip_suffix(".meta") {
                let mtime = e.metadata().and_then(|m| m.modified()).ok();
                metas.push((mtime, stem.to_owned()));
            } else if let Some(stem) = name.strip_suffix(".data") {
                datas.push(stem.to_owned());
            }
        }
        metas.sort();
        let mut loaded = std::collections::HashSet::new();
        let mut blobs = lock(&self.blobs);
        let mut lru = lock(&self.lru);
        for (_, stem) in metas {
            match self.load_one(&stem) {
                Some(b) => {
                    let st = b.read_state();
                    for i in 0..b.blocks {
                        if st.get(i) {
                            lru.add(&b, i);
                        }
                    }
                    drop(st);
                    loaded.insert(stem);
                    blobs.insert(b.digest.clone(), b);
                }
                None => {
                    self.resets.fetch_add(1, Ordering::Relaxed);
                    let _ = fs::remove_file(dir.join(format!("{stem}.meta")));
                    let _ = fs::remove_file(dir.join(format!("{stem}.data")));
                }
            }
        }
        for stem in datas {
            if !loaded.contains(&stem) {
                let _ = fs::remove_file(dir.join(format!("{stem}.data")));
            }
        }
        drop(blobs);
        self.evict_over_budget(&mut lru)
    }

    /// Loads one blob's bitmap and data file; `None` if anything disagrees.
    fn load_one(&self, stem: &str) -> Option<Arc<CachedBlob>> {
        let meta_path = self.opts.dir.join(format!("{stem}.meta"));
        let data_path = self.opts.dir.join(format!("{stem}.data"));
        let bytes = fs::read(&meta_path).ok()?;
        let (digest, bs, size, present) = decode_meta(&bytes).ok()?;
        if bs != self.opts.block_size || file_stem(&digest).as_deref() != Some(stem) {
            return None;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .ok()?;
        if file.metadata().ok()?.len() != size || !runs_allocated(&file, &present, bs, size) {
            return None;
        }
        Some(Arc::new(CachedBlob {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            digest,
            size,
            bs,
            blocks: size.div_ceil(bs),
            data_path,
            meta_path,
            file,
            state: RwLock::new(BlobState {
                present,
                unflushed: 0,
                dirty: false,
                detached: false,
                gen: 0,
            }),
            persist_lock: Mutex::new(()),
            shared: Mutex::new(None),
        }))
    }

    /// The options in use.
    pub fn options(&self) -> &CacheOptions {
        &self.opts
    }

    /// The cache block size.
    pub fn block_size(&self) -> u64 {
        self.opts.block_size
    }

    /// Bytes of cached data across all blobs.
    pub fn usage(&self) -> u64 {
        lock(&self.lru).used
    }

    /// How many blobs had their cache reset because the metadata on disk was
    /// stale or corrupt (since this cache was opened).
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// The cache of blob `digest` of `size` bytes, created empty if absent. A
    /// cached copy recorded with a different size is reset.
    pub fn blob(&self, digest: &str, size: u64) -> Result<Arc<CachedBlob>> {
        let stem = file_stem(digest).ok_or_else(|| Error::Cache {
            path: self.opts.dir.clone(),
            detail: format!("digest {digest:?} is not usable as a file name"),
        })?;
        let mut blobs = lock(&self.blobs);
        if let Some(b) = blobs.get(digest) {
            if b.size == size {
                return Ok(Arc::clone(b));
            }
            let old = blobs.remove(digest).expect("present");
            lock(&self.lru).remove_blob(&old);
            let _p = lock(&old.persist_lock);
            let mut st = old.write_state();
            st.detached = true;
            st.gen += 1;
            st.present.iter_mut().for_each(|w| *w = 0);
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        let data_path = self.opts.dir.join(format!("{stem}.data"));
        let meta_path = self.opts.dir.join(format!("{stem}.meta"));
        let cerr = |p: &Path, e: io::Error| Error::Cache {
            path: p.to_owned(),
            detail: format!("creating ({digest}): {e}"),
        };
        // The bitmap goes first: data without a bitmap is never trusted. The
        // data file is unlinked, not truncated, so a reset blob's open handle
        // cannot write into the new one.
        for p in [&meta_path, &data_path] {
            match fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(cerr(p, e)),
                _ => {}
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(|e| cerr(&data_path, e))?;
        file.set_len(size).map_err(|e| cerr(&data_path, e))?;
        let blocks = size.div_ceil(self.opts.block_size);
        let b = Arc::new(CachedBlob {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            digest: digest.to_owned(),
            size,
            bs: self.opts.block_size,
            blocks,
            data_path,
            meta_path,
            file,
            state: RwLock::new(BlobState {
                present: vec![0; blocks.div_ceil(64) as usize],
                unflushed: 0,
                dirty: false,
                detached: false,
                gen: 0,
            }),
            persist_lock: Mutex::new(()),
            shared: Mutex::new(None),
        });
        blobs.insert(digest.to_owned(), Arc::clone(&b));
        Ok(b)
    }

    /// True when every byte of `[offset, offset + len)` (clamped to the blob)
    /// is cached.
    pub fn contains(&self, b: &CachedBlob, offset: u64, len: u64) -> bool {
        match b.block_range(offset, len) {
            Some((first, last)) => b.read_state().all(first, last),
            None => true,
        }
    }

    /// [`BlockCache::contains`] by digest; `false` for an unknown blob.
    pub fn contains_range(&self, digest: &str, offset: u64, len: u64) -> bool {
        let b = lock(&self.blobs).get(digest).cloned();
        b.is_some_and(|b| self.contains(&b, offset, len))
    }

    /// Fills `buf` from the cache if every byte of it is cached (then returns
    /// `true` and marks the blocks used); otherwise returns `false` and leaves
    /// `buf` unspecified. `buf` must lie inside the blob.
    pub fn read(&self, b: &Arc<CachedBlob>, buf: &mut [u8], offset: u64) -> Result<bool> {
        let Some((first, last)) = b.block_range(offset, buf.len() as u64) else {
            return Ok(buf.is_empty());
        };
        if offset + buf.len() as u64 > b.size {
            return Ok(false);
        }
        {
            let st = b.read_state();
            if !st.all(first, last) {
                return Ok(false);
            }
            b.file
                .read_exact_at(buf, offset)
                .map_err(|e| b.cache_err(&b.data_path, "reading", e))?;
        }
        let mut lru = lock(&self.lru);
        for i in first..=last {
            lru.touch(b, i);
        }
        Ok(true)
    }

    /// Stores `data` at `offset` (a multiple of the block size). Only whole
    /// blocks (or the blob's short last block) are stored; may evict other
    /// blocks to stay within the budget.
    pub fn insert(&self, b: &Arc<CachedBlob>, offset: u64, data: &[u8]) -> Result<()> {
        if offset % b.bs != 0 || offset >= b.size {
            return Err(Error::BadRequest(format!(
                "cache insert at {offset}: not a block boundary inside the blob ({})",
                b.digest
            )));
        }
        let end = (offset + data.len() as u64).min(b.size);
        let first = offset / b.bs;
        // Whole blocks only; the blob's last block may be short.
        let last_end = if end == b.size {
            end
        } else {
            end / b.bs * b.bs
        };
        if last_end <= offset {
            return Ok(());
        }
        let last = (last_end - 1) / b.bs;
        let bytes = &data[..(last_end - offset) as usize];
        let flush_now = {
            let mut st = b.write_state();
            if st.detached {
                return Ok(());
            }
            b.file
                .write_all_at(bytes, offset)
                .map_err(|e| b.cache_err(&b.data_path, "writing", e))?;
            for i in first..=last {
                if !st.get(i) {
                    st.set(i, true);
                    st.unflushed += 1;
                    st.dirty = true;
                    st.gen += 1;
                }
            }
            st.unflushed >= self.opts.flush_every.max(1)
        };
        // Start writing the bytes back now, without waiting: the next persist's
        // `fdatasync` then finds them (mostly) on disk instead of writing the
        // whole batch while the inserting reader waits.
        start_writeback(&b.file, offset, bytes.len() as u64);
        if flush_now {
            b.persist_snapshot()?;
        }
        let mut lru = lock(&self.lru);
        {
            // Count only blocks still present (an eviction may have run between).
            let st = b.read_state();
            for i in first..=last {
                if st.get(i) {
                    lru.add(b, i);
                }
            }
        }
        self.evict_over_budget(&mut lru)
    }

    /// Drops the cached blocks overlapping `[offset, offset + len)` of blob
    /// `digest` (whole cache blocks). Returns whether any were cached.
    pub fn evict(&self, digest: &str, offset: u64, len: u64) -> Result<bool> {
        let Some(b) = lock(&self.blobs).get(digest).cloned() else {
            return Ok(false);
        };
        let Some((first, last)) = b.block_range(offset, len) else {
            return Ok(false);
        };
        let mut lru = lock(&self.lru);
        let blocks: Vec<u64> = (first..=last).collect();
        for &i in &blocks {
            lru.remove(&b, i);
        }
        self.drop_blocks(&b, &blocks)
    }

    /// Drops every cached block of blob `digest`.
    pub fn evict_blob(&self, digest: &str) -> Result<bool> {
        self.evict(digest, 0, u64::MAX)
    }

    /// Clears the bits of `blocks`, persists the bitmap, then punches the
    /// bytes out of the data file. Returns whether any bit was set.
    fn drop_blocks(&self, b: &CachedBlob, blocks: &[u64]) -> Result<bool> {
        let _p = lock(&b.persist_lock);
        let mut st = b.write_state();
        let mut any = false;
        for &i in blocks {
            if st.get(i) {
                st.set(i, false);
                any = true;
            }
        }
        if !any {
            return Ok(false);
        }
        st.dirty = true;
        st.gen += 1;
        b.persist(&mut st)?;
        // Punch runs of consecutive blocks.
        let mut k = 0;
        while k < blocks.len() {
            let mut j = k + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            let off = blocks[k] * b.bs;
            let end = ((blocks[j - 1] + 1) * b.bs).min(b.size);
            punch_hole(&b.file, off, end - off);
            k = j;
        }
        Ok(true)
    }

    fn evict_over_budget(&self, lru: &mut Lru) -> Result<()> {
        if lru.used <= self.opts.budget {
            return Ok(());
        }
        let pct = u128::from(self.opts.low_water_pct.min(100));
        let target = (u128::from(self.opts.budget) * pct / 100) as u64;
        let mut victims: HashMap<u64, (Arc<CachedBlob>, Vec<u64>)> = HashMap::new();
        while lru.used > target {
            let Some((_, (b, i))) = lru.by_tick.pop_first() else {
                break;
            };
            lru.tick_of.remove(&(b.id, i));
            lru.used -= b.block_len(i);
            victims
                .entry(b.id)
                .or_insert_with(|| (Arc::clone(&b), Vec::new()))
                .1
                .push(i);
        }
        let mut first_err = None;
        for (_, (b, mut blocks)) in victims {
            blocks.sort_unstable();
            if let Err(e) = self.drop_blocks(&b, &blocks) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Persists every blob's bitmap that changed since it was last written.
    pub fn flush(&self) -> Result<()> {
        let blobs: Vec<Arc<CachedBlob>> = lock(&self.blobs).values().cloned().collect();
        for b in blobs {
            b.persist_snapshot()?;
        }
        Ok(())
    }
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        let _ = self.flush();
        // Break the LRU's references so the blobs drop (and persist) now.
        lock(&self.lru).by_tick.clear();
    }
}

/// Checks that every run of present blocks is allocated in `file` (no hole
/// where the bitmap claims data, e.g. a data file truncated or replaced behind
/// our back). Filesystems without `SEEK_DATA` pass.
fn runs_allocated(file: &File, present: &[u64], bs: u64, size: u64) -> bool {
    let blocks = size.div_ceil(bs);
    let get = |i: u64| present[(i / 64) as usize] & (1 << (i % 64)) != 0;
    let mut i = 0;
    while i < blocks {
        if !get(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < blocks && get(j) {
            j += 1;
        }
        let (start, end) = (i * bs, (j * bs).min(size));
        match seek(file, start, libc::SEEK_DATA) {
            Ok(d) if d != start => return false,
            Ok(_) => {
                if seek(file, start, libc::SEEK_HOLE).is_ok_and(|h| h < end) {
                    return false;
                }
            }
            // No data at or after `start`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return false,
            // Not supported here: cannot check.
            Err(_) => return true,
        }
        i = j;
    }
    true
}

/// `lseek(file, off, whence)`.
fn seek(file: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    let off =
        libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek receives a file descriptor that `file` keeps open for the
    // whole call and plain integers; no memory is passed. The shared file
    // offset it moves is never used (all our I/O is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Releases the disk space of `[off, off + len)` of `file`, keeping its size.
/// Best effort: the cleared presence bit already makes the range a miss.
#[cfg(target_os = "linux")]
fn punch_hole(file: &File, off: u64, len: u64) {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate receives a file descriptor that `file` keeps open for
    // the whole call, plain integer flags and a range; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    let _ = r;
}

/// Starts asynchronous writeback of a file range (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`: no wait, no durability promise). Best effort.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, off: u64, len: u64) {
    let (Ok(o), Ok(l)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range receives a file descriptor that `file` keeps open
    // for the whole call, a range and plain flags; no memory is passed.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE) };
    let _ = r;
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _off: u64, _len: u64) {}

#[cfg(not(target_os = "linux"))]
fn punch_hole(file: &File, off: u64, len: u64) {
    let _ = file.write_all_at(&vec![0u8; len as usize], off);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trip_and_corruption() {
        let present = vec![0b1011u64, 1 << 3];
        let b = encode_meta("sha256:ab", 65536, 65536 * 68 - 5, 68, &present);
        let (d, bs, size, p) = decode_meta(&b).unwrap();
        assert_eq!((d.as_str(), bs, size), ("sha256:ab", 65536, 65536 * 68 - 5));
        assert_eq!(p, present);
        for k in 0..b.len() {
            let mut c = b.clone();
            c[k] ^= 0x10;
            assert!(decode_meta(&c).is_err(), "flip at {k} accepted");
        }
        assert!(decode_meta(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn stems() {
        assert_eq!(file_stem("sha256:0a").as_deref(), Some("sha256_0a"));
        assert_eq!(file_stem("../x"), None);
        assert_eq!(file_stem("a/b"), None);
        assert_eq!(file_stem(""), None);
    }
}
