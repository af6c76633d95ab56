//! Random-access reader: [`ZFileReader`] over any [`ReadAt`] source.

use std::cell::Cell;
use std::io;

use crate::codec::{decompress_block_at, max_compressed_len};
use crate::crc::{crc32c_raw, BLOCK_CRC_SEED};
use crate::error::{Error, Result};
use crate::header::{block_digest, flags, Algorithm, Header, HEADER_SIZE};
use crate::source::ReadAt;

/// Upper bound on `index_size` (upstream main rejects more than 10^9 blocks).
pub const MAX_INDEX_SIZE: u64 = 1_000_000_000;
/// Compressed bytes fetched with one source read when a read spans several blocks.
const FETCH_MAX: u64 = 1 << 20;
/// Jump-table bytes read per source read at open time.
const INDEX_CHUNK: usize = 1 << 20;
/// Tries (first read included) for a block that fails its CRC or does not decode,
/// when the source can drop its cached copy ([`ReadAt::invalidate`]).
pub const BLOCK_TRIES: u32 = 3;
/// Compressed bytes per source read in [`ZFileReader::verify`].
const VERIFY_CHUNK: u64 = 4 << 20;

/// Summary of an open ZFile (from the header, or the trailer when the header was not
/// overwritten).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Block codec.
    pub algorithm: Algorithm,
    /// Uncompressed block size in bytes.
    pub block_size: u32,
    /// Number of blocks (`index_size`).
    pub blocks: u64,
    /// Uncompressed size in bytes (`original_file_size`).
    pub original_size: u64,
    /// Flags of the header block.
    pub header_flags: u64,
    /// Stored digest of the header block.
    pub header_digest: u32,
    /// Flags of the trailer, if it was read (not on the overwritten-header fast path).
    pub trailer_flags: Option<u64>,
    /// Stored digest of the trailer, if it was read.
    pub trailer_digest: Option<u32>,
    /// Offset of the jump table.
    pub index_offset: u64,
    /// Stored jump-table CRC.
    pub index_crc: u32,
    /// Every block carries a 4-byte CRC (`verify` byte nonzero).
    pub verify: bool,
    /// The header carried the final index fields (`HEADER_OVERWRITE`).
    pub header_overwritten: bool,
    /// Bytes between the header and block 0 (always 0 in practice).
    pub dict_size: u32,
    /// Stored `level` byte.
    pub level: u8,
    /// Size of the ZFile (the source) in bytes.
    pub zfile_size: u64,
}

/// What [`ZFileReader::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blocks checked.
    pub blocks: u64,
    /// Stored bytes of all blocks (including CRCs).
    pub compressed_bytes: u64,
    /// Block CRCs were present and all matched.
    pub block_crcs_checked: bool,
    /// The header digest was present and matched.
    pub header_digest_checked: bool,
    /// The trailer was read and its digest was present and matched.
    pub trailer_digest_checked: bool,
    /// `index_crc` was present and matched.
    pub index_crc_checked: bool,
}

/// Options for [`ZFileReader::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Check each block's CRC on read (when the file has them). Default `true`.
    pub check_block_crc: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            check_block_crc: true,
        }
    }
}

/// Per-thread buffers of the read path: compressed staging and one decoded block.
#[derive(Default)]
struct Scratch {
    staging: Vec<u8>,
    block: Vec<u8>,
}

thread_local! {
    static SCRATCH: Cell<Scratch> = const {
        Cell::new(Scratch {
            staging: Vec::new(),
            block: Vec::new(),
        })
    };
}

/// A read-only, random-access view of the uncompressed content of a ZFile.
pub struct ZFileReader<R> {
    src: R,
    info: Info,
    /// `offsets[i]` = start of block `i`; `offsets[blocks]` = end of the data.
    offsets: Vec<u64>,
    shift: u32,
    check_crc: bool,
    /// Flags of the block the index fields came from.
    meta_flags: u64,
}

impl<R> std::fmt::Debug for ZFileReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZFileReader")
            .field("info", &self.info)
            .field("check_crc", &self.check_crc)
            .finish_non_exhaustive()
    }
}

fn read_exact<R: ReadAt + ?Sized>(
    src: &R,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<()> {
    src.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated {
                what,
                need: offset.saturating_add(buf.len() as u64),
                have: src.size(),
            }
        } else {
            Error::Io(e)
        }
    })
}

