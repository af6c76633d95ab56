//! The TCMU ring against a simulated kernel: decoding, PAD and wrap-around,
//! out-of-order completion, many commands in flight, TMR, UNKNOWN_OP, corrupt
//! entries, and the threaded server end to end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tcmu_target::tcmu::ring::{Defect, Request, Response, Ring};
use tcmu_target::tcmu::scsi::{self, LunInfo};
use tcmu_target::tcmu::server::Server;
use tcmu_target::tcmu::sim::{DataDir, KernelSim, QueueError, SimCompletion, SimDoorbell};
use tcmu_target::tcmu::uapi::{self, ent};
use tcmu_target::{BlockBackend, Error, MemBackend};

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

fn cmds(reqs: Vec<Request>) -> Vec<tcmu_target::tcmu::ring::Command> {
    reqs.into_iter()
        .filter_map(|r| match r {
            Request::Cmd(c) => Some(c),
            Request::Tmr(_) => None,
        })
        .collect()
}

fn status(s: u8) -> Response {
    Response {
        status: s,
        ..Response::default()
    }
}

/// Deterministic pseudo-random numbers (xorshift), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn decodes_a_command() {
    let mut sim = KernelSim::new(64 * 1024, 64);
    let id = sim
        .submit(&read10(7, 16), DataDir::FromDevice(8192))
        .unwrap();
    assert_eq!(id, 1);
    let mut ring = Ring::open(sim.region()).unwrap();
    assert_eq!(ring.cmdr_size(), 64 * 1024);
    let c = cmds(ring.poll().unwrap());
    assert_eq!(c.len(), 1);
    let c = &c[0];
    assert_eq!(c.cmd_id, 1);
    assert_eq!(c.cdb, read10(7, 16));
    assert_eq!(c.iovs.len(), 1, "contiguous blocks share one iovec");
    assert_eq!(c.data_len(), 8192);
    assert!(c.iovs[0].base >= ring.data_off());
    assert!(c.bidi_iovs.is_empty());
    assert_eq!(c.defect, None);
    assert_eq!(ring.outstanding(), 1);
    // Nothing new on a second poll.
    assert!(ring.poll().unwrap().is_empty());
    ring.complete(1, &status(0)).unwrap();
    assert_eq!(ring.outstanding(), 0);
    let done = sim.reap().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].cmd_id, done[0].status), (1, 0));
    assert_eq!(sim.tail(), sim.head());
}

#[test]
fn scattered_data_blocks_become_several_iovecs() {
    let mut sim = KernelSim::new(64 * 1024, 16);
    sim.scatter_blocks = true;
    let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
    sim.submit(&write10(0, 25), DataDir::ToDevice(data.clone()))
        .unwrap();
    let mut ring = Ring::open(sim.region()).unwrap();
    let c = cmds(ring.poll().unwrap()).remove(0);
    assert_eq!(c.iovs.len(), 4);
    assert_eq!(c.data_len(), data.len() as u64);
    assert_eq!(ring.gather(&c.iovs).unwrap(), data);
}

/// A ring of `size` bytes (16 data blocks) whose head and tail start at
/// `position`, and our side of it.
fn ring_at(size: u32, position: u32) -> (KernelSim, Ring) {
    let mut sim = KernelSim::new(size, 16);
    sim.set_position(position);
    let ring = Ring::open(sim.region()).unwrap();
    (sim, ring)
}

#[test]
fn pad_at_the_end_of_the_ring_and_wrap_around() {
    let size = 1024;
    // 112 + 16 bytes per command: start 64 bytes before the end.
    let (mut sim, mut ring) = ring_at(size, size - 64);
    assert_eq!(ring.tail(), size - 64);
    let id = sim.submit(&read10(0, 1), DataDir::FromDevice(512)).unwrap();
    assert_eq!(sim.head(), 128, "PAD of 64 bytes, then the entry at 0");
    let c = cmds(ring.poll().unwrap());
    assert_eq!(c.len(), 1, "the PAD is not a command");
    assert_eq!(c[0].cmd_id, id);
    ring.complete(id, &status(0)).unwrap();
    assert_eq!(ring.tail(), 128);
    let done = sim.reap().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(sim.tail(), 128);
}

