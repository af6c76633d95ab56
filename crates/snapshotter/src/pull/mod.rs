//! `obd pull`: pulls an image through containerd with the remote-snapshot
//! handshake (like upstream overlaybd's `ctr rpull`).
//!
//! The registry is read with overlaybd-core's [`Distribution`] (index →
//! platform → manifest → config); containerd is driven over its gRPC socket
//! (namespace in the `containerd-namespace` metadata, everything under a
//! lease sent as `containerd-lease`):
//!
//! 1. the config is written into the content store, labelled with
//!    `containerd.io/gc.ref.snapshot.<snapshotter>=<top chainID>`;
//! 2. for each layer, bottom up: a committed snapshot named by its chainID
//!    is skipped; otherwise `Prepare(key = "extract-<random> <chainID>",
//!    parent = previous chainID)` with the layer's `containerd.io/snapshot/*`
//!    annotations, `containerd.io/snapshot.ref=<chainID>` and
//!    `containerd.io/snapshot/image-ref=<ref>`. `AlreadyExists` means the
//!    snapshotter committed it remotely (no data moved). A successful Prepare
//!    means the layer must be unpacked here: the blob is fetched into the
//!    content store, applied with containerd's diff service onto the mounts
//!    Prepare returned, and committed as the chainID;
//! 3. the manifest (and index) are written with containerd's GC labels, and
//!    the image record is created or updated to point at the top descriptor.
//!
//! Blobs and snapshots already in containerd are not fetched again, so a
//! second pull of the same image moves no layer data.

use crate::proto::containerd::services::content::v1 as content;
use crate::proto::containerd::services::diff::v1 as diff;
use crate::proto::containerd::services::images::v1 as images;
use crate::proto::containerd::services::leases::v1 as leases;
use crate::proto::containerd::services::snapshots::v1 as snapshots;
use crate::proto::containerd::types::{Descriptor, Mount};
use content::content_client::ContentClient;
use diff::diff_client::DiffClient;
use hyper_util::rt::TokioIo;
use images::images_client::ImagesClient;
use leases::leases_client::LeasesClient;
use obd_remote::distribution::{
    Distribution, ImageRef, Manifest, MT_DOCKER_LIST, MT_OCI_INDEX,
};
use obd_remote::registry::RegistryOptions;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use snapshots::snapshots_client::SnapshotsClient;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

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
/// Snapshot label naming the committed snapshot a Prepare targets.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Snapshot label carrying the image reference (remote-snapshot trigger).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/image-ref";
/// Content label prefix: the registry host a blob came from (value: repo).
pub const LABEL_DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source.";
/// Content label on compressed layers: the uncompressed digest.
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";

/// Bytes per content `Write` message (containerd accepts 16 MiB messages).
const CHUNK: usize = 1 << 20;
/// Largest config blob accepted.
const MAX_CONFIG: u64 = 16 << 20;
/// Deepest index nesting followed.
const MAX_INDEX_DEPTH: usize = 4;

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

fn ctd(op: impl Into<String>) -> impl FnOnce(Status) -> PullError {
    let op = op.into();
    move |status| PullError::Containerd { op, status }
}

fn image_err(what: &'static str, digest: &str, detail: impl Into<String>) -> PullError {
    PullError::Image {
        what,
        digest: digest.to_string(),
        detail: detail.into(),
    }
}

/// `sha256:<hex>` of `b`.
fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// chainIDs of `diff_ids` (OCI image spec): `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// An OCI/Docker descriptor as it appears in manifests and indexes.
#[derive(Clone, Debug, Deserialize)]
struct JsonDesc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<JsonPlatform>,
}

#[derive(Clone, Debug, Deserialize)]
struct JsonPlatform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JsonIndex {
    #[serde(default)]
    manifests: Vec<JsonDesc>,
}

#[derive(Debug, Deserialize)]
struct JsonManifest {
    config: JsonDesc,
    #[serde(default)]
    layers: Vec<JsonDesc>,
}

#[derive(Debug, Deserialize)]
struct JsonConfig {
    rootfs: JsonRootfs,
}

#[derive(Debug, Deserialize)]
struct JsonRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl JsonDesc {
    fn to_proto(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size as i64,
            annotations: self.annotations.clone(),
        }
    }
}

fn is_index(m: &Manifest) -> bool {
    if m.media_type == MT_OCI_INDEX || m.media_type == MT_DOCKER_LIST {
        return true;
    }
    // An OCI document without mediaType: an index has `manifests`.
    m.media_type.is_empty()
        && serde_json::from_slice::<serde_json::Value>(&m.bytes)
            .is_ok_and(|v| v.get("manifests").is_some_and(|x| x.is_array()))
}

