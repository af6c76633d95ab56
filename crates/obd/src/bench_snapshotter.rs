//! `obd bench snapshotter`: the containerd path on one machine, in one run.
//!
//! - Pull: `runs` remote-snapshot pulls (`snapshotter::pull`, in process)
//!   of an N-layer obd image, each into a fresh containerd namespace so
//!   every pull commits all its snapshots anew; p50/p99/max seconds.
//! - Warm start: the same content as plain OCI on containerd's `overlayfs`
//!   snapshotter against the obd image on `obd`, one warm-up run each, then
//!   `runs` × `ctr run --rm … /app/run.sh` interleaved (A B A B …); medians,
//!   p90 and the ratio obd/overlayfs. Measured twice: with no other
//!   container of the image (each obd run attaches the image's device and
//!   releases it at `--rm`), and with a long-running container holding the
//!   device.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use snapshotter::pull::{pull_blocking, PullOptions};

use crate::testbed::{
    build_sample, find_snapshotter, have, run_ok, Options, Testbed, EXPECTED, WRITTEN,
};

/// Options of `obd bench snapshotter`.
#[derive(Args, Debug)]
pub struct SnapshotterArgs {
    /// Measured runs of each kind.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Layers of the sample image (busybox, small layers, the app).
    #[arg(long, default_value_t = 20)]
    pub layers: usize,
    /// Size of the app layer's data the container does not read.
    #[arg(long, default_value = "16M", value_parser = size_arg)]
    pub data: u64,
    /// The `obd-snapshotter` binary (default: next to `obd`, else on PATH).
    #[arg(long)]
    pub snapshotter: Option<PathBuf>,
    /// Work directory (default: a new directory under /tmp); its file
    /// system holds containerd's and the snapshotter's metadata, so its
    /// fsync cost shows in the pull figures.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Keep the work directory and the processes.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn size_arg(s: &str) -> Result<u64, String> {
    crate::util::parse_size(s).map_err(|e| e.to_string())
}

