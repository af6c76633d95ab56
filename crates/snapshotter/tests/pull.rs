//! `obd pull` (snapshotter::pull) against a private containerd (Debian's
//! 1.6) with `obd-snapshotter` (lazy_pull = true) as the proxy plugin `obd`
//! and a private `docker-registry` whose access log is kept:
//!
//! - an obd image (a two-layer busybox image built offline with umoci,
//!   converted by the converter library, pushed to the registry) is pulled
//!   with every layer committed remotely: the image record exists, every
//!   chainID is a committed snapshot, the pull fetched the manifest and
//!   config but no layer blob, no lease is left; the snapshotter then opens
//!   each layer ahead of its device (`open_layers_at_commit`) with ranged
//!   reads only; a second pull is a no-op;
//! - the plain OCI image is pulled with every layer downloaded and applied
//!   by containerd's diff service, and `ctr run --snapshotter obd` of it
//!   prints the file of its top layer.
//!
//! Needs root and containerd, ctr, runc, docker-registry, curl, umoci,
//! skopeo and busybox-static; otherwise skipped with a loud message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fixtures::containerd::{self, ctr};
use fixtures::procs::{run, Needs};
use fixtures::registry::Registry;
use obd_remote::distribution::ImageRef;
use snapshotter::pull::{pull_blocking, LayerState, PullError, PullOptions, PullReport};

mod common;
use common::{busybox_layout, push_obd, Procs};

const MARK: &str = "obd-pull-test-layer-2";

/// A two-layer busybox OCI layout (`<dir>/oci:busybox`): busybox, then a
/// layer adding `/etc/obd-pull`.
fn build_busybox_layout(dir: &Path) -> PathBuf {
    let oci = dir.join("oci");
    let bundle = dir.join("bundle");
    let img = busybox_layout(dir);
    std::fs::remove_dir_all(&bundle).unwrap();
    run(Command::new("umoci")
        .args(["unpack", "--image", &img])
        .arg(&bundle));
    std::fs::write(bundle.join("rootfs/etc/obd-pull"), format!("{MARK}\n")).unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &img])
        .arg(&bundle));
    run(Command::new("umoci").args(["config", "--image", &img, "--config.cmd", "/bin/sh"]));
    oci
}

/// obd-snapshotter (lazy_pull = true) and a containerd using it as `obd`;
/// the snapshotter's `service_config` is `<dir>/service.toml` if there is one.
fn start_containerd(dir: &Path, procs: &mut Procs) -> PathBuf {
    let sn_sock = containerd::snapshotter_socket(dir);
    let sn_cfg = dir.join("obd-snapshotter.toml");
    let mut cfg = format!(
        // device_idle_secs = 0: the image's device goes with its last
        // container, which the full-disk test waits for.
        "root = \"{}\"\naddress = \"{}\"\nlazy_pull = true\ndevice_idle_secs = 0\n",
        dir.join("snroot").display(),
        sn_sock.display()
    );
    let service = dir.join("service.toml");
    if service.is_file() {
        cfg.push_str(&format!("service_config = \"{}\"\n", service.display()));
    }
    std::fs::write(&sn_cfg, cfg).unwrap();
    let mut sn = Command::new(env!("CARGO_BIN_EXE_obd-snapshotter"));
    sn.arg("--config")
        .arg(&sn_cfg)
        .env("RUST_LOG", "info,snapshotter=debug");
    containerd::spawn_snapshotter(&mut procs.procs, sn, dir, &sn_sock);
    containerd::start_with(&mut procs.procs, dir, &sn_sock)
}

fn pull(sock: &Path, reference: &str) -> PullReport {
    let mut o = PullOptions::new(reference);
    o.address = sock.to_path_buf();
    o.plain_http = true;
    o.registry.use_docker_config = false;
    let mut seen = Vec::new();
    let rep = pull_blocking(&o, |l| seen.push(l.index)).unwrap_or_else(|e| {
        panic!(
            "pull {reference}: {e}\n{}",
            containerd::logs(sock.parent().unwrap_or(Path::new("/")))
        )
    });
    assert_eq!(seen, (0..rep.layers.len()).collect::<Vec<_>>());
    eprintln!(
        "pulled {reference}: {}",
        serde_json::to_string(&rep).unwrap()
    );
    rep
}

