//! FUSE frontend: the device as one file in a FUSE mount (fuser), bound to a loop
//! device with direct I/O.
//!
//! Layout under the attachment's `work_dir`:
//! - `fuse/` — a FUSE mount (type `fuse.obd`, source `obd-<id>`) served by fuser
//!   threads of this process;
//! - `fuse/disk` — one regular file of `backend.size()` bytes;
//! - `/dev/loopN` — a loop device over `fuse/disk` (`LO_FLAGS_DIRECT_IO`,
//!   `LO_FLAGS_AUTOCLEAR`, read-only when the backend is).
//!
//! The mount is made by hand (`mount(2)` with an open `/dev/fuse` fd) so that the
//! options, the unmount and the connection id stay under this module's control;
//! fuser then runs the session over that fd ([`fuser::Session::from_fd`]), every
//! thread reading the one open file (no `FUSE_DEV_IOC_CLONE`): the kernel keeps
//! the requests a server has read but not answered on that file, so while a
//! copy of it lives elsewhere ([`Attachment::kept_fd`], kept by the device
//! supervisor) the connection, the mount and the loop device survive the
//! server's death. [`Frontend::resume`] serves them again from that copy and
//! has the kernel re-send the unanswered requests (`FUSE_NOTIFY_RESEND`, Linux
//! 6.9 and later; older kernels refuse it and the device cannot be resumed).
//!
//! Writable devices work but the OverlayBD advice stands: writable FUSE + loop can
//! deadlock under memory pressure (page reclaim writing back through the FUSE
//! server); prefer read-only devices with an overlayfs upper.

use std::cell::RefCell;
use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, SessionACL, WriteFlags,
};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::loopdev::{LoopDevice, LoopOptions};
use crate::mountinfo::{mounts, MountInfo};
use crate::{wait_until, Attachment, BlockBackend, Error, Frontend, Result};

/// Name of the one file in the mount.
pub const DISK_NAME: &str = "disk";
/// Name of the mount point under the attachment's `work_dir`.
pub const MOUNT_DIR: &str = "fuse";

const FUSECTL: &str = "/sys/fs/fuse/connections";
const ROOT_INO: u64 = 1;
const DISK_INO: u64 = 2;
/// Attributes never change: let the kernel cache them for a day.
const TTL: Duration = Duration::from_secs(86_400);
/// How long detach waits for the kernel (unmount, session end).
const TEARDOWN_WAIT: Duration = Duration::from_secs(10);
/// How long detach waits for the loop device to let go of the FUSE file.
const LOOP_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Tuning of [`FuseFrontend`].
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// fuser event-loop threads, each with its own cloned `/dev/fuse` fd.
    pub threads: usize,
    /// Largest WRITE request and readahead window in bytes (the kernel caps it,
    /// usually at 1 MiB).
    pub max_io: u32,
    /// Largest READ request in bytes (`max_read` mount option). Smaller than the
    /// device's requests, it lets one large read be served by several threads at once.
    pub max_read: u32,
    /// Open the file with `FOPEN_DIRECT_IO` (no FUSE page cache) instead of
    /// `FOPEN_KEEP_CACHE`.
    pub fuse_direct_io: bool,
    /// Ask the loop device for direct I/O on the FUSE file (falls back with a log line).
    pub loop_direct_io: bool,
    /// Most FUSE requests in flight for asynchronous direct I/O and readahead.
    pub max_background: u16,
    /// Page-cache readahead of the loop device in KiB (`queue/read_ahead_kb`),
    /// set on every attach unless the backend asks for its own
    /// ([`BlockBackend::read_ahead_kb`]); `None` keeps what the kernel chose.
    pub read_ahead_kb: Option<u32>,
}

