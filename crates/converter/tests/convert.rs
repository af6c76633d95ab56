//! End-to-end: OCI layouts built here from hand-made layer tars (every entry
//! type, every whiteout case, gzip/zstd/plain), converted, flattened with
//! overlaybd-core's `Image`, checked with `e2fsck -fn`, and compared with
//! what Debian's `umoci unpack` makes of the source image. The ext4 is read
//! with libext2fs (no mount, no root needed for that part).
use std::fs::{self, File};

use converter::fs::Ext4;
use sha2::{Digest, Sha256};

mod common;
use common::*;

#[test]
fn converts_every_entry_type_and_whiteout() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let out = tmp.path().join("out");
    let tars = [layer0(), layer1(), layer2(tmp.path())];
    make_layout(
        &src,
        "v1",
        &[
            (tars[0].clone(), "gzip"),
            (tars[1].clone(), "zstd"),
            (tars[2].clone(), ""),
        ],
    );
    // umoci cannot read zstd layers: the same tars, gzip only, for it.
    let src_gz = tmp.path().join("src-gz");
    make_layout(
        &src_gz,
        "v1",
        &[
            (tars[0].clone(), "gzip"),
            (tars[1].clone(), "gzip"),
            (layer2_plain(), ""),
        ],
    );
    let report = convert_layout(&src, "v1", &out, "conv").unwrap();
    assert_eq!(report.layers.len(), 3);
    for l in &report.layers {
        eprintln!(
            "layer {}: {} entries, {} file bytes -> {} bytes blob, {} index entries",
            l.index, l.apply.entries, l.apply.file_bytes, l.size, l.commit.entries
        );
    }
    let blobs = output_blobs(&out, "conv");
    let raw = tmp.path().join("raw.img");
    flatten(&blobs, &raw);
    e2fsck_clean(&raw);
    let ext = ext4_tree(&raw);
    // Spot checks that hold with or without root.
    assert!(!ext.contains_key(&b"gonefile"[..]));
    assert!(!ext.contains_key(&b"gone"[..]));
    assert!(!ext.contains_key(&b"opq/a"[..]));
    assert!(ext.contains_key(&b"opq/new"[..]));
    assert!(ext.contains_key(&b"samelayer"[..]));
    assert!(ext.contains_key(&b"real/new-through-link"[..]));
    assert_eq!(ext[&b"bin/ping"[..]].mode, 0o104755);
    assert_eq!(ext[&b"sparse.img"[..]].size, 64 << 20);
    assert_eq!(ext[&b"highid"[..]].uid, 100_000);
    if let Some(host) = umoci_tree(&src_gz, "v1", tmp.path()) {
        assert!(host.len() > 300, "umoci unpacked {} paths", host.len());
        assert!(host[&b"bin/ping"[..]]
            .xattrs
            .iter()
            .any(|(k, _)| k == b"security.capability"));
        compare(&ext, &host);
    }
}

/// A temporary directory with an OCI layout `src` of `layers` tagged `v1`,
/// and its reference.
fn source_layout(layers: &[(Vec<u8>, &str)]) -> (tempfile::TempDir, OciLayout) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_layout(&src, "v1", layers);
    let srcref = OciLayout::parse(&format!("oci:{}:v1", src.display())).unwrap();
    (tmp, srcref)
}

#[test]
fn flatten_option_gives_the_same_tree() {
    let (tmp, srcref) = source_layout(&[(layer0(), "gzip"), (layer1(), "")]);
    let mut trees = Vec::new();
    for flat in [false, true] {
        let out = tmp.path().join(format!("out-{flat}"));
        let opts = Options {
            flatten: flat,
            ..small_opts()
        };
        convert(
            &srcref,
            &OciLayout::parse(&format!("oci:{}:x", out.display())).unwrap(),
            &opts,
        )
        .unwrap();
        let blobs = output_blobs(&out, "x");
        assert_eq!(blobs.len(), if flat { 1 } else { 2 });
        trees.push(flat_tree(&blobs, &tmp.path().join(format!("raw-{flat}"))));
    }
    assert_eq!(trees[0], trees[1]);
}

