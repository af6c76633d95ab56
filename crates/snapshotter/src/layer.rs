//! Layer classification: the hook through which lazy-pull (overlaybd) layers
//! take a different path from plain OCI layers.
//!
//! [`Snapshotter`](crate::Snapshotter) asks its [`LayerHook`] at `Prepare`
//! what to do with a new snapshot, and at `Mounts`/`Prepare`/`View` whether it
//! wants to supply the mounts itself (e.g. a device mounted on the parent's
//! `block/mountpoint`). [`PlainLayers`] treats everything like containerd's
//! overlayfs snapshotter; obd's own hook ([`ObdLayers`](crate::obd::ObdLayers)) takes the
//! remote-snapshot handshake (formats.md §9.2, [`classify_overlaybd`]).

use crate::error::Result;
use crate::meta::Kind;
use crate::proto::containerd::types::Mount;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `containerd.io/snapshot.ref`: the committed name a layer pull targets.
pub const LABEL_TARGET_REF: &str = "containerd.io/snapshot.ref";
/// Marks a layer committed without data.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// Value of [`LABEL_REMOTE`].
pub const REMOTE_VALUE: &str = "remote snapshot";
/// Image reference set by `ctr rpull`-style clients.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/image-ref";
/// Image reference set by CRI / the transfer service.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
// The overlaybd layer annotations arrive as snapshot labels of the same
// name (formats.md §9.1).
/// overlaybd acceleration (trace) layer.
pub use obd_remote::oci::ANN_ACCEL as LABEL_ACCEL_LAYER;
/// overlaybd blob digest (manifest annotation).
pub use obd_remote::oci::ANN_BLOB_DIGEST as LABEL_BLOB_DIGEST;
/// overlaybd blob size (manifest annotation).
pub use obd_remote::oci::ANN_BLOB_SIZE as LABEL_BLOB_SIZE;

/// A Prepare/View as the hook sees it.
pub struct PrepareInfo<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Key of the new snapshot.
    pub key: &'a str,
    /// Parent name or "".
    pub parent: &'a str,
    /// Active or view.
    pub kind: Kind,
    /// Labels of the request.
    pub labels: &'a BTreeMap<String, String>,
}

/// What Prepare does with a new snapshot.
#[derive(Debug, PartialEq, Eq)]
pub enum PrepareAction {
    /// Plain overlayfs behaviour: a writable upper (or view) over the parents.
    Plain,
    /// Remote-snapshot handshake: commit a snapshot named `target` right away
    /// (with these labels) and answer AlreadyExists, so containerd skips the
    /// download and unpack.
    CommitRemote {
        /// Committed name (`containerd.io/snapshot.ref`, verbatim).
        target: String,
        /// Labels of the committed snapshot.
        labels: BTreeMap<String, String>,
    },
}

/// A snapshot whose mounts are being computed.
pub struct MountInfo<'a> {
    /// Kind of the snapshot.
    pub kind: Kind,
    /// `<root>/snapshots/<id>`.
    pub dir: PathBuf,
    /// Parent directories, nearest first, with their labels.
    pub parents: Vec<(PathBuf, &'a BTreeMap<String, String>)>,
    /// Labels of the snapshot.
    pub labels: &'a BTreeMap<String, String>,
}

/// A snapshot just committed (by the remote handshake or after an unpack).
pub struct CommitInfo<'a> {
    /// `<root>/snapshots/<id>`.
    pub dir: &'a std::path::Path,
    /// The parent's directory, if any.
    pub parent_dir: Option<&'a std::path::Path>,
    /// Labels of the committed snapshot.
    pub labels: &'a BTreeMap<String, String>,
}

/// Decides how layers are stored and mounted.
pub trait LayerHook: Send + Sync + 'static {
    /// Classifies a Prepare (or View).
    fn classify(&self, info: &PrepareInfo<'_>) -> PrepareAction;
    /// Mounts for a snapshot, or `None` for the plain overlayfs mounts.
    fn mounts(&self, _info: &MountInfo<'_>) -> Result<Option<Vec<Mount>>> {
        Ok(None)
    }
    /// Called in the commit transaction (an error aborts the commit), e.g.
    /// to write a layer's device config.
    fn committed(&self, _info: &CommitInfo<'_>) -> Result<()> {
        Ok(())
    }
    /// Called after a snapshot's metadata was removed, before its directory
    /// goes (e.g. to detach a device).
    fn removed(&self, _dir: &std::path::Path, _labels: &BTreeMap<String, String>) -> Result<()> {
        Ok(())
    }
    /// Releases what is held for snapshot directories not in the set
    /// `in_use` returns (the active and view snapshots and all their
    /// ancestors). The hook calls `in_use` under the lock that its attaches
    /// take, so nothing is handed out between the check and the release.
    fn sweep(
        &self,
        _in_use: &dyn Fn() -> Result<std::collections::HashSet<PathBuf>>,
    ) -> Result<()> {
        Ok(())
    }
}

/// Every layer is a plain OCI layer (containerd's overlayfs snapshotter).
pub struct PlainLayers;

impl LayerHook for PlainLayers {
    fn classify(&self, _info: &PrepareInfo<'_>) -> PrepareAction {
        PrepareAction::Plain
    }
}

