//! converter: OCI image → obd image in user space.
//!
//! Each OCI layer tar is applied to an ext4 filesystem with libext2fs
//! (through FFI, linked dynamically) whose block device is our own
//! `io_manager`: reads come from the layers converted so far plus the current
//! [`overlaybd_core::lsmt::WritableLayer`], writes land in that writable layer
//! only when they change a block. Each layer therefore becomes exactly its
//! block delta, committed as a tar(ZFile(LSMT)) blob; the config's diff_ids
//! and the manifest's overlaybd annotations follow upstream's converter.
//!
//! No root, mount or kernel is involved, and nothing depends on the clock:
//! the filesystem UUID and hash seed derive from the source diff_ids, every
//! inode time from the tar mtime, the superblock times from a constant.
//!
//! Sources and destinations are traits ([`oci::ImageSource`],
//! [`oci::ImageDest`]); [`oci::OciLayout`] implements both for OCI image
//! layouts on disk.

pub mod apply;
pub mod convert;
pub mod error;
pub mod ffi;
pub mod fs;
pub mod io;
pub mod oci;
pub mod tree;

pub use convert::{convert, LayerReport, Options, Report};
pub use error::{Error, Result};
pub use oci::{Descriptor, ImageDest, ImageSource, OciLayout};
