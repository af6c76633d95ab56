//! Smoke test with a real containerd (Debian's 1.6) and runc: a private
//! containerd with `obd-snapshotter` registered as the proxy plugin `obd`
//! imports a busybox OCI archive built offline (busybox-static + umoci +
//! skopeo) and `ctr run --snapshotter obd` prints `hi`. Needs root and those
//! tools; otherwise it is skipped with a loud message.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;
use common::{busybox_layout, have, run, wait_until};

fn skip(why: &str) {
    eprintln!("\n*** SKIPPED containerd smoke test: {why} ***\n");
}

fn build_busybox_archive(dir: &Path) -> PathBuf {
    let img = busybox_layout(dir);
    run(Command::new("umoci").args(["config", "--image", &img, "--config.cmd", "/bin/sh"]));
    let tar = dir.join("busybox-oci.tar");
    run(Command::new("skopeo").args([
        "copy".to_string(),
        "-q".to_string(),
        format!("oci:{img}"),
        format!(
            "oci-archive:{}:localhost/obd-test/busybox:latest",
            tar.display()
        ),
    ]));
    tar
}

struct Procs {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Procs {
    fn drop(&mut self) {
        // containerd first, then the snapshotter: SIGTERM, bounded wait, KILL.
        for c in self.children.iter_mut().rev() {
            // SAFETY: kill takes plain integers; the pid is our own child's.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Unmount whatever containerd left under our directory.
        obd_device::mount::unmount_below(&self.dir);
    }
}

#[test]
fn ctr_run_with_obd_snapshotter() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root (containerd, runc, mounts)");
    }
    for t in ["containerd", "ctr", "runc", "umoci", "skopeo"] {
        if !have(t) {
            return skip(&format!("{t} is not installed"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return skip("busybox-static is not installed");
    }
    // Short path: unix sockets are limited to 107 bytes.
    let tmp = tempfile::Builder::new()
        .prefix("obd-ctd-")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let tar = build_busybox_archive(&dir);
    let mut procs = Procs {
        children: Vec::new(),
        dir: dir.clone(),
    };

    let sn_sock = dir.join("obd.sock");
    let sn_log = std::fs::File::create(dir.join("snapshotter.log")).unwrap();
    procs.children.push(
        Command::new(env!("CARGO_BIN_EXE_obd-snapshotter"))
            .arg("--root")
            .arg(dir.join("snroot"))
            .arg("--address")
            .arg(&sn_sock)
            .stderr(sn_log)
            .spawn()
            .unwrap(),
    );
    wait_until("the snapshotter socket", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&sn_sock).is_ok()
    });

    let sock = dir.join("containerd.sock");
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, fixtures::containerd::config(&dir, &sn_sock)).unwrap();
    let ctd_log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    procs.children.push(
        Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(ctd_log.try_clone().unwrap())
            .stderr(ctd_log)
            .spawn()
            .unwrap(),
    );
    let ctr = || {
        let mut c = Command::new("timeout");
        c.args(["120", "ctr", "--address"]).arg(&sock);
        c
    };
    wait_until("containerd", Duration::from_secs(30), || {
        ctr()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let plugins = run(ctr().args(["plugins", "ls"]));
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1")
                && l.contains(" obd ")
                && l.trim_end().ends_with("ok")),
        "obd is not an ok snapshotter plugin:\n{plugins}"
    );
    run(ctr()
        .args(["image", "import", "--snapshotter", "obd"])
        .arg(&tar));
    let snaps = run(ctr().args(["snapshots", "--snapshotter", "obd", "ls"]));
    assert!(snaps.contains("Committed"), "{snaps}");
    let out = run(ctr().args([
        "run",
        "--snapshotter",
        "obd",
        "--rm",
        "localhost/obd-test/busybox:latest",
        "obd-smoke-1",
        "/bin/echo",
        "hi",
    ]));
    eprintln!("ctr run --snapshotter obd … /bin/echo hi printed: {out:?}");
    assert_eq!(out.trim(), "hi");
    // The rootfs is writable (overlay upper of the container's snapshot).
    let out = run(ctr().args([
        "run",
        "--snapshotter",
        "obd",
        "--rm",
        "localhost/obd-test/busybox:latest",
        "obd-smoke-2",
        "/bin/sh",
        "-c",
        "echo written > /tmp/f && cat /tmp/f",
    ]));
    assert_eq!(out.trim(), "written");
    drop(procs);
}
