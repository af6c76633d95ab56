//! `obd image flatten` with remote lowers: the upstream stack pushed into a real
//! `docker-registry` on 127.0.0.1 flattens to the same sha256 as from local files,
//! into the cache chosen with `--cache-dir`, and a second run uses that cache.

use std::path::Path;
use std::process::{Child, Command, Stdio};

struct Reg {
    child: Child,
    addr: String,
}

impl Drop for Reg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(p: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {p}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_registry(dir: &Path) -> Option<Reg> {
    if !have("docker-registry") || !have("curl") {
        eprintln!("SKIPPED: remote flatten test needs docker-registry and curl (apt install docker-registry curl)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .args(["serve", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reg = Reg { child, addr };
    // Bounded wait for the API.
    let ok = Command::new("curl")
        .args([
            "-sf",
            "--retry",
            "50",
            "--retry-connrefused",
            "--retry-delay",
            "0",
            "--max-time",
            "20",
        ])
        .arg(format!("http://{}/v2/", reg.addr))
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "docker-registry did not come up");
    Some(reg)
}

fn push(reg: &Reg, repo: &str, file: &Path, digest: &str) {
    let out = Command::new("curl")
        .args(["-sf", "-X", "POST", "-D", "-", "-o", "/dev/null"])
        .arg(format!("http://{}/v2/{repo}/blobs/uploads/", reg.addr))
        .output()
        .unwrap();
    let headers = String::from_utf8(out.stdout).unwrap();
    let loc = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .expect("upload location")
        .trim()
        .to_string();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let url = if loc.starts_with("http") {
        loc.clone()
    } else {
        format!("http://{}{loc}", reg.addr)
    };
    let ok = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(format!("{url}{sep}digest={digest}"))
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "push of {} failed", file.display());
}

fn obd(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_obd"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "obd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn remote_lowers_flatten_to_the_local_digest_through_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let Some(reg) = start_registry(dir.path()) else {
        return;
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures::interop().join("manifest.json")).unwrap())
            .unwrap();
    let stack = &manifest["stacks"][0];
    let mut lowers = Vec::new();
    for l in stack["layers"].as_array().unwrap() {
        let file = fixtures::interop().join(l["file"].as_str().unwrap());
        let digest = l["digest"].as_str().unwrap();
        push(&reg, "obd/cli", &file, digest);
        lowers.push(serde_json::json!({"digest": digest, "size": l["size"], "dir": dir.path().join("nolocal").to_str().unwrap()}));
    }
    let cfg = dir.path().join("config.v1.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"repoBlobUrl": format!("http://{}/v2/obd/cli/blobs", reg.addr), "lowers": lowers}).to_string(),
    )
    .unwrap();
    let want = stack["prefixes"][2]["disk_sha256"].as_str().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("disk.img");
    let c = cache.to_str().unwrap();
    let sha = obd(&[
        "image",
        "flatten",
        "--config",
        cfg.to_str().unwrap(),
        "--cache-dir",
        c,
        "-o",
        out.to_str().unwrap(),
        "--sha256",
    ]);
    assert_eq!(sha.trim(), want);
    // A cold run with --metrics reports what it fetched, per layer.
    let cold = dir.path().join("cache2");
    let out2 = Command::new(env!("CARGO_BIN_EXE_obd"))
        .args([
            "image",
            "flatten",
            "--metrics",
            "--config",
            cfg.to_str().unwrap(),
            "--cache-dir",
        ])
        .arg(&cold)
        .args(["-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out2.status.success());
    let err = String::from_utf8_lossy(&out2.stderr);
    let first = stack["layers"][0]["digest"].as_str().unwrap();
    assert!(
        err.contains(&format!(
            "obd_remote_bytes_total{{layer=\"{first}\",priority=\"foreground\"}}"
        )),
        "{err}"
    );
    let cached: u64 = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(cached > 0, "nothing landed in --cache-dir");
    // The registry gone, the cache alone serves the same disk.
    drop(reg);
    let sha = obd(&[
        "image",
        "flatten",
        "--config",
        cfg.to_str().unwrap(),
        "--cache-dir",
        c,
        "-o",
        out.to_str().unwrap(),
        "--sha256",
    ]);
    assert_eq!(sha.trim(), want);
    let info = obd(&[
        "image",
        "info",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
        "--cache-dir",
        c,
    ]);
    assert!(info.contains("\"merged_segments\": 19"), "{info}");
}
