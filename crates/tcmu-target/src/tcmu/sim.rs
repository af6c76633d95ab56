//! A user-space model of the kernel's side of a TCMU ring, for tests.
//!
//! [`KernelSim`] lays out memory exactly as `target_core_user.c` does (mailbox at 0,
//! command ring at `cmdr_off`, data area after it in page-sized blocks), queues
//! commands like `queue_cmd_ring` (PAD to the end of the ring when an entry does
//! not fit, iovecs coalesced over contiguous blocks, CDB after the base entry), and
//! reaps completions like `tcmu_handle_completions` (PAD/TMR skipped, each entry's
//! `cmd_id` looked up, an unknown id breaks the ring).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use zfile::sync::{recover, MutexExt};

use super::ring::{HeapMemory, Region};
use super::server::Doorbell;
use super::uapi::{self, ent, mb};
use crate::{Error, Result};

/// Data transfer of a simulated command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// No data.
    None,
    /// Data-out bytes, copied into the data area.
    ToDevice(Vec<u8>),
    /// A data-in buffer of this many bytes.
    FromDevice(usize),
}

/// A completion the simulated kernel reaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimCompletion {
    /// The command's id.
    pub cmd_id: u16,
    /// SCSI status.
    pub status: u8,
    /// The 96-byte sense buffer.
    pub sense: Vec<u8>,
    /// `uflags` of the entry.
    pub uflags: u8,
    /// Data-in bytes (honouring `READ_LEN`), for data-in commands.
    pub data_in: Vec<u8>,
}

struct SimCmd {
    blocks: Vec<usize>,
    dir: DataDir,
}

/// The kernel side of a simulated TCMU ring.
pub struct KernelSim {
    region: Region,
    cmdr_off: u32,
    cmdr_size: u32,
    data_off: u64,
    block_size: usize,
    head: u32,
    last_cleaned: u32,
    free: BTreeSet<usize>,
    commands: BTreeMap<u16, SimCmd>,
    doorbell: Option<Arc<SimDoorbell>>,
    /// Allocate data blocks from the highest free one down, so multi-block
    /// buffers are split into one iovec per block.
    pub scatter_blocks: bool,
}

/// Why the simulated kernel could not queue a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// Not enough ring space (the kernel would queue it internally).
    RingFull,
    /// Not enough data-area blocks.
    DataFull,
    /// No free command id.
    NoId,
}

impl KernelSim {
    /// A ring of `cmdr_size` bytes (multiple of 8) and `data_blocks` 4 KiB data blocks.
    pub fn new(cmdr_size: u32, data_blocks: usize) -> Self {
        assert!(cmdr_size % 8 == 0 && cmdr_size as usize >= ent::SIZE);
        let block_size = 4096;
        let cmdr_off = mb::SIZE as u32;
        let data_off = u64::from(cmdr_off) + u64::from(cmdr_size);
        let len = data_off as usize + data_blocks * block_size;
        let region = Region::new(Arc::new(HeapMemory::new(len)));
        let sim = KernelSim {
            region,
            cmdr_off,
            cmdr_size,
            data_off,
            block_size,
            head: 0,
            last_cleaned: 0,
            free: (0..data_blocks).collect(),
            commands: BTreeMap::new(),
            doorbell: None,
            scatter_blocks: false,
        };
        let r = &sim.region;
        let init = || -> Result<()> {
            r.write_u16(mb::VERSION as u64, uapi::TCMU_MAILBOX_VERSION)?;
            r.write_u16(
                mb::FLAGS as u64,
                uapi::TCMU_MAILBOX_FLAG_CAP_OOOC
                    | uapi::TCMU_MAILBOX_FLAG_CAP_READ_LEN
                    | uapi::TCMU_MAILBOX_FLAG_CAP_TMR
                    | uapi::TCMU_MAILBOX_FLAG_CAP_KEEP_BUF,
            )?;
            r.write_u32(mb::CMDR_OFF as u64, cmdr_off)?;
            r.write_u32(mb::CMDR_SIZE as u64, cmdr_size)?;
            r.store_release(mb::CMD_HEAD as u64, 0)?;
            r.store_release(mb::CMD_TAIL as u64, 0)
        };
        init().expect("mailbox fits the region");
        sim
    }

