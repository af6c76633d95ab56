//! The shared presence map of one cached blob (`<stem>.map`), used by every
//! process at once through a shared mapping.
//!
//! Layout (little-endian, all fields 8-byte words):
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `OBDCMAP1` |
//! | 8 | version (1) |
//! | 16 | cache block size |
//! | 24 | blob size |
//! | 32..72 | boot id the live bits belong to (`/proc/sys/kernel/random/boot_id`) |
//! | 72 | digest length; 80: scope length |
//! | 128 | eviction generation: odd while an eviction of this blob punches holes |
//! | 136, 144, 152, 160 | hits, misses, bytes fetched, bytes evicted |
//! | 168 | last use (Unix seconds) |
//! | 256..512 | digest |
//! | 512..1024 | scope (the origin that served unverified bytes; empty when verified) |
//! | 4096 | presence bitmap, one bit per block, in 64-bit words |
//! | then | last-use tick per block (a host-wide clock, for LRU) |
//!
//! The file is fully allocated at creation (so writes through the mapping
//! never meet a full disk) and initialised under a temporary name before it
//! is linked into place, so no process sees a half-written header.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::shm::Shared;

const MAGIC: &[u8; 8] = b"OBDCMAP1";
const VERSION: u64 = 1;
const HDR: usize = 4096;
const OFF_BS: usize = 16;
const OFF_SIZE: usize = 24;
const OFF_BOOT: usize = 32;
const OFF_DLEN: usize = 72;
const OFF_SLEN: usize = 80;
const OFF_GEN: usize = 128;
const OFF_HITS: usize = 136;
const OFF_MISSES: usize = 144;
const OFF_FETCHED: usize = 152;
const OFF_EVICTED: usize = 160;
const OFF_LAST_USE: usize = 168;
const OFF_DIGEST: usize = 256;
const MAX_DIGEST: usize = 256;
const OFF_SCOPE: usize = 512;
/// Longest scope kept in the map (longer ones are cut; only for display).
const MAX_SCOPE: usize = 512;

/// Largest blob a map describes (bounds the map size a header can ask for).
const MAX_BLOB: u64 = 1 << 44;

/// The fixed fields of a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MapHeader {
    pub bs: u64,
    pub size: u64,
    pub digest: String,
    pub scope: String,
}

impl MapHeader {
    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.bs)
    }

    /// Bytes of block `i` (the blob's last block may be short).
    pub(super) fn block_len(&self, i: u64) -> u64 {
        (self.size - i * self.bs).min(self.bs)
    }
}

/// Which per-blob counter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Counter {
    Hits,
    Misses,
    Fetched,
    Evicted,
}

/// One blob's shared map.
#[derive(Debug)]
pub(super) struct BlobMap {
    shm: Shared,
    /// The open map file (locks are taken on it).
    pub file: File,
    pub header: MapHeader,
    blocks: u64,
    words: usize,
}

fn map_len(blocks: u64) -> usize {
    HDR + 8 * (blocks.div_ceil(64) as usize + blocks as usize)
}

