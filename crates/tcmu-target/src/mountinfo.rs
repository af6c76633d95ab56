//! `/proc/self/mountinfo`, parsed once for every crate (see `proc_pid_mountinfo(5)`).
//!
//! A line reads
//! `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`:
//! mount id, parent id, `major:minor`, root, mount point, mount options, optional
//! fields ending with `-`, then fs type, source and super options. Paths and the
//! source escape space, tab, newline and backslash as `\ooo` octal; they are decoded
//! here.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One mount: a line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Unique id of the mount.
    pub mount_id: u64,
    /// Id of the parent mount.
    pub parent_id: u64,
    /// Major number of the filesystem's `st_dev`.
    pub major: u64,
    /// Minor number of the filesystem's `st_dev`.
    pub minor: u64,
    /// The directory of the filesystem that forms this mount's root.
    pub root: PathBuf,
    /// Where it is mounted, relative to this process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,...`).
    pub options: String,
    /// Filesystem type, with its subtype if any (`ext4`, `fuse.obd`).
    pub fs_type: String,
    /// Filesystem-specific source (`/dev/loop3`, `overlay`, `obd-<id>`).
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

impl MountInfo {
    /// `sb->s_dev` in the kernel's internal encoding (`major << 20 | minor`), which
    /// is also the id of a FUSE connection under `/sys/fs/fuse/connections`.
    pub fn dev(&self) -> u64 {
        (self.major << 20) | self.minor
    }
}

/// Parses mountinfo text; lines that do not have the fields above are skipped.
pub fn parse(text: &[u8]) -> Vec<MountInfo> {
    text.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountInfo> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let sep = fields.iter().position(|f| *f == b"-")?;
    if sep < 6 || fields.len() < sep + 3 {
        return None;
    }
    let num = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u64>().ok();
    let (major, minor) = fields[2].split_at(fields[2].iter().position(|&b| b == b':')?);
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    Some(MountInfo {
        mount_id: num(fields[0])?,
        parent_id: num(fields[1])?,
        major: num(major)?,
        minor: num(&minor[1..])?,
        root: PathBuf::from(OsStr::from_bytes(&unescape(fields[3]))),
        mount_point: PathBuf::from(OsStr::from_bytes(&unescape(fields[4]))),
        options: text(fields[5]),
        fs_type: text(fields[sep + 1]),
        source: text(fields[sep + 2]),
        super_options: fields.get(sep + 3).map(|f| text(f)).unwrap_or_default(),
    })
}

/// The mounts of this process's mount namespace, in mount order.
pub fn read() -> std::io::Result<Vec<MountInfo>> {
    std::fs::read("/proc/self/mountinfo").map(|b| parse(&b))
}

/// The mounts of this process, or none if `/proc/self/mountinfo` cannot be read.
pub fn mounts() -> Vec<MountInfo> {
    read().unwrap_or_default()
}

/// Mount points at or below `dir`, deepest (longest) first: the order to unmount
/// them in.
pub fn mount_points_below(dir: &Path) -> Vec<PathBuf> {
    let mut mps: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|mp| mp.starts_with(dir))
        .collect();
    mps.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    mps
}

/// Undoes the `\ooo` octal escapes of mountinfo fields; a backslash not followed by
/// three octal digits stays as it is.
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let digits = s.get(i + 1..i + 4);
        match digits {
            Some(d) if s[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                let v = d.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                // \ooo above \377 is not an escape the kernel writes; keep the low byte.
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_skips_garbage() {
        let text = b"27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
            99 27 0:52 / /tmp/a\\040b/fuse rw,nosuid - fuse.obd obd-x rw,user_id=0\n\
            garbage\n\
            1 2 x:y / /bad rw - ext4 /dev/x rw\n\
            \n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].mount_id, m[0].parent_id), (27, 1));
        assert_eq!((m[0].major, m[0].minor, m[0].dev()), (254, 0, 254 << 20));
        assert_eq!(m[0].root, Path::new("/"));
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert_eq!(m[0].options, "rw,relatime");
        assert_eq!(
            (m[0].fs_type.as_str(), m[0].source.as_str()),
            ("ext4", "/dev/vda")
        );
        assert_eq!(m[0].super_options, "rw");
        assert_eq!(m[1].dev(), 52);
        assert_eq!(m[1].mount_point, Path::new("/tmp/a b/fuse"));
        assert_eq!(m[1].fs_type, "fuse.obd");
        assert_eq!(m[1].source, "obd-x");
        assert_eq!(m[1].super_options, "rw,user_id=0");
    }

    #[test]
    fn escapes_decode_in_paths_and_source() {
        let m = parse(b"5 1 7:3 /a\\011b /m\\134n\\012o rw - ext4 /dev/l\\040x ro\n");
        assert_eq!(m[0].root, Path::new("/a\tb"));
        assert_eq!(m[0].mount_point, Path::new("/m\\n\no"));
        assert_eq!(m[0].source, "/dev/l x");
    }

    #[test]
    fn unescape_edges() {
        assert_eq!(unescape(br"/a\040b"), b"/a b");
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"tail\\04"), b"tail\\04");
        assert_eq!(unescape(br"/x\1"), br"/x\1");
        assert_eq!(unescape(br"\089"), br"\089");
        assert_eq!(unescape(b"\\"), b"\\");
        assert_eq!(unescape(b"end\\040"), b"end ");
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let m = read().unwrap();
        assert!(m.iter().any(|m| m.mount_point == Path::new("/")));
        assert!(mount_points_below(Path::new("/")).contains(&PathBuf::from("/")));
    }
}
