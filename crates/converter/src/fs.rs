//! A safe wrapper over one libext2fs filesystem handle opened through our
//! io_manager: mkfs, open, and the few namespace operations layer
//! application needs. libext2fs is not thread-safe: an [`Ext4`] stays on the
//! thread that made it (it is neither `Send` nor `Sync`).

use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex};

use zfile::sync::MutexExt;

use crate::error::{escape, Error, Result};
use crate::ffi::*;
use crate::io::{self, Backend, MANAGER};

/// File type bits of `i_mode`.
pub mod mode {
    pub const S_IFMT: u16 = 0o170000;
    pub const S_IFSOCK: u16 = 0o140000;
    pub const S_IFLNK: u16 = 0o120000;
    pub const S_IFREG: u16 = 0o100000;
    pub const S_IFBLK: u16 = 0o060000;
    pub const S_IFDIR: u16 = 0o040000;
    pub const S_IFCHR: u16 = 0o020000;
    pub const S_IFIFO: u16 = 0o010000;
}

pub use crate::ffi::{ext2_ino_t, Inode256};

impl Inode256 {
    /// File size in bytes (`i_size` and `i_size_high`).
    pub fn size(&self) -> u64 {
        u64::from(self.i.i_size) | u64::from(self.i.i_size_high) << 32
    }

    /// Allocated space (`i_blocks` and its high 16 bits): 512-byte units, or
    /// filesystem blocks if the inode has `EXT4_HUGE_FILE_FL`.
    pub fn blocks(&self) -> u64 {
        u64::from(self.i.i_blocks) | u64::from(self.i.l_i_blocks_hi) << 32
    }
}

/// Inode metadata taken from a tar header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attrs {
    /// Permission bits, including setuid/setgid/sticky (`& 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch (may be negative).
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
}

/// Parameters of a fresh filesystem.
#[derive(Clone, Debug)]
pub struct MkfsParams {
    /// Filesystem size in bytes (a multiple of 4096).
    pub size: u64,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Directory-hash seed.
    pub hash_seed: [u8; 16],
}

/// The clock every filesystem handle runs on: libext2fs stamps superblock
/// and scratch inode times with it, so output never depends on the real time.
pub const FS_TIME: i64 = 1_577_836_800; // 2020-01-01T00:00:00Z

const BLOCK: u32 = 4096;
const INODE_SIZE: u16 = 256;
const INODE_RATIO: u64 = 16384;
const EXTRA_ISIZE: u16 = 32;

// Feature bits (ext2_fs.h): ext4 as mke2fs.conf defines it on Debian 12,
// minus has_journal (upstream mkfs: `-O ^has_journal,sparse_super,flex_bg
// -G 1`) and minus resize_inode (reserving growth GDT blocks would put tens of
// MiB of zeros into every base layer; online growth still works via meta_bg).
const COMPAT_EXT_ATTR: u32 = 0x0008;
const COMPAT_DIR_INDEX: u32 = 0x0020;
const INCOMPAT_FILETYPE: u32 = 0x0002;
const INCOMPAT_EXTENTS: u32 = 0x0040;
const INCOMPAT_64BIT: u32 = 0x0080;
const INCOMPAT_FLEX_BG: u32 = 0x0200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
const RO_COMPAT_LARGE_FILE: u32 = 0x0002;
const RO_COMPAT_HUGE_FILE: u32 = 0x0008;
const RO_COMPAT_DIR_NLINK: u32 = 0x0020;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x0040;
const RO_COMPAT_METADATA_CSUM: u32 = 0x0400;

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4"))
}

/// A directory entry being filed under a hash index: (hash, minor hash,
/// name, inode, file type); sorted, entries are in hash order.
type HashedEntry = (u32, u32, Vec<u8>, u32, u8);

/// Bytes a directory entry with an `n`-byte name takes.
fn dirent_rec_len(n: usize) -> usize {
    (8 + n + 3) & !3
}

/// Where to split hash-sorted `entries` into two leaves: by size at the
/// half (never inside a run of equal hashes unless it cannot be helped:
/// then the index entry is marked as continued).
fn leaf_split(entries: &[HashedEntry]) -> usize {
    let total: usize = entries.iter().map(|e| dirent_rec_len(e.2.len())).sum();
    let mut split = 0usize;
    let mut acc = 0usize;
    while split < entries.len() && acc + dirent_rec_len(entries[split].2.len()) <= total / 2 {
        acc += dirent_rec_len(entries[split].2.len());
        split += 1;
    }
    split.clamp(1, entries.len().saturating_sub(1).max(1))
}

/// One leaf block of indexed directory `dir` holding `leaf`, with a
/// checksum tail when `csum`.
fn leaf_block(dir: ext2_ino_t, leaf: &[HashedEntry], csum: bool) -> Result<Vec<u8>> {
    let bs = BLOCK as usize;
    let usable = bs - if csum { 12 } else { 0 };
    let mut b = vec![0u8; bs];
    let mut o = 0usize;
    for (i, (_, _, name, ino, ft)) in leaf.iter().enumerate() {
        let mut rl = dirent_rec_len(name.len());
        if i + 1 == leaf.len() {
            rl = usable - o;
        }
        if o + rl > usable {
            return Err(Error::BadEntry(format!(
                "directory {dir}: a leaf overflows"
            )));
        }
        b[o..o + 4].copy_from_slice(&ino.to_le_bytes());
        b[o + 4..o + 6].copy_from_slice(&(rl as u16).to_le_bytes());
        b[o + 6] = name.len() as u8;
        b[o + 7] = *ft;
        b[o + 8..o + 8 + name.len()].copy_from_slice(name);
        o += rl;
    }
    if leaf.is_empty() {
        b[4..6].copy_from_slice(&(usable as u16).to_le_bytes());
    }
    if csum {
        // struct ext2_dir_entry_tail; the checksum is set on write.
        b[bs - 12 + 4..bs - 12 + 6].copy_from_slice(&12u16.to_le_bytes());
        b[bs - 12 + 7] = 0xDE;
    }
    Ok(b)
}

/// Encodes a time as ext4 does: low 32 bits of the seconds, and an extra
/// word of `nsec << 2 | epoch bits`.
pub fn encode_time(sec: i64, nsec: u32) -> (u32, u32) {
    let lo = sec as i32;
    let epoch = ((sec - lo as i64) >> 32) as u32 & 3;
    (lo as u32, (nsec.min(999_999_999) << 2) | epoch)
}

fn cstr(s: &[u8], what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::BadEntry(format!("{what} contains a NUL byte")))
}

/// A name for a new directory entry: 1 to 255 bytes without `/` or NUL.
/// Never truncated (libext2fs would keep the length modulo 256, making a
/// different name).
fn entry_name(name: &[u8]) -> Result<CString> {
    if name.len() > EXT2_NAME_LEN {
        return Err(Error::NameTooLong {
            name: escape(name),
            len: name.len(),
        });
    }
    if name.is_empty() || name.contains(&b'/') {
        return Err(Error::BadEntry(format!("bad name `{}`", escape(name))));
    }
    cstr(name, "name")
}

