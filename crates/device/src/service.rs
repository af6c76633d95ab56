//! The device service: a control socket (`<root>/obd.sock`, one JSON request
//! line and one JSON reply line per connection; who may connect and the
//! bounds on clients are [`crate::control`]'s), worker processes, and
//! reconciliation.
//!
//! Requests: `{"op":"attach","config":…,"frontend":…,"mountpoint":…,"id":…}`,
//! `{"op":"detach","device":<id, /dev path or mount point>}`, `{"op":"list"}`,
//! `{"op":"ping"}`. Replies: `{"ok":true,…}` or `{"ok":false,"error":…}`.
//!
//! The service holds no device state in memory but one thing: everything is
//! in the device directories (see [`crate::state`]), written by the workers.
//! So when the service stops or dies, devices keep working; at start it adopts
//! the devices whose workers are alive and cleans up the rest.
//!
//! The one thing is supervision. For every worker it started or adopted, the
//! service keeps a copy of the descriptor that holds the device's kernel side
//! ([`tcmu_target::Attachment::kept_fd`], taken with `pidfd_getfd`) and waits
//! for the worker's exit. A worker that dies without detaching (a crash,
//! `kill -9`, or a handover for an upgrade, see [`upgrade`]) is replaced by a
//! new one for the same device, started with that descriptor
//! ([`crate::worker::KEPT_FD_ENV`]): same block device, same mount, same
//! upper; the requests the dead worker had taken are served again. When no
//! worker comes back ([`RESTART_ATTEMPTS`], with backoff), the copy is closed,
//! which ends the connection: the device's I/O fails with EIO instead of
//! waiting, and [`Event::Failed`] says why.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zfile::sync::MutexExt;

use crate::control::{self, Limits};
use crate::state::{check_id, worker_alive, DeviceRecord, Request, Root};
use crate::worker::KEPT_FD_ENV;
use crate::{mount, Error, Result};

/// How long detach waits for a worker to finish.
const DETACH_TIMEOUT: Duration = Duration::from_secs(60);

/// How many workers are started, one after the other, for a device whose
/// worker died, before its I/O is failed.
pub const RESTART_ATTEMPTS: u32 = 5;

/// The pause before restart attempt `n` (the first is at once): 100 ms,
/// doubling, so all attempts end within about 2 s plus their bring-ups.
fn restart_backoff(n: u32) -> Duration {
    match n {
        0 => Duration::ZERO,
        n => Duration::from_millis(100 << (n - 1).min(4)),
    }
}

/// How long [`Service::settle`] waits for a restart to finish.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What supervision did, for the owner's logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A device's worker died (or handed over) and a new one serves it.
    Restarted {
        /// The device.
        id: String,
        /// From the death seen to the new worker serving.
        took: Duration,
    },
    /// A device's worker died and none could be started: its I/O fails.
    Failed {
        /// The device.
        id: String,
        /// Why (the last worker's failure).
        reason: String,
    },
}

/// One supervised device.
struct Supervised {
    /// The worker watched.
    pid: u32,
    /// The copy of its kept descriptor, if its frontend has one.
    fd: Option<Arc<OwnedFd>>,
    /// A detach is under way: the worker's exit is not a death.
    stopping: bool,
    /// A new worker is being started.
    restarting: bool,
}

/// A receiver of supervision [`Event`]s.
type EventFn = Box<dyn Fn(&Event) + Send + Sync>;

/// The supervision state shared by a service and its watcher threads.
#[derive(Default)]
struct Supervision {
    devices: Mutex<HashMap<String, Supervised>>,
    events: OnceLock<EventFn>,
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Attach an image.
    Attach {
        /// config.v1.json (absolute).
        config: PathBuf,
        /// Frontend name.
        frontend: String,
        /// Mount the filesystem here.
        #[serde(default)]
        mountpoint: Option<PathBuf>,
        /// Device id; chosen by the service when absent.
        #[serde(default)]
        id: Option<String>,
    },
    /// Detach a device by id, device node or mount point.
    Detach {
        /// Which.
        device: String,
    },
    /// List devices.
    List,
    /// Liveness check.
    Ping,
}

/// A device as `list` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listed {
    /// The record.
    #[serde(flatten)]
    pub record: DeviceRecord,
    /// Whether its worker is running.
    pub alive: bool,
}

/// The running service (clones share everything).
#[derive(Clone)]
pub struct Service {
    root: Root,
    worker_cmd: Vec<String>,
    lock: Arc<Mutex<()>>,
    limits: Limits,
    sup: Arc<Supervision>,
}

