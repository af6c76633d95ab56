//! The TCMU frontend: UAPI, command ring, SCSI emulation, configfs set-up.
//!
//! [`TcmuFrontend::attach`] creates a TCMU backstore in configfs (no netlink: the
//! handler finds its UIO device by name), maps its ring, serves it with a few
//! threads ([`server`]), and exports it through tcm_loop as `/dev/sdX`.
//!
//! - [`uapi`]: `target_core_user.h`, by hand.
//! - [`ring`]: the command ring over a [`ring::RingMemory`] (the UIO mapping, or a
//!   simulated one from [`sim`]), with out-of-order completion at the tail.
//! - [`scsi`]: SCSI emulation, pure over a [`BlockBackend`].
//! - [`configfs`]: backstore, UIO and tcm_loop objects.
//!
//! No netlink: the backstore's control gets `nl_reply_supported=-1`, so the kernel
//! never waits for a netlink reply for it (it would if some daemon had told the
//! TCMU genl family that it sends replies); with no listener at all the kernel's
//! "device added" multicast finds no one and `enable` goes ahead. `enable` is
//! retried on EAGAIN (netlink blocked while such a daemon starts).
//!
//! Recovery: a process that died leaves the backstore and the tcm_loop export in
//! place, with commands queued on the ring; [`TcmuFrontend::reattach`] (or
//! [`Frontend::attach`] of the same id) opens the UIO device again. Commands the
//! dead process had taken may already have been answered out of order in other
//! entries' slots, so entries between `cmd_tail` and `cmd_head` cannot simply be
//! replayed; the kernel is asked to reset the ring instead, which fails them with
//! BUSY and the initiator retries them: readers see no error.

pub mod configfs;
pub mod ring;
pub mod scsi;
pub mod server;
pub mod sim;
pub mod uapi;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use configfs::DevicePaths;
use ring::{Region, Ring, RingMemory};
use server::{Doorbell, Server, UioDoorbell};

use crate::{Attachment, BlockBackend, Error, Frontend, Result};

/// Settings of the TCMU frontend.
#[derive(Debug, Clone)]
pub struct TcmuOptions {
    /// Worker threads per device.
    pub workers: usize,
    /// The backstore's `cmd_time_out` in seconds (0: never). Large, so that a
    /// restarted handler finds the commands still queued.
    pub cmd_time_out_secs: u32,
    /// `/sys/block/sdX/device/timeout` in seconds.
    pub scsi_timeout_secs: u32,
    /// `max_data_area_mb` of the backstore (the ring's data area).
    pub max_data_area_mb: u32,
    /// `hw_max_sectors` of the backstore.
    pub hw_max_sectors: u32,
    /// How long to wait for the UIO device and the SCSI disk to appear.
    pub attach_timeout: Duration,
}

impl Default for TcmuOptions {
    fn default() -> Self {
        TcmuOptions {
            workers: 4,
            // INT32_MAX / 1000: effectively never (what the upstream snapshotter uses).
            cmd_time_out_secs: 2_147_483,
            scsi_timeout_secs: 2_147_483,
            max_data_area_mb: 64,
            hw_max_sectors: 2048,
            attach_timeout: Duration::from_secs(60),
        }
    }
}

/// The TCMU + tcm_loop frontend (`/dev/sdX`).
#[derive(Debug, Clone, Default)]
pub struct TcmuFrontend {
    opts: TcmuOptions,
}

/// The UIO mapping of a backstore.
struct UioMemory(memmap2::MmapRaw);

// SAFETY: the mapping is `len()` bytes from `as_mut_ptr()`, page aligned, and stays
// mapped (and at the same address) until the MmapRaw is dropped with `self`.
unsafe impl RingMemory for UioMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A TCMU device served by this process.
pub struct TcmuAttachment {
    device: PathBuf,
    live: Option<Live>,
}

struct Live {
    paths: DevicePaths,
    server: Option<Server>,
    scsi_address: Option<String>,
    uio_path: PathBuf,
    /// A takeover found commands pending and had the kernel reset the ring.
    ring_reset: bool,
}

impl Live {
    /// Tears everything down in order: the SCSI disk and the tcm_loop export
    /// while the ring is still served, then the threads, then the backstore.
    fn teardown(&mut self) -> Result<()> {
        let r1 = configfs::remove_loopback(&self.paths);
        if let Some(s) = self.server.take() {
            s.stop();
        }
        r1?;
        configfs::remove_backstore(&self.paths)
    }
}

impl std::fmt::Debug for TcmuAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcmuAttachment")
            .field("device", &self.device)
            .field("scsi_address", &self.scsi_address())
            .finish()
    }
}

impl TcmuAttachment {
    /// The SCSI address `H:C:T` of the disk (LUN 0).
    pub fn scsi_address(&self) -> Option<&str> {
        self.live.as_ref()?.scsi_address.as_deref()
    }

    /// The `/dev/uioN` this process serves.
    pub fn uio_path(&self) -> Option<&Path> {
        Some(self.live.as_ref()?.uio_path.as_path())
    }

