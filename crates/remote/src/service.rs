//! The service configuration (TOML) for remote layers, and the registry
//! [`LayerSource`] built from it.
//!
//! ```toml
//! # Every key is optional; the values shown are the defaults.
//! [cache]
//! dir = "<root>/cache"           # the host-wide block cache: under the snapshotter's
//!                                # root for device workers, else /var/lib/obd/cache
//! budget = 0                     # bytes cached across all blobs of the host (LRU
//!                                # beyond); 0 = 10 % of the file system (1-64 GiB)
//! block_size = 65536             # presence/eviction granularity
//! gc_grace = 3600                # seconds before a blob nothing uses is collected
//! verify = "if-present"          # check fetched bytes against the layer's piece
//!                                # table: "required" (no table: the layer does not
//!                                # open), "if-present", or "off"
//!
//! [fetch]
//! min_fetch = 262144             # a read's request covers whole multiples of this
//! traced_min_fetch = 65536       # the same for a device whose image has a trace
//!                                # (its working set prefetched): its misses are
//!                                # few and scattered (rounded up to whole cache blocks)
//! max_request = 4194304          # largest single request
//! concurrency = 8                # outstanding requests; foreground reads go first
//!
//! [download]                     # background whole-blob download, then reads go local
//! enable = false                 # a config.v1.json `download` section overrides this
//! delay = 300                    # seconds after the layer opens
//! delay_extra = 30               # plus a random 0..delay_extra seconds
//! max_mbps = 100                 # MiB/s per blob; 0 = unlimited
//! try_cnt = 5                    # attempts per chunk
//! block_size = 262144            # bytes per request
//! dir = "/var/lib/obd/download"  # `<dir>/<digest hex>/overlaybd.commit` when the
//!                                # layer's config entry names no `dir` of its own
//!
//! [prefetch]                     # trace replay in device workers
//! concurrency = 2                # replay workers (requests in flight)
//! max_request = 524288           # largest merged replay request
//! order = "offset"               # ranges merged per layer by offset, or "recorded"
//! merge_gap = 65536              # offset: ranges this close become one request
//!                                # (over remote layers: this close in the blob)
//!
//! [registry]                     # see RegistryOptions: hosts, mirrors, p2p, timeouts,
//! user_agent = "obd/<version>"   # retry, credential_file, use_docker_config, ...
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::blob::{PassThrough, RemoteBlob, RemoteOptions, DEFAULT_MAX_REQUEST, DEFAULT_MIN_FETCH};
use crate::cache::{BlockCache, CacheOptions, DEFAULT_BLOCK_SIZE, DEFAULT_GC_GRACE};
use crate::download::{
    CachedFetcher, DownloadHandle, DownloadOptions, DownloadProgress, DownloadReport, Downloader,
    SwitchBlob,
};
use crate::metrics::{MeteredFetcher, Metrics};
use crate::registry::{RegistryClient, RegistryOptions};
use crate::sched::Scheduler;
use crate::verity::{self, PieceTable};
use crate::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::config::{resolve, Download, Lower, Verity};
use overlaybd_core::error::{Error, Result};
use overlaybd_core::source::{LayerRef, LayerSource, OpenedBlob};

/// Default cache directory outside a snapshotter root.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/obd/cache";

/// The whole service configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ServiceConfig {
    /// The block cache.
    pub cache: CacheSection,
    /// Request shaping and scheduling.
    pub fetch: FetchSection,
    /// Registry access: hosts, mirrors, P2P, timeouts, retries, credentials.
    pub registry: RegistryOptions,
    /// Background download of whole blobs.
    pub download: DownloadSection,
    /// Trace replay (prefetch) in device workers.
    pub prefetch: PrefetchSection,
}

