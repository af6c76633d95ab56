//! Hand-written declarations for the parts of Debian's libext2fs (1.47) and
//! libcom_err the converter uses. No bindgen: every struct here is checked
//! against the C headers by `tests::layout_matches_c_headers`, which compiles
//! a small C program printing `offsetof`/`sizeof` and compares.
//!
//! Structs we only ever see through a pointer (`struct_ext2_filsys`) are
//! declared as a *prefix*: the fields up to the last one we read or write, so
//! they must never be created or moved by value on the Rust side.

#![allow(non_camel_case_types, dead_code)]

use std::os::raw::{c_char, c_int, c_long, c_uint, c_ulong, c_ulonglong, c_void};

pub type errcode_t = c_long;
pub type ext2_ino_t = u32;
pub type blk64_t = u64;
pub type dgrp_t = u32;
pub type ext2_filsys = *mut struct_ext2_filsys;
pub type io_channel = *mut struct_io_channel;
pub type io_manager = *const struct_io_manager;
pub type ext2_file_t = *mut c_void;
pub type xattr_handle = *mut c_void;

// ext2_err.h
pub const EXT2_ET_MAGIC_IO_CHANNEL: errcode_t = 2133571333;
pub const EXT2_ET_MAGIC_IO_MANAGER: errcode_t = 2133571335;
pub const EXT2_ET_SHORT_READ: errcode_t = 2133571364;
pub const EXT2_ET_DIR_NO_SPACE: errcode_t = 2133571366;
pub const EXT2_ET_FILE_NOT_FOUND: errcode_t = 2133571404;
/// Generic "bad argument" code used by our io_manager for impossible requests.
pub const EXT2_ET_INVALID_ARGUMENT: errcode_t = 2133571398;
pub const EXT2_ET_LLSEEK_FAILED: errcode_t = 2133571397;

// ext2fs.h flags
pub const EXT2_FLAG_RW: c_int = 0x01;
pub const EXT2_FLAG_64BITS: c_int = 0x20000;
pub const EXT2_FILE_WRITE: c_int = 0x0001;
pub const IO_FLAG_RW: c_int = 0x0001;
pub const EXT2_SEEK_SET: c_int = 0;
pub const DIRENT_ABORT: c_int = 2;

// ext2_fs.h
pub const EXT2_BAD_INO: ext2_ino_t = 1;
pub const EXT2_ROOT_INO: ext2_ino_t = 2;
pub const EXT2_GOOD_OLD_FIRST_INO: ext2_ino_t = 11;
pub const EXT2_BG_INODE_ZEROED: u16 = 0x0004;
pub const EXT4_EXTENTS_FL: u32 = 0x0008_0000;
pub const EXT2_INDEX_FL: u32 = 0x0000_1000;
/// Most links an inode may have (`EXT2_LINK_MAX`, ext2_fs.h).
pub const EXT2_LINK_MAX: u16 = 65000;
/// Longest name in a directory entry (`EXT2_NAME_LEN`, ext2_fs.h).
pub const EXT2_NAME_LEN: usize = 255;
pub const EXT2_FLAGS_UNSIGNED_HASH: u32 = 0x0002;
pub const EXT2_FT_REG_FILE: c_int = 1;
pub const EXT2_FT_DIR: c_int = 2;
pub const EXT2_FT_CHRDEV: c_int = 3;
pub const EXT2_FT_BLKDEV: c_int = 4;
pub const EXT2_FT_FIFO: c_int = 5;
pub const EXT2_FT_SOCK: c_int = 6;
pub const EXT2_FT_SYMLINK: c_int = 7;

