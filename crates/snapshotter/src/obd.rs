//! obd (overlaybd) layers: `config.v1.json` per snapshot, block devices
//! attached through the device service, and the mounts on top of them
//! (integration.md §3–4, formats.md §7 and §9.2).
//!
//! - A remote layer (the Prepare → AlreadyExists handshake) gets
//!   `block/config.v1.json`: its parent's lowers plus `{digest, size, dir}`,
//!   with `repoBlobUrl` from the image reference.
//! - A layer containerd downloaded and unpacked anyway (plain `ctr pull`; the
//!   tar wrapper leaves `fs/overlaybd.commit`) gets a config whose lower is
//!   that local file. The fallback is logged and counted.
//! - A container rootfs whose parent chain holds an obd layer: in `overlayfs`
//!   mode the image's read-only device (one per image, on the top obd layer,
//!   shared by its containers) is mounted at `<layer>/block/mountpoint` and
//!   used as the overlay's lowest lowerdir; in `dir` mode a private writable
//!   device (`block/writable_{data,index}`) is mounted and bound; in `dev`
//!   mode that device is returned unmounted.
//! - Devices are one worker process each (crate `obd-device`), with state
//!   under the snapshotter root (`devices/<id>/`, registry settings in
//!   `service.toml`), so they survive a snapshotter restart; the next start
//!   adopts them and detaches those no snapshot uses.
//! - All workers share one block cache (`cache/` under the root unless the
//!   service config moves it); each sweep collects the cached blobs no
//!   snapshot names (`[cache] gc_grace` after their last use).

use crate::config::RwMode;
use crate::error::{Error, Result};
use crate::layer::{
    classify_overlaybd, AccelPrepare, CommitInfo, LayerHook, MountInfo, PrepareAction, PrepareInfo,
    LABEL_BLOB_DIGEST, LABEL_BLOB_SIZE, LABEL_CRI_IMAGE_REF, LABEL_IMAGE_REF, LABEL_REMOTE,
    LABEL_TARGET_REF, REMOTE_VALUE,
};
use crate::meta::Kind;
use crate::proto::containerd::types::Mount;
use obd_device::open::trace_replay::accel::AccelFile;
use obd_device::open::trace_replay::pack::TRACED_READ_AHEAD_KB;
use obd_device::open::trace_replay::warm::{self, OpenWatch, WarmList, WARM_FILE};
use obd_device::service::{Op, Service};
use obd_device::state::{worker_alive, Root};
use obd_remote::cache::BlockCache;
use overlaybd_core::config::{ImageConfig, Lower, Upper};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use zfile::sync::MutexExt;

/// Per-snapshot override of `rw_mode` (`dir` or `dev`).
pub const LABEL_WRITABLE: &str = "containerd.io/snapshot/overlaybd.writable";
/// Record a trace for this rootfs (`yes`), into [`LABEL_RECORD_TRACE_PATH`].
pub const LABEL_RECORD_TRACE: &str = "containerd.io/snapshot/overlaybd/record-trace";
/// Where the trace of a recording rootfs goes (an empty file starts it).
pub const LABEL_RECORD_TRACE_PATH: &str = "containerd.io/snapshot/overlaybd/record-trace-path";
/// Names the file of a locally unpacked obd layer inside `fs/`.
pub const COMMIT_FILE: &str = "overlaybd.commit";

/// The device config of a snapshot directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("block").join("config.v1.json")
}

/// Whether a snapshot directory holds an obd layer (its config exists).
pub fn is_obd(dir: &Path) -> bool {
    config_path(dir).is_file()
}

/// `https://<host>/v2/<repo>/blobs` of an image reference (docker.io →
/// registry-1.docker.io; the scheme becomes http through the registry
/// service config's per-host `plain_http`).
pub fn repo_blob_url(image_ref: &str) -> Result<String> {
    let r = obd_remote::distribution::ImageRef::parse(image_ref)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let host = match r.host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "registry-1.docker.io",
        h => h,
    };
    Ok(format!("https://{host}/v2/{}/blobs", r.repo))
}

/// Whether `f` starts like a ZFile or LSMT file (formats.md §9.2 probe).
fn looks_like_layer(f: &Path) -> bool {
    use std::io::Read;
    let mut b = [0u8; 24];
    let Ok(mut file) = overlaybd_core::regular::open(f) else {
        return false;
    };
    if file.read_exact(&mut b).is_err() {
        return false;
    }
    // ZFile magic0 "ZFile\0\x01\0"; LSMT magic0 "LSMT\0\x01\x02\0".
    b.starts_with(b"ZFile\0") || b.starts_with(b"LSMT\0")
}

/// Marks (in `block/`) a device attached when a pull committed the image's
/// acceleration layer, that no container has used yet.
const PREFETCH_MARK: &str = "prefetch-attached";
/// `block/` file whose mtime says since when no container has used the
/// image's device ([`ObdInner::idle_held`]).
const IDLE_MARK: &str = "idle-since";

/// The overlaybd layer hook with devices.
pub struct ObdLayers {
    inner: Arc<ObdInner>,
}

/// The state of [`ObdLayers`], shared with its background attaches.
pub struct ObdInner {
    root: PathBuf,
    devices: Service,
    dev_root: Root,
    frontend: String,
    rw_mode: RwMode,
    lazy_pull: bool,
    /// How long a device attached at pull waits for a container; `None`:
    /// no attach at pull.
    prefetch_hold: Option<Duration>,
    attach_lock: Mutex<()>,
    /// The host-wide block cache the device workers share (opened on the
    /// first sweep; `None` if it cannot be opened), and its grace period.
    host_cache: std::sync::OnceLock<Option<(Arc<BlockCache>, Duration)>>,
    /// Page-cache warms running over mounted devices, by device id: their
    /// stop flag and thread.
    warmers: Mutex<HashMap<String, Warmer>>,
    /// Warm lists learned on this host for mounted devices whose image has
    /// none of its own ([`warm::opened_list`]), by device id.
    learned: Arc<Mutex<HashMap<String, Arc<WarmList>>>>,
    /// The files the first container of such a device opens, by device id
    /// (until its second container learns the list from them).
    watches: Mutex<HashMap<String, OpenWatch>>,
    /// The first container (snapshot directory) of each mounted device.
    first_users: Mutex<HashMap<String, PathBuf>>,
    /// Whether [`ObdInner::start_warm`] runs (`warm_page_cache`).
    warm_page_cache: bool,
    /// Opens remote layers as their commits name them (`None`: off).
    open_ahead: Option<crate::ahead::OpenAhead>,
    /// Files of acceleration layers being committed remotely, by target
    /// (from their Prepare's classification to their commit).
    accel_files: Mutex<HashMap<String, Vec<AccelFile>>>,
    /// How long an image's device stays attached once no container uses
    /// it (`device_idle_secs`).
    device_idle: Duration,
}