/// Every layer's chainID is a committed snapshot of `obd`.
fn assert_committed(sock: &Path, r: &PullReport) {
    let snaps = run(ctr(sock).args(["-n", "default", "snapshots", "--snapshotter", "obd", "ls"]));
    for l in &r.layers {
        assert!(
            snaps
                .lines()
                .any(|s| s.starts_with(&l.chain_id) && s.contains("Committed")),
            "chainID {} is not committed:\n{snaps}",
            l.chain_id
        );
    }
}

/// The `ctr content ls` line of `digest` holds `label`.
fn assert_content_labelled(content: &str, digest: &str, label: &str) {
    let line = content
        .lines()
        .find(|l| l.starts_with(digest))
        .unwrap_or_else(|| panic!("no {digest} in the content store:\n{content}"));
    assert!(line.contains(label), "{line}");
}

fn states(r: &PullReport) -> Vec<LayerState> {
    r.layers.iter().map(|l| l.state).collect()
}

#[test]
fn obd_pull_remote_and_plain() {
    if !Needs::root(&[
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "curl",
        "umoci",
        "skopeo",
    ])
    .paths(&["/bin/busybox"])
    .met("obd pull test")
    {
        return;
    }
    let tmp = fixtures::procs::short_tempdir("obd-pull-");
    let dir = tmp.path().to_path_buf();
    let oci = build_busybox_layout(&dir);
    let reg = Registry::start_logged(&dir).unwrap();
    let addr = reg.addr.clone();

    // The plain image, pushed as is.
    let plain = format!("{addr}/plain/busybox:v1");
    run(Command::new("skopeo").args([
        "copy".to_string(),
        "--quiet".to_string(),
        "--dest-tls-verify=false".to_string(),
        format!("oci:{}:busybox", oci.display()),
        format!("docker://{plain}"),
    ]));
    // The obd image, converted from the same layout.
    let obd = format!("{addr}/obd/busybox:v1");
    let client = push_obd(&dir, &oci, &obd, None, 2);

    // The snapshotter's registry access (its layer opens ahead).
    std::fs::write(
        dir.join("service.toml"),
        format!("[registry.hosts.\"{addr}\"]\nplain_http = true\n"),
    )
    .unwrap();
    let mut procs = Procs::new(&dir);
    let sock = start_containerd(&dir, &mut procs);
    let ctr = |args: &[&str]| run(ctr(&sock).args(["-n", "default"]).args(args));
    // `ctr <sub> --snapshotter obd <args…>`
    let with_obd = |sub: &str, args: &[&str]| ctr(&[&[sub, "--snapshotter", "obd"], args].concat());

    // --- plain image: Prepare succeeds, diff Apply, Commit; it runs.
    let r3 = pull(&sock, &plain);
    assert_eq!(states(&r3), vec![LayerState::Downloaded; 2], "{r3:?}");
    assert_eq!(r3.downloaded_layers, 2);
    assert!(r3.layers.iter().all(|l| l.fetched_bytes == l.size));
    assert_committed(&sock, &r3);
    let out = with_obd(
        "run",
        &["--rm", &plain, "obd-pull-1", "/bin/cat", "/etc/obd-pull"],
    );
    assert_eq!(out.trim(), MARK);
    let r4 = pull(&sock, &plain);
    assert_eq!(states(&r4), vec![LayerState::Present; 2], "{r4:?}");
    let leases = ctr(&["leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "a lease was left:\n{leases}");

    // --- the top layer's blob served corrupted, pulled into a fresh
    // namespace (every blob is fetched, both at once): the pull fails naming
    // that blob and leaves no lease.
    let top = &r3.layers[1].digest;
    let hex = top.strip_prefix("sha256:").unwrap();
    let data = dir
        .join("registry-data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let good = std::fs::read(&data).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&data, &bad).unwrap();
    let mut o = PullOptions::new(&plain);
    o.address = sock.clone();
    o.plain_http = true;
    o.registry.use_docker_config = false;
    o.namespace = "corrupt".into();
    let e = pull_blocking(&o, |_| {}).unwrap_err();
    std::fs::write(&data, &good).unwrap();
    assert!(e.to_string().contains(top.as_str()), "{e}");
    let leases = run(containerd::ctr(&sock).args(["-n", "corrupt", "leases", "ls"]));
    assert_eq!(leases.lines().count(), 1, "a lease was left:\n{leases}");

    // --- an index over the plain manifest: the platform's manifest is
    // picked, the index becomes the image's target and references it.
    let pm = client
        .get_manifest(&ImageRef::parse(&plain).unwrap(), "v1")
        .unwrap();
    let entry = |arch: &str| {
        serde_json::json!({"mediaType": pm.media_type, "digest": pm.digest,
            "size": pm.bytes.len(), "platform": {"os": "linux", "architecture": arch}})
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("arm64"), entry("amd64")],
    }))
    .unwrap();
    let multi = format!("{addr}/plain/busybox:multi");
    let pushed = client
        .put_manifest(
            &ImageRef::parse(&multi).unwrap(),
            "multi",
            "application/vnd.oci.image.index.v1+json",
            &index,
        )
        .unwrap();
    let r5 = pull(&sock, &multi);
    assert_eq!(r5.digest, pushed.digest);
    assert_eq!(r5.media_type, "application/vnd.oci.image.index.v1+json");
    assert_eq!(r5.manifest, pm.digest);
    assert_eq!(states(&r5), vec![LayerState::Present; 2], "{r5:?}");
    let gc_ref = format!("containerd.io/gc.ref.content.m.0={}", pm.digest);
    assert_content_labelled(&ctr(&["content", "ls"]), &pushed.digest, &gc_ref);
    let imgs = ctr(&["images", "ls"]);
    assert!(
        imgs.lines()
            .any(|l| l.starts_with(&format!("{multi} ")) && l.contains(&pushed.digest)),
        "{imgs}"
    );
    let mut o = PullOptions::new(&multi);
    o.address = sock.clone();
    o.plain_http = true;
    o.platform = "linux/s390x".into();
    let e = pull_blocking(&o, |_| {}).unwrap_err();
    assert!(
        matches!(e, PullError::Platform { .. }) && e.to_string().contains("linux/arm64"),
        "{e}"
    );

    // --- obd image: every layer a remote snapshot, no layer blob fetched.
    let m = client
        .get_manifest(&ImageRef::parse(&obd).unwrap(), "v1")
        .unwrap();
    let man: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    let layer_digests: Vec<String> = man["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let before = reg.responses_settled().len();
    let r1 = pull(&sock, &obd);
    assert_eq!(r1.name, obd);
    assert_eq!(r1.digest, m.digest);
    assert!(r1.created);
    assert_eq!(states(&r1), vec![LayerState::Remote; 2], "{r1:?}");
    assert_eq!(r1.downloaded_layers, 0);
    let cfg_size = man["config"]["size"].as_u64().unwrap();
    assert_eq!(
        r1.registry_bytes,
        m.bytes.len() as u64 + cfg_size,
        "only the manifest and config come from the registry"
    );
    // The snapshotter opens each layer once, queued from the manifest it
    // read at the first remote Prepare: ranged reads of its ends, index and
    // piece table (all of a layer smaller than those), never a plain GET of
    // the blob.
    let log = dir.join("snapshotter.log");
    fixtures::procs::wait_until("the layers opened ahead", Duration::from_secs(60), || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        t.matches("layer opened ahead of its device").count() >= layer_digests.len()
    });
    let t = std::fs::read_to_string(&log).unwrap();
    assert!(
        t.lines().any(
            |l| l.contains("layers queued for opening from the image's manifest")
                && l.contains(&format!("layers={}", layer_digests.len()))
        ),
        "{t}"
    );
    for d in &layer_digests {
        let opens = t
            .lines()
            .filter(|l| l.contains("layer opened ahead of its device") && l.contains(d.as_str()))
            .count();
        assert_eq!(opens, 1, "layer {d} opened {opens} times: {t}");
    }
    let resps = reg.responses_settled()[before..].to_vec();
    let settled = before + resps.len();
    assert!(
        resps
            .iter()
            .any(|(l, _, _)| l.starts_with("GET /v2/obd/busybox/manifests/v1 ")),
        "the access log works: {resps:?}"
    );
    for (d, l) in layer_digests.iter().zip(man["layers"].as_array().unwrap()) {
        let size = l["size"].as_u64().unwrap();
        let got: Vec<_> = resps
            .iter()
            .filter(|(r, _, _)| r.contains(d.as_str()))
            .collect();
        assert!(!got.is_empty(), "layer {d} was not opened ahead: {resps:?}");
        for (r, status, bytes) in got {
            assert!(
                *status == 206 && *bytes <= size,
                "layer {d} ({size} bytes) was not read by range: {r} {status} {bytes}"
            );
        }
    }
    let imgs = ctr(&["images", "ls"]);
    assert!(
        imgs.lines().any(|l| l.starts_with(&format!("{obd} "))),
        "{imgs}"
    );
    assert_committed(&sock, &r1);
    // The layers' piece-table annotations came through containerd as
    // snapshot labels into the top layer's config.v1.json.
    let want: Vec<_> = man["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let a: std::collections::BTreeMap<String, String> =
                serde_json::from_value(l["annotations"].clone()).unwrap();
            obd_remote::oci::verity_annotations(&a)
                .unwrap()
                .expect("a piece table")
        })
        .collect();
    let top = snapshot_configs(&dir)
        .into_iter()
        .find(|c| c.lowers.len() == 2)
        .expect("the top obd layer's config.v1.json");
    let got: Vec<_> = top
        .lowers
        .iter()
        .map(|l| l.verity.clone().unwrap())
        .collect();
    assert_eq!(got, want);
    let info = with_obd("snapshots", &["info", &r1.layers[1].chain_id]);
    assert!(info.contains(&r1.layers[0].chain_id), "parent: {info}");
    assert!(info.contains("containerd.io/snapshot/image-ref"), "{info}");
    let content = ctr(&["content", "ls"]);
    let gc_ref = format!(
        "containerd.io/gc.ref.snapshot.obd={}",
        r1.layers[1].chain_id
    );
    assert_content_labelled(&content, &r1.config, &gc_ref);
    for d in &layer_digests {
        let blob_line = content.lines().any(|l| l.starts_with(d.as_str()));
        assert!(!blob_line, "layer blob {d} in the store");
    }
    // The manifest (written alongside the layers) names the config and
    // every layer blob for containerd's GC, as containerd's own pull does,
    // though these are not in the store.
    let config_ref = format!("containerd.io/gc.ref.content.config={}", r1.config);
    assert_content_labelled(&content, &r1.manifest, &config_ref);
    for (i, d) in layer_digests.iter().enumerate() {
        let l = format!("containerd.io/gc.ref.content.l.{i}={d}");
        assert_content_labelled(&content, &r1.manifest, &l);
    }
    let leases = ctr(&["leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "a lease was left:\n{leases}");

    // A second pull changes nothing.
    let r2 = pull(&sock, &obd);
    assert!(!r2.created);
    assert_eq!(states(&r2), vec![LayerState::Present; 2], "{r2:?}");
    let reqs: Vec<String> = reg.responses_settled()[settled..]
        .iter()
        .map(|r| r.0.clone())
        .collect();
    for d in &layer_digests {
        assert!(!reqs.iter().any(|l| l.contains(d.as_str())), "{reqs:?}");
    }

    // --- the obd image with an acceleration layer on top, each pulled into
    // a namespace of its own (every layer prepared). A plain tar of `trace`
    // is unpacked by the snapshotter from the blob it fetched at the
    // manifest read: a remote layer, its blob not in containerd's store. A
    // tar the snapshotter does not take (a directory in it) is left to
    // containerd, which downloads and applies it; both give `fs/trace`.
    let trace = obd_device::open::trace_replay::Trace::default().to_bytes();
    let good = obd_device::open::trace_replay::accel::accel_layer_tar(&trace, None).unwrap();
    let with_dir = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_path("d/").unwrap();
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("trace").unwrap();
        h.set_mode(0o444);
        h.set_size(trace.len() as u64);
        h.set_cksum();
        b.append(&h, &trace[..]).unwrap();
        b.into_inner().unwrap()
    };
    for (tag, tar, remote) in [("accel", good, true), ("accel-dir", with_dir, false)] {
        let reference = format!("{addr}/obd/busybox:{tag}");
        let accel_digest = push_with_accel(&client, &dir, &obd, &reference, &tar);
        let mut o = PullOptions::new(&reference);
        o.address = sock.clone();
        o.plain_http = true;
        o.registry.use_docker_config = false;
        o.namespace = tag.into();
        let r = pull_blocking(&o, |_| {}).unwrap_or_else(|e| panic!("pull {reference}: {e}"));
        let want = if remote {
            LayerState::Remote
        } else {
            LayerState::Downloaded
        };
        assert_eq!(
            states(&r),
            vec![LayerState::Remote, LayerState::Remote, want],
            "{r:?}"
        );
        let content = run(containerd::ctr(&sock).args(["-n", tag, "content", "ls"]));
        assert_eq!(
            content
                .lines()
                .any(|l| l.starts_with(accel_digest.as_str())),
            !remote,
            "{tag}: the acceleration layer's blob in containerd's store: {content}"
        );
        // The acceleration layer's config names the obd layers and its
        // `fs`, where `trace` is.
        let chain = &r.layers[2].chain_id;
        let accel_cfg = snapshot_configs(&dir)
            .into_iter()
            .filter(|c| c.acceleration_layer)
            .find(|c| {
                c.lowers.len() == 3
                    && std::fs::read(Path::new(&c.lowers[2].dir).join("trace"))
                        .ok()
                        .as_deref()
                        == Some(&trace[..])
            })
            .unwrap_or_else(|| {
                panic!("{tag}: no acceleration layer config with its trace ({chain})")
            });
        assert_eq!(accel_cfg.lowers.len(), 3);
    }
    let t = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        t.matches("acceleration layer unpacked by the snapshotter")
            .count(),
        1,
        "{t}"
    );
    assert_eq!(t.matches("left to containerd's unpack").count(), 1, "{t}");

    drop(procs);
}

