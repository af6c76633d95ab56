//! Helpers shared by the snapshotter's integration tests that drive real
//! tools (containerd, ctr, umoci, skopeo).

use std::process::Command;
use std::time::{Duration, Instant};

pub use fixtures::registry::have;

/// Runs `cmd`, asserts success, returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A busybox OCI image in `<dir>/oci` (tag `busybox`, one layer), made with
/// umoci from busybox-static; the unpacked bundle stays in `<dir>/bundle`.
/// Returns the umoci image reference (`<dir>/oci:busybox`).
#[allow(dead_code)] // not every test file builds images
pub fn busybox_layout(dir: &std::path::Path) -> String {
    let oci = dir.join("oci");
    let bundle = dir.join("bundle");
    let img = format!("{}:busybox", oci.display());
    run(Command::new("umoci").args(["init", "--layout"]).arg(&oci));
    run(Command::new("umoci").args(["new", "--image", &img]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &img])
        .arg(&bundle));
    let r = bundle.join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    for a in run(Command::new("/bin/busybox").arg("--list")).split_whitespace() {
        let p = r.join("bin").join(a);
        if !p.exists() {
            std::os::unix::fs::symlink("busybox", p).unwrap();
        }
    }
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &img])
        .arg(&bundle));
    img
}
