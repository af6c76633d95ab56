//! Image sources and destinations. An OCI image layout on disk
//! (`oci:<dir>[:<tag>]`) implements both; a registry backend can implement
//! the same two traits later.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use obd_remote::oci::{Index, ANN_REF_NAME};
use serde_json::json;

use crate::error::{escape, Error, Result};

pub use obd_remote::oci::{
    sha256_digest, Descriptor, ARTIFACT_NATIVE, MT_DOCKER_CONFIG, MT_DOCKER_LAYER_TAR,
    MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_LAYER_TAR,
    MT_OCI_MANIFEST,
};

/// Where the source image comes from.
pub trait ImageSource {
    /// The descriptor the reference resolves to (a manifest or an index).
    fn root(&self) -> Result<Descriptor>;
    /// A blob's bytes, streamed. The caller verifies the digest.
    fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send>>;
    /// The blob a descriptor names, streamed (lets remote sources use the
    /// size). The caller verifies the digest.
    fn open(&self, d: &Descriptor) -> Result<Box<dyn Read + Send>> {
        self.open_blob(&d.digest)
    }
    /// A small blob (manifest, config) read whole and digest-checked.
    fn read_small(&self, d: &Descriptor) -> Result<Vec<u8>> {
        if d.size > 64 << 20 {
            return Err(Error::Image(format!(
                "{} is {} bytes; too large for metadata",
                escape(d.digest.as_bytes()),
                d.size
            )));
        }
        let mut buf = Vec::with_capacity(d.size as usize);
        self.open_blob(&d.digest)?
            .take(d.size + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(format!("reading {}", escape(d.digest.as_bytes())), e))?;
        let got = sha256_digest(&buf);
        if got != d.digest || buf.len() as u64 != d.size {
            return Err(Error::Image(format!(
                "blob {} has digest {got} and {} bytes (descriptor says {})",
                escape(d.digest.as_bytes()),
                buf.len(),
                d.size
            )));
        }
        Ok(buf)
    }
}

/// Where the converted image goes.
pub trait ImageDest {
    /// A scratch directory on the same filesystem as the blobs (for renames).
    fn scratch_dir(&self) -> Result<PathBuf>;
    /// Stores the finished file `path` as blob `digest` (moving it).
    fn put_blob_file(&self, digest: &str, path: &Path) -> Result<()>;
    /// Stores `bytes` as a blob.
    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()>;
    /// Stores a manifest or index. Called only after every blob it refers
    /// to was handed over (`put_blob*`), and every manifest an index lists.
    fn put_manifest(&self, d: &Descriptor, bytes: &[u8]) -> Result<()> {
        self.put_blob(&d.digest, bytes)
    }
    /// The local path of a stored blob, when the destination has one (lets
    /// the converter read back the layers it wrote).
    fn blob_path(&self, digest: &str) -> Option<PathBuf>;
    /// Publishes the root descriptor (manifest or index) under the tag.
    /// Called last: nothing is tagged before every blob is in place.
    fn tag(&self, root: &Descriptor) -> Result<()>;
}

fn digest_hex(digest: &str) -> Result<&str> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
        Error::Image(format!(
            "unsupported digest `{}` (sha256 only)",
            escape(digest.as_bytes())
        ))
    })?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(Error::Image(format!(
            "malformed digest `{}`",
            escape(digest.as_bytes())
        )));
    }
    Ok(hex)
}

/// An OCI image layout directory with a tag (`org.opencontainers.image.ref.name`).
#[derive(Clone, Debug)]
pub struct OciLayout {
    pub dir: PathBuf,
    pub tag: Option<String>,
}