/// `[prefetch]`: how a device worker replays a recorded trace.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefetchSection {
    /// Replay workers, i.e. prefetch requests in flight. Default 2 (upstream
    /// uses 16): every byte in flight shares the link with the container's
    /// reads, so on a slow link few requests in first-use order bring what
    /// the container needs next soonest (docs/BENCHMARKS.md, issue 7); raise
    /// it for a registry far away (high round-trip time).
    pub concurrency: usize,
    /// Largest merged replay request in bytes. Default 512 KiB: a request
    /// completes (and serves readers) only when all of it has arrived.
    pub max_request: u64,
    /// `offset` (default): each layer's ranges merged by offset, issued by
    /// first use (fewest requests); `recorded`: requests in the order the
    /// container read.
    pub order: PrefetchOrder,
    /// `offset`: ranges at most this many bytes apart become one request;
    /// over remote layers, where their compressed blocks are stored (the
    /// replay only advises there). Default 64 KiB.
    pub merge_gap: u64,
}

/// `[prefetch] order`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchOrder {
    /// The order the container read.
    Recorded,
    /// By offset within each layer.
    #[default]
    Offset,
}

impl Default for PrefetchSection {
    fn default() -> Self {
        PrefetchSection {
            concurrency: 2,
            max_request: 512 << 10,
            order: PrefetchOrder::Offset,
            merge_gap: 64 << 10,
        }
    }
}

/// Default download directory.
pub const DEFAULT_DOWNLOAD_DIR: &str = "/var/lib/obd/download";

/// `[download]`: the service-wide background download settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadSection {
    /// Download whole blobs in the background. Default false.
    pub enable: bool,
    /// Seconds before starting. Default 300.
    pub delay: u64,
    /// Random extra delay bound, seconds. Default 30.
    pub delay_extra: u64,
    /// Rate limit per blob in MiB/s; 0 = unlimited. Default 100.
    pub max_mbps: u64,
    /// Attempts per chunk. Default 5.
    pub try_cnt: u32,
    /// Bytes per request. Default 256 KiB.
    pub block_size: u64,
    /// Where blobs go when their config entry has no `dir`. Default
    /// `/var/lib/obd/download`.
    pub dir: PathBuf,
}

impl Default for DownloadSection {
    fn default() -> Self {
        let d = Download::default();
        DownloadSection {
            enable: d.enable,
            delay: d.delay,
            delay_extra: d.delay_extra,
            max_mbps: d.max_mbps,
            try_cnt: d.try_cnt,
            block_size: d.block_size,
            dir: PathBuf::from(DEFAULT_DOWNLOAD_DIR),
        }
    }
}

impl DownloadSection {
    fn as_download(&self) -> Download {
        Download {
            enable: self.enable,
            delay: self.delay,
            delay_extra: self.delay_extra,
            max_mbps: self.max_mbps,
            try_cnt: self.try_cnt,
            block_size: self.block_size,
        }
    }
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CacheSection {
    /// Cache directory; empty (the default) means the snapshotter root's
    /// `cache/` for device workers and [`DEFAULT_CACHE_DIR`] elsewhere (see
    /// [`CacheSection::dir_or`]).
    pub dir: PathBuf,
    /// Byte budget across all blobs of the host; 0 (the default) is
    /// [`crate::cache::default_budget`] of the cache's file system.
    pub budget: u64,
    /// Presence/eviction granularity (power of two ≥ 4096). Default 64 KiB.
    pub block_size: u64,
    /// Whether fetched bytes are checked against the layers' piece tables.
    /// Default `if-present`.
    pub verify: VerifyPolicy,
    /// Seconds before a blob that no process uses (and no snapshot keeps) is
    /// collected. Default 3600.
    pub gc_grace: u64,
}

impl CacheSection {
    /// The block cache options these settings give, with `default_dir` when
    /// the config names no directory.
    pub fn options(&self, default_dir: &Path) -> CacheOptions {
        let mut o = CacheOptions::new(self.dir_or(default_dir));
        o.budget = self.budget;
        o.block_size = self.block_size;
        o
    }

    /// The grace period of [`BlockCache::gc`].
    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.gc_grace)
    }

    /// The cache directory, `default` when the config names none.
    pub fn dir_or(&self, default: &Path) -> PathBuf {
        if self.dir.as_os_str().is_empty() {
            default.to_path_buf()
        } else {
            self.dir.clone()
        }
    }
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            dir: PathBuf::new(),
            budget: 0,
            block_size: DEFAULT_BLOCK_SIZE,
            gc_grace: DEFAULT_GC_GRACE.as_secs(),
            verify: VerifyPolicy::default(),
        }
    }
}

