//! The converter's one error type. Messages name the layer (index and digest)
//! and the path inside it wherever the failure is tied to one.

use std::path::PathBuf;

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
        /// Path of the entry inside the layer tar.
        path: String,
        /// The cause (part of the message).
        cause: Box<Error>,
    },
    /// A tar entry that cannot be applied (bad path, missing link target...).
    #[error("bad tar entry: {0}")]
    BadEntry(String),
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

    /// Wraps `self` with the tar entry it concerns (once).
    pub fn in_entry(self, path: &str) -> Error {
        match self {
            e @ Error::Entry { .. } => e,
            e => Error::Entry {
                path: path.to_string(),
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
                digest: digest.to_string(),
                cause: Box::new(e),
            },
        }
    }
}
