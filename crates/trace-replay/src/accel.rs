//! The acceleration layer's blob (formats.md §8.3): an uncompressed tar of
//! top-level regular files, `trace` and, from obd, the warm list
//! ([`WARM_FILE`](crate::warm::WARM_FILE)). Written here
//! ([`accel_layer_tar`]) and read here ([`read_accel_layer`]), the reader
//! taking only what the writer makes, within bounds, so that a snapshotter
//! can unpack the layer itself (no containerd download, apply and commit)
//! and leave anything else to containerd's own unpack.

use std::io::Read;

use crate::{Error, Result};

/// Largest acceleration-layer blob read into memory: a trace of a million
/// reads is 16 MiB, a full warm list a few.
pub const MAX_ACCEL_BLOB: u64 = 64 << 20;

/// Most files an acceleration layer holds (the writer puts two).
pub const MAX_ACCEL_FILES: usize = 8;

/// One file of an acceleration layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelFile {
    /// Its name: one path component.
    pub name: String,
    /// Permission bits from the tar header.
    pub mode: u32,
    /// Its bytes.
    pub body: Vec<u8>,
}

/// The acceleration layer's tar: `trace` and, if given, the warm list, each
/// mode 0444, uid/gid 0, mtime 0: byte-identical for the same inputs.
pub fn accel_layer_tar(trace: &[u8], warm: Option<&[u8]>) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, body) in [("trace", Some(trace)), (crate::warm::WARM_FILE, warm)] {
        let Some(body) = body else { continue };
        let mut h = tar::Header::new_ustar();
        h.set_path(name)?;
        h.set_size(body.len() as u64);
        h.set_mode(0o444);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, body)?;
    }
    b.into_inner()
}

/// The files of acceleration-layer blob `blob`, if it is a tar of at most
/// [`MAX_ACCEL_FILES`] top-level regular files and no larger than
/// [`MAX_ACCEL_BLOB`]. Anything else (a directory, a link, a nested or
/// unsafe path, a name twice, a compressed or truncated blob) is
/// [`Error::AccelLayer`]: such a layer is for containerd's own unpack.
pub fn read_accel_layer(blob: &[u8]) -> Result<Vec<AccelFile>> {
    let bad = |d: String| Error::AccelLayer(d);
    if blob.len() as u64 > MAX_ACCEL_BLOB {
        return Err(bad(format!(
            "{} bytes, more than {MAX_ACCEL_BLOB}",
            blob.len()
        )));
    }
    let mut ar = tar::Archive::new(blob);
    let mut files: Vec<AccelFile> = Vec::new();
    let entries = ar.entries().map_err(|e| bad(format!("not a tar: {e}")))?;
    for e in entries {
        let mut e = e.map_err(|e| bad(format!("not a tar: {e}")))?;
        let kind = e.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XHeader | tar::EntryType::XGlobalHeader
        ) {
            continue;
        }
        let path = e
            .path()
            .map_err(|e| bad(format!("entry path: {e}")))?
            .to_string_lossy()
            .into_owned();
        let name = path.strip_prefix("./").unwrap_or(&path).to_string();
        if !kind.is_file() {
            return Err(bad(format!("entry {path:?} is not a regular file")));
        }
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(bad(format!("entry {path:?} is not a top-level file name")));
        }
        if files.iter().any(|f| f.name == name) {
            return Err(bad(format!("entry {path:?} twice")));
        }
        if files.len() == MAX_ACCEL_FILES {
            return Err(bad(format!("more than {MAX_ACCEL_FILES} files")));
        }
        let size = e.size();
        // The body lies inside `blob`: a larger size is a truncated tar.
        if size > blob.len() as u64 {
            return Err(bad(format!(
                "entry {path:?}: {size} bytes, past the blob's end"
            )));
        }
        let mut body = Vec::with_capacity(size as usize);
        e.read_to_end(&mut body)
            .map_err(|e| bad(format!("entry {path:?}: {e}")))?;
        if body.len() as u64 != size {
            return Err(bad(format!("entry {path:?}: truncated")));
        }
        let mode = e
            .header()
            .mode()
            .map_err(|e| bad(format!("entry {path:?} mode: {e}")))?
            & 0o7777;
        files.push(AccelFile { name, mode, body });
    }
    if files.is_empty() {
        return Err(bad("no files".into()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_writer_makes_reads_back() {
        let a = accel_layer_tar(b"abc", None).unwrap();
        assert_eq!(a, accel_layer_tar(b"abc", None).unwrap(), "deterministic");
        let f = read_accel_layer(&a).unwrap();
        assert_eq!(
            f,
            [AccelFile {
                name: "trace".into(),
                mode: 0o444,
                body: b"abc".to_vec()
            }]
        );
        let w = accel_layer_tar(b"abc", Some(b"{}")).unwrap();
        let f = read_accel_layer(&w).unwrap();
        let names: Vec<_> = f
            .iter()
            .map(|f| (f.name.as_str(), f.mode, &f.body[..]))
            .collect();
        assert_eq!(
            names,
            [
                ("trace", 0o444, &b"abc"[..]),
                (crate::warm::WARM_FILE, 0o444, &b"{}"[..])
            ]
        );
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, body) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(*kind);
            // `set_path` refuses `..`: write the name field directly.
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *body).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn anything_but_top_level_regular_files_is_refused() {
        use tar::EntryType as T;
        let ok = tar_of(&[("./trace", T::Regular, b"x")]);
        assert_eq!(read_accel_layer(&ok).unwrap()[0].name, "trace");
        for (entries, what) in [
            (vec![("d", T::Directory, &b""[..])], "not a regular file"),
            (vec![("l", T::Symlink, &b""[..])], "not a regular file"),
            (vec![("a/trace", T::Regular, &b"x"[..])], "top-level"),
            (vec![("../trace", T::Regular, &b"x"[..])], "top-level"),
            (vec![("/trace", T::Regular, &b"x"[..])], "top-level"),
            (
                vec![
                    ("trace", T::Regular, &b"x"[..]),
                    ("trace", T::Regular, &b"y"[..]),
                ],
                "twice",
            ),
        ] {
            let e = read_accel_layer(&tar_of(&entries)).unwrap_err().to_string();
            assert!(e.contains(what), "{entries:?}: {e}");
        }
        let many: Vec<String> = (0..=MAX_ACCEL_FILES).map(|i| format!("f{i}")).collect();
        let many: Vec<_> = many
            .iter()
            .map(|n| (n.as_str(), T::Regular, &b""[..]))
            .collect();
        assert!(read_accel_layer(&tar_of(&many)).is_err());
        assert!(read_accel_layer(&[]).is_err(), "no files");
        assert!(
            read_accel_layer(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).is_err(),
            "gzip"
        );
        // Truncated: the header promises more than the blob holds.
        let mut t = accel_layer_tar(&[7u8; 4096], None).unwrap();
        t.truncate(1024);
        assert!(read_accel_layer(&t).is_err());
    }
}
