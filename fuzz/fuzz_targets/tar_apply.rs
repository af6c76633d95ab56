#![no_main]
//! The converter's tar → ext4 apply path, structure-aware (issue 16): a few
//! layers of files, directories, symlinks (relative, absolute, with `..`),
//! hard links, whiteouts and opaque directories, over a small alphabet of
//! names (so entries collide) that includes control characters, bytes that
//! are not UTF-8 and 255- and 256-byte names, under paths up to 3,000
//! levels deep. Each layer is applied with a fresh `Applier` to one ext4.
//!
//! The same entries run through a plain in-memory model of the applier's
//! documented rules. Applying must fail exactly when the model does (a
//! name over 255 bytes, a missing hard-link target, a symlink loop...),
//! never panic, and otherwise give an ext4 that `e2fsck -fn` passes and
//! whose tree (paths, types, contents, symlink targets, hard-link groups)
//! is the model's.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use converter::apply::Applier;
use converter::fs::{mode, Ext4, MkfsParams};
use converter::io::Backend;
use overlaybd_core::image::Image;
use overlaybd_core::lsmt::{CreateOptions, Uuid, WritableLayer};
use sha2::{Digest, Sha256};

const VSIZE: u64 = 64 << 20;
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const DEPTHS: [usize; 10] = [0, 0, 0, 0, 0, 1, 2, 7, 400, 3_000];

/// The name alphabet.
fn name(i: u8) -> Vec<u8> {
    match i % 12 {
        0 => b"a".to_vec(),
        1 => b"b".to_vec(),
        2 => b"c".to_vec(),
        3 => b"a".to_vec(),
        4 => b"\x1b[31m\n".to_vec(),
        5 => b"\xff\xfe".to_vec(),
        6 => vec![b'L'; 255],
        7 => vec![b'M'; 256],
        8 => b".wh.a".to_vec(),
        9 => OPAQUE.to_vec(),
        10 => b"d".to_vec(),
        _ => b"b".to_vec(),
    }
}

#[derive(Arbitrary, Debug)]
struct Rel {
    /// Components (1 to 4 are used), indices into the alphabet.
    parts: Vec<u8>,
}

