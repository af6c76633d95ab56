//! Commit (compaction): one layer's live index and data streamed into a
//! committed LSMT file, byte-identical to upstream `overlaybd-commit`.
//!
//! Layout: header `0x07` (index fields 0) | data in LBA order from byte 4096 |
//! compacted index padded with invalid entries to a multiple of 256 | trailer
//! `0x06`. The index is built exactly like upstream `compact()`: each data
//! entry is cut into 32 KiB pieces, zeroed entries are kept whole with
//! `moffset` = the data cursor, then adjacent pieces merge under the rule of
//! `compress_raw_index` (contiguous offset and moffset, same zeroed/tag,
//! combined length < 16383).

use std::io::Write;

use crate::error::{Error, Result};
use crate::lsmt::header::{flags, HeaderTrailer, Uuid, BLOCK, USER_TAG_MAX};
use crate::lsmt::ro::{RoLayer, DATA_START_SECTOR, MAX_RO_INDEX_SIZE};
use crate::lsmt::segment::{Segment, SECTOR};
use crate::lsmt::writable::WritableLayer;
use crate::ReadAt;

/// Upstream copies data through a 32 KiB buffer and emits one raw entry per
/// buffer; the compacted index depends on this granularity.
pub const COPY_PIECE_SECTORS: u32 = 64;
/// Committed indexes are padded to a multiple of this many entries (4 KiB).
pub const INDEX_PAD_ENTRIES: u64 = 256;

/// What to commit: a sorted, non-overlapping index and the file its data
/// entries address (`moffset` in sectors from byte 0).
pub struct CommitInput<'a> {
    /// Live entries, sorted by offset, non-overlapping.
    pub segments: &'a [Segment],
    /// The layer file holding the data.
    pub data: &'a dyn ReadAt,
    /// Virtual size from the source header.
    pub virtual_size: u64,
    /// Parent uuid from the source header ([`Uuid::NIL`] if unset or unreadable).
    pub parent_uuid: Uuid,
}

/// Identity and limits of the committed layer.
#[derive(Clone, Debug)]
pub struct CommitOptions {
    /// Layer uuid; `None` writes the unset (all-zero) uuid, as upstream does.
    pub uuid: Option<Uuid>,
    /// Parent uuid; `None` keeps the source header's.
    pub parent_uuid: Option<Uuid>,
    /// Commit message, at most 256 bytes.
    pub user_tag: Vec<u8>,
    /// Virtual size; `None` keeps the source header's.
    pub virtual_size: Option<u64>,
    /// Largest index (padding included) to write; default 1,000,000.
    pub max_entries: u64,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            uuid: None,
            parent_uuid: None,
            user_tag: Vec::new(),
            virtual_size: None,
            max_entries: MAX_RO_INDEX_SIZE,
        }
    }
}

/// What a commit wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitInfo {
    /// Total bytes written.
    pub bytes: u64,
    /// Compacted index entries (no padding).
    pub entries: u64,
    /// Padding entries appended.
    pub padding: u64,
    /// Data sectors copied.
    pub data_sectors: u64,
}

/// True if `b` directly follows `a` and upstream's compaction would merge them.
pub fn mergeable(a: &Segment, b: &Segment) -> bool {
    a.end() == b.offset
        && a.mend() == b.moffset
        && a.zeroed == b.zeroed
        && a.tag == b.tag
        && (a.length as u64 + b.length as u64) < Segment::MAX_LENGTH as u64
}

/// The compacted index of a commit of `segments` (sorted), with its moffsets:
/// data at sector 8 onwards in LBA order. Fails once it exceeds `max_entries`
/// after padding. Returns the index and the data sectors it maps.
pub fn compacted_index(segments: &[Segment], max_entries: u64) -> Result<(Vec<Segment>, u64)> {
    let mut out: Vec<Segment> = Vec::new();
    let mut cursor = DATA_START_SECTOR;
    let push = |out: &mut Vec<Segment>, piece: Segment| -> Result<()> {
        if let Some(last) = out.last_mut() {
            if mergeable(last, &piece) {
                last.length += piece.length;
                return Ok(());
            }
        }
        let padded = (out.len() as u64 + 1).next_multiple_of(INDEX_PAD_ENTRIES);
        if padded > max_entries {
            return Err(Error::TooManyEntries {
                what: "committed LSMT index (after compaction and padding)",
                count: padded,
                max: max_entries,
            });
        }
        out.push(piece);
        Ok(())
    };
    let mut prev_end = 0u64;
    for (i, s) in segments.iter().enumerate() {
        if s.length == 0 || s.is_invalid() {
            continue;
        }
        if s.offset < prev_end {
            return Err(Error::IndexOrder {
                index: i,
                prev_end,
                offset: s.offset,
            });
        }
        prev_end = s.end();
        if s.zeroed {
            push(
                &mut out,
                Segment {
                    moffset: cursor,
                    tag: 0,
                    ..*s
                },
            )?;
            continue;
        }
        let mut done = 0u32;
        while done < s.length {
            let n = (s.length - done).min(COPY_PIECE_SECTORS);
            push(&mut out, Segment::data(s.offset + done as u64, n, cursor))?;
            cursor += n as u64;
            done += n;
        }
    }
    Ok((out, cursor - DATA_START_SECTOR))
}

