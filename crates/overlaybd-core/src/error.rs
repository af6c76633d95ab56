//! The one error type of `overlaybd-core`.

use std::io;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading, writing or stacking layers.
///
/// Low-level variants describe the fault (field, entry, offset); the `InFile`
/// and `InLayer` wrappers add which file or layer it was found in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error.
    #[error("I/O error: {0}")]
    Io(io::Error),

    /// A ZFile format or integrity error.
    #[error("ZFile: {0}")]
    ZFile(zfile::Error),

    /// The error happened in this file.
    #[error("{}: {inner}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What went wrong (shown in this error's message, not as a separate cause).
        inner: Box<Error>,
    },

    /// The error happened in this layer of an image (0 = bottom).
    #[error("layer {index} ({name}): {inner}")]
    InLayer {
        /// Position in `lowers`, 0 = bottom.
        index: usize,
        /// A human name: the file path or the digest.
        name: String,
        /// What went wrong (shown in this error's message, not as a separate cause).
        inner: Box<Error>,
    },

    /// Magic bytes do not match.
    #[error("bad magic in {what}: not an LSMT file")]
    BadMagic {
        /// "header" or "trailer".
        what: &'static str,
    },

    /// The data ends before a structure it must hold.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },

    /// A header or trailer field holds a value the format forbids.
    #[error("LSMT {what} field `{field}`: {detail}")]
    BadField {
        /// "header", "trailer", "index header", ...
        what: &'static str,
        /// Field name as in the format reference.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },

    /// Index entries out of order or overlapping.
    #[error("LSMT index entry {index} (offset {offset}) overlaps or precedes the previous entry ending at {prev_end}")]
    IndexOrder {
        /// Entry position in the stored index.
        index: usize,
        /// End (sectors) of the previous entry.
        prev_end: u64,
        /// Offset (sectors) of this entry.
        offset: u64,
    },

    /// An index entry points outside the layer's data area.
    #[error("LSMT index entry {index}: moffset {moffset}..{mend} outside the data area 8..{limit} (sectors)")]
    MoffsetRange {
        /// Entry position in the stored index.
        index: usize,
        /// Entry moffset.
        moffset: u64,
        /// Entry mend.
        mend: u64,
        /// End of the data area in sectors.
        limit: u64,
    },

    /// An index entry breaks a rule other than order or moffset range.
    #[error("LSMT index entry {index}: {detail}")]
    BadEntry {
        /// Entry position in the stored index.
        index: usize,
        /// What is wrong.
        detail: String,
    },

    /// More index entries than allowed.
    #[error("{what}: {count} index entries exceeds the limit of {max}")]
    TooManyEntries {
        /// Which index.
        what: &'static str,
        /// Entries present.
        count: u64,
        /// The limit.
        max: u64,
    },

    /// A strict-validation rule (a rule upstream's writers follow) is broken.
    #[error("validation rule violated: {0}")]
    Rule(String),

    /// The tar wrapper is malformed.
    #[error("tar wrapper: {0}")]
    Tar(String),

    /// The tar wrapper still holds upstream's creation placeholder (magic
    /// `xxtar`, name `overlaybd.new`): the writer never finished the blob.
    #[error(
        "tar wrapper incomplete: placeholder header (overlaybd.new, magic xxtar) was never patched"
    )]
    TarIncomplete,

    /// `config.v1.json` is malformed.
    #[error("config {field}: {detail}")]
    Config {
        /// JSON path of the offending key, e.g. `lowers[2].file`.
        field: String,
        /// What is wrong.
        detail: String,
    },

    /// A read or write outside the device or not sector-aligned.
    #[error("bad I/O request: {0}")]
    BadRequest(String),

    /// The operation needs a writable layer.
    #[error("the image is read-only")]
    ReadOnly,

    /// A remote fetch failed (after retries); names the blob URL and range.
    #[error("remote {url} bytes {offset}..{end}: {detail}")]
    Remote {
        /// Blob URL (registry, mirror or proxy form).
        url: String,
        /// First byte of the failed range.
        offset: u64,
        /// End of the failed range (exclusive).
        end: u64,
        /// What went wrong (status, timeout, bad Content-Range, ...).
        detail: String,
    },

    /// A registry request (manifest, whole blob, upload) failed.
    #[error("registry {url}: {detail}")]
    Registry {
        /// The request URL.
        url: String,
        /// What went wrong.
        detail: String,
    },

    /// Registry authentication failed.
    #[error("authentication to {registry} failed: {detail}")]
    Auth {
        /// Registry host.
        registry: String,
        /// Why.
        detail: String,
    },

    /// The local block cache is unusable (not for ordinary misses).
    #[error("cache {}: {detail}", path.display())]
    Cache {
        /// Cache file or folder.
        path: PathBuf,
        /// Why.
        detail: String,
    },

    /// Data failed its integrity check even after re-fetching.
    #[error("integrity check failed for {what} at offset {offset} after {tries} tries: {detail}")]
    Integrity {
        /// Blob name or URL.
        what: String,
        /// Byte offset in the blob.
        offset: u64,
        /// Attempts made.
        tries: u32,
        /// The last failure.
        detail: String,
    },

    /// A blob cannot be read verified: its piece table is missing where the
    /// policy requires one, or is unusable (bad digest, bad encoding, not
    /// the blob's).
    #[error("verification of blob {blob}: {detail}")]
    Verify {
        /// The layer blob's digest.
        blob: String,
        /// What is wrong.
        detail: String,
    },

    /// A service configuration file is malformed.
    #[error("service config {field}: {detail}")]
    ServiceConfig {
        /// TOML key path.
        field: String,
        /// What is wrong.
        detail: String,
    },

    /// A path that must name a regular file names something else.
    #[error("not a regular file but a {kind}")]
    NotRegularFile {
        /// "FIFO", "character device", "directory", ...
        kind: &'static str,
    },

    /// A file read whole is larger than files of its kind may be.
    #[error("{size} bytes; a {what} may hold at most {max}")]
    FileTooLarge {
        /// The kind of file, e.g. "configuration file".
        what: &'static str,
        /// Its size (or the bytes read before giving up).
        size: u64,
        /// The cap.
        max: u64,
    },

    /// A feature the format defines but this build does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