/// Default `device_idle_secs`: as long as a device attached at pull waits
/// for its first container.
pub const DEFAULT_DEVICE_IDLE: Duration = Duration::from_secs(600);

/// Longest an attach waits for its layers' opens ahead ([`crate::ahead`]);
/// the worker then opens what is left itself.
const OPEN_AHEAD_WAIT: Duration = Duration::from_secs(60);

/// The `read_ahead_kb` file of block device `dev` in sysfs.
fn read_ahead_file(dev: &Path) -> Option<PathBuf> {
    dev.file_name().map(|name| {
        Path::new("/sys/class/block")
            .join(name)
            .join("queue/read_ahead_kb")
    })
}

/// Most files the watch of a device's first container notes
/// ([`ObdInner::start_watch`]), one descriptor each.
const LEARN_MAX_FILES: usize = 4096;

/// Longest a page-cache warm waits for its device's trace replay to end.
const WARM_AFTER_REPLAY_MAX: Duration = Duration::from_secs(120);

/// What a page-cache warm thread does ([`ObdInner::spawn_warm`]).
enum WarmJob {
    /// Warm from the image's own list, once the trace replay has ended.
    List(WarmList),
    /// Warm from a list learned on this host.
    Learned(Arc<WarmList>),
    /// Learn a list from the files the first container opened, with what
    /// the page cache holds of them now.
    Learn(OpenWatch),
}

/// A page-cache warm in progress ([`ObdInner::start_warm`]).
struct Warmer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl std::ops::Deref for ObdLayers {
    type Target = ObdInner;
    fn deref(&self) -> &ObdInner {
        &self.inner
    }
}

impl ObdLayers {
    /// Devices live under `root` (the snapshotter root); workers run as
    /// `worker_cmd … --root <root> --id <id>`.
    /// `lazy_pull` enables the remote-snapshot handshake.
    pub fn new(
        root: &Path,
        worker_cmd: Vec<String>,
        frontend: &str,
        rw_mode: RwMode,
        lazy_pull: bool,
    ) -> Self {
        let dev_root = Root::new(root);
        let devices = Service::new(dev_root.clone(), worker_cmd);
        devices.on_event(|e| crate::metrics::global().device_event(e));
        ObdLayers {
            inner: Arc::new(ObdInner {
                root: root.to_path_buf(),
                devices,
                dev_root,
                frontend: frontend.to_string(),
                rw_mode,
                lazy_pull,
                prefetch_hold: None,
                attach_lock: Mutex::new(()),
                host_cache: std::sync::OnceLock::new(),
                warmers: Mutex::new(HashMap::new()),
                learned: Arc::new(Mutex::new(HashMap::new())),
                watches: Mutex::new(HashMap::new()),
                first_users: Mutex::new(HashMap::new()),
                warm_page_cache: true,
                open_ahead: lazy_pull.then(|| crate::ahead::OpenAhead::new(Root::new(root))),
                accel_files: Mutex::new(HashMap::new()),
                device_idle: DEFAULT_DEVICE_IDLE,
            }),
        }
    }

    /// Whether a mounted device's page cache is warmed from its image's
    /// warm list (on by default: docs/BENCHMARKS.md, issue 18, "The
    /// page-cache warm list").
    pub fn with_warm_page_cache(mut self, on: bool) -> Self {
        if let Some(i) = Arc::get_mut(&mut self.inner) {
            i.warm_page_cache = on;
        }
        self
    }

    /// Whether a lazily pulled layer is opened (its ends, index and piece
    /// table fetched into the block cache) as soon as the pull commits it,
    /// instead of by the device's worker when the image is attached (on by
    /// default: docs/BENCHMARKS.md, issue 18, "Layers opened at commit").
    pub fn with_open_layers_at_commit(mut self, on: bool) -> Self {
        if let Some(i) = Arc::get_mut(&mut self.inner) {
            if !on {
                i.open_ahead = None;
            }
        }
        self
    }

    /// How long an image's device stays attached, with its page cache, once
    /// its last container is gone (a sweep releases it after that; zero:
    /// with the last container). The image's next container then starts
    /// on a warm device instead of attaching it again.
    pub fn with_device_idle(mut self, idle: Duration) -> Self {
        if let Some(i) = Arc::get_mut(&mut self.inner) {
            i.device_idle = idle;
        }
        self
    }

    /// Attach an image's device as soon as a pull commits its acceleration
    /// layer (overlayfs `rw_mode`), so its trace is replayed before the
    /// container starts; a sweep keeps it `hold` for its first container.
    pub fn with_prefetch_at_pull(mut self, hold: Duration) -> Self {
        if let Some(i) = Arc::get_mut(&mut self.inner) {
            i.prefetch_hold = Some(hold);
        }
        self
    }
}

impl ObdInner {
    /// Adopts live devices and cleans up dead ones (at start). A device
    /// that cannot be cleaned up is logged and left for a later sweep: it
    /// must not keep the snapshotter from starting.
    pub fn reconcile(&self) -> Result<(Vec<String>, Vec<String>)> {
        self.kill_unrecorded_workers();
        let r = match self.devices.reconcile() {
            Ok(r) => r,
            Err(e) => {
                // E.g. a worker still bringing its device up when the last
                // snapshotter was killed: it has no record yet (so it is not
                // stopped) and mounts below the directory being removed.
                tracing::warn!(error = %e, "reconciling devices failed; going on device by device");
                self.reconcile_each()
            }
        };
        self.report_devices();
        Ok(r)
    }

