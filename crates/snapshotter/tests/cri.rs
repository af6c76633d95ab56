//! CRI, as kubelet drives it, on the containerd that
//! `fixtures::containerd` runs (`scripts/containerd-matrix.sh env 1.7|2.1`;
//! the system's 1.6 otherwise) with `snapshotter = "obd"` and
//! `disable_snapshot_annotations = false`; pods on the host network (no
//! CNI). The runtime service is containerd's socket; the image service is
//! obd-snapshotter's CRI image proxy (`cri_image_address`), as kubelet's
//! `--image-service-endpoint` would name it.
//!
//! The registry wants a password (htpasswd) and neither containerd nor the
//! snapshotter is given one: the only credentials are each `PullImage`'s
//! `auth`, as a pod's `imagePullSecrets` give them. One image (busybox, a
//! file `/etc/obd-cri`, 48 MiB of data the container does not read) runs
//! twice in one pod each:
//!
//! - plain OCI: pulled (downloaded and unpacked), it runs;
//! - obd (converted from the same layout): it starts lazily — until its
//!   first output the registry served its manifest, its config and range
//!   reads, never a whole layer — and its output is right (the file, and
//!   `/bin/busybox`'s sha256, read through the device);
//! - then StopPodSandbox, RemovePodSandbox and RemoveImage release every
//!   device: no device directory, device worker or mount is left.
//!
//! Prints, per image, the time from `PullImage` to the first line in the
//! container's log and the bytes the registry sent for it (the CRI figure
//! of docs/BENCHMARKS.md). Needs root, docker-registry, curl, htpasswd,
//! umoci, skopeo, runc and busybox-static; otherwise skipped with a loud
//! message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fixtures::containerd::{self, Cri};
use fixtures::procs::{run, Needs};
use fixtures::registry::Registry;
use snapshotter::proto::runtime::v1 as cri_api;
use tcmu_target::mountinfo::mount_points_below;

mod common;
use common::cri::{container_config, log_file, pod_config, read_log, Kubelet};
use common::{busybox_layout, push_obd, Procs};

const MARK: &str = "obd-cri-test";
const USER: &str = "puller";
const PASS: &str = "s3cret-pod-only";
const BIG_MIB: usize = 48;
const SANDBOX: &str = "localhost/obd-test/pause:v1";

/// `<dir>/oci`: busybox, then a layer adding `/etc/obd-cri` and
/// `/opt/big` (BIG_MIB MiB of random bytes); tag `busybox`; and the tag
/// `pause` (the first one's layers, `sleep` as entrypoint).
fn build_layout(dir: &Path) -> PathBuf {
    let oci = dir.join("oci");
    let bundle = dir.join("bundle");
    let img = busybox_layout(dir);
    run(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--tag",
        "pause",
        "--config.entrypoint",
        "/bin/sleep",
        "--config.cmd",
        "1000000",
    ]));
    std::fs::remove_dir_all(&bundle).unwrap();
    run(Command::new("umoci")
        .args(["unpack", "--image", &img])
        .arg(&bundle));
    let r = bundle.join("rootfs");
    std::fs::write(r.join("etc/obd-cri"), format!("{MARK}\n")).unwrap();
    std::fs::create_dir_all(r.join("opt")).unwrap();
    run(Command::new("dd").args([
        "if=/dev/urandom".to_string(),
        format!("of={}", r.join("opt/big").display()),
        "bs=1M".to_string(),
        format!("count={BIG_MIB}"),
        "status=none".to_string(),
    ]));
    run(Command::new("umoci")
        .args(["repack", "--image", &img])
        .arg(&bundle));
    run(Command::new("umoci").args(["config", "--image", &img, "--config.cmd", "/bin/sh"]));
    oci
}

/// The blob digests of the manifest of `reference` on `reg`: (config,
/// layers).
fn manifest_digests(reg: &Registry, repo: &str, tag: &str) -> (String, Vec<String>) {
    let out = run(Command::new("curl").args([
        "-sf".to_string(),
        "-u".to_string(),
        format!("{USER}:{PASS}"),
        "-H".to_string(),
        "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json".to_string(),
        format!("http://{}/v2/{repo}/manifests/{tag}", reg.addr),
    ]));
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layers = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    (m["config"]["digest"].as_str().unwrap().to_string(), layers)
}

/// One image's run in its own pod.
struct Started {
    pod: String,
    container: String,
    /// `PullImage` to the first log line.
    first_output: Duration,
    /// Bytes the registry sent for the image's repository in that time.
    bytes: u64,
    /// Those requests: (request line, status).
    requests: Vec<(String, u16)>,
}

