//! A new user's first hour (issue 19): each broken set-up a user runs into
//! is made on purpose, and `obd doctor` must name its cause while the
//! failing command's message says what to do, in the words of
//! docs/TROUBLESHOOTING.md: a registry spoken to in the wrong scheme, one
//! refusing credentials, a host spelt differently for the snapshotter, a
//! containerd without the proxy plugin, CRI with
//! `disable_snapshot_annotations = true`, a node without FUSE, a full disk.
//! The commands the docs show (marked blocks in docs/CONTAINERD.md and
//! docs/TROUBLESHOOTING.md) are [`DOC_COMMANDS`], run here, so the docs
//! cannot drift. Tests needing root, containerd, runc or docker-registry
//! are skipped loudly without them.

#[allow(dead_code)]
#[path = "../src/testbed.rs"]
mod testbed;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use fixtures::procs::{run, short_tempdir, Needs, Procs};
use serde_json::Value;
use testbed::{build_sample, run_ok, Options, Testbed, EXPECTED, WRITTEN};

mod common;
use common::{testbed_bins, OBD};

/// The example registry of the docs; tests put their own in its place.
const DOC_REG: &str = "127.0.0.1:5000";
const DOCTOR: &str = "obd doctor";
const DOCTOR_IMAGE: &str = "obd doctor --image 127.0.0.1:5000/app:obd";
const CONVERT: &str =
    "obd convert --plain-http 127.0.0.1:5000 oci:app-layout:demo docker://127.0.0.1:5000/app:obd";
const PULL: &str = "obd pull --plain-http 127.0.0.1:5000 127.0.0.1:5000/app:obd";
const RUN_DIR: &str = "ctr run --rm --snapshotter obd --snapshotter-label containerd.io/snapshot/overlaybd.writable=dir 127.0.0.1:5000/app:obd c1";
const RUN_LS: &str = "ctr run --rm --snapshotter obd 127.0.0.1:5000/app:obd c2 ls -a /";

/// Every command the docs show in blocks marked as run by this file.
const DOC_COMMANDS: &[&str] = &[DOCTOR, DOCTOR_IMAGE, CONVERT, PULL, RUN_DIR, RUN_LS];
/// The docs whose marked blocks hold them.
const DOCS: &[&str] = &["docs/CONTAINERD.md", "docs/TROUBLESHOOTING.md"];
const MARK: &str = "<!-- commands run by crates/obd/tests/first_hour.rs -->";

fn doc(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The command lines of the `sh` blocks that follow [`MARK`] in `text`.
fn marked_commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(l) = lines.next() {
        if l != MARK {
            continue;
        }
        assert_eq!(
            lines.next(),
            Some("```sh"),
            "a marked block must follow {MARK}"
        );
        for l in lines.by_ref() {
            if l == "```" {
                break;
            }
            if !l.is_empty() && !l.starts_with('#') {
                out.push(l.to_string());
            }
        }
    }
    out
}

#[test]
fn every_documented_command_is_run_here() {
    let mut shown = Vec::new();
    for d in DOCS {
        let cmds = marked_commands(&doc(d));
        assert!(!cmds.is_empty(), "{d} has no marked commands");
        for c in cmds {
            assert!(
                DOC_COMMANDS.contains(&c.as_str()),
                "{d} shows `{c}`, which no test runs: add it to DOC_COMMANDS and run it"
            );
            shown.push(c);
        }
    }
    for c in DOC_COMMANDS {
        assert!(
            shown.iter().any(|s| s == c),
            "`{c}` is run here but no doc shows it"
        );
    }
}

/// `template` (one of [`DOC_COMMANDS`]) as arguments, with `reg` for the
/// docs' registry and `cid(c)` for container ids `c1`, `c2`.
fn doc_args(template: &str, reg: &str, cid: &dyn Fn(&str) -> String) -> Vec<String> {
    assert!(DOC_COMMANDS.contains(&template));
    template
        .split_whitespace()
        .skip(1)
        .map(|w| match w {
            "c1" | "c2" => cid(w),
            w => w.replace(DOC_REG, reg),
        })
        .collect()
}