/// Default [`FuseOptions::read_ahead_kb`]. The kernel gives a loop device over
/// the FUSE file twice its optimal I/O size (2560 KiB here); a JVM mapping its
/// 130 MB module image then blocks on about 270 page faults per start where
/// the same start on overlayfs over a disk with 8 MiB readahead blocks on 160
/// (docs/BENCHMARKS.md, issue 18, "device read path").
pub const DEFAULT_READ_AHEAD_KB: u32 = 8192;

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            threads: 8,
            max_io: 1 << 20,
            // Measured: splitting a loop device's 1 MiB request into four READs
            // served in parallel beats one 1 MiB READ for sequential reads.
            max_read: 256 << 10,
            fuse_direct_io: true,
            loop_direct_io: true,
            max_background: 128,
            read_ahead_kb: Some(DEFAULT_READ_AHEAD_KB),
        }
    }
}

/// The FUSE + loop frontend (`fuse`).
#[derive(Clone, Debug, Default)]
pub struct FuseFrontend {
    opts: FuseOptions,
}

impl FuseFrontend {
    /// A frontend with the default tuning.
    pub fn new() -> Self {
        Self::default()
    }

    /// A frontend with the given tuning.
    pub fn with_options(opts: FuseOptions) -> Self {
        FuseFrontend { opts }
    }
}

impl Frontend for FuseFrontend {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn attach(
        &self,
        backend: Arc<dyn BlockBackend>,
        id: &str,
        work_dir: &Path,
    ) -> Result<Box<dyn Attachment>> {
        attach(&self.opts, backend, id, work_dir).map(|a| Box::new(a) as Box<dyn Attachment>)
    }

    fn cleanup(&self, id: &str, work_dir: &Path) -> Result<()> {
        cleanup(id, work_dir)
    }

    fn resume(
        &self,
        backend: Arc<dyn BlockBackend>,
        id: &str,
        work_dir: &Path,
        kept: OwnedFd,
    ) -> Result<Box<dyn Attachment>> {
        resume(&self.opts, backend, id, work_dir, kept).map(|a| Box::new(a) as Box<dyn Attachment>)
    }
}

/// A live FUSE + loop device.
pub struct FuseAttachment {
    loopdev: Option<LoopDevice>,
    device: PathBuf,
    mountpoint: PathBuf,
    conn: Option<u64>,
    session: Option<BackgroundSession>,
    /// The session's `/dev/fuse` descriptor (owned by the session).
    fuse_fd: RawFd,
}

impl std::fmt::Debug for FuseAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseAttachment")
            .field("device", &self.device)
            .field("mountpoint", &self.mountpoint)
            .field("conn", &self.conn)
            .finish()
    }
}

impl FuseAttachment {
    /// The FUSE mount point (`<work_dir>/fuse`).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The file the loop device reads (`<work_dir>/fuse/disk`).
    pub fn disk_path(&self) -> PathBuf {
        self.mountpoint.join(DISK_NAME)
    }

    /// True if the loop device does direct I/O on the FUSE file.
    pub fn loop_direct_io(&self) -> bool {
        self.loopdev
            .as_ref()
            .and_then(|l| l.direct_io().ok())
            .unwrap_or(false)
    }

