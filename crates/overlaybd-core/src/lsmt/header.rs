//! The LSMT header/trailer block and the UUID strings it stores.
//!
//! Both the header (bytes 0..4096) and the trailer (the last 4096 bytes) are the
//! same packed 390-byte struct at the start of a zero-filled 4096-byte block:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 8 | magic0 `LSMT\0\1\2\0` |
//! | 8 | 16 | magic1 |
//! | 24 | u32 | size = 390 |
//! | 28 | u32 | flags ([`flags`]) |
//! | 32 | u64 | index_offset (bytes) |
//! | 40 | u64 | index_size (entries) |
//! | 48 | u64 | virtual_size (bytes) |
//! | 56 | 37 | uuid (36 upper-case chars + NUL) |
//! | 93 | 37 | parent_uuid |
//! | 130 | u16 | reserved |
//! | 132 | u8 | version = 1 |
//! | 133 | u8 | sub_version = 1 |
//! | 134 | 256 | user_tag (NUL-padded) |

use std::fmt;

use crate::error::{Error, Result};

/// Size of the header and trailer blocks in bytes.
pub const BLOCK: u64 = 4096;
/// Value of the `size` field: the packed struct length.
pub const STRUCT_SIZE: u32 = 390;
/// First magic (bytes 0..8).
pub const MAGIC0: [u8; 8] = *b"LSMT\0\x01\x02\0";
/// Second magic (bytes 8..24), a UUID in its in-memory byte order.
pub const MAGIC1: [u8; 16] = [
    0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE, 0x8A,
];
/// Format version written and expected.
pub const VERSION: u8 = 1;
/// Format sub-version written and expected.
pub const SUB_VERSION: u8 = 1;
/// Maximum user tag (commit message) length in bytes.
pub const USER_TAG_MAX: usize = 256;
/// Length of a UUID field (36 chars + NUL).
pub const UUID_FIELD: usize = 37;

/// LSMT flag bits (u32 at offset 28) and the combinations each file kind uses.
pub mod flags {
    /// Bit 0: this block is a header (clear: trailer).
    pub const HEADER: u32 = 1 << 0;
    /// Bit 1: data file (clear: index file).
    pub const DATA: u32 = 1 << 1;
    /// Bit 2: sealed (read-only).
    pub const SEALED: u32 = 1 << 2;
    /// Bit 4: sparse RW data file.
    pub const SPARSE_RW: u32 = 1 << 4;
    /// Every bit the format defines that a reader may see.
    pub const KNOWN: u32 = HEADER | DATA | SEALED | SPARSE_RW;

    /// Header of an RW data file (also of a sealed file).
    pub const RW_DATA: u32 = HEADER | DATA;
    /// Header of an RW index file.
    pub const RW_INDEX: u32 = HEADER;
    /// Header of a sparse RW data file.
    pub const SPARSE_DATA: u32 = HEADER | DATA | SPARSE_RW;
    /// Header of a committed layer.
    pub const COMMITTED_HEADER: u32 = HEADER | DATA | SEALED;
    /// Trailer of a sealed or committed layer.
    pub const TRAILER: u32 = DATA | SEALED;
}

/// A 128-bit UUID as LSMT stores it: printed 8-4-4-4-12 in upper case.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn bad_uuid(s: &str, why: &str) -> Error {
    let shown: String = s.chars().take(80).collect();
    Error::BadField {
        what: "uuid",
        field: "uuid",
        detail: format!("{shown:?}: {why}"),
    }
}

impl Uuid {
    /// The all-zero ("unset") UUID, stored as `00000000-0000-0000-0000-000000000000`.
    pub const NIL: Uuid = Uuid([0; 16]);