    /// Kills the device workers of this root that no device record names:
    /// workers the previous snapshotter started whose attach it did not see
    /// through. Left running, one would finish its attach under the
    /// reconcile's cleanup (mounts in a directory being removed, a device
    /// over files already gone: EIO in the next container).
    fn kill_unrecorded_workers(&self) {
        let root = self.dev_root.dir().as_os_str().as_encoded_bytes().to_vec();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut killed = Vec::new();
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            let arg = |k: &[u8]| args.windows(2).find(|w| w[0] == k).map(|w| w[1]);
            if !args.contains(&&b"device-worker"[..]) || arg(b"--root") != Some(&root[..]) {
                continue;
            }
            let Some(id) = arg(b"--id").map(|v| String::from_utf8_lossy(v).into_owned()) else {
                continue;
            };
            if matches!(self.dev_root.record(&id), Ok(Some(rec)) if rec.pid == pid) {
                continue;
            }
            tracing::warn!(device = %id, pid, "device worker without a record (its attach was cut short): killing it");
            // SAFETY: kill(2) with a pid read from /proc and a valid signal;
            // no memory is shared.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                killed.push(pid);
            }
        }
        // Gone, or a zombie its new parent has not reaped yet.
        let gone = |pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
                st.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
            })
        };
        let t0 = Instant::now();
        while !killed.iter().all(gone) && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The device service's reconcile, one device at a time, logging the
    /// devices that fail instead of stopping at the first.
    fn reconcile_each(&self) -> (Vec<String>, Vec<String>) {
        let (mut adopted, mut cleaned) = (Vec::new(), Vec::new());
        for id in self.dev_root.ids().unwrap_or_default() {
            match self.dev_root.record(&id) {
                Ok(Some(rec)) if self.devices.adopt(&rec) => adopted.push(id),
                // A TCMU device outlives its worker: left to ensure_device.
                Ok(Some(rec)) if rec.request.frontend == "tcmu" => {
                    tracing::warn!(device = %id, "TCMU device without a worker; left as is");
                }
                _ => match obd_device::service::cleanup_device(&self.dev_root, &id) {
                    Ok(()) => cleaned.push(id),
                    Err(e) => {
                        tracing::warn!(device = %id, error = %e, "cleaning up a dead device failed; retried when a snapshot needs it or none uses it")
                    }
                },
            }
        }
        (adopted, cleaned)
    }

    fn report_devices(&self) {
        let n = self.dev_root.ids().map(|v| v.len()).unwrap_or(0);
        crate::metrics::global().set_devices(n as i64);
    }

    fn device_id(dir: &Path) -> String {
        let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or("x");
        format!("s{id}")
    }

    /// The device of snapshot `dir` with `config`, mounted at
    /// `block/mountpoint` if `mount`; attached now if it is not up.
    /// Returns the device node.
    fn ensure_device(&self, dir: &Path, config: &Path, mount: bool) -> Result<PathBuf> {
        let _g = self.attach_lock.locked();
        self.ensure_device_locked(dir, config, mount)
    }

    /// [`ObdInner::ensure_device`] with `attach_lock` held by the caller.
    fn ensure_device_locked(&self, dir: &Path, config: &Path, mount: bool) -> Result<PathBuf> {
        let id = Self::device_id(dir);
        let mp = dir.join("block").join("mountpoint");
        // A device between a dead worker and its successor is up, not stale.
        self.devices.settle(&id);
        if let Ok(Some(rec)) = self.dev_root.record(&id) {
            let mounted_ok = !mount || obd_device::mount::is_mounted(&mp);
            if worker_alive(&rec) && mounted_ok && rec.request.config == config {
                return Ok(rec.device);
            }
            tracing::warn!(device = %id, "device is gone or stale; attaching it again");
            self.forget_warm(&id);
            let _ = self.devices.dispatch(Op::Detach { device: id.clone() });
        } else if self.dev_root.device_dir(&id).exists() {
            let _ = obd_device::service::cleanup_device(&self.dev_root, &id);
        }
        if mount {
            std::fs::create_dir_all(&mp).map_err(|e| Error::io("mkdir", &mp, e))?;
        }
        let t = Instant::now();
        self.wait_open_ahead(config);
        let r = self.devices.dispatch(Op::Attach {
            config: config.to_path_buf(),
            frontend: self.frontend.clone(),
            mountpoint: mount.then_some(mp.clone()),
            id: Some(id.clone()),
        });
        let secs = t.elapsed().as_secs_f64();
        crate::metrics::global().device_attach(secs, r.is_ok());
        self.report_devices();
        let v = r.map_err(dev_err)?;
        let dev = v
            .get("device")
            .and_then(|d| d.as_str())
            .map(PathBuf::from)
            .ok_or_else(|| Error::Device(format!("device service gave no device for {id}")))?;
        tracing::info!(device = %id, node = %dev.display(), config = %config.display(), ms = (secs * 1000.0) as u64, "device attached");
        let _ = std::fs::write(
            dir.join("block").join("backstore_mark"),
            dev.to_string_lossy().as_bytes(),
        );
        if mount {
            self.start_warm(&id, config, (&mp, &dev));
        }
        Ok(dev)
    }

    /// Waits for the opens ahead of the layers of `config`, so that its
    /// worker finds them in the cache instead of fetching them again.
    fn wait_open_ahead(&self, config: &Path) {
        let Some(ahead) = &self.open_ahead else {
            return;
        };
        let Ok(cfg) = ImageConfig::load(config) else {
            return;
        };
        let digests: Vec<String> = cfg.lowers.iter().map(|l| l.digest.clone()).collect();
        if !ahead.wait(&digests, OPEN_AHEAD_WAIT) {
            tracing::warn!(config = %config.display(), "layers opened ahead still not open; attaching anyway");
        }
    }

    /// The warm list ([`WARM_FILE`]) of the acceleration layer of the image
    /// `cfg` (device `id`), if it has one and warms are on.
    fn warm_list(&self, id: &str, cfg: &ImageConfig) -> Option<WarmList> {
        if !self.warm_page_cache {
            return None;
        }
        let accel = cfg
            .acceleration_layer
            .then(|| cfg.lowers.last())
            .flatten()?;
        let path = Path::new(&accel.dir).join(WARM_FILE);
        if !path.exists() {
            return None;
        }
        match WarmList::read_file(&path) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "warm list ignored");
                None
            }
        }
    }

    /// If the image of `config` has a warm list ([`ObdInner::warm_list`]),
    /// reads the list's file ranges through the mount `mp` on a thread, so
    /// that the container's first reads of them find the page cache filled
    /// (the device's trace replay fetches the same bytes).
    fn start_warm(&self, id: &str, config: &Path, (mp, dev): (&Path, &Path)) {
        let Ok(cfg) = ImageConfig::load(config) else {
            return;
        };
        let Some(list) = self.warm_list(id, &cfg) else {
            // Only an image's shared read-only device has later containers
            // to learn for; a container's private writable or recording
            // device has none.
            if !cfg.upper.is_writable() && cfg.record_trace_path.is_empty() {
                self.start_watch(id, mp);
            }
            return;
        };
        let ra = Self::traced_read_ahead(id, dev);
        self.spawn_warm(id, mp, WarmJob::List(list), ra);
    }

    /// An image without a warm list of its own: watches which files its
    /// device's first container opens (fanotify on the device's
    /// filesystem, which sees the opens through the container's overlay),
    /// so that its second container can learn a list from them.
    fn start_watch(&self, id: &str, mp: &Path) {
        if !self.warm_page_cache {
            return;
        }
        match OpenWatch::start_capped(mp, LEARN_MAX_FILES) {
            Ok(w) => {
                self.watches.locked().insert(id.to_string(), w);
            }
            Err(e) => {
                tracing::debug!(device = %id, error = %e, "not watching the first container's opens (no warm list will be learned)")
            }
        }
    }

    /// Container (or view) snapshot `user` mounts the image device (`dev`)
    /// of `obd_dir`. Its first container needs nothing (the attach started
    /// what applies). A later one warms the device's page cache again from
    /// the image's list (what a warm start finds cached is not read again,
    /// so this matters after the host dropped those pages), unless the
    /// device's warm still runs; an image without a list has one learned
    /// here, at its second container, from the files the first opened and
    /// what the page cache holds of them ([`warm::opened_list`]; what the
    /// first had read by then, if it still runs), and its later containers
    /// warm from that. A warm from the image's own list lowers the
    /// readahead as at the first container ([`ObdInner::traced_read_ahead`]);
    /// otherwise it is left as set for the device.
    fn container_mounts(&self, obd_dir: &Path, user: &Path, dev: &Path) {
        if !self.warm_page_cache {
            return;
        }
        let id = Self::device_id(obd_dir);
        {
            let mut first = self.first_users.locked();
            match first.get(&id) {
                None => {
                    first.insert(id.clone(), user.to_path_buf());
                    return;
                }
                Some(u) if u == user => return,
                Some(_) => {}
            }
        }
        let _g = self.attach_lock.locked();
        let running = self
            .warmers
            .locked()
            .get(&id)
            .is_some_and(|w| !w.thread.is_finished());
        if running {
            return;
        }
        let Ok(cfg) = ImageConfig::load(config_path(obd_dir)) else {
            return;
        };
        self.local_read_ahead(&id, &cfg, dev);
        let mut ra = None;
        let job = match self.warm_list(&id, &cfg) {
            Some(list) => {
                ra = Self::traced_read_ahead(&id, dev);
                WarmJob::List(list)
            }
            None => match self.learned.locked().get(&id) {
                Some(l) => WarmJob::Learned(Arc::clone(l)),
                None => match self.watches.locked().remove(&id) {
                    Some(w) => WarmJob::Learn(w),
                    None => return,
                },
            },
        };
        let mp = obd_dir.join("block").join("mountpoint");
        self.spawn_warm(&id, &mp, job, ra);
    }

    /// Lowers the readahead of device `dev` (`id`), whose image has a warm
    /// list, to the recording's ([`TRACED_READ_AHEAD_KB`]); the `read_ahead_kb`
    /// file and the value to give back when the warm ends.
    ///
    /// The list and the packed working set hold what a start read with that
    /// readahead; a larger one reads around them, and what lies outside is
    /// fetched (over the network, until the whole image is on the host):
    /// with the page cache mostly hit the kernel keeps mmap read-around on
    /// (it turns it off after 100 misses, as in the recorded cold start),
    /// and each miss read a whole window, 9.5 MiB outside the working set
    /// on a Java start (docs/BENCHMARKS.md, issue 18). Set before the
    /// container opens its files (a file takes the value at open), for
    /// every container of the image (a later one may start with the page
    /// cache dropped), and given back once the warm is done, so that files
    /// opened later read ahead as the device's worker chose.
    fn traced_read_ahead(id: &str, dev: &Path) -> Option<(PathBuf, String)> {
        let p = read_ahead_file(dev)?;
        let before = std::fs::read_to_string(&p).ok()?.trim().to_string();
        match std::fs::write(&p, TRACED_READ_AHEAD_KB.to_string()) {
            Ok(()) => Some((p, before)),
            Err(e) => {
                tracing::warn!(device = %id, error = %e, path = %p.display(), "cannot lower the readahead for the page-cache warm");
                None
            }
        }
    }

    /// Gives device `dev` (`id`, of the image `cfg`) the readahead the worker
    /// gives a device attached for an image mostly on this host
    /// ([`obd_device::worker::read_ahead_kb`]) once the host's block cache
    /// holds that much of its remote layers: a device kept for later
    /// containers keeps the value chosen at its first, lazy attach.
    fn local_read_ahead(&self, id: &str, cfg: &ImageConfig, dev: &Path) {
        let remote: HashMap<&str, u64> = cfg
            .lowers
            .iter()
            .filter(|l| !l.digest.is_empty() && l.size > 0)
            .map(|l| (l.digest.as_str(), l.size))
            .collect();
        if remote.is_empty() {
            return;
        }
        let Some((cache, _)) = self.host_cache() else {
            return;
        };
        let Ok(blobs) = cache.list() else {
            return;
        };
        let cached: u64 = blobs
            .iter()
            .filter(|b| remote.contains_key(b.digest.as_str()))
            .map(|b| b.cached)
            .sum();
        let total: u64 = remote.values().sum();
        if obd_device::worker::read_ahead_kb(Some((cached, total))).is_some() {
            return;
        }
        let Some(file) = read_ahead_file(dev) else {
            return;
        };
        let kb = obd_device::worker::LOCAL_READ_AHEAD_KB.to_string();
        if std::fs::read_to_string(&file).is_ok_and(|v| v.trim() != kb)
            && std::fs::write(&file, &kb).is_ok()
        {
            tracing::info!(device = %id, read_ahead_kb = %kb, cached, total, "device reads ahead as a local disk: its image is on this host now");
        }
    }

    /// Stops what warms or watches device `id` and forgets what was learned
    /// of it: before it is detached (a warm reads through its mount).
    fn forget_warm(&self, id: &str) {
        self.stop_warm(id);
        self.watches.locked().remove(id);
        self.learned.locked().remove(id);
        self.first_users.locked().remove(id);
    }

    /// Starts the warm of `list` over the mount `mp` of device `id`, after
    /// its trace replay; `ra` (a `read_ahead_kb` file and the value to put
    /// back) is restored when it ends.
    fn spawn_warm(&self, id: &str, mp: &Path, job: WarmJob, ra: Option<(PathBuf, String)>) {
        self.stop_warm(id);
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, dev, mp) = (Arc::clone(&stop), id.to_string(), mp.to_path_buf());
        let mark = self.dev_root.replayed_mark(id);
        let learned = Arc::clone(&self.learned);
        let spawned = std::thread::Builder::new()
            .name("page-cache-warm".into())
            .spawn(move || {
                // After the trace replay: a warm running ahead of it reads
                // blocks the replay has not asked for yet, which the device
                // then fetches in the foreground, out of the working set's
                // order (docs/BENCHMARKS.md, issue 18). A worker that never
                // writes the mark (an older one) is waited for at most
                // WARM_AFTER_REPLAY_MAX.
                let restore = || {
                    if let Some((p, before)) = &ra {
                        let _ = std::fs::write(p, before);
                    }
                };
                let t = Instant::now();
                let list = match job {
                    WarmJob::List(list) => {
                        while !mark.exists() && t.elapsed() < WARM_AFTER_REPLAY_MAX {
                            if flag.load(Ordering::Relaxed) {
                                restore();
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Arc::new(list)
                    }
                    WarmJob::Learned(list) => list,
                    WarmJob::Learn(watch) => {
                        match watch.finish(&mp) {
                            Ok(opened) => {
                                let l = warm::opened_list(opened);
                                tracing::info!(
                                    device = %dev, files = l.files.len(), bytes = l.bytes(),
                                    ms = t.elapsed().as_millis() as u64,
                                    "page-cache warm list learned from the image's first container"
                                );
                                if !l.files.is_empty() && !flag.load(Ordering::Relaxed) {
                                    learned.locked().insert(dev, Arc::new(l));
                                }
                            }
                            Err(e) => tracing::warn!(device = %dev, error = %e, "learning a warm list failed"),
                        }
                        return;
                    }
                };
                let r = warm::warm(&mp, &list, &flag);
                restore();
                match r {
                    Ok(r) => tracing::info!(
                        device = %dev, files = r.files, bytes = r.bytes,
                        resident = r.resident, skipped = r.skipped,
                        stopped = r.stopped, ms = r.elapsed.as_millis() as u64,
                        waited_ms = (t.elapsed() - r.elapsed).as_millis() as u64,
                        "page cache warmed from the warm list"
                    ),
                    Err(e) => tracing::warn!(device = %dev, error = %e, "page-cache warm failed"),
                }
            });
        match spawned {
            Ok(thread) => {
                self.warmers
                    .locked()
                    .insert(id.to_string(), Warmer { stop, thread });
            }
            Err(e) => tracing::warn!(device = %id, error = %e, "cannot start the page-cache warm"),
        }
    }

    /// Stops the page-cache warm over device `id`, if one runs, and waits
    /// for it (at most the read in progress), so that it holds no file of
    /// the mount when the device goes.
    fn stop_warm(&self, id: &str) {
        let w = self.warmers.locked().remove(id);
        if let Some(w) = w {
            w.stop.store(true, Ordering::Relaxed);
            let _ = w.thread.join();
        }
    }

    fn detach(&self, dir: &Path) {
        let _g = self.attach_lock.locked();
        self.detach_locked(dir);
    }

    /// [`ObdLayers::detach`] with `attach_lock` held by the caller.
    fn detach_locked(&self, dir: &Path) {
        let id = Self::device_id(dir);
        self.forget_warm(&id);
        if !self.dev_root.device_dir(&id).exists() {
            return;
        }
        match self.devices.dispatch(Op::Detach { device: id.clone() }) {
            Ok(_) => tracing::info!(device = %id, "device detached"),
            Err(e) => tracing::warn!(device = %id, error = %e, "detach"),
        }
        self.report_devices();
    }

    /// Whether the device of `dir` was attached at pull and is still within
    /// its hold, waiting for its first container.
    fn held_for_a_container(&self, dir: &Path) -> bool {
        let Some(hold) = self.prefetch_hold else {
            return false;
        };
        let mark = dir.join("block").join(PREFETCH_MARK);
        let age = std::fs::metadata(&mark)
            .and_then(|m| m.modified())
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default());
        matches!(age, Ok(a) if a < hold)
    }

    /// Attaches (and mounts) the device of the committed image snapshot
    /// `dir` on a thread of its own: its worker starts replaying the
    /// recorded trace while the pull finishes. Skipped if the snapshot was
    /// removed (its mark deleted) before the attach could start.
    fn attach_at_pull(self: &Arc<Self>, dir: &Path) {
        let mark = dir.join("block").join(PREFETCH_MARK);
        if let Err(e) = std::fs::write(&mark, b"") {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot mark a device for attach at pull");
            return;
        }
        let (me, dir) = (Arc::clone(self), dir.to_path_buf());
        let spawned = std::thread::Builder::new()
            .name("attach-at-pull".into())
            .spawn(move || {
                let _g = me.attach_lock.locked();
                if !dir.join("block").join(PREFETCH_MARK).exists() {
                    return;
                }
                match me.ensure_device_locked(&dir, &config_path(&dir), true) {
                    Ok(dev) => tracing::info!(dir = %dir.display(), node = %dev.display(), "device attached at pull: the trace prefetch runs before the container starts"),
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "attach at pull failed; the container's start will attach"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the attach at pull");
        }
    }

    /// A container or view uses the device of `obd_dir`: it is no longer
    /// held for one, nor idle.
    fn claimed(&self, obd_dir: &Path) {
        for m in [PREFETCH_MARK, IDLE_MARK] {
            let mark = obd_dir.join("block").join(m);
            if mark.exists() {
                let _ = std::fs::remove_file(mark);
            }
        }
    }

    /// Whether the device of `dir`, which no container uses, is kept for
    /// now: for `device_idle` from the first sweep that found it unused
    /// (which marks it). False when the mark cannot be written (a full
    /// disk): the device is then released at once.
    fn idle_held(&self, dir: &Path) -> bool {
        if self.device_idle.is_zero() {
            return false;
        }
        let mark = dir.join("block").join(IDLE_MARK);
        match std::fs::metadata(&mark).and_then(|m| m.modified()) {
            Ok(t) => SystemTime::now().duration_since(t).unwrap_or_default() < self.device_idle,
            Err(_) => dir.join("block").is_dir() && std::fs::write(&mark, b"").is_ok(),
        }
    }

    /// The private writable device config of an active snapshot `dir` over
    /// the image of `obd_dir`.
    fn writable_config(&self, dir: &Path, obd_dir: &Path) -> Result<PathBuf> {
        let p = config_path(dir);
        if p.is_file() {
            return Ok(p);
        }
        let mut cfg = load(obd_dir)?;
        let block = dir.join("block");
        cfg.upper = Upper {
            index: block.join("writable_index").to_string_lossy().into_owned(),
            data: block.join("writable_data").to_string_lossy().into_owned(),
            ..Default::default()
        };
        cfg.result_file = block.join("init-debug.log").to_string_lossy().into_owned();
        save(&p, &cfg)?;
        Ok(p)
    }
}

impl ObdInner {
    /// Commit of a dir/dev snapshot: detach its private device, seal the
    /// writable layer into `fs/overlaybd.sealed` and make it the top lower
    /// of the committed snapshot's config (integration.md §3.2).
    fn seal_writable(&self, dir: &Path) -> Result<()> {
        let block = dir.join("block");
        let (data, index) = (block.join("writable_data"), block.join("writable_index"));
        // The sealed layer goes on top: a trace no longer describes the stack.
        let mut cfg = load(dir)?.without_trace();
        self.detach(dir);
        let w = overlaybd_core::lsmt::writable::WritableLayer::open(&data, &index)
            .map_err(|e| Error::Device(format!("{}: {e}", data.display())))?;
        w.seal()
            .map_err(|e| Error::Device(format!("sealing {}: {e}", data.display())))?;
        let sealed = dir.join("fs").join("overlaybd.sealed");
        std::fs::rename(&data, &sealed).map_err(|e| Error::io("rename", &data, e))?;
        let _ = std::fs::remove_file(&index);
        cfg.upper = Upper::default();
        cfg.lowers.push(Lower {
            dir: s(&dir.join("fs")),
            ..Default::default()
        });
        cfg.result_file = s(&block.join("init-debug.log"));
        save(&config_path(dir), &cfg)?;
        tracing::info!(dir = %dir.display(), "writable device sealed into fs/overlaybd.sealed");
        Ok(())
    }
}

fn dev_err(e: obd_device::Error) -> Error {
    Error::Device(format!("device service: {e}"))
}

fn load(dir: &Path) -> Result<ImageConfig> {
    let p = config_path(dir);
    ImageConfig::load(&p).map_err(|e| Error::Device(format!("{}: {e}", p.display())))
}

fn save(p: &Path, cfg: &ImageConfig) -> Result<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io("mkdir", d, e))?;
    }
    cfg.save_atomic(p)
        .map_err(|e| Error::Device(format!("{}: {e}", p.display())))
}

