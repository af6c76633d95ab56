//! An image: read-only LSMT layers stacked bottom to top and merged into one
//! virtual disk, under an optional live writable upper that takes the disk's
//! writes and discards (the device's read-write mode).

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::{resolve, ImageConfig, Upper, MAX_LAYERS};
use crate::error::{Error, Result};
use crate::index::MergedIndex;
use crate::lsmt::{CreateOptions, RoLayer, Segment, WritableLayer, SECTOR};
use crate::source::{self, Blob, LayerRef, LayerSource, LocalFiles, Nesting};
use zfile::sync::{recover, MutexExt, RwLockExt};
use zfile::ReadAt;

/// One read-only layer of an image.
pub struct Layer {
    /// The path or digest it came from.
    pub name: String,
    /// How the blob wrapped the LSMT file.
    pub nesting: Nesting,
    /// Size of the blob as stored.
    pub blob_size: u64,
    /// The parsed LSMT layer; its `source()` is the uncompressed LSMT bytes.
    pub lsmt: RoLayer,
    /// The blob as stored (for read-ahead advice to remote sources).
    raw: Blob,
    /// The ZFile reader between `raw` and the LSMT file, when compressed.
    zfile: Option<Arc<zfile::ZFileReader<Blob>>>,
}

impl Layer {
    /// Opens a layer from its blob bytes (any nesting).
    pub fn open(name: impl Into<String>, blob: Blob) -> Result<Layer> {
        let blob_size = blob.size();
        let dec = source::decode(blob.clone())?;
        Ok(Layer {
            name: name.into(),
            nesting: dec.nesting,
            blob_size,
            lsmt: RoLayer::open(dec.lsmt)?,
            raw: blob,
            zfile: dec.zfile,
        })
    }

    /// The layer's uncompressed LSMT file as a source whose `will_need` reaches
    /// the stored blob: the advised range is mapped through the ZFile jump table
    /// (and the tar window), so a remote blob fetches exactly the compressed
    /// blocks behind it at prefetch priority. Reads are the layer's own reads.
    pub fn prefetch_reader(&self) -> Blob {
        Arc::new(PrefetchView {
            lsmt: self.lsmt.source().clone(),
            zfile: self.zfile.clone(),
        })
    }
}

/// See [`Layer::prefetch_reader`].
struct PrefetchView {
    lsmt: Blob,
    zfile: Option<Arc<zfile::ZFileReader<Blob>>>,
}

impl ReadAt for PrefetchView {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.lsmt.read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.lsmt.size()
    }
    fn invalidate(&self, offset: u64, len: u64) -> bool {
        self.lsmt.invalidate(offset, len)
    }
    fn will_need(&self, offset: u64, len: u64) {
        match &self.zfile {
            Some(z) => z.will_need(offset, len),
            // tar(LSMT) or LSMT: the window forwards the advice.
            None => self.lsmt.will_need(offset, len),
        }
    }
    fn stored_extent(&self, offset: u64, len: u64) -> (u64, u64) {
        match &self.zfile {
            Some(z) => z.stored_extent(offset, len),
            None => self.lsmt.stored_extent(offset, len),
        }
    }
    fn will_need_stored(&self, offset: u64, len: u64) {
        match &self.zfile {
            Some(z) => z.will_need_stored(offset, len),
            None => self.lsmt.will_need_stored(offset, len),
        }
    }
}

/// Sees every completed read of a lower layer's LSMT file: what a trace
/// recorder captures (upstream records below the merge, per layer file).
pub trait ReadObserver: Send + Sync {
    /// `len` bytes at `offset` of lower `layer` (0 = bottom) were read in full.
    fn layer_read(&self, layer: usize, offset: u64, len: u64);
}

/// What [`Image::open_with`] does beyond opening what the config names.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Create the config's writable upper when both its files are missing,
    /// with the lowers' virtual size, or this one when they set none. Without
    /// it, a missing upper is an error.
    pub create_upper: Option<u64>,
}

