//! The device service end to end with the FUSE + loop frontend, as root:
//! - every interop stack attaches, its ext4 mounts read-only and the file tree
//!   equals the recorded manifest; detach leaves no loop device, mount, FUSE
//!   connection or state behind;
//! - a read-write device keeps its files across detach and reattach, and its
//!   committed upper stacks under a new device;
//! - `kill -9` of the service while a process reads the mounted image: the
//!   reader sees no error, and a restarted service adopts the device.
//!
//! Needs root, /dev/fuse, /dev/loop-control and fusermount3; otherwise each
//! test prints `SKIPPED: …` and passes. `OBD_TEST_FRONTEND=tcmu` runs the same
//! tests through the TCMU frontend (needs configfs with target_core_user and
//! tcm_loop: `scripts/tcmu-guest-test.sh` runs them in a qemu guest).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};

const OBD: &str = env!("CARGO_BIN_EXE_obd");

fn frontend() -> String {
    std::env::var("OBD_TEST_FRONTEND").unwrap_or_else(|_| "fuse".into())
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if frontend() == "tcmu" {
        if !Path::new("/sys/kernel/config/target/core").exists() {
            return Some("no configfs target (modprobe target_core_user tcm_loop)".into());
        }
        return None;
    }
    for p in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(p).exists() {
            return Some(format!("{p} is missing"));
        }
    }
    if Command::new("fusermount3").arg("-V").output().is_err() {
        return Some("fusermount3 is missing (apt install fuse3)".into());
    }
    None
}

