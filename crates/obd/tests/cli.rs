//! The `obd` CLI end to end: files obd writes pass the strict validators
//! (every upstream reader and writer rule), round-trip exactly, and bad input
//! fails with a message naming the file.

use std::path::Path;

mod common;
use common::{obd as ok, obd_fails as fails, s};

#[test]
fn zfile_compress_is_strict_valid_deterministic_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let data = fixtures::image_like(3, 3_000_000);
    std::fs::write(&input, &data).unwrap();
    for algo in ["lz4", "zstd"] {
        for bs in ["4K", "8K", "16K", "32K"] {
            for tar in [false, true] {
                let mut outs = Vec::new();
                for threads in ["1", "2"] {
                    let out = dir.path().join(format!("o.{algo}.{bs}.{tar}.{threads}"));
                    let mut args = vec![
                        "zfile",
                        "compress",
                        "--algorithm",
                        algo,
                        "--block-size",
                        bs,
                        "--threads",
                        threads,
                    ];
                    if tar {
                        args.push("--tar");
                    }
                    args.extend([s(&input), s(&out)]);
                    ok(&args);
                    outs.push(std::fs::read(&out).unwrap());
                    assert!(
                        ok(&["zfile", "verify", "--strict", s(&out)]).contains("strict rules ok")
                    );
                    let back = dir.path().join("back.bin");
                    ok(&["zfile", "extract", s(&out), s(&back)]);
                    assert!(
                        std::fs::read(&back).unwrap() == data,
                        "{algo} {bs} tar={tar}"
                    );
                }
                assert!(
                    outs[0] == outs[1],
                    "output depends on the thread count ({algo} {bs})"
                );
            }
        }
    }
    let err = fails(&[
        "zfile",
        "compress",
        "--block-size",
        "64K",
        s(&input),
        "/dev/null",
    ]);
    assert!(err.contains("64K blocks are read-only"), "{err}");
}

/// `obd layer <verb> <flags…> <files…>` with the files under `dir`.
fn layer(dir: &Path, verb: &str, flags: &[&str], files: &[&str]) -> String {
    let files: Vec<String> = files
        .iter()
        .map(|f| dir.join(f).to_string_lossy().into_owned())
        .collect();
    let mut args = vec!["layer", verb];
    args.extend(flags);
    args.extend(files.iter().map(String::as_str));
    ok(&args)
}

/// `obd image flatten --config <cfg> -o <dir>/<out>`; returns the disk.
fn flatten(dir: &Path, cfg: &Path, out: &str) -> Vec<u8> {
    let out = dir.join(out);
    ok(&["image", "flatten", "--config", s(cfg), "-o", s(&out)]);
    std::fs::read(out).unwrap()
}