/// A virtual disk: read-only layers stacked and merged, under an optional
/// live writable upper that takes the disk's writes and discards.
pub struct Image {
    layers: Vec<Layer>,
    /// Per merged-index tag: the file its entries' `moffset` points into.
    backing: Vec<Blob>,
    /// The merged view of the read-only layers.
    index: MergedIndex,
    /// The live writable upper: reads merge its index over `index` at each
    /// request, so writes are seen at once.
    upper: Option<RwLock<WritableLayer>>,
    vsize: u64,
    /// Told of every completed lower-layer read (trace recording).
    observer: Option<Arc<dyn ReadObserver>>,
}

impl Image {
    /// Opens the image a `config.v1.json` file describes, with local files only.
    /// Relative paths in it are resolved against the file's folder.
    pub fn open_config_file(path: impl AsRef<Path>) -> Result<Image> {
        let path = path.as_ref();
        let cfg = ImageConfig::load(path)?;
        Self::open(&cfg, path.parent(), &[&LocalFiles]).map_err(|e| e.in_file(path))
    }

    /// Opens the image `cfg` describes: its stacked lowers, each asked of
    /// `sources` in order (the first that has it wins; layers are opened in
    /// parallel), and its writable upper if it names one.
    pub fn open(
        cfg: &ImageConfig,
        base_dir: Option<&Path>,
        sources: &[&dyn LayerSource],
    ) -> Result<Image> {
        Self::open_with(cfg, base_dir, sources, OpenOptions::default())
    }

    /// [`Image::open`] with options.
    pub fn open_with(
        cfg: &ImageConfig,
        base_dir: Option<&Path>,
        sources: &[&dyn LayerSource],
        opts: OpenOptions,
    ) -> Result<Image> {
        cfg.validate()?;
        let refs: Vec<LayerRef<'_>> = cfg.layer_refs(base_dir).collect();
        let layers = parallel_map(refs.len(), |i| open_layer(refs[i], sources))?;
        let image = Self::from_parts(layers, None)?;
        if !cfg.upper.is_writable() {
            return Ok(image);
        }
        let create = opts.create_upper.map(|v| match image.vsize {
            0 => v,
            lowers => lowers,
        });
        let upper = open_upper(&cfg.upper, base_dir, create)?;
        image.with_upper(upper)
    }

    /// Stacks already opened layers (bottom to top), optionally under
    /// `frozen_top`: a writable layer no longer written (e.g. being committed),
    /// read as the top read-only layer.
    pub fn from_parts(layers: Vec<Layer>, frozen_top: Option<Arc<WritableLayer>>) -> Result<Image> {
        if layers.len() > MAX_LAYERS {
            return Err(Error::Config {
                field: "lowers".into(),
                detail: format!(
                    "{} layers; at most {MAX_LAYERS} can be stacked",
                    layers.len()
                ),
            });
        }
        let mut segs: Vec<Vec<Segment>> =
            layers.iter().map(|l| l.lsmt.segments().to_vec()).collect();
        let mut backing: Vec<Blob> = layers.iter().map(|l| l.lsmt.source().clone()).collect();
        let mut vsize = layers
            .iter()
            .rev()
            .map(|l| l.lsmt.virtual_size())
            .find(|&v| v != 0)
            .unwrap_or(0);
        if let Some(u) = &frozen_top {
            segs.push(u.segments());
            let data = zfile::FileSource::new(crate::regular::open(u.data_path())?)
                .map_err(|e| Error::Io(e).in_file(u.data_path()))?;
            backing.push(Arc::new(data));
            if u.virtual_size() != 0 {
                vsize = u.virtual_size();
            }
        }
        let index = MergedIndex::build(&segs);
        Ok(Image {
            layers,
            backing,
            index,
            upper: None,
            vsize,
            observer: None,
        })
    }

