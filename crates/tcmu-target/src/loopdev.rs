//! Loop devices over a file: `LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE`, direct I/O.
//!
//! The UAPI (`linux/loop.h`) is small enough to write by hand: two structs and a
//! handful of ioctl numbers. `LOOP_CONFIGURE` (Linux 5.8) binds the file, sets the
//! flags and the block size in one call, so a device is never visible half set up.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

const LOOP_CONTROL: &str = "/dev/loop-control";

// ioctl numbers from linux/loop.h ('L' = 0x4C).
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// `LO_FLAGS_READ_ONLY`.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR`: the device unbinds itself when its last opener closes it.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `LO_FLAGS_PARTSCAN`.
pub const LO_FLAGS_PARTSCAN: u32 = 8;
/// `LO_FLAGS_DIRECT_IO`: the device reads and writes its file with `O_DIRECT`.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` of `linux/loop.h`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    /// Device of the backing file (read only).
    pub lo_device: u64,
    /// Inode of the backing file (read only).
    pub lo_inode: u64,
    /// Device number of the loop device (read only).
    pub lo_rdevice: u64,
    /// Offset into the backing file.
    pub lo_offset: u64,
    /// Size limit in bytes, 0 for the whole file.
    pub lo_sizelimit: u64,
    /// Loop device number (read only).
    pub lo_number: u32,
    /// Obsolete.
    pub lo_encrypt_type: u32,
    /// Obsolete.
    pub lo_encrypt_key_size: u32,
    /// `LO_FLAGS_*`.
    pub lo_flags: u32,
    /// Informational file name (NUL-terminated, truncated).
    pub lo_file_name: [u8; LO_NAME_SIZE],
    /// Obsolete.
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    /// Obsolete.
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    /// Obsolete.
    pub lo_init: [u64; 2],
}

impl Default for LoopInfo64 {
    fn default() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// `struct loop_config` of `linux/loop.h` (the `LOOP_CONFIGURE` argument).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct LoopConfig {
    /// The backing file descriptor.
    pub fd: u32,
    /// Logical block size, 0 for the default.
    pub block_size: u32,
    /// Offset, size limit, flags, name.
    pub info: LoopInfo64,
    /// Must be zero.
    pub reserved: [u64; 8],
}

/// How [`LoopDevice::attach`] sets up the device.
#[derive(Clone, Copy, Debug)]
pub struct LoopOptions {
    /// Refuse writes (`LO_FLAGS_READ_ONLY`).
    pub read_only: bool,
    /// Use direct I/O on the backing file (`LO_FLAGS_DIRECT_IO`); dropped with a log
    /// line when the kernel cannot do it for this file.
    pub direct_io: bool,
    /// Logical block size: 512, 1024, 2048 or 4096.
    pub block_size: u32,
    /// Unbind when the last opener closes the device (`LO_FLAGS_AUTOCLEAR`).
    pub autoclear: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            read_only: false,
            direct_io: false,
            block_size: 512,
            autoclear: true,
        }
    }
}

/// A bound loop device. Dropping it detaches the device (best effort).
#[derive(Debug)]
pub struct LoopDevice {
    number: u32,
    path: PathBuf,
    file: Option<File>,
}

/// How long [`LoopDevice::detach`] retries `EBUSY`, and attach retries a lost race.
const RETRY_FOR: Duration = Duration::from_secs(2);

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Sleeps a little, growing from 1 ms to 50 ms (backoff between polls of a condition).
fn backoff(round: &mut u32) {
    let ms = (1u64 << (*round).min(6)).min(50);
    *round += 1;
    std::thread::sleep(Duration::from_millis(ms));
}

