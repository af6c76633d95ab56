//! Strict conformance check: what upstream readers and writers require of a ZFile.

use crate::header::{block_digest, flags, Header, HEADER_SIZE, STRUCT_SIZE};
use crate::reader::ZFileReader;
use crate::source::ReadAt;

/// Largest stored block (compressed + CRC) upstream's 64 KiB read buffer can hold.
pub const UPSTREAM_MAX_STORED: u32 = 65_536;
/// Upstream's in-memory jump table keeps u16 deltas inside groups of
/// `65536 / block_size` blocks; a delta must stay below this.
const UPSTREAM_DELTA_MAX: u64 = 65_535;
/// At most this many individual block problems are listed.
const MAX_LISTED: usize = 16;

fn read_512<R: ReadAt>(src: &R, off: u64) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; HEADER_SIZE];
    src.read_exact_at(&mut b, off)
        .map_err(|e| format!("cannot read 512 bytes at {off}: {e}"))?;
    Ok(b)
}

/// Checks the option bytes every upstream writer produces.
fn check_options(p: &mut Vec<String>, what: &str, h: &Header) {
    if h.struct_size != STRUCT_SIZE {
        p.push(format!("{what}: size field {} (must be 96)", h.struct_size));
    }
    if h.verify != 1 {
        p.push(format!("{what}: verify = {} (must be 1)", h.verify));
    }
    if !matches!(h.block_size, 4096 | 8192 | 16384 | 32768) {
        p.push(format!(
            "{what}: block_size {} (must be 4, 8, 16 or 32 KiB)",
            h.block_size
        ));
    }
    if !matches!(h.algo, 1 | 2) {
        p.push(format!("{what}: algorithm {} (must be 1 or 2)", h.algo));
    }
    if h.level != 0 || h.use_dict != 0 || h.dict_size != 0 {
        p.push(format!(
            "{what}: level/use_dict/dict_size = {}/{}/{} (must be 0)",
            h.level, h.use_dict, h.dict_size
        ));
    }
}

fn check_digest(p: &mut Vec<String>, what: &str, block: &[u8], h: &Header) {
    let computed = block_digest(block).unwrap_or(0);
    if computed != h.digest {
        p.push(format!(
            "{what}: digest {:#010x} does not match computed {computed:#010x}",
            h.digest
        ));
    }
}

/// Applies every rule an upstream (v1.0.18) reader or writer applies, beyond what
/// [`ZFileReader::open`] already enforces: header flags 0x1B or 0x13, trailer flags
/// 0x16 right after the jump table, valid digests, `index_crc` and block CRCs,
/// verify = 1, block size <= 32 KiB, every stored block <= 65,536 bytes, upstream's
/// u16 jump-table deltas, no IDX_COMP, level/use_dict/dict_size 0, algorithm 1 or 2.
/// Returns every problem found.
pub fn validate_strict<R: ReadAt>(r: &ZFileReader<R>) -> Result<(), Vec<String>> {
    let mut p = Vec::new();
    let trailer = check_trailer(&mut p, r);
    check_header(&mut p, r.inner(), trailer.as_ref());
    check_jump_table(&mut p, r);
    check_blocks(&mut p, r);
    if p.is_empty() {
        Ok(())
    } else {
        Err(p)
    }
}

/// The trailer: right after the jump table, at the very end. Returns it if it
/// could be read.
fn check_trailer<R: ReadAt>(p: &mut Vec<String>, r: &ZFileReader<R>) -> Option<Header> {
    let info = r.info();
    let toff = info.index_offset + info.blocks * 4;
    if toff.checked_add(HEADER_SIZE as u64) != Some(info.zfile_size) {
        p.push(format!(
            "trailer is not immediately after the jump table: jump table ends at {toff}, \
             file size is {}",
            info.zfile_size
        ));
    }
    match read_512(r.inner(), toff).and_then(|b| {
        Header::parse_at(&b, "trailer", toff)
            .map(|h| (b, h))
            .map_err(|e| e.to_string())
    }) {
        Err(e) => {
            p.push(format!("trailer: {e}"));
            None
        }
        Ok((b, t)) => {
            if t.flags != flags::TRAILER {
                p.push(format!("trailer: flags {:#x} (must be 0x16)", t.flags));
            }
            check_digest(p, "trailer", &b, &t);
            check_options(p, "trailer", &t);
            Some(t)
        }
    }
}

