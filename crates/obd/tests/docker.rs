//! Docker Engine with the containerd image store on obd (issue 17, point 4):
//! a private dockerd (Debian's `docker.io`, unpacked into
//! `$OBD_DOCKER_PREFIX` by `scripts/docker-test.sh`) with its own data root,
//! exec root, pidfile and socket, on the test bed's private containerd, with
//! `features.containerd-snapshotter` and `storage-driver = "obd"`:
//!
//! - `docker run` of an obd image pulls lazily: dockerd's pull passes the
//!   CRI image labels (`containerd.io/snapshot/cri.image-ref`, …), so each
//!   layer is committed remotely; the registry serves range reads and never
//!   a whole layer, and no fallback is counted;
//! - `docker build` (BuildKit inside dockerd) of a Dockerfile `FROM` that
//!   image, with `RUN` steps that read, write, change and delete files, is
//!   correct. BuildKit fetches the base's blobs whole and passes no image
//!   labels to the snapshotter: when docker has not pulled the base, each
//!   base layer is unpacked and is a counted fallback; when it has (lazily),
//!   the lazy snapshots are used and nothing falls back;
//! - the result, pushed, runs with `ctr` on containerd with obd alone (its
//!   base layers committed remotely or counted fallbacks, depending on
//!   whether BuildKit kept their annotations and the pull passes the image
//!   reference);
//! - it converts with `obd convert` (the base obd layers are kept, the `RUN`
//!   layers converted on top) and runs lazily: the new layers are committed
//!   remotely and read by ranges only.
//!
//! Run by `scripts/docker-test.sh [1.6|1.7|2.1]` (Docker 26.1 from Debian
//! trixie, or 28.5 from sid with `OBD_DOCKER_SUITE=sid`).
//! Needs root, FUSE, containerd, runc, docker-registry, curl, the
//! obd-snapshotter binary and `$OBD_DOCKER_PREFIX`; otherwise skipped
//! loudly.

#[allow(dead_code)]
#[path = "../src/testbed.rs"]
mod testbed;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fixtures::procs::{run, terminate, wait_until};
use testbed::{blob_gets, build_sample, run_ok, BlobGet, Options, Testbed, EXPECTED, WRITTEN};

mod common;
use common::testbed_bins;

/// A private dockerd on the test bed's containerd; stopped (its containers
/// removed, its mounts undone) on drop.
struct Dockerd {
    child: Child,
    /// Whether `/run/docker` (where dockerd makes `plugins/` whatever its
    /// exec root) was made by this dockerd, to be removed if left empty.
    made_run_docker: bool,
    /// `<testbed>/docker`: data root, exec root, socket, CLI config.
    dir: PathBuf,
    prefix: PathBuf,
}

