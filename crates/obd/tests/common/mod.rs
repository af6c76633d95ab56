//! Helpers shared by obd's CLI tests: running the `obd` binary, configs over
//! the interop stacks, and `obd device serve` driven through the CLI.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use fixtures::procs::{run, run_fails, Needs};
use serde_json::Value;

/// The `obd` binary under test.
pub const OBD: &str = env!("CARGO_BIN_EXE_obd");

/// `obd <args>`; panics unless it succeeds; returns stdout.
pub fn obd(args: &[&str]) -> String {
    run(Command::new(OBD).args(args))
}

/// `obd <args>`; panics if it succeeds; returns stderr.
pub fn obd_fails(args: &[&str]) -> String {
    run_fails(Command::new(OBD).args(args))
}

/// `obd <args>` parsed as JSON (its last stdout line, if several).
pub fn obd_json(args: &[&str]) -> Value {
    let out = obd(args);
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("obd {args:?}: {e}: {out}"))
}

/// The path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The config of interop stack `stack` (`stack-lz4`, `stack-zstd`) keeping
/// its first `n` lowers, with absolute paths.
pub fn interop_config(stack: &str, n: usize) -> Value {
    let src = fixtures::interop().join(stack);
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(src.join("config.v1.json")).unwrap()).unwrap();
    let lowers = v["lowers"].as_array_mut().unwrap();
    lowers.truncate(n);
    for l in lowers.iter_mut() {
        let f = src.join(l["file"].as_str().unwrap());
        l["file"] = f.to_string_lossy().into_owned().into();
    }
    v
}

/// Writes `v` as JSON to `<dir>/<name>`; returns the path.
pub fn write_json(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
    p
}

/// The obd-snapshotter binary (built next to obd by `cargo test --workspace`
/// or `cargo build -p snapshotter`).
pub fn snapshotter_bin() -> PathBuf {
    PathBuf::from(OBD).with_file_name("obd-snapshotter")
}

/// The obd and obd-snapshotter binaries when a containerd test bed can run
/// here ([`testbed_ready`]); otherwise `None` after a loud `SKIPPED` line.
pub fn testbed_bins(test: &str, tools: &[&str]) -> Option<(PathBuf, PathBuf)> {
    testbed_ready(test, tools).then(|| (PathBuf::from(OBD), snapshotter_bin()))
}

/// True when a containerd test bed can run here: root, `tools`, /dev/fuse
/// and the obd-snapshotter binary; otherwise prints a loud `SKIPPED <test>`
/// line and returns false.
pub fn testbed_ready(test: &str, tools: &[&str]) -> bool {
    if !Needs::root(tools).paths(&["/dev/fuse"]).met(test) {
        return false;
    }
    let ready = snapshotter_bin().exists();
    if !ready {
        fixtures::procs::skip(
            test,
            "obd-snapshotter is not built (cargo build -p snapshotter, or cargo test --workspace)",
        );
    }
    ready
}

/// The frontend the device tests use: `OBD_TEST_FRONTEND` (`tcmu`), else
/// `fuse`.
pub fn frontend() -> String {
    std::env::var("OBD_TEST_FRONTEND").unwrap_or_else(|_| "fuse".into())
}

/// Why devices through `frontend` cannot be tested here, if so.
pub fn device_skip_reason(frontend: &str) -> Option<String> {
    if frontend == "tcmu" {
        return Needs::root(&[])
            .paths(&["/sys/kernel/config/target/core"])
            .unmet()
            .map(|why| format!("{why} (modprobe target_core_user tcm_loop)"));
    }
    Needs::root(&["fusermount3"])
        .paths(&["/dev/fuse", "/dev/loop-control"])
        .unmet()
}

/// True, after a loud `SKIPPED` line, when devices through `frontend`
/// cannot be tested here.
pub fn devices_unavailable(frontend: &str) -> bool {
    match device_skip_reason(frontend) {
        Some(why) => {
            fixtures::procs::skip(&format!("device test ({frontend})"), &why);
            true
        }
        None => false,
    }
}

/// A running `obd device serve` whose devices use one frontend; detaches
/// what is left and stops on drop.
pub struct Service {
    child: Child,
    /// The service's root.
    pub root: PathBuf,
    frontend: String,
    killed: bool,
}

impl Service {
    /// Starts the service on `root`; returns once it says it listens (no
    /// polling, no sleeps). Its log goes to stderr, prefixed.
    pub fn start(root: &Path, frontend: &str) -> Service {
        Service::start_program(Path::new(OBD), root, frontend)
    }

    /// [`Service::start`] with another copy of the obd binary (its workers
    /// run the file at that path when they start).
    pub fn start_program(program: &Path, root: &Path, frontend: &str) -> Service {
        let mut child = Command::new(program)
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
            frontend: frontend.to_owned(),
            killed: false,
        }
    }

    /// SIGKILLs the service, leaving its devices as they are (also on drop).
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.killed = true;
    }

    /// `obd device <args> --root <root>`: stdout, or stderr on failure.
    pub fn obd(&self, args: &[&str]) -> Result<String, String> {
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

    /// Attaches `config` (mounted at `mount`, if given); returns (id, device).
    pub fn attach(&self, config: &Path, mount: Option<&Path>) -> (String, String) {
        let mut args = vec![
            "attach",
            "--frontend",
            &self.frontend,
            "--config",
            s(config),
        ];
        if let Some(m) = mount {
            args.extend(["--mount", s(m)]);
        }
        let out = self
            .obd(&args)
            .unwrap_or_else(|e| panic!("attach {config:?}: {e}"));
        let lines: Vec<&str> = out.lines().collect();
        let id = lines[0].strip_prefix("id ").unwrap().to_string();
        let dev = lines.last().unwrap().to_string();
        let prefix = if self.frontend == "tcmu" {
            "/dev/sd"
        } else {
            "/dev/loop"
        };
        assert!(dev.starts_with(prefix), "{out}");
        (id, dev)
    }

    /// Detaches a device by id or mount point.
    pub fn detach(&self, which: &str) {
        self.obd(&["detach", which])
            .unwrap_or_else(|e| panic!("detach {which}: {e}"));
    }

    /// `obd device list --json`.
    pub fn list(&self) -> Vec<Value> {
        let out = self.obd(&["list", "--json"]).unwrap();
        serde_json::from_str::<Vec<Value>>(&out).unwrap()
    }

    /// The worker log of device `id` (empty if none yet).
    pub fn worker_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.root.join("devices").join(id).join("worker.log"))
            .unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.killed {
            return;
        }
        // Detach whatever a failed test left, then stop.
        let left = self.obd(&["list", "--json"]).unwrap_or_default();
        for d in serde_json::from_str::<Vec<Value>>(&left).unwrap_or_default() {
            let _ = self.obd(&["detach", d["id"].as_str().unwrap_or_default()]);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILLs process `pid`.
pub fn kill9(pid: u64) {
    run(Command::new("kill").args(["-9", &pid.to_string()]));
}

/// Device ids under `<root>/devices/` (directories).
pub fn device_dirs(root: &Path) -> Vec<String> {
    subdirs(&root.join("devices"))
}

/// Names of the directories in `dir`, sorted (none if it cannot be read).
pub fn subdirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Pids of device workers serving devices under `root`.
pub fn workers(root: &Path) -> Vec<u32> {
    fixtures::procs::device_workers(root)
}
