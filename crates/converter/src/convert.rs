//! The conversion pipeline: per source layer, apply its tar to the ext4 on
//! top of the layers converted so far, commit the block delta as a
//! tar(ZFile(LSMT)) blob, then write the config (diff_ids replaced) and the
//! manifest with the overlaybd annotations, and tag it last.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use overlaybd_core::image::Image;
use overlaybd_core::lsmt::{CommitInfo, CommitOptions, CreateOptions, Uuid, WritableLayer};
use overlaybd_core::source::Blob;
use overlaybd_core::tar::TarWriter;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use zfile::sync::recover;

use crate::apply::{Applier, ApplyStats};
use crate::error::{Error, Result};
use crate::fs::{Ext4, MkfsParams};
use crate::io::Backend;
use crate::oci::*;

/// Manifest annotation keys (formats.md §8.1).
pub const ANN_BLOB_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
pub const ANN_BLOB_SIZE: &str = "containerd.io/snapshot/overlaybd/blob-size";
pub const ANN_VERSION: &str = "containerd.io/snapshot/overlaybd/version";
pub const ANN_FS_TYPE: &str = "containerd.io/snapshot/overlaybd/blob-fs-type";

/// A per-layer progress callback.
pub type ProgressFn = dyn Fn(&LayerReport);

/// Which media types the output uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MediaTypes {
    /// The source manifest's family (OCI stays OCI, Docker stays Docker).
    #[default]
    Source,
    /// Docker schema 2 (upstream's userspace converter default).
    Docker,
    /// OCI (upstream `--oci`; forced by `--referrer`).
    Oci,
}

/// Live progress, called from the converter's threads. Manifests are
/// numbered in conversion order; layers by their source position.
pub trait Observer: Send + Sync {
    /// A manifest starts (`platform` as `os/arch[/variant]` when known).
    fn manifest_start(&self, _manifest: usize, _platform: Option<&str>, _layers: &[Descriptor]) {}
    /// Source layer `layer` starts; `size` is its (compressed) blob size.
    fn layer_start(&self, _manifest: usize, _layer: usize, _size: u64) {}
    /// `bytes` more of the source blob were read.
    fn layer_read(&self, _manifest: usize, _layer: usize, _bytes: u64) {}
    /// The layer is applied; its commit (and compression) runs now.
    fn layer_applied(&self, _manifest: usize, _layer: usize) {}
    /// An output layer is finished.
    fn layer_done(&self, _manifest: usize, _report: &LayerReport) {}
}

/// Conversion options.
pub struct Options {
    /// ZFile codec.
    pub algorithm: zfile::Algorithm,
    /// ZFile block size (4 KiB to 32 KiB).
    pub block_size: u32,
    /// zstd level (0 = upstream's 3; ignored for LZ4).
    pub level: i32,
    /// Device (and ext4) size in bytes.
    pub vsize: u64,
    /// Produce a single layer.
    pub flatten: bool,
    /// Compression threads.
    pub threads: usize,
    /// Bytes of dirty filesystem pages kept before writing to the layer.
    pub cache_bytes: usize,
    /// Called after each converted layer.
    pub progress: Option<Box<ProgressFn>>,
    /// Live progress.
    pub observer: Option<Arc<dyn Observer>>,
    /// Output media types.
    pub media_types: MediaTypes,
    /// Platforms to convert from an index (`os/arch[/variant]`); empty = all.
    pub platforms: Vec<String>,
    /// Make the output a referrer of the source (`subject` +
    /// `artifactType`, formats.md §8.5); forces OCI media types.
    pub referrer: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            algorithm: zfile::Algorithm::Lz4,
            block_size: 4096,
            level: 0,
            vsize: 64 << 30,
            flatten: false,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cache_bytes: 64 << 20,
            progress: None,
            observer: None,
            media_types: MediaTypes::Source,
            platforms: Vec::new(),
            referrer: false,
        }
    }
}

