//! Hostile layer tars and descriptors (issue 16): long names, deep paths,
//! link-count overflow, whiteout storms, control characters, lying
//! descriptors and the scratch directory of failed conversions. Each case
//! asserts the exact outcome: the error variant and the entry it names, or
//! a file system that `e2fsck -fn` passes holding the expected tree.
use std::fs;
use std::path::Path;
use std::time::Instant;

use converter::Error;
use serde_json::Value;

mod common;
use common::*;

/// Converts `layers` (plain tars) into `<tmp>/out`; the error if it fails.
fn convert_tars(tmp: &Path, layers: Vec<Vec<u8>>) -> converter::Result<converter::Report> {
    let src = tmp.join("src");
    let specs: Vec<_> = layers.into_iter().map(|t| (t, "")).collect();
    make_layout(&src, "v1", &specs);
    convert_layout(&src, "v1", &tmp.join("out"), "t")
}

/// The converted tree of `<tmp>/out:t`, after `e2fsck -fn` passed it.
fn checked_tree(tmp: &Path) -> std::collections::BTreeMap<Vec<u8>, converter::tree::Node> {
    let raw = tmp.join("raw.img");
    flatten(&output_blobs(&tmp.join("out"), "t"), &raw);
    e2fsck_clean(&raw);
    ext4_tree(&raw)
}

/// The cause inside `Layer { index, .. }` and `Entry { path, .. }`.
fn entry_error(e: Error) -> (usize, String, Error) {
    match e {
        Error::Layer { index, cause, .. } => match *cause {
            Error::Entry { path, cause } => (index, path, *cause),
            other => panic!("not an entry error: {other}"),
        },
        other => panic!("not a layer error: {other}"),
    }
}

