//! Kernel objects of a TCMU device: the configfs backstore, its UIO device, and the
//! tcm_loop export that turns it into `/dev/sdX`.
//!
//! Names derive from the device id only, so a later process (after a crash) finds
//! everything again:
//!
//! - backstore: `/sys/kernel/config/target/core/user_<HBA>/<id>` with
//!   `dev_config=obd/<id>`, hence the UIO name `tcm-user/<HBA>/<id>/obd/<id>`;
//! - tcm_loop: `/sys/kernel/config/target/loopback/naa.<NAA-5 of id>/tpgt_1`, LUN 0
//!   linked to the backstore.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Root of the LIO configfs tree.
pub const TARGET_ROOT: &str = "/sys/kernel/config/target";
/// The `user_<HBA>` number every obd backstore lives under.
pub const HBA: u32 = 7301;
/// Prefix of `dev_config` (the TCMU "subtype").
pub const DEV_CONFIG_PREFIX: &str = "obd";

/// The paths and names of device `id`.
#[derive(Debug, Clone)]
pub struct DevicePaths {
    /// The device id.
    pub id: String,
    /// `core/user_<HBA>`.
    pub hba_dir: PathBuf,
    /// `core/user_<HBA>/<id>`.
    pub core_dir: PathBuf,
    /// `naa.<16 hex digits>`.
    pub wwn: String,
    /// `loopback/<wwn>`.
    pub wwn_dir: PathBuf,
    /// `loopback/<wwn>/tpgt_1`.
    pub tpg_dir: PathBuf,
    /// `loopback/<wwn>/tpgt_1/lun/lun_0`.
    pub lun_dir: PathBuf,
    /// The UIO device name the kernel gives the backstore.
    pub uio_name: String,
    /// `dev_config` written to the backstore.
    pub dev_config: String,
}

impl DevicePaths {
    /// Paths of device `id` (`[a-z0-9-]`, 1 to 32 bytes).
    pub fn new(id: &str) -> Result<Self> {
        let valid = !id.is_empty()
            && id.len() <= 32
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(Error::io(
                format!("TCMU device id {id:?}"),
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "must be 1 to 32 bytes of [a-z0-9-]",
                ),
            ));
        }
        let root = Path::new(TARGET_ROOT);
        let hba_dir = root.join("core").join(format!("user_{HBA}"));
        let core_dir = hba_dir.join(id);
        let wwn = format!("naa.{:016x}", super::scsi::naa_for(id));
        let wwn_dir = root.join("loopback").join(&wwn);
        let tpg_dir = wwn_dir.join("tpgt_1");
        let lun_dir = tpg_dir.join("lun").join("lun_0");
        let dev_config = format!("{DEV_CONFIG_PREFIX}/{id}");
        let uio_name = format!("tcm-user/{HBA}/{id}/{dev_config}");
        Ok(DevicePaths {
            id: id.to_string(),
            hba_dir,
            core_dir,
            wwn,
            wwn_dir,
            tpg_dir,
            lun_dir,
            uio_name,
            dev_config,
        })
    }
}

/// Writes `value` to a configfs or sysfs attribute in one write.
pub fn write_attr(path: &Path, value: &str) -> Result<()> {
    let res = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    res.map_err(|e| Error::io(format!("write {value:?} to {}", path.display()), e))
}

/// Reads an attribute, trimmed.
pub fn read_attr(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io(format!("read {}", path.display()), e))
}

fn mkdir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("mkdir {}", path.display()), e)),
    }
}

/// Creates `dirs` in order; a parent removed concurrently (another device's
/// teardown emptied the shared HBA) is recreated.
fn mkdirs(dirs: &[&Path]) -> Result<()> {
    let mut tries = 0;
    loop {
        let r = dirs.iter().try_for_each(|d| mkdir(d));
        match r {
            Err(Error::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && tries < 20 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Removes a configfs directory; absent is fine.
pub fn rmdir(path: &Path) -> Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("rmdir {}", path.display()), e)),
    }
}

/// True if the LIO configfs tree is there (modules `target_core_mod` and configfs).
pub fn target_available() -> bool {
    Path::new(TARGET_ROOT).join("core").is_dir()
}

/// Polls `f` every 10-50 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    let mut nap = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout(format!("{what} after {timeout:?}")));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

