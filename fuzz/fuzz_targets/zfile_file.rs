#![no_main]
//! Opens arbitrary bytes as a ZFile (a `Vec<u8>` source); if that succeeds, reads it
//! all, reads ranges chosen by the input, verifies and validates. Nothing may panic.
//!
//! If the first byte is odd, the rest of the input is used with its header digest,
//! trailer digest and `index_crc` recomputed, so mutations reach the jump-table and
//! block checks instead of stopping at a digest. Seed with any `*.zfile` from
//! `fixtures/interop/zfile` (prefixed with one byte).

use zfile::{validate_strict, Header, ReadAt, ZFileReader, HEADER_SIZE};

/// Recomputes the digests a mutation would break.
fn fix_digests(f: &mut [u8]) {
    if f.len() < HEADER_SIZE {
        return;
    }
    let toff = f.len() - HEADER_SIZE;
    let Ok(header) = Header::parse(&f[..HEADER_SIZE]) else {
        return;
    };
    let trailer = Header::parse_at(&f[toff..], "trailer", toff as u64).ok();
    let fields = if header.flags & zfile::flags::HEADER_OVERWRITE != 0 {
        Some(header)
    } else {
        trailer
    };
    let mut crc = None;
    if let Some(m) = fields {
        let start = m.index_offset as usize;
        let len = (m.index_size as usize).saturating_mul(4);
        if let Some(table) = start.checked_add(len).and_then(|end| f.get(start..end)) {
            crc = Some(zfile::crc32c_raw(0, table));
        }
    }
    let mut header = header;
    if header.flags & zfile::flags::HEADER_OVERWRITE != 0 {
        header.index_crc = crc.unwrap_or(header.index_crc);
    }
    f[..HEADER_SIZE].copy_from_slice(&header.encode());
    if let Some(mut t) = trailer {
        if toff >= HEADER_SIZE {
            t.index_crc = crc.unwrap_or(t.index_crc);
            f[toff..].copy_from_slice(&t.encode());
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut file = rest.to_vec();
    if mode & 1 == 1 {
        fix_digests(&mut file);
    }
    let Ok(r) = ZFileReader::open(file) else {
        return;
    };
    let size = r.info().original_size;
    let mut buf = vec![0u8; 300 * 1024];

    // Read everything (bounded), in large reads.
    let mut off = 0u64;
    while off < size.min(8 << 20) {
        match r.read_at(&mut buf, off) {
            Ok(0) | Err(_) => break,
            Ok(n) => off += n as u64,
        }
    }

    // Ranges chosen by the input.
    let mut x = u64::from(mode) | (data.len() as u64) << 8;
    for chunk in data.chunks(8).take(16) {
        for &b in chunk {
            x = x.rotate_left(7) ^ u64::from(b);
        }
        let off = x % (size + 5000);
        let len = (x >> 32) as usize % buf.len();
        let _ = r.read_at(&mut buf[..len], off);
        let _ = ReadAt::read_at(&r, &mut buf[..len.min(4096)], off);
    }
    let _ = r.verify();
    let _ = validate_strict(&r);
    for i in 0..r.info().blocks.min(4) {
        let _ = r.block_extent(i);
    }
});
