//! Read-only LSMT layers: committed (`0x07` header) and sealed (`0x03` header)
//! files, each with a `0x06` trailer holding the index location.

use std::io;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::lsmt::header::{HeaderTrailer, BLOCK};
use crate::lsmt::segment::{Segment, SECTOR};
use crate::ReadAt;

/// Largest `index_size` (entries, padding included) accepted in an RO layer's
/// trailer: upstream `MAX_LSMT_RO_INDEX_SIZE` [main].
pub const MAX_RO_INDEX_SIZE: u64 = 1_000_000;

/// First data sector of a layer file (right after the 4096-byte header).
pub const DATA_START_SECTOR: u64 = BLOCK / SECTOR;

/// Which read-only kind a layer file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoKind {
    /// Compacted by commit: header flags include the sealed bit.
    Committed,
    /// An RW data file closed with `close_seal` (header `0x03`, not compacted).
    Sealed,
}

/// Knobs for [`RoLayer::open_with`].
#[derive(Clone, Debug)]
pub struct RoOptions {
    /// Largest trailer `index_size` accepted (default [`MAX_RO_INDEX_SIZE`]).
    pub max_index_size: u64,
}

impl Default for RoOptions {
    fn default() -> Self {
        RoOptions {
            max_index_size: MAX_RO_INDEX_SIZE,
        }
    }
}

/// An opened read-only LSMT layer: verified header and trailer plus its index
/// (invalid entries dropped, tags forced to 0, sorted and non-overlapping).
pub struct RoLayer {
    src: Arc<dyn ReadAt>,
    header: HeaderTrailer,
    trailer: HeaderTrailer,
    segments: Vec<Segment>,
}

impl std::fmt::Debug for RoLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoLayer")
            .field("header", &self.header)
            .field("trailer", &self.trailer)
            .field("segments", &self.segments.len())
            .finish()
    }
}

/// Reads `buf.len()` bytes at `offset`, zero-filling past the end of `src`.
pub(crate) fn read_fill(src: &dyn ReadAt, buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match src.read_at(&mut buf[done..], offset) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a 4096-byte block at `offset` of `src` (which must hold it).
pub(crate) fn read_block(src: &dyn ReadAt, offset: u64, what: &'static str) -> Result<Vec<u8>> {
    let size = src.size();
    if size < offset.saturating_add(BLOCK) {
        return Err(Error::Truncated {
            what,
            need: offset.saturating_add(BLOCK),
            have: size,
        });
    }
    let mut b = vec![0u8; BLOCK as usize];
    src.read_exact_at(&mut b, offset)?;
    Ok(b)
}

/// Reads `count` raw 16-byte entries starting at byte `offset`, in bounded chunks
/// (memory grows only as bytes actually arrive). `count * 16` must already be
/// known to fit in `src`.
pub(crate) fn read_raw_entries(src: &dyn ReadAt, offset: u64, count: u64) -> Result<Vec<Segment>> {
    const CHUNK: u64 = 4096; // entries per read (64 KiB)
    let mut out = Vec::new();
    let mut buf = vec![0u8; (CHUNK.min(count) as usize) * Segment::SIZE];
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(CHUNK) as usize;
        let bytes = &mut buf[..n * Segment::SIZE];
        src.read_exact_at(bytes, offset + done * Segment::SIZE as u64)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    Error::Truncated {
                        what: "index",
                        need: offset + count * Segment::SIZE as u64,
                        have: src.size(),
                    }
                } else {
                    Error::Io(e)
                }
            })?;
        out.extend(
            bytes
                .chunks_exact(Segment::SIZE)
                .map(|c| Segment::decode(c.try_into().expect("16 bytes"))),
        );
        done += n as u64;
    }
    Ok(out)
}

/// Checks an RO trailer's flags: magic already verified by parse.
fn check_trailer_flags(t: &HeaderTrailer) -> Result<()> {
    let bad = |detail: &str| Error::BadField {
        what: "trailer",
        field: "flags",
        detail: format!("{:#x}: {detail}", t.flags),
    };
    if t.is_header() {
        return Err(bad(
            "header bit set in the trailer (file not sealed/committed?)",
        ));
    }
    if !t.is_data() {
        return Err(bad("data-file bit clear"));
    }
    if !t.is_sealed() {
        return Err(bad("sealed bit clear"));
    }
    Ok(())
}

