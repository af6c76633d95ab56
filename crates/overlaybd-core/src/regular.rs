//! Files named by users and configs (`config.v1.json`, its lowers and upper,
//! service configs, credentials, traces) are opened only when they are regular
//! files, and the ones read whole are read up to a cap.
//!
//! A FIFO, a device, a socket or a directory in their place is refused with
//! [`Error::NotRegularFile`] naming the file, before anything is read from it:
//! the path is `stat`ed first (so no device is opened at all), then opened with
//! `O_NONBLOCK` (so a FIFO swapped in meanwhile cannot block the open) and
//! checked again with `fstat` on the open descriptor (so what is read is what
//! was checked). `O_NONBLOCK` has no effect on regular files, so it stays set.

use std::fs::{File, FileType, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Context, Error, Result};

/// Most bytes a configuration file (`config.v1.json`, a service or
/// snapshotter TOML, a credentials file) may hold: 16 MiB. A real one is a
/// few KiB; the largest legitimate config, 255 lowers with long paths, is
/// well under 1 MiB.
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// Opens `path` read-only if it is a regular file.
pub fn open(path: impl AsRef<Path>) -> Result<File> {
    open_with(path.as_ref(), OpenOptions::new().read(true))
}

/// Opens an existing `path` for reading and writing if it is a regular file.
pub fn open_rw(path: impl AsRef<Path>) -> Result<File> {
    open_with(path.as_ref(), OpenOptions::new().read(true).write(true))
}

/// Opens `path` with `opts` (plus `O_NONBLOCK | O_NOCTTY`) if it is, and
/// stays, a regular file. With `create` in `opts`, a missing file is created.
pub fn open_with(path: &Path, opts: &mut OpenOptions) -> Result<File> {
    match std::fs::metadata(path) {
        Ok(m) => check(m.file_type()).in_file(path)?,
        // Missing: created by `opts`, or the open below reports it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).in_file(path),
    }
    let f = opts
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .in_file(path)?;
    check(f.metadata().in_file(path)?.file_type()).in_file(path)?;
    Ok(f)
}

/// Reads the whole regular file at `path`, refusing one over `max` bytes
/// with [`Error::FileTooLarge`] (`what` names the kind of file).
pub fn read(path: impl AsRef<Path>, max: u64, what: &'static str) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let f = open(path)?;
    let too_large = |size| Error::FileTooLarge { what, size, max }.in_file(path);
    let size = f.metadata().in_file(path)?.len();
    if size > max {
        return Err(too_large(size));
    }
    let mut out = Vec::with_capacity(size as usize);
    // The file may grow after the fstat: read one byte past the cap at most.
    f.take(max + 1).read_to_end(&mut out).in_file(path)?;
    if out.len() as u64 > max {
        return Err(too_large(out.len() as u64));
    }
    Ok(out)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: impl AsRef<Path>, max: u64, what: &'static str) -> Result<String> {
    let path = path.as_ref();
    String::from_utf8(read(path, max, what)?).map_err(|e| {
        Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)).in_file(path)
    })
}

/// [`read`] of a configuration file, capped at [`MAX_CONFIG_SIZE`].
pub fn read_config(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    read(path, MAX_CONFIG_SIZE, "configuration file")
}

fn check(ft: FileType) -> Result<()> {
    if ft.is_file() {
        return Ok(());
    }
    let kind = if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    };
    Err(Error::NotRegularFile { kind })
}

/// Replaces `path` with `data` atomically (a temporary file of mode 0600
/// beside it, synced, then renamed over it): readers see the old or the new
/// file, never a part. The temporary file is removed on failure.
pub fn write_atomic_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner(e: Error) -> (std::path::PathBuf, Error) {
        match e {
            Error::InFile { path, inner } => (path, *inner),
            other => panic!("not an InFile error: {other:?}"),
        }
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.v1.json");
        fixtures::procs::mkfifo(&p);
        for r in [
            open(&p).map(drop),
            open_rw(&p).map(drop),
            read_config(&p).map(drop),
        ] {
            let (path, e) = inner(r.unwrap_err());
            assert_eq!(path, p);
            assert!(matches!(e, Error::NotRegularFile { kind: "FIFO" }), "{e:?}");
        }
    }

    #[test]
    fn devices_and_directories_are_refused() {
        let (path, e) = inner(read_config("/dev/zero").unwrap_err());
        assert_eq!(path, Path::new("/dev/zero"));
        assert!(
            matches!(
                e,
                Error::NotRegularFile {
                    kind: "character device"
                }
            ),
            "{e:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let (path, e) = inner(open(dir.path()).unwrap_err());
        assert_eq!(path, dir.path());
        assert!(
            matches!(e, Error::NotRegularFile { kind: "directory" }),
            "{e:?}"
        );
        assert_eq!(
            read_config("/dev/zero").unwrap_err().to_string(),
            "/dev/zero: not a regular file but a character device"
        );
    }

    #[test]
    fn the_cap_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        std::fs::write(&p, b"12345").unwrap();
        assert_eq!(read(&p, 5, "test file").unwrap(), b"12345");
        let (path, e) = inner(read(&p, 4, "test file").unwrap_err());
        assert_eq!(path, p);
        assert!(
            matches!(
                e,
                Error::FileTooLarge {
                    what: "test file",
                    size: 5,
                    max: 4
                }
            ),
            "{e:?}"
        );
        // A sparse file just over the config cap is refused before reading.
        let f = File::create(&p).unwrap();
        f.set_len(MAX_CONFIG_SIZE + 1).unwrap();
        let (_, e) = inner(read_config(&p).unwrap_err());
        assert!(
            matches!(e, Error::FileTooLarge { size, .. } if size == MAX_CONFIG_SIZE + 1),
            "{e:?}"
        );
    }

    #[test]
    fn a_missing_file_names_itself() {
        let (path, e) = inner(open("/nonexistent/obd-x").unwrap_err());
        assert_eq!(path, Path::new("/nonexistent/obd-x"));
        assert!(matches!(e, Error::Io(ref io) if io.kind() == std::io::ErrorKind::NotFound));
    }
}
