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

/// Writes the header of a committed file; returns it for the trailer.
fn begin(
    opts: &CommitOptions,
    (virtual_size, parent_uuid): (u64, Uuid),
    out: &mut dyn Write,
) -> Result<HeaderTrailer> {
    if opts.user_tag.len() > USER_TAG_MAX {
        return Err(Error::BadField {
            what: "header",
            field: "user_tag",
            detail: format!("{} bytes; at most {USER_TAG_MAX}", opts.user_tag.len()),
        });
    }
    let mut ht = HeaderTrailer::new(flags::COMMITTED_HEADER);
    ht.virtual_size = opts.virtual_size.unwrap_or(virtual_size);
    ht.set_uuid(&opts.uuid.unwrap_or(Uuid::NIL));
    ht.set_parent_uuid(&opts.parent_uuid.unwrap_or(parent_uuid));
    ht.set_user_tag(&opts.user_tag)?;
    out.write_all(&ht.encode())?;
    Ok(ht)
}

/// Writes the padded `index` and the trailer after `data_sectors` of data.
fn finish(
    mut ht: HeaderTrailer,
    index: &[Segment],
    data_sectors: u64,
    out: &mut dyn Write,
) -> Result<CommitInfo> {
    let entries = index.len() as u64;
    let padded = entries.next_multiple_of(INDEX_PAD_ENTRIES);
    let mut raw = Vec::with_capacity(padded as usize * Segment::SIZE);
    for e in index {
        raw.extend_from_slice(&e.encode());
    }
    for _ in entries..padded {
        raw.extend_from_slice(&Segment::INVALID.encode());
    }
    out.write_all(&raw)?;
    ht.flags = flags::TRAILER;
    ht.index_offset = BLOCK + data_sectors * SECTOR;
    ht.index_size = padded;
    out.write_all(&ht.encode())?;
    Ok(CommitInfo {
        bytes: BLOCK + data_sectors * SECTOR + raw.len() as u64 + BLOCK,
        entries,
        padding: padded - entries,
        data_sectors,
    })
}

/// Copies `len` bytes at `pos` of `data` to `out` through `buf`.
fn copy_range(
    data: &dyn ReadAt,
    (pos, len): (u64, u64),
    buf: &mut [u8],
    what: &'static str,
    out: &mut dyn Write,
) -> Result<()> {
    let (mut pos, mut left) = (pos, len);
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        data.read_exact_at(&mut buf[..n], pos).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Truncated {
                    what,
                    need: pos + n as u64,
                    have: data.size(),
                }
            } else {
                Error::Io(e)
            }
        })?;
        out.write_all(&buf[..n])?;
        pos += n as u64;
        left -= n as u64;
    }
    Ok(())
}

/// Streams a committed LSMT file for `input` into `out` (sequential writes only).
pub fn commit(
    input: &CommitInput<'_>,
    opts: &CommitOptions,
    out: &mut dyn Write,
) -> Result<CommitInfo> {
    let ht = begin(opts, (input.virtual_size, input.parent_uuid), out)?;
    let (index, data_sectors) = compacted_index(input.segments, opts.max_entries)?;
    // Data, in LBA order, through a bounded buffer.
    let mut buf = vec![0u8; 1 << 20];
    for s in input.segments {
        if s.zeroed || s.length == 0 || s.is_invalid() {
            continue;
        }
        let range = (s.moffset * SECTOR, s.length as u64 * SECTOR);
        copy_range(input.data, range, &mut buf, "layer data", out)?;
    }
    finish(ht, &index, data_sectors, out)
}

