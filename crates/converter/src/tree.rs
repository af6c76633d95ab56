//! Reads a whole ext4 tree back (paths, types, modes, owners, sizes, content
//! digests, symlink targets, hard-link groups, xattrs), for verification.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::ffi::{ext2_ino_t, EXT2_ROOT_INO};
use crate::fs::{mode, Ext4};

/// One file in a tree, as compared between an unpacked image and an ext4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `i_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size of regular files (0 for others).
    pub size: u64,
    /// SHA-256 of regular-file content.
    pub content: Option<String>,
    /// Symlink target.
    pub link: Option<Vec<u8>>,
    /// Device major/minor.
    pub rdev: Option<(u32, u32)>,
    /// Extended attributes, sorted.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Inode number (to form hard-link groups; not comparable across trees).
    pub ino: u64,
    /// Modification time in seconds.
    pub mtime: i64,
}

/// Walks the filesystem from `/` (without recursion: trees may be tens of
/// thousands of levels deep). Paths are relative, `""` is the root.
pub fn read_tree(fs: &Ext4) -> Result<BTreeMap<Vec<u8>, Node>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![(EXT2_ROOT_INO, Vec::new())];
    while let Some((ino, path)) = todo.pop() {
        let node = read_node(fs, ino)?;
        if node.mode as u16 & mode::S_IFMT == mode::S_IFDIR {
            for (name, cino) in fs.list_dir(ino)? {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&name);
                todo.push((cino, p));
            }
        }
        out.insert(path, node);
    }
    Ok(out)
}

/// One inode as a [`Node`].
fn read_node(fs: &Ext4, ino: ext2_ino_t) -> Result<Node> {
    let inode = fs.read_inode(ino)?;
    let i = &inode.i;
    let kind = i.i_mode & mode::S_IFMT;
    let mut node = Node {
        mode: i.i_mode as u32,
        uid: i.i_uid as u32 | (i.l_i_uid_high as u32) << 16,
        gid: i.i_gid as u32 | (i.l_i_gid_high as u32) << 16,
        size: 0,
        content: None,
        link: None,
        rdev: None,
        xattrs: fs.xattrs(ino)?,
        ino: ino as u64,
        mtime: i.i_mtime as i32 as i64 + (((i.i_mtime_extra & 3) as i64) << 32),
    };
    match kind {
        mode::S_IFREG => {
            node.size = inode.size();
            let mut h = Sha256::new();
            fs.read_file(ino, &mut |d| h.update(d))?;
            node.content = Some(hex::encode(h.finalize()));
        }
        mode::S_IFLNK => node.link = Some(fs.readlink(ino, &inode)?),
        mode::S_IFCHR | mode::S_IFBLK => {
            let (b0, b1) = (i.i_block[0], i.i_block[1]);
            node.rdev = Some(if b0 != 0 {
                ((b0 >> 8) & 0xff, b0 & 0xff)
            } else {
                ((b1 & 0xfff00) >> 8, (b1 & 0xff) | ((b1 >> 12) & 0xfff00))
            });
        }
        _ => {}
    }
    Ok(node)
}
