//! `obd doctor [--image REF]`: can this node run obd images? Checks the
//! kernel (FUSE, loop, TCMU), obd-snapshotter (its config and socket),
//! containerd (its config: the proxy plugin, CRI's snapshotter and
//! `disable_snapshot_annotations`; its socket), the snapshotter's cache
//! (location, free space) and, for an image, its registry with the
//! settings the snapshotter's devices use (scheme, credentials, a blob
//! read). Each check prints ✓, ! (works, at a cost) or ✗ with the fix; it
//! exits non-zero when any check is ✗.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use obd_remote::creds::CredentialSource;
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::http::{credential_source, plain_http_fix};
use obd_remote::oci::{self, Platform, ANN_BLOB_DIGEST, ANN_BLOB_SIZE};
use serde::Serialize;
use serde_json::json;

use crate::args::PlatformArgs;
use crate::node::{fuse_dev, read_blob_as_worker, Node, FUSE_DEV_ENV};
use crate::util::human;

/// Check whether this node can run obd images, and say how to fix what is
/// missing.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also check this image: its registry answers with the snapshotter's
    /// settings (scheme, credentials) and its blobs can be read.
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// The snapshotter's config (default: /etc/obd/snapshotter.toml if it
    /// exists, else the snapshotter's defaults).
    #[arg(long, value_name = "FILE")]
    pub snapshotter_config: Option<PathBuf>,
    /// containerd's config.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/containerd/config.toml"
    )]
    pub containerd_config: PathBuf,
    /// containerd's gRPC socket (default: the config's `[grpc] address`,
    /// else /run/containerd/containerd.sock).
    #[arg(short, long, value_name = "SOCKET")]
    pub address: Option<PathBuf>,
    /// The name of the obd proxy plugin in containerd.
    #[arg(long, default_value = "obd")]
    pub snapshotter: String,
    /// Platform of `--image` to check (default: this machine's).
    #[command(flatten)]
    pub platform: PlatformArgs,
    /// Print the checks as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, at a cost (e.g. layers downloaded instead of lazily read).
    Warn,
    /// obd images cannot run.
    Fail,
    /// Not relevant here (e.g. TCMU with the FUSE frontend).
    Skip,
}

impl Status {
    fn mark(self) -> &'static str {
        match self {
            Status::Ok => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
            Status::Skip => "-",
        }
    }
}

/// One check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// kernel, snapshotter, containerd, cache or registry.
    pub area: &'static str,
    /// What was checked.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, unless it is fine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Default)]
struct Report(Vec<Check>);

impl Report {
    fn add(&mut self, area: &'static str, name: &str, status: Status, detail: String) {
        self.0.push(Check {
            area,
            name: name.into(),
            status,
            detail,
            fix: None,
        });
    }
    fn fix(&mut self, area: &'static str, name: &str, status: Status, detail: String, fix: String) {
        self.add(area, name, status, detail);
        if matches!(status, Status::Warn | Status::Fail) {
            self.0.last_mut().expect("just added").fix = Some(fix);
        }
    }
}

/// Runs `obd doctor`.
pub fn run(a: DoctorArgs) -> Result<()> {
    let mut r = Report::default();
    let node = match Node::load(a.snapshotter_config.as_deref()) {
        Ok(n) => Some(n),
        Err(e) => {
            r.fix(
                "snapshotter",
                "config",
                Status::Fail,
                format!("{e:#}"),
                "fix the file (every key is listed in crates/snapshotter/obd-snapshotter.toml)"
                    .into(),
            );
            None
        }
    };
    let frontend = node
        .as_ref()
        .map_or("fuse", |n| n.config.device_frontend.as_str());
    kernel(&mut r, frontend);
    if let Some(n) = &node {
        snapshotter(&mut r, n);
    }
    let sn_sock = node.as_ref().map(|n| n.config.address.clone());
    containerd(&mut r, &a, sn_sock.as_deref());
    if let Some(n) = &node {
        cache(&mut r, n);
        if let Some(image) = &a.image {
            registry(&mut r, n, image, &a.platform.one()?);
        }
    }
    let failed = r.0.iter().filter(|c| c.status == Status::Fail).count();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ok": failed == 0, "checks": r.0}))?
        );
    } else {
        print_text(&r.0);
    }
    if failed > 0 {
        bail!("this node cannot run obd images: {failed} check(s) failed (✗ above, each with its fix)");
    }
    Ok(())
}