/// Paths (outside lost+found) of a tree.
fn paths(t: &std::collections::BTreeMap<Vec<u8>, converter::tree::Node>) -> Vec<String> {
    t.keys()
        .filter(|p| !p.is_empty() && !p.starts_with(b"lost+found"))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

#[test]
fn names_over_255_bytes_are_refused_not_truncated() {
    // 255 bytes is fine, as a file, a directory and a symlink.
    let tmp = tempfile::tempdir().unwrap();
    let n255 = "n".repeat(255);
    let d255 = format!("d{}", &n255[1..]);
    let mut l = Layer::new();
    l.file(&n255, 0o644, b"a");
    l.file(&format!("{d255}/{n255}"), 0o644, b"b");
    l.link(tar::EntryType::Symlink, &format!("s/{n255}"), "x");
    convert_tars(tmp.path(), vec![l.finish()]).unwrap();
    let t = checked_tree(tmp.path());
    assert!(t.contains_key(n255.as_bytes()));
    assert!(t.contains_key(format!("{d255}/{n255}").as_bytes()));
    assert!(t.contains_key(format!("s/{n255}").as_bytes()));

    // 256 + 6 bytes used to come out as the 6-byte name `AAAAAA`; 256 + 0
    // as an empty name. Every kind of entry and a parent directory.
    let long = format!("{}passwd", "A".repeat(256));
    for (what, make) in [
        (
            "file",
            Box::new(|l: &mut Layer, p: &str| {
                l.file(p, 0o644, b"x");
            }) as Box<dyn Fn(&mut Layer, &str)>,
        ),
        (
            "dir",
            Box::new(|l: &mut Layer, p: &str| {
                l.dir(p, 0o755);
            }),
        ),
        (
            "symlink",
            Box::new(|l: &mut Layer, p: &str| {
                l.link(tar::EntryType::Symlink, p, "target");
            }),
        ),
        (
            "hardlink",
            Box::new(|l: &mut Layer, p: &str| {
                l.file("etc/real", 0o644, b"r");
                l.link(tar::EntryType::Link, p, "etc/real");
            }),
        ),
        (
            "fifo",
            Box::new(|l: &mut Layer, p: &str| {
                l.node(tar::EntryType::Fifo, p, 0o644, 0, 0);
            }),
        ),
        (
            "parent",
            Box::new(|l: &mut Layer, p: &str| {
                l.file(&format!("{p}/child"), 0o644, b"x");
            }),
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut l = Layer::new();
        l.dir("etc", 0o755);
        let path = format!("etc/{long}");
        make(&mut l, &path);
        let e = convert_tars(tmp.path(), vec![l.finish()]).unwrap_err();
        let (index, entry, cause) = entry_error(e);
        assert_eq!(index, 0, "{what}");
        let want_entry = if what == "parent" {
            format!("{path}/child")
        } else {
            path.clone()
        };
        assert_eq!(entry, want_entry, "{what}");
        match cause {
            Error::NameTooLong { name, len } => {
                assert_eq!((name.as_str(), len), (long.as_str(), 262), "{what}")
            }
            other => panic!("{what}: {other}"),
        }
    }
}

/// A path `depth` levels of `a/` deep, then `tail`.
fn deep(depth: usize, tail: &str) -> String {
    let mut p = "a/".repeat(depth);
    p.push_str(tail);
    p
}

#[test]
fn paths_twenty_thousand_levels_deep_apply_without_recursion() {
    // Test threads have 2 MiB stacks: any recursion per level would
    // overflow long before 20,000 levels.
    let tmp = tempfile::tempdir().unwrap();
    let depth = 20_000;
    let mut l0 = Layer::new();
    l0.file(&deep(depth, "f"), 0o644, b"deep");
    l0.file(&deep(10, "keep"), 0o644, b"k");
    l0.file("top", 0o644, b"t");
    // A symlink into the deep tree (ext4 keeps targets under 4 KiB), and
    // an entry created through it.
    l0.link(tar::EntryType::Symlink, "mid", &deep(1_999, "a"));
    l0.file("mid/through", 0o644, b"via link");
    l0.file(&deep(2_000, "b"), 0o644, b"b");
    let mut l1 = Layer::new();
    // An opaque directory halfway down hides the 10,000 levels below it;
    // whiteouts 2,000 and 10 levels down.
    l1.file(&deep(10_000, ".wh..wh..opq"), 0o644, b"");
    l1.file(&deep(10_000, "new"), 0o644, b"n");
    l1.file("mid/.wh.b", 0o644, b"");
    l1.file(&deep(10, ".wh.keep"), 0o644, b"");
    convert_tars(tmp.path(), vec![l0.finish(), l1.finish()]).unwrap();
    let t = checked_tree(tmp.path());
    let mut want: Vec<String> = (1..=10_000)
        .map(|k| deep(k, "").trim_end_matches('/').to_string())
        .collect();
    want.extend(["top", "mid"].map(String::from));
    want.push(deep(2_000, "through"));
    want.push(deep(10_000, "new"));
    want.sort();
    assert_eq!(paths(&t), want);
    assert_eq!(t[deep(2_000, "through").as_bytes()].size, 8);

    // The whole 20,000-level tree whited out at its top.
    let tmp = tempfile::tempdir().unwrap();
    let mut l0 = Layer::new();
    l0.file(&deep(depth, "f"), 0o644, b"deep");
    let mut l1 = Layer::new();
    l1.file(".wh.a", 0o644, b"");
    l1.file(&deep(3, "again"), 0o644, b"a");
    convert_tars(tmp.path(), vec![l0.finish(), l1.finish()]).unwrap();
    let t = checked_tree(tmp.path());
    assert_eq!(paths(&t), ["a", "a/a", "a/a/a", "a/a/a/again"]);
}

#[test]
fn hard_links_stop_at_ext4s_limit_and_no_inode_is_freed_in_use() {
    // 65,000 names on one inode is the limit: the next link is refused,
    // naming the entry and its target.
    let tmp = tempfile::tempdir().unwrap();
    let mut l = Layer::new();
    l.file("d/target", 0o644, b"x");
    for i in 1..66_000 {
        l.link(tar::EntryType::Link, &format!("d/l{i:05}"), "d/target");
    }
    let (index, entry, cause) =
        entry_error(convert_tars(tmp.path(), vec![l.finish()]).unwrap_err());
    assert_eq!((index, entry.as_str()), (0, "d/l65000"));
    match cause {
        Error::TooManyLinks { target, links, max } => {
            assert_eq!((target.as_str(), links, max), ("d/target", 65_000, 65_000))
        }
        other => panic!("{other}"),
    }

    // At the limit, whiteouts of some names then new files: the inode keeps
    // its exact count, nothing reuses it, and the others still read it.
    let tmp = tempfile::tempdir().unwrap();
    let mut l0 = Layer::new();
    l0.file("d/target", 0o644, b"x");
    for i in 1..65_000 {
        l0.link(tar::EntryType::Link, &format!("d/l{i:05}"), "d/target");
    }
    let mut l1 = Layer::new();
    for i in 1..=500 {
        l1.file(&format!("d/.wh.l{i:05}"), 0o644, b"");
    }
    for i in 0..500 {
        l1.file(&format!("new{i}"), 0o644, format!("new {i}").as_bytes());
    }
    l1.link(tar::EntryType::Link, "d/again", "d/target");
    convert_tars(tmp.path(), vec![l0.finish(), l1.finish()]).unwrap();
    let t = checked_tree(tmp.path());
    let target = &t[&b"d/target"[..]];
    assert_eq!(target.content.as_deref(), Some(&sha(b"x")[7..]));
    let same = t.values().filter(|n| n.ino == target.ino).count();
    assert_eq!(same, 65_000 - 500 + 1);
    for i in 0..500 {
        let n = &t[format!("new{i}").as_bytes()];
        assert_ne!(n.ino, target.ino);
        assert_eq!(
            n.content.as_deref(),
            Some(&sha(format!("new {i}").as_bytes())[7..])
        );
    }
}

/// 65,535 names in one directory, then a layer whiting out every one: the
/// whiteout layer applies in linear time (it took 41 s when every unlink
/// scanned the whole directory; about 1 s now).
#[test]
fn whiteout_storm_is_linear() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 65_535;
    let mut l0 = Layer::new();
    l0.dir("d", 0o755);
    l0.file("d/t0", 0o644, b"x");
    l0.file("d/t1", 0o644, b"y");
    for i in 0..n {
        let t = format!("d/t{}", i / 60_000);
        l0.link(tar::EntryType::Link, &format!("d/l{i:05}"), &t);
    }
    let mut l1 = Layer::new();
    for i in 0..n {
        l1.file(&format!("d/.wh.l{i:05}"), 0o644, b"");
    }
    let t = Instant::now();
    let r = convert_tars(tmp.path(), vec![l0.finish(), l1.finish()]).unwrap();
    eprintln!(
        "apply seconds: layer 0 {:.2}, layer 1 ({} whiteouts) {:.2}; conversion {:.2}",
        r.layers[0].apply_seconds,
        r.layers[1].apply.whiteouts,
        r.layers[1].apply_seconds,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(r.layers[1].apply.whiteouts, n as u64);
    let t = checked_tree(tmp.path());
    assert_eq!(paths(&t), ["d", "d/t0", "d/t1"]);
}

#[test]
fn control_characters_in_names_are_escaped_in_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = Layer::new();
    l.link(
        tar::EntryType::Link,
        "evil\u{1b}[2J\r\nname\u{202e}",
        "no\u{7}such\\target",
    );
    let e = convert_tars(tmp.path(), vec![l.finish()]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(
            "entry `evil\\u{1b}[2J\\r\\nname\\u{202e}`: bad tar entry: hard link target \
             `no\\u{7}such\\\\target` does not exist"
        ),
        "{msg}"
    );
    assert!(!msg.chars().any(|c| c.is_control()), "{msg:?}");

    // A digest from the manifest, printed where it names the layer.
    let mut l = Layer::new();
    l.file("f", 0o644, b"x");
    let (_t, e) = lie(&[(l.finish(), "")], |m| {
        m["layers"][0]["digest"] = "sha256:\u{1b}]0;pwned\u{7}".into()
    });
    let msg = e.to_string();
    assert_eq!(
        msg,
        "layer 0 (sha256:\\u{1b}]0;pwned\\u{7}): invalid image: malformed digest \
         `sha256:\\u{1b}]0;pwned\\u{7}`"
    );

    // Bytes that are not UTF-8, and a name too long, escaped the same way.
    let tmp = tempfile::tempdir().unwrap();
    let mut l = Layer::new();
    let mut h = Layer::header(tar::EntryType::Regular, 0o644, 0, 0, 0);
    let mut name = b"x\xff\x1b".to_vec();
    name.extend(std::iter::repeat_n(b'y', 300));
    let mut gnu = tar::Header::new_gnu();
    gnu.set_entry_type(tar::EntryType::GNULongName);
    gnu.set_size(name.len() as u64 + 1);
    gnu.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    gnu.set_cksum();
    let mut body = name.clone();
    body.push(0);
    l.b.append(&gnu, &body[..]).unwrap();
    h.as_old_mut().name[..1].copy_from_slice(b"x");
    h.set_cksum();
    l.b.append(&h, &[][..]).unwrap();
    let e = convert_tars(tmp.path(), vec![l.finish()]).unwrap_err();
    let (_, entry, cause) = entry_error(e);
    let shown = format!("x\\xff\\u{{1b}}{}", "y".repeat(300));
    assert_eq!(entry, shown);
    assert!(matches!(cause, Error::NameTooLong { ref name, len: 303 } if *name == shown));
}

/// Rewrites the manifest of `<dir>:v1` with `edit` (and re-tags it).
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let idx: Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let md = idx["manifests"][0]["digest"].as_str().unwrap().to_string();
    let mut m: Value =
        serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(&md[7..])).unwrap())
            .unwrap();
    edit(&mut m);
    let b = serde_json::to_vec(&m).unwrap();
    let d = Blobs::new(dir).put(&b);
    let mt = m["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    write_index(dir, "v1", &mt, &d, b.len());
}