/// `os/arch[/variant]` → (os, arch, variant).
fn parse_platform(p: &str) -> Result<(String, String, Option<String>), PullError> {
    let parts: Vec<&str> = p.split('/').collect();
    match parts.as_slice() {
        [os, arch] if !os.is_empty() && !arch.is_empty() => {
            Ok((os.to_string(), arch.to_string(), None))
        }
        [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
            Ok((os.to_string(), arch.to_string(), Some(v.to_string())))
        }
        _ => Err(PullError::BadOption(format!(
            "platform `{p}`: expected os/arch[/variant]"
        ))),
    }
}

/// The index entry for the platform: exact variant first, then any variant
/// (or none) of the same os/arch.
fn select_platform<'a>(
    idx: &'a JsonIndex,
    want: &(String, String, Option<String>),
) -> Option<&'a JsonDesc> {
    let same = |d: &&JsonDesc| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == want.0 && p.architecture == want.1)
    };
    if let Some(v) = &want.2 {
        if let Some(d) =
            idx.manifests.iter().filter(same).find(|d| {
                d.platform.as_ref().and_then(|p| p.variant.as_deref()) == Some(v.as_str())
            })
        {
            return Some(d);
        }
        // arm64's default variant is v8, often left out.
        if want.1 == "arm64" && v == "v8" {
            return idx.manifests.iter().filter(same).find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.variant.as_deref().unwrap_or("").is_empty())
            });
        }
        return None;
    }
    idx.manifests.iter().find(same)
}

fn platforms_of(idx: &JsonIndex) -> String {
    let v: Vec<String> = idx
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
            _ => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// RFC 3339 UTC time of `t`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A unique-enough token for lease ids and extract keys.
fn token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let h = Sha256::digest(
        format!(
            "{nanos} {} {}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
        .as_bytes(),
    );
    hex::encode(&h[..8])
}

/// Runs blocking registry work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PullError> + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PullError::BadOption(format!("registry worker: {e}")))?
}

/// Connects a tonic channel to a unix socket.
async fn connect(address: &std::path::Path) -> Result<Channel, PullError> {
    let path = address.to_path_buf();
    let cerr = |detail: String| PullError::Connect {
        address: address.to_path_buf(),
        detail,
    };
    if !path.exists() {
        return Err(cerr("no such socket".into()));
    }
    Endpoint::try_from("http://containerd.invalid")
        .map_err(|e| cerr(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cur = c.source();
            }
            cerr(s)
        })
}

/// containerd clients sharing one channel, with the namespace and lease
/// metadata put on every request.
struct Containerd {
    ns: MetadataValue<tonic::metadata::Ascii>,
    lease: Option<MetadataValue<tonic::metadata::Ascii>>,
    content: ContentClient<Channel>,
    images: ImagesClient<Channel>,
    leases: LeasesClient<Channel>,
    diff: DiffClient<Channel>,
    snapshots: SnapshotsClient<Channel>,
    snapshotter: String,
    /// Snapshot calls retried after `Unavailable` (see [`UNAVAILABLE_GRACE`]).
    unavailable_retries: u32,
}

/// What a content write did.
#[derive(Debug, PartialEq, Eq)]
enum Wrote {
    /// Committed now.
    Committed,
    /// containerd had the blob already (its labels were updated).
    Existed,
}

impl Containerd {
    async fn new(opts: &PullOptions) -> Result<Self, PullError> {
        let ns = opts
            .namespace
            .parse()
            .map_err(|_| PullError::BadOption(format!("namespace `{}`", opts.namespace)))?;
        let ch = connect(&opts.address).await?;
        Ok(Containerd {
            ns,
            lease: None,
            content: ContentClient::new(ch.clone()),
            images: ImagesClient::new(ch.clone()),
            leases: LeasesClient::new(ch.clone()),
            diff: DiffClient::new(ch.clone()),
            snapshots: SnapshotsClient::new(ch),
            snapshotter: opts.snapshotter.clone(),
            unavailable_retries: 0,
        })
    }

