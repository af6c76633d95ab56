//! The containerd side of a pull: one gRPC channel over the unix socket, the
//! content, images, leases, diff and snapshots clients on it, and the
//! namespace and lease metadata on every request.

use super::{PullError, PullOptions, LABEL_GC_EXPIRE, LEASE_HEADER, NAMESPACE_HEADER};
use crate::proto::containerd::services::content::v1 as content;
use crate::proto::containerd::services::diff::v1 as diff;
use crate::proto::containerd::services::images::v1 as images;
use crate::proto::containerd::services::leases::v1 as leases;
use crate::proto::containerd::services::snapshots::v1 as snapshots;
use crate::proto::containerd::types;
use content::content_client::ContentClient;
use diff::diff_client::DiffClient;
use hyper_util::rt::TokioIo;
use images::images_client::ImagesClient;
use leases::leases_client::LeasesClient;
use obd_remote::oci::Descriptor;
use sha2::{Digest as _, Sha256};
use snapshots::snapshots_client::SnapshotsClient;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

/// Bytes per content `Write` message (containerd accepts 16 MiB messages).
const CHUNK: usize = 1 << 20;

/// How long a snapshot call answered `Unavailable` is retried. containerd
/// says `Unavailable` while its connection to a restarted proxy snapshotter
/// is backing off (about 1 s after a restart, growing with each refused
/// connect), so a pull started right after a restart waits instead of failing.
const UNAVAILABLE_GRACE: Duration = Duration::from_secs(15);

/// The error of a failed containerd call `op`.
pub(super) fn ctd(op: impl Into<String>) -> impl FnOnce(Status) -> PullError {
    let op = op.into();
    move |status| PullError::Containerd { op, status }
}

/// A blob error naming its digest.
pub(super) fn blob_err(digest: &str, detail: impl Into<String>) -> PullError {
    PullError::Image {
        what: "blob",
        digest: digest.to_string(),
        detail: detail.into(),
    }
}

/// containerd's form of a descriptor.
pub(super) fn proto_desc(d: &Descriptor) -> types::Descriptor {
    types::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        annotations: d.annotations.clone().into_iter().collect(),
    }
}