/// Streams into `out` a committed LSMT file holding `disk`'s bytes at
/// `extents` (sector ranges `(offset, length)`, disjoint), its data **in
/// the order of `extents`** rather than in LBA order: the index stays sorted
/// by offset, cut in 32 KiB pieces and merged as [`commit`] does. Readers
/// (upstream's too) follow each entry's `moffset`, so any data order reads
/// the same; the order decides what a front-to-back read fetches first.
pub fn commit_extents(
    extents: &[(u64, u64)],
    disk: &dyn ReadAt,
    (virtual_size, parent_uuid): (u64, Uuid),
    opts: &CommitOptions,
    out: &mut dyn Write,
) -> Result<CommitInfo> {
    let mut pieces = Vec::new();
    let mut cursor = DATA_START_SECTOR;
    for &(offset, length) in extents {
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(COPY_PIECE_SECTORS as u64);
            pieces.push(Segment::data(offset + done, n as u32, cursor));
            cursor += n;
            done += n;
        }
    }
    pieces.sort_unstable_by_key(|s| s.offset);
    let mut index: Vec<Segment> = Vec::new();
    for (i, p) in pieces.into_iter().enumerate() {
        if let Some(last) = index.last_mut() {
            if p.offset < last.end() {
                return Err(Error::IndexOrder {
                    index: i,
                    prev_end: last.end(),
                    offset: p.offset,
                });
            }
            if mergeable(last, &p) {
                last.length += p.length;
                continue;
            }
        }
        index.push(p);
    }
    let padded = (index.len() as u64).next_multiple_of(INDEX_PAD_ENTRIES);
    if padded > opts.max_entries {
        return Err(Error::TooManyEntries {
            what: "committed LSMT index (after padding)",
            count: padded,
            max: opts.max_entries,
        });
    }
    let ht = begin(opts, (virtual_size, parent_uuid), out)?;
    let mut buf = vec![0u8; 1 << 20];
    for &(offset, length) in extents {
        copy_range(
            disk,
            (offset * SECTOR, length * SECTOR),
            &mut buf,
            "disk",
            out,
        )?;
    }
    finish(ht, &index, cursor - DATA_START_SECTOR, out)
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

    /// A disk of `sectors` whose every byte names its sector.
    fn disk(sectors: u64) -> Vec<u8> {
        (0..sectors * SECTOR)
            .map(|i| (i / SECTOR) as u8 ^ (i as u8))
            .collect()
    }

    #[test]
    fn extents_in_lba_order_commit_like_a_writable_layer() {
        use crate::lsmt::{CreateOptions, WritableLayer};
        let d = disk(4096);
        let extents = [(8u64, 100u64), (300, 1), (301, 200), (2000, 64)];
        let dir = tempfile::tempdir().unwrap();
        let opts = CreateOptions {
            virtual_size: 4096 * SECTOR,
            ..Default::default()
        };
        let (df, xf) = (dir.path().join("d"), dir.path().join("i"));
        let mut w = WritableLayer::create(&df, &xf, opts).unwrap();
        for &(o, l) in &extents {
            let r = (o * SECTOR) as usize..((o + l) * SECTOR) as usize;
            w.write_at(&d[r], o * SECTOR).unwrap();
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let co = CommitOptions::default();
        let ia = w.commit(&co, &mut a).unwrap();
        let ib = commit_extents(&extents, &d, (4096 * SECTOR, Uuid::NIL), &co, &mut b).unwrap();
        assert_eq!(ia, ib);
        assert!(a == b, "byte-identical to the writable layer's commit");
    }

    #[test]
    fn extents_out_of_order_read_back_the_disk() {
        let d = disk(4096);
        let extents = [(2000u64, 300u64), (8, 100), (1000, 1), (120, 700)];
        let mut out = Vec::new();
        let co = CommitOptions::default();
        let info = commit_extents(&extents, &d, (4096 * SECTOR, Uuid::NIL), &co, &mut out).unwrap();
        assert_eq!(info.data_sectors, 1101);
        // The data is in the given order, from byte 4096.
        assert_eq!(&out[4096..4096 + 512], &d[2000 * 512..2001 * 512]);
        let ro = RoLayer::from_bytes(out).unwrap();
        let mut got = vec![0u8; d.len()];
        ro.read_at(&mut got, 0).unwrap();
        let mut want = vec![0u8; d.len()];
        for &(o, l) in &extents {
            let r = (o * SECTOR) as usize..((o + l) * SECTOR) as usize;
            want[r.clone()].copy_from_slice(&d[r]);
        }
        assert!(got == want, "reads back the extents, zero elsewhere");
        assert!(ro.segments().windows(2).all(|w| w[0].end() <= w[1].offset));
        // Overlapping extents are refused.
        let e = commit_extents(
            &[(0, 10), (5, 10)],
            &d,
            (4096 * SECTOR, Uuid::NIL),
            &co,
            &mut Vec::new(),
        );
        assert!(matches!(e, Err(Error::IndexOrder { .. })), "{e:?}");
    }
}
