//! obd-snapshotter crashes (SIGKILL) and restarts on the same root, with a
//! real registry, containerd and runc (the testbed of `obd demo`):
//! (a) during an `obd pull` of a many-layer image: the next pull succeeds
//! and the image runs; (b) while a container's device is being attached,
//! and while a container runs: the running container's device (a separate
//! worker process) is adopted, the container keeps working and can be
//! removed, and afterwards no device, worker, loop device or mount is left.
//! Needs root, containerd, runc, docker-registry, FUSE and the
//! obd-snapshotter binary next to obd; otherwise skipped loudly.

#[allow(dead_code)]
#[path = "../src/testbed.rs"]
mod testbed;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tcmu_target::mountinfo::mount_points_below;
use testbed::{build_sample, run_ok, wait_until, Options, Testbed};

mod common;
use common::{device_dirs, testbed_bins, workers};

/// Polls `cond` every millisecond (tight: the windows are short).
fn poll(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Snapshot directories with an obd config (remote snapshots committed).
fn obd_snapshots(root: &Path) -> usize {
    std::fs::read_dir(root.join("snapshots"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("block/config.v1.json").is_file())
                .count()
        })
        .unwrap_or(0)
}

/// `losetup -a` lines whose backing file is under `dir`.
fn loops_below(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup").arg("-a").output().expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

/// Waits until no device is left: containerd removes a container's
/// snapshot from the snapshotter in its garbage collection, after
/// `ctr containers rm` returned, and the last user's Remove releases the
/// image's device.
fn no_devices(root: &Path) {
    wait_until(
        "the devices to be released",
        Duration::from_secs(30),
        || device_dirs(root).is_empty(),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", device_dirs(root)));
}

/// The snapshotter's last "devices reconciled" log line.
fn last_reconcile(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap_or_default();
    log.lines()
        .rev()
        .find(|l| l.contains("devices reconciled"))
        .unwrap_or("")
        .to_string()
}

/// Best effort: removes task, container and snapshot `id`.
fn forget(tb: &Testbed, id: &str) {
    let id = &tb.cid(id);
    for args in [
        vec!["tasks", "rm", "-f", id],
        vec!["containers", "rm", id],
        vec!["snapshots", "--snapshotter", "obd", "rm", id],
    ] {
        let _ = tb
            .ctr()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn snapshotter_survives_kill_9_during_pull_attach_and_run() {
    let tools = ["containerd", "ctr", "runc", "docker-registry", "losetup"];
    let Some((obd, sn)) = testbed_bins("snapshotter restart test", &tools) else {
        return;
    };
    let mut opts = Options::new(obd, sn);
    opts.prefix = "obd-restart-".into();
    // The image's device goes with its last container (no linger): each
    // step below starts from no device.
    opts.extra_toml = "device_idle_secs = 0\n".into();
    let mut tb = Testbed::new(opts).unwrap();
    let dir = tb.dir.clone();
    let root = tb.snroot.clone();
    eprintln!("work dir {}", dir.display());
    tb.start_registry().unwrap();
    let layout = dir.join("oci");
    let layers = 40;
    build_sample(&layout, layers, 1 << 20).unwrap();
    let image = format!("{}/restart/app:obd", tb.reg);
    tb.convert_push(&layout, "demo", &image).unwrap();
    tb.start_runtime().unwrap();

    // (a) kill -9 during a pull, as soon as the first remote snapshot is
    // committed.
    let mut pull = tb
        .obd_pull("default", &image)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    poll("the first remote snapshot", Duration::from_secs(60), || {
        obd_snapshots(&root) > 0 || pull.try_wait().ok().flatten().is_some()
    });
    tb.kill_snapshotter().unwrap();
    let at_kill = obd_snapshots(&root);
    let st = pull.wait().unwrap();
    eprintln!("(a) killed after {at_kill} of {layers} remote snapshots; the pull exited {st}");
    // The pull starts as soon as the socket is back, while containerd's
    // connection to the proxy plugin may still be backing off (its calls
    // answer Unavailable): `obd pull` waits that out instead of failing.
    let t = Instant::now();
    tb.start_snapshotter_unprobed().unwrap();
    let again = run_ok(&mut tb.obd_pull("default", &image)).expect("pull right after the restart");
    eprintln!(
        "(a) pull right after the restart ({:.2} s):\n{again}",
        t.elapsed().as_secs_f64()
    );
    tb.run_sample(&image, "a1");

    // (b1) kill -9 while a container's device is being attached (the
    // image's device was released when a1 went): as soon as its worker
    // process exists.
    no_devices(&root);
    wait_until(
        "a1's device worker to exit",
        Duration::from_secs(10),
        || workers(&root).is_empty(),
    )
    .unwrap();
    let ctr_b1 = {
        let mut c = tb.ctr();
        c.args(["run", "--rm", "--snapshotter", "obd", &image, &tb.cid("b1")]);
        std::thread::spawn(move || c.output())
    };
    poll("the attach of b1's device", Duration::from_secs(60), || {
        !workers(&root).is_empty() || ctr_b1.is_finished()
    });
    tb.kill_snapshotter().unwrap();
    let out = ctr_b1.join().unwrap().unwrap();
    eprintln!(
        "(b1) killed during the attach; ctr run exited {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    tb.start_snapshotter().unwrap();
    eprintln!(
        "(b1) after the restart: {}; workers {:?}",
        last_reconcile(&dir),
        workers(&root)
    );
    forget(&tb, "b1");

    // (b2) kill -9 while a container runs: its device is adopted.
    let b2 = tb.cid("b2");
    let run_d = ["run", "-d", "--snapshotter", "obd"];
    run_ok(tb.ctr().args(run_d).args([&image, &b2, "sleep", "100000"])).expect("ctr run -d b2");
    wait_until("b2 running", Duration::from_secs(30), || {
        tb.task_status(&tb.cid("b2")) == "RUNNING"
    })
    .unwrap();
    let devs = device_dirs(&root);
    assert_eq!(devs.len(), 1, "one image device: {devs:?}");
    let before = workers(&root);
    assert_eq!(before.len(), 1, "one device worker: {before:?}");
    tb.restart_snapshotter().unwrap();
    assert_eq!(device_dirs(&root), devs, "the device was adopted");
    assert_eq!(workers(&root), before, "the same worker serves it");
    let last = last_reconcile(&dir);
    assert!(last.contains(&devs[0]), "adopted: {last}");
    assert_eq!(tb.task_status(&tb.cid("b2")), "RUNNING");
    // Known bug (crates/device/src/worker.rs): a worker whose service died
    // during its attach (b1)
    // panics printing its "ok" line (EPIPE) and lingers half alive; it is
    // adopted, serves, and is killed at detach. Reported, not asserted.
    for d in &devs {
        let log = std::fs::read_to_string(root.join("devices").join(d).join("worker.log"))
            .unwrap_or_default();
        if log.contains("panicked") {
            eprintln!(
                "\n*** KNOWN BUG: the worker of {d} panicked: {} ***\n",
                log.trim()
            );
        }
    }
    let msg = run_ok(tb.ctr().args([
        "tasks",
        "exec",
        "--exec-id",
        "check",
        &b2,
        "cat",
        "/app/message",
        "/app/layers/7",
    ]))
    .expect("exec in b2 after the restart");
    assert_eq!(msg, format!("{}\nlayer 7\n", testbed::EXPECTED));
    run_ok(tb.ctr().args(["tasks", "kill", "-s", "KILL", &b2])).unwrap();
    wait_until("b2 stopped", Duration::from_secs(30), || {
        tb.task_status(&tb.cid("b2")) == "STOPPED"
    })
    .unwrap();
    run_ok(tb.ctr().args(["tasks", "rm", &b2])).unwrap();
    run_ok(tb.ctr().args(["containers", "rm", &b2])).unwrap();

    // Nothing left: devices, workers, loop devices, mounts.
    no_devices(&root);
    wait_until("device workers to exit", Duration::from_secs(10), || {
        workers(&root).is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", workers(&root)));
    assert_eq!(loops_below(&dir), Vec::<String>::new(), "loop devices left");
    assert_eq!(
        mount_points_below(&dir),
        Vec::<PathBuf>::new(),
        "mounts left"
    );

    // And a fresh container works.
    tb.run_sample(&image, "c1");
    no_devices(&root);
}
