//! SCSI block-device emulation (SPC-4 / SBC-3 subset) over a [`BlockBackend`].
//!
//! [`execute`] maps a CDB and its data-out bytes to a status, fixed-format sense
//! data and data-in bytes; it touches nothing but the backend, so every command is
//! unit-testable. The device advertises 512-byte (backend-sized) logical blocks,
//! thin provisioning with UNMAP and WRITE SAME (unless read-only), the write cache
//! off, and write protection for read-only backends.

use std::io;

use crate::BlockBackend;

/// SCSI status bytes.
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION (sense data follows).
    pub const CHECK_CONDITION: u8 = 0x02;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
}

/// Sense keys.
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
}

/// Additional sense codes (ASC, ASCQ).
pub mod asc {
    /// WRITE ERROR.
    pub const WRITE_ERROR: (u8, u8) = (0x0c, 0x00);
    /// UNRECOVERED READ ERROR.
    pub const UNRECOVERED_READ_ERROR: (u8, u8) = (0x11, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH_ERROR: (u8, u8) = (0x1a, 0x00);
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: (u8, u8) = (0x20, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: (u8, u8) = (0x21, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: (u8, u8) = (0x24, 0x00);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: (u8, u8) = (0x26, 0x00);
    /// WRITE PROTECTED.
    pub const WRITE_PROTECTED: (u8, u8) = (0x27, 0x00);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: (u8, u8) = (0x39, 0x00);
    /// INTERNAL TARGET FAILURE.
    pub const INTERNAL_TARGET_FAILURE: (u8, u8) = (0x44, 0x00);
}

/// SCSI operation codes handled here.
pub mod op {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE.
    pub const REQUEST_SENSE: u8 = 0x03;
    /// READ(6).
    pub const READ_6: u8 = 0x08;
    /// WRITE(6).
    pub const WRITE_6: u8 = 0x0a;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// MODE SELECT(6).
    pub const MODE_SELECT_6: u8 = 0x15;
    /// MODE SENSE(6).
    pub const MODE_SENSE_6: u8 = 0x1a;
    /// START STOP UNIT.
    pub const START_STOP_UNIT: u8 = 0x1b;
    /// PREVENT ALLOW MEDIUM REMOVAL.
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// WRITE(10).
    pub const WRITE_10: u8 = 0x2a;
    /// VERIFY(10).
    pub const VERIFY_10: u8 = 0x2f;
    /// SYNCHRONIZE CACHE(10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// WRITE SAME(10).
    pub const WRITE_SAME_10: u8 = 0x41;
    /// UNMAP.
    pub const UNMAP: u8 = 0x42;
    /// MODE SELECT(10).
    pub const MODE_SELECT_10: u8 = 0x55;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5a;
    /// READ(16).
    pub const READ_16: u8 = 0x88;
    /// WRITE(16).
    pub const WRITE_16: u8 = 0x8a;
    /// VERIFY(16).
    pub const VERIFY_16: u8 = 0x8f;
    /// SYNCHRONIZE CACHE(16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME(16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16) (READ CAPACITY(16) is service action 0x10).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    /// REPORT LUNS.
    pub const REPORT_LUNS: u8 = 0xa0;
    /// MAINTENANCE IN (REPORT SUPPORTED OPERATION CODES, ...).
    pub const MAINTENANCE_IN: u8 = 0xa3;
    /// READ(12).
    pub const READ_12: u8 = 0xa8;
    /// WRITE(12).
    pub const WRITE_12: u8 = 0xaa;
}

/// Service action of READ CAPACITY(16).
pub const SAI_READ_CAPACITY_16: u8 = 0x10;

/// Length of the fixed-format sense data produced here.
pub const SENSE_LEN: usize = 18;

/// Fixed-format (response code 0x70, current) sense data.
pub fn fixed_sense(key: u8, (asc, ascq): (u8, u8)) -> Vec<u8> {
    let mut s = vec![0u8; SENSE_LEN];
    s[0] = 0x70;
    s[2] = key & 0x0f;
    s[7] = (SENSE_LEN - 8) as u8;
    s[12] = asc;
    s[13] = ascq;
    s
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    /// SCSI status byte.
    pub status: u8,
    /// Sense data (with CHECK CONDITION), else empty.
    pub sense: Vec<u8>,
    /// Data-in bytes (the caller truncates to the buffer and zero-fills the rest).
    pub data_in: Vec<u8>,
}

impl ScsiResponse {
    /// GOOD with no data.
    pub fn good() -> Self {
        ScsiResponse {
            status: status::GOOD,
            sense: Vec::new(),
            data_in: Vec::new(),
        }
    }

    /// GOOD with data-in bytes.
    pub fn data(data_in: Vec<u8>) -> Self {
        ScsiResponse {
            status: status::GOOD,
            sense: Vec::new(),
            data_in,
        }
    }

    /// CHECK CONDITION with fixed-format sense.
    pub fn check(key: u8, code: (u8, u8)) -> Self {
        ScsiResponse {
            status: status::CHECK_CONDITION,
            sense: fixed_sense(key, code),
            data_in: Vec::new(),
        }
    }

    /// The sense key, if this is a CHECK CONDITION with fixed sense.
    pub fn sense_key(&self) -> Option<u8> {
        (self.sense.len() >= 14).then(|| self.sense[2] & 0x0f)
    }

    /// The (ASC, ASCQ) pair, if this is a CHECK CONDITION with fixed sense.
    pub fn asc(&self) -> Option<(u8, u8)> {
        (self.sense.len() >= 14).then(|| (self.sense[12], self.sense[13]))
    }
}

fn illegal(code: (u8, u8)) -> ScsiResponse {
    ScsiResponse::check(key::ILLEGAL_REQUEST, code)
}

fn invalid_cdb() -> ScsiResponse {
    illegal(asc::INVALID_FIELD_IN_CDB)
}

fn write_protected() -> ScsiResponse {
    ScsiResponse::check(key::DATA_PROTECT, asc::WRITE_PROTECTED)
}

/// The identity and limits the logical unit advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunInfo {
    /// T10 vendor identification (8 bytes, space padded).
    pub vendor: [u8; 8],
    /// Product identification (16 bytes, space padded).
    pub product: [u8; 16],
    /// Product revision level (4 bytes).
    pub revision: [u8; 4],
    /// Unit serial number (VPD 0x80), printable ASCII.
    pub serial: String,
    /// NAA-5 designator (VPD 0x83).
    pub naa: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Number of logical blocks.
    pub num_blocks: u64,
    /// Writes, UNMAP and WRITE SAME are refused (DATA PROTECT).
    pub read_only: bool,
    /// MAXIMUM TRANSFER LENGTH in blocks (VPD 0xB0).
    pub max_transfer_blocks: u32,
    /// MAXIMUM UNMAP LBA COUNT (VPD 0xB0).
    pub max_unmap_blocks: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (VPD 0xB0).
    pub max_unmap_descriptors: u32,
    /// MAXIMUM WRITE SAME LENGTH in blocks (VPD 0xB0).
    pub max_write_same_blocks: u64,
}

/// The IEEE OUI in the NAA designators (the one LIO uses).
pub const NAA_OUI: u64 = 0x00_14_05;

/// FNV-1a, for stable identifiers derived from a device id.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The NAA-5 identifier (OUI 00-14-05, 36 bits from `id`) used for both the VPD
/// 0x83 designator and the tcm_loop WWN of device `id`.
pub fn naa_for(id: &str) -> u64 {
    (0x5 << 60) | (NAA_OUI << 36) | (fnv1a64(id.as_bytes()) & 0xf_ffff_ffff)
}

fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (o, b) in out
        .iter_mut()
        .zip(s.bytes().filter(|b| b.is_ascii_graphic() || *b == b' '))
    {
        *o = b;
    }
    out
}

impl LunInfo {
    /// The identity of device `id` served from `backend`.
    pub fn new(id: &str, backend: &dyn BlockBackend) -> Self {
        let block_size = backend.block_size().max(512);
        let num_blocks = backend.size() / u64::from(block_size);
        LunInfo {
            vendor: padded("OBD"),
            product: padded("overlaybd"),
            revision: padded("0001"),
            serial: id
                .bytes()
                .filter(|b| b.is_ascii_graphic())
                .map(char::from)
                .collect(),
            naa: naa_for(id),
            block_size,
            num_blocks,
            read_only: backend.read_only(),
            // 1 MiB per command.
            max_transfer_blocks: (1 << 20) / block_size,
            // 1 GiB per UNMAP / WRITE SAME.
            max_unmap_blocks: (1 << 30) / block_size,
            max_unmap_descriptors: 256,
            max_write_same_blocks: u64::from((1u32 << 30) / block_size),
        }
    }

