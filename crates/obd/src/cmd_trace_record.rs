//! `obd trace record <image> <new-image>`: records which blocks an obd image
//! reads while its entrypoint runs, and pushes the image again with the
//! trace as an acceleration layer (upstream's `ctr record-trace`; formats.md
//! §5 and §8.3, integration.md §10).
//!
//! 1. The image is pulled into containerd (remote snapshots, `obd pull`).
//! 2. An empty trace file is created and a rootfs is prepared through
//!    containerd's snapshots service with the `record-trace` labels: the
//!    snapshotter gives it a private device that records reads.
//! 3. The rootfs is mounted, the image's entrypoint/cmd runs in it with
//!    `ctr run --rootfs` for `--time` seconds (or until it exits), then it
//!    is stopped, unmounted and the snapshot removed: the device goes and
//!    the trace is finished (`<trace>.ok`).
//! 4. Unless `--no-pack`, the disk ranges the trace read are copied out of
//!    the image into one new layer, the **working set** (an ordinary obd
//!    layer whose bytes equal those below it, in disk order, compressed with
//!    `obd convert`'s defaults; `trace_replay::pack`), and the trace is
//!    rewritten to replay that layer front to back: its compressed blocks
//!    hold nothing the start did not read, so the prefetch fetches no
//!    neighbours and comes in a few large sequential requests. A working set
//!    from an earlier recording is replaced.
//! 5. The trace is wrapped in a one-file tar (`trace`, mode 0444, fixed
//!    headers) and pushed as a new top layer with the acceleration-layer
//!    annotations (and, unless `--no-verity`, its piece table as a blob
//!    named by the `verity.*` annotations); the config gets its diffID
//!    (= digest, uncompressed), and config and manifest are pushed under
//!    `<new-image>`. Pushed to another repository, the layers below are
//!    copied there with their piece tables.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use obd_device::open::trace_replay::accel::accel_layer_tar;
use obd_device::open::trace_replay::warm::{self, OpenWatch, Opened, WarmList};
use obd_device::open::trace_replay::Trace;
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::oci::{
    self, set_verity_annotations, verity_annotations, Config, Descriptor, History, Manifest,
    Platform, Resolved, Verity, ANN_ACCEL, ANN_BLOB_DIGEST, ANN_BLOB_SIZE, ANN_VERSION,
    ANN_WORKING_SET, MT_OCI_CONFIG, VERSION_NATIVE,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use snapshotter::proto::containerd::services::snapshots::v1 as snapshots;
use snapshotter::proto::containerd::types::Mount;
use snapshotter::pull::{pull_blocking, PullOptions, DEFAULT_ADDRESS, NAMESPACE_HEADER};

use crate::args::PlatformArgs;
use crate::cmd_image::RemoteArgs;

/// History `created_by` of the acceleration layer.
const CREATED_BY: &str = "obd trace record";
/// zstd level of the working-set layer. It is small and fetched whole at
/// every cold start, so it is worth more CPU than `obd convert`'s level 9:
/// the Python bench image's 22 MiB working set compresses (32 KiB blocks)
/// to 9.01 MB at level 9, 8.98 at 12, 8.49 at 15 and 8.40 at 19 (twice
/// level 15's time); readers decode every level alike.
const WORKING_SET_LEVEL: i32 = 15;
/// History `created_by` of the working-set layer.
const CREATED_BY_PACK: &str = "obd trace record (working set)";
/// How long to wait for `<trace>.ok` after the snapshot is removed.
const OK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped container gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Record a trace of an obd image's start and push it as a new image with an
/// acceleration layer (needs root, containerd and the obd snapshotter).
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// The obd image to record, `host[:port]/repo[:tag|@digest]`.
    pub image: String,
    /// Where to push the image with the acceleration layer.
    pub new_image: String,
    /// Seconds the container runs before it is stopped (it may exit
    /// sooner): SIGTERM to all its processes, SIGKILL 10 s later.
    #[arg(long, default_value_t = 60)]
    pub time: u64,
    /// Registry access (both images), and the block cache and service
    /// config the working set is read through (the host's cache by default:
    /// the recording run has just fetched it).
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Push the trace alone over the image's layers, as upstream's `ctr
    /// record-trace` does, without packing the working set into a layer.
    #[arg(long)]
    pub no_pack: bool,
    /// Leave the page-cache warm list (`obd-warm.json`: the file ranges the
    /// run had in the page cache) out of the acceleration layer. Without
    /// `--no-pack` it is recorded and pushed beside the trace, and the
    /// snapshotter reads it through the image's mount at attach.
    #[arg(long)]
    pub no_warm: bool,
    /// containerd's gRPC socket.
    #[arg(short, long, default_value = DEFAULT_ADDRESS)]
    pub address: PathBuf,
    /// containerd namespace.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// containerd snapshotter (the obd proxy plugin's name).
    #[arg(long, default_value = "obd")]
    pub snapshotter: String,
    /// Platform to pick from a multi-platform image (default: this machine's).
    #[command(flatten)]
    pub platform: PlatformArgs,
    /// Keep the trace here (default: a temporary directory, removed).
    #[arg(long)]
    pub trace_out: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Do not push a piece table for the acceleration layer (the layer
    /// annotations `…/overlaybd/verity.*`): upstream's output exactly.
    #[arg(long)]
    pub no_verity: bool,
}

/// A short random-enough token for snapshot keys and container ids.
fn token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let h = Sha256::digest(format!("{nanos} {}", std::process::id()).as_bytes());
    hex::encode(&h[..6])
}