    /// A request with the namespace (and lease) metadata.
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(NAMESPACE_HEADER, self.ns.clone());
        if let Some(l) = &self.lease {
            r.metadata_mut().insert(LEASE_HEADER, l.clone());
        }
        r
    }

    async fn create_lease(&mut self, expire: Duration) -> Result<String, PullError> {
        let id = format!("obd-pull-{}", token());
        let labels = HashMap::from([(
            LABEL_GC_EXPIRE.to_string(),
            rfc3339(SystemTime::now() + expire),
        )]);
        let r = self.req(leases::CreateRequest {
            id: id.clone(),
            labels,
        });
        self.leases
            .create(r)
            .await
            .map_err(ctd(format!("leases.Create {id}")))?;
        self.lease = Some(
            id.parse()
                .map_err(|_| PullError::BadOption(format!("lease id {id}")))?,
        );
        Ok(id)
    }

    async fn delete_lease(&mut self, id: &str) -> Result<(), PullError> {
        self.lease = None;
        let r = self.req(leases::DeleteRequest {
            id: id.to_string(),
            sync: false,
        });
        self.leases
            .delete(r)
            .await
            .map_err(ctd(format!("leases.Delete {id}")))?;
        Ok(())
    }

    /// Whether the content store has `digest`.
    async fn has_content(&mut self, digest: &str) -> Result<bool, PullError> {
        let r = self.req(content::InfoRequest {
            digest: digest.to_string(),
        });
        match self.content.info(r).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(ctd(format!("content.Info {digest}"))(s)),
        }
    }

    /// Adds `labels` to an existing blob.
    async fn label_content(
        &mut self,
        digest: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), PullError> {
        if labels.is_empty() {
            return Ok(());
        }
        let r = self.req(content::UpdateRequest {
            info: Some(content::Info {
                digest: digest.to_string(),
                labels: labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
            }),
        });
        self.content
            .update(r)
            .await
            .map_err(ctd(format!("content.Update {digest}")))?;
        Ok(())
    }

    /// Writes a blob into the content store from `open()`'s stream (run on a
    /// blocking thread), checks its size and digest, and commits it with
    /// `labels`. Returns the bytes read from the stream.
    async fn write_content(
        &mut self,
        ingest_ref: &str,
        desc: &JsonDesc,
        labels: &BTreeMap<String, String>,
        open: impl FnOnce() -> Result<Box<dyn Read + Send>, PullError> + Send + 'static,
    ) -> Result<(Wrote, u64), PullError> {
        let op = format!("content.Write {} ({ingest_ref})", desc.digest);
        let (tx, rx) = mpsc::channel::<content::WriteContentRequest>(4);
        let base = content::WriteContentRequest {
            r#ref: ingest_ref.to_string(),
            total: desc.size as i64,
            expected: desc.digest.clone(),
            ..Default::default()
        };
        let commit_labels: HashMap<String, String> = labels.clone().into_iter().collect();
        let digest = desc.digest.clone();
        let size = desc.size;
        let producer = tokio::task::spawn_blocking(move || -> Result<u64, PullError> {
            let mut rd = open()?;
            let mut h = Sha256::new();
            let mut off = 0u64;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let mut n = 0;
                while n < buf.len() {
                    match rd.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(image_err("blob", &digest, format!("reading: {e}"))),
                    }
                }
                if n == 0 {
                    break;
                }
                if off + n as u64 > size {
                    return Err(image_err(
                        "blob",
                        &digest,
                        format!("longer than its descriptor's {size} bytes"),
                    ));
                }
                h.update(&buf[..n]);
                let msg = content::WriteContentRequest {
                    action: content::WriteAction::Write as i32,
                    offset: off as i64,
                    data: buf[..n].to_vec(),
                    ..base.clone()
                };
                off += n as u64;
                if tx.blocking_send(msg).is_err() {
                    // containerd ended the stream (e.g. AlreadyExists).
                    return Ok(off);
                }
            }
            if off != size {
                return Err(image_err(
                    "blob",
                    &digest,
                    format!("{off} bytes, its descriptor says {size}"),
                ));
            }
            let got = format!("sha256:{}", hex::encode(h.finalize()));
            if got != digest {
                return Err(image_err(
                    "blob",
                    &digest,
                    format!("content has digest {got}"),
                ));
            }
            let _ = tx.blocking_send(content::WriteContentRequest {
                action: content::WriteAction::Commit as i32,
                offset: off as i64,
                labels: commit_labels,
                ..base
            });
            Ok(off)
        });
        let r = self.req(ReceiverStream::new(rx));
        let mut last: Option<content::WriteContentResponse> = None;
        let stream = match self.content.write(r).await {
            Ok(s) => Ok(s.into_inner()),
            Err(s) => Err(s),
        };
        let status = match stream {
            Ok(mut s) => loop {
                match s.message().await {
                    Ok(Some(m)) => last = Some(m),
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            },
            Err(e) => Some(e),
        };
        let read = producer
            .await
            .map_err(|e| PullError::BadOption(format!("content writer: {e}")))?;
        match status {
            Some(s) if s.code() == Code::AlreadyExists => {
                self.label_content(&desc.digest, labels).await?;
                return Ok((Wrote::Existed, read.unwrap_or(0)));
            }
            Some(s) => {
                self.abort_ingest(ingest_ref).await;
                // A read error explains a broken stream better.
                read?;
                return Err(ctd(op)(s));
            }
            None => {}
        }
        let read = match read {
            Ok(n) => n,
            Err(e) => {
                self.abort_ingest(ingest_ref).await;
                return Err(e);
            }
        };
        match last {
            Some(m)
                if m.action == content::WriteAction::Commit as i32 && m.digest == desc.digest =>
            {
                Ok((Wrote::Committed, read))
            }
            other => Err(ctd(op)(Status::internal(format!(
                "the stream ended without a commit of {} (last response: {other:?})",
                desc.digest
            )))),
        }
    }

    /// Best-effort removal of a half-written ingest.
    async fn abort_ingest(&mut self, ingest_ref: &str) {
        let r = self.req(content::AbortRequest {
            r#ref: ingest_ref.to_string(),
        });
        let _ = self.content.abort(r).await;
    }

    /// Writes an in-memory blob (manifest, index, config).
    async fn write_bytes(
        &mut self,
        ingest_ref: &str,
        desc: &JsonDesc,
        bytes: Vec<u8>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Wrote, PullError> {
        if self.has_content(&desc.digest).await? {
            self.label_content(&desc.digest, labels).await?;
            return Ok(Wrote::Existed);
        }
        let (w, _) = self
            .write_content(ingest_ref, desc, labels, move || {
                Ok(Box::new(std::io::Cursor::new(bytes)) as Box<dyn Read + Send>)
            })
            .await?;
        Ok(w)
    }

    /// Whether the snapshotter has a snapshot `key`.
    async fn snapshot_exists(&mut self, key: &str) -> Result<bool, PullError> {
        let mut unavailable = Unavailable::new();
        loop {
            let r = self.req(snapshots::StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            });
            match self.snapshots.stat(r).await {
                Ok(_) => return Ok(true),
                Err(s) if s.code() == Code::NotFound => return Ok(false),
                Err(s) if unavailable.retry(&s, "snapshots.Stat").await => {
                    self.unavailable_retries += 1;
                }
                Err(s) => return Err(ctd(format!("snapshots.Stat {key}"))(s)),
            }
        }
    }

    async fn remove_snapshot(&mut self, key: &str) {
        let r = self.req(snapshots::RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        if let Err(e) = self.snapshots.remove(r).await {
            tracing::warn!(key, error = %e, "removing the extract snapshot failed");
        }
    }
}

