//! Replay: turn a trace into large prefetch requests and run them at the
//! lowest priority that still helps the container (prefetch).
//!
//! Records are sorted and merged per layer (adjacent or overlapping ranges),
//! cut into requests of at most [`ReplayOptions::max_request`] bytes, and
//! issued in the order the container first needed them. Each request is first
//! advised with [`ReadAt::will_need`] — a remote layer fetches the compressed
//! blocks behind it into its cache at `Priority::Prefetch`, after every
//! foreground read — and then, if [`ReplayOptions::read`], read (from that
//! cache, or from local files into the page cache).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use overlaybd_core::remote::{with_read_priority, Priority};
use zfile::ReadAt;

use crate::format::{Record, Trace};

/// Default number of replay workers (upstream `prefetchConfig.concurrency`).
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Default largest merged request.
pub const DEFAULT_MAX_REQUEST: u64 = 4 << 20;
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
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            concurrency: DEFAULT_CONCURRENCY,
            max_request: DEFAULT_MAX_REQUEST,
            read: true,
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
    /// Merged requests planned.
    pub requests: usize,
    /// Requests completed.
    pub done: usize,
    /// Bytes of the completed requests.
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

/// Merges `records` into requests against layers of `layer_sizes` bytes:
/// per layer, adjacent and overlapping ranges are joined, then cut into
/// pieces of at most `max_request` bytes. Requests come in the order of the
/// earliest record they serve. Returns the requests and the number of records
/// skipped (unknown layer, negative offset, empty, past the end).
///
/// When every record is at most `max_request` bytes, there are never more
/// requests than records.
pub fn plan(records: &[Record], layer_sizes: &[u64], max_request: u64) -> (Vec<Request>, usize) {
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
    ranges.sort_unstable_by_key(|&(l, s, e, _)| (l, s, e));
    let mut merged: Vec<(u32, u64, u64, usize)> = Vec::new();
    for (l, s, e, i) in ranges {
        match merged.last_mut() {
            Some(m) if m.0 == l && s <= m.2 => {
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
    (out.into_iter().map(|(_, r)| r).collect(), skipped)
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
    let (requests, skipped) = plan(&trace.records, &sizes, opts.max_request);
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
            src.will_need(r.offset, r.len);
            let mut result = Ok(());
            if opts.read {
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
                    let mut fe = first_error.lock().unwrap_or_else(PoisonError::into_inner);
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
        first_error: first_error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
        stopped: stopped.into_inner(),
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn plan_cuts_long_runs_and_clamps_to_the_layer() {
        let recs: Vec<Record> = (0..10).map(|i| Record::read(0, i << 20, 1 << 20)).collect();
        let (reqs, _) = plan(&recs, &[(9 << 20) + 5], 4 << 20);
        let lens: Vec<u64> = reqs.iter().map(|r| r.len).collect();
        assert_eq!(lens, vec![4 << 20, 4 << 20, (1 << 20) + 5]);
    }
}
