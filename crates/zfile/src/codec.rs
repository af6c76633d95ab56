//! Per-block codecs: LZ4 raw blocks and one zstd frame per block (level 3).
//!
//! Public so benchmarks can use the bare codec as a baseline.

use std::cell::Cell;

use crate::error::{Error, Result};
use crate::header::Algorithm;

/// zstd level upstream always uses.
pub const ZSTD_LEVEL: i32 = 3;

thread_local! {
    static ZSTD_C: Cell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { Cell::new(None) };
    static ZSTD_D: Cell<Option<zstd::bulk::Decompressor<'static>>> = const { Cell::new(None) };
}

/// Worst-case compressed size of a `len`-byte block (CRC not included). Any block a
/// conforming encoder produces fits; the reader rejects larger stored lengths.
pub fn max_compressed_len(algo: Algorithm, len: usize) -> usize {
    match algo {
        // The larger of C liblz4's LZ4_COMPRESSBOUND and lz4_flex's output bound.
        Algorithm::Lz4 => (len + len / 255 + 16).max(lz4_flex::block::get_maximum_output_size(len)),
        Algorithm::Zstd => zstd::zstd_safe::compress_bound(len),
    }
}

/// Compresses `src` as one block and **appends** the result to `out`; returns the
/// compressed length. LZ4: raw block format; zstd: one frame at level 3 (single
/// segment, content size, no checksum), reusing a per-thread context.
pub fn compress_block(algo: Algorithm, src: &[u8], out: &mut Vec<u8>) -> Result<usize> {
    let start = out.len();
    out.resize(start + max_compressed_len(algo, src.len()), 0);
    let res = compress_into(algo, src, &mut out[start..]);
    out.truncate(start + *res.as_ref().unwrap_or(&0));
    res
}

/// Like [`compress_block`], into `dst`, which should hold at least
/// [`max_compressed_len`] bytes; returns the compressed length.
pub fn compress_into(algo: Algorithm, src: &[u8], dst: &mut [u8]) -> Result<usize> {
    compress_into_level(algo, ZSTD_LEVEL, src, dst)
}

/// Like [`compress_into`] at zstd `level` (0 = [`ZSTD_LEVEL`]; clamped to
/// zstd's range; ignored for LZ4).
pub fn compress_into_level(
    algo: Algorithm,
    level: i32,
    src: &[u8],
    dst: &mut [u8],
) -> Result<usize> {
    let level = match level {
        0 => ZSTD_LEVEL,
        l => l.clamp(1, 22),
    };
    match algo {
        Algorithm::Lz4 => lz4_flex::block::compress_into(src, dst)
            .map_err(|e| Error::Compress(format!("lz4: {e}"))),
        Algorithm::Zstd => ZSTD_C.with(|slot| {
            let mut c = match slot.take() {
                Some((l, c)) if l == level => c,
                _ => zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::Compress(format!("zstd init: {e}")))?,
            };
            let r = c
                .compress_to_buffer(src, dst)
                .map_err(|e| Error::Compress(format!("zstd: {e}")));
            slot.set(Some((level, c)));
            r
        }),
    }
}

/// Decodes one compressed block into `dst`, which must be exactly the expected
/// decoded size; returns that size. Decoding to any other size is an error
/// ([`Error::Decompress`] with block index 0; the reader relabels it).
pub fn decompress_block(algo: Algorithm, src: &[u8], dst: &mut [u8]) -> Result<usize> {
    decompress_block_at(algo, src, dst, 0)
}

/// [`decompress_block`] with the block index used in errors.
pub(crate) fn decompress_block_at(
    algo: Algorithm,
    src: &[u8],
    dst: &mut [u8],
    block: u64,
) -> Result<usize> {
    let n = match algo {
        Algorithm::Lz4 => crate::lz4::decompress_into(src, dst).map_err(|e| Error::Decompress {
            block,
            detail: format!("lz4: {e} (expected {} bytes)", dst.len()),
        })?,
        Algorithm::Zstd => ZSTD_D.with(|slot| {
            let mut d = match slot.take() {
                Some(d) => d,
                None => zstd::bulk::Decompressor::new().map_err(|e| Error::Decompress {
                    block,
                    detail: format!("zstd init: {e}"),
                })?,
            };
            let expected = dst.len();
            let r = d
                .decompress_to_buffer(src, dst)
                .map_err(|e| Error::Decompress {
                    block,
                    detail: format!("zstd: {e} (expected {expected} bytes)"),
                });
            slot.set(Some(d));
            r
        })?,
    };
    if n != dst.len() {
        return Err(Error::Decompress {
            block,
            detail: format!("decoded to {n} bytes, expected {}", dst.len()),
        });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both() {
        let data: Vec<u8> = (0..10_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for algo in [Algorithm::Lz4, Algorithm::Zstd] {
            let mut out = vec![0xAA; 3];
            let n = compress_block(algo, &data[..4096], &mut out).unwrap();
            assert_eq!(out.len(), 3 + n);
            assert!(n <= max_compressed_len(algo, 4096));
            let mut dst = vec![0u8; 4096];
            assert_eq!(decompress_block(algo, &out[3..], &mut dst).unwrap(), 4096);
            assert_eq!(dst, &data[..4096]);
            // Wrong expected size is an error, both ways.
            let mut small = vec![0u8; 4095];
            assert!(decompress_block(algo, &out[3..], &mut small).is_err());
            let mut big = vec![0u8; 4097];
            assert!(decompress_block(algo, &out[3..], &mut big).is_err());
            // Garbage never panics.
            let _ = decompress_block(algo, &[0xFF; 40], &mut dst);
        }
    }

    #[test]
    fn zstd_frame_matches_upstream_header() {
        // formats.md 3.10: upstream's zstd block 0 (4096 zero bytes), CRC 0xE6C59CBF.
        let mut out = Vec::new();
        compress_block(Algorithm::Zstd, &[0u8; 4096], &mut out).unwrap();
        let upstream = [
            0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0x0f, 0x4d, 0x00, 0x00, 0x10, 0x00, 0x00, 0x01,
            0x00, 0xfb, 0xf7, 0x01, 0x16,
        ];
        assert_eq!(out, upstream);
        assert_eq!(
            crate::crc32c_raw(crate::crc::BLOCK_CRC_SEED, &out),
            0xE6C5_9CBF
        );
    }
}