/// What converting one output layer did.
#[derive(Clone, Debug)]
pub struct LayerReport {
    /// Output layer position.
    pub index: usize,
    /// The source layer digests it came from (several when flattening).
    pub sources: Vec<String>,
    /// Output blob digest and size.
    pub digest: String,
    pub size: u64,
    /// Source bytes: compressed and uncompressed.
    pub source_bytes: u64,
    pub tar_bytes: u64,
    /// Entries applied.
    pub apply: ApplyStats,
    /// What the commit wrote.
    pub commit: CommitInfo,
    /// Wall time: total, applying the tar, committing and compressing.
    pub seconds: f64,
    pub apply_seconds: f64,
    pub commit_seconds: f64,
}

/// The result of a conversion.
#[derive(Clone, Debug)]
pub struct Report {
    /// The tagged root (manifest or index).
    pub root: Descriptor,
    /// Every converted manifest, in order.
    pub manifests: Vec<Descriptor>,
    /// Per output layer.
    pub layers: Vec<LayerReport>,
}

/// Converts the image `src` resolves to into `dst`.
pub fn convert(src: &dyn ImageSource, dst: &dyn ImageDest, opts: &Options) -> Result<Report> {
    if opts.vsize % 4096 != 0 || opts.vsize < 64 << 20 {
        return Err(Error::Unsupported(format!(
            "vsize {} must be a multiple of 4096 and at least 64 MiB",
            opts.vsize
        )));
    }
    let root = src.root()?;
    let bytes = src.read_small(&root)?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        what: root.digest.clone(),
        error: e,
    })?;
    let media_type = doc
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or(&root.media_type)
        .to_string();
    let scratch = Scratch(dst.scratch_dir()?);
    let mut report = Report {
        root: root.clone(),
        manifests: Vec::new(),
        layers: Vec::new(),
    };
    let new_root = if media_type == MT_OCI_INDEX
        || media_type == MT_DOCKER_LIST
        || doc.get("manifests").is_some()
    {
        let mut out = doc.clone();
        let list = out
            .get_mut("manifests")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| Error::Image("index without `manifests`".into()))?;
        let mut kept = Vec::new();
        for m in list.iter() {
            let plat = platform_of(m);
            if plat
                .as_deref()
                .is_some_and(|p| p.starts_with("unknown/unknown"))
            {
                // BuildKit attestations and the like: not images.
                continue;
            }
            if !opts.platforms.is_empty()
                && !opts
                    .platforms
                    .iter()
                    .any(|want| plat.as_deref().is_some_and(|p| platform_matches(want, p)))
            {
                continue;
            }
            let mut m = m.clone();
            let d = Descriptor::from_json(&m, "index")?;
            let nd =
                convert_manifest(src, dst, opts, &d, plat.as_deref(), &scratch.0, &mut report)?;
            m["mediaType"] = json!(nd.media_type);
            m["digest"] = json!(nd.digest);
            m["size"] = json!(nd.size);
            kept.push(m);
        }
        if kept.is_empty() {
            return Err(Error::Image(if opts.platforms.is_empty() {
                "the index lists no image manifests".to_string()
            } else {
                format!(
                    "no manifest in the index matches --platform {}",
                    opts.platforms.join(",")
                )
            }));
        }
        *list = kept;
        let index_mt = match effective(opts) {
            MediaTypes::Source => media_type.clone(),
            MediaTypes::Docker => MT_DOCKER_LIST.to_string(),
            MediaTypes::Oci => MT_OCI_INDEX.to_string(),
        };
        out["mediaType"] = json!(index_mt);
        if opts.referrer {
            out["artifactType"] = json!(ARTIFACT_NATIVE);
            out["subject"] = subject_json(&root, &media_type);
        }
        let b = serde_json::to_vec(&out).expect("json");
        let d = Descriptor {
            media_type: index_mt,
            digest: sha256_digest(&b),
            size: b.len() as u64,
        };
        dst.put_manifest(&d, &b)?;
        d
    } else {
        convert_manifest(src, dst, opts, &root, None, &scratch.0, &mut report)?
    };
    dst.tag(&new_root)?;
    report.root = new_root;
    Ok(report)
}

/// Removes the scratch directory on every exit path.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The media types in force: `--referrer` forces OCI.
fn effective(opts: &Options) -> MediaTypes {
    if opts.referrer {
        MediaTypes::Oci
    } else {
        opts.media_types
    }
}