impl LoopDevice {
    /// Binds a free loop device to `backing` (a path or an open file).
    ///
    /// Retries when another process grabs the free device between
    /// `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE`.
    pub fn attach(backing: impl Backing, opts: LoopOptions) -> Result<LoopDevice> {
        if !matches!(opts.block_size, 512 | 1024 | 2048 | 4096) {
            return Err(Error::io(
                format!("loop block size {}", opts.block_size),
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let owned;
        let (file, name): (&File, PathBuf) = match backing.as_backing() {
            BackingRef::File(f) => (f, fd_path(f)),
            BackingRef::Path(p) => {
                owned = OpenOptions::new()
                    .read(true)
                    .write(!opts.read_only)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(p)
                    .map_err(|e| Error::io(format!("open {}", p.display()), e))?;
                (&owned, p.to_path_buf())
            }
        };
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(LOOP_CONTROL)
            .map_err(|e| match errno(&e) {
                libc::ENOENT => Error::Unsupported(format!("{LOOP_CONTROL} is missing")),
                _ => Error::io(format!("open {LOOP_CONTROL}"), e),
            })?;
        let deadline = Instant::now() + RETRY_FOR;
        let mut round = 0;
        let mut direct_io = opts.direct_io;
        loop {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is an open fd
            // of /dev/loop-control for the whole call.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(Error::io(
                    "LOOP_CTL_GET_FREE on /dev/loop-control",
                    io::Error::last_os_error(),
                ));
            }
            let number = n as u32;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let dev = match open_loop(&path) {
                Ok(f) => f,
                // The node may appear a moment after LOOP_CTL_GET_FREE created it.
                Err(e) if errno(&e) == libc::ENOENT && Instant::now() < deadline => {
                    backoff(&mut round);
                    continue;
                }
                Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
            };
            let mut cfg = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: opts.block_size,
                ..Default::default()
            };
            cfg.info.lo_flags = flags_of(&opts, direct_io);
            set_name(&mut cfg.info.lo_file_name, name.as_os_str());
            let cfg_ptr = &cfg as *const LoopConfig;
            // `cfg` is `repr(C)` with its size checked in tests, and `dev` is an open
            // loop device fd.
            // SAFETY: LOOP_CONFIGURE reads one `struct loop_config` from a live value.
            let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, cfg_ptr) };
            if rc == 0 {
                let dev = LoopDevice {
                    number,
                    path,
                    file: Some(dev),
                };
                if opts.direct_io {
                    match dev.direct_io() {
                        Ok(true) => {}
                        Ok(false) => tracing::info!(
                            "{}: the kernel refused direct I/O on {}; using buffered I/O",
                            dev.path.display(),
                            name.display()
                        ),
                        Err(e) => tracing::warn!("{}: {e}", dev.path.display()),
                    }
                }
                return Ok(dev);
            }
            let e = io::Error::last_os_error();
            match errno(&e) {
                // Someone else bound this device after LOOP_CTL_GET_FREE: take another.
                libc::EBUSY if Instant::now() < deadline => {
                    backoff(&mut round);
                    continue;
                }
                libc::EINVAL if direct_io => {
                    tracing::info!(
                        "{}: LOOP_CONFIGURE with direct I/O over {} failed ({e}); retrying buffered",
                        path.display(),
                        name.display()
                    );
                    direct_io = false;
                    continue;
                }
                libc::ENOTTY => {
                    return Err(Error::Unsupported(
                        "LOOP_CONFIGURE (Linux 5.8 or later)".to_string(),
                    ))
                }
                _ => {
                    return Err(Error::io(
                        format!("LOOP_CONFIGURE {} over {}", path.display(), name.display()),
                        e,
                    ))
                }
            }
        }
    }

    /// The device node, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device number N of `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// `LOOP_GET_STATUS64`: offset, flags and backing inode of the device.
    pub fn status(&self) -> Result<LoopInfo64> {
        let f = self.fd()?;
        get_status(f)
            .map_err(|e| Error::io(format!("LOOP_GET_STATUS64 {}", self.path.display()), e))
    }

    /// True if the device does direct I/O on its backing file.
    pub fn direct_io(&self) -> Result<bool> {
        Ok(self.status()?.lo_flags & LO_FLAGS_DIRECT_IO != 0)
    }

    /// Switches direct I/O on the backing file on or off (`LOOP_SET_DIRECT_IO`).
    pub fn set_direct_io(&self, on: bool) -> Result<()> {
        let f = self.fd()?;
        // SAFETY: LOOP_SET_DIRECT_IO takes an integer argument by value; `f` is an
        // open loop device fd.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_DIRECT_IO, libc::c_ulong::from(on)) };
        if rc < 0 {
            return Err(Error::io(
                format!("LOOP_SET_DIRECT_IO {on} on {}", self.path.display()),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// `/sys/block/loopN/queue/<attr>`.
    fn queue_attr(&self, attr: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/loop{}/queue/{attr}", self.number))
    }

    /// The page-cache readahead of filesystems on the device, in KiB
    /// (`queue/read_ahead_kb`).
    pub fn read_ahead_kb(&self) -> Result<u32> {
        let p = self.queue_attr("read_ahead_kb");
        let s = std::fs::read_to_string(&p)
            .map_err(|e| Error::io(format!("read {}", p.display()), e))?;
        s.trim().parse().map_err(|_| {
            Error::io(
                format!("{}: not a number: {:?}", p.display(), s.trim()),
                io::Error::from(io::ErrorKind::InvalidData),
            )
        })
    }

    /// Sets [`LoopDevice::read_ahead_kb`]. The kernel derives it from the backing
    /// file when the device is configured, and a reused device may keep what its
    /// last user set, so a frontend that cares sets it on every attach. Applies to
    /// files opened on the device afterwards.
    pub fn set_read_ahead_kb(&self, kb: u32) -> Result<()> {
        let p = self.queue_attr("read_ahead_kb");
        std::fs::write(&p, kb.to_string())
            .map_err(|e| Error::io(format!("write {kb} to {}", p.display()), e))
    }

    /// Unbinds the device (`LOOP_CLR_FD`) and closes it.
    ///
    /// While someone else still holds the device open (a mount), the kernel defers
    /// the unbinding to the last close.
    pub fn detach(mut self) -> Result<()> {
        match self.file.take() {
            Some(f) => clear_fd(&f, &self.path),
            None => Ok(()),
        }
    }

    /// A handle on the bound loop device at `path` (`/dev/loopN`), e.g. one a
    /// dead process attached; [`LoopDevice::detach`] unbinds it.
    pub fn open_bound(path: &Path) -> Result<LoopDevice> {
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::io(
                    format!("{} is not a loop device node", path.display()),
                    io::Error::from_raw_os_error(libc::EINVAL),
                )
            })?;
        let file = open_loop(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        Ok(LoopDevice {
            number,
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    /// Unbinds the loop device at `path` (an idle device is not an error).
    pub fn detach_path(path: &Path) -> Result<()> {
        let f = match open_loop(path) {
            Ok(f) => f,
            Err(e) if matches!(errno(&e), libc::ENOENT | libc::ENXIO) => return Ok(()),
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        clear_fd(&f, path)
    }

    /// The loop devices whose backing file is `backing`, from
    /// `/sys/block/loop*/loop/backing_file`. A backing file whose name the kernel
    /// shows with a ` (deleted)` suffix matches too.
    pub fn find_by_backing(backing: &Path) -> Vec<PathBuf> {
        let want = backing.as_os_str().as_bytes();
        let mut found = Vec::new();
        let Ok(dir) = std::fs::read_dir("/sys/block") else {
            return found;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(n) = name.to_str().and_then(|s| s.strip_prefix("loop")) else {
                continue;
            };
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(mut got) = std::fs::read(entry.path().join("loop/backing_file")) else {
                continue; // not bound
            };
            while got.last() == Some(&b'\n') {
                got.pop();
            }
            let got = got.strip_suffix(b" (deleted)").unwrap_or(&got);
            if got == want {
                found.push(PathBuf::from(format!("/dev/{}", name.to_string_lossy())));
            }
        }
        found.sort();
        found
    }

    fn fd(&self) -> Result<&File> {
        self.file.as_ref().ok_or_else(|| {
            Error::io(
                self.path.display().to_string(),
                io::Error::from_raw_os_error(libc::EBADF),
            )
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            if let Err(e) = clear_fd(&f, &self.path) {
                tracing::warn!("dropping {}: {e}", self.path.display());
            }
        }
    }
}

/// What [`LoopDevice::attach`] can bind: a path or an open file.
pub trait Backing {
    /// The file or the path.
    fn as_backing(&self) -> BackingRef<'_>;
}

/// A borrowed [`Backing`].
pub enum BackingRef<'a> {
    /// An open file (its access mode must allow the writes the device will do).
    File(&'a File),
    /// A path, opened read-only or read-write as the options say.
    Path(&'a Path),
}

impl Backing for &File {
    fn as_backing(&self) -> BackingRef<'_> {
        BackingRef::File(self)
    }
}
impl Backing for &Path {
    fn as_backing(&self) -> BackingRef<'_> {
        BackingRef::Path(self)
    }
}
impl Backing for &PathBuf {
    fn as_backing(&self) -> BackingRef<'_> {
        BackingRef::Path(self.as_path())
    }
}

fn flags_of(opts: &LoopOptions, direct_io: bool) -> u32 {
    let mut flags = 0;
    if opts.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    if direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    if opts.autoclear {
        flags |= LO_FLAGS_AUTOCLEAR;
    }
    flags
}

fn set_name(dst: &mut [u8; LO_NAME_SIZE], name: &OsStr) {
    let b = name.as_bytes();
    let n = b.len().min(LO_NAME_SIZE - 1);
    dst[..n].copy_from_slice(&b[..n]);
}

fn fd_path(f: &File) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .unwrap_or_else(|_| PathBuf::from(format!("fd {}", f.as_raw_fd())))
}

fn open_loop(path: &Path) -> io::Result<File> {
    let open = |write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    };
    match open(true) {
        Err(e) if matches!(errno(&e), libc::EROFS | libc::EACCES) => open(false),
        r => r,
    }
}

fn get_status(f: &File) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::default();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` into the pointer;
    // `info` is a live `repr(C)` value of that layout (size checked in tests).
    let rc = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

fn clear_fd(f: &File, path: &Path) -> Result<()> {
    let deadline = Instant::now() + RETRY_FOR;
    let mut round = 0;
    loop {
        // SAFETY: LOOP_CLR_FD takes no argument; `f` is an open loop device fd.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match errno(&e) {
            // Not bound (any more): autoclear or someone else got there first.
            libc::ENXIO => return Ok(()),
            // Older kernels refuse while the device is busy; newer ones defer.
            libc::EBUSY if Instant::now() < deadline => backoff(&mut round),
            _ => return Err(Error::io(format!("LOOP_CLR_FD {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_sizes() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(std::mem::offset_of!(LoopConfig, info), 8);
    }

    #[test]
    fn flags() {
        let o = LoopOptions {
            read_only: true,
            direct_io: true,
            block_size: 4096,
            autoclear: true,
        };
        assert_eq!(flags_of(&o, true), 1 | 4 | 16);
        assert_eq!(flags_of(&o, false), 1 | 4);
    }

    #[test]
    fn name_is_truncated_and_terminated() {
        let mut n = [0xffu8; LO_NAME_SIZE];
        n.fill(0);
        set_name(&mut n, OsStr::new(&"x".repeat(100)));
        assert_eq!(n[LO_NAME_SIZE - 1], 0);
        assert_eq!(n[0], b'x');
    }

    #[test]
    fn bad_block_size() {
        let r = LoopDevice::attach(
            Path::new("/nonexistent"),
            LoopOptions {
                block_size: 100,
                ..Default::default()
            },
        );
        assert!(r.is_err());
    }
}
