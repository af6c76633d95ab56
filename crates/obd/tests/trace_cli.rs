//! `obd trace dump` and `obd trace replay` on the §5.2 check vector and the
//! interop stack.

use std::process::Command;

use serde_json::Value;

const OBD: &str = env!("CARGO_BIN_EXE_obd");

/// formats.md §5.2's check vector: ('R', layer 0, 4096 @ 4096) and
/// ('R', layer 2, 65536 @ 1 MiB).
const VECTOR: [u8; 72] = [
    0x20, 0x18, 0xef, 0xc2, 0, 0, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0xf1, 0xae, 0x06, 0x68, 0, 0, 0,
    0, //
    0x52, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, //
    0x52, 0, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0,
];

fn obd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(OBD).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dump_and_replay_the_check_vector() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    std::fs::write(&trace, VECTOR).unwrap();
    let t = trace.to_str().unwrap();

    let (ok, out, err) = obd(&["trace", "dump", t]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].ends_with("2 records, 69632 bytes"), "{out}");
    assert_eq!(lines[1], "R layer 0 offset 4096 count 4096");
    assert_eq!(lines[2], "R layer 2 offset 1048576 count 65536");

    let (ok, out, err) = obd(&["trace", "dump", "--json", t]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"][1]["layer"], 2);
    assert_eq!(v["records"][1]["count"], 65536);

    let cfg = fixtures::interop().join("stack-lz4/config.v1.json");
    let (ok, out, err) = obd(&[
        "trace",
        "replay",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
        "--trace",
        t,
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 2);
    assert_eq!(v["requests"], 2);
    assert_eq!(v["done"], 2);
    assert_eq!(v["bytes"], 4096 + 65536);
    assert_eq!(v["errors"], 0);

    // A damaged trace is an error naming the file and the field.
    std::fs::write(&trace, &VECTOR[..60]).unwrap();
    let (ok, _, err) = obd(&["trace", "dump", t]);
    assert!(!ok);
    assert!(err.contains(t) && err.contains("data_size"), "{err}");
}