/// `struct struct_io_channel` (ext2_io.h), complete: we allocate these.
#[repr(C)]
pub struct struct_io_channel {
    pub magic: errcode_t,
    pub manager: io_manager,
    pub name: *mut c_char,
    pub block_size: c_int,
    pub read_error: Option<
        unsafe extern "C" fn(
            io_channel,
            c_ulong,
            c_int,
            *mut c_void,
            usize,
            c_int,
            errcode_t,
        ) -> errcode_t,
    >,
    pub write_error: Option<
        unsafe extern "C" fn(
            io_channel,
            c_ulong,
            c_int,
            *const c_void,
            usize,
            c_int,
            errcode_t,
        ) -> errcode_t,
    >,
    pub refcount: c_int,
    pub flags: c_int,
    pub reserved: [c_long; 14],
    pub private_data: *mut c_void,
    pub app_data: *mut c_void,
    pub align: c_int,
}

/// `struct struct_io_stats` (ext2_io.h).
#[repr(C)]
pub struct struct_io_stats {
    pub num_fields: c_int,
    pub reserved: c_int,
    pub bytes_read: c_ulonglong,
    pub bytes_written: c_ulonglong,
}

type OpenFn = unsafe extern "C" fn(*const c_char, c_int, *mut io_channel) -> errcode_t;
type ChanFn = unsafe extern "C" fn(io_channel) -> errcode_t;
type BlksizeFn = unsafe extern "C" fn(io_channel, c_int) -> errcode_t;
type ReadBlkFn = unsafe extern "C" fn(io_channel, c_ulong, c_int, *mut c_void) -> errcode_t;
type WriteBlkFn = unsafe extern "C" fn(io_channel, c_ulong, c_int, *const c_void) -> errcode_t;
type OptionFn = unsafe extern "C" fn(io_channel, *const c_char, *const c_char) -> errcode_t;
type StatsFn = unsafe extern "C" fn(io_channel, *mut *mut struct_io_stats) -> errcode_t;
type ReadBlk64Fn = unsafe extern "C" fn(io_channel, c_ulonglong, c_int, *mut c_void) -> errcode_t;
type WriteBlk64Fn =
    unsafe extern "C" fn(io_channel, c_ulonglong, c_int, *const c_void) -> errcode_t;
type RangeFn = unsafe extern "C" fn(io_channel, c_ulonglong, c_ulonglong) -> errcode_t;

/// `struct struct_io_manager` (ext2_io.h), complete: ours is a `static`.
#[repr(C)]
pub struct struct_io_manager {
    pub magic: errcode_t,
    pub name: *const c_char,
    pub open: Option<OpenFn>,
    pub close: Option<ChanFn>,
    pub set_blksize: Option<BlksizeFn>,
    pub read_blk: Option<ReadBlkFn>,
    pub write_blk: Option<WriteBlkFn>,
    pub flush: Option<ChanFn>,
    pub write_byte: Option<WriteBlkFn>,
    pub set_option: Option<OptionFn>,
    pub get_stats: Option<StatsFn>,
    pub read_blk64: Option<ReadBlk64Fn>,
    pub write_blk64: Option<WriteBlk64Fn>,
    pub discard: Option<RangeFn>,
    pub cache_readahead: Option<RangeFn>,
    pub zeroout: Option<RangeFn>,
    pub reserved: [c_long; 14],
}

// SAFETY: the manager is an immutable table of function pointers and a
// pointer to a static C string; sharing it between threads is sound.
unsafe impl Sync for struct_io_manager {}

/// Prefix of `struct struct_ext2_filsys` (ext2fs.h) up to `now`. Only ever
/// used behind the pointer libext2fs hands out.
#[repr(C)]
pub struct struct_ext2_filsys {
    pub magic: errcode_t,
    pub io: io_channel,
    pub flags: c_int,
    pub device_name: *mut c_char,
    pub super_: *mut u8,
    pub blocksize: c_uint,
    pub fragsize: c_int,
    pub group_desc_count: dgrp_t,
    pub desc_blocks: c_ulong,
    pub group_desc: *mut c_void,
    pub inode_blocks_per_group: c_uint,
    pub inode_map: *mut c_void,
    pub block_map: *mut c_void,
    pub get_blocks: *mut c_void,
    pub check_directory: *mut c_void,
    pub write_bitmaps: *mut c_void,
    pub read_inode: *mut c_void,
    pub write_inode: *mut c_void,
    pub badblocks: *mut c_void,
    pub dblist: *mut c_void,
    pub stride: u32,
    pub orig_super: *mut u8,
    pub image_header: *mut c_void,
    pub umask: u32,
    pub now: libc::time_t,
}