impl Service {
    /// A service over `root`. `worker_cmd` is the program and leading arguments
    /// that run a worker; `--root <root> --id <id>` is appended. The program is
    /// started by path each time, so a binary replaced on disk runs from the
    /// next worker on (see [`upgrade`]).
    pub fn new(root: Root, worker_cmd: Vec<String>) -> Self {
        Service {
            root,
            worker_cmd,
            lock: Arc::new(Mutex::new(())),
            limits: Limits::default(),
            sup: Arc::new(Supervision::default()),
        }
    }

    /// The same service with other bounds on control-socket clients.
    pub fn with_limits(self, limits: Limits) -> Self {
        Service { limits, ..self }
    }

    /// Calls `f` with every supervision [`Event`] (from watcher threads).
    /// Only the first call takes effect.
    pub fn on_event(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        let _ = self.sup.events.set(Box::new(f));
    }

    fn emit(&self, e: Event) {
        if let Some(f) = self.sup.events.get() {
            f(&e);
        }
    }

    /// Waits (bounded) while a new worker is being started for `id`, so a
    /// caller does not take a device between two workers for a dead one.
    pub fn settle(&self, id: &str) {
        let restarting = || {
            self.sup
                .devices
                .locked()
                .get(id)
                .is_some_and(|d| d.restarting)
        };
        tcmu_target::wait_until(SETTLE_TIMEOUT, || !restarting());
    }

