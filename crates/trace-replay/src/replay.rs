//! Replay: turn a trace into large prefetch requests and run them at the
//! lowest priority that still helps the container (prefetch).
//!
//! Records are planned in the order the container read them: what an earlier
//! record already covers is dropped, a range continuing a recent request of
//! its layer extends it (adjacent ranges become large requests), and requests
//! are cut at [`ReplayOptions::max_request`] bytes. Each request is first
//! advised with [`ReadAt::will_need`] — a remote layer fetches the compressed
//! blocks behind it into its cache at `Priority::Prefetch`, after every
//! foreground read — and then, if [`ReplayOptions::read`], read (from that
//! cache, or from local files into the page cache). When only advising, the
//! requests are moved to where the bytes are stored and merged there
//! ([`plan_stored`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use obd_remote::{with_read_priority, Priority};
use zfile::sync::{recover, MutexExt};
use zfile::ReadAt;

use crate::format::{Record, Trace};

/// Default number of replay workers (upstream's `prefetchConfig.concurrency`
/// is 16; fewer requests in flight bring the data needed first sooner on a
/// slow link).
pub const DEFAULT_CONCURRENCY: usize = 2;
/// Default largest merged request (a request serves readers only once all of
/// it has arrived).
pub const DEFAULT_MAX_REQUEST: u64 = 512 << 10;
/// Default [`ReplayOptions::merge_gap`].
pub const DEFAULT_MERGE_GAP: u64 = 64 << 10;
/// Size of each worker's read buffer.
const READ_CHUNK: usize = 1 << 20;

/// How to replay.
#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    /// Requests in flight at once (0 is treated as 1).
    pub concurrency: usize,
    /// Largest merged request in bytes (at least 4 KiB).
    pub max_request: u64,
    /// Read each request after advising it (warms local page caches and checks
    /// the data decodes); otherwise only advise.
    pub read: bool,
    /// How records become requests.
    pub order: Order,
    /// [`Order::Offset`]: ranges of a layer at most this many bytes apart
    /// become one request (each request costs the registry and the node
    /// more than a few KiB of extra bytes do).
    pub merge_gap: u64,
}

/// How [`replay`] turns records into requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    /// In the order the container read ([`plan`]): requests no larger
    /// than the reads allow.
    Recorded,
    /// Each layer's ranges merged by offset, issued by first use
    /// ([`plan_by_offset`]; the default): fewest requests.
    #[default]
    Offset,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            concurrency: DEFAULT_CONCURRENCY,
            max_request: DEFAULT_MAX_REQUEST,
            read: true,
            order: Order::Offset,
            merge_gap: DEFAULT_MERGE_GAP,
        }
    }
}

/// One merged prefetch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Layer index, 0 = bottom.
    pub layer: u32,
    /// Byte offset in the layer's LSMT file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Records in the trace.
    pub records: usize,
    /// Records ignored: unknown layer, negative offset, empty, or past the
    /// layer's end.
    pub skipped: usize,
    /// Merged requests planned (of stored ranges when only advising).
    pub requests: usize,
    /// Requests completed.
    pub done: usize,
    /// Bytes of the completed requests (stored bytes when only advising).
    pub bytes: u64,
    /// Requests that failed.
    pub errors: usize,
    /// The first failure, naming the layer and range.
    pub first_error: Option<String>,
    /// The replay was stopped before the end.
    pub stopped: bool,
    /// Wall time.
    pub elapsed: Duration,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records ({} skipped) → {} requests, {} done, {} bytes, {} errors in {:.3} s{}",
            self.records,
            self.skipped,
            self.requests,
            self.done,
            self.bytes,
            self.errors,
            self.elapsed.as_secs_f64(),
            if self.stopped { " (stopped)" } else { "" }
        )?;
        if let Some(e) = &self.first_error {
            write!(f, "; first error: {e}")?;
        }
        Ok(())
    }
}

/// How many of the latest requests a new range may extend: merging moves
/// data earlier by at most this many requests, never later.
const MERGE_WINDOW: usize = 8;

