//! `obd bench remote`: lazy reads from a real `docker-registry` on 127.0.0.1,
//! against baselines in the same run: `curl` downloading the same blobs, the
//! same flatten from local copies of them (the ceiling for a remote flatten),
//! and foreground reads with no background download running. With
//! `--verify`: the cost of checking fetched bytes against the layers' piece
//! tables, as ratios of the same measurements with and without it, taken in
//! turns in one run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fixtures::registry::Registry;
use fixtures::Rng;
use obd_remote::blob::{RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::oci::Verity;
use obd_remote::registry::{RegistryClient, RegistryOptions};
use obd_remote::sched::Scheduler;
use obd_remote::verity::{piece_size_for, PieceTable};
use obd_remote::{BlobRef, Priority, RangeFetcher};
use serde_json::{json, Value};
use zfile::ReadAt;

/// A pushed layer blob: its digest, size and piece table.
type Pushed = (String, u64, Verity);

/// Pushes `file` and its piece table (as a blob of its own) to `repo`.
fn push(reg: &Registry, repo: &str, file: &Path) -> Result<Pushed> {
    let len = file.metadata()?.len();
    let t = PieceTable::build(
        std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?),
        piece_size_for(len),
    )?;
    let digest = t.blob_digest();
    reg.push(repo, file, &digest).map_err(anyhow::Error::msg)?;
    let table = t.encode();
    let tfile = file.with_extension("verity");
    std::fs::write(&tfile, &table)?;
    let v = Verity {
        digest: obd_remote::oci::sha256_digest(&table),
        size: table.len() as u64,
    };
    reg.push(repo, &tfile, &v.digest)
        .map_err(anyhow::Error::msg)?;
    std::fs::remove_file(&tfile)?;
    Ok((digest, len, v))
}

