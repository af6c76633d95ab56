//! Per-device records under `<root>/devices/<id>/`:
//!
//! | file | written by | content |
//! |---|---|---|
//! | `request.json` | service | what to attach ([`Request`]) |
//! | `state.json` | worker, once the device is up | [`DeviceRecord`] |
//! | `worker.log` | worker | its stderr |
//! | `supervisor.json` | service | `[pid, start time]` of the process that keeps the device's descriptor |
//! | `work/` | frontend | FUSE mount point and other private files |
//!
//! A directory without `state.json`, or whose worker is gone, is a leftover:
//! the service cleans it up (frontend objects, mounts) and removes it.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Default service root.
pub const DEFAULT_ROOT: &str = "/var/lib/obd";

/// What the service asks a worker to attach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// The image's `config.v1.json`, absolute.
    pub config: PathBuf,
    /// Frontend name.
    pub frontend: String,
    /// Where to mount the device's filesystem, if anywhere.
    #[serde(default)]
    pub mountpoint: Option<PathBuf>,
}

/// A live device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Device id (directory name).
    pub id: String,
    /// The request it was made from.
    pub request: Request,
    /// The block device node.
    pub device: PathBuf,
    /// Whether the device is read-only.
    pub read_only: bool,
    /// Size in bytes.
    pub size: u64,
    /// The worker's pid.
    pub pid: u32,
    /// The worker's start time (clock ticks since boot, /proc/<pid>/stat field
    /// 22), so a recycled pid is not mistaken for it.
    pub pid_start: u64,
    /// Whether the worker mounted the filesystem at `request.mountpoint`.
    pub mounted: bool,
    /// The worker's descriptor that keeps the device's kernel side alive
    /// ([`tcmu_target::Attachment::kept_fd`]); its supervisor keeps a copy.
    #[serde(default)]
    pub kept_fd: Option<i32>,
}

