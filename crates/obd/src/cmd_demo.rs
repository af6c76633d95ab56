//! `obd demo`: the whole path on one machine, end to end. It starts a
//! registry on 127.0.0.1, builds a small sample image (busybox plus an app
//! layer with data the app does not read), converts it to obd, starts a
//! private containerd with `obd-snapshotter`, pulls lazily, runs the
//! container, and prints what was fetched and how long each phase took.
//! Everything lives in one temporary directory and is cleaned up afterwards.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::util::human;

/// Run the end-to-end demo (needs root, containerd, runc, docker-registry).
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Work directory (default: a new directory under /tmp); removed at the
    /// end unless `--keep`.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Keep the work directory, containerd and the snapshotter's state.
    #[arg(long)]
    pub keep: bool,
    /// The `obd-snapshotter` binary (default: next to `obd`, else on PATH).
    #[arg(long)]
    pub snapshotter: Option<PathBuf>,
    /// Size of the app layer's data the container does not read.
    #[arg(long, default_value = "64M", value_parser = size_arg)]
    pub data: u64,
    /// The snapshotter's `rw_mode` for the container: overlayfs, dir or dev.
    #[arg(long, default_value = "overlayfs", value_parser = ["overlayfs", "dir", "dev"])]
    pub rw_mode: String,
    /// Pull with plain `ctr image pull` instead of `obd pull`: containerd
    /// downloads the obd layers in full and the snapshotter serves them
    /// from the tar-wrapped copies (the fallback path).
    #[arg(long)]
    pub plain_pull: bool,
    /// Print the figures as one JSON object at the end.
    #[arg(long)]
    pub json: bool,
}

fn size_arg(s: &str) -> Result<u64, String> {
    crate::util::parse_size(s).map_err(|e| e.to_string())
}

/// What the container prints first.
pub const EXPECTED: &str = "hello from a lazily pulled obd image";
/// What it prints after writing to its rootfs and reading that back.
pub const WRITTEN: &str = "rootfs write ok";

struct Procs {
    children: Vec<(String, Child)>,
    dir: PathBuf,
    keep: bool,
    snroot: PathBuf,
}

impl Drop for Procs {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // containerd first, then the snapshotter, then the registry.
        for (name, c) in self.children.iter_mut().rev() {
            let pid = rustix::process::Pid::from_child(c);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(10) {
                    eprintln!("obd demo: {name} did not stop; killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Devices outlive the snapshotter by design: detach them now.
        let root = obd_device::state::Root::new(&self.snroot);
        for id in root.ids().unwrap_or_default() {
            if let Err(e) = obd_device::service::cleanup_device(&root, &id) {
                eprintln!("obd demo: detaching device {id}: {e}");
            }
        }
        unmount_below(&self.dir);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("obd demo: removing {}: {e}", self.dir.display());
        }
    }
}

/// Unmounts everything mounted under `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut mps: Vec<String> = mi
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_string)
        .collect();
    mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mps {
        let _ = obd_device::mount::unmount(Path::new(&m), true);
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
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

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
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

fn find_snapshotter(explicit: Option<PathBuf>) -> Result<PathBuf> {
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

/// Bytes and requests of blob GETs in a registry access log (combined format).
fn blob_traffic(log: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut bytes, mut reqs) = (0u64, 0u64);
    for l in text.lines() {
        // … "GET /v2/<repo>/blobs/sha256:… HTTP/1.1" 206 262144 "…" "…"
        let Some((_, rest)) = l.split_once("\"GET ") else {
            continue;
        };
        let Some((req, tail)) = rest.split_once('"') else {
            continue;
        };
        if !req.contains("/blobs/sha256:") {
            continue;
        }
        let mut f = tail.split_whitespace();
        let status = f.next().unwrap_or("");
        let n: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if status.starts_with('2') {
            bytes += n;
            reqs += 1;
        }
    }
    (bytes, reqs)
}

/// Writes an OCI image layout with two uncompressed layers: busybox, and an
/// app (a script plus `data` bytes it never reads).
fn build_sample(dir: &Path, data: u64) -> Result<u64> {
    use sha2::{Digest, Sha256};
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> Result<(String, u64)> {
        let d = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&d), bytes)?;
        Ok((format!("sha256:{d}"), bytes.len() as u64))
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, body: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, body)
    };
    let dirent = |b: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Directory);
        b.append_data(&mut h, path, std::io::empty())
    };
    // Layer 1: busybox.
    let bb = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox (apt install busybox-static)")?;
    let mut b = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "app"] {
        dirent(&mut b, d)?;
    }
    file(&mut b, "bin/busybox", 0o755, &bb)?;
    for a in ["sh", "cat", "echo", "ls", "head", "wc", "sleep", "true"] {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Symlink);
        b.append_link(&mut h, format!("bin/{a}"), "busybox")?;
    }
    file(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    )?;
    let l1 = b.into_inner()?;
    // Layer 2: the app and data it leaves alone (incompressible, so lazy
    // pull has something to skip).
    let mut b = tar::Builder::new(Vec::new());
    dirent(&mut b, "app")?;
    dirent(&mut b, "app/data")?;
    let script = format!(
        "#!/bin/sh\ncat /app/message\necho '{WRITTEN}' > /root/written && cat /root/written\n"
    );
    file(&mut b, "app/run.sh", 0o755, script.as_bytes())?;
    file(
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
        file(&mut b, &format!("app/data/blob-{n}"), 0o644, &body)?;
        left -= len as u64;
        n += 1;
    }
    let l2 = b.into_inner()?;
    let (d1, s1) = put(&l1)?;
    let (d2, s2) = put(&l2)?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/app/run.sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [d1, d2]},
        "history": [{"created_by": "obd demo: busybox"}, {"created_by": "obd demo: app"}]
    });
    let (dc, sc) = put(serde_json::to_vec(&config)?.as_slice())?;
    let lt = "application/vnd.oci.image.layer.v1.tar";
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": sc},
        "layers": [
            {"mediaType": lt, "digest": d1, "size": s1},
            {"mediaType": lt, "digest": d2, "size": s2}
        ]
    });
    let (dm, sm) = put(serde_json::to_vec(&manifest)?.as_slice())?;
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
    Ok(s1 + s2)
}

