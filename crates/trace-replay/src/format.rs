//! The binary trace file (upstream `prefetch.cpp`): a 24-byte header, then
//! N 24-byte records, laid out with x86-64 natural alignment.
//!
//! ```text
//! header: u32 magic | 4 pad | u64 data_size (= 24·N) | u32 checksum | 4 pad
//! record: u8 op | 3 pad | u32 layer_index | u64 count | i64 offset
//! ```
//!
//! The checksum is the raw CRC-32C (seed 0) of the record bytes as stored,
//! padding included. All integers are little-endian.

use std::path::Path;

use crate::{Error, Result};

/// Header magic: the zlib CRC-32 of "Container Image Trace Format".
pub const MAGIC: u32 = 0xC2EF_1820;
/// Size of the header.
pub const HEADER_SIZE: usize = 24;
/// Size of one record.
pub const RECORD_SIZE: usize = 24;
/// Largest `count` a writer may store: upstream replays each record into a
/// 1 MiB buffer without checking.
pub const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Largest trace file read: 256 MiB, about 11 million records (a container
/// start makes thousands of reads).
pub const MAX_TRACE_SIZE: u64 = 256 << 20;
/// The read op (`'R'`); the only one recorded.
pub const OP_READ: u8 = b'R';
/// The write op (`'W'`): defined upstream, never recorded.
pub const OP_WRITE: u8 = b'W';

/// One recorded read of a layer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Record {
    /// `'R'` (or `'W'`, never written by upstream).
    pub op: u8,
    /// Position in `lowers`, 0 = bottom.
    pub layer: u32,
    /// Byte offset inside the layer's uncompressed LSMT file.
    pub offset: i64,
    /// Length in bytes.
    pub count: u64,
}

impl Record {
    /// A read record.
    pub fn read(layer: u32, offset: i64, count: u64) -> Record {
        Record {
            op: OP_READ,
            layer,
            offset,
            count,
        }
    }

    /// The 24-byte image of the record (padding zeroed).
    pub fn to_bytes(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0] = self.op;
        b[4..8].copy_from_slice(&self.layer.to_le_bytes());
        b[8..16].copy_from_slice(&self.count.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Record {
        Record {
            op: b[0],
            layer: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            count: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: i64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        }
    }
}

/// A parsed (or to-be-written) trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// The records, in recorded order.
    pub records: Vec<Record>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether `data` starts like a trace file (≥ 24 bytes and the magic).
pub fn has_magic(data: &[u8]) -> bool {
    data.len() >= HEADER_SIZE && u32_at(data, 0) == MAGIC
}

/// The 24-byte header for `data_size` bytes of records with `checksum`.
pub fn header_bytes(data_size: u64, checksum: u32) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&data_size.to_le_bytes());
    h[16..20].copy_from_slice(&checksum.to_le_bytes());
    h
}

impl Trace {
    /// Parses a whole trace file. Checks the magic, that the file is exactly
    /// `24 + data_size` bytes, that `data_size` is a whole number of records
    /// and the checksum over the records as stored (padding included).
    /// Allocates only for records actually present.
    pub fn parse(data: &[u8]) -> Result<Trace> {
        if data.len() < HEADER_SIZE {
            return Err(Error::TooShort { len: data.len() });
        }
        let magic = u32_at(data, 0);
        if magic != MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        let data_size = u64_at(data, 8);
        let body = &data[HEADER_SIZE..];
        if data_size != body.len() as u64 {
            return Err(Error::SizeMismatch {
                data_size,
                actual: body.len() as u64,
            });
        }
        if body.len() % RECORD_SIZE != 0 {
            return Err(Error::Misaligned(data_size));
        }
        let stored = u32_at(data, 16);
        let computed = zfile::crc32c_raw(0, body);
        if stored != computed {
            return Err(Error::Checksum { stored, computed });
        }
        let records = body
            .chunks_exact(RECORD_SIZE)
            .map(Record::from_bytes)
            .collect();
        Ok(Trace { records })
    }

    /// Reads and parses the trace file at `path` (a regular file of at most
    /// [`MAX_TRACE_SIZE`] bytes); errors name it.
    pub fn read_file(path: impl AsRef<Path>) -> Result<Trace> {
        let path = path.as_ref();
        let data = overlaybd_core::regular::read(path, MAX_TRACE_SIZE, "trace file")
            .map_err(Error::File)?;
        Trace::parse(&data).map_err(|e| e.in_file(path))
    }