/// The source image as stored in the registry.
struct Source {
    /// The platform manifest.
    manifest: Manifest,
    /// Its media type.
    media_type: String,
    /// The config.
    config: Config,
}

impl Source {
    fn new(r: Resolved) -> Self {
        Source {
            media_type: if r.manifest.media_type.is_empty() {
                r.manifest_doc.media_type
            } else {
                r.manifest.media_type.clone()
            },
            manifest: r.manifest,
            config: r.config,
        }
    }

    /// The config's media type (OCI when the manifest does not say).
    fn config_media_type(&self) -> &str {
        match self.manifest.config.media_type.as_str() {
            "" => MT_OCI_CONFIG,
            mt => mt,
        }
    }
}

/// Whether `l` is a working-set layer of an earlier `obd trace record`.
fn is_working_set(l: &Descriptor) -> bool {
    l.annotation(ANN_WORKING_SET) == Some("yes")
}

/// The source's data layers, the stack the trace was recorded on: all but
/// an acceleration layer on top.
fn data_layers(src: &Source) -> &[Descriptor] {
    let l = &src.manifest.layers;
    match l.last() {
        Some(top) if top.annotation(ANN_ACCEL) == Some("yes") => &l[..l.len() - 1],
        _ => l,
    }
}

/// The manifest and config with, on top, the working-set layer `packed`
/// (replacing one the source had) and the acceleration layer `(digest,
/// size)` (replacing one the source had), its piece table `verity` named in
/// its annotations. Returns (manifest, config).
fn with_accel_layer(
    src: &Source,
    packed: Option<&Descriptor>,
    (digest, size): (&str, u64),
    verity: Option<&Verity>,
) -> Result<(Manifest, Config)> {
    let mut m = src.manifest.clone();
    let mut c = src.config.clone();
    if m.layers.len() != c.rootfs.diff_ids.len() {
        bail!(
            "the manifest has {} layers but the config {} diff_ids",
            m.layers.len(),
            c.rootfs.diff_ids.len()
        );
    }
    let had_accel = m.layers.len() > data_layers(src).len();
    if had_accel {
        m.layers.pop();
        c.rootfs.diff_ids.pop();
    }
    let h = &mut c.history;
    if had_accel && h.last().and_then(|e| e.created_by.as_deref()) == Some(CREATED_BY) {
        h.pop();
    }
    let had_packed = m.layers.last().is_some_and(is_working_set);
    if had_packed && packed.is_some() {
        m.layers.pop();
        c.rootfs.diff_ids.pop();
        if h.last().and_then(|e| e.created_by.as_deref()) == Some(CREATED_BY_PACK) {
            h.pop();
        }
    }
    let media_type = m
        .layers
        .iter()
        .rev()
        .find(|l| l.annotation(ANN_BLOB_DIGEST).is_some())
        .map(|l| l.media_type.clone())
        .ok_or_else(|| {
            anyhow!("not an obd image: no layer has the {ANN_BLOB_DIGEST} annotation")
        })?;
    let history = |created_by: &str, comment: &str| History {
        created: Some("1970-01-01T00:00:00Z".into()),
        created_by: Some(created_by.into()),
        comment: Some(comment.into()),
        ..Default::default()
    };
    let keep_history = !c.history.is_empty();
    if let Some(p) = packed {
        m.layers.push(p.clone());
        c.rootfs.diff_ids.push(p.digest.clone());
        if keep_history {
            c.history.push(history(
                CREATED_BY_PACK,
                "overlaybd layer: the blocks the trace reads, packed",
            ));
        }
    }
    let mut accel = Descriptor::new(media_type, digest, size);
    accel.annotations = BTreeMap::from([
        (ANN_ACCEL.to_string(), "yes".to_string()),
        (ANN_VERSION.to_string(), VERSION_NATIVE.to_string()),
        (ANN_BLOB_DIGEST.to_string(), digest.to_string()),
        (ANN_BLOB_SIZE.to_string(), size.to_string()),
    ]);
    if let Some(v) = verity {
        set_verity_annotations(&mut accel.annotations, v);
    }
    m.layers.push(accel);
    c.rootfs.diff_ids.push(digest.to_string());
    if keep_history {
        c.history
            .push(history(CREATED_BY, "overlaybd acceleration layer (trace)"));
    }
    Ok((m, c))
}

