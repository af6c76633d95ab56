//! Working-set packing: the disk ranges a trace read, copied out of the
//! merged image into one new top layer, and a trace that replays that layer
//! front to back.
//!
//! A recorded trace names ranges of each layer's file. Those ranges sit
//! among blocks the start never reads (other files, in the same compressed
//! blocks), so replaying them fetches neighbours too. The packed layer holds
//! only the blocks that were read, in the order they were first read (by
//! disk window, [`WorkingSet::in_windows`]): its compressed blocks
//! carry nothing else, replaying it is a few large sequential requests, and
//! what the start needs first arrives first. Its data equals what the layers below already give at those
//! ranges, so the merged disk is unchanged and readers that do not know the
//! layer's purpose (upstream overlaybd) see an ordinary layer.

use std::collections::BTreeMap;
use std::io::Write;

use overlaybd_core::image::Image;
use overlaybd_core::lsmt::{commit_extents, CommitInfo, CommitOptions, RoLayer, Uuid, SECTOR};

use crate::format::{Record, Trace};
use crate::{Error, Result};

/// Largest record the packed trace holds (upstream's replay reads each
/// record into a 1 MiB buffer).
pub const MAX_RECORD: u64 = 1 << 20;

/// The disk ranges a trace read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// Byte ranges `(offset, len)` of the disk, sector-aligned and disjoint,
    /// **in the order the trace first read them** (a range read again later
    /// keeps its first place).
    pub extents: Vec<(u64, u64)>,
    /// Bytes of records that fell on no data of their layer (its header,
    /// index or padding): not part of the disk.
    pub unmapped: u64,
}

impl WorkingSet {
    /// Total bytes of the extents.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }

    /// The same bytes in aligned disk windows of `window` bytes (a power of
    /// two, at least a sector): the windows in the order of their first read,
    /// each window's ranges in disk order and merged where they touch.
    ///
    /// The order a start first reads single blocks is not the order a later
    /// start asks for them: the kernel reads ahead and around in windows whose
    /// bounds depend on timing and on what is cached, so one read of a later
    /// start can need a block recorded early and its neighbour recorded late,
    /// and then waits for the late one. Packed by window, every block of a
    /// window arrives with the first of them.
    pub fn in_windows(&self, window: u64) -> WorkingSet {
        debug_assert!(window.is_power_of_two() && window >= SECTOR);
        let mut rank: BTreeMap<u64, usize> = BTreeMap::new();
        let mut pieces: Vec<(usize, u64, u64)> = Vec::new();
        for &(o, l) in &self.extents {
            let (mut at, end) = (o, o.saturating_add(l));
            while at < end {
                let w = at / window;
                let cut = end.min((w + 1).saturating_mul(window));
                let next = rank.len();
                let r = *rank.entry(w).or_insert(next);
                pieces.push((r, at, cut - at));
                at = cut;
            }
        }
        pieces.sort_unstable();
        let mut extents: Vec<(u64, u64)> = Vec::with_capacity(pieces.len());
        for (_, o, l) in pieces {
            match extents.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += l,
                _ => extents.push((o, l)),
            }
        }
        WorkingSet {
            extents,
            unmapped: self.unmapped,
        }
    }
}

/// Readahead (KiB) of a recorded start and of every start that follows its
/// trace: the device's worker sets it for a recording, the snapshotter at the
/// mount of a device whose image has a warm list. A start reads what it
/// touches plus its readahead, so the two must match for the packed working
/// set to hold what the later start reads, and a smaller one packs fewer
/// bytes the start never uses: the Python bench image's start reads 22.5 MB
/// at 2560 KiB (a lazy device's), 19.6 MB at 128, 16.8 MB at 32 and 13.2 MB
/// at none, in 285, 446, 762 and 3227 reads (docs/BENCHMARKS.md, issue 18,
/// "Recorded and replayed with the same readahead").
pub const TRACED_READ_AHEAD_KB: u32 = 32;