/// The lower of a remote obd layer from its labels (a snapshot's) or
/// annotations (its manifest descriptor's): blob digest and size, and the
/// piece table the device's reads of it are checked against.
pub(crate) fn remote_lower(l: &BTreeMap<String, String>) -> std::result::Result<Lower, String> {
    let digest = l.get(LABEL_BLOB_DIGEST).cloned().unwrap_or_default();
    let size = l
        .get(LABEL_BLOB_SIZE)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("layer {digest}: label {LABEL_BLOB_SIZE} is not a number"))?;
    let verity =
        obd_remote::oci::verity_annotations(l).map_err(|e| format!("layer {digest}: {e}"))?;
    Ok(Lower {
        digest,
        size,
        verity,
        ..Default::default()
    })
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// How long an acceleration layer's Prepare waits for the fetch of its
/// files started at the manifest read, before containerd unpacks it.
const ACCEL_WAIT: Duration = Duration::from_secs(30);

/// Acceleration layers' files kept between Prepare and commit at most (a
/// Prepare whose commit never came leaves its entry).
const MAX_ACCEL_PENDING: usize = 16;

impl ObdLayers {
    /// An acceleration layer committed without containerd's download and
    /// unpack: its files, fetched ahead ([`OpenAhead::accel_layer`]), are
    /// written at its commit. `None` if `info` is not one; `Plain` if its
    /// files cannot be had (containerd then unpacks it as upstream does).
    ///
    /// [`OpenAhead::accel_layer`]: crate::ahead::OpenAhead::accel_layer
    fn accel_remote(&self, info: &PrepareInfo<'_>) -> Option<PrepareAction> {
        let a = AccelPrepare::of(info)?;
        let ahead = self.open_ahead.as_ref()?;
        let files = match ahead.accel_layer(a.image, a.digest, a.size, ACCEL_WAIT) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(digest = %a.digest, error = %e, "acceleration layer left to containerd's unpack");
                return Some(PrepareAction::Plain);
            }
        };
        {
            let mut pending = self.accel_files.locked();
            if pending.len() >= MAX_ACCEL_PENDING {
                pending.clear();
            }
            pending.insert(a.target.to_string(), files);
        }
        let mut labels = info.labels.clone();
        labels.insert(LABEL_REMOTE.to_string(), REMOTE_VALUE.to_string());
        Some(PrepareAction::CommitRemote {
            target: a.target.to_string(),
            labels,
        })
    }
}

