//! Strict validation: every rule upstream's writers follow for a shippable
//! committed layer (format §2.5), beyond what readers enforce.

use std::fmt;

use crate::error::{Error, Result};
use crate::lsmt::commit::{mergeable, INDEX_PAD_ENTRIES};
use crate::lsmt::header::{
    first_nonzero_tail, flags, is_canonical_uuid_field, HeaderTrailer, BLOCK, STRUCT_SIZE,
    SUB_VERSION, VERSION,
};
use crate::lsmt::ro::{
    read_block, read_raw_entries, RoKind, RoLayer, DATA_START_SECTOR, MAX_RO_INDEX_SIZE,
};
use crate::lsmt::segment::{Segment, SECTOR};

/// What strict validation found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StrictReport {
    /// Committed, or sealed (a valid RO layer but not a shippable one).
    pub kind: RoKind,
    /// Valid (non-padding) index entries.
    pub entries: u64,
    /// Padding (invalid) entries.
    pub padding: u64,
    /// Zeroed entries.
    pub zeroed: u64,
    /// Data sectors mapped.
    pub data_sectors: u64,
    /// Broken writer rules, one line each (empty when clean).
    pub violations: Vec<String>,
}

impl StrictReport {
    /// True for a committed layer with no violations.
    pub fn is_clean(&self) -> bool {
        self.kind == RoKind::Committed && self.violations.is_empty()
    }
}

impl fmt::Display for StrictReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RoKind::Committed => "committed",
            RoKind::Sealed => "sealed (not committed)",
        };
        write!(
            f,
            "{kind}: {} entries (+{} padding, {} zeroed), {} data sectors",
            self.entries, self.padding, self.zeroed, self.data_sectors
        )?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

fn check_block(v: &mut Vec<String>, name: &str, raw: &[u8], ht: &HeaderTrailer) {
    if ht.size != STRUCT_SIZE {
        v.push(format!("{name}: size field {} != 390", ht.size));
    }
    if ht.flags & !flags::KNOWN != 0 || ht.flags & (1 << 3 | 1 << 5) != 0 {
        v.push(format!(
            "{name}: undefined flag bits set in {:#x}",
            ht.flags
        ));
    }
    if (ht.version, ht.sub_version) != (VERSION, SUB_VERSION) {
        v.push(format!(
            "{name}: version {}.{} != 1.1",
            ht.version, ht.sub_version
        ));
    }
    if ht.reserved != 0 {
        v.push(format!("{name}: reserved field {:#x} != 0", ht.reserved));
    }
    if let Some(at) = first_nonzero_tail(raw) {
        v.push(format!(
            "{name}: non-zero byte at block offset {at} (bytes 390..4096 must be zero)"
        ));
    }
    for (field, value) in [("uuid", &ht.uuid), ("parent_uuid", &ht.parent_uuid)] {
        if !is_canonical_uuid_field(value) {
            v.push(format!(
                "{name}: {field} {:?} is not an upper-case 8-4-4-4-12 UUID string",
                crate::lsmt::header::field_str(value)
            ));
        }
    }
    let tag_len = ht.user_tag_bytes().len();
    if ht.user_tag[tag_len..].iter().any(|&c| c != 0) {
        v.push(format!(
            "{name}: user_tag has bytes after its NUL terminator"
        ));
    }
}

/// Checks `layer` against the writer rules and returns the report, whatever it
/// finds. Fails only on I/O errors.
pub fn check_strict(layer: &RoLayer) -> Result<StrictReport> {
    let src = &**layer.source();
    let kind = layer.kind();
    let mut v = Vec::new();
    check_header_trailer(&mut v, layer)?;
    // The raw index as stored (open() already bounded it by the file size).
    let t = layer.trailer();
    let raw = read_raw_entries(src, t.index_offset, t.index_size)?;
    let counts = check_entries(&mut v, &raw, kind);
    if kind == RoKind::Committed {
        check_committed_layout(&mut v, t, src.size(), &counts);
    }
    Ok(StrictReport {
        kind,
        entries: counts.entries,
        padding: counts.padding,
        zeroed: counts.zeroed,
        data_sectors: counts.data_sectors,
        violations: v,
    })
}