    fn teardown(&mut self) -> Result<()> {
        let mut first_err = None;
        let mut busy = false;
        if let Some(lo) = self.loopdev.take() {
            let n = lo.number();
            if let Err(e) = lo.detach() {
                first_err.get_or_insert(e);
            }
            // The FUSE file stays open until the loop device is really unbound.
            let bound = format!("/sys/block/loop{n}/loop/backing_file");
            let disk = self.disk_path();
            let released = wait_until(LOOP_RELEASE_WAIT, || {
                std::fs::read(&bound).map_or(true, |b| {
                    let b = b.strip_suffix(b"\n").unwrap_or(&b);
                    b != disk.as_os_str().as_bytes()
                })
            });
            if !released {
                // Someone still holds the device (a mount the caller forgot): stop
                // serving anyway; its I/O fails from now on, and the device goes
                // away on its last close (autoclear).
                busy = true;
                first_err.get_or_insert(Error::Timeout(format!(
                    "{} is still open by someone; its I/O now fails and it goes away \
                     on its last close",
                    self.device.display()
                )));
            }
        }
        if let Some(session) = self.session.take() {
            if let Err(e) = unmount_and_join(&self.mountpoint, self.conn, session, busy) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Attachment for FuseAttachment {
    fn device_path(&self) -> &Path {
        &self.device
    }

    fn detach(mut self: Box<Self>) -> Result<()> {
        self.teardown()
    }

    fn kept_fd(&self) -> Option<RawFd> {
        Some(self.fuse_fd)
    }
}

impl Drop for FuseAttachment {
    fn drop(&mut self) {
        if self.session.is_some() || self.loopdev.is_some() {
            if let Err(e) = self.teardown() {
                tracing::warn!("dropping FUSE device {}: {e}", self.device.display());
            }
        }
    }
}

fn attach(
    opts: &FuseOptions,
    backend: Arc<dyn BlockBackend>,
    id: &str,
    work_dir: &Path,
) -> Result<FuseAttachment> {
    let work = work_dir
        .canonicalize()
        .map_err(|e| Error::io(format!("work dir {}", work_dir.display()), e))?;
    let mnt = work.join(MOUNT_DIR);
    match std::fs::create_dir(&mnt) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("mkdir {}", mnt.display()), e)),
    }
    if mounts()
        .iter()
        .any(|m| m.mount_point == mnt && m.fs_type.starts_with("fuse"))
    {
        return Err(Error::io(
            format!(
                "{} is still mounted by an earlier attachment (run cleanup)",
                mnt.display()
            ),
            io::Error::from_raw_os_error(libc::EBUSY),
        ));
    }
    let read_only = backend.read_only();
    let block_size = backend.block_size();
    let read_ahead = backend.read_ahead_kb();
    let fs = DiskFs::new(backend, opts);

    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                Error::Unsupported(format!("/dev/fuse: {e}"))
            }
            _ => Error::io("open /dev/fuse", e),
        })?;
    let data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,max_read={}",
        dev.as_raw_fd(),
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
        opts.max_read.max(4096),
    );
    let data = CString::new(data).expect("mount options hold no NUL");
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    rustix::mount::mount(
        format!("obd-{id}").as_str(),
        &mnt,
        "fuse.obd",
        flags,
        data.as_c_str(),
    )
    .map_err(|e| Error::io(format!("mount FUSE at {}", mnt.display()), e.into()))?;

    let conn = conn_id(&mnt);
    let fuse_fd = dev.as_raw_fd();
    let session = fuser::Session::from_fd(fs, OwnedFd::from(dev), SessionACL::All, config(opts))
        .and_then(|s| s.spawn());
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            let _ = rustix::mount::unmount(&mnt, UnmountFlags::DETACH);
            return Err(Error::io(format!("FUSE session at {}", mnt.display()), e));
        }
    };

    let mut att = FuseAttachment {
        loopdev: None,
        device: PathBuf::new(),
        mountpoint: mnt,
        conn,
        session: Some(session),
        fuse_fd,
    };
    let disk = att.disk_path();
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(&disk)
        .map_err(|e| Error::io(format!("open {}", disk.display()), e))?;
    let lo = LoopDevice::attach(
        &file,
        LoopOptions {
            read_only,
            direct_io: opts.loop_direct_io,
            block_size: if matches!(block_size, 512 | 1024 | 2048 | 4096) {
                block_size
            } else {
                512
            },
            autoclear: true,
        },
    )?;
    drop(file);
    if let Some(kb) = read_ahead.or(opts.read_ahead_kb) {
        // Only a tuning: the device works with the kernel's value.
        if let Err(e) = lo.set_read_ahead_kb(kb) {
            tracing::warn!("FUSE device {id}: {e}; readahead left to the kernel");
        }
    }
    tracing::info!(
        "FUSE device {}: {} over {} (direct I/O: loop {}, FUSE {}; readahead {} KiB)",
        id,
        lo.path().display(),
        disk.display(),
        lo.direct_io().unwrap_or(false),
        opts.fuse_direct_io,
        lo.read_ahead_kb().unwrap_or(0)
    );
    att.device = lo.path().to_path_buf();
    att.loopdev = Some(lo);
    Ok(att)
}