/// `[cache] verify`: what a remote layer's piece table (`lowers[].verity`
/// in `config.v1.json`) is used for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyPolicy {
    /// A remote layer without a piece table does not open.
    Required,
    /// Layers with a table are checked; the others are read unchecked.
    #[default]
    IfPresent,
    /// Nothing is checked; tables are not fetched.
    Off,
}

/// `[fetch]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FetchSection {
    /// Minimum (and alignment of every) remote request. Default 256 KiB.
    pub min_fetch: u64,
    /// `min_fetch` of a device whose image has a trace
    /// ([`ServiceConfig::for_traced_image`]). Default 64 KiB.
    pub traced_min_fetch: u64,
    /// Largest single remote request. Default 4 MiB.
    pub max_request: u64,
    /// Outstanding remote requests. Default 8.
    pub concurrency: usize,
}

impl Default for FetchSection {
    fn default() -> Self {
        FetchSection {
            min_fetch: DEFAULT_MIN_FETCH,
            traced_min_fetch: DEFAULT_TRACED_MIN_FETCH,
            max_request: DEFAULT_MAX_REQUEST,
            concurrency: 8,
        }
    }
}

/// Default `[fetch] traced_min_fetch`: one default cache block.
pub const DEFAULT_TRACED_MIN_FETCH: u64 = 64 << 10;

impl ServiceConfig {
    /// The config for a device whose image has a trace: its reads fetch in
    /// units of `traced_min_fetch`, rounded up to whole cache blocks (as
    /// every fetch unit must be). The trace's working set is prefetched
    /// whole, so what the container still misses is a few reads scattered
    /// over the layers (a read-around window that fell differently than in
    /// the recording), not a run that larger units would serve ahead
    /// (docs/BENCHMARKS.md, issue 18, "Misses of a traced start").
    pub fn for_traced_image(mut self) -> Self {
        let bs = self.cache.block_size.max(1);
        self.fetch.min_fetch = self.fetch.traced_min_fetch.max(1).div_ceil(bs) * bs;
        self
    }

    /// Parses TOML; errors name the key.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::ServiceConfig {
            field: e
                .span()
                .map_or_else(|| "?".into(), |s| format!("bytes {}..{}", s.start, s.end)),
            detail: e.message().to_string(),
        })
    }

    /// Reads a TOML file (a regular file of at most
    /// [`overlaybd_core::regular::MAX_CONFIG_SIZE`] bytes).
    pub fn load(path: &Path) -> Result<Self> {
        use overlaybd_core::regular;
        let text = regular::read_to_string(path, regular::MAX_CONFIG_SIZE, "service config")?;
        Self::from_toml(&text).map_err(|e| e.in_file(path))
    }
}

/// Remote lowers (`digest` + `repoBlobUrl`) read lazily from a registry through
/// the persistent block cache.
pub struct RegistrySource {
    verify: VerifyPolicy,
    download: DownloadSection,
    downloads: Mutex<Vec<(String, DownloadHandle)>>,
    /// Every blob opened, for [`LayerSource::local_bytes`].
    opened: Mutex<Vec<Arc<RemoteBlob>>>,
    metrics: Metrics,
    fetcher: Arc<dyn RangeFetcher>,
    cache: Arc<BlockCache>,
    sched: Arc<Scheduler>,
    opts: RemoteOptions,
    pass_through: bool,
    one_pass: bool,
    /// Whether the registry clients were prepared (at the first remote layer).
    prepared: std::sync::atomic::AtomicBool,
}

impl RegistrySource {
    /// Builds the registry client, opens the cache and the scheduler.
    pub fn new(cfg: &ServiceConfig) -> Result<Self> {
        let metrics = Metrics::new();
        let client = RegistryClient::new(cfg.registry.clone())?.with_metrics(metrics.clone());
        Self::with_parts(cfg, Arc::new(client), metrics)
    }