fn read_block512<R: ReadAt + ?Sized>(src: &R, offset: u64, what: &'static str) -> Result<Vec<u8>> {
    let mut b = vec![0u8; HEADER_SIZE];
    read_exact(src, &mut b, offset, what)?;
    Ok(b)
}

/// Block sizes accepted on read.
pub(crate) fn valid_read_block_size(bs: u32) -> bool {
    matches!(bs, 4096 | 8192 | 16384 | 32768 | 65536)
}

/// Reads the header block of a ZFile of `size` bytes: magic, header bit, digest.
fn read_header<R: ReadAt + ?Sized>(src: &R, size: u64) -> Result<Header> {
    need_size("header", HEADER_SIZE as u64, size)?;
    let hblock = read_block512(src, 0, "header")?;
    let header = Header::parse_at(&hblock, "header", 0)?;
    if !header.is_header() {
        return Err(bad_flags("header", &header, "header bit clear"));
    }
    check_block_digest(&hblock, &header, |stored, computed| Error::HeaderDigest {
        stored,
        computed,
    })?;
    Ok(header)
}

/// Reads the trailer (the index fields when the header was not overwritten):
/// returns it and its offset.
fn read_trailer<R: ReadAt + ?Sized>(src: &R, size: u64, header: &Header) -> Result<(Header, u64)> {
    if header.flags & flags::TYPE == 0 {
        return Err(bad_flags("header", header, "not a data file"));
    }
    need_size("trailer", 2 * HEADER_SIZE as u64, size)?;
    let toff = size - HEADER_SIZE as u64;
    let tblock = read_block512(src, toff, "trailer")?;
    let t = Header::parse_at(&tblock, "trailer", toff)?;
    let detail = if t.is_header() {
        Some("trailer has the header bit set")
    } else if t.flags & flags::TYPE == 0 {
        Some("trailer is not a data file")
    } else if t.flags & flags::SEALED == 0 {
        Some("trailer is not sealed")
    } else {
        None
    };
    if let Some(detail) = detail {
        return Err(bad_flags("trailer", &t, detail));
    }
    check_block_digest(&tblock, &t, |stored, computed| Error::TrailerDigest {
        stored,
        computed,
    })?;
    Ok((t, toff))
}

/// [`Error::Truncated`] unless the ZFile (`have` bytes) holds `need` bytes.
fn need_size(what: &'static str, need: u64, have: u64) -> Result<()> {
    if have < need {
        return Err(Error::Truncated { what, need, have });
    }
    Ok(())
}

fn bad_flags(what: &'static str, h: &Header, detail: &'static str) -> Error {
    Error::BadFlags {
        what,
        flags: h.flags,
        detail,
    }
}

/// Checks the stored digest of a header or trailer `block` (parsed as `h`),
/// if it has one; `err(stored, computed)` is the error on a mismatch.
fn check_block_digest(block: &[u8], h: &Header, err: fn(u32, u32) -> Error) -> Result<()> {
    if h.has_digest() {
        let computed = block_digest(block).unwrap_or(0);
        if computed != h.digest {
            return Err(err(h.digest, computed));
        }
    }
    Ok(())
}

/// Checks the index fields of `meta` (the block they came from) against each
/// other and against `index_limit`, where the jump table must end; returns
/// the codec.
fn check_index_fields(meta: &Header, header: &Header, index_limit: u64) -> Result<Algorithm> {
    if (meta.flags | header.flags) & flags::IDX_COMP != 0 {
        return Err(Error::Unsupported("compressed jump table (IDX_COMP)"));
    }
    let algorithm = Algorithm::try_from(meta.algo)?;
    if !valid_read_block_size(meta.block_size) {
        return Err(Error::BadBlockSize(meta.block_size));
    }
    if meta.use_dict != 0 {
        return Err(Error::Unsupported("dictionary (use_dict)"));
    }
    let bs = u64::from(meta.block_size);
    let n = meta.index_size;
    let index_err = |detail: String| Error::IndexSize {
        index_offset: meta.index_offset,
        index_size: n,
        detail,
    };
    if n > MAX_INDEX_SIZE {
        return Err(index_err(format!("more than {MAX_INDEX_SIZE} blocks")));
    }
    let index_bytes = n * 4;
    // Upstream's check: 4 * index_size <= trailer_offset - index_offset.
    if meta.index_offset > index_limit || index_bytes > index_limit - meta.index_offset {
        return Err(index_err(format!(
            "jump table of {index_bytes} bytes does not fit before offset {index_limit}"
        )));
    }
    let expected = meta.original_size.div_ceil(bs);
    if expected != n {
        return Err(index_err(format!(
            "original size {} needs {expected} blocks of {bs} bytes",
            meta.original_size
        )));
    }
    let data_start = HEADER_SIZE as u64 + u64::from(meta.dict_size);
    if data_start > meta.index_offset {
        return Err(index_err(format!(
            "data would start at {data_start}, after the jump table"
        )));
    }
    Ok(algorithm)
}

