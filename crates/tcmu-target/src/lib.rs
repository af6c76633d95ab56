//! tcmu-target: the frontends that turn an image into a block device. The
//! crate keeps the name the project started with, though it holds every
//! frontend, not only TCMU:
//!
//! - [`tcmu`]: the Linux TCMU handler — hand-written `target_core_user.h` UAPI,
//!   the UIO command ring, SCSI emulation, configfs + tcm_loop set-up (`/dev/sdX`).
//! - [`fuse`]: the device as one file in a FUSE mount, attached to a loop device
//!   ([`loopdev`]) with direct I/O (`/dev/loopN`).
//! - [`mountinfo`]: `/proc/self/mountinfo` parsed into typed entries.
//! - [`prefault`]: the global allocator that keeps FUSE request buffers in
//!   memory, so a killed worker fails no request.
//!
//! Every frontend serves a [`BlockBackend`]; none knows about layers or
//! registries, so data flows frontend → image → layer files → sources.

use std::io;
use std::time::{Duration, Instant};

use zfile::sync::RwLockExt;

pub mod fuse;
pub mod loopdev;
pub mod mountinfo;
pub mod prefault;
pub mod tcmu;

/// What a frontend serves: the bytes of one block device.
///
/// Calls come from many threads at once. Offsets and lengths are in bytes; the
/// frontends keep them within [`BlockBackend::size`].
pub trait BlockBackend: Send + Sync + 'static {
    /// Device size in bytes.
    fn size(&self) -> u64;
    /// Logical block size the device advertises (512 unless told otherwise).
    fn block_size(&self) -> u32 {
        512
    }
    /// True if writes, discards and flushes must be refused.
    fn read_only(&self) -> bool;
    /// Page-cache readahead in KiB this backend wants for filesystems on the
    /// device, over the frontend's default; `None` (the default) takes the
    /// frontend's. Read once, at attach.
    fn read_ahead_kb(&self) -> Option<u32> {
        None
    }
    /// Fills `buf` from byte `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at byte `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Discards `len` bytes at `offset`: they read as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
}

/// A way to expose a [`BlockBackend`] as a kernel block device (TCMU, or FUSE + loop).
pub trait Frontend: Send + Sync {
    /// Short name used on the command line and in state files: `tcmu` or `fuse`.
    fn name(&self) -> &'static str;

    /// Exposes `backend` as a block device and returns once the device node exists.
    ///
    /// `id` is unique among this host's devices (`[a-z0-9-]`, at most 32 bytes) and
    /// names the kernel objects the frontend creates; `work_dir` is an existing,
    /// private directory for this device (mount points, sockets). The device is
    /// served by threads of the calling process until [`Attachment::detach`].
    fn attach(
        &self,
        backend: std::sync::Arc<dyn BlockBackend>,
        id: &str,
        work_dir: &std::path::Path,
    ) -> Result<Box<dyn Attachment>>;

    /// Removes every kernel object a previous attachment `id` may have left behind
    /// (its process died): loop devices, mounts, FUSE connections, configfs
    /// directories. Idempotent; succeeds when there is nothing to remove.
    fn cleanup(&self, id: &str, work_dir: &std::path::Path) -> Result<()>;

    /// Serves again a device whose previous server died while `kept` (a copy of
    /// the dead attachment's [`Attachment::kept_fd`]) kept its kernel side
    /// alive: same device node, same mounts. Requests the dead server had taken
    /// but not answered are served again. Frontends whose kernel side needs no
    /// descriptor to survive (TCMU takes its ring over in `attach`) answer
    /// [`Error::Unsupported`].
    fn resume(
        &self,
        backend: std::sync::Arc<dyn BlockBackend>,
        id: &str,
        work_dir: &std::path::Path,
        kept: std::os::fd::OwnedFd,
    ) -> Result<Box<dyn Attachment>> {
        let _ = (backend, id, work_dir, kept);
        Err(Error::Unsupported(format!(
            "the {} frontend resumes devices in attach",
            self.name()
        )))
    }
}

/// A live device made by [`Frontend::attach`].
pub trait Attachment: Send {
    /// The block device node, e.g. `/dev/loop3` or `/dev/sdb`.
    fn device_path(&self) -> &std::path::Path;

    /// Tears the device down (the caller has unmounted it) and stops serving it.
    fn detach(self: Box<Self>) -> Result<()>;

    /// A descriptor of this process whose open file keeps the kernel side of
    /// the device (connection, pending requests) alive while any process holds
    /// it. A supervisor keeps a copy (`pidfd_getfd`), so the device survives
    /// this process's death and [`Frontend::resume`] can serve it again.
    fn kept_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// Polls `cond` with a growing pause (1 ms up to 50 ms) until it holds or `timeout`
/// passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// An in-memory backend, for tests and examples.
pub struct MemBackend {
    data: std::sync::RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemBackend {
    /// A backend holding `data`.
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        MemBackend {
            data: std::sync::RwLock::new(data),
            read_only,
        }
    }

    /// A copy of the current bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read_locked().clone()
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let size = self.size();
        let end = offset.checked_add(len as u64).filter(|&e| e <= size);
        match end {
            Some(e) => Ok(offset as usize..e as usize),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} is past the device end {size}"),
            )),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only device",
            ));
        }
        Ok(())
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.data.read_locked().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data.read_locked()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let r = self.range(offset, buf.len())?;
        self.data.write_locked()[r].copy_from_slice(buf);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let r = self.range(offset, len as usize)?;
        self.data.write_locked()[r].fill(0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Errors of the frontends. Each names the device, file or kernel object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O or system-call failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What failed, naming the path or device.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks what the frontend needs (a module, a device node, a feature).
    #[error("kernel support missing: {0}")]
    Unsupported(String),
    /// The kernel handed over something malformed (a bad ring entry, a bad request).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A timeout while waiting for the kernel.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl Error {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
