//! Positional byte sources: the one I/O abstraction every format layer reads through.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Thread-safe positional reads from an immutable byte source (a file, a memory
/// buffer, a window of another source, a decoded ZFile, a remote blob, ...).
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read.
    /// Returns 0 only at or past the end of the source.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Total size in bytes.
    fn size(&self) -> u64;

    /// Borrows `len` bytes at `offset` without copying, for memory-backed sources
    /// (buffers, mappings). `None` (the default) means "use `read_at`"; also `None`
    /// when the range is not entirely inside the source.
    fn slice_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let _ = (offset, len);
        None
    }

    /// The local file holding this source's bytes and the file offset of byte 0,
    /// when the source is a plain (uncompressed) view of a local file. Lets bulk
    /// copies run inside the kernel (`copy_file_range`). `None` by default.
    fn local_file(&self) -> Option<(&File, u64)> {
        None
    }

    /// Asks the source to drop any cached copy of bytes `[offset, offset + len)`,
    /// because a reader found them corrupt (bad CRC, undecodable). Returns `true`
    /// when cached bytes were dropped, so a re-read may return different (fresh)
    /// bytes and is worth trying; `false` (the default) means a re-read would see
    /// the same bytes.
    fn invalidate(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// Advice that `[offset, offset + len)` will be read soon (like
    /// `POSIX_FADV_WILLNEED`). Remote sources fetch it ahead at low priority and
    /// return when it is cached; local sources ignore it. Errors are not
    /// reported here: the later read reports them.
    fn will_need(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// The range `(offset, len)` of the stored bytes (what a remote source
    /// fetches: the compressed blocks of a ZFile) behind bytes
    /// `[offset, offset + len)` of this source, in the address space
    /// [`ReadAt::will_need_stored`] takes. Lets a prefetcher merge ranges that
    /// lie apart in the data but next to each other where they are stored.
    /// Sources that store their bytes as they read them return the range
    /// unchanged (the default). A type overriding this overrides
    /// `will_need_stored` too.
    fn stored_extent(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset, len)
    }

    /// [`ReadAt::will_need`] of a range of the stored bytes, as
    /// [`ReadAt::stored_extent`] returns them. Default: `will_need`.
    fn will_need_stored(&self, offset: u64, len: u64) {
        self.will_need(offset, len)
    }

    /// Fills `buf` from `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short read at offset {offset}"),
                    ))
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A local file with its size captured at open time.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// Wraps an open file; its current length becomes the source size.
    pub fn new(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }

    /// Opens `path` read-only.
    pub fn open(path: impl AsRef<std::path::Path>) -> io::Result<Self> {
        Self::new(File::open(path)?)
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl ReadAt for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let max = (self.size - offset).min(buf.len() as u64) as usize;
        self.file.read_at(&mut buf[..max], offset)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn local_file(&self) -> Option<(&File, u64)> {
        Some((&self.file, 0))
    }
}

fn sub_slice(data: &[u8], offset: u64, len: usize) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    data.get(start..start.checked_add(len)?)
}

fn read_slice(data: &[u8], buf: &mut [u8], offset: u64) -> usize {
    if offset >= data.len() as u64 {
        return 0;
    }
    let start = offset as usize;
    let n = buf.len().min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
    n
}

/// `ReadAt` for in-memory bytes (`[u8]`, `Vec<u8>`): reads and zero-copy slices.
macro_rules! bytes_read_at {
    ($($t:ty),*) => {$(
        impl ReadAt for $t {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
                Ok(read_slice(self, buf, offset))
            }
            fn size(&self) -> u64 {
                self.len() as u64
            }
            fn slice_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
                sub_slice(self, offset, len)
            }
        }
    )*};
}
bytes_read_at!([u8], Vec<u8>);

/// `ReadAt` for pointers to a source (`&T`, `Arc<T>`, `Box<T>`): every method
/// forwards to the pointee, so overridden defaults keep working through them.
macro_rules! forward_read_at {
    ($($ptr:ty),*) => {$(
        impl<T: ReadAt + ?Sized> ReadAt for $ptr {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
                (**self).read_at(buf, offset)
            }
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn slice_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
                (**self).slice_at(offset, len)
            }
            fn local_file(&self) -> Option<(&File, u64)> {
                (**self).local_file()
            }
            fn will_need(&self, offset: u64, len: u64) {
                (**self).will_need(offset, len)
            }
            fn stored_extent(&self, offset: u64, len: u64) -> (u64, u64) {
                (**self).stored_extent(offset, len)
            }
            fn will_need_stored(&self, offset: u64, len: u64) {
                (**self).will_need_stored(offset, len)
            }
            fn invalidate(&self, offset: u64, len: u64) -> bool {
                (**self).invalidate(offset, len)
            }
        }
    )*};
}
forward_read_at!(&T, Arc<T>, Box<T>);