    fn byte_range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), ScsiResponse> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.num_blocks => Ok((
                lba * u64::from(self.block_size),
                blocks * u64::from(self.block_size),
            )),
            _ => Err(illegal(asc::LBA_OUT_OF_RANGE)),
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// True for commands whose data buffer carries data-out (to the device).
pub fn is_data_out(cdb: &[u8]) -> bool {
    matches!(
        cdb.first().copied(),
        Some(
            op::WRITE_6
                | op::WRITE_10
                | op::WRITE_12
                | op::WRITE_16
                | op::WRITE_SAME_10
                | op::WRITE_SAME_16
                | op::UNMAP
                | op::MODE_SELECT_6
                | op::MODE_SELECT_10
        )
    )
}

/// Minimum CDB length for `opcode`, so field reads stay in bounds.
fn min_cdb_len(opcode: u8) -> usize {
    crate::tcmu::uapi::scsi_command_size(opcode, 0)
}

/// Executes one command against `backend`.
///
/// `data_out` holds the data-out bytes (see [`is_data_out`]); `data_in_len` is the
/// size of the initiator's data-in buffer, which bounds READ transfers.
pub fn execute(
    lun: &LunInfo,
    backend: &dyn BlockBackend,
    cdb: &[u8],
    data_out: &[u8],
    data_in_len: usize,
) -> ScsiResponse {
    let Some(&opcode) = cdb.first() else {
        return illegal(asc::INVALID_OPCODE);
    };
    if !is_known(opcode) {
        // REPORT SUPPORTED OPERATION CODES and friends: the kernel takes "invalid
        // opcode" as "not supported" and stops asking.
        return illegal(asc::INVALID_OPCODE);
    }
    if cdb.len() < min_cdb_len(opcode) {
        return invalid_cdb();
    }
    match opcode {
        op::TEST_UNIT_READY => ScsiResponse::good(),
        op::REQUEST_SENSE => request_sense(cdb),
        op::INQUIRY => inquiry(lun, cdb),
        op::READ_CAPACITY_10 => read_capacity_10(lun),
        op::SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
            SAI_READ_CAPACITY_16 => read_capacity_16(lun, cdb),
            _ => invalid_cdb(),
        },
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => mode_sense(lun, cdb),
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => mode_select(cdb, data_out),
        op::START_STOP_UNIT | op::PREVENT_ALLOW_MEDIUM_REMOVAL => ScsiResponse::good(),
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => {
            read(lun, backend, cdb, data_in_len)
        }
        op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
            write(lun, backend, cdb, data_out)
        }
        op::VERIFY_10 | op::VERIFY_16 => verify(lun, cdb),
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => sync_cache(lun, backend, cdb),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => write_same(lun, backend, cdb, data_out),
        op::UNMAP => unmap(lun, backend, cdb, data_out),
        op::REPORT_LUNS => report_luns(cdb),
        _ => illegal(asc::INVALID_OPCODE),
    }
}