/// Turns `records` into requests against layers of `layer_sizes` bytes, in
/// the order the container read them: each record contributes the parts of
/// its range no earlier record covered; a part that continues one of the last
/// [`MERGE_WINDOW`] requests of its layer extends it, up to `max_request`
/// bytes; longer parts are cut. Every byte is planned once. Returns the requests and the number of records skipped (unknown
/// layer, negative offset, empty, past the end).
///
/// Keeping the recorded order matters on a slow link: the data arrives about
/// when the container needs it, so it starts while the rest is in flight
/// (merging each layer's ranges by offset had it wait for nearly all of it).
pub fn plan(records: &[Record], layer_sizes: &[u64], max_request: u64) -> (Vec<Request>, usize) {
    let max_request = max_request.max(4096);
    let mut skipped = 0;
    // Per layer: planned ranges, start -> end, disjoint and not touching.
    let mut covered: Vec<BTreeMap<u64, u64>> = vec![BTreeMap::new(); layer_sizes.len()];
    let mut out: Vec<Request> = Vec::new();
    for r in records {
        let size = layer_sizes.get(r.layer as usize).copied();
        let start = u64::try_from(r.offset).ok();
        let (layer, s, e) = match (size, start) {
            (Some(size), Some(start)) if r.count > 0 && start < size => {
                (r.layer, start, start.saturating_add(r.count).min(size))
            }
            _ => {
                skipped += 1;
                continue;
            }
        };
        let cov = &mut covered[layer as usize];
        for (s, e) in uncovered(cov, s, e) {
            cover(cov, s, e);
            let mut at = s;
            while at < e {
                let n = out.len();
                let joins = out[n.saturating_sub(MERGE_WINDOW)..]
                    .iter_mut()
                    .rev()
                    .find(|q| q.layer == layer && q.offset + q.len == at && q.len < max_request);
                let len = match joins {
                    Some(q) => {
                        let add = (e - at).min(max_request - q.len);
                        q.len += add;
                        add
                    }
                    None => {
                        let len = (e - at).min(max_request);
                        out.push(Request {
                            layer,
                            offset: at,
                            len,
                        });
                        len
                    }
                };
                at += len;
            }
        }
    }
    (out, skipped)
}

/// The [`Order::Offset`] plan: merges `records` into requests against layers
/// of `layer_sizes` bytes: per layer, ranges that overlap, touch or lie at
/// most `merge_gap` bytes apart are joined (the gap is fetched too), then cut into
/// pieces of at most `max_request` bytes. Requests come in the order of the
/// earliest record they serve. Returns the requests and the number of records
/// skipped (unknown layer, negative offset, empty, past the end).
///
/// Fewer, larger requests than [`plan`] (less work per byte for the
/// registry and the node), but a request holding data needed early and late
/// keeps the container waiting for all of it. When every record is at most
/// `max_request` bytes, there are never more requests than records.
pub fn plan_by_offset(
    records: &[Record],
    layer_sizes: &[u64],
    max_request: u64,
    merge_gap: u64,
) -> (Vec<Request>, usize) {
    let max_request = max_request.max(4096);
    let mut skipped = 0;
    // (layer, start, end, first record index)
    let mut ranges: Vec<(u32, u64, u64, usize)> = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let size = layer_sizes.get(r.layer as usize).copied();
        let start = u64::try_from(r.offset).ok();
        match (size, start) {
            (Some(size), Some(start)) if r.count > 0 && start < size => {
                let end = start.saturating_add(r.count).min(size);
                ranges.push((r.layer, start, end, i));
            }
            _ => skipped += 1,
        }
    }
    (merge_by_offset(ranges, max_request, merge_gap), skipped)
}

