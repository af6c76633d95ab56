//! Data-file helpers: hole checks, hole punching, writeback hints.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Checks that every run of present blocks is allocated in `file` (no hole
/// where the bitmap claims data, e.g. a data file truncated or replaced behind
/// our back). Filesystems without `SEEK_DATA` pass.
pub(super) fn runs_allocated(file: &File, present: &[u64], bs: u64, size: u64) -> bool {
    let blocks = size.div_ceil(bs);
    let get = |i: u64| present[(i / 64) as usize] & (1 << (i % 64)) != 0;
    let mut i = 0;
    while i < blocks {
        if !get(i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < blocks && get(j) {
            j += 1;
        }
        let (start, end) = (i * bs, (j * bs).min(size));
        match seek(file, start, libc::SEEK_DATA) {
            Ok(d) if d != start => return false,
            Ok(_) => {
                if seek(file, start, libc::SEEK_HOLE).is_ok_and(|h| h < end) {
                    return false;
                }
            }
            // No data at or after `start`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return false,
            // Not supported here: cannot check.
            Err(_) => return true,
        }
        i = j;
    }
    true
}

/// `lseek(file, off, whence)`.
fn seek(file: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    let off =
        libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek receives a file descriptor that `file` keeps open for the
    // whole call and plain integers; no memory is passed. The shared file
    // offset it moves is never used (all our I/O is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Releases the disk space of `[off, off + len)` of `file`, keeping its size.
/// Best effort: the cleared presence bit already makes the range a miss.
#[cfg(target_os = "linux")]
pub(super) fn punch_hole(file: &File, off: u64, len: u64) {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate receives a file descriptor that `file` keeps open for
    // the whole call, plain integer flags and a range; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    let _ = r;
}

/// Starts asynchronous writeback of a file range (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`: no wait, no durability promise). Best effort.
#[cfg(target_os = "linux")]
pub(super) fn start_writeback(file: &File, off: u64, len: u64) {
    let (Ok(o), Ok(l)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range receives a file descriptor that `file` keeps open
    // for the whole call, a range and plain flags; no memory is passed.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE) };
    let _ = r;
}

#[cfg(not(target_os = "linux"))]
pub(super) fn start_writeback(_file: &File, _off: u64, _len: u64) {}

#[cfg(not(target_os = "linux"))]
pub(super) fn punch_hole(file: &File, off: u64, len: u64) {
    let _ = file.write_all_at(&vec![0u8; len as usize], off);
}
