//! The converter's one error type. Messages name the layer (index and digest)
//! and the path inside it wherever the failure is tied to one. Names from
//! the image (entry paths, link targets, xattr names, digests and media
//! types) are printed through [`escape`], so control characters never reach
//! a terminal raw.

use std::path::PathBuf;

pub use overlaybd_core::error::escape;

/// Result alias for the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while converting an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A libext2fs call failed.
    #[error("ext2fs {op}: {msg} (code {code}){}", detail.as_deref().map(|d| format!("; {d}")).unwrap_or_default())]
    Ext2 {
        /// The operation, e.g. `link usr/bin/foo`.
        op: String,
        /// The com_err code.
        code: i64,
        /// The com_err message.
        msg: String,
        /// What our io_manager saw, when the failure came from the block stack.
        detail: Option<String>,
    },
    /// An I/O error on a named file or stream.
    #[error("{context}: {error}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The underlying error (part of the message, not a `source()`, so
        /// error chains print it once).
        error: std::io::Error,
    },
    /// An error from the LSMT/image layer.
    #[error(transparent)]
    Core(#[from] overlaybd_core::Error),
    /// An error from the ZFile writer.
    #[error(transparent)]
    Zfile(#[from] zfile::Error),
    /// A layer failed; wraps the cause with the layer's position and digest.
    #[error("layer {index} ({digest}): {cause}")]
    Layer {
        /// Position in the source manifest, from 0 (bottom).
        index: usize,
        /// The source layer digest.
        digest: String,
        /// The cause (part of the message).
        cause: Box<Error>,
    },
    /// A tar entry failed; wraps the cause with the entry path.
    #[error("entry `{path}`: {cause}")]
    Entry {
        /// Path of the entry inside the layer tar, [`escape`]d.
        path: String,
        /// The cause (part of the message).
        cause: Box<Error>,
    },
    /// A tar entry that cannot be applied (bad path, missing link target...).
    #[error("bad tar entry: {0}")]
    BadEntry(String),
    /// More tar header bytes (PAX records, GNU long names) for one entry
    /// than [`crate::apply::MAX_ENTRY_HEADERS`].
    #[error("the tar headers of entry {entry} (from 0) are over {limit} bytes")]
    HeadersTooLarge {
        /// Position of the entry in the layer tar, from 0.
        entry: u64,
        /// The limit.
        limit: u64,
    },
    /// A path component longer than ext4's 255-byte name limit (never
    /// truncated: a cut name would alias another one).
    #[error("name `{name}` is {len} bytes; ext4 names are at most 255")]
    NameTooLong {
        /// The component, [`escape`]d.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A hard link past ext4's link limit (`EMLINK`): the inode keeps the
    /// links it has, so no count wraps and no inode is freed while in use.
    #[error("too many links: `{target}` already has {links} (ext4 allows {max})")]
    TooManyLinks {
        /// The link target as the entry names it, [`escape`]d.
        target: String,
        /// Its current link count.
        links: u32,
        /// The limit (`EXT2_LINK_MAX`).
        max: u32,
    },
    /// A blob whose length differs from its descriptor's `size`.
    #[error("blob {digest}: the descriptor says {expected} bytes, the blob has {}", if *actual > *expected { format!("more ({actual} read before stopping)") } else { actual.to_string() })]
    BlobSize {
        /// The descriptor's digest, [`escape`]d.
        digest: String,
        /// The descriptor's `size`.
        expected: u64,
        /// Bytes read (at most `expected + 1`: reading stops there).
        actual: u64,
    },
    /// A manifest, config or layer whose media type is unknown, or
    /// contradicted by its blob (a `+gzip` layer that is not gzip...).
    #[error("{what} {digest}: media type `{media_type}`: {detail}")]
    MediaType {
        /// `manifest`, `config` or `layer N`.
        what: String,
        /// The descriptor's digest, [`escape`]d.
        digest: String,
        /// The media type, [`escape`]d.
        media_type: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Something valid that the converter does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A malformed or inconsistent image (manifest, config, index, digests).
    #[error("invalid image: {0}")]
    Image(String),
    /// An image reference that cannot be parsed or resolved.
    #[error("image reference `{reference}`: {detail}")]
    Reference {
        /// The reference as given.
        reference: String,
        /// Why it failed.
        detail: String,
    },
    /// Malformed JSON in a manifest, index or config.
    #[error("{what}: {error}")]
    Json {
        /// Which document.
        what: String,
        /// The parse error.
        error: serde_json::Error,
    },
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            error: source,
        }
    }

    /// An I/O error on a file path.
    pub fn file(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::io(path.into().display().to_string(), source)
    }

    /// Wraps `self` with the tar entry it concerns (once); `path` is the
    /// entry's raw path, escaped here.
    pub fn in_entry(self, path: &[u8]) -> Error {
        match self {
            e @ Error::Entry { .. } => e,
            e => Error::Entry {
                path: escape(path),
                cause: Box::new(e),
            },
        }
    }

    /// Wraps `self` with the layer it concerns (once).
    pub fn in_layer(self, index: usize, digest: &str) -> Error {
        match self {
            e @ Error::Layer { .. } => e,
            e => Error::Layer {
                index,
                digest: escape(digest.as_bytes()),
                cause: Box::new(e),
            },
        }
    }
}
