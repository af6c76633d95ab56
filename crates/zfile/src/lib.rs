//! ZFile: the seekable block-compressed container of overlaybd (upstream v1.0.18
//! compatible, byte for byte).
//!
//! Pure format code: a [`ZFileReader`] over any [`ReadAt`] source, a streaming
//! [`ZFileWriter`], CRC-32C in the raw form upstream uses, a verify pass and a strict
//! conformance check ([`validate_strict`]). Layout:
//!
//! ```text
//! | header 512 B | dict (dict_size B) | blk 0 | crc 0 | ... | blk N-1 | crc N-1 | jump table (4 N B) | trailer 512 B |
//! ```
//!
//! # 64 KiB blocks are read-only
//!
//! The reader accepts 4, 8, 16, 32 and 64 KiB blocks; the writer refuses 64 KiB
//! ([`Error::BadBlockSize`]). Upstream's reader stages compressed data in a fixed
//! 64 KiB buffer, so a stored block (compressed bytes + 4-byte CRC) larger than
//! 65,536 bytes cannot be read by upstream. Incompressible 64 KiB blocks always hit
//! this (the LZ4 bound for 64 KiB is 65,809 bytes), so files we wrote with 64 KiB
//! blocks would not be portable. Our reader has no such limit: it accepts any stored
//! length up to the codec bound for the block size.
//!
//! # Integrity
//!
//! Opening checks the header digest, the trailer (or the overwritten header), the
//! jump-table CRC and the consistency of every index field with the source size, so
//! no lying field makes the reader allocate beyond what the source holds. Reads check
//! each block's CRC and decoded size. Errors are typed ([`Error`]); no input panics.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod crc;
mod error;
pub mod header;
pub mod lz4;
mod reader;
pub mod source;
pub mod sync;
mod validate;
mod writer;

pub use crc::crc32c_raw;
pub use error::{Error, Result};
pub use header::{flags, is_zfile, Algorithm, Header, HEADER_SIZE};
pub use reader::{Info, OpenOptions, VerifyReport, ZFileReader, BLOCK_TRIES, MAX_INDEX_SIZE};
pub use source::{FileSource, ReadAt, Window};
pub use validate::{validate_strict, UPSTREAM_MAX_STORED};
pub use writer::{compress, decompress, Options, ZFileWriter};
