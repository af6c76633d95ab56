//! Record a trace through a real layer stack (upstream's interop stack:
//! three tar(ZFile(LSMT)) layers), write it with the lock-file protocol, and
//! replay it: every recorded range is read again, in no more requests than
//! records, and the prefetch advice reaches the stored blobs.

mod common;
use common::replay_all;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use overlaybd_core::image::{Image, ReadObserver};
use overlaybd_core::source::Blob;
use trace_replay::{replay, Recorder, ReplayOptions, Trace};
use zfile::ReadAt;

fn stack() -> Image {
    Image::open_config_file(fixtures::interop().join("stack-lz4/config.v1.json")).unwrap()
}

/// Reads `n` random ranges of the image.
fn read_some(img: &Image, seed: u64, n: usize) {
    let mut rng = fixtures::Rng::new(seed);
    let size = img.virtual_size();
    let mut buf = vec![0u8; 256 << 10];
    for _ in 0..n {
        let off = rng.below(size);
        let len = 1 + rng.below(buf.len() as u64) as usize;
        img.read_at(&mut buf[..len], off).unwrap();
    }
}

/// Waits (polling, with a deadline) until `cond` holds.
fn wait_until(what: &str, deadline: Duration, cond: impl Fn() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ranges read and advised through a layer reader.
#[derive(Default)]
struct Log {
    reads: Mutex<Vec<(u64, u64)>>,
    advised: Mutex<Vec<(u64, u64)>>,
}

struct Spy {
    inner: Blob,
    log: Arc<Log>,
}

impl ReadAt for Spy {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        self.log.reads.lock().unwrap().push((offset, n as u64));
        Ok(n)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn will_need(&self, offset: u64, len: u64) {
        self.log.advised.lock().unwrap().push((offset, len));
        self.inner.will_need(offset, len)
    }
}

/// Whether `[a, b)` is covered by the union of `ranges`.
fn covered(ranges: &[(u64, u64)], a: u64, b: u64) -> bool {
    let mut rs: Vec<(u64, u64)> = ranges.iter().map(|&(o, n)| (o, o + n)).collect();
    rs.sort_unstable();
    let mut at = a;
    for (s, e) in rs {
        if s > at {
            break;
        }
        at = at.max(e);
        if at >= b {
            return true;
        }
    }
    at >= b
}

#[test]
fn record_protocol_then_replay_covers_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace");
    std::fs::write(&path, b"").unwrap();
    assert_eq!(
        trace_replay::detect_mode(&path).unwrap(),
        trace_replay::Mode::Record
    );

    // Record: the recorder observes the image's layer-file reads.
    let rec = Recorder::start(&path).unwrap();
    let mut img = stack();
    img.set_observer(Some(rec.clone() as Arc<dyn ReadObserver>));
    let watch = rec.watch(Duration::from_millis(50));
    read_some(&img, 7, 200);
    assert!(!rec.is_empty());
    let recorded = rec.len();
    // Stop as the operator does: delete the lock; `.ok` appears.
    std::fs::remove_file(rec.lock_path()).unwrap();
    wait_until("trace.ok", Duration::from_secs(10), || {
        rec.ok_path().exists()
    });
    assert_eq!(watch.stop().unwrap().unwrap(), recorded);
    // Reads after the stop are not recorded.
    read_some(&img, 8, 10);
    assert_eq!(
        trace_replay::detect_mode(&path).unwrap(),
        trace_replay::Mode::Replay
    );
    let trace = Trace::read_file(&path).unwrap();
    assert_eq!(trace.records.len(), recorded);
    assert!(trace
        .records
        .iter()
        .all(|r| r.op == b'R' && r.layer < 3 && r.count <= 1 << 20));

    // Replay against fresh readers of the same stack.
    let img = stack();
    let logs: Vec<Arc<Log>> = (0..3).map(|_| Arc::new(Log::default())).collect();
    let spies: Vec<Spy> = img
        .layer_readers()
        .into_iter()
        .zip(&logs)
        .map(|(inner, log)| Spy {
            inner,
            log: log.clone(),
        })
        .collect();
    let layers: Vec<&dyn ReadAt> = spies.iter().map(|s| s as &dyn ReadAt).collect();
    let report = replay_all(&trace, &layers);
    assert_eq!(report.records, recorded);
    assert_eq!(report.skipped, 0);
    assert_eq!(report.errors, 0, "{report}");
    assert!(report.requests >= 1 && report.requests <= report.records);
    assert_eq!(report.done, report.requests);
    for r in &trace.records {
        let log = &logs[r.layer as usize];
        let (a, b) = (r.offset as u64, r.offset as u64 + r.count);
        assert!(
            covered(&log.reads.lock().unwrap(), a, b),
            "record {r:?} not read"
        );
        assert!(
            covered(&log.advised.lock().unwrap(), a, b),
            "record {r:?} not advised"
        );
    }
    // The bytes read are exactly the union of the records.
    let union: u64 = (0..3u32)
        .map(|l| {
            let mut rs: Vec<(u64, u64)> = trace
                .records
                .iter()
                .filter(|r| r.layer == l)
                .map(|r| (r.offset as u64, r.offset as u64 + r.count))
                .collect();
            rs.sort_unstable();
            let (mut total, mut end) = (0, 0);
            for (s, e) in rs {
                let s = s.max(end);
                if e > s {
                    total += e - s;
                    end = e;
                }
            }
            total
        })
        .sum();
    assert_eq!(report.bytes, union);
}

