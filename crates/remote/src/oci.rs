//! The OCI image model shared by the converter, `obd pull` and `obd trace
//! record`: media types and the overlaybd annotations (formats.md §8), serde
//! types for descriptors, manifests, indexes and image configs, chainIDs, the
//! one platform-matching rule, and [`resolve`] (index → platform → manifest →
//! config, bounded and digest-checked).
//!
//! The types keep every field they do not name in an `other` map, so a
//! document read, changed and written again ([`to_json`]) loses nothing.
//! Empty collections and absent options are left out when writing, as the Go
//! producers' `omitempty` does.

use std::collections::BTreeMap;
use std::fmt;

pub use overlaybd_core::config::Verity;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// OCI image manifest.
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI uncompressed layer tar (overlaybd layers, formats.md §8.1).
pub const MT_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker uncompressed layer tar (overlaybd layers, formats.md §8.1).
pub const MT_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// `artifactType` of a native overlaybd image pushed as a referrer (formats.md §8.5).
pub const ARTIFACT_NATIVE: &str = "application/vnd.containerd.overlaybd.native.v1+json";

/// Layer annotation: the overlaybd blob digest (formats.md §8.1).
pub const ANN_BLOB_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
/// Layer annotation: the overlaybd blob size, in decimal.
pub const ANN_BLOB_SIZE: &str = "containerd.io/snapshot/overlaybd/blob-size";
/// Layer annotation: the overlaybd version string (formats.md §8.2).
pub const ANN_VERSION: &str = "containerd.io/snapshot/overlaybd/version";
/// Layer annotation: the filesystem type of the blob.
pub const ANN_FS_TYPE: &str = "containerd.io/snapshot/overlaybd/blob-fs-type";
/// Layer annotation marking the acceleration (trace) layer (formats.md §8.3).
pub const ANN_ACCEL: &str = "containerd.io/snapshot/overlaybd/acceleration-layer";
/// Layer annotation (obd), `yes`: the layer is the working set `obd trace
/// record` packed (its bytes equal those below it; the trace replays it).
/// Upstream tools ignore it and read it as an ordinary layer.
pub const ANN_WORKING_SET: &str = "containerd.io/snapshot/overlaybd/working-set";
/// Layer annotation (obd): the digest of the layer blob's piece table, a
/// blob of the same repository ([`crate::verity`]). Upstream tools ignore it.
pub const ANN_VERITY_DIGEST: &str = "containerd.io/snapshot/overlaybd/verity.digest";
/// Layer annotation (obd): the size of the piece table blob, in decimal.
pub const ANN_VERITY_SIZE: &str = "containerd.io/snapshot/overlaybd/verity.size";
/// [`ANN_VERSION`] of a native overlaybd layer.
pub const VERSION_NATIVE: &str = "0.1.0";
/// Descriptor annotation naming a tag in an OCI image layout's `index.json`.
pub const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest config blob [`resolve`] reads.
pub const MAX_CONFIG: u64 = 16 << 20;
/// Deepest index nesting [`resolve`] follows.
pub const MAX_INDEX_DEPTH: usize = 4;