/// The registry side of a pull: everything resolved before containerd is
/// touched.
struct Resolved {
    /// Indexes from the top, each with the descriptor of its chosen child.
    indexes: Vec<(Manifest, JsonDesc)>,
    manifest: Manifest,
    manifest_json: JsonManifest,
    config_bytes: Vec<u8>,
    diff_ids: Vec<String>,
    bytes: u64,
}

fn reg_err(what: String) -> impl FnOnce(overlaybd_core::Error) -> PullError {
    move |error| PullError::Registry { what, error }
}

/// `sha256:` and 64 lower-case hex digits.
fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// index → platform → manifest → config, digest-checked.
fn resolve(
    dist: &Arc<Distribution>,
    r: &ImageRef,
    platform: &(String, String, Option<String>),
    platform_str: &str,
) -> Result<Resolved, PullError> {
    let mut bytes = 0u64;
    let mut m = dist
        .get_manifest(r, r.reference())
        .map_err(reg_err(format!("manifest {r}")))?;
    bytes += m.bytes.len() as u64;
    let mut indexes = Vec::new();
    while is_index(&m) {
        if indexes.len() >= MAX_INDEX_DEPTH {
            return Err(image_err("index", &m.digest, "indexes nested too deep"));
        }
        let idx: JsonIndex = serde_json::from_slice(&m.bytes)
            .map_err(|e| image_err("index", &m.digest, format!("not an image index: {e}")))?;
        let d = select_platform(&idx, platform)
            .ok_or_else(|| PullError::Platform {
                digest: m.digest.clone(),
                platform: platform_str.to_string(),
                available: platforms_of(&idx),
            })?
            .clone();
        if !is_sha256(&d.digest) {
            return Err(image_err(
                "index",
                &m.digest,
                format!("unsupported descriptor digest `{}`", d.digest),
            ));
        }
        let child = dist
            .get_manifest(r, &d.digest)
            .map_err(reg_err(format!("manifest {} of {r}", d.digest)))?;
        bytes += child.bytes.len() as u64;
        if child.bytes.len() as u64 != d.size {
            return Err(image_err(
                "manifest",
                &d.digest,
                format!("{} bytes, the index says {}", child.bytes.len(), d.size),
            ));
        }
        indexes.push((m, d));
        m = child;
    }
    let mj: JsonManifest = serde_json::from_slice(&m.bytes)
        .map_err(|e| image_err("manifest", &m.digest, format!("not an image manifest: {e}")))?;
    // Digests end up in URLs, ingest refs and labels: only sha256 ones.
    for d in std::iter::once(&mj.config).chain(&mj.layers) {
        if !is_sha256(&d.digest) {
            return Err(image_err(
                "manifest",
                &m.digest,
                format!("unsupported descriptor digest `{}`", d.digest),
            ));
        }
    }
    if mj.config.size > MAX_CONFIG {
        return Err(image_err(
            "config",
            &mj.config.digest,
            format!("{} bytes (limit {MAX_CONFIG})", mj.config.size),
        ));
    }
    let mut config_bytes = Vec::new();
    dist.open_blob(r, &mj.config.digest, mj.config.size)
        .map_err(reg_err(format!("config {}", mj.config.digest)))?
        .take(MAX_CONFIG + 1)
        .read_to_end(&mut config_bytes)
        .map_err(|e| image_err("config", &mj.config.digest, format!("reading: {e}")))?;
    bytes += config_bytes.len() as u64;
    let got = sha256(&config_bytes);
    if got != mj.config.digest {
        return Err(image_err(
            "config",
            &mj.config.digest,
            format!("content has digest {got}"),
        ));
    }
    let cfg: JsonConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
        image_err(
            "config",
            &mj.config.digest,
            format!("no rootfs.diff_ids: {e}"),
        )
    })?;
    if cfg.rootfs.diff_ids.len() != mj.layers.len() {
        return Err(image_err(
            "config",
            &mj.config.digest,
            format!(
                "{} diff_ids for {} layers in manifest {}",
                cfg.rootfs.diff_ids.len(),
                mj.layers.len(),
                m.digest
            ),
        ));
    }
    for d in &cfg.rootfs.diff_ids {
        if !is_sha256(d) {
            return Err(image_err(
                "config",
                &mj.config.digest,
                format!("malformed diff_id `{d}`"),
            ));
        }
    }
    Ok(Resolved {
        indexes,
        manifest: m,
        manifest_json: mj,
        config_bytes,
        diff_ids: cfg.rootfs.diff_ids,
        bytes,
    })
}