    /// Like [`RegistrySource::new`] with any fetcher (tests, custom transports).
    pub fn with_fetcher(cfg: &ServiceConfig, fetcher: Arc<dyn RangeFetcher>) -> Result<Self> {
        Self::with_parts(cfg, fetcher, Metrics::new())
    }

    fn with_parts(
        cfg: &ServiceConfig,
        fetcher: Arc<dyn RangeFetcher>,
        metrics: Metrics,
    ) -> Result<Self> {
        let fetcher: Arc<dyn RangeFetcher> =
            Arc::new(MeteredFetcher::new(fetcher, metrics.clone()));
        let copts = cfg.cache.options(Path::new(DEFAULT_CACHE_DIR));
        let cache = BlockCache::open(copts)?;
        let mut sched = Scheduler::new(cfg.fetch.concurrency.max(1));
        match cache.foreground_flag() {
            Ok(flag) => sched = sched.with_host_flag(flag, false),
            Err(e) => tracing::warn!("prefetch will not yield to other processes' reads: {e}"),
        }
        Ok(RegistrySource {
            verify: cfg.cache.verify,
            download: cfg.download.clone(),
            downloads: Mutex::new(Vec::new()),
            opened: Mutex::new(Vec::new()),
            metrics,
            fetcher,
            cache,
            sched: Arc::new(sched),
            opts: RemoteOptions {
                min_fetch: cfg.fetch.min_fetch,
                max_request: cfg.fetch.max_request,
            },
            pass_through: false,
            one_pass: false,
            prepared: Default::default(),
        })
    }

    /// Marks this source's foreground fetches as containers' reads (a
    /// device worker's): while one runs, the prefetches of every process on
    /// the host wait ([`crate::sched`]).
    pub fn serving_containers(self) -> Self {
        self.sched.set_raise_host_flag(true);
        self
    }

    /// With `on`, the blobs opened from now on stream their read-ahead
    /// through memory instead of the cache
    /// ([`RemoteBlob::with_pass_through`]): for a one-pass reader of the
    /// whole image (`obd image flatten`).
    pub fn with_pass_through(mut self, on: bool) -> Self {
        self.pass_through = on;
        self
    }

    /// With `on`, the blobs are read whole, in order (`obd image flatten`,
    /// with or without pass-through): opening a layer does not fetch its two
    /// ends apart, since the read-ahead streams them with the rest.
    pub fn with_one_pass(mut self, on: bool) -> Self {
        self.one_pass = on;
        self
    }

    /// The background downloads started so far: digest and progress.
    pub fn downloads(&self) -> Vec<(String, DownloadProgress)> {
        self.downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(d, h)| (d.clone(), h.progress()))
            .collect()
    }

    /// Waits for every background download started so far and returns each
    /// digest with its outcome (the handles are consumed).
    pub fn wait_downloads(&self) -> Vec<(String, Result<DownloadReport>)> {
        let all = std::mem::take(&mut *self.downloads.lock().unwrap_or_else(|e| e.into_inner()));
        all.into_iter().map(|(d, h)| (d, h.wait())).collect()
    }

    /// The block cache.
    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    /// Fetch metrics (OpenMetrics via [`Metrics::encode`]); cache usage is
    /// sampled on each call.
    pub fn metrics(&self) -> &Metrics {
        self.metrics.cache_bytes.set(self.cache.usage() as i64);
        &self.metrics
    }

    /// The piece table of remote lower `l` (`size` bytes) under the
    /// `[cache] verify` policy ([`fetch_piece_table`]). A table the config
    /// names but that cannot be had fails the open (never a silent fall back
    /// to unchecked reads).
    fn piece_table(
        &self,
        repo_blob_url: &str,
        l: &Lower,
        size: u64,
    ) -> Result<Option<Arc<PieceTable>>> {
        let v = match (self.verify, &l.verity) {
            (VerifyPolicy::Off, _) | (VerifyPolicy::IfPresent, None) => return Ok(None),
            (VerifyPolicy::Required, None) => {
                return Err(Error::Verify {
                    blob: l.digest.clone(),
                    detail: "the layer has no piece table and the service config requires one ([cache] verify = \"required\")".into(),
                })
            }
            (_, Some(v)) => v,
        };
        let blob = BlobRef::new(String::new(), l.digest.clone(), size);
        check_table_size(&blob, v)?;
        // Tables are kept beside the block cache (content-addressed and
        // checked again on every load), so a second open fetches nothing.
        let hex = v.digest.strip_prefix("sha256:").unwrap_or(&v.digest);
        let kept = self.cache.options().dir.join("tables").join(hex);
        if let Ok(bytes) = overlaybd_core::regular::read(&kept, v.size, "piece table") {
            if let Ok(t) = piece_table_from(&bytes, &blob, v) {
                return Ok(Some(t));
            }
        }
        let t = fetch_piece_table(&*self.fetcher, repo_blob_url, &blob, v)?;
        keep_table(&kept, &t.encode());
        Ok(Some(t))
    }
}

