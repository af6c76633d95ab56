//! `obd image flatten` with remote lowers: the upstream stack pushed into a real
//! `docker-registry` on 127.0.0.1 flattens to the same sha256 as from local files,
//! into the cache chosen with `--cache-dir`, and a second run uses that cache.

use fixtures::registry::Registry;
use std::process::Command;

mod common;
use common::{obd, s, OBD};

/// A registry storing under `dir` (its access log kept when `logged`) and
/// the interop vectors' manifest; `None` (the test `what` skipped, said
/// loudly) without docker-registry.
fn registry_and_stacks(
    dir: &std::path::Path,
    logged: bool,
    what: &str,
) -> Option<(Registry, serde_json::Value)> {
    let reg = if logged {
        Registry::start_logged(dir)
    } else {
        Registry::start(dir)
    };
    let reg = match reg {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIPPED: {what}: {e}");
            return None;
        }
    };
    let manifest =
        serde_json::from_slice(&std::fs::read(fixtures::interop().join("manifest.json")).unwrap())
            .unwrap();
    Some((reg, manifest))
}

#[test]
fn remote_lowers_flatten_to_the_local_digest_through_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, manifest)) = registry_and_stacks(dir.path(), false, "remote flatten test")
    else {
        return;
    };
    let stack = &manifest["stacks"][0];
    let mut lowers = Vec::new();
    for l in stack["layers"].as_array().unwrap() {
        let file = fixtures::interop().join(l["file"].as_str().unwrap());
        let digest = l["digest"].as_str().unwrap();
        reg.push("obd/cli", &file, digest).unwrap();
        lowers.push(serde_json::json!({"digest": digest, "size": l["size"], "dir": dir.path().join("nolocal").to_str().unwrap()}));
    }
    let cfg = dir.path().join("config.v1.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"repoBlobUrl": reg.repo_blob_url("obd/cli"), "lowers": lowers})
            .to_string(),
    )
    .unwrap();
    let want = stack["prefixes"][2]["disk_sha256"].as_str().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("disk.img");
    let c = s(&cache);
    let flatten = ["image", "flatten", "--config", s(&cfg), "-o", s(&out)];
    let sha = obd(&[&flatten[..], &["--cache-dir", c, "--sha256"]].concat());
    assert_eq!(sha.trim(), want);
    // A cold run with --metrics reports what it fetched, per layer.
    let cold = dir.path().join("cache2");
    let out2 = Command::new(OBD)
        .args(flatten)
        .args(["--metrics", "--cache-dir", s(&cold)])
        .output()
        .unwrap();
    fixtures::procs::check("obd image flatten --metrics", &out2);
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
    let sha = obd(&[&flatten[..], &["--cache-dir", c, "--sha256"]].concat());
    assert_eq!(sha.trim(), want);
    let info = obd(&[
        "image",
        "info",
        "--json",
        "--config",
        s(&cfg),
        "--cache-dir",
        c,
    ]);
    assert!(info.contains("\"merged_segments\": 19"), "{info}");
}