/// The process of the image config: (args, env, cwd).
fn process_of(config: &Config) -> Result<(Vec<String>, Vec<String>, Option<String>)> {
    let p = config
        .process()
        .context("the image config's `config` is malformed")?;
    let mut args = p.entrypoint;
    args.extend(p.cmd);
    if args.is_empty() {
        bail!("the image config has neither Entrypoint nor Cmd: nothing to run");
    }
    let cwd = Some(p.working_dir).filter(|s| !s.is_empty());
    Ok((args, p.env, cwd))
}

/// containerd's snapshots service for one namespace.
struct Snapshots {
    rt: tokio::runtime::Runtime,
    client: snapshots::snapshots_client::SnapshotsClient<tonic::transport::Channel>,
    ns: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    snapshotter: String,
}

impl Snapshots {
    fn connect(address: &Path, ns: &str, snapshotter: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a tokio runtime")?;
        let path = address.to_path_buf();
        if !path.exists() {
            bail!("containerd socket {}: no such file", path.display());
        }
        let ch = rt
            .block_on(
                tonic::transport::Endpoint::try_from("http://containerd.invalid")?
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    })),
            )
            .with_context(|| format!("connecting to containerd at {}", address.display()))?;
        Ok(Snapshots {
            rt,
            client: snapshots::snapshots_client::SnapshotsClient::new(ch),
            ns: ns
                .parse()
                .map_err(|_| anyhow!("namespace `{ns}`: not a valid header value"))?,
            snapshotter: snapshotter.to_string(),
        })
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(NAMESPACE_HEADER, self.ns.clone());
        r
    }

    fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let r = self.req(snapshots::PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels,
        });
        let resp = self
            .rt
            .block_on(self.client.prepare(r))
            .map_err(|s| anyhow!("containerd snapshots.Prepare {key}: {s}"))?;
        Ok(resp.into_inner().mounts)
    }

    fn remove(&mut self, key: &str) -> Result<()> {
        let r = self.req(snapshots::RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        self.rt
            .block_on(self.client.remove(r))
            .map_err(|s| anyhow!("containerd snapshots.Remove {key}: {s}"))?;
        Ok(())
    }
}

/// The recording rootfs: snapshot, mount and container, torn down in order
/// on [`Recording::finish`] or (best effort) on drop.
struct Recording {
    snaps: Snapshots,
    key: String,
    rootfs: PathBuf,
    mounted: bool,
    prepared: bool,
    ctr: Vec<String>,
    id: String,
}

