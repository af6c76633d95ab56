//! Helpers shared by the converter tests: layer tars, OCI layouts, blob
//! checks, flattening, e2fsck, and tree comparison with `umoci unpack`.
#![allow(dead_code)]
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use converter::fs::Ext4;
use converter::tree::{read_tree, Node};
#[allow(unused_imports)]
pub use converter::{convert, OciLayout, Options};
use overlaybd_core::image::Image;
use serde_json::json;
use sha2::{Digest, Sha256};

pub const MTIME: u64 = 1_600_000_000;

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic pseudo-random bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub struct Layer {
    pub b: tar::Builder<Vec<u8>>,
}

impl Layer {
    pub fn new() -> Self {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    pub fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    pub fn pax(&mut self, recs: &[(&str, &[u8])]) {
        let mut body = Vec::new();
        for (k, v) in recs {
            let inner = k.len() + v.len() + 3;
            let mut len = inner + inner.to_string().len();
            if len.to_string().len() != inner.to_string().len() {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        let mut h = Self::header(tar::EntryType::XHeader, 0o644, 0, 0, body.len() as u64);
        h.set_path("PaxHeaders/x").unwrap();
        h.set_cksum();
        self.b.append(&h, &body[..]).unwrap();
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0, 0, 0);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn file_owned(
        &mut self,
        path: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid, data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_owned(path, mode, 0, 0, data)
    }

    pub fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777, 0, 0, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn node(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, mode, 0, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

pub fn cap_v2() -> Vec<u8> {
    // vfs_cap_data v2: magic|effective, permitted lo, inheritable lo, hi...
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

pub fn layer0() -> Vec<u8> {
    let mut l = Layer::new();
    l.dir("./", 0o755)
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file_owned("etc/secret", 0o600, 1000, 1000, b"s3cret")
        .file_owned("highid", 0o640, 100_000, 200_000, b"high ids")
        .dir("bin", 0o755);
    l.pax(&[
        ("SCHILY.xattr.security.capability", &cap_v2()),
        ("SCHILY.xattr.user.comment", b"hi there"),
    ]);
    l.file("bin/ping", 0o4755, b"\x7fELF ping");
    l.file("bin/big", 0o755, &noise(5 << 20, 7));
    let mut holey = noise(3 << 20, 9);
    holey[4096..(2 << 20) + 4096].fill(0);
    l.file("bin/holey", 0o644, &holey)
        .file("bin/busybox", 0o755, b"busybox binary")
        .link(tar::EntryType::Symlink, "bin/sh", "busybox")
        .link(tar::EntryType::Symlink, "bin/abs", "/etc/passwd")
        .link(tar::EntryType::Symlink, "bin/long", &"x/".repeat(60))
        .link(tar::EntryType::Link, "bin/hl1", "bin/busybox")
        .link(tar::EntryType::Link, "bin/hl2", "bin/busybox")
        .dir("dev", 0o755)
        .node(tar::EntryType::Char, "dev/null", 0o666, 1, 3)
        .node(tar::EntryType::Block, "dev/sda", 0o660, 8, 0)
        .node(tar::EntryType::Char, "dev/bigdev", 0o600, 300, 70000)
        .node(tar::EntryType::Fifo, "dev/fifo", 0o644, 0, 0);
    let long_dir = format!("usr/share/{}", "d".repeat(150));
    l.dir("usr", 0o755)
        .dir("usr/share", 0o755)
        .dir(&long_dir, 0o755)
        .file(
            &format!("{long_dir}/{}", "f".repeat(200)),
            0o644,
            b"long name",
        );
    l.dir("opq", 0o755)
        .file("opq/a", 0o644, b"a")
        .dir("opq/sub", 0o755)
        .file("opq/sub/b", 0o644, b"b")
        .dir("gone", 0o755)
        .file("gone/x", 0o644, b"x")
        .file("gonefile", 0o644, b"bye")
        .file("replace_f2d", 0o644, b"file")
        .dir("replace_d2f", 0o755)
        .file("replace_d2f/c", 0o644, b"c")
        .file("empty", 0o644, b"")
        .dir("real", 0o755)
        .file("real/old", 0o644, b"old")
        .link(tar::EntryType::Symlink, "alias", "real");
    l.pax(&[("SCHILY.xattr.user.dirattr", b"1")]);
    l.dir("dirx", 0o750);
    l.dir("many", 0o755);
    for i in 0..300 {
        l.file(
            &format!("many/file-with-a-longish-name-{i:04}"),
            0o644,
            &[i as u8],
        );
    }
    l.finish()
}

pub fn layer1() -> Vec<u8> {
    let mut l = Layer::new();
    l.file(".wh.gonefile", 0o644, b"")
        .file(".wh.gone", 0o644, b"")
        .file(".wh.nothing-here", 0o644, b"")
        .file("opq/.wh..wh..opq", 0o644, b"")
        .file("opq/new", 0o644, b"new")
        .dir("replace_f2d", 0o711)
        .file("replace_f2d/inside", 0o644, b"inside")
        .file("replace_d2f", 0o600, b"now a file")
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/bash\n")
        .link(tar::EntryType::Link, "bin/hl3", "bin/busybox")
        .file("many/.wh.file-with-a-longish-name-0007", 0o644, b"")
        .file("newdir/file", 0o644, b"in newdir")
        .dir("newdir", 0o700);
    l.pax(&[("SCHILY.xattr.user.other", b"2")]);
    l.dir("dirx", 0o755);
    // A parent path through a symlink from a lower layer lands in its
    // target, as umoci (securejoin) and tar do.
    l.file("alias/new-through-link", 0o644, b"via alias");
    // A file and its whiteout in the same layer: the file stays.
    l.file("samelayer", 0o644, b"kept")
        .file(".wh.samelayer", 0o644, b"");
    l.finish()
}

/// A GNU-sparse layer made by GNU tar.
pub fn layer2(tmp: &Path) -> Vec<u8> {
    let d = tmp.join("sparse-src");
    fs::create_dir_all(&d).unwrap();
    let f = File::create(d.join("sparse.img")).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(8192, 3), 0).unwrap();
    f.write_all_at(&noise(100_000, 5), 40 << 20).unwrap();
    drop(f);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(d.join("sparse.img"), fs::Permissions::from_mode(0o644)).unwrap();
    let out = tmp.join("l2.tar");
    sparse_tar(&d, "sparse.img", &out, &["--format=gnu"]);
    fs::read(out).unwrap()
}

/// GNU tar of `dir/file` into `out` keeping holes, owner 0 and [`MTIME`],
/// with `format` (`--format=…`, `--sparse-version=…`).
pub fn sparse_tar(dir: &Path, file: &str, out: &Path, format: &[&str]) {
    let st = Command::new("tar")
        .args(format)
        .args(["--sparse", "--numeric-owner", "--owner=0", "--group=0"])
        .arg(format!("--mtime=@{MTIME}"))
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg(file)
        .status()
        .unwrap();
    assert!(st.success(), "tar of {}", dir.join(file).display());
}

/// The same tree as `layer2`, without GNU sparse entries (umoci cannot
/// read those).
pub fn layer2_plain() -> Vec<u8> {
    let mut data = vec![0u8; 64 << 20];
    data[..8192].copy_from_slice(&noise(8192, 3));
    data[40 << 20..(40 << 20) + 100_000].copy_from_slice(&noise(100_000, 5));
    let mut l = Layer::new();
    l.file("sparse.img", 0o644, &data);
    l.finish()
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// Writes an OCI layout with one tagged image made of `layers`
/// (tar bytes, compression `"gzip" | "zstd" | ""`).
pub fn make_layout(dir: &Path, tag: &str, layers: &[(Vec<u8>, &str)]) {
    let blobs = Blobs::new(dir);
    let put = |b: &[u8]| blobs.put(b);
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for (tar, comp) in layers {
        diff_ids.push(sha(tar));
        let (blob, mt) = match *comp {
            "gzip" => (gzip(tar), "application/vnd.oci.image.layer.v1.tar+gzip"),
            "zstd" => (
                zstd::bulk::compress(tar, 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            _ => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
        };
        let d = put(&blob);
        descs.push(json!({"mediaType": mt, "digest": d, "size": blob.len()}));
    }
    let config = json!({
        "created": "2020-09-13T12:26:40Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": layers.iter().map(|_| json!({"created_by": "test"})).collect::<Vec<_>>(),
    });
    let cb = serde_json::to_vec(&config).unwrap();
    let cd = put(&cb);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cb.len()},
        "layers": descs,
    });
    let mb = serde_json::to_vec(&manifest).unwrap();
    let md = put(&mb);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    write_index(dir, tag, mt, &md, mb.len());
}

/// The blob store of an OCI layout (`<dir>/blobs/sha256`).
pub struct Blobs(PathBuf);

impl Blobs {
    /// Creates the store under `dir`.
    pub fn new(dir: &Path) -> Blobs {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        Blobs(blobs)
    }

    /// Stores `b`; returns its digest.
    pub fn put(&self, b: &[u8]) -> String {
        let d = sha(b);
        fs::write(self.0.join(&d[7..]), b).unwrap();
        d
    }
}

/// Writes `oci-layout` and an `index.json` holding one entry (media type
/// `mt`, `digest`, `size`) tagged `tag` into the layout `dir`.
pub fn write_index(dir: &Path, tag: &str, mt: &str, digest: &str, size: usize) {
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": mt, "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Writes an OCI layout whose index (tagged `tag`) lists one single-layer
/// image per `(architecture, Docker media types, layer tar)`, the layer
/// gzipped; returns the index's digest and bytes.
pub fn make_multi_platform(
    dir: &Path,
    tag: &str,
    platforms: &[(&str, bool, Vec<u8>)],
) -> (String, Vec<u8>) {
    let blobs = Blobs::new(dir);
    let mut entries = Vec::new();
    for (arch, docker, tar) in platforms {
        let gz = gzip(tar);
        let ld = blobs.put(&gz);
        let cfg = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(tar)]},
        }))
        .unwrap();
        let cd = blobs.put(&cfg);
        let (mt, cmt, lmt) = if *docker {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        } else {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        };
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": cmt, "digest": cd, "size": cfg.len()},
            "layers": [{"mediaType": lmt, "digest": ld, "size": gz.len()}],
        }))
        .unwrap();
        let md = blobs.put(&m);
        entries.push(json!({"mediaType": mt, "digest": md, "size": m.len(),
            "platform": {"architecture": arch, "os": "linux"}}));
    }
    let idx = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .unwrap();
    let id = blobs.put(&idx);
    let mt = "application/vnd.oci.image.index.v1+json";
    write_index(dir, tag, mt, &id, idx.len());
    (id, idx)
}