/// The header, and its agreement with the trailer.
fn check_header<R: ReadAt>(p: &mut Vec<String>, src: &R, trailer: Option<&Header>) {
    let (b, h) = match read_512(src, 0)
        .and_then(|b| Header::parse(&b).map(|h| (b, h)).map_err(|e| e.to_string()))
    {
        Err(e) => {
            p.push(format!("header: {e}"));
            return;
        }
        Ok(bh) => bh,
    };
    if h.flags != flags::HEADER_FINAL && h.flags != flags::HEADER_PLAIN {
        p.push(format!(
            "header: flags {:#x} (must be 0x1b or 0x13)",
            h.flags
        ));
    }
    check_digest(p, "header", &b, &h);
    check_options(p, "header", &h);
    if let Some(t) = trailer {
        let same_opts = (h.block_size, h.algo, h.verify) == (t.block_size, t.algo, t.verify);
        if !same_opts {
            p.push("header and trailer disagree on block size, algorithm or verify".into());
        }
        let same_index = (h.index_offset, h.index_size, h.original_size, h.index_crc)
            == (t.index_offset, t.index_size, t.original_size, t.index_crc);
        if h.flags & flags::HEADER_OVERWRITE != 0 && !same_index {
            p.push("overwritten header and trailer disagree on the index fields".into());
        }
    }
}

/// The jump table: its CRC, upstream's stored-length limit and u16 deltas.
fn check_jump_table<R: ReadAt>(p: &mut Vec<String>, r: &ZFileReader<R>) {
    let info = r.info();
    match r.jump_table_crc() {
        Err(e) => p.push(format!("jump table: {e}")),
        Ok(c) if c != info.index_crc => p.push(format!(
            "jump table: index_crc {:#010x} does not match computed {c:#010x}",
            info.index_crc
        )),
        Ok(_) => {}
    }
    let group = u64::from(UPSTREAM_MAX_STORED / info.block_size.max(1)).max(1);
    let (mut big, mut delta_bad) = (Vec::new(), Vec::new());
    let mut delta = 0u64;
    for (i, len) in r.stored_lengths().enumerate() {
        let i = i as u64;
        if len > UPSTREAM_MAX_STORED {
            big.push(format!(
                "block {i}: stored length {len} > {UPSTREAM_MAX_STORED}"
            ));
        }
        // Upstream stores, for block i+1 inside a group, the sum of the lengths of
        // the blocks before it in that group as a u16.
        delta = if i % group == 0 { 0 } else { delta };
        delta += u64::from(len);
        if (i + 1) % group != 0 && delta >= UPSTREAM_DELTA_MAX {
            delta_bad.push(format!(
                "block {}: offset delta {delta} inside its jump-table group overflows upstream's u16",
                i + 1
            ));
        }
    }
    for list in [big, delta_bad] {
        let extra = list.len().saturating_sub(MAX_LISTED);
        p.extend(list.into_iter().take(MAX_LISTED));
        if extra > 0 {
            p.push(format!("... and {extra} more"));
        }
    }
}

/// Every block: decodes and matches its CRC; blocks must carry CRCs.
fn check_blocks<R: ReadAt>(p: &mut Vec<String>, r: &ZFileReader<R>) {
    let (mut bad, mut nbad) = (Vec::new(), 0usize);
    if let Err(e) = r.scan_blocks(|e| {
        nbad += 1;
        if bad.len() < MAX_LISTED {
            bad.push(e.to_string());
        }
        true
    }) {
        p.push(format!("blocks: {e}"));
    }
    p.extend(bad);
    if nbad > MAX_LISTED {
        p.push(format!("... and {} more bad blocks", nbad - MAX_LISTED));
    }
    if !r.info().verify {
        p.push("blocks carry no CRC (verify = 0)".into());
    }
}
