//! Opening an image's remote layers while the pull commits them.
//!
//! A lazy pull commits each obd layer without data; the image's device is
//! attached only later (its acceleration layer's commit, or the container's
//! mount), and its worker then opens every layer: piece table, both ends,
//! jump table and index, a round trip or two each. Opened here instead, on
//! a few threads, each as soon as its commit names it, the worker finds all
//! of it in the host's block cache, and the container's mount waits for the
//! last layer's open only (docs/BENCHMARKS.md, issue 18, "Layers opened at
//! commit").
//!
//! The first remote Prepare of an image reads its manifest, which names
//! every layer (digest, size, piece table): all of its obd layers are
//! queued then, so that their opens run alongside containerd's one-by-one
//! Prepares instead of each after its own commit ([`OpenAhead::image`]);
//! a commit queues its layer only if that did not ([`OpenAhead::open`]).
//!
//! The same code opens the layer in both places
//! ([`RegistrySource::open_ahead`] is the worker's open, kept nowhere), so
//! the worker fetches nothing twice: an attach first waits for the opens of
//! its image's layers ([`OpenAhead::wait`]). A failed open is only logged:
//! the worker opens the layer again and reports its own error.
//!
//! An image with a packed working-set layer (the layer `obd trace record`
//! packs what a start reads into) has all of that layer read by every
//! start, front to back, by the device's trace replay. With the prefetch
//! at pull, once the manifest read at the first remote Prepare has queued
//! the layers' opens, the working set is fetched whole at prefetch
//! priority, in the replay's requests ([`OpenAhead::working_set`]), on a
//! thread of lowered priority (at a fast link the fetch's CPU time
//! otherwise lengthened the pull): its bytes flow while the pull commits
//! the image's layers, not from the device's attach on. An attach does not
//! wait for that fetch; the worker's replay finds its requests cached, or
//! in flight from here (host-wide single flight), and fetches nothing
//! twice.
//!
//! The acceleration layer (the image's top: a small tar of `trace` and the
//! warm list) is fetched here too, right after the manifest read
//! ([`OpenAhead::accel_layer`]): its Prepare then commits it with those
//! files, instead of containerd downloading it into its content store,
//! applying it and committing it (25–60 ms of a pull at 1 Gbit/s).

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use obd_device::open::trace_replay::accel::{read_accel_layer, AccelFile, MAX_ACCEL_BLOB};
use obd_device::state::Root;
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::oci::{self, Platform, ANN_ACCEL, ANN_BLOB_DIGEST, ANN_WORKING_SET};
use obd_remote::registry::RegistryOptions;
use obd_remote::service::{RegistrySource, ServiceConfig};
use overlaybd_core::config::{ImageConfig, Lower};
use zfile::sync::MutexExt;

/// Threads opening layers at once (the registry source's own fetch limit
/// applies across them).
const THREADS: usize = 4;

/// Layers opened ahead of their image's device.
pub struct OpenAhead {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where the service config (registry, cache) is.
    dev_root: Root,
    /// Built from the service config for a burst of jobs (a pull's layers)
    /// and dropped when the last thread ends: a source holds every blob it
    /// opened in use in the block cache, which would keep a collection
    /// from ever freeing them; and it reads the service config and
    /// credentials afresh for each pull.
    source: Mutex<Option<Arc<Burst>>>,
    state: Mutex<State>,
    /// Signalled whenever a job ends.
    ended: Condvar,
}

/// A burst's registry access: the service config and its source.
struct Burst {
    config: ServiceConfig,
    source: RegistrySource,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Layer opens queued or running, by layer digest.
    pending: HashMap<String, usize>,
    /// Layers opened, and when: a commit does not queue them again.
    opened: HashMap<String, Instant>,
    /// Images whose manifest was read, and when.
    seen: HashMap<String, Instant>,
    /// Acceleration layers fetched (or being fetched) ahead of their
    /// Prepare, by blob digest.
    accel: HashMap<String, AccelSlot>,
    threads: usize,
}

