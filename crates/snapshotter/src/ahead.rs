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

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use obd_device::state::Root;
use obd_remote::service::RegistrySource;
use overlaybd_core::config::ImageConfig;
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
    source: Mutex<Option<Arc<RegistrySource>>>,
    state: Mutex<State>,
    /// Signalled whenever a job ends.
    ended: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Jobs queued or running, by layer digest.
    pending: HashMap<String, usize>,
    threads: usize,
}

/// Open the top lower of `config` (a committed layer's `config.v1.json`).
struct Job {
    config: PathBuf,
    digest: String,
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
        if st.threads < THREADS {
            let shared = Arc::clone(&self.shared);
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
            let t = Instant::now();
            match self.open_one(&job) {
                Ok(true) => {
                    tracing::info!(digest = %job.digest, ms = t.elapsed().as_millis() as u64, "layer opened ahead of its device")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(digest = %job.digest, error = %e, "opening a layer ahead of its device failed (the device's worker opens it again)")
                }
            }
            let mut st = self.state.locked();
            if let Some(n) = st.pending.get_mut(&job.digest) {
                *n -= 1;
                if *n == 0 {
                    st.pending.remove(&job.digest);
                }
            }
            self.ended.notify_all();
        }
    }

    /// The source of the current burst, built if there is none.
    fn source(&self) -> Option<Arc<RegistrySource>> {
        let mut slot = self.source.locked();
        if slot.is_none() {
            let built = self
                .dev_root
                .load_service_config()
                .map_err(|e| e.to_string())
                .and_then(|c| RegistrySource::new(&c).map_err(|e| e.to_string()));
            match built {
                Ok(s) => *slot = Some(Arc::new(s)),
                Err(e) => {
                    tracing::warn!(error = %e, "no registry source for opening layers ahead of their device");
                }
            }
        }
        slot.clone()
    }

    fn open_one(&self, job: &Job) -> Result<bool, String> {
        let Some(src) = self.source() else {
            return Ok(false);
        };
        let cfg = ImageConfig::load(&job.config).map_err(|e| e.to_string())?;
        let Some(top) = cfg.layer_refs(job.config.parent()).last() else {
            return Ok(false);
        };
        if top.lower.digest != job.digest {
            return Ok(false);
        }
        src.open_ahead(top).map_err(|e| e.to_string())
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