// Causes are part of each message (not a `source()` chain), so a message printed
// once says everything and nothing is printed twice.
impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<zfile::Error> for Error {
    fn from(e: zfile::Error) -> Self {
        Error::ZFile(e)
    }
}

impl Error {
    /// Wraps `self` with the file it came from.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Self {
        Error::InFile {
            path: path.into(),
            inner: Box::new(self),
        }
    }

    /// Wraps `self` with the layer it came from.
    pub fn in_layer(self, index: usize, name: impl Into<String>) -> Self {
        Error::InLayer {
            index,
            name: name.into(),
            inner: Box::new(self),
        }
    }

    /// The kind of the I/O error under the file and layer wrappers, if the
    /// error is one (e.g. to treat a missing optional file as absent).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io(e) => Some(e.kind()),
            Error::InFile { inner, .. } | Error::InLayer { inner, .. } => inner.io_kind(),
            _ => None,
        }
    }

    /// Converts into an `io::Error`, keeping the message (for `ReadAt` impls).
    pub fn into_io(self) -> io::Error {
        match self {
            Error::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// `bytes` (a file name, path or other untrusted text) made safe to print in
/// a message: valid UTF-8 is kept except control characters (C0, DEL, C1),
/// Unicode bidirectional controls and `\`, which are escaped as Rust
/// escapes (`\n`, `\u{1b}`, `\\`); bytes that are not UTF-8 become `\xNN`.
/// The result is unambiguous: two different inputs never print the same.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Adds file context to results.
pub trait Context<T> {
    /// Names the file a failure came from.
    fn in_file(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn in_file(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| e.into().in_file(path))
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escape_controls_bidi_backslash_and_bad_utf8() {
        assert_eq!(escape(b"usr/bin/ls"), "usr/bin/ls");
        assert_eq!(escape("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(escape(b"a\x1b[2Jb\n\t\r\0"), "a\\u{1b}[2Jb\\n\\t\\r\\u{0}");
        assert_eq!(escape(b"a\\x41"), "a\\\\x41");
        assert_eq!(escape(b"\xff\xfe/x"), "\\xff\\xfe/x");
        assert_eq!(escape("\u{202e}gnp.exe".as_bytes()), "\\u{202e}gnp.exe");
        assert_eq!(escape("\u{85}\u{7f}".as_bytes()), "\\u{85}\\u{7f}");
    }
}