/// `obd image flatten` of lowers with piece tables (pushed beside the
/// blobs, named in `lowers[].verity`) under `verify = "required"`: the same disk, every fetched range checked; without the
/// tables the same policy refuses the image, naming the layer.
#[test]
fn verified_remote_flatten_gives_the_same_disk_and_required_needs_tables() {
    use obd_remote::verity::{PieceTable, DEFAULT_PIECE_SIZE};
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, manifest)) =
        registry_and_stacks(dir.path(), false, "verified remote flatten test")
    else {
        return;
    };
    let stack = &manifest["stacks"][0];
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for l in stack["layers"].as_array().unwrap() {
        let file = fixtures::interop().join(l["file"].as_str().unwrap());
        let digest = l["digest"].as_str().unwrap();
        reg.push("obd/verified", &file, digest).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        let t = PieceTable::build(&bytes[..], DEFAULT_PIECE_SIZE)
            .unwrap()
            .encode();
        let tfile = dir.path().join("table");
        std::fs::write(&tfile, &t).unwrap();
        let td = obd_remote::oci::sha256_digest(&t);
        reg.push("obd/verified", &tfile, &td).unwrap();
        with.push(serde_json::json!({"digest": digest, "size": l["size"],
            "verity": {"digest": td, "size": t.len()}}));
        without.push(serde_json::json!({"digest": digest, "size": l["size"]}));
    }
    let svc = dir.path().join("service.toml");
    std::fs::write(&svc, "[cache]\nverify = \"required\"\n").unwrap();
    let want = stack["prefixes"][2]["disk_sha256"].as_str().unwrap();
    let out = dir.path().join("disk.img");
    for (name, lowers) in [("with", &with), ("without", &without)] {
        let cfg = dir.path().join(format!("{name}.json"));
        std::fs::write(
            &cfg,
            serde_json::json!({"repoBlobUrl": reg.repo_blob_url("obd/verified"), "lowers": lowers})
                .to_string(),
        )
        .unwrap();
        let cache = dir.path().join(format!("cache-{name}"));
        let args = [
            "image",
            "flatten",
            "--config",
            s(&cfg),
            "-o",
            s(&out),
            "--service-config",
            s(&svc),
            "--cache-dir",
            s(&cache),
            "--sha256",
        ];
        if name == "with" {
            assert_eq!(obd(&args).trim(), want);
        } else {
            let err = common::obd_fails(&args);
            let first = stack["layers"][0]["digest"].as_str().unwrap();
            assert!(
                err.contains(first) && err.contains("no piece table"),
                "{err}"
            );
        }
    }
}

/// Two images that share a base layer, flattened one after the other by two
/// processes through one host-wide cache: the second fetches nothing of the
/// base, when the first keeps what it fetched (`--cache`). Without
/// `--cache` a flatten's read-ahead streams blobs through memory and caches
/// only what it could not hand over in time (issue 18: a one-pass read of a
/// whole image need not write every byte to the cache and read it back),
/// so `--cache` is what promises the second image its base.
#[test]
fn a_second_image_fetches_nothing_of_a_shared_base() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, manifest)) = registry_and_stacks(dir.path(), true, "shared base test") else {
        return;
    };
    let layers = manifest["stacks"][0]["layers"].as_array().unwrap();
    let lower = |l: &serde_json::Value| {
        let file = fixtures::interop().join(l["file"].as_str().unwrap());
        let digest = l["digest"].as_str().unwrap();
        reg.push("obd/shared", &file, digest).unwrap();
        serde_json::json!({"digest": digest, "size": l["size"]})
    };
    // Image a is the base alone (its flatten reads all of it); image b
    // stacks a layer on it.
    let base = lower(&layers[0]);
    let (a, b) = (vec![base.clone()], vec![base.clone(), lower(&layers[1])]);
    let cache = dir.path().join("cache");
    let blob_gets = |digest: &str| {
        reg.requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains(digest))
            .count()
    };
    let base_digest = base["digest"].as_str().unwrap().to_string();
    for (name, lowers) in [("a", a), ("b", b)] {
        let cfg = dir.path().join(format!("{name}.json"));
        let doc = serde_json::json!({
            "repoBlobUrl": reg.repo_blob_url("obd/shared"),
            "lowers": lowers,
        });
        std::fs::write(&cfg, doc.to_string()).unwrap();
        let before = blob_gets(&base_digest);
        let out = dir.path().join(format!("{name}.img"));
        obd(&[
            "image",
            "flatten",
            "--cache",
            "--config",
            s(&cfg),
            "-o",
            s(&out),
            "--cache-dir",
            s(&cache),
        ]);
        let got = blob_gets(&base_digest) - before;
        if name == "a" {
            assert!(got > 0, "the first image read nothing of its base");
        } else {
            assert_eq!(got, 0, "the second image fetched its shared base again");
        }
    }
}