/// Writes an acceleration layer's files into `fs` (its snapshot's tree), as
/// containerd's unpack of its tar would.
fn write_accel_files(fs: &Path, files: &[AccelFile]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for f in files {
        let p = fs.join(&f.name);
        std::fs::write(&p, &f.body).map_err(|e| Error::io("write", &p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode))
            .map_err(|e| Error::io("chmod", &p, e))?;
    }
    Ok(())
}

impl LayerHook for ObdLayers {
    fn classify(&self, info: &PrepareInfo<'_>) -> PrepareAction {
        if !self.lazy_pull {
            return PrepareAction::Plain;
        }
        if let Some(action) = self.accel_remote(info) {
            return action;
        }
        let action = classify_overlaybd(info);
        // A remote layer of an image being pulled: with the prefetch at
        // pull, its working set (if it has one) starts flowing now.
        if let (PrepareAction::CommitRemote { .. }, Some(ahead)) = (&action, &self.open_ahead) {
            let l = info.labels;
            if let Some(image) = l
                .get(LABEL_IMAGE_REF)
                .or_else(|| l.get(LABEL_CRI_IMAGE_REF))
            {
                ahead.image(image, self.prefetch_hold.is_some());
            }
        }
        action
    }

    fn committed(&self, c: &CommitInfo<'_>) -> Result<()> {
        let l = c.labels;
        let parent_cfg = match c.parent_dir {
            Some(p) if is_obd(p) => Some(load(p)?),
            _ => None,
        };
        let fs = c.dir.join("fs");
        let local = fs.join(COMMIT_FILE);
        if c.dir.join("block").join("writable_data").is_file() {
            return self.seal_writable(c.dir);
        }
        let accel = l.get(crate::layer::LABEL_ACCEL_LAYER).map(String::as_str) == Some("yes");
        if accel && l.contains_key(LABEL_REMOTE) {
            // Committed without containerd's unpack: write what it would have.
            let files = l
                .get(LABEL_TARGET_REF)
                .and_then(|t| self.accel_files.locked().remove(t));
            match files {
                Some(files) => {
                    write_accel_files(&fs, &files)?;
                    tracing::info!(dir = %c.dir.display(), files = files.len(), "acceleration layer unpacked by the snapshotter, without containerd's download");
                }
                None => {
                    tracing::warn!(dir = %c.dir.display(), "acceleration layer committed without its files")
                }
            }
        }
        if accel {
            // The acceleration (trace) layer: its `fs/trace` is replayed when
            // the image's device opens, and it is not part of the block stack.
            let Some(mut cfg) = parent_cfg else {
                tracing::warn!(dir = %c.dir.display(), "acceleration layer over no obd layer: ignored");
                return Ok(());
            };
            if !fs.join("trace").is_file() {
                tracing::warn!(dir = %c.dir.display(), "acceleration layer without a trace file: ignored");
                return Ok(());
            }
            cfg.lowers.push(Lower {
                dir: s(&fs),
                digest: l.get(LABEL_BLOB_DIGEST).cloned().unwrap_or_default(),
                ..Default::default()
            });
            cfg.acceleration_layer = true;
            cfg.result_file = s(&c.dir.join("block").join("init-debug.log"));
            save(&config_path(c.dir), &cfg)?;
            let _ = std::fs::create_dir_all(c.dir.join("block").join("mountpoint"));
            tracing::info!(dir = %c.dir.display(), "acceleration layer: its trace is replayed at attach");
            if self.prefetch_hold.is_some() && self.rw_mode == RwMode::Overlayfs {
                self.inner.attach_at_pull(c.dir);
            }
            return Ok(());
        }
        let lower = if l.contains_key(LABEL_REMOTE) {
            Lower {
                dir: s(&fs),
                ..remote_lower(l).map_err(Error::InvalidArgument)?
            }
        } else if local.is_file() && looks_like_layer(&local) {
            if c.parent_dir.is_some() && parent_cfg.is_none() {
                tracing::warn!(dir = %c.dir.display(), "obd layer over a plain OCI layer: kept as a plain layer");
                return Ok(());
            }
            tracing::warn!(
                dir = %c.dir.display(),
                digest = l.get(LABEL_BLOB_DIGEST).map(String::as_str).unwrap_or(""),
                "obd layer was downloaded in full (no image-ref label: plain pull?); serving it from the local tar-wrapped copy. For lazy pulls use `obd pull`, and with CRI set disable_snapshot_annotations = false (docs/TROUBLESHOOTING.md)"
            );
            crate::metrics::global().fallback("downloaded");
            Lower {
                dir: s(&fs),
                digest: l.get(LABEL_BLOB_DIGEST).cloned().unwrap_or_default(),
                size: l
                    .get(LABEL_BLOB_SIZE)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                ..Default::default()
            }
        } else {
            return Ok(());
        };
        // A layer above an acceleration layer: the trace no longer describes
        // this image; drop it from the stack.
        let mut cfg = parent_cfg.unwrap_or_default().without_trace();
        if let Some(r) = l
            .get(LABEL_IMAGE_REF)
            .or_else(|| l.get(LABEL_CRI_IMAGE_REF))
        {
            cfg.repo_blob_url = repo_blob_url(r)?;
        }
        cfg.lowers.push(lower);
        if cfg.lowers.len() > overlaybd_core::config::MAX_LAYERS {
            return Err(Error::FailedPrecondition(format!(
                "image has more than {} obd layers",
                overlaybd_core::config::MAX_LAYERS
            )));
        }
        cfg.upper = Upper::default();
        cfg.result_file = s(&c.dir.join("block").join("init-debug.log"));
        save(&config_path(c.dir), &cfg)?;
        let _ = std::fs::create_dir_all(c.dir.join("block").join("mountpoint"));
        if let (Some(ahead), true, Some(top)) = (
            &self.open_ahead,
            l.contains_key(LABEL_REMOTE),
            cfg.lowers.last(),
        ) {
            ahead.open(&cfg.repo_blob_url, top);
        }
        Ok(())
    }

