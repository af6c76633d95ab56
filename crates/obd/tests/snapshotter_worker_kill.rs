//! Device workers killed under running containers, with a real registry,
//! containerd and runc (the testbed of `obd demo`): 20 times `kill -9` of
//! every device worker while a container reads its lazily pulled files
//! (page cache dropped before each check, so the reads go to the device) in
//! rw_mode `overlayfs` and `dir` (where it also writes and syncs). The
//! snapshotter replaces each worker on the same device: no read fails, no
//! checksum differs, the container's own shell loop (which dies on any
//! error, SIGBUS included) keeps running, and every synced write is there.
//! Prints the longest check (the stall a program sees). Needs root,
//! containerd, runc, docker-registry, busybox and FUSE; otherwise skipped
//! loudly.

#[allow(dead_code)]
#[path = "../src/testbed.rs"]
mod testbed;

use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use testbed::{build_sample, run_ok, wait_until, Options, Testbed};

mod common;
use common::{testbed_bins, workers};

const KILLS: usize = 20;
/// Bytes of `/app/data` (8 MiB blobs).
const DATA: u64 = 24 << 20;

fn kills_under_a_running_container(rw_mode: &str) {
    let tools = ["containerd", "ctr", "runc", "docker-registry"];
    let test = format!("worker kills under a container ({rw_mode})");
    let Some((obd, sn)) = testbed_bins(&test, &tools) else {
        return;
    };
    let mut opts = Options::new(obd, sn);
    opts.prefix = "obd-wkill-".into();
    opts.rw_mode = rw_mode.into();
    opts.keep = std::env::var_os("OBD_TEST_KEEP").is_some();
    let mut tb = Testbed::new(opts).unwrap();
    let root = tb.snroot.clone();
    tb.start_registry().unwrap();
    let layout = tb.dir.join("oci");
    build_sample(&layout, 3, DATA).unwrap();
    let image = format!("{}/wkill/app:obd", tb.reg);
    tb.convert_push(&layout, "demo", &image).unwrap();
    tb.start_runtime().unwrap();
    run_ok(&mut tb.obd_pull("default", &image)).expect("obd pull");

    // The blobs' checksums, as `sha256sum` prints them.
    let blobs = DATA.div_ceil(8 << 20);
    let want: String = (0..blobs)
        .map(|n| {
            let len = (DATA - n * (8 << 20)).min(8 << 20) as usize;
            let sum = hex::encode(Sha256::digest(fixtures::image_like(1000 + n, len)));
            format!("{sum}  /app/data/blob-{n}\n")
        })
        .collect();
    let files: Vec<String> = (0..blobs).map(|n| format!("/app/data/blob-{n}")).collect();

    // The container's own loop reads everything forever and exits at the
    // first error (a SIGBUS kills it too).
    let c = tb.cid(&format!("wk-{rw_mode}"));
    let lp = "while :; do cat /app/data/* /bin/busybox > /dev/null || exit 3; done";
    run_ok(tb.ctr().args([
        "run",
        "-d",
        "--snapshotter",
        "obd",
        &image,
        &c,
        "sh",
        "-c",
        lp,
    ]))
    .expect("ctr run -d");
    wait_until("the container running", Duration::from_secs(60), || {
        tb.task_status(&c) == "RUNNING"
    })
    .unwrap();
    let mut n_exec = 0;
    let mut exec = |tb: &Testbed, args: &[&str]| -> (String, Duration) {
        n_exec += 1;
        let t = Instant::now();
        let out = run_ok(
            tb.ctr()
                .args(["tasks", "exec", "--exec-id", &format!("x{n_exec}"), &c])
                .args(args),
        )
        .unwrap_or_else(|e| panic!("exec {args:?} in {c}: {e:#}"));
        (out, t.elapsed())
    };
    let mut sum_args = vec!["busybox", "sha256sum"];
    sum_args.extend(files.iter().map(String::as_str));
    let (got, _) = exec(&tb, &sum_args);
    assert_eq!(got, want, "first read");

    let (mut worst, mut checks, mut synced) = (Duration::ZERO, 0, Vec::new());
    let t0 = Instant::now();
    for k in 0..KILLS {
        let before = workers(&root);
        assert!(!before.is_empty(), "no device worker");
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        for pid in &before {
            common::kill9(u64::from(*pid));
        }
        // Reads during the restart: they wait for the new worker.
        let (got, took) = exec(&tb, &sum_args);
        assert_eq!(got, want, "kill {k}: checksums");
        worst = worst.max(took);
        checks += 1;
        if rw_mode == "dir" {
            let w = format!("/root/w{k}");
            let (_, took) = exec(
                &tb,
                &["sh", "-c", &format!("echo {k} > {w} && busybox sync {w}")],
            );
            worst = worst.max(took);
            synced.push((w, k));
        }
        wait_until("new device workers", Duration::from_secs(60), || {
            let now = workers(&root);
            now.len() == before.len() && now.iter().all(|p| !before.contains(p))
        })
        .unwrap();
    }
    let took = t0.elapsed();
    assert_eq!(
        tb.task_status(&c),
        "RUNNING",
        "the container's read loop survived"
    );
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    for (w, k) in &synced {
        let (got, _) = exec(&tb, &["cat", w]);
        assert_eq!(got.trim(), k.to_string(), "{w}");
    }
    eprintln!(
        "FIGURES containerd worker kills ({rw_mode}): {KILLS} kills in {:.1} s; {checks} \
         checks of {} bytes with 0 errors and 0 checksum mismatches; {} synced writes kept; \
         the container's read loop kept running (no error, no SIGBUS); longest check {} ms",
        took.as_secs_f64(),
        DATA,
        synced.len(),
        worst.as_millis()
    );
    let _ = tb.ctr().args(["tasks", "kill", "-s", "KILL", &c]).status();
    wait_until("the container stopped", Duration::from_secs(30), || {
        tb.task_status(&c) != "RUNNING"
    })
    .unwrap();
    for args in [vec!["tasks", "rm", &c], vec!["containers", "rm", &c]] {
        let _ = tb.ctr().args(&args).stdout(Stdio::null()).status();
    }
}

#[test]
fn worker_kills_under_a_container_overlayfs_mode() {
    kills_under_a_running_container("overlayfs");
}

#[test]
fn worker_kills_under_a_container_dir_mode() {
    kills_under_a_running_container("dir");
}