    /// Parses user input: `8-4-4-4-12` or 32 bare hex digits, either case.
    pub fn parse(s: &str) -> Result<Uuid> {
        let b = s.as_bytes();
        let digits: Vec<u8> = match b.len() {
            32 => b.to_vec(),
            36 => {
                for &p in &[8usize, 13, 18, 23] {
                    if b[p] != b'-' {
                        return Err(bad_uuid(s, "expected '-' at positions 8, 13, 18 and 23"));
                    }
                }
                b.iter().copied().filter(|&c| c != b'-').collect()
            }
            _ => {
                return Err(bad_uuid(
                    s,
                    "expected 36 chars (8-4-4-4-12) or 32 hex digits",
                ))
            }
        };
        if digits.len() != 32 {
            return Err(bad_uuid(s, "misplaced '-'"));
        }
        let mut out = [0u8; 16];
        for (i, pair) in digits.chunks(2).enumerate() {
            let (Some(hi), Some(lo)) = (hex_val(pair[0]), hex_val(pair[1])) else {
                return Err(bad_uuid(s, "not a hex digit"));
            };
            out[i] = hi << 4 | lo;
        }
        Ok(Uuid(out))
    }

    /// The uuid the ACI userspace converter gives a layer: the first 32 hex digits of
    /// its OCI chainID (`sha256:<hex>` or bare hex), formatted 8-4-4-4-12.
    pub fn from_chain_id(chain_id: &str) -> Result<Uuid> {
        let hex = chain_id.strip_prefix("sha256:").unwrap_or(chain_id);
        match hex.get(..32) {
            Some(head) if head.bytes().all(|c| hex_val(c).is_some()) => Uuid::parse(head),
            _ => Err(bad_uuid(
                chain_id,
                "a chainID needs at least 32 leading hex digits",
            )),
        }
    }

    /// Parses the 37-byte on-disk field: exactly 36 chars then NUL (case-insensitive).
    pub fn from_field(field: &[u8]) -> Result<Uuid> {
        let text = field_str(field);
        if text.len() != 36 {
            return Err(bad_uuid(&text, "stored uuid is not 36 characters"));
        }
        Uuid::parse(&text)
    }