/// The paths of one service root.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// The root at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root { dir: dir.into() }
    }
    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("obd.sock")
    }
    /// The registry service config, if the user put one there.
    pub fn service_config(&self) -> PathBuf {
        self.dir.join("service.toml")
    }

    /// The credentials CRI pulls carried, as obd-snapshotter's CRI image
    /// proxy records them (`auths` keyed `host/repo`, mode 0600).
    pub fn cri_credentials(&self) -> PathBuf {
        self.dir.join("cri-credentials.json")
    }

    /// The service config this root's device workers use: the file
    /// [`Root::service_config`] if it exists, else the defaults (with the
    /// download directory under the root). The host-wide block cache is the
    /// root's `cache/` unless the config names a `[cache] dir`; credentials
    /// are looked up in [`Root::cri_credentials`] first unless the config
    /// names a `cri_credential_file`. The one place
    /// that decides it (workers, the snapshotter's cache collection, `obd
    /// cache`, `obd doctor` and `obd pull`'s check read it).
    #[cfg(feature = "registry")]
    pub fn load_service_config(&self) -> Result<obd_remote::service::ServiceConfig> {
        use obd_remote::service::ServiceConfig;
        let p = self.service_config();
        let mut c = if p.exists() {
            ServiceConfig::load(&p).map_err(|source| Error::Image { config: p, source })?
        } else {
            let mut c = ServiceConfig::default();
            c.download.dir = self.dir.join("download");
            c
        };
        c.cache.dir = c.cache.dir_or(&self.dir.join("cache"));
        c.registry
            .cri_credential_file
            .get_or_insert_with(|| self.cri_credentials());
        Ok(c)
    }
    /// All device directories.
    pub fn devices_dir(&self) -> PathBuf {
        self.dir.join("devices")
    }
    /// One device's directory.
    pub fn device_dir(&self, id: &str) -> PathBuf {
        self.devices_dir().join(id)
    }
    /// The file a device's worker writes when its trace replay has ended
    /// (done, stopped or failed), removed when a worker brings the device
    /// up; the snapshotter's page-cache warm waits for it.
    pub fn replayed_mark(&self, id: &str) -> PathBuf {
        self.device_dir(id).join("replayed")
    }
    /// One device's private frontend directory.
    pub fn work_dir(&self, id: &str) -> PathBuf {
        self.device_dir(id).join("work")
    }
    /// The ids of every device directory, sorted.
    pub fn ids(&self) -> Result<Vec<String>> {
        let d = self.devices_dir();
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("reading {}", d.display()), e)),
        };
        let mut ids: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }
    /// Reads a device's request.
    pub fn request(&self, id: &str) -> Result<Request> {
        read_json(&self.device_dir(id).join("request.json"))
    }
    /// Reads a device's record, `None` if it has none (never came up).
    pub fn record(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let p = self.device_dir(id).join("state.json");
        if !p.exists() {
            return Ok(None);
        }
        read_json(&p).map(Some)
    }
    /// Writes a device's record atomically.
    pub fn save_record(&self, rec: &DeviceRecord) -> Result<()> {
        write_json(&self.device_dir(&rec.id).join("state.json"), rec)
    }
    /// Records this process as the supervisor of device `id` (pid and start
    /// time in `supervisor`), for [`crate::service::upgrade`].
    pub fn save_supervisor(&self, id: &str) -> Result<()> {
        let me = std::process::id();
        write_json(
            &self.device_dir(id).join("supervisor.json"),
            &[u64::from(me), pid_start(me).unwrap_or(0)],
        )
    }
    /// Whether the process recorded by [`Root::save_supervisor`] for `id` runs.
    pub fn supervisor_alive(&self, id: &str) -> bool {
        match read_json::<[u64; 2]>(&self.device_dir(id).join("supervisor.json")) {
            Ok([pid, start]) => u32::try_from(pid).is_ok_and(|p| pid_start(p) == Some(start)),
            Err(_) => false,
        }
    }
    /// Writes a device's request atomically.
    pub fn save_request(&self, id: &str, req: &Request) -> Result<()> {
        write_json(&self.device_dir(id).join("request.json"), req)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Result<T> {
    let bytes = fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Request(format!("{}: bad JSON: {e}", p.display())))
}

/// Writes `v` as JSON to `p` through a temporary file and a rename: a reader
/// (the service, a restarted snapshotter) sees the old or the new file, never
/// a torn one, whichever process dies when. Not fsynced: these files describe
/// devices, worker processes and mounts, none of which survive the power
/// loss an fsync would guard against (reconcile cleans up a record that is
/// missing, stale or unreadable), and the two syncs cost every attach ~1 ms.
pub fn write_json<T: Serialize>(p: &Path, v: &T) -> Result<()> {
    let tmp = p.with_extension("tmp");
    let body = serde_json::to_vec_pretty(v).expect("plain structs serialize");
    let ctx = |what: &str| format!("{what} {}", p.display());
    fs::write(&tmp, &body).map_err(|e| Error::io(ctx("writing"), e))?;
    fs::rename(&tmp, p).map_err(|e| Error::io(ctx("renaming into"), e))?;
    Ok(())
}

/// Start time of process `pid` (field 22 of /proc/<pid>/stat), `None` if it is gone.
pub fn pid_start(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is parenthesised and may hold spaces.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3; field 22 is 19 further.
    f.nth(18)?.parse().ok()
}

/// Whether the worker of `rec` is still running.
pub fn worker_alive(rec: &DeviceRecord) -> bool {
    pid_start(rec.pid) == Some(rec.pid_start)
}

/// Checks a device id: `[a-z0-9-]`, 1 to 32 bytes.
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Request(format!(
            "bad device id {id:?}: use 1-32 of [a-z0-9-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pid_start_is_stable() {
        let me = std::process::id();
        let a = pid_start(me).unwrap();
        assert_eq!(pid_start(me), Some(a));
        assert!(pid_start(u32::MAX - 1).is_none());
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("dev-1").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("../x").is_err());
        assert!(check_id(&"a".repeat(33)).is_err());
    }
}