/// Joins `(layer, start, end, first use)` ranges of a layer that overlap,
/// touch or lie at most `merge_gap` bytes apart, cuts the result into pieces
/// of at most `max_request` bytes and orders them by first use.
fn merge_by_offset(
    mut ranges: Vec<(u32, u64, u64, usize)>,
    max_request: u64,
    merge_gap: u64,
) -> Vec<Request> {
    ranges.sort_unstable_by_key(|&(l, s, e, _)| (l, s, e));
    let mut merged: Vec<(u32, u64, u64, usize)> = Vec::new();
    for (l, s, e, i) in ranges {
        match merged.last_mut() {
            Some(m) if m.0 == l && s <= m.2.saturating_add(merge_gap) => {
                m.2 = m.2.max(e);
                m.3 = m.3.min(i);
            }
            _ => merged.push((l, s, e, i)),
        }
    }
    let mut out: Vec<(usize, Request)> = Vec::new();
    for (layer, s, e, first) in merged {
        let mut at = s;
        while at < e {
            let len = (e - at).min(max_request);
            out.push((
                first,
                Request {
                    layer,
                    offset: at,
                    len,
                },
            ));
            at += len;
        }
    }
    out.sort_by_key(|&(first, r)| (first, r.layer, r.offset));
    out.into_iter().map(|(_, r)| r).collect()
}

/// Moves `requests` (ranges of the layers' data) to where the bytes are
/// stored ([`ReadAt::stored_extent`]: the compressed blocks of a ZFile
/// layer), for advice only. With [`Order::Offset`] the stored ranges are
/// merged again, by offset with `merge_gap` and cut at `max_request`: ranges
/// far apart in the data are often next to each other in the blob (a few
/// KiB of compressed blocks each), and every request costs the registry a
/// round of work whatever its size. With [`Order::Recorded`] each request
/// maps to one stored range, in order.
pub fn plan_stored(
    requests: &[Request],
    layers: &[&dyn ReadAt],
    order: Order,
    max_request: u64,
    merge_gap: u64,
) -> Vec<Request> {
    let stored = requests.iter().enumerate().filter_map(|(i, r)| {
        let (at, len) = layers.get(r.layer as usize)?.stored_extent(r.offset, r.len);
        (len > 0).then_some((r.layer, at, at + len, i))
    });
    match order {
        Order::Offset => merge_by_offset(stored.collect(), max_request.max(4096), merge_gap),
        Order::Recorded => stored
            .map(|(layer, s, e, _)| Request {
                layer,
                offset: s,
                len: e - s,
            })
            .collect(),
    }
}

/// The parts of `[s, e)` outside `cov`, in order.
fn uncovered(cov: &BTreeMap<u64, u64>, s: u64, e: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = s;
    if let Some((_, &ce)) = cov.range(..=s).next_back() {
        at = at.max(ce);
    }
    for (&cs, &ce) in cov.range(s..e) {
        if cs > at {
            out.push((at, cs));
        }
        at = at.max(ce);
    }
    if at < e {
        out.push((at, e));
    }
    out
}

/// Adds `[s, e)` to `cov`, joining what it overlaps or touches.
fn cover(cov: &mut BTreeMap<u64, u64>, mut s: u64, mut e: u64) {
    if let Some((&ps, &pe)) = cov.range(..=s).next_back() {
        if pe >= s {
            s = ps;
            e = e.max(pe);
        }
    }
    let inside: Vec<u64> = cov.range(s..=e).map(|(&k, _)| k).collect();
    for k in inside {
        if let Some(v) = cov.remove(&k) {
            e = e.max(v);
        }
    }
    cov.insert(s, e);
}

