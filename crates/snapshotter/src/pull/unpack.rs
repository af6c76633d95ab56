//! The containerd steps of a pull (module docs of [`super`]): the config,
//! each layer (remote snapshot, or fetch + apply + commit), the manifest and
//! indexes with their GC labels, and the image record.

use super::containerd::{ctd, proto_desc, token, Containerd, Open, Unavailable};
use super::{
    LayerReport, LayerState, PullError, PullOptions, PullReport, LABEL_DISTRIBUTION_SOURCE,
    LABEL_IMAGE_REF, LABEL_SNAPSHOT_REF, LABEL_UNCOMPRESSED, SNAPSHOT_LABEL_PREFIX,
};
use crate::layer::{classify_overlaybd, AccelPrepare, PrepareAction, PrepareInfo};
use crate::meta::Kind;
use crate::proto::containerd::services::diff::v1 as diff;
use crate::proto::containerd::services::snapshots::v1 as snapshots;
use crate::proto::containerd::types::Mount;
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::oci::{self, Descriptor, Resolved, MT_OCI_INDEX};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tonic::Code;

/// One pull: what it pulls, from where, and under which name.
pub(super) struct Job<'a> {
    pub(super) opts: &'a PullOptions,
    pub(super) dist: &'a Arc<Distribution>,
    pub(super) r: &'a ImageRef,
    /// The image record's name.
    pub(super) name: &'a str,
}