impl OciLayout {
    /// Parses `oci:<dir>[:<tag>]`.
    pub fn parse(reference: &str) -> Result<OciLayout> {
        let rest = reference
            .strip_prefix("oci:")
            .ok_or_else(|| Error::Reference {
                reference: reference.into(),
                detail:
                    "expected `oci:<dir>[:<tag>]` or `docker://<host>/<repo>[:<tag>|@<digest>]`"
                        .into(),
            })?;
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
            _ => (rest, None),
        };
        if dir.is_empty() {
            return Err(Error::Reference {
                reference: reference.into(),
                detail: "empty directory".into(),
            });
        }
        Ok(OciLayout {
            dir: PathBuf::from(dir),
            tag: tag.filter(|t| !t.is_empty()),
        })
    }

    fn blob(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .dir
            .join("blobs")
            .join("sha256")
            .join(digest_hex(digest)?))
    }

    fn index(&self) -> Result<Index> {
        let p = self.dir.join("index.json");
        let b = overlaybd_core::regular::read_config(&p)?;
        serde_json::from_slice(&b).map_err(|e| Error::Json {
            what: p.display().to_string(),
            error: e,
        })
    }

    /// Creates the layout skeleton if missing.
    pub fn init(&self) -> Result<()> {
        let blobs = self.dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(|e| Error::file(&blobs, e))?;
        let ol = self.dir.join("oci-layout");
        if !ol.exists() {
            fs::write(&ol, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(|e| Error::file(&ol, e))?;
        }
        let idx = self.dir.join("index.json");
        if !idx.exists() {
            let v = json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []});
            write_atomic(&idx, &serde_json::to_vec_pretty(&v).expect("json"))?;
        }
        Ok(())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-obd");
    let mut f = File::create(&tmp).map_err(|e| Error::file(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::file(&tmp, e))?;
    f.sync_all().map_err(|e| Error::file(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}

impl ImageSource for OciLayout {
    fn root(&self) -> Result<Descriptor> {
        let idx = self.index()?;
        let pick: Vec<&Descriptor> = match &self.tag {
            Some(t) => idx
                .manifests
                .iter()
                .filter(|m| m.annotation(ANN_REF_NAME) == Some(t.as_str()))
                .collect(),
            None => idx.manifests.iter().collect(),
        };
        match pick.as_slice() {
            [one] => Ok(Descriptor::new(&one.media_type, &one.digest, one.size)),
            [] => Err(Error::Reference {
                reference: format!(
                    "oci:{}:{}",
                    self.dir.display(),
                    self.tag.as_deref().unwrap_or("")
                ),
                detail: "no such tag in index.json".into(),
            }),
            _ => Err(Error::Reference {
                reference: format!("oci:{}", self.dir.display()),
                detail: "index.json holds several images; name a tag".into(),
            }),
        }
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send>> {
        let p = self.blob(digest)?;
        Ok(Box::new(overlaybd_core::regular::open(&p)?))
    }
}

/// Prefix of the scratch directories conversions make in a layout; the
/// converting process's pid follows.
const SCRATCH_PREFIX: &str = ".obd-convert-";

/// Removes the scratch directories in layout `dir` left by conversions
/// whose process is gone (killed, or crashed past every cleanup path).
/// Best effort: a directory that cannot be removed stays.
fn sweep_stale_scratch(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl ImageDest for OciLayout {
    /// `<dir>/.obd-convert-<pid>`, after removing those of dead processes.
    fn scratch_dir(&self) -> Result<PathBuf> {
        self.init()?;
        sweep_stale_scratch(&self.dir);
        let d = self
            .dir
            .join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&d).map_err(|e| Error::file(&d, e))?;
        Ok(d)
    }

    fn put_blob_file(&self, digest: &str, path: &Path) -> Result<()> {
        let dst = self.blob(digest)?;
        fs::rename(path, &dst).map_err(|e| Error::file(&dst, e))
    }

    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let dst = self.blob(digest)?;
        if dst.exists() {
            return Ok(());
        }
        write_atomic(&dst, bytes)
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        self.blob(digest).ok().filter(|p| p.exists())
    }

    fn tag(&self, root: &Descriptor) -> Result<()> {
        self.init()?;
        let p = self.dir.join("index.json");
        let mut idx = self.index()?;
        let tag = self.tag.clone().unwrap_or_else(|| "latest".into());
        idx.manifests
            .retain(|m| m.annotation(ANN_REF_NAME) != Some(tag.as_str()));
        let mut d = Descriptor::new(&root.media_type, &root.digest, root.size);
        d.annotations.insert(ANN_REF_NAME.into(), tag);
        idx.manifests.push(d);
        let v = serde_json::to_value(&idx).expect("json");
        write_atomic(&p, &serde_json::to_vec_pretty(&v).expect("json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_references() {
        let l = OciLayout::parse("oci:/tmp/x:v1").unwrap();
        assert_eq!(l.dir, PathBuf::from("/tmp/x"));
        assert_eq!(l.tag.as_deref(), Some("v1"));
        let l = OciLayout::parse("oci:rel/dir").unwrap();
        assert_eq!(l.tag, None);
        assert!(OciLayout::parse("docker://x/y").is_err());
    }

    #[test]
    fn an_index_or_blob_that_is_not_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = OciLayout {
            dir: dir.path().to_owned(),
            tag: None,
        };
        fixtures::procs::mkfifo(&dir.path().join("index.json"));
        let e = l.root().unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}/index.json: not a regular file but a FIFO",
                dir.path().display()
            )
        );
        let hex = "0".repeat(64);
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        fixtures::procs::mkfifo(&dir.path().join("blobs/sha256").join(&hex));
        let e = l
            .open_blob(&format!("sha256:{hex}"))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}/blobs/sha256/{hex}: not a regular file but a FIFO",
                dir.path().display()
            )
        );
    }
}