/// The remote-snapshot decision of formats.md §9.2: layers carrying the
/// overlaybd annotations and an image reference are committed remotely (no
/// download); everything else is plain.
pub fn classify_overlaybd(info: &PrepareInfo<'_>) -> PrepareAction {
    let l = info.labels;
    let Some(target) = l.get(LABEL_TARGET_REF) else {
        return PrepareAction::Plain;
    };
    if info.kind != Kind::Active
        || l.get(LABEL_ACCEL_LAYER).map(String::as_str) == Some("yes")
        || target.is_empty()
    {
        return PrepareAction::Plain;
    }
    let remote = l.contains_key(LABEL_BLOB_DIGEST)
        && l.contains_key(LABEL_BLOB_SIZE)
        && (l.contains_key(LABEL_IMAGE_REF) || l.contains_key(LABEL_CRI_IMAGE_REF));
    if !remote {
        return PrepareAction::Plain;
    }
    let mut labels = l.clone();
    labels.insert(LABEL_REMOTE.to_string(), REMOTE_VALUE.to_string());
    PrepareAction::CommitRemote {
        target: target.clone(),
        labels,
    }
}

/// An acceleration layer a snapshotter may unpack itself: its target, image
/// reference, blob digest and size. The same labels as a remote obd layer
/// (§9.2), on a layer marked [`LABEL_ACCEL_LAYER`]; `None` for anything else.
pub struct AccelPrepare<'a> {
    /// Committed name (`containerd.io/snapshot.ref`).
    pub target: &'a str,
    /// Image reference (`image-ref` or `cri.image-ref`).
    pub image: &'a str,
    /// Blob digest.
    pub digest: &'a str,
    /// Blob size.
    pub size: u64,
}

impl<'a> AccelPrepare<'a> {
    /// The acceleration layer `info` prepares, if it has all the labels.
    pub fn of(info: &PrepareInfo<'a>) -> Option<Self> {
        let l = info.labels;
        if info.kind != Kind::Active || l.get(LABEL_ACCEL_LAYER).map(String::as_str) != Some("yes")
        {
            return None;
        }
        let target = l.get(LABEL_TARGET_REF).filter(|t| !t.is_empty())?;
        let image = l
            .get(LABEL_IMAGE_REF)
            .or_else(|| l.get(LABEL_CRI_IMAGE_REF))?;
        Some(AccelPrepare {
            target,
            image,
            digest: l.get(LABEL_BLOB_DIGEST)?,
            size: l.get(LABEL_BLOB_SIZE)?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_needs_all_labels() {
        let mut l = BTreeMap::new();
        let info = |l: &BTreeMap<String, String>| {
            classify_overlaybd(&PrepareInfo {
                namespace: "default",
                key: "extract-1 sha256:x",
                parent: "",
                kind: Kind::Active,
                labels: l,
            })
        };
        assert_eq!(info(&l), PrepareAction::Plain);
        l.insert(LABEL_TARGET_REF.into(), "sha256:x".into());
        l.insert(LABEL_BLOB_DIGEST.into(), "sha256:b".into());
        l.insert(LABEL_BLOB_SIZE.into(), "10".into());
        assert_eq!(info(&l), PrepareAction::Plain);
        l.insert(LABEL_CRI_IMAGE_REF.into(), "r/x:1".into());
        match info(&l) {
            PrepareAction::CommitRemote { target, labels } => {
                assert_eq!(target, "sha256:x");
                assert_eq!(labels[LABEL_REMOTE], REMOTE_VALUE);
            }
            other => panic!("{other:?}"),
        }
        l.insert(LABEL_ACCEL_LAYER.into(), "yes".into());
        assert_eq!(info(&l), PrepareAction::Plain);
    }

    #[test]
    fn accel_prepare_needs_the_remote_labels() {
        let mut l = BTreeMap::new();
        let of = |l: &BTreeMap<String, String>, kind| {
            AccelPrepare::of(&PrepareInfo {
                namespace: "default",
                key: "extract-1 sha256:x",
                parent: "sha256:p",
                kind,
                labels: l,
            })
            .map(|a| (a.target.to_string(), a.image.to_string(), a.size))
        };
        for (k, v) in [
            (LABEL_TARGET_REF, "sha256:x"),
            (LABEL_BLOB_DIGEST, "sha256:b"),
            (LABEL_BLOB_SIZE, "10"),
            (LABEL_CRI_IMAGE_REF, "r/x:1"),
        ] {
            l.insert(k.into(), v.into());
        }
        assert_eq!(of(&l, Kind::Active), None, "not an acceleration layer");
        l.insert(LABEL_ACCEL_LAYER.into(), "yes".into());
        assert_eq!(
            of(&l, Kind::Active),
            Some(("sha256:x".into(), "r/x:1".into(), 10))
        );
        assert_eq!(of(&l, Kind::View), None);
        l.insert(LABEL_BLOB_SIZE.into(), "ten".into());
        assert_eq!(of(&l, Kind::Active), None, "a size that does not parse");
        l.insert(LABEL_BLOB_SIZE.into(), "10".into());
        l.remove(LABEL_CRI_IMAGE_REF);
        assert_eq!(of(&l, Kind::Active), None, "no image reference");
    }
}