/// `struct ext2_inode_large` (ext2_fs.h), with the Linux `osd1`/`osd2` views.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ext2_inode_large {
    pub i_mode: u16,
    pub i_uid: u16,
    pub i_size: u32,
    pub i_atime: u32,
    pub i_ctime: u32,
    pub i_mtime: u32,
    pub i_dtime: u32,
    pub i_gid: u16,
    pub i_links_count: u16,
    pub i_blocks: u32,
    pub i_flags: u32,
    pub l_i_version: u32,
    pub i_block: [u32; 15],
    pub i_generation: u32,
    pub i_file_acl: u32,
    pub i_size_high: u32,
    pub i_faddr: u32,
    pub l_i_blocks_hi: u16,
    pub l_i_file_acl_high: u16,
    pub l_i_uid_high: u16,
    pub l_i_gid_high: u16,
    pub l_i_checksum_lo: u16,
    pub l_i_reserved: u16,
    pub i_extra_isize: u16,
    pub i_checksum_hi: u16,
    pub i_ctime_extra: u32,
    pub i_mtime_extra: u32,
    pub i_atime_extra: u32,
    pub i_crtime: u32,
    pub i_crtime_extra: u32,
    pub i_version_hi: u32,
    pub i_projid: u32,
}

/// An on-disk inode of 256 bytes (our inode size): the large inode plus the
/// in-inode xattr space, so whole inodes are written and no stale bytes of a
/// freed inode survive its reuse.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Inode256 {
    pub i: ext2_inode_large,
    pub tail: [u8; 256 - std::mem::size_of::<ext2_inode_large>()],
}

impl Default for Inode256 {
    fn default() -> Self {
        Inode256 {
            i: ext2_inode_large::default(),
            tail: [0; 256 - std::mem::size_of::<ext2_inode_large>()],
        }
    }
}

/// `struct ext2_dir_entry` (ext2_fs.h).
#[repr(C)]
pub struct ext2_dir_entry {
    pub inode: u32,
    pub rec_len: u16,
    pub name_len: u16,
    pub name: [c_char; 255],
}

/// Byte offsets of the `struct ext2_super_block` fields we set (ext2_fs.h);
/// the struct is handled as 1024 raw bytes. Checked by the layout test.
pub mod sb {
    pub const SIZE: usize = 1024;
    pub const S_INODES_COUNT: usize = 0x00;
    pub const S_BLOCKS_COUNT: usize = 0x04;
    pub const S_LOG_BLOCK_SIZE: usize = 0x18;
    pub const S_MTIME: usize = 0x2C;
    pub const S_WTIME: usize = 0x30;
    pub const S_MAX_MNT_COUNT: usize = 0x36;
    pub const S_LASTCHECK: usize = 0x40;
    pub const S_CHECKINTERVAL: usize = 0x44;
    pub const S_REV_LEVEL: usize = 0x4C;
    pub const S_INODE_SIZE: usize = 0x58;
    pub const S_FEATURE_COMPAT: usize = 0x5C;
    pub const S_FEATURE_INCOMPAT: usize = 0x60;
    pub const S_FEATURE_RO_COMPAT: usize = 0x64;
    pub const S_UUID: usize = 0x68;
    pub const S_HASH_SEED: usize = 0xEC;
    pub const S_DEF_HASH_VERSION: usize = 0xFC;
    pub const S_DESC_SIZE: usize = 0xFE;
    pub const S_DEFAULT_MOUNT_OPTS: usize = 0x100;
    pub const S_MKFS_TIME: usize = 0x108;
    pub const S_BLOCKS_COUNT_HI: usize = 0x150;
    pub const S_LOG_GROUPS_PER_FLEX: usize = 0x174;
    pub const S_CHECKSUM_TYPE: usize = 0x175;
    pub const S_KBYTES_WRITTEN: usize = 0x178;
    pub const S_INODES_PER_GROUP: usize = 0x28;
    pub const S_FIRST_INO: usize = 0x54;
    pub const S_FLAGS: usize = 0x160;
}

