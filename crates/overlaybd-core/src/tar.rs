//! The tar "disguise" wrapper: a layer blob that is also a valid one-file tar
//! (`overlaybd.commit`), as written by `overlaybd-commit -t` (format §4).
//!
//! | bytes | content |
//! |---|---|
//! | 0..512 | ustar header `overlaybd.pax`, typeflag `x` |
//! | 512..1024 | PAX record `"<len> size=<payload bytes>\n"`, zero-padded |
//! | 1024..1536 | ustar header `overlaybd.commit`, typeflag `0`, size field 0 |
//! | 1536.. | payload (ZFile or raw LSMT) |
//! | then | zero padding to 512, two zero blocks |

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::error::{Error, Result};
use crate::ReadAt;

/// Tar block size.
pub const BLOCK: u64 = 512;
/// Where the payload starts in a PAX-style wrapper.
pub const PAYLOAD_OFFSET: u64 = 3 * BLOCK;

const NAME: usize = 0;
const MODE: usize = 100;
const UID: usize = 108;
const GID: usize = 116;
const SIZE: usize = 124;
const MTIME: usize = 136;
const CHKSUM: usize = 148;
const TYPEFLAG: usize = 156;
const MAGIC: usize = 257;
const VERSION: usize = 263;
const UNAME: usize = 265;
const GNAME: usize = 297;

/// Where the wrapped payload lies inside the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TarPayload {
    /// Byte offset of the payload (1536 with PAX, 512 without).
    pub offset: u64,
    /// Payload length in bytes (from the PAX `size` record or the ustar size).
    pub size: u64,
}

/// Header checksum: all 512 bytes with the checksum field counted as spaces.
/// Returns (unsigned sum, signed sum); readers accept either.
fn checksums(h: &[u8]) -> (u64, i64) {
    let mut u = 0u64;
    let mut s = 0i64;
    for (i, &c) in h[..BLOCK as usize].iter().enumerate() {
        let c = if (CHKSUM..CHKSUM + 8).contains(&i) {
            b' '
        } else {
            c
        };
        u += c as u64;
        s += c as i8 as i64;
    }
    (u, s)
}

/// Parses a numeric tar field: octal digits (leading spaces allowed, ended by
/// space or NUL; empty = 0) or GNU base-256 (high bit of the first byte set).
fn parse_numeric(field: &[u8], name: &str) -> Result<u64> {
    if field.first().is_some_and(|&c| c & 0x80 != 0) {
        if field[0] == 0xFF {
            return Err(Error::Tar(format!("{name} field is negative (base-256)")));
        }
        let mut v: u64 = (field[0] & 0x7F) as u64;
        for &c in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(c as u64))
                .ok_or_else(|| Error::Tar(format!("{name} field overflows (base-256)")))?;
        }
        return Ok(v);
    }
    let mut v: u64 = 0;
    let mut i = 0;
    while i < field.len() && field[i] == b' ' {
        i += 1;
    }
    while i < field.len() {
        let c = field[i];
        match c {
            b'0'..=b'7' => {
                v = v
                    .checked_mul(8)
                    .map(|v| v + (c - b'0') as u64)
                    .ok_or_else(|| Error::Tar(format!("{name} field overflows")))?;
            }
            b' ' | 0 => break,
            _ => {
                return Err(Error::Tar(format!(
                    "{name} field {:?} is not octal",
                    String::from_utf8_lossy(field)
                )))
            }
        }
        i += 1;
    }
    Ok(v)
}

fn is_ustar(h: &[u8]) -> bool {
    &h[MAGIC..MAGIC + 5] == b"ustar" && &h[VERSION..VERSION + 2] == b"00"
}

fn name_is(h: &[u8], name: &[u8]) -> bool {
    h[NAME..NAME + name.len()] == *name && h[NAME + name.len()] == 0
}

fn read_block(src: &dyn ReadAt, idx: u64) -> Result<Vec<u8>> {
    let mut b = vec![0u8; BLOCK as usize];
    src.read_exact_at(&mut b, idx * BLOCK)?;
    Ok(b)
}

