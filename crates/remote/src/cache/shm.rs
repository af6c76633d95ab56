//! A file mapped shared into memory, read and written only through atomics,
//! so several processes can use it at once.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// `len` bytes of a file mapped `MAP_SHARED`, read and written only as
/// [`AtomicU64`] words (no `&[u8]` into memory other processes write).
#[derive(Debug)]
pub(super) struct Shared {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics
// (`AtomicU64` is Sync); the pointer is owned by this value and unmapped once,
// on drop.
unsafe impl Send for Shared {}
// SAFETY: as above: every access is an atomic operation on an aligned word.
unsafe impl Sync for Shared {}

impl Shared {
    /// Maps the first `len` bytes (a multiple of 8) of `file`, which must be at
    /// least that long and stay so while mapped (it is never truncated: files
    /// are replaced by unlinking).
    pub(super) fn map(file: &File, len: usize) -> io::Result<Self> {
        if len == 0 || len % 8 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad map length",
            ));
        }
        if file.metadata()?.len() < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file shorter than the {len} bytes to map"),
            ));
        }
        // SAFETY: mmap with a null hint, a length checked above against the
        // file's size, and a descriptor `file` keeps open for the call; the
        // result is checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The word at byte offset `off` (a multiple of 8 inside the mapping).
    pub(super) fn word(&self, off: usize) -> &AtomicU64 {
        assert!(
            off % 8 == 0 && off + 8 <= self.len,
            "word {off} outside the map"
        );
        // SAFETY: the mapping is page-aligned and `off` is a multiple of 8
        // inside it (checked above), so the address is a valid, aligned,
        // live (until drop) AtomicU64; other processes touch it only
        // atomically too.
        unsafe { &*self.ptr.add(off).cast::<AtomicU64>() }
    }

    /// Copies `n` bytes (a multiple of 8) at `off` out of the map.
    pub(super) fn read_bytes(&self, off: usize, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        for k in (0..n).step_by(8) {
            let w = self.word(off + k).load(Ordering::Acquire);
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Writes `b` (zero-padded to a multiple of 8) at `off`.
    pub(super) fn write_bytes(&self, off: usize, b: &[u8]) {
        for (k, chunk) in b.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.word(off + 8 * k)
                .store(u64::from_le_bytes(w), Ordering::Release);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and were never
        // unmapped; no reference into the mapping outlives `self` (every
        // borrow is tied to `&self`).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// `flock(file, op)`, retried on EINTR.
pub(super) fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock takes a descriptor `file` keeps open for the call and
        // plain flags; no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Holds an exclusive `flock` on a file until dropped.
pub(super) struct FlockGuard<'a>(&'a File);

impl<'a> FlockGuard<'a> {
    /// Waits for the exclusive lock.
    pub(super) fn exclusive(file: &'a File) -> io::Result<Self> {
        flock(file, libc::LOCK_EX)?;
        Ok(Self(file))
    }

    /// The exclusive lock if free now.
    pub(super) fn try_exclusive(file: &'a File) -> io::Result<Option<Self>> {
        match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(Self(file))),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for FlockGuard<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, libc::LOCK_UN);
    }
}

/// An open-file-description read lock on byte 0 of `file` ("in use"), held
/// until the file is closed. Independent of `flock`.
pub(super) fn hold_in_use(file: &File) -> io::Result<()> {
    ofd_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short).map(|_| ())
}

/// Releases [`hold_in_use`] (of this open file description).
pub(super) fn release_in_use(file: &File) -> io::Result<()> {
    ofd_lock(file, libc::F_OFD_SETLK, libc::F_UNLCK as libc::c_short).map(|_| ())
}

/// Whether any process holds [`hold_in_use`] on `file` (other than through
/// this open file description).
pub(super) fn in_use(file: &File) -> io::Result<bool> {
    ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short)
}

/// Takes (waiting, `F_OFD_SETLKW`) or releases (`unlock`) an
/// open-file-description write lock on bytes `[start, start + len)` of
/// `file`. The kernel releases it when the process dies.
pub(super) fn range_lock(file: &File, start: u64, len: u64, unlock: bool) -> io::Result<()> {
    let kind = if unlock { libc::F_UNLCK } else { libc::F_WRLCK };
    let cmd = if unlock {
        libc::F_OFD_SETLK
    } else {
        libc::F_OFD_SETLKW
    };
    loop {
        match ofd_lock_at(file, cmd, kind as libc::c_short, start, len) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(|_| ()),
        }
    }
}

fn ofd_lock(file: &File, cmd: libc::c_int, kind: libc::c_short) -> io::Result<bool> {
    ofd_lock_at(file, cmd, kind, 0, 1)
}

fn ofd_lock_at(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_short,
    start: u64,
    len: u64,
) -> io::Result<bool> {
    let bad = |_| io::Error::from(io::ErrorKind::InvalidInput);
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = libc::off_t::try_from(start).map_err(bad)?;
    fl.l_len = libc::off_t::try_from(len).map_err(bad)?;
    // SAFETY: fcntl receives a descriptor `file` keeps open for the call and
    // a pointer to `fl`, a live, initialised flock it may read and write.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), or zeros when it
/// cannot be read (then every restart counts as a reboot: safe).
pub(super) fn boot_id() -> [u8; 40] {
    let mut id = [0u8; 40];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let s = s.trim().as_bytes();
        let n = s.len().min(40);
        id[..n].copy_from_slice(&s[..n]);
    }
    id
}