    /// Appends a read of `count` bytes at `offset` of `layer`, split into
    /// records of at most [`MAX_RECORD_BYTES`]. A zero-length read adds
    /// nothing.
    pub fn push_read(&mut self, layer: u32, offset: i64, count: u64) {
        let mut at = offset;
        let mut left = count;
        while left > 0 {
            let n = left.min(MAX_RECORD_BYTES);
            self.records.push(Record::read(layer, at, n));
            at = at.saturating_add(n as i64);
            left -= n;
        }
    }

    /// The records' bytes (padding zeroed), without the header.
    pub fn records_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.records.len() * RECORD_SIZE);
        for r in &self.records {
            out.extend_from_slice(&r.to_bytes());
        }
        out
    }

    /// The whole file: header (with the checksum) and records.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self.records_bytes();
        let mut out = Vec::with_capacity(HEADER_SIZE + body.len());
        out.extend_from_slice(&header_bytes(
            body.len() as u64,
            zfile::crc32c_raw(0, &body),
        ));
        out.extend_from_slice(&body);
        out
    }

    /// Total bytes the records cover (with overlaps counted again).
    pub fn total_bytes(&self) -> u64 {
        self.records
            .iter()
            .fold(0u64, |a, r| a.saturating_add(r.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// §5.2's check vector.
    const VECTOR: [u8; 72] = [
        0x20, 0x18, 0xef, 0xc2, 0x00, 0x00, 0x00, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0xf1, 0xae, 0x06, 0x68, 0x00, 0x00, 0x00, 0x00, //
        0x52, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
        0x52, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn check_vector_round_trips() {
        let t = Trace {
            records: vec![Record::read(0, 4096, 4096), Record::read(2, 1 << 20, 65536)],
        };
        assert_eq!(t.to_bytes(), VECTOR);
        assert_eq!(Trace::parse(&VECTOR).unwrap(), t);
        assert_eq!(u32_at(&VECTOR, 16), 0x6806_AEF1);
    }

    #[test]
    fn padding_is_hashed_as_stored() {
        let mut v = VECTOR;
        v[HEADER_SIZE + 1] = 0xAB; // garbage in a record's padding
        assert!(matches!(Trace::parse(&v), Err(Error::Checksum { .. })));
        let crc = zfile::crc32c_raw(0, &v[HEADER_SIZE..]);
        v[16..20].copy_from_slice(&crc.to_le_bytes());
        let t = Trace::parse(&v).unwrap();
        assert_eq!(t.records[0], Record::read(0, 4096, 4096));
    }

    #[test]
    fn bad_headers_are_named() {
        assert!(matches!(
            Trace::parse(&VECTOR[..10]),
            Err(Error::TooShort { len: 10 })
        ));
        let mut v = VECTOR;
        v[0] = 0;
        assert!(matches!(Trace::parse(&v), Err(Error::BadMagic { .. })));
        let mut v = VECTOR;
        v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Trace::parse(&v), Err(Error::SizeMismatch { .. })));
        assert!(matches!(
            Trace::parse(&VECTOR[..70]),
            Err(Error::SizeMismatch { .. })
        ));
        let mut v = VECTOR[..71].to_vec();
        v[8..16].copy_from_slice(&47u64.to_le_bytes());
        assert!(matches!(Trace::parse(&v), Err(Error::Misaligned(47))));
        // An empty trace is valid.
        let empty = Trace::default().to_bytes();
        assert_eq!(empty.len(), HEADER_SIZE);
        assert_eq!(Trace::parse(&empty).unwrap(), Trace::default());
    }

    #[test]
    fn push_read_splits_at_one_mib() {
        let mut t = Trace::default();
        t.push_read(3, 100, (5 << 20) / 2);
        t.push_read(3, 0, 0);
        assert_eq!(
            t.records,
            vec![
                Record::read(3, 100, 1 << 20),
                Record::read(3, 100 + (1 << 20), 1 << 20),
                Record::read(3, 100 + (2 << 20), 1 << 19),
            ]
        );
        assert_eq!(t.total_bytes(), (5 << 20) / 2);
    }
}
