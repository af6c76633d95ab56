//! trace-replay: record the reads a container makes at start, in upstream
//! overlaybd's trace format, and replay them as low-priority prefetch.
//!
//! - [`accel`]: the acceleration layer's tar (`trace`, warm list), written
//!   and read.
//! - [`format`]: the binary trace file (`Trace`, `Record`; parse and write,
//!   byte-compatible with overlaybd v1.0.18).
//! - [`mode`]: what the file at `recordTracePath` asks for (disabled, record,
//!   replay, priority list) and the priority-list parser.
//! - [`recorder`]: collects completed layer-file reads and writes the trace
//!   with upstream's lock-file handshake.
//! - [`priority`]: priority lists on ext4 (`debugfs` finds the files' blocks,
//!   the merged index maps them to layer-file ranges).
//! - [`pack`]: the disk ranges a trace read, copied into one packed top
//!   layer, and the trace that replays it front to back.
//! - [`replay`]: merges the records into large requests and reads them with
//!   bounded concurrency at prefetch priority.
//! - [`warm`]: page-cache warm lists (the files a start read, by range),
//!   recorded with fanotify and `mincore`, read through the mount at attach.
//!
//! Offsets are always inside a layer's uncompressed LSMT file (after the tar
//! wrapper and ZFile decoding), and layer 0 is the bottom of `lowers`.

pub mod accel;
pub mod format;
pub mod mode;
pub mod pack;
pub mod priority;
pub mod recorder;
pub mod replay;
pub mod warm;

pub use format::{
    Record, Trace, HEADER_SIZE, MAGIC, MAX_RECORD_BYTES, MAX_TRACE_SIZE, RECORD_SIZE,
};
pub use mode::{detect_mode, parse_priority_list, Mode, PriorityEntry, MAX_PRIORITY_LIST};
pub use recorder::{Recorder, RecorderWatch};
pub use replay::{plan, plan_by_offset, replay, Order, ReplayOptions, ReplayReport, Request};

use std::path::PathBuf;

/// Errors of this crate; each names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The trace is shorter than its header.
    #[error("trace: {len} bytes, shorter than the {HEADER_SIZE}-byte header")]
    TooShort {
        /// Bytes available.
        len: usize,
    },
    /// The header's magic is wrong.
    #[error("trace header: magic {found:#010x}, expected {MAGIC:#010x}")]
    BadMagic {
        /// The stored value.
        found: u32,
    },
    /// `data_size` disagrees with the file length.
    #[error("trace header: data_size {data_size} but the file holds {actual} bytes of records")]
    SizeMismatch {
        /// The stored `data_size`.
        data_size: u64,
        /// Bytes after the header.
        actual: u64,
    },
    /// `data_size` is not a whole number of records.
    #[error("trace header: data_size {0} is not a multiple of {RECORD_SIZE}")]
    Misaligned(u64),
    /// The records do not match the stored checksum.
    #[error("trace header: checksum {stored:#010x}, records hash to {computed:#010x}")]
    Checksum {
        /// The stored checksum.
        stored: u32,
        /// The checksum of the stored records.
        computed: u32,
    },
    /// A priority list is malformed.
    #[error("priority list line {line}: {detail}")]
    PriorityList {
        /// 1-based line number (0: the whole file).
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// An acceleration layer's blob is not the plain tar this crate writes.
    #[error("acceleration layer: {0}")]
    AccelLayer(String),
    /// A page-cache warm list is malformed.
    #[error("warm list: {0}")]
    WarmList(String),
    /// A file operation failed. (The cause is part of the message, not a
    /// separate `source()`, so error chains do not print it twice.)
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The file cannot be read as a trace or list: not a regular file, or
    /// larger than the cap. The error names the file.
    #[error("{0}")]
    File(overlaybd_core::Error),
    /// A trace record names a layer the image does not have.
    #[error("trace record {record}: layer {layer}, but the image has {layers} layer(s)")]
    NoSuchLayer {
        /// 0-based record number.
        record: usize,
        /// The layer it names.
        layer: u32,
        /// Layers of the image.
        layers: usize,
    },
    /// A trace file error, with the file it came from.
    #[error("{path}: {cause}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: Box<Error>,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            e @ (Error::Io { .. } | Error::InFile { .. } | Error::File(_)) => e,
            e => Error::InFile {
                path: path.into(),
                cause: Box::new(e),
            },
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
