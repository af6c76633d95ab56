//! The worker: one process per device. It opens the image, attaches it through
//! its frontend, mounts it if asked, reports `ok <device>` or `failed:<reason>`
//! on stdout (and in the config's `resultFile`), then serves the device until
//! SIGTERM, SIGINT or SIGHUP, when it unmounts, detaches, flushes and removes
//! its state. SIGUSR1 asks it to hand the device over instead: it makes every
//! completed write durable and exits with [`HANDOVER_EXIT`], leaving the device
//! up for the successor its supervisor starts (an upgrade).
//!
//! Workers run in their own session, so the service can die and restart
//! (`kill -9` included) while containers keep reading their devices. A worker
//! started with [`KEPT_FD_ENV`] resumes a device whose previous worker died:
//! the descriptor the supervisor kept ([`tcmu_target::Attachment::kept_fd`]) is
//! handed to [`tcmu_target::Frontend::resume`].

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use overlaybd_core::source::LayerSource;
use overlaybd_core::ReadAt;

use crate::open::{open_image, Opened, TracePlan};
use crate::state::{pid_start, DeviceRecord, Root};
use crate::{mount, Error, Result};

/// The exit code of a worker that handed its device over (SIGUSR1): its
/// supervisor starts the successor at once.
pub const HANDOVER_EXIT: i32 = 75;

/// The environment variable naming the descriptor a resumed worker inherits:
/// the supervisor's copy of the dead worker's [`tcmu_target::Attachment::kept_fd`].
pub const KEPT_FD_ENV: &str = "OBD_DEVICE_KEPT_FD";

/// The signals [`wait_for_stop`] waits for: the stop signals and SIGUSR1
/// (hand over).
const WAITED: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1];

/// Blocks the stop signals (and SIGUSR1) in the calling thread (and so in
/// every thread it starts afterwards), so only [`wait_for_stop`] sees them.
/// Call first thing.
pub fn block_stop_signals() {
    // SAFETY: the sigset is initialised by sigemptyset before use, and
    // pthread_sigmask only reads it; no Rust state depends on the mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in WAITED {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for SIGTERM, SIGINT, SIGHUP or SIGUSR1 (blocked by
/// [`block_stop_signals`]).
pub fn wait_for_stop() -> i32 {
    // SAFETY: as above; sigwait writes the received signal into `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in WAITED {
            libc::sigaddset(&mut set, s);
        }
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}

/// The descriptor named by [`KEPT_FD_ENV`], taken over once.
fn inherited_kept_fd() -> Option<std::os::fd::OwnedFd> {
    let n: i32 = std::env::var(KEPT_FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(KEPT_FD_ENV);
    // The number must name an open descriptor (F_GETFD succeeds).
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
    if n < 3 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        tracing::warn!("{KEPT_FD_ENV}={n} names no open descriptor; attaching anew");
        return None;
    }
    // SAFETY: the supervisor opened `n` for this process and nothing else in
    // it owns the descriptor; the variable is removed so it is taken once.
    Some(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) })
}

fn write_result(cfg_dir: Option<&Path>, result_file: &str, text: &str) {
    if result_file.is_empty() {
        return;
    }
    let p = overlaybd_core::config::resolve(cfg_dir, result_file);
    if let Err(e) = std::fs::write(&p, text) {
        tracing::warn!("cannot write resultFile {}: {e}", p.display());
    }
}

/// The registry source of a device; `traced`: its image has a trace
/// ([`obd_remote::service::ServiceConfig::for_traced_image`]).
#[cfg(feature = "registry")]
fn registry_source(root: &Root, traced: bool) -> Result<Option<Box<dyn LayerSource>>> {
    let mut cfg = root.load_service_config()?;
    if traced {
        cfg = cfg.for_traced_image();
    }
    let src = obd_remote::service::RegistrySource::new(&cfg).map_err(|source| Error::Image {
        config: root.service_config(),
        source,
    })?;
    // Its foreground fetches are a container's reads: the host's
    // prefetches (the snapshotter's working set) wait for them.
    Ok(Some(Box::new(src.serving_containers())))
}

