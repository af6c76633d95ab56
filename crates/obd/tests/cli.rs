//! The `obd` CLI end to end: files obd writes pass the strict validators
//! (every upstream reader and writer rule), round-trip exactly, and bad input
//! fails with a message naming the file.

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_obd"))
        .args(args)
        .output()
        .expect("run obd")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "obd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "obd {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

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
    let err = String::from_utf8(
        run(&[
            "zfile",
            "compress",
            "--block-size",
            "64K",
            s(&input),
            "/dev/null",
        ])
        .stderr,
    )
    .unwrap();
    assert!(err.contains("64K blocks are read-only"), "{err}");
}

#[test]
fn layer_create_write_discard_commit_verify_and_stack() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let vsize: u64 = 8 << 20;
    let mut model = vec![0u8; vsize as usize];

    // Base layer: 5 MB of data at offset 0.
    let base = fixtures::image_like(10, 5 << 20);
    std::fs::write(p("base.bin"), &base).unwrap();
    ok(&[
        "layer",
        "create",
        "--vsize",
        "8M",
        "--uuid",
        "c0379a64-cbe1-c277-d359-c6a9c388ecc2",
        s(&p("b.data")),
        s(&p("b.index")),
    ]);
    ok(&[
        "layer",
        "write",
        "--offset",
        "0",
        s(&p("b.data")),
        s(&p("b.index")),
        s(&p("base.bin")),
    ]);
    model[..base.len()].copy_from_slice(&base);
    ok(&[
        "layer",
        "commit",
        "--zfile",
        "--tar",
        s(&p("b.data")),
        s(&p("b.index")),
        s(&p("b.tar")),
    ]);

    // Upper layer: a write, an overwrite and a discard that masks the base.
    let up = fixtures::image_like(11, 300_000);
    std::fs::write(p("up.bin"), &up).unwrap();
    ok(&[
        "layer",
        "create",
        "--parent-uuid",
        "c0379a64-cbe1-c277-d359-c6a9c388ecc2",
        s(&p("u.data")),
        s(&p("u.index")),
    ]);
    ok(&[
        "layer",
        "write",
        "--offset",
        "1M",
        s(&p("u.data")),
        s(&p("u.index")),
        s(&p("up.bin")),
    ]);
    let padded = up.len().div_ceil(512) * 512;
    model[1 << 20..(1 << 20) + up.len()].copy_from_slice(&up);
    model[(1 << 20) + up.len()..(1 << 20) + padded].fill(0);
    ok(&[
        "layer",
        "discard",
        "--offset",
        "3M",
        "--length",
        "64K",
        s(&p("u.data")),
        s(&p("u.index")),
    ]);
    model[3 << 20..(3 << 20) + (64 << 10)].fill(0);
    ok(&[
        "layer",
        "commit",
        "--zfile",
        "--algorithm",
        "zstd",
        "--block-size",
        "16K",
        "-m",
        "upper",
        s(&p("u.data")),
        s(&p("u.index")),
        s(&p("u.zfile")),
    ]);

    for f in ["b.tar", "u.zfile"] {
        let v = ok(&["layer", "verify", "--strict", s(&p(f))]);
        assert!(
            v.contains("OK") && v.contains("strict LSMT rules ok"),
            "{v}"
        );
    }
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["layer", "info", "--json", s(&p("u.zfile"))])).unwrap();
    assert_eq!(info["header"]["flags"], 7);
    assert_eq!(info["trailer"]["flags"], 6);
    assert_eq!(
        info["header"]["parent_uuid"],
        "C0379A64-CBE1-C277-D359-C6A9C388ECC2"
    );
    assert_eq!(info["header"]["user_tag"], "upper");
    assert_eq!(info["nesting"], "zfile(lsmt)");
    assert_eq!(info["trailer"]["index_size"].as_u64().unwrap() % 256, 0);

    let cfg = p("config.v1.json");
    std::fs::write(
        &cfg,
        r#"{"lowers":[{"file":"b.tar"},{"file":"u.zfile"}],"unknownKey":1}"#,
    )
    .unwrap();
    ok(&[
        "image",
        "flatten",
        "--config",
        s(&cfg),
        "-o",
        s(&p("disk.img")),
    ]);
    assert!(std::fs::read(p("disk.img")).unwrap() == model);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["image", "info", "--json", "--config", s(&cfg)])).unwrap();
    assert_eq!(info["virtual_size"], vsize);
    assert_eq!(info["layers"].as_array().unwrap().len(), 2);

    // Sealing, then committing the sealed file, gives the same disk.
    ok(&["layer", "create", s(&p("x.data")), s(&p("x.index"))]);
    ok(&[
        "layer",
        "write",
        "--offset",
        "1M",
        s(&p("x.data")),
        s(&p("x.index")),
        s(&p("up.bin")),
    ]);
    ok(&[
        "layer",
        "discard",
        "--offset",
        "3M",
        "--length",
        "64K",
        s(&p("x.data")),
        s(&p("x.index")),
    ]);
    ok(&["layer", "seal", s(&p("x.data")), s(&p("x.index"))]);
    ok(&["layer", "commit", "--tar", s(&p("x.data")), s(&p("x.tar"))]);
    ok(&["layer", "verify", "--strict", s(&p("x.tar"))]);
    std::fs::write(&cfg, r#"{"lowers":[{"file":"b.tar"},{"file":"x.data"}]}"#).unwrap();
    ok(&[
        "image",
        "flatten",
        "--config",
        s(&cfg),
        "-o",
        s(&p("disk2.img")),
    ]);
    assert!(std::fs::read(p("disk2.img")).unwrap() == model);
    std::fs::write(&cfg, r#"{"lowers":[{"file":"b.tar"},{"file":"x.tar"}]}"#).unwrap();
    ok(&[
        "image",
        "flatten",
        "--config",
        s(&cfg),
        "-o",
        s(&p("disk3.img")),
    ]);
    assert!(std::fs::read(p("disk3.img")).unwrap() == model);
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
