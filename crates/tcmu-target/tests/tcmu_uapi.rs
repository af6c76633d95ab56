//! The hand-written `target_core_user.h` structs match the kernel's layout
//! (sizes and offsets as gcc lays out the header on x86-64).

use std::mem::{align_of, offset_of, size_of};

use tcmu_target::tcmu::uapi::*;

#[test]
fn mailbox_layout() {
    assert_eq!(size_of::<TcmuMailbox>(), 128);
    assert_eq!(align_of::<TcmuMailbox>(), 64);
    assert_eq!(offset_of!(TcmuMailbox, version), mb::VERSION);
    assert_eq!(offset_of!(TcmuMailbox, flags), mb::FLAGS);
    assert_eq!(offset_of!(TcmuMailbox, cmdr_off), mb::CMDR_OFF);
    assert_eq!(offset_of!(TcmuMailbox, cmdr_size), mb::CMDR_SIZE);
    assert_eq!(offset_of!(TcmuMailbox, cmd_head), mb::CMD_HEAD);
    assert_eq!(offset_of!(TcmuMailbox, cmd_tail), mb::CMD_TAIL);
    assert_eq!(mb::CMD_TAIL, ALIGN_SIZE);
    assert_eq!(mb::SIZE, size_of::<TcmuMailbox>());
}

#[test]
fn entry_header_layout() {
    assert_eq!(size_of::<TcmuCmdEntryHdr>(), ent::HDR_SIZE);
    assert_eq!(offset_of!(TcmuCmdEntryHdr, len_op), ent::LEN_OP);
    assert_eq!(offset_of!(TcmuCmdEntryHdr, cmd_id), ent::CMD_ID);
    assert_eq!(offset_of!(TcmuCmdEntryHdr, kflags), ent::KFLAGS);
    assert_eq!(offset_of!(TcmuCmdEntryHdr, uflags), ent::UFLAGS);
}

#[test]
fn cmd_entry_layout() {
    assert_eq!(size_of::<TcmuCmdEntry>(), ent::SIZE);
    assert_eq!(size_of::<TcmuCmdEntry>(), 112);
    let body = offset_of!(TcmuCmdEntry, body);
    assert_eq!(body, 8);
    // Request.
    assert_eq!(body + offset_of!(TcmuReq, iov_cnt), ent::IOV_CNT);
    assert_eq!(body + offset_of!(TcmuReq, iov_bidi_cnt), ent::IOV_BIDI_CNT);
    assert_eq!(body + offset_of!(TcmuReq, iov_dif_cnt), ent::IOV_DIF_CNT);
    assert_eq!(body + offset_of!(TcmuReq, cdb_off), ent::CDB_OFF);
    assert_eq!(ent::CDB_OFF, 24);
    assert_eq!(body + offset_of!(TcmuReq, pad1), 32);
    assert_eq!(body + offset_of!(TcmuReq, pad2), 40);
    assert_eq!(body + offset_of!(TcmuReq, iov), ent::IOV);
    assert_eq!(ent::IOV, 48);
    assert_eq!(size_of::<Iovec>(), ent::IOVEC_SIZE);
    assert_eq!(offset_of!(Iovec, len), 8);
    // Response, overlaying the request.
    assert_eq!(body + offset_of!(TcmuRsp, scsi_status), ent::SCSI_STATUS);
    assert_eq!(body + offset_of!(TcmuRsp, read_len), ent::READ_LEN);
    assert_eq!(body + offset_of!(TcmuRsp, sense_buffer), ent::SENSE);
    assert_eq!(ent::SENSE + TCMU_SENSE_BUFFERSIZE, ent::SIZE);
    assert_eq!(size_of::<TcmuCmdEntryBody>(), 104);
}

#[test]
fn tmr_entry_layout() {
    assert_eq!(size_of::<TcmuTmrEntry>(), ent::TMR_SIZE);
    assert_eq!(offset_of!(TcmuTmrEntry, tmr_type), ent::TMR_TYPE);
    assert_eq!(offset_of!(TcmuTmrEntry, cmd_cnt), ent::TMR_CMD_CNT);
    assert_eq!(offset_of!(TcmuTmrEntry, cmd_ids), ent::TMR_CMD_IDS);
}

#[test]
fn constants_and_helpers() {
    assert_eq!(TCMU_MAILBOX_VERSION, 2);
    assert_eq!((TCMU_OP_PAD, TCMU_OP_CMD, TCMU_OP_TMR), (0, 1, 2));
    assert_eq!(
        (
            TCMU_UFLAG_UNKNOWN_OP,
            TCMU_UFLAG_READ_LEN,
            TCMU_UFLAG_KEEP_BUF
        ),
        (1, 2, 4)
    );
    assert_eq!(
        (
            TCMU_MAILBOX_FLAG_CAP_OOOC,
            TCMU_MAILBOX_FLAG_CAP_READ_LEN,
            TCMU_MAILBOX_FLAG_CAP_TMR,
            TCMU_MAILBOX_FLAG_CAP_KEEP_BUF
        ),
        (1, 2, 4, 8)
    );
    let lo = make_len_op(136, TCMU_OP_CMD);
    assert_eq!((hdr_len(lo), hdr_op(lo)), (136, TCMU_OP_CMD));
    // scsi_command_size: groups 0..7, and variable length.
    assert_eq!(scsi_command_size(0x28, 0), 10);
    assert_eq!(scsi_command_size(0x08, 0), 6);
    assert_eq!(scsi_command_size(0x88, 0), 16);
    assert_eq!(scsi_command_size(0xa8, 0), 12);
    assert_eq!(scsi_command_size(0x7f, 24), 32);
    // Entry sizes as tcmu_cmd_get_cmd_size computes them.
    assert_eq!(base_cmd_entry_size(0), 112);
    assert_eq!(base_cmd_entry_size(4), 112);
    assert_eq!(base_cmd_entry_size(5), 128);
    assert_eq!(cmd_entry_size(1, 10), 128);
    assert_eq!(cmd_entry_size(8, 16), 48 + 128 + 16);
}