#[link(name = "ext2fs")]
extern "C" {
    pub fn ext2fs_initialize(
        name: *const c_char,
        flags: c_int,
        param: *mut u8,
        manager: io_manager,
        ret_fs: *mut ext2_filsys,
    ) -> errcode_t;
    pub fn ext2fs_open(
        name: *const c_char,
        flags: c_int,
        superblock: c_int,
        block_size: c_uint,
        manager: io_manager,
        ret_fs: *mut ext2_filsys,
    ) -> errcode_t;
    pub fn initialize_ext2_error_table();
    pub fn ext2fs_close_free(fs: *mut ext2_filsys) -> errcode_t;
    pub fn ext2fs_free(fs: ext2_filsys);
    pub fn ext2fs_flush(fs: ext2_filsys) -> errcode_t;
    pub fn ext2fs_read_bitmaps(fs: ext2_filsys) -> errcode_t;
    pub fn ext2fs_allocate_tables(fs: ext2_filsys) -> errcode_t;
    pub fn ext2fs_init_csum_seed(fs: ext2_filsys);
    pub fn ext2fs_bg_flags_set(fs: ext2_filsys, group: dgrp_t, flags: u16);
    pub fn ext2fs_group_desc_csum_set(fs: ext2_filsys, group: dgrp_t);
    pub fn ext2fs_mkdir(
        fs: ext2_filsys,
        parent: ext2_ino_t,
        inum: ext2_ino_t,
        name: *const c_char,
    ) -> errcode_t;
    pub fn ext2fs_lookup(
        fs: ext2_filsys,
        dir: ext2_ino_t,
        name: *const c_char,
        namelen: c_int,
        buf: *mut c_char,
        inode: *mut ext2_ino_t,
    ) -> errcode_t;
    pub fn ext2fs_expand_dir(fs: ext2_filsys, dir: ext2_ino_t) -> errcode_t;
    pub fn ext2fs_inode_alloc_stats2(fs: ext2_filsys, ino: ext2_ino_t, inuse: c_int, isdir: c_int);
    pub fn ext2fs_update_bb_inode(fs: ext2_filsys, bb_list: *mut c_void) -> errcode_t;
    pub fn ext2fs_new_inode(
        fs: ext2_filsys,
        dir: ext2_ino_t,
        mode: c_int,
        map: *mut c_void,
        ret: *mut ext2_ino_t,
    ) -> errcode_t;
    pub fn ext2fs_link(
        fs: ext2_filsys,
        dir: ext2_ino_t,
        name: *const c_char,
        ino: ext2_ino_t,
        flags: c_int,
    ) -> errcode_t;
    pub fn ext2fs_unlink(
        fs: ext2_filsys,
        dir: ext2_ino_t,
        name: *const c_char,
        ino: ext2_ino_t,
        flags: c_int,
    ) -> errcode_t;
    pub fn ext2fs_read_inode_full(
        fs: ext2_filsys,
        ino: ext2_ino_t,
        inode: *mut c_void,
        bufsize: c_int,
    ) -> errcode_t;
    pub fn ext2fs_write_inode_full(
        fs: ext2_filsys,
        ino: ext2_ino_t,
        inode: *mut c_void,
        bufsize: c_int,
    ) -> errcode_t;
    pub fn ext2fs_symlink(
        fs: ext2_filsys,
        parent: ext2_ino_t,
        ino: ext2_ino_t,
        name: *const c_char,
        target: *const c_char,
    ) -> errcode_t;
    pub fn ext2fs_file_open(
        fs: ext2_filsys,
        ino: ext2_ino_t,
        flags: c_int,
        ret: *mut ext2_file_t,
    ) -> errcode_t;
    pub fn ext2fs_file_close(file: ext2_file_t) -> errcode_t;
    pub fn ext2fs_file_read(
        file: ext2_file_t,
        buf: *mut c_void,
        wanted: c_uint,
        got: *mut c_uint,
    ) -> errcode_t;
    pub fn ext2fs_bmap2(
        fs: ext2_filsys,
        ino: ext2_ino_t,
        inode: *mut c_void,
        block_buf: *mut c_char,
        bmap_flags: c_int,
        block: blk64_t,
        ret_flags: *mut c_int,
        phys_blk: *mut blk64_t,
    ) -> errcode_t;
    pub fn ext2fs_read_dir_block4(
        fs: ext2_filsys,
        block: blk64_t,
        buf: *mut c_void,
        flags: c_int,
        ino: ext2_ino_t,
    ) -> errcode_t;
    pub fn ext2fs_write_dir_block4(
        fs: ext2_filsys,
        block: blk64_t,
        buf: *mut c_void,
        flags: c_int,
        ino: ext2_ino_t,
    ) -> errcode_t;
    pub fn ext2fs_dirhash2(
        version: c_int,
        name: *const c_char,
        len: c_int,
        charset: *const c_void,
        hash_flags: c_int,
        seed: *const u32,
        ret_hash: *mut u32,
        ret_minor_hash: *mut u32,
    ) -> errcode_t;
    pub fn ext2fs_is_fast_symlink(inode: *mut c_void) -> c_int;
    pub static unix_io_manager: io_manager;
    pub fn ext2fs_file_write(
        file: ext2_file_t,
        buf: *const c_void,
        nbytes: c_uint,
        written: *mut c_uint,
    ) -> errcode_t;
    pub fn ext2fs_file_llseek(
        file: ext2_file_t,
        offset: u64,
        whence: c_int,
        ret_pos: *mut u64,
    ) -> errcode_t;
    pub fn ext2fs_file_set_size2(file: ext2_file_t, size: u64) -> errcode_t;
    pub fn ext2fs_xattrs_open(
        fs: ext2_filsys,
        ino: ext2_ino_t,
        handle: *mut xattr_handle,
    ) -> errcode_t;
    pub fn ext2fs_xattrs_read(handle: xattr_handle) -> errcode_t;
    pub fn ext2fs_xattrs_iterate(
        handle: xattr_handle,
        func: unsafe extern "C" fn(*mut c_char, *mut c_char, usize, *mut c_void) -> c_int,
        data: *mut c_void,
    ) -> errcode_t;
    pub fn ext2fs_xattr_set(
        handle: xattr_handle,
        key: *const c_char,
        value: *const c_void,
        value_len: usize,
    ) -> errcode_t;
    pub fn ext2fs_xattr_remove(handle: xattr_handle, key: *const c_char) -> errcode_t;
    pub fn ext2fs_xattrs_close(handle: *mut xattr_handle) -> errcode_t;
    pub fn ext2fs_free_ext_attr(fs: ext2_filsys, ino: ext2_ino_t, inode: *mut c_void) -> errcode_t;
    pub fn ext2fs_punch(
        fs: ext2_filsys,
        ino: ext2_ino_t,
        inode: *mut c_void,
        block_buf: *mut c_char,
        start: blk64_t,
        end: blk64_t,
    ) -> errcode_t;
    pub fn ext2fs_inode_has_valid_blocks2(fs: ext2_filsys, inode: *mut c_void) -> c_int;
    pub fn ext2fs_dir_iterate2(
        fs: ext2_filsys,
        dir: ext2_ino_t,
        flags: c_int,
        block_buf: *mut c_char,
        func: unsafe extern "C" fn(
            ext2_ino_t,
            c_int,
            *mut ext2_dir_entry,
            c_int,
            c_int,
            *mut c_char,
            *mut c_void,
        ) -> c_int,
        priv_data: *mut c_void,
    ) -> errcode_t;
}

