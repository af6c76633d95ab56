//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Cursor;

use sha2::{Digest, Sha256};
use zfile::{crc32c_raw, flags, Algorithm, Header, Options, ZFileWriter, HEADER_SIZE};

pub fn sha256_hex(d: &[u8]) -> String {
    hex::encode(Sha256::digest(d))
}

/// Compresses `data` with our writer into a fresh buffer.
pub fn write_zfile(data: &[u8], algorithm: Algorithm, block_size: u32, threads: usize) -> Vec<u8> {
    let opts = Options {
        algorithm,
        block_size,
        threads,
        ..Default::default()
    };
    let mut w = ZFileWriter::new(Cursor::new(Vec::new()), opts).unwrap();
    // Feed in odd-sized pieces to exercise buffering.
    for piece in data.chunks(70_001) {
        std::io::Write::write_all(&mut w, piece).unwrap();
    }
    let (cur, info) = w.finish().unwrap();
    let out = cur.into_inner();
    assert_eq!(info.zfile_size, out.len() as u64);
    out
}

/// Assembles a ZFile by hand (any block size, header flags as given, no overwrite of
/// the index fields unless `header_flags` has HEADER_OVERWRITE).
pub fn build_raw(data: &[u8], algorithm: Algorithm, block_size: u32, header_flags: u64) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_SIZE];
    let mut lens = Vec::new();
    for chunk in data.chunks(block_size as usize) {
        let start = out.len();
        zfile::codec::compress_block(algorithm, chunk, &mut out).unwrap();
        let crc = crc32c_raw(100_007, &out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        lens.push((out.len() - start) as u32);
    }
    let index_offset = out.len() as u64;
    let table: Vec<u8> = lens.iter().flat_map(|l| l.to_le_bytes()).collect();
    out.extend_from_slice(&table);
    let fields = Header {
        struct_size: 96,
        index_offset,
        index_size: lens.len() as u64,
        original_size: data.len() as u64,
        index_crc: crc32c_raw(0, &table),
        block_size,
        algo: algorithm as u8,
        verify: 1,
        ..Header::default()
    };
    out.extend_from_slice(
        &Header {
            flags: flags::TRAILER,
            ..fields
        }
        .encode(),
    );
    let header = if header_flags & flags::HEADER_OVERWRITE != 0 {
        Header {
            flags: header_flags,
            ..fields
        }
    } else {
        Header {
            flags: header_flags,
            struct_size: 96,
            block_size,
            algo: algorithm as u8,
            verify: 1,
            ..Header::default()
        }
    };
    out[..HEADER_SIZE].copy_from_slice(&header.encode());
    out
}

/// Re-encodes the header/trailer block at `off` after `f` edits it (the digest is
/// recomputed when CALC_DIGEST is set).
pub fn patch(file: &mut [u8], off: usize, f: impl FnOnce(&mut Header)) {
    let mut h = Header::parse_at(&file[off..off + HEADER_SIZE], "block", off as u64).unwrap();
    f(&mut h);
    file[off..off + HEADER_SIZE].copy_from_slice(&h.encode());
}

/// Offset of the trailer (the last 512 bytes).
pub fn trailer_off(file: &[u8]) -> usize {
    file.len() - HEADER_SIZE
}
