//! Working-set packing against a per-sector model: random layer stacks, a
//! trace recorded the way the device records it (the image's read observer
//! while random disk reads run), then the packed layer. The working set is
//! the sectors the reads took from layer data, in first-read order (and, in
//! windows, by each window's first read); stacking the packed layer on top
//! changes no byte of the disk; its data is those sectors in that order; and
//! its own trace maps back to the same set.

use std::sync::{Arc, Mutex};

use overlaybd_core::image::{Image, ReadObserver};
use overlaybd_core::lsmt::{CommitOptions, CreateOptions, RoLayer, WritableLayer, SECTOR};
use proptest::prelude::*;
use trace_replay::pack::{commit_working_set, layer_trace, working_set};
use trace_replay::Trace;
use zfile::ReadAt;

/// Sectors of the test disk.
const SECTORS: u64 = 256;

/// Records what a recording device records: completed layer-file reads.
#[derive(Default)]
struct Recorder(Mutex<Trace>);

impl ReadObserver for Recorder {
    fn layer_read(&self, layer: usize, offset: u64, len: u64) {
        self.0
            .lock()
            .unwrap()
            .push_read(layer as u32, offset as i64, len);
    }
}

/// A committed layer with `writes` (sector offset, sectors), each filled
/// with bytes naming the layer, the write and the byte.
fn layer(index: usize, writes: &[(u64, u64)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        virtual_size: SECTORS * SECTOR,
        ..Default::default()
    };
    let (d, i) = (dir.path().join("d"), dir.path().join("i"));
    let mut w = WritableLayer::create(&d, &i, opts).unwrap();
    for (k, &(o, n)) in writes.iter().enumerate() {
        let n = n.min(SECTORS - o);
        let buf: Vec<u8> = (0..n * SECTOR)
            .map(|b| (index as u8).wrapping_mul(67) ^ (k as u8).wrapping_mul(13) ^ (b as u8))
            .collect();
        w.write_at(&buf, o * SECTOR).unwrap();
    }
    let mut out = Vec::new();
    w.commit(&CommitOptions::default(), &mut out).unwrap();
    out
}

fn image(blobs: &[Vec<u8>]) -> Image {
    let blobs = blobs
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("l{i}"), Arc::new(b.clone()) as Arc<dyn ReadAt>))
        .collect();
    Image::from_blobs(blobs).unwrap()
}

fn disk(img: &Image) -> Vec<u8> {
    let mut d = vec![0u8; (SECTORS * SECTOR) as usize];
    img.read_at(&mut d, 0).unwrap();
    d
}

fn writes() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0..SECTORS, 1u64..40), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn packing_keeps_the_disk_and_the_first_read_order(
        layers in prop::collection::vec(writes(), 1..4),
        reads in prop::collection::vec((0..SECTORS, 1u64..48), 1..12),
        window_shift in 0u32..6,
    ) {
        let blobs: Vec<Vec<u8>> = layers.iter().enumerate().map(|(i, w)| layer(i, w)).collect();
        let mut img = image(&blobs);
        let rec = Arc::new(Recorder::default());
        img.set_observer(Some(rec.clone()));
        // The model: which sectors hold layer data (the merged index's data
        // entries), and the order the reads first touch them.
        let mapped: Vec<bool> = {
            let mut m = vec![false; SECTORS as usize];
            for l in img.layers() {
                for s in l.lsmt.segments().iter().filter(|s| !s.zeroed && !s.is_invalid()) {
                    for x in s.offset..s.end() {
                        m[x as usize] = true;
                    }
                }
            }
            m
        };
        let mut seen = vec![false; SECTORS as usize];
        let mut order: Vec<u64> = Vec::new();
        for &(o, n) in &reads {
            let n = n.min(SECTORS - o);
            let mut buf = vec![0u8; (n * SECTOR) as usize];
            img.read_at(&mut buf, o * SECTOR).unwrap();
            for x in o..o + n {
                if mapped[x as usize] && !seen[x as usize] {
                    seen[x as usize] = true;
                    order.push(x);
                }
            }
        }
        let mut want: Vec<(u64, u64)> = Vec::new();
        for &x in &order {
            match want.last_mut() {
                Some(last) if last.0 + last.1 == x * SECTOR => last.1 += SECTOR,
                _ => want.push((x * SECTOR, SECTOR)),
            }
        }
        let trace = rec.0.lock().unwrap().clone();
        let ws = working_set(&img, &trace).unwrap();
        prop_assert_eq!(&ws.extents, &want);
        prop_assert_eq!(ws.unmapped, 0);

        // In windows of 2^window_shift sectors: the windows in the order
        // the reads first touch them, each one's sectors in disk order.
        let per = 1u64 << window_shift;
        let mut rank: Vec<Option<usize>> = vec![None; SECTORS as usize];
        let mut ranks = 0;
        for &x in &order {
            let w = (x / per) as usize;
            if rank[w].is_none() {
                rank[w] = Some(ranks);
                ranks += 1;
            }
        }
        let mut model = order.clone();
        model.sort_by_key(|&x| (rank[(x / per) as usize], x));
        let ws = ws.in_windows(per * SECTOR);
        let got: Vec<u64> = ws
            .extents
            .iter()
            .flat_map(|&(o, l)| o / SECTOR..(o + l) / SECTOR)
            .collect();
        prop_assert_eq!(got, model);
        if ws.extents.is_empty() {
            return Ok(());
        }

        let before = disk(&img);
        let mut packed = Vec::new();
        commit_working_set(&img, &ws, &CommitOptions::default(), &mut packed).unwrap();
        // The data: the set's bytes, in its order, from byte 4096.
        let mut data = Vec::new();
        for &(o, l) in &ws.extents {
            data.extend_from_slice(&before[o as usize..(o + l) as usize]);
        }
        prop_assert!(packed[4096..4096 + data.len()] == data[..]);
        let mut stacked = blobs.clone();
        stacked.push(packed.clone());
        let after = image(&stacked);
        prop_assert!(disk(&after) == before, "the packed layer changed the disk");
        let own = layer_trace(&RoLayer::from_bytes(packed).unwrap(), blobs.len() as u32);
        prop_assert_eq!(own.total_bytes(), ws.bytes());
        prop_assert_eq!(working_set(&after, &own).unwrap().extents, ws.extents);
    }
}