/// The error converting `<tmp>/src:v1` (layers `tars`, edited by `edit`).
fn lie(layers: &[(Vec<u8>, &str)], edit: impl FnOnce(&mut Value)) -> (tempfile::TempDir, Error) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_layout(&src, "v1", layers);
    edit_manifest(&src, edit);
    let e = convert_layout(&src, "v1", &tmp.path().join("out"), "t").unwrap_err();
    (tmp, e)
}

#[test]
fn descriptor_sizes_and_media_types_must_match_the_blobs() {
    let tar0 = {
        let mut l = Layer::new();
        l.file("f", 0o644, &noise(100_000, 1));
        l.finish()
    };
    let gz = gzip(&tar0);
    let layers = [(tar0.clone(), "gzip")];
    let digest = sha(&gz);
    let real = gz.len() as u64;

    // Sizes: smaller, larger, zero.
    for claim in [real - 1, real + 1, 0, real / 2] {
        let (_t, e) = lie(&layers, |m| m["layers"][0]["size"] = claim.into());
        match e {
            Error::Layer {
                index: 0, cause, ..
            } => match *cause {
                Error::BlobSize {
                    digest: d,
                    expected,
                    actual,
                } => {
                    assert_eq!((d.as_str(), expected), (digest.as_str(), claim));
                    assert_eq!(actual, real.min(claim + 1), "claim {claim}");
                }
                other => panic!("claim {claim}: {other}"),
            },
            other => panic!("claim {claim}: {other}"),
        }
    }

    let media_type_error = |e: Error| -> (String, String, String, String) {
        let e = match e {
            Error::Layer { cause, .. } => *cause,
            e => e,
        };
        match e {
            Error::MediaType {
                what,
                digest,
                media_type,
                detail,
            } => (what, digest, media_type, detail),
            other => panic!("{other}"),
        }
    };
    // Unknown layer type.
    let (_t, e) = lie(&layers, |m| {
        m["layers"][0]["mediaType"] = "application/vnd.example.layer.v1.tar+bzip2".into()
    });
    assert_eq!(
        media_type_error(e),
        (
            "layer 0".into(),
            digest.clone(),
            "application/vnd.example.layer.v1.tar+bzip2".into(),
            "not a known image layer type".into()
        )
    );
    // A plain-tar type over a gzip blob, a zstd type over it.
    for (mt, detail) in [
        (
            "application/vnd.oci.image.layer.v1.tar",
            "the blob is gzip-compressed",
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "the blob is gzip-compressed",
        ),
    ] {
        let (_t, e) = lie(&layers, |m| m["layers"][0]["mediaType"] = mt.into());
        assert_eq!(
            media_type_error(e),
            ("layer".into(), digest.clone(), mt.into(), detail.into())
        );
    }
    // A gzip type over a plain tar.
    let (_t, e) = lie(&[(tar0.clone(), "")], |m| {
        m["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into()
    });
    assert_eq!(
        media_type_error(e).3,
        "the blob is not compressed that way".to_string()
    );
    // Unknown manifest and config types; a manifest that contradicts its
    // descriptor.
    let (_t, e) = lie(&layers, |m| {
        m["mediaType"] = "application/vnd.example.manifest.v1+json".into()
    });
    let (what, _, mt, detail) = media_type_error(e);
    assert_eq!(
        (what.as_str(), mt.as_str(), detail.as_str()),
        (
            "manifest",
            "application/vnd.example.manifest.v1+json",
            "not an image manifest (OCI or Docker schema 2)"
        )
    );
    let (_t, e) = lie(&layers, |m| {
        m["config"]["mediaType"] = "application/vnd.cncf.helm.config.v1+json".into()
    });
    let (what, _, mt, _) = media_type_error(e);
    assert_eq!(
        (what.as_str(), mt.as_str()),
        ("config", "application/vnd.cncf.helm.config.v1+json")
    );
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_layout(&src, "v1", &layers);
    let idx = fs::read_to_string(src.join("index.json")).unwrap().replace(
        "\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\"",
        "\"mediaType\":\"application/vnd.docker.distribution.manifest.v2+json\"",
    );
    fs::write(src.join("index.json"), idx).unwrap();
    let e = convert_layout(&src, "v1", &tmp.path().join("out"), "t").unwrap_err();
    let (what, _, _, detail) = media_type_error(e);
    assert_eq!(
        (what.as_str(), detail.as_str()),
        (
            "manifest",
            "its descriptor says `application/vnd.docker.distribution.manifest.v2+json`"
        )
    );
}

/// No `.obd-convert-*` scratch directory is left in `out`.
fn no_scratch_left(out: &Path) {
    let left: Vec<_> = fs::read_dir(out)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".obd-convert"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn failed_conversions_remove_their_scratch_directory() {
    let good = || {
        let mut l = Layer::new();
        l.file("big", 0o644, &noise(4 << 20, 7));
        l.finish()
    };
    let bad = || {
        let mut l = Layer::new();
        l.link(tar::EntryType::Link, "x", "missing");
        l.finish()
    };
    // Failing in the first layer, in a later one (while the previous layer
    // commits on its thread), and at the last layer's diff_id (found after
    // the layer is applied).
    type Layers = Vec<(Vec<u8>, &'static str)>;
    let cases: Vec<(&str, Layers)> = vec![
        ("first layer", vec![(bad(), "")]),
        (
            "third layer",
            vec![(good(), "gzip"), (good(), ""), (bad(), "")],
        ),
    ];
    for (what, layers) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        make_layout(&src, "v1", &layers);
        let out = tmp.path().join("out");
        convert_layout(&src, "v1", &out, "t").expect_err(what);
        no_scratch_left(&out);
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_layout(&src, "v1", &[(good(), "gzip"), (good(), "zstd")]);
    let idx: Value = serde_json::from_slice(&fs::read(src.join("index.json")).unwrap()).unwrap();
    let md = idx["manifests"][0]["digest"].as_str().unwrap().to_string();
    let m: Value =
        serde_json::from_slice(&fs::read(src.join("blobs/sha256").join(&md[7..])).unwrap())
            .unwrap();
    let cd = m["config"]["digest"].as_str().unwrap().to_string();
    let cfg = fs::read_to_string(src.join("blobs/sha256").join(&cd[7..])).unwrap();
    let mut c: Value = serde_json::from_str(&cfg).unwrap();
    c["rootfs"]["diff_ids"][1] = sha(b"something else").into();
    let cb = serde_json::to_vec(&c).unwrap();
    let cd2 = Blobs::new(&src).put(&cb);
    edit_manifest(&src, |m| {
        m["config"]["digest"] = cd2.clone().into();
        m["config"]["size"] = cb.len().into();
    });
    let out = tmp.path().join("out");
    let e = convert_layout(&src, "v1", &out, "t").unwrap_err();
    assert!(e.to_string().contains("diff_id"), "{e}");
    no_scratch_left(&out);

    // What a killed conversion left (its process is gone) goes with the
    // next conversion into the layout; a live process's stays.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = out.join(format!(".obd-convert-{dead}"));
    let live = out.join(".obd-convert-1");
    fs::create_dir_all(stale.join("layer-0")).unwrap();
    fs::write(stale.join("layer-0/data"), b"35 MB once").unwrap();
    fs::create_dir_all(&live).unwrap();
    let src = tmp.path().join("src2");
    make_layout(&src, "v1", &[(good(), "")]);
    convert_layout(&src, "v1", &out, "t").unwrap();
    assert!(!stale.exists());
    assert!(live.exists());
    fs::remove_dir(&live).unwrap();
    no_scratch_left(&out);
}

/// More subdirectories than a link count holds: the parent's count is 1
/// (ext4's `dir_nlink`) while past the limit and exact again below it, and
/// filling and emptying a huge directory takes linear time.
#[test]
fn directories_past_the_link_limit() {
    let n = 66_000;
    let mut l0 = Layer::new();
    for i in 0..n {
        l0.dir(&format!("d/s{i}"), 0o755);
    }
    let mut l1 = Layer::new();
    for i in 0..1_010 {
        l1.file(&format!("d/.wh.s{i}"), 0o644, b"");
    }
    let mut l2 = Layer::new();
    l2.dir("d/again", 0o755);
    let tars = [l0.finish(), l1.finish(), l2.finish()];
    let opts = Options {
        vsize: 2 << 30,
        ..small_opts()
    };
    for upto in 1..=tars.len() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let specs: Vec<_> = tars[..upto].iter().map(|t| (t.clone(), "")).collect();
        make_layout(&src, "v1", &specs);
        let t0 = Instant::now();
        let out = tmp.path().join("out");
        convert(
            &OciLayout::parse(&format!("oci:{}:v1", src.display())).unwrap(),
            &OciLayout::parse(&format!("oci:{}:t", out.display())).unwrap(),
            &opts,
        )
        .unwrap();
        eprintln!("{upto} layer(s): {:.2} s", t0.elapsed().as_secs_f64());
        let raw = tmp.path().join("raw.img");
        flatten(&output_blobs(&out, "t"), &raw);
        e2fsck_clean(&raw);
        let fs = converter::fs::Ext4::open_image_file(&raw).unwrap();
        let d = fs.lookup(2, b"d").unwrap().unwrap();
        let links = fs.read_inode(d).unwrap().i.i_links_count;
        let subdirs = fs.list_dir(d).unwrap().len();
        fs.close().unwrap();
        let want = [
            (1, n),
            ((2 + n - 1_010) as u16, n - 1_010),
            ((2 + n - 1_009) as u16, n - 1_009),
        ];
        assert_eq!((links, subdirs), want[upto - 1], "{upto} layer(s)");
    }
}

/// The tar reader holds an entry's headers (PAX records, GNU long names) in
/// memory whole: more than 4 MiB of them for one entry is refused before
/// they are read, less is read and then judged as usual.
#[test]
fn tar_headers_of_one_entry_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = Layer::new();
    l.file("ok", 0o644, b"x");
    l.pax(&[("path", &vec![b'p'; 5 << 20])]);
    l.file("named-by-pax", 0o644, b"y");
    match convert_tars(tmp.path(), vec![l.finish()]).unwrap_err() {
        Error::Layer {
            index: 0, cause, ..
        } => match *cause {
            Error::HeadersTooLarge { entry, limit } => {
                assert_eq!((entry, limit), (1, converter::apply::MAX_ENTRY_HEADERS))
            }
            other => panic!("{other}"),
        },
        other => panic!("{other}"),
    }

    let tmp = tempfile::tempdir().unwrap();
    let mut l = Layer::new();
    l.pax(&[("path", &vec![b'p'; 3 << 20])]);
    l.file("named-by-pax", 0o644, b"y");
    let (_, entry, cause) = entry_error(convert_tars(tmp.path(), vec![l.finish()]).unwrap_err());
    assert_eq!(entry.len(), 3 << 20);
    assert!(matches!(cause, Error::NameTooLong { len, .. } if len == 3 << 20));
}
