//! Piece tables: the strong digests that make lazily read bytes trustworthy.
//!
//! A layer blob is read a range at a time, so its own sha256 (the digest the
//! manifest names) can only be checked once the whole blob is there. A
//! [`PieceTable`] carries the BLAKE3 digest of every fixed-size *piece* of the
//! blob's stored bytes (BLAKE3 rather than sha256: it hashes 2.5–3.5× faster
//! here, and a remote flatten is CPU-bound, docs/BENCHMARKS.md); the registry client checks each fetched range against it
//! before the bytes enter the cache or reach a reader. The table is a blob of
//! its own in the image's repository, named by layer annotations
//! ([`crate::oci::ANN_VERITY_DIGEST`], [`crate::oci::ANN_VERITY_SIZE`]), so
//! the manifest digest covers it.
//!
//! Encoding (all integers little-endian; `docs/formats.md`, "Piece tables"):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `OBDPIECE` |
//! | 8 | 4 | version, `1` |
//! | 12 | 4 | `piece_shift`: the piece size is `1 << piece_shift`, 12..=24 |
//! | 16 | 8 | blob size in bytes |
//! | 24 | 32 | the blob's sha256 |
//! | 56 | 8 | piece count = ⌈blob size / piece size⌉ |
//! | 64 | 32 · count | BLAKE3-256 of each piece, in order; the last piece may be short |
//!
//! Parsing is strict: the count must be exactly the one the blob size gives,
//! the length exactly `64 + 32 · count`, and the count is checked against the
//! bytes present before anything is allocated.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// The first 8 bytes of every table.
pub const MAGIC: [u8; 8] = *b"OBDPIECE";
/// The one version written and read.
pub const VERSION: u32 = 1;
/// Bytes before the digests.
pub const HEADER_SIZE: usize = 64;
/// Bytes of one piece digest (BLAKE3-256).
pub const DIGEST_SIZE: usize = 32;
/// Smallest piece: 4 KiB.
pub const MIN_PIECE_SHIFT: u32 = 12;
/// Largest piece: 16 MiB.
pub const MAX_PIECE_SHIFT: u32 = 24;
/// The piece size written by default: 64 KiB (divides the default fetch
/// alignment `min_fetch`, 256 KiB, and the cache block, 64 KiB).
pub const DEFAULT_PIECE_SIZE: u64 = 64 << 10;
/// Largest table read or written: 64 MiB (2 Mi pieces: 128 GiB of blob at
/// 64 KiB pieces; larger blobs get larger pieces, see [`piece_size_for`]).
pub const MAX_TABLE_SIZE: u64 = 64 << 20;
/// Most pieces in one table.
pub const MAX_PIECES: u64 = (MAX_TABLE_SIZE - HEADER_SIZE as u64) / DIGEST_SIZE as u64;

/// What is wrong with a table, or with bytes checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerityError {
    /// Fewer bytes than the header.
    Truncated {
        /// Bytes present.
        have: usize,
    },
    /// The magic is not [`MAGIC`].
    BadMagic,
    /// A version other than [`VERSION`].
    Version(u32),
    /// `piece_shift` outside 12..=24.
    PieceShift(u32),
    /// The piece count is not ⌈blob size / piece size⌉, or exceeds
    /// [`MAX_PIECES`].
    Count {
        /// The stored count.
        count: u64,
        /// The count the blob size gives.
        expected: u64,
    },
    /// The table's length is not `64 + 32 · count`.
    Length {
        /// Bytes present.
        len: u64,
        /// Bytes the header calls for.
        expected: u64,
    },
    /// A range to check is empty, past the blob's end, or not made of whole
    /// pieces.
    Range {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// The table's piece size.
        piece: u64,
    },
    /// A piece's bytes do not have the recorded digest.
    Mismatch {
        /// Piece number.
        piece: u64,
        /// Its first byte in the blob.
        offset: u64,
        /// Its length.
        len: u64,
    },
}

