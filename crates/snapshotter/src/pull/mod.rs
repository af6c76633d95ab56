//! `obd pull`: pulls an image through containerd with the remote-snapshot
//! handshake (like upstream overlaybd's `ctr rpull`).
//!
//! The registry is read with [`obd_remote::oci::resolve`] (index →
//! platform → manifest → config) while containerd is connected; containerd
//! is driven over its gRPC socket (namespace in the `containerd-namespace`
//! metadata, everything under a lease sent as `containerd-lease`); which
//! chainIDs are snapshots already is asked for all layers at once:
//!
//! 1. alongside step 2: the config is written into the content store,
//!    labelled with `containerd.io/gc.ref.snapshot.<snapshotter>=<top
//!    chainID>`, then the manifest (and index), with containerd's GC labels
//!    for the config and every layer blob, as containerd's own pull labels
//!    it; and the blobs of the layers the snapshotter will not take remotely
//!    start downloading into it, three at a time, as containerd's own pull
//!    does;
//! 2. for each layer, bottom up: a committed snapshot named by its chainID
//!    is skipped; otherwise `Prepare(key = "extract-<random> <chainID>",
//!    parent = previous chainID)` with the layer's `containerd.io/snapshot/*`
//!    annotations, `containerd.io/snapshot.ref=<chainID>` and
//!    `containerd.io/snapshot/image-ref=<ref>`. `AlreadyExists` means the
//!    snapshotter committed it remotely (no data moved). A successful Prepare
//!    means the layer must be unpacked here: the blob is fetched into the
//!    content store (or its download from step 1 is waited for), applied
//!    with containerd's diff service onto the mounts Prepare returned, and
//!    committed as the chainID;
//! 3. once every layer is there, the image record is created or updated to
//!    point at the top descriptor.
//!
//! Blobs and snapshots already in containerd are not fetched again, so a
//! second pull of the same image moves no layer data.
//!
//! [`containerd`] holds the gRPC client; [`unpack`] the steps above.

mod containerd;
mod unpack;

use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::oci::{self, Platform, ResolveError};
use obd_remote::registry::RegistryOptions;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Status;

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// gRPC metadata key of the containerd namespace.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC metadata key of the containerd lease.
pub const LEASE_HEADER: &str = "containerd-lease";
/// Lease label: when containerd may collect the lease.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
/// Layer annotations with this prefix become snapshot labels.
pub const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";
/// Snapshot label carrying the image reference (remote-snapshot trigger).
pub use crate::layer::LABEL_IMAGE_REF;
/// Snapshot label naming the committed snapshot a Prepare targets.
pub use crate::layer::LABEL_TARGET_REF as LABEL_SNAPSHOT_REF;
/// Content label prefix: the registry host a blob came from (value: repo).
pub const LABEL_DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source.";
/// Content label on compressed layers: the uncompressed digest.
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";

/// What [`pull`] pulls, and from where into where.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Image reference, `host[:port]/repo[:tag][@digest]`.
    pub reference: String,
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// Snapshotter name in containerd (`obd` for the proxy plugin).
    pub snapshotter: String,
    /// Platform to pick from an index, `os/arch[/variant]`.
    pub platform: String,
    /// Talk plain HTTP to the reference's registry.
    pub plain_http: bool,
    /// Skip TLS verification for the reference's registry.
    pub insecure: bool,
    /// Further registry settings (credentials, timeouts, other hosts).
    pub registry: RegistryOptions,
    /// Lifetime of the pull's lease if the pull dies before deleting it.
    pub lease_expire: Duration,
}

impl PullOptions {
    /// Defaults for `reference`: containerd's default socket, namespace
    /// `default`, snapshotter `obd`, `linux/amd64`, a 1 h lease.
    pub fn new(reference: impl Into<String>) -> Self {
        PullOptions {
            reference: reference.into(),
            address: DEFAULT_ADDRESS.into(),
            namespace: "default".into(),
            snapshotter: "obd".into(),
            platform: "linux/amd64".into(),
            plain_http: false,
            insecure: false,
            registry: RegistryOptions::default(),
            lease_expire: Duration::from_secs(3600),
        }
    }
}

/// How a layer ended up in the snapshotter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerState {
    /// Its chainID was committed already: nothing done.
    Present,
    /// Committed by the snapshotter without data (remote snapshot).
    Remote,
    /// Fetched, applied with containerd's diff service and committed.
    Downloaded,
}

/// One layer of a pull.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// Position in the manifest, 0 = bottom.
    pub index: usize,
    /// Blob digest.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// Blob media type.
    pub media_type: String,
    /// chainID of the snapshot.
    pub chain_id: String,
    /// What happened.
    pub state: LayerState,
    /// Bytes fetched from the registry for this layer.
    pub fetched_bytes: u64,
    /// Time spent on the layer.
    pub ms: u64,
}