/// The session's settings: every thread reads the one `/dev/fuse` file, whose
/// copy a supervisor keeps (a cloned descriptor would take the requests its
/// thread had read down with the process).
///
/// Built just before each session starts, it also has the session threads'
/// request buffers populated up to the largest request
/// ([`crate::prefault`]), so that a worker killed mid-copy fails no request.
fn config(opts: &FuseOptions) -> Config {
    crate::prefault::set(opts.max_io.max(4096) as usize + 8192);
    let mut config = Config::default();
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = false;
    config
}

/// `FUSE_INIT` (opcode 26), the first request of a connection.
const FUSE_INIT: u32 = 26;
/// `FUSE_NOTIFY_RESEND` (`enum fuse_notify_code`, Linux 6.9, protocol 7.40):
/// the kernel queues again every request a server read and did not answer.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `FUSE_ASYNC_DIO` init flag, as [`DiskFs::init`] asks for it.
const FUSE_ASYNC_DIO: u32 = 1 << 15;

/// Serves the FUSE device of `id` again, over `kept`, a copy of the open
/// `/dev/fuse` file of its dead server: the mount, the file and the loop
/// device are the ones it left.
fn resume(
    opts: &FuseOptions,
    backend: Arc<dyn BlockBackend>,
    id: &str,
    work_dir: &Path,
    kept: OwnedFd,
) -> Result<FuseAttachment> {
    let work = work_dir
        .canonicalize()
        .map_err(|e| Error::io(format!("work dir {}", work_dir.display()), e))?;
    let mnt = work.join(MOUNT_DIR);
    let conn = mounts()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == mnt && m.fs_type.starts_with("fuse"))
        .map(|m| m.dev())
        .ok_or_else(|| {
            Error::Protocol(format!(
                "resuming {id}: nothing is mounted at {} any more",
                mnt.display()
            ))
        })?;
    let disk = mnt.join(DISK_NAME);
    // A handle detaches its device when dropped: opened once nothing can fail.
    let lo_path = match LoopDevice::find_by_backing(&disk).into_iter().next() {
        Some(p) => p,
        None => {
            return Err(Error::Protocol(format!(
                "resuming {id}: no loop device reads {} any more",
                disk.display()
            )))
        }
    };
    // fuser serves only after the INIT handshake, which the kernel sent to the
    // first server: hand it one over a socket, then put the real file under
    // the descriptor number fuser reads.
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("socketpair for the FUSE handshake", e.into()))?;
    rustix::io::write(&ours, &init_request(opts.max_io))
        .map_err(|e| Error::io("FUSE handshake", e.into()))?;
    let fuse_fd = theirs.as_raw_fd();
    let session = fuser::Session::from_fd(
        DiskFs::new(backend, opts),
        theirs,
        SessionACL::All,
        config(opts),
    )
    .map_err(|e| Error::io(format!("FUSE session of {id}"), e))?;
    drop(ours);
    // SAFETY: `kept` and `fuse_fd` are open descriptors of this process (the
    // session owns `fuse_fd` and is not running yet); dup3 atomically makes
    // `fuse_fd` refer to `kept`'s open file, so the session's reads and
    // replies go to the FUSE connection from now on.
    if unsafe { libc::dup3(kept.as_raw_fd(), fuse_fd, libc::O_CLOEXEC) } < 0 {
        return Err(Error::io(
            "dup3 of the kept /dev/fuse descriptor",
            io::Error::last_os_error(),
        ));
    }
    drop(kept);
    resend(fuse_fd)?;
    let lo = LoopDevice::open_bound(&lo_path)?;
    let session = session
        .spawn()
        .map_err(|e| Error::io(format!("FUSE session of {id}"), e))?;
    tracing::info!(
        "FUSE device {id}: resumed {} over {} (connection {conn})",
        lo.path().display(),
        disk.display()
    );
    Ok(FuseAttachment {
        device: lo.path().to_path_buf(),
        loopdev: Some(lo),
        mountpoint: mnt,
        conn: Some(conn),
        session: Some(session),
        fuse_fd,
    })
}

