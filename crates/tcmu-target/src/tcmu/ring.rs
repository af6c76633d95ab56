//! The TCMU command ring over a shared memory region.
//!
//! [`Ring`] walks the entries the kernel queued between the handler's parse cursor
//! and `cmd_head`, copying each command out ([`Command`]) so the entry may be
//! overwritten afterwards, and writes completions at `cmd_tail` in completion
//! order: the finished command's response goes into the entry at the tail, whose
//! `cmd_id` is rewritten to the finished command's id (out-of-order completion, as
//! libtcmu does). PAD and TMR entries at the tail are stepped over.
//!
//! The region is shared with another party (the kernel, or the simulator in
//! [`super::sim`]): `cmd_head` is read with Acquire and `cmd_tail` written with
//! Release, every other access is a bounds-checked copy, and nothing read from the
//! ring is trusted (bad entries become [`Error::Protocol`] or a [`Defect`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::uapi::{self, ent, mb};
use crate::{Error, Result};

/// A memory region shared with the kernel: the UIO mapping, or a simulated one.
///
/// # Safety
///
/// `as_ptr()` must return the same pointer on every call, valid for reads and
/// writes of `len()` bytes, aligned to at least 8 bytes, for as long as the value
/// lives. The memory may be changed concurrently by another party, so it is only
/// accessed through raw pointers.
pub unsafe trait RingMemory: Send + Sync + 'static {
    /// Start of the region.
    fn as_ptr(&self) -> *mut u8;
    /// Length of the region in bytes.
    fn len(&self) -> usize;
    /// True if the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Heap memory laid out like a UIO mapping, for tests and the simulator.
pub struct HeapMemory {
    // u64 elements give 8-byte alignment; UnsafeCell allows writes through the
    // shared pointers handed out by `as_ptr`.
    buf: Box<[std::cell::UnsafeCell<u64>]>,
    len: usize,
}

// SAFETY: the buffer is only reached through raw pointers from `as_ptr` (bounds-
// checked copies and atomics in `Region`), never through references to its
// contents; sharing it between threads is the point.
unsafe impl Send for HeapMemory {}
// SAFETY: as above.
unsafe impl Sync for HeapMemory {}

impl HeapMemory {
    /// `len` zeroed bytes.
    pub fn new(len: usize) -> Self {
        let buf = (0..len.div_ceil(8))
            .map(|_| std::cell::UnsafeCell::new(0))
            .collect();
        HeapMemory { buf, len }
    }
}

// SAFETY: the pointer covers the whole boxed slice (at least `len` bytes, 8-byte
// aligned), which never moves or shrinks while `self` lives, so every call returns
// the same pointer; its bytes sit in UnsafeCells, so writing through it is allowed.
unsafe impl RingMemory for HeapMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.buf.as_ptr().cast_mut().cast::<u8>()
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// Bounds-checked access to a [`RingMemory`].
#[derive(Clone)]
pub struct Region {
    mem: Arc<dyn RingMemory>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len()).finish()
    }
}