/// The result of a pull.
#[derive(Clone, Debug, Serialize)]
pub struct PullReport {
    /// The image record's name (the full reference).
    pub name: String,
    /// The image record's target (index or manifest) digest.
    pub digest: String,
    /// The target's media type.
    pub media_type: String,
    /// The platform manifest's digest.
    pub manifest: String,
    /// The config digest (image ID).
    pub config: String,
    /// containerd namespace.
    pub namespace: String,
    /// Snapshotter.
    pub snapshotter: String,
    /// The image record was created (false: updated).
    pub created: bool,
    /// Layers, bottom to top.
    pub layers: Vec<LayerReport>,
    /// Layers committed remotely.
    pub remote_layers: usize,
    /// Layers fetched and applied.
    pub downloaded_layers: usize,
    /// Layers whose snapshot existed already.
    pub present_layers: usize,
    /// Bytes fetched from the registry (manifests, config, layer blobs).
    pub registry_bytes: u64,
    /// Snapshot calls retried because containerd could not reach the
    /// snapshotter yet (`Unavailable`, e.g. right after its restart).
    pub snapshotter_retries: u32,
    /// Wall time of the whole pull.
    pub total_ms: u64,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference or an option is malformed.
    #[error("{0}")]
    BadOption(String),
    /// containerd's socket could not be reached.
    #[error("connecting to containerd at {address}: {detail}")]
    Connect {
        /// The socket.
        address: PathBuf,
        /// Why.
        detail: String,
    },
    /// A containerd call failed.
    #[error("containerd {op}: {:?}: {}", status.code(), status.message())]
    Containerd {
        /// The call and its object, e.g. `snapshots.Prepare <key>`.
        op: String,
        /// The gRPC status.
        status: Status,
    },
    /// A registry request failed.
    #[error("registry: {what}: {error}")]
    Registry {
        /// What was being fetched.
        what: String,
        /// The error (its text names the URL).
        error: overlaybd_core::Error,
    },
    /// A manifest, index or config is not what it should be.
    #[error("{what} {digest}: {detail}")]
    Image {
        /// `manifest`, `index`, `config` or `layer`.
        what: &'static str,
        /// Its digest.
        digest: String,
        /// What is wrong.
        detail: String,
    },
    /// The index has no manifest for the platform.
    #[error("index {digest} has no manifest for {platform} (it has: {available})")]
    Platform {
        /// The index.
        digest: String,
        /// Wanted platform.
        platform: String,
        /// Platforms present.
        available: String,
    },
}

impl From<ResolveError> for PullError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::BadPlatform(s) => PullError::BadOption(s),
            ResolveError::Registry { what, error } => PullError::Registry { what, error },
            ResolveError::Image {
                what,
                digest,
                detail,
            } => PullError::Image {
                what,
                digest,
                detail,
            },
            ResolveError::Platform {
                digest,
                platform,
                available,
            } => PullError::Platform {
                digest,
                platform,
                available,
            },
        }
    }
}

/// Runs blocking registry work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PullError> + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PullError::BadOption(format!("registry worker: {e}")))?
}

/// The registry client for `opts`: its registry settings, plus plain HTTP
/// or insecure TLS for the reference's host when asked for.
fn registry_client(opts: &PullOptions, r: &ImageRef) -> Result<Arc<Distribution>, PullError> {
    let mut reg = opts.registry.clone();
    if opts.plain_http || opts.insecure {
        let h = reg.hosts.entry(r.host.clone()).or_default();
        h.plain_http |= opts.plain_http;
        h.insecure_skip_verify |= opts.insecure;
    }
    let dist = Distribution::new(reg)
        .map_err(|e| PullError::BadOption(format!("registry client: {e}")))?;
    Ok(Arc::new(dist))
}

/// Pulls `opts.reference` into containerd (see the module docs). `observe`
/// is called after each layer.
pub async fn pull(
    opts: &PullOptions,
    mut observe: impl FnMut(&LayerReport) + Send,
) -> Result<PullReport, PullError> {
    let t0 = Instant::now();
    let r = ImageRef::parse(&opts.reference).map_err(|e| PullError::BadOption(e.to_string()))?;
    let name = if r.tag.is_none() && r.digest.is_none() {
        format!("{r}:latest")
    } else {
        r.to_string()
    };
    let platform = Platform::parse(&opts.platform)?;
    if opts.snapshotter.is_empty() {
        return Err(PullError::BadOption("empty snapshotter name".into()));
    }
    let dist = registry_client(opts, &r)?;
    // The registry and containerd are set up at once; a registry error is
    // the one reported when both fail.
    let resolving = {
        let (dist, r) = (dist.clone(), r.clone());
        blocking(move || Ok(oci::resolve(&dist, &r, &platform)?))
    };
    let setup = async {
        let mut c = containerd::Containerd::new(opts).await?;
        let lease = c.create_lease(opts.lease_expire).await?;
        Ok::<_, PullError>((c, lease))
    };
    let (resolved, (mut c, lease)) = match tokio::join!(resolving, setup) {
        (Ok(res), Ok(set)) => (res, set),
        (Err(e), Ok((mut c, lease))) => {
            let _ = c.delete_lease(&lease).await;
            return Err(e);
        }
        (Err(e), Err(_)) | (Ok(_), Err(e)) => return Err(e),
    };
    let job = unpack::Job {
        opts,
        dist: &dist,
        r: &r,
        name: &name,
    };
    let res = job.run(&mut c, resolved, t0, &mut observe).await;
    let del = c.delete_lease(&lease).await;
    let report = res?;
    del?;
    Ok(report)
}

/// [`pull`] on a fresh tokio runtime (for synchronous callers).
pub fn pull_blocking(
    opts: &PullOptions,
    observe: impl FnMut(&LayerReport) + Send,
) -> Result<PullReport, PullError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PullError::BadOption(format!("tokio runtime: {e}")))?;
    rt.block_on(pull(opts, observe))
}