#[test]
fn conversion_is_deterministic() {
    let (tmp, srcref) = source_layout(&[(layer0(), "gzip"), (layer1(), "zstd")]);
    let mut digests = Vec::new();
    for run in 0..2 {
        let out = tmp.path().join(format!("out{run}"));
        let r = convert(
            &srcref,
            &OciLayout::parse(&format!("oci:{}:t", out.display())).unwrap(),
            &small_opts(),
        )
        .unwrap();
        digests.push((
            r.root.digest.clone(),
            r.layers
                .iter()
                .map(|l| l.digest.clone())
                .collect::<Vec<_>>(),
        ));
        flatten(
            &output_blobs(&out, "t"),
            &tmp.path().join(format!("raw{run}")),
        );
    }
    if digests[0] != digests[1] {
        // Name the differing 4 KiB blocks of the two disks.
        let a = File::open(tmp.path().join("raw0")).unwrap();
        let b = File::open(tmp.path().join("raw1")).unwrap();
        use std::os::unix::fs::FileExt;
        let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
        let mut diff = Vec::new();
        for blk in 0..(small_opts().vsize / 4096) {
            a.read_exact_at(&mut x, blk * 4096).unwrap();
            b.read_exact_at(&mut y, blk * 4096).unwrap();
            if x != y {
                let first = x.iter().zip(&y).position(|(p, q)| p != q).unwrap();
                diff.push((blk, first));
            }
        }
        panic!("runs differ: {digests:?}; differing (block, first byte): {diff:?}");
    }
}

/// The error converting `oci:<src>:v1` into a sibling `out` layout.
fn convert_error(src: &std::path::Path) -> String {
    let out = src.with_file_name("out");
    convert_layout(src, "v1", &out, "t")
        .unwrap_err()
        .to_string()
}

#[test]
fn errors_name_the_layer_and_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut l = Layer::new();
    l.file("ok", 0o644, b"fine");
    l.link(tar::EntryType::Link, "broken", "does/not/exist");
    make_layout(&src, "v1", &[(layer0(), "gzip"), (l.finish(), "")]);
    let err = convert_error(&src);
    assert!(err.contains("layer 1 (sha256:"), "{err}");
    assert!(err.contains("entry `broken`"), "{err}");
    assert!(err.contains("does/not/exist"), "{err}");
    // Nothing was tagged.
    assert!(
        !tmp.path().join("out/index.json").exists()
            || !fs::read_to_string(tmp.path().join("out/index.json"))
                .unwrap()
                .contains("\"t\"")
    );
}

/// PAX GNU sparse files (formats 0.0, 0.1 and 1.0, as GNU tar writes them)
/// come out with the right size and content.
#[test]
fn pax_sparse_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = layer2_plain();
    let want = {
        let mut ar = tar::Archive::new(&expected[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut v).unwrap();
        hex::encode(Sha256::digest(&v))
    };
    // Reuse layer2's sparse source file.
    let _ = layer2(tmp.path());
    for version in ["0.0", "0.1", "1.0"] {
        let t = tmp.path().join(format!("s{version}.tar"));
        let sv = format!("--sparse-version={version}");
        let src_dir = tmp.path().join("sparse-src");
        sparse_tar(&src_dir, "sparse.img", &t, &["--format=posix", &sv]);
        let src = tmp.path().join(format!("src{version}"));
        let out = tmp.path().join(format!("out{version}"));
        make_layout(&src, "v1", &[(fs::read(&t).unwrap(), "gzip")]);
        convert_layout(&src, "v1", &out, "t").unwrap();
        let raw = tmp.path().join(format!("raw{version}"));
        flatten(&output_blobs(&out, "t"), &raw);
        e2fsck_clean(&raw);
        let tree = ext4_tree(&raw);
        let paths: Vec<_> = tree
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        let n = tree
            .get(&b"sparse.img"[..])
            .unwrap_or_else(|| panic!("sparse {version}: no sparse.img in {paths:?}"));
        assert_eq!(n.size, 64 << 20, "sparse {version}");
        assert_eq!(
            n.content.as_deref(),
            Some(want.as_str()),
            "sparse {version}"
        );
    }
}