impl Region {
    /// Wraps a memory region.
    pub fn new(mem: Arc<dyn RingMemory>) -> Self {
        Region { mem }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// True if the region is empty.
    pub fn is_empty(&self) -> bool {
        self.mem.len() == 0
    }

    fn check(&self, off: u64, len: usize) -> Result<usize> {
        let end = off.checked_add(len as u64);
        match end {
            Some(end) if end <= self.len() as u64 => Ok(off as usize),
            _ => Err(Error::Protocol(format!(
                "range {off}+{len} is outside the {}-byte ring mapping",
                self.len()
            ))),
        }
    }

    /// Copies `buf.len()` bytes from offset `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.check(off, buf.len())?;
        // SAFETY: `off..off+buf.len()` is inside the region (checked above), and
        // `buf` is a distinct Rust buffer, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.mem.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `data` to offset `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        let off = self.check(off, data.len())?;
        // SAFETY: the destination range is inside the region (checked above) and
        // does not overlap `data`, a Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.mem.as_ptr().add(off), data.len())
        };
        Ok(())
    }

    /// Sets `len` bytes at `off` to `byte`.
    pub fn fill(&self, off: u64, len: usize, byte: u8) -> Result<()> {
        let off = self.check(off, len)?;
        // SAFETY: the range is inside the region (checked above).
        unsafe { std::ptr::write_bytes(self.mem.as_ptr().add(off), byte, len) };
        Ok(())
    }

    /// Reads a native-endian u8.
    pub fn read_u8(&self, off: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(off, &mut b)?;
        Ok(b[0])
    }

    /// Reads a native-endian u16.
    pub fn read_u16(&self, off: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read(off, &mut b)?;
        Ok(u16::from_ne_bytes(b))
    }

    /// Reads a native-endian u32.
    pub fn read_u32(&self, off: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(off, &mut b)?;
        Ok(u32::from_ne_bytes(b))
    }

    /// Reads a native-endian u64.
    pub fn read_u64(&self, off: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(off, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Writes a native-endian u16.
    pub fn write_u16(&self, off: u64, v: u16) -> Result<()> {
        self.write(off, &v.to_ne_bytes())
    }

    /// Writes a native-endian u32.
    pub fn write_u32(&self, off: u64, v: u32) -> Result<()> {
        self.write(off, &v.to_ne_bytes())
    }

    /// Writes a native-endian u64.
    pub fn write_u64(&self, off: u64, v: u64) -> Result<()> {
        self.write(off, &v.to_ne_bytes())
    }

    fn atomic_u32(&self, off: u64) -> Result<&AtomicU32> {
        let off = self.check(off, 4)?;
        if off % 4 != 0 {
            return Err(Error::Protocol(format!("unaligned atomic at {off}")));
        }
        // The region is 8-byte aligned and `off` a multiple of 4; the bytes live as
        // long as `self.mem`, which the returned reference borrows, and this side
        // only accesses them atomically (AtomicU32 has the layout of u32).
        // SAFETY: the 4 bytes at `off` are inside the region and 4-byte aligned.
        Ok(unsafe { &*self.mem.as_ptr().add(off).cast::<AtomicU32>() })
    }

    /// Loads a u32 with Acquire ordering (e.g. `cmd_head`).
    pub fn load_acquire(&self, off: u64) -> Result<u32> {
        Ok(self.atomic_u32(off)?.load(Ordering::Acquire))
    }

    /// Stores a u32 with Release ordering (e.g. `cmd_tail`).
    pub fn store_release(&self, off: u64, v: u32) -> Result<()> {
        self.atomic_u32(off)?.store(v, Ordering::Release);
        Ok(())
    }
}

/// Why a command entry cannot be executed as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Defect {
    /// The CDB lies outside the mapping: the command is failed with `UNKNOWN_OP`.
    BadCdb(String),
    /// An iovec lies outside the data area: the command is failed with CHECK CONDITION.
    BadIovec(String),
}

/// A SCSI command copied out of the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The kernel's id for it.
    pub cmd_id: u16,
    /// The CDB (empty with [`Defect::BadCdb`]).
    pub cdb: Vec<u8>,
    /// Data buffers: data-out contents, or where data-in goes.
    pub iovs: Vec<uapi::Iovec>,
    /// Bidirectional data-in buffers.
    pub bidi_iovs: Vec<uapi::Iovec>,
    /// Set if the entry is malformed.
    pub defect: Option<Defect>,
}

impl Command {
    /// Total length of the data buffers.
    pub fn data_len(&self) -> u64 {
        self.iovs.iter().map(|v| v.len).sum()
    }
}

/// A TMR notification copied out of the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmr {
    /// `uapi::tmr::*`.
    pub tmr_type: u8,
    /// Ids of the commands the TMR aborts.
    pub cmd_ids: Vec<u16>,
}

/// A new ring entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A SCSI command to execute and complete.
    Cmd(Command),
    /// A task-management notification (needs no completion).
    Tmr(Tmr),
}

/// What the handler answers for a command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    /// SCSI status byte.
    pub status: u8,
    /// Sense data (at most 96 bytes are kept), for CHECK CONDITION.
    pub sense: Vec<u8>,
    /// Sets `TCMU_UFLAG_UNKNOWN_OP`: the kernel fails the command itself.
    pub unknown_op: bool,
    /// Sets `TCMU_UFLAG_READ_LEN` with this many bytes read.
    pub read_len: Option<u32>,
}

/// The handler's side of one TCMU command ring.
#[derive(Debug)]
pub struct Ring {
    region: Region,
    cmdr_off: u64,
    cmdr_size: u32,
    data_off: u64,
    /// Next entry to parse (ring offset).
    next: u32,
    /// Local copy of `cmd_tail` (ring offset).
    tail: u32,
    /// Commands parsed and not yet completed.
    outstanding: usize,
}

