//! [`ImageBackend`]: an image (read-only lowers plus an optional writable upper)
//! as a [`BlockBackend`].

use std::io;
use std::sync::{Arc, RwLock};

use overlaybd_core::image::Image;
use overlaybd_core::lsmt::writable::WritableLayer;
use tcmu_target::BlockBackend;
use zfile::sync::RwLockExt;

const SECTOR: u64 = 512;

/// An image served as a block device.
///
/// Reads merge the upper's live index over the lowers; writes and discards go
/// to the upper (append-only data + index log, as upstream's writable layer),
/// so the lowers are never modified. Without an upper the device is read-only.
pub struct ImageBackend {
    lower: Arc<Image>,
    upper: Option<RwLock<WritableLayer>>,
    size: u64,
}

impl ImageBackend {
    /// Serves `lower` (opened without its upper) read-only, or read-write over
    /// `upper`.
    pub fn new(lower: Arc<Image>, upper: Option<WritableLayer>) -> Self {
        let size = upper
            .as_ref()
            .map(|u| u.virtual_size())
            .filter(|&v| v != 0)
            .unwrap_or_else(|| lower.virtual_size());
        ImageBackend {
            lower,
            upper: upper.map(RwLock::new),
            size,
        }
    }

    /// The read-only part.
    pub fn lower(&self) -> &Arc<Image> {
        &self.lower
    }

    fn upper(&self) -> io::Result<&RwLock<WritableLayer>> {
        self.upper
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "read-only device"))
    }

    fn check(&self, offset: u64, len: u64, aligned: bool) -> io::Result<()> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} run past the device end {}",
                    self.size
                ),
            ));
        }
        if aligned && (offset % SECTOR != 0 || len % SECTOR != 0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset}: not 512-byte aligned"),
            ));
        }
        Ok(())
    }
}

fn to_io(e: overlaybd_core::error::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl ImageBackend {
    /// [`BlockBackend::read_at`] without the timeline.
    fn read_inner(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        let Some(upper) = &self.upper else {
            let n = self.lower.read_at(buf, offset).map_err(to_io)?;
            buf[n..].fill(0);
            return Ok(());
        };
        let upper = upper.read_locked();
        let end = offset + buf.len() as u64;
        let (from, to) = (offset / SECTOR, end.div_ceil(SECTOR));
        let segs = upper.lookup(from, to);
        // Gaps between the upper's extents come from the lowers.
        let mut pos = offset;
        let fill_lower = |buf: &mut [u8], a: u64, b: u64| -> io::Result<()> {
            if a < b {
                let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
                let n = self.lower.read_at(dst, a).map_err(to_io)?;
                dst[n..].fill(0);
            }
            Ok(())
        };
        for s in segs {
            let a = (s.offset * SECTOR).max(offset);
            let b = (s.end() * SECTOR).min(end);
            fill_lower(buf, pos, a)?;
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            if s.zeroed {
                dst.fill(0);
            } else {
                upper.read_at(dst, a).map_err(to_io)?;
            }
            pos = b;
        }
        fill_lower(buf, pos, end)
    }
}

impl BlockBackend for ImageBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.upper.is_none()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use obd_remote::timeline;
        if !timeline::enabled() {
            return self.read_inner(buf, offset);
        }
        let t0 = timeline::now_us();
        let r = self.read_inner(buf, offset);
        timeline::line(&format!(
            "dev {offset} {} {t0} {}",
            buf.len(),
            timeline::now_us()
        ));
        r
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64, true)?;
        let mut u = self.upper()?.write_locked();
        u.write_at(buf, offset).map_err(to_io)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len, true)?;
        let mut u = self.upper()?.write_locked();
        u.discard(offset, len).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        match &self.upper {
            Some(u) => u.read_locked().fsync().map_err(to_io),
            None => Ok(()),
        }
    }
}
