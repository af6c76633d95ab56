//! obd-remote: remote layer sources for the image stack of `overlaybd-core`:
//! registry range reads (auth, mirrors, P2P), request shaping and scheduling,
//! the persistent block cache, background download, the OCI distribution
//! client (manifests, blobs, uploads), the OCI image model ([`oci`]: types,
//! media types, overlaybd annotations, platform matching, resolution) and the
//! TOML service config.
//!
//! The pieces meet at [`RangeFetcher`]: the registry client implements it; the
//! cached, single-flight [`blob::RemoteBlob`] consumes it and is a `ReadAt`, so
//! the ZFile and LSMT layers above read a remote blob like a local file.

use overlaybd_core::error::Result;

pub mod blob;
pub mod cache;
pub mod download;
pub mod oci;
pub mod sched;
pub mod timeline;
pub mod verity;

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

thread_local! {
    static READ_PRIORITY: std::cell::Cell<Priority> =
        const { std::cell::Cell::new(Priority::Foreground) };
}

/// Runs `f` with this thread's remote-blob reads ([`blob::RemoteBlob::read`],
/// hence every [`zfile::ReadAt`] read that reaches one) admitted at `prio`
/// instead of [`Priority::Foreground`]. Trace replay reads under
/// [`Priority::Prefetch`], so that joining a queued prefetch request never
/// raises it above the container's own reads.
pub fn with_read_priority<R>(prio: Priority, f: impl FnOnce() -> R) -> R {
    struct Restore(Priority);
    impl Drop for Restore {
        fn drop(&mut self) {
            READ_PRIORITY.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(READ_PRIORITY.with(|p| p.replace(prio)));
    f()
}

/// The priority this thread's remote-blob reads run at (see
/// [`with_read_priority`]).
pub fn read_priority() -> Priority {
    READ_PRIORITY.with(|p| p.get())
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
    /// The blob's piece table, when its image carries one and the service's
    /// `[cache] verify` policy is not `off`: every range fetched is checked
    /// against it before anyone sees it ([`verity`]).
    pub verity: Option<std::sync::Arc<verity::PieceTable>>,
}

impl BlobRef {
    /// A blob without a piece table.
    pub fn new(url: impl Into<String>, digest: impl Into<String>, size: u64) -> Self {
        BlobRef {
            url: url.into(),
            digest: digest.into(),
            size,
            verity: None,
        }
    }

    /// True when every byte fetched for this blob is checked against its
    /// piece table, so its cached bytes are the blob's whatever registry
    /// served them; false when they are only as good as their source.
    pub fn verified(&self) -> bool {
        self.verity.is_some()
    }

    /// The block-cache scope of this blob's bytes: the origin that serves
    /// them (`host/repository` of [`BlobRef::url`]), so bytes one registry
    /// or repository served are never handed to a reader of another. `None`
    /// (shared by every origin) only for bytes verified against a digest
    /// table the manifest covers.
    pub fn cache_scope(&self) -> Option<String> {
        if self.verified() {
            return None;
        }
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        let origin = rest.rsplit_once("/blobs/").map_or(rest, |(o, _)| o);
        Some(origin.replacen("/v2/", "/", 1))
    }
}

/// Fetches byte ranges of blobs. The registry client implements it; tests use
/// in-memory fakes.
pub trait RangeFetcher: Send + Sync {
    /// Returns exactly bytes `[offset, offset + len)` of `blob`, or an error
    /// naming the URL and range. Never returns short or unverified-length data.
    fn fetch(&self, blob: &BlobRef, offset: u64, len: u64, prio: Priority) -> Result<Vec<u8>>;

    /// The blob's size, when the config does not give it.
    fn blob_size(&self, blob_url: &str) -> Result<u64>;

    /// Readies what a first request for `blob_url` needs (the HTTP clients
    /// of its endpoints, with their TLS roots) so that request does not
    /// wait for it. The default does nothing.
    fn prepare(&self, _blob_url: &str) {}

    /// Streams bytes `[offset, offset + len)` of `blob` to `sink` in
    /// consecutive `unit`-byte pieces (the last one may be shorter), each
    /// checked as [`RangeFetcher::fetch`] checks its bytes before `sink` sees
    /// it; stops early when `sink` says so. For bulk readers (a whole-image
    /// flatten): one long request instead of one per piece. An error may come
    /// after some pieces were delivered; those stay good, the caller fetches
    /// the rest another way. The default fetches piece by piece.
    fn fetch_stream(
        &self,
        blob: &BlobRef,
        (offset, len, unit): (u64, u64, u64),
        prio: Priority,
        sink: &mut dyn UnitSink,
    ) -> Result<()> {
        stream_by_pieces(self, blob, (offset, len, unit), prio, sink)
    }
}

/// [`RangeFetcher::fetch_stream`] as one [`RangeFetcher::fetch`] per piece
/// (the trait's default).
pub fn stream_by_pieces<F: RangeFetcher + ?Sized>(
    fetcher: &F,
    blob: &BlobRef,
    (offset, len, unit): (u64, u64, u64),
    prio: Priority,
    sink: &mut dyn UnitSink,
) -> Result<()> {
    let end = offset.saturating_add(len);
    let mut at = offset;
    while at < end {
        let n = unit.max(1).min(end - at);
        let data = fetcher.fetch(blob, at, n, prio)?;
        if data.len() as u64 != n {
            return Err(overlaybd_core::Error::Remote {
                url: blob.url.clone(),
                offset: at,
                end: at + n,
                detail: format!("fetcher returned {} bytes, expected {n}", data.len()),
            });
        }
        if !sink.unit(at, data) {
            break;
        }
        at += n;
    }
    Ok(())
}

/// Where [`RangeFetcher::fetch_stream`] delivers a stream's pieces.
pub trait UnitSink {
    /// A buffer to read the next piece into, of any length and contents
    /// (the caller sizes it and overwrites it); a recycled one saves
    /// faulting in fresh pages for every piece.
    fn buffer(&mut self) -> Vec<u8> {
        Vec::new()
    }

    /// The checked bytes of the piece at `offset`; false stops the stream.
    fn unit(&mut self, offset: u64, bytes: Vec<u8>) -> bool;
}

/// Fills `buf` as far as the stream goes; the bytes read (0 at its end).
/// Unlike `read_exact`, a short stream tells how far it got; unlike
/// `read_to_end`, nothing of `buf` is zeroed first.
pub fn read_full(rd: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match rd.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(feature = "registry")]
pub mod auth;
#[cfg(feature = "registry")]
pub mod creds;
#[cfg(feature = "registry")]
pub mod distribution;
#[cfg(feature = "registry")]
pub mod http;
pub mod metrics;
#[cfg(feature = "registry")]
pub mod registry;
#[cfg(feature = "registry")]
pub mod service;