impl Dockerd {
    /// Writes `daemon.json` and starts dockerd from `prefix` on the
    /// containerd socket `containerd`; waits until `docker version` answers.
    fn start(prefix: &Path, dir: &Path, containerd: &Path) -> Dockerd {
        let d = dir.join("docker");
        let plugins = d.join("cli/cli-plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        // The CLI finds buildx (`docker build` through BuildKit) in its
        // config directory.
        std::os::unix::fs::symlink(
            prefix.join("usr/libexec/docker/cli-plugins/docker-buildx"),
            plugins.join("docker-buildx"),
        )
        .unwrap();
        let cfg = serde_json::json!({
            "data-root": d.join("data"),
            "exec-root": d.join("exec"),
            "pidfile": d.join("dockerd.pid"),
            "hosts": [format!("unix://{}", d.join("docker.sock").display())],
            "containerd": containerd,
            "containerd-namespace": "obd-docker",
            "containerd-plugins-namespace": "obd-docker-plugins",
            "features": {"containerd-snapshotter": true},
            "storage-driver": "obd",
            // Leave the host's firewall and bridges alone: containers use
            // the host's network.
            "iptables": false,
            "ip6tables": false,
            "bridge": "none",
            "debug": true
        });
        let json = d.join("daemon.json");
        std::fs::write(&json, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let path = format!(
            "{}:{}:{}",
            prefix.join("usr/sbin").display(),
            prefix.join("usr/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let made_run_docker = !Path::new(RUN_DOCKER).exists();
        let child =
            fixtures::procs::logged(prefix.join("usr/sbin/dockerd"), &d.join("dockerd.log"))
                .arg("--config-file")
                .arg(&json)
                .env("PATH", path)
                .stdin(Stdio::null())
                .spawn()
                .expect("start dockerd");
        let mut dockerd = Dockerd {
            child,
            made_run_docker,
            dir: d,
            prefix: prefix.to_path_buf(),
        };
        wait_until("dockerd", Duration::from_secs(60), || {
            if let Ok(Some(st)) = dockerd.child.try_wait() {
                panic!("dockerd exited ({st}):\n{}", dockerd.log_tail());
            }
            dockerd
                .cli()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        dockerd
    }

    /// The `docker` CLI of the prefix, talking to this dockerd.
    fn cli(&self) -> Command {
        let mut c = Command::new("timeout");
        c.arg("300")
            .arg(self.prefix.join("usr/bin/docker"))
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.dir.join("docker.sock").display()),
            )
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_BUILDKIT", "1");
        c
    }

    /// `docker <args>`; panics (with dockerd's log) unless it succeeds;
    /// returns stdout.
    fn docker(&self, args: &[&str]) -> String {
        run_ok(self.cli().args(args))
            .unwrap_or_else(|e| panic!("{e:#}\n--- dockerd.log (tail)\n{}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(out) = self.cli().args(["ps", "-aq"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self
                    .cli()
                    .args(["rm", "-f", id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        terminate(&mut self.child, Duration::from_secs(20));
        // dockerd leaves its default network namespace mounted in its exec
        // root.
        obd_device::mount::unmount_below(&self.dir);
        if self.made_run_docker {
            let _ = std::fs::remove_dir(Path::new(RUN_DOCKER).join("plugins"));
            let _ = std::fs::remove_dir(RUN_DOCKER);
        }
    }
}

/// The one directory outside its roots that dockerd creates.
const RUN_DOCKER: &str = "/run/docker";

/// Where Debian's docker.io, docker-cli and docker-buildx are unpacked.
fn docker_prefix(test: &str) -> Option<PathBuf> {
    let why = match std::env::var_os("OBD_DOCKER_PREFIX") {
        None => "OBD_DOCKER_PREFIX is not set (scripts/docker-test.sh fetches Docker Engine and sets it)".to_string(),
        Some(p) => {
            let p = PathBuf::from(p);
            let missing = [
                "usr/sbin/dockerd",
                "usr/bin/docker",
                "usr/libexec/docker/cli-plugins/docker-buildx",
            ]
            .into_iter()
            .find(|f| !p.join(f).is_file());
            match missing {
                None => return Some(p),
                Some(f) => format!("{} has no {f}", p.display()),
            }
        }
    };
    fixtures::procs::skip(test, &why);
    None
}

/// The image manifest of `image` (`<host>/<repo>:<tag>`) for linux/amd64,
/// read from the registry (through its index, if any).
fn manifest(image: &str) -> serde_json::Value {
    let (host, rest) = image.split_once('/').unwrap();
    let (repo, tag) = rest.rsplit_once(':').unwrap();
    let get = |r: &str| -> serde_json::Value {
        let body = run(Command::new("curl").args([
            "-sf",
            "-H",
            "Accept: application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json",
            &format!("http://{host}/v2/{repo}/manifests/{r}"),
        ]));
        serde_json::from_str(&body).unwrap()
    };
    let m = get(tag);
    match m["manifests"].as_array() {
        None => m,
        Some(list) => {
            let d = list
                .iter()
                .find(|d| d["platform"]["architecture"] == "amd64")
                .unwrap_or_else(|| panic!("{image}: no amd64 manifest in {m}"));
            get(d["digest"].as_str().unwrap())
        }
    }
}

/// The layer digests of `image`'s manifest.
fn layer_digests(image: &str) -> BTreeSet<String> {
    let m = manifest(image);
    m["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("{image}: no layers in {m}"))
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Lines of the snapshotter's log from byte `from` on that contain `what`.
fn log_count(dir: &Path, from: usize, what: &str) -> usize {
    let t = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap_or_default();
    t.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

fn len(p: &Path) -> usize {
    std::fs::metadata(p).map_or(0, |m| m.len() as usize)
}

/// The snapshotter's log line for each layer committed without download.
const REMOTE: &str = "remote snapshot committed without download";

/// The snapshotter's count of obd layers served from a full download
/// (`obd_snapshotter_fallbacks_total{reason="downloaded"}`), read from its
/// metrics endpoint at `addr`.
fn fallbacks(addr: &str) -> u64 {
    let text = run(Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]));
    text.lines()
        .find_map(|l| l.strip_prefix(r#"obd_snapshotter_fallbacks_total{reason="downloaded"} "#))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Reads of `layers` among `gets`: (whole-blob GETs, range GETs, bytes).
fn reads_of(gets: &[BlobGet], layers: &BTreeSet<String>) -> (usize, usize, u64) {
    let of: Vec<&BlobGet> = gets.iter().filter(|g| layers.contains(&g.digest)).collect();
    (
        of.iter().filter(|g| g.status == 200).count(),
        of.iter().filter(|g| g.status == 206).count(),
        of.iter().map(|g| g.bytes).sum(),
    )
}

const DOCKERFILE_RUN: &str = r#"RUN cat /app/message > /root/built && echo "step 1" >> /root/built
RUN head -c 4096 /app/data/blob-0 | wc -c > /root/data-head && busybox rm /app/data/blob-1 && echo changed > /app/message
CMD ["/bin/sh", "-c", "cat /root/built /root/data-head /app/message; ls /app/data"]
"#;

/// What the built image prints: the base's message copied by step 1, the
/// bytes read from the base's data, the changed message and the data
/// directory without the deleted file.
fn built_output() -> String {
    format!("{EXPECTED}\nstep 1\n4096\nchanged\nblob-0\n")
}

/// `docker build` of [`DOCKERFILE_RUN`] `FROM` `base` in the context
/// directory `<testbed>/<ctx>`, tagged `tag`. Returns the whole-blob GETs
/// of the base's layers it caused and the fallbacks the snapshotter counted
/// meanwhile (its metrics endpoint at `metrics`).
fn measure_build(
    tb: &Testbed,
    docker: &Dockerd,
    metrics: &str,
    ctx: &str,
    base: &str,
    tag: &str,
) -> (usize, u64) {
    let layers = layer_digests(base);
    let (at, fb) = (len(&tb.access_log), fallbacks(metrics));
    let ctx = tb.dir.join(ctx);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\n{DOCKERFILE_RUN}"),
    )
    .unwrap();
    docker.docker(&[
        "build",
        "--progress",
        "plain",
        "--network",
        "host",
        "-t",
        tag,
        ctx.to_str().unwrap(),
    ]);
    let (whole, ranges, bytes) = reads_of(&blob_gets(&tb.access_log, at), &layers);
    let counted = fallbacks(metrics) - fb;
    eprintln!(
        "docker build FROM {base}: {whole} whole-layer GETs, {ranges} range reads ({bytes} bytes) of its layers; {counted} fallbacks counted"
    );
    (whole, counted)
}

#[test]
fn docker_runs_obd_images_and_buildkit_builds_on_them() {
    const TEST: &str = "docker test";
    let Some((obd, snapshotter)) = testbed_bins(
        TEST,
        &["containerd", "ctr", "runc", "docker-registry", "curl"],
    ) else {
        return;
    };
    let Some(prefix) = docker_prefix(TEST) else {
        return;
    };
    let mut opts = Options::new(obd, snapshotter);
    opts.prefix = "obd-docker-".into();
    let metrics = format!("127.0.0.1:{}", fixtures::procs::free_port());
    opts.extra_toml = format!("metrics_address = \"{metrics}\"\n");
    let mut tb = Testbed::new(opts).unwrap();
    let dir = tb.dir.clone();
    tb.start_registry().unwrap();
    let reg = tb.reg.clone();
    // A 16 MiB app layer the container never reads.
    let layout = dir.join("oci");
    build_sample(&layout, 2, 16 << 20).unwrap();
    let image = format!("{reg}/obd-docker/app:obd");
    tb.convert_push(&layout, "demo", &image).unwrap();
    let obd_bytes = testbed::dir_bytes(&dir.join("registry-data"));
    let base_layers = layer_digests(&image);
    tb.start_runtime().unwrap();
    let docker = Dockerd::start(&prefix, &dir, &tb.sock);
    let info = docker.docker(&["info", "--format", "{{.Driver}} {{.DriverStatus}}"]);
    eprintln!("docker info: {info}");
    assert!(info.starts_with("obd "), "{info}");
    let access = tb.access_log.clone();
    let snlog = dir.join("snapshotter.log");

    // --- docker run: a lazy pull.
    let (at, sn_at, fb) = (len(&access), len(&snlog), fallbacks(&metrics));
    let out = docker.docker(&["run", "--rm", "--network", "host", &image]);
    assert_eq!(out, format!("{EXPECTED}\n{WRITTEN}\n"));
    let gets = blob_gets(&access, at);
    let (whole, ranges, bytes) = reads_of(&gets, &base_layers);
    eprintln!(
        "docker run {image}: {ranges} range reads, {whole} whole-layer GETs, {bytes} of {obd_bytes} bytes; {gets:?}"
    );
    assert_eq!(whole, 0, "docker run fetched a whole layer: {gets:?}");
    assert!(ranges > 0, "the container read nothing remotely? {gets:?}");
    assert!(
        bytes * 3 < obd_bytes,
        "{bytes} of {obd_bytes} bytes fetched"
    );
    assert_eq!(log_count(&dir, sn_at, REMOTE), base_layers.len());
    assert_eq!(fallbacks(&metrics), fb, "no fallback");

    // --- docker build (BuildKit) FROM the obd image docker has pulled:
    // BuildKit fetches the base's blobs whole into the content store, but
    // its RUN steps use the lazily committed snapshots: nothing falls back.
    let built_on_pulled = format!("{reg}/obd-docker/built:on-pulled");
    let (whole, counted) = measure_build(&tb, &docker, &metrics, "ctx1", &image, &built_on_pulled);
    assert_eq!((whole, counted), (base_layers.len(), 0));
    let out = docker.docker(&["run", "--rm", "--network", "host", &built_on_pulled]);
    assert_eq!(out, built_output());

    // --- docker build FROM an obd image docker has not pulled (the same
    // layout converted with lz4, not the default zstd: other blobs):
    // BuildKit downloads and unpacks the base layers itself; each is a
    // counted fallback.
    let base = format!("{reg}/obd-docker/app:lz4");
    run_ok(
        tb.obd()
            .args([
                "convert",
                "--algorithm",
                "lz4",
                "--block-size",
                "4K",
                "--plain-http",
                &reg,
            ])
            .arg(format!("oci:{}:demo", layout.display()))
            .arg(format!("docker://{base}")),
    )
    .unwrap();
    let base_layers = layer_digests(&base);
    let built = format!("{reg}/obd-docker/built:v1");
    let (whole, counted) = measure_build(&tb, &docker, &metrics, "ctx2", &base, &built);
    // (Should BuildKit ever pass the image labels, all are 0.)
    assert_eq!(
        (whole, counted),
        (base_layers.len(), base_layers.len() as u64)
    );
    let out = docker.docker(&["run", "--rm", "--network", "host", &built]);
    assert_eq!(out, built_output());

    // --- push. As pushed, the image runs on containerd with obd alone
    // (another namespace, no snapshots yet). BuildKit 0.13 drops the base
    // layers' overlaybd annotations: they are unpacked and served from the
    // copies, each a counted fallback. BuildKit 0.29 keeps them: where the
    // pull passes the image reference (containerd 2.x's transfer service)
    // they are committed remotely, elsewhere they fall back.
    docker.docker(&["push", "-q", &built]);
    let pushed = manifest(&built);
    let annotated = pushed["layers"][0]["annotations"]
        .get("containerd.io/snapshot/overlaybd/blob-digest")
        .is_some();
    eprintln!("pushed {built} (base annotated: {annotated}): {pushed}");
    let (fb, sn_at) = (fallbacks(&metrics), len(&snlog));
    let ns = ["-n", "obd-docker-ctr"];
    run_ok(tb.ctr().args(ns).args([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "obd",
        &built,
    ]))
    .unwrap();
    let out = run_ok(tb.ctr().args(ns).args([
        "run",
        "--rm",
        "--snapshotter",
        "obd",
        &built,
        &tb.cid("built"),
    ]))
    .unwrap();
    assert_eq!(out, built_output());
    let (remote, counted) = (log_count(&dir, sn_at, REMOTE), fallbacks(&metrics) - fb);
    eprintln!("ctr pull + run {built}: {remote} base layers committed remotely, {counted} fallbacks counted");
    assert_eq!(remote + counted as usize, base_layers.len());
    if !annotated {
        assert_eq!(remote, 0);
    }
    let _ = std::fs::remove_dir("/run/containerd/runc/obd-docker-ctr");

    // --- convert with obd convert, run the result lazily.
    let converted = format!("{reg}/obd-docker/built:obd");
    run_ok(
        tb.obd()
            .args(["convert", "--plain-http", &reg])
            .arg(format!("docker://{built}"))
            .arg(format!("docker://{converted}")),
    )
    .unwrap();
    let layers = layer_digests(&converted);
    assert_eq!(layers.len(), 4, "{layers:?}");
    assert!(
        base_layers.is_subset(&layers),
        "the base's obd layers are kept: {base_layers:?} {layers:?}"
    );
    let new: BTreeSet<String> = layers.difference(&base_layers).cloned().collect();
    let (at, sn_at, fb) = (len(&access), len(&snlog), fallbacks(&metrics));
    let out = docker.docker(&["run", "--rm", "--network", "host", &converted]);
    assert_eq!(out, built_output());
    let gets = blob_gets(&access, at);
    let (whole, ranges, bytes) = reads_of(&gets, &layers);
    eprintln!(
        "docker run {converted}: {ranges} range reads, {whole} whole-layer GETs ({bytes} bytes); {gets:?}"
    );
    assert_eq!(whole, 0, "a whole layer was fetched: {gets:?}");
    assert!(
        reads_of(&gets, &new).1 > 0,
        "the converted RUN layers were not read remotely: {gets:?}"
    );
    assert_eq!(fallbacks(&metrics), fb, "no fallback");
    assert_eq!(log_count(&dir, sn_at, REMOTE), new.len());
    drop(docker);
}