/// `null` reads as the default (an empty map or list).
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A content descriptor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// `mediaType` ("" when absent).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// `sha256:<hex>` (any algorithm is parsed; [`is_sha256`] checks).
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// `artifactType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// `annotations`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// `platform` (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// `urls`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub urls: Vec<String>,
    /// Every other field, kept as is.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Descriptor {
    /// A descriptor with only `mediaType`, `digest` and `size`.
    pub fn new(media_type: impl Into<String>, digest: impl Into<String>, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest: digest.into(),
            size,
            ..Default::default()
        }
    }

    /// The annotation `key`, if present.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// A platform (`os/architecture[/variant]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// `architecture`, e.g. `amd64`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
    /// `os`, e.g. `linux`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    /// `variant`, e.g. `v7`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Every other field (`os.version`, `os.features`, …), kept as is.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Platform {
    /// This machine's platform: `linux/<GOARCH>`, as containerd names it.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            a => a,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            ..Default::default()
        }
    }

    /// Parses `os/arch[/variant]` (no empty part).
    pub fn parse(s: &str) -> Result<Platform, ResolveError> {
        let bad =
            || ResolveError::BadPlatform(format!("platform `{s}`: expected os/arch[/variant]"));
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
            other: Map::new(),
        })
    }

    fn variant_str(&self) -> &str {
        self.variant.as_deref().unwrap_or("")
    }

    /// Whether an image for `have` is what `self` asks for: the same os and
    /// architecture, and the same variant, where a wanted platform without
    /// a variant takes any variant and, for arm64, no variant is `v8`
    /// (containerd's normalisation).
    pub fn matches(&self, have: &Platform) -> bool {
        if self.os != have.os || self.architecture != have.architecture {
            return false;
        }
        let (want, got) = (self.variant_str(), have.variant_str());
        if want.is_empty() || want == got {
            return true;
        }
        self.architecture == "arm64" && matches!((want, got), ("v8", "") | ("", "v8"))
    }

    /// Whether `have` is exactly this platform (variants equal).
    fn is_exactly(&self, have: &Platform) -> bool {
        self.os == have.os
            && self.architecture == have.architecture
            && self.variant_str() == have.variant_str()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match self.variant_str() {
            "" => Ok(()),
            v => write!(f, "/{v}"),
        }
    }
}

/// An image index or Docker manifest list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// `mediaType` ("" when absent).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// `artifactType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The entries.
    #[serde(default, deserialize_with = "null_default")]
    pub manifests: Vec<Descriptor>,
    /// `subject` (referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Every other field (`schemaVersion`, `annotations`, …), kept as is.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Index {
    /// The entry for `want`: one whose platform is exactly `want` first,
    /// else the first one [`Platform::matches`] accepts.
    pub fn select(&self, want: &Platform) -> Option<&Descriptor> {
        let with = |f: &dyn Fn(&Platform) -> bool| {
            self.manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(f))
        };
        with(&|p| want.is_exactly(p)).or_else(|| with(&|p| want.matches(p)))
    }

    /// The platforms listed, `os/arch[/variant]` joined by `, ` (`none`).
    pub fn platforms(&self) -> String {
        let v: Vec<String> = self
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(Platform::to_string)
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// `mediaType` ("" when absent).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// `artifactType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    #[serde(default, deserialize_with = "null_default")]
    pub layers: Vec<Descriptor>,
    /// `subject` (referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Every other field (`schemaVersion`, `annotations`, …), kept as is.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// An image config. Only what obd reads is typed; the rest is kept as is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `rootfs`.
    pub rootfs: RootFs,
    /// `history`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub history: Vec<History>,
    /// Every other field (`created`, `architecture`, `config`, …).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `rootfs` of an image config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    /// The uncompressed layer digests, bottom first.
    #[serde(default, deserialize_with = "null_default")]
    pub diff_ids: Vec<String>,
    /// Every other field (`type`), kept as is.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One `history` entry of an image config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// `created` (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// `created_by`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// `comment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Every other field (`author`, `empty_layer`), kept as is.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The process part of an image config (`config`), as a container runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Process {
    /// `Entrypoint`.
    #[serde(rename = "Entrypoint", default, deserialize_with = "null_default")]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(rename = "Cmd", default, deserialize_with = "null_default")]
    pub cmd: Vec<String>,
    /// `Env`, `KEY=value`.
    #[serde(rename = "Env", default, deserialize_with = "null_default")]
    pub env: Vec<String>,
    /// `WorkingDir` ("" when unset).
    #[serde(rename = "WorkingDir", default, deserialize_with = "null_default")]
    pub working_dir: String,
}