/// A layer larger than one 4 MiB flatten request is streamed by flatten's
/// read-ahead: without `--cache` its bytes pass through memory, so the
/// cache keeps what the layer's open read and a second flatten fetches the
/// rest again; with `--cache` all of it is kept and a later flatten fetches
/// nothing. Every flatten gives the disk the local blob gives.
#[test]
fn a_flatten_streams_through_memory_unless_told_to_cache() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, _)) = registry_and_stacks(dir.path(), true, "pass-through flatten test") else {
        return;
    };
    let d = dir.path();
    // 24 MiB of incompressible data: a blob of 6 to 7 units.
    std::fs::write(d.join("in.bin"), fixtures::random_bytes(18, 24 << 20)).unwrap();
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    obd(&[
        "layer",
        "create",
        "--vsize",
        "32M",
        &p("l.data"),
        &p("l.index"),
    ]);
    obd(&[
        "layer",
        "write",
        "--offset",
        "0",
        &p("l.data"),
        &p("l.index"),
        &p("in.bin"),
    ]);
    obd(&[
        "layer",
        "commit",
        "--zfile",
        &p("l.data"),
        &p("l.index"),
        &p("l.zfile"),
    ]);
    let blob = std::fs::read(d.join("l.zfile")).unwrap();
    let digest = obd_remote::oci::sha256_digest(&blob);
    reg.push("obd/big", &d.join("l.zfile"), &digest).unwrap();
    let local = d.join("local.json");
    std::fs::write(&local, r#"{"lowers":[{"file":"l.zfile"}]}"#).unwrap();
    obd(&[
        "image",
        "flatten",
        "--config",
        s(&local),
        "-o",
        &p("local.img"),
    ]);
    let want = std::fs::read(d.join("local.img")).unwrap();

    let cfg = d.join("remote.json");
    let doc = serde_json::json!({
        "repoBlobUrl": reg.repo_blob_url("obd/big"),
        "lowers": [{"digest": digest, "size": blob.len()}],
    });
    std::fs::write(&cfg, doc.to_string()).unwrap();
    // Bytes of the blob sent (not counting the client's 1-byte scheme probe).
    let fetched = || -> u64 {
        let r = reg.responses();
        r.iter()
            .filter(|(req, _, n)| req.starts_with("GET ") && req.contains(&digest) && *n > 1)
            .map(|(_, _, n)| n)
            .sum()
    };
    let cached = |cache: &std::path::Path| -> u64 {
        let ls = obd(&["cache", "ls", "--json", "--dir", s(cache)]);
        let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
        let blobs = ls.as_array().unwrap();
        blobs.iter().map(|b| b["cached"].as_u64().unwrap()).sum()
    };
    let flatten = |cache: &std::path::Path, extra: &[&str]| -> u64 {
        let before = fetched();
        let out = d.join("remote.img");
        // One worker, reading in order: it rarely gets ahead of the
        // read-ahead.
        let mut args = vec!["image", "flatten", "--threads", "1"];
        args.extend(["--config", s(&cfg), "-o", s(&out)]);
        args.extend(["--cache-dir", s(cache)]);
        args.extend(extra);
        obd(&args);
        assert!(std::fs::read(&out).unwrap() == want, "{extra:?}");
        fetched() - before
    };
    let len = blob.len() as u64;
    let unit = 4u64 << 20;

    // Pass-through: the streamed units are not cached. The open reads the
    // first and the last unit (cached); a worker that asks for a unit before
    // the read-ahead has claimed it fetches and caches it itself, so how
    // many of the other units pass through varies, but never all of them
    // are cached, each byte is fetched once, and the next flatten fetches
    // exactly what is not cached.
    let c = d.join("cache-a");
    assert_eq!(flatten(&c, &[]), len);
    let kept = cached(&c);
    assert!(
        kept >= len % unit + unit && kept < len,
        "{kept} of {len} cached"
    );
    assert_eq!(
        (kept - len % unit) % unit,
        0,
        "{kept} cached: not whole units"
    );
    assert_eq!(flatten(&c, &[]), len - kept);

    // --cache: everything is cached, the next flatten fetches nothing.
    let c = d.join("cache-b");
    assert_eq!(flatten(&c, &["--cache"]), len);
    assert_eq!(cached(&c), len);
    assert_eq!(flatten(&c, &[]), 0);
}
