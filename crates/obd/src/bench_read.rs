//! `obd bench read`: flatten of a generated 3-layer image from local files,
//! against copying a plain file of the same size, both with a warm page cache.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use fixtures::Rng;
use overlaybd_core::config::{ImageConfig, Lower};
use overlaybd_core::lsmt::{CommitOptions, CreateOptions, WritableLayer};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Builds layer `k` of the benchmark image: layer 0 covers the whole disk, layer 1
/// rewrites ~25% of it and layer 2 ~10%, in 256 KiB pieces.
pub fn build_layer(dir: &Path, k: usize, size: u64, pool: &[u8], zfile: bool) -> Result<PathBuf> {
    let data = dir.join(format!("layer{k}.data"));
    let index = dir.join(format!("layer{k}.index"));
    let mut w = WritableLayer::create(
        &data,
        &index,
        CreateOptions {
            virtual_size: if k == 0 { size } else { 0 },
            ..Default::default()
        },
    )?;
    let mut rng = Rng::new(100 + k as u64);
    let stamp = |buf: &mut [u8], at: u64| {
        // Make every 4 KiB page unique so no two layers or pages are alike.
        for (i, page) in buf.chunks_mut(4096).enumerate() {
            page[..8].copy_from_slice(&(at + i as u64 * 4096 + k as u64).to_le_bytes());
        }
    };
    let piece = 4 * MIB;
    let mut buf = vec![0u8; piece as usize];
    if k == 0 {
        for at in (0..size).step_by(piece as usize) {
            let n = piece.min(size - at) as usize;
            let src = (at % (pool.len() as u64 - piece)) as usize;
            buf[..n].copy_from_slice(&pool[src..src + n]);
            stamp(&mut buf[..n], at);
            w.write_at(&buf[..n], at)?;
        }
    } else {
        let share = if k == 1 { 4 } else { 10 };
        let count = size / (256 << 10) / share;
        for _ in 0..count {
            let at = rng.below(size / (256 << 10)) * (256 << 10);
            let src = rng.below((pool.len() as u64 - piece) / 4096) as usize * 4096;
            buf[..256 << 10].copy_from_slice(&pool[src..src + (256 << 10)]);
            stamp(&mut buf[..256 << 10], at);
            w.write_at(&buf[..256 << 10], at)?;
        }
    }
    let out_path = dir.join(format!("layer{k}.{}", if zfile { "zfile" } else { "lsmt" }));
    let mut out = File::create(&out_path)?;
    if zfile {
        let mut z = zfile::ZFileWriter::new(
            &mut out,
            zfile::Options {
                algorithm: zfile::Algorithm::Lz4,
                block_size: 4096,
                threads: 2,
                ..Default::default()
            },
        )?;
        w.commit(&CommitOptions::default(), &mut z)?;
        z.finish()?;
    } else {
        let mut bw = std::io::BufWriter::with_capacity(4 << 20, &mut out);
        w.commit(&CommitOptions::default(), &mut bw)?;
        bw.flush()?;
    }
    drop(w);
    std::fs::remove_file(&data)?;
    std::fs::remove_file(&index)?;
    Ok(out_path)
}

/// Warms the page cache with `p`.
fn read_all(p: &Path) -> Result<u64> {
    Ok(std::io::copy(&mut File::open(p)?, &mut std::io::sink())?)
}

/// Best wall time of `runs` runs of `f`; `out` is deleted before each run,
/// outside the timing (dropping a 1 GiB file's page cache is not the work).
fn best_of<T>(runs: usize, out: &Path, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..runs {
        let _ = std::fs::remove_file(out);
        let t0 = Instant::now();
        f()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

pub fn run(size_mib: u64, zfile: bool, dir: Option<PathBuf>) -> Result<Value> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = tempdir()?;
            tmp.0.clone()
        }
    };
    let size = size_mib * MIB;
    let pool = fixtures::image_like(
        5,
        (64 * MIB).min(size + 4 * MIB) as usize + 4 * MIB as usize,
    );
    let t0 = Instant::now();
    let (layers, cfg_path) = build_image(&dir, size, &pool, zfile)?;
    let build_s = t0.elapsed().as_secs_f64();
    let layer_bytes: u64 = layers
        .iter()
        .map(|p| p.metadata().map_or(0, |m| m.len()))
        .sum();

    // Warm the page cache, and make the plain file the copy baseline reads.
    for p in &layers {
        read_all(p)?;
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let t = Timings::measure(&dir, &cfg_path, &layers, threads)?;
    let mb = size as f64 / 1e6;
    Ok(json!({
        "bench": "read",
        "what": "obd image flatten (no fsync) of a 3-layer image from local files vs copying a plain file of the same size with `dd bs=4M` (userspace loop) and `cp` (copy_file_range); page cache warm; each op its own process; best of 3 interleaved rounds",
        "virtual_size": size,
        "layers": 3,
        "layer_format": if zfile { "zfile(lz4,4K)(lsmt)" } else { "lsmt" },
        "layer_bytes": layer_bytes,
        "build_seconds": build_s,
        "threads": threads,
        "flatten_mb_per_s": mb / t.flatten,
        "flatten_1_thread_mb_per_s": mb / t.flatten1,
        "dd_copy_mb_per_s": mb / t.dd,
        "cp_copy_mb_per_s": mb / t.cp,
        "flatten_vs_dd_ratio": t.dd / t.flatten,
        "flatten_vs_cp_ratio": t.cp / t.flatten,
        "goal_ratio": 0.8,
    }))
}

