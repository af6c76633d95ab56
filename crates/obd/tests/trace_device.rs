//! Trace record and replay through the device service (FUSE + loop), as root:
//! - an empty `recordTracePath` makes the worker record the mounted image's
//!   reads; deleting `<trace>.lock` writes the trace and `<trace>.ok`;
//! - the next attach of the same config replays it in the background (the
//!   worker logs the report);
//! - detaching while recording also writes the trace.
//!
//! Needs root, /dev/fuse, /dev/loop-control and fusermount3; otherwise each
//! test prints `SKIPPED: …` and passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fixtures::procs::wait_until;
use serde_json::Value;

mod common;
use common::{devices_unavailable, interop_config, write_json, Service, OBD};

/// A test's service (FUSE frontend) and an image config whose
/// `recordTracePath` is `<tmp>/<name>` (stopped before its directory is
/// removed: fields drop in order).
struct Env {
    svc: Service,
    trace: PathBuf,
    cfg: PathBuf,
    tmp: tempfile::TempDir,
}

impl Env {
    /// The service and the config, with `contents` in the trace file; or
    /// `None` (after a loud `SKIPPED` line) when FUSE devices cannot be
    /// tested here.
    fn start(name: &str, contents: &[u8]) -> Option<Env> {
        if devices_unavailable("fuse") {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let svc = Service::start(&tmp.path().join("root"), "fuse");
        let trace = tmp.path().join(name);
        std::fs::write(&trace, contents).unwrap();
        let cfg = config(tmp.path(), &trace);
        Some(Env {
            svc,
            trace,
            cfg,
            tmp,
        })
    }

    /// Attaches the config, mounted at `<tmp>/mnt` if `mount`; returns the id.
    fn attach(&self, mount: bool) -> String {
        let mnt = mount.then(|| self.mnt());
        self.svc.attach(&self.cfg, mnt.as_deref()).0
    }

    fn mnt(&self) -> PathBuf {
        self.tmp.path().join("mnt")
    }

    /// Waits for device `id`'s replay report; returns its line.
    fn replay_report(&self, id: &str) -> String {
        let mut log = String::new();
        wait_until("the replay report", Duration::from_secs(30), || {
            log = self.svc.worker_log(id);
            log.contains("replayed")
        });
        let line = log.lines().find(|l| l.contains("replayed")).unwrap();
        assert!(line.contains(" 0 errors"), "{line}");
        line.to_string()
    }
}

/// The interop stack-lz4 image with absolute lowers and `recordTracePath`.
fn config(dir: &Path, trace: &Path) -> PathBuf {
    let mut v = interop_config("stack-lz4", 3);
    v["recordTracePath"] = trace.to_string_lossy().into_owned().into();
    write_json(dir, "config.v1.json", &v)
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
    let out = fixtures::procs::run(
        Command::new(OBD)
            .args(["trace", "dump", "--json"])
            .arg(trace),
    );
    serde_json::from_str(&out).unwrap()
}

fn lock(trace: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", trace.display()))
}

fn ok(trace: &Path) -> PathBuf {
    PathBuf::from(format!("{}.ok", trace.display()))
}

#[test]
fn record_by_deleting_the_lock_then_replay_on_the_next_attach() {
    let Some(env) = Env::start("trace", b"") else {
        return;
    };
    let trace = &env.trace;
    let id = env.attach(true);
    assert!(lock(trace).exists(), "the worker holds the lock");
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    assert!(read_all(&env.mnt()) > 0);
    std::fs::remove_file(lock(trace)).unwrap();
    wait_until("trace.ok", Duration::from_secs(15), || ok(trace).exists());
    let t = dump(trace);
    let records = t["records"].as_array().unwrap();
    assert!(!records.is_empty());
    assert!(records.iter().all(|r| r["op"] == "R"
        && r["layer"].as_u64().unwrap() < 3
        && r["count"].as_u64().unwrap() <= 1 << 20));
    env.svc.detach(&id);

    // The trace is replayed by the next worker of this config.
    let id = env.attach(false);
    let line = env.replay_report(&id);
    assert!(
        line.contains(&format!("{} records (0 skipped)", records.len())),
        "{line}"
    );
    env.svc.detach(&id);
}

#[test]
fn detaching_while_recording_writes_the_trace() {
    let Some(env) = Env::start("trace", b"") else {
        return;
    };
    let id = env.attach(true);
    assert!(read_all(&env.mnt()) > 0);
    env.svc.detach(&id);
    assert!(ok(&env.trace).exists());
    assert!(!lock(&env.trace).exists());
    assert!(!dump(&env.trace)["records"].as_array().unwrap().is_empty());
}

#[test]
fn a_priority_list_is_prefetched_from_the_ext4_blocks_of_its_files() {
    if Command::new("debugfs").arg("-V").output().is_err() {
        eprintln!("SKIPPED: debugfs (e2fsprogs) is missing");
        return;
    }
    const LIST: &[u8] = b"/opt/data/big.log\n/etc/\n";
    let Some(env) = Env::start("list", LIST) else {
        return;
    };
    let id = env.attach(false);
    let line = env.replay_report(&id);
    // At least big.log's 2 MiB were prefetched.
    let bytes: u64 = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" bytes")?.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line}"));
    assert!(bytes >= 2_097_485, "{line}");
    env.svc.detach(&id);
    // The list is left as it was.
    assert_eq!(std::fs::read(&env.trace).unwrap(), LIST);
}