/// Stores a checked table at `path` (best effort: a table not kept is
/// fetched again next time).
fn keep_table(path: &Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else {
        return;
    };
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let ok = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if ok.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Refuses a table size no table of `blob` can have (before any read).
fn check_table_size(blob: &BlobRef, v: &Verity) -> Result<()> {
    let size = blob.size;
    let bound = verity::encoded_len(size, 1 << verity::MIN_PIECE_SHIFT).min(verity::MAX_TABLE_SIZE);
    if v.size > bound {
        return Err(Error::Verify {
            blob: blob.digest.clone(),
            detail: format!(
                "piece table {} is said to be {} bytes; a table of a {size}-byte blob has at most {bound}",
                v.digest, v.size
            ),
        });
    }
    Ok(())
}

/// Fetches the piece table `v` of `blob` (its digest and size) from the
/// repository at `repo_blob_url` through `fetcher`, and checks it: its size
/// bounded by what a table of a blob this size can be (before fetching), its
/// sha256 whole, its encoding, and that it describes this blob. Errors are
/// [`Error::Verify`] naming the blob.
pub fn fetch_piece_table(
    fetcher: &dyn RangeFetcher,
    repo_blob_url: &str,
    blob: &BlobRef,
    v: &Verity,
) -> Result<Arc<PieceTable>> {
    let bad = |detail: String| Error::Verify {
        blob: blob.digest.clone(),
        detail,
    };
    check_table_size(blob, v)?;
    let url = format!("{}/{}", repo_blob_url.trim_end_matches('/'), v.digest);
    let bytes = fetcher
        .fetch(
            &BlobRef::new(url, v.digest.clone(), v.size),
            0,
            v.size,
            Priority::Foreground,
        )
        .map_err(|e| bad(format!("fetching its piece table: {e}")))?;
    piece_table_from(&bytes, blob, v)
}

/// Checks the bytes of `blob`'s piece table `v`: their sha256 is the
/// annotation's digest, they decode, and they describe this blob.
fn piece_table_from(bytes: &[u8], blob: &BlobRef, v: &Verity) -> Result<Arc<PieceTable>> {
    let bad = |detail: String| Error::Verify {
        blob: blob.digest.clone(),
        detail,
    };
    let size = blob.size;
    let got = crate::oci::sha256_digest(bytes);
    if got != v.digest {
        return Err(bad(format!(
            "piece table blob {} has digest {got}",
            v.digest
        )));
    }
    let t = PieceTable::decode(bytes).map_err(|e| bad(format!("piece table {}: {e}", v.digest)))?;
    if t.blob_digest() != blob.digest || t.blob_size() != size {
        return Err(bad(format!(
            "piece table {} describes blob {} ({} bytes), not this one ({size} bytes)",
            v.digest,
            t.blob_digest(),
            t.blob_size()
        )));
    }
    Ok(Arc::new(t))
}

/// Bytes at the end of a blob fetched when a layer opens: the ZFile trailer
/// and the tar end, in one cache block unless the blob ends just past a
/// block boundary.
const TAIL: u64 = 16 << 10;

impl RegistrySource {
    /// Fetches into the block cache (and the kept piece tables) what opening
    /// `layer` reads: its piece table, both ends, jump table and index. A
    /// later open of the layer, in any process sharing the cache, then
    /// fetches nothing; so a snapshotter can open each layer as a pull
    /// commits it, ahead of the device's worker. Keeps nothing open and
    /// starts no download; the blob it returns (dropped, it keeps nothing
    /// either) can be fetched whole ([`RemoteBlob::prefetch_in_order`]).
    /// `None` if `layer` is not a remote layer.
    pub fn open_ahead(&self, layer: LayerRef<'_>) -> Result<Option<Arc<RemoteBlob>>> {
        let Some(blob) = self.remote_blob(layer)? else {
            return Ok(None);
        };
        let name = blob.blob().digest.clone();
        overlaybd_core::image::Layer::open(name, blob.clone())?;
        Ok(Some(blob))
    }

    /// The lazily read blob of remote lower `layer` (`None`: not remote),
    /// with its two ends fetched unless the source reads blobs in one pass.
    fn remote_blob(&self, layer: LayerRef<'_>) -> Result<Option<Arc<RemoteBlob>>> {
        let l = layer.lower;
        if l.digest.is_empty() {
            return Ok(None);
        }
        if layer.repo_blob_url.is_empty() {
            return Err(Error::Config {
                field: "repoBlobUrl".into(),
                detail: format!("needed to fetch remote layer {}", l.digest),
            });
        }
        let repo = layer.repo_blob_url.trim_end_matches('/');
        let url = format!("{repo}/{}", l.digest);
        if !self
            .prepared
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // The first request's HTTP client (and TLS roots) built while the
            // layers open and the device comes up, not when that request
            // waits for it.
            let (fetcher, u) = (self.fetcher.clone(), url.clone());
            let _ = std::thread::Builder::new()
                .name("client-prepare".into())
                .spawn(move || fetcher.prepare(&u));
        }
        let size = if l.size > 0 {
            l.size
        } else {
            self.fetcher.blob_size(&url)?
        };
        let verity = self.piece_table(repo, l, size)?;
        let blob = Arc::new(
            RemoteBlob::new(
                BlobRef {
                    url,
                    digest: l.digest.clone(),
                    size,
                    verity,
                },
                self.fetcher.clone(),
                self.cache.clone(),
                self.sched.clone(),
                self.opts,
            )?
            .with_pass_through(self.pass_through.then(PassThrough::default)),
        );
        // Opening the layer reads its two ends: the tar and ZFile headers,
        // and the ZFile trailer, jump table and LSMT index (the ZFile reader
        // asks for the jump table's exact range: `ReadAt::will_need`).
        // Fetch exactly the cache blocks at each end (both at once: one
        // round trip, `fetch_exact_ranges`) instead of a whole fetch unit each: a start that its
        // trace prefetch serves from another layer reads nothing else here.
        // Not for a one-pass reader (flatten) that streams the whole blob.
        if !self.one_pass {
            let head = self.cache.block_size();
            let tail = size.saturating_sub(TAIL);
            blob.fetch_exact_ranges(&[(0, head), (tail, TAIL)], Priority::Foreground)?;
        }
        Ok(Some(blob))
    }
}

