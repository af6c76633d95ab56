//! The 16-byte LSMT index entry (`SegmentMapping`).

/// One index entry: `length` sectors at device sector `offset`, stored at sector
/// `moffset` of the layer file (or reading as zeros when `zeroed`).
///
/// On disk (little-endian): `lo` = offset (bits 0..50) | length << 50;
/// `hi` = moffset (bits 0..55) | zeroed << 55 | tag << 56.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Device LBA in 512-byte sectors.
    pub offset: u64,
    /// Length in sectors, 1..=[`Segment::MAX_LENGTH`].
    pub length: u32,
    /// Sector offset inside the layer file (ignored when `zeroed`).
    pub moffset: u64,
    /// The range reads as zeros and masks lower layers.
    pub zeroed: bool,
    /// Runtime layer position (0 on disk for native layers).
    pub tag: u8,
}

/// Sector size in bytes.
pub const SECTOR: u64 = 512;

impl Segment {
    /// Largest length one entry can hold (2^14 - 1 sectors).
    pub const MAX_LENGTH: u32 = (1 << 14) - 1;
    /// Largest offset (2^50 - 1); also the offset of the invalid/padding entry.
    pub const MAX_OFFSET: u64 = (1 << 50) - 1;
    /// Largest moffset (2^55 - 1).
    pub const MAX_MOFFSET: u64 = (1 << 55) - 1;
    /// The padding entry upstream appends to committed indexes.
    pub const INVALID: Segment = Segment {
        offset: Self::MAX_OFFSET,
        length: 0,
        moffset: 0,
        zeroed: false,
        tag: 0,
    };
    /// Encoded size in bytes.
    pub const SIZE: usize = 16;

    /// A data entry.
    pub fn data(offset: u64, length: u32, moffset: u64) -> Self {
        Segment {
            offset,
            length,
            moffset,
            zeroed: false,
            tag: 0,
        }
    }

    /// A zeroed (discard) entry.
    pub fn zeroed(offset: u64, length: u32) -> Self {
        Segment {
            offset,
            length,
            moffset: 0,
            zeroed: true,
            tag: 0,
        }
    }

    /// First sector past the entry.
    #[inline]
    pub fn end(&self) -> u64 {
        self.offset + self.length as u64
    }

    /// First file sector past the entry's data (`moffset` when zeroed).
    #[inline]
    pub fn mend(&self) -> u64 {
        if self.zeroed {
            self.moffset
        } else {
            self.moffset + self.length as u64
        }
    }

    /// True for the padding entry (offset 2^50-1), which readers drop.
    #[inline]
    pub fn is_invalid(&self) -> bool {
        self.offset == Self::MAX_OFFSET
    }

    /// Encodes to the 16 on-disk bytes. Fields are masked to their bit widths.
    #[inline]
    pub fn encode(&self) -> [u8; 16] {
        let lo = (self.offset & Self::MAX_OFFSET) | ((self.length as u64 & 0x3FFF) << 50);
        let hi = (self.moffset & Self::MAX_MOFFSET)
            | ((self.zeroed as u64) << 55)
            | ((self.tag as u64) << 56);
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&lo.to_le_bytes());
        out[8..].copy_from_slice(&hi.to_le_bytes());
        out
    }

    /// Decodes 16 on-disk bytes. Never fails: every bit pattern is some entry.
    #[inline]
    pub fn decode(b: &[u8; 16]) -> Self {
        let lo = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
        Segment {
            offset: lo & Self::MAX_OFFSET,
            length: (lo >> 50) as u32,
            moffset: hi & Self::MAX_MOFFSET,
            zeroed: (hi >> 55) & 1 == 1,
            tag: (hi >> 56) as u8,
        }
    }

    /// This entry cut to the sector range `[from, to)` (which must intersect it);
    /// a data entry's `moffset` advances by the cut.
    #[inline]
    pub fn trimmed(&self, from: u64, to: u64) -> Self {
        let start = self.offset.max(from);
        let end = self.end().min(to);
        debug_assert!(start < end);
        let delta = start - self.offset;
        Segment {
            offset: start,
            length: (end - start) as u32,
            moffset: if self.zeroed {
                self.moffset
            } else {
                self.moffset + delta
            },
            zeroed: self.zeroed,
            tag: self.tag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> [u8; 16] {
        let v: Vec<u8> = s
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    #[test]
    fn reference_vectors() {
        let cases = [
            (
                Segment::data(0, 1280, 8),
                "00 00 00 00 00 00 00 14 08 00 00 00 00 00 00 00",
            ),
            (
                Segment::data(5120, 256, 1288),
                "00 14 00 00 00 00 00 04 08 05 00 00 00 00 00 00",
            ),
            (
                Segment {
                    offset: 0x100000,
                    length: 16383,
                    moffset: 9,
                    zeroed: true,
                    tag: 0,
                },
                "00 00 10 00 00 00 FC FF 09 00 00 00 00 00 80 00",
            ),
            (
                Segment {
                    offset: 8,
                    length: 8,
                    moffset: 100,
                    zeroed: false,
                    tag: 3,
                },
                "08 00 00 00 00 00 20 00 64 00 00 00 00 00 00 03",
            ),
            (
                Segment::INVALID,
                "FF FF FF FF FF FF 03 00 00 00 00 00 00 00 00 00",
            ),
        ];
        for (seg, bytes) in cases {
            assert_eq!(seg.encode(), hex(bytes), "{seg:?}");
            assert_eq!(Segment::decode(&hex(bytes)), seg);
        }
        assert!(
            Segment::decode(&hex("FF FF FF FF FF FF 03 00 00 00 00 00 00 00 00 00")).is_invalid()
        );
    }

    #[test]
    fn trim_advances_moffset() {
        let s = Segment::data(100, 50, 1000);
        assert_eq!(s.trimmed(110, 120), Segment::data(110, 10, 1010));
        let z = Segment {
            offset: 100,
            length: 50,
            moffset: 7,
            zeroed: true,
            tag: 1,
        };
        assert_eq!(z.trimmed(90, 120).moffset, 7);
        assert_eq!(z.trimmed(90, 120).length, 20);
    }
}
