//! formats.md 3.10: the upstream `overlaybd-zfile` output rebuilt from its hex dump.

mod common;

use common::{sha256_hex, write_zfile};
use zfile::{flags, validate_strict, Algorithm, ZFileReader};

const INPUT_SHA: &str = "7f63faa34fb7ed5f6591d9fd3b50cf993a8cca4cd651b958f3dd792a64413a3d";
const FILE_SHA: &str = "d07ab84dd78af6391c171e2e87374fcb20a52b79879ddab57d4baf0423e234b5";

fn hex_bytes(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn input() -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    v.extend(std::iter::repeat_n(b'a', 4096));
    for _ in 0..10 {
        v.extend_from_slice(b"0123456789");
    }
    v
}

/// The 1,120-byte file of formats.md 3.10.
pub fn upstream_file() -> Vec<u8> {
    let mut f = vec![0u8; 1120];
    let header = "5a 46 69 6c 65 00 01 00 74 75 6a 69 2e 79 79 66
        40 41 6c 69 62 61 62 61 60 00 00 00 fc 12 a2 c7
        13 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
        00 00 00 00 00 00 00 00 00 10 00 00 01 00 00 00
        00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00";
    let blocks =
        "1f 00 01 00 ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff f6 50 00 00 00 00 00 24 17 91 b4
        1f 61 01 00 ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff f6 50 61 61 61 61 61 d5 dc d9 d4
        af 30 31 32 33 34 35 36 37 38 39 0a 00 42 50 35 36 37 38 39 06 79 89 b1";
    let table = "1e 00 00 00 1e 00 00 00 18 00 00 00";
    let trailer = "5a 46 69 6c 65 00 01 00 74 75 6a 69 2e 79 79 66
        40 41 6c 69 62 61 62 61 60 00 00 00 b0 37 16 9b
        16 00 00 00 00 00 00 00 54 02 00 00 00 00 00 00
        03 00 00 00 00 00 00 00 64 20 00 00 00 00 00 00
        54 50 67 5a 00 00 00 00 00 10 00 00 01 00 00 00
        00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00";
    for (off, s) in [
        (0, header),
        (0x200, blocks),
        (0x254, table),
        (0x260, trailer),
    ] {
        let b = hex_bytes(s);
        f[off..off + b.len()].copy_from_slice(&b);
    }
    f
}

#[test]
fn rebuilt_file_matches_digest() {
    assert_eq!(sha256_hex(&input()), INPUT_SHA);
    assert_eq!(input().len(), 8292);
    let f = upstream_file();
    assert_eq!(f.len(), 1120);
    assert_eq!(sha256_hex(&f), FILE_SHA);
    assert!(zfile::is_zfile(&f));
}

#[test]
fn opens_verifies_and_decodes() {
    let f = upstream_file();
    let r = ZFileReader::open(&f).unwrap();
    let i = r.info();
    assert_eq!(i.algorithm, Algorithm::Lz4);
    assert_eq!(i.block_size, 4096);
    assert_eq!(i.blocks, 3);
    assert_eq!(i.original_size, 8292);
    assert_eq!(i.header_flags, 0x13);
    assert_eq!(i.header_digest, 0xC7A2_12FC);
    assert_eq!(i.trailer_flags, Some(0x16));
    assert_eq!(i.trailer_digest, Some(0x9B16_37B0));
    assert_eq!(i.index_offset, 0x254);
    assert_eq!(i.index_crc, 0x5A67_5054);
    assert!(i.verify && !i.header_overwritten);
    assert_eq!(r.block_extent(1), (0x21e, 0x1e));
    assert_eq!(r.block_extent(2), (0x23c, 0x18));

    let rep = r.verify().unwrap();
    assert!(rep.block_crcs_checked && rep.header_digest_checked);
    assert!(rep.trailer_digest_checked && rep.index_crc_checked);
    assert_eq!(rep.blocks, 3);
    validate_strict(&r).unwrap();

    let mut out = Vec::new();
    assert_eq!(zfile::decompress(&f, &mut out).unwrap(), 8292);
    assert_eq!(sha256_hex(&out), INPUT_SHA);

    // Reads at every offset, with lengths crossing block edges and the end.
    let data = input();
    let mut buf = vec![0u8; 5000];
    for off in (0..8300u64).step_by(97) {
        let n = r.read_at(&mut buf, off).unwrap();
        let want = &data[(off as usize).min(data.len())..(off as usize + 5000).min(data.len())];
        assert_eq!(&buf[..n], want, "offset {off}");
    }
}

#[test]
fn our_writer_on_the_example() {
    // LZ4: other encoder, other (valid) bytes; the layout rules still hold.
    let f = write_zfile(&input(), Algorithm::Lz4, 4096, 1);
    let r = ZFileReader::open(&f).unwrap();
    assert_eq!(r.info().header_flags, flags::HEADER_FINAL);
    validate_strict(&r).unwrap();
    let mut out = Vec::new();
    zfile::decompress(&f, &mut out).unwrap();
    assert_eq!(out, input());

    // zstd: same libzstd output as upstream, so the same 1,112-byte size and block 0.
    let f = write_zfile(&input(), Algorithm::Zstd, 4096, 1);
    assert_eq!(f.len(), 1112);
    assert_eq!(
        &f[0x200..0x200 + 19],
        &hex_bytes("28 b5 2f fd 60 00 0f 4d 00 00 10 00 00 01 00 fb f7 01 16")[..]
    );
    assert_eq!(&f[0x213..0x217], &0xE6C5_9CBFu32.to_le_bytes());
    let r = ZFileReader::open(&f).unwrap();
    validate_strict(&r).unwrap();
}
