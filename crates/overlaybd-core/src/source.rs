//! Layer sources: where a lower's blob bytes come from, and how a blob's
//! nesting (tar, ZFile, LSMT) is peeled off to reach the LSMT file.
//!
//! A [`LayerSource`] turns one `lowers[]` entry of `config.v1.json` into a
//! byte source. This module has the local-file source; the registry source
//! plugs in behind the same trait.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{resolve, Lower};
use crate::error::{Error, Result};
use crate::tar;
use zfile::{FileSource, ReadAt, Window, ZFileReader};

/// A shared, type-erased byte source.
pub type Blob = Arc<dyn ReadAt>;

/// Everything a source may need to locate one lower.
#[derive(Debug, Clone, Copy)]
pub struct LayerRef<'a> {
    /// Position in `lowers`, 0 = bottom.
    pub index: usize,
    /// The config entry.
    pub lower: &'a Lower,
    /// `repoBlobUrl` of the image config.
    pub repo_blob_url: &'a str,
    /// Folder that relative paths are resolved against (the config's folder).
    pub base_dir: Option<&'a Path>,
    /// The image's own `download` settings, overriding the service's.
    pub download: Option<&'a crate::config::Download>,
}

/// A blob opened by a source.
pub struct OpenedBlob {
    /// Human name for errors and `info`: the path or the digest.
    pub name: String,
    /// The blob bytes, as stored (any nesting).
    pub blob: Blob,
}

/// Something that can provide layer blobs: local files, a registry, a cache.
pub trait LayerSource: Send + Sync {
    /// Opens the blob of `layer`, or returns `Ok(None)` when this source does not
    /// have it (the next source is then asked).
    fn open(&self, layer: LayerRef<'_>) -> Result<Option<OpenedBlob>>;

    /// Of the blobs this source opened, the bytes held on this host (e.g. in
    /// a block cache) and their total size; `None` (the default) when the
    /// source does not keep such a count.
    fn local_bytes(&self) -> Option<(u64, u64)> {
        None
    }
}

/// Local files: `file`, else `dir/overlaybd.commit`, `dir/.commit`,
/// `dir/overlaybd.sealed` (upstream's order).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalFiles;

/// Blob names looked for inside a layer `dir`, in order.
pub const DIR_CANDIDATES: [&str; 3] = ["overlaybd.commit", ".commit", "overlaybd.sealed"];

impl LocalFiles {
    /// The local path that would serve `layer`, if any exists.
    pub fn locate(layer: LayerRef<'_>) -> Option<PathBuf> {
        let l = layer.lower;
        if !l.file.is_empty() {
            let p = resolve(layer.base_dir, &l.file);
            if p.exists() {
                return Some(p);
            }
        }
        if !l.dir.is_empty() {
            let dir = resolve(layer.base_dir, &l.dir);
            for c in DIR_CANDIDATES {
                let p = dir.join(c);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        None
    }
}

impl LayerSource for LocalFiles {
    fn open(&self, layer: LayerRef<'_>) -> Result<Option<OpenedBlob>> {
        let Some(path) = Self::locate(layer) else {
            // A `file` that is named but missing, with nothing remote to fall back
            // on, is worth naming precisely.
            if !layer.lower.file.is_empty() && layer.lower.digest.is_empty() {
                let p = resolve(layer.base_dir, &layer.lower.file);
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "layer file not found",
                ))
                .in_file(p));
            }
            return Ok(None);
        };
        let file = crate::regular::open(&path)?;
        let src = FileSource::new(file).map_err(|e| Error::Io(e).in_file(&path))?;
        Ok(Some(OpenedBlob {
            name: path.display().to_string(),
            blob: Arc::new(src),
        }))
    }
}

/// How a blob wraps its LSMT file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nesting {
    /// A bare LSMT file.
    Lsmt,
    /// ZFile(LSMT).
    ZFile,
    /// tar(LSMT).
    Tar,
    /// tar(ZFile(LSMT)): the usual registry blob.
    TarZFile,
}

impl std::fmt::Display for Nesting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Nesting::Lsmt => "lsmt",
            Nesting::ZFile => "zfile(lsmt)",
            Nesting::Tar => "tar(lsmt)",
            Nesting::TarZFile => "tar(zfile(lsmt))",
        })
    }
}

/// A blob with its wrappers peeled off.
pub struct Decoded {
    /// What wrapped the LSMT file.
    pub nesting: Nesting,
    /// The uncompressed LSMT file bytes.
    pub lsmt: Blob,
    /// The ZFile reader, when the blob is compressed.
    pub zfile: Option<Arc<ZFileReader<Blob>>>,
}

/// Peels the tar wrapper and ZFile compression off `blob` (upstream's detection
/// order: tar with a valid checksum, then the ZFile magic, else LSMT).
pub fn decode(blob: Blob) -> Result<Decoded> {
    let (tarred, inner): (bool, Blob) = match tar::detect(&*blob)? {
        Some(p) => (true, Arc::new(Window::new(blob, p.offset, p.size))),
        None => (false, blob),
    };
    let mut magic = [0u8; 512];
    let n = inner.read_at(&mut magic, 0)?;
    if zfile::is_zfile(&magic[..n]) {
        let z = Arc::new(ZFileReader::open(inner)?);
        let lsmt: Blob = z.clone();
        Ok(Decoded {
            nesting: if tarred {
                Nesting::TarZFile
            } else {
                Nesting::ZFile
            },
            lsmt,
            zfile: Some(z),
        })
    } else {
        Ok(Decoded {
            nesting: if tarred { Nesting::Tar } else { Nesting::Lsmt },
            lsmt: inner,
            zfile: None,
        })
    }
}
