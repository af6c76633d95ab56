//! Remote layer sources: registry range reads (auth, mirrors, P2P), request
//! shaping, the persistent block cache, and background download.
//!
//! The pieces meet at [`RangeFetcher`]: the registry client implements it; the
//! cached, single-flight [`blob::RemoteBlob`] consumes it and is a `ReadAt`, so
//! the ZFile and LSMT layers above read a remote blob like a local file.

use crate::error::Result;

pub mod blob;
pub mod cache;
pub mod download;
pub mod sched;

/// How urgent a fetch is: a container waiting on a read goes before prefetch and
/// background download, always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A read someone is blocked on.
    Foreground = 0,
    /// Trace replay / priority-list prefetch.
    Prefetch = 1,
    /// Whole-blob background download.
    Background = 2,
}

/// One remote blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobRef {
    /// `repoBlobUrl + "/" + digest`, e.g. `https://host/v2/ns/repo/blobs/sha256:…`.
    pub url: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Blob size in bytes (from the config or a probe).
    pub size: u64,
}

/// Fetches byte ranges of blobs. The registry client implements it; tests use
/// in-memory fakes.
pub trait RangeFetcher: Send + Sync {
    /// Returns exactly bytes `[offset, offset + len)` of `blob`, or an error
    /// naming the URL and range. Never returns short or unverified-length data.
    fn fetch(&self, blob: &BlobRef, offset: u64, len: u64, prio: Priority) -> Result<Vec<u8>>;

    /// The blob's size, when the config does not give it.
    fn blob_size(&self, blob_url: &str) -> Result<u64>;
}

#[cfg(feature = "registry")]
pub mod auth;
#[cfg(feature = "registry")]
pub mod creds;
#[cfg(feature = "registry")]
pub mod distribution;
pub mod metrics;
#[cfg(feature = "registry")]
pub mod registry;
#[cfg(feature = "registry")]
pub mod service;