impl State {
    /// Forgets acceleration layers fetched more than [`SEEN_FOR`] ago that
    /// no Prepare took (a pull that failed before its last layer).
    fn prune_accel(&mut self) {
        let now = Instant::now();
        self.accel.retain(|_, s| match s {
            AccelSlot::Pending => true,
            AccelSlot::Done(_, t) => now.duration_since(*t) < SEEN_FOR,
        });
    }
}

/// An acceleration layer's fetch ahead of its Prepare.
enum AccelSlot {
    Pending,
    /// Its files (or why it is left to containerd), and when it ended.
    Done(Result<Vec<AccelFile>, String>, Instant),
}

/// What an image's manifest gave: its working-set layer, its acceleration
/// layer, and the registry client that read it.
struct FromManifest {
    ws: Option<Job>,
    accel: Option<AccelBlob>,
    dist: Arc<Distribution>,
}

/// An acceleration layer to fetch: image reference, blob digest and size.
#[derive(Clone)]
struct AccelBlob {
    image: String,
    digest: String,
    size: u64,
}

/// How long an image's manifest is not read again, and an opened layer
/// not queued again: the Prepares of one pull's layers come within it.
const SEEN_FOR: Duration = Duration::from_secs(60);

/// Open `layer`, a config of one remote lower (and the repository URL).
struct Job {
    layer: ImageConfig,
}

impl Job {
    fn new(repo_blob_url: &str, lower: &Lower) -> Self {
        Job {
            layer: ImageConfig {
                repo_blob_url: repo_blob_url.to_string(),
                lowers: vec![Lower {
                    digest: lower.digest.clone(),
                    size: lower.size,
                    verity: lower.verity.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    }

    fn digest(&self) -> &str {
        &self.layer.lowers[0].digest
    }
}

/// Niceness of the working-set fetch's threads: CPU time the pull leaves
/// mostly, yet not so little that a request it holds (a host-wide claim
/// the device's replay may wait on) stalls behind a busy host.
const WORKING_SET_NICE: libc::c_int = 10;

/// Lowers the calling thread (and the threads it starts) to
/// [`WORKING_SET_NICE`].
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority on one thread id of
    // this process with a plain integer niceness touches no memory of ours.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, WORKING_SET_NICE)
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a thread's priority");
    }
}

impl OpenAhead {
    /// Opens layers with the registry and cache settings of `dev_root`'s
    /// service config (the device workers').
    pub fn new(dev_root: Root) -> Self {
        OpenAhead {
            shared: Arc::new(Shared {
                dev_root,
                source: Mutex::new(None),
                state: Mutex::new(State::default()),
                ended: Condvar::new(),
            }),
        }
    }

    /// Opens remote `lower` (of a committed layer whose images' blobs are
    /// at `repo_blob_url`) in the background, unless it is queued, being
    /// opened, or was opened in the last [`SEEN_FOR`].
    pub fn open(&self, repo_blob_url: &str, lower: &Lower) {
        self.shared.queue(Job::new(repo_blob_url, lower));
    }

    /// Reads the manifest of `image` (a reference being pulled) in the
    /// background, once per image in [`SEEN_FOR`], and queues the opens of
    /// its remote obd layers; then, with `working_set`, fetches its
    /// working-set layer (if it has one) whole into the block cache. An
    /// [`OpenAhead::wait`] does not wait for that fetch.
    pub fn image(&self, image: &str, working_set: bool) {
        let mut st = self.shared.state.locked();
        let now = Instant::now();
        st.seen.retain(|_, t| now.duration_since(*t) < SEEN_FOR);
        if st.seen.contains_key(image) {
            return;
        }
        st.seen.insert(image.to_string(), now);
        drop(st);
        let (shared, image) = (Arc::clone(&self.shared), image.to_string());
        let spawned = std::thread::Builder::new()
            .name("image-ahead".into())
            .spawn(move || shared.image_job(&image, working_set));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start reading an image's manifest ahead");
        }
    }

    /// Waits (at most `max`) until no open of a layer in `digests` is queued
    /// or running. False if `max` passed first.
    pub fn wait(&self, digests: &[String], max: Duration) -> bool {
        let end = Instant::now() + max;
        let mut st = self.shared.state.locked();
        while digests.iter().any(|d| st.pending.contains_key(d)) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match self.shared.ended.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// The files of acceleration layer `digest` (`size` bytes) of `image`:
    /// fetched ahead by [`OpenAhead::image`] (waiting at most `max` for
    /// that fetch), else fetched now. The blob must hash to `digest` and be
    /// a plain tar of top-level files ([`read_accel_layer`]); an `Err` says
    /// why not, and the layer is then left to containerd's own unpack.
    pub fn accel_layer(
        &self,
        image: &str,
        digest: &str,
        size: u64,
        max: Duration,
    ) -> Result<Vec<AccelFile>, String> {
        let blob = AccelBlob {
            image: image.to_string(),
            digest: digest.to_string(),
            size,
        };
        let end = Instant::now() + max;
        let mut st = self.shared.state.locked();
        st.prune_accel();
        while matches!(st.accel.get(digest), Some(AccelSlot::Pending)) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("its fetch ahead did not end in time".into());
            }
            st = match self.shared.ended.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        match st.accel.remove(digest) {
            Some(AccelSlot::Done(files, _)) => files,
            _ => {
                drop(st);
                self.shared.fetch_accel(&blob, None)
            }
        }
    }

    /// Jobs queued or running (tests).
    pub fn pending(&self) -> usize {
        self.shared.state.locked().pending.values().sum()
    }
}

impl Shared {
    /// Queues `job` (see [`OpenAhead::open`]).
    fn queue(self: &Arc<Self>, job: Job) {
        let mut st = self.state.locked();
        let now = Instant::now();
        st.opened.retain(|_, t| now.duration_since(*t) < SEEN_FOR);
        let d = job.digest();
        if st.pending.contains_key(d) || st.opened.contains_key(d) {
            return;
        }
        st.pending.insert(d.to_string(), 1);
        st.queue.push_back(job);
        self.spawn(&mut st);
    }