/// The `[prefetch]` settings of the service config, as replay options
/// (defaults if there is no config or it does not parse: prefetch is advice).
/// Over remote layers the replay only advises: the advice fills the block
/// cache, and reading it back would decode it once more for nothing.
#[cfg(feature = "registry")]
fn replay_options(root: &Root, remote: bool) -> trace_replay::ReplayOptions {
    use obd_remote::service::{PrefetchOrder, ServiceConfig};
    let p = root.service_config();
    let pf = match p.exists() {
        true => ServiceConfig::load(&p)
            .map(|c| c.prefetch)
            .unwrap_or_default(),
        false => Default::default(),
    };
    trace_replay::ReplayOptions {
        concurrency: pf.concurrency,
        max_request: pf.max_request,
        order: match pf.order {
            PrefetchOrder::Recorded => trace_replay::Order::Recorded,
            PrefetchOrder::Offset => trace_replay::Order::Offset,
        },
        merge_gap: pf.merge_gap,
        read: !remote,
    }
}

#[cfg(not(feature = "registry"))]
fn replay_options(_root: &Root, _remote: bool) -> trace_replay::ReplayOptions {
    trace_replay::ReplayOptions::default()
}

#[cfg(not(feature = "registry"))]
fn registry_source(_root: &Root, _traced: bool) -> Result<Option<Box<dyn LayerSource>>> {
    Ok(None)
}

/// Readahead of a device whose image keeps `local` (cached, total) bytes of
/// its remote layers (`None`: all layers are local files).
///
/// Until the image has started on this host, readahead that the start does
/// not use is fetched over the network: [`LAZY_READ_AHEAD_KB`] keeps that
/// down. Once at least
/// [`LOCAL_SHARE_PERCENT`] of the layers' bytes are cached (a device
/// attached again for an image that started here before), the frontend's
/// default applies, as large as a local disk's, so that the same start
/// blocks on as few page faults as it does on overlayfs (docs/BENCHMARKS.md,
/// issue 18, "device read path"). The value is chosen at attach; for a
/// device kept for the image's later containers (the snapshotter's
/// `device_idle_secs`) the snapshotter applies the same rule at their mount.
pub fn read_ahead_kb(local: Option<(u64, u64)>) -> Option<u32> {
    match local {
        Some((cached, total))
            if cached.saturating_mul(100) < total.saturating_mul(LOCAL_SHARE_PERCENT) =>
        {
            Some(LAZY_READ_AHEAD_KB)
        }
        _ => None,
    }
}

/// Readahead in KiB of a device whose image is mostly not on this host:
/// 512, a fifth of the kernel's own choice for the FUSE loop device (2560).
/// Java's lazy start fetched 29.0 MiB with it against 33.5 MiB, 2.95 s
/// against 3.44 s at 100 Mbit/s, and the same at 1 Gbit/s
/// (docs/BENCHMARKS.md, issue 18, "A lazy start's readahead").
pub const LAZY_READ_AHEAD_KB: u32 = 512;
/// Readahead in KiB of a device whose image is mostly on this host (the
/// FUSE frontend's default, as large as a local disk's).
pub const LOCAL_READ_AHEAD_KB: u32 = tcmu_target::fuse::DEFAULT_READ_AHEAD_KB;
/// Cached share (percent of the remote layers' bytes) from which a device
/// reads ahead as over a local disk.
pub const LOCAL_SHARE_PERCENT: u64 = 25;

/// Milliseconds each step of a bring-up took, for its log line (where the
/// time between an image's pull and its container's mount goes).
struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, u128)>,
}

impl Phases {
    fn start() -> Self {
        Phases {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    /// Ends step `name` now.
    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done
            .push((name, now.duration_since(self.last).as_millis()));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, ms)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={ms}ms")?;
        }
        Ok(())
    }
}

/// What a worker brought up.
struct Up {
    attachment: Box<dyn tcmu_target::Attachment>,
    backend: Arc<crate::backend::ImageBackend>,
    record: DeviceRecord,
    _remote: Option<Box<dyn LayerSource>>,
}