    fn mounts(&self, info: &MountInfo<'_>) -> Result<Option<Vec<Mount>>> {
        if info.kind == Kind::Active
            && info
                .labels
                .get(crate::layer::LABEL_ACCEL_LAYER)
                .map(String::as_str)
                == Some("yes")
        {
            // Unpacking the acceleration layer: its tar holds only `trace`.
            return Ok(Some(vec![Mount {
                r#type: "bind".into(),
                source: s(&info.dir.join("fs")),
                target: String::new(),
                options: vec!["rw".into(), "rbind".into()],
            }]));
        }
        let Some(k) = info.parents.iter().position(|(d, _)| is_obd(d)) else {
            return Ok(None);
        };
        let obd_dir = &info.parents[k].0;
        let mode = match info.labels.get(LABEL_WRITABLE).map(String::as_str) {
            Some("dir") => RwMode::Dir,
            Some("dev") => RwMode::Dev,
            _ => self.rw_mode,
        };
        if info.kind == Kind::Active && mode != RwMode::Overlayfs && k == 0 {
            let cfg = self.writable_config(&info.dir, obd_dir)?;
            let mount = mode == RwMode::Dir;
            let dev = self.ensure_device(&info.dir, &cfg, mount)?;
            let m = if mount {
                Mount {
                    r#type: "bind".into(),
                    source: s(&info.dir.join("block").join("mountpoint")),
                    target: String::new(),
                    options: vec!["rw".into(), "rbind".into()],
                }
            } else {
                Mount {
                    r#type: "ext4".into(),
                    source: s(&dev),
                    target: String::new(),
                    options: vec!["rw".into(), "discard".into()],
                }
            };
            return Ok(Some(vec![m]));
        }
        let record = (info.labels.get(LABEL_RECORD_TRACE).map(String::as_str) == Some("yes"))
            .then(|| info.labels.get(LABEL_RECORD_TRACE_PATH))
            .flatten();
        if let (Some(trace), Kind::Active, 0) = (record, info.kind, k) {
            // Recording: a private read-only device of the image for this
            // rootfs, with `recordTracePath`; the trace is written when the
            // snapshot is removed (the device goes).
            let p = config_path(&info.dir);
            if !p.is_file() {
                let mut cfg = load(obd_dir)?.without_trace();
                cfg.record_trace_path = trace.clone();
                cfg.result_file = s(&info.dir.join("block").join("init-debug.log"));
                save(&p, &cfg)?;
            }
            self.ensure_device(&info.dir, &p, true)?;
            let mp = info.dir.join("block").join("mountpoint");
            let mut options = Vec::new();
            if Path::new("/sys/module/overlay/parameters/index").exists() {
                options.push("index=off".to_string());
            }
            options.push(format!("workdir={}", info.dir.join("work").display()));
            options.push(format!("upperdir={}", info.dir.join("fs").display()));
            options.push(format!("lowerdir={}", mp.display()));
            return Ok(Some(vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options,
            }]));
        }
        if info.kind == Kind::Active && mode != RwMode::Overlayfs {
            tracing::warn!(dir = %info.dir.display(), "plain layers above the obd image: rw_mode overlayfs used");
        }
        let dev = self.ensure_device(obd_dir, &config_path(obd_dir), true)?;
        self.claimed(obd_dir);
        self.container_mounts(obd_dir, &info.dir, &dev);
        let mp = obd_dir.join("block").join("mountpoint");
        let mut lowers: Vec<String> = info.parents[..k]
            .iter()
            .map(|(d, _)| s(&d.join("fs")))
            .collect();
        lowers.push(s(&mp));
        if info.kind != Kind::Active && lowers.len() == 1 {
            return Ok(Some(vec![Mount {
                r#type: "bind".into(),
                source: s(&mp),
                target: String::new(),
                options: vec!["ro".into(), "rbind".into()],
            }]));
        }
        let mut options = Vec::new();
        if Path::new("/sys/module/overlay/parameters/index").exists() {
            options.push("index=off".to_string());
        }
        if info.kind == Kind::Active {
            options.push(format!("workdir={}", info.dir.join("work").display()));
            options.push(format!("upperdir={}", info.dir.join("fs").display()));
        }
        options.push(format!("lowerdir={}", lowers.join(":")));
        Ok(Some(vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]))
    }

    fn removed(&self, dir: &Path, _labels: &BTreeMap<String, String>) -> Result<()> {
        // First the mark: an attach at pull not yet started then skips.
        self.claimed(dir);
        self.detach(dir);
        Ok(())
    }

    fn sweep(&self, in_use: &dyn Fn() -> Result<HashSet<PathBuf>>) -> Result<()> {
        // Under the attach lock: a Prepare cannot hand out a device between
        // the in-use check and its detach (its attach waits, then finds the
        // device gone and attaches it again).
        let _g = self.attach_lock.locked();
        let in_use = in_use()?;
        let ids = self.dev_root.ids().map_err(dev_err)?;
        for id in ids {
            let Some(n) = id.strip_prefix('s') else {
                continue;
            };
            let dir = self.root.join("snapshots").join(n);
            if !in_use.contains(&dir) && !self.held_for_a_container(&dir) && !self.idle_held(&dir) {
                tracing::info!(device = %id, "no snapshot uses this device any more");
                self.detach_locked(&dir);
            }
        }
        self.collect_cache();
        Ok(())
    }
}