    /// Starts a thread for the queue unless [`THREADS`] run already.
    fn spawn(self: &Arc<Self>, st: &mut State) {
        if st.threads >= THREADS {
            return;
        }
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("open-ahead".into())
            .spawn(move || shared.run());
        match spawned {
            Ok(_) => st.threads += 1,
            Err(e) => {
                // Nothing will run the job: the worker opens the layer.
                tracing::warn!(error = %e, "cannot start a layer open ahead");
                if st.threads == 0 {
                    st.queue.clear();
                    st.pending.clear();
                }
            }
        }
    }

    /// Runs jobs until the queue is empty.
    fn run(&self) {
        loop {
            let job = {
                let mut st = self.state.locked();
                match st.queue.pop_front() {
                    Some(j) => j,
                    None => {
                        st.threads -= 1;
                        if st.threads == 0 {
                            // The burst is over: let the blobs go.
                            self.source.locked().take();
                        }
                        return;
                    }
                }
            };
            self.open_job(&job);
        }
    }

    fn open_job(&self, job: &Job) {
        let (t, digest) = (Instant::now(), job.digest());
        let opened = match self.open_one(job) {
            Ok(true) => {
                tracing::info!(digest = %digest, ms = t.elapsed().as_millis() as u64, "layer opened ahead of its device");
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "opening a layer ahead of its device failed (the device's worker opens it again)");
                false
            }
        };
        let mut st = self.state.locked();
        st.pending.remove(digest);
        if opened {
            st.opened.insert(digest.to_string(), Instant::now());
        }
        self.ended.notify_all();
    }

