//! Registry sources and destinations (`docker://host[:port]/repo[:tag|@digest]`)
//! over overlaybd-core's [`Distribution`] client (docker config credentials
//! and helpers, per-host plain HTTP / insecure TLS).
//!
//! The destination stages every blob in a local work directory (the
//! converter reads the layers it wrote back as lower layers) and uploads it
//! on a background thread at once, so uploads overlap the conversion of the
//! next layers. A manifest is pushed (by digest) only after all uploads
//! finished; the tag is pushed last, in [`ImageDest::tag`], after every blob
//! and manifest of every platform: a failure leaves nothing tagged.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use obd_remote::distribution::{Distribution, ImageRef, Manifest};
use obd_remote::oci::{self, Index};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{escape, Error, Result};
use crate::oci::*;
use zfile::sync::MutexExt;

/// A log line sink (the CLI routes it around its progress bars).
pub type LogFn = dyn Fn(&str) + Send + Sync;

/// Parses `docker://<ref>` into a registry reference.
pub fn parse_docker_ref(reference: &str) -> Result<ImageRef> {
    let rest = reference
        .strip_prefix("docker://")
        .ok_or_else(|| Error::Reference {
            reference: reference.into(),
            detail: "expected `docker://<host>/<repo>[:<tag>|@<digest>]`".into(),
        })?;
    ImageRef::parse(rest).map_err(|e| Error::Reference {
        reference: reference.into(),
        detail: e.to_string(),
    })
}

fn is_manifest_type(mt: &str) -> bool {
    matches!(
        mt,
        MT_OCI_MANIFEST | MT_OCI_INDEX | MT_DOCKER_MANIFEST | MT_DOCKER_LIST
    )
}

/// An image in a registry, read with streamed, digest-checked blobs.
pub struct RegistrySource {
    client: Arc<Distribution>,
    r: ImageRef,
    manifests: Mutex<HashMap<String, Manifest>>,
}

impl RegistrySource {
    /// The image `r` through `client`.
    pub fn new(client: Arc<Distribution>, r: ImageRef) -> Self {
        RegistrySource {
            client,
            r,
            manifests: Mutex::new(HashMap::new()),
        }
    }

    fn manifest(&self, reference: &str) -> Result<Manifest> {
        if let Some(m) = self.manifests.locked().get(reference) {
            return Ok(m.clone());
        }
        let m = self.client.get_manifest(&self.r, reference)?;
        self.manifests.locked().insert(m.digest.clone(), m.clone());
        Ok(m)
    }
}

