//! The snapshotter itself: metadata in redb plus the directory layout and
//! mounts of containerd's overlayfs snapshotter. All methods are blocking;
//! the gRPC service runs them on tokio's blocking pool.
//!
//! Layout under `root`:
//! ```text
//! metadata.db            redb metadata (crate::meta)
//! snapshots/<id>/fs      overlay upperdir / the unpacked layer
//! snapshots/<id>/work    overlay workdir (active snapshots)
//! ```

use crate::error::{Error, Result};
use crate::filter::{Fields, Filter};
use crate::layer::{CommitInfo, LayerHook, MountInfo, PrepareAction, PrepareInfo};
use crate::meta::{Kind, Reader, Record, Store, Ts, Usage};
use crate::proto::containerd::types::Mount;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Largest key + value of one label, as containerd's `labels.Validate`.
const MAX_LABEL_SIZE: usize = 4096;

/// What Stat/List/Update return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// Key or committed name.
    pub name: String,
    /// Parent name or "".
    pub parent: String,
    /// Kind.
    pub kind: Kind,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created: Ts,
    /// Last update.
    pub updated: Ts,
}

impl Info {
    fn new(name: &str, r: &Record) -> Self {
        Info {
            name: name.to_string(),
            parent: r.parent.clone(),
            kind: r.kind,
            labels: r.labels.clone(),
            created: r.created,
            updated: r.updated,
        }
    }
}

/// The snapshotter.
pub struct Snapshotter {
    root: PathBuf,
    store: Store,
    hook: Box<dyn LayerHook>,
    index_off: bool,
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {:.64}",
                k
            )));
        }
    }
    Ok(())
}

/// Free bytes an active snapshot's file system needs so that overlayfs can
/// create its work directories when it mounts (a few directory blocks).
const MIN_FREE_FOR_MOUNT: u64 = 32 << 10;

fn mkdir_mode(p: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir(p).map_err(|e| Error::io("mkdir", p, e))?;
    // Explicit chmod: the process umask must not change the modes.
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("chmod", p, e))
}

/// Whether a snapshot directory has a filesystem mounted at
/// `block/mountpoint` (removing the tree would reach into it).
fn mounted_below(dir: &Path) -> bool {
    let mp = dir.join("block").join("mountpoint");
    mp.is_dir() && obd_device::mount::is_mounted(&mp)
}

/// Disk usage of a directory tree: allocated bytes (st_blocks × 512) and
/// distinct inodes, hard links counted once (containerd's `fs.DiskUsage`).
pub fn disk_usage(dir: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut size = 0i64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).map_err(|e| Error::io("stat", &p, e))?;
        if seen.insert((md.dev(), md.ino())) {
            size += md.blocks() as i64 * 512;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&p).map_err(|e| Error::io("readdir", &p, e))? {
                stack.push(e.map_err(|e| Error::io("readdir", &p, e))?.path());
            }
        }
    }
    Ok(Usage {
        size,
        inodes: seen.len() as i64,
    })
}

