//! The host-wide block cache shared by real processes: this test binary
//! re-runs itself as child processes (`OBD_CACHE_CHILD`), each reading one
//! blob at random through its own `BlockCache` over the same directory, and
//! the parent kills and restarts them. Every read must equal the source; no
//! process fetches a block twice in its lifetime unless the budget evicts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use fixtures::Rng;
use obd_remote::blob::{RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::sched::Scheduler;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::{ReadAt, Result};

const DIGEST: &str = "sha256:5ba7ed0000000000000000000000000000000000000000000000000000000000";
const SIZE: usize = 6 << 20;

/// Serves the blob from a file and reports every fetch on stdout.
struct FileFetcher {
    file: std::fs::File,
}

impl RangeFetcher for FileFetcher {
    fn fetch(&self, _: &BlobRef, offset: u64, len: u64, _: Priority) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.file.read_exact_at(&mut v, offset)?;
        println!("F {offset} {len}");
        Ok(v)
    }
    fn blob_size(&self, _: &str) -> Result<u64> {
        Ok(SIZE as u64)
    }
}

fn child_main(src: &Path, cache_dir: &Path, seed: u64, budget: u64) {
    let cache = BlockCache::open(CacheOptions {
        budget,
        low_water_pct: 80,
        ..CacheOptions::new(cache_dir)
    })
    .unwrap();
    let reference = std::fs::read(src).unwrap();
    let fetcher = Arc::new(FileFetcher {
        file: std::fs::File::open(src).unwrap(),
    });
    let blob = RemoteBlob::new(
        BlobRef::new(
            format!("https://registry.test/v2/mp/blobs/{DIGEST}"),
            DIGEST,
            SIZE as u64,
        ),
        fetcher,
        cache,
        Arc::new(Scheduler::new(4)),
        RemoteOptions {
            min_fetch: 64 << 10,
            max_request: 256 << 10,
        },
    )
    .unwrap();
    if seed == u64::MAX {
        // The whole blob in order, once.
        let mut buf = vec![0u8; 64 << 10];
        for off in (0..SIZE).step_by(buf.len()) {
            blob.read_exact_at(&mut buf, off as u64).unwrap();
            assert!(
                buf[..] == reference[off..off + buf.len()],
                "wrong bytes at {off}"
            );
        }
        println!("R done");
        std::io::stdout().flush().unwrap();
        return;
    }
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 8192];
    for n in 0.. {
        let len = 1 + rng.below(8192) as usize;
        let off = rng.below((SIZE - len) as u64);
        blob.read_exact_at(&mut buf[..len], off).unwrap();
        if buf[..len] != reference[off as usize..off as usize + len] {
            println!("BAD {off} {len}");
            std::process::exit(3);
        }
        println!("R {n}");
        std::io::stdout().flush().unwrap();
    }
}

struct Kid {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    fetched: Vec<(u64, u64)>,
    bytes: u64,
}