    /// Starts the ring at ring offset `pos` (head = tail = `pos`), to test wrap-around.
    pub fn set_position(&mut self, pos: u32) {
        assert!(pos % 8 == 0 && pos < self.cmdr_size && self.commands.is_empty());
        self.head = pos;
        self.last_cleaned = pos;
        let _ = self.region.store_release(mb::CMD_HEAD as u64, pos);
        let _ = self.region.store_release(mb::CMD_TAIL as u64, pos);
    }

    /// Rings `doorbell` (like `uio_event_notify`) whenever something is queued.
    pub fn connect(&mut self, doorbell: Arc<SimDoorbell>) {
        self.doorbell = Some(doorbell);
    }

    /// The shared memory.
    pub fn region(&self) -> Region {
        self.region.clone()
    }

    /// The kernel's `cmd_head`.
    pub fn head(&self) -> u32 {
        self.head
    }

    /// The handler's `cmd_tail` as last published.
    pub fn tail(&self) -> u32 {
        self.region.load_acquire(mb::CMD_TAIL as u64).unwrap_or(0)
    }

    /// Commands queued and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.commands.len()
    }

    /// Ring bytes from `head` to the end.
    fn head_to_end(&self) -> u32 {
        self.cmdr_size - self.head
    }

    fn space_free(&self) -> u32 {
        let used = if self.head >= self.last_cleaned {
            self.head - self.last_cleaned
        } else {
            self.cmdr_size - self.last_cleaned + self.head
        };
        self.cmdr_size - used - 1
    }

    fn ring_space_avail(&self, cmd_size: u32) -> bool {
        let needed = if self.head_to_end() >= cmd_size {
            cmd_size
        } else {
            cmd_size + self.head_to_end()
        };
        self.space_free() >= needed
    }

    fn insert_padding(&mut self, cmd_size: u32) -> Result<()> {
        if self.head_to_end() < cmd_size {
            let pad = self.head_to_end();
            let at = u64::from(self.cmdr_off + self.head);
            self.region
                .write_u32(at, uapi::make_len_op(pad, uapi::TCMU_OP_PAD))?;
            self.region.write(at + 4, &[0, 0, 0, 0])?;
            self.head = 0;
            self.region.store_release(mb::CMD_HEAD as u64, 0)?;
        }
        Ok(())
    }

    fn alloc_id(&self) -> Option<u16> {
        (1..=u16::MAX).find(|id| !self.commands.contains_key(id))
    }

    fn alloc_blocks(&mut self, n: usize) -> Option<Vec<usize>> {
        if self.free.len() < n {
            return None;
        }
        let picked: Vec<usize> = if self.scatter_blocks {
            self.free.iter().rev().take(n).copied().collect()
        } else {
            self.free.iter().take(n).copied().collect()
        };
        for b in &picked {
            self.free.remove(b);
        }
        Some(picked)
    }

    fn iovecs(&self, blocks: &[usize], mut len: usize) -> Vec<uapi::Iovec> {
        let mut out: Vec<uapi::Iovec> = Vec::new();
        let mut prev: Option<usize> = None;
        for &b in blocks {
            let n = len.min(self.block_size);
            len -= n;
            match (prev, out.last_mut()) {
                (Some(p), Some(last)) if b == p + 1 => last.len += n as u64,
                _ => out.push(uapi::Iovec {
                    base: self.data_off + (b * self.block_size) as u64,
                    len: n as u64,
                }),
            }
            prev = Some(b);
        }
        out
    }

    /// Queues a command like `queue_cmd_ring` and rings the doorbell. Returns its id.
    pub fn submit(&mut self, cdb: &[u8], dir: DataDir) -> std::result::Result<u16, QueueError> {
        let data_len = match &dir {
            DataDir::None => 0,
            DataDir::ToDevice(d) => d.len(),
            DataDir::FromDevice(n) => *n,
        };
        let nblocks = data_len.div_ceil(self.block_size);
        let blocks = self.alloc_blocks(nblocks).ok_or(QueueError::DataFull)?;
        let iovs = self.iovecs(&blocks, data_len);
        let base = uapi::base_cmd_entry_size(iovs.len());
        let cmd_size = uapi::cmd_entry_size(iovs.len(), cdb.len()) as u32;
        let give_back = |s: &mut Self, blocks: &[usize]| s.free.extend(blocks.iter().copied());
        if cmd_size > self.cmdr_size / 2 || !self.ring_space_avail(cmd_size) {
            give_back(self, &blocks);
            return Err(QueueError::RingFull);
        }
        let Some(cmd_id) = self.alloc_id() else {
            give_back(self, &blocks);
            return Err(QueueError::NoId);
        };
        self.write_cmd(cmd_id, cdb, &dir, &iovs, base, cmd_size)
            .expect("simulated entry fits the region");
        self.commands.insert(cmd_id, SimCmd { blocks, dir });
        self.notify();
        Ok(cmd_id)
    }

    fn write_cmd(
        &mut self,
        cmd_id: u16,
        cdb: &[u8],
        dir: &DataDir,
        iovs: &[uapi::Iovec],
        base: usize,
        cmd_size: u32,
    ) -> Result<()> {
        self.insert_padding(cmd_size)?;
        let r = self.region.clone();
        let at = u64::from(self.cmdr_off + self.head);
        r.fill(at, cmd_size as usize, 0)?;
        if let DataDir::ToDevice(data) = dir {
            let mut pos = 0usize;
            for v in iovs {
                r.write(v.base, &data[pos..pos + v.len as usize])?;
                pos += v.len as usize;
            }
        }
        r.write_u32(at + ent::IOV_CNT as u64, iovs.len() as u32)?;
        for (i, v) in iovs.iter().enumerate() {
            let o = at + (ent::IOV + i * ent::IOVEC_SIZE) as u64;
            r.write_u64(o, v.base)?;
            r.write_u64(o + 8, v.len)?;
        }
        r.write_u16(at + ent::CMD_ID as u64, cmd_id)?;
        r.write_u32(at, uapi::make_len_op(cmd_size, uapi::TCMU_OP_CMD))?;
        let cdb_off = at + base as u64;
        r.write(cdb_off, cdb)?;
        r.write_u64(at + ent::CDB_OFF as u64, cdb_off)?;
        self.head = (self.head + cmd_size) % self.cmdr_size;
        r.store_release(mb::CMD_HEAD as u64, self.head)
    }

    /// Queues a TMR entry (like `queue_tmr_ring`).
    pub fn submit_tmr(
        &mut self,
        tmr_type: u8,
        cmd_ids: &[u16],
    ) -> std::result::Result<(), QueueError> {
        let size = (ent::TMR_SIZE + 2 * cmd_ids.len()).div_ceil(8) * 8;
        let size = size as u32;
        if !self.ring_space_avail(size) {
            return Err(QueueError::RingFull);
        }
        let res = (|| -> Result<()> {
            self.insert_padding(size)?;
            let r = self.region.clone();
            let at = u64::from(self.cmdr_off + self.head);
            r.fill(at, size as usize, 0)?;
            r.write_u32(at, uapi::make_len_op(size, uapi::TCMU_OP_TMR))?;
            r.write(at + ent::TMR_TYPE as u64, &[tmr_type])?;
            r.write_u32(at + ent::TMR_CMD_CNT as u64, cmd_ids.len() as u32)?;
            for (i, id) in cmd_ids.iter().enumerate() {
                r.write_u16(at + (ent::TMR_CMD_IDS + 2 * i) as u64, *id)?;
            }
            self.head = (self.head + size) % self.cmdr_size;
            r.store_release(mb::CMD_HEAD as u64, self.head)
        })();
        res.expect("simulated TMR fits the region");
        self.notify();
        Ok(())
    }

    /// Writes raw bytes at a ring offset and moves the head past them: for
    /// corrupt-ring tests.
    pub fn push_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let at = u64::from(self.cmdr_off + self.head);
        self.region.write(at, bytes)?;
        self.head = (self.head + bytes.len() as u32) % self.cmdr_size;
        self.region.store_release(mb::CMD_HEAD as u64, self.head)?;
        self.notify();
        Ok(())
    }

    fn notify(&self) {
        if let Some(d) = &self.doorbell {
            d.ring();
        }
    }

    /// Consumes completed entries up to `cmd_tail`, like `tcmu_handle_completions`.
    ///
    /// An entry whose `cmd_id` is not in flight is an error ("ring is broken").
    pub fn reap(&mut self) -> Result<Vec<SimCompletion>> {
        let tail = self.region.load_acquire(mb::CMD_TAIL as u64)?;
        if tail >= self.cmdr_size || tail % 8 != 0 {
            return Err(Error::Protocol(format!(
                "handler wrote a bad cmd_tail {tail}"
            )));
        }
        let mut out = Vec::new();
        let r = self.region.clone();
        while self.last_cleaned != tail {
            let at = u64::from(self.cmdr_off + self.last_cleaned);
            let len_op = r.read_u32(at)?;
            let len = uapi::hdr_len(len_op);
            if len == 0 || self.last_cleaned + len > self.cmdr_size {
                return Err(Error::Protocol(format!("bad entry length {len} at tail")));
            }
            let op = uapi::hdr_op(len_op);
            if op == uapi::TCMU_OP_CMD {
                let cmd_id = r.read_u16(at + ent::CMD_ID as u64)?;
                let Some(cmd) = self.commands.remove(&cmd_id) else {
                    return Err(Error::Protocol(format!(
                        "cmd_id {cmd_id} not found, ring is broken"
                    )));
                };
                let uflags = r.read_u8(at + ent::UFLAGS as u64)?;
                let status = r.read_u8(at + ent::SCSI_STATUS as u64)?;
                let read_len = r.read_u32(at + ent::READ_LEN as u64)?;
                let mut sense = vec![0u8; uapi::TCMU_SENSE_BUFFERSIZE];
                r.read(at + ent::SENSE as u64, &mut sense)?;
                let mut data_in = Vec::new();
                if let DataDir::FromDevice(n) = cmd.dir {
                    let mut n = n;
                    if uflags & uapi::TCMU_UFLAG_READ_LEN != 0 && read_len != 0 {
                        n = n.min(read_len as usize);
                    }
                    let iovs = self.iovecs(&cmd.blocks, n);
                    data_in = super::ring::gather(&r, &iovs)?;
                }
                self.free.extend(cmd.blocks.iter().copied());
                out.push(SimCompletion {
                    cmd_id,
                    status,
                    sense,
                    uflags,
                    data_in,
                });
            }
            self.last_cleaned = (self.last_cleaned + len) % self.cmdr_size;
        }
        Ok(out)
    }
}