impl fmt::Display for VerityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { have } => {
                write!(f, "piece table truncated: {have} bytes, the header needs {HEADER_SIZE}")
            }
            Self::BadMagic => write!(f, "not a piece table (bad magic)"),
            Self::Version(v) => write!(f, "piece table version {v} (this build reads {VERSION})"),
            Self::PieceShift(s) => write!(
                f,
                "piece table field `piece_shift` {s} outside {MIN_PIECE_SHIFT}..={MAX_PIECE_SHIFT}"
            ),
            Self::Count { count, expected } => write!(
                f,
                "piece table field `count` {count}: the blob size gives {expected} (at most {MAX_PIECES})"
            ),
            Self::Length { len, expected } => {
                write!(f, "piece table has {len} bytes, its header calls for {expected}")
            }
            Self::Range { offset, len, piece } => write!(
                f,
                "range {offset}+{len} is not whole {piece}-byte pieces of the blob"
            ),
            Self::Mismatch { piece, offset, len } => write!(
                f,
                "piece {piece} (bytes {offset}..{}) does not match its digest in the piece table",
                offset + len
            ),
        }
    }
}

impl std::error::Error for VerityError {}

/// The piece size to use for a blob of `blob_size` bytes: the default, or
/// the smallest power of two above it that keeps the table within
/// [`MAX_PIECES`].
pub fn piece_size_for(blob_size: u64) -> u64 {
    let mut p = DEFAULT_PIECE_SIZE;
    while blob_size.div_ceil(p) > MAX_PIECES && p < 1 << MAX_PIECE_SHIFT {
        p <<= 1;
    }
    p
}

/// The encoded size of a table with `piece`-byte pieces over a blob of
/// `blob_size` bytes.
pub fn encoded_len(blob_size: u64, piece: u64) -> u64 {
    HEADER_SIZE as u64 + blob_size.div_ceil(piece.max(1)) * DIGEST_SIZE as u64
}

/// The BLAKE3 digests of a blob's pieces (and the whole blob's sha256).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PieceTable {
    shift: u32,
    blob_size: u64,
    blob_sha256: [u8; 32],
    /// `count` digests, 32 bytes each, back to back.
    digests: Box<[u8]>,
}

impl fmt::Debug for PieceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PieceTable")
            .field("blob", &self.blob_digest())
            .field("blob_size", &self.blob_size)
            .field("piece_size", &self.piece_size())
            .field("pieces", &self.pieces())
            .finish()
    }
}

impl PieceTable {
    /// Parses an encoded table (the whole table blob).
    pub fn decode(bytes: &[u8]) -> Result<Self, VerityError> {
        if bytes.len() < HEADER_SIZE {
            return Err(VerityError::Truncated { have: bytes.len() });
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        if bytes[..8] != MAGIC {
            return Err(VerityError::BadMagic);
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(VerityError::Version(version));
        }
        let shift = u32_at(12);
        if !(MIN_PIECE_SHIFT..=MAX_PIECE_SHIFT).contains(&shift) {
            return Err(VerityError::PieceShift(shift));
        }
        let blob_size = u64_at(16);
        let count = u64_at(56);
        let expected = blob_size.div_ceil(1 << shift);
        if count != expected || count > MAX_PIECES {
            return Err(VerityError::Count { count, expected });
        }
        // count ≤ MAX_PIECES: no overflow.
        let want = HEADER_SIZE as u64 + count * DIGEST_SIZE as u64;
        if bytes.len() as u64 != want {
            return Err(VerityError::Length {
                len: bytes.len() as u64,
                expected: want,
            });
        }
        Ok(PieceTable {
            shift,
            blob_size,
            blob_sha256: bytes[24..56].try_into().expect("32 bytes"),
            digests: bytes[HEADER_SIZE..].into(),
        })
    }

    /// The encoded table.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE + self.digests.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.shift.to_le_bytes());
        out.extend_from_slice(&self.blob_size.to_le_bytes());
        out.extend_from_slice(&self.blob_sha256);
        out.extend_from_slice(&self.pieces().to_le_bytes());
        out.extend_from_slice(&self.digests);
        out
    }

    /// Builds the table of everything `r` yields, in `piece_size` pieces (a
    /// power of two, 4 KiB to 16 MiB; else [`io::ErrorKind::InvalidInput`]).
    pub fn build(r: impl Read, piece_size: u64) -> io::Result<Self> {
        let mut b = PieceHasher::new(piece_size)?;
        io::copy(&mut { r }, &mut b)?;
        b.finish()
    }

    /// Piece size in bytes.
    pub fn piece_size(&self) -> u64 {
        1 << self.shift
    }

