//! The shipped containerd configs (`contrib/containerd/`): both parse and
//! carry the keys lazy pull depends on; the one for the running containerd's
//! version (1.6 by default, 1.7 or 2.1 with `scripts/containerd-matrix.sh
//! env`) is loaded for real (private root, state and sockets; CRI enabled)
//! next to `obd-snapshotter`, and `ctr plugins ls` must show the obd proxy
//! snapshotter and CRI as ok. The containerd part needs root and containerd;
//! otherwise it is skipped with a loud message.

use fixtures::containerd::{self, ctr};
use fixtures::procs::{run, Needs, Procs};
use snapshotter::config::DEFAULT_ADDRESS;
use std::path::{Path, PathBuf};

fn contrib(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../contrib/containerd")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn get<'a>(v: &'a toml::Value, path: &[&str]) -> &'a toml::Value {
    path.iter().fold(v, |v, k| {
        v.get(k)
            .unwrap_or_else(|| panic!("missing key {k} in {}", path.join(".")))
    })
}

#[test]
fn configs_carry_the_lazy_pull_keys() {
    let v: toml::Value = toml::from_str(&contrib("config-1.6-1.7.toml")).unwrap();
    assert_eq!(get(&v, &["version"]).as_integer(), Some(2));
    let obd = get(&v, &["proxy_plugins", "obd"]);
    assert_eq!(get(obd, &["type"]).as_str(), Some("snapshot"));
    assert_eq!(get(obd, &["address"]).as_str(), Some(DEFAULT_ADDRESS));
    let cri = get(&v, &["plugins", "io.containerd.grpc.v1.cri", "containerd"]);
    assert_eq!(get(cri, &["snapshotter"]).as_str(), Some("obd"));
    assert_eq!(
        get(cri, &["disable_snapshot_annotations"]).as_bool(),
        Some(false)
    );

    let v: toml::Value = toml::from_str(&contrib("config-2.x.toml")).unwrap();
    assert_eq!(get(&v, &["version"]).as_integer(), Some(3));
    let obd = get(&v, &["proxy_plugins", "obd"]);
    assert_eq!(get(obd, &["type"]).as_str(), Some("snapshot"));
    assert_eq!(get(obd, &["address"]).as_str(), Some(DEFAULT_ADDRESS));
    assert!(obd.get("capabilities").is_none(), "no rebase capability");
    assert_eq!(
        get(obd, &["exports", "enable_remote_snapshot_annotations"]).as_str(),
        Some("true")
    );
    assert_eq!(
        get(obd, &["exports", "root"]).as_str(),
        Some(snapshotter::config::DEFAULT_ROOT)
    );
    let images = get(&v, &["plugins", "io.containerd.cri.v1.images"]);
    assert_eq!(get(images, &["snapshotter"]).as_str(), Some("obd"));
    assert_eq!(
        get(images, &["disable_snapshot_annotations"]).as_bool(),
        Some(false)
    );
    let unpack = get(
        &v,
        &[
            "plugins",
            "io.containerd.transfer.v1.local",
            "unpack_config",
        ],
    )
    .as_array()
    .unwrap();
    assert!(unpack.iter().any(|u| {
        u.get("snapshotter").and_then(|s| s.as_str()) == Some("obd")
            && u.get("platform").and_then(|s| s.as_str()) == Some("linux")
    }));
}

/// The shipped config for containerd `major` (1: `config-1.6-1.7.toml`,
/// 2: `config-2.x.toml`), pointed at private paths under `dir`.
fn private_config(dir: &Path, sn_sock: &Path, major: u32) -> String {
    let shipped = contrib(if major >= 2 {
        "config-2.x.toml"
    } else {
        "config-1.6-1.7.toml"
    });
    assert!(shipped.contains(DEFAULT_ADDRESS));
    let shipped = shipped.replace(
        snapshotter::config::DEFAULT_ROOT,
        &dir.join("snroot").to_string_lossy(),
    );
    let mut out = String::new();
    for line in shipped
        .replace(DEFAULT_ADDRESS, &sn_sock.to_string_lossy())
        .lines()
    {
        out.push_str(line);
        out.push('\n');
        // Top-level keys must precede the first table.
        if line.trim() == "version = 2" || line.trim() == "version = 3" {
            out.push_str(&format!(
                "root = \"{d}/root\"\nstate = \"{d}/state\"\n",
                d = dir.display()
            ));
        }
    }
    out.push_str(&format!(
        r#"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[metrics]
  address = ""
"#,
        d = dir.display()
    ));
    out
}

/// The shipped config of the running containerd's major version, loaded for
/// real (1.6 by default; 1.7 or 2.1 through `scripts/containerd-matrix.sh
/// env`): CRI reads snapshotter obd with snapshot annotations, and obd and
/// CRI load as ok plugins.
#[test]
fn containerd_loads_the_shipped_config() {
    if !Needs::root(&["containerd", "ctr"]).met("containerd config check") {
        return;
    }
    let install = containerd::installed().expect("containerd");
    let major = install.version.major;
    eprintln!("containerd {}", install.version);
    let tmp = fixtures::procs::short_tempdir("obd-cfg-");
    let dir: PathBuf = tmp.path().into();
    let sn_sock = containerd::snapshotter_socket(&dir);
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, private_config(&dir, &sn_sock, major)).unwrap();

    // containerd reads the CRI section as the shipped file says.
    let dump = run(install
        .command()
        .arg("--config")
        .arg(&cfg)
        .args(["config", "dump"]));
    let dumped: toml::Value = toml::from_str(&dump).unwrap();
    let cri = if major >= 2 {
        get(&dumped, &["plugins", "io.containerd.cri.v1.images"])
    } else {
        get(
            &dumped,
            &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        )
    };
    assert_eq!(get(cri, &["snapshotter"]).as_str(), Some("obd"), "{dump}");
    assert_eq!(
        get(cri, &["disable_snapshot_annotations"]).as_bool(),
        Some(false),
        "{dump}"
    );

    let mut procs = Procs::new();
    let sn = Path::new(env!("CARGO_BIN_EXE_obd-snapshotter"));
    containerd::start_snapshotter(&mut procs, sn, &dir);
    let sock = containerd::start(&mut procs, &dir, &cfg);
    let ctr = || ctr(&sock);
    let plugins = run(ctr().args(["plugins", "ls"]));
    let ok = |ty: &str, id: &str| {
        plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&ty) && f.get(1) == Some(&id) && f.last() == Some(&"ok")
        })
    };
    let log = || std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
    assert!(
        ok("io.containerd.snapshotter.v1", "obd"),
        "obd is not an ok snapshotter plugin:\n{plugins}\n{}",
        log()
    );
    assert!(
        ok("io.containerd.grpc.v1", "cri"),
        "the CRI plugin did not load:\n{plugins}\n{}",
        log()
    );
    if major >= 2 {
        for id in ["images", "runtime"] {
            assert!(
                ok("io.containerd.cri.v1", id),
                "io.containerd.cri.v1.{id} did not load:\n{plugins}\n{}",
                log()
            );
        }
        assert!(
            ok("io.containerd.transfer.v1", "local"),
            "the transfer service did not load (unpack_config):\n{plugins}\n{}",
            log()
        );
    }
    // containerd reaches the snapshotter through the proxy.
    let snaps = run(ctr().args(["snapshots", "--snapshotter", "obd", "ls"]));
    assert!(snaps.starts_with("KEY"), "{snaps}");
    drop(procs);
}