/// Settings written to a new backstore.
#[derive(Debug, Clone)]
pub struct BackstoreConfig {
    /// Device size in bytes.
    pub dev_size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// `hw_max_sectors`.
    pub hw_max_sectors: u32,
    /// `max_data_area_mb`.
    pub max_data_area_mb: u32,
    /// `attrib/cmd_time_out` in seconds (0: never).
    pub cmd_time_out_secs: u32,
}

/// True if the backstore exists and is enabled.
pub fn backstore_enabled(p: &DevicePaths) -> bool {
    read_attr(&p.core_dir.join("enable")).is_ok_and(|v| v == "1")
}

/// The configured `dev_size` of an existing backstore.
pub fn backstore_size(p: &DevicePaths) -> Result<u64> {
    let v = read_attr(&p.core_dir.join("attrib").join("dev_size"))?;
    v.parse().map_err(|_| {
        Error::Protocol(format!(
            "{}/attrib/dev_size reads {v:?}",
            p.core_dir.display()
        ))
    })
}

/// Creates and enables the backstore: the kernel then registers its UIO device.
pub fn create_backstore(p: &DevicePaths, cfg: &BackstoreConfig) -> Result<()> {
    mkdirs(&[&p.hba_dir, &p.core_dir])?;
    let control = p.core_dir.join("control");
    // One token per write. nl_reply_supported=-1: the kernel never waits for a
    // netlink reply for this device, even if some daemon enabled reply support.
    for tok in [
        format!("dev_config={}", p.dev_config),
        format!("dev_size={}", cfg.dev_size),
        format!("hw_block_size={}", cfg.block_size),
        format!("hw_max_sectors={}", cfg.hw_max_sectors),
        format!("max_data_area_mb={}", cfg.max_data_area_mb),
        "nl_reply_supported=-1".to_string(),
    ] {
        write_attr(&control, &tok)?;
    }
    // Enabling fails with EAGAIN while the TCMU netlink interface is blocked (a
    // daemon is starting): retry for up to 5 s.
    let enable = p.core_dir.join("enable");
    let mut tries = 0;
    loop {
        match write_attr(&enable, "1") {
            Ok(()) => break,
            Err(Error::Io { source, .. })
                if source.raw_os_error() == Some(libc::EAGAIN) && tries < 100 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
    // Settable only while the device has no exports, i.e. before the LUN link.
    write_attr(
        &p.core_dir.join("attrib").join("cmd_time_out"),
        &cfg.cmd_time_out_secs.to_string(),
    )?;
    Ok(())
}

/// `/sys/class/uio/uioN` of the backstore, if registered.
pub fn find_uio(p: &DevicePaths) -> Option<PathBuf> {
    let dir = fs::read_dir("/sys/class/uio").ok()?;
    for e in dir.flatten() {
        let path = e.path();
        if read_attr(&path.join("name")).is_ok_and(|n| n == p.uio_name) {
            return Some(path);
        }
    }
    None
}

/// The open UIO device of a backstore and the size of its mapping.
pub struct UioDevice {
    /// `/dev/uioN`.
    pub dev_path: PathBuf,
    /// The open device.
    pub file: File,
    /// Size of map 0.
    pub map_size: usize,
}

/// Opens the backstore's `/dev/uioN` (waiting up to `timeout` for it to appear).
///
/// EBUSY means another process serves the device.
pub fn open_uio(p: &DevicePaths, timeout: Duration) -> Result<UioDevice> {
    let sys = wait_for(&format!("UIO device {}", p.uio_name), timeout, || {
        find_uio(p)
    })?;
    let node = sys
        .file_name()
        .map(|n| PathBuf::from("/dev").join(n))
        .ok_or_else(|| Error::Protocol(format!("odd UIO path {}", sys.display())))?;
    let size = read_attr(&sys.join("maps").join("map0").join("size"))?;
    let map_size = parse_size(&size)
        .ok_or_else(|| Error::Protocol(format!("UIO map size {size:?} of {}", sys.display())))?;
    // The kernel sets the UIO version to the mailbox version ("2"); the mailbox
    // itself is checked again when the ring is opened.
    let version = read_attr(&sys.join("version")).unwrap_or_default();
    let mailbox = super::uapi::TCMU_MAILBOX_VERSION.to_string();
    if version != mailbox && version != super::uapi::TCMU_VERSION {
        return Err(Error::Unsupported(format!(
            "{} has TCMU version {version:?} (expected {mailbox})",
            sys.display()
        )));
    }
    wait_for(&format!("{}", node.display()), timeout, || {
        node.exists().then_some(())
    })?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&node)
        .map_err(|e| {
            let ctx = if e.raw_os_error() == Some(libc::EBUSY) {
                format!("open {} (another process serves {})", node.display(), p.id)
            } else {
                format!("open {}", node.display())
            };
            Error::io(ctx, e)
        })?;
    Ok(UioDevice {
        dev_path: node,
        file,
        map_size,
    })
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => usize::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Asks the kernel to fail every command on the ring with BUSY (the initiator
/// retries them) and to reset `cmd_head`/`cmd_tail` to 0.
pub fn reset_ring(p: &DevicePaths) -> Result<()> {
    write_attr(&p.core_dir.join("action").join("reset_ring"), "1")
}

/// Exports the backstore through tcm_loop (nexus first, then the LUN link) and
/// returns the SCSI address `H:C:T`.
pub fn export_loopback(p: &DevicePaths) -> Result<String> {
    let loopback = Path::new(TARGET_ROOT).join("loopback");
    mkdirs(&[&loopback, &p.wwn_dir, &p.tpg_dir])?;
    let nexus = p.tpg_dir.join("nexus");
    if read_attr(&nexus).map(|n| n.is_empty()).unwrap_or(true) {
        // tcm_loop scans the LUN when it is linked; the nexus must exist by then.
        write_attr(&nexus, &p.wwn)?;
    }
    mkdirs(&[&p.tpg_dir.join("lun"), &p.lun_dir])?;
    let link = p.lun_dir.join(&p.id);
    if fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(&p.core_dir, &link)
            .map_err(|e| Error::io(format!("link {}", link.display()), e))?;
    }
    read_attr(&p.tpg_dir.join("address"))
}

/// The block device name (`sdX`) of SCSI address `H:C:T`, LUN 0, if probed.
pub fn find_block_device(addr: &str) -> Option<String> {
    let dir = Path::new("/sys/class/scsi_device")
        .join(format!("{addr}:0"))
        .join("device")
        .join("block");
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Removes the tcm_loop export: unlinks the LUNs (which removes the SCSI disk),
/// drops the nexus, removes the TPG and WWN. Absent pieces are skipped.
pub fn remove_loopback(p: &DevicePaths) -> Result<()> {
    if !p.wwn_dir.exists() {
        return Ok(());
    }
    // Unlinking the LUN removes the SCSI disk (tcm_loop_port_unlink), flushing and
    // waiting for its outstanding I/O, so the ring must still be served. Deleting
    // the disk through sysfs first would leave tcm_loop's port count raised (its
    // unlink gives up when the disk is gone) and the nexus could not be dropped.
    let luns = p.tpg_dir.join("lun");
    if let Ok(entries) = fs::read_dir(&luns) {
        for lun in entries.flatten() {
            if let Ok(links) = fs::read_dir(lun.path()) {
                for l in links.flatten() {
                    let is_link = l.file_type().is_ok_and(|t| t.is_symlink());
                    if is_link {
                        fs::remove_file(l.path())
                            .map_err(|e| Error::io(format!("unlink {}", l.path().display()), e))?;
                    }
                }
            }
            rmdir(&lun.path())?;
        }
    }
    if p.tpg_dir.exists() {
        // Fails harmlessly when there is no nexus.
        let _ = write_attr(&p.tpg_dir.join("nexus"), "NULL");
    }
    rmdir(&p.tpg_dir)?;
    rmdir(&p.wwn_dir)
}

/// Removes the backstore, and the shared HBA directory if it is now empty.
pub fn remove_backstore(p: &DevicePaths) -> Result<()> {
    rmdir(&p.core_dir)?;
    match fs::remove_dir(&p.hba_dir) {
        Ok(()) => Ok(()),
        // Other devices still live there, or it is already gone.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTEMPTY) | Some(libc::EBUSY) | Some(libc::ENOENT)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::io(format!("rmdir {}", p.hba_dir.display()), e)),
    }
}

/// True if any kernel object of `p` still exists.
pub fn leftovers(p: &DevicePaths) -> Vec<String> {
    let mut out = Vec::new();
    for d in [&p.core_dir, &p.wwn_dir] {
        if d.exists() {
            out.push(d.display().to_string());
        }
    }
    if let Some(u) = find_uio(p) {
        out.push(u.display().to_string());
    }
    out
}