/// A `FUSE_INIT` request as the kernel sends it (protocol 7.31), for the
/// handshake of a resumed session.
fn init_request(max_readahead: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    m.extend_from_slice(&104u32.to_ne_bytes()); // fuse_in_header.len
    m.extend_from_slice(&FUSE_INIT.to_ne_bytes()); // opcode
    m.extend_from_slice(&1u64.to_ne_bytes()); // unique
    m.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    m.extend_from_slice(&[0; 16]); // uid, gid, pid, total_extlen + padding
    m.extend_from_slice(&7u32.to_ne_bytes()); // fuse_init_in.major
    m.extend_from_slice(&31u32.to_ne_bytes()); // minor
    m.extend_from_slice(&max_readahead.to_ne_bytes());
    m.extend_from_slice(&FUSE_ASYNC_DIO.to_ne_bytes()); // flags
    m.extend_from_slice(&[0; 48]); // flags2, unused[11]
    m
}

/// Asks the kernel to queue again the requests of the connection at `fd` that
/// a server read and did not answer.
fn resend(fd: RawFd) -> Result<()> {
    let mut m = Vec::with_capacity(16);
    m.extend_from_slice(&16u32.to_ne_bytes()); // fuse_out_header.len
    m.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes()); // error = notify code
    m.extend_from_slice(&0u64.to_ne_bytes()); // unique 0: a notification
                                              // SAFETY: `fd` is open for the duration of the call (the caller owns it).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match rustix::io::write(fd, &m) {
        Ok(_) => Ok(()),
        Err(rustix::io::Errno::INVAL) => Err(Error::Unsupported(
            "the kernel cannot re-send the requests a dead FUSE server had read \
             (FUSE_NOTIFY_RESEND needs Linux 6.9 or later)"
                .into(),
        )),
        Err(e) => Err(Error::io("FUSE_NOTIFY_RESEND", e.into())),
    }
}

/// Unmounts the FUSE mount and waits for the session threads; aborts the connection
/// if they do not stop. `busy`: the file is known to be held open, so unmount lazily
/// and abort at once.
fn unmount_and_join(
    mnt: &Path,
    conn: Option<u64>,
    session: BackgroundSession,
    busy: bool,
) -> Result<()> {
    let mut result = Ok(());
    if busy {
        if let Some(c) = conn {
            abort_conn(c);
        }
    }
    let wait = if busy { Duration::ZERO } else { TEARDOWN_WAIT };
    let unmounted = wait_until(wait, || {
        match rustix::mount::unmount(mnt, UnmountFlags::empty()) {
            Ok(()) => true,
            Err(rustix::io::Errno::BUSY) => false,
            Err(e) => {
                // EINVAL: not mounted any more.
                if e != rustix::io::Errno::INVAL {
                    tracing::warn!("unmount {}: {e}", mnt.display());
                }
                true
            }
        }
    });
    if !unmounted {
        tracing::warn!("{} is busy; detaching it lazily", mnt.display());
        let _ = rustix::mount::unmount(mnt, UnmountFlags::DETACH);
        if !busy {
            result = Err(Error::Timeout(format!(
                "{} stayed busy; detached lazily",
                mnt.display()
            )));
        }
    }
    let mut stopped = wait_until(TEARDOWN_WAIT, || session.guard.is_finished());
    if !stopped {
        if let Some(c) = conn {
            tracing::warn!(
                "FUSE session of {} did not stop; aborting connection {c}",
                mnt.display()
            );
            abort_conn(c);
            stopped = wait_until(TEARDOWN_WAIT, || session.guard.is_finished());
        }
    }
    if !stopped {
        // Leave the threads behind rather than hang the caller.
        return Err(Error::Timeout(format!(
            "FUSE session threads of {} did not stop",
            mnt.display()
        )));
    }
    if let Err(e) = session.join() {
        tracing::warn!("FUSE session of {} ended with: {e}", mnt.display());
    }
    result
}