#[link(name = "com_err")]
extern "C" {
    pub fn error_message(code: c_long) -> *const c_char;
}

/// The com_err text for an error code.
pub fn message(code: errcode_t) -> String {
    static INIT: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers libext2fs's static error table with com_err; the
    // Once makes it happen exactly once.
    INIT.call_once(|| unsafe { initialize_ext2_error_table() });
    // SAFETY: error_message always returns a pointer to a NUL-terminated
    // string (static, or a thread-unsafe static buffer for unknown codes that
    // we copy out immediately).
    unsafe {
        let p = error_message(code);
        if p.is_null() {
            return format!("error {code}");
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use std::process::Command;

    /// Compiles a C program against the real headers and compares every
    /// offset and size the Rust side relies on.
    #[test]
    fn layout_matches_c_headers() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("layout.c");
        let exe = dir.path().join("layout");
        let c = r#"
#include <stdio.h>
#include <stddef.h>
#include <ext2fs/ext2fs.h>
#define O(t, f) printf(#t "." #f " %zu\n", offsetof(t, f))
#define S(t) printf(#t " %zu\n", sizeof(t))
int main(void) {
  S(struct struct_io_channel); S(struct struct_io_manager); S(struct ext2_inode_large);
  S(struct ext2_super_block); S(struct struct_io_stats);
  O(struct struct_io_channel, block_size); O(struct struct_io_channel, refcount);
  O(struct struct_io_channel, private_data); O(struct struct_io_channel, align);
  O(struct struct_io_manager, read_blk64); O(struct struct_io_manager, zeroout);
  O(struct struct_io_manager, write_byte); O(struct struct_io_manager, get_stats);
  O(struct struct_ext2_filsys, super); O(struct struct_ext2_filsys, blocksize);
  O(struct struct_ext2_filsys, group_desc_count); O(struct struct_ext2_filsys, now);
  O(struct ext2_inode_large, i_block); O(struct ext2_inode_large, osd2.linux2.l_i_uid_high);
  O(struct ext2_inode_large, i_extra_isize); O(struct ext2_inode_large, i_crtime);
  O(struct ext2_inode_large, i_projid);
  O(struct ext2_super_block, s_inodes_count); O(struct ext2_super_block, s_blocks_count);
  O(struct ext2_super_block, s_log_block_size); O(struct ext2_super_block, s_mtime);
  O(struct ext2_super_block, s_wtime); O(struct ext2_super_block, s_max_mnt_count);
  O(struct ext2_super_block, s_lastcheck); O(struct ext2_super_block, s_checkinterval);
  O(struct ext2_super_block, s_rev_level); O(struct ext2_super_block, s_inode_size);
  O(struct ext2_super_block, s_feature_compat); O(struct ext2_super_block, s_feature_incompat);
  O(struct ext2_super_block, s_feature_ro_compat); O(struct ext2_super_block, s_uuid);
  O(struct ext2_super_block, s_hash_seed); O(struct ext2_super_block, s_def_hash_version);
  O(struct ext2_super_block, s_desc_size); O(struct ext2_super_block, s_default_mount_opts);
  O(struct ext2_super_block, s_mkfs_time); O(struct ext2_super_block, s_blocks_count_hi);
  O(struct ext2_super_block, s_log_groups_per_flex); O(struct ext2_super_block, s_checksum_type);
  O(struct ext2_super_block, s_kbytes_written); O(struct ext2_super_block, s_inodes_per_group);
  O(struct ext2_super_block, s_first_ino); O(struct ext2_super_block, s_flags);
  O(struct ext2_dir_entry, name_len); O(struct ext2_dir_entry, name);
  return 0;
}
"#;
        std::fs::write(&src, c).unwrap();
        let cflags = env!("OBD_EXT2FS_CFLAGS");
        let st = Command::new("cc")
            .args(cflags.split_whitespace())
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status()
            .expect("run cc");
        assert!(st.success(), "compiling the layout probe failed");
        let out = Command::new(&exe).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let got: std::collections::HashMap<&str, usize> = text
            .lines()
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k, v.parse().unwrap())
            })
            .collect();
        // (C name, Rust value): sizes and renamed fields, then field offsets.
        macro_rules! offsets {
            ($($t:ident . $f:ident),* $(,)?) => {
                [$((concat!("struct ", stringify!($t), ".", stringify!($f)), offset_of!($t, $f))),*]
            };
        }
        macro_rules! sb_offsets {
            ($($f:ident = $c:ident),* $(,)?) => {
                [$((concat!("struct ext2_super_block.", stringify!($f)), sb::$c)),*]
            };
        }
        let mut want: Vec<(&str, usize)> = vec![
            ("struct struct_io_channel", size_of::<struct_io_channel>()),
            ("struct struct_io_manager", size_of::<struct_io_manager>()),
            ("struct ext2_inode_large", size_of::<ext2_inode_large>()),
            ("struct ext2_super_block", sb::SIZE),
            ("struct struct_io_stats", size_of::<struct_io_stats>()),
            (
                "struct struct_ext2_filsys.super",
                offset_of!(struct_ext2_filsys, super_),
            ),
            (
                "struct ext2_inode_large.osd2.linux2.l_i_uid_high",
                offset_of!(ext2_inode_large, l_i_uid_high),
            ),
        ];
        want.extend(offsets!(
            struct_io_channel.block_size,
            struct_io_channel.refcount,
            struct_io_channel.private_data,
            struct_io_channel.align,
            struct_io_manager.read_blk64,
            struct_io_manager.zeroout,
            struct_io_manager.write_byte,
            struct_io_manager.get_stats,
            struct_ext2_filsys.blocksize,
            struct_ext2_filsys.group_desc_count,
            struct_ext2_filsys.now,
            ext2_inode_large.i_block,
            ext2_inode_large.i_extra_isize,
            ext2_inode_large.i_crtime,
            ext2_inode_large.i_projid,
            ext2_dir_entry.name_len,
            ext2_dir_entry.name,
        ));
        want.extend(sb_offsets!(
            s_inodes_count = S_INODES_COUNT,
            s_blocks_count = S_BLOCKS_COUNT,
            s_log_block_size = S_LOG_BLOCK_SIZE,
            s_mtime = S_MTIME,
            s_wtime = S_WTIME,
            s_max_mnt_count = S_MAX_MNT_COUNT,
            s_lastcheck = S_LASTCHECK,
            s_checkinterval = S_CHECKINTERVAL,
            s_rev_level = S_REV_LEVEL,
            s_inode_size = S_INODE_SIZE,
            s_feature_compat = S_FEATURE_COMPAT,
            s_feature_incompat = S_FEATURE_INCOMPAT,
            s_feature_ro_compat = S_FEATURE_RO_COMPAT,
            s_uuid = S_UUID,
            s_hash_seed = S_HASH_SEED,
            s_def_hash_version = S_DEF_HASH_VERSION,
            s_desc_size = S_DESC_SIZE,
            s_default_mount_opts = S_DEFAULT_MOUNT_OPTS,
            s_mkfs_time = S_MKFS_TIME,
            s_blocks_count_hi = S_BLOCKS_COUNT_HI,
            s_log_groups_per_flex = S_LOG_GROUPS_PER_FLEX,
            s_checksum_type = S_CHECKSUM_TYPE,
            s_kbytes_written = S_KBYTES_WRITTEN,
            s_inodes_per_group = S_INODES_PER_GROUP,
            s_first_ino = S_FIRST_INO,
            s_flags = S_FLAGS,
        ));
        for (k, v) in want {
            assert_eq!(got.get(k).copied(), Some(v), "{k}");
        }
        assert_eq!(size_of::<Inode256>(), 256);
    }

    #[test]
    fn error_messages_come_from_com_err() {
        assert!(message(EXT2_ET_DIR_NO_SPACE).contains("space"));
    }
}