/// Reads the jump table (checked by [`check_index_fields`]) in chunks, checks
/// every stored length and `index_crc`, and returns the block offsets.
fn read_jump_table<R: ReadAt + ?Sized>(
    src: &R,
    meta: &Header,
    algorithm: Algorithm,
    data_start: u64,
) -> Result<Vec<u64>> {
    let n = meta.index_size;
    let index_bytes = n * 4;
    let crc_len: u32 = if meta.verify != 0 { 4 } else { 0 };
    let max_stored = u32::try_from(max_compressed_len(algorithm, meta.block_size as usize))
        .unwrap_or(u32::MAX)
        + crc_len;
    let min_stored = crc_len + 1;

    // `n` is bounded by the source size here.
    let mut offsets = Vec::with_capacity(n.min(1 << 20) as usize + 1);
    offsets.push(data_start);
    let mut cur = data_start;
    let mut crc = 0u32;
    let mut chunk = vec![0u8; INDEX_CHUNK.min(index_bytes as usize)];
    let mut done = 0u64;
    while done < index_bytes {
        let len = (index_bytes - done).min(INDEX_CHUNK as u64) as usize;
        let buf = &mut chunk[..len];
        read_exact(src, buf, meta.index_offset + done, "jump table")?;
        crc = crc32c_raw(crc, buf);
        for (k, e) in buf.chunks_exact(4).enumerate() {
            let block = done / 4 + k as u64;
            let len = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            if len < min_stored {
                return Err(Error::JumpTable {
                    block,
                    len,
                    detail: format!("stored length must be at least {min_stored}"),
                });
            }
            if len > max_stored {
                return Err(Error::BlockTooLarge {
                    block,
                    len,
                    max: max_stored,
                });
            }
            cur += u64::from(len);
            if cur > meta.index_offset {
                return Err(Error::JumpTable {
                    block,
                    len,
                    detail: format!(
                        "block ends at {cur}, past the jump table at {}",
                        meta.index_offset
                    ),
                });
            }
            offsets.push(cur);
        }
        done += len as u64;
    }
    if meta.has_digest() && crc != meta.index_crc {
        return Err(Error::IndexCrc {
            stored: meta.index_crc,
            computed: crc,
        });
    }
    Ok(offsets)
}

impl<R: ReadAt> ZFileReader<R> {
    /// Opens a ZFile, following formats.md 3.4: header magic and header bit, header
    /// digest, the overwritten-header fast path or the trailer, then the jump table
    /// (with `index_crc`) and its consistency with the header fields.
    pub fn open(src: R) -> Result<Self> {
        Self::open_with(src, OpenOptions::default())
    }

    /// [`ZFileReader::open`] with options.
    pub fn open_with(src: R, opts: OpenOptions) -> Result<Self> {
        let size = src.size();
        let header = read_header(&src, size)?;
        let overwritten = header.flags & flags::HEADER_OVERWRITE != 0;
        let (meta, trailer, index_limit) = if overwritten {
            (header, None, size)
        } else {
            let (t, toff) = read_trailer(&src, size, &header)?;
            (t, Some(t), toff)
        };
        let algorithm = check_index_fields(&meta, &header, index_limit)?;
        let data_start = HEADER_SIZE as u64 + u64::from(meta.dict_size);
        let verify = meta.verify != 0;
        // A remote source fetches exactly the jump table's bytes, in one
        // request, rather than the fetch units around them.
        src.will_need(meta.index_offset, meta.index_size.saturating_mul(4));
        let offsets = read_jump_table(&src, &meta, algorithm, data_start)?;

        let info = Info {
            algorithm,
            block_size: meta.block_size,
            blocks: meta.index_size,
            original_size: meta.original_size,
            header_flags: header.flags,
            header_digest: header.digest,
            trailer_flags: trailer.map(|t| t.flags),
            trailer_digest: trailer.map(|t| t.digest),
            index_offset: meta.index_offset,
            index_crc: meta.index_crc,
            verify,
            header_overwritten: overwritten,
            dict_size: meta.dict_size,
            level: meta.level,
            zfile_size: size,
        };
        Ok(Self {
            src,
            info,
            offsets,
            shift: meta.block_size.trailing_zeros(),
            check_crc: verify && opts.check_block_crc,
            meta_flags: meta.flags,
        })
    }