impl LayerSource for RegistrySource {
    fn open(&self, layer: LayerRef<'_>) -> Result<Option<OpenedBlob>> {
        let Some(blob) = self.remote_blob(layer)? else {
            return Ok(None);
        };
        let l = layer.lower;
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(blob.clone());
        let service = self.download.as_download();
        let dl = layer.download.unwrap_or(&service);
        if !dl.enable {
            return Ok(Some(OpenedBlob {
                name: l.digest.clone(),
                blob,
            }));
        }
        // Background download: reads go remote (through the cache) until the
        // verified copy is committed, then local.
        let dir = if l.dir.is_empty() {
            let hex = l.digest.strip_prefix("sha256:").unwrap_or(&l.digest);
            self.download.dir.join(hex)
        } else {
            resolve(layer.base_dir, &l.dir)
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io(e).in_file(&dir))?;
        let switch = Arc::new(SwitchBlob::new(blob.clone()));
        let fetcher: Arc<dyn RangeFetcher> = Arc::new(CachedFetcher::new(blob.clone()));
        let handle = Downloader::start(
            blob.blob().clone(),
            fetcher,
            dir,
            DownloadOptions::from(dl),
            switch.clone(),
        );
        self.downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((l.digest.clone(), handle));
        Ok(Some(OpenedBlob {
            name: l.digest.clone(),
            blob: switch,
        }))
    }

