//! What the snapshotter's containerd tests share: the busybox image they
//! build offline (with umoci and busybox-static) and their processes; the
//! rest of their harness is in `fixtures`.

// Each test file uses a part.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use fixtures::procs::run;

/// A busybox OCI image in `<dir>/oci` (tag `busybox`, one layer), made with
/// umoci from busybox-static; the unpacked bundle stays in `<dir>/bundle`.
/// Returns the umoci image reference (`<dir>/oci:busybox`).
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

/// containerd and the snapshotter (started into `procs`), stopped on drop,
/// last started first; then whatever they left mounted under `dir` is
/// unmounted.
pub struct Procs {
    pub procs: fixtures::procs::Procs,
    pub dir: PathBuf,
}

impl Procs {
    /// No processes yet; mounts under `dir` go on drop.
    pub fn new(dir: &std::path::Path) -> Procs {
        Procs {
            procs: fixtures::procs::Procs::new(),
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // containerd first, then the snapshotter.
        self.procs.stop_all();
        obd_device::mount::unmount_below(&self.dir);
    }
}
