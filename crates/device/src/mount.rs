//! mkfs, mount and unmount of a device's filesystem (integration.md §3.3).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::mount::{MountFlags, UnmountFlags};
use tcmu_target::mountinfo;

use crate::{Error, Result};

/// erofs superblock magic, little-endian u32 at byte 1024.
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;

/// Upstream's mkfs options for a fresh writable layer without a parent.
pub const MKFS_EXT4_OPTS: [&str; 7] = [
    "-O",
    "^has_journal,sparse_super,flex_bg",
    "-G",
    "1",
    "-E",
    "discard",
    "-F",
];

/// The filesystem on `device`: `erofs` when its magic is at byte 1024, else `ext4`.
pub fn detect_fs(device: &Path) -> Result<&'static str> {
    let f =
        File::open(device).map_err(|e| Error::io(format!("opening {}", device.display()), e))?;
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, 1024)
        .map_err(|e| Error::io(format!("reading {}", device.display()), e))?;
    Ok(if u32::from_le_bytes(b) == EROFS_MAGIC {
        "erofs"
    } else {
        "ext4"
    })
}

/// Runs `mkfs.ext4` with upstream's options on `device`.
pub fn mkfs_ext4(device: &Path) -> Result<()> {
    run(Command::new("mkfs.ext4")
        .arg("-q")
        .args(MKFS_EXT4_OPTS)
        .arg(device))
}

/// Mounts `device` at `dir` (created if missing): read-only, or read-write with
/// `discard` for ext4.
pub fn mount(device: &Path, dir: &Path, fstype: &str, read_only: bool) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let (flags, data) = if read_only {
        (MountFlags::RDONLY, None)
    } else if fstype == "ext4" {
        (MountFlags::empty(), Some(c"discard"))
    } else {
        (MountFlags::empty(), None)
    };
    rustix::mount::mount(device, dir, fstype, flags, data).map_err(|e| {
        Error::io(
            format!(
                "mounting {} ({fstype}, {}) at {}",
                device.display(),
                if read_only { "ro" } else { "rw" },
                dir.display()
            ),
            e.into(),
        )
    })
}

/// Unmounts `dir`; `lazy` detaches it even while busy (used for cleanup after a
/// crash, when the device under it is gone).
pub fn unmount(dir: &Path, lazy: bool) -> Result<()> {
    let flags = if lazy {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    rustix::mount::unmount(dir, flags)
        .map_err(|e| Error::io(format!("unmounting {}", dir.display()), e.into()))
}

/// Whether something is mounted exactly at `dir`.
pub fn is_mounted(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    mountinfo::mounts().iter().any(|m| m.mount_point == dir)
}

/// Mount points whose source is `device`.
pub fn mounts_of(device: &Path) -> Vec<PathBuf> {
    let d = device.to_string_lossy();
    mountinfo::mounts()
        .into_iter()
        .filter(|m| m.source == d)
        .map(|m| m.mount_point)
        .collect()
}

/// Lazily unmounts everything mounted at or below `dir`, deepest first; best
/// effort (for cleanup after tests and crashes).
pub fn unmount_below(dir: &Path) {
    for mp in mountinfo::mount_points_below(dir) {
        let _ = unmount(&mp, true);
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| Error::Command {
        command: line.clone(),
        detail: format!("cannot run: {e}"),
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: line,
        detail: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_mounted() {
        assert!(is_mounted(Path::new("/")));
    }
}
