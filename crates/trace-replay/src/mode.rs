//! What the trace file asks for (formats §5.1), and the priority list (§5.4).

use std::io::Read;
use std::path::Path;

use crate::format::{has_magic, HEADER_SIZE};
use crate::{Error, Result};

/// Largest priority list accepted.
pub const MAX_PRIORITY_LIST: u64 = 64 << 10;

/// The mode the state of the trace file selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No file: nothing to do.
    Disabled,
    /// An empty file: record this run's reads into it.
    Record,
    /// A binary trace: replay it.
    Replay,
    /// Any other content: a list of paths to prefetch.
    PriorityList,
}

/// Looks at the file at `path`: missing → [`Mode::Disabled`], empty →
/// [`Mode::Record`], ≥ 24 bytes starting with the magic → [`Mode::Replay`],
/// anything else → [`Mode::PriorityList`]. Reads at most 24 bytes; a path
/// that is not a regular file is an error ([`Error::File`]).
pub fn detect_mode(path: impl AsRef<Path>) -> Result<Mode> {
    let path = path.as_ref();
    let mut f = match overlaybd_core::regular::open(path) {
        Ok(f) => f,
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => return Ok(Mode::Disabled),
        Err(e) => return Err(Error::File(e)),
    };
    let mut head = Vec::with_capacity(HEADER_SIZE);
    (&mut f)
        .take(HEADER_SIZE as u64)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    Ok(mode_of(&head))
}

/// [`detect_mode`] on the first bytes of an existing file.
pub fn mode_of(head: &[u8]) -> Mode {
    if head.is_empty() {
        Mode::Record
    } else if has_magic(head) {
        Mode::Replay
    } else {
        Mode::PriorityList
    }
}

/// One line of a priority list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityEntry {
    /// The absolute path, without the trailing `/` or `*`.
    pub path: String,
    /// The line ended in `/` or `*`: everything under the directory.
    pub whole_dir: bool,
}

/// Parses a priority list: UTF-8 text of at most 64 KiB, one absolute path
/// per line; a trailing `/` or `*` means the whole directory. Blank lines and
/// trailing whitespace (`\r` included) are ignored.
pub fn parse_priority_list(data: &[u8]) -> Result<Vec<PriorityEntry>> {
    if data.len() as u64 > MAX_PRIORITY_LIST {
        return Err(Error::PriorityList {
            line: 0,
            detail: format!(
                "{} bytes; at most {MAX_PRIORITY_LIST} are accepted",
                data.len()
            ),
        });
    }
    let text = std::str::from_utf8(data).map_err(|e| Error::PriorityList {
        line: 1 + data[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        detail: "not UTF-8 text".into(),
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        if line.is_empty() {
            continue;
        }
        if !line.starts_with('/') {
            return Err(Error::PriorityList {
                line: i + 1,
                detail: format!("{line:?} is not an absolute path"),
            });
        }
        let (path, whole_dir) = match line.strip_suffix('*') {
            Some(p) => (p.trim_end_matches('/'), true),
            None => match line.strip_suffix('/') {
                Some(p) => (p.trim_end_matches('/'), true),
                None => (line, false),
            },
        };
        out.push(PriorityEntry {
            path: if path.is_empty() { "/" } else { path }.to_string(),
            whole_dir,
        });
    }
    Ok(out)
}

/// Reads and parses the priority list at `path` (at most 64 KiB are read).
pub fn read_priority_list(path: impl AsRef<Path>) -> Result<Vec<PriorityEntry>> {
    let path = path.as_ref();
    let f = overlaybd_core::regular::open(path).map_err(Error::File)?;
    let mut data = Vec::new();
    f.take(MAX_PRIORITY_LIST + 1)
        .read_to_end(&mut data)
        .map_err(|e| Error::io(path, e))?;
    parse_priority_list(&data).map_err(|e| e.in_file(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Trace;

    #[test]
    fn a_fifo_or_device_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("trace");
        fixtures::procs::mkfifo(&fifo);
        let not_regular = |e: Error, want: &Path, kind: &str| match e {
            Error::File(overlaybd_core::Error::InFile { path, inner }) => {
                assert_eq!(path, want);
                assert!(
                    matches!(*inner, overlaybd_core::Error::NotRegularFile { kind: k } if k == kind),
                    "{inner:?}"
                );
            }
            other => panic!("{other:?}"),
        };
        not_regular(detect_mode(&fifo).unwrap_err(), &fifo, "FIFO");
        not_regular(read_priority_list(&fifo).unwrap_err(), &fifo, "FIFO");
        not_regular(Trace::read_file(&fifo).unwrap_err(), &fifo, "FIFO");
        let zero = Path::new("/dev/zero");
        not_regular(
            Trace::read_file(zero).unwrap_err(),
            zero,
            "character device",
        );
    }

    #[test]
    fn modes_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("trace");
        assert_eq!(detect_mode(&p).unwrap(), Mode::Disabled);
        std::fs::write(&p, b"").unwrap();
        assert_eq!(detect_mode(&p).unwrap(), Mode::Record);
        std::fs::write(&p, Trace::default().to_bytes()).unwrap();
        assert_eq!(detect_mode(&p).unwrap(), Mode::Replay);
        std::fs::write(&p, b"/usr/bin/\n").unwrap();
        assert_eq!(detect_mode(&p).unwrap(), Mode::PriorityList);
        // The magic alone, shorter than a header, is a priority list.
        std::fs::write(&p, &Trace::default().to_bytes()[..8]).unwrap();
        assert_eq!(detect_mode(&p).unwrap(), Mode::PriorityList);
    }

    #[test]
    fn priority_list_lines() {
        let l = parse_priority_list(b"/usr/bin/python3\r\n\n/etc/\n/opt/app*\n/*\n").unwrap();
        assert_eq!(
            l,
            vec![
                PriorityEntry {
                    path: "/usr/bin/python3".into(),
                    whole_dir: false
                },
                PriorityEntry {
                    path: "/etc".into(),
                    whole_dir: true
                },
                PriorityEntry {
                    path: "/opt/app".into(),
                    whole_dir: true
                },
                PriorityEntry {
                    path: "/".into(),
                    whole_dir: true
                },
            ]
        );
        let e = parse_priority_list(b"/a\nrelative/b\n").unwrap_err();
        assert!(matches!(e, Error::PriorityList { line: 2, .. }), "{e}");
        let e = parse_priority_list(b"/a\n/\xff\n").unwrap_err();
        assert!(matches!(e, Error::PriorityList { line: 2, .. }), "{e}");
        let big = vec![b'/'; (MAX_PRIORITY_LIST + 1) as usize];
        assert!(parse_priority_list(&big).is_err());
    }
}