/// Builds the 3 layers of the benchmark image in `dir` (from `pool`) and its
/// config; returns the layer files and the config's path.
fn build_image(dir: &Path, size: u64, pool: &[u8], zfile: bool) -> Result<(Vec<PathBuf>, PathBuf)> {
    let layers: Vec<PathBuf> = (0..3)
        .map(|k| build_layer(dir, k, size, pool, zfile))
        .collect::<Result<_>>()?;
    let cfg = ImageConfig {
        lowers: layers
            .iter()
            .map(|p| Lower {
                file: p.display().to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let cfg_path = dir.join("config.v1.json");
    cfg.save_atomic(&cfg_path)?;
    Ok((layers, cfg_path))
}

/// Runs `prog args` to completion, its output discarded.
fn run_quiet(prog: &Path, args: &[&str]) -> Result<()> {
    let st = std::process::Command::new(prog)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", prog.display()))?;
    anyhow::ensure!(st.success(), "{} {args:?} failed", prog.display());
    Ok(())
}

/// Best wall times, in seconds, of the measured operations.
struct Timings {
    dd: f64,
    cp: f64,
    flatten1: f64,
    flatten: f64,
}

impl Timings {
    /// Each measured operation runs in its own process, as a user runs it: `obd
    /// image flatten` (without the final fsync, like the copies) against `cp`
    /// (copy_file_range) and `dd bs=4M` (a userspace read/write loop), copying
    /// a plain file made by flattening the image once; the flattened disk must
    /// equal it byte for byte.
    fn measure(dir: &Path, cfg_path: &Path, layers: &[PathBuf], threads: usize) -> Result<Timings> {
        let flat = dir.join("flat.img");
        let plain = dir.join("plain.img");
        let exe = std::env::current_exe()?;
        let cfg_s = cfg_path.display().to_string();
        let flat_s = flat.display().to_string();
        let plain_s = plain.display().to_string();
        let flatten = |threads: usize| {
            let t = threads.to_string();
            run_quiet(
                &exe,
                &[
                    "image",
                    "flatten",
                    "--no-sync",
                    "--threads",
                    &t,
                    "--config",
                    &cfg_s,
                    "-o",
                    &flat_s,
                ],
            )
        };
        run_quiet(
            &exe,
            &["image", "flatten", "--config", &cfg_s, "-o", &plain_s],
        )?;
        read_all(&plain)?;
        // Nothing dirty left behind by the set-up: writeback must not run during timing.
        for p in layers.iter().chain([&plain]) {
            File::open(p)?.sync_all()?;
        }
        // Interleaved rounds, best of each, so background noise hits all alike.
        let dd_of = format!("of={flat_s}");
        let dd_if = format!("if={plain_s}");
        let mut t = Timings {
            dd: f64::MAX,
            cp: f64::MAX,
            flatten1: f64::MAX,
            flatten: f64::MAX,
        };
        for _ in 0..3 {
            t.dd = t.dd.min(best_of(1, &flat, || {
                run_quiet(Path::new("dd"), &[&dd_if, &dd_of, "bs=4M", "status=none"])
            })?);
            t.cp = t.cp.min(best_of(1, &flat, || {
                run_quiet(Path::new("cp"), &[&plain_s, &flat_s])
            })?);
            t.flatten1 = t.flatten1.min(best_of(1, &flat, || flatten(1))?);
            t.flatten = t.flatten.min(best_of(1, &flat, || flatten(threads))?);
        }
        // The flattened disk must equal the plain copy source byte for byte.
        let same = crate::util::sha256_hex(File::open(&flat)?)?
            == crate::util::sha256_hex(File::open(&plain)?)?;
        let _ = std::fs::remove_file(&flat);
        let _ = std::fs::remove_file(&plain);
        anyhow::ensure!(same, "flatten output differs from the reference disk");
        Ok(t)
    }
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!("obd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    Ok(TempDir(base))
}
