//! The one error type of the crate.

use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading or writing a ZFile. Each variant names
/// the field, block index or byte offset involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The 24-byte magic (`ZFile\0\1\0` + `tuji.yyf@Alibaba`) did not match.
    #[error("bad ZFile magic in the {what} at offset {offset}")]
    BadMagic {
        /// `"header"` or `"trailer"`.
        what: &'static str,
        /// Byte offset of the block that was checked.
        offset: u64,
    },
    /// The header's CRC (seed 0, whole 512-byte block, digest bytes zeroed) is wrong.
    #[error("header digest mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderDigest {
        /// Value at offset 28.
        stored: u32,
        /// Value computed over the block.
        computed: u32,
    },
    /// The trailer's own CRC is wrong.
    #[error("trailer digest mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    TrailerDigest {
        /// Value at offset 28 of the trailer.
        stored: u32,
        /// Value computed over the trailer block.
        computed: u32,
    },
    /// The flags word (offset 32) of a header or trailer is not acceptable.
    #[error("bad {what} flags {flags:#x}: {detail}")]
    BadFlags {
        /// `"header"` or `"trailer"`.
        what: &'static str,
        /// The flags word as stored.
        flags: u64,
        /// Which rule failed.
        detail: &'static str,
    },
    /// The source ends before a structure it must hold.
    #[error("truncated ZFile: the {what} needs {need} bytes, the source has {have}")]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// Bytes (or end offset) required.
        need: u64,
        /// Bytes (or end offset) available.
        have: u64,
    },
    /// `index_size` / `index_offset` / `original_file_size` are inconsistent or too large.
    #[error("bad index (index_offset {index_offset}, index_size {index_size}): {detail}")]
    IndexSize {
        /// `index_offset` field.
        index_offset: u64,
        /// `index_size` field (number of blocks).
        index_size: u64,
        /// Which rule failed.
        detail: String,
    },
    /// The jump table's CRC (`index_crc`, seed 0) is wrong.
    #[error("jump table CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    IndexCrc {
        /// `index_crc` field.
        stored: u32,
        /// Value computed over the jump-table bytes.
        computed: u32,
    },
    /// A jump-table entry is invalid.
    #[error("jump table entry for block {block} (stored length {len}): {detail}")]
    JumpTable {
        /// Block index.
        block: u64,
        /// The stored length (jump-table entry).
        len: u32,
        /// Which rule failed.
        detail: String,
    },
    /// A block's CRC (seed 100007 over its compressed bytes) does not match.
    #[error("block {block} at offset {offset}: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BlockCrc {
        /// Block index.
        block: u64,
        /// Byte offset of the block in the ZFile.
        offset: u64,
        /// CRC stored after the block.
        stored: u32,
        /// CRC computed over the block.
        computed: u32,
    },
    /// A stored block length exceeds the codec's worst case for the block size.
    #[error("compressed block larger than its buffer: block {block} stores {len} bytes, at most {max} possible")]
    BlockTooLarge {
        /// Block index.
        block: u64,
        /// Stored length (including the CRC when present).
        len: u32,
        /// Largest stored length the codec can produce for this block size.
        max: u32,
    },
    /// A block failed to decode, or decoded to the wrong size.
    #[error("block {block}: decompression failed: {detail}")]
    Decompress {
        /// Block index.
        block: u64,
        /// Codec message or size mismatch.
        detail: String,
    },
    /// Compressing a block failed (codec error).
    #[error("compression failed: {0}")]
    Compress(String),
    /// The `algo` byte is not LZ4 (1) or zstd (2).
    #[error("unsupported compression algorithm {0} (1 = LZ4, 2 = zstd)")]
    UnsupportedAlgorithm(u8),
    /// The block size is not one this operation supports.
    #[error("unsupported block size {0} (read: 4, 8, 16, 32 or 64 KiB; write: 4 to 32 KiB)")]
    BadBlockSize(u32),
    /// A feature the format defines but no upstream tool uses (jump-table compression,
    /// dictionaries).
    #[error("unsupported ZFile feature: {0}")]
    Unsupported(&'static str),
    /// The writer was used after a previous error.
    #[error("writer unusable after an earlier error")]
    Poisoned,
    /// I/O error from the underlying source or sink.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl From<Error> for io::Error {
    /// `Io` errors pass through unchanged; every format error becomes
    /// `InvalidData` carrying the [`Error`] (downcastable via `get_ref`).
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}