/// A doorbell between a [`KernelSim`] and a handler, in place of the UIO fd.
#[derive(Default)]
pub struct SimDoorbell {
    state: Mutex<SimBell>,
    cv: Condvar,
}

#[derive(Default)]
struct SimBell {
    events: u64,
    seen: u64,
    kicks: u64,
    interrupted: bool,
}

impl SimDoorbell {
    /// A new doorbell.
    pub fn new() -> Arc<Self> {
        Arc::new(SimDoorbell::default())
    }

    /// The kernel side: new entries were queued.
    pub fn ring(&self) {
        let mut s = self.state.locked();
        s.events += 1;
        self.cv.notify_all();
    }

    /// How often the handler kicked.
    pub fn kicks(&self) -> u64 {
        self.state.locked().kicks
    }

    /// Waits until the handler has kicked more than `n` times in total.
    pub fn wait_kicks(&self, n: u64, timeout: Duration) -> bool {
        let s = self.state.locked();
        let (s, _) = recover(self.cv.wait_timeout_while(s, timeout, |s| s.kicks <= n));
        s.kicks > n
    }
}

impl Doorbell for SimDoorbell {
    fn wait(&self, timeout: Duration) -> Result<bool> {
        let s = self.state.locked();
        let (mut s, _) = recover(
            self.cv
                .wait_timeout_while(s, timeout, |s| s.events == s.seen && !s.interrupted),
        );
        if s.interrupted {
            return Ok(false);
        }
        s.seen = s.events;
        Ok(true)
    }

    fn kick(&self) -> Result<()> {
        let mut s = self.state.locked();
        s.kicks += 1;
        self.cv.notify_all();
        Ok(())
    }

    fn interrupt(&self) {
        let mut s = self.state.locked();
        s.interrupted = true;
        self.cv.notify_all();
    }
}