impl Rel {
    fn parts(&self) -> Vec<Vec<u8>> {
        let mut p: Vec<Vec<u8>> = self.parts.iter().take(4).map(|&i| name(i)).collect();
        if p.is_empty() {
            p.push(b"a".to_vec());
        }
        p
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    File {
        path: Rel,
        data: u8,
        len: u8,
    },
    Dir {
        path: Rel,
    },
    Symlink {
        path: Rel,
        absolute: bool,
        up: u8,
        target: Rel,
    },
    Hardlink {
        path: Rel,
        target: Rel,
    },
    Whiteout {
        dir: Rel,
        root: bool,
        name: u8,
    },
    Opaque {
        dir: Rel,
        root: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Entry {
    /// Index into [`DEPTHS`]: how many `a/` levels prefix the paths.
    depth: u8,
    op: Op,
}

#[derive(Arbitrary, Debug)]
struct Input {
    layers: Vec<Vec<Entry>>,
}

/// One tar entry, as both sides see it.
#[derive(Clone, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
}

#[derive(Clone, Debug)]
struct TarEntry {
    path: Vec<u8>,
    kind: Kind,
}

fn join(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

fn entries(layer: &[Entry]) -> Vec<TarEntry> {
    layer
        .iter()
        .take(24)
        .map(|e| {
            let mut prefix: Vec<Vec<u8>> =
                vec![b"a".to_vec(); DEPTHS[e.depth as usize % DEPTHS.len()]];
            let path = |r: &Rel, prefix: &[Vec<u8>]| {
                let mut p = prefix.to_vec();
                p.extend(r.parts());
                join(&p)
            };
            match &e.op {
                Op::File { path: p, data, len } => TarEntry {
                    path: path(p, &prefix),
                    kind: Kind::File(vec![*data; *len as usize * 37]),
                },
                Op::Dir { path: p } => TarEntry {
                    path: path(p, &prefix),
                    kind: Kind::Dir,
                },
                Op::Symlink {
                    path: p,
                    absolute,
                    up,
                    target,
                } => {
                    let mut t = Vec::new();
                    if *absolute {
                        t.push(b'/');
                    }
                    for _ in 0..up % 3 {
                        t.extend_from_slice(b"../");
                    }
                    t.extend(join(&target.parts()));
                    TarEntry {
                        path: path(p, &prefix),
                        kind: Kind::Symlink(t),
                    }
                }
                Op::Hardlink { path: p, target } => TarEntry {
                    path: path(p, &prefix),
                    kind: Kind::Hardlink(path(target, &prefix)),
                },
                Op::Whiteout { dir, root, name: n } => {
                    let mut parts = if *root { Vec::new() } else { dir.parts() };
                    let mut wh = WHITEOUT.to_vec();
                    wh.extend(name(*n));
                    parts.push(wh);
                    prefix.extend(parts);
                    TarEntry {
                        path: join(&prefix),
                        kind: Kind::File(Vec::new()),
                    }
                }
                Op::Opaque { dir, root } => {
                    let mut parts = if *root { Vec::new() } else { dir.parts() };
                    parts.push(OPAQUE.to_vec());
                    prefix.extend(parts);
                    TarEntry {
                        path: join(&prefix),
                        kind: Kind::File(Vec::new()),
                    }
                }
            }
        })
        .collect()
}

/// Appends a GNU long-name (`L`) or long-link (`K`) entry holding `name`.
fn long(b: &mut tar::Builder<Vec<u8>>, kind: u8, name: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::new(kind));
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(name.len() as u64 + 1);
    h.set_cksum();
    let mut body = name.to_vec();
    body.push(0);
    b.append(&h, &body[..]).unwrap();
}

/// The layer tar: every path and link target as a GNU long name (taken
/// byte for byte, whatever it holds), the header's own name a placeholder.
fn tar_of(entries: &[TarEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        long(&mut b, b'L', &e.path);
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..1].copy_from_slice(b"x");
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        let data: &[u8] = match &e.kind {
            Kind::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                data
            }
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                &[]
            }
            Kind::Symlink(t) | Kind::Hardlink(t) => {
                h.set_entry_type(if matches!(e.kind, Kind::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                long(&mut b, b'K', t);
                h.as_gnu_mut().unwrap().linkname[..1].copy_from_slice(b"x");
                &[]
            }
        };
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

// ---------------------------------------------------------------- the model

#[derive(Clone, Copy, Debug, PartialEq)]
enum Node {
    /// A directory: an index into `Model::dirs`.
    Dir(usize),
    /// A non-directory: an index into `Model::leaves` (shared by hard links).
    Leaf(usize),
}

#[derive(Clone, Debug, PartialEq)]
enum Leaf {
    File(Vec<u8>),
    Symlink(Vec<u8>),
}

/// Why the model refuses an entry.
#[derive(Debug)]
struct Refused(&'static str);

/// The expected tree: directories as tables (so that a lookup costs the
/// same at any depth), `/` first; a removed directory's table is simply
/// no longer reachable.
struct Model {
    dirs: Vec<BTreeMap<Vec<u8>, Node>>,
    leaves: Vec<Leaf>,
    /// Literal paths created in the current layer.
    created: HashSet<Vec<u8>>,
}

type R<T> = Result<T, Refused>;

impl Model {
    fn new() -> Model {
        let mut root = BTreeMap::new();
        root.insert(b"lost+found".to_vec(), Node::Dir(1));
        Model {
            dirs: vec![root, BTreeMap::new()],
            leaves: Vec::new(),
            created: HashSet::new(),
        }
    }

    fn new_dir(&mut self) -> Node {
        self.dirs.push(BTreeMap::new());
        Node::Dir(self.dirs.len() - 1)
    }

    fn check_name(n: &[u8]) -> R<()> {
        if n.len() > 255 {
            Err(Refused("name too long"))
        } else {
            Ok(())
        }
    }

    /// The directory `parts` names (symlinks followed, at most 40, `..`
    /// stops at `/`); with `create`, missing directories on the path itself
    /// are made and non-directories there replaced.
    fn resolve(&mut self, parts: &[Vec<u8>], create: bool) -> R<Option<usize>> {
        let mut todo: Vec<(Vec<u8>, bool)> =
            parts.iter().rev().map(|c| (c.clone(), create)).collect();
        let mut chain: Vec<usize> = vec![0];
        let mut links = 0;
        while let Some((n, may)) = todo.pop() {
            match n.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if chain.len() > 1 {
                        chain.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let cur = *chain.last().unwrap();
            let next = match self.dirs[cur].get(&n).copied() {
                Some(Node::Dir(d)) => d,
                Some(Node::Leaf(id)) => match &self.leaves[id] {
                    Leaf::Symlink(t) => {
                        links += 1;
                        if links > 40 {
                            return Err(Refused("symlink loop"));
                        }
                        if t.first() == Some(&b'/') {
                            chain.truncate(1);
                        }
                        todo.extend(t.split(|&b| b == b'/').rev().map(|c| (c.to_vec(), false)));
                        continue;
                    }
                    Leaf::File(_) if may => {
                        let d = self.new_dir();
                        self.dirs[cur].insert(n, d);
                        self.dirs.len() - 1
                    }
                    Leaf::File(_) => return Ok(None),
                },
                None if may => {
                    Self::check_name(&n)?;
                    let d = self.new_dir();
                    self.dirs[cur].insert(n, d);
                    self.dirs.len() - 1
                }
                None => return Ok(None),
            };
            chain.push(next);
        }
        Ok(Some(*chain.last().unwrap()))
    }

    fn ensure_dir(&mut self, parts: &[Vec<u8>]) -> R<usize> {
        self.resolve(parts, true)?
            .ok_or(Refused("parent is a symlink to a missing directory"))
    }

    /// What a hard link names (its last component not followed).
    fn link_target(&mut self, raw: &[u8]) -> R<Node> {
        let parts: Vec<Vec<u8>> = raw
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .map(<[u8]>::to_vec)
            .collect();
        let (last, dir) = parts.split_last().ok_or(Refused("hard link to the root"))?;
        let d = self.resolve(dir, false)?.ok_or(Refused("missing target"))?;
        self.dirs[d]
            .get(last)
            .copied()
            .ok_or(Refused("missing target"))
    }

    fn apply(&mut self, e: &TarEntry) -> R<()> {
        let parts: Vec<Vec<u8>> = e.path.split(|&b| b == b'/').map(<[u8]>::to_vec).collect();
        let (last, dir) = parts.split_last().expect("never empty");
        if last.as_slice() == OPAQUE {
            let d = self.ensure_dir(dir)?;
            let prefix = join(dir);
            let at_root = dir.is_empty();
            let created = &self.created;
            self.dirs[d].retain(|n, _| {
                let mut p = prefix.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(n);
                created.contains(&p) || (at_root && n == b"lost+found")
            });
            return Ok(());
        }
        if let Some(n) = last.strip_prefix(WHITEOUT) {
            let mut target = dir.to_vec();
            target.push(n.to_vec());
            if self.created.contains(&join(&target)) {
                return Ok(());
            }
            if let Some(d) = self.resolve(dir, false)? {
                self.dirs[d].remove(n);
            }
            return Ok(());
        }
        let d = self.ensure_dir(dir)?;
        let path = join(&parts);
        if let Some(old) = self.dirs[d].get(last).copied() {
            match (&e.kind, old) {
                (Kind::Dir, Node::Dir(_)) => {
                    self.created.insert(path);
                    return Ok(());
                }
                (Kind::Hardlink(t), old) => {
                    // The same inode already: nothing to do.
                    if self.link_target(t)? == old {
                        self.created.insert(path);
                        return Ok(());
                    }
                }
                _ => {}
            }
            self.dirs[d].remove(last);
        }
        let node = match &e.kind {
            Kind::Dir => {
                Self::check_name(last)?;
                self.new_dir()
            }
            Kind::File(data) => {
                Self::check_name(last)?;
                self.leaves.push(Leaf::File(data.clone()));
                Node::Leaf(self.leaves.len() - 1)
            }
            Kind::Symlink(t) => {
                Self::check_name(last)?;
                self.leaves.push(Leaf::Symlink(t.clone()));
                Node::Leaf(self.leaves.len() - 1)
            }
            Kind::Hardlink(t) => match self.link_target(t)? {
                Node::Leaf(id) => {
                    Self::check_name(last)?;
                    Node::Leaf(id)
                }
                Node::Dir(_) => return Err(Refused("hard link to a directory")),
            },
        };
        self.dirs[d].insert(last.clone(), node);
        self.created.insert(path);
        Ok(())
    }

    /// Path → (type, content or target, leaf id).
    fn flat(&self) -> BTreeMap<Vec<u8>, (u16, Option<Vec<u8>>, Option<usize>)> {
        let mut out = BTreeMap::new();
        out.insert(Vec::new(), (mode::S_IFDIR, None, None));
        let mut todo: Vec<(Vec<u8>, usize)> = vec![(Vec::new(), 0)];
        while let Some((path, d)) = todo.pop() {
            for (n, node) in &self.dirs[d] {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(n);
                match *node {
                    Node::Dir(sub) => {
                        out.insert(p.clone(), (mode::S_IFDIR, None, None));
                        todo.push((p, sub));
                    }
                    Node::Leaf(id) => {
                        let v = match &self.leaves[id] {
                            Leaf::File(c) => (mode::S_IFREG, Some(c.clone()), Some(id)),
                            Leaf::Symlink(t) => (mode::S_IFLNK, Some(t.clone()), Some(id)),
                        };
                        out.insert(p, v);
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------- the harness

fn work_dir() -> PathBuf {
    let d = Path::new("/dev/shm").join(format!("obd-fuzz-tar-apply-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Applies `layers` to a fresh ext4; the raw image, or the first error.
fn apply_all(dir: &Path, layers: &[Vec<u8>]) -> Result<PathBuf, converter::Error> {
    let upper = WritableLayer::create(
        dir.join("data"),
        dir.join("index"),
        CreateOptions {
            virtual_size: VSIZE,
            uuid: Uuid::NIL,
            parent_uuid: Uuid::NIL,
        },
    )
    .unwrap();
    let backend = Arc::new(Mutex::new(Backend::new(None, upper, VSIZE, 4 << 20)));
    {
        let fs = Ext4::mkfs(
            backend.clone(),
            &MkfsParams {
                size: VSIZE,
                uuid: [7; 16],
                hash_seed: [9; 16],
            },
        )
        .unwrap();
        for tar in layers {
            Applier::new(&fs).apply(&tar[..])?;
        }
        fs.close().unwrap();
    }
    let backend = Arc::try_unwrap(backend).ok().unwrap().into_inner().unwrap();
    let upper = backend.into_upper().unwrap();
    let img = Image::from_parts(Vec::new(), Some(Arc::new(upper))).unwrap();
    let raw = dir.join("raw.img");
    let f = fs::File::create(&raw).unwrap();
    img.flatten_to(&f, 1, 4 << 20).unwrap();
    Ok(raw)
}

fn groups<K: Ord + Clone>(
    items: impl Iterator<Item = (K, Vec<u8>)>,
) -> BTreeSet<BTreeSet<Vec<u8>>> {
    let mut by: BTreeMap<K, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for (k, p) in items {
        by.entry(k).or_default().insert(p);
    }
    by.into_values().filter(|g| g.len() > 1).collect()
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    let layers: Vec<Vec<TarEntry>> = input.layers.iter().take(4).map(|l| entries(l)).collect();
    if layers.is_empty() {
        return;
    }
    // The model, layer by layer; the first refusal ends it.
    let mut model = Model::new();
    let mut refused = None;
    'layers: for l in &layers {
        model.created.clear();
        for e in l {
            if let Err(r) = model.apply(e) {
                refused = Some((r, e.clone()));
                break 'layers;
            }
        }
    }
    let tars: Vec<Vec<u8>> = layers.iter().map(|l| tar_of(l)).collect();
    let dir = work_dir();
    let result = apply_all(&dir, &tars);
    match (result, refused) {
        (Err(e), Some(_)) => {
            // Both refuse. A long name must be refused as such.
            let msg = e.to_string();
            assert!(
                !msg.chars().any(char::is_control),
                "raw control character: {msg:?}"
            );
        }
        (Err(e), None) => panic!("applying failed where the model did not: {e}"),
        (Ok(_), Some((r, e))) => panic!("the model refused {e:?} ({}) but applying succeeded", r.0),
        (Ok(raw), None) => {
            let out = Command::new("e2fsck")
                .arg("-fn")
                .arg(&raw)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "e2fsck: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let fs = Ext4::open_image_file(&raw).unwrap();
            let tree = converter::tree::read_tree(&fs).unwrap();
            fs.close().unwrap();
            let want = model.flat();
            let got_paths: Vec<_> = tree.keys().cloned().collect();
            let want_paths: Vec<_> = want.keys().cloned().collect();
            assert_eq!(
                got_paths
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect::<Vec<_>>(),
                want_paths
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect::<Vec<_>>(),
                "paths"
            );
            for (p, n) in &tree {
                let (kind, data, _) = &want[p];
                let shown = String::from_utf8_lossy(p);
                assert_eq!(n.mode as u16 & mode::S_IFMT, *kind, "{shown}: type");
                match *kind {
                    mode::S_IFREG => assert_eq!(
                        n.content.as_deref(),
                        Some(hex::encode(Sha256::digest(data.as_deref().unwrap())).as_str()),
                        "{shown}: content"
                    ),
                    mode::S_IFLNK => {
                        assert_eq!(n.link.as_deref(), data.as_deref(), "{shown}: target")
                    }
                    _ => {}
                }
            }
            let got_groups = groups(
                tree.iter()
                    .filter(|(_, n)| n.mode as u16 & mode::S_IFMT != mode::S_IFDIR)
                    .map(|(p, n)| (n.ino, p.clone())),
            );
            let want_groups = groups(
                want.iter()
                    .filter_map(|(p, (_, _, id))| id.map(|i| (i, p.clone()))),
            );
            assert_eq!(got_groups, want_groups, "hard-link groups");
        }
    }
    let _ = fs::remove_dir_all(&dir);
});
