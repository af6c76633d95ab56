//! `<linux/target_core_user.h>`, mirrored by hand (there is no crate for it).
//!
//! The structs document the layout and back the layout tests; the ring code
//! reads and writes the shared memory field by field at the `*_OFF` offsets
//! below (the memory is shared with the kernel, so it never forms references to
//! these structs over it). All integers are native-endian.

/// `TCMU_VERSION` of the header (the UIO device's `version` attribute is the
/// mailbox version, "2").
pub const TCMU_VERSION: &str = "2.0";
/// `TCMU_MAILBOX_VERSION`: the only mailbox layout this module understands.
pub const TCMU_MAILBOX_VERSION: u16 = 2;
/// Alignment of `tcmu_mailbox::cmd_tail` (its own cache line).
pub const ALIGN_SIZE: usize = 64;

/// Mailbox flag: out-of-order completion.
pub const TCMU_MAILBOX_FLAG_CAP_OOOC: u16 = 1 << 0;
/// Mailbox flag: `rsp.read_len` is honoured (with `TCMU_UFLAG_READ_LEN`).
pub const TCMU_MAILBOX_FLAG_CAP_READ_LEN: u16 = 1 << 1;
/// Mailbox flag: TMR entries may appear in the ring.
pub const TCMU_MAILBOX_FLAG_CAP_TMR: u16 = 1 << 2;
/// Mailbox flag: `TCMU_UFLAG_KEEP_BUF` is supported.
pub const TCMU_MAILBOX_FLAG_CAP_KEEP_BUF: u16 = 1 << 3;

/// Entry opcode: padding up to the end of the ring.
pub const TCMU_OP_PAD: u32 = 0;
/// Entry opcode: a SCSI command.
pub const TCMU_OP_CMD: u32 = 1;
/// Entry opcode: a task-management notification.
pub const TCMU_OP_TMR: u32 = 2;
/// The opcode bits of `len_op`.
pub const TCMU_OP_MASK: u32 = 0x7;
/// Entries are 8-byte aligned.
pub const TCMU_OP_ALIGN_SIZE: usize = 8;

/// `uflags`: the handler did not know the opcode (the kernel fails the command).
pub const TCMU_UFLAG_UNKNOWN_OP: u8 = 0x1;
/// `uflags`: `rsp.read_len` holds the number of bytes read.
pub const TCMU_UFLAG_READ_LEN: u8 = 0x2;
/// `uflags`: keep the data buffer after completion.
pub const TCMU_UFLAG_KEEP_BUF: u8 = 0x4;

/// Size of `rsp.sense_buffer`.
pub const TCMU_SENSE_BUFFERSIZE: usize = 96;

/// TMR types (`tcmu_tmr_entry::tmr_type`).
pub mod tmr {
    /// Unknown TMR.
    pub const UNKNOWN: u8 = 0;
    /// ABORT TASK.
    pub const ABORT_TASK: u8 = 1;
    /// ABORT TASK SET.
    pub const ABORT_TASK_SET: u8 = 2;
    /// CLEAR ACA.
    pub const CLEAR_ACA: u8 = 3;
    /// CLEAR TASK SET.
    pub const CLEAR_TASK_SET: u8 = 4;
    /// LOGICAL UNIT RESET.
    pub const LUN_RESET: u8 = 5;
    /// TARGET WARM RESET.
    pub const TARGET_WARM_RESET: u8 = 6;
    /// TARGET COLD RESET.
    pub const TARGET_COLD_RESET: u8 = 7;
    /// Pseudo reset caused by a PR OUT.
    pub const LUN_RESET_PRO: u8 = 128;
}

/// `struct tcmu_mailbox` (at offset 0 of the mapping).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
pub struct TcmuMailbox {
    /// Mailbox layout version (2).
    pub version: u16,
    /// `TCMU_MAILBOX_FLAG_*`.
    pub flags: u16,
    /// Offset of the command ring in the mapping.
    pub cmdr_off: u32,
    /// Size of the command ring in bytes.
    pub cmdr_size: u32,
    /// Written by the kernel: the end of the queued entries.
    pub cmd_head: u32,
    /// Padding: `cmd_tail` is on its own cache line.
    pub pad: [u8; 48],
    /// Written by the handler: the end of the completed entries.
    pub cmd_tail: u32,
}

/// `struct tcmu_cmd_entry_hdr`.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcmuCmdEntryHdr {
    /// Entry length (multiple of 8) | opcode (low 3 bits).
    pub len_op: u32,
    /// Command id (1..=0xffff for commands).
    pub cmd_id: u16,
    /// Flags from the kernel.
    pub kflags: u8,
    /// Flags from the handler (`TCMU_UFLAG_*`).
    pub uflags: u8,
}

/// `struct iovec` as the ring stores it: `base` is an offset into the mapping.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Iovec {
    /// Offset of the buffer from the start of the mapping.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `tcmu_cmd_entry.req`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcmuReq {
    /// Number of data iovecs.
    pub iov_cnt: u32,
    /// Number of bidirectional (data-in) iovecs after them.
    pub iov_bidi_cnt: u32,
    /// Number of DIF iovecs (unused by the kernel).
    pub iov_dif_cnt: u32,
    /// Offset of the CDB in the mapping.
    pub cdb_off: u64,
    /// Reserved.
    pub pad1: u64,
    /// Reserved.
    pub pad2: u64,
    /// `struct iovec iov[]` follows.
    pub iov: [Iovec; 0],
}

/// `tcmu_cmd_entry.rsp`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TcmuRsp {
    /// SCSI status byte.
    pub scsi_status: u8,
    /// Reserved.
    pub pad1: u8,
    /// Reserved.
    pub pad2: u16,
    /// Bytes read, with `TCMU_UFLAG_READ_LEN`.
    pub read_len: u32,
    /// Sense data, with CHECK CONDITION.
    pub sense_buffer: [u8; TCMU_SENSE_BUFFERSIZE],
}