/// A window `[start, start + len)` of another source, addressed from 0.
#[derive(Debug, Clone)]
pub struct Window<R> {
    inner: R,
    start: u64,
    len: u64,
}

impl<R: ReadAt> Window<R> {
    /// A window of `inner`; `len` is clamped to what `inner` holds past `start`.
    pub fn new(inner: R, start: u64, len: u64) -> Self {
        let avail = inner.size().saturating_sub(start);
        Self {
            inner,
            start,
            len: len.min(avail),
        }
    }

    /// The wrapped source.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// Offset of the window inside the wrapped source.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl<R: ReadAt> ReadAt for Window<R> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (self.len - offset).min(buf.len() as u64) as usize;
        self.inner.read_at(&mut buf[..n], self.start + offset)
    }
    fn size(&self) -> u64 {
        self.len
    }
    fn slice_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        if offset.checked_add(len as u64)? > self.len {
            return None;
        }
        self.inner.slice_at(self.start + offset, len)
    }
    fn local_file(&self) -> Option<(&File, u64)> {
        self.inner
            .local_file()
            .map(|(f, base)| (f, base + self.start))
    }
    fn invalidate(&self, offset: u64, len: u64) -> bool {
        if offset >= self.len {
            return false;
        }
        let len = len.min(self.len - offset);
        self.inner.invalidate(self.start + offset, len)
    }
    fn will_need(&self, offset: u64, len: u64) {
        if offset < self.len {
            self.inner
                .will_need(self.start + offset, len.min(self.len - offset))
        }
    }
    fn stored_extent(&self, offset: u64, len: u64) -> (u64, u64) {
        let offset = offset.min(self.len);
        self.inner
            .stored_extent(self.start + offset, len.min(self.len - offset))
    }
    fn will_need_stored(&self, offset: u64, len: u64) {
        self.inner.will_need_stored(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records invalidations.
    struct Evicting(Mutex<Vec<(u64, u64)>>);

    impl ReadAt for Evicting {
        fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
            Ok(0)
        }
        fn size(&self) -> u64 {
            1000
        }
        fn invalidate(&self, offset: u64, len: u64) -> bool {
            self.0.lock().unwrap().push((offset, len));
            true
        }
    }

    #[test]
    fn invalidate_is_forwarded_and_offset_by_windows() {
        let inner = Arc::new(Evicting(Mutex::new(Vec::new())));
        let w = Window::new(Arc::clone(&inner), 512, 400);
        assert!(w.invalidate(10, 20));
        assert!(w.invalidate(390, 50), "clamped to the window");
        assert!(!w.invalidate(400, 1), "past the window");
        let boxed: Box<dyn ReadAt> = Box::new(&w);
        assert!(boxed.invalidate(0, 1));
        assert!(!data_invalidate());
        assert_eq!(
            *inner.0.lock().unwrap(),
            vec![(522, 20), (902, 10), (512, 1)]
        );
    }

    fn data_invalidate() -> bool {
        // Memory and file sources hold no cache: nothing to drop.
        vec![1u8, 2, 3].invalidate(0, 3)
    }

    #[test]
    fn window_clamps_and_offsets() {
        let data: Vec<u8> = (0..100u8).collect();
        let w = Window::new(&data, 90, 50);
        assert_eq!(w.size(), 10);
        let mut buf = [0u8; 4];
        assert_eq!(w.read_at(&mut buf, 2).unwrap(), 4);
        assert_eq!(buf, [92, 93, 94, 95]);
        assert_eq!(w.read_at(&mut buf, 10).unwrap(), 0);
        assert!(w.read_exact_at(&mut buf, 8).is_err());
        assert_eq!(w.slice_at(2, 3), Some(&[92u8, 93, 94][..]));
        assert_eq!(w.slice_at(8, 3), None);
        assert_eq!(w.slice_at(u64::MAX, 3), None);
        assert_eq!(data.slice_at(99, 1), Some(&[99u8][..]));
        assert_eq!(data.slice_at(99, 2), None);
        assert_eq!(data.slice_at(u64::MAX, 0), None);
    }
}
