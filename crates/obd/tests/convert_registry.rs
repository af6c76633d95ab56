//! `obd convert` registry to registry through Debian's `docker-registry` on
//! 127.0.0.1: a test image (every entry type, whiteouts; from the converter
//! tests' helpers) pushed with skopeo, converted twice (digests equal), pulled
//! back with our own client and with skopeo, strict blob validation, the
//! flattened ext4 compared with `umoci unpack` of the source, `e2fsck -fn`;
//! `--referrer`, `--platform`, `--no-push -o`, chunked uploads, and Basic
//! auth from a docker config. Skipped loudly when a tool is missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use converter::registry::{RegistryDest, RegistrySource};
use fixtures::procs::{check, run, Needs};
use obd_remote::creds::{Credential, StaticCredentials};
use obd_remote::distribution::{Distribution, ImageRef};
use obd_remote::registry::RegistryOptions;
use serde_json::Value;

#[path = "../../converter/tests/common/mod.rs"]
mod common;
use common::*;

const OBD: &str = env!("CARGO_BIN_EXE_obd");

fn tools() -> bool {
    Needs::tools(&["docker-registry", "skopeo", "curl"]).met("obd convert with a registry")
}

/// A registry in a new temporary directory and its address, or `None`
/// (after a loud `SKIPPED` line) without the tools.
fn start_registry() -> Option<(tempfile::TempDir, fixtures::registry::Registry, String)> {
    if !tools() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = fixtures::registry::Registry::start(tmp.path()).unwrap();
    let addr = reg.addr.clone();
    Some((tmp, reg, addr))
}

fn skopeo_push(src: &str, dst: &str, creds: Option<&str>) {
    let mut c = Command::new("skopeo");
    c.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
    if let Some(cr) = creds {
        c.arg(format!("--dest-creds={cr}"));
    }
    run(c.arg(src).arg(dst));
}