#[test]
fn pad_and_tmr_at_the_tail_are_released_without_a_command() {
    let size = 1024;
    let (mut sim, mut ring) = ring_at(size, size - 16);
    sim.submit_tmr(uapi::tmr::LUN_RESET, &[3, 4]).unwrap();
    let reqs = ring.poll().unwrap();
    assert_eq!(reqs.len(), 1);
    match &reqs[0] {
        Request::Tmr(t) => {
            assert_eq!(t.tmr_type, uapi::tmr::LUN_RESET);
            assert_eq!(t.cmd_ids, vec![3, 4]);
        }
        r => panic!("expected a TMR, got {r:?}"),
    }
    assert!(ring.release_non_cmds().unwrap());
    assert_eq!(ring.tail(), sim.head());
    assert!(sim.reap().unwrap().is_empty());
}

#[test]
fn out_of_order_completion_rewrites_cmd_id_at_the_tail() {
    let mut sim = KernelSim::new(64 * 1024, 64);
    let a = sim.submit(&read10(0, 1), DataDir::FromDevice(512)).unwrap();
    let b = sim.submit(&read10(1, 1), DataDir::FromDevice(512)).unwrap();
    let c = sim.submit(&read10(2, 1), DataDir::FromDevice(512)).unwrap();
    let mut ring = Ring::open(sim.region()).unwrap();
    assert_eq!(cmds(ring.poll().unwrap()).len(), 3);

    // C finishes first: its answer goes into A's slot.
    ring.complete(c, &status(0x08)).unwrap();
    let done = sim.reap().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].cmd_id, done[0].status), (c, 0x08));
    assert_eq!(sim.in_flight(), 2);

    ring.complete(a, &status(0)).unwrap();
    ring.complete(b, &status(0x02)).unwrap();
    let done = sim.reap().unwrap();
    let got: Vec<(u16, u8)> = done.iter().map(|d| (d.cmd_id, d.status)).collect();
    assert_eq!(got, vec![(a, 0), (b, 0x02)]);
    assert_eq!(sim.in_flight(), 0);
    assert_eq!(sim.tail(), sim.head());
}

#[test]
fn unknown_op_sense_and_read_len_reach_the_kernel() {
    let mut sim = KernelSim::new(64 * 1024, 64);
    let a = sim
        .submit(&[0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0], DataDir::None)
        .unwrap();
    let b = sim.submit(&read10(0, 1), DataDir::FromDevice(512)).unwrap();
    let mut ring = Ring::open(sim.region()).unwrap();
    ring.poll().unwrap();
    ring.complete(
        a,
        &Response {
            status: 2,
            unknown_op: true,
            ..Response::default()
        },
    )
    .unwrap();
    let sense = scsi::fixed_sense(scsi::key::ILLEGAL_REQUEST, scsi::asc::LBA_OUT_OF_RANGE);
    ring.complete(
        b,
        &Response {
            status: 2,
            sense: sense.clone(),
            read_len: Some(100),
            unknown_op: false,
        },
    )
    .unwrap();
    let done = sim.reap().unwrap();
    assert_eq!(done[0].uflags & uapi::TCMU_UFLAG_UNKNOWN_OP, 1);
    assert_eq!(done[1].uflags, uapi::TCMU_UFLAG_READ_LEN);
    assert_eq!(&done[1].sense[..sense.len()], &sense[..]);
    assert!(done[1].sense[sense.len()..].iter().all(|&b| b == 0));
    assert_eq!(done[1].data_in.len(), 100);
}

#[test]
fn completion_without_an_outstanding_command_is_an_error() {
    let sim = KernelSim::new(4096, 4);
    let mut ring = Ring::open(sim.region()).unwrap();
    assert!(matches!(
        ring.complete(1, &status(0)),
        Err(Error::Protocol(_))
    ));
}