fn spawn(src: &Path, dir: &Path, seed: u64, budget: u64) -> Kid {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(
            "OBD_CACHE_CHILD",
            format!("{}|{}|{seed}|{budget}", src.display(), dir.display()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Kid {
        child,
        lines,
        fetched: Vec::new(),
        bytes: 0,
    }
}

impl Kid {
    /// Reads the child's output until it has done `reads` more reads.
    fn run(&mut self, reads: u64) {
        let mut done = 0;
        while done < reads {
            let line = self.lines.next().expect("child output").unwrap();
            // libtest's "test child ... " has no newline before our first line.
            let line = line.strip_prefix("test child ... ").unwrap_or(&line);
            let mut w = line.split(' ');
            match w.next() {
                Some("R") => done += 1,
                Some("F") => {
                    let o: u64 = w.next().unwrap().parse().unwrap();
                    let l: u64 = w.next().unwrap().parse().unwrap();
                    self.fetched.push((o, l));
                    self.bytes += l;
                }
                Some("BAD") => panic!("child read wrong bytes: {line}"),
                _ => {}
            }
        }
    }

    /// Kills it (`kill -9`) and returns the ranges it fetched.
    fn kill(mut self) -> Vec<(u64, u64)> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.fetched
    }
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("blob");
    std::fs::write(&src, fixtures::random_bytes(77, SIZE)).unwrap();
    let dir = tmp.path().join("cache");
    (tmp, src, dir)
}

/// Runs 4 children for `rounds` rounds of `reads` reads, killing and
/// restarting them between rounds; returns each lifetime's fetches.
fn run_rounds(
    src: &Path,
    dir: &Path,
    budget: u64,
    rounds: u64,
    reads: u64,
) -> Vec<Vec<(u64, u64)>> {
    let mut lifetimes = Vec::new();
    for round in 0..rounds {
        let mut kids: Vec<Kid> = (0..4)
            .map(|k| spawn(src, dir, round * 10 + k, budget))
            .collect();
        for _ in 0..reads / 10 {
            for k in &mut kids {
                k.run(10);
            }
        }
        lifetimes.extend(kids.into_iter().map(Kid::kill));
    }
    lifetimes
}

#[test]
fn child() {
    let Ok(spec) = std::env::var("OBD_CACHE_CHILD") else {
        return;
    };
    let p: Vec<&str> = spec.split('|').collect();
    child_main(
        Path::new(p[0]),
        Path::new(p[1]),
        p[2].parse().unwrap(),
        p[3].parse().unwrap(),
    );
}

#[test]
fn processes_share_one_copy_and_survive_kills() {
    let (_tmp, src, dir) = setup();
    let lifetimes = run_rounds(&src, &dir, 1 << 30, 4, 300);
    let mut total = 0;
    for f in &lifetimes {
        // Within one process's lifetime no block is fetched twice.
        let mut seen = std::collections::HashSet::new();
        for &(o, l) in f {
            for u in (o..o + l).step_by(64 << 10) {
                assert!(seen.insert(u), "unit at {u} fetched twice by one process");
            }
        }
        total += f.iter().map(|r| r.1).sum::<u64>();
    }
    // Host-wide: a block is fetched again only when two processes missed it
    // at the same moment.
    let unique: std::collections::HashSet<u64> = lifetimes
        .iter()
        .flatten()
        .flat_map(|&(o, l)| (o..o + l).step_by(64 << 10))
        .collect();
    let unique_bytes = unique.len() as u64 * (64 << 10);
    assert!(
        total as f64 <= unique_bytes as f64 * 1.10,
        "fetched {total} bytes for {unique_bytes} distinct bytes"
    );
    // Everything the later rounds read was mostly there already.
    let cache = BlockCache::open(CacheOptions::new(&dir)).unwrap();
    let info = cache.list().unwrap();
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].cached, cache.usage());
    assert!(
        info[0].hits > 0 && info[0].fetched >= unique_bytes,
        "{info:?}"
    );
    eprintln!(
        "4 processes x 4 lifetimes: fetched {total} bytes for {unique_bytes} distinct; {info:?}"
    );
}

#[test]
fn processes_under_a_small_budget_never_read_wrong_bytes() {
    let (_tmp, src, dir) = setup();
    let budget = (SIZE / 4) as u64;
    run_rounds(&src, &dir, budget, 3, 300);
    let cache = BlockCache::open(CacheOptions {
        budget,
        ..CacheOptions::new(&dir)
    })
    .unwrap();
    assert!(
        cache.usage() <= budget,
        "usage {} > {budget}",
        cache.usage()
    );
    let info = cache.list().unwrap();
    assert!(info[0].evicted > 0, "{info:?}");
    eprintln!("budget {budget}: {info:?}");
}

#[test]
fn eight_processes_reading_one_cold_blob_at_once_fetch_it_about_once() {
    let (_tmp, src, dir) = setup();
    let mut kids: Vec<Kid> = (0..8)
        .map(|_| spawn(&src, &dir, u64::MAX, 1 << 30))
        .collect();
    for k in &mut kids {
        k.run(1);
    }
    let fetched: u64 = kids
        .into_iter()
        .map(|k| k.kill().iter().map(|r| r.1).sum::<u64>())
        .sum();
    let ratio = fetched as f64 / SIZE as f64;
    eprintln!("8 processes, one cold {SIZE}-byte blob: {fetched} bytes fetched ({ratio:.3}x)");
    assert!(ratio <= 1.05, "fetched {ratio:.3}x the blob");
}