    /// Supervises the live worker of `rec` (started by another service, e.g.
    /// before a restart): keeps a copy of its descriptor and replaces it when
    /// it dies. False if the worker is gone.
    pub fn adopt(&self, rec: &DeviceRecord) -> bool {
        let pidfd = rustix::process::Pid::from_raw(rec.pid as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        match pidfd {
            // Checked after the pidfd is open: it names this very worker.
            Some(fd) if worker_alive(rec) => {
                self.watch(rec, fd, None);
                true
            }
            _ => false,
        }
    }

    /// Starts supervising the worker of `rec`: copies its kept descriptor and
    /// waits for its exit on a thread (reaping `child` if it is ours).
    fn watch(&self, rec: &DeviceRecord, pidfd: OwnedFd, child: Option<Child>) {
        let id = rec.id.clone();
        let fd = rec.kept_fd.and_then(|n| {
            rustix::process::pidfd_getfd(&pidfd, n, rustix::process::PidfdGetfdFlags::empty())
                .map_err(|e| {
                    tracing::warn!(
                        "obd device service: cannot keep descriptor {n} of worker {} of {id}: {e}; \
                         the device dies with its worker",
                        rec.pid
                    )
                })
                .ok()
        });
        if let Err(e) = self.root.save_supervisor(&id) {
            tracing::warn!("obd device service: {e}");
        }
        self.sup.devices.locked().insert(
            id.clone(),
            Supervised {
                pid: rec.pid,
                fd: fd.map(Arc::new),
                stopping: false,
                restarting: false,
            },
        );
        let (me, pid) = (self.clone(), rec.pid);
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{id}"))
            .spawn(move || {
                let how = match child {
                    Some(mut c) => c.wait().map_or_else(|e| e.to_string(), |s| s.to_string()),
                    None => {
                        wait_exit(&pidfd);
                        "exited".into()
                    }
                };
                me.worker_exited(&id, pid, &how);
            });
        if let Err(e) = spawned {
            tracing::error!("obd device service: cannot watch worker {pid}: {e}");
        }
    }

    /// Worker `pid` of `id` is gone (`how`): unless it detached (its record
    /// is gone) or is being detached, start another with backoff, or fail the
    /// device's I/O.
    fn worker_exited(&self, id: &str, pid: u32, how: &str) {
        let fd = {
            let mut devs = self.sup.devices.locked();
            match devs.get_mut(id) {
                Some(d) if d.pid == pid && !d.stopping => {
                    d.restarting = true;
                    d.fd.clone()
                }
                Some(d) if d.pid == pid => {
                    devs.remove(id);
                    return;
                }
                _ => return,
            }
        };
        let done = |svc: &Service| {
            let mut devs = svc.sup.devices.locked();
            if devs.get(id).is_some_and(|d| d.pid == pid) {
                devs.remove(id);
            }
        };
        let rec = match self.root.record(id) {
            Ok(Some(r)) if r.pid == pid => r,
            // Detached cleanly: the worker removed its directory.
            _ => return done(self),
        };
        if fd.is_none() && rec.request.frontend != "tcmu" {
            let reason = format!(
                "worker {pid} {how}, and nothing kept the device's {} connection",
                rec.request.frontend
            );
            tracing::error!("obd device service: device {id}: {reason}; its I/O fails");
            done(self);
            return self.emit(Event::Failed {
                id: id.to_string(),
                reason,
            });
        }
        tracing::warn!("obd device service: worker {pid} of {id} {how}; starting another");
        let t0 = Instant::now();
        let mut last = String::new();
        for n in 0..RESTART_ATTEMPTS {
            std::thread::sleep(restart_backoff(n));
            let stopping = self.sup.devices.locked().get(id).is_none_or(|d| d.stopping);
            if stopping {
                return done(self);
            }
            match self.spawn_worker(id, &rec.request, fd.as_deref()) {
                Ok(new) => {
                    tracing::info!(
                        "obd device service: device {id} served by worker {} after {} ms",
                        new.pid,
                        t0.elapsed().as_millis()
                    );
                    return self.emit(Event::Restarted {
                        id: id.to_string(),
                        took: t0.elapsed(),
                    });
                }
                Err(e) => {
                    tracing::warn!(
                        "obd device service: device {id}: worker {} of {RESTART_ATTEMPTS} failed: {e}",
                        n + 1
                    );
                    last = e.to_string();
                }
            }
        }
        // Closing the last copy of the descriptor ends the connection: what
        // waits on the device fails with EIO instead of waiting forever.
        done(self);
        let reason = format!("no worker came back after {RESTART_ATTEMPTS} attempts: {last}");
        tracing::error!("obd device service: device {id}: {reason}; its I/O fails");
        self.emit(Event::Failed {
            id: id.to_string(),
            reason,
        });
    }

    /// Marks `id` as being detached (its worker's exit is expected).
    fn stopping(&self, id: &str) {
        if let Some(d) = self.sup.devices.locked().get_mut(id) {
            d.stopping = true;
        }
    }

    /// Adopts devices whose workers are alive; cleans up and removes the rest.
    /// Returns (adopted, cleaned) ids.
    pub fn reconcile(&self) -> Result<(Vec<String>, Vec<String>)> {
        let _g = self.lock.locked();
        let (mut adopted, mut cleaned) = (Vec::new(), Vec::new());
        for id in self.root.ids()? {
            match self.root.record(&id) {
                Ok(Some(rec)) if self.adopt(&rec) => adopted.push(id),
                // A TCMU device outlives its worker (the kernel keeps the ring):
                // a new worker takes it over and readers never notice.
                Ok(Some(rec)) if rec.request.frontend == "tcmu" => {
                    match self.spawn_worker(&id, &rec.request, None) {
                        Ok(_) => adopted.push(format!("{id} (taken over)")),
                        Err(e) => {
                            tracing::error!("obd device service: takeover of {id} failed: {e}");
                            cleanup_device(&self.root, &id)?;
                            cleaned.push(id);
                        }
                    }
                }
                _ => {
                    cleanup_device(&self.root, &id)?;
                    cleaned.push(id);
                }
            }
        }
        Ok((adopted, cleaned))
    }

    /// Serves the control socket until the process is stopped. Reconciles first.
    pub fn serve(&self) -> Result<()> {
        let dir = self.root.dir();
        std::fs::create_dir_all(self.root.devices_dir())
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let sock = self.root.socket();
        if UnixStream::connect(&sock).is_ok() {
            return Err(Error::Service {
                socket: sock,
                detail: "another device service is already running on this root".into(),
            });
        }
        let _ = std::fs::remove_file(&sock);
        let (adopted, cleaned) = self.reconcile()?;
        tracing::info!(
            "obd device service: root {}, adopted {adopted:?}, cleaned up {cleaned:?}",
            dir.display()
        );
        let listener = control::bind(&sock)?;
        let owner = control::socket_owner(&sock)?;
        tracing::info!("obd device service: listening on {}", sock.display());
        control::serve(&listener, owner, self.limits, &|line| self.answer(line))
    }

    /// The reply to one request line.
    pub fn answer(&self, line: &[u8]) -> Value {
        match control::parse_request(line) {
            Ok(op) => self
                .dispatch(op)
                .unwrap_or_else(|e| control::error_reply(&e.to_string())),
            Err(e) => control::error_reply(&e),
        }
    }

    /// Runs one request.
    pub fn dispatch(&self, op: Op) -> Result<Value> {
        match op {
            Op::Ping => Ok(json!({"ok": true})),
            Op::List => {
                let list = list(&self.root)?;
                Ok(json!({"ok": true, "devices": list}))
            }
            Op::Attach {
                config,
                frontend,
                mountpoint,
                id,
            } => {
                let rec = self.attach(config, frontend, mountpoint, id)?;
                Ok(json!({"ok": true, "device": rec.device, "id": rec.id, "record": rec}))
            }
            Op::Detach { device } => {
                let id = self.detach(&device)?;
                Ok(json!({"ok": true, "id": id}))
            }
        }
    }

    fn attach(
        &self,
        config: PathBuf,
        frontend: String,
        mountpoint: Option<PathBuf>,
        id: Option<String>,
    ) -> Result<DeviceRecord> {
        crate::frontend(&frontend)?;
        if !config.is_absolute() {
            return Err(Error::Request(format!(
                "config path {} must be absolute",
                config.display()
            )));
        }
        let id = {
            let _g = self.lock.locked();
            let id = match id {
                Some(id) => id,
                None => {
                    let used = self.root.ids()?;
                    (0..)
                        .map(|n| format!("d{n}"))
                        .find(|c| !used.contains(c))
                        .expect("an unused id")
                }
            };
            check_id(&id)?;
            let dir = self.root.device_dir(&id);
            std::fs::create_dir_all(self.root.devices_dir())
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            std::fs::create_dir(&dir).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::Request(format!("device {id} exists already"))
                } else {
                    Error::io(format!("creating {}", dir.display()), e)
                }
            })?;
            id
        };
        let req = Request {
            config,
            frontend,
            mountpoint,
        };
        let r = self.spawn_worker(&id, &req, None);
        if r.is_err() {
            let _ = cleanup_device(&self.root, &id);
        }
        r
    }

    /// Starts a worker for `id` and waits for its report. `kept`: the
    /// descriptor of a dead worker to resume from.
    fn spawn_worker(
        &self,
        id: &str,
        req: &Request,
        kept: Option<&OwnedFd>,
    ) -> Result<DeviceRecord> {
        self.root.save_request(id, req)?;
        let log_path = self.root.device_dir(id).join("worker.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
        let (prog, args) = self
            .worker_cmd
            .split_first()
            .ok_or_else(|| Error::Request("no worker command".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .arg("--root")
            .arg(self.root.dir())
            .arg("--id")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(fd) = kept {
            let raw = fd.as_raw_fd();
            cmd.env(KEPT_FD_ENV, raw.to_string());
            // SAFETY: runs in the forked child before exec; fcntl is
            // async-signal-safe and `raw` is open there (the parent keeps it
            // open until spawn returns). Only this child's copy loses
            // close-on-exec, so no other worker inherits it.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting worker {prog}"), e))?;
        // Our unreaped child: its pid cannot name another process yet.
        let pidfd = rustix::process::Pid::from_raw(child.id() as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        let pid = child.id();
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        let _ = BufReader::new(stdout).read_line(&mut line);
        let rec = match (line.trim().strip_prefix("ok "), &pidfd) {
            (Some(_), Some(_)) => self.root.record(id).ok().flatten().filter(|r| r.pid == pid),
            _ => None,
        };
        match (&rec, pidfd.as_ref().and_then(|f| f.try_clone().ok())) {
            // Supervised from now on; the watcher reaps it.
            (Some(rec), Some(fd)) => self.watch(rec, fd, Some(child)),
            // Reap it whenever it exits (a failed bring-up exits at once).
            _ => {
                std::thread::spawn(move || {
                    if let Ok(st) = child.wait() {
                        if !st.success() {
                            tracing::warn!("obd device service: worker {pid} exited: {st}");
                        }
                    }
                });
            }
        }
        if let Some(rec) = rec {
            return Ok(rec);
        }
        let line = line.trim();
        if let Some(dev) = line.strip_prefix("ok ") {
            let state = self.root.device_dir(id).join("state.json");
            let why = match self.root.record(id) {
                Ok(Some(rec)) => format!("of another worker ({})", rec.pid),
                Ok(None) => "missing".to_string(),
                Err(e) => e.to_string(),
            };
            // E.g. a full disk: the worker serves a device no record names,
            // which nothing would ever detach. Stop it now.
            let stopped = match &pidfd {
                Some(fd) => {
                    stop_pidfd(id, pid, fd).map_or_else(|e| e.to_string(), |()| "stopped it".into())
                }
                None => "it is gone".into(),
            };
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(Error::AttachFailed(format!(
                "worker reported {dev} but its state {} is {why} ({stopped}); its log: {}",
                state.display(),
                log.trim()
            )));
        }
        let reason = line
            .strip_prefix("failed:")
            .map(str::to_string)
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                format!(
                    "worker exited without a result; its log {}: {}",
                    log_path.display(),
                    log.trim()
                )
            });
        Err(Error::AttachFailed(reason))
    }

    fn detach(&self, which: &str) -> Result<String> {
        let _g = self.lock.locked();
        let id = find(&self.root, which)?;
        self.settle(&id);
        self.stopping(&id);
        match self.root.record(&id)? {
            Some(rec) if worker_alive(&rec) => {
                stop_worker(&rec)?;
                // The worker removes its directory when it detached cleanly.
                if self.root.device_dir(&id).exists() {
                    let log = std::fs::read_to_string(self.root.device_dir(&id).join("worker.log"))
                        .unwrap_or_default();
                    cleanup_device(&self.root, &id)?;
                    return Err(Error::Request(format!(
                        "device {id}: the worker did not detach cleanly (cleaned up after it); its log: {}",
                        log.trim()
                    )));
                }
            }
            _ => cleanup_device(&self.root, &id)?,
        }
        self.sup.devices.locked().remove(&id);
        Ok(id)
    }
}

/// Waits until the process of `pidfd` has exited.
fn wait_exit(pidfd: &OwnedFd) {
    loop {
        let mut fds = [rustix::event::PollFd::new(
            pidfd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, None) {
            Ok(n) if n > 0 => return,
            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!("obd device service: waiting on a worker: {e}");
                return;
            }
        }
    }
}

/// How long [`upgrade`] waits for one device's new worker by default.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// Moves devices of `root` to new workers one at a time, while their users
/// go on reading and writing: each worker is asked to hand over (SIGUSR1: it
/// makes its writes durable and exits, the device staying up) and the
/// supervisor that keeps it (`obd device serve` or obd-snapshotter) starts
/// the worker binary found on disk now. `ids` empty: every device. Returns each
/// device with the time from the request to its new worker serving. Fails at
/// the first device that has no live worker or supervisor, or whose new
/// worker does not come up within `timeout`.
pub fn upgrade(root: &Root, ids: &[String], timeout: Duration) -> Result<Vec<(String, Duration)>> {
    let ids = if ids.is_empty() {
        root.ids()?
    } else {
        ids.to_vec()
    };
    let mut done = Vec::new();
    for id in ids {
        let rec = root
            .record(&id)?
            .ok_or_else(|| Error::Request(format!("device {id} is not up")))?;
        if !worker_alive(&rec) {
            return Err(Error::Request(format!(
                "device {id} has no live worker to hand over"
            )));
        }
        if rec.request.frontend != "tcmu" && rec.kept_fd.is_none() {
            return Err(Error::Request(format!(
                "device {id}: its worker keeps no descriptor for a successor (started by an older obd); detach and attach it again"
            )));
        }
        if !root.supervisor_alive(&id) {
            return Err(Error::Request(format!(
                "device {id}: no supervisor keeps it (start `obd device serve --root {}` or obd-snapshotter first)",
                root.dir().display()
            )));
        }
        let t0 = Instant::now();
        let pid = rustix::process::Pid::from_raw(rec.pid as i32)
            .ok_or_else(|| Error::Request("pid 0".into()))?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map_err(|e| Error::io(format!("worker {} of {id}", rec.pid), e.into()))?;
        if !worker_alive(&rec) {
            return Err(Error::Request(format!(
                "device {id}: its worker just exited"
            )));
        }
        rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::USR1)
            .map_err(|e| Error::io(format!("signalling worker {} of {id}", rec.pid), e.into()))?;
        let served = tcmu_target::wait_until(
            timeout,
            || matches!(root.record(&id), Ok(Some(r)) if r.pid != rec.pid && worker_alive(&r)),
        );
        if !served {
            let log = std::fs::read_to_string(root.device_dir(&id).join("worker.log"))
                .unwrap_or_default();
            let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(Error::Request(format!(
                "device {id}: no new worker served it within {}s; last log lines: {tail}",
                timeout.as_secs()
            )));
        }
        done.push((id, t0.elapsed()));
    }
    Ok(done)
}

/// Finds a device by id, device node or mount point.
pub fn find(root: &Root, which: &str) -> Result<String> {
    for id in root.ids()? {
        if id == which {
            return Ok(id);
        }
        if let Ok(Some(rec)) = root.record(&id) {
            let p = Path::new(which);
            if rec.device == p || rec.request.mountpoint.as_deref() == Some(p) {
                return Ok(id);
            }
        }
    }
    Err(Error::Request(format!("no device {which:?}")))
}

/// Every device with its liveness.
pub fn list(root: &Root) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for id in root.ids()? {
        if let Ok(Some(record)) = root.record(&id) {
            let alive = worker_alive(&record);
            out.push(Listed { record, alive });
        }
    }
    Ok(out)
}

