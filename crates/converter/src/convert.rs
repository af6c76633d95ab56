//! The conversion pipeline: per source layer, apply its tar to the ext4 on
//! top of the layers converted so far, commit the block delta as a
//! tar(ZFile(LSMT)) blob (and, unless turned off, its piece table: a blob
//! whose digest the layer's annotations name, for verified lazy reads), then
//! write the config (diff_ids replaced) and the manifest with the overlaybd
//! annotations, and tag it last.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use obd_remote::oci::{
    self, chain_ids, layer_compression, set_verity_annotations, Config, Document, History, Index,
    LayerCompression, Manifest, Platform, Verity, ANN_ACCEL, ANN_BLOB_DIGEST, ANN_BLOB_SIZE,
    ANN_FS_TYPE, ANN_VERSION, ARTIFACT_NATIVE, MT_DOCKER_CONFIG, MT_DOCKER_LAYER_TAR,
    MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_LAYER_TAR,
    MT_OCI_MANIFEST, VERSION_NATIVE,
};
use obd_remote::verity::{piece_size_for, PieceHasher};
use overlaybd_core::image::Image;
use overlaybd_core::lsmt::{CommitInfo, CommitOptions, CreateOptions, Uuid, WritableLayer};
use overlaybd_core::source::Blob;
use overlaybd_core::tar::TarWriter;
use sha2::{Digest, Sha256};
use zfile::sync::recover;

use crate::apply::{Applier, ApplyStats};
use crate::error::{escape, Error, Result};
use crate::fs::{Ext4, MkfsParams};
use crate::io::Backend;
use crate::oci::{sha256_digest, Descriptor, ImageDest, ImageSource};

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

/// The default codec of converted layers: zstd, which every reader
/// (upstream overlaybd v1.0.18 included) decodes, for layers ~1.1× the size
/// of gzip ones where LZ4 makes them ~1.6× (docs/BENCHMARKS.md, issue 18).
/// LZ4 in 4 KiB blocks, level unused, is upstream's default output.
pub const DEFAULT_ALGORITHM: zfile::Algorithm = zfile::Algorithm::Zstd;
/// The default ZFile block size: 32 KiB, the largest upstream reads.
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 10;
/// The default zstd level.
pub const DEFAULT_LEVEL: i32 = 9;

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
    /// Store a piece table beside each layer blob and name it in the layer's
    /// annotations (verified lazy reads). Off: upstream's output exactly.
    pub verity: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            algorithm: DEFAULT_ALGORITHM,
            block_size: DEFAULT_BLOCK_SIZE,
            level: DEFAULT_LEVEL,
            vsize: 64 << 30,
            flatten: false,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cache_bytes: 64 << 20,
            progress: None,
            observer: None,
            media_types: MediaTypes::Source,
            platforms: Vec::new(),
            referrer: false,
            verity: true,
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
    /// The blob's piece table (a blob of its own), unless turned off.
    pub verity: Option<Verity>,
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