#[test]
fn corrupt_entry_header_is_a_protocol_error() {
    // Length 0: the walk cannot continue; an entry longer than what was
    // queued; an unknown opcode.
    for len_op in [
        uapi::make_len_op(0, uapi::TCMU_OP_CMD),
        uapi::make_len_op(512, uapi::TCMU_OP_CMD),
        uapi::make_len_op(16, 5),
    ] {
        let mut sim = KernelSim::new(4096, 4);
        let mut ring = Ring::open(sim.region()).unwrap();
        let mut e = vec![0u8; 16];
        e[0..4].copy_from_slice(&len_op.to_ne_bytes());
        sim.push_raw(&e).unwrap();
        assert!(
            matches!(ring.poll(), Err(Error::Protocol(_))),
            "len_op {len_op:#x}"
        );
    }
}

fn raw_cmd(cmd_id: u16, cdb_off: u64, iov: Option<(u64, u64)>) -> Vec<u8> {
    let mut e = vec![0u8; 128];
    e[0..4].copy_from_slice(&uapi::make_len_op(128, uapi::TCMU_OP_CMD).to_ne_bytes());
    e[ent::CMD_ID..ent::CMD_ID + 2].copy_from_slice(&cmd_id.to_ne_bytes());
    e[ent::CDB_OFF..ent::CDB_OFF + 8].copy_from_slice(&cdb_off.to_ne_bytes());
    if let Some((base, len)) = iov {
        e[ent::IOV_CNT..ent::IOV_CNT + 4].copy_from_slice(&1u32.to_ne_bytes());
        e[ent::IOV..ent::IOV + 8].copy_from_slice(&base.to_ne_bytes());
        e[ent::IOV + 8..ent::IOV + 16].copy_from_slice(&len.to_ne_bytes());
    }
    e
}

#[test]
fn malformed_commands_are_flagged_not_fatal() {
    let mut sim = KernelSim::new(4096, 4);
    let mut ring = Ring::open(sim.region()).unwrap();
    let cdb_at = 128 + 112; // inside the entry, after the base part
                            // An iovec pointing into the mailbox.
    sim.push_raw(&raw_cmd(9, cdb_at, Some((0, 64)))).unwrap();
    // A CDB outside the mapping.
    sim.push_raw(&raw_cmd(10, u64::MAX - 4, None)).unwrap();
    // An iovec running past the end of the mapping.
    sim.push_raw(&raw_cmd(11, cdb_at + 256, Some((4096 + 128, 1 << 40))))
        .unwrap();
    // Two in-bounds iovecs that overlap: more bytes than the data area holds.
    let mut e = raw_cmd(12, cdb_at + 512, Some((4096 + 128, 4 * 4096)));
    e[ent::IOV_CNT..ent::IOV_CNT + 4].copy_from_slice(&2u32.to_ne_bytes());
    e[ent::IOV + 16..ent::IOV + 24].copy_from_slice(&(4096u64 + 128).to_ne_bytes());
    e[ent::IOV + 24..ent::IOV + 32].copy_from_slice(&(4u64 * 4096).to_ne_bytes());
    sim.push_raw(&e).unwrap();
    let c = cmds(ring.poll().unwrap());
    assert_eq!(c.len(), 4);
    assert!(matches!(c[3].defect, Some(Defect::BadIovec(ref w)) if w.contains("exceed")));
    assert!(c[3].iovs.is_empty());
    assert!(matches!(c[0].defect, Some(Defect::BadIovec(_))));
    assert!(matches!(c[1].defect, Some(Defect::BadCdb(_))));
    assert!(matches!(c[2].defect, Some(Defect::BadIovec(_))));
    assert_eq!(c[0].cmd_id, 9);
}

#[test]
fn reopen_starts_at_the_tail() {
    let mut sim = KernelSim::new(4096, 8);
    let a = sim.submit(&read10(0, 1), DataDir::FromDevice(512)).unwrap();
    let b = sim.submit(&read10(1, 1), DataDir::FromDevice(512)).unwrap();
    {
        let mut ring = Ring::open(sim.region()).unwrap();
        ring.poll().unwrap();
        ring.complete(a, &status(0)).unwrap();
    }
    let mut ring = Ring::open(sim.region()).unwrap();
    let c = cmds(ring.poll().unwrap());
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].cmd_id, b);
    ring.complete(b, &status(0)).unwrap();
    assert_eq!(sim.reap().unwrap().len(), 2);
}