/// True for the opcodes [`execute`] implements.
pub fn is_known(opcode: u8) -> bool {
    matches!(
        opcode,
        op::TEST_UNIT_READY
            | op::REQUEST_SENSE
            | op::INQUIRY
            | op::READ_CAPACITY_10
            | op::SERVICE_ACTION_IN_16
            | op::MODE_SENSE_6
            | op::MODE_SENSE_10
            | op::MODE_SELECT_6
            | op::MODE_SELECT_10
            | op::START_STOP_UNIT
            | op::PREVENT_ALLOW_MEDIUM_REMOVAL
            | op::READ_6
            | op::READ_10
            | op::READ_12
            | op::READ_16
            | op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::VERIFY_10
            | op::VERIFY_16
            | op::SYNCHRONIZE_CACHE_10
            | op::SYNCHRONIZE_CACHE_16
            | op::WRITE_SAME_10
            | op::WRITE_SAME_16
            | op::UNMAP
            | op::REPORT_LUNS
    )
}

fn truncate(mut data: Vec<u8>, alloc_len: usize) -> ScsiResponse {
    data.truncate(alloc_len);
    ScsiResponse::data(data)
}

fn request_sense(cdb: &[u8]) -> ScsiResponse {
    if cdb[1] & 0x01 != 0 {
        // DESC: descriptor-format sense is not supported.
        return invalid_cdb();
    }
    let mut s = fixed_sense(key::NO_SENSE, (0, 0));
    s[0] = 0x70;
    truncate(s, usize::from(cdb[4]))
}

