//! Our libext2fs `io_manager`: reads come from the image built so far (the
//! committed lower layers, then the current writable layer), writes go to the
//! current layer's [`WritableLayer`] through a bounded write-back page cache.
//!
//! When dirty pages are flushed, each is compared with what the stack below
//! already reads at that place and dropped if equal, so a layer holds exactly
//! its block delta: bitmaps, descriptors and inode-table blocks that libext2fs
//! rewrites unchanged cost nothing, and runs of changed pages are written as
//! one LSMT entry each.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_ulong, c_ulonglong, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use overlaybd_core::image::Image;
use overlaybd_core::lsmt::{WritableLayer, SECTOR};
use zfile::sync::MutexExt;

use crate::ffi::*;

/// Page size of the write-back cache and of the filesystem blocks.
pub const PAGE: u64 = 4096;

/// The block stack one filesystem handle reads and writes.
pub struct Backend {
    lower: Option<Arc<Image>>,
    upper: WritableLayer,
    size: u64,
    dirty: BTreeMap<u64, Box<[u8]>>,
    dirty_limit: usize,
    /// The first error seen by a callback, for the caller's message.
    pub last_error: Option<String>,
    /// Bytes written to the writable layer (after delta filtering).
    pub bytes_stored: u64,
}

impl Backend {
    /// A stack of `lower` (may be absent) under `upper`, `size` bytes long,
    /// caching up to `cache_bytes` of dirty pages.
    pub fn new(
        lower: Option<Arc<Image>>,
        upper: WritableLayer,
        size: u64,
        cache_bytes: usize,
    ) -> Backend {
        Backend {
            lower,
            upper,
            size,
            dirty: BTreeMap::new(),
            dirty_limit: (cache_bytes / PAGE as usize).max(16),
            last_error: None,
            bytes_stored: 0,
        }
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Flushes the cache and hands back the writable layer.
    pub fn into_upper(mut self) -> Result<WritableLayer, String> {
        self.flush()?;
        Ok(self.upper)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(format!(
                "access of {len} bytes at {offset} is past the device end {}",
                self.size
            )),
        }
    }