impl ImageSource for RegistrySource {
    fn root(&self) -> Result<Descriptor> {
        let m = self.manifest(self.r.reference())?;
        Ok(Descriptor::new(
            &m.media_type,
            &m.digest,
            m.bytes.len() as u64,
        ))
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send>> {
        Ok(self.client.open_blob(&self.r, digest, 0)?)
    }

    fn open(&self, d: &Descriptor) -> Result<Box<dyn Read + Send>> {
        Ok(self.client.open_blob(&self.r, &d.digest, d.size)?)
    }

    fn read_small(&self, d: &Descriptor) -> Result<Vec<u8>> {
        let cached = self.manifests.locked().contains_key(&d.digest);
        let bytes = if cached || is_manifest_type(&d.media_type) {
            // Digest-checked by the client.
            self.manifest(&d.digest)?.bytes
        } else {
            if d.size > 64 << 20 {
                return Err(Error::Image(format!(
                    "{} is {} bytes; too large for metadata",
                    escape(d.digest.as_bytes()),
                    d.size
                )));
            }
            let mut buf = Vec::with_capacity(d.size as usize);
            self.open(d)?
                .take(d.size + 1)
                .read_to_end(&mut buf)
                .map_err(|e| Error::io(format!("reading {}", escape(d.digest.as_bytes())), e))?;
            buf
        };
        let got = sha256_digest(&bytes);
        if got != d.digest || bytes.len() as u64 != d.size {
            return Err(Error::Image(format!(
                "{} has digest {got} and {} bytes (descriptor says {})",
                escape(d.digest.as_bytes()),
                bytes.len(),
                d.size
            )));
        }
        Ok(bytes)
    }
}

/// A manifest pushed by digest that carries a `subject` the registry did not
/// index itself: it goes into the `sha256-<hex>` referrers tag.
struct Referrer {
    subject: String,
    desc: Descriptor,
}

/// What makes a pushed manifest or index a referrer.
#[derive(Deserialize)]
struct Referring {
    subject: Option<Descriptor>,
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
    annotations: Option<Value>,
}

/// A registry destination (see the module docs).
pub struct RegistryDest {
    client: Arc<Distribution>,
    r: ImageRef,
    work: PathBuf,
    uploads: Mutex<Vec<(String, JoinHandle<Result<()>>)>>,
    uploaded: Mutex<std::collections::HashSet<String>>,
    manifests: Mutex<HashMap<String, (String, Vec<u8>)>>,
    referrers: Mutex<Vec<Referrer>>,
    log: Option<Arc<LogFn>>,
    /// Uploads running at once.
    pub parallel: usize,
}

impl RegistryDest {
    /// Pushes to `r`, staging blobs under a new directory in `tmp`
    /// (removed on drop).
    pub fn new(
        client: Arc<Distribution>,
        r: ImageRef,
        tmp: &Path,
        log: Option<Arc<LogFn>>,
    ) -> Result<Self> {
        if r.digest.is_some() {
            return Err(Error::Reference {
                reference: r.to_string(),
                detail: "a destination takes a tag, not a digest".into(),
            });
        }
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let work = tmp.join(format!(
            "obd-push-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        fs::create_dir_all(work.join("blobs")).map_err(|e| Error::file(&work, e))?;
        Ok(RegistryDest {
            client,
            r,
            work,
            uploads: Mutex::new(Vec::new()),
            uploaded: Mutex::new(Default::default()),
            manifests: Mutex::new(HashMap::new()),
            referrers: Mutex::new(Vec::new()),
            log,
            parallel: 3,
        })
    }

    fn staged(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                Error::Image(format!("malformed digest `{}`", escape(digest.as_bytes())))
            })?;
        Ok(self.work.join("blobs").join(hex))
    }

    fn log(&self, msg: &str) {
        if let Some(l) = &self.log {
            l(msg);
        }
    }

    /// Starts uploading a staged blob (waiting for a slot first).
    fn upload(&self, digest: &str) -> Result<()> {
        let mut ups = self.uploads.locked();
        if ups.iter().any(|(d, _)| d == digest) || self.uploaded.locked().contains(digest) {
            return Ok(());
        }
        while ups.len() >= self.parallel.max(1) {
            let i = ups.iter().position(|(_, h)| h.is_finished()).unwrap_or(0);
            let (d, h) = ups.remove(i);
            join_upload(&d, h)?;
            self.uploaded.locked().insert(d);
        }
        let path = self.staged(digest)?;
        let (client, r, d, log) = (
            self.client.clone(),
            self.r.clone(),
            digest.to_string(),
            self.log.clone(),
        );
        let h = std::thread::spawn(move || {
            let t = Instant::now();
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let sent = client.push_blob(&r, &d, &path).map_err(|e| {
                Error::Image(format!("pushing blob {d} to {}/{}: {e}", r.host, r.repo))
            })?;
            if let Some(l) = log {
                let secs = t.elapsed().as_secs_f64();
                l(&if sent {
                    format!(
                        "pushed {d} ({:.1} MB in {secs:.2}s, {:.1} MB/s)",
                        size as f64 / 1e6,
                        size as f64 / 1e6 / secs.max(1e-6)
                    )
                } else {
                    format!("exists {d}")
                });
            }
            Ok(())
        });
        ups.push((digest.to_string(), h));
        Ok(())
    }