    /// Format summary.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The underlying source.
    pub fn inner(&self) -> &R {
        &self.src
    }

    /// Gives back the underlying source.
    pub fn into_inner(self) -> R {
        self.src
    }

    /// Offset in the ZFile and stored length (including its CRC) of block `i`.
    ///
    /// # Panics
    /// If `i >= info().blocks`.
    pub fn block_extent(&self, i: u64) -> (u64, u32) {
        let i = i as usize;
        let start = self.offsets[i];
        (start, (self.offsets[i + 1] - start) as u32)
    }

    /// Decoded size of block `i`.
    fn block_len(&self, i: u64) -> usize {
        let start = i << self.shift;
        (self.info.original_size - start).min(u64::from(self.info.block_size)) as usize
    }

    /// Checks the CRC of stored block `i` (when enabled) and returns its compressed
    /// bytes without the CRC.
    #[inline]
    fn payload<'a>(&self, i: u64, stored: &'a [u8]) -> Result<&'a [u8]> {
        if !self.info.verify {
            return Ok(stored);
        }
        let (data, tail) = stored.split_at(stored.len() - 4);
        if self.check_crc {
            let want = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
            let got = crc32c_raw(BLOCK_CRC_SEED, data);
            if got != want {
                return Err(Error::BlockCrc {
                    block: i,
                    offset: self.offsets[i as usize],
                    stored: want,
                    computed: got,
                });
            }
        }
        Ok(data)
    }

    /// Reads uncompressed bytes at `offset` into `buf`. Returns `buf.len()` bytes
    /// unless the range passes the end of the content (then fewer; 0 at or past it).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let orig = self.info.original_size;
        if buf.is_empty() || offset >= orig {
            return Ok(0);
        }
        let len = (orig - offset).min(buf.len() as u64) as usize;
        let mut scratch = SCRATCH.take();
        let r = self.read_blocks(&mut buf[..len], offset, &mut scratch);
        SCRATCH.set(scratch);
        r.map(|()| len)
    }

    fn read_blocks(&self, buf: &mut [u8], offset: u64, s: &mut Scratch) -> Result<()> {
        let end = offset + buf.len() as u64;
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        let mut b = first;
        while b <= last {
            let start = self.offsets[b as usize];
            let mut g_end = b + 1;
            while g_end <= last && self.offsets[g_end as usize + 1] - start <= FETCH_MAX {
                g_end += 1;
            }
            let span = (self.offsets[g_end as usize] - start) as usize;
            // Memory-backed sources are decoded in place; others go through staging.
            let stored: &[u8] = match self.src.slice_at(start, span) {
                Some(bytes) => bytes,
                None => {
                    if s.staging.len() < span {
                        s.staging.resize(span, 0);
                    }
                    read_exact(&self.src, &mut s.staging[..span], start, "block data")?;
                    &s.staging[..span]
                }
            };
            for i in b..g_end {
                let lo = (self.offsets[i as usize] - start) as usize;
                let hi = (self.offsets[i as usize + 1] - start) as usize;
                let bstart = i << self.shift;
                let blen = self.block_len(i) as u64;
                let from = bstart.max(offset);
                let to = (bstart + blen).min(end);
                let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                let skip = (from - bstart) as usize;
                if let Err(e) = self.decode_block(i, &stored[lo..hi], dst, skip, &mut s.block) {
                    self.heal_block(i, dst, skip, &mut s.block, e)?;
                }
            }
            b = g_end;
        }
        Ok(())
    }

    /// Checks and decodes stored block `i`, writing its decoded bytes
    /// `[skip, skip + dst.len())` to `dst` (through `tmp` when partial).
    #[inline]
    fn decode_block(
        &self,
        i: u64,
        stored: &[u8],
        dst: &mut [u8],
        skip: usize,
        tmp: &mut Vec<u8>,
    ) -> Result<()> {
        let data = self.payload(i, stored)?;
        let blen = self.block_len(i);
        if dst.len() == blen {
            decompress_block_at(self.info.algorithm, data, dst, i).map(drop)
        } else {
            if tmp.len() < blen {
                tmp.resize(blen, 0);
            }
            let tmp = &mut tmp[..blen];
            decompress_block_at(self.info.algorithm, data, tmp, i)?;
            dst.copy_from_slice(&tmp[skip..skip + dst.len()]);
            Ok(())
        }
    }

    /// Block `i` failed with `err`. If it is an integrity failure (bad CRC or
    /// undecodable) and the source drops its cached copy ([`ReadAt::invalidate`]),
    /// re-reads and re-checks the block, up to [`BLOCK_TRIES`] tries in total
    /// (formats.md 3.9). Returns the last error when no try succeeds.
    #[cold]
    fn heal_block(
        &self,
        i: u64,
        dst: &mut [u8],
        skip: usize,
        tmp: &mut Vec<u8>,
        mut err: Error,
    ) -> Result<()> {
        if !matches!(err, Error::BlockCrc { .. } | Error::Decompress { .. }) {
            return Err(err);
        }
        let (off, len) = self.block_extent(i);
        let mut fresh = vec![0u8; len as usize];
        for _ in 1..BLOCK_TRIES {
            if !self.src.invalidate(off, u64::from(len)) {
                break;
            }
            read_exact(&self.src, &mut fresh, off, "block data")?;
            match self.decode_block(i, &fresh, dst, skip, tmp) {
                Ok(()) => return Ok(()),
                Err(e) => err = e,
            }
        }
        Err(err)
    }

    /// Checks the header digest, the trailer digest (if the trailer was read), the
    /// jump-table CRC and every block CRC, without decompressing. Fails with the first
    /// mismatch.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = self.verify_meta()?;
        let mut first_err = None;
        self.scan_blocks(|e| {
            first_err = Some(e);
            false
        })?;
        if let Some(e) = first_err {
            return Err(e);
        }
        report.block_crcs_checked = self.info.verify;
        Ok(report)
    }

    /// Re-reads and checks header, trailer and jump table.
    pub(crate) fn verify_meta(&self) -> Result<VerifyReport> {
        let hblock = read_block512(&self.src, 0, "header")?;
        let h = Header::parse_at(&hblock, "header", 0)?;
        let mut header_digest_checked = false;
        if h.has_digest() {
            let computed = block_digest(&hblock).unwrap_or(0);
            if computed != h.digest {
                return Err(Error::HeaderDigest {
                    stored: h.digest,
                    computed,
                });
            }
            header_digest_checked = true;
        }
        let mut trailer_digest_checked = false;
        if self.info.trailer_flags.is_some() {
            let toff = self.info.zfile_size - HEADER_SIZE as u64;
            let tblock = read_block512(&self.src, toff, "trailer")?;
            let t = Header::parse_at(&tblock, "trailer", toff)?;
            if t.has_digest() {
                let computed = block_digest(&tblock).unwrap_or(0);
                if computed != t.digest {
                    return Err(Error::TrailerDigest {
                        stored: t.digest,
                        computed,
                    });
                }
                trailer_digest_checked = true;
            }
        }
        let mut index_crc_checked = false;
        if self.meta_flags & flags::CALC_DIGEST != 0 {
            let computed = self.jump_table_crc()?;
            if computed != self.info.index_crc {
                return Err(Error::IndexCrc {
                    stored: self.info.index_crc,
                    computed,
                });
            }
            index_crc_checked = true;
        }
        Ok(VerifyReport {
            blocks: self.info.blocks,
            compressed_bytes: self.offsets[self.offsets.len() - 1] - self.offsets[0],
            block_crcs_checked: false,
            header_digest_checked,
            trailer_digest_checked,
            index_crc_checked,
        })
    }

    /// Raw CRC (seed 0) of the jump table as stored in the source.
    pub(crate) fn jump_table_crc(&self) -> Result<u32> {
        let total = self.info.blocks * 4;
        let mut buf = vec![0u8; INDEX_CHUNK.min(total as usize)];
        let mut crc = 0;
        let mut done = 0u64;
        while done < total {
            let len = (total - done).min(INDEX_CHUNK as u64) as usize;
            read_exact(
                &self.src,
                &mut buf[..len],
                self.info.index_offset + done,
                "jump table",
            )?;
            crc = crc32c_raw(crc, &buf[..len]);
            done += len as u64;
        }
        Ok(crc)
    }

    /// Reads all blocks in large sequential chunks and reports every CRC mismatch to
    /// `on_bad`; stops early when it returns `false`. Does nothing if blocks carry no
    /// CRC.
    pub(crate) fn scan_blocks(&self, mut on_bad: impl FnMut(Error) -> bool) -> Result<()> {
        if !self.info.verify {
            return Ok(());
        }
        let n = self.info.blocks;
        let mut buf = Vec::new();
        let mut b = 0u64;
        while b < n {
            let start = self.offsets[b as usize];
            let mut g_end = b + 1;
            while g_end < n && self.offsets[g_end as usize + 1] - start <= VERIFY_CHUNK {
                g_end += 1;
            }
            let span = (self.offsets[g_end as usize] - start) as usize;
            let stored: &[u8] = match self.src.slice_at(start, span) {
                Some(bytes) => bytes,
                None => {
                    buf.resize(span, 0);
                    read_exact(&self.src, &mut buf, start, "block data")?;
                    &buf
                }
            };
            for i in b..g_end {
                let lo = (self.offsets[i as usize] - start) as usize;
                let hi = (self.offsets[i as usize + 1] - start) as usize;
                let (data, tail) = stored[lo..hi].split_at(hi - lo - 4);
                let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
                let computed = crc32c_raw(BLOCK_CRC_SEED, data);
                if stored != computed {
                    let e = Error::BlockCrc {
                        block: i,
                        offset: self.offsets[i as usize],
                        stored,
                        computed,
                    };
                    if !on_bad(e) {
                        return Ok(());
                    }
                }
            }
            b = g_end;
        }
        Ok(())
    }

    /// Stored lengths of all blocks, in order (the decoded jump table).
    pub fn stored_lengths(&self) -> impl Iterator<Item = u32> + '_ {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as u32)
    }
}