impl Config {
    /// The process to run (`config.Entrypoint`, `Cmd`, `Env`, `WorkingDir`);
    /// all empty without a `config`.
    pub fn process(&self) -> Result<Process, serde_json::Error> {
        match self.other.get("config") {
            None | Some(Value::Null) => Ok(Process::default()),
            Some(v) => Process::deserialize(v),
        }
    }
}

/// A manifest-like document, told apart by its media type (the document's
/// own `mediaType`, else the one it was served or described with) or, when
/// that names neither, by its shape (an index has `manifests`).
#[derive(Clone, Debug)]
pub enum Document {
    /// An index or manifest list.
    Index(Box<Index>),
    /// An image manifest.
    Manifest(Box<Manifest>),
}

impl Document {
    /// Parses `bytes`, served or described as `media_type`.
    pub fn parse(media_type: &str, bytes: &[u8]) -> Result<Document, serde_json::Error> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType", default)]
            media_type: Option<String>,
            #[serde(default)]
            manifests: Option<serde::de::IgnoredAny>,
        }
        let p: Probe = serde_json::from_slice(bytes)?;
        let mt = p.media_type.as_deref().unwrap_or(media_type);
        let index = match mt {
            MT_OCI_INDEX | MT_DOCKER_LIST => true,
            MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => false,
            _ => p.manifests.is_some(),
        };
        Ok(if index {
            Document::Index(Box::new(serde_json::from_slice(bytes)?))
        } else {
            Document::Manifest(Box::new(serde_json::from_slice(bytes)?))
        })
    }
}

/// The piece table a layer's annotations name (a snapshot's labels carry
/// the same keys): `None` when neither key is there; an error naming the key
/// when one is missing or malformed.
pub fn verity_annotations(map: &BTreeMap<String, String>) -> Result<Option<Verity>, String> {
    let (d, s) = (map.get(ANN_VERITY_DIGEST), map.get(ANN_VERITY_SIZE));
    if d.is_none() && s.is_none() {
        return Ok(None);
    }
    let digest = d.ok_or_else(|| format!("{ANN_VERITY_SIZE} without {ANN_VERITY_DIGEST}"))?;
    let size = s.ok_or_else(|| format!("{ANN_VERITY_DIGEST} without {ANN_VERITY_SIZE}"))?;
    if !is_sha256(digest) {
        return Err(format!(
            "{ANN_VERITY_DIGEST} {digest:?} is not a sha256 digest"
        ));
    }
    let size = size
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{ANN_VERITY_SIZE} {size:?} is not a positive number"))?;
    Ok(Some(Verity {
        digest: digest.clone(),
        size,
    }))
}

/// Adds the annotations that name the piece table `v` to `map`.
pub fn set_verity_annotations(map: &mut BTreeMap<String, String>, v: &Verity) {
    map.insert(ANN_VERITY_DIGEST.into(), v.digest.clone());
    map.insert(ANN_VERITY_SIZE.into(), v.size.to_string());
}

/// `bytes` of a document written with its keys in sorted order: the form
/// obd has always written (serde_json's map), so that the same image gives
/// the same digests.
pub fn to_json<T: Serialize>(doc: &T) -> Vec<u8> {
    let v = serde_json::to_value(doc).expect("OCI documents have string keys");
    serde_json::to_vec(&v).expect("a JSON value serialises")
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// How an image layer blob is compressed, as its media type declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar.
    None,
    /// gzip (RFC 1952), possibly several members.
    Gzip,
    /// A zstd frame.
    Zstd,
}

/// The compression of an image layer of media type `mt` (OCI, OCI
/// non-distributable and Docker schema 2 layer types), or `None` when `mt`
/// is not a layer type obd knows.
pub fn layer_compression(mt: &str) -> Option<LayerCompression> {
    const OCI: &str = "application/vnd.oci.image.layer.v1.tar";
    const OCI_ND: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    for base in [OCI, OCI_ND] {
        if let Some(rest) = mt.strip_prefix(base) {
            return match rest {
                "" => Some(LayerCompression::None),
                "+gzip" => Some(LayerCompression::Gzip),
                "+zstd" => Some(LayerCompression::Zstd),
                _ => None,
            };
        }
    }
    match mt {
        MT_DOCKER_LAYER_TAR => Some(LayerCompression::None),
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            Some(LayerCompression::Gzip)
        }
        _ => None,
    }
}