/// The `config.v1.json` of every obd snapshot under `<dir>/snroot`.
fn snapshot_configs(dir: &Path) -> Vec<overlaybd_core::config::ImageConfig> {
    std::fs::read_dir(dir.join("snroot/snapshots"))
        .unwrap()
        .filter_map(|e| {
            overlaybd_core::config::ImageConfig::load(
                e.unwrap().path().join("block/config.v1.json"),
            )
            .ok()
        })
        .collect()
}

/// Pushes `base`'s image with acceleration layer `tar` on top as
/// `reference`; the layer's digest.
fn push_with_accel(
    client: &std::sync::Arc<obd_remote::distribution::Distribution>,
    dir: &Path,
    base: &str,
    reference: &str,
    tar: &[u8],
) -> String {
    use obd_remote::oci::{sha256_digest, ANN_ACCEL, ANN_BLOB_DIGEST, ANN_BLOB_SIZE};
    let b = ImageRef::parse(base).unwrap();
    let r = ImageRef::parse(reference).unwrap();
    let m = client.get_manifest(&b, b.reference()).unwrap();
    let mut man: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
    let cfg_digest = man["config"]["digest"].as_str().unwrap().to_string();
    let mut cfg_bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut client
            .open_blob(&b, &cfg_digest, man["config"]["size"].as_u64().unwrap())
            .unwrap(),
        &mut cfg_bytes,
    )
    .unwrap();
    let digest = sha256_digest(tar);
    client.push_blob_bytes(&r, &digest, tar, dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&cfg_bytes).unwrap();
    cfg["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(digest.clone().into());
    let cfg_bytes = serde_json::to_vec(&cfg).unwrap();
    let cfg_digest = sha256_digest(&cfg_bytes);
    client
        .push_blob_bytes(&r, &cfg_digest, &cfg_bytes, dir)
        .unwrap();
    man["config"]["digest"] = cfg_digest.into();
    man["config"]["size"] = cfg_bytes.len().into();
    man["layers"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": digest,
        "size": tar.len(),
        "annotations": {ANN_ACCEL: "yes", ANN_BLOB_DIGEST: digest, ANN_BLOB_SIZE: tar.len().to_string()},
    }));
    client
        .put_manifest(
            &r,
            r.reference(),
            &m.media_type,
            &serde_json::to_vec(&man).unwrap(),
        )
        .unwrap();
    digest
}