impl Ring {
    /// Validates the mailbox and starts at its `cmd_tail`: entries between the tail
    /// and `cmd_head` are parsed again (they were never completed).
    pub fn open(region: Region) -> Result<Ring> {
        if region.len() < mb::SIZE {
            return Err(Error::Protocol(format!(
                "ring mapping of {} bytes is smaller than the mailbox",
                region.len()
            )));
        }
        let version = region.read_u16(mb::VERSION as u64)?;
        if version != uapi::TCMU_MAILBOX_VERSION {
            return Err(Error::Unsupported(format!(
                "TCMU mailbox version {version} (this handler speaks {})",
                uapi::TCMU_MAILBOX_VERSION
            )));
        }
        let cmdr_off = u64::from(region.read_u32(mb::CMDR_OFF as u64)?);
        let cmdr_size = region.read_u32(mb::CMDR_SIZE as u64)?;
        let data_off = cmdr_off + u64::from(cmdr_size);
        if cmdr_off < mb::SIZE as u64
            || cmdr_off % 8 != 0
            || cmdr_size < ent::SIZE as u32
            || cmdr_size % 8 != 0
            || data_off > region.len() as u64
        {
            return Err(Error::Protocol(format!(
                "bad mailbox: cmdr_off {cmdr_off}, cmdr_size {cmdr_size}, mapping {} bytes",
                region.len()
            )));
        }
        let tail = region.load_acquire(mb::CMD_TAIL as u64)?;
        if tail >= cmdr_size || tail % 8 != 0 {
            return Err(Error::Protocol(format!(
                "bad cmd_tail {tail} (ring size {cmdr_size})"
            )));
        }
        Ok(Ring {
            region,
            cmdr_off,
            cmdr_size,
            data_off,
            next: tail,
            tail,
            outstanding: 0,
        })
    }

    /// The shared region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Ring size in bytes.
    pub fn cmdr_size(&self) -> u32 {
        self.cmdr_size
    }

    /// Offset of the data area in the mapping.
    pub fn data_off(&self) -> u64 {
        self.data_off
    }

    /// The current `cmd_tail` (ring offset).
    pub fn tail(&self) -> u32 {
        self.tail
    }

    /// The next entry to be parsed (ring offset).
    pub fn parse_cursor(&self) -> u32 {
        self.next
    }

    /// Commands parsed and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The kernel's `cmd_head`, validated.
    pub fn head(&self) -> Result<u32> {
        let head = self.region.load_acquire(mb::CMD_HEAD as u64)?;
        if head >= self.cmdr_size || head % 8 != 0 {
            return Err(Error::Protocol(format!(
                "bad cmd_head {head} (ring size {})",
                self.cmdr_size
            )));
        }
        Ok(head)
    }

    /// The mailbox's `cmd_tail` as stored (ring offset).
    pub fn mailbox_tail(&self) -> Result<u32> {
        self.region.load_acquire(mb::CMD_TAIL as u64)
    }

    fn entry_addr(&self, at: u32) -> u64 {
        self.cmdr_off + u64::from(at)
    }

    /// Reads and checks the header at ring offset `at`, which must lie before `limit`
    /// (walking forward from `at`). Returns (len, op).
    fn header(&self, at: u32, limit: u32) -> Result<(u32, u32)> {
        let len_op = self.region.read_u32(self.entry_addr(at))?;
        let (len, op) = (uapi::hdr_len(len_op), uapi::hdr_op(len_op));
        let avail = if limit > at {
            limit - at
        } else {
            self.cmdr_size - at + limit
        };
        if len == 0 || u64::from(at) + u64::from(len) > u64::from(self.cmdr_size) || len > avail {
            return Err(Error::Protocol(format!(
                "ring entry at {at} has length {len} (op {op}; ring size {}, {avail} bytes queued)",
                self.cmdr_size
            )));
        }
        Ok((len, op))
    }

    fn advance(&self, at: u32, len: u32) -> u32 {
        let n = at + len;
        if n == self.cmdr_size {
            0
        } else {
            n
        }
    }

    /// Parses every entry the kernel queued since the last call. PAD entries are
    /// skipped; PAD and TMR entries at the tail are released at once.
    ///
    /// An error means the ring itself is corrupt (an entry header out of bounds);
    /// per-command problems are reported in [`Command::defect`] instead.
    pub fn poll(&mut self) -> Result<Vec<Request>> {
        let head = self.head()?;
        let mut out = Vec::new();
        while self.next != head {
            let at = self.next;
            let (len, op) = self.header(at, head)?;
            match op {
                uapi::TCMU_OP_PAD => {}
                uapi::TCMU_OP_CMD => {
                    out.push(Request::Cmd(self.parse_cmd(at, len)?));
                    self.outstanding += 1;
                }
                uapi::TCMU_OP_TMR => out.push(Request::Tmr(self.parse_tmr(at, len)?)),
                _ => {
                    return Err(Error::Protocol(format!(
                        "ring entry at {at} has unknown opcode {op}"
                    )))
                }
            }
            self.next = self.advance(at, len);
        }
        Ok(out)
    }