    /// Waits for every upload started so far; the first failure is returned.
    fn wait_uploads(&self) -> Result<()> {
        let ups: Vec<_> = std::mem::take(&mut *self.uploads.locked());
        let mut first = None;
        for (d, h) in ups {
            match join_upload(&d, h) {
                Ok(()) => {
                    self.uploaded.locked().insert(d);
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn update_referrers(&self) -> Result<()> {
        let refs: Vec<Referrer> = std::mem::take(&mut *self.referrers.locked());
        let mut by: Vec<(String, Vec<Descriptor>)> = Vec::new();
        for r in refs {
            match by.iter_mut().find(|(s, _)| *s == r.subject) {
                Some((_, v)) => v.push(r.desc),
                None => by.push((r.subject, vec![r.desc])),
            }
        }
        for (subject, descs) in by {
            let tag = subject.replace(':', "-");
            let mut index = match self.client.get_manifest_opt(&self.r, &tag)? {
                Some(m) => serde_json::from_slice::<Index>(&m.bytes).map_err(|e| Error::Json {
                    what: format!("referrers index {tag}"),
                    error: e,
                })?,
                None => Index {
                    media_type: MT_OCI_INDEX.into(),
                    other: Map::from_iter([("schemaVersion".to_string(), Value::from(2))]),
                    ..Default::default()
                },
            };
            for d in descs {
                if !index.manifests.iter().any(|x| x.digest == d.digest) {
                    index.manifests.push(d);
                }
            }
            let b = oci::to_json(&index);
            self.client.put_manifest(&self.r, &tag, MT_OCI_INDEX, &b)?;
            self.log(&format!(
                "referrers of {subject}: updated the fallback tag {tag}"
            ));
        }
        Ok(())
    }
}

fn join_upload(digest: &str, h: JoinHandle<Result<()>>) -> Result<()> {
    h.join()
        .map_err(|_| Error::Image(format!("the upload thread of {digest} panicked")))?
}

impl Drop for RegistryDest {
    fn drop(&mut self) {
        let ups: Vec<_> = std::mem::take(&mut *self.uploads.locked());
        for (_, h) in ups {
            let _ = h.join();
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

impl ImageDest for RegistryDest {
    fn scratch_dir(&self) -> Result<PathBuf> {
        let d = self.work.join("scratch");
        fs::create_dir_all(&d).map_err(|e| Error::file(&d, e))?;
        Ok(d)
    }

    fn put_blob_file(&self, digest: &str, path: &Path) -> Result<()> {
        let dst = self.staged(digest)?;
        fs::rename(path, &dst).map_err(|e| Error::file(&dst, e))?;
        self.upload(digest)
    }

    fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let dst = self.staged(digest)?;
        if !dst.exists() {
            fs::write(&dst, bytes).map_err(|e| Error::file(&dst, e))?;
        }
        self.upload(digest)
    }

    fn put_manifest(&self, d: &Descriptor, bytes: &[u8]) -> Result<()> {
        self.wait_uploads()?;
        let pushed = self
            .client
            .put_manifest(&self.r, &d.digest, &d.media_type, bytes)
            .map_err(|e| {
                Error::Image(format!(
                    "pushing manifest {} to {}/{}: {e}",
                    d.digest, self.r.host, self.r.repo
                ))
            })?;
        self.log(&format!("pushed manifest {}", d.digest));
        let doc = serde_json::from_slice::<Referring>(bytes).ok();
        if let Some((subject, doc)) = doc.and_then(|r| Some((r.subject.clone()?, r))) {
            if !pushed.subject_indexed {
                let mut desc = Descriptor::new(&d.media_type, &d.digest, d.size);
                desc.artifact_type = doc.artifact_type;
                if let Some(a) = doc.annotations {
                    desc.annotations = serde_json::from_value(a).unwrap_or_default();
                }
                self.referrers.locked().push(Referrer {
                    subject: subject.digest,
                    desc,
                });
            }
        }
        self.manifests
            .locked()
            .insert(d.digest.clone(), (d.media_type.clone(), bytes.to_vec()));
        Ok(())
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        self.staged(digest).ok().filter(|p| p.exists())
    }

    fn tag(&self, root: &Descriptor) -> Result<()> {
        self.wait_uploads()?;
        self.update_referrers()?;
        let Some(tag) = self.r.tag.clone() else {
            self.log(&format!("pushed {} (no tag)", root.digest));
            return Ok(());
        };
        let (mt, bytes) = self
            .manifests
            .locked()
            .get(&root.digest)
            .cloned()
            .ok_or_else(|| {
                Error::Image(format!("internal: root {} was not pushed", root.digest))
            })?;
        self.client
            .put_manifest(&self.r, &tag, &mt, &bytes)
            .map_err(|e| Error::Image(format!("tagging {}: {e}", self.r)))?;
        self.log(&format!("tagged {} as {}", root.digest, self.r));
        Ok(())
    }
}
