//! The crate's error type and its mapping onto gRPC status codes (which
//! containerd's `errdefs.FromGRPC` turns back into its error classes).

use std::path::PathBuf;

/// Every error the snapshotter reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot (or parent) does not exist.
    #[error("snapshot {0} not found")]
    NotFound(String),
    /// A snapshot with this key or name exists already.
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    /// The request is malformed (bad filter, immutable field, wrong kind…).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is valid but the state does not allow it (e.g. children).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Db(String),
    /// The metadata store's file could not be read or written (its file
    /// system is full, or failing). The operation was not applied; the
    /// store is reopened by the next one.
    #[error("metadata store {}: {source}", path.display())]
    DbIo {
        /// The store's file (empty until [`crate::meta::Store`] fills it in).
        path: PathBuf,
        /// The OS error (ENOSPC: "No space left on device").
        #[source]
        source: std::io::Error,
    },
    /// A block device of an obd layer could not be attached or configured.
    #[error("obd device: {0}")]
    Device(String),
    /// The configuration file is unreadable or invalid.
    #[error("config {path}: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether the file system said it is full (ENOSPC), anywhere.
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::Io { source, .. } | Error::DbIo { source, .. } => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            _ => false,
        }
    }
}

impl From<redb::Error> for Error {
    /// I/O failures (and redb's latch after one) become [`Error::DbIo`],
    /// which makes the store reopen; the rest [`Error::Db`].
    fn from(e: redb::Error) -> Self {
        let source = match e {
            redb::Error::Io(source) => source,
            redb::Error::PreviousIo | redb::Error::DatabaseClosed => std::io::Error::other(
                "closed after an earlier I/O error; reopened by the next operation",
            ),
            e => return Error::Db(e.to_string()),
        };
        Error::DbIo {
            path: PathBuf::new(),
            source,
        }
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                redb::Error::from(e).into()
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Db(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            // containerd's errdefs: ErrResourceExhausted.
            _ if e.is_no_space() => tonic::Status::resource_exhausted(msg),
            Error::Io { .. }
            | Error::Db(_)
            | Error::DbIo { .. }
            | Error::Config { .. }
            | Error::Device(_) => tonic::Status::internal(msg),
        }
    }
}