/// Kubelet's sequence for a pod `name` running `image` with `cmd`:
/// RunPodSandbox, PullImage (the pod's config and the pull secret),
/// CreateContainer, StartContainer; waits for the first log line.
fn start(
    k: &Kubelet,
    reg: &Registry,
    logs: &Path,
    name: &str,
    image: &str,
    cmd: &[&str],
) -> Started {
    let repo = image.split_once('/').unwrap().1.rsplit_once(':').unwrap().0;
    let pod_cfg = pod_config(name, &logs.join(name));
    std::fs::create_dir_all(logs.join(name)).unwrap();
    let dir = logs.parent().unwrap();
    let pod = k
        .run_pod_sandbox(&pod_cfg)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd::logs(dir)));
    let before = reg.responses().len();
    let t0 = Instant::now();
    let auth = cri_api::AuthConfig {
        username: USER.into(),
        password: PASS.into(),
        ..Default::default()
    };
    k.pull_image(image, Some(auth), &pod_cfg)
        .unwrap_or_else(|e| panic!("PullImage {image}: {e}\n{}", containerd::logs(dir)));
    let c = container_config(name, image, cmd);
    let container = k
        .create_container(&pod, &c, &pod_cfg)
        .unwrap_or_else(|e| panic!("CreateContainer {image}: {e}\n{}", containerd::logs(dir)));
    k.start_container(&container)
        .unwrap_or_else(|e| panic!("StartContainer {image}: {e}\n{}", containerd::logs(dir)));
    let log = log_file(&logs.join(name), name);
    fixtures::procs::wait_until(
        "the container's first output",
        Duration::from_secs(120),
        || !read_log(&log).is_empty(),
    );
    let first_output = t0.elapsed();
    let mut bytes = 0;
    let mut requests = Vec::new();
    for (req, status, b) in &reg.responses()[before..] {
        if req.contains(&format!("/v2/{repo}/")) {
            bytes += b;
            requests.push((req.clone(), *status));
        }
    }
    Started {
        pod,
        container,
        first_output,
        bytes,
        requests,
    }
}