/// Streams a committed LSMT file for `input` into `out` (sequential writes only).
pub fn commit(
    input: &CommitInput<'_>,
    opts: &CommitOptions,
    out: &mut dyn Write,
) -> Result<CommitInfo> {
    if opts.user_tag.len() > USER_TAG_MAX {
        return Err(Error::BadField {
            what: "header",
            field: "user_tag",
            detail: format!("{} bytes; at most {USER_TAG_MAX}", opts.user_tag.len()),
        });
    }
    let (index, data_sectors) = compacted_index(input.segments, opts.max_entries)?;

    let mut ht = HeaderTrailer::new(flags::COMMITTED_HEADER);
    ht.virtual_size = opts.virtual_size.unwrap_or(input.virtual_size);
    ht.set_uuid(&opts.uuid.unwrap_or(Uuid::NIL));
    ht.set_parent_uuid(&opts.parent_uuid.unwrap_or(input.parent_uuid));
    ht.set_user_tag(&opts.user_tag)?;
    out.write_all(&ht.encode())?;
    let mut bytes = BLOCK;

    // Data, in LBA order, through a bounded buffer.
    const BUF: u64 = 1 << 20;
    let mut buf = vec![0u8; BUF as usize];
    for s in input.segments {
        if s.zeroed || s.length == 0 || s.is_invalid() {
            continue;
        }
        let mut pos = s.moffset * SECTOR;
        let mut left = s.length as u64 * SECTOR;
        while left > 0 {
            let n = left.min(BUF) as usize;
            input.data.read_exact_at(&mut buf[..n], pos).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::Truncated {
                        what: "layer data",
                        need: pos + n as u64,
                        have: input.data.size(),
                    }
                } else {
                    Error::Io(e)
                }
            })?;
            out.write_all(&buf[..n])?;
            pos += n as u64;
            left -= n as u64;
        }
    }
    bytes += data_sectors * SECTOR;

    let entries = index.len() as u64;
    let padded = entries.next_multiple_of(INDEX_PAD_ENTRIES);
    let mut raw = Vec::with_capacity(padded as usize * Segment::SIZE);
    for e in &index {
        raw.extend_from_slice(&e.encode());
    }
    for _ in entries..padded {
        raw.extend_from_slice(&Segment::INVALID.encode());
    }
    out.write_all(&raw)?;
    bytes += raw.len() as u64;

    ht.flags = flags::TRAILER;
    ht.index_offset = BLOCK + data_sectors * SECTOR;
    ht.index_size = padded;
    out.write_all(&ht.encode())?;
    bytes += BLOCK;
    Ok(CommitInfo {
        bytes,
        entries,
        padding: padded - entries,
        data_sectors,
    })
}

impl RoLayer {
    /// The commit input of this layer (upstream `--commit_sealed`).
    pub fn commit_input(&self) -> CommitInput<'_> {
        CommitInput {
            segments: self.segments(),
            data: &**self.source(),
            virtual_size: self.header().virtual_size,
            parent_uuid: self.header().parent_uuid().unwrap_or(Uuid::NIL),
        }
    }

    /// Compacts this (sealed) layer into `out`.
    pub fn commit(&self, opts: &CommitOptions, out: &mut dyn Write) -> Result<CommitInfo> {
        commit(&self.commit_input(), opts, out)
    }
}

impl WritableLayer {
    /// Compacts this layer's live data into `out` (upstream `overlaybd-commit`).
    pub fn commit(&self, opts: &CommitOptions, out: &mut dyn Write) -> Result<CommitInfo> {
        self.with_commit_input(|input| commit(input, opts, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_merge_below_max_length() {
        // One 16383-sector entry: 64-sector pieces merge to 16320, then 63.
        let (idx, n) = compacted_index(&[Segment::data(0, 16383, 100)], 1 << 20).unwrap();
        assert_eq!(n, 16383);
        assert_eq!(
            idx,
            vec![Segment::data(0, 16320, 8), Segment::data(16320, 63, 16328)]
        );
        // Adjacent zeroed entries merge (same cursor); a data entry between does not.
        let z = |o, l| Segment {
            moffset: 0,
            ..Segment::zeroed(o, l)
        };
        let (idx, _) =
            compacted_index(&[z(0, 10), z(10, 10), Segment::data(20, 8, 9)], 1 << 20).unwrap();
        assert_eq!(idx.len(), 2);
        assert_eq!(
            idx[0],
            Segment {
                moffset: 8,
                ..Segment::zeroed(0, 20)
            }
        );
        assert_eq!(idx[1], Segment::data(20, 8, 8));
    }

    #[test]
    fn limit_counts_padding() {
        let segs: Vec<Segment> = (0..300).map(|i| Segment::data(i * 2, 1, 8 + i)).collect();
        assert!(compacted_index(&segs, 512).is_ok());
        assert!(matches!(
            compacted_index(&segs, 300),
            Err(Error::TooManyEntries { .. })
        ));
    }
}