    /// [`OpenAhead::image`] on its thread.
    fn image_job(self: &Arc<Self>, image: &str, working_set: bool) {
        let t = Instant::now();
        let ws = match self.queue_layers(image) {
            Ok(ws) => ws,
            Err(e) => {
                tracing::warn!(image = %image, error = %e, "reading an image's manifest ahead of its layers failed (each layer is opened at its commit)");
                return;
            }
        };
        if let Some(a) = ws.accel.clone() {
            // Alongside the working set's fetch, as containerd's download of
            // it was, not ahead of it: a start needs both.
            let (me, dist) = (Arc::clone(self), Arc::clone(&ws.dist));
            let spawned = std::thread::Builder::new()
                .name("accel-ahead".into())
                .spawn(move || me.accel_ahead(&a, &dist));
            if let Err(e) = spawned {
                // Its Prepare fetches it.
                tracing::warn!(error = %e, "cannot start fetching the acceleration layer ahead");
            }
        }
        let Some(ws) = ws.ws.filter(|_| working_set) else {
            return;
        };
        // Mostly on CPU time the pull leaves: at a fast link this fetch
        // competed with the pull's own work and lengthened it.
        lower_priority();
        let digest = ws.digest().to_string();
        match self.fetch_working_set(&ws) {
            Ok(Some(size)) => {
                tracing::info!(image = %image, digest = %digest, bytes = size, ms = t.elapsed().as_millis() as u64, "working set fetched ahead of its device")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(image = %image, error = %e, "fetching the working set ahead of its device failed (the device's replay fetches it)")
            }
        }
    }

    /// The source of the current burst, built if there is none; kept for
    /// the burst's other jobs with `keep` (the pool's threads, the last of
    /// which drops it), else only returned.
    fn source(&self, keep: bool) -> Option<Arc<Burst>> {
        let mut slot = self.source.locked();
        if let Some(b) = slot.as_ref() {
            return Some(Arc::clone(b));
        }
        let built = self
            .dev_root
            .load_service_config()
            .map_err(|e| e.to_string())
            .and_then(|config| {
                let source = RegistrySource::new(&config).map_err(|e| e.to_string())?;
                Ok(Arc::new(Burst { config, source }))
            });
        match built {
            Ok(b) => {
                if keep {
                    *slot = Some(Arc::clone(&b));
                }
                Some(b)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no registry source for opening layers ahead of their device");
                None
            }
        }
    }

    /// The registry options of the current burst's service config, else
    /// read afresh: reading a manifest or a small blob needs no source
    /// (whose build opens the block cache).
    fn registry_options(&self) -> Result<RegistryOptions, String> {
        if let Some(b) = self.source.locked().as_ref() {
            return Ok(b.config.registry.clone());
        }
        self.dev_root
            .load_service_config()
            .map(|c| c.registry)
            .map_err(|e| e.to_string())
    }

    fn open_one(&self, job: &Job) -> Result<bool, String> {
        let Some(b) = self.source(true) else {
            return Ok(false);
        };
        let Some(layer) = job.layer.layer_refs(None).last() else {
            return Ok(false);
        };
        Ok(b.source
            .open_ahead(layer)
            .map_err(|e| e.to_string())?
            .is_some())
    }

    /// Reads the manifest of `image` (this host's platform) and queues the
    /// opens of its remote obd layers, bottom up; its working-set and
    /// acceleration layers, if it has them.
    fn queue_layers(self: &Arc<Self>, image: &str) -> Result<FromManifest, String> {
        let r = ImageRef::parse(image).map_err(|e| e.to_string())?;
        let dist =
            Arc::new(Distribution::new(self.registry_options()?).map_err(|e| e.to_string())?);
        let resolved =
            oci::resolve_manifest(&dist, &r, &Platform::host()).map_err(|e| e.to_string())?;
        let url = crate::obd::repo_blob_url(image).map_err(|e| e.to_string())?;
        let (mut ws, mut accel, mut queued) = (None, None, 0);
        for l in &resolved.manifest.layers {
            let a = &l.annotations;
            if l.annotation(ANN_ACCEL) == Some("yes") {
                accel = Some(AccelBlob {
                    image: image.to_string(),
                    digest: l.digest.clone(),
                    size: l.size,
                });
                continue;
            }
            if !a.contains_key(ANN_BLOB_DIGEST) {
                continue;
            }
            let lower = crate::obd::remote_lower(a)?;
            if l.annotation(ANN_WORKING_SET) == Some("yes") {
                ws = Some(Job::new(&url, &lower));
            }
            self.queue(Job::new(&url, &lower));
            queued += 1;
        }
        tracing::info!(image = %image, layers = queued, "layers queued for opening from the image's manifest");
        Ok(FromManifest { ws, accel, dist })
    }

