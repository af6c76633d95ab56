//! The 512-byte header/trailer block (a 96-byte struct followed by zeros).

use crate::crc::crc32c_raw;
use crate::error::{Error, Result};

/// Size of the header and of the trailer block.
pub const HEADER_SIZE: usize = 512;
/// Value of the `size` field (the struct length).
pub const STRUCT_SIZE: u32 = 96;
/// `magic0` (8 bytes) followed by `magic1` (16 bytes).
pub const MAGIC: [u8; 24] = *b"ZFile\0\x01\0tuji.yyf@Alibaba";
/// Byte range of the `digest` field, zeroed while the digest is computed.
pub const DIGEST_RANGE: std::ops::Range<usize> = 28..32;

/// Flag bits of the u64 at offset 32.
pub mod flags {
    /// 1 = header, 0 = trailer.
    pub const HEADER: u64 = 1 << 0;
    /// 1 = data file (always set).
    pub const TYPE: u64 = 1 << 1;
    /// Set on the trailer only.
    pub const SEALED: u64 = 1 << 2;
    /// The header carries the final index fields; the trailer need not be read.
    pub const HEADER_OVERWRITE: u64 = 1 << 3;
    /// `digest` and `index_crc` are valid.
    pub const CALC_DIGEST: u64 = 1 << 4;
    /// Jump table compressed: defined upstream, never written or read.
    pub const IDX_COMP: u64 = 1 << 5;
    /// Flags of an `overlaybd-zfile` header (header, data, digest).
    pub const HEADER_PLAIN: u64 = HEADER | TYPE | CALC_DIGEST;
    /// Flags of an overwritten header, as `overlaybd-commit -z` writes (header, data,
    /// overwrite, digest).
    pub const HEADER_FINAL: u64 = HEADER | TYPE | HEADER_OVERWRITE | CALC_DIGEST;
    /// Flags of every upstream trailer (data, sealed, digest).
    pub const TRAILER: u64 = TYPE | SEALED | CALC_DIGEST;
}

/// Block codec (`algo` byte at offset 76).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Algorithm {
    /// LZ4 raw block format.
    Lz4 = 1,
    /// One zstd frame per block (level 3).
    Zstd = 2,
}

impl TryFrom<u8> for Algorithm {
    type Error = Error;
    fn try_from(v: u8) -> Result<Self> {
        match v {
            1 => Ok(Algorithm::Lz4),
            2 => Ok(Algorithm::Zstd),
            other => Err(Error::UnsupportedAlgorithm(other)),
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
        })
    }
}

/// The decoded fields of a header or trailer block. Reserved bytes are not kept;
/// [`Header::encode`] writes them as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// `size` field (offset 24); 96 when written by any known tool.
    pub struct_size: u32,
    /// Stored `digest` (offset 28).
    pub digest: u32,
    /// Flag word (offset 32), see [`flags`].
    pub flags: u64,
    /// Offset of the jump table from the ZFile start (offset 40).
    pub index_offset: u64,
    /// Number of blocks = jump-table entries (offset 48).
    pub index_size: u64,
    /// Uncompressed size in bytes (offset 56).
    pub original_size: u64,
    /// Raw CRC-32C (seed 0) of the jump-table bytes (offset 64).
    pub index_crc: u32,
    /// Uncompressed block size (offset 72).
    pub block_size: u32,
    /// Codec byte (offset 76): 1 = LZ4, 2 = zstd.
    pub algo: u8,
    /// Compression level byte (offset 77); written as 0.
    pub level: u8,
    /// Dictionary flag (offset 78); 0.
    pub use_dict: u8,
    /// Dictionary size (offset 84); 0.
    pub dict_size: u32,
    /// Nonzero = every block is followed by its 4-byte CRC (offset 88).
    pub verify: u8,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Digest of a header/trailer block: raw CRC-32C, seed 0, over the first 512 bytes
/// with the digest bytes (28..32) taken as zero. Returns `None` if `block` is shorter
/// than 512 bytes.
pub fn block_digest(block: &[u8]) -> Option<u32> {
    let block = block.get(..HEADER_SIZE)?;
    let crc = crc32c_raw(0, &block[..DIGEST_RANGE.start]);
    let crc = crc32c_raw(crc, &[0u8; 4]);
    Some(crc32c_raw(crc, &block[DIGEST_RANGE.end..]))
}