impl LayerReport {
    /// The report of an applied layer whose commit is still to come.
    fn applied(
        index: usize,
        sources: Vec<String>,
        (source_bytes, tar_bytes): (u64, u64),
        apply: ApplyStats,
        apply_seconds: f64,
    ) -> LayerReport {
        LayerReport {
            index,
            sources,
            digest: String::new(),
            size: 0,
            verity: None,
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
        }
    }
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
    let want = opts
        .platforms
        .iter()
        .map(|p| Platform::parse(p).map_err(|e| Error::Unsupported(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let root = src.root()?;
    let bytes = src.read_small(&root)?;
    let doc = Document::parse(&root.media_type, &bytes).map_err(|e| Error::Json {
        what: escape(root.digest.as_bytes()),
        error: e,
    })?;
    let scratch = Scratch(dst.scratch_dir()?);
    let mut run = Run {
        src,
        dst,
        opts,
        scratch: &scratch.0,
        report: Report {
            root: root.clone(),
            manifests: Vec::new(),
            layers: Vec::new(),
        },
    };
    let new_root = match doc {
        Document::Index(idx) => run.index(&root, *idx, &want)?,
        Document::Manifest(_) => run.manifest(&root, None)?,
    };
    dst.tag(&new_root)?;
    let mut report = run.report;
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

fn derive16(label: &str, input: &str) -> [u8; 16] {
    let h = Sha256::digest(format!("obd-convert/{label}\n{input}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b
}

/// One conversion: where from, where to, how, and what it did so far.
struct Run<'a> {
    src: &'a dyn ImageSource,
    dst: &'a dyn ImageDest,
    opts: &'a Options,
    scratch: &'a Path,
    report: Report,
}

/// A source manifest with its config, checked for conversion.
struct Source {
    manifest: Manifest,
    /// The manifest's own media type (else its descriptor's).
    media_type: String,
    config: Config,
}

/// A converted layer blob: (digest, size).
type OutLayer = (String, u64);

/// A converted layer: its blob and its piece table.
type OutBlob = (OutLayer, Option<Verity>);

impl Run<'_> {
    /// Converts every wanted platform of an index (attestations and other
    /// `unknown/unknown` entries left out) and writes the index.
    fn index(
        &mut self,
        root: &Descriptor,
        mut idx: Index,
        want: &[Platform],
    ) -> Result<Descriptor> {
        let media_type = if idx.media_type.is_empty() {
            root.media_type.clone()
        } else {
            idx.media_type.clone()
        };
        let mut kept = Vec::new();
        for m in std::mem::take(&mut idx.manifests) {
            let plat = m.platform.as_ref();
            if plat.is_some_and(|p| p.os == "unknown" && p.architecture == "unknown") {
                // BuildKit attestations and the like: not images.
                continue;
            }
            if !want.is_empty() && !want.iter().any(|w| plat.is_some_and(|p| w.matches(p))) {
                continue;
            }
            let name = plat.map(Platform::to_string);
            let nd = self.manifest(&m, name.as_deref())?;
            kept.push(Descriptor {
                media_type: nd.media_type,
                digest: nd.digest,
                size: nd.size,
                ..m
            });
        }
        if kept.is_empty() {
            return Err(Error::Image(if want.is_empty() {
                "the index lists no image manifests".to_string()
            } else {
                format!(
                    "no manifest in the index matches --platform {}",
                    self.opts.platforms.join(",")
                )
            }));
        }
        idx.manifests = kept;
        idx.media_type = match effective(self.opts) {
            MediaTypes::Source => media_type.clone(),
            MediaTypes::Docker => MT_DOCKER_LIST.to_string(),
            MediaTypes::Oci => MT_OCI_INDEX.to_string(),
        };
        if self.opts.referrer {
            idx.artifact_type = Some(ARTIFACT_NATIVE.into());
            idx.subject = Some(Descriptor::new(media_type, &root.digest, root.size));
        }
        let b = oci::to_json(&idx);
        let d = Descriptor::new(idx.media_type, sha256_digest(&b), b.len() as u64);
        self.dst.put_manifest(&d, &b)?;
        Ok(d)
    }

    /// Converts the image manifest `desc` (of `platform`, from an index):
    /// its layers, then its config and the manifest.
    fn manifest(&mut self, desc: &Descriptor, platform: Option<&str>) -> Result<Descriptor> {
        let mindex = self.report.manifests.len();
        let source = self.load(desc)?;
        let layers = &source.manifest.layers;
        if let Some(o) = &self.opts.observer {
            o.manifest_start(mindex, platform, layers);
        }
        let out = self.layers(mindex, layers, &source.config.rootfs.diff_ids)?;
        let (cfg_digest, cfg_size) = self.write_config(&source.config, &out, layers.len())?;
        let (mt, mb) = self.manifest_bytes(desc, source, (cfg_digest, cfg_size), &out);
        let md = Descriptor::new(mt, sha256_digest(&mb), mb.len() as u64);
        self.dst.put_manifest(&md, &mb)?;
        self.report.manifests.push(md.clone());
        Ok(md)
    }

    /// Reads the manifest `desc` and its config, and checks that they can
    /// be converted.
    fn load(&self, desc: &Descriptor) -> Result<Source> {
        let bytes = self.src.read_small(desc)?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            what: format!("manifest {}", escape(desc.digest.as_bytes())),
            error: e,
        })?;
        // overlaybd layers may form the bottom of the image (one built FROM
        // an obd image): they are kept. Above an OCI layer they make no
        // sense, and an image of nothing else has nothing to convert.
        let obd: Vec<bool> = manifest
            .layers
            .iter()
            .map(|l| l.annotation(ANN_BLOB_DIGEST).is_some())
            .collect();
        if !obd.is_empty() && obd.iter().all(|&o| o) {
            return Err(Error::Image(
                "every layer already is an overlaybd layer: nothing to convert".into(),
            ));
        }
        if let Some(i) = obd.iter().skip_while(|&&o| o).position(|&o| o) {
            let i = i + obd.iter().take_while(|&&o| o).count();
            return Err(Error::Image(format!(
                "layer {i} is an overlaybd layer above an OCI layer"
            )));
        }
        let cfg_bytes = self.src.read_small(&manifest.config)?;
        let config: Config = serde_json::from_slice(&cfg_bytes).map_err(|e| Error::Json {
            what: format!("config {}", escape(manifest.config.digest.as_bytes())),
            error: e,
        })?;
        let (layers, diff_ids) = (manifest.layers.len(), config.rootfs.diff_ids.len());
        if diff_ids != layers {
            return Err(Error::Image(format!(
                "{layers} layers but {diff_ids} diff_ids"
            )));
        }
        if layers == 0 {
            return Err(Error::Image("image without layers".into()));
        }
        if layers > overlaybd_core::config::MAX_LAYERS {
            return Err(Error::Unsupported(format!(
                "{layers} layers; at most {} can be stacked (use --flatten)",
                overlaybd_core::config::MAX_LAYERS
            )));
        }
        let media_type = check_media_types(desc, &manifest)?;
        Ok(Source {
            manifest,
            media_type,
            config,
        })
    }

    /// The output manifest media type for a source manifest of type `mt`,
    /// and whether the output uses Docker types.
    fn output_type(&self, mt: &str) -> (String, bool) {
        let docker = match effective(self.opts) {
            MediaTypes::Source => mt == MT_DOCKER_MANIFEST,
            MediaTypes::Docker => true,
            MediaTypes::Oci => false,
        };
        let out = if docker {
            MT_DOCKER_MANIFEST
        } else if mt == MT_DOCKER_MANIFEST {
            MT_OCI_MANIFEST
        } else {
            mt
        };
        (out.to_string(), docker)
    }

    /// Writes the config: the source's with `rootfs.diff_ids` replaced by
    /// the output layers (the history too when flattening). Returns its
    /// digest and size.
    fn write_config(&self, config: &Config, out: &[OutBlob], sources: usize) -> Result<OutLayer> {
        let mut config = config.clone();
        config.rootfs.diff_ids = out.iter().map(|((d, _), _)| d.clone()).collect();
        if self.opts.flatten {
            config.history = vec![History {
                created: config
                    .other
                    .get("created")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                created_by: Some(format!("obd convert --flatten ({sources} layers)")),
                ..Default::default()
            }];
        }
        let bytes = oci::to_json(&config);
        let digest = sha256_digest(&bytes);
        self.dst.put_blob(&digest, &bytes)?;
        Ok((digest, bytes.len() as u64))
    }

    /// The output manifest: the source's with the new config, the overlaybd
    /// layers and the output media types (and the referrer fields).
    /// Returns (its media type, its bytes).
    fn manifest_bytes(
        &self,
        desc: &Descriptor,
        source: Source,
        (cfg_digest, cfg_size): OutLayer,
        out: &[OutBlob],
    ) -> (String, Vec<u8>) {
        let (mt, docker) = self.output_type(&source.media_type);
        let mut m = source.manifest;
        m.config.digest = cfg_digest;
        m.config.size = cfg_size;
        let cmt = m.config.media_type.as_str();
        if cmt == MT_OCI_CONFIG || cmt == MT_DOCKER_CONFIG || cmt.is_empty() {
            m.config.media_type = (if docker {
                MT_DOCKER_CONFIG
            } else {
                MT_OCI_CONFIG
            })
            .into();
        }
        m.media_type = mt.clone();
        if self.opts.referrer {
            m.artifact_type = Some(ARTIFACT_NATIVE.into());
            m.subject = Some(Descriptor::new(source.media_type, &desc.digest, desc.size));
        }
        let layer_mt = if docker {
            MT_DOCKER_LAYER_TAR
        } else {
            MT_OCI_LAYER_TAR
        };
        m.layers = out
            .iter()
            .map(|((d, s), verity)| layer_descriptor(layer_mt, (d, *s), verity.as_ref()))
            .collect();
        (mt, oci::to_json(&m))
    }

    /// Converts the layers (one output layer each, or one in all when
    /// flattening): layer N+1 is applied on top of layer N's writable files
    /// while layer N is committed on another thread. Returns the output
    /// blobs, bottom first.
    fn layers(
        &mut self,
        mindex: usize,
        layers: &[Descriptor],
        diff_ids: &[String],
    ) -> Result<Vec<OutBlob>> {
        let opts = self.opts;
        let chains = chain_ids(diff_ids);
        let mut out: Vec<OutBlob> = Vec::new();
        // Committed layers, bottom to top (blobs already in the destination).
        let mut lowers: Vec<(String, Blob)> = Vec::new();
        // overlaybd layers at the bottom are kept as they are; the layers
        // above are converted on top of them, with their disk size.
        let base = self.keep_obd_base(mindex, layers, diff_ids, &mut lowers, &mut out)?;
        if base > 0 && opts.flatten {
            return Err(Error::Unsupported(format!(
                "--flatten of an image whose {base} bottom layer(s) already are overlaybd layers"
            )));
        }
        let (vsize, mut parent) = match lowers.last() {
            Some((name, blob)) => {
                let top = overlaybd_core::image::Layer::open(name.clone(), blob.clone())?;
                let h = top.lsmt.header();
                (top.lsmt.virtual_size(), h.uuid()?)
            }
            None => (opts.vsize, Uuid::NIL),
        };
        let seed = format!("{} {}", diff_ids[0], vsize);
        let mkfs = MkfsParams {
            size: vsize,
            uuid: uuid_v4(derive16("ext4-uuid", &seed)),
            hash_seed: uuid_v4(derive16("ext4-hash-seed", &seed)),
        };
        // The layer whose commit runs on a background thread; its writable
        // files are the top of the stack the next layer is applied on.
        let mut pending: Option<Pending> = None;
        let groups: Vec<Vec<usize>> = if opts.flatten {
            vec![(0..layers.len()).collect()]
        } else {
            (base..layers.len()).map(|i| vec![i]).collect()
        };
        let params = CommitParams {
            algorithm: opts.algorithm,
            block_size: opts.block_size,
            level: opts.level,
            threads: opts.threads.max(1),
            vsize,
        };
        for (group_index, group) in groups.iter().enumerate() {
            let out_index = base + group_index;
            let start = Instant::now();
            let last = *group.last().expect("non-empty");
            let uuid = Uuid::from_chain_id(&chains[last])?;
            let parent = std::mem::replace(&mut parent, uuid);
            let work = self.scratch.join(format!("layer-{out_index}"));
            let group_job = Group {
                mindex,
                layers,
                diff_ids,
                members: group,
                uuid,
                parent,
                mkfs: &mkfs,
                vsize,
                work: &work,
            };
            let lower_top = pending.as_ref().map(|p| p.upper.clone());
            let (upper, apply, source_bytes, tar_bytes) =
                self.apply_group(&group_job, &lowers, lower_top)?;
            let apply_seconds = start.elapsed().as_secs_f64();
            if let Some(o) = &opts.observer {
                o.layer_applied(mindex, last);
            }
            // One commit at a time: finish the previous layer's first.
            if let Some(p) = pending.take() {
                self.finish(p, mindex, &mut lowers, &mut out)?;
            }
            let blob_path = work.join("blob");
            let (u, pr, bp) = (upper.clone(), params, blob_path.clone());
            let digest = layers[last].digest.clone();
            let verity = opts.verity;
            let handle = std::thread::spawn(move || {
                let t = Instant::now();
                let info = commit_layer(&u, &pr, uuid, parent, &bp)
                    .map_err(|e| e.in_layer(last, &digest))?;
                let (d, size, table) = file_digest(&bp, verity)?;
                Ok((info, d, size, table, t.elapsed().as_secs_f64()))
            });
            pending = Some(Pending {
                upper,
                handle: Commit(Some(handle)),
                work,
                blob_path,
                start,
                report: LayerReport::applied(
                    out_index,
                    group.iter().map(|&i| layers[i].digest.clone()).collect(),
                    (source_bytes, tar_bytes),
                    apply,
                    apply_seconds,
                ),
            });
        }
        if let Some(p) = pending.take() {
            self.finish(p, mindex, &mut lowers, &mut out)?;
        }
        Ok(out)
    }

    /// Keeps the overlaybd layers at the bottom of `layers` as they are: an
    /// image built FROM an obd image carries them, with their annotations or
    /// without (BuildKit 0.13 drops them). Each is copied to the destination
    /// (with a piece table, unless turned off) and becomes a lower of the
    /// layers converted on top. Returns how many there are.
    fn keep_obd_base(
        &mut self,
        mindex: usize,
        layers: &[Descriptor],
        diff_ids: &[String],
        lowers: &mut Vec<(String, Blob)>,
        out: &mut Vec<OutBlob>,
    ) -> Result<usize> {
        let mut vsize = None;
        for (i, l) in layers.iter().enumerate() {
            let at = |e: Error| e.in_layer(i, &l.digest);
            if l.annotation(ANN_BLOB_DIGEST).is_none() && !self.looks_obd(l).map_err(at)? {
                // Overlaybd layers above (annotated ones are refused by
                // `load`, the others by the applier) are not unpacked.
                return Ok(i);
            }
            if l.annotation(ANN_ACCEL) == Some("yes") {
                return Err(at(Error::Unsupported(
                    "an acceleration (trace) layer cannot be kept: convert the image without it"
                        .into(),
                )));
            }
            let size = self
                .keep_layer(mindex, i, l, &diff_ids[i], lowers, out)
                .map_err(at)?;
            if *vsize.get_or_insert(size) != size {
                return Err(at(Error::Image(format!(
                    "its disk is {size} bytes, the layers below it {} bytes",
                    vsize.unwrap_or_default()
                ))));
            }
        }
        Ok(layers.len())
    }

    /// Whether the uncompressed layer `l` is a tar-wrapped overlaybd blob (a
    /// one-file tar `overlaybd.commit` holding a ZFile or LSMT file); reads
    /// its first 2 KiB.
    fn looks_obd(&self, l: &Descriptor) -> Result<bool> {
        if layer_compression(&l.media_type) != Some(LayerCompression::None) {
            return Ok(false);
        }
        let mut head = Vec::with_capacity(2048);
        self.src
            .open(l)?
            .take(2048)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(format!("reading {}", escape(l.digest.as_bytes())), e))?;
        Ok(is_wrapped_obd(&head, l.size))
    }

    /// Copies the overlaybd layer `l` (source position `index`) to the
    /// destination, checked against its descriptor, and pushes it onto
    /// `lowers` and `out`. Returns its disk size.
    fn keep_layer(
        &mut self,
        mindex: usize,
        index: usize,
        l: &Descriptor,
        diff_id: &str,
        lowers: &mut Vec<(String, Blob)>,
        out: &mut Vec<OutBlob>,
    ) -> Result<u64> {
        let start = Instant::now();
        if diff_id != l.digest {
            return Err(Error::Image(format!(
                "an overlaybd layer is stored uncompressed, but its diff_id {} is not its digest",
                escape(diff_id.as_bytes())
            )));
        }
        if let Some(o) = &self.opts.observer {
            o.layer_start(mindex, index, l.size);
        }
        let work = self.scratch.join(format!("base-{index}"));
        fs::create_dir_all(&work).map_err(|e| Error::file(&work, e))?;
        let path = work.join("blob");
        {
            let mut f = File::create(&path).map_err(|e| Error::file(&path, e))?;
            io::copy(&mut self.src.open(l)?.take(l.size + 1), &mut f)
                .map_err(|e| Error::io(format!("copying {}", escape(l.digest.as_bytes())), e))?;
        }
        let (digest, size, table) = file_digest(&path, self.opts.verity)?;
        if digest != l.digest || size != l.size {
            return Err(Error::Image(format!(
                "the blob has digest {digest} and {size} bytes (its descriptor says {} bytes)",
                l.size
            )));
        }
        let fsrc = zfile::FileSource::open(&path).map_err(|e| Error::file(&path, e))?;
        let vsize = overlaybd_core::image::Layer::open(digest.clone(), Arc::new(fsrc))?
            .lsmt
            .virtual_size();
        let mut lr = LayerReport::applied(
            index,
            vec![digest.clone()],
            (size, 0),
            ApplyStats::default(),
            0.0,
        );
        lr.seconds = start.elapsed().as_secs_f64();
        self.store(mindex, &path, (digest, size, table), lr, lowers, out)?;
        let _ = fs::remove_dir_all(&work);
        Ok(vsize)
    }

    /// Waits for a background commit, stores its blob and reports the layer.
    fn finish(
        &mut self,
        p: Pending,
        mindex: usize,
        lowers: &mut Vec<(String, Blob)>,
        out: &mut Vec<OutBlob>,
    ) -> Result<()> {
        let (info, digest, size, table, commit_seconds) = p.handle.join()?;
        drop(p.upper);
        let mut lr = p.report;
        lr.commit = info;
        lr.commit_seconds = commit_seconds;
        lr.seconds = p.start.elapsed().as_secs_f64();
        self.store(mindex, &p.blob_path, (digest, size, table), lr, lowers, out)?;
        let _ = fs::remove_dir_all(&p.work);
        Ok(())
    }

    /// Stores an output layer's blob (at `blob`) and its encoded piece table
    /// `table` in the destination, makes it the top lower of the next layers
    /// and reports it with `lr` (its digest, size and piece table set here).
    fn store(
        &mut self,
        mindex: usize,
        blob: &Path,
        (digest, size, table): (String, u64, Option<Vec<u8>>),
        mut lr: LayerReport,
        lowers: &mut Vec<(String, Blob)>,
        out: &mut Vec<OutBlob>,
    ) -> Result<()> {
        let verity = match table {
            Some(t) => {
                let v = Verity {
                    digest: sha256_digest(&t),
                    size: t.len() as u64,
                };
                self.dst.put_blob(&v.digest, &t)?;
                Some(v)
            }
            None => None,
        };
        self.dst.put_blob_file(&digest, blob)?;
        let local = self.dst.blob_path(&digest).ok_or_else(|| {
            Error::Unsupported("destination without local blobs for multi-layer conversion".into())
        })?;
        let fsrc = zfile::FileSource::open(&local).map_err(|e| Error::file(&local, e))?;
        lowers.push((digest.clone(), Arc::new(fsrc)));
        lr.digest = digest.clone();
        lr.size = size;
        lr.verity = verity.clone();
        if let Some(cb) = &self.opts.progress {
            cb(&lr);
        }
        if let Some(o) = &self.opts.observer {
            o.layer_done(mindex, &lr);
        }
        self.report.layers.push(lr);
        out.push(((digest, size), verity));
        Ok(())
    }

    /// Applies the source layers of one output layer to a new writable
    /// layer over `lowers` (and `top`, the previous layer still being
    /// committed). Returns the writable layer, the apply stats, and the
    /// compressed and tar bytes read.
    fn apply_group(
        &self,
        g: &Group<'_>,
        lowers: &[(String, Blob)],
        top: Option<Arc<WritableLayer>>,
    ) -> Result<(Arc<WritableLayer>, ApplyStats, u64, u64)> {
        let opts = self.opts;
        let last = *g.members.last().expect("non-empty");
        fs::create_dir_all(g.work).map_err(|e| Error::file(g.work, e))?;
        let upper = WritableLayer::create(
            g.work.join("data"),
            g.work.join("index"),
            CreateOptions {
                virtual_size: g.vsize,
                uuid: g.uuid,
                parent_uuid: g.parent,
            },
        )?;
        let lower = stack(lowers, top)?;
        let backend = Arc::new(Mutex::new(Backend::new(
            lower,
            upper,
            g.vsize,
            opts.cache_bytes,
        )));
        let mut apply = ApplyStats::default();
        let (mut source_bytes, mut tar_bytes) = (0, 0);
        {
            let layer_err = |i: usize| move |e: Error| e.in_layer(i, &g.layers[i].digest);
            let first = g.members[0];
            let fs = if first == 0 {
                Ext4::mkfs(backend.clone(), g.mkfs).map_err(layer_err(first))?
            } else {
                Ext4::open(backend.clone()).map_err(layer_err(first))?
            };
            for &i in g.members {
                let obs = opts.observer.clone().map(|o| (o, g.mindex, i));
                let (st, sb, tb) = apply_layer(self.src, &fs, &g.layers[i], &g.diff_ids[i], obs)
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
            .map_err(|e| Error::Image(e).in_layer(last, &g.layers[last].digest))?;
        Ok((Arc::new(upper), apply, source_bytes, tar_bytes))
    }
}

/// One output layer: the source layers it is made of and where it goes.
struct Group<'a> {
    mindex: usize,
    layers: &'a [Descriptor],
    diff_ids: &'a [String],
    /// Positions in `layers`, bottom first.
    members: &'a [usize],
    uuid: Uuid,
    parent: Uuid,
    mkfs: &'a MkfsParams,
    /// The disk size (the kept overlaybd base layers', else the option's).
    vsize: u64,
    work: &'a Path,
}

/// What a background commit needs (the options minus the callback).
/// How a layer blob is committed: its ZFile codec and the disk's size.
#[derive(Clone, Copy, Debug)]
pub struct CommitParams {
    /// ZFile codec.
    pub algorithm: zfile::Algorithm,
    /// ZFile block size in bytes.
    pub block_size: u32,
    /// Codec level.
    pub level: i32,
    /// Compression threads.
    pub threads: usize,
    /// The disk's virtual size in bytes.
    pub vsize: u64,
}

impl CommitParams {
    /// The defaults of `obd convert` for a disk of `vsize` bytes.
    pub fn defaults(vsize: u64) -> Self {
        let o = Options::default();
        CommitParams {
            algorithm: o.algorithm,
            block_size: o.block_size,
            level: o.level,
            threads: o.threads,
            vsize,
        }
    }
}

/// A commit's outcome: what it wrote, the blob's digest and size, its
/// encoded piece table (when asked for) and the seconds it took.
type CommitResult = Result<(CommitInfo, String, u64, Option<Vec<u8>>, f64)>;

/// A layer being committed in the background.
struct Pending {
    upper: Arc<WritableLayer>,
    handle: Commit,
    work: PathBuf,
    blob_path: PathBuf,
    start: Instant,
    report: LayerReport,
}

/// The thread committing a layer. Dropping it (an error path) waits for
/// the commit, so that nothing writes into the scratch directory while it
/// is being removed.
struct Commit(Option<std::thread::JoinHandle<CommitResult>>);

impl Commit {
    /// Waits for the commit's result.
    fn join(mut self) -> CommitResult {
        self.0
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| Error::Image("the commit thread panicked".into()))?
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
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

/// The media type of the image manifest `desc` names (the document's own,
/// else its descriptor's), after checking that the manifest, its config
/// and every layer have media types the converter knows and that the
/// document and its descriptor agree.
fn check_media_types(desc: &Descriptor, manifest: &Manifest) -> Result<String> {
    let bad = |what: &str, d: &Descriptor, mt: &str, detail: &str| Error::MediaType {
        what: what.to_string(),
        digest: escape(d.digest.as_bytes()),
        media_type: escape(mt.as_bytes()),
        detail: detail.to_string(),
    };
    let (own, described) = (manifest.media_type.as_str(), desc.media_type.as_str());
    if !own.is_empty() && !described.is_empty() && own != described {
        return Err(bad(
            "manifest",
            desc,
            own,
            &format!("its descriptor says `{}`", escape(described.as_bytes())),
        ));
    }
    let mt = if own.is_empty() { described } else { own };
    if mt != MT_OCI_MANIFEST && mt != MT_DOCKER_MANIFEST {
        return Err(bad(
            "manifest",
            desc,
            mt,
            "not an image manifest (OCI or Docker schema 2)",
        ));
    }
    let cmt = manifest.config.media_type.as_str();
    if cmt != MT_OCI_CONFIG && cmt != MT_DOCKER_CONFIG {
        return Err(bad(
            "config",
            &manifest.config,
            cmt,
            "not an image config (OCI or Docker)",
        ));
    }
    for (i, l) in manifest.layers.iter().enumerate() {
        if layer_compression(&l.media_type).is_none() {
            return Err(bad(
                &format!("layer {i}"),
                l,
                &l.media_type,
                "not a known image layer type",
            ));
        }
    }
    Ok(mt.to_string())
}

/// Whether `head`, the first bytes of a blob of `size` bytes, is the start
/// of a tar-wrapped overlaybd blob: a ustar header (after a PAX header, if
/// any) naming `overlaybd.commit`, then the ZFile or LSMT magic.
fn is_wrapped_obd(head: &[u8], size: u64) -> bool {
    let Ok(Some(p)) = overlaybd_core::tar::detect(&Head { head, size }) else {
        return false;
    };
    let Some(off) = usize::try_from(p.offset).ok().filter(|&o| o >= 512) else {
        return false;
    };
    let (Some(name), Some(inner)) = (head.get(off - 512..off - 512 + 17), head.get(off..)) else {
        return false;
    };
    name == b"overlaybd.commit\0"
        && (zfile::is_zfile(inner) || inner.starts_with(&overlaybd_core::lsmt::header::MAGIC0))
}

/// The first bytes of a blob, as a source of the blob's size whose reads
/// past them fail (for [`overlaybd_core::tar::detect`]).
struct Head<'a> {
    head: &'a [u8],
    size: u64,
}

impl zfile::ReadAt for Head<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let rest = usize::try_from(offset)
            .ok()
            .and_then(|o| self.head.get(o..))
            .filter(|r| r.len() >= buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the blob's head"))?;
        buf.copy_from_slice(&rest[..buf.len()]);
        Ok(buf.len())
    }
    fn size(&self) -> u64 {
        self.size
    }
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
    let desc = layer.clone();
    let reader = std::thread::spawn(move || decompress(raw, &desc, tx, recycle_rx));
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
    // The source's fault (a lying size or media type, a corrupt stream)
    // comes first: what the applier saw of it is only a consequence.
    let r = read?;
    let stats = applied?;
    let Some(r) = r else {
        return Err(Error::Image(
            "internal: the layer reader stopped before the applier".into(),
        ));
    };
    if r.tar_digest != diff_id {
        return Err(Error::Image(format!(
            "uncompressed layer has digest {}, but the config's diff_id is {}",
            r.tar_digest,
            escape(diff_id.as_bytes())
        )));
    }
    if r.blob_digest != layer.digest {
        return Err(Error::Image(format!(
            "blob has digest {}, expected {}",
            r.blob_digest,
            escape(layer.digest.as_bytes())
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

/// Reads the layer blob `desc` describes, hashing both the blob and the
/// tar, and sends the tar in 1 MiB chunks. The blob must be compressed as
/// its media type says (gzip, zstd or none, told by magic) and be exactly
/// `desc.size` bytes long (no more than one byte past that is read).
/// `Ok(None)`: the applier stopped first (it reports its own error).
fn decompress(
    raw: Box<dyn Read + Send>,
    desc: &Descriptor,
    tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
    recycle: std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<Option<ReadSummary>> {
    let mut hashed = Hashing::new(raw.take(desc.size.saturating_add(1)));
    let size_error = |actual: u64| Error::BlobSize {
        digest: escape(desc.digest.as_bytes()),
        expected: desc.size,
        actual,
    };
    let (tar_digest, tar_bytes);
    // A decompression error, reported once the blob's size is known.
    let mut failed = None;
    {
        let mut buffered = BufReader::with_capacity(1 << 20, &mut hashed);
        let head = buffered
            .fill_buf()
            .map_err(|e| Error::io("reading the layer", e))?
            .to_vec();
        let found = if head.starts_with(&[0x1f, 0x8b]) {
            LayerCompression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            LayerCompression::Zstd
        } else {
            LayerCompression::None
        };
        if layer_compression(&desc.media_type) != Some(found) {
            if buffered.get_ref().bytes > desc.size {
                // Too few bytes to tell: the size is the lie.
                return Err(size_error(buffered.get_ref().bytes));
            }
            return Err(Error::MediaType {
                what: "layer".into(),
                digest: escape(desc.digest.as_bytes()),
                media_type: escape(desc.media_type.as_bytes()),
                detail: match found {
                    LayerCompression::None => "the blob is not compressed that way".into(),
                    c => format!("the blob is {c:?}-compressed").to_lowercase(),
                },
            });
        }
        let decoder: Box<dyn Read + '_> = match found {
            LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
            LayerCompression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered)
                    .map_err(|e| Error::io("starting the zstd decoder", e))?,
            ),
            LayerCompression::None => Box::new(buffered),
        };
        let mut tar = Hashing::new(decoder);
        'chunks: loop {
            let mut chunk = recycle.try_recv().unwrap_or_default();
            chunk.resize(1 << 20, 0);
            let mut n = 0;
            while n < chunk.len() {
                match tar.read(&mut chunk[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(e.to_string());
                        let _ = tx.send(Err(e));
                        break 'chunks;
                    }
                }
            }
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            if tx.send(Ok(chunk)).is_err() {
                // The applier stopped (it reports its own error).
                return Ok(None);
            }
        }
        tar_digest = tar.digest();
        tar_bytes = tar.bytes;
    }
    drop(tx);
    if let Some(msg) = failed {
        // A blob cut short or running on is a size lie, not corruption.
        let more = hashed
            .read(&mut [0u8; 1])
            .map_err(|e| Error::io("reading the layer", e))?;
        if more == 0 && hashed.bytes != desc.size || hashed.bytes > desc.size {
            return Err(size_error(hashed.bytes));
        }
        return Err(Error::Image(format!("decompressing the layer: {msg}")));
    }
    io::copy(&mut hashed, &mut io::sink()).map_err(|e| Error::io("reading the layer tail", e))?;
    if hashed.bytes != desc.size {
        return Err(size_error(hashed.bytes));
    }
    Ok(Some(ReadSummary {
        blob_digest: hashed.digest(),
        blob_bytes: hashed.bytes,
        tar_digest,
        tar_bytes,
    }))
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

/// The descriptor of an overlaybd layer blob `(digest, size)` (an ext4
/// disk layer) with media type `media_type`: the native annotations and,
/// when it has one, its piece table's.
pub fn layer_descriptor(
    media_type: &str,
    (digest, size): (&str, u64),
    verity: Option<&Verity>,
) -> Descriptor {
    let mut l = Descriptor::new(media_type, digest, size);
    l.annotations = [
        (ANN_BLOB_DIGEST, digest.to_string()),
        (ANN_BLOB_SIZE, size.to_string()),
        (ANN_VERSION, VERSION_NATIVE.to_string()),
        (ANN_FS_TYPE, "ext4".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(v) = verity {
        set_verity_annotations(&mut l.annotations, v);
    }
    l
}

/// Commits `upper` as tar(ZFile(LSMT)) into `path`.
pub fn commit_layer(
    upper: &WritableLayer,
    opts: &CommitParams,
    uuid: Uuid,
    parent: Uuid,
    path: &Path,
) -> Result<CommitInfo> {
    let copts = CommitOptions {
        uuid: Some(uuid),
        parent_uuid: Some(parent),
        virtual_size: Some(opts.vsize),
        ..Default::default()
    };
    write_layer_blob(path, opts, |z| Ok(upper.commit(&copts, z)?))
}

/// Writes a layer blob, tar(ZFile(LSMT)), into `path`: `lsmt` streams the
/// committed LSMT file into the ZFile writer it is given, compressed with
/// `opts`' codec.
pub fn write_layer_blob(
    path: &Path,
    opts: &CommitParams,
    lsmt: impl FnOnce(&mut dyn io::Write) -> Result<CommitInfo>,
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
    let info = lsmt(&mut z)?;
    let (_, zi) = z.finish()?;
    tw.finish(&mut out, zi.zfile_size)?;
    Ok(info)
}

/// The digest and size of the file at `path` and, with `verity`, its
/// encoded piece table, in one pass over it.
pub fn file_digest(path: &Path, verity: bool) -> Result<(String, u64, Option<Vec<u8>>)> {
    let mut f = File::open(path).map_err(|e| Error::file(path, e))?;
    if !verity {
        let mut h = Hashing::new(&mut f);
        io::copy(&mut h, &mut io::sink()).map_err(|e| Error::file(path, e))?;
        return Ok((h.digest(), h.bytes, None));
    }
    let size = f.metadata().map_err(|e| Error::file(path, e))?.len();
    let mut h = PieceHasher::new(piece_size_for(size)).map_err(|e| Error::file(path, e))?;
    io::copy(&mut f, &mut h).map_err(|e| Error::file(path, e))?;
    let t = h.finish().map_err(|e| Error::file(path, e))?;
    Ok((t.blob_digest(), t.blob_size(), Some(t.encode())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_marked_version_4() {
        let u = uuid_v4([0xff; 16]);
        assert_eq!((u[6], u[8]), (0x4f, 0xbf));
        assert_eq!(derive16("a", "b"), derive16("a", "b"));
        assert_ne!(derive16("a", "b"), derive16("a", "c"));
    }
}