/// A raw blob that logs `will_need` advice.
struct AdviceSpy {
    inner: Blob,
    advised: Mutex<Vec<(u64, u64)>>,
}

impl ReadAt for AdviceSpy {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn will_need(&self, offset: u64, len: u64) {
        self.advised.lock().unwrap().push((offset, len));
    }
}

#[test]
fn prefetch_advice_maps_through_zfile_and_tar_to_the_stored_blob() {
    let p = fixtures::interop().join("stack-lz4/layer1.overlaybd.tar");
    let raw: Blob = Arc::new(zfile::FileSource::open(&p).unwrap());
    let spy = Arc::new(AdviceSpy {
        inner: raw.clone(),
        advised: Mutex::new(Vec::new()),
    });
    let img = Image::from_blobs(vec![("layer1".into(), spy.clone() as Blob)]).unwrap();
    let reader = &img.layer_readers()[0];
    assert_eq!(reader.size(), img.layers()[0].lsmt.source().size());
    let size = reader.size();
    // Opening asked for the ZFile's jump table (one range, past the data).
    let open = std::mem::take(&mut *spy.advised.lock().unwrap());
    assert_eq!(open.len(), 1, "{open:?}");
    reader.will_need(0, 1);
    reader.will_need(size - 1, 100);
    reader.will_need(0, size);
    reader.will_need(size, 10); // past the end: nothing
    let advised = spy.advised.lock().unwrap().clone();
    assert_eq!(advised.len(), 3, "{advised:?}");
    let blob = raw.size();
    for &(o, n) in &advised {
        // Inside the blob, past the tar header and the ZFile header block.
        assert!(o >= 512 + 512 && o + n <= blob, "{o}+{n} of {blob}");
        assert!(n > 0);
    }
    // Whole-file advice covers the first and the last block's advice.
    let whole = advised[2];
    for &(o, n) in &advised[..2] {
        assert!(o >= whole.0 && o + n <= whole.0 + whole.1);
    }
}

#[test]
fn replay_stops_when_asked_and_reports_bad_layers() {
    let img = stack();
    let readers = img.layer_readers();
    let layers: Vec<&dyn ReadAt> = readers.iter().map(|b| &**b as &dyn ReadAt).collect();
    let mut t = Trace::default();
    for i in 0..64 {
        t.push_read(0, i * 8192, 4096);
    }
    t.push_read(9, 0, 4096); // no such layer
    let stop = AtomicBool::new(true);
    // No merging across the 4 KiB gaps: one request per record.
    let opts = ReplayOptions {
        merge_gap: 0,
        ..Default::default()
    };
    let r = replay(&t, &layers, &opts, &stop);
    assert!(r.stopped);
    assert_eq!(r.done, 0);
    assert_eq!(r.skipped, 1);
    assert_eq!(r.requests, 64);
}