/// A layer's snapshot labels: its `containerd.io/snapshot/*` annotations,
/// the target chainID and the image reference.
fn snapshot_labels(layer: &JsonDesc, chain: &str, image_ref: &str) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = layer
        .annotations
        .iter()
        .filter(|(k, _)| k.starts_with(SNAPSHOT_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    l.insert(LABEL_SNAPSHOT_REF.into(), chain.into());
    l.insert(LABEL_IMAGE_REF.into(), image_ref.into());
    l
}

fn is_compressed(media_type: &str) -> bool {
    media_type.ends_with("gzip") || media_type.ends_with("zstd")
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
    let platform = parse_platform(&opts.platform)?;
    if opts.snapshotter.is_empty() {
        return Err(PullError::BadOption("empty snapshotter name".into()));
    }
    let mut reg = opts.registry.clone();
    if opts.plain_http || opts.insecure {
        let h = reg.hosts.entry(r.host.clone()).or_default();
        h.plain_http |= opts.plain_http;
        h.insecure_skip_verify |= opts.insecure;
    }
    let dist = Arc::new(
        Distribution::new(reg)
            .map_err(|e| PullError::BadOption(format!("registry client: {e}")))?,
    );

    let resolved = {
        let (dist, r, p, ps) = (
            dist.clone(),
            r.clone(),
            platform.clone(),
            opts.platform.clone(),
        );
        blocking(move || resolve(&dist, &r, &p, &ps)).await?
    };

    let mut c = Containerd::new(opts).await?;
    let lease = c.create_lease(opts.lease_expire).await?;
    let res = pull_into(&mut c, opts, &dist, &r, &name, resolved, t0, &mut observe).await;
    let del = c.delete_lease(&lease).await;
    let report = res?;
    del?;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn pull_into(
    c: &mut Containerd,
    opts: &PullOptions,
    dist: &Arc<Distribution>,
    r: &ImageRef,
    name: &str,
    res: Resolved,
    t0: Instant,
    observe: &mut (impl FnMut(&LayerReport) + Send),
) -> Result<PullReport, PullError> {
    let source_label = (
        format!("{LABEL_DISTRIBUTION_SOURCE}{}", r.host),
        r.repo.clone(),
    );
    let mut registry_bytes = res.bytes;
    let chains = chain_ids(&res.diff_ids);
    let mj = &res.manifest_json;

    // Config: keeps the top snapshot from being collected.
    let mut labels = BTreeMap::from([source_label.clone()]);
    if let Some(top) = chains.last() {
        labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            top.clone(),
        );
    }
    c.write_bytes(
        &format!("config-{}", mj.config.digest),
        &mj.config,
        res.config_bytes.clone(),
        &labels,
    )
    .await?;

    // Layers, bottom up.
    let mut reports = Vec::with_capacity(mj.layers.len());
    for (i, layer) in mj.layers.iter().enumerate() {
        let t = Instant::now();
        let chain = &chains[i];
        let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
        let (state, fetched) = if c.snapshot_exists(chain).await? {
            (LayerState::Present, 0)
        } else {
            unpack_layer(
                c,
                dist,
                r,
                name,
                layer,
                chain,
                parent,
                &res.diff_ids[i],
                &source_label,
            )
            .await?
        };
        registry_bytes += fetched;
        let rep = LayerReport {
            index: i,
            digest: layer.digest.clone(),
            size: layer.size,
            media_type: layer.media_type.clone(),
            chain_id: chain.clone(),
            state,
            fetched_bytes: fetched,
            ms: t.elapsed().as_millis() as u64,
        };
        observe(&rep);
        reports.push(rep);
    }

    // Manifest: references the config and the layer blobs that are here.
    let mut labels = BTreeMap::from([
        source_label.clone(),
        (
            "containerd.io/gc.ref.content.config".to_string(),
            mj.config.digest.clone(),
        ),
    ]);
    for rep in &reports {
        if rep.state == LayerState::Downloaded {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{}", rep.index),
                rep.digest.clone(),
            );
        }
    }
    let m = &res.manifest;
    let mdesc = JsonDesc {
        media_type: m.media_type.clone(),
        digest: m.digest.clone(),
        size: m.bytes.len() as u64,
        annotations: HashMap::new(),
        platform: None,
    };
    c.write_bytes(
        &format!("manifest-{}", m.digest),
        &mdesc,
        m.bytes.clone(),
        &labels,
    )
    .await?;

    // Indexes, innermost first.
    let mut target = mdesc;
    for (idx, child) in res.indexes.iter().rev() {
        let labels = BTreeMap::from([
            source_label.clone(),
            (
                "containerd.io/gc.ref.content.m.0".to_string(),
                child.digest.clone(),
            ),
        ]);
        let d = JsonDesc {
            media_type: if idx.media_type.is_empty() {
                MT_OCI_INDEX.to_string()
            } else {
                idx.media_type.clone()
            },
            digest: idx.digest.clone(),
            size: idx.bytes.len() as u64,
            annotations: HashMap::new(),
            platform: None,
        };
        c.write_bytes(
            &format!("index-{}", idx.digest),
            &d,
            idx.bytes.clone(),
            &labels,
        )
        .await?;
        target = d;
    }

    // The image record.
    let image = images::Image {
        name: name.to_string(),
        target: Some(target.to_proto()),
        ..Default::default()
    };
    let req = c.req(images::CreateImageRequest {
        image: Some(image.clone()),
    });
    let created = match c.images.create(req).await {
        Ok(_) => true,
        Err(s) if s.code() == Code::AlreadyExists => {
            let req = c.req(images::UpdateImageRequest {
                image: Some(image),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["target".into()],
                }),
            });
            c.images
                .update(req)
                .await
                .map_err(ctd(format!("images.Update {name}")))?;
            false
        }
        Err(s) => return Err(ctd(format!("images.Create {name}"))(s)),
    };

    let count = |s: LayerState| reports.iter().filter(|l| l.state == s).count();
    Ok(PullReport {
        name: name.to_string(),
        digest: target.digest.clone(),
        media_type: target.media_type.clone(),
        manifest: res.manifest.digest.clone(),
        config: mj.config.digest.clone(),
        namespace: opts.namespace.clone(),
        snapshotter: opts.snapshotter.clone(),
        created,
        remote_layers: count(LayerState::Remote),
        downloaded_layers: count(LayerState::Downloaded),
        present_layers: count(LayerState::Present),
        layers: reports,
        registry_bytes,
        snapshotter_retries: c.unavailable_retries,
        total_ms: t0.elapsed().as_millis() as u64,
    })
}