/// Replays `trace` against `layers` (index = layer index, bottom first; each
/// the layer's uncompressed LSMT file) with `opts.concurrency` workers. Stops
/// early, between requests, when `stop` becomes true. Failures are counted,
/// not fatal: prefetch is advice.
pub fn replay(
    trace: &Trace,
    layers: &[&dyn ReadAt],
    opts: &ReplayOptions,
    stop: &AtomicBool,
) -> ReplayReport {
    let started = Instant::now();
    let sizes: Vec<u64> = layers.iter().map(|l| l.size()).collect();
    let (requests, skipped) = match opts.order {
        Order::Recorded => plan(&trace.records, &sizes, opts.max_request),
        Order::Offset => plan_by_offset(&trace.records, &sizes, opts.max_request, opts.merge_gap),
    };
    // Advice only: advise the stored ranges, merged where they are stored.
    let requests = if opts.read {
        requests
    } else {
        plan_stored(
            &requests,
            layers,
            opts.order,
            opts.max_request,
            opts.merge_gap,
        )
    };
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let errors = AtomicUsize::new(0);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let stopped = AtomicBool::new(false);
    let worker = || {
        let mut buf = if opts.read {
            vec![0u8; READ_CHUNK]
        } else {
            Vec::new()
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                stopped.store(true, Ordering::Relaxed);
                return;
            }
            let Some(r) = requests.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            let src = layers[r.layer as usize];
            let mut result = Ok(());
            if !opts.read {
                src.will_need_stored(r.offset, r.len);
            } else {
                src.will_need(r.offset, r.len);
                let mut at = r.offset;
                let end = r.offset + r.len;
                while at < end && result.is_ok() {
                    let n = ((end - at) as usize).min(buf.len());
                    result = src.read_exact_at(&mut buf[..n], at);
                    at += n as u64;
                }
            }
            match result {
                Ok(()) => {
                    done.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(r.len, Ordering::Relaxed);
                }
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    let mut fe = first_error.locked();
                    if fe.is_none() {
                        *fe = Some(format!(
                            "layer {} bytes {}..{}: {e}",
                            r.layer,
                            r.offset,
                            r.offset + r.len
                        ));
                    }
                }
            }
        }
    };
    let workers = opts.concurrency.max(1).min(requests.len());
    // The workers' reads run at prefetch priority too: a read that joins a
    // request another worker's advice queued must not raise it above the
    // container's own reads.
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| with_read_priority(Priority::Prefetch, worker));
        }
    });
    ReplayReport {
        records: trace.records.len(),
        skipped,
        requests: requests.len(),
        done: done.into_inner(),
        bytes: bytes.into_inner(),
        errors: errors.into_inner(),
        first_error: recover(first_error.into_inner()),
        stopped: stopped.into_inner(),
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_by_offset_merges_per_layer_and_keeps_first_use_order() {
        let recs = [
            Record::read(0, 8192, 4096),
            Record::read(1, 0, 10),
            Record::read(0, 0, 8192),
        ];
        let (reqs, _) = plan_by_offset(&recs, &[1 << 20, 1 << 20], 4 << 20, 0);
        assert_eq!(reqs.len(), 2);
        // With a gap allowance, ranges close by become one request.
        let near = [Record::read(0, 0, 4096), Record::read(0, 8192, 4096)];
        let (one, _) = plan_by_offset(&near, &[1 << 20], 4 << 20, 4096);
        assert_eq!(
            one,
            vec![Request {
                layer: 0,
                offset: 0,
                len: 12288
            }]
        );
        let (two, _) = plan_by_offset(&near, &[1 << 20], 4 << 20, 4095);
        assert_eq!(two.len(), 2);
        assert_eq!(
            reqs,
            vec![
                Request {
                    layer: 0,
                    offset: 0,
                    len: 12288
                },
                Request {
                    layer: 1,
                    offset: 0,
                    len: 10
                },
            ]
        );
    }

    /// A layer stored compressed 4:1 in 4 KiB blocks (1 KiB each when
    /// stored); records the stored advice it gets.
    struct Packed {
        size: u64,
        advised: Mutex<Vec<(u64, u64)>>,
    }

    impl ReadAt for Packed {
        fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<usize> {
            Ok(0)
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn stored_extent(&self, offset: u64, len: u64) -> (u64, u64) {
            let (first, last) = (offset / 4096, (offset + len - 1) / 4096);
            (first * 1024, (last - first + 1) * 1024)
        }
        fn will_need_stored(&self, offset: u64, len: u64) {
            self.advised.lock().unwrap().push((offset, len));
        }
    }

    #[test]
    fn plan_stored_merges_where_the_bytes_are_stored() {
        let l = Packed {
            size: 1 << 30,
            advised: Mutex::new(Vec::new()),
        };
        let layers: [&dyn ReadAt; 1] = [&l];
        // Two ranges 40 KiB apart in the data are 10 KiB apart stored.
        let reqs = [
            Request {
                layer: 0,
                offset: 0,
                len: 8192,
            },
            Request {
                layer: 0,
                offset: 49152,
                len: 100,
            },
        ];
        let one = plan_stored(&reqs, &layers, Order::Offset, 4 << 20, 16 << 10);
        assert_eq!(
            one,
            vec![Request {
                layer: 0,
                offset: 0,
                len: 13 << 10
            }]
        );
        let two = plan_stored(&reqs, &layers, Order::Offset, 4 << 20, 8 << 10);
        assert_eq!(two.len(), 2);
        // Recorded order maps one to one.
        let rec = plan_stored(&reqs, &layers, Order::Recorded, 4 << 20, 1 << 30);
        assert_eq!(rec[1].offset, 12 << 10);
        assert_eq!(rec.len(), 2);
        // A replay that only advises hands the stored ranges to the layer.
        let trace = Trace {
            records: vec![Record::read(0, 0, 8192), Record::read(0, 49152, 100)],
        };
        let opts = ReplayOptions {
            read: false,
            merge_gap: 16 << 10,
            ..ReplayOptions::default()
        };
        let report = replay(&trace, &layers, &opts, &AtomicBool::new(false));
        assert_eq!(report.requests, 1);
        assert_eq!(report.bytes, 13 << 10);
        assert_eq!(*l.advised.lock().unwrap(), vec![(0, 13 << 10)]);
    }

    #[test]
    fn plan_stored_covers_every_request_once() {
        use proptest::prelude::*;
        proptest!(|(reqs in proptest::collection::vec((0u32..2, 0u64..400_000, 1u64..70_000), 0..40),
                    gap in 0u64..20_000, max in 4096u64..100_000)| {
            let a = Packed { size: 1 << 20, advised: Mutex::new(Vec::new()) };
            let b = Packed { size: 1 << 20, advised: Mutex::new(Vec::new()) };
            let layers: [&dyn ReadAt; 2] = [&a, &b];
            let reqs: Vec<Request> = reqs.iter().map(|&(layer, offset, len)| Request { layer, offset, len }).collect();
            let got = plan_stored(&reqs, &layers, Order::Offset, max, gap);
            // Reference: the stored bytes of every request, per layer.
            let mut want = [vec![false; 1 << 18], vec![false; 1 << 18]];
            for r in &reqs {
                let (at, n) = layers[r.layer as usize].stored_extent(r.offset, r.len);
                for x in at..at + n { want[r.layer as usize][x as usize] = true; }
            }
            let mut seen = [vec![false; 1 << 18], vec![false; 1 << 18]];
            for q in &got {
                prop_assert!(q.len > 0 && q.len <= max.max(4096));
                for x in q.offset..q.offset + q.len {
                    prop_assert!(!seen[q.layer as usize][x as usize], "advised twice");
                    seen[q.layer as usize][x as usize] = true;
                }
            }
            for l in 0..2 {
                for x in 0..1 << 18 {
                    prop_assert!(!want[l][x] || seen[l][x], "stored byte {} of layer {} not advised", x, l);
                }
            }
            // Stored ranges closer than the gap were joined.
            let mut per: Vec<(u32, u64, u64)> = got.iter().map(|q| (q.layer, q.offset, q.offset + q.len)).collect();
            per.sort_unstable();
            for w in per.windows(2) {
                if w[0].0 == w[1].0 && w[0].2 != w[1].1 {
                    prop_assert!(w[1].1 > w[0].2 + gap, "ranges {:?} and {:?} within the gap", w[0], w[1]);
                }
            }
        });
    }

    #[test]
    fn plan_merges_per_layer_and_keeps_first_use_order() {
        let recs = [
            Record::read(1, 8192, 4096),
            Record::read(0, 0, 4096),
            Record::read(0, 4096, 4096), // adjacent to the previous
            Record::read(0, 2048, 100),  // inside
            Record::read(1, 100_000, 10),
            Record::read(5, 0, 10),       // unknown layer
            Record::read(0, -1, 10),      // negative
            Record::read(0, 1 << 30, 10), // past the end
            Record::read(1, 0, 0),        // empty
        ];
        let (reqs, skipped) = plan(&recs, &[1 << 20, 1 << 20], 4 << 20);
        assert_eq!(skipped, 4);
        assert_eq!(
            reqs,
            vec![
                Request {
                    layer: 1,
                    offset: 8192,
                    len: 4096
                },
                Request {
                    layer: 0,
                    offset: 0,
                    len: 8192
                },
                Request {
                    layer: 1,
                    offset: 100_000,
                    len: 10
                },
            ]
        );
    }

    #[test]
    fn plan_keeps_the_recorded_order_and_merges_only_recent_requests() {
        let r = |layer, offset, len| Request { layer, offset, len };
        // A region read back to front, then a file read in pieces between
        // reads of others: ranges join recent requests only, in order.
        let mut recs = vec![
            Record::read(0, 8192, 4096),
            Record::read(0, 0, 4096),  // before the last: its own request
            Record::read(0, 0, 16384), // the gaps join the two
            Record::read(1, 1 << 20, 4096),
            Record::read(0, 16384, 4096), // continues the first
        ];
        for i in 0..MERGE_WINDOW as i64 {
            recs.push(Record::read(1, i * 65536, 4096));
        }
        recs.push(Record::read(0, 20480, 4096)); // too far back to join
        let (reqs, skipped) = plan(&recs, &[1 << 20, 2 << 20], 4 << 20);
        assert_eq!(skipped, 0);
        let mut want = vec![r(0, 8192, 12288), r(0, 0, 8192), r(1, 1 << 20, 4096)];
        want.extend((0..MERGE_WINDOW as u64).map(|i| r(1, i * 65536, 4096)));
        want.push(r(0, 20480, 4096));
        assert_eq!(reqs, want);
    }

    #[test]
    fn plan_covers_exactly_the_records() {
        use proptest::prelude::*;
        proptest!(|(recs in proptest::collection::vec((0u32..3, -10i64..300_000, 0u64..70_000), 0..60),
                    max in 4096u64..200_000)| {
            let sizes = [100_000u64, 250_000];
            let records: Vec<Record> = recs.iter().map(|&(l, o, c)| Record::read(l, o, c)).collect();
            let (reqs, skipped) = plan(&records, &sizes, max);
            // Reference: a byte map per layer.
            let mut want = [vec![false; 100_000], vec![false; 250_000]];
            let mut n_valid = 0;
            for &(l, o, c) in &recs {
                let Some(size) = sizes.get(l as usize) else { continue };
                if o < 0 || c == 0 || o as u64 >= *size { continue; }
                n_valid += 1;
                for b in o as u64..(o as u64 + c).min(*size) {
                    want[l as usize][b as usize] = true;
                }
            }
            prop_assert_eq!(skipped, recs.len() - n_valid);
            let mut got = [vec![false; 100_000], vec![false; 250_000]];
            for q in &reqs {
                prop_assert!(q.len > 0 && q.len <= max);
                for b in q.offset..q.offset + q.len {
                    prop_assert!(!got[q.layer as usize][b as usize], "planned twice");
                    got[q.layer as usize][b as usize] = true;
                }
            }
            prop_assert!(want == got, "planned bytes differ from the records'");
        });
    }

    #[test]
    fn plan_cuts_long_runs_and_clamps_to_the_layer() {
        let recs: Vec<Record> = (0..10).map(|i| Record::read(0, i << 20, 1 << 20)).collect();
        let (reqs, _) = plan(&recs, &[(9 << 20) + 5], 4 << 20);
        let lens: Vec<u64> = reqs.iter().map(|r| r.len).collect();
        assert_eq!(lens, vec![4 << 20, 4 << 20, (1 << 20) + 5]);
    }
}
