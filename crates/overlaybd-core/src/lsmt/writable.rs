//! The writable append layer: an RW data file (`0x03` header, data appended at
//! EOF) plus an RW index file (`0x01` header, an append-only log of 16-byte
//! entries in insertion order, later entries overriding earlier ones).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};
use crate::lsmt::commit::CommitInput;
use crate::lsmt::header::{flags, HeaderTrailer, Uuid, BLOCK};
use crate::lsmt::ro::{check_moffset, read_mapped, read_raw_entries, sector_span};
use crate::lsmt::segment::{Segment, SECTOR};
use crate::ReadAt;

/// Writes are split into entries of at most this many bytes (upstream `MAX_IO_SIZE`).
pub const MAX_IO_SIZE: u64 = 4 << 20;

/// Largest RW index log accepted on open (upstream `MAX_LSMT_INDEX_SIZE` [main]).
pub const MAX_RW_INDEX_SIZE: u64 = 128_000_000;

/// Parameters for [`WritableLayer::create`].
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Device size in bytes (0 = inherit from the lowers when stacked).
    pub virtual_size: u64,
    /// This layer's uuid ([`Uuid::NIL`] when unset).
    pub uuid: Uuid,
    /// The uuid of the layer below ([`Uuid::NIL`] when none).
    pub parent_uuid: Uuid,
}

/// Result of [`WritableLayer::seal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealInfo {
    /// Byte offset of the index dump inside the data file.
    pub index_offset: u64,
    /// Live entries written.
    pub index_size: u64,
    /// Final size of the sealed file.
    pub size: u64,
}

/// An open RW pair. Not internally synchronised: wrap it in a lock to share.
#[derive(Debug)]
pub struct WritableLayer {
    data: File,
    index: File,
    data_path: PathBuf,
    index_path: PathBuf,
    header: HeaderTrailer,
    /// Live index keyed by offset: sorted, non-overlapping.
    map: BTreeMap<u64, Segment>,
    /// Next append position in the data file (512-aligned).
    data_end: u64,
    /// Next append position in the index file (4096 + 16 n).
    index_end: u64,
}

/// Positional reads of the RW data file with a fixed size snapshot.
struct DataReader<'a> {
    file: &'a File,
    size: u64,
}

impl ReadAt for DataReader<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (self.size - offset).min(buf.len() as u64) as usize;
        self.file.read_at(&mut buf[..n], offset)
    }
    fn size(&self) -> u64 {
        self.size
    }
}

