//! `obd demo`: the whole path on one machine, end to end. It starts a
//! registry on 127.0.0.1, builds a small sample image (busybox plus an app
//! layer with data the app does not read), converts it to obd, starts a
//! private containerd with `obd-snapshotter`, pulls lazily, runs the
//! container, and prints what was fetched and how long each phase took.
//! Everything lives in one temporary directory and is cleaned up afterwards.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::testbed::{
    blob_traffic, build_sample, dir_bytes, find_snapshotter, have, run_ok, Options, Testbed,
};
use crate::util::human;

/// Run the end-to-end demo (needs root, containerd, runc, docker-registry).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Work directory (default: a new directory under /tmp); removed at the
    /// end unless `--keep`.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Keep the work directory, containerd and the snapshotter's state.
    #[arg(long)]
    pub keep: bool,
    /// The `obd-snapshotter` binary (default: next to `obd`, else on PATH).
    #[arg(long)]
    pub snapshotter: Option<PathBuf>,
    /// Size of the app layer's data the container does not read.
    #[arg(long, default_value = "64M", value_parser = size_arg)]
    pub data: u64,
    /// The snapshotter's `rw_mode` for the container: overlayfs, dir or dev.
    #[arg(long, default_value = "overlayfs", value_parser = ["overlayfs", "dir", "dev"])]
    pub rw_mode: String,
    /// Pull with plain `ctr image pull` instead of `obd pull`: containerd
    /// 1.x downloads the obd layers in full and the snapshotter serves them
    /// from the tar-wrapped copies (the fallback path); 2.x pulls through
    /// its transfer service, lazily (docs/KUBERNETES.md).
    #[arg(long)]
    pub plain_pull: bool,
    /// Print the figures as one JSON object at the end.
    #[arg(long)]
    pub json: bool,
}

fn size_arg(s: &str) -> Result<u64, String> {
    crate::util::parse_size(s).map_err(|e| e.to_string())
}

/// What the container prints first.
pub const EXPECTED: &str = crate::testbed::EXPECTED;
/// What it prints after writing to its rootfs and reading that back.
pub const WRITTEN: &str = crate::testbed::WRITTEN;

struct Phases {
    rows: Vec<(&'static str, f64)>,
    t: Instant,
}

impl Phases {
    fn done(&mut self, name: &'static str) {
        let s = self.t.elapsed().as_secs_f64();
        self.rows.push((name, s));
        println!("  {name:<28} {s:>7.2} s");
        let _ = std::io::stdout().flush();
        self.t = Instant::now();
    }
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("obd demo needs root (containerd, runc, mounts, loop and FUSE devices)");
    }
    for t in ["containerd", "ctr", "runc", "docker-registry"] {
        if !have(t) {
            bail!("{t} is not installed (run scripts/setup.sh, or apt install containerd runc docker-registry)");
        }
    }
    let fuse = crate::node::fuse_dev();
    if !fuse.exists() {
        bail!(
            "{} is missing: the kernel has no FUSE; run `modprobe fuse` (`obd doctor` checks the whole node)",
            fuse.display()
        );
    }
    let snapshotter = find_snapshotter(a.snapshotter)?;
    let obd = std::env::current_exe().context("locating obd")?;
    let mut opts = Options::new(obd, snapshotter);
    opts.dir = a.workdir;
    opts.keep = a.keep;
    opts.rw_mode = a.rw_mode.clone();
    opts.prefix = "obd-demo-".into();
    let mut tb = Testbed::new(opts)?;
    let dir = tb.dir.clone();
    println!("obd demo in {}", dir.display());
    let mut ph = Phases {
        rows: Vec::new(),
        t: Instant::now(),
    };

    // 1. Registry, with an access log to count what is fetched.
    tb.start_registry()?;
    let reg = tb.reg.clone();
    let access = tb.access_log.clone();
    ph.done("start registry");

    // 2. Sample image.
    let layout = dir.join("oci");
    let image_bytes = build_sample(&layout, 2, a.data)?;
    ph.done("build sample OCI image");

    // 3. Convert and push.
    let image = format!("{reg}/obd-demo/app:obd");
    tb.convert_push(&layout, "demo", &image)?;
    let pushed = dir_bytes(&dir.join("registry-data"));
    let before = std::fs::read_to_string(&access).unwrap_or_default().len();
    ph.done("convert + push to registry");

    // 4. Snapshotter and containerd, and the node checked as a user would.
    tb.start_runtime()?;
    let ctr = || tb.ctr();
    ph.done("start containerd + obd-snapshotter");
    let doctor = run_ok(&mut tb.doctor(Some(&image)))?;
    print!("{}", indent(&doctor));
    ph.done("obd doctor --image");

    // 5. Lazy pull.
    if a.plain_pull {
        run_ok(ctr().args([
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "obd",
            &image,
        ]))?;
        ph.done("ctr image pull (full download)");
    } else {
        let pull = run_ok(&mut tb.obd_pull("default", &image))?;
        print!("{}", indent(&pull));
        ph.done("obd pull (remote snapshots)");
    }

    // 6. Run.
    let out = run_ok(ctr().args([
        "run",
        "--snapshotter",
        "obd",
        "--rm",
        &image,
        &tb.cid("obd-demo"),
    ]))?;
    ph.done("ctr run (attach + start + exit)");
    for l in out.lines() {
        println!("  container printed: {l}");
    }
    if out.trim() != format!("{EXPECTED}\n{WRITTEN}") {
        bail!("the container printed {out:?}, expected {EXPECTED:?} and {WRITTEN:?}");
    }

    let text = std::fs::read_to_string(&access).unwrap_or_default();
    let tail = dir.join("registry-access.after-push.log");
    std::fs::write(&tail, &text.as_bytes()[before.min(text.len())..])?;
    let (fetched, reqs) = blob_traffic(&tail);
    let total: f64 = ph.rows.iter().map(|r| r.1).sum();
    println!(
        "image: {} as OCI layers, {} as obd blobs pushed; the container fetched {} in {} blob requests ({:.1}% of the obd image)",
        human(image_bytes),
        human(pushed),
        human(fetched),
        reqs,
        100.0 * fetched as f64 / pushed.max(1) as f64
    );
    println!("total {total:.2} s");
    if a.json {
        let phases: serde_json::Map<String, serde_json::Value> = ph
            .rows
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        println!(
            "{}",
            json!({"image_bytes": image_bytes, "obd_bytes": pushed, "fetched_bytes": fetched,
                   "fetch_requests": reqs, "output": out.trim(), "rw_mode": a.rw_mode,
                   "plain_pull": a.plain_pull, "phases_s": phases})
        );
    }
    if a.keep {
        println!(
            "kept {} (containerd, obd-snapshotter and the registry are still running)",
            dir.display()
        );
    }
    drop(tb);
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