    /// True for [`Uuid::NIL`].
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// The 37-byte on-disk field: upper-case text plus NUL.
    pub fn to_field(&self) -> [u8; UUID_FIELD] {
        let mut out = [0u8; UUID_FIELD];
        out[..36].copy_from_slice(self.to_string().as_bytes());
        out
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Uuid {
    type Err = Error;
    fn from_str(s: &str) -> Result<Uuid> {
        Uuid::parse(s)
    }
}

/// The text of a NUL-terminated field (lossy UTF-8, up to the first NUL).
pub fn field_str(field: &[u8]) -> String {
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// True if `field` is a well-formed stored UUID: 36 chars `8-4-4-4-12` of
/// upper-case hex, then NUL (what upstream writers produce).
pub fn is_canonical_uuid_field(field: &[u8; UUID_FIELD]) -> bool {
    field[36] == 0
        && field[..36].iter().enumerate().all(|(i, &c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == b'-'
            } else {
                c.is_ascii_digit() || (b'A'..=b'F').contains(&c)
            }
        })
}

/// One decoded header or trailer (the 390-byte struct).
///
/// Fields are kept as stored (UUIDs and tag as raw bytes) so that
/// `parse(encode(x)) == x` and odd files can be inspected exactly.
#[derive(Clone, PartialEq, Eq)]
pub struct HeaderTrailer {
    /// Struct size field (390).
    pub size: u32,
    /// Flag bits, see [`flags`].
    pub flags: u32,
    /// Absolute byte offset of the index.
    pub index_offset: u64,
    /// Number of 16-byte index entries.
    pub index_size: u64,
    /// Device size in bytes.
    pub virtual_size: u64,
    /// Raw uuid field.
    pub uuid: [u8; UUID_FIELD],
    /// Raw parent uuid field.
    pub parent_uuid: [u8; UUID_FIELD],
    /// Reserved u16 at offset 130.
    pub reserved: u16,
    /// Version (1).
    pub version: u8,
    /// Sub-version (1).
    pub sub_version: u8,
    /// Raw user tag (commit message), NUL-padded.
    pub user_tag: [u8; USER_TAG_MAX],
}

impl fmt::Debug for HeaderTrailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderTrailer")
            .field("size", &self.size)
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("index_offset", &self.index_offset)
            .field("index_size", &self.index_size)
            .field("virtual_size", &self.virtual_size)
            .field("uuid", &self.uuid_str())
            .field("parent_uuid", &self.parent_uuid_str())
            .field("version", &(self.version, self.sub_version))
            .field("user_tag", &String::from_utf8_lossy(self.user_tag_bytes()))
            .finish()
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl HeaderTrailer {
    /// A fresh block with `flags`, version 1.1, zero sizes and both UUIDs unset.
    pub fn new(flags: u32) -> Self {
        HeaderTrailer {
            size: STRUCT_SIZE,
            flags,
            index_offset: 0,
            index_size: 0,
            virtual_size: 0,
            uuid: Uuid::NIL.to_field(),
            parent_uuid: Uuid::NIL.to_field(),
            reserved: 0,
            version: VERSION,
            sub_version: SUB_VERSION,
            user_tag: [0; USER_TAG_MAX],
        }
    }

    /// Decodes a block (at least 390 bytes). Checks only the two magics;
    /// `what` ("header", "trailer", ...) names the block in errors.
    pub fn parse(block: &[u8], what: &'static str) -> Result<Self> {
        if block.len() < STRUCT_SIZE as usize {
            return Err(Error::Truncated {
                what,
                need: STRUCT_SIZE as u64,
                have: block.len() as u64,
            });
        }
        if block[..8] != MAGIC0 || block[8..24] != MAGIC1 {
            return Err(Error::BadMagic { what });
        }
        let mut uuid = [0u8; UUID_FIELD];
        uuid.copy_from_slice(&block[56..93]);
        let mut parent_uuid = [0u8; UUID_FIELD];
        parent_uuid.copy_from_slice(&block[93..130]);
        let mut user_tag = [0u8; USER_TAG_MAX];
        user_tag.copy_from_slice(&block[134..390]);
        Ok(HeaderTrailer {
            size: le_u32(block, 24),
            flags: le_u32(block, 28),
            index_offset: le_u64(block, 32),
            index_size: le_u64(block, 40),
            virtual_size: le_u64(block, 48),
            uuid,
            parent_uuid,
            reserved: u16::from_le_bytes([block[130], block[131]]),
            version: block[132],
            sub_version: block[133],
            user_tag,
        })
    }

    /// Encodes into a zero-filled 4096-byte block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[..8].copy_from_slice(&MAGIC0);
        b[8..24].copy_from_slice(&MAGIC1);
        b[24..28].copy_from_slice(&self.size.to_le_bytes());
        b[28..32].copy_from_slice(&self.flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.index_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[56..93].copy_from_slice(&self.uuid);
        b[93..130].copy_from_slice(&self.parent_uuid);
        b[130..132].copy_from_slice(&self.reserved.to_le_bytes());
        b[132] = self.version;
        b[133] = self.sub_version;
        b[134..390].copy_from_slice(&self.user_tag);
        b
    }

    /// Header bit set.
    pub fn is_header(&self) -> bool {
        self.flags & flags::HEADER != 0
    }
    /// Data-file bit set.
    pub fn is_data(&self) -> bool {
        self.flags & flags::DATA != 0
    }
    /// Sealed bit set.
    pub fn is_sealed(&self) -> bool {
        self.flags & flags::SEALED != 0
    }
    /// Sparse-RW bit set.
    pub fn is_sparse(&self) -> bool {
        self.flags & flags::SPARSE_RW != 0
    }

    /// The uuid text as stored (up to the NUL).
    pub fn uuid_str(&self) -> String {
        field_str(&self.uuid)
    }
    /// The parent uuid text as stored (up to the NUL).
    pub fn parent_uuid_str(&self) -> String {
        field_str(&self.parent_uuid)
    }
    /// The uuid, parsed.
    pub fn uuid(&self) -> Result<Uuid> {
        Uuid::from_field(&self.uuid)
    }
    /// The parent uuid, parsed.
    pub fn parent_uuid(&self) -> Result<Uuid> {
        Uuid::from_field(&self.parent_uuid)
    }
    /// Stores `u` as upper-case text.
    pub fn set_uuid(&mut self, u: &Uuid) {
        self.uuid = u.to_field();
    }
    /// Stores `u` as upper-case text.
    pub fn set_parent_uuid(&mut self, u: &Uuid) {
        self.parent_uuid = u.to_field();
    }

    /// The user tag up to its first NUL.
    pub fn user_tag_bytes(&self) -> &[u8] {
        let end = self
            .user_tag
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(USER_TAG_MAX);
        &self.user_tag[..end]
    }

    /// Sets the user tag; at most 256 bytes.
    pub fn set_user_tag(&mut self, tag: &[u8]) -> Result<()> {
        if tag.len() > USER_TAG_MAX {
            return Err(Error::BadField {
                what: "header",
                field: "user_tag",
                detail: format!("{} bytes; at most {USER_TAG_MAX}", tag.len()),
            });
        }
        self.user_tag = [0; USER_TAG_MAX];
        self.user_tag[..tag.len()].copy_from_slice(tag);
        Ok(())
    }
}

/// Offset of the first non-zero byte in `block[390..]` (the area writers zero).
pub fn first_nonzero_tail(block: &[u8]) -> Option<usize> {
    block
        .iter()
        .enumerate()
        .skip(STRUCT_SIZE as usize)
        .find(|(_, &c)| c != 0)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_parse_and_print() {
        let u = Uuid::parse("c0379a64-cbe1-c277-d359-c6a9c388ecc2").unwrap();
        assert_eq!(u.to_string(), "C0379A64-CBE1-C277-D359-C6A9C388ECC2");
        assert_eq!(Uuid::parse("C0379A64CBE1C277D359C6A9C388ECC2").unwrap(), u);
        assert_eq!(
            Uuid::NIL.to_string(),
            "00000000-0000-0000-0000-000000000000"
        );
        assert!(Uuid::parse("C0379A64-CBE1-C277-D359-C6A9C388ECCG").is_err());
        assert!(Uuid::parse("C0379A64+CBE1-C277-D359-C6A9C388ECC2").is_err());
        assert!(Uuid::parse("").is_err());
        assert!(Uuid::parse("ééééééééééééééééé").is_err());
        let c = Uuid::from_chain_id(
            "sha256:c0379a64cbe1c277d359c6a9c388ecc280d9c2a98cd45df6e7aa6d5147cedbd3",
        )
        .unwrap();
        assert_eq!(c, u);
        assert!(Uuid::from_chain_id("sha256:xyz").is_err());
        let f = u.to_field();
        assert!(is_canonical_uuid_field(&f));
        assert_eq!(Uuid::from_field(&f).unwrap(), u);
    }

    #[test]
    fn header_roundtrip() {
        let mut h = HeaderTrailer::new(flags::COMMITTED_HEADER);
        h.virtual_size = 1 << 30;
        h.set_uuid(&Uuid([0xAB; 16]));
        h.set_user_tag(b"hello").unwrap();
        let b = h.encode();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[24..28], &[0x86, 1, 0, 0]);
        let p = HeaderTrailer::parse(&b, "header").unwrap();
        assert_eq!(p, h);
        assert_eq!(p.user_tag_bytes(), b"hello");
        assert!(first_nonzero_tail(&b).is_none());
        assert!(h.set_user_tag(&[1u8; 257]).is_err());
        let mut bad = b.clone();
        bad[3] = b'X';
        assert!(matches!(
            HeaderTrailer::parse(&bad, "header"),
            Err(Error::BadMagic { .. })
        ));
        assert!(matches!(
            HeaderTrailer::parse(&b[..100], "header"),
            Err(Error::Truncated { .. })
        ));
    }
}
