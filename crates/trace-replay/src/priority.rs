//! Priority lists (formats §5.4) on ext4: the listed files' data blocks are
//! found with `debugfs` (e2fsprogs, read-only, on the device or a raw image),
//! mapped through the image's merged index to layer-file ranges, and turned
//! into a [`Trace`] that [`crate::replay`] prefetches like a recorded one.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use overlaybd_core::index::MergedIndex;
use zfile::ReadAt;

use crate::format::Trace;
use crate::mode::PriorityEntry;
use crate::{Error, Result};

/// Most files a priority list may expand to.
pub const MAX_FILES: usize = 1 << 16;
/// Deepest directory recursion for `/dir/` entries.
pub const MAX_DEPTH: usize = 64;

const SECTOR: u64 = 512;

/// The block size of the ext2/3/4 filesystem on `dev`, or `None` when it
/// holds no ext filesystem (bad magic, unreadable).
pub fn ext4_block_size(dev: &dyn ReadAt) -> Option<u64> {
    let mut sb = [0u8; 1024];
    dev.read_exact_at(&mut sb, 1024).ok()?;
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
        return None;
    }
    let log = u32::from_le_bytes([sb[24], sb[25], sb[26], sb[27]]);
    (log <= 6).then(|| 1024u64 << log)
}

/// One command's output in a `debugfs -f -` session.
struct Section {
    body: Vec<String>,
}

/// Runs `commands` in one read-only `debugfs` session on `dev`; returns each
/// command's output lines, in order.
fn debugfs(dev: &Path, commands: &[String]) -> Result<Vec<Section>> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let mut child = Command::new("debugfs")
        .arg("-c")
        .arg("-f")
        .arg("-")
        .arg(dev)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::io("debugfs", e))?;
    let mut script = String::new();
    for c in commands {
        script.push_str(c);
        script.push('\n');
    }
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("debugfs", e))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(Error::io(
            dev,
            std::io::Error::other(format!("debugfs exited with {}", out.status)),
        ));
    }
    Ok(split_sections(&String::from_utf8_lossy(&out.stdout)))
}

/// Splits `debugfs -f` output at its `debugfs: <command>` echo lines.
fn split_sections(out: &str) -> Vec<Section> {
    let mut v: Vec<Section> = Vec::new();
    for line in out.lines() {
        if line.starts_with("debugfs: ") {
            v.push(Section { body: Vec::new() });
        } else if let Some(s) = v.last_mut() {
            s.body.push(line.to_string());
        }
    }
    v
}

/// A path quoted for debugfs, or `None` when it cannot be quoted.
fn quote(path: &str) -> Option<String> {
    (!path.contains('"') && !path.contains('\n')).then(|| format!("\"{path}\""))
}

/// One `ls -p` line: `/inode/mode/uid/gid/name/size/` → (name, mode).
fn parse_ls_line(line: &str) -> Option<(&str, u32)> {
    let f: Vec<&str> = line.strip_prefix('/')?.split('/').collect();
    if f.len() < 6 {
        return None;
    }
    let mode = u32::from_str_radix(f[1], 8).ok()?;
    Some((f[4], mode))
}

/// Expands `entries` to files (in list order; directories breadth first) and
/// returns the device byte ranges of their data, file by file, each run of
/// consecutive blocks as one range. `dev` is the device (or raw image) with
/// an ext4 of `block_size`-byte blocks.
pub fn ext4_ranges(
    dev: &Path,
    block_size: u64,
    entries: &[PriorityEntry],
) -> Result<Vec<(u64, u64)>> {
    const S_IFMT: u32 = 0o170000;
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;
    let mut files: Vec<String> = Vec::new();
    let mut level: Vec<String> = Vec::new();
    for e in entries {
        if e.whole_dir {
            level.push(e.path.clone());
        } else {
            files.push(e.path.clone());
        }
    }
    let mut depth = 0;
    while !level.is_empty() && depth < MAX_DEPTH && files.len() < MAX_FILES {
        depth += 1;
        let dirs: Vec<String> = level.drain(..).filter(|d| quote(d).is_some()).collect();
        let cmds: Vec<String> = dirs
            .iter()
            .filter_map(|d| quote(d).map(|q| format!("ls -p {q}")))
            .collect();
        for (dir, sec) in dirs.iter().zip(debugfs(dev, &cmds)?) {
            for line in &sec.body {
                let Some((name, mode)) = parse_ls_line(line) else {
                    continue;
                };
                if name == "." || name == ".." || name.is_empty() {
                    continue;
                }
                let p = if dir.ends_with('/') {
                    format!("{dir}{name}")
                } else {
                    format!("{dir}/{name}")
                };
                match mode & S_IFMT {
                    S_IFDIR => level.push(p),
                    S_IFREG if files.len() < MAX_FILES => files.push(p),
                    _ => {}
                }
            }
        }
    }
    let files: Vec<String> = files.into_iter().filter(|f| quote(f).is_some()).collect();
    let cmds: Vec<String> = files
        .iter()
        .filter_map(|f| quote(f).map(|q| format!("blocks {q}")))
        .collect();
    let mut ranges = Vec::new();
    for sec in debugfs(dev, &cmds)? {
        let blocks = sec
            .body
            .iter()
            .flat_map(|l| l.split_whitespace())
            .map_while(|w| w.parse::<u64>().ok());
        let mut run: Option<(u64, u64)> = None; // (first block, count)
        for b in blocks {
            run = match run {
                Some((s, n)) if s + n == b => Some((s, n + 1)),
                Some((s, n)) => {
                    ranges.push((s * block_size, n * block_size));
                    Some((b, 1))
                }
                None => Some((b, 1)),
            };
        }
        if let Some((s, n)) = run {
            ranges.push((s * block_size, n * block_size));
        }
    }
    Ok(ranges)
}

/// Maps device byte ranges to the lower layers' file ranges behind them
/// (through the merged index; zeroed and unmapped parts and tags of
/// `layers` or more are skipped), as a trace in the same order.
pub fn device_ranges_to_trace(index: &MergedIndex, layers: usize, ranges: &[(u64, u64)]) -> Trace {
    let mut t = Trace::default();
    for &(off, len) in ranges {
        let end = off.saturating_add(len);
        let first = off / SECTOR;
        for seg in index.lookup(first, end.div_ceil(SECTOR) - first) {
            let s = (seg.offset * SECTOR).max(off);
            let e = (seg.end() * SECTOR).min(end);
            if seg.zeroed || s >= e || seg.tag as usize >= layers {
                continue;
            }
            let at = seg.moffset * SECTOR + (s - seg.offset * SECTOR);
            if let Ok(at) = i64::try_from(at) {
                t.push_read(u32::from(seg.tag), at, e - s);
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debugfs_output_is_split_and_parsed() {
        let out = "debugfs: ls -p \"/etc\"\n/12/040755/0/0/.//\n/25/100644/0/0/hostname/11/\n\ndebugfs: blocks \"/x\"\n661 662 \n";
        let s = split_sections(out);
        assert_eq!(s.len(), 2);
        assert_eq!(parse_ls_line(&s[0].body[1]), Some(("hostname", 0o100644)));
        assert_eq!(parse_ls_line(&s[0].body[0]), Some((".", 0o040755)));
        assert_eq!(parse_ls_line("garbage"), None);
        assert_eq!(s[1].body, vec!["661 662 "]);
        assert_eq!(quote("/a b"), Some("\"/a b\"".into()));
        assert_eq!(quote("/a\"b"), None);
    }
}