fn inquiry(lun: &LunInfo, cdb: &[u8]) -> ScsiResponse {
    let evpd = cdb[1] & 0x01 != 0;
    if cdb[1] & 0x02 != 0 {
        // CMDDT (obsolete).
        return invalid_cdb();
    }
    let page = cdb[2];
    let alloc = usize::from(be16(&cdb[3..5]));
    if !evpd {
        if page != 0 {
            return invalid_cdb();
        }
        return truncate(standard_inquiry(lun), alloc);
    }
    let body = match page {
        0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
        0x80 => lun.serial.as_bytes().to_vec(),
        0x83 => device_identification(lun),
        0xb0 => block_limits(lun),
        0xb1 => {
            // Block device characteristics: non-rotating medium, form factor not reported.
            let mut b = vec![0u8; 0x3c];
            b[0..2].copy_from_slice(&1u16.to_be_bytes());
            b
        }
        0xb2 => {
            // Logical block provisioning.
            let mut b = vec![0u8; 4];
            if !lun.read_only {
                // LBPU (UNMAP), LBPWS (WRITE SAME(16) with UNMAP), LBPWS10, LBPRZ
                // (unmapped blocks read as zeros).
                b[1] = 0x80 | 0x40 | 0x20 | 0x04;
                // Thin provisioned.
                b[2] = 0x02;
            }
            b
        }
        _ => return invalid_cdb(),
    };
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&[0x00, page]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    truncate(out, alloc)
}

fn standard_inquiry(lun: &LunInfo) -> Vec<u8> {
    let mut d = vec![0u8; 66];
    d[0] = 0x00; // connected direct-access block device
    d[1] = 0x00; // not removable
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&lun.vendor);
    d[16..32].copy_from_slice(&lun.product);
    d[32..36].copy_from_slice(&lun.revision);
    // Version descriptors: SAM-5, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn device_identification(lun: &LunInfo) -> Vec<u8> {
    let mut out = Vec::new();
    // NAA designator: binary, associated with the logical unit.
    out.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
    out.extend_from_slice(&lun.naa.to_be_bytes());
    // T10 vendor ID designator: ASCII, vendor + serial.
    let mut t10 = lun.vendor.to_vec();
    t10.extend_from_slice(lun.serial.as_bytes());
    t10.truncate(252);
    out.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
    out.extend_from_slice(&t10);
    out
}

fn block_limits(lun: &LunInfo) -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    // WSNZ: a WRITE SAME of zero blocks is refused.
    b[0] = 0x01;
    // OPTIMAL TRANSFER LENGTH GRANULARITY: 4 KiB.
    let gran = (4096 / lun.block_size).max(1) as u16;
    b[2..4].copy_from_slice(&gran.to_be_bytes());
    b[4..8].copy_from_slice(&lun.max_transfer_blocks.to_be_bytes());
    b[8..12].copy_from_slice(&lun.max_transfer_blocks.to_be_bytes());
    if !lun.read_only {
        b[16..20].copy_from_slice(&lun.max_unmap_blocks.to_be_bytes());
        b[20..24].copy_from_slice(&lun.max_unmap_descriptors.to_be_bytes());
        // OPTIMAL UNMAP GRANULARITY: 4 KiB; no alignment requirement.
        b[24..28].copy_from_slice(&u32::from(gran).to_be_bytes());
        b[32..40].copy_from_slice(&lun.max_write_same_blocks.to_be_bytes());
    }
    b
}