/// Value of the `size` record in PAX extended-header data.
fn pax_size(data: &[u8]) -> Result<u64> {
    let bad = |why: &str| Error::Tar(format!("malformed PAX record: {why}"));
    let mut size = None;
    let mut pos = 0;
    while pos < data.len() {
        if data[pos..].iter().all(|&c| c == 0) {
            break;
        }
        let rest = &data[pos..];
        let sp = rest
            .iter()
            .take(20)
            .position(|&c| c == b' ')
            .ok_or_else(|| bad("no length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("length is not a decimal number"))?;
        if len <= sp + 1 || len > rest.len() {
            return Err(bad(&format!("length {len} does not fit the data")));
        }
        let rec = &rest[sp + 1..len];
        let Some((&b'\n', body)) = rec.split_last() else {
            return Err(bad("record does not end with a newline"));
        };
        let eq = body
            .iter()
            .position(|&c| c == b'=')
            .ok_or_else(|| bad("no '=' in record"))?;
        if &body[..eq] == b"size" {
            let v = &body[eq + 1..];
            let n = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::Tar(format!(
                        "PAX size record {:?} is not a decimal number",
                        String::from_utf8_lossy(v)
                    ))
                })?;
            size = Some(n);
        }
        pos += len;
    }
    size.ok_or_else(|| Error::Tar("PAX extended header has no size record".into()))
}

/// Detects the tar wrapper. `Some` iff bytes 0..512 are a ustar header with
/// a valid checksum; then the payload location (which must lie inside `src`).
/// `None` for anything else, except upstream's unfinished placeholder
/// ([`Error::TarIncomplete`]). The payload size never comes from the blob size,
/// so extra trailing zero blocks are fine.
pub fn detect(src: &dyn ReadAt) -> Result<Option<TarPayload>> {
    let blob = src.size();
    if blob < BLOCK {
        return Ok(None);
    }
    let h = read_block(src, 0)?;
    if !is_ustar(&h) {
        let placeholder = &h[MAGIC..MAGIC + 5] == b"xxtar"
            || (name_is(&h, b"overlaybd.pax")
                && h[TYPEFLAG] == b'x'
                && blob >= PAYLOAD_OFFSET
                && &read_block(src, 2)?[MAGIC..MAGIC + 5] == b"xxtar");
        return if placeholder {
            Err(Error::TarIncomplete)
        } else {
            Ok(None)
        };
    }
    let stored_field = &h[CHKSUM..CHKSUM + 8];
    let (unsigned, signed) = checksums(&h);
    let stored = parse_numeric(stored_field, "chksum").ok();
    if stored != Some(unsigned) && stored.map(|s| s as i64) != Some(signed) {
        return Err(Error::Tar(format!(
            "ustar header checksum mismatch: stored {}, computed {unsigned:o} (octal)",
            match stored {
                Some(s) => format!("{s:o}"),
                None => format!("{:?}", String::from_utf8_lossy(stored_field)),
            }
        )));
    }
    let payload = match h[TYPEFLAG] {
        b'x' => {
            let pax_len = parse_numeric(&h[SIZE..SIZE + 12], "size")?;
            if pax_len > BLOCK {
                return Err(Error::Tar(format!(
                    "PAX extended header of {pax_len} bytes does not fit in one block"
                )));
            }
            if blob < PAYLOAD_OFFSET {
                return Err(Error::Tar(format!(
                    "blob of {blob} bytes ends inside the 1536-byte wrapper headers"
                )));
            }
            let second = read_block(src, 2)?;
            if &second[MAGIC..MAGIC + 5] == b"xxtar" {
                return Err(Error::TarIncomplete);
            }
            if !is_ustar(&second) {
                return Err(Error::Tar(
                    "no ustar file header follows the PAX extended header".into(),
                ));
            }
            let data = read_block(src, 1)?;
            TarPayload {
                offset: PAYLOAD_OFFSET,
                size: pax_size(&data[..pax_len as usize])?,
            }
        }
        b'0' | 0 | b'7' => TarPayload {
            offset: BLOCK,
            size: parse_numeric(&h[SIZE..SIZE + 12], "size")?,
        },
        t => {
            return Err(Error::Tar(format!(
                "first entry has typeflag {:?}, not a regular file: not an overlaybd tar wrapper",
                t as char
            )))
        }
    };
    match payload.offset.checked_add(payload.size) {
        Some(end) if end <= blob => Ok(Some(payload)),
        _ => Err(Error::Tar(format!(
            "payload of {} bytes at offset {} runs past the end of the {blob}-byte blob",
            payload.size, payload.offset
        ))),
    }
}