    /// True if this attachment took over a device whose ring still held commands
    /// of a dead handler, and had the kernel hand them back to the initiator.
    pub fn ring_was_reset(&self) -> bool {
        self.live.as_ref().is_some_and(|l| l.ring_reset)
    }

    /// Commands completed so far.
    pub fn completed(&self) -> u64 {
        self.live
            .as_ref()
            .and_then(|l| l.server.as_ref())
            .map_or(0, |s| {
                s.stats()
                    .completed
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
    }

    /// Why the ring stopped being served, if it did.
    pub fn broken(&self) -> Option<String> {
        self.live.as_ref()?.server.as_ref()?.broken()
    }

    /// Stops serving without removing any kernel object, as a crash would (for
    /// recovery tests): a later [`TcmuFrontend::reattach`] takes over.
    pub fn abandon(mut self) {
        if let Some(mut l) = self.live.take() {
            if let Some(s) = l.server.take() {
                s.stop();
            }
        }
    }
}

impl Attachment for TcmuAttachment {
    fn device_path(&self) -> &Path {
        &self.device
    }

    fn detach(mut self: Box<Self>) -> Result<()> {
        match self.live.take() {
            Some(mut l) => l.teardown(),
            None => Ok(()),
        }
    }
}

impl Drop for TcmuAttachment {
    fn drop(&mut self) {
        if let Some(mut l) = self.live.take() {
            if let Err(e) = l.teardown() {
                tracing::error!("tcmu {}: teardown on drop: {e}", l.paths.id);
            }
        }
    }
}

/// A backend that fails all I/O: serves a dead device while it is torn down.
struct FailBackend {
    size: u64,
}

impl BlockBackend for FailBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("device is being removed"))
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("device is being removed"))
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("device is being removed"))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TcmuFrontend {
    /// A frontend with `opts`.
    pub fn new(opts: TcmuOptions) -> Self {
        TcmuFrontend { opts }
    }

    /// The options.
    pub fn options(&self) -> &TcmuOptions {
        &self.opts
    }

    fn check_support() -> Result<()> {
        if !configfs::target_available() {
            return Err(Error::Unsupported(format!(
                "{}/core is missing: load target_core_user and tcm_loop \
                 (and mount configfs on /sys/kernel/config)",
                configfs::TARGET_ROOT
            )));
        }
        Ok(())
    }

    /// Opens and maps the backstore's UIO device and starts serving it. With
    /// `recover`, answers left on the ring by a previous handler are delivered
    /// and pending commands are handed back to the initiator (ring reset).
    fn serve(
        &self,
        paths: &DevicePaths,
        backend: Arc<dyn BlockBackend>,
        recover: bool,
    ) -> Result<(Server, PathBuf, bool)> {
        let uio = configfs::open_uio(paths, self.opts.attach_timeout)?;
        let mmap = memmap2::MmapOptions::new()
            .len(uio.map_size)
            .map_raw(&uio.file)
            .map_err(|e| Error::io(format!("mmap {}", uio.dev_path.display()), e))?;
        let region = Region::new(Arc::new(UioMemory(mmap)));
        let doorbell: Arc<dyn Doorbell> = Arc::new(UioDoorbell::new(
            uio.file,
            uio.dev_path.display().to_string(),
        )?);
        let mut ring = Ring::open(region.clone())?;
        let mut reset = false;
        if recover {
            // Completions a dead handler published but never announced.
            doorbell.kick()?;
            let head = ring.head()?;
            if head != ring.tail() {
                tracing::info!(
                    "tcmu {}: {} bytes of ring entries pending after a restart: resetting the ring",
                    paths.id,
                    (head + ring.cmdr_size() - ring.tail()) % ring.cmdr_size()
                );
                configfs::reset_ring(paths)?;
                ring = Ring::open(region)?;
                reset = true;
            }
        }
        let lun = scsi::LunInfo::new(&paths.id, backend.as_ref());
        let server = Server::start(ring, doorbell, backend, lun, self.opts.workers)?;
        Ok((server, uio.dev_path, reset))
    }

    fn export(&self, live: &mut Live) -> Result<PathBuf> {
        let addr = configfs::export_loopback(&live.paths)?;
        live.scsi_address = Some(addr.clone());
        let sd = configfs::wait_for(
            &format!("the SCSI disk of {} at {addr}", live.paths.id),
            self.opts.attach_timeout,
            || configfs::find_block_device(&addr),
        )?;
        let timeout = Path::new("/sys/block")
            .join(&sd)
            .join("device")
            .join("timeout");
        if let Err(e) = configfs::write_attr(&timeout, &self.opts.scsi_timeout_secs.to_string()) {
            tracing::warn!("tcmu {}: {e}", live.paths.id);
        }
        let dev = PathBuf::from("/dev").join(&sd);
        // The disk's sysfs entry and device node appear (device_add) a moment before
        // the disk can be opened (bdev_add): an open in between fails with ENXIO, seen
        // under qemu TCG when the next attach mounted the device at once.
        configfs::wait_for(
            &format!("{} to open", dev.display()),
            self.opts.attach_timeout,
            || {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(&dev)
                    .ok()
                    .map(drop)
            },
        )?;
        Ok(dev)
    }

    /// Takes over device `id` left by a handler that died: serves its ring again
    /// (see the module docs) and re-creates the tcm_loop export if it is missing.
    pub fn reattach(
        &self,
        backend: Arc<dyn BlockBackend>,
        id: &str,
        work_dir: &Path,
    ) -> Result<TcmuAttachment> {
        let _ = work_dir;
        Self::check_support()?;
        let paths = DevicePaths::new(id)?;
        if !configfs::backstore_enabled(&paths) {
            return Err(Error::io(
                format!("reattach TCMU device {id}"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} is not an enabled backstore", paths.core_dir.display()),
                ),
            ));
        }
        let size = configfs::backstore_size(&paths)?;
        if size != backend.size() {
            return Err(Error::io(
                format!("reattach TCMU device {id}"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "the backstore has {size} bytes, the backend {}",
                        backend.size()
                    ),
                ),
            ));
        }
        let (server, uio_path, ring_reset) = self.serve(&paths, backend, true)?;
        let mut live = Live {
            paths,
            server: Some(server),
            scsi_address: None,
            uio_path,
            ring_reset,
        };
        match self.export(&mut live) {
            Ok(device) => Ok(TcmuAttachment {
                device,
                live: Some(live),
            }),
            Err(e) => {
                // Keep the backstore (and its queued I/O) for the next attempt.
                if let Some(s) = live.server.take() {
                    s.stop();
                }
                Err(e)
            }
        }
    }

    fn attach_new(
        &self,
        backend: Arc<dyn BlockBackend>,
        paths: DevicePaths,
    ) -> Result<TcmuAttachment> {
        let cfg = configfs::BackstoreConfig {
            dev_size: backend.size(),
            block_size: backend.block_size(),
            hw_max_sectors: self.opts.hw_max_sectors,
            max_data_area_mb: self.opts.max_data_area_mb,
            cmd_time_out_secs: self.opts.cmd_time_out_secs,
        };
        let mut live = Live {
            paths,
            server: None,
            scsi_address: None,
            uio_path: PathBuf::new(),
            ring_reset: false,
        };
        let res = (|| {
            configfs::create_backstore(&live.paths, &cfg)?;
            let (server, uio_path, _) = self.serve(&live.paths, backend, false)?;
            live.server = Some(server);
            live.uio_path = uio_path;
            self.export(&mut live)
        })();
        match res {
            Ok(device) => Ok(TcmuAttachment {
                device,
                live: Some(live),
            }),
            Err(e) => {
                if let Err(e2) = live.teardown() {
                    tracing::error!("tcmu {}: undoing a failed attach: {e2}", live.paths.id);
                }
                Err(e)
            }
        }
    }

    /// Like [`Frontend::attach`], returning the concrete attachment.
    pub fn attach_device(
        &self,
        backend: Arc<dyn BlockBackend>,
        id: &str,
        work_dir: &Path,
    ) -> Result<TcmuAttachment> {
        Self::check_support()?;
        let paths = DevicePaths::new(id)?;
        if paths.core_dir.exists() {
            if configfs::backstore_enabled(&paths) && configfs::find_uio(&paths).is_some() {
                return self.reattach(backend, id, work_dir);
            }
            // A half-made device: start again.
            self.cleanup(id, work_dir)?;
        }
        self.attach_new(backend, paths)
    }
}