fn read_capacity_10(lun: &LunInfo) -> ScsiResponse {
    let last = lun.num_blocks.saturating_sub(1);
    let last = u32::try_from(last).unwrap_or(u32::MAX);
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&last.to_be_bytes());
    d.extend_from_slice(&lun.block_size.to_be_bytes());
    ScsiResponse::data(d)
}

fn read_capacity_16(lun: &LunInfo, cdb: &[u8]) -> ScsiResponse {
    let alloc = be32(&cdb[10..14]) as usize;
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lun.num_blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&lun.block_size.to_be_bytes());
    if !lun.read_only {
        // LBPME (thin provisioning) and LBPRZ.
        d[14] = 0x80 | 0x40;
    }
    truncate(d, alloc)
}

/// Mode page 0x08 (caching): write cache off, read cache on.
fn caching_page(changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    let _ = changeable; // nothing is changeable: all bits stay zero
    p
}

/// Mode page 0x0a (control).
fn control_page(changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = 0x0a;
    p[1] = 0x0a;
    if !changeable {
        // QERR 00, unrestricted reordering allowed (QUEUE ALGORITHM MODIFIER 1).
        p[3] = 0x10;
        // BUSY TIMEOUT PERIOD: unlimited.
        p[8] = 0xff;
        p[9] = 0xff;
    }
    p
}

fn mode_sense(lun: &LunInfo, cdb: &[u8]) -> ScsiResponse {
    let ten = cdb[0] == op::MODE_SENSE_10;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = if ten {
        usize::from(be16(&cdb[7..9]))
    } else {
        usize::from(cdb[4])
    };
    if pc == 3 {
        return illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED);
    }
    let changeable = pc == 1;
    let pages = match (page, subpage) {
        (0x08, 0) => caching_page(changeable),
        (0x0a, 0) => control_page(changeable),
        (0x3f, 0) | (0x3f, 0xff) => {
            let mut v = caching_page(changeable);
            v.extend(control_page(changeable));
            v
        }
        _ => return invalid_cdb(),
    };
    let mut bd = Vec::new();
    if !dbd {
        if llbaa {
            bd.extend_from_slice(&lun.num_blocks.to_be_bytes());
            bd.extend_from_slice(&[0, 0, 0, 0]);
            bd.extend_from_slice(&lun.block_size.to_be_bytes());
        } else {
            let n = u32::try_from(lun.num_blocks).unwrap_or(u32::MAX);
            bd.extend_from_slice(&n.to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&lun.block_size.to_be_bytes()[1..4]);
        }
    }
    // DEVICE-SPECIFIC PARAMETER: WP for read-only devices; no DPOFUA.
    let dsp = if lun.read_only { 0x80 } else { 0x00 };
    let mut out = Vec::new();
    if ten {
        out.extend_from_slice(&[0, 0, 0, dsp, u8::from(llbaa && !dbd), 0]);
        out.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[0, 0, dsp, bd.len() as u8]);
    }
    out.extend(bd);
    out.extend(pages);
    if ten {
        let n = (out.len() - 2) as u16;
        out[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        out[0] = (out.len() - 1) as u8;
    }
    truncate(out, alloc)
}

fn mode_select(cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
    let ten = cdb[0] == op::MODE_SELECT_10;
    if cdb[1] & 0x01 != 0 {
        // SP: saving pages is not supported.
        return illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED);
    }
    let len = if ten {
        usize::from(be16(&cdb[7..9]))
    } else {
        usize::from(cdb[4])
    };
    if data_out.len() < len {
        return illegal(asc::PARAMETER_LIST_LENGTH_ERROR);
    }
    // Nothing is changeable; accepting the current values is harmless.
    ScsiResponse::good()
}