/// `os/arch[/variant]` of an index entry.
fn platform_of(m: &Value) -> Option<String> {
    let p = m.get("platform")?;
    let os = p.get("os")?.as_str()?;
    let arch = p.get("architecture")?.as_str()?;
    Some(match p.get("variant").and_then(Value::as_str) {
        Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
        _ => format!("{os}/{arch}"),
    })
}

/// Whether `have` (`os/arch[/variant]`) is what `want` asks for; a `want`
/// without a variant takes any variant.
pub fn platform_matches(want: &str, have: &str) -> bool {
    let w: Vec<&str> = want.split('/').collect();
    let h: Vec<&str> = have.split('/').collect();
    w.len() >= 2
        && h.len() >= 2
        && w[0] == h[0]
        && w[1] == h[1]
        && (w.len() < 3 || h.get(2) == w.get(2))
}

/// The source descriptor as a `subject`.
fn subject_json(d: &Descriptor, media_type: &str) -> Value {
    json!({"mediaType": media_type, "digest": d.digest, "size": d.size})
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
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

fn derive16(label: &str, input: &str) -> [u8; 16] {
    let h = Sha256::digest(format!("obd-convert/{label}\n{input}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b
}

fn convert_manifest(
    src: &dyn ImageSource,
    dst: &dyn ImageDest,
    opts: &Options,
    desc: &Descriptor,
    platform: Option<&str>,
    scratch: &Path,
    report: &mut Report,
) -> Result<Descriptor> {
    let mindex = report.manifests.len();
    let bytes = src.read_small(desc)?;
    let mut manifest: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        what: format!("manifest {}", desc.digest),
        error: e,
    })?;
    let mt = manifest
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or(&desc.media_type)
        .to_string();
    let source_mt = mt.clone();
    let docker = match effective(opts) {
        MediaTypes::Source => mt == MT_DOCKER_MANIFEST,
        MediaTypes::Docker => true,
        MediaTypes::Oci => false,
    };
    let mt = if docker {
        MT_DOCKER_MANIFEST.to_string()
    } else if mt == MT_DOCKER_MANIFEST {
        MT_OCI_MANIFEST.to_string()
    } else {
        mt
    };
    let cfg_desc = Descriptor::from_json(
        manifest
            .get("config")
            .ok_or_else(|| Error::Image(format!("manifest {} has no config", desc.digest)))?,
        "config",
    )?;
    let layers: Vec<Descriptor> = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Image(format!("manifest {} has no layers", desc.digest)))?
        .iter()
        .map(|l| Descriptor::from_json(l, "layer"))
        .collect::<Result<_>>()?;
    for (i, l) in manifest["layers"]
        .as_array()
        .expect("checked")
        .iter()
        .enumerate()
    {
        if l.pointer(&format!(
            "/annotations/{}",
            ANN_BLOB_DIGEST.replace('/', "~1")
        ))
        .is_some()
        {
            return Err(Error::Image(format!(
                "layer {i} is already an overlaybd layer"
            )));
        }
    }
    let cfg_bytes = src.read_small(&cfg_desc)?;
    let mut config: Value = serde_json::from_slice(&cfg_bytes).map_err(|e| Error::Json {
        what: format!("config {}", cfg_desc.digest),
        error: e,
    })?;
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Image("config has no rootfs.diff_ids".into()))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::Image("non-string diff_id".into()))
        })
        .collect::<Result<_>>()?;
    if diff_ids.len() != layers.len() {
        return Err(Error::Image(format!(
            "{} layers but {} diff_ids",
            layers.len(),
            diff_ids.len()
        )));
    }
    if layers.is_empty() {
        return Err(Error::Image("image without layers".into()));
    }
    if layers.len() > overlaybd_core::config::MAX_LAYERS {
        return Err(Error::Unsupported(format!(
            "{} layers; at most {} can be stacked (use --flatten)",
            layers.len(),
            overlaybd_core::config::MAX_LAYERS
        )));
    }
    if let Some(o) = &opts.observer {
        o.manifest_start(mindex, platform, &layers);
    }
    let chains = chain_ids(&diff_ids);
    let mkfs = MkfsParams {
        size: opts.vsize,
        uuid: uuid_v4(derive16(
            "ext4-uuid",
            &format!("{} {}", diff_ids[0], opts.vsize),
        )),
        hash_seed: uuid_v4(derive16(
            "ext4-hash-seed",
            &format!("{} {}", diff_ids[0], opts.vsize),
        )),
    };

    let mut out_layers: Vec<(String, u64)> = Vec::new();
    // Committed layers, bottom to top (blobs already in the destination).
    let mut lowers: Vec<(String, Blob)> = Vec::new();
    // The layer whose commit runs on a background thread; its writable
    // files are the top of the stack the next layer is applied on.
    let mut pending: Option<Pending> = None;
    let groups: Vec<Vec<usize>> = if opts.flatten {
        vec![(0..layers.len()).collect()]
    } else {
        (0..layers.len()).map(|i| vec![i]).collect()
    };
    let params = CommitParams {
        algorithm: opts.algorithm,
        block_size: opts.block_size,
        level: opts.level,
        threads: opts.threads.max(1),
        vsize: opts.vsize,
    };
    for (out_index, group) in groups.iter().enumerate() {
        let start = Instant::now();
        let last = *group.last().expect("non-empty");
        let uuid = Uuid::from_chain_id(&chains[last])?;
        let parent = if out_index == 0 {
            Uuid::NIL
        } else {
            Uuid::from_chain_id(&chains[groups[out_index - 1].last().copied().expect("non-empty")])?
        };
        let work = scratch.join(format!("layer-{out_index}"));
        let applied = (|| -> Result<(Arc<WritableLayer>, ApplyStats, u64, u64)> {
            fs::create_dir_all(&work).map_err(|e| Error::file(&work, e))?;
            let upper = WritableLayer::create(
                work.join("data"),
                work.join("index"),
                CreateOptions {
                    virtual_size: opts.vsize,
                    uuid,
                    parent_uuid: parent,
                },
            )?;
            let lower = stack(&lowers, pending.as_ref().map(|p| p.upper.clone()))?;
            let backend = Arc::new(Mutex::new(Backend::new(
                lower,
                upper,
                opts.vsize,
                opts.cache_bytes,
            )));
            let mut apply = ApplyStats::default();
            let (mut source_bytes, mut tar_bytes) = (0, 0);
            {
                let lr = &layers;
                let layer_err = move |i: usize| move |e: Error| e.in_layer(i, &lr[i].digest);
                let first = group[0];
                let fs = if first == 0 {
                    Ext4::mkfs(backend.clone(), &mkfs).map_err(layer_err(first))?
                } else {
                    Ext4::open(backend.clone()).map_err(layer_err(first))?
                };
                for &i in group {
                    let obs = opts.observer.clone().map(|o| (o, mindex, i));
                    let (st, sb, tb) = apply_layer(src, &fs, &layers[i], &diff_ids[i], obs)
                        .map_err(layer_err(i))?;
                    apply.entries += st.entries;
                    apply.file_bytes += st.file_bytes;
                    apply.whiteouts += st.whiteouts;
                    source_bytes += sb;
                    tar_bytes += tb;
                }
                fs.close().map_err(layer_err(last))?;
            }
            let backend = recover(
                Arc::try_unwrap(backend)
                    .map_err(|_| Error::Image("internal: filesystem backend still shared".into()))?
                    .into_inner(),
            );
            let upper = backend
                .into_upper()
                .map_err(|e| Error::Image(e).in_layer(last, &layers[last].digest))?;
            Ok((Arc::new(upper), apply, source_bytes, tar_bytes))
        })();
        let (upper, apply, source_bytes, tar_bytes) = match applied {
            Ok(v) => v,
            Err(e) => {
                if let Some(p) = pending.take() {
                    let _ = p.handle.join();
                }
                return Err(e);
            }
        };
        let apply_seconds = start.elapsed().as_secs_f64();
        if let Some(o) = &opts.observer {
            o.layer_applied(mindex, last);
        }
        // One commit at a time: finish the previous layer's first.
        if let Some(p) = pending.take() {
            finish(p, dst, opts, mindex, &mut lowers, &mut out_layers, report)?;
        }
        let blob_path = work.join("blob");
        let (u, pr, bp) = (upper.clone(), params.clone(), blob_path.clone());
        let digest = layers[last].digest.clone();
        let handle = std::thread::spawn(move || {
            let t = Instant::now();
            let info =
                commit_layer(&u, &pr, uuid, parent, &bp).map_err(|e| e.in_layer(last, &digest))?;
            let (d, size) = file_digest(&bp)?;
            Ok((info, d, size, t.elapsed().as_secs_f64()))
        });
        pending = Some(Pending {
            upper,
            handle,
            work,
            blob_path,
            start,
            report: LayerReport {
                index: out_index,
                sources: group.iter().map(|&i| layers[i].digest.clone()).collect(),
                digest: String::new(),
                size: 0,
                source_bytes,
                tar_bytes,
                apply,
                commit: CommitInfo {
                    bytes: 0,
                    entries: 0,
                    padding: 0,
                    data_sectors: 0,
                },
                seconds: 0.0,
                apply_seconds,
                commit_seconds: 0.0,
            },
        });
    }
    if let Some(p) = pending.take() {
        finish(p, dst, opts, mindex, &mut lowers, &mut out_layers, report)?;
    }

    // Config: diff_ids = the new (uncompressed tar) layer digests.
    config["rootfs"]["diff_ids"] = json!(out_layers
        .iter()
        .map(|(d, _)| d.clone())
        .collect::<Vec<_>>());
    if opts.flatten {
        let mut h =
            json!({"created_by": format!("obd convert --flatten ({} layers)", layers.len())});
        if let Some(c) = config.get("created") {
            h["created"] = c.clone();
        }
        config["history"] = json!([h]);
    }
    let cfg_out = serde_json::to_vec(&config).expect("json");
    let cfg_digest = sha256_digest(&cfg_out);
    dst.put_blob(&cfg_digest, &cfg_out)?;

    let layer_mt = if docker {
        MT_DOCKER_LAYER_TAR
    } else {
        MT_OCI_LAYER_TAR
    };
    manifest["config"]["digest"] = json!(cfg_digest);
    manifest["config"]["size"] = json!(cfg_out.len());
    let cmt = manifest["config"]["mediaType"].as_str().unwrap_or("");
    if cmt == MT_OCI_CONFIG || cmt == MT_DOCKER_CONFIG || cmt.is_empty() {
        manifest["config"]["mediaType"] = json!(if docker {
            MT_DOCKER_CONFIG
        } else {
            MT_OCI_CONFIG
        });
    }
    manifest["mediaType"] = json!(mt);
    if opts.referrer {
        manifest["artifactType"] = json!(ARTIFACT_NATIVE);
        manifest["subject"] = subject_json(desc, &source_mt);
    }
    manifest["layers"] = json!(out_layers
        .iter()
        .map(|(d, s)| json!({
            "mediaType": layer_mt,
            "digest": d,
            "size": s,
            "annotations": {
                ANN_BLOB_DIGEST: d,
                ANN_BLOB_SIZE: s.to_string(),
                ANN_VERSION: "0.1.0",
                ANN_FS_TYPE: "ext4",
            }
        }))
        .collect::<Vec<_>>());
    let mb = serde_json::to_vec(&manifest).expect("json");
    let md = Descriptor {
        media_type: mt,
        digest: sha256_digest(&mb),
        size: mb.len() as u64,
    };
    dst.put_manifest(&md, &mb)?;
    report.manifests.push(md.clone());
    Ok(md)
}