    /// Number of pieces.
    pub fn pieces(&self) -> u64 {
        (self.digests.len() / DIGEST_SIZE) as u64
    }

    /// Size of the blob the table describes.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// The blob's digest, `sha256:<hex>`.
    pub fn blob_digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.blob_sha256))
    }

    /// `[offset, offset + len)` widened to whole pieces (clipped to the
    /// blob): the range a fetch must get to check these bytes.
    pub fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let p = self.piece_size();
        let start = offset - offset % p;
        let end = offset
            .saturating_add(len)
            .div_ceil(p)
            .saturating_mul(p)
            .min(self.blob_size)
            .max(start);
        (start, end - start)
    }

    /// Checks `data`, the blob's bytes from `offset`: it must be whole
    /// pieces (the last one may end at the blob's end) and each must have its
    /// recorded digest.
    pub fn verify(&self, offset: u64, data: &[u8]) -> Result<(), VerityError> {
        let p = self.piece_size();
        let len = data.len() as u64;
        let end = offset.checked_add(len);
        let whole = offset % p == 0
            && len > 0
            && end.is_some_and(|e| e <= self.blob_size && (e % p == 0 || e == self.blob_size));
        if !whole {
            return Err(VerityError::Range {
                offset,
                len,
                piece: p,
            });
        }
        let first = offset / p;
        for (i, chunk) in data.chunks(p as usize).enumerate() {
            let piece = first + i as u64;
            let at = piece as usize * DIGEST_SIZE;
            if blake3::hash(chunk).as_bytes()[..] != self.digests[at..at + DIGEST_SIZE] {
                return Err(VerityError::Mismatch {
                    piece,
                    offset: piece * p,
                    len: chunk.len() as u64,
                });
            }
        }
        Ok(())
    }
}

/// Builds a [`PieceTable`] from bytes written to it in order, hashing the
/// whole blob on the way (one pass over a blob gives its digest and table).
pub struct PieceHasher {
    piece: u64,
    whole: Sha256,
    current: blake3::Hasher,
    in_piece: u64,
    size: u64,
    digests: Vec<u8>,
}

impl PieceHasher {
    /// A hasher of `piece_size`-byte pieces (a power of two, 4 KiB to 16 MiB).
    pub fn new(piece_size: u64) -> io::Result<Self> {
        let ok = piece_size.is_power_of_two()
            && (MIN_PIECE_SHIFT..=MAX_PIECE_SHIFT).contains(&piece_size.trailing_zeros());
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("piece size {piece_size} is not a power of two from 4 KiB to 16 MiB"),
            ));
        }
        Ok(PieceHasher {
            piece: piece_size,
            whole: Sha256::new(),
            current: blake3::Hasher::new(),
            in_piece: 0,
            size: 0,
            digests: Vec::new(),
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The table, or [`io::ErrorKind::InvalidData`] when the blob needs more
    /// than [`MAX_PIECES`] pieces of this size.
    pub fn finish(mut self) -> io::Result<PieceTable> {
        if self.in_piece > 0 {
            self.digests
                .extend_from_slice(self.current.finalize().as_bytes());
            self.current.reset();
        }
        let pieces = (self.digests.len() / DIGEST_SIZE) as u64;
        if pieces > MAX_PIECES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a {}-byte blob needs {pieces} pieces of {} bytes; at most {MAX_PIECES} fit a table",
                    self.size, self.piece
                ),
            ));
        }
        Ok(PieceTable {
            shift: self.piece.trailing_zeros(),
            blob_size: self.size,
            blob_sha256: self.whole.finalize().into(),
            digests: self.digests.into_boxed_slice(),
        })
    }

    /// The whole blob's digest so far, `sha256:<hex>`, without finishing.
    pub fn blob_digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.whole.clone().finalize()))
    }
}