/// obd layers with the snapshotter root on a small file system that fills
/// up (issue 14, point 5): after a lazy pull, containers of the obd image
/// are run with the disk filled to within 0 bytes … 4 MiB of full (in
/// steps of 1 KiB, the block size, at first), so the
/// space runs out at different writes (snapshot directories, metadata,
/// device state, the device's worker and cache files). Each run either
/// fits or fails with "no space left on device" naming a path under the
/// root; once the space is freed the next container runs, on the same
/// snapshotter process.
/// What the device worker (`crates/device/src/worker.rs`, being rewritten
/// with the host-wide cache of issue 14) makes of a full disk, as the device
/// service reports it: an exit 101 with nothing in its (full) log, or an
/// `ok` without its state file (its save error only goes to that log; the
/// service stops it). Accepted here until that rewrite (a loud line says
/// when it happens); the recovery after the space is freed is checked all
/// the same.
const WORKER_ISSUES: [&str; 2] = ["worker exited without a result", "but its state"];

#[test]
fn obd_layers_on_a_full_root() {
    const TEST: &str = "obd layers on a full root";
    if !Needs::root(&["containerd", "ctr", "runc", "docker-registry", "umoci"])
        .paths(&["/bin/busybox", "/dev/fuse"])
        .met(TEST)
    {
        return;
    }
    let tmp = fixtures::procs::short_tempdir("obd-pfull-");
    let dir = tmp.path().to_path_buf();
    let root = dir.join("snroot");
    let Some(fs) = fixtures::smallfs::SmallFs::at(TEST, 64, &root) else {
        return;
    };
    let oci = build_busybox_layout(&dir);
    let reg = Registry::start_logged(&dir).unwrap();
    let obd = format!("{}/obd/busybox:v1", reg.addr);
    push_obd(&dir, &oci, &obd, None, 2);
    // Blocks over plain HTTP; the cache under the root, on the small disk.
    std::fs::write(
        dir.join("service.toml"),
        format!(
            "[cache]\ndir = \"{}\"\n\n[registry.hosts.\"{}\"]\nplain_http = true\n",
            root.join("cache").display(),
            reg.addr
        ),
    )
    .unwrap();
    let mut procs = Procs::new(&dir);
    let sock = start_containerd(&dir, &mut procs);
    let r = pull(&sock, &obd);
    assert_eq!(states(&r), vec![LayerState::Remote; 2], "{r:?}");
    let run_ctr = |name: &str| {
        ctr(&sock)
            .args(["-n", "default", "run", "--snapshotter", "obd", "--rm"])
            .args([obd.as_str(), name, "/bin/cat", "/etc/obd-pull"])
            .output()
            .unwrap()
    };
    let runs_ok = |name: &str| {
        let out = run_ctr(name);
        assert!(
            out.status.success(),
            "{name}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            containerd::logs(&dir)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), MARK);
    };
    runs_ok("full-before");
    let mut failed = 0;
    for kib in [
        0u64, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64, 256, 1024, 4096,
    ] {
        let leave = kib << 10;
        fs.fill_leaving(leave);
        let out = run_ctr(&format!("full-{leave}"));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            eprintln!("{leave} bytes free: the container ran");
        } else if WORKER_ISSUES.iter().any(|w| err.contains(w)) {
            eprintln!(
                "{leave} bytes free: KNOWN ISSUE (device worker): {}",
                err.trim()
            );
        } else {
            failed += 1;
            eprintln!("{leave} bytes free: {}", err.trim());
            // Under the root, or runc's mkdir in the rootfs (whose upper
            // is under the root): both in the test's directory.
            assert!(
                err.to_lowercase().contains("no space left on device")
                    && err.contains(&dir.display().to_string()),
                "{leave} bytes free: not a clear ENOSPC error naming a path: {err}\n{}",
                containerd::logs(&dir)
            );
        }
        fs.free();
        runs_ok(&format!("freed-{leave}"));
    }
    assert!(failed > 0, "no run failed on a full disk");
    let log = std::fs::read_to_string(dir.join("snapshotter.log")).unwrap();
    assert!(!log.contains("Previous I/O error"), "{log}");
    // The image's device goes with its last container, in a sweep after
    // Remove answered: wait for it, so no worker outlives the test.
    let devices = obd_device::state::Root::new(&root);
    fixtures::procs::wait_until("the device to detach", Duration::from_secs(30), || {
        devices.ids().is_ok_and(|ids| ids.is_empty())
    });
    drop(procs);
    drop(fs);
}