/// A fetcher that counts requests and bytes.
struct Counting {
    inner: RegistryClient,
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl RangeFetcher for Counting {
    fn fetch(
        &self,
        blob: &BlobRef,
        offset: u64,
        len: u64,
        prio: Priority,
    ) -> overlaybd_core::Result<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        self.inner.fetch(blob, offset, len, prio)
    }
    fn blob_size(&self, url: &str) -> overlaybd_core::Result<u64> {
        self.inner.blob_size(url)
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Random 4 KiB reads from a cold cache; returns latencies in µs and requests.
fn cold_reads(
    blob: &BlobRef,
    fetcher: Arc<dyn RangeFetcher>,
    sched: Arc<Scheduler>,
    cache_dir: &Path,
    offsets: &[u64],
) -> Result<(Vec<f64>, u64)> {
    let cache = BlockCache::open(CacheOptions::new(cache_dir))?;
    let rb = RemoteBlob::new(
        blob.clone(),
        fetcher,
        cache,
        sched,
        RemoteOptions::default(),
    )?;
    let mut lat = Vec::with_capacity(offsets.len());
    let mut buf = vec![0u8; 4096];
    for &off in offsets {
        let t = Instant::now();
        rb.read_exact_at(&mut buf, off)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((lat, rb.stats().requests))
}

pub fn run(size_mib: u64, threads: usize, dir: Option<PathBuf>, verify: bool) -> Result<Value> {
    let base = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("obd-bench-remote-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let res = if verify {
        verify_in(&base, size_mib, threads)
    } else {
        run_in(&base, size_mib, threads)
    };
    let _ = std::fs::remove_dir_all(&base);
    res
}

fn run_in(base: &Path, size_mib: u64, threads: usize) -> Result<Value> {
    let reg = Registry::start(base).map_err(|e| anyhow::anyhow!("obd bench remote: {e}"))?;
    let size = size_mib << 20;
    let blobs = push_layers(base, &reg, size)?;
    let (cfg, repo_url, blob_bytes) = image_config(base, &reg, &blobs, false)?;
    let blobs: Vec<(String, u64)> = blobs.into_iter().map(|(d, l, _)| (d, l)).collect();

    let curl_s = best_curl(&repo_url, &blobs)?;
    let exe = std::env::current_exe()?;
    let local_s = local_flatten(base, &exe, threads, &repo_url, &blobs)?;

    // obd: cold flatten (fresh cache each run, best of 3), as its own process.
    let flatten_s = best_flatten(
        &exe,
        threads,
        &cfg,
        Some(&base.join("cache-flatten")),
        &base.join("flat.img"),
    )
    .context("obd image flatten from the registry")?;

    let mut lat = read_latencies(base, &repo_url, blobs[0].clone())?;

    let (p50, p99) = (
        percentile(&mut lat.alone, 0.5),
        percentile(&mut lat.alone, 0.99),
    );
    let (bp50, bp99) = (
        percentile(&mut lat.busy, 0.5),
        percentile(&mut lat.busy, 0.99),
    );
    Ok(json!({
        "bench": "remote",
        "what": "lazy reads from docker-registry on 127.0.0.1 (loopback, plain HTTP)",
        "virtual_size": size,
        "blob_bytes": blob_bytes,
        "layer_format": "zfile(lz4,4K)(lsmt)",
        "curl_parallel_mb_per_s": blob_bytes as f64 / 1e6 / curl_s,
        "cold_flatten_mb_per_s": blob_bytes as f64 / 1e6 / flatten_s,
        "cold_flatten_vs_curl_ratio": curl_s / flatten_s,
        "cold_flatten_seconds": flatten_s,
        "local_flatten_seconds": local_s,
        "local_flatten_vs_curl_ratio": curl_s / local_s,
        "cold_flatten_vs_local_ratio": local_s / flatten_s,
        "flatten_threads": threads,
        "cold_random_4k_p50_us": p50,
        "cold_random_4k_p99_us": p99,
        "cold_random_4k_requests_per_read": lat.alone_requests as f64 / lat.reads as f64,
        "with_background_download_p50_us": bp50,
        "with_background_download_p99_us": bp99,
        "background_bytes_during_measurement": lat.background_bytes,
        "p50_ratio_with_vs_without_background": bp50 / p50,
        "p99_ratio_with_vs_without_background": bp99 / p99,
        "goals": {"cold_flatten_vs_curl_ratio": 0.7, "p50_ratio_with_vs_without_background": 1.5},
    }))
}

/// Writes `<base>/config.v1.json` over the pushed `blobs` (with their piece
/// tables when `verity`); returns its path, the repository's blob URL and
/// the blobs' total size.
fn image_config(
    base: &Path,
    reg: &Registry,
    blobs: &[Pushed],
    verity: bool,
) -> Result<(PathBuf, String, u64)> {
    let repo_url = reg.repo_blob_url("bench/img");
    let lowers: Vec<Value> = blobs
        .iter()
        .map(|(d, len, v)| match verity {
            true => json!({"digest": d, "size": len, "verity": v}),
            false => json!({"digest": d, "size": len}),
        })
        .collect();
    let cfg = base.join("config.v1.json");
    std::fs::write(
        &cfg,
        json!({"repoBlobUrl": repo_url, "lowers": lowers}).to_string(),
    )?;
    Ok((cfg, repo_url, blobs.iter().map(|b| b.1).sum()))
}

/// Builds the 3 benchmark layers and pushes them (and their piece tables)
/// to `bench/img`; returns each blob's digest, size and table.
fn push_layers(base: &Path, reg: &Registry, size: u64) -> Result<Vec<Pushed>> {
    let pool = fixtures::image_like(
        5,
        (64usize << 20).min(size as usize + (4 << 20)) + (4 << 20),
    );
    let mut blobs = Vec::new();
    for k in 0..3 {
        let file = crate::bench_read::build_layer(base, k, size, &pool, true)?;
        blobs.push(push(reg, "bench/img", &file)?);
        std::fs::remove_file(&file)?;
    }
    Ok(blobs)
}

/// Baseline: curl downloading the same blobs, all at once (best of 3), in seconds.
fn best_curl(repo_url: &str, blobs: &[(String, u64)]) -> Result<f64> {
    let mut curl_s = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let kids: Vec<Child> = blobs
            .iter()
            .map(|(d, _)| {
                Command::new("curl")
                    .args(["-sf", "-o", "/dev/null"])
                    .arg(format!("{repo_url}/{d}"))
                    .spawn()
            })
            .collect::<std::io::Result<_>>()?;
        for mut k in kids {
            ensure!(k.wait()?.success(), "curl download failed");
        }
        curl_s = curl_s.min(t.elapsed().as_secs_f64());
    }
    Ok(curl_s)
}

/// Ceiling: the same flatten from local copies of the blobs (page cache
/// warm, no network, no block cache), in seconds. The remote flatten does
/// all of this work and more, on the same cores.
fn local_flatten(
    base: &Path,
    exe: &Path,
    threads: usize,
    repo_url: &str,
    blobs: &[(String, u64)],
) -> Result<f64> {
    let mut local_lowers = Vec::new();
    for (k, (d, _)) in blobs.iter().enumerate() {
        let f = base.join(format!("local-blob-{k}"));
        let st = Command::new("curl")
            .args(["-sf", "-o"])
            .arg(&f)
            .arg(format!("{repo_url}/{d}"))
            .status()?;
        ensure!(st.success(), "curl download of {d} failed");
        local_lowers.push(json!({"file": f}));
    }
    let local_cfg = base.join("local.json");
    std::fs::write(&local_cfg, json!({"lowers": local_lowers}).to_string())?;
    let local_s = best_flatten(exe, threads, &local_cfg, None, &base.join("flat.img"))
        .context("obd image flatten of the local copies")?;
    for l in &local_lowers {
        if let Some(f) = l["file"].as_str() {
            let _ = std::fs::remove_file(f);
        }
    }
    Ok(local_s)
}

/// Cold random 4 KiB read latencies (µs), alone and during a background download.
struct Latencies {
    alone: Vec<f64>,
    /// Requests the reads alone made.
    alone_requests: u64,
    /// Reads in each measurement.
    reads: usize,
    busy: Vec<f64>,
    /// Bytes the background download fetched meanwhile.
    background_bytes: u64,
}

/// Cold random 4 KiB reads of the base layer blob, and the same while a
/// background download of that blob runs through the same scheduler.
fn read_latencies(base: &Path, repo_url: &str, (digest, len): (String, u64)) -> Result<Latencies> {
    let client = RegistryClient::new(RegistryOptions {
        use_docker_config: false,
        ..Default::default()
    })?;
    let fetcher = Arc::new(Counting {
        inner: client,
        requests: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    let blob = BlobRef::new(format!("{repo_url}/{digest}"), digest, len);
    let mut rng = Rng::new(77);
    let offsets: Vec<u64> = (0..300).map(|_| rng.below(len / 4096) * 4096).collect();
    let sched = Arc::new(Scheduler::new(8));
    let (alone, alone_requests) = cold_reads(
        &blob,
        fetcher.clone(),
        sched.clone(),
        &base.join("c-alone"),
        &offsets,
    )?;

    let stop = Arc::new(AtomicBool::new(false));
    let bg = background_download(
        blob.clone(),
        fetcher.clone(),
        sched.clone(),
        stop.clone(),
        base.join("c-bg"),
    );
    let mut rng = Rng::new(78);
    let offsets2: Vec<u64> = (0..300).map(|_| rng.below(len / 4096) * 4096).collect();
    // Let the background download get going before measuring.
    let t0 = Instant::now();
    while fetcher.bytes.load(Ordering::Relaxed) < (16 << 20)
        && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::yield_now();
    }
    let (busy, _) = cold_reads(
        &blob,
        fetcher.clone(),
        sched,
        &base.join("c-busy"),
        &offsets2,
    )?;
    stop.store(true, Ordering::Relaxed);
    let background_bytes = bg
        .join()
        .map_err(|_| anyhow::anyhow!("background thread panicked"))??;
    Ok(Latencies {
        alone,
        alone_requests,
        reads: offsets.len(),
        busy,
        background_bytes,
    })
}

/// Downloads `blob` into a block cache in `dir` again and again, in the
/// background, until `stop`; the thread returns the bytes fetched.
fn background_download(
    blob: BlobRef,
    fetcher: Arc<Counting>,
    sched: Arc<Scheduler>,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
) -> std::thread::JoinHandle<Result<u64>> {
    std::thread::spawn(move || -> Result<u64> {
        let cache = BlockCache::open(CacheOptions::new(&dir))?;
        let rb = RemoteBlob::new(
            blob.clone(),
            fetcher,
            cache.clone(),
            sched,
            RemoteOptions::default(),
        )?;
        let mut done = 0u64;
        // Download the blob again and again until told to stop.
        while !stop.load(Ordering::Relaxed) {
            let mut at = 0;
            while at < blob.size && !stop.load(Ordering::Relaxed) {
                let n = (4u64 << 20).min(blob.size - at);
                rb.fetch_into_cache(at, n, Priority::Background)?;
                done += n;
                at += n;
            }
            cache.evict_blob(&blob.digest)?;
        }
        Ok(done)
    })
}

/// Best of 3 runs of `obd image flatten --config cfg -o out` as its own
/// process, in seconds; with `cache`, each run starts from a fresh block
/// cache (`<cache>-<i>`, removed after the run).
fn best_flatten(
    exe: &Path,
    threads: usize,
    cfg: &Path,
    cache: Option<&Path>,
    out: &Path,
) -> Result<f64> {
    best_flatten_with(exe, (threads, None), cfg, cache, out, 3)
}

/// [`best_flatten`] with a service config, best of `runs`.
fn best_flatten_with(
    exe: &Path,
    (threads, service): (usize, Option<&Path>),
    cfg: &Path,
    cache: Option<&Path>,
    out: &Path,
    runs: usize,
) -> Result<f64> {
    let mut best = f64::MAX;
    for i in 0..runs {
        let _ = std::fs::remove_file(out);
        let cache = cache.map(|c| PathBuf::from(format!("{}-{i}", c.display())));
        let mut cmd = Command::new(exe);
        cmd.args(["image", "flatten", "--no-sync", "--threads"])
            .arg(threads.to_string())
            .arg("--config")
            .arg(cfg)
            .arg("-o")
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(c) = &cache {
            cmd.arg("--cache-dir").arg(c);
        }
        if let Some(s) = service {
            cmd.arg("--service-config").arg(s);
        }
        let t = Instant::now();
        let st = cmd.status()?;
        ensure!(st.success(), "exit status {st}");
        best = best.min(t.elapsed().as_secs_f64());
        if let Some(c) = &cache {
            let _ = std::fs::remove_dir_all(c);
        }
        let _ = std::fs::remove_file(out);
    }
    Ok(best)
}

/// `--verify`: cold random 4 KiB reads (p50, p99) and cold flatten with the
/// blobs' piece tables checked and without, in turns (off, on, on, off, …:
/// each side goes first every other round) against one registry, so drift
/// and page-cache warmth hit both alike.
fn verify_in(base: &Path, size_mib: u64, threads: usize) -> Result<Value> {
    let reg = Registry::start(base).map_err(|e| anyhow::anyhow!("obd bench remote: {e}"))?;
    let blobs = push_layers(base, &reg, size_mib << 20)?;
    let (cfg, repo_url, blob_bytes) = image_config(base, &reg, &blobs, true)?;

    // Cold random reads of the base layer, through one client.
    let (digest, len, v) = blobs[0].clone();
    let client: Arc<dyn RangeFetcher> = Arc::new(RegistryClient::new(RegistryOptions {
        use_docker_config: false,
        ..Default::default()
    })?);
    let plain = BlobRef::new(format!("{repo_url}/{digest}"), digest, len);
    let table = obd_remote::service::fetch_piece_table(&*client, &repo_url, &plain, &v)?;
    let checked = BlobRef {
        verity: Some(table),
        ..plain.clone()
    };
    let sched = Arc::new(Scheduler::new(8));
    const ROUNDS: usize = 4;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let mut rng = Rng::new(100 + round as u64);
        let offsets: Vec<u64> = (0..300).map(|_| rng.below(len / 4096) * 4096).collect();
        // Alternate which side goes first, so neither always runs on the
        // other's warm page cache and writeback.
        let sides = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for verify in sides {
            let out = if verify { &mut on } else { &mut off };
            let blob = if verify { &checked } else { &plain };
            let dir = base.join(format!("c-verify-{round}-{verify}"));
            let (lat, _) = cold_reads(blob, client.clone(), sched.clone(), &dir, &offsets)?;
            out.extend(lat);
            std::fs::remove_dir_all(&dir)?;
        }
    }
    let (p50_off, p99_off) = (percentile(&mut off, 0.5), percentile(&mut off, 0.99));
    let (p50_on, p99_on) = (percentile(&mut on, 0.5), percentile(&mut on, 0.99));

    // Cold flatten as its own process, the policy set by the service config.
    let exe = std::env::current_exe()?;
    let (mut fl_off, mut fl_on) = (f64::MAX, f64::MAX);
    for round in 0..4 {
        let sides = if round % 2 == 0 {
            ["off", "if-present"]
        } else {
            ["if-present", "off"]
        };
        for verify in sides {
            let best = if verify == "off" {
                &mut fl_off
            } else {
                &mut fl_on
            };
            let svc = base.join(format!("service-{verify}.toml"));
            std::fs::write(&svc, format!("[cache]\nverify = \"{verify}\"\n"))?;
            let t = best_flatten_with(
                &exe,
                (threads, Some(&svc)),
                &cfg,
                Some(&base.join(format!("cache-flatten-{verify}-{round}"))),
                &base.join("flat.img"),
                1,
            )
            .with_context(|| format!("obd image flatten, verify = {verify}"))?;
            *best = best.min(t);
        }
    }
    Ok(json!({
        "bench": "remote --verify",
        "what": "piece-table checks of lazily fetched bytes: the same cold reads with and without, in turns, from docker-registry on 127.0.0.1",
        "virtual_size": size_mib << 20,
        "blob_bytes": blob_bytes,
        "piece_size": piece_size_for(len),
        "cold_random_4k_reads_per_side": off.len(),
        "cold_random_4k_p50_us_verify_off": p50_off,
        "cold_random_4k_p50_us_verify_on": p50_on,
        "cold_random_4k_p50_ratio_on_vs_off": p50_on / p50_off,
        "cold_random_4k_p99_us_verify_off": p99_off,
        "cold_random_4k_p99_us_verify_on": p99_on,
        "cold_flatten_seconds_verify_off": fl_off,
        "cold_flatten_seconds_verify_on": fl_on,
        "cold_flatten_ratio_on_vs_off": fl_on / fl_off,
        "flatten_threads": threads,
        "goals": {"cold_random_4k_p50_ratio_on_vs_off": 1.05, "cold_flatten_ratio_on_vs_off": 1.05},
    }))
}