/// (LBA, blocks) of a READ/WRITE CDB; `None` if a protection field is set.
fn rw_range(cdb: &[u8]) -> Result<(u64, u64), ScsiResponse> {
    let (lba, blocks, flags) = match cdb[0] {
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be32(&[0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, n, 0)
        }
        op::READ_10 | op::WRITE_10 | op::VERIFY_10 => (
            u64::from(be32(&cdb[2..6])),
            u64::from(be16(&cdb[7..9])),
            cdb[1],
        ),
        op::READ_12 | op::WRITE_12 => (
            u64::from(be32(&cdb[2..6])),
            u64::from(be32(&cdb[6..10])),
            cdb[1],
        ),
        _ => (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14])), cdb[1]),
    };
    // RDPROTECT / WRPROTECT / VRPROTECT: no protection information.
    if flags & 0xe0 != 0 {
        return Err(invalid_cdb());
    }
    Ok((lba, blocks))
}

fn read(lun: &LunInfo, backend: &dyn BlockBackend, cdb: &[u8], data_in_len: usize) -> ScsiResponse {
    let (lba, blocks) = match rw_range(cdb) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (off, len) = match lun.byte_range(lba, blocks) {
        Ok(r) => r,
        Err(e) => return e,
    };
    // Never more than the initiator's buffer (the kernel sizes it from the CDB).
    let len = len.min(data_in_len as u64) as usize;
    let mut buf = vec![0u8; len];
    match backend.read_at(&mut buf, off) {
        Ok(()) => ScsiResponse::data(buf),
        Err(e) => {
            tracing::warn!("tcmu: read of {len} bytes at {off} failed: {e}");
            ScsiResponse::check(key::MEDIUM_ERROR, asc::UNRECOVERED_READ_ERROR)
        }
    }
}

fn write_error(e: &io::Error, what: &str) -> ScsiResponse {
    if e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EROFS) {
        return write_protected();
    }
    tracing::warn!("tcmu: {what} failed: {e}");
    ScsiResponse::check(key::MEDIUM_ERROR, asc::WRITE_ERROR)
}

fn write(lun: &LunInfo, backend: &dyn BlockBackend, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
    let (lba, blocks) = match rw_range(cdb) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (off, len) = match lun.byte_range(lba, blocks) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if lun.read_only {
        return write_protected();
    }
    if (data_out.len() as u64) < len {
        return invalid_cdb();
    }
    let data = &data_out[..len as usize];
    if let Err(e) = backend.write_at(data, off) {
        return write_error(&e, &format!("write of {len} bytes at {off}"));
    }
    // FUA (WRITE(10/12/16) byte 1 bit 3): make it durable before answering.
    if cdb[0] != op::WRITE_6 && cdb[1] & 0x08 != 0 {
        if let Err(e) = backend.flush() {
            return write_error(&e, "flush after a FUA write");
        }
    }
    ScsiResponse::good()
}

fn verify(lun: &LunInfo, cdb: &[u8]) -> ScsiResponse {
    // BYTCHK: comparing data-out is not supported.
    if cdb[1] & 0x06 != 0 {
        return invalid_cdb();
    }
    let (lba, blocks) = match rw_range(cdb) {
        Ok(r) => r,
        Err(e) => return e,
    };
    match lun.byte_range(lba, blocks) {
        Ok(_) => ScsiResponse::good(),
        Err(e) => e,
    }
}

fn sync_cache(lun: &LunInfo, backend: &dyn BlockBackend, cdb: &[u8]) -> ScsiResponse {
    let (lba, blocks) = if cdb[0] == op::SYNCHRONIZE_CACHE_10 {
        (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9])))
    } else {
        (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14])))
    };
    // NUMBER OF LOGICAL BLOCKS 0 means "to the end".
    if lba > lun.num_blocks || (blocks != 0 && lun.byte_range(lba, blocks).is_err()) {
        return illegal(asc::LBA_OUT_OF_RANGE);
    }
    if lun.read_only {
        // Nothing can be dirty.
        return ScsiResponse::good();
    }
    match backend.flush() {
        Ok(()) => ScsiResponse::good(),
        Err(e) => write_error(&e, "flush"),
    }
}