    /// Serves `upper` as the image's live writable layer: writes and discards
    /// go to it, reads see its data over the layers below, and its virtual
    /// size (when set) becomes the disk's. An image with a frozen top layer
    /// or an upper already cannot take one.
    pub fn with_upper(mut self, upper: WritableLayer) -> Result<Image> {
        if self.upper.is_some() || self.backing.len() != self.layers.len() {
            return Err(Error::Unsupported(
                "the image already has a writable top layer".into(),
            ));
        }
        if upper.virtual_size() != 0 {
            self.vsize = upper.virtual_size();
        }
        self.upper = Some(RwLock::new(upper));
        Ok(self)
    }

    /// Sets (or clears) the observer told of every completed read of a lower
    /// layer file (not of the upper), at LSMT-file offsets.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn ReadObserver>>) {
        self.observer = observer;
    }

    /// Each lower's [`Layer::prefetch_reader`], bottom to top: what a trace
    /// replay reads (layer index = position).
    pub fn layer_readers(&self) -> Vec<Blob> {
        self.layers.iter().map(Layer::prefetch_reader).collect()
    }

    /// Opens blobs (any nesting) as a stack, bottom to top.
    pub fn from_blobs(blobs: Vec<(String, Blob)>) -> Result<Image> {
        let blobs: Vec<_> = blobs.into_iter().map(Some).collect();
        let slots: Vec<std::sync::Mutex<Option<(String, Blob)>>> =
            blobs.into_iter().map(std::sync::Mutex::new).collect();
        let layers = parallel_map(slots.len(), |i| {
            let (name, blob) = slots[i].locked().take().expect("taken once");
            Layer::open(name.clone(), blob).map_err(|e| e.in_layer(i, name))
        })?;
        Self::from_parts(layers, None)
    }

    /// Device size in bytes: the virtual size of the top-most layer that sets
    /// one (the writable upper first).
    pub fn virtual_size(&self) -> u64 {
        self.vsize
    }

    /// The read-only layers, bottom to top.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Whether the image has a writable upper (else writes fail with
    /// [`Error::ReadOnly`]).
    pub fn has_upper(&self) -> bool {
        self.upper.is_some()
    }

    /// Number of live entries in the writable upper (0: it holds no data yet);
    /// `None` without one.
    pub fn upper_entries(&self) -> Option<usize> {
        self.upper.as_ref().map(|u| u.read_locked().segment_count())
    }

    /// The merged index of the read-only layers (tag = layer position, 0 =
    /// bottom; a frozen top is last). The writable upper is not in it: see
    /// [`Image::merged_index`].
    pub fn index(&self) -> &MergedIndex {
        &self.index
    }

    /// The merged index of the whole disk as it is now: [`Image::index`] with
    /// the writable upper's current entries on top (tag = `layers().len()`).
    pub fn merged_index(&self) -> Cow<'_, MergedIndex> {
        let Some(upper) = &self.upper else {
            return Cow::Borrowed(&self.index);
        };
        let top = upper.read_locked().segments();
        let mut segs: Vec<&[Segment]> = self.layers.iter().map(|l| l.lsmt.segments()).collect();
        segs.push(&top);
        Cow::Owned(MergedIndex::build(&segs))
    }

    /// Reads up to `buf.len()` bytes at byte `offset` of the virtual disk, at any
    /// alignment. Unmapped and zeroed ranges read as zeros. Short only at the end
    /// of the device.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.vsize || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(self.vsize - offset) as usize;
        let buf = &mut buf[..len];
        match &self.upper {
            None => self.read_stack(buf, offset)?,
            Some(u) => self.read_under(&u.read_locked(), buf, offset)?,
        }
        Ok(len)
    }

    /// Writes `buf` at byte `offset` of the disk (both 512-aligned) into the
    /// writable upper; the layers below are never modified.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let upper = self.writable(offset, buf.len() as u64)?;
        upper.write_locked().write_at(buf, offset)
    }

    /// Discards `len` bytes at byte `offset` of the disk (both 512-aligned):
    /// they read as zeros from now on, whatever the layers below hold.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let upper = self.writable(offset, len)?;
        upper.write_locked().discard(offset, len)
    }

    /// Flushes the writable upper to stable storage (nothing to do without one).
    pub fn flush(&self) -> Result<()> {
        match &self.upper {
            Some(u) => u.read_locked().fsync(),
            None => Ok(()),
        }
    }

    /// Checks that `len` bytes at `offset` lie within the disk.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.vsize) {
            return Err(Error::BadRequest(format!(
                "{len} bytes at {offset} run past the device end {}",
                self.vsize
            )));
        }
        Ok(())
    }

    /// The upper a write or discard of `len` bytes at `offset` goes to, once
    /// the request is checked (in the disk, 512-aligned).
    fn writable(&self, offset: u64, len: u64) -> Result<&RwLock<WritableLayer>> {
        self.check_range(offset, len)?;
        if offset % SECTOR != 0 || len % SECTOR != 0 {
            return Err(Error::BadRequest(format!(
                "{len} bytes at {offset}: not 512-byte aligned"
            )));
        }
        self.upper.as_ref().ok_or(Error::ReadOnly)
    }

    /// Reads `buf` at `offset` (within the disk): the upper's extents from the
    /// upper, the gaps between them from the layers below.
    fn read_under(&self, upper: &WritableLayer, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        for s in upper.lookup(offset / SECTOR, end.div_ceil(SECTOR)) {
            let a = (s.offset * SECTOR).max(offset);
            let b = (s.end() * SECTOR).min(end);
            self.read_stack(
                &mut buf[(pos - offset) as usize..(a - offset) as usize],
                pos,
            )?;
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            if s.zeroed {
                dst.fill(0);
            } else {
                upper.read_at(dst, a)?;
            }
            pos = b;
        }
        self.read_stack(&mut buf[(pos - offset) as usize..], pos)
    }

    /// Reads all of `buf` at `offset` from the read-only layers; unmapped and
    /// zeroed ranges read as zeros.
    fn read_stack(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let first = offset / SECTOR;
        let last = end.div_ceil(SECTOR);
        let mut pos = offset;
        for seg in self.index.lookup(first, last - first) {
            let s = (seg.offset * SECTOR).max(offset);
            let e = (seg.end() * SECTOR).min(end);
            buf[(pos - offset) as usize..(s - offset) as usize].fill(0);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            if seg.zeroed {
                dst.fill(0);
            } else {
                let at = seg.moffset * SECTOR + (s - seg.offset * SECTOR);
                self.read_layer(seg.tag as usize, dst, at)?;
            }
            pos = e;
        }
        buf[(pos - offset) as usize..].fill(0);
        Ok(())
    }

    fn layer_name(&self, tag: usize) -> String {
        self.layers
            .get(tag)
            .map_or_else(|| "upper".to_string(), |l| l.name.clone())
    }

    /// Copies disk bytes `[a, b)` to `out` through the read path, leaving holes
    /// where whole 4 KiB pages are zero; returns the bytes written.
    fn copy_through(&self, buf: &mut [u8], out: &File, a: u64, b: u64) -> Result<u64> {
        let mut written = 0;
        let mut at = a;
        while at < b {
            let n = ((b - at) as usize).min(buf.len());
            self.read_at(&mut buf[..n], at)?;
            let mut p = 0;
            while p < n {
                let q = (p + 4096).min(n);
                if is_zero(&buf[p..q]) {
                    p = q;
                    continue;
                }
                let mut r = q;
                while r < n {
                    let t = (r + 4096).min(n);
                    if is_zero(&buf[r..t]) {
                        break;
                    }
                    r = t;
                }
                out.write_all_at(&buf[p..r], at + p as u64)?;
                written += (r - p) as u64;
                p = r;
            }
            at += n as u64;
        }
        Ok(written)
    }

    fn read_layer(&self, tag: usize, dst: &mut [u8], at: u64) -> Result<()> {
        self.backing[tag]
            .read_exact_at(dst, at)
            .map_err(|e| Error::Io(e).in_layer(tag, self.layer_name(tag)))?;
        if let Some(o) = &self.observer {
            if tag < self.layers.len() {
                o.layer_read(tag, at, dst.len() as u64);
            }
        }
        Ok(())
    }

    /// Writes the whole virtual disk to `out` (a regular file; best a new, empty
    /// one): sized to the device, with holes where the disk reads as zeros. Work is spread over
    /// `threads` threads in chunks of `chunk` bytes.
    pub fn flatten_to(&self, out: &File, threads: usize, chunk: usize) -> Result<FlattenStats> {
        self.flatten_to_with(out, threads, chunk, &|_, _| {})
    }

    /// [`Image::flatten_to`], calling `progress(done, total)` after each
    /// chunk: bytes of the mapped ranges copied so far, of all of them.
    pub fn flatten_to_with(
        &self,
        out: &File,
        threads: usize,
        chunk: usize,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<FlattenStats> {
        size_output(out, self.vsize)?;
        let chunk = chunk.max(SECTOR as usize) as u64 / SECTOR * SECTOR;
        let view = self.flatten_view()?;
        let jobs = flatten_jobs(view.index.segments(), self.vsize, chunk);
        let total: u64 = jobs.iter().map(|&(a, b)| b - a).sum();
        let next = AtomicUsize::new(0);
        let written = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let worker = || -> Result<()> {
            let mut buf = vec![0u8; chunk as usize];
            while let Some(&(a, b)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                let n = self.flatten_range(&view, &mut buf, out, a, b)?;
                written.fetch_add(n, Ordering::Relaxed);
                progress(done.fetch_add(b - a, Ordering::Relaxed) + (b - a), total);
            }
            Ok(())
        };
        let threads = threads.max(1).min(jobs.len().max(1));
        self.run_reading_ahead(threads, &worker)?;
        Ok(FlattenStats {
            virtual_size: self.vsize,
            data_bytes: written.into_inner(),
        })
    }

    /// What flatten copies from: the disk's merged index as it is now, and the
    /// upper's data file (whose entries are copied inside the kernel too).
    fn flatten_view(&self) -> Result<FlattenView<'_>> {
        let upper_data = match &self.upper {
            Some(u) => {
                let path = u.read_locked().data_path().to_owned();
                Some(crate::regular::open(&path)?)
            }
            None => None,
        };
        Ok(FlattenView {
            index: self.merged_index(),
            upper_data,
        })
    }

    /// Writes disk bytes `[a, b)` (one flatten job) to `out`; returns the bytes
    /// written. Segments backed by plain local files are copied inside the
    /// kernel; the rest (compressed, remote) go through the read path.
    fn flatten_range(
        &self,
        view: &FlattenView<'_>,
        buf: &mut [u8],
        out: &File,
        a: u64,
        b: u64,
    ) -> Result<u64> {
        let mut written = 0;
        let mut pending: Option<(u64, u64)> = None; // a run for read_at
        for seg in view.index.lookup(a / SECTOR, (b - a).div_ceil(SECTOR)) {
            let s = (seg.offset * SECTOR).max(a);
            let e = (seg.end() * SECTOR).min(b);
            if seg.zeroed || s >= e {
                continue;
            }
            let tag = seg.tag as usize;
            let Some((file, base)) = view.local_file(&self.backing, tag) else {
                pending = match pending {
                    Some((ra, rb)) if rb == s => Some((ra, e)),
                    Some((ra, rb)) => {
                        written += self.copy_through(buf, out, ra, rb)?;
                        Some((s, e))
                    }
                    None => Some((s, e)),
                };
                continue;
            };
            if let Some((ra, rb)) = pending.take() {
                written += self.copy_through(buf, out, ra, rb)?;
            }
            let from = base + seg.moffset * SECTOR + (s - seg.offset * SECTOR);
            copy_file_range_all(file, from, out, s, e - s)
                .map_err(|err| Error::Io(err).in_layer(tag, self.layer_name(tag)))?;
            written += e - s;
        }
        if let Some((ra, rb)) = pending {
            written += self.copy_through(buf, out, ra, rb)?;
        }
        Ok(written)
    }

    /// Runs `worker` on `threads` threads while every remote layer blob is
    /// advised to stream ahead: whole-disk reads are coming, so each such blob
    /// is advised in large pieces (128 MiB, each one streamed request at
    /// Prefetch priority; local files ignore it), two streams per layer,
    /// stopped when the workers end. Each request costs the registry more
    /// than its bytes do: with 32 MiB pieces docker-registry spent 0.05–0.1
    /// CPU-s more on a 700 MB flatten (28 requests against 12).
    fn run_reading_ahead(
        &self,
        threads: usize,
        worker: &(dyn Fn() -> Result<()> + Sync),
    ) -> Result<()> {
        let done = AtomicBool::new(false);
        // Each stream takes the layer's next piece, so both stay busy to
        // the end of the blob.
        let advise = |layer: &Layer, next: &AtomicU64| {
            const PIECE: u64 = 128 << 20;
            let size = layer.raw.size();
            while !done.load(Ordering::Relaxed) {
                let at = next.fetch_add(PIECE, Ordering::Relaxed);
                if at >= size {
                    break;
                }
                layer.raw.will_need(at, PIECE.min(size - at));
            }
        };
        let cursors: Vec<AtomicU64> = self.layers.iter().map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|sc| -> Result<()> {
            for (layer, next) in self.layers.iter().zip(&cursors) {
                if layer.raw.local_file().is_none() {
                    for _ in 0..2 {
                        sc.spawn(move || advise(layer, next));
                    }
                }
            }
            let hs: Vec<_> = (0..threads).map(|_| sc.spawn(worker)).collect();
            let _stop = StopOnDrop(&done);
            for h in hs {
                h.join()
                    .map_err(|_| Error::Io(io::Error::other("flatten worker panicked")))??;
            }
            Ok(())
        })
    }
}