/// What a background commit needs (the options minus the callback).
#[derive(Clone)]
struct CommitParams {
    algorithm: zfile::Algorithm,
    block_size: u32,
    level: i32,
    threads: usize,
    vsize: u64,
}

type CommitResult = Result<(CommitInfo, String, u64, f64)>;

/// A layer being committed in the background.
struct Pending {
    upper: Arc<WritableLayer>,
    handle: std::thread::JoinHandle<CommitResult>,
    work: PathBuf,
    blob_path: PathBuf,
    start: Instant,
    report: LayerReport,
}

/// The read-only view a layer is applied on: the committed layers plus,
/// while its commit runs, the previous layer's writable files.
fn stack(lowers: &[(String, Blob)], top: Option<Arc<WritableLayer>>) -> Result<Option<Arc<Image>>> {
    if lowers.is_empty() && top.is_none() {
        return Ok(None);
    }
    let layers = lowers
        .iter()
        .map(|(n, b)| overlaybd_core::image::Layer::open(n.clone(), b.clone()))
        .collect::<overlaybd_core::Result<Vec<_>>>()?;
    Ok(Some(Arc::new(Image::from_parts(layers, top)?)))
}

/// Waits for a background commit, stores its blob and reports the layer.
fn finish(
    p: Pending,
    dst: &dyn ImageDest,
    opts: &Options,
    mindex: usize,
    lowers: &mut Vec<(String, Blob)>,
    out_layers: &mut Vec<(String, u64)>,
    report: &mut Report,
) -> Result<()> {
    let (info, digest, size, commit_seconds) = p
        .handle
        .join()
        .map_err(|_| Error::Image("the commit thread panicked".into()))??;
    drop(p.upper);
    dst.put_blob_file(&digest, &p.blob_path)?;
    let _ = fs::remove_dir_all(&p.work);
    let local = dst.blob_path(&digest).ok_or_else(|| {
        Error::Unsupported("destination without local blobs for multi-layer conversion".into())
    })?;
    let fsrc = zfile::FileSource::open(&local).map_err(|e| Error::file(&local, e))?;
    lowers.push((digest.clone(), Arc::new(fsrc)));
    let mut lr = p.report;
    lr.digest = digest.clone();
    lr.size = size;
    lr.commit = info;
    lr.commit_seconds = commit_seconds;
    lr.seconds = p.start.elapsed().as_secs_f64();
    if let Some(cb) = &opts.progress {
        cb(&lr);
    }
    if let Some(o) = &opts.observer {
        o.layer_done(mindex, &lr);
    }
    report.layers.push(lr);
    out_layers.push((digest, size));
    Ok(())
}

