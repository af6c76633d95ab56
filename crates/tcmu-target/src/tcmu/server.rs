//! Serving a ring: one thread waits for the kernel and parses new entries, a small
//! pool of workers runs the commands against the backend, and each worker writes
//! its completion at the ring's tail (in completion order) and kicks the kernel.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use zfile::sync::MutexExt;

use super::ring::{self, Command, Defect, Request, Response, Ring};
use super::scsi::{self, LunInfo};
use crate::{BlockBackend, Error, Result};

/// How the handler learns of new entries and tells the kernel about completions.
pub trait Doorbell: Send + Sync {
    /// Waits until the kernel signals, `timeout` passes, or [`Doorbell::interrupt`]
    /// is called. Returns false once interrupted.
    fn wait(&self, timeout: Duration) -> Result<bool>;
    /// Tells the kernel that `cmd_tail` moved.
    fn kick(&self) -> Result<()>;
    /// Wakes the waiter for good (the server is stopping).
    fn interrupt(&self);
}

/// The doorbell of a real device: the `/dev/uioN` file (read blocks for the
/// kernel's event counter, a 4-byte write kicks) plus an eventfd for stopping.
pub struct UioDoorbell {
    uio: File,
    stop: OwnedFd,
    name: String,
}

impl UioDoorbell {
    /// Wraps an open `/dev/uioN`.
    pub fn new(uio: File, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let stop = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::io(format!("eventfd for {name}"), e.into()))?;
        Ok(UioDoorbell { uio, stop, name })
    }
}

impl Doorbell for UioDoorbell {
    fn wait(&self, timeout: Duration) -> Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [
            PollFd::new(&self.uio, PollFlags::IN),
            PollFd::new(&self.stop, PollFlags::IN),
        ];
        let ts = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::io(format!("poll {}", self.name), e.into())),
        }
        let (uio_rev, stop_rev) = (fds[0].revents(), fds[1].revents());
        if !stop_rev.is_empty() {
            return Ok(false);
        }
        if uio_rev.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
            return Err(Error::Io {
                context: format!("{} went away", self.name),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        if uio_rev.contains(PollFlags::IN) {
            // Consume the event count; it is only a wake-up.
            let mut buf = [0u8; 4];
            match rustix::io::read(&self.uio, &mut buf) {
                Ok(_) | Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(e) => return Err(Error::io(format!("read {}", self.name), e.into())),
            }
        }
        Ok(true)
    }

    fn kick(&self) -> Result<()> {
        loop {
            match rustix::io::write(&self.uio, &1u32.to_ne_bytes()) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::io(format!("kick {}", self.name), e.into())),
            }
        }
    }

    fn interrupt(&self) {
        let _ = rustix::io::write(self.stop.as_fd(), &1u64.to_ne_bytes());
    }
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands completed.
    pub completed: std::sync::atomic::AtomicU64,
    /// Commands that ended in CHECK CONDITION.
    pub failed: std::sync::atomic::AtomicU64,
}

struct Shared {
    ring: Mutex<Ring>,
    region: ring::Region,
    doorbell: Arc<dyn Doorbell>,
    backend: Arc<dyn BlockBackend>,
    lun: LunInfo,
    stopping: AtomicBool,
    broken: Mutex<Option<String>>,
    stats: Stats,
}

impl Shared {
    fn lock_ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.locked()
    }

    fn set_broken(&self, why: String) {
        tracing::error!("tcmu {}: {why}", self.lun.serial);
        let mut b = self.broken.locked();
        b.get_or_insert(why);
    }
}