/// The superblock parameters `ext2fs_initialize` gets for a fresh
/// filesystem of `p.size` bytes: 4 KiB blocks, 256-byte inodes, one inode
/// per 16 KiB, the features above, 64-byte group descriptors, flex_bg 1.
fn mkfs_superblock(p: &MkfsParams) -> Vec<u8> {
    let blocks = p.size / BLOCK as u64;
    let mut param = vec![0u8; sb::SIZE];
    put_u32(&mut param, sb::S_BLOCKS_COUNT, blocks as u32);
    put_u32(&mut param, sb::S_BLOCKS_COUNT_HI, (blocks >> 32) as u32);
    put_u32(&mut param, sb::S_LOG_BLOCK_SIZE, 2);
    put_u32(&mut param, sb::S_REV_LEVEL, 1);
    put_u16(&mut param, sb::S_INODE_SIZE, INODE_SIZE);
    let inodes = (p.size / INODE_RATIO).min(u32::MAX as u64) as u32;
    put_u32(&mut param, sb::S_INODES_COUNT, inodes);
    put_u32(
        &mut param,
        sb::S_FEATURE_COMPAT,
        COMPAT_EXT_ATTR | COMPAT_DIR_INDEX,
    );
    put_u32(
        &mut param,
        sb::S_FEATURE_INCOMPAT,
        INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG,
    );
    put_u32(
        &mut param,
        sb::S_FEATURE_RO_COMPAT,
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM,
    );
    put_u16(&mut param, sb::S_DESC_SIZE, 64);
    param[sb::S_LOG_GROUPS_PER_FLEX] = 0; // -G 1
    put_u32(&mut param, sb::S_DEFAULT_MOUNT_OPTS, 0x0004 | 0x0008); // user_xattr,acl
    param
}

/// One open filesystem.
pub struct Ext4 {
    fs: ext2_filsys,
    backend: Option<Arc<Mutex<Backend>>>,
}

impl Ext4 {
    fn err(&self, op: impl Into<String>, code: errcode_t) -> Error {
        let detail = self
            .backend
            .as_ref()
            .and_then(|b| b.locked().last_error.take());
        Error::Ext2 {
            op: op.into(),
            code,
            msg: message(code),
            detail,
        }
    }

    fn check(&self, op: impl FnOnce() -> String, code: errcode_t) -> Result<()> {
        if code == 0 {
            Ok(())
        } else {
            Err(self.err(op(), code))
        }
    }

    fn set_now(&mut self) {
        // SAFETY: `self.fs` is a live handle; `now` is a plain field in the
        // verified prefix of struct_ext2_filsys.
        unsafe { (*self.fs).now = FS_TIME as libc::time_t };
    }

    fn open_err(backend: &Arc<Mutex<Backend>>, op: &str, code: errcode_t) -> Error {
        Error::Ext2 {
            op: op.to_string(),
            code,
            msg: message(code),
            detail: backend.locked().last_error.take(),
        }
    }

    /// Makes a fresh ext4 on `backend`, as upstream's converter does for a
    /// first layer (mke2fs: ext4 features without a journal, flex_bg size 1,
    /// 4 KiB blocks, 256-byte inodes, one inode per 16 KiB, lazy itable init
    /// off with the tables known to read as zeros), with a fixed UUID and
    /// hash seed, then creates `/`, `/lost+found` and the reserved inodes.
    pub fn mkfs(backend: Arc<Mutex<Backend>>, p: &MkfsParams) -> Result<Ext4> {
        let mut param = mkfs_superblock(p);
        let name = io::register(backend.clone());
        let mut fs: ext2_filsys = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated, `param` is a 1024-byte superblock
        // image, MANAGER is our static table and `fs` receives the handle.
        let rc = unsafe {
            ext2fs_initialize(
                name.as_ptr(),
                EXT2_FLAG_64BITS,
                param.as_mut_ptr(),
                &MANAGER,
                &mut fs,
            )
        };
        if rc != 0 {
            io::unregister(&name);
            return Err(Self::open_err(&backend, "initialize", rc));
        }
        let mut me = Ext4 {
            fs,
            backend: Some(backend),
        };
        me.set_now();
        me.stamp_superblock(p);
        me.allocate_tables()?;
        me.make_root_and_lost_found()?;
        me.reserve_inodes()?;
        Ok(me)
    }

    /// Sets what mke2fs sets in a fresh superblock beyond the geometry: the
    /// UUID and hash seed of `p`, hash and checksum types, no periodic fsck,
    /// fixed times; then the checksum seed.
    fn stamp_superblock(&mut self, p: &MkfsParams) {
        // SAFETY: `super_` points to the handle's 1024-byte in-memory
        // superblock, owned by libext2fs for the handle's lifetime.
        let sbuf = unsafe { std::slice::from_raw_parts_mut((*self.fs).super_, sb::SIZE) };
        sbuf[sb::S_UUID..sb::S_UUID + 16].copy_from_slice(&p.uuid);
        sbuf[sb::S_HASH_SEED..sb::S_HASH_SEED + 16].copy_from_slice(&p.hash_seed);
        sbuf[sb::S_DEF_HASH_VERSION] = 1; // half_md4, mke2fs's default
        sbuf[sb::S_CHECKSUM_TYPE] = 1; // crc32c
        put_u16(sbuf, sb::S_MAX_MNT_COUNT, 0xFFFF); // -1: no periodic fsck
        put_u32(sbuf, sb::S_CHECKINTERVAL, 0);
        for off in [sb::S_MKFS_TIME, sb::S_LASTCHECK, sb::S_WTIME] {
            put_u32(sbuf, off, FS_TIME as u32);
        }
        put_u32(sbuf, sb::S_MTIME, 0);
        // SAFETY: live handle; the uuid was just set.
        unsafe { ext2fs_init_csum_seed(self.fs) };
    }

    /// Allocates the group tables of a fresh filesystem, marking the inode
    /// tables zeroed.
    fn allocate_tables(&self) -> Result<()> {
        // SAFETY: live handle with bitmaps from ext2fs_initialize.
        let rc = unsafe { ext2fs_allocate_tables(self.fs) };
        self.check(|| "allocate_tables".into(), rc)?;
        // SAFETY: live handle.
        let groups = unsafe { (*self.fs).group_desc_count };
        for g in 0..groups {
            // The inode tables read as zeros (the layer below is empty), so
            // they count as zeroed without writing a byte.
            // SAFETY: `g` is a valid group of the live handle.
            unsafe {
                ext2fs_bg_flags_set(self.fs, g, EXT2_BG_INODE_ZEROED);
                ext2fs_group_desc_csum_set(self.fs, g);
            }
        }
        Ok(())
    }

    /// Creates `/` and `/lost+found` in a fresh filesystem.
    fn make_root_and_lost_found(&self) -> Result<()> {
        // SAFETY: live handle; NULL name makes the root itself.
        let rc = unsafe { ext2fs_mkdir(self.fs, EXT2_ROOT_INO, EXT2_ROOT_INO, std::ptr::null()) };
        self.check(|| "mkdir /".into(), rc)?;
        self.set_attrs(
            EXT2_ROOT_INO,
            &Attrs {
                perm: 0o755,
                mtime: FS_TIME,
                ..Default::default()
            },
        )?;
        // lost+found, grown to 16 KiB as mke2fs does (e2fsck wants it).
        let lpf = self.mkdir(
            EXT2_ROOT_INO,
            b"lost+found",
            &Attrs {
                perm: 0o700,
                mtime: FS_TIME,
                ..Default::default()
            },
        )?;
        for _ in 1..4 {
            // SAFETY: live handle, `lpf` is a directory.
            let rc = unsafe { ext2fs_expand_dir(self.fs, lpf) };
            self.check(|| "expand lost+found".into(), rc)?;
        }
        Ok(())
    }