/// Whether `d` is `sha256:` and 64 lower-case hex digits (safe in URLs,
/// paths, ingest refs and labels).
pub fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// chainIDs of `diff_ids` (OCI image spec): `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Why [`resolve`] (or [`Platform::parse`]) failed.
#[derive(Debug)]
pub enum ResolveError {
    /// The platform string is malformed.
    BadPlatform(String),
    /// A registry request failed.
    Registry {
        /// What was being fetched.
        what: String,
        /// The error (its text names the URL).
        error: overlaybd_core::Error,
    },
    /// A manifest, index or config is not what it should be.
    Image {
        /// `manifest`, `index` or `config`.
        what: &'static str,
        /// Its digest.
        digest: String,
        /// What is wrong.
        detail: String,
    },
    /// The index has no manifest for the platform.
    Platform {
        /// The index.
        digest: String,
        /// Wanted platform.
        platform: String,
        /// Platforms present.
        available: String,
    },
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::BadPlatform(s) => f.write_str(s),
            ResolveError::Registry { what, error } => write!(f, "registry: {what}: {error}"),
            ResolveError::Image {
                what,
                digest,
                detail,
            } => write!(f, "{what} {digest}: {detail}"),
            ResolveError::Platform {
                digest,
                platform,
                available,
            } => write!(
                f,
                "index {digest} has no manifest for {platform} (it has: {available})"
            ),
        }
    }
}

impl std::error::Error for ResolveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ResolveError::Registry { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn image_err(what: &'static str, digest: &str, detail: impl Into<String>) -> ResolveError {
    ResolveError::Image {
        what,
        digest: digest.to_string(),
        detail: detail.into(),
    }
}

#[cfg(feature = "registry")]
pub use fetch::{resolve, resolve_manifest, Resolved, ResolvedManifest};

#[cfg(feature = "registry")]
mod fetch {
    use std::io::Read;
    use std::sync::Arc;

    use super::*;
    use crate::distribution::{self, Distribution, ImageRef};

    /// An image resolved in the registry: everything a pull needs before
    /// the layers.
    #[derive(Clone, Debug)]
    pub struct Resolved {
        /// Indexes from the top, each with the descriptor of its chosen child.
        pub indexes: Vec<(distribution::Manifest, Descriptor)>,
        /// The platform manifest as fetched (digest-checked bytes).
        pub manifest_doc: distribution::Manifest,
        /// The platform manifest, parsed.
        pub manifest: Manifest,
        /// The config blob (digest-checked).
        pub config_bytes: Vec<u8>,
        /// The config, parsed; as many diff_ids as layers, all sha256.
        pub config: Config,
        /// Bytes fetched from the registry (manifests, indexes, config).
        pub bytes: u64,
    }

    /// An image resolved to its platform manifest ([`resolve_manifest`]).
    #[derive(Clone, Debug)]
    pub struct ResolvedManifest {
        /// Indexes from the top, each with the descriptor of its chosen child.
        pub indexes: Vec<(distribution::Manifest, Descriptor)>,
        /// The platform manifest as fetched (digest-checked bytes).
        pub manifest_doc: distribution::Manifest,
        /// The platform manifest, parsed.
        pub manifest: Manifest,
        /// Bytes fetched from the registry (manifests, indexes).
        pub bytes: u64,
    }

    fn reg_err(what: String) -> impl FnOnce(overlaybd_core::Error) -> ResolveError {
        move |error| ResolveError::Registry { what, error }
    }