/// A multi-platform index converts every platform; Docker manifests keep
/// Docker media types.
#[test]
fn index_and_docker_media_types() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let platforms = [("amd64", false), ("arm64", true)].map(|(arch, docker)| {
        let mut l = Layer::new();
        l.file(&format!("arch-{arch}"), 0o644, arch.as_bytes());
        (arch, docker, l.finish())
    });
    make_multi_platform(&src, "multi", &platforms);
    let out = tmp.path().join("out");
    let r = convert_layout(&src, "multi", &out, "multi").unwrap();
    assert_eq!(r.manifests.len(), 2);
    assert_eq!(r.root.media_type, "application/vnd.oci.image.index.v1+json");
    let read = |d: &str| -> serde_json::Value {
        serde_json::from_slice(&fs::read(out.join("blobs/sha256").join(&d[7..])).unwrap()).unwrap()
    };
    let index = read(&r.root.digest);
    let ms = index["manifests"].as_array().unwrap();
    assert_eq!(ms[0]["platform"]["architecture"], "amd64");
    assert_eq!(ms[1]["platform"]["architecture"], "arm64");
    for (m, want) in ms.iter().zip([
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
    ]) {
        let man = read(m["digest"].as_str().unwrap());
        assert_eq!(man["layers"][0]["mediaType"], want);
        let cfg = read(man["config"]["digest"].as_str().unwrap());
        assert_eq!(cfg["rootfs"]["diff_ids"][0], man["layers"][0]["digest"]);
    }
}

/// A blob whose bytes do not match its digest is refused, naming the layer.
#[test]
fn corrupt_blob_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut l = Layer::new();
    l.file("a", 0o644, b"aaaa");
    let tar = l.finish();
    make_layout(&src, "v1", &[(tar.clone(), "")]);
    let p = src.join("blobs/sha256").join(&sha(&tar)[7..]);
    let mut b = fs::read(&p).unwrap();
    b[600] ^= 1; // inside the file data
    fs::write(&p, b).unwrap();
    let err = convert_error(&src);
    assert!(
        err.contains("layer 0 (sha256:") && err.contains("digest"),
        "{err}"
    );
}

/// A sparse file larger than 4 GiB, with data past the 4 GiB mark, on a
/// 1 GiB filesystem (64-bit offsets and sizes, holes kept).
#[test]
fn huge_sparse_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("huge");
    fs::create_dir_all(&d).unwrap();
    let f = File::create(d.join("huge.img")).unwrap();
    f.set_len(5 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"start", 0).unwrap();
    f.write_all_at(&noise(10_000, 11), (4 << 30) + 12345)
        .unwrap();
    drop(f);
    let t = tmp.path().join("huge.tar");
    sparse_tar(&d, "huge.img", &t, &["--format=posix"]);
    let src = tmp.path().join("src");
    make_layout(&src, "v1", &[(fs::read(&t).unwrap(), "gzip")]);
    let out = tmp.path().join("out");
    convert_layout(&src, "v1", &out, "t").unwrap();
    let raw = tmp.path().join("raw");
    flatten(&output_blobs(&out, "t"), &raw);
    e2fsck_clean(&raw);
    let fs = Ext4::open_image_file(&raw).unwrap();
    let root = fs.list_dir(2).unwrap();
    let ino = root.iter().find(|(n, _)| n == b"huge.img").unwrap().1;
    let inode = fs.read_inode(ino).unwrap();
    assert_eq!(inode.size(), 5 << 30);
    // Read the region past 4 GiB back.
    let mut got = Vec::new();
    let mut pos = 0u64;
    let want_at = (4u64 << 30) + 12345;
    fs.read_file(ino, &mut |chunk| {
        let end = pos + chunk.len() as u64;
        if end > want_at && pos < want_at + 10_000 {
            let s = want_at.saturating_sub(pos) as usize;
            let e = ((want_at + 10_000).min(end) - pos) as usize;
            got.extend_from_slice(&chunk[s..e]);
        }
        pos = end;
    })
    .unwrap();
    assert_eq!(got, noise(10_000, 11));
    // Only a few blocks are allocated.
    assert!(inode.blocks() < 1000, "i_blocks {}", inode.blocks());
    fs.close().unwrap();
}