/// Marks 16 random-looking bytes as a version-4 UUID.
fn uuid_v4(mut b: [u8; 16]) -> [u8; 16] {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// A reader that hashes and counts what passes through.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }
    fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hash.clone().finalize()))
    }
}

/// Streams one source layer into `fs`, checking its digest and diff_id.
/// Returns the stats, compressed bytes and tar bytes.
fn apply_layer(
    src: &dyn ImageSource,
    fs: &Ext4,
    layer: &Descriptor,
    diff_id: &str,
    observer: Option<(Arc<dyn Observer>, usize, usize)>,
) -> Result<(ApplyStats, u64, u64)> {
    let mut raw = src.open(layer)?;
    if let Some((o, m, i)) = observer {
        o.layer_start(m, i, layer.size);
        raw = Box::new(Observed {
            inner: raw,
            o,
            m,
            i,
            pending: 0,
        });
    }
    // Reading, hashing and decompressing run on their own thread, feeding
    // the (single-threaded) filesystem through a small bounded channel.
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    let (recycle_tx, recycle_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let reader = std::thread::spawn(move || decompress(raw, tx, recycle_rx));
    let mut chunks = ChannelReader {
        rx,
        recycle: recycle_tx,
        buf: Vec::new(),
        pos: 0,
    };
    let applied = Applier::new(fs).apply(&mut chunks).and_then(|st| {
        io::copy(&mut chunks, &mut io::sink())
            .map_err(|e| Error::io("reading the layer tail", e))?;
        Ok(st)
    });
    drop(chunks);
    let read = reader
        .join()
        .map_err(|_| Error::Image("the layer reader thread panicked".into()))?;
    let stats = applied?;
    let r = read?;
    if r.tar_digest != diff_id {
        return Err(Error::Image(format!(
            "uncompressed layer has digest {}, but the config's diff_id is {diff_id}",
            r.tar_digest
        )));
    }
    if r.blob_digest != layer.digest {
        return Err(Error::Image(format!(
            "blob has digest {}, expected {}",
            r.blob_digest, layer.digest
        )));
    }
    Ok((stats, r.blob_bytes, r.tar_bytes))
}

/// Reports bytes read to an [`Observer`] (every 256 KiB and at the end).
struct Observed {
    inner: Box<dyn Read + Send>,
    o: Arc<dyn Observer>,
    m: usize,
    i: usize,
    pending: u64,
}

impl Read for Observed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pending += n as u64;
        if self.pending >= 256 << 10 || (n == 0 && self.pending > 0) {
            self.o.layer_read(self.m, self.i, self.pending);
            self.pending = 0;
        }
        Ok(n)
    }
}