impl ObdInner {
    /// The host-wide block cache, opened once.
    fn host_cache(&self) -> Option<&(Arc<BlockCache>, Duration)> {
        self.host_cache
            .get_or_init(|| {
                let open = || -> std::result::Result<_, String> {
                    let cfg = self.dev_root.load_service_config()
                        .map_err(|e| e.to_string())?;
                    let dir = self.root.join("cache");
                    let cache = BlockCache::open(cfg.cache.options(&dir))
                        .map_err(|e| e.to_string())?;
                    Ok((cache, cfg.cache.grace()))
                };
                match open() {
                    Ok(c) => {
                        crate::metrics::global().watch_cache(Arc::clone(&c.0));
                        Some(c)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open the block cache; it is not collected");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Removes cached blobs that no snapshot's config names and no process
    /// uses: after the grace period, at once when the cache is over budget.
    fn collect_cache(&self) {
        let Some((cache, grace)) = self.host_cache() else {
            return;
        };
        let keep = referenced_blobs(&self.root);
        let grace = if cache.usage() > cache.budget() {
            Duration::ZERO
        } else {
            *grace
        };
        match cache.gc(&|d| keep.contains(d), grace) {
            Ok(r) if !r.removed.is_empty() => {
                tracing::info!(
                    blobs = r.removed.len(),
                    bytes = r.bytes,
                    "block cache: collected unused blobs"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "block cache collection"),
        }
    }
}

/// Digests of every remote lower named by the config of a snapshot under
/// the snapshotter root `root` (what the block cache must keep).
pub fn referenced_blobs(root: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    let Ok(rd) = std::fs::read_dir(root.join("snapshots")) else {
        return out;
    };
    for e in rd.flatten() {
        if let Ok(cfg) = ImageConfig::load(config_path(&e.path())) {
            out.extend(cfg.lowers.into_iter().map(|l| l.digest));
        }
    }
    out
}

/// The hidden `device-worker --root R --id I` mode of `obd-snapshotter`: the
/// process that serves one device. Returns its exit code when `args` (without
/// the program name) ask for it, `None` otherwise.
pub fn device_worker_main(args: &[String]) -> Option<i32> {
    if args.first().map(String::as_str) != Some("device-worker") {
        return None;
    }
    // Its stderr is the device's `worker.log`. This runs before anything else
    // could install a subscriber, so init cannot fail but on a bad RUST_LOG.
    let _ = crate::logging::init("info", crate::config::LogFormat::Text);
    let (mut root, mut id) = (None, None);
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--root" => root = it.next().cloned(),
            "--id" => id = it.next().cloned(),
            _ => {}
        }
    }
    match (root, id) {
        (Some(r), Some(i)) => Some(obd_device::worker::run(&Root::new(r), &i)),
        _ => {
            tracing::error!("usage: obd-snapshotter device-worker --root DIR --id ID");
            Some(2)
        }
    }
}

/// The worker command of this executable (`<exe> device-worker`).
pub fn worker_command() -> std::io::Result<Vec<String>> {
    let exe = std::env::current_exe()?;
    Ok(vec![
        exe.to_string_lossy().into_owned(),
        "device-worker".into(),
    ])
}
