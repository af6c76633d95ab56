//! CRC-32C in the raw form upstream uses: no initial inversion, no final XOR.

/// Seed of the per-block CRC (`NOI_WELL_KNOWN_PRIME` upstream).
pub const BLOCK_CRC_SEED: u32 = 100_007;

/// Raw CRC-32C (Castagnoli) of `data` with the register starting at `seed`.
///
/// Standard CRC-32C is `!crc32c_raw(!0, data)`. Raw CRCs chain:
/// `crc32c_raw(crc32c_raw(s, a), b) == crc32c_raw(s, a ++ b)`.
#[inline]
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_vectors() {
        assert_eq!(crc32c_raw(0, b"123456789"), 0x58E3_FA20);
        assert_eq!(crc32c_raw(BLOCK_CRC_SEED, b"123456789"), 0x3C9B_D4E0);
        assert_eq!(crc32c_raw(0, b"hello world"), 0x6345_D352);
        assert_eq!(crc32c_raw(0, &[0u8; 4096]), 0);
        assert_eq!(crc32c_raw(BLOCK_CRC_SEED, &[0u8; 4096]), 0x1874_6CCD);
        assert_eq!(crc32c_raw(BLOCK_CRC_SEED, b""), 0x0001_86A7);
        // Standard CRC-32C for comparison.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(!crc32c_raw(!0, b"hello world"), 0xC994_65AA);
    }

    #[test]
    fn chains() {
        let d = b"the quick brown fox jumps over the lazy dog";
        for seed in [0, BLOCK_CRC_SEED] {
            let (a, b) = d.split_at(17);
            assert_eq!(crc32c_raw(crc32c_raw(seed, a), b), crc32c_raw(seed, d));
        }
    }
}