#[test]
fn bad_mailbox_is_refused() {
    let sim = KernelSim::new(4096, 4);
    let r = sim.region();
    r.write_u16(0, 1).unwrap();
    assert!(matches!(Ring::open(r.clone()), Err(Error::Unsupported(_))));
    r.write_u16(0, 2).unwrap();
    r.write_u32(8, 1 << 30).unwrap();
    assert!(matches!(Ring::open(r), Err(Error::Protocol(_))));
}

/// Many commands in flight on a small ring, completed in random order, with TMRs
/// mixed in: every command is answered exactly once with its own status, across
/// many wrap-arounds.
#[test]
fn random_completion_order_over_many_wraps() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut sim = KernelSim::new(2048, 64);
    let mut ring = Ring::open(sim.region()).unwrap();
    let mut pending: Vec<u16> = Vec::new();
    let mut expect: BTreeMap<u16, u8> = BTreeMap::new();
    let mut answered = 0usize;
    let mut wraps = 0;
    let mut last_head = 0;
    for round in 0..4000 {
        // Queue a few, if they fit.
        for _ in 0..rng.below(4) {
            let blocks = 1 + rng.below(3) as usize;
            let dir = if rng.below(2) == 0 {
                DataDir::FromDevice(blocks * 4096)
            } else {
                DataDir::ToDevice(vec![round as u8; blocks * 4096 - 7])
            };
            if rng.below(10) == 0 {
                let _ = sim.submit_tmr(uapi::tmr::ABORT_TASK, &[1, 2, 3]);
            }
            match sim.submit(&read10(round, blocks as u16), dir) {
                Ok(_) => {}
                Err(QueueError::RingFull | QueueError::DataFull | QueueError::NoId) => break,
            }
            if sim.head() < last_head {
                wraps += 1;
            }
            last_head = sim.head();
        }
        for c in cmds(ring.poll().unwrap()) {
            assert_eq!(c.defect, None);
            pending.push(c.cmd_id);
        }
        ring.release_non_cmds().unwrap();
        // Complete a random subset in random order.
        let n = rng.below(pending.len() as u64 + 1) as usize;
        for _ in 0..n {
            let i = rng.below(pending.len() as u64) as usize;
            let id = pending.swap_remove(i);
            let st = (rng.below(200) as u8) | 1;
            ring.complete(id, &status(st)).unwrap();
            assert!(expect.insert(id, st).is_none());
        }
        for d in sim.reap().unwrap() {
            let want = expect.remove(&d.cmd_id).expect("answered once");
            assert_eq!(d.status, want, "command {}", d.cmd_id);
            answered += 1;
        }
    }
    assert!(wraps > 20, "only {wraps} wrap-arounds");
    assert!(answered > 1000, "only {answered} commands");
}

// ---- the threaded server against the simulator

fn serve(
    sim: &mut KernelSim,
    backend: Arc<dyn BlockBackend>,
    workers: usize,
) -> (Server, Arc<SimDoorbell>) {
    let bell = SimDoorbell::new();
    sim.connect(bell.clone());
    let ring = Ring::open(sim.region()).unwrap();
    let lun = LunInfo::new("sim", backend.as_ref());
    let server = Server::start(ring, bell.clone(), backend, lun, workers).unwrap();
    (server, bell)
}

fn reap_until(sim: &mut KernelSim, n: usize) -> Vec<SimCompletion> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(sim.reap().unwrap());
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {} of {n} completions",
            out.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