/// What the layer reader thread saw.
struct ReadSummary {
    blob_digest: String,
    blob_bytes: u64,
    tar_digest: String,
    tar_bytes: u64,
}

/// Reads a layer blob (gzip, zstd or plain, by magic), hashing both the
/// blob and the tar, and sends the tar in 1 MiB chunks.
fn decompress(
    raw: Box<dyn Read + Send>,
    tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
    recycle: std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<ReadSummary> {
    let mut hashed = Hashing::new(raw);
    let (tar_digest, tar_bytes);
    {
        let mut buffered = BufReader::with_capacity(1 << 20, &mut hashed);
        let head = buffered
            .fill_buf()
            .map_err(|e| Error::io("reading the layer", e))?
            .to_vec();
        let decoder: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(buffered))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered)
                    .map_err(|e| Error::io("starting the zstd decoder", e))?,
            )
        } else {
            Box::new(buffered)
        };
        let mut tar = Hashing::new(decoder);
        loop {
            let mut chunk = recycle.try_recv().unwrap_or_default();
            chunk.resize(1 << 20, 0);
            let mut n = 0;
            while n < chunk.len() {
                match tar.read(&mut chunk[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let msg = e.to_string();
                        let _ = tx.send(Err(e));
                        return Err(Error::Image(format!("decompressing the layer: {msg}")));
                    }
                }
            }
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            if tx.send(Ok(chunk)).is_err() {
                // The applier stopped (it reports its own error).
                return Err(Error::Image("layer application stopped".into()));
            }
        }
        tar_digest = tar.digest();
        tar_bytes = tar.bytes;
    }
    drop(tx);
    io::copy(&mut hashed, &mut io::sink()).map_err(|e| Error::io("reading the layer tail", e))?;
    Ok(ReadSummary {
        blob_digest: hashed.digest(),
        blob_bytes: hashed.bytes,
        tar_digest,
        tar_bytes,
    })
}

