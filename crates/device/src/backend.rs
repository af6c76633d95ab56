//! [`ImageBackend`]: an [`Image`] (read-only lowers plus an optional writable
//! upper) as a [`BlockBackend`].

use std::io;
use std::sync::Arc;

use overlaybd_core::error::Error;
use overlaybd_core::image::Image;
use tcmu_target::BlockBackend;

/// An image served as a block device: the frontends' requests passed to the
/// [`Image`], which merges its writable upper over the lowers and takes writes
/// and discards into it. Without an upper the device is read-only.
pub struct ImageBackend {
    image: Arc<Image>,
    read_ahead_kb: Option<u32>,
}

impl ImageBackend {
    /// Serves `image`; read-write when it has a writable upper.
    pub fn new(image: Arc<Image>) -> Self {
        ImageBackend {
            image,
            read_ahead_kb: None,
        }
    }

    /// Asks the frontend for this readahead ([`BlockBackend::read_ahead_kb`]);
    /// `None` takes the frontend's default.
    pub fn with_read_ahead_kb(mut self, kb: Option<u32>) -> Self {
        self.read_ahead_kb = kb;
        self
    }

    /// The image served.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// [`BlockBackend::read_at`] without the timeline.
    fn read_inner(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image
            .check_range(offset, buf.len() as u64)
            .map_err(to_io)?;
        let n = self.image.read_at(buf, offset).map_err(to_io)?;
        buf[n..].fill(0);
        Ok(())
    }
}

/// A frontend's view of an image error: a write to a read-only image is
/// `PermissionDenied` (write-protected), a bad request `InvalidInput`.
fn to_io(e: Error) -> io::Error {
    let kind = match e {
        Error::ReadOnly => io::ErrorKind::PermissionDenied,
        Error::BadRequest(_) => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

impl BlockBackend for ImageBackend {
    fn size(&self) -> u64 {
        self.image.virtual_size()
    }

    fn read_only(&self) -> bool {
        !self.image.has_upper()
    }

    fn read_ahead_kb(&self) -> Option<u32> {
        self.read_ahead_kb
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
        self.image.write_at(buf, offset).map_err(to_io)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image.discard(offset, len).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        self.image.flush().map_err(to_io)
    }
}
