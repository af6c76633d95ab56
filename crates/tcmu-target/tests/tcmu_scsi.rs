//! SCSI emulation over a MemBackend: data commands, provisioning, identification,
//! mode pages and sense data.

use std::io;

use tcmu_target::tcmu::scsi::{self, asc, key, status, LunInfo, ScsiResponse};
use tcmu_target::{BlockBackend, MemBackend};

const MIB: usize = 1 << 20;

fn image(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

fn dev(rw: bool) -> (MemBackend, LunInfo) {
    let b = MemBackend::new(image(MIB), !rw);
    let lun = LunInfo::new("dev-1", &b);
    (b, lun)
}

fn run(lun: &LunInfo, b: &dyn BlockBackend, cdb: &[u8], out: &[u8]) -> ScsiResponse {
    scsi::execute(lun, b, cdb, out, 1 << 24)
}

fn cdb10(op: u8, lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn cdb16(op: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

fn cdb12(op: u8, lba: u32, n: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&n.to_be_bytes());
    c
}

/// How many bytes `cdb` (no data out) returns.
fn data_in_len(lun: &LunInfo, b: &dyn BlockBackend, cdb: &[u8]) -> usize {
    run(lun, b, cdb, &[]).data_in.len()
}

/// `cdb` (no data out) fails with ILLEGAL REQUEST and `code`.
fn assert_illegal(lun: &LunInfo, b: &dyn BlockBackend, cdb: &[u8], code: (u8, u8)) {
    assert_sense(&run(lun, b, cdb, &[]), key::ILLEGAL_REQUEST, code);
}

fn assert_sense(r: &ScsiResponse, k: u8, code: (u8, u8)) {
    assert_eq!(r.status, status::CHECK_CONDITION, "{r:?}");
    assert_eq!(r.sense[0], 0x70, "fixed format, current");
    assert_eq!(r.sense[7], 10, "additional sense length");
    assert_eq!(r.sense_key(), Some(k), "{r:?}");
    assert_eq!(r.asc(), Some(code), "{r:?}");
}

#[test]
fn reads_of_every_size() {
    let (b, lun) = dev(false);
    let img = image(MIB);
    // READ(6): LBA 21 bits, 0 blocks means 256.
    let r = run(&lun, &b, &[0x08, 0, 0, 3, 2, 0], &[]);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data_in, &img[3 * 512..5 * 512]);
    let r = run(&lun, &b, &[0x08, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data_in.len(), 256 * 512);
    let r = run(&lun, &b, &cdb10(0x28, 10, 4), &[]);
    assert_eq!(r.data_in, &img[10 * 512..14 * 512]);
    let r = run(&lun, &b, &cdb12(0xa8, 2047, 1), &[]);
    assert_eq!(r.data_in, &img[2047 * 512..]);
    let r = run(&lun, &b, &cdb16(0x88, 1, 1), &[]);
    assert_eq!(r.data_in, &img[512..1024]);
    // Zero blocks: nothing.
    let r = run(&lun, &b, &cdb10(0x28, 0, 0), &[]);
    assert_eq!((r.status, r.data_in.len()), (status::GOOD, 0));
    // The initiator's buffer bounds the transfer.
    let r = scsi::execute(&lun, &b, &cdb10(0x28, 0, 8), &[], 1024);
    assert_eq!(r.data_in, &img[..1024]);
}

#[test]
fn out_of_range_and_bad_fields() {
    let (b, lun) = dev(true);
    assert_eq!(lun.num_blocks, 2048);
    for cdb in [
        cdb10(0x28, 2048, 1),
        cdb10(0x28, 2047, 2),
        cdb16(0x88, u64::MAX, 2),
        cdb10(0x2a, 2040, 9),
        cdb16(0x8a, 1 << 40, 1),
        vec![0x08, 0x1f, 0xff, 0xff, 1, 0],
    ] {
        let out = vec![0u8; 9 * 512];
        assert_sense(
            &run(&lun, &b, &cdb, &out),
            key::ILLEGAL_REQUEST,
            asc::LBA_OUT_OF_RANGE,
        );
    }
    // RDPROTECT set.
    let mut c = cdb10(0x28, 0, 1);
    c[1] = 0x20;
    assert_illegal(&lun, &b, &c, asc::INVALID_FIELD_IN_CDB);
    // Unknown opcode; REPORT SUPPORTED OPERATION CODES.
    assert_illegal(&lun, &b, &[0xc5, 0, 0, 0, 0, 0], asc::INVALID_OPCODE);
    assert_illegal(
        &lun,
        &b,
        &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0],
        asc::INVALID_OPCODE,
    );
    // A truncated CDB.
    assert_illegal(&lun, &b, &[0x28, 0, 0], asc::INVALID_FIELD_IN_CDB);
    assert_illegal(&lun, &b, &[], asc::INVALID_OPCODE);
}

#[test]
fn writes_land_and_short_data_out_is_refused() {
    let (b, lun) = dev(true);
    let data = vec![0x5au8; 3 * 512];
    assert_eq!(
        run(&lun, &b, &cdb10(0x2a, 5, 3), &data).status,
        status::GOOD
    );
    assert_eq!(&b.snapshot()[5 * 512..8 * 512], &data[..]);
    // WRITE(6), (12), (16), and FUA.
    let one = vec![1u8; 512];
    assert_eq!(run(&lun, &b, &[0x0a, 0, 0, 9, 1, 0], &one).status, 0);
    assert_eq!(run(&lun, &b, &cdb12(0xaa, 10, 1), &one).status, 0);
    let mut fua = cdb16(0x8a, 11, 1);
    fua[1] = 0x08;
    assert_eq!(run(&lun, &b, &fua, &one).status, 0);
    assert_eq!(&b.snapshot()[9 * 512..12 * 512], &[1u8; 3 * 512][..]);
    assert_sense(
        &run(&lun, &b, &cdb10(0x2a, 0, 2), &one),
        key::ILLEGAL_REQUEST,
        asc::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn read_only_device_is_write_protected() {
    let (b, lun) = dev(false);
    let before = b.snapshot();
    let wp = |r: ScsiResponse| assert_sense(&r, key::DATA_PROTECT, asc::WRITE_PROTECTED);
    wp(run(&lun, &b, &cdb10(0x2a, 0, 1), &[0u8; 512]));
    wp(run(&lun, &b, &cdb16(0x8a, 0, 1), &[0u8; 512]));
    let mut ws = cdb16(0x93, 0, 8);
    ws[1] = 0x08;
    wp(run(&lun, &b, &ws, &[0u8; 512]));
    wp(run(&lun, &b, &unmap_cdb(24), &unmap_params(&[(0, 8)])));
    // SYNCHRONIZE CACHE has nothing to do, and succeeds.
    assert_eq!(run(&lun, &b, &cdb10(0x35, 0, 0), &[]).status, status::GOOD);
    assert_eq!(b.snapshot(), before);
    // WP in MODE SENSE, no LBPME in READ CAPACITY(16), no provisioning in VPD 0xB2.
    let r = run(&lun, &b, &[0x1a, 0x08, 0x3f, 0, 255, 0], &[]);
    assert_eq!(r.data_in[2] & 0x80, 0x80);
    let r = run(&lun, &b, &rc16(32), &[]);
    assert_eq!(r.data_in[14] & 0x80, 0);
    let r = run(&lun, &b, &[0x12, 1, 0xb2, 0, 64, 0], &[]);
    assert_eq!(r.data_in[5], 0);
}

/// A backend whose I/O fails.
struct Broken;
impl BlockBackend for Broken {
    fn size(&self) -> u64 {
        MIB as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("disk on fire"))
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("disk on fire"))
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn flush(&self) -> io::Result<()> {
        Err(io::Error::other("disk on fire"))
    }
}

#[test]
fn backend_errors_become_medium_errors() {
    let lun = LunInfo::new("broken", &Broken);
    assert_sense(
        &run(&lun, &Broken, &cdb10(0x28, 0, 1), &[]),
        key::MEDIUM_ERROR,
        asc::UNRECOVERED_READ_ERROR,
    );
    assert_sense(
        &run(&lun, &Broken, &cdb10(0x2a, 0, 1), &[0u8; 512]),
        key::MEDIUM_ERROR,
        asc::WRITE_ERROR,
    );
    assert_sense(
        &run(&lun, &Broken, &cdb10(0x35, 0, 0), &[]),
        key::MEDIUM_ERROR,
        asc::WRITE_ERROR,
    );
    // A backend that refuses a discard as read-only: DATA PROTECT.
    assert_sense(
        &run(&lun, &Broken, &unmap_cdb(24), &unmap_params(&[(0, 1)])),
        key::DATA_PROTECT,
        asc::WRITE_PROTECTED,
    );
}

fn unmap_cdb(len: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn unmap_params(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    let dl = (ranges.len() * 16) as u16;
    p[0..2].copy_from_slice(&(dl + 6).to_be_bytes());
    p[2..4].copy_from_slice(&dl.to_be_bytes());
    for (lba, n) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

#[test]
fn unmap_discards_ranges_atomically_checked() {
    let (b, lun) = dev(true);
    let params = unmap_params(&[(1, 2), (10, 1), (100, 0)]);
    let r = run(&lun, &b, &unmap_cdb(params.len() as u16), &params);
    assert_eq!(r.status, status::GOOD);
    let s = b.snapshot();
    let img = image(MIB);
    assert_eq!(&s[..512], &img[..512]);
    assert!(s[512..3 * 512].iter().all(|&x| x == 0));
    assert_eq!(&s[3 * 512..10 * 512], &img[3 * 512..10 * 512]);
    assert!(s[10 * 512..11 * 512].iter().all(|&x| x == 0));
    // One bad descriptor: nothing is discarded.
    let params = unmap_params(&[(20, 1), (2048, 1)]);
    assert_sense(
        &run(&lun, &b, &unmap_cdb(params.len() as u16), &params),
        key::ILLEGAL_REQUEST,
        asc::LBA_OUT_OF_RANGE,
    );
    assert_eq!(&b.snapshot()[20 * 512..21 * 512], &img[20 * 512..21 * 512]);
    // Parameter list length 0: nothing to do.
    assert_eq!(run(&lun, &b, &unmap_cdb(0), &[]).status, status::GOOD);
    // Truncated parameter list.
    assert_sense(
        &run(&lun, &b, &unmap_cdb(40), &params[..20]),
        key::ILLEGAL_REQUEST,
        asc::PARAMETER_LIST_LENGTH_ERROR,
    );
}

#[test]
fn write_same_replicates_or_unmaps() {
    let (b, lun) = dev(true);
    let img = image(MIB);
    // WRITE SAME(10) with a pattern: replicated.
    let pat: Vec<u8> = (0..512).map(|i| i as u8).collect();
    assert_eq!(run(&lun, &b, &cdb10(0x41, 4, 3), &pat).status, 0);
    let s = b.snapshot();
    for k in 4..7 {
        assert_eq!(&s[k * 512..(k + 1) * 512], &pat[..]);
    }
    assert_eq!(&s[7 * 512..8 * 512], &img[7 * 512..8 * 512]);
    // WRITE SAME(16) with UNMAP and zeros: discarded.
    let mut c = cdb16(0x93, 100, 50);
    c[1] = 0x08;
    assert_eq!(run(&lun, &b, &c, &[0u8; 512]).status, 0);
    assert!(b.snapshot()[100 * 512..150 * 512].iter().all(|&x| x == 0));
    // UNMAP bit with non-zero data: written, not discarded.
    assert_eq!(run(&lun, &b, &c, &pat).status, 0);
    assert_eq!(&b.snapshot()[149 * 512..150 * 512], &pat[..]);
    // NDOB: zeros without a data-out buffer.
    let mut c = cdb16(0x93, 200, 1000);
    c[1] = 0x01;
    assert_eq!(run(&lun, &b, &c, &[]).status, 0);
    assert!(b.snapshot()[200 * 512..1200 * 512].iter().all(|&x| x == 0));
    // Zero blocks (WSNZ), ANCHOR, out of range, missing data.
    assert_sense(
        &run(&lun, &b, &cdb10(0x41, 0, 0), &pat),
        key::ILLEGAL_REQUEST,
        asc::INVALID_FIELD_IN_CDB,
    );
    let mut c = cdb10(0x41, 0, 1);
    c[1] = 0x10;
    assert_sense(
        &run(&lun, &b, &c, &pat),
        key::ILLEGAL_REQUEST,
        asc::INVALID_FIELD_IN_CDB,
    );
    assert_sense(
        &run(&lun, &b, &cdb16(0x93, 2000, 100), &pat),
        key::ILLEGAL_REQUEST,
        asc::LBA_OUT_OF_RANGE,
    );
    assert_sense(
        &run(&lun, &b, &cdb10(0x41, 0, 1), &pat[..100]),
        key::ILLEGAL_REQUEST,
        asc::PARAMETER_LIST_LENGTH_ERROR,
    );
}

fn rc16(alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[test]
fn capacity() {
    let (b, lun) = dev(true);
    let r = run(&lun, &b, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data_in, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let r = run(&lun, &b, &rc16(32), &[]);
    assert_eq!(r.data_in.len(), 32);
    assert_eq!(&r.data_in[0..8], &2047u64.to_be_bytes());
    assert_eq!(&r.data_in[8..12], &512u32.to_be_bytes());
    assert_eq!(r.data_in[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    // Allocation length truncates; other service actions are refused.
    assert_eq!(data_in_len(&lun, &b, &rc16(12)), 12);
    let mut c = rc16(32);
    c[1] = 0x12;
    assert_illegal(&lun, &b, &c, asc::INVALID_FIELD_IN_CDB);
}

fn vpd(lun: &LunInfo, b: &dyn BlockBackend, page: u8) -> Vec<u8> {
    let r = run(lun, b, &[0x12, 1, page, 0x10, 0, 0], &[]);
    assert_eq!(r.status, status::GOOD, "VPD page {page:#x}");
    assert_eq!(r.data_in[1], page);
    let len = u16::from_be_bytes([r.data_in[2], r.data_in[3]]) as usize;
    assert_eq!(r.data_in.len(), 4 + len, "page length of {page:#x}");
    r.data_in
}

#[test]
fn inquiry_standard_and_vpd() {
    let (b, lun) = dev(true);
    let illegal = |cdb: &[u8], code| assert_illegal(&lun, &b, cdb, code);
    let r = run(&lun, &b, &[0x12, 0, 0, 0, 96, 0], &[]);
    let d = &r.data_in;
    assert_eq!(d[0], 0, "direct-access block device");
    assert_eq!(d[2], 6, "SPC-4");
    assert_eq!(d[3] & 0x0f, 2, "response data format 2");
    assert_eq!(usize::from(d[4]) + 5, d.len());
    assert_eq!(&d[8..16], b"OBD     ");
    assert_eq!(&d[16..32], b"overlaybd       ");
    assert_eq!(data_in_len(&lun, &b, &[0x12, 0, 0, 0, 36, 0]), 36);
    // Page code without EVPD; CMDDT.
    illegal(&[0x12, 0, 0x80, 0, 96, 0], asc::INVALID_FIELD_IN_CDB);
    illegal(&[0x12, 2, 0, 0, 96, 0], asc::INVALID_FIELD_IN_CDB);

    assert_eq!(
        &vpd(&lun, &b, 0x00)[4..],
        &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]
    );
    assert_eq!(&vpd(&lun, &b, 0x80)[4..], b"dev-1");
    let p83 = vpd(&lun, &b, 0x83);
    // NAA designator: binary, LU, type 3, 8 bytes, NAA 5 with OUI 00-14-05.
    assert_eq!(&p83[4..8], &[0x01, 0x03, 0x00, 0x08]);
    assert_eq!(p83[8] >> 4, 5);
    assert_eq!(u64::from_be_bytes(p83[8..16].try_into().unwrap()), lun.naa);
    assert_eq!(lun.naa, scsi::naa_for("dev-1"));
    assert_eq!(&p83[16..18], &[0x02, 0x01]);

    let b0 = vpd(&lun, &b, 0xb0);
    assert_eq!(b0.len(), 64);
    let be32 = |o: usize| u32::from_be_bytes(b0[o..o + 4].try_into().unwrap());
    assert_eq!(be32(8), 2048, "max transfer length: 1 MiB");
    assert_eq!(be32(20), lun.max_unmap_blocks);
    assert!(be32(20) > 0);
    assert_eq!(be32(24), 256, "max unmap descriptors");
    assert_eq!(
        u64::from_be_bytes(b0[36..44].try_into().unwrap()),
        lun.max_write_same_blocks
    );
    let b1 = vpd(&lun, &b, 0xb1);
    assert_eq!(&b1[4..6], &[0, 1], "non-rotating");
    let b2 = vpd(&lun, &b, 0xb2);
    assert_eq!(b2[5] & 0xe0, 0xe0, "LBPU, LBPWS, LBPWS10");
    assert_eq!(b2[6] & 0x07, 2, "thin provisioned");
    illegal(&[0x12, 1, 0x89, 0, 96, 0], asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn mode_sense_pages() {
    let (b, lun) = dev(true);
    let illegal = |cdb: &[u8], code| assert_illegal(&lun, &b, cdb, code);
    // MODE SENSE(6), all pages, with a block descriptor.
    let r = run(&lun, &b, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    let d = &r.data_in;
    assert_eq!(usize::from(d[0]) + 1, d.len());
    assert_eq!(d[2], 0, "not write protected, no DPOFUA");
    assert_eq!(d[3], 8, "one block descriptor");
    assert_eq!(&d[4..8], &2048u32.to_be_bytes());
    assert_eq!(&d[9..12], &[0, 2, 0]);
    assert_eq!(&d[12..14], &[0x08, 0x12], "caching page");
    assert_eq!(d[14] & 0x04, 0, "WCE off");
    assert_eq!(&d[32..34], &[0x0a, 0x0a], "control page");
    assert_eq!(d.len(), 44);
    // Caching page only, DBD.
    let r = run(&lun, &b, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]);
    assert_eq!(r.data_in.len(), 4 + 20);
    assert_eq!(r.data_in[4], 0x08);
    // MODE SENSE(10) with long LBA descriptors.
    let r = run(&lun, &b, &[0x5a, 0x10, 0x0a, 0, 0, 0, 0, 0, 255, 0], &[]);
    let d = &r.data_in;
    assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])) + 2, d.len());
    assert_eq!(d[4] & 1, 1, "LONGLBA");
    assert_eq!(&d[6..8], &[0, 16]);
    assert_eq!(&d[8..16], &2048u64.to_be_bytes());
    assert_eq!(d[24], 0x0a);
    // Allocation length truncates.
    assert_eq!(data_in_len(&lun, &b, &[0x1a, 0, 0x3f, 0, 4, 0]), 4);
    // Saved values; unknown page.
    illegal(
        &[0x1a, 0, 0xc8, 0, 255, 0],
        asc::SAVING_PARAMETERS_NOT_SUPPORTED,
    );
    illegal(&[0x1a, 0, 0x1c, 0, 255, 0], asc::INVALID_FIELD_IN_CDB);
    // MODE SELECT is accepted (nothing is changeable).
    assert_eq!(run(&lun, &b, &[0x15, 0x10, 0, 0, 0, 0], &[]).status, 0);
}

#[test]
fn housekeeping_commands() {
    let (b, lun) = dev(true);
    for cdb in [
        vec![0x00, 0, 0, 0, 0, 0],
        vec![0x1b, 0, 0, 0, 1, 0],
        vec![0x1e, 0, 0, 0, 0, 0],
        cdb10(0x35, 0, 0),
        cdb16(0x91, 0, 2048),
        cdb10(0x2f, 0, 8),
    ] {
        assert_eq!(run(&lun, &b, &cdb, &[]).status, status::GOOD, "{cdb:x?}");
    }
    assert_illegal(&lun, &b, &cdb16(0x91, 4000, 1), asc::LBA_OUT_OF_RANGE);
    let r = run(&lun, &b, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!((r.data_in[0], r.data_in[2]), (0x70, key::NO_SENSE));
    let r = run(&lun, &b, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]);
    assert_eq!(r.data_in, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn data_out_classification() {
    for op in [0x0a, 0x2a, 0xaa, 0x8a, 0x41, 0x93, 0x42, 0x15, 0x55] {
        assert!(scsi::is_data_out(&[op]), "{op:#x}");
    }
    for op in [0x00, 0x08, 0x28, 0x12, 0x1a, 0x25, 0x9e, 0x35, 0xa0] {
        assert!(!scsi::is_data_out(&[op]), "{op:#x}");
    }
}