    /// Fetches acceleration layer `a` for its Prepare
    /// ([`OpenAhead::accel_layer`]), unless that Prepare is fetching it.
    fn accel_ahead(&self, a: &AccelBlob, dist: &Arc<Distribution>) {
        {
            let mut st = self.state.locked();
            st.prune_accel();
            if st.accel.contains_key(&a.digest) {
                return;
            }
            st.accel.insert(a.digest.clone(), AccelSlot::Pending);
        }
        let files = self.fetch_accel(a, Some(dist));
        if let Err(e) = &files {
            tracing::warn!(image = %a.image, digest = %a.digest, error = %e, "fetching the acceleration layer ahead failed (containerd unpacks it)");
        }
        let mut st = self.state.locked();
        st.accel
            .insert(a.digest.clone(), AccelSlot::Done(files, Instant::now()));
        self.ended.notify_all();
    }

    /// Fetches acceleration layer `a` whole (with `dist`, or a client of
    /// the service config's registry options), checks its digest and reads
    /// its files.
    fn fetch_accel(
        &self,
        a: &AccelBlob,
        dist: Option<&Arc<Distribution>>,
    ) -> Result<Vec<AccelFile>, String> {
        if a.size > MAX_ACCEL_BLOB {
            return Err(format!("{} bytes, more than {MAX_ACCEL_BLOB}", a.size));
        }
        let dist = match dist {
            Some(d) => Arc::clone(d),
            None => {
                Arc::new(Distribution::new(self.registry_options()?).map_err(|e| e.to_string())?)
            }
        };
        let r = ImageRef::parse(&a.image).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let mut body = Vec::with_capacity(a.size as usize);
        dist.open_blob(&r, &a.digest, a.size)
            .map_err(|e| e.to_string())?
            .take(a.size + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("reading blob {}: {e}", a.digest))?;
        if body.len() as u64 != a.size {
            return Err(format!(
                "blob {}: {} bytes, the manifest says {}",
                a.digest,
                body.len(),
                a.size
            ));
        }
        let got = oci::sha256_digest(&body);
        if got != a.digest {
            return Err(format!("blob {} hashes to {got}", a.digest));
        }
        let files = read_accel_layer(&body).map_err(|e| e.to_string())?;
        tracing::debug!(digest = %a.digest, bytes = a.size, ms = t.elapsed().as_millis() as u64, "acceleration layer fetched");
        Ok(files)
    }

    /// Fetches the working-set layer `ws` whole, in the trace replay's
    /// requests (`[prefetch]`). Its size, or `None` if it is not remote.
    fn fetch_working_set(&self, ws: &Job) -> Result<Option<u64>, String> {
        let Some(b) = self.source(false) else {
            return Ok(None);
        };
        let Some(layer) = ws.layer.layer_refs(None).last() else {
            return Ok(None);
        };
        let Some(blob) = b.source.open_ahead(layer).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let p = &b.config.prefetch;
        blob.prefetch_in_order(p.max_request, p.concurrency)
            .map_err(|e| e.to_string())?;
        Ok(Some(ws.layer.lowers[0].size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_end_when_the_opens_end_whatever_their_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = OpenAhead::new(Root::new(dir.path().join("root")));
        // Nothing pending: no wait.
        assert!(ahead.wait(&["sha256:aa".into()], Duration::ZERO));
        // No service config, so no source: both jobs end, nothing opened,
        // and a layer not opened is queued again by the next commit.
        let lower = |d: &str| Lower {
            digest: d.into(),
            size: 1,
            ..Default::default()
        };
        ahead.open("", &lower("sha256:aa"));
        ahead.open("http://r/v2/x/blobs", &lower("sha256:cc"));
        assert!(ahead.wait(
            &["sha256:aa".into(), "sha256:cc".into()],
            Duration::from_secs(60)
        ));
        assert_eq!(ahead.pending(), 0);
        assert!(ahead.shared.state.locked().opened.is_empty());
    }
}