fn bad(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

impl BlobMap {
    /// Creates the map at `path` for a new blob (all blocks absent), unless
    /// one is there already: then `Ok(None)`. `tmp` is a unique temporary
    /// name in the same directory.
    pub(super) fn create(
        path: &Path,
        tmp: &Path,
        h: &MapHeader,
        boot: &[u8; 40],
    ) -> io::Result<Option<Self>> {
        if h.bs == 0 || h.size > MAX_BLOB || h.digest.len() > MAX_DIGEST {
            return Err(bad(format!(
                "unsupported blob {} of {} bytes",
                h.digest, h.size
            )));
        }
        let blocks = h.blocks();
        let len = map_len(blocks);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)?;
        let made = (|| {
            allocate(&file, len as u64)?;
            let shm = Shared::map(&file, len)?;
            shm.write_bytes(0, MAGIC);
            shm.word(8).store(VERSION, Ordering::Relaxed);
            shm.word(OFF_BS).store(h.bs, Ordering::Relaxed);
            shm.word(OFF_SIZE).store(h.size, Ordering::Relaxed);
            shm.write_bytes(OFF_BOOT, boot);
            shm.word(OFF_DLEN)
                .store(h.digest.len() as u64, Ordering::Relaxed);
            shm.write_bytes(OFF_DIGEST, h.digest.as_bytes());
            let scope = cut(&h.scope, MAX_SCOPE);
            shm.word(OFF_SLEN)
                .store(scope.len() as u64, Ordering::Relaxed);
            shm.write_bytes(OFF_SCOPE, scope.as_bytes());
            shm.word(OFF_LAST_USE).store(now_secs(), Ordering::Relaxed);
            io::Result::Ok(shm)
        })();
        let shm = match made {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_file(tmp);
                return Err(e);
            }
        };
        let linked = fs::hard_link(tmp, path);
        let _ = fs::remove_file(tmp);
        match linked {
            Ok(()) => Ok(Some(Self {
                shm,
                file,
                header: h.clone(),
                blocks,
                words: blocks.div_ceil(64) as usize,
            })),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens an existing map, checking its header and length.
    pub(super) fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut hdr = vec![0u8; HDR];
        file.read_exact_at(&mut hdr, 0)?;
        let word = |o: usize| u64::from_le_bytes(hdr[o..o + 8].try_into().expect("8 bytes"));
        if &hdr[..8] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        if word(8) != VERSION {
            return Err(bad(format!("version {}", word(8))));
        }
        let (bs, size) = (word(OFF_BS), word(OFF_SIZE));
        if !bs.is_power_of_two() || bs < 4096 || size > MAX_BLOB {
            return Err(bad(format!("block size {bs}, blob size {size}")));
        }
        let (dlen, slen) = (word(OFF_DLEN) as usize, word(OFF_SLEN) as usize);
        if dlen > MAX_DIGEST || slen > MAX_SCOPE {
            return Err(bad("digest or scope too long".into()));
        }
        let text = |o: usize, n: usize| {
            std::str::from_utf8(&hdr[o..o + n])
                .map(str::to_owned)
                .map_err(|_| bad("digest or scope not UTF-8".into()))
        };
        let header = MapHeader {
            bs,
            size,
            digest: text(OFF_DIGEST, dlen)?,
            scope: text(OFF_SCOPE, slen)?,
        };
        let blocks = header.blocks();
        let len = map_len(blocks);
        let shm = Shared::map(&file, len)?;
        Ok(Self {
            shm,
            file,
            header,
            blocks,
            words: blocks.div_ceil(64) as usize,
        })
    }

    /// Number of blocks.
    pub(super) fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The boot id the live bits belong to.
    pub(super) fn boot(&self) -> Vec<u8> {
        self.shm.read_bytes(OFF_BOOT, 40)
    }

    /// Records that the live bits belong to boot `id`.
    pub(super) fn set_boot(&self, id: &[u8; 40]) {
        self.shm.write_bytes(OFF_BOOT, id);
    }

    /// The eviction generation (odd while an eviction punches holes).
    pub(super) fn gen(&self) -> &AtomicU64 {
        self.shm.word(OFF_GEN)
    }

    /// A per-blob counter.
    pub(super) fn counter(&self, c: Counter) -> &AtomicU64 {
        self.shm.word(match c {
            Counter::Hits => OFF_HITS,
            Counter::Misses => OFF_MISSES,
            Counter::Fetched => OFF_FETCHED,
            Counter::Evicted => OFF_EVICTED,
        })
    }

    /// Last use, Unix seconds.
    pub(super) fn last_use(&self) -> &AtomicU64 {
        self.shm.word(OFF_LAST_USE)
    }

    /// Marks the blob used now (at most one store per second).
    pub(super) fn touch_time(&self) {
        let now = now_secs();
        if self.last_use().load(Ordering::Relaxed) != now {
            self.last_use().store(now, Ordering::Relaxed);
        }
    }

    fn bit_word(&self, i: u64) -> &AtomicU64 {
        self.shm.word(HDR + 8 * (i / 64) as usize)
    }

    /// Whether block `i` is present.
    pub(super) fn get(&self, i: u64) -> bool {
        self.bit_word(i).load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets block `i` present; returns whether it was already.
    pub(super) fn set(&self, i: u64) -> bool {
        let m = 1 << (i % 64);
        self.bit_word(i).fetch_or(m, Ordering::AcqRel) & m != 0
    }

    /// Clears block `i`; returns whether it was present.
    pub(super) fn clear(&self, i: u64) -> bool {
        let m = 1 << (i % 64);
        self.bit_word(i).fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Whether blocks `first..=last` are all present.
    pub(super) fn all(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|i| self.get(i))
    }

    /// Bytes of the blocks present in `present` (a bitmap as
    /// [`BlobMap::snapshot`] gives it; missing words count as absent).
    pub(super) fn bytes_in(&self, present: &[u64]) -> u64 {
        (0..self.blocks)
            .filter(|&i| {
                present
                    .get((i / 64) as usize)
                    .is_some_and(|w| w & (1 << (i % 64)) != 0)
            })
            .map(|i| self.header.block_len(i))
            .sum()
    }

    /// Bytes of the blocks present now.
    pub(super) fn cached_bytes(&self) -> u64 {
        self.bytes_in(&self.snapshot())
    }

    /// The bitmap words, copied.
    pub(super) fn snapshot(&self) -> Vec<u64> {
        (0..self.words)
            .map(|w| self.shm.word(HDR + 8 * w).load(Ordering::Acquire))
            .collect()
    }

    /// Replaces the bitmap (at (re)initialisation, under the map's lock).
    pub(super) fn restore(&self, present: &[u64]) {
        for w in 0..self.words {
            let v = present.get(w).copied().unwrap_or(0);
            self.shm.word(HDR + 8 * w).store(v, Ordering::Release);
        }
        for i in 0..self.blocks {
            self.tick(i).store(0, Ordering::Relaxed);
        }
    }

    /// The last-use tick of block `i`.
    pub(super) fn tick(&self, i: u64) -> &AtomicU64 {
        self.shm.word(HDR + 8 * (self.words + i as usize))
    }
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut n = max;
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// Seconds since the Unix epoch.
pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Allocates `len` bytes of `file` (so a full disk fails here, not later
/// through a mapping).
pub(super) fn allocate(file: &File, len: u64) -> io::Result<()> {
    let l = libc::off_t::try_from(len).map_err(|_| bad("length".into()))?;
    // SAFETY: posix_fallocate receives a descriptor `file` keeps open for the
    // call and plain integers; no memory is passed.
    let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, l) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// The cache-wide shared state (`cache.state`): a host-wide clock for LRU
/// ticks and the bytes cached across all blobs.
#[derive(Debug)]
pub(super) struct StateFile {
    shm: Shared,
    /// The open file (each process holds a shared `flock` on it).
    pub file: File,
}

const STATE_MAGIC: &[u8; 8] = b"OBDCSTAT";
const STATE_LEN: usize = 4096;
/// Attempts to open or create the state file before giving up (each lost
/// only to another opener's progress).
const STATE_OPEN_TRIES: usize = 100;

impl StateFile {
    /// Opens or creates `path`. A new file is made under a temporary name
    /// of its own (`.<name>.<pid>.<n>.tmp`, so that neither other processes
    /// nor other threads of this one share it) and linked in; an opener
    /// that lost the race to link, or whose temporary file the first
    /// opener's recovery removed as stray before it was linked, opens what
    /// the winner linked.
    pub(super) fn open(path: &Path) -> io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = path.file_name().map_or_else(
            || std::borrow::Cow::Borrowed("state"),
            |n| n.to_string_lossy(),
        );
        let mut last = None;
        for _ in 0..STATE_OPEN_TRIES {
            if let Ok(file) = OpenOptions::new().read(true).write(true).open(path) {
                let mut m = [0u8; 8];
                file.read_exact_at(&mut m, 0)?;
                if &m != STATE_MAGIC {
                    return Err(bad(format!("{}: bad magic", path.display())));
                }
                let shm = Shared::map(&file, STATE_LEN)?;
                return Ok(Self { shm, file });
            }
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
            // A file of this name is a dead process's (pids are reused).
            let _ = fs::remove_file(&tmp);
            let init = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .and_then(|file| {
                    allocate(&file, STATE_LEN as u64)?;
                    file.write_all_at(STATE_MAGIC, 0)?;
                    fs::hard_link(&tmp, path)
                });
            let _ = fs::remove_file(&tmp);
            match init {
                Ok(()) => {}
                // Linked by another opener first, or removed as stray by
                // the first opener's recovery: open what is there.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound
                    ) =>
                {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no attempt made")))
    }

    /// The host-wide use clock.
    pub(super) fn clock(&self) -> &AtomicU64 {
        self.shm.word(64)
    }

    /// Bytes of present blocks across all blobs.
    pub(super) fn used(&self) -> &AtomicU64 {
        self.shm.word(72)
    }
}