struct Phases {
    rows: Vec<(&'static str, f64)>,
    t: Instant,
}

impl Phases {
    fn done(&mut self, name: &'static str) {
        let s = self.t.elapsed().as_secs_f64();
        self.rows.push((name, s));
        println!("  {name:<28} {s:>7.2} s");
        let _ = std::io::stdout().flush();
        self.t = Instant::now();
    }
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("obd demo needs root (containerd, runc, mounts, loop and FUSE devices)");
    }
    for t in ["containerd", "ctr", "runc", "docker-registry"] {
        if !have(t) {
            bail!("{t} is not installed (run scripts/setup.sh, or apt install containerd runc docker-registry)");
        }
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing (modprobe fuse)");
    }
    let snapshotter = find_snapshotter(a.snapshotter)?;
    let obd = std::env::current_exe().context("locating obd")?;
    let dir = match a.workdir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        // Short path: unix socket paths are limited to 107 bytes.
        None => tempfile::Builder::new()
            .prefix("obd-demo-")
            .tempdir_in("/tmp")?
            .keep(),
    };
    let dir = std::fs::canonicalize(&dir)?;
    println!("obd demo in {}", dir.display());
    let snroot = dir.join("snapshotter");
    let mut procs = Procs {
        children: Vec::new(),
        dir: dir.clone(),
        keep: a.keep,
        snroot: snroot.clone(),
    };
    let mut ph = Phases {
        rows: Vec::new(),
        t: Instant::now(),
    };

    // 1. Registry, with an access log to count what is fetched.
    let port = free_port()?;
    let reg = format!("127.0.0.1:{port}");
    let access = dir.join("registry-access.log");
    std::fs::write(
        dir.join("registry.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {reg}\n",
            dir.join("registry-data").display()
        ),
    )?;
    let log = std::fs::File::create(&access)?;
    procs.children.push((
        "docker-registry".into(),
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("registry.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?,
    ));
    wait_until("the registry", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&reg).is_ok()
    })?;
    ph.done("start registry");

    // 2. Sample image.
    let layout = dir.join("oci");
    let image_bytes = build_sample(&layout, a.data)?;
    ph.done("build sample OCI image");

    // 3. Convert and push.
    let image = format!("{reg}/obd-demo/app:obd");
    run_ok(
        Command::new(&obd)
            .args(["convert", "--plain-http", &reg])
            .arg(format!("oci:{}:demo", layout.display()))
            .arg(format!("docker://{image}")),
    )?;
    let pushed = dir_bytes(&dir.join("registry-data"));
    let before = std::fs::read_to_string(&access).unwrap_or_default().len();
    ph.done("convert + push to registry");

    // 4. Snapshotter and containerd.
    std::fs::create_dir_all(&snroot)?;
    std::fs::write(
        snroot.join("service.toml"),
        format!(
            "[cache]\ndir = \"{}\"\n\n[registry.hosts.\"{reg}\"]\nplain_http = true\n",
            dir.join("cache").display()
        ),
    )?;
    let sn_sock = dir.join("obd.sock");
    std::fs::write(
        dir.join("snapshotter.toml"),
        format!(
            "root = \"{}\"\naddress = \"{}\"\nlazy_pull = true\nrw_mode = \"{}\"\n",
            snroot.display(),
            sn_sock.display(),
            a.rw_mode
        ),
    )?;
    procs.children.push((
        "obd-snapshotter".into(),
        Command::new(&snapshotter)
            .arg("--config")
            .arg(dir.join("snapshotter.toml"))
            .stderr(std::fs::File::create(dir.join("snapshotter.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", snapshotter.display()))?,
    ));
    wait_until("obd-snapshotter", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&sn_sock).is_ok()
    })?;
    let sock = dir.join("containerd.sock");
    std::fs::write(
        dir.join("containerd.toml"),
        format!(
            r#"version = 2
root = "{d}/containerd-root"
state = "{d}/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/containerd-debug.sock"
[metrics]
  address = ""
[proxy_plugins]
  [proxy_plugins.obd]
    type = "snapshot"
    address = "{s}"
"#,
            d = dir.display(),
            s = sn_sock.display()
        ),
    )?;
    let clog = std::fs::File::create(dir.join("containerd.log"))?;
    procs.children.push((
        "containerd".into(),
        Command::new("containerd")
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .stdout(clog.try_clone()?)
            .stderr(clog)
            .spawn()
            .context("starting containerd")?,
    ));
    let ctr = || {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&sock);
        c
    };
    wait_until("containerd", Duration::from_secs(30), || {
        ctr()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    })?;
    ph.done("start containerd + obd-snapshotter");

    // 5. Lazy pull.
    if a.plain_pull {
        run_ok(ctr().args([
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "obd",
            &image,
        ]))?;
        ph.done("ctr image pull (full download)");
    } else {
        let pull = run_ok(
            Command::new(&obd)
                .args(["pull", "--plain-http", "--address"])
                .arg(&sock)
                .arg(&image),
        )?;
        print!("{}", indent(&pull));
        ph.done("obd pull (remote snapshots)");
    }

    // 6. Run.
    let out = run_ok(ctr().args(["run", "--snapshotter", "obd", "--rm", &image, "obd-demo"]))?;
    ph.done("ctr run (attach + start + exit)");
    for l in out.lines() {
        println!("  container printed: {l}");
    }
    if out.trim() != format!("{EXPECTED}\n{WRITTEN}") {
        bail!("the container printed {out:?}, expected {EXPECTED:?} and {WRITTEN:?}");
    }

    let text = std::fs::read_to_string(&access).unwrap_or_default();
    let tail = dir.join("registry-access.after-push.log");
    std::fs::write(&tail, &text.as_bytes()[before.min(text.len())..])?;
    let (fetched, reqs) = blob_traffic(&tail);
    let total: f64 = ph.rows.iter().map(|r| r.1).sum();
    println!(
        "image: {} as OCI layers, {} as obd blobs pushed; the container fetched {} in {} blob requests ({:.1}% of the obd image)",
        human(image_bytes),
        human(pushed),
        human(fetched),
        reqs,
        100.0 * fetched as f64 / pushed.max(1) as f64
    );
    println!("total {total:.2} s");
    if a.json {
        let phases: serde_json::Map<String, serde_json::Value> = ph
            .rows
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        println!(
            "{}",
            json!({"image_bytes": image_bytes, "obd_bytes": pushed, "fetched_bytes": fetched,
                   "fetch_requests": reqs, "output": out.trim(), "rw_mode": a.rw_mode,
                   "plain_pull": a.plain_pull, "phases_s": phases})
        );
    }
    if a.keep {
        println!(
            "kept {} (containerd, obd-snapshotter and the registry are still running)",
            dir.display()
        );
    }
    drop(procs);
    Ok(())
}

/// Bytes of the regular files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
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

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
