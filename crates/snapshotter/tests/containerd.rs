//! Smoke test with a real containerd (Debian's 1.6) and runc: a private
//! containerd with `obd-snapshotter` registered as the proxy plugin `obd`
//! imports a busybox OCI archive built offline (busybox-static + umoci +
//! skopeo) and `ctr run --snapshotter obd` prints `hi`. Needs root and those
//! tools; otherwise it is skipped with a loud message.

use std::path::{Path, PathBuf};
use std::process::Command;

use fixtures::containerd::{self, ctr};
use fixtures::procs::{run, Needs};

mod common;
use common::{busybox_layout, Procs};

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

#[test]
fn ctr_run_with_obd_snapshotter() {
    if !Needs::root(&["containerd", "ctr", "runc", "umoci", "skopeo"])
        .paths(&["/bin/busybox"])
        .met("containerd smoke test")
    {
        return;
    }
    let tmp = fixtures::procs::short_tempdir("obd-ctd-");
    let dir = tmp.path().to_path_buf();
    let tar = build_busybox_archive(&dir);
    let mut procs = Procs::new(&dir);
    let sn = Path::new(env!("CARGO_BIN_EXE_obd-snapshotter"));
    let sn_sock = containerd::start_snapshotter(&mut procs.procs, sn, &dir);
    let sock = containerd::start_with(&mut procs.procs, &dir, &sn_sock);
    let ctr = || ctr(&sock);
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
    let ctr_run = |name: &str, cmd: &[&str]| {
        let image = "localhost/obd-test/busybox:latest";
        run(ctr()
            .args(["run", "--snapshotter", "obd", "--rm", image, name])
            .args(cmd))
    };
    let out = ctr_run("obd-smoke-1", &["/bin/echo", "hi"]);
    eprintln!("ctr run --snapshotter obd … /bin/echo hi printed: {out:?}");
    assert_eq!(out.trim(), "hi");
    // The rootfs is writable (overlay upper of the container's snapshot).
    let out = ctr_run(
        "obd-smoke-2",
        &["/bin/sh", "-c", "echo written > /tmp/f && cat /tmp/f"],
    );
    assert_eq!(out.trim(), "written");
    drop(procs);
}