/// Converts `oci:<src>:<src_tag>` into `oci:<out>:<out_tag>` with
/// [`small_opts`].
pub fn convert_layout(
    src: &Path,
    src_tag: &str,
    out: &Path,
    out_tag: &str,
) -> converter::Result<converter::Report> {
    convert(
        &OciLayout::parse(&format!("oci:{}:{src_tag}", src.display())).unwrap(),
        &OciLayout::parse(&format!("oci:{}:{out_tag}", out.display())).unwrap(),
        &small_opts(),
    )
}

pub fn small_opts() -> Options {
    Options {
        vsize: 1 << 30,
        threads: 2,
        ..Default::default()
    }
}

/// The manifest tagged `tag` in the OCI layout `out`.
pub fn tagged_manifest(out: &Path, tag: &str) -> serde_json::Value {
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
    let m = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let md = m["digest"].as_str().unwrap();
    serde_json::from_slice(&fs::read(out.join("blobs/sha256").join(&md[7..])).unwrap()).unwrap()
}

/// The converted image's blobs, bottom to top.
pub fn output_blobs(out: &Path, tag: &str) -> Vec<PathBuf> {
    let manifest = tagged_manifest(out, tag);
    let cfg = manifest["config"]["digest"].as_str().unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("blobs/sha256").join(&cfg[7..])).unwrap())
            .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    layers
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| {
            let dg = l["digest"].as_str().unwrap();
            assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar");
            assert_eq!(
                d.as_str().unwrap(),
                dg,
                "diff_id = digest for overlaybd layers"
            );
            let a = &l["annotations"];
            assert_eq!(a["containerd.io/snapshot/overlaybd/blob-digest"], dg);
            assert_eq!(
                a["containerd.io/snapshot/overlaybd/blob-size"],
                l["size"].as_u64().unwrap().to_string()
            );
            assert_eq!(a["containerd.io/snapshot/overlaybd/version"], "0.1.0");
            out.join("blobs/sha256").join(&dg[7..])
        })
        .collect()
}