/// The header and trailer blocks: each on its own, then against each other.
fn check_header_trailer(v: &mut Vec<String>, layer: &RoLayer) -> Result<()> {
    let src = &**layer.source();
    let (h, t) = (layer.header(), layer.trailer());
    let hraw = read_block(src, 0, "header")?;
    let traw = read_block(src, src.size() - BLOCK, "trailer")?;
    check_block(v, "header", &hraw, h);
    check_block(v, "trailer", &traw, t);

    let kind = layer.kind();
    if kind == RoKind::Committed {
        if h.flags != flags::COMMITTED_HEADER {
            v.push(format!("header flags {:#x} != 0x07", h.flags));
        }
        if h.index_offset != 0 || h.index_size != 0 {
            v.push(format!(
                "header index_offset/index_size {}/{} must be 0/0",
                h.index_offset, h.index_size
            ));
        }
    }
    if t.flags != flags::TRAILER {
        v.push(format!("trailer flags {:#x} != 0x06", t.flags));
    }
    if (h.virtual_size, h.uuid, h.parent_uuid) != (t.virtual_size, t.uuid, t.parent_uuid) {
        v.push("header and trailer disagree on virtual_size or uuids".into());
    }
    if kind == RoKind::Committed && h.user_tag != t.user_tag {
        v.push("header and trailer disagree on user_tag".into());
    }
    if t.index_size > MAX_RO_INDEX_SIZE {
        v.push(format!("index_size {} > {MAX_RO_INDEX_SIZE}", t.index_size));
    }
    Ok(())
}

/// What the index entries add up to.
struct EntryCounts {
    entries: u64,
    padding: u64,
    zeroed: u64,
    data_sectors: u64,
}

/// The index entries as stored: padding only at the end and canonical, each
/// valid entry well formed and, in a committed layer, merged and contiguous.
fn check_entries(v: &mut Vec<String>, raw: &[Segment], kind: RoKind) -> EntryCounts {
    let first_pad = raw
        .iter()
        .position(Segment::is_invalid)
        .unwrap_or(raw.len());
    let mut c = EntryCounts {
        entries: 0,
        padding: (raw.len() - first_pad) as u64,
        zeroed: 0,
        data_sectors: 0,
    };
    let mut cursor = DATA_START_SECTOR;
    let mut prev: Option<Segment> = None;
    let mut reported_contig = false;
    for (i, e) in raw.iter().enumerate() {
        if e.is_invalid() {
            if e.encode() != Segment::INVALID.encode() {
                v.push(format!(
                    "entry {i}: padding entry is not the canonical invalid mapping"
                ));
            }
            continue;
        }
        if i > first_pad {
            v.push(format!(
                "entry {i}: valid entry after padding started at {first_pad}"
            ));
        }
        c.entries += 1;
        if e.length == 0 {
            v.push(format!("entry {i}: zero length"));
        }
        if e.tag != 0 {
            v.push(format!("entry {i}: tag {} (must be 0)", e.tag));
        }
        if e.zeroed {
            c.zeroed += 1;
        } else {
            c.data_sectors += e.length as u64;
        }
        if kind == RoKind::Committed {
            if let Some(p) = prev {
                if mergeable(&p, e) {
                    v.push(format!("entries {} and {i} should have been merged", i - 1));
                }
            }
            if e.moffset != cursor && !reported_contig {
                reported_contig = true;
                v.push(format!(
                    "entry {i}: moffset {} != data cursor {cursor} (data must be contiguous from sector 8 in LBA order)",
                    e.moffset
                ));
            }
            if !e.zeroed {
                cursor = e.moffset + e.length as u64;
            }
        }
        prev = Some(*e);
    }
    c
}

/// A committed layer's layout: data from 4096, then the index (aligned,
/// padded to 256 entries), then the trailer, in a file of `size` bytes.
fn check_committed_layout(v: &mut Vec<String>, t: &HeaderTrailer, size: u64, c: &EntryCounts) {
    if t.index_offset % SECTOR != 0 {
        v.push(format!(
            "index_offset {} is not 512-aligned",
            t.index_offset
        ));
    }
    let data_end = BLOCK + c.data_sectors * SECTOR;
    if t.index_offset != data_end {
        v.push(format!(
            "index_offset {} != 4096 + data bytes ({data_end})",
            t.index_offset
        ));
    }
    if t.index_size % INDEX_PAD_ENTRIES != 0 {
        v.push(format!(
            "index_size {} is not a multiple of 256",
            t.index_size
        ));
    }
    if c.padding >= INDEX_PAD_ENTRIES {
        v.push(format!("{} padding entries (at most 255)", c.padding));
    }
    let index_end = t.index_offset + t.index_size * Segment::SIZE as u64;
    if index_end != size - BLOCK {
        v.push(format!(
            "trailer at {} but the index ends at {index_end}",
            size - BLOCK
        ));
    }
}

/// Like [`check_strict`], but any violation is an [`Error::Rule`] listing them
/// all. Sealed layers pass (reported as `kind: Sealed`) if nothing else is wrong.
pub fn validate_strict(layer: &RoLayer) -> Result<StrictReport> {
    let r = check_strict(layer)?;
    if r.violations.is_empty() {
        Ok(r)
    } else {
        Err(Error::Rule(r.violations.join("; ")))
    }
}

/// Opens `bytes` as an RO layer and validates it strictly.
pub fn validate_strict_bytes(bytes: Vec<u8>) -> Result<StrictReport> {
    validate_strict(&RoLayer::from_bytes(bytes)?)
}