#[test]
fn server_reads_and_writes_through_the_ring() {
    let mut sim = KernelSim::new(8192, 256);
    let image: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let backend = Arc::new(MemBackend::new(image.clone(), false));
    let (server, bell) = serve(&mut sim, backend.clone(), 4);

    // Read 64 KiB at LBA 100.
    let id = sim
        .submit(&read10(100, 128), DataDir::FromDevice(65536))
        .unwrap();
    let d = reap_until(&mut sim, 1).remove(0);
    assert_eq!((d.cmd_id, d.status), (id, 0));
    assert_eq!(d.data_in, &image[100 * 512..100 * 512 + 65536]);
    assert!(bell.kicks() >= 1);

    // Write 8 KiB at LBA 8, read it back.
    let data = vec![0xabu8; 8192];
    sim.submit(&write10(8, 16), DataDir::ToDevice(data.clone()))
        .unwrap();
    assert_eq!(reap_until(&mut sim, 1)[0].status, 0);
    assert_eq!(&backend.snapshot()[4096..4096 + 8192], &data[..]);

    // Out of range: CHECK CONDITION, ILLEGAL REQUEST / LBA OUT OF RANGE.
    sim.submit(&read10(2048, 1), DataDir::FromDevice(512))
        .unwrap();
    let d = reap_until(&mut sim, 1).remove(0);
    assert_eq!(d.status, scsi::status::CHECK_CONDITION);
    assert_eq!((d.sense[0], d.sense[2], d.sense[12]), (0x70, 5, 0x21));

    // A short INQUIRY answer is zero-filled up to the allocation length, even
    // over stale data-area bytes.
    let junk = vec![0xeeu8; 4096];
    sim.submit(&write10(0, 8), DataDir::ToDevice(junk)).unwrap();
    reap_until(&mut sim, 1);
    sim.submit(&[0x12, 0, 0, 0x01, 0x00, 0], DataDir::FromDevice(256))
        .unwrap();
    let d = reap_until(&mut sim, 1).remove(0);
    assert_eq!(d.status, 0);
    assert_eq!(&d.data_in[8..11], b"OBD");
    assert!(d.data_in[66..].iter().all(|&b| b == 0));
    assert_eq!(server.broken(), None);
    server.stop();
}