/// The disk window a packed working set is ordered by
/// ([`WorkingSet::in_windows`]): a traced start's readahead
/// ([`TRACED_READ_AHEAD_KB`]), so that one of its reads spans at most two
/// windows.
pub const PACK_WINDOW: u64 = TRACED_READ_AHEAD_KB as u64 * 1024;

/// One layer's data entries ordered by where their bytes sit in the file:
/// `(moffset, offset, length)` in sectors.
fn by_file_offset(layer: &RoLayer) -> Vec<(u64, u64, u64)> {
    let mut v: Vec<(u64, u64, u64)> = layer
        .segments()
        .iter()
        .filter(|s| !s.zeroed && !s.is_invalid() && s.length > 0)
        .map(|s| (s.moffset, s.offset, s.length as u64))
        .collect();
    v.sort_unstable();
    v
}

/// Sector ranges seen so far (disjoint, keyed by start).
#[derive(Default)]
struct Seen(BTreeMap<u64, u64>);

impl Seen {
    /// The parts of `[a, b)` not seen before, in order; marks them seen.
    fn add(&mut self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut fresh = Vec::new();
        let mut at = a;
        // The range that starts before `a` may cover its beginning.
        if let Some((_, &end)) = self.0.range(..=a).next_back() {
            at = at.max(end);
        }
        let inside: Vec<(u64, u64)> = self.0.range(a..b).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            if s > at {
                fresh.push((at, s));
            }
            at = at.max(e);
        }
        if at < b {
            fresh.push((at, b));
        }
        for &(s, e) in &fresh {
            self.0.insert(s, e);
        }
        fresh
    }
}

/// The disk ranges that the records of `trace` read from the lower layers
/// of `image` (record layer 0 = the bottom lower), in first-read order:
/// each record's range of its layer's file is mapped back through that
/// layer's index.
pub fn working_set(image: &Image, trace: &Trace) -> Result<WorkingSet> {
    let layers = image.layers();
    let maps: Vec<Vec<(u64, u64, u64)>> = layers.iter().map(|l| by_file_offset(&l.lsmt)).collect();
    let mut seen = Seen::default();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut unmapped = 0u64;
    for (i, r) in trace.records.iter().enumerate() {
        let map = maps.get(r.layer as usize).ok_or(Error::NoSuchLayer {
            record: i,
            layer: r.layer,
            layers: layers.len(),
        })?;
        if r.offset < 0 || r.count == 0 {
            unmapped += r.count;
            continue;
        }
        let start = r.offset as u64 / SECTOR;
        let end = (r.offset as u64).saturating_add(r.count).div_ceil(SECTOR);
        let mut mapped = 0u64;
        // The first entry whose bytes end after `start`.
        let first = map.partition_point(|&(m, _, len)| m + len <= start);
        for &(m, lba, len) in &map[first..] {
            if m >= end {
                break;
            }
            let (a, b) = (start.max(m), end.min(m + len));
            mapped += b - a;
            for (s, e) in seen.add(lba + (a - m), lba + (b - m)) {
                match extents.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => extents.push((s, e)),
                }
            }
        }
        unmapped += r.count.saturating_sub(mapped * SECTOR);
    }
    Ok(WorkingSet {
        extents: extents
            .into_iter()
            .map(|(a, b)| (a * SECTOR, (b - a) * SECTOR))
            .collect(),
        unmapped,
    })
}

/// Streams into `out` a committed LSMT layer holding `image`'s bytes at
/// `set`, its data in the set's (first-read) order
/// ([`overlaybd_core::lsmt::commit_extents`]); `opts` names the layer.
pub fn commit_working_set(
    image: &Image,
    set: &WorkingSet,
    opts: &CommitOptions,
    out: &mut dyn Write,
) -> overlaybd_core::Result<CommitInfo> {
    let sectors: Vec<(u64, u64)> = set
        .extents
        .iter()
        .map(|&(o, l)| (o / SECTOR, l / SECTOR))
        .collect();
    let parent = match image.layers().last() {
        Some(l) => l.lsmt.header().uuid()?,
        None => Uuid::NIL,
    };
    commit_extents(&sectors, image, (image.virtual_size(), parent), opts, out)
}