/// Sends SIGTERM to a worker and waits (bounded) for it to exit.
fn stop_worker(rec: &DeviceRecord) -> Result<()> {
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let pid = Pid::from_raw(rec.pid as i32).ok_or_else(|| Error::Request("pid 0".into()))?;
    let fd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(_) => return Ok(()), // already gone
    };
    if !worker_alive(rec) {
        return Ok(());
    }
    stop_pidfd(&rec.id, rec.pid, &fd)
}

/// Sends SIGTERM to the process of `fd` (worker `pid` of device `id`) and
/// waits (bounded) for it to exit.
fn stop_pidfd(id: &str, pid: u32, fd: &rustix::fd::OwnedFd) -> Result<()> {
    rustix::process::pidfd_send_signal(fd, rustix::process::Signal::TERM)
        .map_err(|e| Error::io(format!("signalling worker {pid}"), e.into()))?;
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    let ts = rustix::event::Timespec {
        tv_sec: DETACH_TIMEOUT.as_secs() as i64,
        tv_nsec: 0,
    };
    let n = rustix::event::poll(&mut fds, Some(&ts))
        .map_err(|e| Error::io(format!("waiting for worker {pid}"), e.into()))?;
    if n == 0 {
        return Err(Error::Request(format!(
            "device {id}: worker {pid} did not stop within {}s",
            DETACH_TIMEOUT.as_secs()
        )));
    }
    Ok(())
}