/// Prepare → (AlreadyExists: remote) or fetch + diff.Apply + Commit.
/// Returns the state and the bytes fetched from the registry.
#[allow(clippy::too_many_arguments)]
async fn unpack_layer(
    c: &mut Containerd,
    dist: &Arc<Distribution>,
    r: &ImageRef,
    image_ref: &str,
    layer: &JsonDesc,
    chain: &str,
    parent: &str,
    diff_id: &str,
    source_label: &(String, String),
) -> Result<(LayerState, u64), PullError> {
    let labels = snapshot_labels(layer, chain, image_ref);
    let mut unavailable = Unavailable::new();
    let (key, mounts): (String, Vec<Mount>) = loop {
        // A fresh key per try: a Prepare that reached the snapshotter before
        // the connection broke leaves its key behind (the lease collects it).
        let key = format!("extract-{} {chain}", token());
        let req = c.req(snapshots::PrepareSnapshotRequest {
            snapshotter: c.snapshotter.clone(),
            key: key.clone(),
            parent: parent.to_string(),
            labels: labels.clone(),
        });
        match c.snapshots.prepare(req).await {
            Ok(resp) => break (key, resp.into_inner().mounts),
            Err(s) if s.code() == Code::AlreadyExists => {
                // Committed by the snapshotter (or by a concurrent pull).
                // containerd answers AlreadyExists for a target only after it
                // found the committed snapshot in the backend (labelled with this
                // chainID, on this parent) and recorded it, so no Stat is needed.
                return Ok((LayerState::Remote, 0));
            }
            Err(s) if unavailable.retry(&s, "snapshots.Prepare").await => {
                c.unavailable_retries += 1;
            }
            Err(s) => return Err(ctd(format!("snapshots.Prepare {key}"))(s)),
        }
    };
    match apply_layer(c, dist, r, layer, diff_id, &mounts, source_label).await {
        Ok(fetched) => {
            let req = c.req(snapshots::CommitSnapshotRequest {
                snapshotter: c.snapshotter.clone(),
                name: chain.to_string(),
                key: key.clone(),
                labels,
            });
            match c.snapshots.commit(req).await {
                Ok(_) => Ok((LayerState::Downloaded, fetched)),
                Err(s) if s.code() == Code::AlreadyExists => {
                    // A concurrent pull committed it first.
                    c.remove_snapshot(&key).await;
                    Ok((LayerState::Downloaded, fetched))
                }
                Err(s) => {
                    c.remove_snapshot(&key).await;
                    Err(ctd(format!("snapshots.Commit {chain}"))(s))
                }
            }
        }
        Err(e) => {
            c.remove_snapshot(&key).await;
            Err(e)
        }
    }
}