/// `%*lo ` + NUL in `n` bytes (libtar `int_to_oct`).
fn put_oct(h: &mut [u8], at: usize, n: usize, v: u64) {
    let s = format!("{:>w$o} ", v, w = n - 2);
    let b = s.as_bytes();
    let k = b.len().min(n - 1);
    h[at..at + k].copy_from_slice(&b[..k]);
    h[at + k] = 0;
}

/// `%*lo` then a space in the last byte, no NUL (libtar `int_to_oct_nonull`).
fn put_oct_nonull(h: &mut [u8], at: usize, n: usize, v: u64) {
    let s = format!("{:>w$o}", v, w = n - 1);
    let b = s.as_bytes();
    let k = b.len().min(n - 1);
    h[at..at + k].copy_from_slice(&b[..k]);
    h[at + n - 1] = b' ';
}

fn put_str(h: &mut [u8], at: usize, s: &[u8]) {
    h[at..at + s.len()].copy_from_slice(s);
}

fn put_checksum(h: &mut [u8]) {
    let (sum, _) = checksums(h);
    put_oct(h, CHKSUM, 8, sum);
}

/// Upstream's PAX record: `"<len> key=value\n"`, the length counting itself.
pub fn pax_record(key: &str, value: &str) -> String {
    let mut size = key.len() + value.len() + 3;
    size += size.to_string().len();
    let record = format!("{size} {key}={value}\n");
    if record.len() == size {
        record
    } else {
        format!("{} {key}={value}\n", record.len())
    }
}

/// The first 1536 bytes of a finished wrapper for a payload of `payload_size`
/// bytes: exactly what upstream writes (mode 100644, uid/gid 0, uname/gname
/// `root`, mtime 0).
pub fn header_blocks(payload_size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAYLOAD_OFFSET as usize];
    let record = pax_record("size", &payload_size.to_string());
    {
        let h = &mut buf[..BLOCK as usize];
        h[TYPEFLAG] = b'x';
        put_str(h, NAME, b"overlaybd.pax");
        put_oct_nonull(h, SIZE, 12, record.len() as u64);
        put_str(h, VERSION, b"00");
        put_str(h, MAGIC, b"ustar\0");
        put_checksum(h);
    }
    put_str(&mut buf, BLOCK as usize, record.as_bytes());
    {
        let h = &mut buf[2 * BLOCK as usize..];
        h[TYPEFLAG] = b'0';
        put_str(h, UNAME, b"root");
        put_oct(h, UID, 8, 0);
        put_str(h, GNAME, b"root");
        put_oct(h, GID, 8, 0);
        put_oct(h, MODE, 8, 0o100644);
        put_oct_nonull(h, MTIME, 12, 0);
        put_oct_nonull(h, SIZE, 12, 0);
        put_str(h, NAME, b"overlaybd.commit");
        put_str(h, VERSION, b"00");
        put_str(h, MAGIC, b"ustar\0");
        put_checksum(h);
    }
    buf
}

/// Upstream's creation placeholder (`mark_new_tar`): a PAX header for size 0
/// without magic or checksum, and a file header `overlaybd.new` with magic
/// `xxtar`. [`detect`] reports it as [`Error::TarIncomplete`].
pub fn placeholder_blocks() -> Vec<u8> {
    let mut buf = vec![0u8; PAYLOAD_OFFSET as usize];
    let record = pax_record("size", "0");
    {
        let h = &mut buf[..BLOCK as usize];
        h[TYPEFLAG] = b'x';
        put_str(h, NAME, b"overlaybd.pax");
        put_oct_nonull(h, SIZE, 12, record.len() as u64);
    }
    put_str(&mut buf, BLOCK as usize, record.as_bytes());
    {
        let h = &mut buf[2 * BLOCK as usize..];
        put_str(h, NAME, b"overlaybd.new");
        put_str(h, VERSION, b"xx");
        put_str(h, MAGIC, b"xxtar\0");
        put_oct_nonull(h, SIZE, 12, 0);
    }
    buf
}

/// Bytes after a payload of `payload_size`: zero padding to 512, then two zero
/// blocks.
pub fn footer(payload_size: u64) -> Vec<u8> {
    let pad = payload_size.next_multiple_of(BLOCK) - payload_size;
    vec![0u8; (pad + 2 * BLOCK) as usize]
}

