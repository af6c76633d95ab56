//! The durable checkpoint of a blob's presence bitmap (`<stem>.meta`): what
//! survives a reboot. Written (CRC-32C sealed, atomically renamed) only after
//! the data file was `fdatasync`ed, so it never claims bytes that were not
//! durable; the live bits of the shared map are trusted only within the boot
//! that wrote them.

const META_MAGIC: &[u8; 8] = b"OBDCMETA";
const META_VERSION: u32 = 1;

pub(super) fn encode_meta(
    digest: &str,
    bs: u64,
    size: u64,
    blocks: u64,
    present: &[u64],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(40 + digest.len() + present.len() * 8);
    b.extend_from_slice(META_MAGIC);
    b.extend_from_slice(&META_VERSION.to_le_bytes());
    b.extend_from_slice(&bs.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&(digest.len() as u32).to_le_bytes());
    b.extend_from_slice(digest.as_bytes());
    for i in 0..blocks.div_ceil(8) as usize {
        b.push((present[i / 8] >> ((i % 8) * 8)) as u8);
    }
    let crc = zfile::crc32c_raw(0, &b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Parsed bitmap file: digest, block size, blob size, bitmap words.
pub(super) type Meta = (String, u64, u64, Vec<u64>);

pub(super) fn decode_meta(b: &[u8]) -> std::result::Result<Meta, String> {
    if b.len() < 36 + 4 {
        return Err(format!("{} bytes, too short", b.len()));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    let stored = u32::from_le_bytes(crc.try_into().unwrap_or_default());
    let computed = zfile::crc32c_raw(0, body);
    if stored != computed {
        return Err(format!(
            "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    if &body[..8] != META_MAGIC {
        return Err("bad magic".into());
    }
    let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().unwrap_or_default());
    let version = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
    if version != META_VERSION {
        return Err(format!("version {version}, expected {META_VERSION}"));
    }
    let bs = u64_at(12);
    let size = u64_at(20);
    let dlen = u32::from_le_bytes(body[28..32].try_into().unwrap_or_default()) as usize;
    let digest = body
        .get(32..32 + dlen)
        .and_then(|d| std::str::from_utf8(d).ok())
        .ok_or("bad digest field")?
        .to_owned();
    if bs == 0 {
        return Err("block size 0".into());
    }
    let blocks = size.div_ceil(bs);
    let bitmap = &body[32 + dlen..];
    if bitmap.len() as u64 != blocks.div_ceil(8) {
        return Err(format!(
            "bitmap of {} bytes for {blocks} blocks",
            bitmap.len()
        ));
    }
    let mut present = vec![0u64; blocks.div_ceil(64) as usize];
    for (i, &byte) in bitmap.iter().enumerate() {
        present[i / 8] |= u64::from(byte) << ((i % 8) * 8);
    }
    // Bits past the last block must be clear.
    if blocks % 64 != 0 {
        if let Some(last) = present.last() {
            if last >> (blocks % 64) != 0 {
                return Err("bits set past the last block".into());
            }
        }
    }
    Ok((digest, bs, size, present))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trip_and_corruption() {
        let present = vec![0b1011u64, 1 << 3];
        let b = encode_meta("sha256:ab", 65536, 65536 * 68 - 5, 68, &present);
        let (d, bs, size, p) = decode_meta(&b).unwrap();
        assert_eq!((d.as_str(), bs, size), ("sha256:ab", 65536, 65536 * 68 - 5));
        assert_eq!(p, present);
        for k in 0..b.len() {
            let mut c = b.clone();
            c[k] ^= 0x10;
            assert!(decode_meta(&c).is_err(), "flip at {k} accepted");
        }
        assert!(decode_meta(&b[..b.len() - 1]).is_err());
    }
}