/// How long a snapshot call answered `Unavailable` is retried. containerd
/// says `Unavailable` while its connection to a restarted proxy snapshotter
/// is backing off (about 1 s after a restart, growing with each refused
/// connect), so a pull started right after a restart waits instead of failing.
const UNAVAILABLE_GRACE: Duration = Duration::from_secs(15);

/// Retry state for snapshot calls answered `Unavailable`.
struct Unavailable {
    deadline: Instant,
    backoff: Duration,
}

impl Unavailable {
    fn new() -> Self {
        Unavailable {
            deadline: Instant::now() + UNAVAILABLE_GRACE,
            backoff: Duration::from_millis(50),
        }
    }

    /// True, after a backoff, if `s` is `Unavailable` and the grace period
    /// has room for another try.
    async fn retry(&mut self, s: &Status, call: &str) -> bool {
        if s.code() != Code::Unavailable || Instant::now() + self.backoff > self.deadline {
            return false;
        }
        tracing::info!(call, error = %s.message(), "the snapshotter is unavailable through containerd; retrying");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
        true
    }
}

/// Fetches a layer blob into the content store (unless it is there) and
/// applies it onto `mounts`; checks the result against the diffID.
async fn apply_layer(
    c: &mut Containerd,
    dist: &Arc<Distribution>,
    r: &ImageRef,
    layer: &JsonDesc,
    diff_id: &str,
    mounts: &[Mount],
    source_label: &(String, String),
) -> Result<u64, PullError> {
    let mut labels = BTreeMap::from([source_label.clone()]);
    if is_compressed(&layer.media_type) {
        labels.insert(LABEL_UNCOMPRESSED.into(), diff_id.into());
    }
    let mut fetched = 0;
    if c.has_content(&layer.digest).await? {
        c.label_content(&layer.digest, &labels).await?;
    } else {
        let (dist, r2, d, size) = (dist.clone(), r.clone(), layer.digest.clone(), layer.size);
        let (_, n) = c
            .write_content(
                &format!("layer-{}", layer.digest),
                layer,
                &labels,
                move || {
                    dist.open_blob(&r2, &d, size)
                        .map_err(reg_err(format!("layer {d}")))
                },
            )
            .await?;
        fetched = n;
    }
    let req = c.req(diff::ApplyRequest {
        diff: Some(layer.to_proto()),
        mounts: mounts.to_vec(),
        payloads: HashMap::new(),
    });
    let applied = c
        .diff
        .apply(req)
        .await
        .map_err(ctd(format!("diff.Apply {}", layer.digest)))?
        .into_inner()
        .applied
        .unwrap_or_default();
    if applied.digest != diff_id {
        return Err(image_err(
            "layer",
            &layer.digest,
            format!(
                "applied content has digest {}, the config's diff_id is {diff_id}",
                applied.digest
            ),
        ));
    }
    Ok(fetched)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ch = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ch[0], a);
        assert_eq!(ch[1], sha256(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // leap year
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn platform_selection() {
        let idx: JsonIndex = serde_json::from_str(
            r#"{"manifests":[
            {"mediaType":"m","digest":"sha256:1","size":1,"platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":"m","digest":"sha256:2","size":1,"platform":{"os":"linux","architecture":"amd64"}},
            {"mediaType":"m","digest":"sha256:3","size":1,"platform":{"os":"linux","architecture":"arm","variant":"v7"}},
            {"mediaType":"m","digest":"sha256:4","size":1,"platform":{"os":"unknown","architecture":"unknown"}}]}"#,
        )
        .unwrap();
        let pick =
            |p: &str| select_platform(&idx, &parse_platform(p).unwrap()).map(|d| d.digest.clone());
        assert_eq!(pick("linux/amd64").as_deref(), Some("sha256:2"));
        assert_eq!(pick("linux/arm64/v8").as_deref(), Some("sha256:1"));
        assert_eq!(pick("linux/arm/v7").as_deref(), Some("sha256:3"));
        assert_eq!(pick("linux/arm/v6"), None);
        assert_eq!(pick("linux/s390x"), None);
        assert!(parse_platform("linux").is_err());
        assert!(parse_platform("linux//v7").is_err());
        assert!(platforms_of(&idx).contains("linux/arm/v7"));
    }

    #[test]
    fn snapshot_labels_keep_only_snapshot_annotations() {
        let d: JsonDesc = serde_json::from_str(
            r#"{"mediaType":"m","digest":"sha256:1","size":1,"annotations":{
            "containerd.io/snapshot/overlaybd/blob-digest":"sha256:1",
            "org.opencontainers.image.title":"x"}}"#,
        )
        .unwrap();
        let l = snapshot_labels(&d, "sha256:c", "r/x:1");
        assert_eq!(l.len(), 3);
        assert_eq!(l[LABEL_SNAPSHOT_REF], "sha256:c");
        assert_eq!(l[LABEL_IMAGE_REF], "r/x:1");
        assert_eq!(
            l["containerd.io/snapshot/overlaybd/blob-digest"],
            "sha256:1"
        );
    }

    #[test]
    fn digests_must_be_sha256() {
        assert!(is_sha256(&format!("sha256:{}", "0a".repeat(32))));
        assert!(!is_sha256(&format!("sha256:{}", "0A".repeat(32))));
        assert!(!is_sha256("sha256:00"));
        assert!(!is_sha256(&format!("sha512:{}", "0".repeat(128))));
        assert!(!is_sha256(&format!("sha256:../{}", "0".repeat(61))));
    }

    #[test]
    fn index_detection() {
        let m = |mt: &str, b: &str| Manifest {
            bytes: b.as_bytes().to_vec(),
            media_type: mt.into(),
            digest: String::new(),
        };
        assert!(is_index(&m(MT_OCI_INDEX, "{}")));
        assert!(is_index(&m(MT_DOCKER_LIST, "{}")));
        assert!(is_index(&m("", r#"{"manifests":[]}"#)));
        assert!(!is_index(&m("", r#"{"layers":[]}"#)));
    }
}