fn bring_up(root: &Root, id: &str, kept: Option<std::os::fd::OwnedFd>) -> Result<(Up, Opened2)> {
    let mut phases = Phases::start();
    let req = root.request(id)?;
    let cfg =
        overlaybd_core::config::ImageConfig::load(&req.config).map_err(|source| Error::Image {
            config: req.config.clone(),
            source,
        })?;
    let base = req.config.parent();
    let remote = if cfg.all_local(base) {
        None
    } else {
        registry_source(root, cfg.acceleration_layer)?
    };
    phases.mark("source");
    let Opened {
        backend,
        config,
        fresh_upper,
        trace,
    } = open_image(&req.config, remote.as_deref())?;
    phases.mark("open");
    // A recording reads ahead as the starts that follow its trace will
    // (whatever this host has cached), so that the working set packed from
    // it holds what they read and little more.
    let read_ahead = match trace {
        crate::open::TracePlan::Record(_) => Some(trace_replay::pack::TRACED_READ_AHEAD_KB),
        _ => read_ahead_kb(remote.as_deref().and_then(|r| r.local_bytes())),
    };
    let backend = Arc::new(backend.with_read_ahead_kb(read_ahead));
    // A recorded trace needs only the image: replay it now, so the prefetch
    // overlaps the attach and the mount (whose reads go first anyway). Stopped
    // if the bring-up fails. A priority list needs the device; it waits.
    let replay = replay_options(root, remote.is_some());
    let done = root.replayed_mark(id);
    let _ = std::fs::remove_file(&done);
    let (trace, mut early) = match trace {
        TracePlan::Replay { path, trace } => {
            let run = spawn_replay(id, path, backend.image().clone(), replay, done, move |_| {
                Ok(trace)
            });
            (TracePlan::None, EarlyReplay(Some(run)))
        }
        other => (other, EarlyReplay(None)),
    };
    let fe = crate::frontend(&req.frontend)?;
    let work = root.work_dir(id);
    // Not create_dir_all: if a reconcile removed the device's directory
    // while this worker started (its snapshotter was killed mid-attach),
    // the worker must fail here, not recreate a directory no one will
    // clean up.
    match std::fs::create_dir(&work) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", work.display()), e)),
    }
    let read_only = tcmu_target::BlockBackend::read_only(&*backend);
    let attachment = match kept {
        Some(fd) => fe.resume(backend.clone(), id, &work, fd),
        None => fe.attach(backend.clone(), id, &work),
    }
    .map_err(|source| Error::Frontend {
        frontend: req.frontend.clone(),
        source,
    })?;
    phases.mark("attach");
    let device = attachment.device_path().to_owned();
    // A record left by a predecessor that died means this is a takeover (the
    // frontend kept the device alive): its filesystem is made and maybe mounted.
    let prev = root.record(id).ok().flatten();
    let mut mounted = prev.as_ref().is_some_and(|p| p.mounted);
    let r = (|| -> Result<()> {
        if prev.is_none() && fresh_upper && config.lowers.is_empty() {
            mount::mkfs_ext4(&device)?;
        }
        if let Some(mp) = &req.mountpoint {
            if !mount::is_mounted(mp) {
                let fs = mount::detect_fs(&device)?;
                mount::mount(&device, mp, fs, read_only)?;
                mounted = true;
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        let _ = attachment.detach();
        return Err(e);
    }
    phases.mark("mount");
    tracing::info!(device = %id, phases = %phases, "obd device worker: brought up");
    let me = std::process::id();
    let record = DeviceRecord {
        id: id.to_string(),
        request: req,
        device,
        read_only,
        size: tcmu_target::BlockBackend::size(&*backend),
        pid: me,
        pid_start: pid_start(me).unwrap_or(0),
        mounted,
        kept_fd: attachment.kept_fd(),
    };
    Ok((
        Up {
            attachment,
            backend,
            record,
            _remote: remote,
        },
        Opened2 {
            config,
            trace,
            replay,
            early: early.0.take(),
        },
    ))
}

struct Opened2 {
    config: overlaybd_core::config::ImageConfig,
    trace: TracePlan,
    /// How to replay it.
    replay: trace_replay::ReplayOptions,
    /// A replay already running (started before the attach).
    early: Option<TraceRun>,
}

/// A replay started during bring-up; stopped and joined when dropped, unless
/// taken (the bring-up succeeded).
struct EarlyReplay(Option<TraceRun>);

impl Drop for EarlyReplay {
    fn drop(&mut self) {
        if let Some(TraceRun::Replay { stop, handle }) = self.0.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

/// The trace work running beside a served device.
enum TraceRun {
    None,
    /// Recording; the watcher finishes the trace when the lock is deleted.
    Record {
        rec: Arc<trace_replay::Recorder>,
        watch: trace_replay::RecorderWatch,
    },
    /// A replay thread, stopped through the flag when the device goes.
    Replay {
        stop: Arc<AtomicBool>,
        handle: std::thread::JoinHandle<()>,
    },
}

/// Starts what `plan` asks for, once `device` (serving `backend`) is up.
fn start_trace(
    id: &str,
    (opts, done): (trace_replay::ReplayOptions, std::path::PathBuf),
    plan: TracePlan,
    backend: &Arc<crate::backend::ImageBackend>,
    device: &Path,
) -> TraceRun {
    let image = backend.image().clone();
    match plan {
        TracePlan::None => TraceRun::None,
        TracePlan::Record(rec) => {
            tracing::info!(
                "obd device worker {id}: recording reads into {}; delete {} to stop",
                rec.path().display(),
                rec.lock_path().display()
            );
            let watch = rec.watch(trace_replay::recorder::POLL_INTERVAL);
            TraceRun::Record { rec, watch }
        }
        TracePlan::Replay { path, trace } => {
            spawn_replay(id, path, image, opts, done, move |_| Ok(trace))
        }
        TracePlan::PriorityList { path, entries } => {
            let device = device.to_owned();
            spawn_replay(id, path, image, opts, done, move |image| {
                priority_trace(image, &device, &entries)
            })
        }
    }
}

/// The trace a priority list stands for: its files' blocks on the device's
/// ext4, as lower-layer ranges.
fn priority_trace(
    image: &overlaybd_core::image::Image,
    device: &Path,
    entries: &[trace_replay::PriorityEntry],
) -> std::result::Result<trace_replay::Trace, String> {
    use trace_replay::priority::{device_ranges_to_trace, ext4_block_size, ext4_ranges};
    let bs = ext4_block_size(image)
        .ok_or("the image holds no ext4; priority lists are supported on ext4 only")?;
    let ranges = ext4_ranges(device, bs, entries).map_err(|e| e.to_string())?;
    Ok(device_ranges_to_trace(
        image.index(),
        image.layers().len(),
        &ranges,
    ))
}

/// Replays, in a background thread, the trace `make` builds for `image`;
/// `path` names the trace (or list) file in the log. Writes `done`
/// ([`Root::replayed_mark`]) when the replay has ended, however it ended.
fn spawn_replay(
    id: &str,
    path: std::path::PathBuf,
    image: Arc<overlaybd_core::image::Image>,
    opts: trace_replay::ReplayOptions,
    done: std::path::PathBuf,
    make: impl FnOnce(&overlaybd_core::image::Image) -> std::result::Result<trace_replay::Trace, String>
        + Send
        + 'static,
) -> TraceRun {
    let stop = Arc::new(AtomicBool::new(false));
    let (id2, stop2) = (id.to_string(), stop.clone());
    let spawned = std::thread::Builder::new()
        .name("trace-replay".into())
        .spawn(move || {
            let outcome = match make(&image) {
                Ok(trace) => {
                    let readers = image.layer_readers();
                    let layers: Vec<&dyn ReadAt> =
                        readers.iter().map(|b| &**b as &dyn ReadAt).collect();
                    let report = trace_replay::replay(&trace, &layers, &opts, &stop2);
                    tracing::info!(
                        "obd device worker {id2}: replayed {}: {report}",
                        path.display()
                    );
                    format!("{report}")
                }
                Err(e) => {
                    tracing::warn!(
                        "obd device worker {id2}: {}: not replayed: {e}",
                        path.display()
                    );
                    format!("not replayed: {e}")
                }
            };
            if let Err(e) = std::fs::write(&done, outcome) {
                tracing::warn!("obd device worker {id2}: {}: {e}", done.display());
            }
        });
    match spawned {
        Ok(handle) => TraceRun::Replay { stop, handle },
        Err(e) => {
            tracing::warn!("obd device worker {id}: cannot start the trace replay: {e}");
            TraceRun::None
        }
    }
}

/// Runs the worker of device `id` under `root` (the hidden `obd device worker`).
/// Returns the process exit code.
pub fn run(root: &Root, id: &str) -> i32 {
    block_stop_signals();
    // Own session: the service's death (or its terminal's) does not stop us.
    let _ = rustix::process::setsid();
    let req_cfg = root.request(id).ok().map(|r| r.config);
    let (up, opened) = match bring_up(root, id, inherited_kept_fd()) {
        Ok(v) => v,
        Err(e) => {
            let reason = e.to_string().replace('\n', " ");
            if let Some(c) = &req_cfg {
                if let Ok(cfg) = overlaybd_core::config::ImageConfig::load(c) {
                    write_result(c.parent(), &cfg.result_file, &format!("failed:{reason}"));
                }
            }
            tracing::error!("obd device worker {id}: {reason}");
            report(&format!("failed:{reason}"));
            return 1;
        }
    };
    if let Err(e) = root.save_record(&up.record) {
        tracing::warn!("obd device worker {id}: {e}");
    }
    let cfg_dir = up.record.request.config.parent().map(Path::to_owned);
    write_result(cfg_dir.as_deref(), &opened.config.result_file, "success");
    report(&format!("ok {}", up.record.device.display()));
    let _ = std::io::stdout().flush();
    release_stdout();
    let trace = match opened.early {
        Some(run) => run,
        None => start_trace(
            id,
            (opened.replay, root.replayed_mark(id)),
            opened.trace,
            &up.backend,
            &up.record.device,
        ),
    };
    let sig = wait_for_stop();
    if sig == libc::SIGUSR1 {
        hand_over(id, &up);
    }
    tracing::info!(
        "obd device worker {id}: signal {sig}, detaching {}",
        up.record.device.display()
    );
    // A replay still running is advice no one needs any more.
    let recording = match trace {
        TraceRun::Replay { stop, handle } => {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
            None
        }
        TraceRun::Record { rec, watch } => Some((rec, watch)),
        TraceRun::None => None,
    };
    let code = match tear_down(root, up) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("obd device worker {id}: teardown: {e}");
            1
        }
    };
    // The device is gone: that ends a recording too (after the last read).
    if let Some((rec, watch)) = recording {
        drop(watch);
        match rec.finish() {
            Ok(n) => tracing::info!(
                "obd device worker {id}: trace {} written: {n} records",
                rec.path().display()
            ),
            Err(e) => tracing::error!("obd device worker {id}: trace not written: {e}"),
        }
    }
    code
}

/// Leaves the device to a successor: makes every completed write durable,
/// then exits with [`HANDOVER_EXIT`] without tearing anything down. Requests
/// read but not answered by then are re-sent to the successor by the kernel.
fn hand_over(id: &str, up: &Up) -> ! {
    match tcmu_target::BlockBackend::flush(&*up.backend) {
        Ok(()) => {
            tracing::info!(
                "obd device worker {id}: handing {} over to a successor",
                up.record.device.display()
            );
            std::process::exit(HANDOVER_EXIT)
        }
        Err(e) => {
            // The successor would not see the writes the flush lost: crash
            // loudly instead (the supervisor restarts us the same way).
            tracing::error!("obd device worker {id}: flush before the handover failed: {e}");
            std::process::abort()
        }
    }
}

/// Points stdout at /dev/null, so the service's end of the pipe sees EOF and a
/// dead service cannot make our writes fail.
fn release_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: both descriptors are valid for the duration of the call; dup2
        // atomically replaces fd 1, which std's Stdout keeps using by number.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

fn tear_down(root: &Root, up: Up) -> Result<()> {
    let rec = &up.record;
    if rec.mounted {
        if let Some(mp) = &rec.request.mountpoint {
            if let Err(e) = mount::unmount(mp, false) {
                tracing::warn!("{e}; detaching it lazily");
                mount::unmount(mp, true)?;
            }
        }
    }
    tcmu_target::BlockBackend::flush(&*up.backend)
        .map_err(|e| Error::io(format!("flushing {}", rec.id), e))?;
    up.attachment.detach().map_err(|source| Error::Frontend {
        frontend: rec.request.frontend.clone(),
        source,
    })?;
    tcmu_target::BlockBackend::flush(&*up.backend)
        .map_err(|e| Error::io(format!("flushing {}", rec.id), e))?;
    let dir = root.device_dir(&rec.id);
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))
}

/// Tells the service how the attach went (one line on stdout). The service
/// may be gone by now (killed mid-attach): a closed pipe is not an error
/// for the device, so write failures are ignored instead of panicking.
fn report(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

#[cfg(test)]
mod read_ahead_tests {
    use super::*;

    #[test]
    fn lazy_until_a_quarter_is_cached() {
        assert_eq!(read_ahead_kb(None), None);
        assert_eq!(read_ahead_kb(Some((0, 0))), None);
        assert_eq!(read_ahead_kb(Some((0, 100))), Some(LAZY_READ_AHEAD_KB));
        assert_eq!(read_ahead_kb(Some((24, 100))), Some(LAZY_READ_AHEAD_KB));
        assert_eq!(read_ahead_kb(Some((25, 100))), None);
        assert_eq!(read_ahead_kb(Some((u64::MAX, u64::MAX))), None);
    }
}