impl<R: ReadAt> ReadAt for ZFileReader<R> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        ZFileReader::read_at(self, buf, offset).map_err(io::Error::from)
    }
    fn size(&self) -> u64 {
        self.info.original_size
    }
    /// Advises the inner source of the stored blocks behind the range.
    fn will_need(&self, offset: u64, len: u64) {
        let (at, n) = self.stored_extent(offset, len);
        if n > 0 {
            self.inner().will_need(at, n);
        }
    }
    /// The stored (compressed) blocks behind `[offset, offset + len)`: from
    /// the start of the first block to the end of the last, in the inner
    /// source's offsets. Empty (`(0, 0)`) for an empty range or one past the
    /// end.
    fn stored_extent(&self, offset: u64, len: u64) -> (u64, u64) {
        let size = self.info.original_size;
        if len == 0 || offset >= size || self.info.blocks == 0 {
            return (0, 0);
        }
        let end = offset.saturating_add(len).min(size);
        let last_block = self.info.blocks - 1;
        let first = (offset >> self.shift).min(last_block);
        let last = ((end - 1) >> self.shift).min(last_block);
        let (start, _) = self.block_extent(first);
        let (at, n) = self.block_extent(last);
        let stop = at + u64::from(n);
        (start, stop.saturating_sub(start))
    }
    fn will_need_stored(&self, offset: u64, len: u64) {
        if len > 0 {
            self.inner().will_need(offset, len);
        }
    }
}

