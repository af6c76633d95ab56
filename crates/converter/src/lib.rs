//! converter: OCI image → obd image in user space.
//!
//! Each OCI layer tar is applied to an ext4 filesystem with libext2fs
//! (through FFI, linked dynamically; the declarations are private to the
//! crate and checked against the C headers by a test) whose block device is
//! our own `io_manager` ([`io`]): reads come from the layers converted so far plus the current
//! [`overlaybd_core::lsmt::WritableLayer`]; writes go through a bounded
//! write-back page cache and reach the writable layer only when they change
//! a block. Each layer therefore becomes exactly its block delta, committed
//! as a tar(ZFile(LSMT)) blob; the config's diff_ids and the manifest's
//! overlaybd annotations follow upstream's converter (formats.md §8).
//!
//! - [`apply`]: the streaming tar applier (every entry type, PAX xattrs and
//!   GNU sparse files, OCI whiteouts and opaque directories).
//! - [`fs`]: the safe wrapper over one libext2fs handle: mkfs (upstream's
//!   fresh-layer options), open, create/link/remove, xattrs, and hash-indexing
//!   of directories that outgrow one block.
//! - [`mod@convert`]: the pipeline. Layer N+1 is applied on top of layer N's
//!   writable files while layer N is committed and compressed on another
//!   thread; layer blobs are decompressed and digest-checked on a reader
//!   thread.
//! - [`oci`]: sources and destinations as traits ([`oci::ImageSource`],
//!   [`oci::ImageDest`]); [`oci::OciLayout`] implements both for OCI image
//!   layouts on disk.
//! - [`registry`]: the same traits for registries (`docker://…`): streamed,
//!   digest-checked reads; uploads overlapping the conversion; manifests
//!   pushed by digest once their blobs are in, and the tag last.
//! - [`tree`]: reads an ext4 tree back, for verification.
//!
//! Hostile input fails with a typed [`Error`] naming the layer and entry
//! (names escaped), never a panic or a corrupt file system: names over 255
//! bytes ([`Error::NameTooLong`]), a hard link past ext4's 65,000
//! ([`Error::TooManyLinks`]), a blob whose size or compression contradicts
//! its descriptor ([`Error::BlobSize`], [`Error::MediaType`]) and unknown
//! media types. Paths have no depth limit: resolution and removal are
//! iterative and the caches cost the same per entry at any depth; whiteouts
//! and big directories take linear time.
//!
//! No root, mount or kernel is involved, and nothing depends on the clock or
//! on memory contents: the filesystem UUID and hash seed derive from the
//! first diff_id, inode times from the tar mtime, superblock times from a
//! constant, and directory blocks are scrubbed of the uninitialised bytes
//! libext2fs leaves when it splits htree leaves. The same input and options
//! give byte-identical blobs and manifests.

pub mod apply;
pub mod convert;
pub mod error;
mod ffi;
pub mod fs;
pub mod io;
pub mod oci;
pub mod registry;
pub mod tree;

pub use convert::{
    commit_layer, convert, file_digest, layer_descriptor, write_layer_blob, CommitParams,
    LayerReport, MediaTypes, Observer, Options, Report, DEFAULT_ALGORITHM, DEFAULT_BLOCK_SIZE,
    DEFAULT_LEVEL,
};
pub use error::{Error, Result};
pub use oci::{Descriptor, ImageDest, ImageSource, OciLayout};