/// `Read` over the chunks the reader thread sends.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    recycle: std::sync::mpsc::SyncSender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    let old = std::mem::replace(&mut self.buf, b);
                    if old.capacity() > 0 {
                        // Hand the buffer back; dropped if the reader is gone
                        // or has enough spares.
                        let _ = self.recycle.try_send(old);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Commits `upper` as tar(ZFile(LSMT)) into `path`.
fn commit_layer(
    upper: &WritableLayer,
    opts: &CommitParams,
    uuid: Uuid,
    parent: Uuid,
    path: &Path,
) -> Result<CommitInfo> {
    let mut out = File::create(path).map_err(|e| Error::file(path, e))?;
    let tw = TarWriter::begin(&mut out)?;
    let mut z = zfile::ZFileWriter::new(
        &mut out,
        zfile::Options {
            algorithm: opts.algorithm,
            block_size: opts.block_size,
            threads: opts.threads,
            level: opts.level,
        },
    )?;
    let info = upper.commit(
        &CommitOptions {
            uuid: Some(uuid),
            parent_uuid: Some(parent),
            virtual_size: Some(opts.vsize),
            ..Default::default()
        },
        &mut z,
    )?;
    let (_, zi) = z.finish()?;
    tw.finish(&mut out, zi.zfile_size)?;
    Ok(info)
}

fn file_digest(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(|e| Error::file(path, e))?;
    let mut h = Hashing::new(&mut f);
    io::copy(&mut h, &mut io::sink()).map_err(|e| Error::file(path, e))?;
    Ok((h.digest(), h.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let c = chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(c[0], "sha256:a");
        assert_eq!(c[1], sha256_digest(b"sha256:a sha256:b"));
    }
}