/// Index entries of an RO layer as upstream loads them: invalid (and empty)
/// entries dropped, tags forced to 0, order and moffset range checked.
/// `limit` is `index_offset / 512`.
pub(crate) fn load_ro_segments(raw: &[Segment], limit: u64) -> Result<Vec<Segment>> {
    let mut out: Vec<Segment> = Vec::with_capacity(raw.len());
    for (i, e) in raw.iter().enumerate() {
        if e.is_invalid() || e.length == 0 {
            continue;
        }
        let mut s = *e;
        s.tag = 0;
        if let Some(prev) = out.last() {
            if prev.end() > s.offset {
                return Err(Error::IndexOrder {
                    index: i,
                    prev_end: prev.end(),
                    offset: s.offset,
                });
            }
        }
        check_moffset(i, &s, limit)?;
        out.push(s);
    }
    Ok(out)
}

impl RoLayer {
    /// Opens a committed or sealed LSMT file with the default limits.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<RoLayer> {
        Self::open_with(src, &RoOptions::default())
    }

    /// Opens an LSMT file held in memory (for tests and fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<RoLayer> {
        Self::open(Arc::new(bytes))
    }

    /// Opens with explicit limits, applying upstream's reader rules (format §2.6).
    pub fn open_with(src: Arc<dyn ReadAt>, opts: &RoOptions) -> Result<RoLayer> {
        let size = src.size();
        // 1, 2: header.
        let hb = read_block(&*src, 0, "header")?;
        let header = HeaderTrailer::parse(&hb, "header")?;
        if !header.is_header() {
            return Err(Error::BadField {
                what: "header",
                field: "flags",
                detail: format!("{:#x}: header bit clear", header.flags),
            });
        }
        if !header.is_data() {
            return Err(Error::BadField {
                what: "header",
                field: "flags",
                detail: format!(
                    "{:#x}: an index file, not a data file (open the RW pair instead)",
                    header.flags
                ),
            });
        }
        if header.is_sparse() {
            return Err(Error::Unsupported(
                "sparse RW data file (flags 0x13) has no trailer; it is not a read-only layer"
                    .into(),
            ));
        }
        // 3: trailer.
        if size < 2 * BLOCK {
            return Err(Error::Truncated {
                what: "trailer",
                need: 2 * BLOCK,
                have: size,
            });
        }
        let trailer_offset = size - BLOCK;
        let tb = read_block(&*src, trailer_offset, "trailer")?;
        let trailer = HeaderTrailer::parse(&tb, "trailer")?;
        check_trailer_flags(&trailer)?;
        // 4: entry limit.
        if trailer.index_size > opts.max_index_size {
            return Err(Error::TooManyEntries {
                what: "LSMT RO layer index",
                count: trailer.index_size,
                max: opts.max_index_size,
            });
        }
        // 5: the index fits between index_offset and the trailer.
        if trailer.index_offset > trailer_offset {
            return Err(Error::BadField {
                what: "trailer",
                field: "index_offset",
                detail: format!(
                    "{} is past the trailer at {trailer_offset}",
                    trailer.index_offset
                ),
            });
        }
        let room = trailer_offset - trailer.index_offset;
        let need = trailer.index_size.checked_mul(Segment::SIZE as u64);
        if need.is_none_or(|n| n > room) {
            return Err(Error::BadField {
                what: "trailer",
                field: "index_size",
                detail: format!(
                    "{} entries do not fit in the {room} bytes between index_offset {} and the trailer",
                    trailer.index_size, trailer.index_offset
                ),
            });
        }
        // 6..8: entries.
        let raw = read_raw_entries(&*src, trailer.index_offset, trailer.index_size)?;
        let segments = load_ro_segments(&raw, trailer.index_offset / SECTOR)?;
        Ok(RoLayer {
            src,
            header,
            trailer,
            segments,
        })
    }

    /// The header (block 0).
    pub fn header(&self) -> &HeaderTrailer {
        &self.header
    }

    /// The trailer (last block); its fields are authoritative.
    pub fn trailer(&self) -> &HeaderTrailer {
        &self.trailer
    }

    /// Committed or sealed.
    pub fn kind(&self) -> RoKind {
        if self.header.is_sealed() {
            RoKind::Committed
        } else {
            RoKind::Sealed
        }
    }

    /// Device size in bytes (the trailer's `virtual_size`; 0 = inherit).
    pub fn virtual_size(&self) -> u64 {
        self.trailer.virtual_size
    }

    /// The live index: sorted, non-overlapping, tags 0, no invalid entries.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The whole layer file; entries' `moffset`s address it in sectors.
    pub fn source(&self) -> &Arc<dyn ReadAt> {
        &self.src
    }

    /// Sectors of mapped data (zeroed entries excluded).
    pub fn data_sectors(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| !s.zeroed)
            .map(|s| s.length as u64)
            .sum()
    }

    /// Bytes this layer alone can be read over: the virtual size, or the end of
    /// the last entry if that lies beyond it.
    pub fn extent(&self) -> u64 {
        let last = self.segments.last().map_or(0, |s| s.end() * SECTOR);
        self.virtual_size().max(last)
    }

    /// Entries overlapping the sector range `[from, to)`, trimmed to it.
    pub fn lookup(&self, from: u64, to: u64) -> impl Iterator<Item = Segment> + '_ {
        lookup_sorted(&self.segments, from, to)
    }

    /// Reads this layer alone at any byte offset: unmapped and zeroed ranges
    /// read as zeros. Returns the bytes read, 0 at or past [`RoLayer::extent`].
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let extent = self.extent();
        if offset >= extent || buf.is_empty() {
            return Ok(0);
        }
        let n = (extent - offset).min(buf.len() as u64) as usize;
        let (from, to) = sector_span(offset, n);
        read_mapped(&*self.src, self.lookup(from, to), &mut buf[..n], offset)?;
        Ok(n)
    }
}