/// Every output blob is tar(ZFile(LSMT)) and keeps upstream's writer rules
/// (ZFile and LSMT strict validation), with the UUID chain set.
pub fn check_blobs(blobs: &[PathBuf]) {
    let mut parent = overlaybd_core::lsmt::Uuid::NIL;
    for p in blobs {
        let blob: overlaybd_core::source::Blob = Arc::new(zfile::FileSource::open(p).unwrap());
        let dec = overlaybd_core::source::decode(blob).unwrap();
        assert_eq!(dec.nesting.to_string(), "tar(zfile(lsmt))");
        let z = dec.zfile.as_ref().expect("compressed");
        zfile::validate_strict(&**z).unwrap_or_else(|v| panic!("{}: {v:?}", p.display()));
        let ro = overlaybd_core::lsmt::RoLayer::open(dec.lsmt.clone()).unwrap();
        overlaybd_core::lsmt::validate_strict(&ro).unwrap();
        assert!(ro.trailer().index_size <= 1_000_000);
        assert_eq!(ro.header().parent_uuid().unwrap(), parent);
        parent = ro.header().uuid().unwrap();
        assert!(!parent.is_nil());
    }
}

pub fn flatten(blobs: &[PathBuf], raw: &Path) {
    check_blobs(blobs);
    let parts = blobs
        .iter()
        .map(|p| {
            let src: overlaybd_core::source::Blob = Arc::new(zfile::FileSource::open(p).unwrap());
            (p.display().to_string(), src)
        })
        .collect();
    let img = Image::from_blobs(parts).unwrap();
    for l in img.layers() {
        assert!(l.lsmt.segments().len() <= 1_000_000);
    }
    let f = File::create(raw).unwrap();
    img.flatten_to(&f, 2, 4 << 20).unwrap();
}

