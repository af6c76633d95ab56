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
//! The same code opens the layer in both places
//! ([`RegistrySource::open_ahead`] is the worker's open, kept nowhere), so
//! the worker fetches nothing twice: an attach first waits for the opens of
//! its image's layers ([`OpenAhead::wait`]). A failed open is only logged:
//! the worker opens the layer again and reports its own error.
//!
//! An image with a packed working-set layer (the layer `obd trace record`
//! packs what a start reads into) has all of that layer read by every
//! start, front to back, by the device's trace replay. At the first remote
//! Prepare of such an image, before its layers are committed, the image's
//! manifest is read here and the working set is fetched whole at prefetch
//! priority, in the replay's requests ([`OpenAhead::working_set`]), on a
//! thread of lowered priority (at a fast link the fetch's CPU time
//! otherwise lengthened the pull): its bytes flow while the pull commits
//! the image's layers, not from the device's attach on. An attach does not
//! wait for that fetch; the worker's replay finds its requests cached, or
//! in flight from here (host-wide single flight), and fetches nothing
//! twice.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use obd_device::state::Root;
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::oci::{self, Platform, ANN_WORKING_SET};
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
    /// Images whose working set was looked for, and when.
    seen: HashMap<String, Instant>,
    threads: usize,
}

/// How long an image's working set is not looked for again: the Prepares
/// of one pull's layers come within it.
const SEEN_FOR: Duration = Duration::from_secs(60);

/// Open the top lower of `config` (a committed layer's `config.v1.json`),
/// remote layer `digest`.
struct Job {
    config: PathBuf,
    digest: String,
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

    /// Opens the top lower of the config at `config` (remote layer
    /// `digest`) in the background.
    pub fn open(&self, config: PathBuf, digest: String) {
        let mut st = self.shared.state.locked();
        *st.pending.entry(digest.clone()).or_default() += 1;
        st.queue.push_back(Job { config, digest });
        self.shared.spawn(&mut st);
    }

    /// Reads the manifest of `image` (a reference being pulled) and, if it
    /// has a working-set layer, fetches that layer whole into the block
    /// cache, in the background; once per image in [`SEEN_FOR`]. An
    /// [`OpenAhead::wait`] does not wait for it.
    pub fn working_set(&self, image: &str) {
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
            .name("working-set".into())
            .spawn(move || {
                // Mostly on CPU time the pull leaves: at a fast link this
                // fetch competed with the pull's own work and lengthened it.
                lower_priority();
                shared.working_set_job(&image);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start fetching a working set ahead");
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

    /// Jobs queued or running (tests).
    pub fn pending(&self) -> usize {
        self.shared.state.locked().pending.values().sum()
    }
}

impl Shared {
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
            self.open_job(&job.config, &job.digest);
        }
    }

    fn open_job(&self, config: &Path, digest: &str) {
        let t = Instant::now();
        match self.open_one(config, digest) {
            Ok(true) => {
                tracing::info!(digest = %digest, ms = t.elapsed().as_millis() as u64, "layer opened ahead of its device")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "opening a layer ahead of its device failed (the device's worker opens it again)")
            }
        }
        let mut st = self.state.locked();
        if let Some(n) = st.pending.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                st.pending.remove(digest);
            }
        }
        self.ended.notify_all();
    }

    fn working_set_job(&self, image: &str) {
        let t = Instant::now();
        match self.fetch_working_set(image) {
            Ok(Some((digest, size))) => {
                tracing::info!(image = %image, digest = %digest, bytes = size, ms = t.elapsed().as_millis() as u64, "working set fetched ahead of its device")
            }
            Ok(None) => {
                tracing::debug!(image = %image, "no working-set layer to fetch ahead")
            }
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

    fn open_one(&self, config: &Path, digest: &str) -> Result<bool, String> {
        let Some(b) = self.source(true) else {
            return Ok(false);
        };
        let cfg = ImageConfig::load(config).map_err(|e| e.to_string())?;
        let Some(top) = cfg.layer_refs(config.parent()).last() else {
            return Ok(false);
        };
        if top.lower.digest != digest {
            return Ok(false);
        }
        Ok(b.source
            .open_ahead(top)
            .map_err(|e| e.to_string())?
            .is_some())
    }

    /// Finds the working-set layer in the manifest of `image` (this host's
    /// platform) and fetches it whole, in the trace replay's requests
    /// (`[prefetch]`). Its digest and size, or `None` if it has none.
    fn fetch_working_set(&self, image: &str) -> Result<Option<(String, u64)>, String> {
        let Some(b) = self.source(false) else {
            return Ok(None);
        };
        let r = ImageRef::parse(image).map_err(|e| e.to_string())?;
        let dist =
            Arc::new(Distribution::new(b.config.registry.clone()).map_err(|e| e.to_string())?);
        let resolved =
            oci::resolve_manifest(&dist, &r, &Platform::host()).map_err(|e| e.to_string())?;
        let Some(ws) = resolved
            .manifest
            .layers
            .iter()
            .find(|l| l.annotation(ANN_WORKING_SET) == Some("yes"))
        else {
            return Ok(None);
        };
        let verity = oci::verity_annotations(&ws.annotations)
            .map_err(|e| format!("layer {}: {e}", ws.digest))?;
        let cfg = ImageConfig {
            repo_blob_url: crate::obd::repo_blob_url(image).map_err(|e| e.to_string())?,
            lowers: vec![Lower {
                digest: ws.digest.clone(),
                size: ws.size,
                verity,
                ..Default::default()
            }],
            ..Default::default()
        };
        let Some(layer) = cfg.layer_refs(None).last() else {
            return Ok(None);
        };
        let Some(blob) = b.source.open_ahead(layer).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let p = &b.config.prefetch;
        blob.prefetch_in_order(p.max_request, p.concurrency)
            .map_err(|e| e.to_string())?;
        Ok(Some((ws.digest.clone(), ws.size)))
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
        // A config that does not exist, and one whose top lower is another
        // layer: both jobs end (logged, nothing opened).
        let cfg = dir.path().join("config.v1.json");
        let c = ImageConfig {
            lowers: vec![overlaybd_core::config::Lower {
                digest: "sha256:bb".into(),
                size: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        std::fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
        ahead.open(dir.path().join("missing.json"), "sha256:aa".into());
        ahead.open(cfg, "sha256:cc".into());
        assert!(ahead.wait(
            &["sha256:aa".into(), "sha256:cc".into()],
            Duration::from_secs(60)
        ));
        assert_eq!(ahead.pending(), 0);
    }
}