/// True when `first_bytes` (at least the first 40 bytes of a blob) start with the
/// ZFile magic and the header flag bit, as upstream's `is_zfile` checks.
pub fn is_zfile(first_bytes: &[u8]) -> bool {
    first_bytes.len() >= 40
        && first_bytes[..24] == MAGIC
        && u64_at(first_bytes, 32) & flags::HEADER != 0
}

impl Header {
    /// Decodes a header or trailer from the first 512 bytes of `block`. Checks the
    /// length and the magic only; `offset` and `what` label errors.
    pub fn parse_at(block: &[u8], what: &'static str, offset: u64) -> Result<Header> {
        if block.len() < HEADER_SIZE {
            return Err(Error::Truncated {
                what,
                need: HEADER_SIZE as u64,
                have: block.len() as u64,
            });
        }
        if block[..24] != MAGIC {
            return Err(Error::BadMagic { what, offset });
        }
        Ok(Header {
            struct_size: u32_at(block, 24),
            digest: u32_at(block, 28),
            flags: u64_at(block, 32),
            index_offset: u64_at(block, 40),
            index_size: u64_at(block, 48),
            original_size: u64_at(block, 56),
            index_crc: u32_at(block, 64),
            block_size: u32_at(block, 72),
            algo: block[76],
            level: block[77],
            use_dict: block[78],
            dict_size: u32_at(block, 84),
            verify: block[88],
        })
    }

    /// [`Header::parse_at`] for a block at offset 0 labelled "header".
    pub fn parse(block: &[u8]) -> Result<Header> {
        Self::parse_at(block, "header", 0)
    }

    /// Encodes into a zeroed 512-byte block. If [`flags::CALC_DIGEST`] is set the
    /// digest is computed (and `self.digest` ignored); otherwise `self.digest` is
    /// written as is.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..24].copy_from_slice(&MAGIC);
        b[24..28].copy_from_slice(&self.struct_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.flags.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.index_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.original_size.to_le_bytes());
        b[64..68].copy_from_slice(&self.index_crc.to_le_bytes());
        b[72..76].copy_from_slice(&self.block_size.to_le_bytes());
        b[76] = self.algo;
        b[77] = self.level;
        b[78] = self.use_dict;
        b[84..88].copy_from_slice(&self.dict_size.to_le_bytes());
        b[88] = self.verify;
        let digest = if self.flags & flags::CALC_DIGEST != 0 {
            block_digest(&b).unwrap_or(0)
        } else {
            self.digest
        };
        b[DIGEST_RANGE].copy_from_slice(&digest.to_le_bytes());
        b
    }

    /// True if the header bit is set.
    pub fn is_header(&self) -> bool {
        self.flags & flags::HEADER != 0
    }

    /// True if [`flags::CALC_DIGEST`] is set.
    pub fn has_digest(&self) -> bool {
        self.flags & flags::CALC_DIGEST != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_parse_round_trip() {
        let h = Header {
            struct_size: STRUCT_SIZE,
            digest: 0,
            flags: flags::TRAILER,
            index_offset: 0x254,
            index_size: 3,
            original_size: 0x2064,
            index_crc: 0x5A67_5054,
            block_size: 4096,
            algo: 1,
            level: 0,
            use_dict: 0,
            dict_size: 0,
            verify: 1,
        };
        let b = h.encode();
        // Trailer of the worked example, formats.md 3.10.
        assert_eq!(u32_at(&b, 28), 0x9B16_37B0);
        let p = Header::parse(&b).unwrap();
        assert_eq!(
            p,
            Header {
                digest: 0x9B16_37B0,
                ..h
            }
        );
        assert_eq!(block_digest(&b), Some(0x9B16_37B0));
        assert!(!is_zfile(&b));
        let hb = Header {
            flags: flags::HEADER_FINAL,
            ..h
        }
        .encode();
        assert!(is_zfile(&hb));
        assert!(!is_zfile(&hb[..39]));
    }

    #[test]
    fn rejects_short_and_bad_magic() {
        assert!(matches!(
            Header::parse(&[0u8; 100]),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            Header::parse(&[0u8; 512]),
            Err(Error::BadMagic { .. })
        ));
        assert_eq!(block_digest(&[0u8; 511]), None);
    }
}
