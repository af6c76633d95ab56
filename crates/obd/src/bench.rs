//! `obd bench …`: measurements of the hot paths, each against a baseline run in
//! the same process, printed as text or as one JSON object (`--json`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Subcommand;
use fixtures::Rng;
use overlaybd_core::index::MergedIndex;
use overlaybd_core::lsmt::Segment;
use serde_json::{json, Value};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Merged-index lookups per second on one core, against a binary search.
    Index {
        /// Segments in the merged index.
        #[arg(long, default_value_t = 10_000)]
        segments: usize,
        /// Layers the segments are spread over before merging.
        #[arg(long, default_value_t = 1)]
        layers: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// ZFile random 4 KiB reads against the raw codec, and 1- vs 2-thread compression.
    Zfile {
        /// MiB of image-like data to compress.
        #[arg(long, default_value_t = 64)]
        size_mib: usize,
        /// Seconds per read measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Lazy reads from a docker-registry on 127.0.0.1: cold flatten vs curl,
    /// cold random 4 KiB latency, and latency under a background download.
    Remote {
        /// Virtual size of the generated image, in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Flatten threads (remote reads are latency-bound: more than cores helps).
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Folder for the generated files (default: a temporary folder).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Measure instead what checking fetched bytes against the layers'
        /// piece tables costs: cold random 4 KiB reads and cold flatten, with
        /// and without, as ratios.
        #[arg(long)]
        verify: bool,
    },
    /// Flatten of a 3-layer image from local files against copying a plain file.
    Read {
        /// Virtual size of the generated image, in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Store layers as ZFile (lz4) instead of raw LSMT.
        #[arg(long)]
        zfile: bool,
        /// Folder for the generated files (default: a temporary folder).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The containerd snapshotter (needs root, containerd, runc,
    /// docker-registry, skopeo): remote-snapshot pull latency of an N-layer
    /// obd image, and warm `ctr run` of it against the same image as plain
    /// OCI on containerd's overlayfs snapshotter.
    Snapshotter(crate::bench_snapshotter::SnapshotterArgs),
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let (v, as_json) = match cmd {
        BenchCmd::Index {
            segments,
            layers,
            seconds,
            json,
        } => (bench_index(segments, layers, seconds), json),
        BenchCmd::Zfile {
            size_mib,
            seconds,
            json,
        } => (crate::bench_zfile::run(size_mib, seconds)?, json),
        BenchCmd::Read {
            size_mib,
            zfile,
            dir,
            json,
        } => (crate::bench_read::run(size_mib, zfile, dir)?, json),
        BenchCmd::Remote {
            size_mib,
            threads,
            dir,
            json,
            verify,
        } => (
            crate::bench_remote::run(size_mib, threads, dir, verify)?,
            json,
        ),
        BenchCmd::Snapshotter(a) => {
            let json = a.json;
            (crate::bench_snapshotter::run(a)?, json)
        }
    };
    // One JSON object on one line, so scripts can parse the output.
    if as_json {
        println!("{v}");
    } else {
        crate::util::print_object(&v, false);
    }
    Ok(())
}

/// Runs `f` repeatedly for about `secs`, returning (iterations, elapsed).
pub fn time_loop(secs: f64, mut f: impl FnMut() -> u64) -> (u64, Duration) {
    let t0 = Instant::now();
    let budget = Duration::from_secs_f64(secs);
    let mut n = 0;
    loop {
        n += f();
        let dt = t0.elapsed();
        if dt >= budget {
            return (n, dt);
        }
    }
}

/// A layer of `n` random segments (gaps between them), sorted.
pub fn random_layer(rng: &mut Rng, n: usize, span: u64) -> Vec<Segment> {
    let avg = (span / n.max(1) as u64).max(2);
    let mut segs = Vec::with_capacity(n);
    let mut cur = 0u64;
    let mut m = 8u64;
    for _ in 0..n {
        cur += 1 + rng.below(avg / 2);
        let len = 1 + rng.below((avg / 2).clamp(1, 16383));
        segs.push(Segment::data(cur, len as u32, m));
        m += len;
        cur += len;
    }
    segs
}

fn bench_index(segments: usize, layers: usize, seconds: f64) -> Value {
    let mut rng = Rng::new(42);
    let layers = layers.max(1);
    let span = segments as u64 * 64;
    let stack: Vec<Vec<Segment>> = (0..layers)
        .map(|_| random_layer(&mut rng, segments / layers, span))
        .collect();
    let t0 = Instant::now();
    let idx = MergedIndex::build(&stack);
    let build = t0.elapsed();
    let end = idx.segments().last().map_or(1, |s| s.end());
    let queries: Vec<u64> = (0..(1 << 20)).map(|_| rng.below(end)).collect();

    fn run_queries(queries: &[u64], seconds: f64, f: impl Fn(u64) -> u64) -> (u64, Duration) {
        let mut qi = 0usize;
        time_loop(seconds, || {
            let mut acc = 0u64;
            for &q in &queries[qi..qi + 4096] {
                acc = acc.wrapping_add(f(q));
            }
            qi = (qi + 4096) % queries.len();
            black_box(acc);
            4096
        })
    }
    // The lookup a read does: find the segments overlapping an 8-sector request.
    let (n, dt) = run_queries(&queries, seconds, |q| {
        idx.lookup(q, 8).next().map_or(0, |s| s.moffset)
    });
    let lps = n as f64 / dt.as_secs_f64();
    // Baseline: binary search (std partition_point) over the same sorted segments.
    let segs = idx.segments();
    let (bn, bdt) = run_queries(&queries, seconds, |q| {
        let i = segs.partition_point(|s| s.end() <= q);
        segs.get(i)
            .filter(|s| s.offset < q + 8)
            .map_or(0, |s| s.trimmed(q, q + 8).moffset)
    });
    let blps = bn as f64 / bdt.as_secs_f64();
    json!({
        "bench": "index",
        "segments": idx.len(),
        "layers": layers,
        "build_ms": build.as_secs_f64() * 1e3,
        "lookups_per_sec": lps.round(),
        "ns_per_lookup": 1e9 / lps,
        "baseline_binary_search_lookups_per_sec": blps.round(),
        "ratio_vs_binary_search": lps / blps,
        "goal_lookups_per_sec": 30_000_000,
        "threads": 1,
    })
}