/// The union of `tcmu_cmd_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union TcmuCmdEntryBody {
    /// The request, as the kernel writes it.
    pub req: TcmuReq,
    /// The response, as the handler writes it over the request.
    pub rsp: TcmuRsp,
}

/// `struct tcmu_cmd_entry`.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct TcmuCmdEntry {
    /// Common header.
    pub hdr: TcmuCmdEntryHdr,
    /// Request or response.
    pub body: TcmuCmdEntryBody,
}

/// `struct tcmu_tmr_entry`.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcmuTmrEntry {
    /// Common header.
    pub hdr: TcmuCmdEntryHdr,
    /// `tmr::*`.
    pub tmr_type: u8,
    /// Reserved.
    pub pad1: u8,
    /// Reserved.
    pub pad2: u16,
    /// Number of aborted command ids that follow.
    pub cmd_cnt: u32,
    /// Reserved.
    pub pad3: u64,
    /// Reserved.
    pub pad4: u64,
    /// `u16 cmd_ids[]` follows.
    pub cmd_ids: [u16; 0],
}

/// Mailbox field offsets.
pub mod mb {
    /// `version` (u16).
    pub const VERSION: usize = 0;
    /// `flags` (u16).
    pub const FLAGS: usize = 2;
    /// `cmdr_off` (u32).
    pub const CMDR_OFF: usize = 4;
    /// `cmdr_size` (u32).
    pub const CMDR_SIZE: usize = 8;
    /// `cmd_head` (u32), written by the kernel.
    pub const CMD_HEAD: usize = 12;
    /// `cmd_tail` (u32), written by the handler.
    pub const CMD_TAIL: usize = 64;
    /// `sizeof(struct tcmu_mailbox)`: the kernel's `CMDR_OFF`.
    pub const SIZE: usize = 128;
}

/// Entry field offsets, relative to the entry.
pub mod ent {
    /// `hdr.len_op` (u32).
    pub const LEN_OP: usize = 0;
    /// `hdr.cmd_id` (u16).
    pub const CMD_ID: usize = 4;
    /// `hdr.kflags` (u8).
    pub const KFLAGS: usize = 6;
    /// `hdr.uflags` (u8).
    pub const UFLAGS: usize = 7;
    /// `sizeof(struct tcmu_cmd_entry_hdr)`.
    pub const HDR_SIZE: usize = 8;
    /// `req.iov_cnt` (u32).
    pub const IOV_CNT: usize = 8;
    /// `req.iov_bidi_cnt` (u32).
    pub const IOV_BIDI_CNT: usize = 12;
    /// `req.iov_dif_cnt` (u32).
    pub const IOV_DIF_CNT: usize = 16;
    /// `req.cdb_off` (u64).
    pub const CDB_OFF: usize = 24;
    /// `req.iov[0]`.
    pub const IOV: usize = 48;
    /// `sizeof(struct iovec)`.
    pub const IOVEC_SIZE: usize = 16;
    /// `rsp.scsi_status` (u8).
    pub const SCSI_STATUS: usize = 8;
    /// `rsp.read_len` (u32).
    pub const READ_LEN: usize = 12;
    /// `rsp.sense_buffer`.
    pub const SENSE: usize = 16;
    /// `sizeof(struct tcmu_cmd_entry)`: the smallest command entry.
    pub const SIZE: usize = 112;
    /// `tmr.tmr_type` (u8).
    pub const TMR_TYPE: usize = 8;
    /// `tmr.cmd_cnt` (u32).
    pub const TMR_CMD_CNT: usize = 12;
    /// `tmr.cmd_ids[0]` (u16 each).
    pub const TMR_CMD_IDS: usize = 32;
    /// `sizeof(struct tcmu_tmr_entry)`.
    pub const TMR_SIZE: usize = 32;
}

/// The opcode of a `len_op`.
pub fn hdr_op(len_op: u32) -> u32 {
    len_op & TCMU_OP_MASK
}

/// The entry length of a `len_op`.
pub fn hdr_len(len_op: u32) -> u32 {
    len_op & !TCMU_OP_MASK
}

/// A `len_op` from a length (multiple of 8) and an opcode.
pub fn make_len_op(len: u32, op: u32) -> u32 {
    (len & !TCMU_OP_MASK) | (op & TCMU_OP_MASK)
}

/// The kernel's `scsi_command_size()`: the length of the CDB that starts with `opcode`;
/// for VARIABLE LENGTH (0x7f) it needs `cdb7`, the additional length byte.
pub fn scsi_command_size(opcode: u8, cdb7: u8) -> usize {
    if opcode == 0x7f {
        usize::from(cdb7) + 8
    } else {
        [6, 10, 10, 12, 16, 12, 10, 10][usize::from(opcode >> 5)]
    }
}

/// The kernel's entry size for a command with `iov_cnt` iovecs and a `cdb_len`-byte CDB
/// (`tcmu_cmd_get_cmd_size`); the CDB sits right after the base entry.
pub fn cmd_entry_size(iov_cnt: usize, cdb_len: usize) -> usize {
    base_cmd_entry_size(iov_cnt) + cdb_len.div_ceil(TCMU_OP_ALIGN_SIZE) * TCMU_OP_ALIGN_SIZE
}

/// The part of a command entry before its CDB (`tcmu_cmd_get_base_cmd_size`).
pub fn base_cmd_entry_size(iov_cnt: usize) -> usize {
    (ent::IOV + iov_cnt * ent::IOVEC_SIZE).max(ent::SIZE)
}
