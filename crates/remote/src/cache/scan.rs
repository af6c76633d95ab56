//! Passes over every blob in the cache directory: recovery on first open,
//! host-wide LRU eviction, collection of unused blobs, listing.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use overlaybd_core::error::{Error, Result};
use zfile::sync::MutexExt;

use super::map::{now_secs, BlobMap, Counter};
use super::shm::{self, FlockGuard};
use super::{file, release_bits, sub_used, BlockCache, CachedBlob};

/// One blob in the cache (host-wide figures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Blob digest.
    pub digest: String,
    /// Origin scope of unverified bytes (`None`: verified, shared).
    pub scope: Option<String>,
    /// Blob size.
    pub size: u64,
    /// Bytes cached now.
    pub cached: u64,
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that missed.
    pub misses: u64,
    /// Bytes fetched into the cache.
    pub fetched: u64,
    /// Bytes evicted.
    pub evicted: u64,
    /// Last use, Unix seconds.
    pub last_use: u64,
    /// Whether a process has it open now.
    pub in_use: bool,
}

/// What [`BlockCache::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Digests of the blobs removed.
    pub removed: Vec<String>,
    /// Cached bytes they held.
    pub bytes: u64,
}

/// Stems of every blob map in the directory.
fn stems(cache: &BlockCache) -> Result<Vec<String>> {
    let dir = &cache.opts.dir;
    let rd = fs::read_dir(dir).map_err(|e| Error::Cache {
        path: dir.clone(),
        detail: format!("listing: {e}"),
    })?;
    Ok(rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".map").map(str::to_owned)
        })
        .collect())
}

/// First open of the directory (no other process has it): removes the
/// per-device directories of earlier versions and stray files, restores maps
/// from an earlier boot from their checkpoints, and recounts the usage.
pub(super) fn recover(cache: &BlockCache) -> Result<()> {
    let dir = &cache.opts.dir;
    let rd = fs::read_dir(dir).map_err(|e| Error::Cache {
        path: dir.clone(),
        detail: format!("listing: {e}"),
    })?;
    let mut names = Vec::new();
    let mut old_dirs = 0;
    for e in rd.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            // A per-device cache of an earlier version: `<dir>/<id>/LOCK`.
            if path.join("LOCK").exists() && fs::remove_dir_all(&path).is_ok() {
                old_dirs += 1;
            }
            continue;
        }
        if name == "LOCK" || name.ends_with(".tmp") {
            let _ = fs::remove_file(&path);
            continue;
        }
        names.push(name);
    }
    if old_dirs > 0 {
        tracing::info!(
            "block cache {}: removed {old_dirs} per-device cache directories of an earlier version",
            dir.display()
        );
    }
    let maps: std::collections::HashSet<String> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".map").map(str::to_owned))
        .collect();
    // Data and checkpoints without a map (the single-process layout of
    // earlier versions, or a crash between creating the data file and the
    // map) are not trusted.
    for n in &names {
        let stem = n.strip_suffix(".data").or_else(|| n.strip_suffix(".meta"));
        if stem.is_some_and(|s| !maps.contains(s)) {
            let _ = fs::remove_file(dir.join(n));
        }
    }
    let mut total = 0;
    for stem in &maps {
        let [map_path, data_path, meta_path] = cache.paths(stem);
        let m = match BlobMap::open(&map_path) {
            Ok(m) if m.header.bs == cache.opts.block_size => m,
            _ => {
                cache.resets.fetch_add(1, Ordering::Relaxed);
                cache.unlink(stem);
                continue;
            }
        };
        let data = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(f) if f.metadata().map(|md| md.len()).ok() == Some(m.header.size) => f,
            _ => {
                cache.resets.fetch_add(1, Ordering::Relaxed);
                cache.unlink(stem);
                continue;
            }
        };
        let Ok(_f) = FlockGuard::exclusive(&m.file) else {
            continue;
        };
        CachedBlob::settle_gen(&m);
        if m.boot() != cache.boot {
            cache.restore_checkpoint(&m, &data, &meta_path);
        } else if !file::runs_allocated(&data, &m.snapshot(), m.header.bs, m.header.size) {
            // The data file was emptied behind the cache's back.
            drop(_f);
            cache.reset_files(stem);
            continue;
        }
        total += m.cached_bytes();
    }
    cache.state.used().store(total, Ordering::Release);
    Ok(())
}