/// Asserts that `out` says what docs/TROUBLESHOOTING.md's entry whose
/// heading contains `key` says: the heading's last backquoted message, with
/// `subst` applied, piece by piece around `…` (backquotes ignored).
fn says_as_documented(key: &str, subst: &[(&str, &str)], out: &str) {
    let text = doc("docs/TROUBLESHOOTING.md");
    let heading = text
        .lines()
        .find(|l| l.starts_with("### ") && l.contains(key))
        .unwrap_or_else(|| panic!("docs/TROUBLESHOOTING.md has no entry for {key:?}"));
    let msg = heading.rsplit('`').nth(1).expect("a backquoted message");
    let out = out.replace('`', "");
    for part in msg.split('…').map(str::trim).filter(|p| !p.is_empty()) {
        let part = subst
            .iter()
            .fold(part.to_string(), |p, (a, b)| p.replace(a, b));
        assert!(
            out.contains(&part),
            "the message should say {part:?} (docs/TROUBLESHOOTING.md: {heading}); it says:\n{out}"
        );
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn obd(args: &[&str]) -> Command {
    let mut c = Command::new(OBD);
    c.args(args);
    c
}

/// `obd doctor --json` with `args`: the exit status and its checks.
fn doctor(mut cmd: Command) -> (bool, Vec<Value>) {
    let out = cmd.arg("--json").output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("obd doctor --json: {e}:\n{}", text(&out)));
    assert_eq!(v["ok"].as_bool(), Some(out.status.success()), "{v}");
    (
        out.status.success(),
        v["checks"].as_array().unwrap().clone(),
    )
}

/// The check `area`/`name`, asserting its status; returns detail + fix.
fn check(checks: &[Value], area: &str, name: &str, status: &str) -> String {
    let c = checks
        .iter()
        .find(|c| c["area"] == area && c["name"] == name)
        .unwrap_or_else(|| panic!("no check {area}/{name}: {checks:?}"));
    assert_eq!(c["status"], status, "{area}/{name}: {c}");
    format!(
        "{} fix: {}",
        c["detail"].as_str().unwrap_or(""),
        c["fix"].as_str().unwrap_or("")
    )
}

/// A snapshotter config in `dir` with its root under `root` (no service
/// config: the workers' defaults).
fn snapshotter_config(dir: &Path, root: &Path) -> PathBuf {
    let p = dir.join("snapshotter.toml");
    std::fs::write(
        &p,
        format!(
            "root = \"{}\"\naddress = \"{}\"\n",
            root.display(),
            dir.join("obd.sock").display()
        ),
    )
    .unwrap();
    p
}

/// `obd doctor` over the snapshotter config `sn` and the containerd config
/// `ctd`.
fn doctor_cmd(sn: &Path, ctd: &Path) -> Command {
    let mut c = obd(&["doctor", "--snapshotter-config"]);
    c.arg(sn).arg("--containerd-config").arg(ctd);
    c
}

#[test]
fn one_spelling_for_registry_and_platform_options() {
    for cmd in [
        &["convert"][..],
        &["pull"],
        &["trace", "record"],
        &["image", "flatten"],
        &["image", "info"],
    ] {
        let help = run(obd(cmd).arg("--help"));
        let want: &[&str] = if cmd[0] == "image" {
            &[
                "--plain-http <HOST>",
                "--insecure <HOST>",
                "--credential-file <FILE>",
            ]
        } else {
            &[
                "--plain-http <HOST>",
                "--insecure <HOST>",
                "--credential-file <FILE>",
                "--platform <OS/ARCH>",
            ]
        };
        for w in want {
            assert!(help.contains(w), "obd {cmd:?} --help lacks {w}:\n{help}");
        }
    }
    // The old switch still works, with a note; the host it means is the
    // image's (nothing listens there: refused, said as documented).
    let out = obd(&[
        "pull",
        "--plain-http",
        "127.0.0.1:1/app:obd",
        "-a",
        "/nonexistent.sock",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("`--plain-http` without a host is deprecated; write `--plain-http HOST`"),
        "{t}"
    );
    says_as_documented("connection refused", &[("HOST", "127.0.0.1:1")], &t);
    assert!(t.contains("http://127.0.0.1:1"), "plain HTTP was used: {t}");
}

#[test]
fn wrong_scheme_and_refused_credentials_fail_before_converting() {
    if !Needs::tools(&["docker-registry", "htpasswd"]).met("first hour: registry set-ups") {
        return;
    }
    let tmp = short_tempdir("obd-fh-");
    let dir = |d: &str| {
        let p = tmp.path().join(d);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let reg = fixtures::registry::Registry::start(&dir("plain")).unwrap();
    let host = reg.addr.clone();
    // The source is not even read: the destination is checked first.
    let t0 = Instant::now();
    let out = obd(&[
        "convert",
        "oci:/nonexistent:x",
        &format!("docker://{host}/app:obd"),
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t0.elapsed() < Duration::from_secs(10), "fail fast: {t}");
    assert!(t.contains("before converting"), "{t}");
    says_as_documented("answered plain HTTP", &[("HOST", &host)], &t);
    assert!(
        !t.contains("after 3 tries"),
        "no retries of a set-up error: {t}"
    );

    // obd doctor names it for the snapshotter's settings (none: HTTPS).
    let sn = snapshotter_config(tmp.path(), &tmp.path().join("root"));
    let mut c = doctor_cmd(&sn, &tmp.path().join("no-containerd.toml"));
    c.args(["--image", &format!("{host}/app:obd")]);
    let (ok, checks) = doctor(c);
    assert!(!ok);
    let m = check(&checks, "registry", "manifest", "fail");
    assert!(m.contains(&format!("{host} answered plain HTTP")), "{m}");
    assert!(
        m.contains(&format!("[registry.hosts.\"{host}\"] plain_http = true")),
        "{m}"
    );

    // A registry that wants credentials, and none are given.
    let basic = fixtures::registry::Registry::start_basic(&dir("basic"), "u", "p").unwrap();
    let empty = tmp.path().join("docker-config");
    std::fs::create_dir_all(&empty).unwrap();
    let out = obd(&[
        "convert",
        "--plain-http",
        &basic.addr,
        "oci:/nonexistent:x",
        &format!("docker://{}/app:obd", basic.addr),
    ])
    .env("DOCKER_CONFIG", &empty)
    .output()
    .unwrap();
    assert!(!out.status.success());
    says_as_documented(
        "authentication to HOST failed",
        &[("HOST", &basic.addr)],
        &text(&out),
    );
}

/// A containerd config with CRI enabled and `disable_snapshot_annotations`
/// as `dsa`, with or without the proxy plugin.
fn containerd_config(dir: &Path, sn_sock: &Path, proxy: bool, dsa: bool) -> PathBuf {
    let mut s = String::from("version = 2\n");
    if proxy {
        s += &format!(
            "[proxy_plugins.obd]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            sn_sock.display()
        );
    }
    s += &format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"obd\"\n  disable_snapshot_annotations = {dsa}\n"
    );
    let p = dir.join(format!("containerd-{proxy}-{dsa}.toml"));
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn doctor_reads_the_containerd_config() {
    let tmp = short_tempdir("obd-fh-");
    let sn = snapshotter_config(tmp.path(), &tmp.path().join("root"));
    let sock = tmp.path().join("obd.sock");
    let good = containerd_config(tmp.path(), &sock, true, false);
    let (_, checks) = doctor(doctor_cmd(&sn, &good));
    check(&checks, "containerd", "proxy plugin", "ok");
    check(&checks, "containerd", "CRI snapshotter", "ok");
    check(&checks, "containerd", "snapshot annotations", "ok");
    // Nothing listens on the sockets here.
    let s = check(&checks, "snapshotter", "socket", "fail");
    assert!(s.contains("start obd-snapshotter"), "{s}");

    let no_proxy = containerd_config(tmp.path(), &sock, false, false);
    let (ok, checks) = doctor(doctor_cmd(&sn, &no_proxy));
    assert!(!ok);
    let p = check(&checks, "containerd", "proxy plugin", "fail");
    assert!(p.contains("no [proxy_plugins.obd]"), "{p}");
    assert!(
        p.contains(&format!(
            "add `[proxy_plugins.obd] type = \"snapshot\" address = \"{}\"`",
            sock.display()
        )),
        "{p}"
    );

    let dsa = containerd_config(tmp.path(), &sock, true, true);
    let (_, checks) = doctor(doctor_cmd(&sn, &dsa));
    let d = check(&checks, "containerd", "snapshot annotations", "warn");
    assert!(
        d.contains("disable_snapshot_annotations = true (set)"),
        "{d}"
    );
    assert!(
        d.contains("set disable_snapshot_annotations = false in [plugins.\"io.containerd.grpc.v1.cri\".containerd]"),
        "{d}"
    );
}

/// A tmpfs of 4 MiB at `dir`, filled; unmounted on drop.
struct FullDisk(PathBuf);

impl FullDisk {
    fn new(dir: &Path) -> FullDisk {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "obd-full"])
            .arg(dir));
        let disk = FullDisk(dir.to_path_buf());
        let mut f = std::fs::File::create(dir.join("filler")).unwrap();
        let block = vec![0x5au8; 64 << 10];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        disk
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn no_fuse_and_a_full_disk() {
    if !Needs::root(&["mount", "umount"]).met("first hour: no FUSE, full disk") {
        return;
    }
    let tmp = short_tempdir("obd-fh-");
    let sn = snapshotter_config(tmp.path(), &tmp.path().join("root"));
    let ctd = tmp.path().join("no-containerd.toml");

    // No FUSE (simulated: OBD_TEST_FUSE_DEV, test only).
    let mut c = doctor_cmd(&sn, &ctd);
    c.env("OBD_TEST_FUSE_DEV", "/nonexistent");
    let (ok, checks) = doctor(c);
    assert!(!ok);
    let f = check(&checks, "kernel", "FUSE", "fail");
    assert!(
        f.contains("/nonexistent is missing") && f.contains("modprobe fuse"),
        "{f}"
    );
    let out = obd(&["demo"])
        .env("OBD_TEST_FUSE_DEV", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    // `obd demo` checks its tools first; where they are, FUSE is next.
    if ["containerd", "ctr", "runc", "docker-registry"]
        .iter()
        .all(|t| fixtures::procs::have(t))
    {
        says_as_documented("/dev/fuse is missing", &[("/dev/fuse", "/nonexistent")], &t);
    }

    // A full disk under the snapshotter root (hence its block cache).
    let full = tmp.path().join("full");
    let _disk = FullDisk::new(&full);
    let sn = snapshotter_config(tmp.path(), &full.join("root"));
    let (ok, checks) = doctor(doctor_cmd(&sn, &ctd));
    assert!(!ok);
    for name in ["block cache", "snapshotter root"] {
        let c = check(&checks, "cache", name, "fail");
        assert!(
            c.contains("the disk is full") && c.contains("free space"),
            "{c}"
        );
    }
    // A command writing there says what to do.
    let cfg = fixtures::interop().join("stack-lz4/config.v1.json");
    let out = obd(&["image", "flatten", "--config"])
        .arg(&cfg)
        .arg("-o")
        .arg(full.join("disk.img"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    says_as_documented("the disk is full", &[], &text(&out));
}

/// The containerd set-ups: the documented install (convert, doctor, pull,
/// ctr run with rw mode `dir`, `/lost+found`), then a host the snapshotter
/// does not know, a plain pull (what CRI does with
/// `disable_snapshot_annotations = true`) and a containerd without the
/// proxy plugin.
#[test]
fn containerd_set_ups() {
    let Some((obd_bin, sn_bin)) = testbed_bins(
        "first hour: containerd set-ups",
        &["containerd", "ctr", "runc", "docker-registry"],
    ) else {
        return;
    };
    let mut opts = Options::new(obd_bin, sn_bin);
    opts.prefix = "obd-fh-".into();
    let mut tb = Testbed::new(opts).unwrap();
    tb.start_registry().unwrap();
    let reg = tb.reg.clone();
    let tag = tb.cid("");
    let cid = move |c: &str| format!("{c}{tag}");
    build_sample(&tb.dir.join("app-layout"), 2, 1 << 20).unwrap();
    run(obd(&[])
        .args(doc_args(CONVERT, &reg, &cid))
        .current_dir(&tb.dir));
    tb.start_runtime().unwrap();

    // The documented checks and pull on a node set up as documented (the
    // test bed's private configs and socket added).
    assert_eq!(doc_args(DOCTOR, &reg, &cid), ["doctor"]);
    let (ok, checks) = doctor(tb.doctor(None));
    assert!(ok, "{checks:?}");
    let args = doc_args(DOCTOR_IMAGE, &reg, &cid);
    assert_eq!(args[0], "doctor");
    let mut c = tb.doctor(None);
    c.args(&args[1..]);
    let (ok, checks) = doctor(c);
    assert!(ok, "{checks:?}");
    check(&checks, "registry", "blob read", "ok");
    let image = format!("{reg}/app:obd");
    let out = obd(&[])
        .args(doc_args(PULL, &reg, &cid))
        .arg("-a")
        .arg(&tb.sock)
        .arg("--snapshotter-config")
        .arg(tb.snapshotter_config())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("warning"), "{}", text(&out));

    // rw mode dir through ctr, and /lost+found at the root.
    let ctr = |t: &str| {
        let mut c = tb.ctr();
        c.args(doc_args(t, &reg, &cid));
        run_ok(&mut c).unwrap()
    };
    assert_eq!(ctr(RUN_DIR).trim(), format!("{EXPECTED}\n{WRITTEN}"));
    let root = ctr(RUN_LS);
    assert!(root.lines().any(|l| l == "lost+found"), "{root}");

    // The same registry by another name: the pull works, the snapshotter
    // could not read the blobs, and both commands say so.
    let other = reg.replace("127.0.0.1", "localhost");
    let moved = format!("{other}/app:obd");
    let mut pull = tb.obd();
    pull.args(["pull", "--plain-http", &other, "-n", "other", "-a"])
        .arg(&tb.sock)
        .arg("--snapshotter-config")
        .arg(tb.snapshotter_config())
        .arg(&moved);
    let out = pull.output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    says_as_documented("cannot read this image's blobs", &[], &t);
    assert!(
        t.contains("Containers of this image will fail to attach"),
        "{t}"
    );
    assert!(t.contains(&format!("{other} answered plain HTTP")), "{t}");
    let (ok, checks) = doctor(tb.doctor(Some(&moved)));
    assert!(!ok);
    let m = check(&checks, "registry", "manifest", "fail");
    assert!(
        m.contains(&format!("[registry.hosts.\"{other}\"] plain_http = true")),
        "{m}"
    );

    // A plain pull (no image reference reaches the snapshotter): the
    // snapshotter's log says how to get lazy pulls.
    let mut c = tb.ctr();
    c.args([
        "-n",
        "plain",
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "obd",
        &image,
    ]);
    run_ok(&mut c).unwrap();
    let log = std::fs::read_to_string(tb.dir.join("snapshotter.log")).unwrap();
    says_as_documented("obd layer was downloaded in full", &[], &log);
    assert!(
        log.contains("disable_snapshot_annotations = false"),
        "{log}"
    );

    // containerd without the proxy plugin.
    let bare = short_tempdir("obd-fh-c-");
    let cfg = bare.path().join("config.toml");
    let text_cfg = fixtures::containerd::config(bare.path(), &tb.sn_sock);
    let cut = text_cfg
        .find("[proxy_plugins]")
        .expect("the proxy plugin section");
    std::fs::write(&cfg, &text_cfg[..cut]).unwrap();
    let mut procs = Procs::new();
    let sock = fixtures::containerd::start(&mut procs, bare.path(), &cfg);
    let out = obd(&["pull", "--plain-http", &reg, "-a"])
        .arg(&sock)
        .arg(&image)
        .output()
        .unwrap();
    assert!(!out.status.success());
    says_as_documented("containerd has no snapshotter obd", &[], &text(&out));
    let mut c = doctor_cmd(&tb.snapshotter_config(), &cfg);
    c.arg("--address").arg(&sock);
    let (ok, checks) = doctor(c);
    assert!(!ok);
    check(&checks, "containerd", "proxy plugin", "fail");
    drop(procs);
}