#[test]
fn piece_tables_are_blobs_named_by_annotations_and_change_nothing_else() {
    use obd_remote::oci::{ANN_VERITY_DIGEST, ANN_VERITY_SIZE};
    use obd_remote::verity::PieceTable;
    let (tmp, srcref) = source_layout(&[(layer0(), "gzip"), (layer1(), "")]);
    let mut manifests = Vec::new();
    for verity in [true, false] {
        let out = tmp.path().join(format!("out-{verity}"));
        let opts = Options {
            verity,
            ..small_opts()
        };
        let dst = OciLayout::parse(&format!("oci:{}:t", out.display())).unwrap();
        let r = convert(&srcref, &dst, &opts).unwrap();
        assert_eq!(r.layers.iter().all(|l| l.verity.is_some()), verity);
        let m = tagged_manifest(&out, "t");
        for (l, rep) in m["layers"].as_array().unwrap().iter().zip(&r.layers) {
            let ann = &l["annotations"];
            if !verity {
                assert!(ann.get(ANN_VERITY_DIGEST).is_none(), "{ann}");
                continue;
            }
            // The table is a blob of the image, its digest and size in the
            // annotations, and it describes the layer blob.
            let td = ann[ANN_VERITY_DIGEST].as_str().unwrap();
            let t = fs::read(out.join("blobs/sha256").join(&td[7..])).unwrap();
            assert_eq!(sha(&t), td);
            assert_eq!(ann[ANN_VERITY_SIZE], t.len().to_string());
            let table = PieceTable::decode(&t).unwrap();
            assert_eq!(table.blob_digest(), rep.digest);
            let blob = fs::read(out.join("blobs/sha256").join(&rep.digest[7..])).unwrap();
            table.verify(0, &blob).unwrap();
        }
        manifests.push(m);
    }
    // Layer blobs and config are the same bytes; the manifests differ only
    // by the two annotations.
    let [mut with, without] = <[serde_json::Value; 2]>::try_from(manifests).unwrap();
    for l in with["layers"].as_array_mut().unwrap() {
        let a = l["annotations"].as_object_mut().unwrap();
        a.remove(ANN_VERITY_DIGEST).unwrap();
        a.remove(ANN_VERITY_SIZE).unwrap();
    }
    assert_eq!(with, without);
}

/// An image built FROM an obd image, as BuildKit pushes it: the base's
/// tar-wrapped obd blob as a plain `tar` layer without annotations, then an
/// ordinary layer. It converts with the base kept (the same blob, its
/// annotations restored) and gives the tree of converting the OCI image
/// whole; an obd layer above an OCI layer is refused.
#[test]
fn obd_base_layers_are_kept() {
    let (tmp, srcref) = source_layout(&[(layer0(), "gzip"), (layer1(), "")]);
    let full = tmp.path().join("full");
    convert(
        &srcref,
        &OciLayout::parse(&format!("oci:{}:x", full.display())).unwrap(),
        &small_opts(),
    )
    .unwrap();
    let base_src = tmp.path().join("base-src");
    make_layout(&base_src, "v1", &[(layer0(), "gzip")]);
    let base = tmp.path().join("base");
    convert_layout(&base_src, "v1", &base, "x").unwrap();
    let base_blob = fs::read(&output_blobs(&base, "x")[0]).unwrap();

    let built = tmp.path().join("built");
    make_layout(&built, "v1", &[(base_blob.clone(), ""), (layer1(), "")]);
    let out = tmp.path().join("out");
    let r = convert_layout(&built, "v1", &out, "x").unwrap();
    assert_eq!(r.layers.len(), 2);
    assert_eq!(r.layers[0].digest, sha(&base_blob), "the base blob is kept");
    assert!(r.layers[0].verity.is_some(), "with a piece table");
    let blobs = output_blobs(&out, "x");
    assert_eq!(fs::read(&blobs[0]).unwrap(), base_blob);
    assert_eq!(
        flat_tree(&output_blobs(&full, "x"), &full.with_extension("raw")),
        flat_tree(&blobs, &out.with_extension("raw"))
    );

    // Converting the result again: nothing left to convert.
    let again = convert_layout(&out, "x", &tmp.path().join("again"), "x").unwrap_err();
    assert!(
        again
            .to_string()
            .contains("every layer already is an overlaybd layer"),
        "{again}"
    );
    // An obd layer above an OCI layer, or compressed (BuildKit's
    // force-compression), is refused rather than unpacked as a file.
    for (name, layers) in [
        ("upside", [(layer0(), "gzip"), (base_blob.clone(), "")]),
        ("gzipped", [(base_blob.clone(), "gzip"), (layer1(), "")]),
    ] {
        let src = tmp.path().join(name);
        make_layout(&src, "v1", &layers);
        let e = convert_error(&src);
        let at = if name == "upside" { 1 } else { 0 };
        assert!(
            e.contains(&format!("layer {at} (")) && e.contains("the layer is an overlaybd blob"),
            "{name}: {e}"
        );
    }
}