    fn parse_cmd(&self, at: u32, len: u32) -> Result<Command> {
        let base = self.entry_addr(at);
        let cmd_id = self.region.read_u16(base + ent::CMD_ID as u64)?;
        let mut cmd = Command {
            cmd_id,
            cdb: Vec::new(),
            iovs: Vec::new(),
            bidi_iovs: Vec::new(),
            defect: None,
        };
        if (len as usize) < ent::SIZE {
            cmd.defect = Some(Defect::BadCdb(format!(
                "command entry of {len} bytes is shorter than {}",
                ent::SIZE
            )));
            return Ok(cmd);
        }
        let iov_cnt = u64::from(self.region.read_u32(base + ent::IOV_CNT as u64)?);
        let bidi_cnt = u64::from(self.region.read_u32(base + ent::IOV_BIDI_CNT as u64)?);
        let dif_cnt = u64::from(self.region.read_u32(base + ent::IOV_DIF_CNT as u64)?);
        let cdb_off = self.region.read_u64(base + ent::CDB_OFF as u64)?;
        let n_iov = iov_cnt + bidi_cnt + dif_cnt;
        if ent::IOV as u64 + n_iov * ent::IOVEC_SIZE as u64 > u64::from(len) {
            cmd.defect = Some(Defect::BadIovec(format!(
                "{n_iov} iovecs do not fit a {len}-byte entry"
            )));
        } else {
            for i in 0..(iov_cnt + bidi_cnt) {
                let at = base + ent::IOV as u64 + i * ent::IOVEC_SIZE as u64;
                let v = uapi::Iovec {
                    base: self.region.read_u64(at)?,
                    len: self.region.read_u64(at + 8)?,
                };
                let end = v.base.checked_add(v.len);
                if v.base < self.data_off || end.is_none_or(|e| e > self.region.len() as u64) {
                    cmd.defect = Some(Defect::BadIovec(format!(
                        "iovec {}+{} is outside the data area {}..{}",
                        v.base,
                        v.len,
                        self.data_off,
                        self.region.len()
                    )));
                    cmd.iovs.clear();
                    cmd.bidi_iovs.clear();
                    break;
                }
                if i < iov_cnt {
                    cmd.iovs.push(v);
                } else {
                    cmd.bidi_iovs.push(v);
                }
            }
            // Each buffer is a distinct part of the data area, so together they
            // cannot exceed it (this bounds what the handler allocates).
            let total: u128 = cmd
                .iovs
                .iter()
                .chain(&cmd.bidi_iovs)
                .map(|v| u128::from(v.len))
                .sum();
            if total > u128::from(self.region.len() as u64 - self.data_off) {
                cmd.defect = Some(Defect::BadIovec(format!(
                    "iovecs of {total} bytes exceed the data area"
                )));
                cmd.iovs.clear();
                cmd.bidi_iovs.clear();
            }
        }
        // The CDB: its length follows from the opcode (and, for variable-length
        // CDBs, from byte 7).
        let mut head = [0u8; 8];
        if self.region.read(cdb_off, &mut head).is_err() {
            cmd.defect = Some(Defect::BadCdb(format!(
                "cdb_off {cdb_off} is outside the mapping"
            )));
            return Ok(cmd);
        }
        let size = uapi::scsi_command_size(head[0], head[7]);
        let mut cdb = vec![0u8; size];
        if self.region.read(cdb_off, &mut cdb).is_err() {
            cmd.defect = Some(Defect::BadCdb(format!(
                "{size}-byte CDB at {cdb_off} is outside the mapping"
            )));
            return Ok(cmd);
        }
        cmd.cdb = cdb;
        Ok(cmd)
    }

    fn parse_tmr(&self, at: u32, len: u32) -> Result<Tmr> {
        let base = self.entry_addr(at);
        if (len as usize) < ent::TMR_SIZE {
            return Ok(Tmr {
                tmr_type: uapi::tmr::UNKNOWN,
                cmd_ids: Vec::new(),
            });
        }
        let tmr_type = self.region.read_u8(base + ent::TMR_TYPE as u64)?;
        let cnt = self.region.read_u32(base + ent::TMR_CMD_CNT as u64)?;
        let fit = (len as usize - ent::TMR_SIZE) / 2;
        let n = (cnt as usize).min(fit);
        let mut cmd_ids = Vec::with_capacity(n);
        for i in 0..n {
            cmd_ids.push(
                self.region
                    .read_u16(base + (ent::TMR_CMD_IDS + 2 * i) as u64)?,
            );
        }
        Ok(Tmr { tmr_type, cmd_ids })
    }