    /// Reads what the stack holds at page-aligned `offset`, ignoring the cache.
    fn read_stored(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        match &self.lower {
            Some(img) if offset < img.virtual_size() => {
                let n = buf.len().min((img.virtual_size() - offset) as usize);
                img.read_at(&mut buf[..n], offset)
                    .map_err(|e| format!("reading the lower layers at {offset}: {e}"))?;
                buf[n..].fill(0);
            }
            _ => buf.fill(0),
        }
        let from = offset / SECTOR;
        let to = (offset + buf.len() as u64).div_ceil(SECTOR);
        for seg in self.upper.lookup(from, to) {
            let s = (seg.offset * SECTOR - offset) as usize;
            let e = s + seg.length as usize * SECTOR as usize;
            self.upper
                .read_at(&mut buf[s..e], seg.offset * SECTOR)
                .map_err(|e| format!("reading the writable layer: {e}"))?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at any byte `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            if let Some(p) = self.dirty.get(&page) {
                let n = (PAGE as usize - in_page).min(buf.len() - done);
                buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]);
                done += n;
                continue;
            }
            // A run of clean pages, read in one go.
            let mut end_page = page + 1;
            let last_page = (offset + buf.len() as u64 - 1) / PAGE;
            while end_page <= last_page && !self.dirty.contains_key(&end_page) {
                end_page += 1;
            }
            let run_start = page * PAGE;
            let run_len = ((end_page - page) * PAGE) as usize;
            let want = (run_len - in_page).min(buf.len() - done);
            if in_page == 0 && want % PAGE as usize == 0 {
                self.read_stored(&mut buf[done..done + want], run_start)?;
            } else {
                let mut tmp = vec![0u8; run_len];
                self.read_stored(&mut tmp, run_start)?;
                buf[done..done + want].copy_from_slice(&tmp[in_page..in_page + want]);
            }
            done += want;
        }
        Ok(())
    }

    /// Writes `data` at any byte `offset` into the cache (read-modify-write
    /// for partial pages).
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<(), String> {
        self.check_range(offset, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            if !self.dirty.contains_key(&page) {
                let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
                if n != PAGE as usize {
                    self.read_stored(&mut p, page * PAGE)?;
                }
                self.dirty.insert(page, p);
            }
            let p = self.dirty.get_mut(&page).expect("inserted above");
            p[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        if self.dirty.len() > self.dirty_limit {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the changed dirty pages to the writable layer, in device order,
    /// one entry per run of adjacent changed pages.
    pub fn flush(&mut self) -> Result<(), String> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        let mut next = u64::MAX;
        let mut old = vec![0u8; PAGE as usize];
        for (page, data) in dirty {
            self.read_stored(&mut old, page * PAGE)?;
            if old[..] == data[..] {
                continue;
            }
            if page != next || run.len() >= 4 << 20 {
                self.write_run(&run, run_start)?;
                run.clear();
                run_start = page * PAGE;
            }
            run.extend_from_slice(&data);
            next = page + 1;
        }
        self.write_run(&run, run_start)
    }

    fn write_run(&mut self, run: &[u8], offset: u64) -> Result<(), String> {
        if run.is_empty() {
            return Ok(());
        }
        self.upper
            .write_at(run, offset)
            .map_err(|e| format!("writing the layer at {offset}: {e}"))?;
        self.bytes_stored += run.len() as u64;
        Ok(())
    }
}

/// Backends waiting for libext2fs to open them, by channel name.
fn registry() -> &'static Mutex<HashMap<String, Arc<Mutex<Backend>>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<Mutex<Backend>>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Registers `backend` under a fresh channel name for `ext2fs_open`/
/// `ext2fs_initialize`; the name is removed again when the channel opens.
pub(crate) fn register(backend: Arc<Mutex<Backend>>) -> CString {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let name = format!("obd-convert:{}", NEXT.fetch_add(1, Ordering::Relaxed));
    registry().locked().insert(name.clone(), backend);
    CString::new(name).expect("no NUL in the name")
}

/// Drops a registration that was never opened.
pub(crate) fn unregister(name: &CStr) {
    let key = name.to_string_lossy().into_owned();
    registry().locked().remove(&key);
}

/// What a channel's `private_data` points to.
struct Private {
    backend: Arc<Mutex<Backend>>,
}

/// The io_manager table handed to libext2fs.
pub(crate) static MANAGER: struct_io_manager = struct_io_manager {
    magic: EXT2_ET_MAGIC_IO_MANAGER,
    name: c"obd-convert I/O manager".as_ptr(),
    open: Some(io_open),
    close: Some(io_close),
    set_blksize: Some(io_set_blksize),
    read_blk: Some(io_read_blk),
    write_blk: Some(io_write_blk),
    flush: Some(io_flush),
    write_byte: Some(io_write_byte),
    set_option: Some(io_set_option),
    get_stats: None,
    read_blk64: Some(io_read_blk64),
    write_blk64: Some(io_write_blk64),
    discard: None,
    cache_readahead: None,
    zeroout: None,
    reserved: [0; 14],
};

/// Runs `f` on the channel's backend, converting failures and panics into an
/// ext2fs error code (nothing unwinds into C).
///
/// # Safety
/// `ch` must be a channel made by [`io_open`] and not yet closed.
unsafe fn with_backend(
    ch: io_channel,
    code: errcode_t,
    f: impl FnOnce(&mut Backend, c_int) -> Result<(), String>,
) -> errcode_t {
    // SAFETY: per the contract, `ch` is live and its private_data is the
    // `Private` box io_open leaked.
    let (private, bs) = unsafe { (&*((*ch).private_data as *const Private), (*ch).block_size) };
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut b = private.backend.locked();
        match f(&mut b, bs) {
            Ok(()) => 0,
            Err(e) => {
                if b.last_error.is_none() {
                    b.last_error = Some(e);
                }
                code
            }
        }
    }));
    r.unwrap_or(code)
}

/// Byte length of a request: a negative count is bytes, a positive one blocks.
fn request_len(count: c_int, block_size: c_int) -> Result<u64, String> {
    if count < 0 {
        Ok(count.unsigned_abs() as u64)
    } else if block_size <= 0 {
        Err(format!("bad block size {block_size}"))
    } else {
        Ok(count as u64 * block_size as u64)
    }
}

unsafe extern "C" fn io_open(
    name: *const c_char,
    _flags: c_int,
    out: *mut io_channel,
) -> errcode_t {
    if name.is_null() || out.is_null() {
        return EXT2_ET_INVALID_ARGUMENT;
    }
    // SAFETY: libext2fs passes the NUL-terminated name it was given.
    let cname = unsafe { CStr::from_ptr(name) }.to_owned();
    let key = cname.to_string_lossy().into_owned();
    let backend = match registry().locked().remove(&key) {
        Some(b) => b,
        None => return EXT2_ET_INVALID_ARGUMENT,
    };
    let private = Box::into_raw(Box::new(Private { backend }));
    let ch = Box::new(struct_io_channel {
        magic: EXT2_ET_MAGIC_IO_CHANNEL,
        manager: &MANAGER,
        name: cname.into_raw(),
        block_size: 1024,
        read_error: None,
        write_error: None,
        refcount: 1,
        flags: 0,
        reserved: [0; 14],
        private_data: private as *mut c_void,
        app_data: std::ptr::null_mut(),
        align: 0,
    });
    // SAFETY: `out` is a valid pointer to libext2fs's channel slot.
    unsafe { *out = Box::into_raw(ch) };
    0
}

unsafe extern "C" fn io_close(ch: io_channel) -> errcode_t {
    if ch.is_null() {
        return EXT2_ET_INVALID_ARGUMENT;
    }
    // SAFETY: `ch` is a live channel made by io_open.
    unsafe {
        (*ch).refcount -= 1;
        if (*ch).refcount > 0 {
            return 0;
        }
    }
    // SAFETY: as above; the flush only touches the backend.
    let rc = unsafe { with_backend(ch, EXT2_ET_SHORT_READ, |b, _| b.flush()) };
    // SAFETY: the last reference is gone: reclaim the boxes io_open leaked,
    // exactly once.
    unsafe {
        let ch = Box::from_raw(ch);
        drop(Box::from_raw(ch.private_data as *mut Private));
        drop(CString::from_raw(ch.name));
    }
    rc
}

unsafe extern "C" fn io_set_blksize(ch: io_channel, blksize: c_int) -> errcode_t {
    if blksize <= 0 {
        return EXT2_ET_INVALID_ARGUMENT;
    }
    // SAFETY: `ch` is a live channel made by io_open.
    unsafe { (*ch).block_size = blksize };
    0
}

unsafe extern "C" fn io_read_blk64(
    ch: io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *mut c_void,
) -> errcode_t {
    // SAFETY: `ch` is live; `data` has room for the requested length, as
    // libext2fs's contract for read_blk64 says.
    unsafe {
        with_backend(ch, EXT2_ET_SHORT_READ, |b, bs| {
            let len = request_len(count, bs)?;
            let off = block
                .checked_mul(bs as u64)
                .ok_or_else(|| format!("block {block} overflows"))?;
            let buf = std::slice::from_raw_parts_mut(data as *mut u8, len as usize);
            b.read(buf, off)
        })
    }
}

unsafe extern "C" fn io_write_blk64(
    ch: io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *const c_void,
) -> errcode_t {
    // SAFETY: `ch` is live; `data` holds the requested length.
    unsafe {
        with_backend(ch, EXT2_ET_SHORT_READ + 1, |b, bs| {
            let len = request_len(count, bs)?;
            let off = block
                .checked_mul(bs as u64)
                .ok_or_else(|| format!("block {block} overflows"))?;
            let buf = std::slice::from_raw_parts(data as *const u8, len as usize);
            b.write(buf, off)
        })
    }
}

unsafe extern "C" fn io_read_blk(
    ch: io_channel,
    block: c_ulong,
    count: c_int,
    data: *mut c_void,
) -> errcode_t {
    // SAFETY: same contract as read_blk64.
    unsafe { io_read_blk64(ch, block as c_ulonglong, count, data) }
}

unsafe extern "C" fn io_write_blk(
    ch: io_channel,
    block: c_ulong,
    count: c_int,
    data: *const c_void,
) -> errcode_t {
    // SAFETY: same contract as write_blk64.
    unsafe { io_write_blk64(ch, block as c_ulonglong, count, data) }
}

unsafe extern "C" fn io_write_byte(
    ch: io_channel,
    offset: c_ulong,
    count: c_int,
    data: *const c_void,
) -> errcode_t {
    if count < 0 {
        return EXT2_ET_INVALID_ARGUMENT;
    }
    // SAFETY: `ch` is live; `data` holds `count` bytes.
    unsafe {
        with_backend(ch, EXT2_ET_SHORT_READ + 1, |b, _| {
            let buf = std::slice::from_raw_parts(data as *const u8, count as usize);
            b.write(buf, offset)
        })
    }
}

unsafe extern "C" fn io_flush(ch: io_channel) -> errcode_t {
    // SAFETY: `ch` is live.
    unsafe { with_backend(ch, EXT2_ET_SHORT_READ + 1, |b, _| b.flush()) }
}

unsafe extern "C" fn io_set_option(
    _ch: io_channel,
    _option: *const c_char,
    _arg: *const c_char,
) -> errcode_t {
    EXT2_ET_INVALID_ARGUMENT
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlaybd_core::lsmt::CreateOptions;

    fn backend(dir: &std::path::Path) -> Backend {
        let w = WritableLayer::create(
            dir.join("d"),
            dir.join("i"),
            CreateOptions {
                virtual_size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        Backend::new(None, w, 1 << 20, 64 * 1024)
    }

    #[test]
    fn unchanged_pages_are_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(dir.path());
        b.write(&[0u8; 8192], 0).unwrap();
        b.write(&[7u8; 100], 5000).unwrap();
        b.flush().unwrap();
        assert_eq!(b.bytes_stored, 4096);
        let mut buf = [1u8; 10];
        b.read(&mut buf, 4999).unwrap();
        assert_eq!(buf, [0, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
        let w = b.into_upper().unwrap();
        assert_eq!(w.segment_count(), 1);
    }

    #[test]
    fn reads_see_dirty_then_stored_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(dir.path());
        b.write(&[3u8; 4096], 8192).unwrap();
        b.flush().unwrap();
        b.write(&[4u8; 10], 8192 + 4096).unwrap();
        let mut buf = vec![0u8; 3 * 4096];
        b.read(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(buf[4096..8192].iter().all(|&x| x == 3));
        assert!(buf[8192..8202].iter().all(|&x| x == 4));
        assert!(b.read(&mut buf, (1 << 20) - 10).is_err());
    }
}