    /// Follows `r` through its indexes (at most [`MAX_INDEX_DEPTH`]) to the
    /// manifest for `platform`, then reads the config (at most
    /// [`MAX_CONFIG`] bytes). Every document is digest-checked and every
    /// digest must be sha256: they end up in URLs, ingest refs and labels.
    pub fn resolve(
        dist: &Arc<Distribution>,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<Resolved, ResolveError> {
        let m = resolve_manifest(dist, r, platform)?;
        let (config_bytes, config) = read_config(dist, r, &m.manifest, &m.manifest_doc.digest)?;
        Ok(Resolved {
            bytes: m.bytes + config_bytes.len() as u64,
            indexes: m.indexes,
            manifest_doc: m.manifest_doc,
            manifest: m.manifest,
            config_bytes,
            config,
        })
    }

    /// [`resolve`] without the config.
    pub fn resolve_manifest(
        dist: &Arc<Distribution>,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<ResolvedManifest, ResolveError> {
        let mut m = dist
            .get_manifest(r, r.reference())
            .map_err(reg_err(format!("manifest {r}")))?;
        let mut bytes = m.bytes.len() as u64;
        let mut indexes = Vec::new();
        let manifest = loop {
            let doc = Document::parse(&m.media_type, &m.bytes).map_err(|e| {
                image_err("manifest", &m.digest, format!("not an image manifest: {e}"))
            });
            let idx = match doc? {
                Document::Manifest(mj) => break *mj,
                Document::Index(idx) => idx,
            };
            if indexes.len() >= MAX_INDEX_DEPTH {
                return Err(image_err("index", &m.digest, "indexes nested too deep"));
            }
            let d = idx
                .select(platform)
                .ok_or_else(|| ResolveError::Platform {
                    digest: m.digest.clone(),
                    platform: platform.to_string(),
                    available: idx.platforms(),
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
        };
        for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
            if !is_sha256(&d.digest) {
                return Err(image_err(
                    "manifest",
                    &m.digest,
                    format!("unsupported descriptor digest `{}`", d.digest),
                ));
            }
        }
        Ok(ResolvedManifest {
            indexes,
            manifest_doc: m,
            manifest,
            bytes,
        })
    }

    /// The manifest's config, bounded, digest-checked and matching the layers.
    fn read_config(
        dist: &Arc<Distribution>,
        r: &ImageRef,
        manifest: &Manifest,
        manifest_digest: &str,
    ) -> Result<(Vec<u8>, Config), ResolveError> {
        let cd = &manifest.config;
        if cd.size > MAX_CONFIG {
            return Err(image_err(
                "config",
                &cd.digest,
                format!("{} bytes (limit {MAX_CONFIG})", cd.size),
            ));
        }
        let mut buf = Vec::new();
        dist.open_blob(r, &cd.digest, cd.size)
            .map_err(reg_err(format!("config {}", cd.digest)))?
            .take(MAX_CONFIG + 1)
            .read_to_end(&mut buf)
            .map_err(|e| image_err("config", &cd.digest, format!("reading: {e}")))?;
        let got = sha256_digest(&buf);
        if got != cd.digest {
            return Err(image_err(
                "config",
                &cd.digest,
                format!("content has digest {got}"),
            ));
        }
        let cfg: Config = serde_json::from_slice(&buf)
            .map_err(|e| image_err("config", &cd.digest, format!("no rootfs.diff_ids: {e}")))?;
        let diff_ids = &cfg.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(image_err(
                "config",
                &cd.digest,
                format!(
                    "{} diff_ids for {} layers in manifest {manifest_digest}",
                    diff_ids.len(),
                    manifest.layers.len(),
                ),
            ));
        }
        if let Some(d) = diff_ids.iter().find(|d| !is_sha256(d)) {
            return Err(image_err(
                "config",
                &cd.digest,
                format!("malformed diff_id `{d}`"),
            ));
        }
        Ok((buf, cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plat(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn layer_compression_by_media_type() {
        use LayerCompression::*;
        for (mt, want) in [
            (MT_OCI_LAYER_TAR, Some(None)),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Gzip),
            ),
            (MT_DOCKER_LAYER_TAR, Some(None)),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Some(Gzip),
            ),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", Option::None),
            (
                "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                Option::None,
            ),
            ("", Option::None),
        ] {
            assert_eq!(layer_compression(mt), want, "{mt}");
        }
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = format!("sha256:{}", "c".repeat(64));
        let ch = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(ch[0], a);
        assert_eq!(ch[1], sha256_digest(format!("{a} {b}").as_bytes()));
        assert_eq!(ch[2], sha256_digest(format!("{} {c}", ch[1]).as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn platform_parsing_and_display() {
        let p = plat("linux/arm/v7");
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "arm"));
        assert_eq!(p.variant.as_deref(), Some("v7"));
        assert_eq!(p.to_string(), "linux/arm/v7");
        assert_eq!(plat("linux/amd64").to_string(), "linux/amd64");
        for bad in ["linux", "linux//v7", "/amd64", "linux/arm/v7/x", ""] {
            let e = Platform::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected os/arch[/variant]"), "{bad}: {e}");
        }
    }

    #[test]
    fn platform_matching_rule() {
        let m = |want: &str, have: &str| plat(want).matches(&plat(have));
        assert!(m("linux/amd64", "linux/amd64"));
        assert!(!m("linux/amd64", "linux/arm64"));
        assert!(!m("linux/amd64", "windows/amd64"));
        // A wanted platform without a variant takes any variant.
        assert!(m("linux/arm", "linux/arm/v7"));
        assert!(m("linux/arm/v7", "linux/arm/v7"));
        assert!(!m("linux/arm/v7", "linux/arm/v6"));
        assert!(!m("linux/arm/v7", "linux/arm"));
        // arm64: no variant is v8, both ways.
        assert!(m("linux/arm64/v8", "linux/arm64"));
        assert!(m("linux/arm64", "linux/arm64/v8"));
        assert!(!m("linux/arm64/v9", "linux/arm64"));
        assert!(!m("linux/arm/v8", "linux/arm"));
    }

    fn index() -> Index {
        serde_json::from_value(json!({"manifests": [
            {"mediaType": "m", "digest": "sha256:1", "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": "m", "digest": "sha256:2", "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "m", "digest": "sha256:3", "size": 1, "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
            {"mediaType": "m", "digest": "sha256:4", "size": 1, "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
            {"mediaType": "m", "digest": "sha256:5", "size": 1, "platform": {"os": "unknown", "architecture": "unknown"}},
            {"mediaType": "m", "digest": "sha256:6", "size": 1}]}))
        .unwrap()
    }

    #[test]
    fn index_selection_prefers_the_exact_variant() {
        let idx = index();
        let pick = |p: &str| idx.select(&plat(p)).map(|d| d.digest.as_str());
        assert_eq!(pick("linux/amd64"), Some("sha256:2"));
        assert_eq!(pick("linux/arm64/v8"), Some("sha256:1"));
        assert_eq!(pick("linux/arm64"), Some("sha256:1"));
        assert_eq!(pick("linux/arm/v7"), Some("sha256:4"));
        assert_eq!(pick("linux/arm"), Some("sha256:3"));
        assert_eq!(pick("linux/arm/v5"), None);
        assert_eq!(pick("linux/s390x"), None);
        assert_eq!(
            idx.platforms(),
            "linux/arm64, linux/amd64, linux/arm/v6, linux/arm/v7, unknown/unknown"
        );
        assert_eq!(Index::default().platforms(), "none");
    }

    #[test]
    fn documents_round_trip_with_unknown_fields() {
        let src = json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": "sha256:c", "size": 3,
                       "annotations": {"a": "b"}, "data": "e30="},
            "layers": [{"mediaType": "l", "digest": "sha256:l", "size": 9,
                        "urls": ["http://x"], "annotations": null}],
            "annotations": {"x": "y"},
            "zz": [1, 2.5, null, {"k": true}],
        });
        let bytes = serde_json::to_vec(&src).unwrap();
        let Document::Manifest(m) = Document::parse("", &bytes).unwrap() else {
            panic!("not a manifest");
        };
        assert_eq!(m.layers[0].urls, ["http://x"]);
        assert_eq!(m.config.annotation("a"), Some("b"));
        let mut want = src.clone();
        want["layers"][0]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        assert_eq!(to_json(&m), serde_json::to_vec(&want).unwrap());

        let cfg = json!({"architecture": "amd64", "created": "2020",
            "config": {"Entrypoint": null, "Cmd": ["sh"], "Env": ["A=b"], "Volumes": null},
            "history": [{"created_by": "a", "empty_layer": true}],
            "rootfs": {"type": "layers", "diff_ids": ["sha256:a"]}});
        let c: Config = serde_json::from_value(cfg.clone()).unwrap();
        assert_eq!(c.rootfs.diff_ids, ["sha256:a"]);
        assert_eq!(c.history[0].created_by.as_deref(), Some("a"));
        assert_eq!(to_json(&c), serde_json::to_vec(&cfg).unwrap());
        let p = c.process().unwrap();
        assert_eq!(
            (p.entrypoint.len(), p.cmd.as_slice()),
            (0, &["sh".to_string()][..])
        );
        assert_eq!(p.env, ["A=b"]);
        assert_eq!(Config::default().process().unwrap(), Process::default());
    }

    #[test]
    fn documents_are_told_apart() {
        let kind = |mt: &str, v: Value| match Document::parse(mt, &serde_json::to_vec(&v).unwrap())
            .unwrap()
        {
            Document::Index(_) => "index",
            Document::Manifest(_) => "manifest",
        };
        let man = json!({"config": {"digest": "sha256:c", "size": 1}});
        assert_eq!(kind(MT_OCI_INDEX, json!({})), "index");
        assert_eq!(kind(MT_DOCKER_LIST, json!({})), "index");
        assert_eq!(kind("", json!({"manifests": []})), "index");
        assert_eq!(kind("", man.clone()), "manifest");
        assert_eq!(
            kind(
                MT_OCI_INDEX,
                json!({"mediaType": MT_OCI_MANIFEST, "config": man["config"]})
            ),
            "manifest"
        );
        assert!(
            Document::parse("", b"{\"layers\": []}").is_err(),
            "no config"
        );
        assert!(Document::parse("", b"not json").is_err());
    }

    #[test]
    fn verity_annotations_round_trip_and_are_checked() {
        let v = Verity {
            digest: format!("sha256:{}", "c".repeat(64)),
            size: 96,
        };
        let mut m = BTreeMap::new();
        assert_eq!(verity_annotations(&m), Ok(None));
        set_verity_annotations(&mut m, &v);
        assert_eq!(verity_annotations(&m), Ok(Some(v.clone())));
        // Short enough for a containerd label (4 KiB per label).
        assert!(m.iter().all(|(k, val)| k.len() + val.len() < 200));
        let mut bad = m.clone();
        bad.insert(ANN_VERITY_SIZE.into(), "x".into());
        assert!(verity_annotations(&bad)
            .unwrap_err()
            .contains(ANN_VERITY_SIZE));
        let mut bad = m.clone();
        bad.insert(ANN_VERITY_DIGEST.into(), "sha256:AB".into());
        assert!(verity_annotations(&bad)
            .unwrap_err()
            .contains(ANN_VERITY_DIGEST));
        m.remove(ANN_VERITY_DIGEST);
        assert!(verity_annotations(&m).is_err());
    }

    #[test]
    fn sha256_digests_only() {
        assert!(is_sha256(&format!("sha256:{}", "0a".repeat(32))));
        assert!(!is_sha256(&format!("sha256:{}", "0A".repeat(32))));
        assert!(!is_sha256("sha256:00"));
        assert!(!is_sha256(&format!("sha512:{}", "0".repeat(128))));
        assert!(!is_sha256(&format!("sha256:../{}", "0".repeat(61))));
    }
}