    /// Marks the reserved inodes (1..first_ino) used, the bad-block inode
    /// included (upstream once forgot inode 1, overlaybd #285), and writes
    /// an empty bad-block list.
    fn reserve_inodes(&self) -> Result<()> {
        for ino in 1..EXT2_GOOD_OLD_FIRST_INO {
            if ino != EXT2_ROOT_INO {
                // SAFETY: live handle; `ino` is within the inode count.
                unsafe { ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0) };
            }
        }
        // SAFETY: live handle; NULL = an empty bad-block list.
        let rc = unsafe { ext2fs_update_bb_inode(self.fs, std::ptr::null_mut()) };
        self.check(|| "bad-block inode".into(), rc)
    }

    /// Opens the filesystem the stack in `backend` already holds, read-write.
    pub fn open(backend: Arc<Mutex<Backend>>) -> Result<Ext4> {
        let name = io::register(backend.clone());
        let mut fs: ext2_filsys = std::ptr::null_mut();
        // SAFETY: NUL-terminated name, our static manager, out-pointer.
        let rc = unsafe {
            ext2fs_open(
                name.as_ptr(),
                EXT2_FLAG_RW | EXT2_FLAG_64BITS,
                0,
                0,
                &MANAGER,
                &mut fs,
            )
        };
        if rc != 0 {
            io::unregister(&name);
            return Err(Self::open_err(&backend, "open", rc));
        }
        let mut me = Ext4 {
            fs,
            backend: Some(backend),
        };
        me.set_now();
        // SAFETY: live handle.
        let rc = unsafe { ext2fs_read_bitmaps(me.fs) };
        me.check(|| "read_bitmaps".into(), rc)?;
        Ok(me)
    }

    /// Opens an ext4 image file read-only (libext2fs's own unix I/O), for
    /// verification.
    pub fn open_image_file(path: &std::path::Path) -> Result<Ext4> {
        use std::os::unix::ffi::OsStrExt;
        let cpath = cstr(path.as_os_str().as_bytes(), "path")?;
        let mut fs: ext2_filsys = std::ptr::null_mut();
        // SAFETY: NUL-terminated path; unix_io_manager is libext2fs's own
        // static manager; `fs` receives the handle.
        let rc = unsafe {
            ext2fs_open(
                cpath.as_ptr(),
                EXT2_FLAG_64BITS,
                0,
                0,
                unix_io_manager,
                &mut fs,
            )
        };
        if rc != 0 {
            return Err(Error::Ext2 {
                op: format!("open {}", path.display()),
                code: rc,
                msg: message(rc),
                detail: None,
            });
        }
        Ok(Ext4 { fs, backend: None })
    }

    /// Streams the content of a regular file (or a slow symlink) to `f`.
    pub fn read_file(&self, ino: ext2_ino_t, f: &mut dyn FnMut(&[u8])) -> Result<()> {
        let mut file: ext2_file_t = std::ptr::null_mut();
        // SAFETY: live handle; read-only open.
        let rc = unsafe { ext2fs_file_open(self.fs, ino, 0, &mut file) };
        self.check(|| format!("open inode {ino}"), rc)?;
        let mut buf = vec![0u8; 1 << 20];
        let r = loop {
            let mut got = 0u32;
            // SAFETY: open file; `buf` is valid for its length.
            let rc = unsafe {
                ext2fs_file_read(
                    file,
                    buf.as_mut_ptr() as *mut c_void,
                    buf.len() as u32,
                    &mut got,
                )
            };
            if rc != 0 {
                break Err(self.err(format!("read inode {ino}"), rc));
            }
            if got == 0 {
                break Ok(());
            }
            f(&buf[..got as usize]);
        };
        // SAFETY: `file` is open.
        let rc = unsafe { ext2fs_file_close(file) };
        r?;
        self.check(|| "close file".into(), rc)
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: ext2_ino_t, inode: &Inode256) -> Result<Vec<u8>> {
        let mut copy = *inode;
        // SAFETY: the buffer holds at least a struct ext2_inode.
        let fast =
            unsafe { ext2fs_is_fast_symlink(&mut copy as *mut Inode256 as *mut c_void) } != 0;
        let size = inode.i.i_size as usize;
        if fast {
            let mut b = Vec::with_capacity(60);
            for w in inode.i.i_block {
                b.extend_from_slice(&w.to_le_bytes());
            }
            b.truncate(size.min(60));
            return Ok(b);
        }
        let mut out = Vec::with_capacity(size);
        self.read_file(ino, &mut |d| out.extend_from_slice(d))?;
        out.truncate(size);
        Ok(out)
    }

    /// All extended attributes of an inode, as libext2fs reports them.
    pub fn xattrs(&self, ino: ext2_ino_t) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        unsafe extern "C" fn collect(
            name: *mut c_char,
            value: *mut c_char,
            len: usize,
            data: *mut c_void,
        ) -> c_int {
            // SAFETY: `name` is NUL-terminated, `value` holds `len` bytes,
            // `data` is our Vec.
            unsafe {
                let out = &mut *(data as *mut Vec<(Vec<u8>, Vec<u8>)>);
                let v = if value.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(value as *const u8, len)
                };
                out.push((CStr::from_ptr(name).to_bytes().to_vec(), v.to_vec()));
            }
            0
        }
        let mut h: xattr_handle = std::ptr::null_mut();
        // SAFETY: live handle.
        let rc = unsafe { ext2fs_xattrs_open(self.fs, ino, &mut h) };
        self.check(|| "open xattrs".into(), rc)?;
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        // SAFETY: `h` is open; the callback only appends to `out`.
        let rc = unsafe { ext2fs_xattrs_read(h) };
        let rc = if rc == 0 {
            // SAFETY: as above.
            unsafe { ext2fs_xattrs_iterate(h, collect, &mut out as *mut _ as *mut c_void) }
        } else {
            rc
        };
        // SAFETY: `h` is open; nothing was changed, so nothing is written.
        unsafe { ext2fs_xattrs_close(&mut h) };
        self.check(|| format!("read xattrs of inode {ino}"), rc)?;
        out.sort();
        Ok(out)
    }

    /// Writes everything back and closes the handle.
    pub fn close(mut self) -> Result<()> {
        let mut fs = std::mem::replace(&mut self.fs, std::ptr::null_mut());
        // SAFETY: `fs` is the live handle, taken out of `self` so Drop will
        // not free it again; close_free frees it even on error.
        let rc = unsafe { ext2fs_close_free(&mut fs) };
        if rc != 0 {
            return Err(self.err("close", rc));
        }
        Ok(())
    }

    /// The inode of `name` in directory `dir`, if any.
    pub fn lookup(&self, dir: ext2_ino_t, name: &[u8]) -> Result<Option<ext2_ino_t>> {
        let mut ino = 0;
        // SAFETY: live handle; `name` is passed with its length (no NUL needed).
        let rc = unsafe {
            ext2fs_lookup(
                self.fs,
                dir,
                name.as_ptr() as *const c_char,
                name.len() as c_int,
                std::ptr::null_mut(),
                &mut ino,
            )
        };
        match rc {
            0 => Ok(Some(ino)),
            EXT2_ET_FILE_NOT_FOUND => Ok(None),
            rc => Err(self.err(format!("lookup {}", escape(name)), rc)),
        }
    }

    /// Reads a whole inode.
    pub fn read_inode(&self, ino: ext2_ino_t) -> Result<Inode256> {
        let mut inode = Inode256::default();
        // SAFETY: live handle; the buffer is 256 bytes, our inode size.
        let rc = unsafe {
            ext2fs_read_inode_full(
                self.fs,
                ino,
                &mut inode as *mut Inode256 as *mut c_void,
                INODE_SIZE as c_int,
            )
        };
        self.check(|| format!("read inode {ino}"), rc)?;
        Ok(inode)
    }

    /// Writes a whole inode.
    pub fn write_inode(&self, ino: ext2_ino_t, inode: &mut Inode256) -> Result<()> {
        // SAFETY: live handle; the buffer is 256 bytes, our inode size.
        let rc = unsafe {
            ext2fs_write_inode_full(
                self.fs,
                ino,
                inode as *mut Inode256 as *mut c_void,
                INODE_SIZE as c_int,
            )
        };
        self.check(|| format!("write inode {ino}"), rc)
    }

    fn fill_attrs(i: &mut ext2_inode_large, kind: u16, a: &Attrs) {
        i.i_mode = kind | (a.perm & 0o7777);
        i.i_uid = a.uid as u16;
        i.l_i_uid_high = (a.uid >> 16) as u16;
        i.i_gid = a.gid as u16;
        i.l_i_gid_high = (a.gid >> 16) as u16;
        let (t, extra) = encode_time(a.mtime, a.mtime_nsec);
        // ctime, atime and crtime follow mtime: never the clock.
        i.i_mtime = t;
        i.i_atime = t;
        i.i_ctime = t;
        i.i_crtime = t;
        i.i_mtime_extra = extra;
        i.i_atime_extra = extra;
        i.i_ctime_extra = extra;
        i.i_crtime_extra = extra;
        i.i_dtime = 0;
    }

    /// Sets mode bits, owner and times of an existing inode (type kept).
    pub fn set_attrs(&self, ino: ext2_ino_t, a: &Attrs) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        let kind = inode.i.i_mode & mode::S_IFMT;
        Self::fill_attrs(&mut inode.i, kind, a);
        if inode.i.i_extra_isize < EXTRA_ISIZE {
            inode.i.i_extra_isize = EXTRA_ISIZE;
        }
        self.write_inode(ino, &mut inode)
    }

    fn new_inode(&self, dir: ext2_ino_t, kind: u16) -> Result<ext2_ino_t> {
        let mut ino = 0;
        // SAFETY: live handle; NULL map = the filesystem's inode bitmap.
        let rc = unsafe {
            ext2fs_new_inode(
                self.fs,
                dir,
                kind as c_int | 0o755,
                std::ptr::null_mut(),
                &mut ino,
            )
        };
        self.check(|| "allocate an inode".into(), rc)?;
        Ok(ino)
    }

    /// Runs `f` (a call that adds a name to `dir`) and, if the directory is
    /// full, grows it by one block and runs it again.
    fn with_dir_space(
        &self,
        dir: ext2_ino_t,
        what: impl Fn() -> String,
        f: impl Fn() -> errcode_t,
    ) -> Result<()> {
        let mut rc = f();
        if rc == EXT2_ET_DIR_NO_SPACE {
            let inode = self.read_inode(dir)?;
            if inode.i.i_flags & EXT2_INDEX_FL != 0 {
                // libext2fs grows indexed directories itself; no space
                // here means the tree is at its depth limit.
                return self.check(what, rc);
            }
            let size = inode.size();
            if size == BLOCK as u64 && self.has_feature_dir_index() {
                // The first block is full: index the directory (as the
                // kernel does) so every later link is O(log n).
                self.index_dir(dir).map_err(|e| {
                    Error::BadEntry(format!("indexing the directory for {}: {e}", what()))
                })?;
            } else {
                // SAFETY: live handle; `dir` is a directory.
                let rc2 = unsafe { ext2fs_expand_dir(self.fs, dir) };
                self.check(|| format!("expand directory for {}", what()), rc2)?;
            }
            rc = f();
        }
        self.check(what, rc)
    }

    fn super_bytes(&self) -> &[u8] {
        // SAFETY: `super_` points to the live handle's 1024-byte superblock.
        unsafe { std::slice::from_raw_parts((*self.fs).super_, sb::SIZE) }
    }

    fn super_u32(&self, off: usize) -> u32 {
        let b = self.super_bytes();
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn has_feature_dir_index(&self) -> bool {
        self.super_u32(sb::S_FEATURE_COMPAT) & COMPAT_DIR_INDEX != 0
    }

    fn has_metadata_csum(&self) -> bool {
        self.super_u32(sb::S_FEATURE_RO_COMPAT) & RO_COMPAT_METADATA_CSUM != 0
    }

    pub fn dir_block_pblk(&self, dir: ext2_ino_t, lblk: u64) -> Result<u64> {
        let mut pblk = 0u64;
        // SAFETY: live handle; NULL inode/buffer let libext2fs read them.
        let rc = unsafe {
            ext2fs_bmap2(
                self.fs,
                dir,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
                lblk,
                std::ptr::null_mut(),
                &mut pblk,
            )
        };
        self.check(|| format!("map block {lblk} of directory {dir}"), rc)?;
        if pblk == 0 {
            return Err(Error::BadEntry(format!(
                "directory {dir} has a hole at block {lblk}"
            )));
        }
        Ok(pblk)
    }

    /// Gives directory `dir` its true link count back if it is 1 ("many
    /// subdirectories", see [`Self::mkdir`]) but no longer needs to be:
    /// e2fsck wants the real count whenever it fits.
    pub fn settle_dir_nlink(&self, dir: ext2_ino_t) -> Result<()> {
        let mut inode = self.read_inode(dir)?;
        if inode.i.i_mode & mode::S_IFMT != mode::S_IFDIR || inode.i.i_links_count != 1 {
            return Ok(());
        }
        let mut count = 2u32;
        for (_, ino) in self.list_dir(dir)? {
            if self.read_inode(ino)?.i.i_mode & mode::S_IFMT == mode::S_IFDIR {
                count += 1;
            }
        }
        if count <= u32::from(EXT2_LINK_MAX) {
            inode.i.i_links_count = count as u16;
            self.write_inode(dir, &mut inode)?;
        }
        Ok(())
    }

    /// Zeroes the unused bytes of every block of directory `dir` (entry
    /// slack, unused index slots) and rewrites the blocks that change.
    /// libext2fs fills new directory blocks from uninitialised buffers when
    /// it splits htree leaves; without this the output would not be
    /// byte-for-byte reproducible.
    pub fn scrub_dir(&self, dir: ext2_ino_t) -> Result<()> {
        let inode = self.read_inode(dir)?;
        if inode.i.i_mode & mode::S_IFMT != mode::S_IFDIR || inode.i.i_links_count == 0 {
            return Ok(());
        }
        let indexed = inode.i.i_flags & EXT2_INDEX_FL != 0;
        let bs = BLOCK as usize;
        let size = inode.size();
        let mut buf = vec![0u8; bs];
        let rd16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
        let rd32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        for lblk in 0..size / BLOCK as u64 {
            let pblk = self.dir_block_pblk(dir, lblk)?;
            // SAFETY: live handle; `buf` is one block.
            let rc = unsafe {
                ext2fs_read_dir_block4(self.fs, pblk, buf.as_mut_ptr() as *mut c_void, 0, dir)
            };
            self.check(|| format!("read directory {dir} block {lblk}"), rc)?;
            let before = buf.clone();
            let clear_index = |b: &mut [u8], at: usize| {
                let (limit, count) = (rd16(b, at), rd16(b, at + 2));
                if count <= limit && at + limit * 8 <= bs {
                    b[at + count * 8..at + limit * 8].fill(0);
                }
            };
            if indexed && lblk == 0 {
                let info_len = buf[29] as usize;
                clear_index(&mut buf, 24 + info_len);
            } else if indexed && rd32(&buf, 0) == 0 && rd16(&buf, 4) == bs {
                clear_index(&mut buf, 8);
            } else {
                let mut off = 0usize;
                while off + 8 <= bs {
                    let rec = rd16(&buf, off + 4);
                    let nlen = buf[off + 6] as usize;
                    if rec < 8 || off + rec > bs || 8 + nlen > rec {
                        break;
                    }
                    let is_tail = off + 12 == bs && rec == 12 && buf[off + 7] == 0xDE;
                    if !is_tail {
                        buf[off + 8 + nlen..off + rec].fill(0);
                    }
                    off += rec;
                }
            }
            if buf != before {
                // SAFETY: live handle; one block; the checksum is recomputed.
                let rc = unsafe {
                    ext2fs_write_dir_block4(self.fs, pblk, buf.as_mut_ptr() as *mut c_void, 0, dir)
                };
                self.check(|| format!("write directory {dir} block {lblk}"), rc)?;
            }
        }
        Ok(())
    }

    /// Turns a full one-block linear directory into a hash-indexed one: a
    /// root block (`.`, `..`, dx root) over two leaves holding the entries in
    /// hash order. libext2fs then adds entries through the index.
    fn index_dir(&self, dir: ext2_ino_t) -> Result<()> {
        let bs = BLOCK as usize;
        let csum = self.has_metadata_csum();
        let pblk0 = self.dir_block_pblk(dir, 0)?;
        let mut block = vec![0u8; bs];
        // SAFETY: live handle; `block` is one block long.
        let rc = unsafe {
            ext2fs_read_dir_block4(self.fs, pblk0, block.as_mut_ptr() as *mut c_void, 0, dir)
        };
        self.check(|| format!("read directory {dir}"), rc)?;
        let (parent, mut entries) = self.hashed_entries(dir, &block)?;
        entries.sort();
        let split = leaf_split(&entries);
        let leaves = [&entries[..split], &entries[split..]];
        let mut leaf_blocks = leaves
            .iter()
            .map(|leaf| leaf_block(dir, leaf, csum))
            .collect::<Result<Vec<_>>>()?;
        let mut root = self.dx_root_block(dir, parent, leaves, csum);
        // Grow the directory to three blocks, then write them.
        for _ in 0..2 {
            // SAFETY: live handle; `dir` is a directory.
            let rc = unsafe { ext2fs_expand_dir(self.fs, dir) };
            self.check(|| format!("expand directory {dir}"), rc)?;
        }
        for (i, b) in leaf_blocks.iter_mut().enumerate() {
            let p = self.dir_block_pblk(dir, i as u64 + 1)?;
            // SAFETY: live handle; `b` is one block; the checksum is set.
            let rc = unsafe {
                ext2fs_write_dir_block4(self.fs, p, b.as_mut_ptr() as *mut c_void, 0, dir)
            };
            self.check(|| format!("write directory {dir} leaf"), rc)?;
        }
        // SAFETY: as above, for the root block.
        let rc = unsafe {
            ext2fs_write_dir_block4(self.fs, pblk0, root.as_mut_ptr() as *mut c_void, 0, dir)
        };
        self.check(|| format!("write directory {dir} root"), rc)?;
        let mut inode = self.read_inode(dir)?;
        inode.i.i_flags |= EXT2_INDEX_FL;
        self.write_inode(dir, &mut inode)
    }

    /// Parses the linear directory block `block` of `dir`: returns the
    /// inode of `..` and the other entries (not `.`) with their name hashes.
    fn hashed_entries(&self, dir: ext2_ino_t, block: &[u8]) -> Result<(u32, Vec<HashedEntry>)> {
        let bs = block.len();
        let version = self.super_bytes()[sb::S_DEF_HASH_VERSION];
        let mut parent = 0u32;
        let mut entries = Vec::new();
        let mut off = 0usize;
        while off + 8 <= bs {
            let ino = get_u32(block, off);
            let rec = get_u16(block, off + 4) as usize;
            let nlen = block[off + 6] as usize;
            let ft = block[off + 7];
            if rec < 8 || off + rec > bs || 8 + nlen > rec {
                return Err(Error::BadEntry(format!(
                    "directory {dir}: bad entry at {off}"
                )));
            }
            let name = &block[off + 8..off + 8 + nlen];
            if ino != 0 && nlen > 0 {
                if name == b"." {
                } else if name == b".." {
                    parent = ino;
                } else {
                    let (h, m) = self.dirhash(version, name)?;
                    entries.push((h, m, name.to_vec(), ino, ft));
                }
            }
            off += rec;
        }
        if parent == 0 {
            return Err(Error::BadEntry(format!("directory {dir} has no `..`")));
        }
        Ok((parent, entries))
    }

    /// The root block of an indexed directory `dir` (parent `parent`):
    /// `.`, `..` and a dx root over the two `leaves` (blocks 1 and 2).
    fn dx_root_block(
        &self,
        dir: ext2_ino_t,
        parent: u32,
        leaves: [&[HashedEntry]; 2],
        csum: bool,
    ) -> Vec<u8> {
        let bs = BLOCK as usize;
        let mut root = vec![0u8; bs];
        root[0..4].copy_from_slice(&dir.to_le_bytes());
        root[4..6].copy_from_slice(&12u16.to_le_bytes());
        root[6] = 1;
        root[7] = EXT2_FT_DIR as u8;
        root[8] = b'.';
        root[12..16].copy_from_slice(&parent.to_le_bytes());
        root[16..18].copy_from_slice(&((bs - 12) as u16).to_le_bytes());
        root[18] = 2;
        root[19] = EXT2_FT_DIR as u8;
        root[20] = b'.';
        root[21] = b'.';
        // dx_root_info: reserved, hash_version, info_length 8, levels 0, flags.
        root[28] = self.super_bytes()[sb::S_DEF_HASH_VERSION];
        root[29] = 8;
        let limit = (bs - 32 - if csum { 8 } else { 0 }) / 8;
        root[32..34].copy_from_slice(&(limit as u16).to_le_bytes());
        root[34..36].copy_from_slice(&2u16.to_le_bytes());
        root[36..40].copy_from_slice(&1u32.to_le_bytes());
        let first2 = leaves[1].first().map(|e| e.0).unwrap_or(!1u32);
        let continued = leaves[0].last().map(|e| e.0) == Some(first2);
        root[40..44].copy_from_slice(&(first2 | continued as u32).to_le_bytes());
        root[44..48].copy_from_slice(&2u32.to_le_bytes());
        root
    }

    fn link(&self, dir: ext2_ino_t, name: &[u8], ino: ext2_ino_t, ft: c_int) -> Result<()> {
        let cname = entry_name(name)?;
        self.with_dir_space(
            dir,
            || format!("link {}", escape(name)),
            // SAFETY: live handle, NUL-terminated name, allocated inode.
            || unsafe { ext2fs_link(self.fs, dir, cname.as_ptr(), ino, ft) },
        )
    }

    /// Creates a directory.
    /// The parent's link count follows ext4's `dir_nlink` rule: past
    /// [`EXT2_LINK_MAX`] it is 1 ("many"), and stays 1.
    pub fn mkdir(&self, parent: ext2_ino_t, name: &[u8], a: &Attrs) -> Result<ext2_ino_t> {
        entry_name(name)?;
        let before = self.read_inode(parent)?.i.i_links_count;
        let ino = self.new_inode(parent, mode::S_IFDIR)?;
        // Made without a name, then linked here: with a name, libext2fs
        // first looks it up with a scan of the whole parent, which made
        // big directories quadratic to fill.
        // SAFETY: live handle; `ino` is free; a NULL name makes the
        // directory (its block, `.`, `..`, the parent's count) unlinked.
        let rc = unsafe { ext2fs_mkdir(self.fs, parent, ino, std::ptr::null()) };
        self.check(|| format!("mkdir {}", escape(name)), rc)?;
        self.link(parent, name, ino, EXT2_FT_DIR)?;
        let mut p = self.read_inode(parent)?;
        p.i.i_links_count = if before == 1 || before >= EXT2_LINK_MAX {
            1
        } else {
            before + 1
        };
        self.write_inode(parent, &mut p)?;
        self.set_attrs(ino, a)?;
        Ok(ino)
    }

    /// Creates a symbolic link.
    pub fn symlink(
        &self,
        parent: ext2_ino_t,
        name: &[u8],
        target: &[u8],
        a: &Attrs,
    ) -> Result<ext2_ino_t> {
        entry_name(name)?;
        if target.len() >= BLOCK as usize {
            return Err(Error::BadEntry(format!(
                "symlink target is {} bytes; ext4 allows at most {}",
                target.len(),
                BLOCK - 1
            )));
        }
        let ctarget = cstr(target, "symlink target")?;
        let ino = self.new_inode(parent, mode::S_IFLNK)?;
        // Made without a name, then linked here (as for `mkdir`).
        // SAFETY: live handle; the target is NUL-terminated; `ino` is free;
        // a NULL name makes the symlink's inode unlinked.
        let rc =
            unsafe { ext2fs_symlink(self.fs, parent, ino, std::ptr::null(), ctarget.as_ptr()) };
        self.check(|| format!("symlink {}", escape(name)), rc)?;
        self.link(parent, name, ino, EXT2_FT_SYMLINK)?;
        let mut a = a.clone();
        a.perm = 0o777;
        self.set_attrs(ino, &a)?;
        Ok(ino)
    }

    fn new_plain_inode(
        &self,
        parent: ext2_ino_t,
        name: &[u8],
        kind: u16,
        ft: c_int,
    ) -> Result<ext2_ino_t> {
        let ino = self.new_inode(parent, kind)?;
        self.link(parent, name, ino, ft)?;
        // SAFETY: live handle; `ino` was just linked.
        unsafe { ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0) };
        Ok(ino)
    }

    /// Creates a device node, fifo or socket.
    pub fn mknod(
        &self,
        parent: ext2_ino_t,
        name: &[u8],
        kind: u16,
        major: u32,
        minor: u32,
        a: &Attrs,
    ) -> Result<ext2_ino_t> {
        let ft = match kind {
            mode::S_IFCHR => EXT2_FT_CHRDEV,
            mode::S_IFBLK => EXT2_FT_BLKDEV,
            mode::S_IFIFO => EXT2_FT_FIFO,
            _ => EXT2_FT_SOCK,
        };
        let ino = self.new_plain_inode(parent, name, kind, ft)?;
        let mut inode = Inode256::default();
        Self::fill_attrs(&mut inode.i, kind, a);
        inode.i.i_links_count = 1;
        inode.i.i_extra_isize = EXTRA_ISIZE;
        if kind == mode::S_IFCHR || kind == mode::S_IFBLK {
            if major < 256 && minor < 256 {
                inode.i.i_block[0] = major * 256 + minor;
            } else {
                inode.i.i_block[1] = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
            }
        }
        self.write_inode(ino, &mut inode)?;
        Ok(ino)
    }

    /// Creates a regular file of `size` bytes. `data` holds the bytes of
    /// `extents` (offset, length) in order, or of the whole file when `None`;
    /// the rest reads as zeros. All-zero 4 KiB pieces become holes.
    pub fn create_file(
        &self,
        parent: ext2_ino_t,
        name: &[u8],
        a: &Attrs,
        size: u64,
        extents: Option<&[(u64, u64)]>,
        data: &mut dyn Read,
    ) -> Result<ext2_ino_t> {
        let ino = self.new_plain_inode(parent, name, mode::S_IFREG, EXT2_FT_REG_FILE)?;
        let mut inode = Inode256::default();
        Self::fill_attrs(&mut inode.i, mode::S_IFREG, a);
        inode.i.i_links_count = 1;
        inode.i.i_extra_isize = EXTRA_ISIZE;
        inode.i.i_flags = EXT4_EXTENTS_FL;
        // Empty extent tree header: magic, 0 entries, room for 4, depth 0.
        inode.i.i_block[0] = 0xF30A;
        inode.i.i_block[1] = 4;
        self.write_inode(ino, &mut inode)?;
        if size == 0 {
            return Ok(ino);
        }
        let mut file: ext2_file_t = std::ptr::null_mut();
        // SAFETY: live handle, inode just written.
        let rc = unsafe { ext2fs_file_open(self.fs, ino, EXT2_FILE_WRITE, &mut file) };
        self.check(|| "open file".into(), rc)?;
        let r = self.fill_file(file, size, extents, data);
        // SAFETY: `file` is open; closing it writes the inode back.
        let rc = unsafe { ext2fs_file_close(file) };
        r?;
        self.check(|| "close file".into(), rc)?;
        Ok(ino)
    }

    fn fill_file(
        &self,
        file: ext2_file_t,
        size: u64,
        extents: Option<&[(u64, u64)]>,
        data: &mut dyn Read,
    ) -> Result<()> {
        let whole = [(0, size)];
        let extents = extents.unwrap_or(&whole);
        let biggest = extents.iter().map(|e| e.1).max().unwrap_or(0);
        let mut buf = vec![0u8; biggest.min(1 << 20) as usize];
        let mut file_pos = 0u64;
        for &(base, len) in extents {
            if base.checked_add(len).is_none_or(|e| e > size) {
                return Err(Error::BadEntry(format!(
                    "sparse extent {base}+{len} is past the file size {size}"
                )));
            }
            self.fill_extent(file, base, len, data, &mut buf, &mut file_pos)?;
        }
        // SAFETY: open file; sets i_size (covers a trailing hole).
        let rc = unsafe { ext2fs_file_set_size2(file, size) };
        self.check(|| format!("set size {size}"), rc)
    }

    /// Writes `size` bytes of `data` at file offset `base`, skipping all-zero
    /// 4 KiB pieces (they read as zeros anyway).
    fn fill_extent(
        &self,
        file: ext2_file_t,
        base: u64,
        size: u64,
        data: &mut dyn Read,
        buf: &mut [u8],
        file_pos: &mut u64,
    ) -> Result<()> {
        let mut pos = 0u64;
        while pos < size {
            let want = (size - pos).min(buf.len() as u64) as usize;
            data.read_exact(&mut buf[..want])
                .map_err(|e| Error::io(format!("reading file data at {pos}"), e))?;
            let mut off = 0usize;
            while off < want {
                let end = (off + BLOCK as usize).min(want);
                if buf[off..end].iter().all(|&b| b == 0) {
                    off = end;
                    continue;
                }
                // A run of non-zero blocks.
                let mut run_end = end;
                while run_end < want {
                    let e2 = (run_end + BLOCK as usize).min(want);
                    if buf[run_end..e2].iter().all(|&b| b == 0) {
                        break;
                    }
                    run_end = e2;
                }
                let at = base + pos + off as u64;
                if at != *file_pos {
                    let mut ret = 0u64;
                    // SAFETY: open file handle; plain seek.
                    let rc = unsafe { ext2fs_file_llseek(file, at, EXT2_SEEK_SET, &mut ret) };
                    self.check(|| format!("seek to {at}"), rc)?;
                }
                let mut written = 0u32;
                let chunk = &buf[off..run_end];
                // SAFETY: open file; `chunk` is valid for its length (≤ 1 MiB).
                let rc = unsafe {
                    ext2fs_file_write(
                        file,
                        chunk.as_ptr() as *const c_void,
                        chunk.len() as u32,
                        &mut written,
                    )
                };
                self.check(|| format!("write {} bytes at {at}", chunk.len()), rc)?;
                if written as usize != chunk.len() {
                    return Err(Error::BadEntry(format!("short write at {at}")));
                }
                *file_pos = at + chunk.len() as u64;
                off = run_end;
            }
            pos += want as u64;
        }
        Ok(())
    }

    /// Adds a hard link to `ino`.
    pub fn hardlink(&self, parent: ext2_ino_t, name: &[u8], ino: ext2_ino_t) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        let ft = match inode.i.i_mode & mode::S_IFMT {
            mode::S_IFREG => EXT2_FT_REG_FILE,
            mode::S_IFLNK => EXT2_FT_SYMLINK,
            mode::S_IFCHR => EXT2_FT_CHRDEV,
            mode::S_IFBLK => EXT2_FT_BLKDEV,
            mode::S_IFIFO => EXT2_FT_FIFO,
            mode::S_IFSOCK => EXT2_FT_SOCK,
            _ => return Err(Error::BadEntry("hard link to a directory".into())),
        };
        if inode.i.i_links_count >= EXT2_LINK_MAX {
            return Err(Error::TooManyLinks {
                target: format!("inode {ino}"),
                links: inode.i.i_links_count.into(),
                max: EXT2_LINK_MAX.into(),
            });
        }
        self.link(parent, name, ino, ft)?;
        inode.i.i_links_count += 1;
        self.write_inode(ino, &mut inode)
    }

    /// The entries of a directory, without `.` and `..`.
    pub fn list_dir(&self, dir: ext2_ino_t) -> Result<Vec<(Vec<u8>, ext2_ino_t)>> {
        unsafe extern "C" fn cb(
            _dir: ext2_ino_t,
            _entry: c_int,
            dirent: *mut ext2_dir_entry,
            _offset: c_int,
            _blocksize: c_int,
            _buf: *mut c_char,
            data: *mut c_void,
        ) -> c_int {
            // SAFETY: libext2fs passes a valid entry; `data` is our Vec.
            unsafe {
                let out = &mut *(data as *mut Vec<(Vec<u8>, ext2_ino_t)>);
                let len = ((*dirent).name_len & 0xff) as usize;
                let name = std::slice::from_raw_parts((*dirent).name.as_ptr() as *const u8, len);
                if (*dirent).inode != 0 && name != b"." && name != b".." {
                    out.push((name.to_vec(), (*dirent).inode));
                }
            }
            0
        }
        let mut out: Vec<(Vec<u8>, ext2_ino_t)> = Vec::new();
        // SAFETY: live handle; the callback only appends to `out`, which
        // outlives the call.
        let rc = unsafe {
            ext2fs_dir_iterate2(
                self.fs,
                dir,
                0,
                std::ptr::null_mut(),
                cb,
                &mut out as *mut _ as *mut c_void,
            )
        };
        self.check(|| format!("list directory inode {dir}"), rc)?;
        Ok(out)
    }

    /// Removes `name` (inode `ino`) from `parent`, recursively for
    /// directories (depth first, without recursion: trees may be tens of
    /// thousands of levels deep), freeing inodes whose last link goes.
    /// `gone_dir` hears of every directory inode freed.
    pub fn remove(
        &self,
        parent: ext2_ino_t,
        name: &[u8],
        ino: ext2_ino_t,
        gone_dir: &mut dyn FnMut(ext2_ino_t),
    ) -> Result<()> {
        /// An entry to remove once its own entries (if a directory) are.
        struct Pending {
            parent: ext2_ino_t,
            name: Vec<u8>,
            ino: ext2_ino_t,
            /// The directory's entries not yet removed (None: not listed).
            left: Option<Vec<(Vec<u8>, ext2_ino_t)>>,
        }
        let mut stack = vec![Pending {
            parent,
            name: name.to_vec(),
            ino,
            left: None,
        }];
        while let Some(top) = stack.last_mut() {
            if top.left.is_none() {
                let is_dir = self.read_inode(top.ino)?.i.i_mode & mode::S_IFMT == mode::S_IFDIR;
                top.left = Some(if is_dir {
                    self.list_dir(top.ino)?
                } else {
                    Vec::new()
                });
            }
            let dir = top.ino;
            if let Some((child, cino)) = top.left.as_mut().and_then(Vec::pop) {
                stack.push(Pending {
                    parent: dir,
                    name: child,
                    ino: cino,
                    left: None,
                });
                continue;
            }
            let done = stack.pop().expect("the top");
            if self.remove_entry(done.parent, &done.name, done.ino)? {
                gone_dir(done.ino);
            }
        }
        Ok(())
    }

    /// Removes one entry (an empty directory, or a non-directory) and frees
    /// its inode if that was its last link. Returns whether a directory was
    /// freed.
    fn remove_entry(&self, parent: ext2_ino_t, name: &[u8], ino: ext2_ino_t) -> Result<bool> {
        let inode = self.read_inode(ino)?;
        let is_dir = inode.i.i_mode & mode::S_IFMT == mode::S_IFDIR;
        self.unlink(parent, name, ino)?;
        let mut inode = self.read_inode(ino)?;
        if is_dir {
            let mut p = self.read_inode(parent)?;
            if p.i.i_links_count > 2 {
                p.i.i_links_count -= 1;
                self.write_inode(parent, &mut p)?;
            }
            inode.i.i_links_count = 0;
        } else {
            inode.i.i_links_count = inode.i.i_links_count.saturating_sub(1);
        }
        if inode.i.i_links_count > 0 {
            self.write_inode(ino, &mut inode)?;
            return Ok(false);
        }
        self.write_inode(ino, &mut inode)?;
        // SAFETY: live handle; 256-byte inode buffer; frees the EA block
        // (refcounted) and in-inode attributes, writing the inode back.
        let rc = unsafe {
            ext2fs_free_ext_attr(self.fs, ino, &mut inode as *mut Inode256 as *mut c_void)
        };
        self.check(|| "free xattrs".into(), rc)?;
        let mut inode = self.read_inode(ino)?;
        // SAFETY: live handle; the inode buffer is at least a struct ext2_inode.
        if unsafe {
            ext2fs_inode_has_valid_blocks2(self.fs, &mut inode as *mut Inode256 as *mut c_void)
        } != 0
        {
            // SAFETY: as above; punches every block and writes the inode.
            let rc = unsafe {
                ext2fs_punch(
                    self.fs,
                    ino,
                    &mut inode as *mut Inode256 as *mut c_void,
                    std::ptr::null_mut(),
                    0,
                    !0u64,
                )
            };
            self.check(|| "free blocks".into(), rc)?;
        }
        let mut inode = self.read_inode(ino)?;
        inode.i.i_dtime = FS_TIME as u32;
        self.write_inode(ino, &mut inode)?;
        // SAFETY: live handle; the inode is no longer referenced.
        unsafe { ext2fs_inode_alloc_stats2(self.fs, ino, -1, is_dir as c_int) };
        Ok(is_dir)
    }

    /// Removes the entry `name` → `ino` from directory `dir`. In a
    /// hash-indexed directory only the leaf its hash leads to is read and
    /// rewritten (libext2fs's `ext2fs_unlink` scans every block, which made
    /// whiteouts quadratic); anything unexpected falls back to that scan.
    fn unlink(&self, dir: ext2_ino_t, name: &[u8], ino: ext2_ino_t) -> Result<()> {
        if self.dx_unlink(dir, name, ino)? {
            return Ok(());
        }
        let cname = cstr(name, "name")?;
        // SAFETY: live handle; NUL-terminated name.
        let rc = unsafe { ext2fs_unlink(self.fs, dir, cname.as_ptr(), ino, 0) };
        self.check(|| format!("unlink {}", escape(name)), rc)
    }

    /// Reads logical block `lblk` of directory `dir` into `buf` (checksums
    /// verified); returns its physical block.
    fn read_dir_block(&self, dir: ext2_ino_t, lblk: u64, buf: &mut [u8]) -> Result<u64> {
        let pblk = self.dir_block_pblk(dir, lblk)?;
        // SAFETY: live handle; `buf` is one block.
        let rc = unsafe {
            ext2fs_read_dir_block4(self.fs, pblk, buf.as_mut_ptr() as *mut c_void, 0, dir)
        };
        self.check(|| format!("read directory {dir} block {lblk}"), rc)?;
        Ok(pblk)
    }

    /// [`Self::unlink`] through the hash index: walks the dx root (and
    /// nodes) to the leaf that holds `name`'s hash and removes the entry
    /// there. Returns `false`, having changed nothing, when `dir` is not
    /// indexed or the entry is not in that leaf (a hash collision run over
    /// several leaves).
    fn dx_unlink(&self, dir: ext2_ino_t, name: &[u8], ino: ext2_ino_t) -> Result<bool> {
        let inode = self.read_inode(dir)?;
        if inode.i.i_flags & EXT2_INDEX_FL == 0 {
            return Ok(false);
        }
        let bs = BLOCK as usize;
        let mut buf = vec![0u8; bs];
        self.read_dir_block(dir, 0, &mut buf)?;
        // dx_root_info after `.` and `..`: hash version, info length, levels.
        let (version, info_len, levels) = (buf[28], buf[29] as usize, buf[30]);
        if info_len != 8 || levels > 2 {
            return Ok(false);
        }
        let (hash, _) = self.dirhash(version, name)?;
        // The count/limit header of the index entries in `buf`.
        let mut at = 24 + info_len;
        let mut level = 0;
        let leaf = loop {
            let count = get_u16(&buf, at + 2) as usize;
            if count == 0 || at + count * 8 > bs {
                return Ok(false);
            }
            // The last entry whose hash is <= ours (entry 0 covers from 0).
            let mut pick = 0;
            for i in 1..count {
                if get_u32(&buf, at + 8 * i) & !1 > hash {
                    break;
                }
                pick = i;
            }
            let block = u64::from(get_u32(&buf, at + 8 * pick + 4) & 0x0fff_ffff);
            if level == levels {
                break block;
            }
            self.read_dir_block(dir, block, &mut buf)?;
            // A dx node: one empty entry spanning the block, then the header.
            at = 8;
            level += 1;
        };
        let pblk = self.read_dir_block(dir, leaf, &mut buf)?;
        let (mut off, mut prev) = (0usize, None);
        while off + 8 <= bs {
            let rec = get_u16(&buf, off + 4) as usize;
            let nlen = buf[off + 6] as usize;
            if rec < 8 || off + rec > bs || 8 + nlen > rec {
                return Ok(false);
            }
            if get_u32(&buf, off) == ino && &buf[off + 8..off + 8 + nlen] == name {
                match prev {
                    // Merge into the entry before, as ext2fs_unlink does.
                    Some(p) => {
                        let merged = get_u16(&buf, p + 4) as usize + rec;
                        put_u16(&mut buf, p + 4, merged as u16);
                    }
                    None => put_u32(&mut buf, off, 0),
                }
                // SAFETY: live handle; one block; the checksum is recomputed.
                let rc = unsafe {
                    ext2fs_write_dir_block4(self.fs, pblk, buf.as_mut_ptr() as *mut c_void, 0, dir)
                };
                self.check(|| format!("unlink {}", escape(name)), rc)?;
                return Ok(true);
            }
            prev = Some(off);
            off += rec;
        }
        Ok(false)
    }

    /// The (major, minor) directory hash of `name` for hash version
    /// `version` (the superblock's signedness applied) and the
    /// filesystem's seed.
    fn dirhash(&self, version: u8, name: &[u8]) -> Result<(u32, u32)> {
        let mut version = c_int::from(version);
        if version <= 2 && self.super_u32(sb::S_FLAGS) & EXT2_FLAGS_UNSIGNED_HASH != 0 {
            version += 3;
        }
        let mut seed = [0u32; 4];
        for (i, w) in seed.iter_mut().enumerate() {
            *w = get_u32(self.super_bytes(), sb::S_HASH_SEED + 4 * i);
        }
        let (mut h, mut m) = (0u32, 0u32);
        // SAFETY: `name` is valid for its length; `seed` is 4 words.
        let rc = unsafe {
            ext2fs_dirhash2(
                version,
                name.as_ptr() as *const c_char,
                name.len() as c_int,
                std::ptr::null(),
                0,
                seed.as_ptr(),
                &mut h,
                &mut m,
            )
        };
        self.check(|| "hash a name".into(), rc)?;
        Ok((h, m))
    }

    /// Replaces all extended attributes of `ino` with `xattrs`.
    pub fn set_xattrs(
        &self,
        ino: ext2_ino_t,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        clear: bool,
    ) -> Result<()> {
        if xattrs.is_empty() && !clear {
            return Ok(());
        }
        let mut h: xattr_handle = std::ptr::null_mut();
        // SAFETY: live handle; `h` receives a new xattr handle.
        let rc = unsafe { ext2fs_xattrs_open(self.fs, ino, &mut h) };
        self.check(|| "open xattrs".into(), rc)?;
        let r = (|| -> Result<()> {
            // SAFETY: `h` is open.
            let rc = unsafe { ext2fs_xattrs_read(h) };
            self.check(|| "read xattrs".into(), rc)?;
            if clear {
                unsafe extern "C" fn collect(
                    name: *mut c_char,
                    _v: *mut c_char,
                    _l: usize,
                    data: *mut c_void,
                ) -> c_int {
                    // SAFETY: `name` is NUL-terminated; `data` is our Vec.
                    unsafe {
                        let out = &mut *(data as *mut Vec<CString>);
                        out.push(CStr::from_ptr(name).to_owned());
                    }
                    0
                }
                let mut names: Vec<CString> = Vec::new();
                // SAFETY: `h` is open; the callback only appends to `names`.
                let rc = unsafe {
                    ext2fs_xattrs_iterate(h, collect, &mut names as *mut _ as *mut c_void)
                };
                self.check(|| "list xattrs".into(), rc)?;
                for n in names {
                    // SAFETY: `h` is open; `n` is NUL-terminated.
                    let rc = unsafe { ext2fs_xattr_remove(h, n.as_ptr()) };
                    self.check(|| format!("remove xattr {}", escape(n.as_bytes())), rc)?;
                }
            }
            for (k, v) in xattrs {
                let key = cstr(k, "xattr name")?;
                // SAFETY: `h` is open; key NUL-terminated; value with length.
                let rc = unsafe {
                    ext2fs_xattr_set(h, key.as_ptr(), v.as_ptr() as *const c_void, v.len())
                };
                self.check(|| format!("set xattr {}", escape(k)), rc)?;
            }
            Ok(())
        })();
        // SAFETY: `h` is open; close writes the attributes and frees it.
        let rc = unsafe { ext2fs_xattrs_close(&mut h) };
        r?;
        self.check(|| "write xattrs".into(), rc)
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if !self.fs.is_null() {
            // SAFETY: an unclosed live handle (an error path): free it
            // without writing anything back.
            unsafe { ext2fs_free(self.fs) };
        }
    }
}
