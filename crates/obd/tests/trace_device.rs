//! Trace record and replay through the device service (FUSE + loop), as root:
//! - an empty `recordTracePath` makes the worker record the mounted image's
//!   reads; deleting `<trace>.lock` writes the trace and `<trace>.ok`;
//! - the next attach of the same config replays it in the background (the
//!   worker logs the report);
//! - detaching while recording also writes the trace.
//!
//! Needs root, /dev/fuse, /dev/loop-control and fusermount3; otherwise each
//! test prints `SKIPPED: …` and passes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const OBD: &str = env!("CARGO_BIN_EXE_obd");

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
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
        let err = child.stderr.take().unwrap();
        let mut lines = BufReader::new(err).lines();
        loop {
            let l = lines
                .next()
                .expect("service exited before listening")
                .unwrap();
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

    /// Attaches with the FUSE frontend; returns the device id.
    fn attach(&self, config: &Path, mount: Option<&Path>) -> String {
        let mut args = vec!["attach", "--frontend", "fuse", "--config"];
        args.push(config.to_str().unwrap());
        if let Some(m) = mount {
            args.extend(["--mount", m.to_str().unwrap()]);
        }
        let out = self
            .obd(&args)
            .unwrap_or_else(|e| panic!("attach {config:?}: {e}"));
        out.lines()
            .next()
            .and_then(|l| l.strip_prefix("id "))
            .unwrap()
            .to_string()
    }

    fn detach(&self, id: &str) {
        self.obd(&["detach", id])
            .unwrap_or_else(|e| panic!("detach {id}: {e}"));
    }

    fn worker_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.root.join("devices").join(id).join("worker.log"))
            .unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(out) = self.obd(&["list", "--json"]) {
            if let Ok(v) = serde_json::from_str::<Vec<Value>>(&out) {
                for d in v {
                    let _ = self.obd(&["detach", d["id"].as_str().unwrap_or_default()]);
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 50 ms until it holds or `secs` pass.
fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The interop stack-lz4 image with absolute lowers and `recordTracePath`.
fn config(dir: &Path, trace: &Path) -> PathBuf {
    let src = fixtures::interop().join("stack-lz4");
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(src.join("config.v1.json")).unwrap()).unwrap();
    for l in v["lowers"].as_array_mut().unwrap() {
        let f = src.join(l["file"].as_str().unwrap());
        l["file"] = f.to_string_lossy().into_owned().into();
    }
    v["recordTracePath"] = trace.to_string_lossy().into_owned().into();
    let p = dir.join("config.v1.json");
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    p
}

/// Reads every regular file under `dir`; returns the bytes read.
fn read_all(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            n += read_all(&p);
        } else if m.is_file() {
            n += std::fs::read(&p).unwrap().len() as u64;
        }
    }
    n
}

/// `obd trace dump --json` of `trace`.
fn dump(trace: &Path) -> Value {
    let out = Command::new(OBD)
        .args(["trace", "dump", "--json"])
        .arg(trace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn lock(trace: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", trace.display()))
}

fn ok(trace: &Path) -> PathBuf {
    PathBuf::from(format!("{}.ok", trace.display()))
}

#[test]
fn record_by_deleting_the_lock_then_replay_on_the_next_attach() {
    need_root!();
    let tmp = tempfile::tempdir().unwrap();
    let svc = Service::start(&tmp.path().join("root"));
    let trace = tmp.path().join("trace");
    std::fs::write(&trace, b"").unwrap();
    let cfg = config(tmp.path(), &trace);

    let mnt = tmp.path().join("mnt");
    let id = svc.attach(&cfg, Some(&mnt));
    assert!(lock(&trace).exists(), "the worker holds the lock");
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    assert!(read_all(&mnt) > 0);
    std::fs::remove_file(lock(&trace)).unwrap();
    wait_for("trace.ok", 15, || ok(&trace).exists());
    let t = dump(&trace);
    let records = t["records"].as_array().unwrap();
    assert!(!records.is_empty());
    assert!(records.iter().all(|r| r["op"] == "R"
        && r["layer"].as_u64().unwrap() < 3
        && r["count"].as_u64().unwrap() <= 1 << 20));
    svc.detach(&id);

    // The trace is replayed by the next worker of this config.
    let id = svc.attach(&cfg, None);
    let mut log = String::new();
    wait_for("the replay report", 30, || {
        log = svc.worker_log(&id);
        log.contains("replayed")
    });
    let line = log.lines().find(|l| l.contains("replayed")).unwrap();
    assert!(
        line.contains(&format!("{} records (0 skipped)", records.len())),
        "{line}"
    );
    assert!(line.contains(" 0 errors"), "{line}");
    svc.detach(&id);
}

#[test]
fn detaching_while_recording_writes_the_trace() {
    need_root!();
    let tmp = tempfile::tempdir().unwrap();
    let svc = Service::start(&tmp.path().join("root"));
    let trace = tmp.path().join("trace");
    std::fs::write(&trace, b"").unwrap();
    let cfg = config(tmp.path(), &trace);
    let mnt = tmp.path().join("mnt");
    let id = svc.attach(&cfg, Some(&mnt));
    assert!(read_all(&mnt) > 0);
    svc.detach(&id);
    assert!(ok(&trace).exists());
    assert!(!lock(&trace).exists());
    assert!(!dump(&trace)["records"].as_array().unwrap().is_empty());
}

#[test]
fn a_priority_list_is_prefetched_from_the_ext4_blocks_of_its_files() {
    need_root!();
    if Command::new("debugfs").arg("-V").output().is_err() {
        eprintln!("SKIPPED: debugfs (e2fsprogs) is missing");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let svc = Service::start(&tmp.path().join("root"));
    let list = tmp.path().join("list");
    std::fs::write(&list, b"/opt/data/big.log\n/etc/\n").unwrap();
    let cfg = config(tmp.path(), &list);
    let id = svc.attach(&cfg, None);
    let mut log = String::new();
    wait_for("the priority-list report", 30, || {
        log = svc.worker_log(&id);
        log.contains("replayed") || log.contains("not replayed")
    });
    let line = log.lines().find(|l| l.contains("replayed")).unwrap();
    assert!(line.contains(" 0 errors"), "{line}");
    // At least big.log's 2 MiB were prefetched.
    let bytes: u64 = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" bytes")?.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line}"));
    assert!(bytes >= 2_097_485, "{line}");
    svc.detach(&id);
    // The list is left as it was.
    assert_eq!(std::fs::read(&list).unwrap(), b"/opt/data/big.log\n/etc/\n");
}