fn obd_convert(args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut c = Command::new(OBD);
    c.arg("convert").args(args).env_remove("DOCKER_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// `obd convert <src> <dst> --plain-http <addr> --vsize 1G --json <extra…>`
/// with the environment `env`.
fn convert_via(
    addr: &str,
    src: &str,
    dst: &str,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> std::process::Output {
    let mut args = vec![src, dst, "--plain-http", addr, "--vsize", "1G", "--json"];
    args.extend_from_slice(extra);
    obd_convert(&args, env)
}

fn ok(out: &std::process::Output) -> Value {
    let stdout = check("obd convert", out);
    serde_json::from_str(&stdout).unwrap_or(Value::Null)
}

fn client(addr: &str) -> Arc<Distribution> {
    let mut o = RegistryOptions {
        use_docker_config: false,
        ..Default::default()
    };
    o.hosts.entry(addr.to_string()).or_default().plain_http = true;
    Arc::new(Distribution::new(o).unwrap())
}

/// Pulls `r` (a single manifest) into an OCI layout with our own client;
/// returns the manifest.
fn pull(c: &Distribution, r: &ImageRef, dir: &Path, tag: &str) -> Value {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let m = c.get_manifest(r, r.reference()).unwrap();
    fs::write(blobs.join(&m.digest[7..]), &m.bytes).unwrap();
    let man: Value = serde_json::from_slice(&m.bytes).unwrap();
    let dl = Arc::new(Distribution::new(c.options().clone()).unwrap());
    let mut descs = vec![man["config"].clone()];
    descs.extend(man["layers"].as_array().unwrap().iter().cloned());
    for d in descs {
        let dg = d["digest"].as_str().unwrap();
        let mut rd = dl.open_blob(r, dg, d["size"].as_u64().unwrap()).unwrap();
        let mut f = fs::File::create(blobs.join(&dg[7..])).unwrap();
        let n = std::io::copy(&mut rd, &mut f).unwrap();
        assert_eq!(n, d["size"].as_u64().unwrap());
        assert_eq!(sha_file(&blobs.join(&dg[7..])), dg, "blob digest");
    }
    write_index(dir, tag, &m.media_type, &m.digest, m.bytes.len());
    man
}

fn sha_file(p: &Path) -> String {
    sha(&fs::read(p).unwrap())
}

/// The overlaybd layer blobs of a pulled manifest (annotations and diff_ids
/// checked), bottom to top.
fn layer_blobs(dir: &Path, man: &Value, layer_mt: &str) -> Vec<PathBuf> {
    let blobs = dir.join("blobs/sha256");
    let cfg: Value = serde_json::from_slice(
        &fs::read(blobs.join(&man["config"]["digest"].as_str().unwrap()[7..])).unwrap(),
    )
    .unwrap();
    let ls = man["layers"].as_array().unwrap();
    assert_eq!(
        ls.len(),
        cfg["rootfs"]["diff_ids"].as_array().unwrap().len()
    );
    ls.iter()
        .enumerate()
        .map(|(i, l)| {
            let d = l["digest"].as_str().unwrap();
            assert_eq!(l["mediaType"], layer_mt);
            assert_eq!(cfg["rootfs"]["diff_ids"][i], d);
            let a = &l["annotations"];
            assert_eq!(a["containerd.io/snapshot/overlaybd/blob-digest"], d);
            assert_eq!(a["containerd.io/snapshot/overlaybd/version"], "0.1.0");
            assert_eq!(
                a["containerd.io/snapshot/overlaybd/blob-size"],
                l["size"].as_u64().unwrap().to_string()
            );
            blobs.join(&d[7..])
        })
        .collect()
}

fn source_image(tmp: &Path) -> PathBuf {
    let src = tmp.join("src");
    make_layout(
        &src,
        "v1",
        &[
            (layer0(), "gzip"),
            (layer1(), "gzip"),
            (layer2_plain(), "plain"),
        ],
    );
    src
}

#[test]
fn registry_to_registry() {
    let Some((tmp, _reg, addr)) = start_registry() else {
        return;
    };
    let src = source_image(tmp.path());
    skopeo_push(
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{addr}/src/app:v1"),
        None,
    );
    let s = format!("docker://{addr}/src/app:v1");
    let conv = |dst: &str, extra: &[&str]| ok(&convert_via(&addr, &s, dst, extra, &[]));
    // Docker media types by default; twice, to another tag: same digests.
    let r1 = conv(&format!("docker://{addr}/obd/app:a"), &[]);
    let r2 = conv(&format!("docker://{addr}/obd/app:b"), &[]);
    assert_eq!(r1["digest"], r2["digest"], "deterministic across runs");
    assert_eq!(
        r1["media_type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let c = client(&addr);
    let a = c
        .get_manifest(&ImageRef::parse(&format!("{addr}/obd/app:a")).unwrap(), "a")
        .unwrap();
    let b = c
        .get_manifest(&ImageRef::parse(&format!("{addr}/obd/app:b")).unwrap(), "b")
        .unwrap();
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.digest, r1["digest"]);

    // Pull back with our client: strict blob checks, flatten, e2fsck, tree.
    let pulled = tmp.path().join("pulled");
    let man = pull(
        &c,
        &ImageRef::parse(&format!("{addr}/obd/app:a")).unwrap(),
        &pulled,
        "a",
    );
    assert_eq!(
        man["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    let blobs = layer_blobs(
        &pulled,
        &man,
        "application/vnd.docker.image.rootfs.diff.tar",
    );
    assert_eq!(blobs.len(), 3);
    let raw = tmp.path().join("raw");
    flatten(&blobs, &raw);
    e2fsck_clean(&raw);
    let ext = ext4_tree(&raw);
    let host = umoci_tree(&src, "v1", tmp.path());
    if let Some(host) = &host {
        compare(&ext, host);
    }

    // The same conversion from the OCI layout gives the same manifest.
    let out = tmp.path().join("local");
    let r3 = ok(&obd_convert(
        &[
            &format!("oci:{}:v1", src.display()),
            &format!("oci:{}:x", out.display()),
            "--vsize",
            "1G",
            "--json",
        ],
        &[],
    ));
    assert_eq!(r3["digest"], r1["digest"], "registry and layout agree");

    // --oci, then pulled back by skopeo into an OCI layout.
    let r4 = conv(&format!("docker://{addr}/obd/app:oci"), &["--oci"]);
    assert_eq!(
        r4["media_type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let sk = tmp.path().join("skopeo");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--preserve-digests"])
        .arg("--src-tls-verify=false")
        .arg(format!("docker://{addr}/obd/app:oci"))
        .arg(format!("oci:{}:oci", sk.display())));
    let ob = output_blobs(&sk, "oci");
    let raw2 = tmp.path().join("raw2");
    flatten(&ob, &raw2);
    e2fsck_clean(&raw2);
    let ext2 = ext4_tree(&raw2);
    assert_eq!(
        ext2.keys().collect::<Vec<_>>(),
        ext.keys().collect::<Vec<_>>()
    );
    if let Some(host) = &host {
        compare(&ext2, host);
    }

    // --no-push -o writes a layout with the same manifest.
    let np = tmp.path().join("nopush");
    let r5 = conv(
        &format!("docker://{addr}/never/pushed:t"),
        &["--no-push", "-o", np.to_str().unwrap()],
    );
    assert_eq!(r5["digest"], r1["digest"]);
    assert!(np.join("index.json").exists());
    assert!(c
        .get_manifest_opt(
            &ImageRef::parse(&format!("{addr}/never/pushed:t")).unwrap(),
            "t"
        )
        .unwrap()
        .is_none());
}

#[test]
fn referrer_platforms_and_chunked_uploads() {
    let Some((tmp, _reg, addr)) = start_registry() else {
        return;
    };
    // A two-platform index.
    let src = tmp.path().join("multi");
    let platforms = ["amd64", "arm64"].map(|arch| {
        let mut l = Layer::new();
        l.file(&format!("arch-{arch}"), 0o644, arch.as_bytes());
        l.file("big", 0o644, &noise(3 << 20, 7));
        (arch, false, l.finish())
    });
    make_multi_platform(&src, "m", &platforms);
    skopeo_push(
        &format!("oci:{}:m", src.display()),
        &format!("docker://{addr}/multi/app:m"),
        None,
    );
    let c = client(&addr);
    let sref = ImageRef::parse(&format!("{addr}/multi/app:m")).unwrap();
    let smf = c.get_manifest(&sref, "m").unwrap();
    // skopeo may rewrite the index; the registry's is the subject.
    let id = smf.digest.clone();
    let idx = smf.bytes.clone();

    // All platforms, Docker types: a manifest list with two entries.
    let m = format!("docker://{addr}/multi/app:m");
    let conv = |dst: &str, extra: &[&str]| convert_via(&addr, &m, dst, extra, &[]);
    let all = ok(&conv(&format!("docker://{addr}/multi/app:obd"), &[]));
    assert_eq!(
        all["media_type"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(all["manifests"].as_array().unwrap().len(), 2);

    // One platform, as a referrer of the source index (OCI forced).
    let r = ok(&convert_via(
        &addr,
        &format!("docker://{addr}/multi/app@{id}"),
        &format!("docker://{addr}/multi/app:obd-arm64"),
        &["--platform", "linux/arm64", "--referrer"],
        &[],
    ));
    assert_eq!(r["manifests"].as_array().unwrap().len(), 1);
    let out = c.get_manifest(&sref, "obd-arm64").unwrap();
    let doc: Value = serde_json::from_slice(&out.bytes).unwrap();
    assert_eq!(doc["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(
        doc["artifactType"],
        "application/vnd.containerd.overlaybd.native.v1+json"
    );
    assert_eq!(doc["subject"]["digest"], id);
    assert_eq!(doc["subject"]["size"], idx.len());
    assert_eq!(doc["manifests"][0]["platform"]["architecture"], "arm64");
    // docker-registry 2.8 has no referrers API: the fallback tag lists it.
    let fb = c.get_manifest(&sref, &id.replace(':', "-")).unwrap();
    let fbd: Value = serde_json::from_slice(&fb.bytes).unwrap();
    assert_eq!(fbd["manifests"][0]["digest"], out.digest);
    assert_eq!(
        fbd["manifests"][0]["artifactType"],
        "application/vnd.containerd.overlaybd.native.v1+json"
    );
    let bad = conv(
        &format!("docker://{addr}/multi/app:none"),
        &["--platform", "linux/s390x"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--platform"));

    // Chunked uploads (1 MiB PATCHes) through the library give the same image.
    let mut ch = Distribution::new(c.options().clone()).unwrap();
    ch.push.monolithic_max = 0;
    ch.push.chunk_size = 1 << 20;
    let ch = Arc::new(ch);
    let dst = RegistryDest::new(
        ch.clone(),
        ImageRef::parse(&format!("{addr}/chunked/app:obd")).unwrap(),
        tmp.path(),
        None,
    )
    .unwrap();
    let srcr = RegistrySource::new(ch.clone(), sref.clone());
    let rep = converter::convert(
        &srcr,
        &dst,
        &converter::Options {
            vsize: 1 << 30,
            media_types: converter::MediaTypes::Docker,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rep.root.digest, all["digest"]);
    let got = c
        .get_manifest(
            &ImageRef::parse(&format!("{addr}/chunked/app:obd")).unwrap(),
            "obd",
        )
        .unwrap();
    assert_eq!(got.digest, all["digest"]);
}

#[test]
fn basic_auth_from_docker_config() {
    if !tools() || !fixtures::registry::have("htpasswd") {
        eprintln!("SKIPPED: needs docker-registry, skopeo, htpasswd");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = fixtures::registry::Registry::start_basic(tmp.path(), "alice", "s3cret").unwrap();
    let addr = reg.addr.clone();
    let src = tmp.path().join("src");
    let mut l = Layer::new();
    l.file("hello", 0o644, b"hello\n");
    make_layout(&src, "v1", &[(l.finish(), "gzip")]);
    skopeo_push(
        &format!("oci:{}:v1", src.display()),
        &format!("docker://{addr}/auth/app:v1"),
        Some("alice:s3cret"),
    );
    let write_cfg = |dir: &Path, pass: &str| {
        fs::create_dir_all(dir).unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:{pass}"));
        fs::write(
            dir.join("config.json"),
            serde_json::to_vec(&serde_json::json!({"auths": {addr.clone(): {"auth": auth}}}))
                .unwrap(),
        )
        .unwrap();
    };
    let good = tmp.path().join("good");
    let wrong = tmp.path().join("wrong");
    write_cfg(&good, "s3cret");
    write_cfg(&wrong, "nope");
    let src = format!("docker://{addr}/auth/app:v1");
    let conv = |tag: &str, docker_config: &Path| {
        let dst = format!("docker://{addr}/auth/app:{tag}");
        convert_via(&addr, &src, &dst, &[], &[("DOCKER_CONFIG", docker_config)])
    };
    let r = ok(&conv("obd", &good));
    assert!(r["digest"].as_str().unwrap().starts_with("sha256:"));

    // Wrong password: a clear auth error, and nothing tagged.
    let out = conv("bad", &wrong);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication"), "{err}");
    // No credentials at all.
    assert!(!conv("bad", tmp.path()).status.success());
    let c = Distribution::with_credentials(
        {
            let mut o = RegistryOptions::default();
            o.hosts.entry(addr.clone()).or_default().plain_http = true;
            o
        },
        Arc::new(StaticCredentials::new().with(
            &addr,
            Credential {
                username: "alice".into(),
                password: "s3cret".into(),
            },
        )),
    )
    .unwrap();
    let r = ImageRef::parse(&format!("{addr}/auth/app:bad")).unwrap();
    assert!(
        c.get_manifest_opt(&r, "bad").unwrap().is_none(),
        "not tagged"
    );
    assert!(c.get_manifest_opt(&r, "obd").unwrap().is_some());
}
