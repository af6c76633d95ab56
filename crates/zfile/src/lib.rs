//! ZFile: the seekable block-compressed container of overlaybd (upstream v1.0.18 compatible).
//!
//! Pure format code: a [`ZFileReader`] over any [`ReadAt`] source, a streaming
//! [`ZFileWriter`], CRC-32C in the raw form upstream uses, and a verify pass.
//! See `docs/ARCHITECTURE.md` and the format reference for the byte layout.

pub mod source;

pub use source::{FileSource, ReadAt, Window};
#[derive(Debug, thiserror::Error)] pub enum Error { #[error("x")] X }
