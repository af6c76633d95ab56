//! Page-cache warm lists: the file ranges a recorded start had in the page
//! cache, read again through the mounted filesystem when the image's device
//! comes up, so the container finds them cached.
//!
//! A block trace (and the working set it replays) brings the bytes to the
//! node, but a container that starts on them still reads every page through
//! the filesystem, the loop device and the FUSE worker for the first time.
//! The warm list names those pages by file, so the snapshotter can fault them
//! into the filesystem's page cache while containerd and runc set up the
//! container. It travels in the acceleration layer's tar beside `trace`, as
//! [`WARM_FILE`]; upstream overlaybd reads only `trace` and ignores it.
//!
//! - [`WarmList`]: the JSON file (`{"version":1,"files":[{"path":…,
//!   "ranges":[[offset,length],…]},…]}`), parsed with bounds.
//! - [`OpenWatch`]: records it: fanotify open events on the recording rootfs,
//!   then each opened file's resident pages (`mincore`) and where they lie on
//!   the disk (`FIEMAP`) when the run ends.
//! - [`order_by_first_read`]: puts the ranges in the order the start first
//!   read their disk blocks (the working set's order), so the warm follows the
//!   trace replay's fetches instead of running ahead of them.
//! - [`warm`]: reads a list's ranges under a mount point in order, with a
//!   few threads and no readahead past them, each file opened with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_XDEV)` so that no path leaves the
//!   image's filesystem. A path may appear more than once (ranges of files
//!   interleave in first-read order).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The warm list's name in the acceleration layer (beside `trace`).
pub const WARM_FILE: &str = "obd-warm.json";
/// Largest warm list read or written.
pub const MAX_WARM_LIST: u64 = 4 << 20;
/// Most files a list names (and a recording keeps open).
pub const MAX_WARM_FILES: usize = 65_536;
/// Most ranges a list holds in all.
pub const MAX_WARM_RANGES: usize = 1 << 20;
/// Most bytes a list's ranges may cover in all.
pub const MAX_WARM_BYTES: u64 = 4 << 30;
/// The list's format version.
pub const WARM_VERSION: u32 = 1;

/// The files and byte ranges to bring into the page cache, in first-open
/// order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmList {
    /// [`WARM_VERSION`].
    pub version: u32,
    /// The files.
    pub files: Vec<WarmFile>,
}

/// One file of a [`WarmList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmFile {
    /// Relative to the filesystem's root, without `.`/`..` components.
    pub path: String,
    /// `(offset, length)` byte ranges, each non-empty.
    pub ranges: Vec<(u64, u64)>,
}

fn bad(detail: impl Into<String>) -> Error {
    Error::WarmList(detail.into())
}

impl WarmList {
    /// An empty list.
    pub fn new(files: Vec<WarmFile>) -> Self {
        WarmList {
            version: WARM_VERSION,
            files,
        }
    }

    /// Parses and checks a list.
    pub fn parse(data: &[u8]) -> Result<Self> {
        if data.len() as u64 > MAX_WARM_LIST {
            return Err(bad(format!(
                "{} bytes, more than the {MAX_WARM_LIST}-byte cap",
                data.len()
            )));
        }
        let l: WarmList = serde_json::from_slice(data).map_err(|e| bad(e.to_string()))?;
        l.check()?;
        Ok(l)
    }