#[test]
fn layer_create_write_discard_commit_verify_and_stack() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vsize: u64 = 8 << 20;
    let mut model = vec![0u8; vsize as usize];
    const BASE_UUID: &str = "c0379a64-cbe1-c277-d359-c6a9c388ecc2";
    const DISCARD_3M_64K: [&str; 4] = ["--offset", "3M", "--length", "64K"];

    // Base layer: 5 MB of data at offset 0.
    let base = fixtures::image_like(10, 5 << 20);
    std::fs::write(d.join("base.bin"), &base).unwrap();
    let b = ["b.data", "b.index"];
    layer(d, "create", &["--vsize", "8M", "--uuid", BASE_UUID], &b);
    layer(
        d,
        "write",
        &["--offset", "0"],
        &["b.data", "b.index", "base.bin"],
    );
    model[..base.len()].copy_from_slice(&base);
    layer(
        d,
        "commit",
        &["--zfile", "--tar"],
        &["b.data", "b.index", "b.tar"],
    );

    // Upper layer: a write, an overwrite and a discard that masks the base.
    let up = fixtures::image_like(11, 300_000);
    std::fs::write(d.join("up.bin"), &up).unwrap();
    let u = ["u.data", "u.index"];
    layer(d, "create", &["--parent-uuid", BASE_UUID], &u);
    layer(
        d,
        "write",
        &["--offset", "1M"],
        &["u.data", "u.index", "up.bin"],
    );
    let padded = up.len().div_ceil(512) * 512;
    model[1 << 20..(1 << 20) + up.len()].copy_from_slice(&up);
    model[(1 << 20) + up.len()..(1 << 20) + padded].fill(0);
    layer(d, "discard", &DISCARD_3M_64K, &u);
    model[3 << 20..(3 << 20) + (64 << 10)].fill(0);
    let zstd_16k = ["--zfile", "--algorithm", "zstd", "--block-size", "16K"];
    let mut flags = zstd_16k.to_vec();
    flags.extend(["-m", "upper"]);
    layer(d, "commit", &flags, &["u.data", "u.index", "u.zfile"]);

    for f in ["b.tar", "u.zfile"] {
        // The piece table beside the committed blob describes it.
        let t = std::fs::read(d.join(format!("{f}.verity"))).unwrap();
        let t = obd_remote::verity::PieceTable::decode(&t).unwrap();
        let blob = std::fs::read(d.join(f)).unwrap();
        assert_eq!(t.blob_digest(), obd_remote::oci::sha256_digest(&blob));
        t.verify(0, &blob).unwrap();
        let v = layer(d, "verify", &["--strict"], &[f]);
        assert!(
            v.contains("OK") && v.contains("strict LSMT rules ok"),
            "{v}"
        );
    }
    let info: serde_json::Value =
        serde_json::from_str(&layer(d, "info", &["--json"], &["u.zfile"])).unwrap();
    assert_eq!(info["header"]["flags"], 7);
    assert_eq!(info["trailer"]["flags"], 6);
    assert_eq!(
        info["header"]["parent_uuid"],
        BASE_UUID.to_ascii_uppercase()
    );
    assert_eq!(info["header"]["user_tag"], "upper");
    assert_eq!(info["nesting"], "zfile(lsmt)");
    assert_eq!(info["trailer"]["index_size"].as_u64().unwrap() % 256, 0);

    let cfg = d.join("config.v1.json");
    std::fs::write(
        &cfg,
        r#"{"lowers":[{"file":"b.tar"},{"file":"u.zfile"}],"unknownKey":1}"#,
    )
    .unwrap();
    assert!(flatten(d, &cfg, "disk.img") == model);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["image", "info", "--json", "--config", s(&cfg)])).unwrap();
    assert_eq!(info["virtual_size"], vsize);
    assert_eq!(info["layers"].as_array().unwrap().len(), 2);

    // Sealing, then committing the sealed file, gives the same disk.
    let x = ["x.data", "x.index"];
    layer(d, "create", &[], &x);
    layer(
        d,
        "write",
        &["--offset", "1M"],
        &["x.data", "x.index", "up.bin"],
    );
    layer(d, "discard", &DISCARD_3M_64K, &x);
    layer(d, "seal", &[], &x);
    layer(d, "commit", &["--tar", "--no-verity"], &["x.data", "x.tar"]);
    assert!(!d.join("x.tar.verity").exists());
    layer(d, "verify", &["--strict"], &["x.tar"]);
    std::fs::write(&cfg, r#"{"lowers":[{"file":"b.tar"},{"file":"x.data"}]}"#).unwrap();
    assert!(flatten(d, &cfg, "disk2.img") == model);
    std::fs::write(&cfg, r#"{"lowers":[{"file":"b.tar"},{"file":"x.tar"}]}"#).unwrap();
    assert!(flatten(d, &cfg, "disk3.img") == model);
}

/// Flips one byte of `file` at `at`.
fn flip(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
}

#[test]
fn layer_verify_says_what_the_format_cannot_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("in.bin"), fixtures::image_like(4, 1 << 20)).unwrap();
    layer(d, "create", &["--vsize", "4M"], &["l.data", "l.index"]);
    layer(
        d,
        "write",
        &["--offset", "0"],
        &["l.data", "l.index", "in.bin"],
    );
    layer(d, "commit", &[], &["l.data", "l.index", "raw.lsmt"]);
    // Upstream's default codec: 4 KiB blocks, so the counts below are exact.
    layer(
        d,
        "commit",
        &["--zfile", "--algorithm", "lz4", "--block-size", "4K"],
        &["l.data", "l.index", "z.zfile"],
    );
    const RAW_GAP: &str = "LSMT data and index contents: not checksummed by the format (raw LSMT), so changed bytes cannot be detected";

    // Raw LSMT: a changed data byte (the data area starts at 4 KiB) still
    // verifies, and verify says that it could not have noticed.
    flip(&d.join("raw.lsmt"), 4096 + 100);
    let text = layer(d, "verify", &[], &["raw.lsmt"]);
    let first = text.lines().next().unwrap();
    assert!(
        first.ends_with("raw.lsmt: OK (nesting lsmt; 1 entries, 1.00 MiB of data read; data not checksummed by the format)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("\n  not checked: {RAW_GAP}\n")),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&layer(d, "verify", &["--json"], &["raw.lsmt"])).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["nesting"], "lsmt");
    assert_eq!(v["data_checksummed"], false);
    assert_eq!(v["data_bytes_read"], 1 << 20);
    assert_eq!(
        v["not_checked"],
        serde_json::json!([RAW_GAP, "upstream writer rules (use --strict)"])
    );
    assert_eq!(
        v["checked"],
        serde_json::json!([
            "LSMT header, trailer and index against the reader's rules (magic, flags, sizes, entry order and ranges)",
            "every mapped data byte read (1 entries, 1.00 MiB)"
        ])
    );

    // ZFile: block CRCs cover the LSMT file, so nothing of it goes unchecked,
    // and the same change is caught.
    let v: serde_json::Value =
        serde_json::from_str(&layer(d, "verify", &["--json", "--strict"], &["z.zfile"])).unwrap();
    assert_eq!(v["data_checksummed"], true);
    let not_checked = v["not_checked"].as_array().unwrap();
    assert!(
        !not_checked
            .iter()
            .any(|c| c.as_str().unwrap().starts_with("LSMT")),
        "{v}"
    );
    assert!(
        v["checked"].as_array().unwrap().iter().any(|c| c
            .as_str()
            .unwrap()
            .starts_with("ZFile block CRC-32C of all 259 blocks")),
        "{v}"
    );
    flip(&d.join("z.zfile"), 4096 + 100);
    let err = fails(&["layer", "verify", s(&d.join("z.zfile"))]);
    assert!(
        err.contains("z.zfile: ZFile: block ") && err.contains(": CRC mismatch (stored 0x"),
        "{err}"
    );
}

#[test]
fn configs_and_layers_that_are_not_files_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    fixtures::procs::mkfifo(&fifo);
    let cfg = dir.path().join("config.v1.json");
    std::fs::write(&cfg, format!(r#"{{"lowers":[{{"file":"{}"}}]}}"#, s(&fifo))).unwrap();
    for (args, want) in [
        (
            vec!["image", "info", "--config", "/dev/zero"],
            "obd: error: /dev/zero: not a regular file but a character device".to_string(),
        ),
        (
            vec!["image", "info", "--config", s(&fifo)],
            format!("obd: error: {}: not a regular file but a FIFO", s(&fifo)),
        ),
        (
            vec!["image", "info", "--config", s(&cfg)],
            format!(
                "obd: error: {}: layer 0 ({f}): {f}: not a regular file but a FIFO",
                s(&cfg),
                f = s(&fifo)
            ),
        ),
        (
            vec!["layer", "verify", s(&fifo)],
            format!("obd: error: {}: not a regular file but a FIFO", s(&fifo)),
        ),
    ] {
        let err = fails(&args);
        assert_eq!(err.trim_end(), want, "{args:?}");
    }
}

#[test]
fn bad_input_fails_cleanly_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, vec![0x42u8; 9000]).unwrap();
    for args in [
        vec!["zfile", "extract", s(&junk), "/dev/null"],
        vec!["zfile", "verify", s(&junk)],
        vec!["layer", "info", s(&junk)],
        vec!["layer", "verify", s(&junk)],
    ] {
        let err = fails(&args);
        assert!(
            err.contains("junk.bin") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // A truncated upstream blob.
    let blob = std::fs::read(fixtures::interop().join("stack-lz4/layer1.overlaybd.tar")).unwrap();
    let cut = dir.path().join("cut.tar");
    std::fs::write(&cut, &blob[..blob.len() / 2]).unwrap();
    let err = fails(&["layer", "verify", s(&cut)]);
    assert!(
        err.contains("cut.tar") && !err.contains("panicked"),
        "{err}"
    );
    // A config that is not JSON, and one whose layer is missing.
    let cfg = dir.path().join("c.json");
    std::fs::write(&cfg, "{ not json").unwrap();
    let err = fails(&["image", "info", "--config", s(&cfg)]);
    assert!(err.contains("c.json") && err.contains("line 1"), "{err}");
    std::fs::write(&cfg, r#"{"lowers":[{"file":"gone.tar"}]}"#).unwrap();
    let err = fails(&[
        "image",
        "flatten",
        "--config",
        s(&cfg),
        "-o",
        s(&dir.path().join("o")),
    ]);
    assert!(err.contains("layer 0") && err.contains("gone.tar"), "{err}");
}