/// The trace that replays all of `layer` (lower `index` of its image) front
/// to back: one record per run of contiguous data in its file, split at
/// [`MAX_RECORD`].
pub fn layer_trace(layer: &RoLayer, index: u32) -> Trace {
    let map = by_file_offset(layer);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (m, _, len) in map {
        let (a, b) = (m * SECTOR, (m + len) * SECTOR);
        match runs.last_mut() {
            Some(last) if a == last.1 => last.1 = b,
            _ => runs.push((a, b)),
        }
    }
    let mut t = Trace::default();
    for (a, b) in runs {
        let mut at = a;
        while at < b {
            let n = (b - at).min(MAX_RECORD);
            t.records.push(Record::read(index, at as i64, n));
            at += n;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlaybd_core::lsmt::{CreateOptions, WritableLayer};
    use std::sync::Arc;
    use zfile::ReadAt;

    /// A committed layer of `vsize` bytes with `writes` (disk offset, byte).
    fn layer(dir: &std::path::Path, name: &str, vsize: u64, writes: &[(u64, u64, u8)]) -> Vec<u8> {
        let (d, i) = (
            dir.join(format!("{name}.data")),
            dir.join(format!("{name}.index")),
        );
        let mut w = WritableLayer::create(
            &d,
            &i,
            CreateOptions {
                virtual_size: vsize,
                ..Default::default()
            },
        )
        .unwrap();
        for &(off, len, b) in writes {
            w.write_at(&vec![b; len as usize], off).unwrap();
        }
        let mut out = Vec::new();
        w.commit(&Default::default(), &mut out).unwrap();
        out
    }

    fn image(blobs: Vec<Vec<u8>>) -> Image {
        let blobs = blobs
            .into_iter()
            .enumerate()
            .map(|(i, b)| (format!("l{i}"), Arc::new(b) as Arc<dyn ReadAt>))
            .collect();
        Image::from_blobs(blobs).unwrap()
    }

    #[test]
    fn records_map_back_to_disk_ranges_and_pack_into_one_layer() {
        let dir = tempfile::tempdir().unwrap();
        let vsize = 1 << 20;
        let l0 = layer(
            dir.path(),
            "l0",
            vsize,
            &[(0, 65536, 1), (131072, 65536, 2)],
        );
        let l1 = layer(
            dir.path(),
            "l1",
            vsize,
            &[(8192, 4096, 3), (200704, 8192, 4)],
        );
        let img = image(vec![l0, l1]);
        // Which file offsets hold which disk ranges.
        let file_of = |layer: usize, disk: u64| -> i64 {
            img.layers()[layer]
                .lsmt
                .segments()
                .iter()
                .find(|s| s.offset * SECTOR <= disk && disk < s.end() * SECTOR)
                .map(|s| (s.moffset * SECTOR + disk - s.offset * SECTOR) as i64)
                .unwrap()
        };
        let mut t = Trace::default();
        t.push_read(0, file_of(0, 0), 4096); // disk 0..4K
        t.push_read(1, file_of(1, 8192), 4096); // disk 8K..12K, from the top
        t.push_read(0, file_of(0, 4096), 4096); // disk 4K..8K: adjacent to the first
        t.push_read(0, file_of(0, 131072 + 4096), 8192); // disk 132K..140K
        t.push_read(1, file_of(1, 200704), 4096);
        t.push_read(0, 0, 512); // the header: no disk range
        t.push_read(0, file_of(0, 0), 12288); // read again: nothing new
        let ws = working_set(&img, &t).unwrap();
        assert_eq!(
            ws.extents,
            vec![
                (0, 4096),
                (8192, 4096),
                (4096, 4096),
                (135168, 8192),
                (200704, 4096)
            ],
            "first-read order"
        );
        assert_eq!((ws.bytes(), ws.unmapped), (24576, 512));

        // Packed into a third layer: the data in first-read order, the disk
        // reads the same everywhere, and the layer's trace covers exactly
        // its data.
        let mut packed = Vec::new();
        let info = commit_working_set(&img, &ws, &CommitOptions::default(), &mut packed).unwrap();
        assert_eq!(info.data_sectors * SECTOR, 24576);
        let data = &packed[4096..4096 + 24576];
        assert!(data[..4096].iter().all(|&b| b == 1));
        assert!(
            data[4096..8192].iter().all(|&b| b == 3),
            "the top layer's bytes"
        );
        assert!(data[12288..20480].iter().all(|&b| b == 2));
        let ro = RoLayer::from_bytes(packed.clone()).unwrap();
        assert_eq!(
            ro.header().parent_uuid().unwrap(),
            img.layers()[1].lsmt.header().uuid().unwrap()
        );
        let pt = layer_trace(&ro, 2);
        assert_eq!(pt.records.len(), 1, "{:?}", pt.records);
        assert_eq!(
            (
                pt.records[0].layer,
                pt.records[0].offset,
                pt.records[0].count
            ),
            (2, 4096, 24576)
        );

        let dir2 = tempfile::tempdir().unwrap();
        let l0 = layer(
            dir2.path(),
            "l0",
            vsize,
            &[(0, 65536, 1), (131072, 65536, 2)],
        );
        let l1 = layer(
            dir2.path(),
            "l1",
            vsize,
            &[(8192, 4096, 3), (200704, 8192, 4)],
        );
        let before = image(vec![l0.clone(), l1.clone()]);
        let after = image(vec![l0, l1, packed]);
        let (mut a, mut b) = (vec![0u8; vsize as usize], vec![0u8; vsize as usize]);
        before.read_at(&mut a, 0).unwrap();
        after.read_at(&mut b, 0).unwrap();
        assert!(a == b, "packing changed the disk");
        // And the packed trace's ranges map back to the same working set.
        assert_eq!(working_set(&after, &pt).unwrap().extents, ws.extents);
        let _ = dir;
    }

    #[test]
    fn windows_go_in_first_read_order_with_their_ranges_in_disk_order() {
        let k = 1024u64;
        let ws = WorkingSet {
            // First reads: window 1, window 0, window 1 again (before the
            // first range), a range across windows 2 and 3, window 0.
            extents: vec![
                (140 * k, 4 * k),
                (8 * k, 4 * k),
                (128 * k, 8 * k),
                (380 * k, 12 * k),
                (0, 4 * k),
                (4 * k, 4 * k),
            ],
            unmapped: 7,
        };
        let w = ws.in_windows(128 * k);
        assert_eq!(
            w.extents,
            vec![
                (128 * k, 8 * k),
                (140 * k, 4 * k),
                (0, 12 * k),
                (380 * k, 12 * k),
            ],
            "window 1 (first read), its ranges by offset; window 0, merged; \
             the range across windows 2 and 3 whole again"
        );
        assert_eq!((w.bytes(), w.unmapped), (ws.bytes(), 7));
        assert_eq!(w.in_windows(128 * k), w, "a second pass changes nothing");
    }

    #[test]
    fn a_record_of_a_missing_layer_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(vec![layer(dir.path(), "l0", 1 << 20, &[(0, 4096, 1)])]);
        let mut t = Trace::default();
        t.push_read(0, 4096, 4096);
        t.push_read(3, 4096, 4096);
        let e = working_set(&img, &t).unwrap_err().to_string();
        assert!(
            e.contains("record 1") && e.contains("layer 3") && e.contains("1 layer"),
            "{e}"
        );
    }

    #[test]
    fn long_runs_split_at_one_mib() {
        let dir = tempfile::tempdir().unwrap();
        let l = layer(
            dir.path(),
            "l0",
            8 << 20,
            &[(0, 2 << 20, 7), (4 << 20, 4096, 8)],
        );
        let ro = RoLayer::from_bytes(l).unwrap();
        let t = layer_trace(&ro, 0);
        let got: Vec<(i64, u64)> = t.records.iter().map(|r| (r.offset, r.count)).collect();
        let total = (2 << 20) + 4096;
        assert_eq!(
            got,
            vec![
                (4096, 1 << 20),
                (4096 + (1 << 20), 1 << 20),
                (4096 + (2 << 20), 4096)
            ]
        );
        assert_eq!(t.total_bytes(), total);
    }
}
