#![no_main]
//! Decodes arbitrary bytes as an LZ4 block with zfile's decoder: no panic, and
//! where lz4_flex also decodes them, the same bytes.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut ours = vec![0u8; 8192];
    let mut theirs = vec![0u8; 8192];
    let a = zfile::lz4::decompress_into(data, &mut ours);
    let b = lz4_flex::block::decompress_into(data, &mut theirs);
    if let (Ok(n), Ok(m)) = (a, b) {
        assert_eq!(n, m);
        assert_eq!(ours[..n], theirs[..m]);
    }
    // Round trip: what lz4_flex encodes, we decode exactly.
    let c = lz4_flex::block::compress(data);
    let mut out = vec![0u8; data.len()];
    assert_eq!(zfile::lz4::decompress_into(&c, &mut out), Ok(data.len()));
    assert_eq!(out, data);
});