/// See [`Image::flatten_view`].
struct FlattenView<'a> {
    index: Cow<'a, MergedIndex>,
    upper_data: Option<File>,
}

impl FlattenView<'_> {
    /// The plain local file (and the LSMT file's offset in it) behind merged
    /// index tag `tag`, if there is one; `backing` are the image's layers'.
    fn local_file<'b>(&'b self, backing: &'b [Blob], tag: usize) -> Option<(&'b File, u64)> {
        match backing.get(tag) {
            Some(b) => b.local_file(),
            None => self.upper_data.as_ref().map(|f| (f, 0)),
        }
    }
}

/// Makes `out` (which must be a regular file) `vsize` bytes of holes.
fn size_output(out: &File, vsize: u64) -> Result<()> {
    // Truncate only when needed: on ext4 a truncate to zero makes close()
    // start writeback of everything written afterwards (auto_da_alloc).
    let meta = out.metadata()?;
    if !meta.is_file() {
        return Err(Error::Unsupported(
            "flatten writes to a regular file (it leaves holes where the disk is zero)".into(),
        ));
    }
    if meta.len() != 0 {
        out.set_len(0)?;
    }
    out.set_len(vsize)?;
    Ok(())
}

/// Flatten's jobs: the data-bearing ranges of `segs` (within `vsize`), runs
/// of adjacent ones joined up to `chunk` bytes, then cut into `chunk` pieces.
fn flatten_jobs(segs: &[Segment], vsize: u64, chunk: u64) -> Vec<(u64, u64)> {
    let mut jobs: Vec<(u64, u64)> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    for s in segs.iter().filter(|s| !s.zeroed) {
        let (a, b) = (s.offset * SECTOR, (s.end() * SECTOR).min(vsize));
        if a >= b {
            continue;
        }
        run = match run {
            Some((ra, rb)) if rb == a && b - ra <= chunk => Some((ra, b)),
            Some(r) => {
                jobs.push(r);
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    jobs.extend(run);
    jobs.into_iter()
        .flat_map(|(a, b)| {
            (a..b)
                .step_by(chunk as usize)
                .map(move |x| (x, (x + chunk).min(b)))
        })
        .collect()
}

/// Opens the config's writable upper; with `create` (a virtual size), creates
/// it first when both its files are missing.
fn open_upper(upper: &Upper, base: Option<&Path>, create: Option<u64>) -> Result<WritableLayer> {
    let data = resolve(base, &upper.data);
    let index = resolve(base, &upper.index);
    match create {
        Some(virtual_size) if !data.exists() && !index.exists() => {
            let opts = CreateOptions {
                virtual_size,
                ..Default::default()
            };
            WritableLayer::create(&data, &index, opts)
        }
        _ => WritableLayer::open(&data, &index),
    }
}

/// Opens stacked lower `r` from the first of `sources` that has it.
fn open_layer(r: LayerRef<'_>, sources: &[&dyn LayerSource]) -> Result<Layer> {
    let (index, name) = (r.index, describe(r.lower));
    let mut opened = None;
    for s in sources {
        if let Some(b) = s.open(r).map_err(|e| e.in_layer(index, &name))? {
            opened = Some(b);
            break;
        }
    }
    let b = opened.ok_or_else(|| {
        Error::Unsupported(format!(
            "no source can provide this layer (digest `{}`); is it local, or is a registry source configured?",
            r.lower.digest
        ))
        .in_layer(index, &name)
    })?;
    let bname = b.name.clone();
    Layer::open(b.name, b.blob).map_err(|e| e.in_layer(index, bname))
}

/// Sets the flag when dropped (also on early return or unwinding).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What `flatten_to` wrote.
#[derive(Debug, Clone, Copy)]
pub struct FlattenStats {
    /// Size of the output disk.
    pub virtual_size: u64,
    /// Bytes actually written (the rest are holes).
    pub data_bytes: u64,
}

impl ReadAt for Image {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Image::read_at(self, buf, offset).map_err(Error::into_io)
    }
    fn size(&self) -> u64 {
        self.vsize
    }
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to` inside the kernel
/// (`copy_file_range`), falling back to a buffered copy where the kernel or
/// file system cannot. A source that ends early is an error.
fn copy_file_range_all(
    src: &File,
    mut from: u64,
    dst: &File,
    mut to: u64,
    mut len: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while len > 0 {
        let mut off_in = from as libc::loff_t;
        let mut off_out = to as libc::loff_t;
        let want = len.min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the whole call (borrowed `File`s);
        // the offset pointers refer to live locals; no memory is shared with the kernel.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
                    copy_buffered(src, from, dst, to, len)
                }
                Some(libc::EINTR) => continue,
                _ => Err(err),
            };
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("layer data ends before offset {from}"),
            ));
        }
        from += n as u64;
        to += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn copy_buffered(
    src: &File,
    mut from: u64,
    dst: &File,
    mut to: u64,
    mut len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(4 << 20) as usize];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], from)?;
        dst.write_all_at(&buf[..n], to)?;
        from += n as u64;
        to += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn describe(l: &crate::config::Lower) -> String {
    if !l.file.is_empty() {
        l.file.clone()
    } else if !l.dir.is_empty() {
        l.dir.clone()
    } else {
        l.digest.clone()
    }
}

/// Runs `f(0..n)` on up to 8 threads, keeping order; the first error wins.
/// Not bound by the CPU count: a layer's open mostly waits (on a registry, a
/// remote layer's two ends and index are round trips), and on 2 CPUs two
/// threads opened a 7-layer image in four sequential rounds (~130 ms of a
/// 1 Gbit/s cold start's attach instead of one round).
fn parallel_map<T: Send>(n: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let threads = n.clamp(1, 8);
    if threads <= 1 || n <= 1 {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<T>>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = f(i);
                *results[i].locked() = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| recover(m.into_inner()).expect("every index ran"))
        .collect()
}

/// Whether `b` (at most 4 KiB) is all zeros: one `memcmp` against a zero page,
/// which the C library vectorises (a byte loop cost a quarter of flatten's CPU).
fn is_zero(b: &[u8]) -> bool {
    static ZERO: [u8; 4096] = [0; 4096];
    match ZERO.get(..b.len()) {
        Some(z) => b == z,
        None => b.iter().all(|&x| x == 0),
    }
}