    /// Reads and parses the list at `path`.
    pub fn read_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let data =
            overlaybd_core::regular::read(path, MAX_WARM_LIST, "warm list").map_err(Error::File)?;
        Self::parse(&data).map_err(|e| e.in_file(path))
    }

    /// The list as written to [`WARM_FILE`].
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a warm list serializes")
    }

    /// Distinct paths (an entry's path may come again later).
    pub fn distinct_files(&self) -> usize {
        self.files
            .iter()
            .map(|f| f.path.as_str())
            .collect::<HashSet<_>>()
            .len()
    }

    /// Bytes the ranges cover.
    pub fn bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.ranges.iter())
            .map(|r| r.1)
            .sum()
    }

    fn check(&self) -> Result<()> {
        if self.version != WARM_VERSION {
            return Err(bad(format!(
                "version {}, expected {WARM_VERSION}",
                self.version
            )));
        }
        if self.files.len() > MAX_WARM_FILES {
            return Err(bad(format!(
                "{} files, more than {MAX_WARM_FILES}",
                self.files.len()
            )));
        }
        let (mut ranges, mut total) = (0usize, 0u64);
        for (i, f) in self.files.iter().enumerate() {
            check_path(&f.path).map_err(|d| bad(format!("files[{i}].path {:?}: {d}", f.path)))?;
            ranges += f.ranges.len();
            if ranges > MAX_WARM_RANGES {
                return Err(bad(format!("more than {MAX_WARM_RANGES} ranges")));
            }
            for (j, &(off, len)) in f.ranges.iter().enumerate() {
                if len == 0 || off.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
                    return Err(bad(format!(
                        "files[{i}].ranges[{j}]: ({off}, {len}) is empty or ends past 2^63"
                    )));
                }
                total = total.saturating_add(len);
                if total > MAX_WARM_BYTES {
                    return Err(bad(format!(
                        "files[{i}].ranges[{j}]: the ranges cover more than {MAX_WARM_BYTES} bytes"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Why `p` cannot name a file under the root, if it cannot.
fn check_path(p: &str) -> std::result::Result<(), &'static str> {
    if p.is_empty() || p.len() > 4096 {
        return Err("empty or longer than 4096 bytes");
    }
    if p.contains('\0') {
        return Err("holds a NUL");
    }
    let mut n = 0;
    for c in Path::new(p).components() {
        match c {
            Component::Normal(_) => n += 1,
            _ => return Err("not a plain relative path"),
        }
    }
    if n == 0 {
        return Err("names no file");
    }
    Ok(())
}

/// What a [`warm`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WarmReport {
    /// Distinct files read.
    pub files: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Bytes of the list already in the page cache, not read again.
    pub resident: u64,
    /// Files that could not be opened or read (missing, not regular, I/O
    /// errors): skipped.
    pub skipped: usize,
    /// Whether `stop` ended it early.
    pub stopped: bool,
    /// How long it took.
    pub elapsed: Duration,
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` under the directory `root` (an fd) for reading, resolving
/// every component inside `root` and on its filesystem.
fn open_in_root(root: &File, path: &str) -> std::io::Result<File> {
    let c = CString::new(path).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOATIME | libc::O_NOCTTY) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_XDEV | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `c` is a NUL-terminated string and `how` a live `open_how` of the
    // size passed; the kernel reads both during the call only. The returned fd,
    // if any, is owned by nobody else.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat2 and is not owned elsewhere.
    Ok(unsafe { File::from_raw_fd(fd as RawFd) })
}

/// Threads a [`warm`] reads with.
pub const WARM_THREADS: usize = 2;
/// Largest read a [`warm`] makes. With [`WARM_THREADS`] it keeps as many
/// bytes in flight as the trace replay does (`[prefetch]`: 2 × 512 KiB), so
/// the warm, which follows the replay's order, does not run ahead of it and
/// fetch the working set's later blocks in the foreground (with 4 × 1 MiB a
/// 100 Mbit/s Java start made 10 such requests, 2.6 MiB out of order).
const WARM_CHUNK: u64 = 512 << 10;

/// Reads the ranges of `list` under the directory `root` (the image's mount
/// point) so they land in its page cache: in list order, cut in reads of at
/// most 512 KiB taken in order by [`WARM_THREADS`] threads, each file
/// with `POSIX_FADV_RANDOM` (no readahead past the ranges). A piece whose
/// pages are all in the page cache already is not read (`mincore`), so a
/// warm of a warm cache costs a few system calls per piece. A file that
/// cannot be opened or read is skipped. Checks `stop` before every read.
pub fn warm(root: &Path, list: &WarmList, stop: &AtomicBool) -> Result<WarmReport> {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    let t = Instant::now();
    let dir = File::open(root).map_err(|e| Error::io(root, e))?;
    // (entry, offset, length) in order.
    let mut chunks = Vec::new();
    for (i, f) in list.files.iter().enumerate() {
        for &(off, len) in &f.ranges {
            let end = off.saturating_add(len);
            let mut at = off;
            while at < end {
                let n = (end - at).min(WARM_CHUNK);
                chunks.push((i, at, n));
                at += n;
            }
        }
    }
    let next = AtomicUsize::new(0);
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let resident = std::sync::atomic::AtomicU64::new(0);
    // Entries that failed, and the paths that did.
    let failed: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let stopped = AtomicBool::new(false);
    std::thread::scope(|sc| {
        for _ in 0..WARM_THREADS.min(chunks.len()) {
            sc.spawn(|| {
                let mut open: Option<(usize, File)> = None;
                let mut buf = vec![0u8; WARM_CHUNK as usize];
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, off, len)) = chunks.get(k) else {
                        return;
                    };
                    if stop.load(Ordering::Relaxed) {
                        stopped.store(true, Ordering::Relaxed);
                        return;
                    }
                    let path = &list.files[i].path;
                    if failed.lock().is_ok_and(|f| f.contains(path)) {
                        continue;
                    }
                    if open
                        .as_ref()
                        .is_none_or(|(j, _)| list.files[*j].path != *path)
                    {
                        open = match open_in_root(&dir, path) {
                            Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => {
                                // SAFETY: plain syscall on an fd we own.
                                unsafe {
                                    libc::posix_fadvise(
                                        f.as_raw_fd(),
                                        0,
                                        0,
                                        libc::POSIX_FADV_RANDOM,
                                    )
                                };
                                Some((i, f))
                            }
                            _ => None,
                        };
                    }
                    let Some((_, f)) = &open else {
                        if let Ok(mut s) = failed.lock() {
                            s.insert(path.clone());
                        }
                        continue;
                    };
                    if all_resident(f, off, len) {
                        resident.fetch_add(len, Ordering::Relaxed);
                        continue;
                    }
                    let mut at = 0u64;
                    while at < len {
                        match f.read_at(&mut buf[at as usize..len as usize], off + at) {
                            Ok(0) => break,
                            Ok(n) => at += n as u64,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => {
                                if let Ok(mut s) = failed.lock() {
                                    s.insert(path.clone());
                                }
                                break;
                            }
                        }
                    }
                    bytes.fetch_add(at, Ordering::Relaxed);
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap_or_default();
    let paths: HashSet<&str> = list.files.iter().map(|f| f.path.as_str()).collect();
    Ok(WarmReport {
        files: paths.len() - failed.len(),
        bytes: bytes.into_inner(),
        resident: resident.into_inner(),
        skipped: failed.len(),
        stopped: stopped.into_inner(),
        elapsed: t.elapsed(),
    })
}

/// The warm list of the files a container opened (`opened`, from
/// [`OpenWatch::finish`], first open first), each with the ranges it had
/// in the page cache when the watch ended: what a later container of the
/// same image is likely to read. Cut at the list's bounds
/// ([`MAX_WARM_RANGES`], [`MAX_WARM_BYTES`]; the watch keeps at most
/// [`MAX_WARM_FILES`] files).
pub fn opened_list(opened: Vec<Opened>) -> WarmList {
    let (mut files, mut ranges, mut bytes) = (Vec::new(), 0usize, 0u64);
    for o in opened.into_iter().take(MAX_WARM_FILES) {
        let mut keep = Vec::new();
        let mut full = false;
        for r in o.file.ranges {
            full = ranges == MAX_WARM_RANGES || bytes.saturating_add(r.1) > MAX_WARM_BYTES;
            if full {
                break;
            }
            ranges += 1;
            bytes += r.1;
            keep.push(r);
        }
        if !keep.is_empty() {
            files.push(WarmFile {
                path: o.file.path,
                ranges: keep,
            });
        }
        if full {
            break;
        }
    }
    WarmList::new(files)
}

/// The system's page size in bytes.
fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    page.max(4096) as u64
}

/// One byte per page of `len` bytes at `off` (a multiple of the page size)
/// of the open regular file `f`, bit 0 set when the page is in the page
/// cache: `mincore` over a mapping made for the call. Pages past the file's
/// end make it fail (ENOMEM).
fn page_residency(f: &File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let l = usize::try_from(len).map_err(|_| invalid())?;
    let o = libc::off_t::try_from(off).map_err(|_| invalid())?;
    let page = page_size();
    if l == 0 || off % page != 0 {
        return Err(invalid());
    }
    // SAFETY: a fresh shared read-only mapping of `l` bytes of `f` at a
    // page-aligned offset; only passed to mincore (never dereferenced) and
    // unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            l,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            o,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut vec = vec![0u8; l.div_ceil(page as usize)];
    // SAFETY: `addr..addr+l` is the mapping made above; `vec` has one byte
    // per page of it, as mincore writes.
    let rc = unsafe { libc::mincore(addr, l, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above, which nothing else uses.
    unsafe { libc::munmap(addr, l) };
    match rc {
        0 => Ok(vec),
        _ => Err(err),
    }
}

/// Whether every page of `len` bytes at `off` (a multiple of the page size)
/// of the open regular file `f` is in the page cache. False when it cannot
/// tell (the piece is then read).
fn all_resident(f: &File, off: u64, len: u64) -> bool {
    page_residency(f, off, len).is_ok_and(|v| v.iter().all(|b| b & 1 == 1))
}

/// Resident page ranges of an open regular file of `size` bytes, as
/// `(offset, length)`, clipped to the size.
fn resident_ranges(fd: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    if size == 0 {
        return Ok(Vec::new());
    }
    let vec = page_residency(fd, 0, size)?;
    let page = page_size() as usize;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, v) in vec.iter().enumerate() {
        if v & 1 == 0 {
            continue;
        }
        let off = (i * page) as u64;
        let l = (page as u64).min(size - off);
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += l,
            _ => out.push((off, l)),
        }
    }
    Ok(out)
}

/// `FS_IOC_FIEMAP` (`_IOWR('f', 11, struct fiemap)`).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `FIEMAP_EXTENT_LAST`.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Flags of extents whose `fe_physical` is no disk offset: unknown,
/// delayed allocation, encoded, inline data, not aligned.
const FIEMAP_EXTENT_NO_DISK: u32 = 0x2 | 0x4 | 0x8 | 0x200 | 0x100;
/// Most extents taken of one file.
const MAX_EXTENTS: usize = 1 << 16;

/// A file's mapping to the disk: `(logical, physical, length)` in bytes.
pub type Extent = (u64, u64, u64);

/// The extents of an open file (`FIEMAP`), in logical order; those not on
/// the disk left out.
fn file_extents(f: &File) -> std::io::Result<Vec<Extent>> {
    const HDR: usize = 32;
    const EXT: usize = 56;
    const N: usize = 256;
    let mut out = Vec::new();
    let mut start = 0u64;
    // u64 words: the kernel's structs are 8-byte aligned.
    let mut buf = vec![0u64; (HDR + N * EXT) / 8];
    loop {
        buf.iter_mut().for_each(|w| *w = 0);
        buf[0] = start; // fm_start
        buf[1] = u64::MAX - start; // fm_length
                                   // fm_flags = 0, fm_mapped_extents = 0 (word 2); fm_extent_count (word 3, low half).
        buf[3] = N as u64;
        // SAFETY: `buf` is a `struct fiemap` header followed by room for N
        // extents, as fm_extent_count says; the kernel writes inside it.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mapped = (buf[2] >> 32) as usize;
        if mapped == 0 {
            return Ok(out);
        }
        let mut last = false;
        for k in 0..mapped.min(N) {
            let w = (HDR + k * EXT) / 8;
            let (logical, physical, length) = (buf[w], buf[w + 1], buf[w + 2]);
            let flags = buf[w + 5] as u32;
            if flags & FIEMAP_EXTENT_NO_DISK == 0 && length > 0 {
                out.push((logical, physical, length));
            }
            last = flags & FIEMAP_EXTENT_LAST != 0;
            start = logical.saturating_add(length);
        }
        if last || out.len() >= MAX_EXTENTS || start == u64::MAX {
            return Ok(out);
        }
    }
}

/// A file a recording saw opened: its resident ranges and where its bytes
/// lie on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The path and resident ranges.
    pub file: WarmFile,
    /// `FIEMAP` extents (empty when the filesystem gives none).
    pub extents: Vec<Extent>,
}

/// The warm list of `opened` in the order a start first read the disk:
/// `disk_order` is the working set's extents `(offset, length)` in
/// first-read order (`pack::WorkingSet::extents`). Each range is cut where
/// its disk blocks change rank; the pieces go in rank order, and a file's
/// adjacent pieces are one entry again. Pieces on no working-set extent are
/// left out: reading them would fetch blocks the replay does not bring
/// (pages that came without a traced read), and holes or inline data need
/// no warming.
pub fn order_by_first_read(opened: &[Opened], disk_order: &[(u64, u64)]) -> WarmList {
    // Ranked disk intervals sorted by start: (start, end, rank).
    let mut ranked: Vec<(u64, u64, usize)> = disk_order
        .iter()
        .enumerate()
        .map(|(r, &(o, l))| (o, o.saturating_add(l), r))
        .collect();
    ranked.sort_unstable();
    // Pieces: (rank, sequence, file, offset, length).
    let mut pieces: Vec<(usize, usize, usize, u64, u64)> = Vec::new();
    let mut push = |rank: usize, file: usize, off: u64, len: u64| {
        let seq = pieces.len();
        pieces.push((rank, seq, file, off, len));
    };
    for (fi, o) in opened.iter().enumerate() {
        for &(off, len) in &o.file.ranges {
            let end = off.saturating_add(len);
            let mut at = off;
            while at < end {
                // The extent holding `at`, or the distance to the next one.
                let ext = o
                    .extents
                    .iter()
                    .find(|e| e.0 <= at && at < e.0.saturating_add(e.2));
                let Some(&(lo, phys, elen)) = ext else {
                    let next = o
                        .extents
                        .iter()
                        .map(|e| e.0)
                        .filter(|&s| s > at)
                        .min()
                        .unwrap_or(end)
                        .min(end);
                    push(usize::MAX, fi, at, next - at);
                    at = next;
                    continue;
                };
                let piece_end = end.min(lo.saturating_add(elen));
                // Walk the disk span [p, p + n) through the ranked intervals.
                let p = phys + (at - lo);
                let n = piece_end - at;
                let mut d = p;
                while d < p + n {
                    let i = ranked.partition_point(|r| r.1 <= d);
                    let (rank, until) = match ranked.get(i) {
                        Some(&(s, e, r)) if s <= d => (r, e.min(p + n)),
                        Some(&(s, _, _)) => (usize::MAX, s.min(p + n)),
                        None => (usize::MAX, p + n),
                    };
                    push(rank, fi, at + (d - p), until - d);
                    d = until;
                }
                at = piece_end;
            }
        }
    }
    pieces.retain(|p| p.0 != usize::MAX);
    pieces.sort_unstable_by_key(|p| (p.0, p.1));
    let mut files: Vec<WarmFile> = Vec::new();
    let mut last: Option<usize> = None;
    for (_, _, fi, off, len) in pieces {
        if last == Some(fi) {
            let f = files.last_mut().expect("an entry");
            match f.ranges.last_mut() {
                Some(r) if r.0 + r.1 == off => r.1 += len,
                _ => f.ranges.push((off, len)),
            }
        } else {
            files.push(WarmFile {
                path: opened[fi].file.path.clone(),
                ranges: vec![(off, len)],
            });
            last = Some(fi);
        }
    }
    WarmList::new(files)
}

/// The path of an open fd, relative to `root` (the recording rootfs as the
/// recorder mounted it) or to the root of the container's mount namespace.
fn relative_path(fd: RawFd, root: &Path) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let rel = match link.strip_prefix(root) {
        Ok(r) => r.to_path_buf(),
        Err(_) => link.strip_prefix("/").ok()?.to_path_buf(),
    };
    let s = rel.to_str()?.to_string();
    check_path(&s).ok()?;
    Some(s)
}

/// Records the files opened under a mounted rootfs (fanotify `FAN_OPEN` on
/// its whole filesystem, so the container's own bind of it counts too) and,
/// at [`OpenWatch::finish`], the page ranges each has in the page cache.
pub struct OpenWatch {
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<Vec<Seen>>>,
}

fn errno_result(rc: libc::c_int, what: &str, path: &Path) -> Result<libc::c_int> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(
            path,
            std::io::Error::new(e.kind(), format!("{what}: {e}")),
        ));
    }
    Ok(rc)
}

impl OpenWatch {
    /// Starts watching the filesystem mounted at `root` (needs
    /// `CAP_SYS_ADMIN`), noting up to [`MAX_WARM_FILES`] files.
    pub fn start(root: &Path) -> Result<Self> {
        Self::start_capped(root, MAX_WARM_FILES)
    }

    /// [`OpenWatch::start`] noting at most `max_files` files: the first
    /// ones opened.
    pub fn start_capped(root: &Path, max_files: usize) -> Result<Self> {
        let max_files = max_files.min(MAX_WARM_FILES);
        let root = root.canonicalize().map_err(|e| Error::io(root, e))?;
        // SAFETY: plain syscall; the returned fd is owned below.
        let fan = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC | libc::O_NOATIME) as u32,
            )
        };
        let fan = errno_result(fan, "fanotify_init", &root)?;
        // SAFETY: `fan` was just returned by fanotify_init and is owned by no one else.
        let fan = unsafe { OwnedFd::from_raw_fd(fan) };
        let c = CString::new(root.as_os_str().as_bytes())
            .map_err(|_| Error::io(&root, std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: `c` is NUL-terminated and outlives the call.
        let rc = unsafe {
            libc::fanotify_mark(
                fan.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                libc::FAN_OPEN,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        errno_result(rc, "fanotify_mark", &root)?;
        // SAFETY: plain syscall; the returned fd is owned below.
        let ev = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        let ev = errno_result(ev, "eventfd", &root)?;
        // SAFETY: `ev` was just returned by eventfd and is owned by no one else.
        let stop = unsafe { OwnedFd::from_raw_fd(ev) };
        let stop_fd = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("warm-watch".into())
            .spawn({
                let root = root.clone();
                move || watch_loop(fan, stop_fd, max_files, &root)
            })
            .map_err(|e| Error::io(&root, e))?;
        Ok(OpenWatch {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops watching and returns the warm list: each file of the image
    /// opened (first open first) with the ranges it has in the page cache
    /// now, files with none left out. `image` is the image's own filesystem
    /// (the rootfs's lower directory): a file counts only if the same path
    /// there is the same inode, so files the run wrote (in the upper
    /// directory) are left out. Call it after the workload ends and before
    /// the rootfs is unmounted.
    pub fn finish(mut self, image: &Path) -> Result<Vec<Opened>> {
        let seen = self.join();
        let dir = File::open(image).map_err(|e| Error::io(image, e))?;
        let mut out = Vec::new();
        for s in seen {
            // The path must lead to this very file in the image.
            let Ok(f) = open_in_root(&dir, &s.path) else {
                continue;
            };
            match f.metadata() {
                Ok(m) if m.is_file() && m.ino() == s.ino && m.len() == s.len => {}
                _ => continue,
            }
            let (path, len) = (s.path, s.len);
            let ranges = resident_ranges(&f, len).unwrap_or_default();
            if !ranges.is_empty() {
                out.push(Opened {
                    file: WarmFile { path, ranges },
                    extents: file_extents(&f).unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    fn join(&mut self) -> Vec<Seen> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd this watch owns.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

/// A regular file an [`OpenWatch`] saw opened: its path under the watched
/// root, inode number and size then.
struct Seen {
    path: String,
    ino: u64,
    len: u64,
}

/// Reads fanotify events until `stop` is signalled (then drains what is
/// queued); notes each regular file once, in first-open order, up to
/// `max_files`. Each event's descriptor is closed at once: a watch holds no
/// file open, so it keeps no mount of the filesystem busy.
fn watch_loop(fan: OwnedFd, stop: RawFd, max_files: usize, root: &Path) -> Vec<Seen> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut files = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
    let mut stopping = false;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: fan.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if !stopping {
            // SAFETY: `fds` is a live array of two pollfd.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return files;
            }
            if fds[1].revents != 0 {
                stopping = true;
            }
        }
        // SAFETY: reads into `buf`, a live buffer of `buf.len()` bytes.
        let n = unsafe {
            libc::read(
                fan.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if n <= 0 {
            if stopping {
                return files;
            }
            continue;
        }
        let mut at = 0usize;
        let n = n as usize;
        while at + meta_len <= n {
            // SAFETY: `at + meta_len <= n` bytes of `buf` were written by the
            // kernel; read_unaligned copes with any alignment.
            let m: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr() as *const _) };
            if (m.event_len as usize) < meta_len {
                break;
            }
            at += m.event_len as usize;
            if m.fd < 0 {
                continue;
            }
            // SAFETY: fanotify opened `m.fd` for us; we own it from here
            // (closed at the end of this iteration).
            let f = unsafe { File::from_raw_fd(m.fd) };
            if files.len() >= max_files {
                continue;
            }
            let Ok(md) = f.metadata() else { continue };
            if !md.is_file() || !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            if let Some(path) = relative_path(f.as_raw_fd(), root) {
                files.push(Seen {
                    path,
                    ino: md.ino(),
                    len: md.len(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(files: Vec<(&str, Vec<(u64, u64)>)>) -> WarmList {
        WarmList::new(
            files
                .into_iter()
                .map(|(p, r)| WarmFile {
                    path: p.into(),
                    ranges: r,
                })
                .collect(),
        )
    }

    #[test]
    fn round_trip_and_bounds() {
        let l = list(vec![("usr/lib/a.py", vec![(0, 4096), (8192, 100)])]);
        assert_eq!(WarmList::parse(&l.to_bytes()).unwrap(), l);
        assert_eq!(l.bytes(), 4196);
        for (bad_list, what) in [
            (list(vec![("/etc/passwd", vec![(0, 1)])]), "plain relative"),
            (list(vec![("a/../../x", vec![(0, 1)])]), "plain relative"),
            (list(vec![("", vec![(0, 1)])]), "empty"),
            (list(vec![("a", vec![(0, 0)])]), "empty or ends"),
            (list(vec![("a", vec![(u64::MAX, 2)])]), "empty or ends"),
            (
                list(vec![("a", vec![(0, 3 << 30), (0, 3 << 30)])]),
                "more than",
            ),
        ] {
            let e = WarmList::parse(&bad_list.to_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{e}");
            assert!(e.contains("warm list"), "{e}");
        }
        let e = WarmList::parse(br#"{"version":2,"files":[]}"#).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        assert!(WarmList::parse(b"{").is_err());
        let e = WarmList::parse(&vec![b' '; MAX_WARM_LIST as usize + 1]).unwrap_err();
        assert!(e.to_string().contains("cap"), "{e}");
    }

    #[test]
    fn opened_list_keeps_open_order_and_the_bounds() {
        let o = |p: &str, r: Vec<(u64, u64)>| opened(p, r, Vec::new());
        let l = opened_list(vec![
            o("usr/bin/python3", vec![(0, 8192), (65536, 4096)]),
            o("usr/lib/a.py", vec![(0, 4096)]),
        ]);
        assert_eq!(
            l.files
                .iter()
                .map(|f| (f.path.as_str(), f.ranges.clone()))
                .collect::<Vec<_>>(),
            vec![
                ("usr/bin/python3", vec![(0, 8192), (65536, 4096)]),
                ("usr/lib/a.py", vec![(0, 4096)]),
            ]
        );
        assert!(WarmList::parse(&l.to_bytes()).is_ok());
        // The byte bound cuts the list where it is reached.
        let big = MAX_WARM_BYTES / 2 + 1;
        let l = opened_list(vec![
            o("a", vec![(0, big)]),
            o("b", vec![(0, 4096), (big, big)]),
            o("c", vec![(0, 4096)]),
        ]);
        assert_eq!(l.files.len(), 2);
        assert_eq!(l.files[1].ranges, vec![(0, 4096)]);
        assert!(l.bytes() <= MAX_WARM_BYTES);
        assert!(WarmList::parse(&l.to_bytes()).is_ok());
    }

    #[test]
    fn warm_reads_ranges_and_stays_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("usr")).unwrap();
        std::fs::write(root.join("usr/a"), vec![7u8; 10_000]).unwrap();
        let outside = d.path().join("secret");
        std::fs::write(&outside, vec![1u8; 5000]).unwrap();
        // An absolute symlink resolves inside the root (where it names nothing).
        std::os::unix::fs::symlink(&outside, root.join("usr/link")).unwrap();
        std::os::unix::fs::symlink("/usr/a", root.join("abs")).unwrap();
        let l = list(vec![
            ("usr/a", vec![(0, 4096), (9000, 5000)]),
            ("usr/link", vec![(0, 5000)]),
            ("missing", vec![(0, 1)]),
            ("abs", vec![(0, 10)]),
        ]);
        let r = warm(&root, &l, &AtomicBool::new(false)).unwrap();
        // 4096 + the 1000 bytes before EOF; `abs` resolves to /usr/a in the
        // root. Pages the write left in the page cache are not read again.
        assert_eq!(
            (r.files, r.bytes + r.resident, r.skipped),
            (2, 4096 + 1000 + 10, 2)
        );
        // Now all of it is cached: only the piece at an offset that is no
        // page boundary (9000) is read again.
        let r = warm(&root, &l, &AtomicBool::new(false)).unwrap();
        assert_eq!((r.bytes, r.resident), (1000, 4096 + 10));
        // Evicted (clean pages of a file system that drops them on advice;
        // tmpfs keeps them): read again.
        let f = File::open(root.join("usr/a")).unwrap();
        f.sync_all().unwrap();
        // SAFETY: plain syscall on an fd we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if !all_resident(&f, 0, 4096) {
            // (`abs` names the same page: read, or found just read.)
            let r = warm(&root, &l, &AtomicBool::new(false)).unwrap();
            assert_eq!(r.bytes + r.resident, 4096 + 1000 + 10);
            assert!(r.bytes >= 4096 + 1000, "{r:?}");
        }
        let r = warm(&root, &l, &AtomicBool::new(true)).unwrap();
        assert!(r.stopped);
        assert_eq!(r.bytes, 0);
    }

    #[test]
    fn open_watch_records_opened_files_of_the_image_with_their_cached_ranges() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED open_watch test: needs root (tmpfs mount, fanotify)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success());
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _u = Unmount(root.clone());
        std::fs::create_dir(root.join("lib")).unwrap();
        std::fs::write(root.join("lib/b"), vec![1u8; 9000]).unwrap();
        std::fs::write(root.join("a"), b"hello").unwrap();
        std::fs::create_dir(root.join("empty")).unwrap();
        std::fs::write(root.join("empty/z"), b"").unwrap();
        let w = OpenWatch::start(&root).unwrap();
        // Opened in this order, `lib/b` twice; a directory and an empty file too.
        for p in ["lib/b", "a", "lib/b", "empty", "empty/z"] {
            let _ = std::fs::File::open(root.join(p)).unwrap();
        }
        let image = d.path().join("image");
        std::fs::create_dir(&image).unwrap();
        let l = w.finish(&root).unwrap();
        assert_eq!(
            l.iter().map(|o| o.file.clone()).collect::<Vec<_>>(),
            vec![
                WarmFile {
                    path: "lib/b".into(),
                    ranges: vec![(0, 9000)]
                },
                WarmFile {
                    path: "a".into(),
                    ranges: vec![(0, 5)]
                },
            ]
        );
        // A file that is not the image's (here: the image is another tree)
        // is left out.
        let w = OpenWatch::start(&root).unwrap();
        let _ = std::fs::File::open(root.join("a")).unwrap();
        assert!(w.finish(&image).unwrap().is_empty());
    }

    fn opened(path: &str, ranges: Vec<(u64, u64)>, extents: Vec<Extent>) -> Opened {
        Opened {
            file: WarmFile {
                path: path.into(),
                ranges,
            },
            extents,
        }
    }

    #[test]
    fn ranges_go_in_the_order_their_disk_blocks_were_first_read() {
        let a = opened("a", vec![(0, 8192)], vec![(0, 100_000, 8192)]);
        // `b`'s second page lies on no extent (a hole or inline data).
        let b = opened("b", vec![(0, 8192)], vec![(0, 50_000, 4096)]);
        let c = opened("c", vec![(0, 10)], vec![]);
        let order = [(104_096, 4096), (50_000, 4096), (100_000, 4096)];
        let l = order_by_first_read(&[a.clone(), b, c], &order);
        let got: Vec<(&str, Vec<(u64, u64)>)> = l
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.ranges.clone()))
            .collect();
        // `b`'s hole and `c` (no extents) are not in the working set: left out.
        assert_eq!(
            got,
            [
                ("a", vec![(4096, 4096)]),
                ("b", vec![(0, 4096)]),
                ("a", vec![(0, 4096)]),
            ]
        );
        // Adjacent pieces of one file stay one range; nothing is lost.
        let l = order_by_first_read(&[a], &[(100_000, 8192)]);
        assert_eq!(l.files.len(), 1);
        assert_eq!(l.files[0].ranges, vec![(0, 8192)]);
        // A piece spanning part of a ranked extent and unranked disk is cut
        // to the ranked part.
        let d = opened("d", vec![(0, 8192)], vec![(0, 10_000, 8192)]);
        let l = order_by_first_read(&[d], &[(14_096, 100)]);
        assert_eq!(l.files.len(), 1);
        assert_eq!(l.files[0].ranges, vec![(4096, 100)]);
    }

    proptest::proptest! {
        /// Ordering keeps every byte of every file's ranges that lies on the
        /// working set exactly once, and no other.
        #[test]
        fn ordering_keeps_each_byte_once(
            files in proptest::collection::vec(
                (proptest::collection::vec((0u64..64, 1u64..16), 0..4),
                 proptest::collection::vec((0u64..64, 0u64..64, 1u64..32), 0..4)),
                1..4),
            order in proptest::collection::vec((0u64..128, 1u64..32), 0..6),
        ) {
            let opened: Vec<Opened> = files.iter().enumerate().map(|(i, (r, e))| {
                // Disjoint ranges and extents, as the recorder makes them.
                let mut at = 0;
                let ranges = r.iter().map(|&(gap, len)| { at += gap; let x = (at, len); at += len; x }).collect();
                let mut lat = 0;
                let extents = e.iter().map(|&(gap, phys, len)| { lat += gap; let x = (lat, phys * 7 + i as u64 * 1000, len); lat += len; x }).collect();
                opened(&format!("f{i}"), ranges, extents)
            }).collect();
            let mut d = 0;
            let order: Vec<(u64, u64)> = order.iter().map(|&(gap, len)| { d += gap; let x = (d, len); d += len; x }).collect();
            let l = order_by_first_read(&opened, &order);
            // A byte is kept iff its extent puts it on a working-set extent.
            let on_ws = |o: &Opened, b: u64| o.extents.iter().any(|&(l, p, n)| {
                l <= b && b < l + n && order.iter().any(|&(d, m)| d <= p + (b - l) && p + (b - l) < d + m)
            });
            for o in &opened {
                let mut want: Vec<u64> = o.file.ranges.iter().flat_map(|&(s, n)| s..s + n)
                    .filter(|&b| on_ws(o, b)).collect();
                let mut got: Vec<u64> = l.files.iter().filter(|f| f.path == o.file.path)
                    .flat_map(|f| f.ranges.iter().flat_map(|&(s, n)| s..s + n)).collect();
                want.sort_unstable();
                got.sort_unstable();
                proptest::prop_assert_eq!(got, want);
            }
            proptest::prop_assert!(l.files.iter().all(|f| f.ranges.iter().all(|r| r.1 > 0)));
        }
    }

    #[test]
    fn fiemap_maps_a_file_to_the_disk() {
        let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![5u8; 64 << 10]).unwrap();
        let f = File::open(&p).unwrap();
        f.sync_all().unwrap();
        match file_extents(&f) {
            Ok(e) => {
                assert!(!e.is_empty(), "a written, synced file has extents");
                assert_eq!(e.iter().map(|x| x.2).sum::<u64>(), 64 << 10);
                assert_eq!(e[0].0, 0);
            }
            Err(e) => eprintln!("SKIPPED fiemap test: the filesystem gives no FIEMAP ({e})"),
        }
    }

    #[test]
    fn resident_ranges_of_a_read_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![3u8; 3 * 4096 + 10]).unwrap();
        let f = File::open(&p).unwrap();
        // Just written: all of it is in the page cache, the tail clipped to the size.
        assert_eq!(
            resident_ranges(&f, 3 * 4096 + 10).unwrap(),
            vec![(0, 3 * 4096 + 10)]
        );
        assert!(resident_ranges(&f, 0).unwrap().is_empty());
    }
}