fn check_aligned(offset: u64, len: u64) -> Result<()> {
    if offset % SECTOR != 0 || len % SECTOR != 0 {
        return Err(Error::BadRequest(format!(
            "offset {offset} and length {len} must be multiples of 512"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end / SECTOR <= Segment::MAX_OFFSET => Ok(()),
        _ => Err(Error::BadRequest(format!(
            "range {offset}+{len} is past the largest LSMT offset"
        ))),
    }
}

fn read_header_block(file: &File, what: &'static str) -> Result<HeaderTrailer> {
    let size = file.metadata()?.len();
    if size < BLOCK {
        return Err(Error::Truncated {
            what,
            need: BLOCK,
            have: size,
        });
    }
    let mut b = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut b, 0)?;
    HeaderTrailer::parse(&b, what)
}

/// True if the last block of `file` is a sealed LSMT trailer.
fn has_sealed_trailer(file: &File, size: u64) -> Result<bool> {
    if size < 2 * BLOCK {
        return Ok(false);
    }
    let mut b = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut b, size - BLOCK)?;
    Ok(HeaderTrailer::parse(&b, "trailer")
        .map(|t| !t.is_header() && t.is_sealed())
        .unwrap_or(false))
}

impl WritableLayer {
    /// Creates (truncating) a new RW pair with the given identity.
    pub fn create(
        data_path: impl AsRef<Path>,
        index_path: impl AsRef<Path>,
        opts: CreateOptions,
    ) -> Result<WritableLayer> {
        let (data_path, index_path) = (data_path.as_ref(), index_path.as_ref());
        let open = |p: &Path| {
            crate::regular::open_with(
                p,
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true),
            )
        };
        let data = open(data_path)?;
        let index = open(index_path)?;
        let mut header = HeaderTrailer::new(flags::RW_DATA);
        header.virtual_size = opts.virtual_size;
        header.set_uuid(&opts.uuid);
        header.set_parent_uuid(&opts.parent_uuid);
        data.write_all_at(&header.encode(), 0).in_file(data_path)?;
        let mut ih = header.clone();
        ih.flags = flags::RW_INDEX;
        ih.index_offset = BLOCK;
        index.write_all_at(&ih.encode(), 0).in_file(index_path)?;
        Ok(WritableLayer {
            data,
            index,
            data_path: data_path.to_owned(),
            index_path: index_path.to_owned(),
            header,
            map: BTreeMap::new(),
            data_end: BLOCK,
            index_end: BLOCK,
        })
    }

    /// Opens an existing RW pair and replays its index log. A torn final
    /// partial entry (crash mid-append) is dropped from the file.
    pub fn open(
        data_path: impl AsRef<Path>,
        index_path: impl AsRef<Path>,
    ) -> Result<WritableLayer> {
        let (data_path, index_path) = (data_path.as_ref(), index_path.as_ref());
        let data = crate::regular::open_rw(data_path)?;
        let index = crate::regular::open_rw(index_path)?;

        let header = read_header_block(&data, "header").in_file(data_path)?;
        let flag_err = |what: &'static str, detail: String| Error::BadField {
            what,
            field: "flags",
            detail,
        };
        if !header.is_header() || !header.is_data() {
            return Err(flag_err(
                "header",
                format!("{:#x}: not an RW data file header", header.flags),
            )
            .in_file(data_path));
        }
        if header.is_sparse() {
            return Err(Error::Unsupported(
                "sparse RW data files (flags 0x13) cannot be opened writable".into(),
            )
            .in_file(data_path));
        }
        if header.is_sealed() {
            return Err(flag_err(
                "header",
                format!("{:#x}: a committed layer is read-only", header.flags),
            )
            .in_file(data_path));
        }
        let data_size = data.metadata().in_file(data_path)?.len();
        if has_sealed_trailer(&data, data_size).in_file(data_path)? {
            return Err(Error::BadField {
                what: "trailer",
                field: "flags",
                detail: "the data file is already sealed; open it read-only".into(),
            }
            .in_file(data_path));
        }

        let ih = read_header_block(&index, "index header").in_file(index_path)?;
        if !ih.is_header() || ih.is_data() || ih.is_sealed() {
            return Err(flag_err(
                "index header",
                format!("{:#x}: expected 0x01 (header, index file)", ih.flags),
            )
            .in_file(index_path));
        }
        if ih.index_offset != BLOCK {
            return Err(Error::BadField {
                what: "index header",
                field: "index_offset",
                detail: format!("{}; expected 4096", ih.index_offset),
            }
            .in_file(index_path));
        }
        let index_size = index.metadata().in_file(index_path)?.len();
        let count = (index_size - BLOCK) / Segment::SIZE as u64;
        if count > MAX_RW_INDEX_SIZE {
            return Err(Error::TooManyEntries {
                what: "LSMT RW index",
                count,
                max: MAX_RW_INDEX_SIZE,
            }
            .in_file(index_path));
        }
        let index_end = BLOCK + count * Segment::SIZE as u64;
        if index_end != index_size {
            // Torn append: drop the partial entry so later appends stay aligned.
            index.set_len(index_end).in_file(index_path)?;
        }
        let raw = read_raw_entries(
            &DataReader {
                file: &index,
                size: index_end,
            },
            BLOCK,
            count,
        )
        .in_file(index_path)?;

        let limit = data_size / SECTOR;
        let mut layer = WritableLayer {
            data,
            index,
            data_path: data_path.to_owned(),
            index_path: index_path.to_owned(),
            header,
            map: BTreeMap::new(),
            data_end: data_size.div_ceil(SECTOR) * SECTOR,
            index_end,
        };
        for (i, e) in raw.iter().enumerate() {
            if e.is_invalid() || e.length == 0 {
                continue;
            }
            let mut s = *e;
            s.tag = 0;
            check_moffset(i, &s, limit).map_err(|e| e.in_file(index_path))?;
            layer.insert(s);
        }
        Ok(layer)
    }

    /// The data file header (identity and virtual size).
    pub fn header(&self) -> &HeaderTrailer {
        &self.header
    }

    /// Device size in bytes from the header (0 = inherit).
    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    /// Path of the data file.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Path of the index file.
    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// Current size of the data file in bytes (header included).
    pub fn data_size(&self) -> u64 {
        self.data_end
    }

    /// Rewrites the virtual size in both headers (upstream `update_vsize`).
    pub fn set_virtual_size(&mut self, vsize: u64) -> Result<()> {
        self.header.virtual_size = vsize;
        self.data
            .write_all_at(&self.header.encode(), 0)
            .in_file(&self.data_path)?;
        let mut b = vec![0u8; BLOCK as usize];
        self.index
            .read_exact_at(&mut b, 0)
            .in_file(&self.index_path)?;
        b[48..56].copy_from_slice(&vsize.to_le_bytes());
        self.index.write_all_at(&b, 0).in_file(&self.index_path)?;
        Ok(())
    }

    /// Inserts `m` into the live index, trimming or removing what it overlaps.
    fn insert(&mut self, m: Segment) {
        let (start, end) = (m.offset, m.end());
        if let Some((&k, &prev)) = self.map.range(..start).next_back() {
            if prev.end() > start {
                self.map.insert(k, prev.trimmed(prev.offset, start));
                if prev.end() > end {
                    let tail = prev.trimmed(end, prev.end());
                    self.map.insert(tail.offset, tail);
                }
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            let s = self.map.remove(&k).expect("key just listed");
            if s.end() > end {
                let tail = s.trimmed(end, s.end());
                self.map.insert(tail.offset, tail);
            }
        }
        self.map.insert(start, m);
    }

    fn append_entries(&mut self, entries: &[Segment]) -> Result<()> {
        let mut raw = Vec::with_capacity(entries.len() * Segment::SIZE);
        for e in entries {
            raw.extend_from_slice(&e.encode());
        }
        self.index
            .write_all_at(&raw, self.index_end)
            .in_file(&self.index_path)?;
        self.index_end += raw.len() as u64;
        Ok(())
    }

    /// Writes `buf` at device byte `offset` (both 512-aligned): the data is
    /// appended to the data file, then one index entry per 4 MiB piece.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_aligned(offset, buf.len() as u64)?;
        for (i, piece) in buf.chunks(MAX_IO_SIZE as usize).enumerate() {
            let dev = offset + i as u64 * MAX_IO_SIZE;
            let pos = self.data_end;
            self.data
                .write_all_at(piece, pos)
                .in_file(&self.data_path)?;
            self.data_end += piece.len() as u64;
            let m = Segment::data(
                dev / SECTOR,
                (piece.len() as u64 / SECTOR) as u32,
                pos / SECTOR,
            );
            self.append_entries(&[m])?;
            self.insert(m);
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` (both 512-aligned): appends zeroed
    /// entries of at most 16383 sectors with `moffset` = data EOF / 512.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        check_aligned(offset, len)?;
        let mut sector = offset / SECTOR;
        let end = (offset + len) / SECTOR;
        let mut entries = Vec::new();
        while sector < end {
            let n = (end - sector).min(Segment::MAX_LENGTH as u64) as u32;
            let mut m = Segment::zeroed(sector, n);
            m.moffset = self.data_end / SECTOR;
            entries.push(m);
            sector += n as u64;
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.append_entries(&entries)?;
        for m in entries {
            self.insert(m);
        }
        Ok(())
    }

    /// Reads this layer alone at any byte offset, filling all of `buf`:
    /// unwritten and discarded ranges read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset.checked_add(buf.len() as u64).is_none() {
            return Err(Error::BadRequest(format!(
                "read of {} bytes at {offset} overflows",
                buf.len()
            )));
        }
        let (from, to) = sector_span(offset, buf.len());
        read_mapped(&self.data_reader(), self.lookup(from, to), buf, offset)
            .in_file(&self.data_path)?;
        Ok(buf.len())
    }

    fn data_reader(&self) -> DataReader<'_> {
        DataReader {
            file: &self.data,
            size: self.data_end,
        }
    }

    /// The live index: sorted, non-overlapping, tags 0.
    pub fn segments(&self) -> Vec<Segment> {
        self.map.values().copied().collect()
    }

    /// Number of live entries.
    pub fn segment_count(&self) -> usize {
        self.map.len()
    }

    /// The live entries overlapping the sector range `[from, to)`, trimmed.
    pub fn lookup(&self, from: u64, to: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        if from >= to {
            return out;
        }
        if let Some((_, s)) = self.map.range(..from).next_back() {
            if s.end() > from {
                out.push(s.trimmed(from, to));
            }
        }
        out.extend(self.map.range(from..to).map(|(_, s)| s.trimmed(from, to)));
        out
    }

    /// Flushes data then index to stable storage (fdatasync both).
    pub fn fsync(&self) -> Result<()> {
        self.data.sync_data().in_file(&self.data_path)?;
        self.index.sync_data().in_file(&self.index_path)?;
        Ok(())
    }

    /// Runs `f` with a [`CommitInput`] over this layer's live index and data.
    pub fn with_commit_input<T>(&self, f: impl FnOnce(&CommitInput<'_>) -> T) -> T {
        let reader = self.data_reader();
        let segs = self.segments();
        let parent = self.header.parent_uuid().unwrap_or(Uuid::NIL);
        let input = CommitInput {
            segments: &segs,
            data: &reader,
            virtual_size: self.header.virtual_size,
            parent_uuid: parent,
        };
        f(&input)
    }

    /// Seals the layer (upstream `close_seal`): appends the live index to the
    /// data file, zero-padded to 512 bytes, then a `0x06` trailer. The data file
    /// becomes a read-only layer [`crate::lsmt::RoLayer`] opens; the index file
    /// is left as is.
    pub fn seal(self) -> Result<SealInfo> {
        let segs = self.segments();
        let index_offset = self.data_end;
        let mut raw = Vec::with_capacity((segs.len() * Segment::SIZE).next_multiple_of(512));
        for s in &segs {
            raw.extend_from_slice(&s.encode());
        }
        raw.resize(raw.len().next_multiple_of(SECTOR as usize), 0);
        let mut t = HeaderTrailer::new(flags::TRAILER);
        t.index_offset = index_offset;
        t.index_size = segs.len() as u64;
        t.virtual_size = self.header.virtual_size;
        t.uuid = self.header.uuid;
        t.parent_uuid = self.header.parent_uuid;
        raw.extend_from_slice(&t.encode());
        self.data
            .write_all_at(&raw, index_offset)
            .in_file(&self.data_path)?;
        self.fsync()?;
        Ok(SealInfo {
            index_offset,
            index_size: segs.len() as u64,
            size: index_offset + raw.len() as u64,
        })
    }
}