/// The tree of the image whose blobs are `blobs`, flattened into the raw
/// disk `raw` and checked with e2fsck; inode numbers zeroed, so that trees
/// made by different layerings compare equal.
pub fn flat_tree(blobs: &[PathBuf], raw: &Path) -> BTreeMap<Vec<u8>, Node> {
    flatten(blobs, raw);
    e2fsck_clean(raw);
    let mut t = ext4_tree(raw);
    for n in t.values_mut() {
        n.ino = 0;
    }
    t
}

pub fn e2fsck_clean(raw: &Path) {
    fixtures::procs::run(Command::new("e2fsck").arg("-fn").arg(raw));
}

pub fn host_xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let n = unsafe {
        libc::llistxattr(
            c.as_ptr(),
            names.as_mut_ptr() as *mut libc::c_char,
            names.len(),
        )
    };
    assert!(n >= 0);
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid path, name and buffer.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                v.as_mut_ptr() as *mut libc::c_void,
                v.len(),
            )
        };
        assert!(m >= 0);
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// The unpacked tree on the host, in the same shape as `read_tree`.
pub fn host_tree(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    pub fn walk(root: &Path, rel: Vec<u8>, out: &mut BTreeMap<Vec<u8>, Node>) {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(std::ffi::OsStr::from_bytes(&rel))
        };
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let rdev = md.rdev();
        let mut n = Node {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: 0,
            content: None,
            link: None,
            rdev: None,
            xattrs: host_xattrs(&p),
            ino: md.ino(),
            mtime: md.mtime(),
        };
        use std::os::unix::fs::FileTypeExt;
        if ft.is_file() {
            n.size = md.size();
            n.content = Some(hex::encode(Sha256::digest(fs::read(&p).unwrap())));
        } else if ft.is_symlink() {
            n.link = Some(fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec());
        } else if ft.is_char_device() || ft.is_block_device() {
            let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
            let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
            n.rdev = Some((major as u32, minor as u32));
        }
        out.insert(rel.clone(), n);
        if ft.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect();
            names.sort();
            for name in names {
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(&name);
                walk(root, r, out);
            }
        }
    }
    walk(root, Vec::new(), &mut out);
    out
}