impl Frontend for TcmuFrontend {
    fn name(&self) -> &'static str {
        "tcmu"
    }

    fn attach(
        &self,
        backend: Arc<dyn BlockBackend>,
        id: &str,
        work_dir: &Path,
    ) -> Result<Box<dyn Attachment>> {
        Ok(Box::new(self.attach_device(backend, id, work_dir)?))
    }

    fn cleanup(&self, id: &str, _work_dir: &Path) -> Result<()> {
        let paths = DevicePaths::new(id)?;
        if !configfs::target_available() {
            return Ok(());
        }
        // Commands of a dead handler may still sit on the ring; removing the disk
        // waits for them. Answer them (with errors) while tearing down.
        let mut responder = None;
        if configfs::backstore_enabled(&paths) && configfs::find_uio(&paths).is_some() {
            let size = configfs::backstore_size(&paths).unwrap_or(0);
            let backend: Arc<dyn BlockBackend> = Arc::new(FailBackend { size });
            let quick = TcmuFrontend::new(TcmuOptions {
                workers: 1,
                attach_timeout: Duration::from_secs(5),
                ..self.opts.clone()
            });
            responder = Some(quick.serve(&paths, backend, true)?.0);
        }
        let r = configfs::remove_loopback(&paths);
        if let Some(s) = responder {
            s.stop();
        }
        r?;
        configfs::remove_backstore(&paths)
    }
}
