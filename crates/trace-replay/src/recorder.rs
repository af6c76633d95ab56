//! Recording (formats §5.3): collect every completed layer-file read, then
//! write the trace with upstream's file-system handshake.
//!
//! 1. [`Recorder::start`] creates `<trace>.lock` exclusively.
//! 2. Reads are recorded (one record per read, split at 1 MiB) until the
//!    operator deletes the lock ([`Recorder::watch`] polls it every second) or
//!    the device goes away (the owner calls [`Recorder::finish`]).
//! 3. [`Recorder::finish`] writes the header with checksum 0, the records,
//!    rewrites the header with the checksum, deletes the lock and creates
//!    `<trace>.ok`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use zfile::sync::{recover, MutexExt};

use crate::format::{header_bytes, Trace};
use crate::{Error, Result};

/// Most records kept (96 MiB of trace); later reads are counted as dropped.
pub const MAX_RECORDS: usize = 4 << 20;

/// How often upstream polls the lock file.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// `path` with `suffix` appended to its file name (`trace` → `trace.lock`).
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

#[derive(Debug, Default)]
struct State {
    trace: Trace,
    /// Set once the file is written: the number of records it holds.
    written: Option<usize>,
}

/// Collects completed reads per layer and writes them as a trace. Thread-safe;
/// share it in an `Arc`.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    lock: PathBuf,
    state: Mutex<State>,
    stopped: AtomicBool,
    dropped: AtomicU64,
}

impl Recorder {
    /// Starts recording into `path` (the trace file): creates `<path>.lock`
    /// exclusively, so two recorders never share a file.
    pub fn start(path: impl Into<PathBuf>) -> Result<Arc<Recorder>> {
        let path = path.into();
        let lock = sibling(&path, ".lock");
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
            .map_err(|e| Error::io(&lock, e))?;
        Ok(Arc::new(Recorder {
            path,
            lock,
            state: Mutex::new(State::default()),
            stopped: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }))
    }

    /// The trace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file whose deletion stops recording.
    pub fn lock_path(&self) -> &Path {
        &self.lock
    }

    /// The `.ok` file created once the trace is written.
    pub fn ok_path(&self) -> PathBuf {
        sibling(&self.path, ".ok")
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a vector and a flag, consistent after every operation.
        self.state.locked()
    }

    /// Records a completed read of `count` bytes at `offset` of `layer` (0 =
    /// bottom). Ignored once recording has stopped.
    pub fn record(&self, layer: u32, offset: u64, count: u64) {
        if self.stopped.load(Ordering::Acquire) || count == 0 {
            return;
        }
        let Ok(offset) = i64::try_from(offset) else {
            return;
        };
        let mut st = self.lock_state();
        if st.written.is_some() {
            return;
        }
        if st.trace.records.len() >= MAX_RECORDS {
            drop(st);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.trace.push_read(layer, offset, count);
    }

    /// Records so far.
    pub fn len(&self) -> usize {
        self.lock_state().trace.records.len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads not recorded because [`MAX_RECORDS`] was reached.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether recording has stopped (the trace is written or being written).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Stops recording and writes the trace (header with checksum 0, records,
    /// header again with the checksum, fsync), deletes the lock and creates
    /// `<trace>.ok`. Returns the number of records written. Idempotent: later
    /// calls return the same count without writing again.
    pub fn finish(&self) -> Result<usize> {
        self.stopped.store(true, Ordering::Release);
        let mut st = self.lock_state();
        if let Some(n) = st.written {
            return Ok(n);
        }
        let body = st.trace.records_bytes();
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&self.path)?;
            f.write_all(&header_bytes(body.len() as u64, 0))?;
            f.write_all(&body)?;
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header_bytes(
                body.len() as u64,
                zfile::crc32c_raw(0, &body),
            ))?;
            f.sync_all()
        };
        write().map_err(|e| Error::io(&self.path, e))?;
        match std::fs::remove_file(&self.lock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&self.lock, e)),
        }
        let ok = self.ok_path();
        File::create(&ok).map_err(|e| Error::io(&ok, e))?;
        let n = st.trace.records.len();
        st.written = Some(n);
        st.trace.records = Vec::new();
        Ok(n)
    }

    /// Starts a thread that checks every `interval` (upstream: 1 s) whether
    /// the lock file is gone, and then calls [`Recorder::finish`]. Stop it with
    /// [`RecorderWatch::stop`] (e.g. when the device goes away first).
    pub fn watch(self: &Arc<Self>, interval: Duration) -> RecorderWatch {
        let (tx, rx) = mpsc::channel::<()>();
        let me = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("trace-record".into())
            .spawn(move || loop {
                match rx.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if me.is_stopped() {
                            return None;
                        }
                        if !me.lock.exists() {
                            return Some(me.finish());
                        }
                    }
                    // Asked to stop, or the owner is gone.
                    _ => return None,
                }
            });
        RecorderWatch {
            stop: Some(tx),
            handle: handle.ok(),
        }
    }
}

impl Drop for Recorder {
    /// A recorder dropped without [`Recorder::finish`] (the device never came
    /// up) releases its lock, so the trace can be recorded by a later attempt.
    fn drop(&mut self) {
        let written = recover(self.state.get_mut()).written.is_some();
        if !written {
            let _ = std::fs::remove_file(&self.lock);
        }
    }
}

impl overlaybd_core::image::ReadObserver for Recorder {
    fn layer_read(&self, layer: usize, offset: u64, len: u64) {
        if let Ok(layer) = u32::try_from(layer) {
            self.record(layer, offset, len);
        }
    }
}

/// The lock-polling thread of [`Recorder::watch`].
#[derive(Debug)]
pub struct RecorderWatch {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<Option<Result<usize>>>>,
}

impl RecorderWatch {
    /// Whether the thread has ended (the lock was deleted and the trace
    /// written, or it was stopped).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread and waits for it. Returns what the thread's own
    /// [`Recorder::finish`] returned, if the lock deletion made it call it.
    pub fn stop(mut self) -> Option<Result<usize>> {
        self.stop.take();
        self.handle.take().and_then(|h| h.join().ok().flatten())
    }
}

impl Drop for RecorderWatch {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_finish_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("trace");
        std::fs::write(&p, b"").unwrap();
        let r = Recorder::start(&p).unwrap();
        assert!(r.lock_path().exists());
        assert!(matches!(Recorder::start(&p), Err(Error::Io { .. })));
        r.record(1, 4096, 3 << 20);
        r.record(0, 0, 0);
        assert_eq!(r.len(), 3);
        assert_eq!(r.finish().unwrap(), 3);
        r.record(0, 0, 512);
        assert_eq!(r.finish().unwrap(), 3);
        assert!(!r.lock_path().exists());
        assert!(r.ok_path().exists());
        let t = Trace::read_file(&p).unwrap();
        assert_eq!(t.records.len(), 3);
        assert_eq!(t.total_bytes(), 3 << 20);
    }

    #[test]
    fn an_unfinished_recorder_releases_its_lock_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("trace");
        std::fs::write(&p, b"").unwrap();
        let r = Recorder::start(&p).unwrap();
        let lock = r.lock_path().to_owned();
        r.record(0, 0, 512);
        drop(r);
        assert!(!lock.exists());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        assert!(!sibling(&p, ".ok").exists());
        // And a new recording can start.
        let r = Recorder::start(&p).unwrap();
        assert_eq!(r.finish().unwrap(), 0);
        assert_eq!(Trace::read_file(&p).unwrap(), Trace::default());
    }
}
