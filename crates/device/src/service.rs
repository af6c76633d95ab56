//! The device service: a control socket (`<root>/obd.sock`, one JSON request
//! line and one JSON reply line per connection; who may connect and the
//! bounds on clients are [`crate::control`]'s), worker processes, and
//! reconciliation.
//!
//! Requests: `{"op":"attach","config":…,"frontend":…,"mountpoint":…,"id":…}`,
//! `{"op":"detach","device":<id, /dev path or mount point>}`, `{"op":"list"}`,
//! `{"op":"ping"}`. Replies: `{"ok":true,…}` or `{"ok":false,"error":…}`.
//!
//! The service holds no device state in memory: everything is in the device
//! directories (see [`crate::state`]), written by the workers. So when the
//! service stops or dies, devices keep working; at start it adopts the devices
//! whose workers are alive and cleans up the rest.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zfile::sync::MutexExt;

use crate::control::{self, Limits};
use crate::state::{check_id, worker_alive, DeviceRecord, Request, Root};
use crate::{mount, Error, Result};

/// How long detach waits for a worker to finish.
const DETACH_TIMEOUT: Duration = Duration::from_secs(60);

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

/// The running service.
pub struct Service {
    root: Root,
    worker_cmd: Vec<String>,
    lock: Mutex<()>,
    limits: Limits,
}

impl Service {
    /// A service over `root`. `worker_cmd` is the program and leading arguments
    /// that run a worker; `--root <root> --id <id>` is appended.
    pub fn new(root: Root, worker_cmd: Vec<String>) -> Self {
        Service {
            root,
            worker_cmd,
            lock: Mutex::new(()),
            limits: Limits::default(),
        }
    }

    /// The same service with other bounds on control-socket clients.
    pub fn with_limits(self, limits: Limits) -> Self {
        Service { limits, ..self }
    }

    /// Adopts devices whose workers are alive; cleans up and removes the rest.
    /// Returns (adopted, cleaned) ids.
    pub fn reconcile(&self) -> Result<(Vec<String>, Vec<String>)> {
        let _g = self.lock.locked();
        let (mut adopted, mut cleaned) = (Vec::new(), Vec::new());
        for id in self.root.ids()? {
            match self.root.record(&id) {
                Ok(Some(rec)) if worker_alive(&rec) => adopted.push(id),
                // A TCMU device outlives its worker (the kernel keeps the ring):
                // a new worker takes it over and readers never notice.
                Ok(Some(rec)) if rec.request.frontend == "tcmu" => {
                    match self.spawn_worker(&id, &rec.request) {
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
        let r = self.spawn_worker(&id, &req);
        if r.is_err() {
            let _ = cleanup_device(&self.root, &id);
        }
        r
    }

    fn spawn_worker(&self, id: &str, req: &Request) -> Result<DeviceRecord> {
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
        let mut child = Command::new(prog)
            .args(args)
            .arg("--root")
            .arg(self.root.dir())
            .arg("--id")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
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
        // Reap the worker whenever it exits (it may outlive this call by days);
        // a TCMU worker that crashed is replaced, which takes its ring over.
        let (root, cmd, id2) = (self.root.clone(), self.worker_cmd.clone(), id.to_string());
        std::thread::spawn(move || {
            let Ok(st) = child.wait() else { return };
            if !st.success() {
                tracing::warn!("obd device service: worker of {id2} exited: {st}");
            }
            let crashed = std::os::unix::process::ExitStatusExt::signal(&st).is_some()
                || st.code() == Some(101);
            let rec = root.record(&id2).ok().flatten();
            if let Some(rec) = rec.filter(|r| crashed && r.request.frontend == "tcmu") {
                tracing::warn!("obd device service: worker of {id2} died ({st}); taking over");
                let svc = Service::new(root, cmd);
                if let Err(e) = svc.spawn_worker(&id2, &rec.request) {
                    tracing::error!("obd device service: takeover of {id2} failed: {e}");
                }
            }
        });
        let line = line.trim();
        if let Some(dev) = line.strip_prefix("ok ") {
            let state = self.root.device_dir(id).join("state.json");
            let why = match self.root.record(id) {
                Ok(Some(rec)) => return Ok(rec),
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
        Ok(id)
    }
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