pub fn link_groups(t: &BTreeMap<Vec<u8>, Node>) -> BTreeSet<Vec<Vec<u8>>> {
    let mut by: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (p, n) in t {
        if n.mode & 0o170000 != 0o040000 {
            by.entry(n.ino).or_default().push(p.clone());
        }
    }
    by.into_values().filter(|g| g.len() > 1).collect()
}

pub fn compare(ext: &BTreeMap<Vec<u8>, Node>, host: &BTreeMap<Vec<u8>, Node>) {
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let ext_paths: BTreeSet<_> = ext
        .keys()
        .filter(|p| !p.starts_with(b"lost+found"))
        .cloned()
        .collect();
    let host_paths: BTreeSet<_> = host.keys().cloned().collect();
    let only_ext: Vec<_> = ext_paths.difference(&host_paths).map(|p| show(p)).collect();
    let only_host: Vec<_> = host_paths.difference(&ext_paths).map(|p| show(p)).collect();
    assert!(
        only_ext.is_empty() && only_host.is_empty(),
        "only in ext4: {only_ext:?}\nonly in umoci: {only_host:?}"
    );
    for p in &ext_paths {
        let (a, b) = (&ext[p], &host[p]);
        let what = show(p);
        assert_eq!(a.mode, b.mode, "{what}: mode {:o} vs {:o}", a.mode, b.mode);
        assert_eq!((a.uid, a.gid), (b.uid, b.gid), "{what}: owner");
        assert_eq!(a.size, b.size, "{what}: size");
        assert_eq!(a.content, b.content, "{what}: content");
        assert_eq!(a.link, b.link, "{what}: symlink target");
        assert_eq!(a.rdev, b.rdev, "{what}: device numbers");
        assert_eq!(a.xattrs, b.xattrs, "{what}: xattrs");
        if a.mode & 0o170000 == 0o100000 {
            assert_eq!(a.mtime, b.mtime, "{what}: mtime");
        }
    }
    let ext_only: BTreeMap<_, _> = ext
        .iter()
        .filter(|(p, _)| !p.starts_with(b"lost+found"))
        .map(|(p, n)| (p.clone(), n.clone()))
        .collect();
    assert_eq!(
        link_groups(&ext_only),
        link_groups(host),
        "hard-link groups"
    );
}

pub fn is_root() -> bool {
    fixtures::procs::is_root()
}

pub fn ext4_tree(raw: &Path) -> BTreeMap<Vec<u8>, Node> {
    let fs = Ext4::open_image_file(raw).unwrap();
    let t = read_tree(&fs).unwrap();
    fs.close().unwrap();
    t
}

pub fn umoci_tree(src: &Path, tag: &str, tmp: &Path) -> Option<BTreeMap<Vec<u8>, Node>> {
    if !is_root() {
        eprintln!("SKIPPED: comparison with `umoci unpack` needs root (devices, owners, security.* xattrs)");
        return None;
    }
    if Command::new("umoci").arg("--version").output().is_err() {
        eprintln!("SKIPPED: comparison with `umoci unpack`: umoci is not installed (apt-get install umoci)");
        return None;
    }
    let bundle = tmp.join("bundle");
    fixtures::procs::run(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", src.display()))
            .arg(&bundle),
    );
    Some(host_tree(&bundle.join("rootfs")))
}