impl Job<'_> {
    /// `containerd.io/distribution.source.<host>=<repo>`, on every blob.
    fn source_label(&self) -> (String, String) {
        (
            format!("{LABEL_DISTRIBUTION_SOURCE}{}", self.r.host),
            self.r.repo.clone(),
        )
    }

    /// Writes `res` into containerd, layer by layer (see the module docs).
    pub(super) async fn run(
        &self,
        c: &mut Containerd,
        res: Resolved,
        t0: Instant,
        observe: &mut (impl FnMut(&LayerReport) + Send),
    ) -> Result<PullReport, PullError> {
        let chains = oci::chain_ids(&res.config.rootfs.diff_ids);
        let config = self.write_config(c, &res, chains.last());
        let manifests = self.write_manifests(c, &res);
        let present = snapshots_present(c, &chains).await?;
        let mut blobs = self.fetch_ahead(c, &res, &chains, &present);
        let mut layers = Vec::with_capacity(res.manifest.layers.len());
        for (i, layer) in res.manifest.layers.iter().enumerate() {
            let t = Instant::now();
            let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
            let diff_id = &res.config.rootfs.diff_ids[i];
            let (state, fetched) = if present[i] {
                (LayerState::Present, 0)
            } else {
                self.unpack_layer(c, layer, &chains[i], parent, diff_id, &mut blobs)
                    .await?
            };
            let rep = LayerReport {
                index: i,
                digest: layer.digest.clone(),
                size: layer.size,
                media_type: layer.media_type.clone(),
                chain_id: chains[i].clone(),
                state,
                fetched_bytes: fetched,
                ms: t.elapsed().as_millis() as u64,
            };
            observe(&rep);
            layers.push(rep);
        }
        config.join().await?;
        let target = manifests.join().await?;
        let created = c.put_image(self.name, &target).await?;
        let count = |s: LayerState| layers.iter().filter(|l| l.state == s).count();
        Ok(PullReport {
            name: self.name.to_string(),
            digest: target.digest.clone(),
            media_type: target.media_type.clone(),
            manifest: res.manifest_doc.digest.clone(),
            config: res.manifest.config.digest.clone(),
            namespace: self.opts.namespace.clone(),
            snapshotter: self.opts.snapshotter.clone(),
            created,
            remote_layers: count(LayerState::Remote),
            downloaded_layers: count(LayerState::Downloaded),
            present_layers: count(LayerState::Present),
            registry_bytes: res.bytes + layers.iter().map(|l| l.fetched_bytes).sum::<u64>(),
            layers,
            snapshotter_retries: c.unavailable_retries,
            total_ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// Starts writing the config, labelled so that it keeps the top snapshot
    /// from being collected; it runs alongside the layers.
    fn write_config(&self, c: &Containerd, res: &Resolved, top: Option<&String>) -> Task<()> {
        let mut labels = BTreeMap::from([self.source_label()]);
        if let Some(top) = top {
            labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", self.opts.snapshotter),
                top.clone(),
            );
        }
        let (mut c, cd, bytes) = (
            c.clone(),
            res.manifest.config.clone(),
            res.config_bytes.clone(),
        );
        Task::spawn(async move {
            c.write_bytes(&format!("config-{}", cd.digest), &cd, bytes, &labels)
                .await
                .map(drop)
        })
    }

    /// Starts writing the manifest, then the indexes, innermost first; it
    /// runs alongside the layers and ends with the top descriptor, the
    /// image record's target. The manifest is labelled with the config and
    /// every layer blob, as containerd's own pull labels it: a label naming
    /// a blob that is not in the content store (a layer the snapshotter
    /// takes remotely) keeps nothing, and one naming a blob that is there
    /// (downloaded here or by an earlier pull) keeps it for the image.
    fn write_manifests(&self, c: &Containerd, res: &Resolved) -> Task<Descriptor> {
        let mut labels = BTreeMap::from([
            self.source_label(),
            (
                "containerd.io/gc.ref.content.config".to_string(),
                res.manifest.config.digest.clone(),
            ),
        ]);
        for (i, layer) in res.manifest.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        let (mut c, source) = (c.clone(), self.source_label());
        let manifest = res.manifest_doc.clone();
        let indexes: Vec<_> = res
            .indexes
            .iter()
            .rev()
            .map(|(idx, child)| (idx.clone(), child.digest.clone()))
            .collect();
        Task::spawn(async move {
            let m = manifest;
            let mut target = Descriptor::new(&m.media_type, &m.digest, m.bytes.len() as u64);
            c.write_bytes(&format!("manifest-{}", m.digest), &target, m.bytes, &labels)
                .await?;
            for (idx, child) in indexes {
                let labels = BTreeMap::from([
                    source.clone(),
                    ("containerd.io/gc.ref.content.m.0".to_string(), child),
                ]);
                let mt = if idx.media_type.is_empty() {
                    MT_OCI_INDEX
                } else {
                    &idx.media_type
                };
                let d = Descriptor::new(mt, &idx.digest, idx.bytes.len() as u64);
                c.write_bytes(&format!("index-{}", idx.digest), &d, idx.bytes, &labels)
                    .await?;
                target = d;
            }
            Ok(target)
        })
    }

    /// Starts fetching, into the content store, the blobs of the layers
    /// that will be downloaded (the snapshotter takes the others remotely,
    /// by the same rule as [`classify_overlaybd`]) and are not unpacked yet,
    /// [`FETCH_AHEAD`] at a time, as containerd's own pull does: their
    /// registry round trips overlap the layers unpacked before them.
    fn fetch_ahead(
        &self,
        c: &Containerd,
        res: &Resolved,
        chains: &[String],
        present: &[bool],
    ) -> FetchAhead {
        let mut ahead = FetchAhead::default();
        let slots = Arc::new(tokio::sync::Semaphore::new(FETCH_AHEAD));
        for (i, layer) in res.manifest.layers.iter().enumerate() {
            let labels: BTreeMap<_, _> = snapshot_labels(layer, &chains[i], self.name)
                .into_iter()
                .collect();
            let info = PrepareInfo {
                namespace: &self.opts.namespace,
                key: "",
                parent: "",
                kind: Kind::Active,
                labels: &labels,
            };
            // An acceleration layer is left too: obd's snapshotter unpacks it
            // itself (`ObdLayers`), and any other's Prepare fetches it below.
            if classify_overlaybd(&info) != PrepareAction::Plain
                || AccelPrepare::of(&info).is_some()
                || ahead.0.contains_key(&layer.digest)
                || present[i]
            {
                continue;
            }
            let (mut c, layer, labels) = (
                c.clone(),
                layer.clone(),
                self.content_labels(layer, &res.config.rootfs.diff_ids[i]),
            );
            let (dist, r, slots) = (self.dist.clone(), self.r.clone(), slots.clone());
            let digest = layer.digest.clone();
            let task = Task::spawn(async move {
                let _slot = slots.acquire_owned().await;
                fetch_blob(&mut c, &dist, &r, &layer, &labels).await
            });
            ahead.0.insert(digest, task);
        }
        ahead
    }

    /// Prepare → (AlreadyExists: remote) or fetch + diff.Apply + Commit.
    /// Returns the state and the bytes fetched from the registry.
    async fn unpack_layer(
        &self,
        c: &mut Containerd,
        layer: &Descriptor,
        chain: &str,
        parent: &str,
        diff_id: &str,
        blobs: &mut FetchAhead,
    ) -> Result<(LayerState, u64), PullError> {
        let labels = snapshot_labels(layer, chain, self.name);
        let Some((key, mounts)) = prepare(c, chain, parent, &labels).await? else {
            return Ok((LayerState::Remote, 0));
        };
        let fetched = match self.apply_layer(c, layer, diff_id, &mounts, blobs).await {
            Ok(n) => n,
            Err(e) => {
                c.remove_snapshot(&key).await;
                return Err(e);
            }
        };
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

    /// A layer blob's content labels: its source, and its diffID if the
    /// blob is compressed.
    fn content_labels(&self, layer: &Descriptor, diff_id: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([self.source_label()]);
        if is_compressed(&layer.media_type) {
            labels.insert(LABEL_UNCOMPRESSED.into(), diff_id.into());
        }
        labels
    }

    /// Fetches a layer blob into the content store (unless it is there or
    /// [`Job::fetch_ahead`] is fetching it) and applies it onto `mounts`;
    /// checks the result against the diffID.
    async fn apply_layer(
        &self,
        c: &mut Containerd,
        layer: &Descriptor,
        diff_id: &str,
        mounts: &[Mount],
        blobs: &mut FetchAhead,
    ) -> Result<u64, PullError> {
        let fetched = match blobs.0.remove(&layer.digest) {
            Some(task) => task.join().await?,
            None => {
                let labels = self.content_labels(layer, diff_id);
                fetch_blob(c, self.dist, self.r, layer, &labels).await?
            }
        };
        let req = c.req(diff::ApplyRequest {
            diff: Some(proto_desc(layer)),
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
            return Err(PullError::Image {
                what: "layer",
                digest: layer.digest.clone(),
                detail: format!(
                    "applied content has digest {}, the config's diff_id is {diff_id}",
                    applied.digest
                ),
            });
        }
        Ok(fetched)
    }
}

/// Layer blobs fetched at once by [`Job::fetch_ahead`] (containerd's
/// default `max_concurrent_downloads`).
const FETCH_AHEAD: usize = 3;

/// A containerd step running alongside the pull's layer loop; dropped
/// before [`Task::join`] (the pull failed), it is aborted.
pub(super) struct Task<T>(tokio::task::JoinHandle<Result<T, PullError>>);

impl<T: Send + 'static> Task<T> {
    fn spawn(f: impl std::future::Future<Output = Result<T, PullError>> + Send + 'static) -> Self {
        Task(tokio::spawn(f))
    }

    async fn join(mut self) -> Result<T, PullError> {
        (&mut self.0)
            .await
            .map_err(|e| PullError::BadOption(format!("pull task: {e}")))?
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The blob fetches [`Job::fetch_ahead`] started, by digest: each ends with
/// the bytes it read from the registry.
#[derive(Default)]
pub(super) struct FetchAhead(HashMap<String, Task<u64>>);

/// Whether each chainID is a snapshot already, asked all at once (each
/// `Stat` is a round trip through containerd, and they do not depend on
/// each other). A snapshot committed after this (a concurrent pull) is
/// found by its `Prepare` answering `AlreadyExists`.
async fn snapshots_present(c: &mut Containerd, chains: &[String]) -> Result<Vec<bool>, PullError> {
    // An image may have hundreds of layers: a bounded burst.
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    let tasks: Vec<_> = chains
        .iter()
        .map(|chain| {
            let (mut c, chain, slots) = (c.clone(), chain.clone(), slots.clone());
            Task::spawn(async move {
                let _slot = slots.acquire_owned().await;
                let r = c.snapshot_exists(&chain).await;
                Ok((r, c.unavailable_retries))
            })
        })
        .collect();
    let mut present = Vec::with_capacity(chains.len());
    let retries = c.unavailable_retries;
    for t in tasks {
        let (r, after) = t.join().await?;
        c.unavailable_retries += after - retries;
        present.push(r?);
    }
    Ok(present)
}

/// Puts `layer`'s blob into the content store with `labels` (only labels
/// it if it is there); the bytes read from the registry.
async fn fetch_blob(
    c: &mut Containerd,
    dist: &Arc<Distribution>,
    r: &ImageRef,
    layer: &Descriptor,
    labels: &BTreeMap<String, String>,
) -> Result<u64, PullError> {
    if c.has_content(&layer.digest).await? {
        c.label_content(&layer.digest, labels).await?;
        return Ok(0);
    }
    let (dist, r, d, size) = (dist.clone(), r.clone(), layer.digest.clone(), layer.size);
    let open: Open = Box::new(move || {
        dist.open_blob(&r, &d, size)
            .map_err(|error| PullError::Registry {
                what: format!("layer {d}"),
                error,
            })
    });
    let ingest = format!("layer-{}", layer.digest);
    let (_, n) = c.write_content(&ingest, layer, labels, open).await?;
    Ok(n)
}

/// `Prepare`s the extract snapshot of `chain`: its key and mounts, or
/// `None` when the snapshotter answered `AlreadyExists` (committed remotely).
async fn prepare(
    c: &mut Containerd,
    chain: &str,
    parent: &str,
    labels: &HashMap<String, String>,
) -> Result<Option<(String, Vec<Mount>)>, PullError> {
    let mut unavailable = Unavailable::new();
    loop {
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
            Ok(resp) => return Ok(Some((key, resp.into_inner().mounts))),
            Err(s) if s.code() == Code::AlreadyExists => {
                // Committed by the snapshotter (or by a concurrent pull).
                // containerd answers AlreadyExists for a target only after it
                // found the committed snapshot in the backend (labelled with this
                // chainID, on this parent) and recorded it, so no Stat is needed.
                return Ok(None);
            }
            Err(s) if unavailable.retry(&s, "snapshots.Prepare").await => {
                c.unavailable_retries += 1;
            }
            Err(s) => return Err(ctd(format!("snapshots.Prepare {key}"))(s)),
        }
    }
}

/// A layer's snapshot labels: its `containerd.io/snapshot/*` annotations,
/// the target chainID and the image reference.
fn snapshot_labels(layer: &Descriptor, chain: &str, image_ref: &str) -> HashMap<String, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_labels_keep_only_snapshot_annotations() {
        let d: Descriptor = serde_json::from_str(
            r#"{"mediaType":"m","digest":"sha256:1","size":1,"annotations":{
            "containerd.io/snapshot/overlaybd/blob-digest":"sha256:1",
            "org.opencontainers.image.title":"x"}}"#,
        )
        .unwrap();
        let l = snapshot_labels(&d, "sha256:c", "r/x:1");
        assert_eq!(l.len(), 3);
        assert_eq!(l[LABEL_SNAPSHOT_REF], "sha256:c");
        assert_eq!(l[LABEL_IMAGE_REF], "r/x:1");
        assert_eq!(l[oci::ANN_BLOB_DIGEST], "sha256:1");
    }

    #[test]
    fn compressed_media_types() {
        assert!(is_compressed("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(is_compressed("application/vnd.oci.image.layer.v1.tar+zstd"));
        assert!(!is_compressed(oci::MT_OCI_LAYER_TAR));
    }
}