/// A ring being served.
pub struct Server {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("lun", &self.shared.lun.serial)
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// How often the ring thread looks at the ring without a wake-up.
const IDLE_POLL: Duration = Duration::from_millis(500);

impl Server {
    /// Starts serving `ring` with `workers` worker threads (at least 1).
    pub fn start(
        ring: Ring,
        doorbell: Arc<dyn Doorbell>,
        backend: Arc<dyn BlockBackend>,
        lun: LunInfo,
        workers: usize,
    ) -> Result<Server> {
        let region = ring.region().clone();
        let shared = Arc::new(Shared {
            ring: Mutex::new(ring),
            region,
            doorbell,
            backend,
            lun,
            stopping: AtomicBool::new(false),
            broken: Mutex::new(None),
            stats: Stats::default(),
        });
        let (tx, rx) = mpsc::channel::<Command>();
        let rx = Arc::new(Mutex::new(rx));
        let mut server = Server {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        let name = &shared.lun.serial;
        for i in 0..workers.max(1) {
            let (sh, rx) = (shared.clone(), rx.clone());
            let t = std::thread::Builder::new()
                .name(format!("tcmu-w{i}-{name}"))
                .spawn(move || worker(&sh, &rx))
                .map_err(|e| Error::io("spawn a TCMU worker thread", e))?;
            server.threads.push(t);
        }
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("tcmu-ring-{name}"))
            .spawn(move || ring_loop(&sh, tx))
            .map_err(|e| Error::io("spawn the TCMU ring thread", e))?;
        server.threads.push(t);
        Ok(server)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Why the server stopped serving on its own (a corrupt ring, a vanished
    /// device), if it did.
    pub fn broken(&self) -> Option<String> {
        self.shared.broken.locked().clone()
    }

    /// Commands parsed and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.shared.lock_ring().outstanding()
    }

    /// Stops the threads. Commands already parsed are still executed and completed.
    pub fn stop(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.doorbell.interrupt();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("tcmu {}: a server thread panicked", self.shared.lun.serial);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn ring_loop(sh: &Shared, tx: mpsc::Sender<Command>) {
    while !sh.stopping.load(Ordering::SeqCst) {
        let polled = {
            let mut ring = sh.lock_ring();
            ring.poll()
                .and_then(|reqs| ring.release_non_cmds().map(|moved| (reqs, moved)))
        };
        let (reqs, moved) = match polled {
            Ok(r) => r,
            Err(e) => {
                sh.set_broken(format!("ring stopped: {e}"));
                break;
            }
        };
        for req in reqs {
            match req {
                Request::Cmd(cmd) => {
                    if tx.send(cmd).is_err() {
                        sh.set_broken("worker threads are gone".into());
                        return;
                    }
                }
                Request::Tmr(t) => tracing::info!(
                    "tcmu {}: task management {} for commands {:?}",
                    sh.lun.serial,
                    t.tmr_type,
                    t.cmd_ids
                ),
            }
        }
        if moved {
            if let Err(e) = sh.doorbell.kick() {
                tracing::warn!("tcmu {}: {e}", sh.lun.serial);
            }
        }
        match sh.doorbell.wait(IDLE_POLL) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                sh.set_broken(format!("waiting for the kernel: {e}"));
                break;
            }
        }
    }
}

fn worker(sh: &Shared, rx: &Mutex<mpsc::Receiver<Command>>) {
    loop {
        let cmd = {
            let rx = rx.locked();
            rx.recv()
        };
        let Ok(cmd) = cmd else { return };
        let rsp = execute(sh, &cmd);
        if rsp.status != scsi::status::GOOD {
            sh.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        let done = sh.lock_ring().complete(cmd.cmd_id, &rsp);
        match done {
            Ok(()) => {
                sh.stats.completed.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = sh.doorbell.kick() {
                    tracing::warn!("tcmu {}: {e}", sh.lun.serial);
                }
            }
            Err(e) => sh.set_broken(format!("completing command {}: {e}", cmd.cmd_id)),
        }
    }
}

fn hardware_error() -> Response {
    Response {
        status: scsi::status::CHECK_CONDITION,
        sense: scsi::fixed_sense(
            scsi::key::HARDWARE_ERROR,
            scsi::asc::INTERNAL_TARGET_FAILURE,
        ),
        ..Response::default()
    }
}

/// Runs one command: gathers data-out, emulates, scatters data-in.
fn execute(sh: &Shared, cmd: &Command) -> Response {
    match &cmd.defect {
        Some(Defect::BadCdb(why)) => {
            tracing::warn!("tcmu {}: command {}: {why}", sh.lun.serial, cmd.cmd_id);
            return Response {
                status: scsi::status::CHECK_CONDITION,
                unknown_op: true,
                ..Response::default()
            };
        }
        Some(Defect::BadIovec(why)) => {
            tracing::warn!("tcmu {}: command {}: {why}", sh.lun.serial, cmd.cmd_id);
            return hardware_error();
        }
        None => {}
    }
    let data_out = if scsi::is_data_out(&cmd.cdb) {
        match ring::gather(&sh.region, &cmd.iovs) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("tcmu {}: command {}: {e}", sh.lun.serial, cmd.cmd_id);
                return hardware_error();
            }
        }
    } else {
        Vec::new()
    };
    let data_in_len = if data_out.is_empty() {
        cmd.data_len() as usize
    } else {
        0
    };
    let r = scsi::execute(
        &sh.lun,
        sh.backend.as_ref(),
        &cmd.cdb,
        &data_out,
        data_in_len,
    );
    if !scsi::is_data_out(&cmd.cdb) && !cmd.iovs.is_empty() && r.status == scsi::status::GOOD {
        if let Err(e) = ring::scatter(&sh.region, &cmd.iovs, &r.data_in) {
            tracing::warn!("tcmu {}: command {}: {e}", sh.lun.serial, cmd.cmd_id);
            return hardware_error();
        }
    }
    Response {
        status: r.status,
        sense: r.sense,
        unknown_op: false,
        read_len: None,
    }
}