#[test]
fn server_keeps_many_commands_in_flight_and_wraps() {
    // A slow backend, so completions really overlap and finish out of order.
    struct Slow(MemBackend);
    impl BlockBackend for Slow {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_micros(200 + (off % 7) * 150));
            self.0.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_micros(100 + (off % 5) * 150));
            self.0.write_at(buf, off)
        }
        fn discard(&self, off: u64, len: u64) -> std::io::Result<()> {
            self.0.discard(off, len)
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let blocks = 4096u32; // 2 MiB of 512-byte blocks
    let backend = Arc::new(Slow(MemBackend::new(vec![0; blocks as usize * 512], false)));
    let mut sim = KernelSim::new(1536, 128);
    sim.scatter_blocks = true;
    let (server, _bell) = serve(&mut sim, backend.clone(), 6);

    // Commands use 16-block lanes, at most one command per lane at a time, so
    // every read has exactly one expected content.
    let mut rng = Rng(42);
    let lanes = blocks / 16;
    let mut model = vec![0u8; blocks as usize * 512];
    let mut busy = vec![false; lanes as usize];
    // cmd id -> (lane offset, Some(write data) | None for a read of len bytes, len)
    let mut want: BTreeMap<u16, (usize, Option<Vec<u8>>, usize)> = BTreeMap::new();
    let mut max_in_flight = 0;
    let mut done = 0;
    let mut i = 0usize;
    let check = |d: SimCompletion,
                 want: &mut BTreeMap<u16, (usize, Option<Vec<u8>>, usize)>,
                 busy: &mut Vec<bool>,
                 model: &mut Vec<u8>| {
        assert_eq!(d.status, 0, "command {}", d.cmd_id);
        let (off, w, len) = want.remove(&d.cmd_id).expect("a known command, once");
        match w {
            Some(data) => model[off..off + data.len()].copy_from_slice(&data),
            None => assert_eq!(d.data_in, &model[off..off + len], "read at {off}"),
        }
        busy[off / (16 * 512)] = false;
    };
    while done < 1500 {
        // Queue until the ring or the data area is full, or the lane is busy.
        loop {
            let lane = rng.below(u64::from(lanes)) as u32;
            if busy[lane as usize] {
                break;
            }
            let lba = lane * 16 + rng.below(8) as u32;
            let n = 1 + rng.below(8) as u16;
            let len = usize::from(n) * 512;
            let off = lba as usize * 512;
            let res = if rng.below(2) == 0 {
                let data: Vec<u8> = (0..len).map(|k| (i * 31 + k) as u8).collect();
                sim.submit(&write10(lba, n), DataDir::ToDevice(data.clone()))
                    .map(|id| (id, Some(data)))
            } else {
                sim.submit(&read10(lba, n), DataDir::FromDevice(len))
                    .map(|id| (id, None))
            };
            match res {
                Ok((id, w)) => {
                    i += 1;
                    busy[lane as usize] = true;
                    want.insert(id, (off, w, len));
                }
                Err(_) => break,
            }
            max_in_flight = max_in_flight.max(sim.in_flight());
        }
        for d in sim.reap().unwrap() {
            check(d, &mut want, &mut busy, &mut model);
            done += 1;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    let n = want.len();
    for d in reap_until(&mut sim, n) {
        check(d, &mut want, &mut busy, &mut model);
    }
    assert!(max_in_flight >= 6, "max in flight {max_in_flight}");
    assert_eq!(server.broken(), None);
    server.stop();
    assert!(
        backend.0.snapshot() == model,
        "the device differs from the model"
    );
}

#[test]
fn server_answers_unknown_cdb_with_unknown_op() {
    let mut sim = KernelSim::new(4096, 8);
    let backend = Arc::new(MemBackend::new(vec![0; 65536], false));
    let (server, _bell) = serve(&mut sim, backend, 2);
    sim.push_raw(&raw_cmd(7, u64::MAX - 4, None)).unwrap();
    // push_raw does not register the id with the simulator: read the entry back.
    let start = Instant::now();
    while sim.tail() != sim.head() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = sim.region();
    let uflags = r.read_u8(128 + ent::UFLAGS as u64).unwrap();
    assert_eq!(
        uflags & uapi::TCMU_UFLAG_UNKNOWN_OP,
        uapi::TCMU_UFLAG_UNKNOWN_OP
    );
    assert_eq!(r.read_u16(128 + ent::CMD_ID as u64).unwrap(), 7);
    server.stop();
}

#[test]
fn server_stops_on_a_corrupt_ring() {
    let mut sim = KernelSim::new(4096, 8);
    let backend = Arc::new(MemBackend::new(vec![0; 65536], false));
    let (server, _bell) = serve(&mut sim, backend, 1);
    let mut e = vec![0u8; 16];
    e[0..4].copy_from_slice(&uapi::make_len_op(0, uapi::TCMU_OP_CMD).to_ne_bytes());
    sim.push_raw(&e).unwrap();
    let start = Instant::now();
    while server.broken().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(server.broken().unwrap().contains("length 0"));
    server.stop();
}

/// Garbage in the ring (random headers, lengths, opcodes, offsets and iovecs)
/// yields errors or defects, never a panic or an out-of-bounds access.
#[test]
fn random_ring_contents_never_panic() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (mut parsed, mut defects) = (0usize, 0usize);
    for _ in 0..8000 {
        let sim = KernelSim::new(1024, 4);
        let r = sim.region();
        let mut junk: Vec<u8> = (0..1024).map(|_| rng.next() as u8).collect();
        // A chain of plausible entries from the tail, then some damage.
        let tail = 8 * rng.below(128) as usize;
        let mut at = tail;
        for _ in 0..rng.below(10) {
            let room = 1024 - at;
            let len = (8 * (1 + rng.below(40)) as usize).min(room);
            let op = [1, 1, 1, 0, 2, 3, 1][rng.below(7) as usize];
            junk[at..at + 4].copy_from_slice(&uapi::make_len_op(len as u32, op).to_ne_bytes());
            if len >= 32 {
                // Few iovecs, a CDB somewhere in the mapping (or not).
                let n = rng.below(4) as u32;
                junk[at + 8..at + 12].copy_from_slice(&n.to_ne_bytes());
                junk[at + 12..at + 20].fill(0);
                let cdb = if rng.below(4) == 0 {
                    rng.next()
                } else {
                    128 + rng.below(1024 + 4 * 4096)
                };
                junk[at + 24..at + 32].copy_from_slice(&cdb.to_ne_bytes());
                for k in 0..n as usize {
                    let o = at + 48 + 16 * k;
                    if o + 16 <= at + len {
                        let base = 1152 + rng.below(5 * 4096);
                        junk[o..o + 8].copy_from_slice(&base.to_ne_bytes());
                        junk[o + 8..o + 16].copy_from_slice(&rng.below(8192).to_ne_bytes());
                    }
                }
            }
            at = (at + len) % 1024;
        }
        let mut head = at;
        if rng.below(5) == 0 {
            head = 8 * rng.below(128) as usize;
        }
        if rng.below(5) == 0 {
            let i = rng.below(1024) as usize;
            junk[i] = rng.next() as u8;
        }
        r.write(128, &junk).unwrap();
        r.store_release(12, head as u32).unwrap();
        r.store_release(64, tail as u32).unwrap();
        let Ok(mut ring) = Ring::open(r.clone()) else {
            continue;
        };
        let backend = MemBackend::new(vec![0; 64 * 1024], rng.below(2) == 0);
        let lun = LunInfo::new("fuzz", &backend);
        for _ in 0..3 {
            let Ok(reqs) = ring.poll() else { break };
            for c in cmds(reqs) {
                parsed += 1;
                defects += usize::from(c.defect.is_some());
                if c.defect.is_none() {
                    let out = ring.gather(&c.iovs).unwrap();
                    assert!(out.len() as u64 <= r.len() as u64 - ring.data_off());
                    let rsp = scsi::execute(&lun, &backend, &c.cdb, &out, out.len());
                    let _ = tcmu_target::tcmu::ring::scatter(&r, &c.iovs, &rsp.data_in);
                }
                let _ = ring.complete(c.cmd_id, &status(0));
            }
            let _ = ring.release_non_cmds();
        }
    }
    eprintln!("{parsed} commands parsed, {defects} with defects");
    assert!(
        parsed > 4000 && defects > 100 && parsed - defects > 1000,
        "only {parsed} commands parsed, {defects} defects"
    );
}

/// Random CDBs and parameter data against the emulation: a status and, with
/// CHECK CONDITION, fixed-format sense; never a panic.
#[test]
fn random_cdbs_never_panic() {
    let mut rng = Rng(99);
    let ops = [
        0x00u8, 0x03, 0x08, 0x0a, 0x12, 0x15, 0x1a, 0x1b, 0x1e, 0x25, 0x28, 0x2a, 0x2f, 0x35, 0x41,
        0x42, 0x55, 0x5a, 0x88, 0x8a, 0x8f, 0x91, 0x93, 0x9e, 0xa0, 0xa3, 0xa8, 0xaa, 0x7f, 0xff,
    ];
    for ro in [false, true] {
        let backend = MemBackend::new(vec![7; 256 * 1024], ro);
        let lun = LunInfo::new("fuzz", &backend);
        for _ in 0..20000 {
            let mut cdb: Vec<u8> = (0..rng.below(20)).map(|_| rng.next() as u8).collect();
            if let Some(first) = cdb.first_mut() {
                *first = ops[rng.below(ops.len() as u64) as usize];
            }
            // Small numbers in the length fields now and then.
            if cdb.len() > 9 && rng.below(2) == 0 {
                cdb[2..6].fill(0);
                cdb[6] = 0;
                cdb[7] = 0;
            }
            let out: Vec<u8> = (0..rng.below(2048)).map(|_| rng.next() as u8).collect();
            let r = scsi::execute(&lun, &backend, &cdb, &out, rng.below(1 << 20) as usize);
            match r.status {
                scsi::status::GOOD => assert!(r.sense.is_empty()),
                scsi::status::CHECK_CONDITION => {
                    assert_eq!(r.sense.len(), scsi::SENSE_LEN);
                    assert_eq!(r.sense[0], 0x70);
                    assert!(r.data_in.is_empty());
                }
                s => panic!("status {s:#x}"),
            }
        }
        if ro {
            assert!(
                backend.snapshot().iter().all(|&b| b == 7),
                "read-only device changed"
            );
        }
    }
}