/// RFC 3339 UTC time of `t`.
pub(super) fn rfc3339(t: SystemTime) -> String {
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
pub(super) fn token() -> String {
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

/// Retry state for snapshot calls answered `Unavailable`.
pub(super) struct Unavailable {
    deadline: Instant,
    backoff: Duration,
}

impl Unavailable {
    pub(super) fn new() -> Self {
        Unavailable {
            deadline: Instant::now() + UNAVAILABLE_GRACE,
            backoff: Duration::from_millis(50),
        }
    }

    /// True, after a backoff, if `s` is `Unavailable` and the grace period
    /// has room for another try.
    pub(super) async fn retry(&mut self, s: &Status, call: &str) -> bool {
        if s.code() != Code::Unavailable || Instant::now() + self.backoff > self.deadline {
            return false;
        }
        tracing::info!(call, error = %s.message(), "the snapshotter is unavailable through containerd; retrying");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
        true
    }
}

/// containerd clients sharing one channel, with the namespace and lease
/// metadata put on every request. A clone shares the channel (concurrent
/// calls are multiplexed on it).
#[derive(Clone)]
pub(super) struct Containerd {
    ns: MetadataValue<tonic::metadata::Ascii>,
    lease: Option<MetadataValue<tonic::metadata::Ascii>>,
    lease_id: Option<String>,
    content: ContentClient<Channel>,
    pub(super) images: ImagesClient<Channel>,
    leases: LeasesClient<Channel>,
    pub(super) diff: DiffClient<Channel>,
    pub(super) snapshots: SnapshotsClient<Channel>,
    pub(super) snapshotter: String,
    /// Snapshot calls retried after `Unavailable` (see [`UNAVAILABLE_GRACE`]).
    pub(super) unavailable_retries: u32,
}

/// What a content write did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wrote {
    /// Committed now.
    Committed,
    /// containerd had the blob already (its labels were updated).
    Existed,
}

/// A blob source for [`Containerd::write_content`], run on a blocking thread.
pub(super) type Open = Box<dyn FnOnce() -> Result<Box<dyn Read + Send>, PullError> + Send>;

impl Containerd {
    pub(super) async fn new(opts: &PullOptions) -> Result<Self, PullError> {
        let ns = opts
            .namespace
            .parse()
            .map_err(|_| PullError::BadOption(format!("namespace `{}`", opts.namespace)))?;
        let ch = connect(&opts.address).await?;
        Ok(Containerd {
            ns,
            lease: None,
            lease_id: None,
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
    pub(super) fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(NAMESPACE_HEADER, self.ns.clone());
        if let Some(l) = &self.lease {
            r.metadata_mut().insert(LEASE_HEADER, l.clone());
        }
        r
    }

    /// Creates a lease that expires after `expire` and puts it on every
    /// later request.
    pub(super) async fn create_lease(&mut self, expire: Duration) -> Result<String, PullError> {
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
        self.lease_id = Some(id.clone());
        Ok(id)
    }

    pub(super) async fn delete_lease(&mut self, id: &str) -> Result<(), PullError> {
        self.lease = None;
        self.lease_id = None;
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

    /// Adds content `digest` to this pull's lease (if one is open).
    async fn lease_content(&mut self, digest: &str) -> Result<(), PullError> {
        let Some(id) = self.lease_id.clone() else {
            return Ok(());
        };
        let r = self.req(leases::AddResourceRequest {
            id: id.clone(),
            resource: Some(leases::Resource {
                id: digest.to_string(),
                r#type: "content".to_string(),
            }),
        });
        self.leases
            .add_resource(r)
            .await
            .map_err(ctd(format!("leases.AddResource {id} {digest}")))?;
        Ok(())
    }

    /// Whether the content store has `digest`. The digest is first taken into
    /// this pull's lease: content an earlier, failed pull left (held by no
    /// lease or image any more) must not be collected between this check and
    /// the image record that will reference it.
    pub(super) async fn has_content(&mut self, digest: &str) -> Result<bool, PullError> {
        self.lease_content(digest).await?;
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
    pub(super) async fn label_content(
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
    pub(super) async fn write_content(
        &mut self,
        ingest_ref: &str,
        desc: &Descriptor,
        labels: &BTreeMap<String, String>,
        open: Open,
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
        let (digest, size) = (desc.digest.clone(), desc.size);
        let producer = tokio::task::spawn_blocking(move || {
            send_blob(open()?, &tx, base, &digest, size, commit_labels)
        });
        let status = self.drain_write(ReceiverStream::new(rx)).await;
        let read = producer
            .await
            .map_err(|e| PullError::BadOption(format!("content writer: {e}")))?;
        let last = match status {
            Err(s) if s.code() == Code::AlreadyExists => {
                self.label_content(&desc.digest, labels).await?;
                return Ok((Wrote::Existed, read.unwrap_or(0)));
            }
            Err(s) => {
                self.abort_ingest(ingest_ref).await;
                // A read error explains a broken stream better.
                read?;
                return Err(ctd(op)(s));
            }
            Ok(last) => last,
        };
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

    /// Runs a content `Write` stream to its end: the last response, or the
    /// status it failed with.
    async fn drain_write(
        &mut self,
        requests: ReceiverStream<content::WriteContentRequest>,
    ) -> Result<Option<content::WriteContentResponse>, Status> {
        let r = self.req(requests);
        let mut s = self.content.write(r).await?.into_inner();
        let mut last = None;
        while let Some(m) = s.message().await? {
            last = Some(m);
        }
        Ok(last)
    }

    /// Best-effort removal of a half-written ingest.
    async fn abort_ingest(&mut self, ingest_ref: &str) {
        let r = self.req(content::AbortRequest {
            r#ref: ingest_ref.to_string(),
        });
        let _ = self.content.abort(r).await;
    }

    /// Writes an in-memory blob (manifest, index, config).
    pub(super) async fn write_bytes(
        &mut self,
        ingest_ref: &str,
        desc: &Descriptor,
        bytes: Vec<u8>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Wrote, PullError> {
        if self.has_content(&desc.digest).await? {
            self.label_content(&desc.digest, labels).await?;
            return Ok(Wrote::Existed);
        }
        let open: Open =
            Box::new(move || Ok(Box::new(std::io::Cursor::new(bytes)) as Box<dyn Read + Send>));
        let (w, _) = self.write_content(ingest_ref, desc, labels, open).await?;
        Ok(w)
    }

    /// Whether the snapshotter has a snapshot `key`.
    pub(super) async fn snapshot_exists(&mut self, key: &str) -> Result<bool, PullError> {
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

    pub(super) async fn remove_snapshot(&mut self, key: &str) {
        let r = self.req(snapshots::RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        if let Err(e) = self.snapshots.remove(r).await {
            tracing::warn!(key, error = %e, "removing the extract snapshot failed");
        }
    }

    /// Creates the image record `name` → `target`, or points an existing
    /// one at it. Returns whether it was created.
    pub(super) async fn put_image(
        &mut self,
        name: &str,
        target: &Descriptor,
    ) -> Result<bool, PullError> {
        let image = images::Image {
            name: name.to_string(),
            target: Some(proto_desc(target)),
            ..Default::default()
        };
        let req = self.req(images::CreateImageRequest {
            image: Some(image.clone()),
        });
        match self.images.create(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => {
                let req = self.req(images::UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                });
                self.images
                    .update(req)
                    .await
                    .map_err(ctd(format!("images.Update {name}")))?;
                Ok(false)
            }
            Err(s) => Err(ctd(format!("images.Create {name}"))(s)),
        }
    }
}

/// Streams `rd` to containerd as `Write` messages of `base`, checking its
/// size and digest against the descriptor's, then asks for the commit with
/// `labels`. Returns the bytes read; stops early (successfully) when
/// containerd ends the stream.
fn send_blob(
    mut rd: Box<dyn Read + Send>,
    tx: &mpsc::Sender<content::WriteContentRequest>,
    base: content::WriteContentRequest,
    digest: &str,
    size: u64,
    labels: HashMap<String, String>,
) -> Result<u64, PullError> {
    let mut h = Sha256::new();
    let mut off = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = obd_remote::read_full(&mut rd, &mut buf)
            .map_err(|e| blob_err(digest, format!("reading: {e}")))?;
        if n == 0 {
            break;
        }
        if off + n as u64 > size {
            return Err(blob_err(
                digest,
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
        return Err(blob_err(
            digest,
            format!("{off} bytes, its descriptor says {size}"),
        ));
    }
    let got = format!("sha256:{}", hex::encode(h.finalize()));
    if got != digest {
        return Err(blob_err(digest, format!("content has digest {got}")));
    }
    let _ = tx.blocking_send(content::WriteContentRequest {
        action: content::WriteAction::Commit as i32,
        offset: off as i64,
        labels,
        ..base
    });
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // leap year
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
    }
}