fn cleanup(id: &str, work_dir: &Path) -> Result<()> {
    let work = work_dir
        .canonicalize()
        .unwrap_or_else(|_| work_dir.to_path_buf());
    let mnt = work.join(MOUNT_DIR);
    let disk = mnt.join(DISK_NAME);
    let mut first_err: Option<Error> = None;

    // 1. Abort the connections of FUSE mounts left at <work_dir>/fuse, so that no
    //    I/O through a leftover loop device can hang on an unserved connection.
    let stale: Vec<MountInfo> = mounts()
        .into_iter()
        .filter(|m| m.mount_point == mnt)
        .collect();
    for m in stale.iter().filter(|m| m.fs_type.starts_with("fuse")) {
        tracing::info!(
            "cleanup {id}: aborting FUSE connection {} at {}",
            m.dev(),
            mnt.display()
        );
        abort_conn(m.dev());
    }

    // 2. Loop devices over <work_dir>/fuse/disk.
    for dev in LoopDevice::find_by_backing(&disk) {
        tracing::info!("cleanup {id}: detaching {}", dev.display());
        if let Err(e) = LoopDevice::detach_path(&dev) {
            tracing::warn!("cleanup {id}: {e}");
            first_err.get_or_insert(e);
        }
    }

    // 3. Lazily unmount whatever is stacked at <work_dir>/fuse.
    for _ in 0..stale.len() {
        match rustix::mount::unmount(&mnt, UnmountFlags::DETACH) {
            Ok(()) => tracing::info!("cleanup {id}: unmounted {}", mnt.display()),
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => break,
            Err(e) => {
                let e = Error::io(format!("unmount {}", mnt.display()), e.into());
                tracing::warn!("cleanup {id}: {e}");
                first_err.get_or_insert(e);
                break;
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Writes to `/sys/fs/fuse/connections/<conn>/abort`, mounting `fusectl` first if
/// needed. Best effort: logs failures.
fn abort_conn(conn: u64) {
    let dir = Path::new(FUSECTL).join(conn.to_string());
    if !dir.exists()
        && !mounts().iter().any(|m| m.fs_type == "fusectl")
        && Path::new(FUSECTL).is_dir()
    {
        if let Err(e) =
            rustix::mount::mount("fusectl", FUSECTL, "fusectl", MountFlags::empty(), None)
        {
            tracing::warn!("mount fusectl at {FUSECTL}: {e}");
        }
    }
    if dir.exists() {
        if let Err(e) = std::fs::write(dir.join("abort"), b"1") {
            tracing::warn!("abort FUSE connection {conn}: {e}");
        }
    }
}

/// The FUSE connection id (the name under `/sys/fs/fuse/connections`) of the mount
/// at `mnt`, read from `/proc/self/mountinfo` (never stats into the mount).
fn conn_id(mnt: &Path) -> Option<u64> {
    mounts()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == mnt)
        .map(|m| m.dev())
}

/// The one-file filesystem.
struct DiskFs {
    backend: Arc<dyn BlockBackend>,
    size: u64,
    read_only: bool,
    fuse_direct_io: bool,
    max_io: u32,
    max_background: u16,
    uid: u32,
    gid: u32,
    time: SystemTime,
}

thread_local! {
    /// Per-thread read buffer, grown to the largest request seen.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl DiskFs {
    fn new(backend: Arc<dyn BlockBackend>, opts: &FuseOptions) -> Self {
        DiskFs {
            size: backend.size(),
            read_only: backend.read_only(),
            backend,
            fuse_direct_io: opts.fuse_direct_io,
            max_io: opts.max_io.max(4096),
            max_background: opts.max_background.max(1),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            time: SystemTime::now(),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o755, 0, 2),
            DISK_INO => (
                FileType::RegularFile,
                if self.read_only { 0o444 } else { 0o644 },
                self.size,
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The part of `offset..offset+len` inside the file.
    fn clamp(&self, offset: u64, len: u64) -> u64 {
        len.min(self.size.saturating_sub(offset))
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::info!("FUSE: kernel lacks {missing:?}; direct I/O is synchronous");
        }
        if let Err(max) = config.set_max_write(self.max_io) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(self.max_io) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(self.max_background);
        let _ = config.set_congestion_threshold(self.max_background.saturating_mul(3) / 4);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT_INO && name == DISK_NAME {
            if let Some(a) = self.attr(DISK_INO) {
                return reply.entry(&TTL, &a, Generation(0));
            }
        }
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The device has a fixed size; other attribute changes are ignored.
        if size.is_some_and(|s| s != self.size) {
            return reply.error(Errno::EPERM);
        }
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match ino.0 {
            DISK_INO => {}
            ROOT_INO => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::ENOENT),
        }
        let writes = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if writes && self.read_only {
            return reply.error(Errno::EROFS);
        }
        let mut fopen = if self.fuse_direct_io {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        if writes && self.fuse_direct_io {
            fopen |= FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        }
        reply.opened(FileHandle(0), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let n = self.clamp(offset, u64::from(size)) as usize;
        if n == 0 {
            return reply.data(&[]);
        }
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let b = &mut buf[..n];
            match self.backend.read_at(b, offset) {
                Ok(()) => reply.data(b),
                Err(e) => {
                    tracing::error!("FUSE read of {n} bytes at {offset}: {e}");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let n = self.clamp(offset, data.len() as u64) as usize;
        if n == 0 && !data.is_empty() {
            return reply.error(Errno::ENOSPC);
        }
        match self.backend.write_at(&data[..n], offset) {
            Ok(()) => reply.written(n as u32),
            Err(e) => {
                tracing::error!("FUSE write of {n} bytes at {offset}: {e}");
                reply.error(Errno::EIO);
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Sent on close: make what was written durable then.
        self.fsync_reply(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_reply(reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    // Unsupported operations answered without fuser's "not implemented" log line;
    // the kernel remembers ENOSYS and stops asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(self.size.div_ceil(4096), 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino.0 != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let len = self.clamp(offset, length);
        let zeroing = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & zeroing != 0 {
            // Both leave zeros behind, which is what discard promises.
            if mode & !(zeroing | libc::FALLOC_FL_KEEP_SIZE) != 0 {
                return reply.error(Errno::EOPNOTSUPP);
            }
            if len == 0 {
                return reply.ok();
            }
            match self.backend.discard(offset, len) {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::error!("FUSE discard of {len} bytes at {offset}: {e}");
                    reply.error(Errno::EIO);
                }
            }
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Plain allocation: every byte of the device exists already.
            if offset.saturating_add(length) > self.size && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                return reply.error(Errno::EFBIG);
            }
            reply.ok();
        } else {
            reply.error(Errno::EOPNOTSUPP);
        }
    }
}

impl DiskFs {
    fn fsync_reply(&self, reply: ReplyEmpty) {
        if self.read_only {
            return reply.ok();
        }
        match self.backend.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!("FUSE flush: {e}");
                reply.error(Errno::EIO);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_and_clamp() {
        let be = Arc::new(crate::MemBackend::new(vec![0; 8192], true));
        let fs = DiskFs::new(be, &FuseOptions::default());
        let a = fs.attr(DISK_INO).unwrap();
        assert_eq!((a.size, a.perm, a.blocks), (8192, 0o444, 16));
        assert!(fs.attr(7).is_none());
        assert_eq!(fs.clamp(8000, 4096), 192);
        assert_eq!(fs.clamp(9000, 4096), 0);
    }
}