pub fn cleanup_device(root: &Root, id: &str) -> Result<()> {
    let rec = root.record(id).ok().flatten();
    let req = rec
        .as_ref()
        .map(|r| r.request.clone())
        .or_else(|| root.request(id).ok());
    if let Some(rec) = &rec {
        if worker_alive(rec) {
            // A worker that reported nothing useful: stop it first.
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(rec.pid as i32).expect("nonzero"),
                rustix::process::Signal::KILL,
            );
        }
        for mp in mount::mounts_of(&rec.device) {
            let _ = mount::unmount(&mp, true);
        }
    }
    if let Some(req) = &req {
        if let Some(mp) = &req.mountpoint {
            if mount::is_mounted(mp) {
                let _ = mount::unmount(mp, true);
            }
        }
        let fe = crate::frontend(&req.frontend)?;
        fe.cleanup(id, &root.work_dir(id))
            .map_err(|source| Error::Frontend {
                frontend: req.frontend.clone(),
                source,
            })?;
    } else {
        // Unknown frontend: try them all.
        for name in ["fuse", "tcmu"] {
            if let Ok(fe) = crate::frontend(name) {
                let _ = fe.cleanup(id, &root.work_dir(id));
            }
        }
    }
    let dir = root.device_dir(id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
    }
}

/// Sends one request to the service at `root` and returns its reply (an
/// `ok: false` reply becomes an error).
pub fn call(root: &Root, op: &Op) -> Result<Value> {
    let sock = root.socket();
    let svc = |detail: String| Error::Service {
        socket: sock.clone(),
        detail,
    };
    let conn = UnixStream::connect(&sock).map_err(|e| {
        svc(format!(
            "cannot connect ({e}); is `obd device serve --root {}` running?",
            root.dir().display()
        ))
    })?;
    let mut w = &conn;
    let sent = writeln!(w, "{}", serde_json::to_string(op).expect("serializable"));
    // A service that refuses the connection (permissions, busy) replies and
    // closes without reading: its reply says more than the failed send.
    let mut line = String::new();
    let read = BufReader::new(&conn).read_line(&mut line);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) => return Err(svc(format!("sending: {e}"))),
        (Ok(()), Err(e)) => return Err(svc(format!("reading the reply: {e}"))),
        (Ok(()), Ok(_)) => return Err(svc("closed without a reply".into())),
    }
    let v: Value =
        serde_json::from_str(&line).map_err(|e| svc(format!("bad reply {line:?}: {e}")))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(Error::Request(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ))
    }
}