fn print_text(checks: &[Check]) {
    let mut area = "";
    for c in checks {
        if c.area != area {
            area = c.area;
            println!("{area}");
        }
        println!("  {} {:<26} {}", c.status.mark(), c.name, c.detail);
        if let Some(f) = &c.fix {
            println!("      fix: {f}");
        }
    }
    println!("(✓ ok, ! works at a cost, ✗ obd images cannot run, - not needed here)");
}

/// FUSE, loop and TCMU: what the snapshotter's `device_frontend` needs.
fn kernel(r: &mut Report, frontend: &str) {
    let fuse = frontend == "fuse";
    let need = |yes: bool| if yes { Status::Fail } else { Status::Skip };
    let dev = fuse_dev();
    let test_note = match std::env::var_os(FUSE_DEV_ENV) {
        Some(_) => format!(" ({FUSE_DEV_ENV} is set: test only)"),
        None => String::new(),
    };
    match dev.exists() {
        true => r.add(
            "kernel",
            "FUSE",
            Status::Ok,
            format!("{}{test_note}", dev.display()),
        ),
        false => r.fix(
            "kernel",
            "FUSE",
            need(fuse),
            format!("{} is missing{test_note}", dev.display()),
            "modprobe fuse (and load it at boot: echo fuse > /etc/modules-load.d/obd.conf)".into(),
        ),
    }
    match Path::new("/dev/loop-control").exists() {
        true => r.add(
            "kernel",
            "loop devices",
            Status::Ok,
            "/dev/loop-control".into(),
        ),
        false => r.fix(
            "kernel",
            "loop devices",
            need(fuse),
            "/dev/loop-control is missing".into(),
            "modprobe loop".into(),
        ),
    }
    let tcmu = ["target_core_user", "tcm_loop"]
        .iter()
        .filter(|m| !Path::new("/sys/module").join(m).exists())
        .copied()
        .collect::<Vec<_>>();
    let configfs = Path::new("/sys/kernel/config/target").exists();
    if tcmu.is_empty() && configfs {
        r.add(
            "kernel",
            "TCMU",
            Status::Ok,
            "target_core_user, tcm_loop, configfs".into(),
        );
    } else {
        let mut missing = tcmu.join(", ");
        if !configfs {
            missing += if missing.is_empty() { "" } else { ", " };
            missing += "configfs target";
        }
        let detail = match fuse {
            true => format!("not needed (device_frontend = \"fuse\"); missing: {missing}"),
            false => format!("missing: {missing}"),
        };
        r.fix(
            "kernel",
            "TCMU",
            need(!fuse),
            detail,
            "modprobe target_core_user tcm_loop && mount -t configfs none /sys/kernel/config \
             (or device_frontend = \"fuse\")"
                .into(),
        );
    }
}

fn snapshotter(r: &mut Report, n: &Node) {
    let cfg = match &n.config_path {
        Some(p) => p.display().to_string(),
        None => "none found: the defaults (/etc/obd/snapshotter.toml is absent)".into(),
    };
    r.add("snapshotter", "config", Status::Ok, cfg);
    socket(
        r,
        "snapshotter",
        &n.config.address,
        "start obd-snapshotter (systemctl enable --now obd-snapshotter, or \
         obd-snapshotter --config /etc/obd/snapshotter.toml)",
    );
}