fn write_same(
    lun: &LunInfo,
    backend: &dyn BlockBackend,
    cdb: &[u8],
    data_out: &[u8],
) -> ScsiResponse {
    let sixteen = cdb[0] == op::WRITE_SAME_16;
    let flags = cdb[1];
    let unmap_bit = flags & 0x08 != 0;
    let anchor = flags & 0x10 != 0;
    let ndob = sixteen && flags & 0x01 != 0;
    if flags & 0xe0 != 0 || anchor {
        // WRPROTECT, ANCHOR: not supported.
        return invalid_cdb();
    }
    let (lba, blocks) = if sixteen {
        (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14])))
    } else {
        (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9])))
    };
    if blocks == 0 || blocks > lun.max_write_same_blocks {
        // WSNZ is set, and the limit is advertised in VPD 0xB0.
        return invalid_cdb();
    }
    let (off, len) = match lun.byte_range(lba, blocks) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if lun.read_only {
        return write_protected();
    }
    let bs = lun.block_size as usize;
    let block: Vec<u8> = if ndob {
        vec![0u8; bs]
    } else if data_out.len() < bs {
        return illegal(asc::PARAMETER_LIST_LENGTH_ERROR);
    } else {
        data_out[..bs].to_vec()
    };
    let zero = block.iter().all(|&b| b == 0);
    if zero && (unmap_bit || ndob) {
        // Unmapped blocks read as zeros (LBPRZ), so a discard writes the same data.
        return match backend.discard(off, len) {
            Ok(()) => ScsiResponse::good(),
            Err(e) => write_error(&e, &format!("discard of {len} bytes at {off}")),
        };
    }
    // Replicate the block, a chunk at a time.
    let per_chunk = ((1usize << 20) / bs).max(1);
    let chunk: Vec<u8> = block.iter().copied().cycle().take(per_chunk * bs).collect();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        if let Err(e) = backend.write_at(&chunk[..n], off + done) {
            return write_error(&e, &format!("write same of {n} bytes at {}", off + done));
        }
        done += n as u64;
    }
    ScsiResponse::good()
}

fn unmap(lun: &LunInfo, backend: &dyn BlockBackend, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
    if cdb[1] & 0x01 != 0 {
        // ANCHOR.
        return invalid_cdb();
    }
    let param_len = usize::from(be16(&cdb[7..9]));
    if param_len == 0 {
        return ScsiResponse::good();
    }
    if lun.read_only {
        return write_protected();
    }
    if param_len < 8 || data_out.len() < param_len {
        return illegal(asc::PARAMETER_LIST_LENGTH_ERROR);
    }
    let p = &data_out[..param_len];
    let desc_len = usize::from(be16(&p[2..4]));
    if desc_len % 16 != 0 || 8 + desc_len > param_len {
        return illegal(asc::PARAMETER_LIST_LENGTH_ERROR);
    }
    let count = desc_len / 16;
    if count > lun.max_unmap_descriptors as usize {
        return illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    // Check every descriptor before discarding anything.
    let mut ranges = Vec::with_capacity(count);
    for d in p[8..8 + desc_len].chunks_exact(16) {
        let lba = be64(&d[0..8]);
        let blocks = u64::from(be32(&d[8..12]));
        if blocks > u64::from(lun.max_unmap_blocks) {
            return illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        match lun.byte_range(lba, blocks) {
            Ok(r) if blocks > 0 => ranges.push(r),
            Ok(_) => {}
            Err(e) => return e,
        }
    }
    for (off, len) in ranges {
        if let Err(e) = backend.discard(off, len) {
            return write_error(&e, &format!("discard of {len} bytes at {off}"));
        }
    }
    ScsiResponse::good()
}

fn report_luns(cdb: &[u8]) -> ScsiResponse {
    let alloc = be32(&cdb[6..10]) as usize;
    if alloc < 16 {
        return invalid_cdb();
    }
    // One LUN: 0.
    let mut d = vec![0u8; 16];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    truncate(d, alloc)
}