macro_rules! need_root {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

/// A running `obd device serve`.
struct Service {
    child: Child,
    root: PathBuf,
}

impl Service {
    fn start(root: &Path) -> Service {
        let mut child = Command::new(OBD)
            .args(["device", "serve", "--root"])
            .arg(root)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Ready when it says it listens (no polling, no sleeps).
        let err = child.stderr.take().unwrap();
        let mut lines = BufReader::new(err).lines();
        loop {
            let l = lines
                .next()
                .expect("service exited before listening")
                .unwrap();
            eprintln!("[service] {l}");
            if l.contains("listening on") {
                break;
            }
        }
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                eprintln!("[service] {l}");
            }
        });
        Service {
            child,
            root: root.to_owned(),
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::mem::forget(self);
    }

    fn obd(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(OBD)
            .args(["device"])
            .args(args)
            .arg("--root")
            .arg(&self.root)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8(out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Attaches; returns (id, device).
    fn attach(&self, config: &Path, mount: Option<&Path>) -> (String, String) {
        let fe = frontend();
        let mut args = vec![
            "attach",
            "--frontend",
            &fe,
            "--config",
            config.to_str().unwrap(),
        ];
        if let Some(m) = mount {
            args.extend(["--mount", m.to_str().unwrap()]);
        }
        let out = self
            .obd(&args)
            .unwrap_or_else(|e| panic!("attach {config:?}: {e}"));
        let lines: Vec<&str> = out.lines().collect();
        let id = lines[0].strip_prefix("id ").unwrap().to_string();
        let dev = lines.last().unwrap().to_string();
        let prefix = if fe == "tcmu" { "/dev/sd" } else { "/dev/loop" };
        assert!(dev.starts_with(prefix), "{out}");
        (id, dev)
    }

    fn detach(&self, which: &str) {
        self.obd(&["detach", which])
            .unwrap_or_else(|e| panic!("detach {which}: {e}"));
    }

    fn list(&self) -> Vec<Value> {
        let out = self.obd(&["list", "--json"]).unwrap();
        serde_json::from_str::<Vec<Value>>(&out).unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Detach whatever a failed test left, then stop.
        for d in self.list() {
            let _ = self.obd(&["detach", d["id"].as_str().unwrap()]);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nothing of `root` is left in the kernel: no loop device backed by a file
/// under it, no mount under it, no device directory.
fn assert_clean(root: &Path) {
    let r = root.to_string_lossy().into_owned();
    let left: Vec<_> = tcmu_target::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root) || m.source.contains(&r))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    for e in std::fs::read_dir("/sys/block").unwrap() {
        let e = e.unwrap();
        let bf = e.path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(&bf) {
            assert!(
                !b.contains(&r),
                "{} still backed by {b}",
                e.file_name().to_string_lossy()
            );
        }
    }
    if frontend() == "tcmu" {
        let t = Path::new("/sys/kernel/config/target");
        let dirs = |p: &Path| -> Vec<String> {
            std::fs::read_dir(p)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        // The fabric directory always holds the `discovery_auth` group; targets are `naa.*`.
        let wwns: Vec<String> = dirs(&t.join("loopback"))
            .into_iter()
            .filter(|w| !w.ends_with("/discovery_auth"))
            .collect();
        assert!(wwns.is_empty(), "tcm_loop targets left: {wwns:?}");
        for hba in dirs(&t.join("core"))
            .iter()
            .filter(|h| h.contains("/user_"))
        {
            let left = dirs(Path::new(hba));
            assert!(left.is_empty(), "TCMU backstores left: {left:?}");
        }
    }
    let devs = root.join("devices");
    let n = std::fs::read_dir(&devs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "device directories left in {devs:?}");
}

/// The file tree under `dir` in the manifest's terms.
fn tree(dir: &Path) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Value>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
        if rel == "lost+found" {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mut v = serde_json::json!({
            "uid": m.uid(), "gid": m.gid(), "mtime": m.mtime(),
        });
        let ft = m.file_type();
        if ft.is_symlink() {
            v["type"] = "symlink".into();
            v["target"] = std::fs::read_link(&p)
                .unwrap()
                .to_string_lossy()
                .into_owned()
                .into();
        } else {
            v["mode"] = format!("{:04o}", m.permissions().mode() & 0o7777).into();
            if ft.is_dir() {
                v["type"] = "dir".into();
                walk(base, &p, out);
            } else {
                v["type"] = "file".into();
                v["size"] = m.len().into();
                v["nlink"] = m.nlink().into();
                v["sha256"] = hex::encode(Sha256::digest(std::fs::read(&p).unwrap())).into();
            }
        }
        out.insert(rel, v);
    }
}

fn expected(name: &str) -> BTreeMap<String, Value> {
    let p = fixtures::interop().join("expected-trees").join(name);
    let v: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for e in v["entries"].as_array().unwrap() {
        let mut e = e.clone();
        let path = e["path"].as_str().unwrap().to_string();
        e.as_object_mut().unwrap().remove("path");
        // Compare only the keys we record.
        e.as_object_mut().unwrap().retain(|k, _| {
            [
                "uid", "gid", "mtime", "type", "target", "mode", "size", "nlink", "sha256",
            ]
            .contains(&k.as_str())
        });
        out.insert(path, e);
    }
    out
}

fn assert_tree(dir: &Path, manifest: &str) {
    let got = tree(dir);
    let want = expected(manifest);
    let mut diffs = Vec::new();
    for (p, w) in &want {
        match got.get(p) {
            None => diffs.push(format!("missing {p}")),
            Some(g) => {
                for (k, wv) in w.as_object().unwrap() {
                    if g.get(k) != Some(wv) {
                        diffs.push(format!("{p}: {k} is {:?}, want {wv}", g.get(k)));
                    }
                }
            }
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        diffs.push(format!("unexpected {p}"));
    }
    assert!(
        diffs.is_empty(),
        "{manifest}: {} differences: {:?}",
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    );
}

/// A reader that re-reads every file under `mnt`, dropping the page cache
/// between passes so each pass goes to the device. It sends the pass count
/// after each pass and stops after at least 3 passes once `stop` is set.
#[allow(clippy::type_complexity)]
fn spawn_reader(
    mnt: &Path,
) -> (
    Arc<AtomicBool>,
    std::sync::mpsc::Receiver<usize>,
    std::thread::JoinHandle<Result<usize, String>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let (stop2, mnt) = (stop.clone(), mnt.to_owned());
    let reader = std::thread::spawn(move || -> Result<usize, String> {
        let mut passes = 0;
        while !stop2.load(Ordering::SeqCst) || passes < 3 {
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
            let t =
                std::panic::catch_unwind(|| tree(&mnt)).map_err(|_| "read failed".to_string())?;
            if t.len() < 400 {
                return Err(format!("pass {passes}: only {} entries", t.len()));
            }
            passes += 1;
            let _ = tx.send(passes);
        }
        Ok(passes)
    });
    (stop, rx, reader)
}

/// A config with the first `n` lowers of an interop stack, paths absolute.
fn stack_config(dir: &Path, stack: &str, n: usize) -> PathBuf {
    let src = fixtures::interop().join(stack);
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(src.join("config.v1.json")).unwrap()).unwrap();
    let lowers = v["lowers"].as_array_mut().unwrap();
    lowers.truncate(n);
    for l in lowers.iter_mut() {
        let f = src.join(l["file"].as_str().unwrap());
        l["file"] = f.to_string_lossy().into_owned().into();
    }
    let p = dir.join(format!("{stack}-{n}.json"));
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    p
}

#[test]
fn interop_stacks_mount_read_only_with_the_recorded_trees() {
    need_root!();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let svc = Service::start(&root);
    for stack in ["stack-lz4", "stack-zstd"] {
        for n in 1..=3 {
            let cfg = stack_config(tmp.path(), stack, n);
            let mnt = tmp.path().join(format!("m-{stack}-{n}"));
            let (id, dev) = svc.attach(&cfg, Some(&mnt));
            let l = svc.list();
            assert_eq!(l.len(), 1);
            assert_eq!(l[0]["device"], dev.as_str());
            assert_eq!(l[0]["read_only"], true);
            assert_eq!(l[0]["alive"], true);
            assert_tree(&mnt, &format!("after-{n}-layers.json"));
            // Read-only all the way down.
            assert!(std::fs::write(mnt.join("x"), b"x").is_err());
            svc.detach(&id);
            assert_clean(&root);
        }
    }
    // The sealed stack, detached by mount point this time.
    let sealed = fixtures::interop().join("sealed");
    let cfg = sealed.join("config.v1.json");
    if cfg.exists() {
        let mnt = tmp.path().join("m-sealed");
        svc.attach(&cfg, Some(&mnt));
        assert_tree(&mnt, "sealed-stack.json");
        svc.detach(mnt.to_str().unwrap());
        assert_clean(&root);
    }
}

#[test]
fn read_write_device_keeps_data_and_its_committed_upper_stacks() {
    need_root!();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let svc = Service::start(&root);
    let cfg = tmp.path().join("rw.json");
    std::fs::write(
        &cfg,
        r#"{"lowers": [], "upper": {"index": "rw.index", "data": "rw.data"}, "resultFile": "rw.result"}"#,
    )
    .unwrap();
    let mnt = tmp.path().join("m-rw");
    let (id, _) = svc.attach(&cfg, Some(&mnt));
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("rw.result")).unwrap(),
        "success"
    );
    let mut want = BTreeMap::new();
    let mut rng = fixtures::Rng::new(3);
    for i in 0..20 {
        let mut d = vec![0u8; (rng.below(300_000) + 1) as usize];
        rng.fill(&mut d);
        let p = mnt.join(format!("f{i}"));
        std::fs::write(&p, &d).unwrap();
        std::fs::File::open(&p).unwrap().sync_all().unwrap();
        want.insert(format!("f{i}"), hex::encode(Sha256::digest(&d)));
    }
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::os::unix::fs::symlink("f1", mnt.join("dir/link")).unwrap();
    svc.detach(&id);
    assert_clean(&root);

    let check = |m: &Path| {
        for (f, sum) in &want {
            assert_eq!(
                &hex::encode(Sha256::digest(std::fs::read(m.join(f)).unwrap())),
                sum,
                "{f}"
            );
        }
        assert_eq!(
            std::fs::read_link(m.join("dir/link")).unwrap(),
            Path::new("f1")
        );
    };
    let (id, _) = svc.attach(&cfg, Some(&mnt));
    check(&mnt);
    svc.detach(&id);

    // Commit the upper (ZFile + tar, as pushed to a registry) and stack it.
    let layer = tmp.path().join("committed.tar");
    let out = Command::new(OBD)
        .args(["layer", "commit", "--zfile", "--tar"])
        .arg(tmp.path().join("rw.data"))
        .arg(tmp.path().join("rw.index"))
        .arg(&layer)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg2 = tmp.path().join("ro.json");
    std::fs::write(
        &cfg2,
        format!(r#"{{"lowers": [{{"file": "{}"}}]}}"#, layer.display()),
    )
    .unwrap();
    let mnt2 = tmp.path().join("m-ro");
    let (id, _) = svc.attach(&cfg2, Some(&mnt2));
    check(&mnt2);
    svc.detach(&id);
    assert_clean(&root);
}

#[test]
fn kill_9_of_the_service_does_not_disturb_a_reader() {
    need_root!();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let svc = Service::start(&root);
    let cfg = stack_config(tmp.path(), "stack-lz4", 3);
    let mnt = tmp.path().join("m");
    let (id, dev) = svc.attach(&cfg, Some(&mnt));

    let (stop, rx, reader) = spawn_reader(&mnt);
    assert_eq!(rx.recv().unwrap(), 1, "first pass");
    svc.kill9();
    // Reads go on while no service runs.
    let during = rx.recv().unwrap();
    let svc = Service::start(&root);
    let l = svc.list();
    assert_eq!(
        l.len(),
        1,
        "the restarted service adopted the device: {l:?}"
    );
    assert_eq!(l[0]["device"], dev.as_str());
    assert!(rx.recv().unwrap() > during);
    stop.store(true, Ordering::SeqCst);
    let passes = reader.join().unwrap().expect("the reader saw an error");
    assert!(passes >= 3);
    assert_tree(&mnt, "after-3-layers.json");
    svc.detach(&id);
    assert_clean(&root);
}

#[test]
fn a_dead_worker_is_cleaned_up_by_the_next_service() {
    need_root!();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let svc = Service::start(&root);
    let cfg = stack_config(tmp.path(), "stack-zstd", 2);
    let mnt = tmp.path().join("m");
    svc.attach(&cfg, Some(&mnt));
    let pid = svc.list()[0]["pid"].as_u64().unwrap();
    svc.kill9();
    // SIGKILL the worker: its FUSE connection dies, the loop device and the
    // mount stay behind until someone cleans up.
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline
        && Path::new(&format!("/proc/{pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        std::thread::yield_now();
    }
    let svc = Service::start(&root);
    if frontend() == "tcmu" {
        // TCMU devices survive their worker: the new service takes them over.
        let l = svc.list();
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(l[0]["alive"], true);
        assert_tree(&mnt, "after-2-layers.json");
        svc.detach(l[0]["id"].as_str().unwrap());
    }
    assert!(svc.list().is_empty());
    assert_clean(&root);
    drop(svc);
}

/// TCMU only: `kill -9` of a device's worker while a process reads the mounted
/// image. The kernel keeps the ring; the service starts a new worker that takes
/// it over, and the reader sees no error.
#[test]
fn tcmu_worker_kill_is_taken_over_without_reader_errors() {
    need_root!();
    if frontend() != "tcmu" {
        eprintln!("SKIPPED worker takeover: only TCMU keeps a device alive across its server's death (OBD_TEST_FRONTEND=tcmu)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let svc = Service::start(&root);
    let cfg = stack_config(tmp.path(), "stack-lz4", 3);
    let mnt = tmp.path().join("m");
    let (id, dev) = svc.attach(&cfg, Some(&mnt));
    let pid = svc.list()[0]["pid"].as_u64().unwrap();

    let (stop, rx, reader) = spawn_reader(&mnt);
    assert_eq!(rx.recv().unwrap(), 1);
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // Passes complete after the kill only once a new worker serves the ring.
    let after = rx.recv().unwrap();
    assert!(rx.recv().unwrap() > after);
    let l = svc.list();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["device"], dev.as_str());
    assert_ne!(
        l[0]["pid"].as_u64().unwrap(),
        pid,
        "a new worker serves the device"
    );
    assert_eq!(l[0]["alive"], true);
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap().expect("the reader saw an error");
    assert_tree(&mnt, "after-3-layers.json");
    svc.detach(&id);
    assert_clean(&root);
}