    /// Cached bytes of the blobs opened so far and their sizes (a blob being
    /// downloaded counts what its reads have cached).
    fn local_bytes(&self) -> Option<(u64, u64)> {
        let opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        Some(opened.iter().fold((0, 0), |(c, t), b| {
            (c + b.cached_bytes(), t + b.blob().size)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_credential_configs_that_are_not_files_are_refused() {
        let zero = Path::new("/dev/zero");
        let errs = [
            ServiceConfig::load(zero).map(drop),
            crate::creds::DockerConfig::load(zero).map(drop),
        ];
        for e in errs {
            match e.unwrap_err() {
                Error::InFile { path, inner } => {
                    assert_eq!(path, zero);
                    assert!(
                        matches!(
                            *inner,
                            Error::NotRegularFile {
                                kind: "character device"
                            }
                        ),
                        "{inner:?}"
                    );
                }
                e => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn empty_toml_gives_documented_defaults() {
        let c = ServiceConfig::from_toml("").unwrap();
        let dflt = Path::new(DEFAULT_CACHE_DIR);
        assert_eq!(c.cache.dir_or(dflt), dflt);
        assert_eq!(c.cache.dir_or(Path::new("/r/cache")), Path::new("/r/cache"));
        assert_eq!(c.cache.budget, 0);
        assert_eq!(c.cache.gc_grace, 3600);
        assert_eq!(c.fetch.min_fetch, 256 << 10);
        assert_eq!(c.fetch.traced_min_fetch, 64 << 10);
        assert_eq!(c.fetch.max_request, 4 << 20);
        assert_eq!(c.fetch.concurrency, 8);
        assert_eq!(c.cache.verify, VerifyPolicy::IfPresent);
        for (text, want) in [
            ("required", VerifyPolicy::Required),
            ("if-present", VerifyPolicy::IfPresent),
            ("off", VerifyPolicy::Off),
        ] {
            let c = ServiceConfig::from_toml(&format!("[cache]\nverify = \"{text}\"")).unwrap();
            assert_eq!(c.cache.verify, want);
        }
        assert!(ServiceConfig::from_toml("[cache]\nverify = \"sometimes\"").is_err());
    }

    #[test]
    fn a_traced_image_fetches_in_its_own_units() {
        let c = ServiceConfig::from_toml("[fetch]\nmin_fetch = 1048576\ntraced_min_fetch = 131072")
            .unwrap();
        assert_eq!(c.fetch.min_fetch, 1 << 20);
        let t = c.clone().for_traced_image();
        assert_eq!(t.fetch.min_fetch, 128 << 10);
        assert_eq!(t.fetch.max_request, c.fetch.max_request);
        let d = ServiceConfig::default().for_traced_image();
        assert_eq!(d.fetch.min_fetch, d.cache.block_size);
        // Whole cache blocks, whatever the two settings.
        for (bs, traced, want) in [
            (128 << 10, 64 << 10, 128 << 10),
            (64 << 10, 100_000, 128 << 10),
            (64 << 10, 0, 64 << 10),
        ] {
            let t = ServiceConfig::from_toml(&format!(
                "[cache]\nblock_size = {bs}\n[fetch]\ntraced_min_fetch = {traced}"
            ))
            .unwrap()
            .for_traced_image();
            assert_eq!(t.fetch.min_fetch, want, "block {bs}, traced {traced}");
        }
    }

    #[test]
    fn bad_toml_names_the_problem() {
        let e = ServiceConfig::from_toml("[cache]\nbudget = \"lots\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("service config"), "{e}");
    }
}
