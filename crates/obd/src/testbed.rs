//! A private docker-registry, `obd-snapshotter` and containerd in one work
//! directory, for `obd demo`, `obd bench snapshotter` and the snapshotter
//! restart test (which includes this file with `#[path]`, so it uses no
//! other module of the crate). Everything started here is stopped, devices
//! detached, mounts below the work directory unmounted and the directory
//! removed when the [`Testbed`] drops (unless `keep`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// What the sample container prints first.
pub(crate) const EXPECTED: &str = "hello from a lazily pulled obd image";
/// What it prints after writing to its rootfs and reading that back.
pub(crate) const WRITTEN: &str = "rootfs write ok";

/// How to set up a [`Testbed`].
pub(crate) struct Options {
    /// Work directory (default: a new directory under /tmp).
    pub dir: Option<PathBuf>,
    /// Leave processes, state and the directory behind on drop.
    pub keep: bool,
    /// The `obd` binary ([`Testbed::obd`]).
    pub obd: PathBuf,
    /// The `obd-snapshotter` binary.
    pub snapshotter: PathBuf,
    /// The snapshotter's `rw_mode`.
    pub rw_mode: String,
    /// The snapshotter's `lazy_pull`.
    pub lazy_pull: bool,
    /// More lines for the snapshotter's TOML config.
    pub extra_toml: String,
    /// Prefix of the temporary work directory.
    pub prefix: String,
}

impl Options {
    /// Defaults: a temporary directory, rw_mode overlayfs, lazy pull on.
    pub fn new(obd: PathBuf, snapshotter: PathBuf) -> Self {
        Options {
            dir: None,
            keep: false,
            obd,
            snapshotter,
            rw_mode: "overlayfs".into(),
            lazy_pull: true,
            extra_toml: String::new(),
            prefix: "obd-testbed-".into(),
        }
    }
}

/// The registry, snapshotter and containerd of one work directory.
pub(crate) struct Testbed {
    /// The work directory (canonical).
    pub dir: PathBuf,
    /// `127.0.0.1:<port>` of the registry (once started).
    pub reg: String,
    /// The registry's access log (combined format).
    pub access_log: PathBuf,
    /// The snapshotter root.
    pub snroot: PathBuf,
    /// containerd's gRPC socket.
    pub sock: PathBuf,
    /// The snapshotter's gRPC socket.
    pub sn_sock: PathBuf,
    opts: Options,
    registry: Option<Child>,
    snapshotter: Option<Child>,
    containerd: Option<Child>,
}