/// Whether something listens on the unix socket `sock`.
fn socket(r: &mut Report, area: &'static str, sock: &Path, fix: &str) {
    match std::os::unix::net::UnixStream::connect(sock) {
        Ok(_) => r.add(area, "socket", Status::Ok, sock.display().to_string()),
        Err(e) => r.fix(
            area,
            "socket",
            Status::Fail,
            format!("{}: {e}", sock.display()),
            fix.into(),
        ),
    }
}

/// `v[path…]`, if every key is there.
fn get<'a>(v: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// The containerd config's checks, then its socket.
fn containerd(r: &mut Report, a: &DoctorArgs, sn_sock: Option<&Path>) {
    let file = &a.containerd_config;
    let cfg: Option<toml::Value> = match std::fs::read_to_string(file) {
        Err(e) => {
            r.fix(
                "containerd",
                "config",
                Status::Fail,
                format!("{}: {e}", file.display()),
                "write it from contrib/containerd/config-1.6-1.7.toml (config-2.x.toml for \
                 containerd 2), or name it with --containerd-config"
                    .into(),
            );
            None
        }
        Ok(text) => match toml::from_str(&text) {
            Ok(v) => {
                r.add(
                    "containerd",
                    "config",
                    Status::Ok,
                    file.display().to_string(),
                );
                Some(v)
            }
            Err(e) => {
                r.fix(
                    "containerd",
                    "config",
                    Status::Fail,
                    format!("{}: {e}", file.display()),
                    "fix its TOML".into(),
                );
                None
            }
        },
    };
    if let Some(v) = &cfg {
        proxy_plugin(r, v, &a.snapshotter, sn_sock);
        cri(r, v, &a.snapshotter);
    }
    let sock = a
        .address
        .clone()
        .or_else(|| {
            cfg.as_ref()
                .and_then(|v| get(v, &["grpc", "address"]))
                .and_then(|s| s.as_str())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| snapshotter::pull::DEFAULT_ADDRESS.into());
    socket(
        r,
        "containerd",
        &sock,
        "start containerd (systemctl start containerd), after obd-snapshotter",
    );
}

fn proxy_plugin(r: &mut Report, v: &toml::Value, name: &str, sn_sock: Option<&Path>) {
    let want = sn_sock.map_or_else(
        || snapshotter::config::DEFAULT_ADDRESS.to_string(),
        |p| p.display().to_string(),
    );
    let add = format!(
        "add `[proxy_plugins.{name}] type = \"snapshot\" address = \"{want}\"` and restart containerd"
    );
    let Some(p) = get(v, &["proxy_plugins", name]) else {
        r.fix(
            "containerd",
            "proxy plugin",
            Status::Fail,
            format!("no [proxy_plugins.{name}]: containerd does not know obd-snapshotter"),
            add,
        );
        return;
    };
    let ty = p.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let addr = p.get("address").and_then(|t| t.as_str()).unwrap_or("");
    if ty != "snapshot" {
        r.fix(
            "containerd",
            "proxy plugin",
            Status::Fail,
            format!("[proxy_plugins.{name}] type = {ty:?}, not \"snapshot\""),
            add,
        );
    } else if addr != want {
        r.fix(
            "containerd",
            "proxy plugin",
            Status::Fail,
            format!(
                "[proxy_plugins.{name}] address = {addr:?}; obd-snapshotter listens on {want:?}"
            ),
            format!(
                "set address = \"{want}\" (or the snapshotter's `address`) and restart containerd"
            ),
        );
    } else {
        r.add(
            "containerd",
            "proxy plugin",
            Status::Ok,
            format!("[proxy_plugins.{name}] at {addr}"),
        );
    }
}

/// CRI (Kubernetes): its snapshotter and `disable_snapshot_annotations`
/// (containerd 1.x: the grpc CRI plugin's `containerd` table; 2.x: the
/// `io.containerd.cri.v1.images` plugin).
fn cri(r: &mut Report, v: &toml::Value, name: &str) {
    let version = get(v, &["version"])
        .and_then(|x| x.as_integer())
        .unwrap_or(1);
    let (plugin, path): (&str, &[&str]) = if version >= 3 {
        (
            "io.containerd.cri.v1.images",
            &["plugins", "io.containerd.cri.v1.images"],
        )
    } else {
        (
            "io.containerd.grpc.v1.cri",
            &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        )
    };
    let disabled = get(v, &["disabled_plugins"])
        .and_then(|d| d.as_array())
        .is_some_and(|d| {
            d.iter()
                .filter_map(|p| p.as_str())
                .any(|p| p == plugin || p == "cri" || p == "io.containerd.grpc.v1.cri")
        });
    if disabled {
        r.add(
            "containerd",
            "CRI snapshotter",
            Status::Skip,
            "CRI is disabled: images run through obd pull + ctr only".into(),
        );
        return;
    }
    let t = get(v, path);
    let sn = t
        .and_then(|t| t.get("snapshotter"))
        .and_then(|s| s.as_str());
    // A TOML table header: keys with dots quoted.
    let table = path
        .iter()
        .map(|k| match k.contains('.') {
            true => format!("\"{k}\""),
            false => k.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".");
    match sn {
        Some(s) if s == name => r.add(
            "containerd",
            "CRI snapshotter",
            Status::Ok,
            format!("[{table}] snapshotter = \"{name}\""),
        ),
        other => r.fix(
            "containerd",
            "CRI snapshotter",
            Status::Warn,
            format!(
                "CRI uses {:?}: Kubernetes pods do not get obd images lazily",
                other.unwrap_or("overlayfs")
            ),
            format!("set snapshotter = \"{name}\" in [{table}] and restart containerd"),
        ),
    }
    let dsa = t
        .and_then(|t| t.get("disable_snapshot_annotations"))
        .and_then(|b| b.as_bool());
    match dsa {
        Some(false) => r.add(
            "containerd",
            "snapshot annotations",
            Status::Ok,
            "disable_snapshot_annotations = false".into(),
        ),
        other => r.fix(
            "containerd",
            "snapshot annotations",
            Status::Warn,
            format!(
                "disable_snapshot_annotations = {} ({}): CRI pulls download every obd layer \
                 in full instead of lazily",
                other.unwrap_or(true),
                if other.is_some() {
                    "set"
                } else {
                    "the default"
                }
            ),
            format!("set disable_snapshot_annotations = false in [{table}] and restart containerd"),
        ),
    }
}

/// Free bytes of the file system holding `p` (or its nearest existing
/// ancestor).
fn free_bytes(p: &Path) -> Option<(PathBuf, u64)> {
    let at = p.ancestors().find(|a| a.exists())?.to_path_buf();
    let (_, free) = obd_remote::cache::fs_space(&at)?;
    Some((at, free))
}

/// Below this much free space the cache (and writable layers) fail.
const MIN_FREE: u64 = 256 << 20;

fn space(r: &mut Report, name: &str, dir: &Path, want: u64, what: &str) {
    let Some((at, free)) = free_bytes(dir) else {
        r.fix(
            "cache",
            name,
            Status::Fail,
            format!("{}: no such path and no parent", dir.display()),
            format!("create it or set {what}"),
        );
        return;
    };
    let on = if at == dir {
        String::new()
    } else {
        format!(" (on {})", at.display())
    };
    let detail = format!("{}{on}: {} free", dir.display(), human(free));
    if free < MIN_FREE {
        r.fix(
            "cache",
            name,
            Status::Fail,
            format!("{detail}: the disk is full (less than {})", human(MIN_FREE)),
            format!("free space on that file system, or move it ({what})"),
        );
    } else if free < want {
        r.fix(
            "cache",
            name,
            Status::Warn,
            format!("{detail}, less than the {} it may use", human(want)),
            format!("free space, or lower the budget / move it ({what})"),
        );
    } else {
        r.add("cache", name, Status::Ok, detail);
    }
}

fn cache(r: &mut Report, n: &Node) {
    let c = &n.service.cache;
    space(
        r,
        "block cache",
        &c.dir,
        c.budget,
        &format!("`[cache] dir` / `budget` in {}", n.service_path.display()),
    );
    space(
        r,
        "snapshotter root",
        &n.config.root,
        MIN_FREE,
        "`root` in the snapshotter config",
    );
}

/// The image's registry with the snapshotter's settings: the manifest
/// (scheme, reachability, credentials), then a blob read as a device
/// worker does it.
fn registry(r: &mut Report, n: &Node, image: &str, platform: &str) {
    let reg = &n.service.registry;
    let iref = match ImageRef::parse(image) {
        Ok(x) => x,
        Err(e) => {
            r.add("registry", "image", Status::Fail, e.to_string());
            return;
        }
    };
    let host = &iref.host;
    let plain = reg
        .hosts
        .get(host.as_str())
        .or_else(|| reg.hosts.get(host.split(':').next().unwrap_or(host)))
        .is_some_and(|h| h.plain_http);
    r.add(
        "registry",
        "settings",
        Status::Ok,
        format!(
            "{host} over {} ({})",
            if plain { "plain HTTP" } else { "HTTPS" },
            n.settings_name()
        ),
    );
    match credential_source(reg).lookup(host, &iref.repo) {
        Ok(Some(c)) => r.add(
            "registry",
            "credentials",
            Status::Ok,
            format!("user {:?}", c.username),
        ),
        Ok(None) => r.add(
            "registry",
            "credentials",
            Status::Ok,
            "none found: anonymous access".into(),
        ),
        Err(e) => r.fix(
            "registry",
            "credentials",
            Status::Fail,
            e.to_string(),
            "fix the credential file or docker config".into(),
        ),
    }
    let fix_for = |e: &str| -> String {
        if e.contains("plain_http") || e.contains("--insecure") || e.contains("credentials") {
            format!("as the message says, in {}", n.service_path.display())
        } else {
            format!(
                "check that {host} serves the image; for a plain-HTTP registry {} in {}",
                plain_http_fix(host),
                n.service_path.display()
            )
        }
    };
    let dist = match Distribution::new(reg.clone()) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            r.fix(
                "registry",
                "client",
                Status::Fail,
                e.to_string(),
                "fix the service config".into(),
            );
            return;
        }
    };
    let platform = Platform::parse(platform).expect("checked by PlatformArgs");
    let resolved = match oci::resolve(&dist, &iref, &platform) {
        Ok(x) => x,
        Err(e) => {
            let e = e.to_string();
            r.fix("registry", "manifest", Status::Fail, e.clone(), fix_for(&e));
            return;
        }
    };
    r.add(
        "registry",
        "manifest",
        Status::Ok,
        format!("{image}: {} layers", resolved.manifest.layers.len()),
    );
    let obd = resolved.manifest.layers.iter().find_map(|l| {
        let d = l.annotations.get(ANN_BLOB_DIGEST)?;
        let size = l
            .annotations
            .get(ANN_BLOB_SIZE)
            .and_then(|s| s.parse().ok())
            .unwrap_or(l.size);
        Some((d.clone(), size))
    });
    let Some((digest, size)) = obd else {
        r.fix(
            "registry",
            "blob read",
            Status::Warn,
            "not an obd image: its layers are downloaded and unpacked in full".into(),
            format!("convert it: obd convert docker://{image} docker://<new ref>"),
        );
        return;
    };
    match read_blob_as_worker(reg, image, &digest, size) {
        Ok(()) => r.add(
            "registry",
            "blob read",
            Status::Ok,
            format!(
                "{} as a device worker reads it",
                &digest[..digest.len().min(19)]
            ),
        ),
        Err(e) => {
            let e = format!("{e:#}");
            r.fix(
                "registry",
                "blob read",
                Status::Fail,
                e.clone(),
                fix_for(&e),
            )
        }
    }
}