impl ReadAt for RoLayer {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        RoLayer::read_at(self, buf, offset).map_err(Error::into_io)
    }
    fn size(&self) -> u64 {
        self.extent()
    }
}

/// Upstream's moffset rule for entry `index`: data entries lie inside the data
/// area `[8, limit)` sectors; zeroed entries need `8 <= moffset <= limit`.
pub(crate) fn check_moffset(index: usize, s: &Segment, limit: u64) -> Result<()> {
    let ok = if s.zeroed {
        DATA_START_SECTOR <= s.moffset && s.moffset <= limit
    } else {
        DATA_START_SECTOR <= s.moffset
            && s.moffset < limit
            && DATA_START_SECTOR < s.mend()
            && s.mend() <= limit
    };
    if ok {
        Ok(())
    } else {
        Err(Error::MoffsetRange {
            index,
            moffset: s.moffset,
            mend: s.mend(),
            limit,
        })
    }
}

/// Entries of a sorted, non-overlapping list overlapping `[from, to)`, trimmed.
pub(crate) fn lookup_sorted(
    segs: &[Segment],
    from: u64,
    to: u64,
) -> impl Iterator<Item = Segment> + '_ {
    let first = segs.partition_point(|s| s.end() <= from);
    segs[first..]
        .iter()
        .take_while(move |s| s.offset < to)
        .filter(move |_| from < to)
        .map(move |s| s.trimmed(from, to))
}

/// Fills `buf` (device bytes at `offset`) from `segs`: the sorted entries that
/// overlap the request, trimmed to its sectors, with data in `data`. Gaps and
/// zeroed entries give zeros; reads past the end of `data` are zero-filled.
pub(crate) fn read_mapped(
    data: &dyn ReadAt,
    segs: impl IntoIterator<Item = Segment>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    let end = offset + buf.len() as u64;
    let mut pos = offset; // next device byte to fill
    for s in segs {
        let s_start = (s.offset * SECTOR).max(offset);
        let s_end = (s.end() * SECTOR).min(end);
        if s_end <= s_start {
            continue;
        }
        if s_start > pos {
            buf[(pos - offset) as usize..(s_start - offset) as usize].fill(0);
        }
        let dst = &mut buf[(s_start - offset) as usize..(s_end - offset) as usize];
        if s.zeroed {
            dst.fill(0);
        } else {
            let m = s.moffset * SECTOR + (s_start - s.offset * SECTOR);
            read_fill(data, dst, m)?;
        }
        pos = s_end;
    }
    if pos < end {
        buf[(pos - offset) as usize..].fill(0);
    }
    Ok(())
}

/// The sector range `[from, to)` covering the bytes `[offset, offset + len)`.
pub(crate) fn sector_span(offset: u64, len: usize) -> (u64, u64) {
    (offset / SECTOR, (offset + len as u64).div_ceil(SECTOR))
}
