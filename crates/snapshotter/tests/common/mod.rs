//! What the snapshotter's containerd tests share: the busybox image they
//! build offline (with umoci and busybox-static) and their processes; the
//! rest of their harness is in `fixtures`.

// Each test file uses a part.
#![allow(dead_code)]

pub mod cri;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fixtures::procs::run;
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::registry::RegistryOptions;

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

/// Converts the layout `oci` (tag `busybox`) into an obd image of `layers`
/// layers pushed as `reference` (to a plain-HTTP registry; with the
/// `auths` of `credentials`, if given); returns a client of that registry.
pub fn push_obd(
    dir: &Path,
    oci: &Path,
    reference: &str,
    credentials: Option<&Path>,
    layers: usize,
) -> Arc<Distribution> {
    let r = ImageRef::parse(reference).unwrap();
    let mut ro = RegistryOptions {
        use_docker_config: false,
        credential_file: credentials.map(Path::to_path_buf),
        ..Default::default()
    };
    ro.hosts.entry(r.host.clone()).or_default().plain_http = true;
    let client = Arc::new(Distribution::new(ro).unwrap());
    let dst = converter::registry::RegistryDest::new(client.clone(), r, dir, None).unwrap();
    let src = converter::OciLayout {
        dir: oci.to_path_buf(),
        tag: Some("busybox".into()),
    };
    let conv = converter::convert(
        &src,
        &dst,
        &converter::Options {
            vsize: 1 << 30,
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    drop(dst);
    assert_eq!(conv.layers.len(), layers, "obd layers");
    client
}

/// containerd and the snapshotter (started into `procs`), stopped on drop,
/// last started first; then the device workers of a snapshotter rooted at
/// `dir` or `dir/snroot` (they outlive the snapshotter by design) are killed and whatever was
/// left mounted under `dir` is unmounted.
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
        let mut workers = fixtures::procs::device_workers(&self.dir);
        workers.extend(fixtures::procs::device_workers(&self.dir.join("snroot")));
        for pid in &workers {
            // SAFETY: kill(2) on a pid with a signal number touches no memory.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        let gone = |pid: &u32| !Path::new(&format!("/proc/{pid}")).exists();
        let _ = fixtures::procs::poll(Duration::from_secs(10), || workers.iter().all(gone));
        obd_device::mount::unmount_below(&self.dir);
    }
}