impl Snapshotter {
    /// Opens (creating if needed) a snapshotter rooted at `root`.
    pub fn open(root: &Path, hook: Box<dyn LayerHook>) -> Result<Self> {
        for d in [root.to_path_buf(), root.join("snapshots")] {
            if !d.is_dir() {
                std::fs::create_dir_all(&d).map_err(|e| Error::io("mkdir", &d, e))?;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::io("chmod", &d, e))?;
            }
        }
        let store = Store::open(&root.join("metadata.db"))?;
        Ok(Snapshotter {
            root: root.to_path_buf(),
            store,
            hook,
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        })
    }

    /// The snapshotter root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/snapshots/<id>`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// Creates an active snapshot; returns its mounts.
    pub fn prepare(
        &self,
        ns: &str,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(ns, key, parent, labels, Kind::Active)
    }

    fn committed_parent<R: Reader>(&self, r: &R, ns: &str, parent: &str) -> Result<Option<u64>> {
        if parent.is_empty() {
            return Ok(None);
        }
        let p = r
            .get(ns, parent)?
            .ok_or_else(|| Error::NotFound(format!("parent {parent}")))?;
        if p.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {parent} is not a committed snapshot"
            )));
        }
        Ok(Some(p.id))
    }

    /// Creates `snapshots/<id>/{fs,work}`; `fs` takes the owner of the
    /// parent's `fs`, as containerd's overlayfs snapshotter does.
    fn make_dirs(&self, id: u64, kind: Kind, parent: Option<u64>) -> Result<PathBuf> {
        let dir = self.snapshot_dir(id);
        if dir.exists() {
            // Left over by a transaction that never committed.
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
        }
        mkdir_mode(&dir, 0o700)?;
        let fs = dir.join("fs");
        mkdir_mode(&fs, 0o755)?;
        if kind == Kind::Active {
            let work = dir.join("work");
            mkdir_mode(&work, 0o711)?;
            // overlayfs creates `work/work` at mount time and, when that
            // fails for want of space, mounts read-only instead of failing:
            // the container would then see EROFS. Say ENOSPC here instead.
            if obd_remote::cache::fs_space(&work).is_some_and(|(_, free)| free < MIN_FREE_FOR_MOUNT)
            {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::io(
                    "mkdir (overlayfs needs room for its work directory)",
                    &work,
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            }
        }
        if let Some(pid) = parent {
            let pfs = self.snapshot_dir(pid).join("fs");
            let md = std::fs::metadata(&pfs).map_err(|e| Error::io("stat", &pfs, e))?;
            std::os::unix::fs::lchown(&fs, Some(md.uid()), Some(md.gid()))
                .map_err(|e| Error::io("chown", &fs, e))?;
        }
        Ok(dir)
    }

    /// Creates an active snapshot ([`Kind::Active`]) or a read-only view
    /// ([`Kind::View`]); returns its mounts.
    pub fn create(
        &self,
        ns: &str,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key is empty".into()));
        }
        validate_labels(&labels)?;
        // What the pull path passed (containerd 2.x's transfer service, its
        // client pull and CRI each pass different labels): docs/KUBERNETES.md.
        tracing::debug!(ns, key, parent, labels = ?labels.keys().collect::<Vec<_>>(), "prepare labels");
        let action = self.hook.classify(&PrepareInfo {
            namespace: ns,
            key,
            parent,
            kind,
            labels: &labels,
        });
        if let PrepareAction::CommitRemote { target, labels } = action {
            self.commit_remote(ns, parent, &target, labels)?;
            return Err(Error::AlreadyExists(target));
        }
        self.store.write(|w| {
            if w.get(ns, key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_string()));
            }
            let parent_id = self.committed_parent(w, ns, parent)?;
            let id = w.next_id()?;
            self.make_dirs(id, kind, parent_id)?;
            let now = Ts::now();
            w.put(
                ns,
                key,
                &Record {
                    id,
                    kind,
                    parent: parent.to_string(),
                    labels,
                    created: now,
                    updated: now,
                    usage: None,
                },
            )
        })?;
        // Outside the transaction: the mounts may attach a device (seconds).
        match self.mounts(ns, key) {
            Ok(m) => Ok(m),
            Err(e) => {
                tracing::warn!(key, error = %e, "mounts of a new snapshot failed; removing it");
                let _ = self.remove(ns, key);
                Err(e)
            }
        }
    }

    /// Remote-snapshot handshake: commits `target` without data.
    fn commit_remote(
        &self,
        ns: &str,
        parent: &str,
        target: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        self.store.write(|w| {
            if w.get(ns, target)?.is_some() {
                return Ok(());
            }
            let parent_id = self.committed_parent(w, ns, parent)?;
            let id = w.next_id()?;
            let dir = self.make_dirs(id, Kind::Committed, parent_id)?;
            let parent_dir = parent_id.map(|p| self.snapshot_dir(p));
            self.hook.committed(&CommitInfo {
                dir: &dir,
                parent_dir: parent_dir.as_deref(),
                labels: &labels,
            })?;
            let now = Ts::now();
            tracing::info!(ns, target, id, "remote snapshot committed without download");
            w.put(
                ns,
                target,
                &Record {
                    id,
                    kind: Kind::Committed,
                    parent: parent.to_string(),
                    labels,
                    created: now,
                    updated: now,
                    usage: Some(Usage::default()),
                },
            )
        })
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, ns: &str, key: &str) -> Result<Vec<Mount>> {
        self.store.read(|r| self.mounts_in(r, ns, key))
    }

    fn mounts_in<R: Reader>(&self, r: &R, ns: &str, key: &str) -> Result<Vec<Mount>> {
        let rec = r
            .get(ns, key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let mut chain = Vec::new();
        let mut p = rec.parent.clone();
        while !p.is_empty() {
            let pr = r
                .get(ns, &p)?
                .ok_or_else(|| Error::Db(format!("parent {p} of {key} is missing")))?;
            p = pr.parent.clone();
            chain.push(pr);
        }
        let info = MountInfo {
            kind: rec.kind,
            dir: self.snapshot_dir(rec.id),
            parents: chain
                .iter()
                .map(|c| (self.snapshot_dir(c.id), &c.labels))
                .collect(),
            labels: &rec.labels,
        };
        if let Some(m) = self.hook.mounts(&info)? {
            return Ok(m);
        }
        Ok(self.overlay_mounts(&info))
    }

    /// containerd's overlayfs snapshotter mounts.
    fn overlay_mounts(&self, info: &MountInfo<'_>) -> Vec<Mount> {
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let bind = |src: PathBuf, ro: bool| Mount {
            r#type: "bind".into(),
            source: s(src),
            target: String::new(),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        if info.parents.is_empty() {
            return vec![bind(info.dir.join("fs"), info.kind == Kind::View)];
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        if info.kind == Kind::Active {
            options.push(format!("workdir={}", info.dir.join("work").display()));
            options.push(format!("upperdir={}", info.dir.join("fs").display()));
        } else if info.parents.len() == 1 {
            return vec![bind(info.parents[0].0.join("fs"), true)];
        }
        let lower: Vec<String> = info.parents.iter().map(|(d, _)| s(d.join("fs"))).collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }

    /// Commits active snapshot `key` as `name`.
    pub fn commit(
        &self,
        ns: &str,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("committed name is empty".into()));
        }
        validate_labels(&labels)?;
        self.store.write(|w| {
            let rec = w
                .get(ns, key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            if w.get(ns, name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_string()));
            }
            let usage = disk_usage(&self.snapshot_dir(rec.id).join("fs"))?;
            let parent_dir = match rec.parent.as_str() {
                "" => None,
                p => w.get(ns, p)?.map(|r| self.snapshot_dir(r.id)),
            };
            self.hook.committed(&CommitInfo {
                dir: &self.snapshot_dir(rec.id),
                parent_dir: parent_dir.as_deref(),
                labels: &labels,
            })?;
            let now = Ts::now();
            w.delete(ns, key)?;
            w.put(
                ns,
                name,
                &Record {
                    id: rec.id,
                    kind: Kind::Committed,
                    parent: rec.parent,
                    labels,
                    created: now,
                    updated: now,
                    usage: Some(usage),
                },
            )
        })
    }

    /// Removes a snapshot that has no children; its directory goes after the
    /// metadata transaction (what a crash leaves behind, Cleanup removes).
    /// Devices its removal left unused are released before it returns.
    pub fn remove(&self, ns: &str, key: &str) -> Result<()> {
        if self.remove_then_sweep(ns, key)? {
            if let Err(e) = self.sweep() {
                tracing::warn!(key, error = %e, "releasing unused devices");
            }
        }
        Ok(())
    }

    /// [`Snapshotter::remove`] without the sweep; true when one is due (an
    /// active or view snapshot went: the image's shared device may have lost
    /// its last user). The gRPC service sweeps after answering, so a
    /// container's removal does not wait for its image's device to detach.
    pub fn remove_then_sweep(&self, ns: &str, key: &str) -> Result<bool> {
        let rec = self.store.write(|w| {
            let rec = w
                .get(ns, key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            if w.list(ns)?.iter().any(|(_, r)| r.parent == key) {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: it has children"
                )));
            }
            w.delete(ns, key)?;
            Ok(rec)
        })?;
        let dir = self.snapshot_dir(rec.id);
        if let Err(e) = self.hook.removed(&dir, &rec.labels) {
            tracing::warn!(key, error = %e, "layer hook failed on remove");
        }
        // The image's shared device goes with its last container.
        let sweep = rec.kind != Kind::Committed;
        if mounted_below(&dir) {
            tracing::warn!(key, dir = %dir.display(), "a device is still mounted in the snapshot; its directory is kept for Cleanup");
            return Ok(sweep);
        }
        let gone = self.root.join("snapshots").join(format!("rm-{}", rec.id));
        let res = std::fs::rename(&dir, &gone).and_then(|_| std::fs::remove_dir_all(&gone));
        if let Err(e) = res {
            tracing::warn!(key, dir = %dir.display(), error = %e, "removing snapshot directory failed; Cleanup will retry");
        }
        Ok(sweep)
    }

    /// Stat.
    pub fn stat(&self, ns: &str, key: &str) -> Result<Info> {
        self.store.read(|r| {
            let rec = r
                .get(ns, key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            Ok(Info::new(key, &rec))
        })
    }

    /// Updates the labels of `info.name`: no field paths replace all labels;
    /// `labels` does too; `labels.<k>` sets (or, with an empty or missing
    /// value, deletes) one label. Other paths are immutable.
    pub fn update(&self, ns: &str, info: Info, paths: &[String]) -> Result<Info> {
        validate_labels(&info.labels)?;
        self.store.write(|w| {
            let mut rec = w
                .get(ns, &info.name)?
                .ok_or_else(|| Error::NotFound(info.name.clone()))?;
            if paths.is_empty() {
                rec.labels = info.labels.clone();
            }
            for p in paths {
                if let Some(k) = p.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                        None => rec.labels.remove(k),
                    };
                } else if p == "labels" {
                    rec.labels = info.labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {p:?} field on snapshot {:?}",
                        info.name
                    )));
                }
            }
            rec.labels.retain(|_, v| !v.is_empty());
            rec.updated = Ts::now();
            w.put(ns, &info.name, &rec)?;
            Ok(Info::new(&info.name, &rec))
        })
    }

    /// The directories of active and view snapshots and all their
    /// ancestors, in every namespace.
    pub fn in_use(&self) -> Result<HashSet<PathBuf>> {
        self.store.read(|r| {
            let all = r.all()?;
            let by_key: std::collections::HashMap<(&str, &str), &Record> = all
                .iter()
                .map(|(ns, k, rec)| ((ns.as_str(), k.as_str()), rec))
                .collect();
            let mut out = HashSet::new();
            for (ns, _, rec) in all.iter().filter(|(_, _, r)| r.kind != Kind::Committed) {
                out.insert(self.snapshot_dir(rec.id));
                let mut p = rec.parent.as_str();
                while let Some(pr) = by_key.get(&(ns.as_str(), p)) {
                    if !out.insert(self.snapshot_dir(pr.id)) {
                        break;
                    }
                    p = pr.parent.as_str();
                }
            }
            Ok(out)
        })
    }

    /// Lets the layer hook release what no active or view snapshot uses
    /// (devices of images whose last container went).
    pub fn sweep(&self) -> Result<()> {
        self.hook.sweep(&|| self.in_use())
    }

    /// Usage: walked now for active snapshots, recorded at Commit otherwise.
    pub fn usage(&self, ns: &str, key: &str) -> Result<Usage> {
        let rec = self.store.read(|r| {
            r.get(ns, key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))
        })?;
        match (rec.kind, rec.usage) {
            (Kind::Active, _) => {
                // The upper, plus a private writable device's files (dir/dev
                // rw modes); never the mounted image below.
                let dir = self.snapshot_dir(rec.id);
                let mut u = disk_usage(&dir.join("fs"))?;
                for f in ["writable_data", "writable_index"] {
                    if let Ok(md) = std::fs::metadata(dir.join("block").join(f)) {
                        u.size += md.blocks() as i64 * 512;
                        u.inodes += 1;
                    }
                }
                Ok(u)
            }
            (Kind::Committed, None) => disk_usage(&self.snapshot_dir(rec.id).join("fs")),
            (_, u) => Ok(u.unwrap_or_default()),
        }
    }

    /// The namespace that a request without namespace metadata (`ns` empty)
    /// addresses when it names `key`: the empty namespace if `key` is there,
    /// else the one namespace holding `key`. containerd 2.x sends the
    /// namespace with every call made for a client, but not with its garbage
    /// collector's (no namespace in its context), whose keys are backend
    /// names (`<ns>/<id>/<key>`, unique across namespaces): without this its
    /// Remove of a snapshot made under `default` found nothing, and the
    /// image's device, mounts and worker stayed. A non-empty `ns` is kept.
    pub fn namespace_of(&self, ns: &str, key: &str) -> Result<String> {
        if !ns.is_empty() || key.is_empty() {
            return Ok(ns.to_string());
        }
        self.store.read(|r| {
            if r.get(ns, key)?.is_some() {
                return Ok(String::new());
            }
            let mut holders = r.all()?.into_iter().filter(|(_, k, _)| k == key);
            match (holders.next(), holders.next()) {
                (Some((n, _, _)), None) => Ok(n),
                // In none (NotFound follows) or, ambiguous, in several.
                _ => Ok(String::new()),
            }
        })
    }

    /// The snapshots of a namespace that match `filters`; without a
    /// namespace (`ns` empty), those of every namespace: containerd 2.x's
    /// garbage collector walks the snapshotter without one and removes what
    /// its metadata no longer names (see [`Snapshotter::namespace_of`]).
    pub fn list(&self, ns: &str, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse_all(filters)?;
        self.store.read(|r| {
            let snaps = if ns.is_empty() {
                r.all()?.into_iter().map(|(_, k, rec)| (k, rec)).collect()
            } else {
                r.list(ns)?
            };
            Ok(snaps
                .into_iter()
                .filter(|(k, rec)| {
                    filter.matches(&Fields {
                        kind: rec.kind.as_str(),
                        name: k,
                        parent: &rec.parent,
                        labels: &rec.labels,
                    })
                })
                .map(|(k, rec)| Info::new(&k, &rec))
                .collect())
        })
    }

    /// Removes snapshot directories that no metadata refers to, and releases
    /// devices that no snapshot uses.
    pub fn cleanup(&self) -> Result<Vec<PathBuf>> {
        if let Err(e) = self.sweep() {
            tracing::warn!(error = %e, "cleanup: releasing unused devices");
        }
        let snaps = self.root.join("snapshots");
        // Under the writer lock, so no Prepare is between mkdir and commit.
        self.store.write(|w| {
            let ids = w.all_ids()?;
            let mut removed = Vec::new();
            for e in std::fs::read_dir(&snaps).map_err(|e| Error::io("readdir", &snaps, e))? {
                let e = e.map_err(|e| Error::io("readdir", &snaps, e))?;
                let name = e.file_name();
                let keep = name
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|id| ids.contains(&id));
                if keep {
                    continue;
                }
                let p = e.path();
                if mounted_below(&p) {
                    tracing::warn!(path = %p.display(), "cleanup: a device is still mounted here; kept");
                    continue;
                }
                match std::fs::remove_dir_all(&p) {
                    Ok(()) => removed.push(p),
                    Err(err) => tracing::warn!(path = %p.display(), error = %err, "cleanup"),
                }
            }
            Ok(removed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{classify_overlaybd, LayerHook, PlainLayers, PrepareAction, PrepareInfo};

    /// The remote-snapshot handshake alone (obd's hook without its devices).
    struct RemoteLayers;

    impl LayerHook for RemoteLayers {
        fn classify(&self, info: &PrepareInfo<'_>) -> PrepareAction {
            classify_overlaybd(info)
        }
    }

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// containerd 2.x's garbage collector calls without a namespace; it
    /// must see and remove snapshots made under one (the 2.1 leak: devices,
    /// mounts and workers stayed after `ctr image rm`).
    #[test]
    fn calls_without_namespace_reach_every_namespace() {
        let d = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(d.path(), Box::new(PlainLayers)).unwrap();
        sn.prepare("default", "default/1/a", "", l(&[])).unwrap();
        sn.commit("default", "default/2/c", "default/1/a", l(&[]))
            .unwrap();
        sn.prepare("default", "default/3/b", "default/2/c", l(&[]))
            .unwrap();
        sn.prepare("k8s.io", "k8s.io/4/x", "", l(&[])).unwrap();
        sn.prepare("", "plain", "", l(&[])).unwrap();
        let mut names: Vec<_> = sn
            .list("", &[])
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        names.sort();
        assert_eq!(names, ["default/2/c", "default/3/b", "k8s.io/4/x", "plain"]);
        assert_eq!(sn.list("default", &[]).unwrap().len(), 2);
        assert_eq!(sn.namespace_of("", "default/3/b").unwrap(), "default");
        assert_eq!(sn.namespace_of("", "plain").unwrap(), "");
        assert_eq!(sn.namespace_of("", "missing").unwrap(), "");
        assert_eq!(sn.namespace_of("k8s.io", "default/3/b").unwrap(), "k8s.io");
        // The same key in two namespaces: ambiguous, nothing is picked.
        sn.prepare("other", "default/3/b", "", l(&[])).unwrap();
        assert_eq!(sn.namespace_of("", "default/3/b").unwrap(), "");
        sn.remove("other", "default/3/b").unwrap();
        // GC order: children first, each found without a namespace.
        for key in ["default/3/b", "default/2/c", "k8s.io/4/x", "plain"] {
            let ns = sn.namespace_of("", key).unwrap();
            sn.remove(&ns, key).unwrap();
        }
        assert!(sn.list("", &[]).unwrap().is_empty());
    }

    #[test]
    fn lifecycle_mounts_and_cleanup() {
        let d = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(d.path(), Box::new(PlainLayers)).unwrap();
        let m = sn.prepare("ns", "a", "", l(&[])).unwrap();
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].options, ["rw", "rbind"]);
        std::fs::write(d.path().join("snapshots/1/fs/f"), vec![1u8; 10000]).unwrap();
        assert!(sn.usage("ns", "a").unwrap().size >= 10000);
        sn.commit("ns", "c", "a", l(&[("x", "1")])).unwrap();
        assert!(matches!(sn.stat("ns", "a"), Err(Error::NotFound(_))));
        assert!(matches!(sn.stat("other", "c"), Err(Error::NotFound(_))));
        let u = sn.usage("ns", "c").unwrap();
        assert_eq!(u.inodes, 2);
        // One parent: views bind it read-only; actives get an overlay.
        let m = sn.create("ns", "v", "c", l(&[]), Kind::View).unwrap();
        assert_eq!(
            (m[0].r#type.as_str(), m[0].options[0].as_str()),
            ("bind", "ro")
        );
        let m = sn.prepare("ns", "b", "c", l(&[])).unwrap();
        assert_eq!(m[0].r#type, "overlay");
        let lower = m[0].options.last().unwrap();
        assert!(lower.starts_with("lowerdir=") && lower.ends_with("snapshots/1/fs"));
        assert!(matches!(
            sn.prepare("ns", "b", "c", l(&[])),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            sn.prepare("ns", "x", "b", l(&[])),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            sn.remove("ns", "c"),
            Err(Error::FailedPrecondition(_))
        ));
        let names: Vec<_> = sn
            .list("ns", &["parent==c".to_string()])
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["b", "v"]);
        // Update: label paths, immutable fields.
        let mut i = sn.stat("ns", "c").unwrap();
        i.labels = l(&[("x", ""), ("y", "2")]);
        let j = sn.update("ns", i.clone(), &["labels.x".into()]).unwrap();
        assert!(j.labels.is_empty());
        assert!(matches!(
            sn.update("ns", i, &["parent".into()]),
            Err(Error::InvalidArgument(_))
        ));
        // Orphans (a crash between mkdir and commit, or after Remove) go.
        std::fs::create_dir_all(d.path().join("snapshots/77/fs")).unwrap();
        sn.remove("ns", "b").unwrap();
        sn.remove("ns", "v").unwrap();
        let removed = sn.cleanup().unwrap();
        assert_eq!(removed.len(), 1);
        assert!(d.path().join("snapshots/1").is_dir());
        sn.remove("ns", "c").unwrap();
        assert!(!d.path().join("snapshots/1").exists());
        // State survives a reopen.
        sn.prepare("ns", "z", "", l(&[])).unwrap();
        drop(sn);
        let sn = Snapshotter::open(d.path(), Box::new(PlainLayers)).unwrap();
        assert_eq!(sn.stat("ns", "z").unwrap().kind, Kind::Active);
    }

    #[test]
    fn remote_handshake_commits_without_data() {
        let d = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(d.path(), Box::new(RemoteLayers)).unwrap();
        let labels = l(&[
            (crate::layer::LABEL_TARGET_REF, "default/sha256:aa"),
            (crate::layer::LABEL_BLOB_DIGEST, "sha256:bb"),
            (crate::layer::LABEL_BLOB_SIZE, "123"),
            (crate::layer::LABEL_IMAGE_REF, "127.0.0.1:5000/x:obd"),
        ]);
        let r = sn.prepare(
            "default",
            "default/1/extract-1 sha256:aa",
            "",
            labels.clone(),
        );
        assert!(matches!(r, Err(Error::AlreadyExists(_))));
        let i = sn.stat("default", "default/sha256:aa").unwrap();
        assert_eq!(i.kind, Kind::Committed);
        assert_eq!(
            i.labels[crate::layer::LABEL_REMOTE],
            crate::layer::REMOTE_VALUE
        );
        assert!(sn.stat("default", "default/1/extract-1 sha256:aa").is_err());
        // Again: AlreadyExists, nothing new.
        let r = sn.prepare("default", "default/2/extract-2 sha256:aa", "", labels);
        assert!(matches!(r, Err(Error::AlreadyExists(_))));
        assert_eq!(sn.list("default", &[]).unwrap().len(), 1);
    }
}