/// A blob of the directory as a [`CachedBlob`] for a pass: the one this
/// process has open, else opened for the pass only (not held in use).
fn open_for_pass(cache: &BlockCache, stem: &str) -> Option<Arc<CachedBlob>> {
    if let Some(b) = cache.blobs.locked().get(stem) {
        return Some(Arc::clone(b));
    }
    let paths = cache.paths(stem);
    let m = BlobMap::open(&paths[0]).ok()?;
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&paths[1])
        .ok()?;
    if m.header.bs != cache.opts.block_size {
        return None;
    }
    Some(Arc::new(CachedBlob::new(
        m.header.clone(),
        paths,
        Some((data, m)),
    )))
}

/// Evicts the least recently used blocks of the whole directory down to the
/// low-water mark. The caller holds the eviction locks.
pub(super) fn evict_lru(cache: &BlockCache) -> Result<()> {
    let mut blobs = Vec::new();
    let mut entries = Vec::new();
    let mut total = 0u64;
    for stem in stems(cache)? {
        let Some(b) = open_for_pass(cache, &stem) else {
            continue;
        };
        let Some((_, m)) = &b.live else {
            continue;
        };
        let k = blobs.len();
        for i in 0..m.blocks() {
            if m.get(i) {
                total += b.block_len(i);
                entries.push((m.tick(i).load(Ordering::Relaxed), k, i));
            }
        }
        blobs.push(b);
    }
    // The recount corrects any drift (e.g. a process killed between setting
    // a bit and counting it).
    cache.state.used().store(total, Ordering::Release);
    if total <= cache.budget {
        return Ok(());
    }
    let pct = u128::from(cache.opts.low_water_pct.min(100));
    let target = (u128::from(cache.budget) * pct / 100) as u64;
    entries.sort_unstable();
    let mut victims: HashMap<usize, Vec<u64>> = HashMap::new();
    for (_, k, i) in entries {
        if total <= target {
            break;
        }
        total -= blobs[k].block_len(i);
        victims.entry(k).or_default().push(i);
    }
    let mut first_err = None;
    for (k, mut blocks) in victims {
        blocks.sort_unstable();
        if let Err(e) = cache.drop_blocks(&blobs[k], &blocks) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// See [`BlockCache::gc`].
pub(super) fn gc(
    cache: &BlockCache,
    keep: &dyn Fn(&str) -> bool,
    grace: Duration,
) -> Result<GcReport> {
    let mut report = GcReport::default();
    let now = now_secs();
    for stem in stems(cache)? {
        if cache.blobs.locked().contains_key(&stem) {
            continue;
        }
        let map_path = &cache.paths(&stem)[0];
        let Ok(m) = BlobMap::open(map_path) else {
            continue;
        };
        let recent = now.saturating_sub(m.last_use().load(Ordering::Relaxed)) < grace.as_secs();
        if keep(&m.header.digest) || recent || shm::in_use(&m.file).unwrap_or(true) {
            continue;
        }
        let Ok(_f) = FlockGuard::exclusive(&m.file) else {
            continue;
        };
        // Opened (users take the lock before checking the link) or replaced
        // meanwhile: leave it.
        let same = fs::metadata(map_path).map(|md| md.ino()).ok()
            == m.file.metadata().map(|md| md.ino()).ok();
        if !same || shm::in_use(&m.file).unwrap_or(true) {
            continue;
        }
        let freed = release_bits(&m);
        sub_used(&cache.state, freed);
        cache.unlink(&stem);
        report.bytes += freed;
        report.removed.push(m.header.digest.clone());
    }
    Ok(report)
}

/// See [`BlockCache::list`].
pub(super) fn list(cache: &BlockCache) -> Result<Vec<BlobInfo>> {
    let mut out = Vec::new();
    for stem in stems(cache)? {
        let ours = cache.blobs.locked().contains_key(&stem);
        let Ok(m) = BlobMap::open(&cache.paths(&stem)[0]) else {
            continue;
        };
        let c = |k| m.counter(k).load(Ordering::Relaxed);
        out.push(BlobInfo {
            digest: m.header.digest.clone(),
            scope: (!m.header.scope.is_empty()).then(|| m.header.scope.clone()),
            size: m.header.size,
            cached: m.cached_bytes(),
            hits: c(Counter::Hits),
            misses: c(Counter::Misses),
            fetched: c(Counter::Fetched),
            evicted: c(Counter::Evicted),
            last_use: m.last_use().load(Ordering::Relaxed),
            in_use: ours || shm::in_use(&m.file).unwrap_or(false),
        });
    }
    out.sort_by(|a, b| a.digest.cmp(&b.digest).then(a.scope.cmp(&b.scope)));
    Ok(out)
}