/// Total wrapper size for a payload of `payload_size` bytes.
pub fn wrapped_size(payload_size: u64) -> u64 {
    PAYLOAD_OFFSET + payload_size.next_multiple_of(BLOCK) + 2 * BLOCK
}

/// Writes a wrapper around a payload streamed by the caller into a seekable sink.
///
/// ```text
/// let tw = TarWriter::begin(&mut f)?;   // 1536 placeholder bytes
/// /* write the payload */
/// tw.finish(&mut f, payload_len)?;      // footer, then the real headers
/// ```
#[derive(Debug)]
pub struct TarWriter {
    start: u64,
}

impl TarWriter {
    /// Writes upstream's placeholder headers at the current position.
    pub fn begin<W: Write + Seek + ?Sized>(w: &mut W) -> Result<TarWriter> {
        let start = w.stream_position()?;
        w.write_all(&placeholder_blocks())?;
        Ok(TarWriter { start })
    }

    /// Offset of the payload in the sink.
    pub fn payload_start(&self) -> u64 {
        self.start + PAYLOAD_OFFSET
    }

    /// Writes the footer after `payload_size` payload bytes, patches both
    /// headers, and leaves the sink positioned at the end. Returns the
    /// wrapper's total size.
    pub fn finish<W: Write + Seek + ?Sized>(self, w: &mut W, payload_size: u64) -> Result<u64> {
        let end = self.payload_start() + payload_size;
        w.seek(SeekFrom::Start(end))?;
        w.write_all(&footer(payload_size))?;
        let total_end = w.stream_position()?;
        w.seek(SeekFrom::Start(self.start))?;
        w.write_all(&header_blocks(payload_size))?;
        w.seek(SeekFrom::Start(total_end))?;
        w.flush()?;
        Ok(total_end - self.start)
    }
}

/// Wraps exactly `size` bytes of `payload` into `out` (sequential writes).
/// Returns the bytes written.
pub fn wrap(mut payload: impl Read, size: u64, mut out: impl Write) -> Result<u64> {
    out.write_all(&header_blocks(size))?;
    let copied = io::copy(&mut (&mut payload).take(size), &mut out)?;
    if copied != size {
        return Err(Error::Tar(format!(
            "payload ended after {copied} of {size} bytes"
        )));
    }
    out.write_all(&footer(size))?;
    out.flush()?;
    Ok(wrapped_size(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths() {
        assert_eq!(pax_record("size", "18363"), "14 size=18363\n");
        assert_eq!(pax_record("size", "0"), "9 size=0\n");
        assert_eq!(pax_record("size", "251500"), "15 size=251500\n");
        // Boundary where the length gains a digit: 3 + 4 + 1 + len(value)...
        for n in [1u64, 9, 99, 999_999, 9_999_999, 99_999_999, u64::MAX] {
            let r = pax_record("size", &n.to_string());
            let (len, _) = r.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "{r:?}");
        }
    }

    #[test]
    fn octal_fields() {
        let mut h = [0u8; 12];
        put_oct_nonull(&mut h, 0, 12, 15);
        assert_eq!(&h, b"         17 ");
        let mut m = [0u8; 8];
        put_oct(&mut m, 0, 8, 0o100644);
        assert_eq!(&m, b"100644 \0");
        assert_eq!(parse_numeric(b"         17 ", "s").unwrap(), 15);
        assert_eq!(parse_numeric(b"\0\0\0\0", "s").unwrap(), 0);
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "s").unwrap(),
            256
        );
        assert!(parse_numeric(b"12x", "s").is_err());
    }

    #[test]
    fn roundtrip_and_placeholder() {
        let payload = vec![7u8; 1000];
        let mut out = Vec::new();
        let n = wrap(&payload[..], 1000, &mut out).unwrap();
        assert_eq!(n, out.len() as u64);
        assert_eq!(n, 1536 + 1024 + 1024);
        let p = detect(&out).unwrap().unwrap();
        assert_eq!(
            p,
            TarPayload {
                offset: 1536,
                size: 1000
            }
        );
        let ph = placeholder_blocks();
        assert!(matches!(detect(&ph), Err(Error::TarIncomplete)));
        assert!(detect(&vec![0u8; 4096]).unwrap().is_none());
    }
}