#[test]
fn cri_pull_run_lazy_with_pod_credentials() {
    if !Needs::root(&[
        "docker-registry",
        "curl",
        "htpasswd",
        "umoci",
        "skopeo",
        "runc",
    ])
    .paths(&["/bin/busybox"])
    .met("CRI test")
    {
        return;
    }
    let install = match containerd::installed() {
        Ok(i) => i,
        Err(e) => return fixtures::procs::skip("CRI test", &e),
    };
    eprintln!("CRI test on containerd {}", install.version);
    let tmp = fixtures::procs::short_tempdir("obd-cri-");
    let dir = tmp.path().to_path_buf();
    if std::env::var_os("OBD_CRI_KEEP").is_some() {
        eprintln!("keeping {}", tmp.keep().display());
    }
    let oci = build_layout(&dir);
    let reg = Registry::start_basic_logged(&dir, USER, PASS).unwrap();
    let addr = reg.addr.clone();
    let creds = dir.join("push-creds.json");
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"))
    };
    std::fs::write(
        &creds,
        format!(r#"{{"auths": {{"{addr}": {{"auth": "{b64}"}}}}}}"#),
    )
    .unwrap();
    let plain = format!("{addr}/plain/app:v1");
    run(Command::new("skopeo").args([
        "copy".to_string(),
        "--quiet".to_string(),
        "--dest-tls-verify=false".to_string(),
        format!("--dest-creds={USER}:{PASS}"),
        format!("oci:{}:busybox", oci.display()),
        format!("docker://{plain}"),
    ]));
    let obd = format!("{addr}/obd/app:v1");
    push_obd(&dir, &oci, &obd, Some(&creds), 2);
    let pause_tar = dir.join("pause.tar");
    run(Command::new("skopeo").args([
        "copy".to_string(),
        "--quiet".to_string(),
        format!("oci:{}:pause", oci.display()),
        format!("oci-archive:{}:{SANDBOX}", pause_tar.display()),
    ]));

    // obd-snapshotter: lazy pull, the CRI image proxy, the registry as
    // plain HTTP, and no credentials of its own.
    let mut procs = Procs::new(&dir);
    let snroot = dir.join("snroot");
    let sn_sock = containerd::snapshotter_socket(&dir);
    let ctd_sock = containerd::socket(&dir);
    let proxy_sock = dir.join("cri-image.sock");
    let service = dir.join("service.toml");
    std::fs::write(
        &service,
        format!("[registry]\nuse_docker_config = false\n[registry.hosts.\"{addr}\"]\nplain_http = true\n"),
    )
    .unwrap();
    let sn_cfg = dir.join("obd-snapshotter.toml");
    std::fs::write(
        &sn_cfg,
        format!(
            "root = \"{}\"\naddress = \"{}\"\nlazy_pull = true\nservice_config = \"{}\"\n\
             cri_image_address = \"{}\"\ncri_runtime_address = \"{}\"\n",
            snroot.display(),
            sn_sock.display(),
            service.display(),
            proxy_sock.display(),
            ctd_sock.display()
        ),
    )
    .unwrap();
    let mut sn = Command::new(env!("CARGO_BIN_EXE_obd-snapshotter"));
    sn.arg("--config")
        .arg(&sn_cfg)
        .env("RUST_LOG", "info,snapshotter=debug");
    containerd::spawn_snapshotter(&mut procs.procs, sn, &dir, &sn_sock);

    // containerd with CRI; the registry is plain HTTP to it too.
    let hosts = dir.join("certs.d");
    containerd::plain_http_host(&hosts, &addr);
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        install.cri_config(
            &dir,
            &sn_sock,
            &Cri {
                sandbox_image: SANDBOX,
                hosts_dir: &hosts,
            },
        ),
    )
    .unwrap();
    let sock = containerd::start(&mut procs.procs, &dir, &cfg);
    run(containerd::ctr(&sock)
        .args(["-n", "k8s.io", "images", "import", "--snapshotter", "obd"])
        .arg(&pause_tar));

    let k = Kubelet::new(&sock, &proxy_sock);
    k.wait_ready(Duration::from_secs(30));
    let v = k.version().unwrap();
    eprintln!(
        "CRI: {} {} (API {})",
        v.runtime_name, v.runtime_version, v.runtime_api_version
    );
    let fs = k.image_fs_info().expect("ImageFsInfo");
    assert!(!fs.image_filesystems.is_empty(), "{fs:?}");

    let logs = dir.join("logs");
    let cmd = ["/bin/sh", "-c", "cat /etc/obd-cri; sha256sum /bin/busybox"];
    let busybox_sha = run(Command::new("sha256sum").arg("/bin/busybox"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let want = vec![
        ("stdout".to_string(), MARK.to_string()),
        ("stdout".to_string(), format!("{busybox_sha}  /bin/busybox")),
    ];
    let mut figure = Vec::new();
    let mut started = Vec::new();
    for (name, image) in [("plain", &plain), ("obd", &obd)] {
        let s = start(&k, &reg, &logs, name, image, &cmd);
        let st = k.wait_exited(&s.container, Duration::from_secs(120));
        assert_eq!(
            st.exit_code,
            0,
            "{name}: {st:?}\n{}",
            containerd::logs(&dir)
        );
        assert_eq!(read_log(&log_file(&logs.join(name), name)), want, "{name}");
        figure.push((name, s.first_output, s.bytes));
        started.push((image.clone(), s));
    }

    // The obd image started lazily: manifest, config and range reads only.
    let (_, obd_s) = &started[1];
    let (config, layers) = manifest_digests(&reg, "obd/app", "v1");
    let gets: Vec<&(String, u16)> = obd_s
        .requests
        .iter()
        .filter(|(r, _)| r.starts_with("GET "))
        .collect();
    assert!(
        gets.iter()
            .any(|(r, s)| r.contains("/manifests/") && *s == 200),
        "no manifest GET: {gets:?}"
    );
    assert!(
        gets.iter().any(|(r, s)| r.contains(&config) && *s == 200),
        "no config GET: {gets:?}"
    );
    let range_reads = gets
        .iter()
        .filter(|(r, s)| *s == 206 && layers.iter().any(|l| r.contains(l.as_str())))
        .count();
    assert!(range_reads > 0, "no range read of a layer: {gets:?}");
    for (r, s) in &gets {
        if layers.iter().any(|l| r.contains(l.as_str())) {
            // 206: a range; 401: an auth probe or challenge (`Range:
            // bytes=0-0` without credentials), which carries no layer byte.
            assert!(
                *s == 206 || *s == 401,
                "a whole layer was fetched: {r} ({s}); all: {gets:#?}"
            );
        }
    }
    // Only the pod's pull secret could have authorised those reads, and it
    // is what the proxy recorded.
    let kc = std::fs::read_to_string(snroot.join("cri-credentials.json")).unwrap();
    assert!(kc.contains(&format!("\"{addr}/obd/app\"")), "{kc}");
    let plain_bytes = figure[0].2;
    assert!(
        obd_s.bytes < plain_bytes / 4,
        "obd fetched {} bytes, plain {plain_bytes}",
        obd_s.bytes
    );
    assert!(
        !fixtures::procs::device_workers(&snroot).is_empty(),
        "the obd container ran without a device worker"
    );

    // Kubelet's teardown: stop and remove the pods, then the images.
    for (image, s) in &started {
        k.stop_pod_sandbox(&s.pod).expect("StopPodSandbox");
        k.remove_pod_sandbox(&s.pod).expect("RemovePodSandbox");
        k.remove_image(image).expect("RemoveImage");
        assert_eq!(k.image_status(image).expect("ImageStatus"), None);
    }
    let devices = obd_device::state::Root::new(&snroot);
    let released = fixtures::procs::poll(Duration::from_secs(60), || {
        devices.ids().is_ok_and(|v| v.is_empty())
            && fixtures::procs::device_workers(&snroot).is_empty()
            && mount_points_below(&snroot).is_empty()
    });
    assert!(
        released,
        "devices left after RemoveImage: ids {:?}, workers {:?}, mounts {:?}\n{}",
        devices.ids(),
        fixtures::procs::device_workers(&snroot),
        mount_points_below(&snroot),
        containerd::logs(&dir)
    );

    for (name, t, bytes) in &figure {
        eprintln!(
            "FIGURE containerd {} CRI {name}: PullImage to first output {:.0} ms, {bytes} bytes from the registry",
            install.version,
            t.as_secs_f64() * 1000.0
        );
    }
    drop(procs);
}