/// The nearest-rank `p` quantile (0..=1) of sorted `v`.
fn quantile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (p * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn summary(v: &[f64]) -> Value {
    let s = sorted(v.to_vec());
    json!({
        "p50_s": quantile(&s, 0.5),
        "p90_s": quantile(&s, 0.9),
        "p99_s": quantile(&s, 0.99),
        "max_s": s.last().copied().unwrap_or(f64::NAN),
    })
}

/// One timed `ctr run --rm`; checks what the container printed.
fn timed_run(tb: &Testbed, sn: &str, image: &str, id: &str) -> Result<f64> {
    let id = &tb.cid(id);
    let t = Instant::now();
    let out =
        run_ok(
            tb.ctr()
                .args(["run", "--rm", "--snapshotter", sn, image, id, "/app/run.sh"]),
        )?;
    let dt = t.elapsed().as_secs_f64();
    ensure!(
        out.trim() == format!("{EXPECTED}\n{WRITTEN}"),
        "container {id} on {sn} printed {out:?}"
    );
    Ok(dt)
}

/// `runs` interleaved starts of `a` (overlayfs) and `b` (obd) after one
/// warm-up each; (overlayfs times, obd times).
fn interleaved(
    tb: &Testbed,
    runs: usize,
    oci: &str,
    obd: &str,
    tag: &str,
) -> Result<(Vec<f64>, Vec<f64>)> {
    timed_run(tb, "overlayfs", oci, &format!("{tag}-oci-warm"))?;
    timed_run(tb, "obd", obd, &format!("{tag}-obd-warm"))?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..runs {
        a.push(timed_run(tb, "overlayfs", oci, &format!("{tag}-oci-{i}"))?);
        b.push(timed_run(tb, "obd", obd, &format!("{tag}-obd-{i}"))?);
    }
    Ok((a, b))
}

fn start_figures(a: &[f64], b: &[f64]) -> Value {
    let (sa, sb) = (sorted(a.to_vec()), sorted(b.to_vec()));
    let (ma, mb) = (quantile(&sa, 0.5), quantile(&sb, 0.5));
    let (pa, pb) = (quantile(&sa, 0.9), quantile(&sb, 0.9));
    json!({
        "overlayfs_median_s": ma, "overlayfs_p90_s": pa,
        "obd_median_s": mb, "obd_p90_s": pb,
        "ratio_median": mb / ma, "ratio_p90": pb / pa,
    })
}

/// The file system type of the mount holding `dir` (/proc/self/mountinfo): the
/// longest mount point above it, the last mounted if several.
fn fs_type(dir: &std::path::Path) -> String {
    tcmu_target::mountinfo::mounts()
        .into_iter()
        .filter(|m| dir.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| m.fs_type)
        .unwrap_or_default()
}

/// Runs the benchmark.
pub fn run(a: SnapshotterArgs) -> Result<Value> {
    if !rustix::process::geteuid().is_root() {
        bail!("obd bench snapshotter needs root (containerd, runc, mounts, loop and FUSE devices)");
    }
    for t in ["containerd", "ctr", "runc", "docker-registry", "skopeo"] {
        if !have(t) {
            bail!("{t} is not installed (run scripts/setup.sh)");
        }
    }
    ensure!(a.runs > 0, "--runs must be at least 1");
    ensure!(
        (2..=255).contains(&a.layers),
        "--layers must be between 2 and 255"
    );
    let snapshotter = find_snapshotter(a.snapshotter)?;
    let obd_exe = std::env::current_exe().context("locating obd")?;
    let mut opts = Options::new(obd_exe, snapshotter);
    opts.keep = a.keep;
    opts.dir = a.workdir;
    opts.prefix = "obd-bench-sn-".into();
    let mut tb = Testbed::new(opts)?;
    eprintln!("obd bench snapshotter in {}", tb.dir.display());
    tb.start_registry()?;
    let layout = tb.dir.join("oci");
    let image_bytes = build_sample(&layout, a.layers, a.data)?;
    let obd_image = format!("{}/obd-bench/app:obd", tb.reg);
    let oci_image = format!("{}/obd-bench/app:oci", tb.reg);
    tb.convert_push(&layout, "demo", &obd_image)?;
    run_ok(
        std::process::Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:demo", layout.display()))
            .arg(format!("docker://{oci_image}")),
    )?;
    tb.start_runtime()?;

    // 1. Remote-snapshot pulls, each into a fresh namespace.
    let mut pulls = Vec::with_capacity(a.runs);
    for i in 0..a.runs {
        let mut po = PullOptions::new(&obd_image);
        po.address = tb.sock.clone();
        po.namespace = format!("bench-{i}");
        po.plain_http = true;
        let t = Instant::now();
        let r = pull_blocking(&po, |_| {}).with_context(|| format!("pull {i} of {obd_image}"))?;
        pulls.push(t.elapsed().as_secs_f64());
        ensure!(
            r.remote_layers == a.layers,
            "pull {i}: {} of {} layers were remote snapshots",
            r.remote_layers,
            a.layers
        );
    }

    // 2. Warm starts: the OCI image unpacked on overlayfs, the obd image
    // pulled lazily into the default namespace.
    run_ok(
        tb.ctr()
            .args(["images", "pull", "--plain-http", &oci_image]),
    )?;
    run_ok(&mut tb.obd_pull("default", &obd_image))?;
    let (oci_free, obd_free) = interleaved(&tb, a.runs, &oci_image, &obd_image, "s")?;
    // The same with a container holding the image's device.
    let holder = tb.cid("holder");
    run_ok(tb.ctr().args([
        "run",
        "-d",
        "--snapshotter",
        "obd",
        &obd_image,
        &holder,
        "sleep",
        "100000",
    ]))?;
    let (oci_held, obd_held) = interleaved(&tb, a.runs, &oci_image, &obd_image, "h")?;
    run_ok(tb.ctr().args(["tasks", "rm", "-f", &holder]))?;
    run_ok(tb.ctr().args(["containers", "rm", &holder]))?;

    // What attaching the image's device cost, from the snapshotter's log.
    let log = std::fs::read_to_string(tb.dir.join("snapshotter.log")).unwrap_or_default();
    let attach_ms: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("device attached"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
        })
        .collect();
    let attach = sorted(attach_ms);

    let p = summary(&pulls);
    let start = start_figures(&oci_free, &obd_free);
    let held = start_figures(&oci_held, &obd_held);
    let ok_pull = p["p99_s"].as_f64().is_some_and(|v| v <= 0.2);
    let ok_start = start["ratio_median"].as_f64().is_some_and(|v| v <= 1.1);
    Ok(json!({
        "bench": "snapshotter",
        "layers": a.layers,
        "runs": a.runs,
        "image_bytes": image_bytes,
        "workdir_fs": fs_type(&tb.dir),
        "pull_remote": p,
        "pull_goal_p99_s": 0.2,
        "pull_goal_met": ok_pull,
        "start": start,
        "start_device_held": held,
        "device_attaches": attach.len(),
        "device_attach_median_ms": quantile(&attach, 0.5),
        "start_goal_ratio": 1.1,
        "start_goal_met": ok_start,
        "pull_s": pulls,
        "start_overlayfs_s": oci_free,
        "start_obd_s": obd_free,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 10.0);
        assert_eq!(quantile(&v, 0.9), 18.0);
        assert_eq!(quantile(&v, 0.99), 20.0);
        assert_eq!(quantile(&[3.0], 0.5), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