    /// Steps the tail over PAD and TMR entries (they need no completion). Returns
    /// true if the tail moved; the caller publishes it with [`Ring::publish_tail`].
    fn skip_non_cmds(&mut self) -> Result<bool> {
        let mut moved = false;
        while self.tail != self.next {
            let (len, op) = self.header(self.tail, self.next)?;
            if op == uapi::TCMU_OP_CMD {
                break;
            }
            self.tail = self.advance(self.tail, len);
            moved = true;
        }
        Ok(moved)
    }

    fn publish_tail(&self) -> Result<()> {
        self.region.store_release(mb::CMD_TAIL as u64, self.tail)
    }

    /// Releases PAD and TMR entries at the tail. Returns true if `cmd_tail` moved
    /// (the kernel should then be kicked).
    pub fn release_non_cmds(&mut self) -> Result<bool> {
        let moved = self.skip_non_cmds()?;
        if moved {
            self.publish_tail()?;
        }
        Ok(moved)
    }

    /// Completes command `cmd_id`: writes `rsp` into the command entry at the tail,
    /// rewriting its `cmd_id`, and advances `cmd_tail` (Release). Commands may
    /// complete in any order. The caller kicks the kernel afterwards.
    pub fn complete(&mut self, cmd_id: u16, rsp: &Response) -> Result<()> {
        if self.outstanding == 0 {
            return Err(Error::Protocol(format!(
                "completion of command {cmd_id} with no command outstanding"
            )));
        }
        self.skip_non_cmds()?;
        if self.tail == self.next {
            return Err(Error::Protocol(format!(
                "completion of command {cmd_id}: no parsed command entry at the tail"
            )));
        }
        let (len, _) = self.header(self.tail, self.next)?;
        let base = self.entry_addr(self.tail);
        let r = &self.region;
        r.write_u16(base + ent::CMD_ID as u64, cmd_id)?;
        let mut uflags = 0u8;
        if rsp.unknown_op {
            uflags |= uapi::TCMU_UFLAG_UNKNOWN_OP;
        }
        if rsp.read_len.is_some() {
            uflags |= uapi::TCMU_UFLAG_READ_LEN;
        }
        r.write(base + ent::UFLAGS as u64, &[uflags])?;
        r.write(base + ent::SCSI_STATUS as u64, &[rsp.status, 0, 0, 0])?;
        r.write_u32(base + ent::READ_LEN as u64, rsp.read_len.unwrap_or(0))?;
        let mut sense = [0u8; uapi::TCMU_SENSE_BUFFERSIZE];
        let n = rsp.sense.len().min(sense.len());
        sense[..n].copy_from_slice(&rsp.sense[..n]);
        r.write(base + ent::SENSE as u64, &sense)?;
        self.tail = self.advance(self.tail, len);
        self.outstanding -= 1;
        // PAD/TMR entries right behind are released in the same step.
        self.skip_non_cmds()?;
        self.publish_tail()
    }

    /// Copies the data-out bytes of `cmd` (its iovecs, in order).
    pub fn gather(&self, iovs: &[uapi::Iovec]) -> Result<Vec<u8>> {
        gather(&self.region, iovs)
    }
}

/// Copies the bytes of `iovs`, in order, out of `region`.
pub fn gather(region: &Region, iovs: &[uapi::Iovec]) -> Result<Vec<u8>> {
    let total: u64 = iovs.iter().map(|v| v.len).sum();
    let mut out = vec![0u8; usize::try_from(total).map_err(|_| too_big(total))?];
    let mut pos = 0usize;
    for v in iovs {
        let n = v.len as usize;
        region.read(v.base, &mut out[pos..pos + n])?;
        pos += n;
    }
    Ok(out)
}

/// Copies `data` into `iovs` in order and zero-fills what is left of them.
pub fn scatter(region: &Region, iovs: &[uapi::Iovec], data: &[u8]) -> Result<()> {
    let mut pos = 0usize;
    for v in iovs {
        let n = usize::try_from(v.len).map_err(|_| too_big(v.len))?;
        let take = n.min(data.len().saturating_sub(pos));
        region.write(v.base, &data[pos..pos + take])?;
        if take < n {
            region.fill(v.base + take as u64, n - take, 0)?;
        }
        pos += take;
    }
    Ok(())
}

fn too_big(n: u64) -> Error {
    Error::Protocol(format!("iovec length {n} does not fit in memory"))
}