impl io::Write for PieceHasher {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        self.whole.update(buf);
        self.size += n as u64;
        while !buf.is_empty() {
            let take = ((self.piece - self.in_piece) as usize).min(buf.len());
            self.current.update(&buf[..take]);
            self.in_piece += take as u64;
            buf = &buf[take..];
            if self.in_piece == self.piece {
                self.digests
                    .extend_from_slice(self.current.finalize().as_bytes());
                self.current.reset();
                self.in_piece = 0;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn round_trips_and_checks_whole_pieces() {
        let data = blob(3 * 4096 + 100);
        let t = PieceTable::build(&data[..], 4096).unwrap();
        assert_eq!(
            (t.pieces(), t.piece_size(), t.blob_size()),
            (4, 4096, 12388)
        );
        let sha = Sha256::digest(&data);
        assert_eq!(t.blob_digest(), format!("sha256:{}", hex::encode(sha)));
        let enc = t.encode();
        assert_eq!(enc.len() as u64, encoded_len(12388, 4096));
        // Piece digests are BLAKE3-256 of the piece's bytes.
        assert_eq!(&enc[64..96], blake3::hash(&data[..4096]).as_bytes());
        assert_eq!(&enc[160..], blake3::hash(&data[12288..]).as_bytes());
        assert_eq!(PieceTable::decode(&enc).unwrap(), t);
        t.verify(0, &data).unwrap();
        t.verify(4096, &data[4096..8192]).unwrap();
        t.verify(12288, &data[12288..]).unwrap();
        // Not whole pieces: refused, never half-checked.
        for (o, l) in [(1, 4095), (0, 4095), (4096, 0), (12288, 99), (12288, 101)] {
            let e = t.verify(o, &vec![0; l]).unwrap_err();
            assert!(matches!(e, VerityError::Range { .. }), "{o}+{l}: {e}");
        }
        let mut bad = data.clone();
        bad[8192 + 5] ^= 1;
        assert_eq!(
            t.verify(4096, &bad[4096..]).unwrap_err(),
            VerityError::Mismatch {
                piece: 2,
                offset: 8192,
                len: 4096
            }
        );
    }

    #[test]
    fn widen_covers_whole_pieces_within_the_blob() {
        let t = PieceTable::build(&blob(10_000)[..], 4096).unwrap();
        assert_eq!(t.widen(0, 4096), (0, 4096));
        assert_eq!(t.widen(100, 10), (0, 4096));
        assert_eq!(t.widen(4095, 2), (0, 8192));
        assert_eq!(t.widen(9000, 1000), (8192, 1808));
        assert_eq!(t.widen(9000, u64::MAX), (8192, 1808));
    }

    #[test]
    fn lying_headers_are_typed_errors() {
        let t = PieceTable::build(&blob(9000)[..], 4096).unwrap();
        let enc = t.encode();
        let with = |o: usize, v: &[u8]| {
            let mut e = enc.clone();
            e[o..o + v.len()].copy_from_slice(v);
            PieceTable::decode(&e).unwrap_err()
        };
        assert_eq!(
            PieceTable::decode(&enc[..10]).unwrap_err(),
            VerityError::Truncated { have: 10 }
        );
        assert_eq!(with(0, b"X"), VerityError::BadMagic);
        assert_eq!(with(8, &2u32.to_le_bytes()), VerityError::Version(2));
        assert_eq!(with(12, &40u32.to_le_bytes()), VerityError::PieceShift(40));
        // A huge count is refused before anything is allocated.
        assert_eq!(
            with(56, &u64::MAX.to_le_bytes()),
            VerityError::Count {
                count: u64::MAX,
                expected: 3
            }
        );
        // A huge blob size with a matching count: too many pieces.
        let mut e = enc.clone();
        e[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
        e[56..64].copy_from_slice(&(1u64 << 50).to_le_bytes());
        assert!(matches!(
            PieceTable::decode(&e).unwrap_err(),
            VerityError::Count { .. }
        ));
        assert_eq!(
            PieceTable::decode(&enc[..enc.len() - 1]).unwrap_err(),
            VerityError::Length {
                len: enc.len() as u64 - 1,
                expected: enc.len() as u64
            }
        );
    }

    #[test]
    fn empty_blob_and_piece_sizes() {
        let t = PieceTable::build(&[][..], 65536).unwrap();
        assert_eq!(t.pieces(), 0);
        assert_eq!(PieceTable::decode(&t.encode()).unwrap(), t);
        assert!(PieceHasher::new(3000).is_err());
        assert!(PieceHasher::new(2048).is_err());
        assert!(PieceHasher::new(32 << 20).is_err());
        assert_eq!(piece_size_for(1 << 30), DEFAULT_PIECE_SIZE);
        assert_eq!(piece_size_for(1 << 40), 1 << 20);
        assert!(encoded_len(1 << 40, 1 << 20) <= MAX_TABLE_SIZE);
    }
}