impl Testbed {
    /// Creates the work directory; starts nothing.
    pub fn new(opts: Options) -> Result<Self> {
        let dir = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                d.clone()
            }
            // Short path: unix socket paths are limited to 107 bytes.
            None => tempfile::Builder::new()
                .prefix(&opts.prefix)
                .tempdir_in("/tmp")?
                .keep(),
        };
        let dir =
            std::fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))?;
        Ok(Testbed {
            reg: String::new(),
            access_log: dir.join("registry-access.log"),
            snroot: dir.join("snapshotter"),
            sock: dir.join("containerd.sock"),
            sn_sock: dir.join("obd.sock"),
            dir,
            opts,
            registry: None,
            snapshotter: None,
            containerd: None,
        })
    }

    /// Starts docker-registry on a free port of 127.0.0.1, logging every
    /// request to [`Testbed::access_log`].
    pub fn start_registry(&mut self) -> Result<()> {
        let port = free_port()?;
        self.reg = format!("127.0.0.1:{port}");
        let yml = self.dir.join("registry.yml");
        std::fs::write(
            &yml,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {}\n",
                self.dir.join("registry-data").display(),
                self.reg
            ),
        )
        .with_context(|| format!("writing {}", yml.display()))?;
        let log = std::fs::File::create(&self.access_log)
            .with_context(|| format!("creating {}", self.access_log.display()))?;
        self.registry = Some(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&yml)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting docker-registry")?,
        );
        let reg = self.reg.clone();
        wait_until("the registry", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&reg).is_ok()
        })
    }

    /// Starts the snapshotter on [`Testbed::snroot`] (config and registry
    /// settings written the first time; its log is appended to
    /// `snapshotter.log`) and waits until its socket answers.
    pub fn start_snapshotter(&mut self) -> Result<()> {
        self.start_snapshotter_with(true)
    }

    /// Starts obd-snapshotter without waiting for containerd to reconnect to
    /// it: the next calls through containerd may get `Unavailable`.
    #[allow(dead_code)] // used by tests/snapshotter_restart.rs
    pub fn start_snapshotter_unprobed(&mut self) -> Result<()> {
        self.start_snapshotter_with(false)
    }

    fn start_snapshotter_with(&mut self, probe_containerd: bool) -> Result<()> {
        if self.snapshotter.is_some() {
            bail!("obd-snapshotter is already running");
        }
        std::fs::create_dir_all(&self.snroot)
            .with_context(|| format!("creating {}", self.snroot.display()))?;
        let service = self.snroot.join("service.toml");
        if !service.exists() {
            std::fs::write(
                &service,
                // The cache stays where a user's would: the root's `cache/`.
                format!("[registry.hosts.\"{}\"]\nplain_http = true\n", self.reg),
            )
            .with_context(|| format!("writing {}", service.display()))?;
        }
        let toml = self.snapshotter_config();
        std::fs::write(
            &toml,
            format!(
                "root = \"{}\"\naddress = \"{}\"\nlazy_pull = {}\nrw_mode = \"{}\"\n{}",
                self.snroot.display(),
                self.sn_sock.display(),
                self.opts.lazy_pull,
                self.opts.rw_mode,
                self.opts.extra_toml
            ),
        )
        .with_context(|| format!("writing {}", toml.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("snapshotter.log"))?;
        // No inherited stdio: the snapshotter and its device workers outlive
        // `obd demo --keep`, and must not hold its stdout (`| tee log`).
        self.snapshotter = Some(
            Command::new(&self.opts.snapshotter)
                .arg("--config")
                .arg(&toml)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", self.opts.snapshotter.display()))?,
        );
        let sock = self.sn_sock.clone();
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(c) = self.snapshotter.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.snapshotter = None;
                    let log = std::fs::read_to_string(self.dir.join("snapshotter.log"))
                        .unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    bail!(
                        "obd-snapshotter exited ({st}) at start; the end of its log:\n{}",
                        lines[lines.len().saturating_sub(15)..].join("\n")
                    );
                }
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("timed out after 20s waiting for obd-snapshotter");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if probe_containerd && self.containerd.is_some() {
            // containerd's gRPC channel to the proxy plugin backs off after
            // the snapshotter went away (connection refused, ~1 s and
            // growing): wait until calls through containerd reach it again
            // (listing only reads containerd's metadata; Prepare does not).
            let probe = |args: &[&str]| {
                self.ctr()
                    .args(["-n", "testbed-probe", "snapshots", "--snapshotter", "obd"])
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            wait_until(
                "containerd to reconnect to obd-snapshotter",
                Duration::from_secs(60),
                || probe(&["prepare", "probe"]),
            )?;
            if !probe(&["rm", "probe"]) {
                bail!("removing the probe snapshot testbed-probe/probe failed");
            }
        }
        Ok(())
    }

    /// The snapshotter's process id, if it runs.
    #[allow(dead_code)] // used by tests/snapshotter_restart.rs
    pub fn snapshotter_pid(&self) -> Option<u32> {
        self.snapshotter.as_ref().map(Child::id)
    }

    /// Kills the snapshotter with SIGKILL (a crash) and reaps it. Its device
    /// workers are separate processes and keep running.
    #[allow(dead_code)] // used by tests/snapshotter_restart.rs
    pub fn kill_snapshotter(&mut self) -> Result<()> {
        if let Some(mut c) = self.snapshotter.take() {
            c.kill().context("killing obd-snapshotter")?;
            c.wait().context("reaping obd-snapshotter")?;
        }
        Ok(())
    }

    /// Kills the snapshotter and starts it again on the same root.
    #[allow(dead_code)] // used by tests/snapshotter_restart.rs
    pub fn restart_snapshotter(&mut self) -> Result<()> {
        self.kill_snapshotter()?;
        self.start_snapshotter()
    }

    /// Starts containerd (no CRI) with the snapshotter as proxy plugin `obd`.
    pub fn start_containerd(&mut self) -> Result<()> {
        let conf = self.containerd_config();
        let install = fixtures::containerd::installed().map_err(anyhow::Error::msg)?;
        std::fs::write(&conf, install.config(&self.dir, &self.sn_sock))
            .with_context(|| format!("writing {}", conf.display()))?;
        let clog = std::fs::File::create(self.dir.join("containerd.log"))?;
        self.containerd = Some(
            install
                .command()
                .arg("--config")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(clog.try_clone()?)
                .stderr(clog)
                .spawn()
                .context("starting containerd")?,
        );
        wait_until("containerd", Duration::from_secs(30), || {
            self.ctr()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    /// Starts the snapshotter, then containerd.
    pub fn start_runtime(&mut self) -> Result<()> {
        self.start_snapshotter()?;
        self.start_containerd()
    }

    /// A container id unique to this work directory: runc keeps its state
    /// in /run/containerd/runc/<namespace>/<id>, shared by every containerd
    /// on the machine.
    pub fn cid(&self, name: &str) -> String {
        let base = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag = base.rsplit('-').next().unwrap_or("");
        format!("{name}-{tag}")
    }

    /// The status column of `ctr tasks ls` for container `cid` (`RUNNING`,
    /// `STOPPED`, …; empty if it has no task).
    #[allow(dead_code)] // used by tests/snapshotter_restart.rs, snapshotter_worker_kill.rs
    pub fn task_status(&self, cid: &str) -> String {
        let out = self.ctr().args(["tasks", "ls"]).output();
        let out = out.map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&out)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(cid))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string()
    }

    /// `ctr run --rm` of the sample image ([`build_sample`]) as container
    /// `id`; panics unless it printed [`EXPECTED`] and [`WRITTEN`].
    #[allow(dead_code)] // used by tests/snapshotter_restart.rs, cache_lifecycle.rs
    pub fn run_sample(&self, image: &str, id: &str) {
        let id = &self.cid(id);
        let out = run_ok(
            self.ctr()
                .args(["run", "--rm", "--snapshotter", "obd", image, id]),
        )
        .unwrap_or_else(|e| panic!("ctr run {id}: {e:#}"));
        assert_eq!(
            out.trim(),
            format!("{EXPECTED}\n{WRITTEN}"),
            "container {id}"
        );
    }

    /// `ctr --address <containerd.sock>`, the ctr of the containerd that
    /// runs (see `fixtures::containerd::Install::from_env`).
    pub fn ctr(&self) -> Command {
        match fixtures::containerd::installed() {
            Ok(i) => i.ctr(&self.sock),
            Err(_) => {
                let mut c = Command::new("ctr");
                c.arg("--address").arg(&self.sock);
                c
            }
        }
    }

    /// The `obd` binary.
    pub fn obd(&self) -> Command {
        Command::new(&self.opts.obd)
    }

    /// The snapshotter's config file (written when it starts).
    pub fn snapshotter_config(&self) -> PathBuf {
        self.dir.join("snapshotter.toml")
    }

    /// containerd's config file (written when it starts).
    pub fn containerd_config(&self) -> PathBuf {
        self.dir.join("containerd.toml")
    }

    /// `obd pull --plain-http <registry> --address <containerd.sock>
    /// --snapshotter-config <its config> -n <ns> <image>`.
    pub fn obd_pull(&self, ns: &str, image: &str) -> Command {
        let mut c = self.obd();
        c.args(["pull", "--plain-http", &self.reg, "-n", ns, "--address"])
            .arg(&self.sock)
            .arg("--snapshotter-config")
            .arg(self.snapshotter_config())
            .arg(image);
        c
    }

    /// `obd doctor` of this test bed (its snapshotter and containerd
    /// configs and socket), with `--image image` if given.
    pub fn doctor(&self, image: Option<&str>) -> Command {
        let mut c = self.obd();
        c.arg("doctor")
            .arg("--snapshotter-config")
            .arg(self.snapshotter_config())
            .arg("--containerd-config")
            .arg(self.containerd_config())
            .arg("--address")
            .arg(&self.sock);
        if let Some(i) = image {
            c.args(["--image", i]);
        }
        c
    }

    /// `obd convert`s the OCI layout `layout` (tag `tag`) and pushes the
    /// result to `image` on the registry.
    pub fn convert_push(&self, layout: &Path, tag: &str, image: &str) -> Result<String> {
        run_ok(
            self.obd()
                .args(["convert", "--plain-http", &self.reg])
                .arg(format!("oci:{}:{tag}", layout.display()))
                .arg(format!("docker://{image}")),
        )
    }

    /// Best effort: kills and removes every task in every namespace (their
    /// shims outlive containerd otherwise).
    fn remove_tasks(&self) {
        let Ok(ns) = self.ctr().args(["namespaces", "ls", "-q"]).output() else {
            return;
        };
        for ns in String::from_utf8_lossy(&ns.stdout).lines() {
            let Ok(t) = self.ctr().args(["-n", ns, "tasks", "ls", "-q"]).output() else {
                continue;
            };
            for id in String::from_utf8_lossy(&t.stdout).lines() {
                let _ = self
                    .ctr()
                    .args(["-n", ns, "tasks", "rm", "-f", id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn stop(name: &str, c: &mut Child) {
    let pid = rustix::process::Pid::from_child(c);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let t0 = Instant::now();
    while c.try_wait().ok().flatten().is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            tracing::warn!("obd: {name} did not stop; killing it");
            let _ = c.kill();
            let _ = c.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.opts.keep {
            return;
        }
        if self.containerd.is_some() {
            self.remove_tasks();
        }
        // containerd first, then the snapshotter, then the registry.
        if let Some(c) = self.containerd.as_mut() {
            stop("containerd", c);
        }
        if let Some(c) = self.snapshotter.as_mut() {
            stop("obd-snapshotter", c);
        }
        if let Some(c) = self.registry.as_mut() {
            stop("docker-registry", c);
        }
        // Devices outlive the snapshotter by design: detach them now.
        let root = obd_device::state::Root::new(&self.snroot);
        for id in root.ids().unwrap_or_default() {
            if let Err(e) = obd_device::service::cleanup_device(&root, &id) {
                tracing::warn!("obd: detaching device {id}: {e}");
            }
        }
        obd_device::mount::unmount_below(&self.dir);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("obd: removing {}: {e}", self.dir.display());
        }
    }
}

/// Whether `tool` is on PATH.
pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd`; its stdout, or an error with its status and output.
pub(crate) fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub(crate) fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `explicit`, else `obd-snapshotter` next to the running executable, else
/// on PATH.
pub(crate) fn find_snapshotter(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating obd")?;
    let side = exe.with_file_name("obd-snapshotter");
    if side.is_file() {
        return Ok(side);
    }
    if have("obd-snapshotter") {
        return Ok("obd-snapshotter".into());
    }
    bail!(
        "obd-snapshotter not found next to {} nor on PATH (build it: cargo build --release -p snapshotter)",
        exe.display()
    )
}

/// One successful blob GET of a registry access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlobGet {
    /// `sha256:<hex>`.
    pub digest: String,
    /// HTTP status: 200 for a whole blob, 206 for a range.
    pub status: u16,
    /// Bytes sent.
    pub bytes: u64,
}

/// The successful (2xx) blob GETs of a registry access log (combined
/// format) from byte `from` on, oldest first.
pub(crate) fn blob_gets(log: &Path, from: usize) -> Vec<BlobGet> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut v = Vec::new();
    for l in text.get(from..).unwrap_or_default().lines() {
        // … "GET /v2/<repo>/blobs/sha256:… HTTP/1.1" 206 262144 "…" "…"
        let Some((_, rest)) = l.split_once("\"GET ") else {
            continue;
        };
        let Some((req, tail)) = rest.split_once('"') else {
            continue;
        };
        let Some((_, blob)) = req.split_once("/blobs/") else {
            continue;
        };
        let digest = blob.split_whitespace().next().unwrap_or("");
        if !digest.starts_with("sha256:") {
            continue;
        }
        let mut f = tail.split_whitespace();
        let status: u16 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let bytes: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if (200..300).contains(&status) {
            v.push(BlobGet {
                digest: digest.to_string(),
                status,
                bytes,
            });
        }
    }
    v
}

/// Bytes and requests of blob GETs in a registry access log (combined format).
pub(crate) fn blob_traffic(log: &Path) -> (u64, u64) {
    let gets = blob_gets(log, 0);
    (gets.iter().map(|g| g.bytes).sum(), gets.len() as u64)
}

/// Bytes of the regular files under `dir`.
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => n += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    n
}

/// Writes an OCI image layout (tag `demo`) with `layers` uncompressed
/// layers (at least 2): busybox first, `layers - 2` small layers of one
/// file each (`/app/layers/<i>`), and last the app (`/app/run.sh`, which
/// prints [`EXPECTED`] and [`WRITTEN`], plus `data` bytes it never reads).
/// Returns the bytes of the layers.
pub(crate) fn build_sample(dir: &Path, layers: usize, data: u64) -> Result<u64> {
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let mut tars = vec![busybox_layer()?];
    let mut history = vec![json!({"created_by": "obd demo: busybox"})];
    for i in 1..layers.max(2) - 1 {
        tars.push(middle_layer(i)?);
        history.push(json!({"created_by": format!("obd demo: layer {i}")}));
    }
    tars.push(app_layer(data)?);
    history.push(json!({"created_by": "obd demo: app"}));
    write_layout(dir, &blobs, &tars, history)
}

/// A tar header of the sample layers (root-owned, fixed time).
fn sample_header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h
}

fn sample_file(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    body: &[u8],
) -> std::io::Result<()> {
    let mut h = sample_header(body.len() as u64, mode, tar::EntryType::Regular);
    b.append_data(&mut h, path, body)
}

fn sample_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) -> std::io::Result<()> {
    let mut h = sample_header(0, 0o755, tar::EntryType::Directory);
    b.append_data(&mut h, path, std::io::empty())
}

/// Layer 1 of the sample: busybox, its applets and `/etc/passwd`.
fn busybox_layer() -> Result<Vec<u8>> {
    let bb = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox (apt install busybox-static)")?;
    let mut b = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "app"] {
        sample_dir(&mut b, d)?;
    }
    sample_file(&mut b, "bin/busybox", 0o755, &bb)?;
    for a in ["sh", "cat", "echo", "ls", "head", "wc", "sleep", "true"] {
        let mut h = sample_header(0, 0o777, tar::EntryType::Symlink);
        b.append_link(&mut h, format!("bin/{a}"), "busybox")?;
    }
    sample_file(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    )?;
    Ok(b.into_inner()?)
}

/// Middle layer `i` of the sample: one small file.
fn middle_layer(i: usize) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    sample_dir(&mut b, "app")?;
    sample_dir(&mut b, "app/layers")?;
    sample_file(
        &mut b,
        &format!("app/layers/{i}"),
        0o644,
        format!("layer {i}\n").as_bytes(),
    )?;
    Ok(b.into_inner()?)
}

/// Last layer of the sample: the app and `data` bytes it leaves alone
/// (incompressible, so lazy pull has something to skip).
fn app_layer(data: u64) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    sample_dir(&mut b, "app")?;
    sample_dir(&mut b, "app/data")?;
    let script = format!(
        "#!/bin/sh\ncat /app/message\necho '{WRITTEN}' > /root/written && cat /root/written\n"
    );
    sample_file(&mut b, "app/run.sh", 0o755, script.as_bytes())?;
    sample_file(
        &mut b,
        "app/message",
        0o644,
        format!("{EXPECTED}\n").as_bytes(),
    )?;
    let chunk = 8u64 << 20;
    let mut left = data;
    let mut n = 0;
    while left > 0 {
        let len = left.min(chunk) as usize;
        let body = fixtures::image_like(1000 + n, len);
        sample_file(&mut b, &format!("app/data/blob-{n}"), 0o644, &body)?;
        left -= len as u64;
        n += 1;
    }
    Ok(b.into_inner()?)
}

/// Writes `bytes` as a blob under `blobs`; returns its digest and size.
fn put_blob(blobs: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    let d = hex::encode(Sha256::digest(bytes));
    let p = blobs.join(&d);
    std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    Ok((format!("sha256:{d}"), bytes.len() as u64))
}

/// Writes the layer blobs `tars`, the config, the manifest and the index of
/// the sample layout in `dir`; returns the bytes of the layers.
fn write_layout(
    dir: &Path,
    blobs: &Path,
    tars: &[Vec<u8>],
    history: Vec<serde_json::Value>,
) -> Result<u64> {
    let lt = "application/vnd.oci.image.layer.v1.tar";
    let (mut diff_ids, mut descs, mut total) = (Vec::new(), Vec::new(), 0);
    for t in tars {
        let (d, s) = put_blob(blobs, t)?;
        descs.push(json!({"mediaType": lt, "digest": d, "size": s}));
        diff_ids.push(d);
        total += s;
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/app/run.sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history
    });
    let (dc, sc) = put_blob(blobs, serde_json::to_vec(&config)?.as_slice())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": sc},
        "layers": descs
    });
    let (dm, sm) = put_blob(blobs, serde_json::to_vec(&manifest)?.as_slice())?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": dm, "size": sm,
            "annotations": {"org.opencontainers.image.ref.name": "demo"}
        }]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(total)
}