impl Recording {
    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.args(&self.ctr);
        c
    }

    fn mount(&mut self, mounts: &[Mount]) -> Result<()> {
        std::fs::create_dir_all(&self.rootfs)
            .with_context(|| format!("creating {}", self.rootfs.display()))?;
        for m in mounts {
            let mut c = Command::new("mount");
            c.arg("-t").arg(&m.r#type);
            if !m.options.is_empty() {
                c.arg("-o").arg(m.options.join(","));
            }
            c.arg(&m.source).arg(&self.rootfs);
            let out = c.output().with_context(|| format!("running {c:?}"))?;
            if !out.status.success() {
                bail!(
                    "{c:?} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            self.mounted = true;
        }
        Ok(())
    }

    /// Runs the process in the rootfs for at most `time`; its exit status
    /// (None when it was stopped).
    fn run(
        &self,
        args: &[String],
        env: &[String],
        cwd: Option<&str>,
        time: Duration,
    ) -> Result<Option<i32>> {
        let mut c = self.ctr();
        c.args(["run", "--rm", "--rootfs"]);
        for e in env {
            c.arg("--env").arg(e);
        }
        if let Some(w) = cwd {
            c.arg("--cwd").arg(w);
        }
        c.arg(&self.rootfs).arg(&self.id).args(args);
        // The container's output goes to our stderr; stdout stays the report.
        let err = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stderr")?;
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::from(err))
            .spawn()
            .with_context(|| format!("running {c:?}"))?;
        if let Some(st) = wait_child(&mut child, time)? {
            return Ok(Some(st.code().unwrap_or(-1)));
        }
        eprintln!(
            "obd trace record: {}s passed; stopping the container",
            time.as_secs()
        );
        for sig in ["SIGTERM", "SIGKILL"] {
            let _ = self
                .ctr()
                .args(["task", "kill", "--all", "--signal", sig, &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if wait_child(&mut child, STOP_GRACE)?.is_some() {
                return Ok(None);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(None)
    }

    fn unmount(&mut self) -> Result<()> {
        if self.mounted {
            obd_device::mount::unmount(&self.rootfs, false)
                .or_else(|_| obd_device::mount::unmount(&self.rootfs, true))
                .with_context(|| format!("unmounting {}", self.rootfs.display()))?;
            self.mounted = false;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.unmount()?;
        if self.prepared {
            self.snaps.remove(&self.key)?;
            self.prepared = false;
        }
        Ok(())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        for args in [
            vec!["task", "kill", "--all", "--signal", "SIGKILL", &self.id],
            vec!["task", "rm", "-f", &self.id],
            vec!["container", "rm", &self.id],
        ] {
            let _ = self
                .ctr()
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Err(e) = self.finish() {
            tracing::warn!("obd trace record: cleanup: {e:#}");
        }
    }
}

/// Waits for `child` until `timeout`; its status if it exited.
fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().context("waiting for ctr run")? {
            return Ok(Some(st));
        }
        if t0.elapsed() >= timeout {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls for `path` until `timeout`.
fn wait_for(path: &Path, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while !path.exists() {
        if t0.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn with_suffix(p: &Path, s: &str) -> PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    PathBuf::from(o)
}

/// Makes sure every layer blob of `layers`, and every piece table their
/// annotations name, is in `dst`'s repository, copying it from `src`
/// through `tmp` when it is not.
fn copy_layers(
    d: &Arc<Distribution>,
    src: &ImageRef,
    dst: &ImageRef,
    layers: &[Descriptor],
    tmp: &Path,
) -> Result<()> {
    if src.host == dst.host && src.repo == dst.repo {
        return Ok(());
    }
    let mut blobs = Vec::new();
    for l in layers {
        blobs.push((l.digest.clone(), l.size));
        if let Some(v) =
            verity_annotations(&l.annotations).map_err(|e| anyhow!("layer {}: {e}", l.digest))?
        {
            blobs.push((v.digest, v.size));
        }
    }
    for (digest, size) in &blobs {
        if d.blob_exists(dst, digest)?.is_some() {
            continue;
        }
        let p = tmp.join(digest.replace(':', "-"));
        let mut f =
            std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        std::io::copy(&mut d.open_blob(src, digest, *size)?, &mut f)
            .with_context(|| format!("copying blob {digest} from {src}"))?;
        d.push_blob(dst, digest, &p)
            .with_context(|| format!("pushing blob {digest} to {dst}"))?;
        let _ = std::fs::remove_file(&p);
    }
    Ok(())
}

/// The image's own filesystem under the recording rootfs: the last
/// `lowerdir` of an overlay mount, else the rootfs itself.
fn image_dir(mounts: &[Mount], rootfs: &Path) -> PathBuf {
    mounts
        .iter()
        .flat_map(|m| m.options.iter())
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .filter_map(|l| l.rsplit(':').next())
        .next()
        .map_or_else(|| rootfs.to_path_buf(), PathBuf::from)
}

/// What running the image left behind.
struct Recorded {
    /// The trace file's bytes.
    bytes: Vec<u8>,
    /// The trace, parsed.
    trace: Trace,
    /// Path of the trace file.
    path: PathBuf,
    /// The container's exit code (None: stopped).
    status: Option<i32>,
    /// How long it ran.
    ran: Duration,
    /// The files the run opened, for the page-cache warm list (None: not
    /// asked for, or not recordable).
    warm: Option<Vec<Opened>>,
}

/// Where the trace goes: `--trace-out` (its directory created), else `tmp`.
fn trace_path(a: &RecordArgs, tmp: &Path) -> Result<PathBuf> {
    let Some(p) = &a.trace_out else {
        return Ok(tmp.join("trace"));
    };
    if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Prepares a recording rootfs on top of `parent` (the image's top chainID),
/// runs the image's process in it, tears it down and waits for the trace.
fn record(a: &RecordArgs, tmp: &Path, parent: &str, config: &Config) -> Result<Recorded> {
    let (args, env, cwd) = process_of(config)?;
    let trace = trace_path(a, tmp)?;
    let ok = with_suffix(&trace, ".ok");
    let lock = with_suffix(&trace, ".lock");
    let _ = std::fs::remove_file(&ok);
    std::fs::write(&trace, b"").with_context(|| format!("creating {}", trace.display()))?;
    let t = token();
    let mut ctr = vec![
        "--address".to_string(),
        a.address.to_string_lossy().into_owned(),
    ];
    ctr.extend(["--namespace".to_string(), a.namespace.clone()]);
    let mut rec = Recording {
        snaps: Snapshots::connect(&a.address, &a.namespace, &a.snapshotter)?,
        key: format!("obd-record-{t}"),
        rootfs: tmp.join("rootfs"),
        mounted: false,
        prepared: false,
        ctr,
        id: format!("obd-record-{t}"),
    };
    let labels = HashMap::from([
        (
            snapshotter::obd::LABEL_RECORD_TRACE.to_string(),
            "yes".to_string(),
        ),
        (
            snapshotter::obd::LABEL_RECORD_TRACE_PATH.to_string(),
            trace.to_string_lossy().into_owned(),
        ),
        // Not collected by containerd's GC while we use it (no lease).
        (
            "containerd.io/gc.root".to_string(),
            "obd-trace-record".to_string(),
        ),
    ]);
    let key = rec.key.clone();
    let mounts = rec.snaps.prepare(&key, parent, labels)?;
    rec.prepared = true;
    rec.mount(&mounts)?;
    let watch = if a.no_pack || a.no_warm {
        None
    } else {
        OpenWatch::start(&rec.rootfs)
            .map_err(|e| eprintln!("obd trace record: warning: no page-cache warm list: {e}"))
            .ok()
    };

    // Run, stop, tear down: the device goes and finishes the trace.
    eprintln!(
        "obd trace record: running {:?} for up to {}s",
        args.join(" "),
        a.time
    );
    let t0 = Instant::now();
    let status = rec.run(&args, &env, cwd.as_deref(), Duration::from_secs(a.time))?;
    let ran = t0.elapsed();
    // The opened files' resident pages, read before the rootfs goes.
    let warm = watch
        .map(|w| w.finish(&image_dir(&mounts, &rec.rootfs)))
        .transpose()?;
    rec.finish()?;
    drop(rec);
    if !wait_for(&ok, OK_TIMEOUT) {
        // The device may still be up (another user): end the recording by
        // the lock-file handshake.
        let _ = std::fs::remove_file(&lock);
        if !wait_for(&ok, OK_TIMEOUT) {
            bail!(
                "the trace was not finished: {} did not appear within {}s after the snapshot was removed (see the snapshotter's log)",
                ok.display(),
                2 * OK_TIMEOUT.as_secs()
            );
        }
    }
    let bytes = std::fs::read(&trace).with_context(|| format!("reading {}", trace.display()))?;
    let parsed =
        Trace::read_file(&trace).with_context(|| format!("parsing {}", trace.display()))?;
    if parsed.records.is_empty() {
        eprintln!("obd trace record: warning: the trace has no records (the container read nothing from the image?)");
    }
    Ok(Recorded {
        bytes,
        trace: parsed,
        path: trace,
        status,
        ran,
        warm,
    })
}

/// The working-set layer, written in the scratch directory.
struct Packed {
    /// Its descriptor (the native annotations and [`ANN_WORKING_SET`]).
    desc: Descriptor,
    /// The blob file.
    path: PathBuf,
    /// Its piece table (unless `--no-verity`): where the annotations say,
    /// and the encoded table.
    table: Option<(Verity, Vec<u8>)>,
    /// The trace that replays it.
    trace: Vec<u8>,
    /// Disk bytes it holds.
    bytes: u64,
    /// Trace bytes that named no disk range (headers, indexes).
    unmapped: u64,
    /// The page-cache warm list, in the working set's order.
    warm: Option<WarmList>,
}

/// Packs the disk ranges `rec` read into a working-set layer over the
/// source's data layers (read lazily through the block cache), written in
/// `tmp`. `None` when the trace read nothing of the disk.
fn pack(
    a: &RecordArgs,
    src: &Source,
    src_ref: &ImageRef,
    rec: &Recorded,
    (tmp, verity): (&Path, bool),
) -> Result<Option<Packed>> {
    use obd_device::open::trace_replay::pack;
    use overlaybd_core::config::{ImageConfig, Lower};
    use overlaybd_core::image::{Image, Layer};
    use overlaybd_core::lsmt::{CommitOptions, Uuid};

    let layers = data_layers(src);
    let mut cfg = ImageConfig {
        repo_blob_url: snapshotter::obd::repo_blob_url(&a.image)?,
        ..Default::default()
    };
    for l in layers {
        if l.annotation(ANN_BLOB_DIGEST).is_none() {
            bail!(
                "layer {} is not an obd layer (no {ANN_BLOB_DIGEST} annotation): the working set cannot be packed (use --no-pack)",
                l.digest
            );
        }
        cfg.lowers.push(Lower {
            digest: l.digest.clone(),
            size: l.size,
            verity: verity_annotations(&l.annotations)
                .map_err(|e| anyhow!("layer {}: {e}", l.digest))?,
            ..Default::default()
        });
    }
    let registry = a
        .remote
        .registry_source(crate::cmd_image::Access::Lazy, &[&src_ref.host])?;
    let img = Image::open(&cfg, None, &[&*registry]).context("opening the image's layers")?;
    let ws = pack::working_set(&img, &rec.trace)?.in_windows(pack::PACK_WINDOW);
    if ws.extents.is_empty() {
        return Ok(None);
    }
    // The layer's uuid names this trace; its parent is the top data layer.
    let copts = CommitOptions {
        uuid: Some(Uuid::from_chain_id(&oci::sha256_digest(&rec.bytes))?),
        ..Default::default()
    };
    let path = tmp.join("working-set.blob");
    let params = converter::CommitParams {
        level: WORKING_SET_LEVEL,
        ..converter::CommitParams::defaults(img.virtual_size())
    };
    converter::write_layer_blob(&path, &params, |z| {
        Ok(pack::commit_working_set(&img, &ws, &copts, z)?)
    })?;
    let bytes = ws.bytes();
    let (digest, size, table) = converter::file_digest(&path, verity)?;
    let blob =
        zfile::FileSource::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let layer = Layer::open("working set", Arc::new(blob))?;
    // Its position in the new stack: over the data layers, an earlier
    // working set replaced.
    let position = layers.len() - usize::from(layers.last().is_some_and(is_working_set));
    let position = u32::try_from(position).context("too many layers")?;
    let trace = pack::layer_trace(&layer.lsmt, position).to_bytes();
    let table = table.map(|t| {
        let v = Verity {
            digest: oci::sha256_digest(&t),
            size: t.len() as u64,
        };
        (v, t)
    });
    let media_type = layers
        .last()
        .map(|l| l.media_type.clone())
        .unwrap_or_default();
    let mut desc =
        converter::layer_descriptor(&media_type, (&digest, size), table.as_ref().map(|t| &t.0));
    desc.annotations
        .insert(ANN_WORKING_SET.to_string(), "yes".to_string());
    Ok(Some(Packed {
        desc,
        path,
        table,
        trace,
        bytes,
        unmapped: ws.unmapped,
        warm: rec
            .warm
            .as_ref()
            .map(|o| warm::order_by_first_read(o, &ws.extents)),
    }))
}

/// What was pushed.
struct Pushed {
    manifest: String,
    config: String,
    layer: String,
    layer_size: usize,
}

/// Pushes the image with the trace as its acceleration layer to `dst`
/// (copying the other layer blobs when `dst` is another repository).
fn push_accelerated(
    dist: &Arc<Distribution>,
    src: &Source,
    src_ref: &ImageRef,
    (dst_ref, dst_name): (&ImageRef, &str),
    (trace, packed): (&[u8], Option<&Packed>),
    (tmp, verity): (&Path, bool),
) -> Result<Pushed> {
    let trace = packed.map_or(trace, |p| &p.trace[..]);
    // The warm list goes with a packed working set only: `--no-pack` is
    // upstream's output exactly.
    let warm = packed.and_then(|p| p.warm.as_ref()).map(WarmList::to_bytes);
    let layer = accel_layer_tar(trace, warm.as_deref())?;
    let ldigest = oci::sha256_digest(&layer);
    let table = verity
        .then(|| {
            let piece = obd_remote::verity::piece_size_for(layer.len() as u64);
            obd_remote::verity::PieceTable::build(&layer[..], piece).map(|t| t.encode())
        })
        .transpose()?;
    let tref = table.as_ref().map(|t| Verity {
        digest: oci::sha256_digest(t),
        size: t.len() as u64,
    });
    let (mut manifest, config) = with_accel_layer(
        src,
        packed.map(|p| &p.desc),
        (&ldigest, layer.len() as u64),
        tref.as_ref(),
    )?;
    let cbytes = oci::to_json(&config);
    let cdigest = oci::sha256_digest(&cbytes);
    manifest.config = Descriptor::new(src.config_media_type(), &cdigest, cbytes.len() as u64);
    let mbytes = oci::to_json(&manifest);
    if let Some(p) = packed {
        dist.push_blob(dst_ref, &p.desc.digest, &p.path)
            .context("pushing the working-set layer")?;
        if let Some((v, t)) = &p.table {
            dist.push_blob_bytes(dst_ref, &v.digest, t, tmp)
                .context("pushing the working-set layer's piece table")?;
        }
    }
    let below = &manifest.layers[..manifest.layers.len() - 1];
    copy_layers(dist, src_ref, dst_ref, below, tmp)?;
    dist.push_blob_bytes(dst_ref, &ldigest, &layer, tmp)
        .context("pushing the acceleration layer")?;
    if let (Some(t), Some(v)) = (&table, &tref) {
        dist.push_blob_bytes(dst_ref, &v.digest, t, tmp)
            .context("pushing the acceleration layer's piece table")?;
    }
    dist.push_blob_bytes(dst_ref, &cdigest, &cbytes, tmp)
        .context("pushing the config")?;
    let pushed = dist
        .put_manifest(dst_ref, dst_ref.reference(), &src.media_type, &mbytes)
        .with_context(|| format!("pushing the manifest of {dst_name}"))?;
    Ok(Pushed {
        manifest: pushed.digest,
        config: cdigest,
        layer: ldigest,
        layer_size: layer.len(),
    })
}

/// Runs `obd trace record`.
pub fn run(a: RecordArgs) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("obd trace record needs root (mounts, ctr run)");
    }
    let src_ref = ImageRef::parse(&a.image)?;
    let dst_ref = ImageRef::parse(&a.new_image)?;
    let ropts = a.remote.registry.options(&[&src_ref.host, &dst_ref.host]);
    let dist = Arc::new(Distribution::new(ropts.clone())?);
    let platform_name = a.platform.one()?;
    let platform = Platform::parse(&platform_name)?;
    let src = Source::new(oci::resolve(&dist, &src_ref, &platform)?);
    // Fails early (before running anything) on a non-obd image.
    process_of(&src.config)?;
    with_accel_layer(&src, None, ("sha256:0", 0), None)?;
    let parent = oci::chain_ids(&src.config.rootfs.diff_ids)
        .pop()
        .ok_or_else(|| anyhow!("{}: the config has no layers", a.image))?;

    // 1. Pull (remote snapshots; nothing moves if it is there already).
    let mut popts = PullOptions::new(&a.image);
    popts.address = a.address.clone();
    popts.namespace = a.namespace.clone();
    popts.snapshotter = a.snapshotter.clone();
    popts.platform = platform_name;
    popts.registry = ropts;
    let pulled = pull_blocking(&popts, |_| {}).with_context(|| format!("pulling {}", a.image))?;
    eprintln!(
        "obd trace record: pulled {} ({} layers, {} remote)",
        a.image,
        pulled.layers.len(),
        pulled.remote_layers
    );

    // 2. and 3. The recording rootfs, the run, the trace.
    let tmp = tempfile::Builder::new()
        .prefix("obd-record-")
        .tempdir_in("/tmp")
        .context("creating a temporary directory")?;
    let rec = record(&a, tmp.path(), &parent, &src.config)?;

    // 4. The working set.
    let packed = if a.no_pack || rec.trace.records.is_empty() {
        None
    } else {
        pack(&a, &src, &src_ref, &rec, (tmp.path(), !a.no_verity))
            .context("packing the working set (--no-pack pushes the trace alone)")?
    };

    // 5. The acceleration layer, config and manifest.
    let dst = (&dst_ref, a.new_image.as_str());
    let pushed = push_accelerated(
        &dist,
        &src,
        &src_ref,
        dst,
        (&rec.bytes, packed.as_ref()),
        (tmp.path(), !a.no_verity),
    )?;
    print_report(&a, &rec, packed.as_ref(), &pushed);
    // The trace is in `tmp` only without --trace-out; the rest is scratch.
    drop(tmp);
    Ok(())
}

fn print_report(a: &RecordArgs, rec: &Recorded, packed: Option<&Packed>, pushed: &Pushed) {
    let (records, bytes) = (rec.trace.records.len(), rec.trace.total_bytes());
    if a.json {
        let report = json!({
            "image": a.image, "new_image": a.new_image, "manifest": pushed.manifest,
            "config": pushed.config, "acceleration_layer": pushed.layer,
            "layer_size": pushed.layer_size, "trace": rec.path, "trace_records": records,
            "trace_bytes": bytes, "ran_s": rec.ran.as_secs_f64(), "exit_code": rec.status,
            "working_set_layer": packed.map(|p| &p.desc.digest),
            "working_set_layer_size": packed.map(|p| p.desc.size),
            "working_set_bytes": packed.map(|p| p.bytes),
            "trace_unmapped_bytes": packed.map(|p| p.unmapped),
            "warm_files": packed.and_then(|p| p.warm.as_ref()).map(WarmList::distinct_files),
            "warm_bytes": packed.and_then(|p| p.warm.as_ref()).map(WarmList::bytes),
        });
        println!("{report}");
        return;
    }
    if let Some(w) = packed.and_then(|p| p.warm.as_ref()) {
        println!(
            "page-cache warm list: {} files, {}",
            w.distinct_files(),
            crate::util::human(w.bytes())
        );
    }
    if let Some(p) = packed {
        println!(
            "packed the working set ({} of the disk) into layer {} ({})",
            crate::util::human(p.bytes),
            p.desc.digest,
            crate::util::human(p.desc.size)
        );
    }
    println!(
        "recorded {records} reads ({}) in {:.1} s ({}); pushed {} {} with acceleration layer {} ({} bytes)",
        crate::util::human(bytes),
        rec.ran.as_secs_f64(),
        match rec.status {
            Some(c) => format!("exited {c}"),
            None => "stopped".into(),
        },
        a.new_image,
        pushed.manifest,
        pushed.layer,
        pushed.layer_size
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json_of<T: serde::Serialize>(v: &T) -> Value {
        serde_json::from_slice(&oci::to_json(v)).unwrap()
    }

    fn source(layers: Value, diff_ids: Value) -> Source {
        Source {
            manifest: serde_json::from_value(json!({"schemaVersion": 2, "layers": layers,
                             "config": {"digest": "sha256:c", "size": 1}}))
            .unwrap(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            config: serde_json::from_value(
                json!({"rootfs": {"type": "layers", "diff_ids": diff_ids},
                           "history": [{"created_by": "x"}]}),
            )
            .unwrap(),
        }
    }

    #[test]
    fn accel_layer_is_appended_with_annotations_and_diff_id() {
        let mt = "application/vnd.oci.image.layer.v1.tar";
        let s = source(
            json!([{"mediaType": mt, "digest": "sha256:a", "size": 5,
                    "annotations": {ANN_BLOB_DIGEST: "sha256:a"}}]),
            json!(["sha256:a"]),
        );
        let v = Verity {
            digest: format!("sha256:{}", "7".repeat(64)),
            size: 96,
        };
        let (m, c) = with_accel_layer(&s, None, ("sha256:t", 7), Some(&v)).unwrap();
        let (mv, cv) = (json_of(&m), json_of(&c));
        assert_eq!(verity_annotations(&m.layers[1].annotations), Ok(Some(v)));
        let l = &mv["layers"][1];
        assert_eq!(l["mediaType"], mt);
        assert_eq!(l["annotations"][ANN_ACCEL], "yes");
        assert_eq!(l["annotations"][ANN_VERSION], "0.1.0");
        assert_eq!(l["annotations"][ANN_BLOB_SIZE], "7");
        assert_eq!(cv["rootfs"]["diff_ids"], json!(["sha256:a", "sha256:t"]));
        assert_eq!(cv["history"].as_array().unwrap().len(), 2);
        assert_eq!(cv["history"][1]["created_by"], CREATED_BY);
        // Recording again replaces the layer instead of stacking a second.
        let s2 = Source {
            manifest: m,
            config: c,
            ..s
        };
        let (m2, c2) = with_accel_layer(&s2, None, ("sha256:u", 8), None).unwrap();
        assert_eq!(m2.layers.len(), 2);
        assert_eq!(m2.layers[1].digest, "sha256:u");
        assert_eq!(c2.rootfs.diff_ids, ["sha256:a", "sha256:u"]);
        assert_eq!(c2.history.len(), 2);
    }

    #[test]
    fn a_working_set_goes_under_the_accel_layer_and_replaces_an_earlier_one() {
        let mt = "application/vnd.oci.image.layer.v1.tar";
        let s = source(
            json!([{"mediaType": mt, "digest": "sha256:a", "size": 5,
                    "annotations": {ANN_BLOB_DIGEST: "sha256:a"}}]),
            json!(["sha256:a"]),
        );
        let ws = |d: &str| {
            let mut w = converter::layer_descriptor(mt, (d, 9), None);
            w.annotations
                .insert(ANN_WORKING_SET.to_string(), "yes".to_string());
            w
        };
        let (m, c) = with_accel_layer(&s, Some(&ws("sha256:w")), ("sha256:t", 7), None).unwrap();
        let digests = |m: &Manifest| {
            m.layers
                .iter()
                .map(|l| l.digest.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(digests(&m), ["sha256:a", "sha256:w", "sha256:t"]);
        assert_eq!(c.rootfs.diff_ids, ["sha256:a", "sha256:w", "sha256:t"]);
        assert_eq!(c.history.len(), 3);
        assert!(is_working_set(&m.layers[1]) && !is_working_set(&m.layers[0]));
        let s2 = Source {
            manifest: m,
            config: c,
            ..s
        };
        assert_eq!(data_layers(&s2).len(), 2);
        // Recording again: both top layers are replaced...
        let (m2, c2) = with_accel_layer(&s2, Some(&ws("sha256:x")), ("sha256:u", 8), None).unwrap();
        assert_eq!(digests(&m2), ["sha256:a", "sha256:x", "sha256:u"]);
        assert_eq!(c2.rootfs.diff_ids, ["sha256:a", "sha256:x", "sha256:u"]);
        assert_eq!(c2.history.len(), 3);
        // ... and with --no-pack the earlier working set stays (its bytes
        // are still the disk's; the new trace may name it).
        let (m3, _) = with_accel_layer(&s2, None, ("sha256:v", 8), None).unwrap();
        assert_eq!(digests(&m3), ["sha256:a", "sha256:w", "sha256:v"]);
    }

    #[test]
    fn plain_images_and_mismatched_configs_are_refused() {
        let s = source(
            json!([{"mediaType": "x", "digest": "sha256:a", "size": 5}]),
            json!(["sha256:a"]),
        );
        let e = with_accel_layer(&s, None, ("sha256:t", 1), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an obd image"), "{e}");
        let s = source(json!([]), json!(["sha256:a"]));
        assert!(with_accel_layer(&s, None, ("sha256:t", 1), None).is_err());
    }

    #[test]
    fn process_comes_from_entrypoint_and_cmd() {
        let cfg = |v: Value| -> Config { serde_json::from_value(v).unwrap() };
        let c = cfg(
            json!({"rootfs": {}, "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"],
                                  "Env": ["PATH=/bin"], "WorkingDir": "/app"}}),
        );
        let (args, env, cwd) = process_of(&c).unwrap();
        assert_eq!(args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(env, ["PATH=/bin"]);
        assert_eq!(cwd.as_deref(), Some("/app"));
        assert!(process_of(&cfg(json!({"rootfs": {}, "config": {}}))).is_err());
        let c = cfg(json!({"rootfs": {}, "config": {"Entrypoint": null, "Cmd": ["sh"]}}));
        assert_eq!(process_of(&c).unwrap().0, ["sh"]);
    }
}