#[cfg(test)]
mod heal_tests {
    use super::*;
    use crate::writer::{Options, ZFileWriter};
    use std::io::Cursor;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A source that serves a corrupted copy of one byte range until it has been
    /// invalidated `bad_until` times, and counts invalidations.
    struct Flaky {
        good: Vec<u8>,
        bad: Vec<u8>,
        bad_until: u32,
        heals: bool,
        invalidated: AtomicU32,
    }

    impl ReadAt for Flaky {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let src = if self.invalidated.load(Ordering::SeqCst) < self.bad_until {
                &self.bad
            } else {
                &self.good
            };
            src.read_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.good.len() as u64
        }
        fn invalidate(&self, _offset: u64, _len: u64) -> bool {
            if self.heals {
                self.invalidated.fetch_add(1, Ordering::SeqCst);
            }
            self.heals
        }
    }

    fn setup(bad_until: u32, heals: bool) -> (Vec<u8>, ZFileReader<Flaky>, u64) {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = ZFileWriter::new(Cursor::new(Vec::new()), Options::default()).unwrap();
        w.append(&data).unwrap();
        let good = w.finish().unwrap().0.into_inner();
        let probe = ZFileReader::open(&good[..]).unwrap();
        let (off, _) = probe.block_extent(3);
        let mut bad = good.clone();
        bad[off as usize + 1] ^= 0x55;
        let src = Flaky {
            good,
            bad,
            bad_until,
            heals,
            invalidated: AtomicU32::new(0),
        };
        (data, ZFileReader::open(src).unwrap(), off)
    }

    #[test]
    fn corrupt_block_is_invalidated_and_reread() {
        let (data, r, _) = setup(1, true);
        let mut out = vec![0u8; data.len()];
        assert_eq!(r.read_at(&mut out, 0).unwrap(), data.len());
        assert!(out == data);
        assert_eq!(r.inner().invalidated.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn persistent_corruption_fails_after_three_tries() {
        let (data, r, off) = setup(u32::MAX, true);
        let mut out = vec![0u8; 100];
        let e = r.read_at(&mut out, 3 * 4096 + 10).unwrap_err();
        assert!(
            matches!(e, Error::BlockCrc { block: 3, offset, .. } if offset == off),
            "{e}"
        );
        assert_eq!(
            r.inner().invalidated.load(Ordering::SeqCst),
            BLOCK_TRIES - 1
        );
        // Blocks before the bad one still read.
        r.read_at(&mut out, 0).unwrap();
        assert!(out[..] == data[..100]);
    }

    #[test]
    fn no_retry_when_source_cannot_drop_its_copy() {
        let (_, r, _) = setup(u32::MAX, false);
        let mut out = vec![0u8; 4096];
        let e = r.read_at(&mut out, 3 * 4096).unwrap_err();
        assert!(matches!(e, Error::BlockCrc { block: 3, .. }), "{e}");
    }
}

#[cfg(test)]
mod advice_tests {
    use super::*;
    use crate::writer::{Options, ZFileWriter};
    use std::io::Cursor;
    use std::sync::Mutex;

    /// Stored bytes that record the advice they get.
    struct Advised {
        bytes: Vec<u8>,
        got: Mutex<Vec<(u64, u64)>>,
    }

    impl ReadAt for Advised {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.bytes.read_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn will_need(&self, offset: u64, len: u64) {
            self.got.lock().unwrap().push((offset, len));
        }
    }

    #[test]
    fn advice_maps_to_the_stored_blocks() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = ZFileWriter::new(Cursor::new(Vec::new()), Options::default()).unwrap();
        w.append(&data).unwrap();
        let bytes = w.finish().unwrap().0.into_inner();
        let r = ZFileReader::open(Advised {
            bytes,
            got: Mutex::new(Vec::new()),
        })
        .unwrap();
        let (b1, _) = r.block_extent(1);
        let (b3, n3) = r.block_extent(3);
        // Bytes of blocks 1..=3 (4 KiB blocks).
        let want = (b1, b3 + u64::from(n3) - b1);
        assert_eq!(r.stored_extent(4096 + 5, 3 * 4096 - 10), want);
        // Clamped at the end; empty past it.
        let blocks = r.info().blocks;
        let (bl, nl) = r.block_extent(blocks - 1);
        let (bp, _) = r.block_extent(blocks - 2);
        assert_eq!(
            r.stored_extent(40_000 - 4097, 1 << 30),
            (bp, bl + u64::from(nl) - bp)
        );
        assert_eq!(r.stored_extent(40_000, 10), (0, 0));
        assert_eq!(r.stored_extent(0, 0), (0, 0));
        // The open asked for exactly the jump table.
        let jt = std::mem::take(&mut *r.inner().got.lock().unwrap());
        let n = r.info().blocks;
        assert_eq!(jt.len(), 1);
        assert_eq!(jt[0].1, n * 4);
        assert!(jt[0].0 >= bl + u64::from(nl) && jt[0].0 + n * 4 <= r.inner().size());
        r.will_need(4096 + 5, 3 * 4096 - 10);
        r.will_need_stored(7, 9);
        r.will_need(40_000, 10);
        assert_eq!(*r.inner().got.lock().unwrap(), vec![want, (7, 9)]);
    }
}
