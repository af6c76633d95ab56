//! Applies one OCI layer tar to an open filesystem, streaming: regular files
//! (large and sparse), directories, symlinks, hard links, device nodes,
//! fifos, xattrs (PAX `SCHILY.xattr.*`), owner, mode, times, long names, and
//! the OCI whiteouts (`.wh.<name>`, `.wh..wh..opq`).

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::rc::Rc;

use crate::error::{escape, Error, Result};
use crate::ffi::{ext2_ino_t, EXT2_ROOT_INO};
use crate::fs::{mode, Attrs, Ext4};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Symbolic links followed while resolving one path (Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: u32 = 40;
/// Resolved directory paths kept in the cache before it starts over.
const DIR_CACHE: usize = 1 << 16;
/// Most bytes of tar headers (header blocks, PAX records, GNU long names
/// and link names) read for one entry: they are held in memory whole. Go's
/// archive/tar, which containerd unpacks layers with, refuses PAX records
/// and long names over 1 MiB each.
pub const MAX_ENTRY_HEADERS: u64 = 4 << 20;

/// The layer tar as the tar reader sees it: while `left` is `Some`, reads
/// stop with an error once it reaches 0 (the tar reader is between two
/// entries, reading headers); `None` while an entry's data is read.
struct Budgeted<R> {
    inner: R,
    left: Rc<Cell<Option<u64>>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.left.get() {
            None => self.inner.read(buf),
            Some(0) => Err(io::Error::other("too many header bytes")),
            Some(left) => {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let got = self.inner.read(&mut buf[..n])?;
                self.left.set(Some(left - got as u64));
                Ok(got)
            }
        }
    }
}

/// What one layer application did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Tar entries read.
    pub entries: u64,
    /// Bytes of regular-file content.
    pub file_bytes: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
}

/// Splits a tar path into normal components, refusing `..` and empty paths.
pub fn normalize(raw: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::BadEntry(format!(
                    "path `{}` leaves the root (`..`)",
                    escape(raw)
                )))
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn join(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

/// A path kept as a 128-bit SHA-256 prefix: the caches cost the same per
/// entry however long or deep its path is.
type PathKey = [u8; 16];

/// A set of paths kept as SHA-256 prefixes.
#[derive(Default)]
struct Created(HashSet<PathKey>);

impl Created {
    fn key(path: &[u8]) -> PathKey {
        use sha2::Digest;
        let d = sha2::Sha256::digest(path);
        let mut k = [0u8; 16];
        k.copy_from_slice(&d[..16]);
        k
    }
    fn insert(&mut self, path: impl AsRef<[u8]>) {
        self.0.insert(Self::key(path.as_ref()));
    }
    fn contains(&self, path: &[u8]) -> bool {
        self.0.contains(&Self::key(path))
    }
}

/// Layer application state over one filesystem.
pub struct Applier<'a> {
    fs: &'a Ext4,
    /// Directory path → inode, for the parents of recent entries (at most
    /// [`DIR_CACHE`] of them; emptied whenever a directory or symlink goes).
    dirs: HashMap<PathKey, ext2_ino_t>,
    /// Paths this layer created (whiteouts only hide lower layers), as
    /// 128-bit digests: a million-entry layer costs ~30 MB, not ~150 MB.
    created: Created,
    /// Directory inode → its entries, loaded on first use: libext2fs's
    /// lookup scans the whole directory, which is quadratic for big ones.
    names: HashMap<ext2_ino_t, HashMap<Vec<u8>, ext2_ino_t>>,
    /// Directories whose entries changed, scrubbed at the end.
    touched: std::collections::BTreeSet<ext2_ino_t>,
    stats: ApplyStats,
}

struct Entry {
    kind: tar::EntryType,
    attrs: Attrs,
    size: u64,
    link: Option<Vec<u8>>,
    dev: (u32, u32),
    xattrs: Xattrs,
    sparse: Option<Sparse>,
}

/// Extended attributes: (name, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// A PAX-format GNU sparse file (formats 0.0, 0.1 and 1.0; the tar crate
/// expands only the old GNU `S` entries itself).
#[derive(Default, Debug)]
struct Sparse {
    major: Option<u32>,
    minor: Option<u32>,
    name: Option<Vec<u8>>,
    real_size: Option<u64>,
    /// (offset, length) pairs known from the PAX records (0.0 and 0.1).
    map: Vec<(u64, u64)>,
    pending_offset: Option<u64>,
}

fn num<T: std::str::FromStr>(v: &[u8], what: &str) -> Result<T> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::BadEntry(format!("bad {what} `{}`", escape(v))))
}

fn bad_field(what: &str, err: std::io::Error) -> Error {
    Error::BadEntry(format!("{what}: {err}"))
}

/// Mode, owner and time from the ustar fields of a tar header.
fn header_attrs(h: &tar::Header) -> Result<Attrs> {
    Ok(Attrs {
        perm: (h.mode().map_err(|x| bad_field("mode", x))? & 0o7777) as u16,
        uid: h.uid().map_err(|x| bad_field("uid", x))? as u32,
        gid: h.gid().map_err(|x| bad_field("gid", x))? as u32,
        mtime: h.mtime().map_err(|x| bad_field("mtime", x))? as i64,
        mtime_nsec: 0,
    })
}

/// Reads the PAX records of an entry: returns its xattrs and sparse-file
/// records, and applies `mtime`, `uid` and `gid` to `attrs`.
fn read_pax<R: Read>(
    e: &mut tar::Entry<'_, R>,
    attrs: &mut Attrs,
) -> Result<(Xattrs, Option<Sparse>)> {
    let mut xattrs = Vec::new();
    let mut sparse: Option<Sparse> = None;
    let Some(pax) = e.pax_extensions().map_err(|x| bad_field("pax header", x))? else {
        return Ok((xattrs, sparse));
    };
    for ext in pax {
        let ext = ext.map_err(|x| bad_field("pax record", x))?;
        let key = ext.key_bytes();
        let val = ext.value_bytes();
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.push((name.to_vec(), val.to_vec()));
        } else if key == b"mtime" {
            pax_mtime(val, attrs);
        } else if let Some(k) = key.strip_prefix(b"GNU.sparse.") {
            sparse.get_or_insert_with(Sparse::default).record(k, val)?;
        } else if key == b"uid" {
            if let Ok(v) = String::from_utf8_lossy(val).parse() {
                attrs.uid = v;
            }
        } else if key == b"gid" {
            if let Ok(v) = String::from_utf8_lossy(val).parse() {
                attrs.gid = v;
            }
        }
    }
    Ok((xattrs, sparse))
}

/// Applies a PAX `mtime` record (decimal seconds with an optional fraction)
/// to `attrs`; an unparsable one is ignored.
fn pax_mtime(val: &[u8], attrs: &mut Attrs) {
    let s = String::from_utf8_lossy(val);
    let (sec, frac) = s.split_once('.').unwrap_or((&s, ""));
    if let Ok(sec) = sec.parse::<i64>() {
        attrs.mtime = sec;
        let mut digits: String = frac.chars().take(9).collect();
        while digits.len() < 9 {
            digits.push('0');
        }
        attrs.mtime_nsec = digits.parse().unwrap_or(0);
        if sec < 0 && attrs.mtime_nsec > 0 && s.starts_with('-') {
            // "-1.5" means -1.5 s: floor the seconds.
            attrs.mtime -= 1;
            attrs.mtime_nsec = 1_000_000_000 - attrs.mtime_nsec;
        }
    }
}

impl Sparse {
    /// Takes one `GNU.sparse.<key>` PAX record.
    fn record(&mut self, key: &[u8], val: &[u8]) -> Result<()> {
        match key {
            b"major" => self.major = Some(num(val, "GNU.sparse.major")?),
            b"minor" => self.minor = Some(num(val, "GNU.sparse.minor")?),
            b"name" => self.name = Some(val.to_vec()),
            b"realsize" | b"size" => self.real_size = Some(num(val, "GNU.sparse.size")?),
            b"offset" => self.pending_offset = Some(num(val, "GNU.sparse.offset")?),
            b"numbytes" => {
                let off = self.pending_offset.take().ok_or_else(|| {
                    Error::BadEntry("GNU.sparse.numbytes without an offset".into())
                })?;
                self.map.push((off, num(val, "GNU.sparse.numbytes")?));
            }
            b"map" => {
                let nums: Vec<u64> = val
                    .split(|&b| b == b',')
                    .filter(|p| !p.is_empty())
                    .map(|p| num(p, "GNU.sparse.map"))
                    .collect::<Result<_>>()?;
                if nums.len() % 2 != 0 {
                    return Err(Error::BadEntry("odd GNU.sparse.map".into()));
                }
                self.map = nums.chunks(2).map(|c| (c[0], c[1])).collect();
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reads the 1.0 sparse map at the start of the data: decimal numbers, one
/// per line (count, then offset/length pairs), padded to 512 bytes.
fn read_sparse_map(r: &mut dyn Read) -> Result<(Vec<(u64, u64)>, u64)> {
    let mut consumed = 0u64;
    let mut line = |consumed: &mut u64| -> Result<u64> {
        let mut digits = Vec::new();
        loop {
            let mut b = [0u8; 1];
            r.read_exact(&mut b)
                .map_err(|e| Error::io("reading the sparse map", e))?;
            *consumed += 1;
            if b[0] == b'\n' {
                break;
            }
            if digits.len() > 20 {
                return Err(Error::BadEntry("sparse map number too long".into()));
            }
            digits.push(b[0]);
        }
        num(&digits, "sparse map number")
    };
    let n = line(&mut consumed)?;
    if n > 1 << 20 {
        return Err(Error::BadEntry(format!("sparse map with {n} extents")));
    }
    let mut map = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let off = line(&mut consumed)?;
        let len = line(&mut consumed)?;
        map.push((off, len));
    }
    let pad = (512 - consumed % 512) % 512;
    std::io::copy(&mut r.take(pad), &mut std::io::sink())
        .map_err(|e| Error::io("reading the sparse map", e))?;
    Ok((map, consumed + pad))
}

impl<'a> Applier<'a> {
    /// A fresh applier for one layer.
    pub fn new(fs: &'a Ext4) -> Applier<'a> {
        Applier {
            fs,
            dirs: HashMap::new(),
            created: Created::default(),
            names: HashMap::new(),
            touched: Default::default(),
            stats: ApplyStats::default(),
        }
    }

    /// Applies every entry of the (decompressed) tar stream `r`. The
    /// headers of one entry may take [`MAX_ENTRY_HEADERS`] bytes.
    pub fn apply(mut self, r: impl Read) -> Result<ApplyStats> {
        let budget = Rc::new(Cell::new(None));
        let mut ar = tar::Archive::new(Budgeted {
            inner: r,
            left: budget.clone(),
        });
        let mut entries = ar
            .entries()
            .map_err(|e| Error::io("reading the layer tar", e))?;
        loop {
            budget.set(Some(MAX_ENTRY_HEADERS));
            let Some(e) = entries.next() else {
                break;
            };
            let mut e = e.map_err(|e| {
                if budget.get() == Some(0) {
                    Error::HeadersTooLarge {
                        entry: self.stats.entries,
                        limit: MAX_ENTRY_HEADERS,
                    }
                } else {
                    Error::io("reading the layer tar", e)
                }
            })?;
            budget.set(None);
            let raw_path = e.path_bytes().into_owned();
            if self.stats.entries == 0 && raw_path == b"overlaybd.commit" {
                // A tar-wrapped overlaybd blob: unpacked, it would become a
                // file. Only uncompressed ones at the image's bottom are
                // recognised and kept.
                return Err(Error::Unsupported(
                    "the layer is an overlaybd blob (a one-file tar `overlaybd.commit`): overlaybd layers are kept only when uncompressed and at the bottom of the image".into(),
                ));
            }
            self.entry(&mut e, &raw_path)
                .map_err(|err| err.in_entry(&raw_path))?;
            // Data the entry did not use (a whiteout's, say) is skipped
            // here, outside the header budget.
            io::copy(&mut e, &mut io::sink())
                .map_err(|x| Error::io("reading the layer tar", x).in_entry(&raw_path))?;
            self.stats.entries += 1;
        }
        for dir in std::mem::take(&mut self.touched) {
            self.fs.settle_dir_nlink(dir)?;
            self.fs.scrub_dir(dir)?;
        }
        Ok(self.stats)
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>, raw_path: &[u8]) -> Result<()> {
        let kind = e.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let h = e.header();
        let mut attrs = header_attrs(h)?;
        let dev = (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        );
        let (mut xattrs, sparse) = read_pax(e, &mut attrs)?;
        // Deterministic xattr order whatever the tar writer did.
        xattrs.sort();
        let link = match kind {
            tar::EntryType::Link | tar::EntryType::Symlink => Some(
                e.link_name_bytes()
                    .ok_or_else(|| Error::BadEntry("link without a target".into()))?
                    .into_owned(),
            ),
            _ => None,
        };
        let mut size = e.size();
        let parts = match sparse.as_ref().and_then(|s| s.name.as_deref()) {
            Some(name) => normalize(name)?,
            None => normalize(raw_path)?,
        };
        if let Some(sp) = &sparse {
            size = sp
                .real_size
                .ok_or_else(|| Error::BadEntry("PAX sparse file without a real size".into()))?;
        }
        let ent = Entry {
            kind,
            attrs,
            size,
            link,
            dev,
            xattrs,
            sparse,
        };

        // Whiteouts.
        if let Some(last) = parts.last() {
            if last.as_slice() == OPAQUE.as_bytes() {
                self.stats.whiteouts += 1;
                return self.opaque(&parts[..parts.len() - 1]);
            }
            if let Some(name) = last.strip_prefix(WHITEOUT.as_bytes()) {
                self.stats.whiteouts += 1;
                let mut target = parts[..parts.len() - 1].to_vec();
                target.push(name.to_vec());
                return self.whiteout(&target);
            }
        }
        if parts.is_empty() {
            // The root itself.
            if kind.is_dir() {
                self.fs.set_attrs(EXT2_ROOT_INO, &ent.attrs)?;
                self.fs.set_xattrs(EXT2_ROOT_INO, &ent.xattrs, true)?;
            }
            return Ok(());
        }
        self.create(&parts, ent, e)
    }

    fn create(&mut self, parts: &[Vec<u8>], ent: Entry, data: &mut dyn Read) -> Result<()> {
        let (dir_parts, name) = parts.split_at(parts.len() - 1);
        let name = &name[0];
        let parent = self.ensure_dir(dir_parts)?;
        let path = join(parts);
        let existing = self.lookup(parent, name)?;
        let fs = self.fs;
        if let Some(old) = existing {
            let old_inode = fs.read_inode(old)?;
            let old_is_dir = old_inode.i.i_mode & mode::S_IFMT == mode::S_IFDIR;
            if ent.kind.is_dir() && old_is_dir {
                fs.set_attrs(old, &ent.attrs)?;
                fs.set_xattrs(old, &ent.xattrs, true)?;
                self.created.insert(&path);
                self.cache_dir(&path, old);
                return Ok(());
            }
            if ent.kind == tar::EntryType::Link {
                let target = self.resolve_link_target(ent.link.as_deref().unwrap_or_default())?;
                if target == old {
                    self.created.insert(path);
                    return Ok(());
                }
            }
            self.remove(parent, name, old)?;
        }
        let ino = match ent.kind {
            tar::EntryType::Directory => {
                let ino = self.mkdir(parent, name, &ent.attrs)?;
                self.cache_dir(&path, ino);
                ino
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.stats.file_bytes += ent.size;
                match &ent.sparse {
                    None => fs.create_file(parent, name, &ent.attrs, ent.size, None, data)?,
                    Some(sp) => {
                        let map = if sp.major == Some(1) {
                            read_sparse_map(data)?.0
                        } else {
                            sp.map.clone()
                        };
                        fs.create_file(parent, name, &ent.attrs, ent.size, Some(&map), data)?
                    }
                }
            }
            tar::EntryType::Symlink => fs.symlink(
                parent,
                name,
                ent.link.as_deref().unwrap_or_default(),
                &ent.attrs,
            )?,
            tar::EntryType::Link => {
                let raw = ent.link.as_deref().unwrap_or_default();
                let target = self.resolve_link_target(raw)?;
                fs.hardlink(parent, name, target).map_err(|e| match e {
                    Error::TooManyLinks { links, max, .. } => Error::TooManyLinks {
                        target: escape(raw),
                        links,
                        max,
                    },
                    e => e,
                })?;
                self.note(parent, name, target);
                self.created.insert(path);
                // A hard link shares the target's inode, xattrs included.
                return Ok(());
            }
            tar::EntryType::Char => fs.mknod(
                parent,
                name,
                mode::S_IFCHR,
                ent.dev.0,
                ent.dev.1,
                &ent.attrs,
            )?,
            tar::EntryType::Block => fs.mknod(
                parent,
                name,
                mode::S_IFBLK,
                ent.dev.0,
                ent.dev.1,
                &ent.attrs,
            )?,
            tar::EntryType::Fifo => fs.mknod(parent, name, mode::S_IFIFO, 0, 0, &ent.attrs)?,
            other => {
                return Err(Error::Unsupported(format!("tar entry type {other:?}")));
            }
        };
        self.note(parent, name, ino);
        fs.set_xattrs(ino, &ent.xattrs, false)?;
        self.created.insert(path);
        Ok(())
    }

    /// `name` in directory `dir`, through the entry cache.
    fn lookup(&mut self, dir: ext2_ino_t, name: &[u8]) -> Result<Option<ext2_ino_t>> {
        if !self.names.contains_key(&dir) {
            let map: HashMap<Vec<u8>, ext2_ino_t> = self.fs.list_dir(dir)?.into_iter().collect();
            self.names.insert(dir, map);
        }
        Ok(self.names[&dir].get(name).copied())
    }

    /// Records a new entry in the cache.
    fn note(&mut self, dir: ext2_ino_t, name: &[u8], ino: ext2_ino_t) {
        self.touched.insert(dir);
        if let Some(m) = self.names.get_mut(&dir) {
            m.insert(name.to_vec(), ino);
        }
    }

    /// Removes an entry (recursively) and keeps the caches right: a removed
    /// directory or symlink may have been part of cached paths, and freed
    /// directory inode numbers may come back as new directories, so their
    /// listings go. Only what was removed leaves the caches: a whiteout
    /// costs the same however many came before it.
    fn remove(&mut self, dir: ext2_ino_t, name: &[u8], ino: ext2_ino_t) -> Result<()> {
        let kind = self.fs.read_inode(ino)?.i.i_mode & mode::S_IFMT;
        let names = &mut self.names;
        self.fs.remove(dir, name, ino, &mut |gone| {
            names.remove(&gone);
        })?;
        self.touched.insert(dir);
        if let Some(m) = self.names.get_mut(&dir) {
            m.remove(name);
        }
        if kind == mode::S_IFDIR || kind == mode::S_IFLNK {
            self.clear_dirs();
        }
        Ok(())
    }

    /// Remembers that directory `path` is inode `ino`.
    fn cache_dir(&mut self, path: &[u8], ino: ext2_ino_t) {
        if self.dirs.len() >= DIR_CACHE {
            self.clear_dirs();
        }
        self.dirs.insert(Created::key(path), ino);
    }

    /// Forgets every cached directory path (a fresh map when the old one
    /// grew big, so that clearing stays cheap).
    fn clear_dirs(&mut self) {
        if self.dirs.capacity() > 1024 {
            self.dirs = HashMap::new();
        } else {
            self.dirs.clear();
        }
    }

    fn mkdir(&mut self, parent: ext2_ino_t, name: &[u8], a: &Attrs) -> Result<ext2_ino_t> {
        let ino = self.fs.mkdir(parent, name, a)?;
        self.note(parent, name, ino);
        self.names.insert(ino, HashMap::new());
        Ok(ino)
    }

    fn resolve_link_target(&mut self, raw: &[u8]) -> Result<ext2_ino_t> {
        let parts = normalize(raw)?;
        if parts.is_empty() {
            return Err(Error::BadEntry("hard link to the root".into()));
        }
        let (dir, name) = parts.split_at(parts.len() - 1);
        let missing =
            || Error::BadEntry(format!("hard link target `{}` does not exist", escape(raw)));
        let parent = self.find_dir(dir)?.ok_or_else(missing)?;
        self.lookup(parent, &name[0])?.ok_or_else(missing)
    }

    /// The directory at `parts`, following symlinks in it, if it exists.
    fn find_dir(&mut self, parts: &[Vec<u8>]) -> Result<Option<ext2_ino_t>> {
        self.resolve(parts, false)
    }

    /// The directory at `parts`, creating missing ones (mode 0755,
    /// root-owned). A symlink on the way is followed; its target must
    /// exist.
    fn ensure_dir(&mut self, parts: &[Vec<u8>]) -> Result<ext2_ino_t> {
        self.resolve(parts, true)?.ok_or_else(|| {
            Error::BadEntry(format!(
                "parent `{}` is a symlink to a missing directory or to a non-directory",
                escape(&join(parts))
            ))
        })
    }

    /// Resolves the directory `parts` one component at a time, without
    /// recursion (paths may be tens of thousands of levels deep), following
    /// symlinks inside the image root as the kernel would (`..` is the
    /// parent of the directory reached, never above `/`), at most
    /// [`MAX_SYMLINKS`] of them. With `create`, missing directories on the
    /// path itself are made and a non-directory there is replaced by one;
    /// components that come from a symlink's target are never created.
    fn resolve(&mut self, parts: &[Vec<u8>], create: bool) -> Result<Option<ext2_ino_t>> {
        if parts.is_empty() {
            return Ok(Some(EXT2_ROOT_INO));
        }
        let path = join(parts);
        if let Some(&ino) = self.dirs.get(&Created::key(&path)) {
            return Ok(Some(ino));
        }
        // Components still to resolve, the next one last, each with whether
        // it may be created.
        let mut todo: Vec<(Vec<u8>, bool)> =
            parts.iter().rev().map(|c| (c.clone(), create)).collect();
        // The directories resolved so far, `/` first.
        let mut chain: Vec<ext2_ino_t> = vec![EXT2_ROOT_INO];
        let mut links = 0u32;
        while let Some((name, may_create)) = todo.pop() {
            let cur = *chain.last().expect("never empty");
            match name.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if chain.len() > 1 {
                        chain.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let ino = match self.lookup(cur, &name)? {
                Some(ino) => {
                    let inode = self.fs.read_inode(ino)?;
                    match inode.i.i_mode & mode::S_IFMT {
                        mode::S_IFDIR => ino,
                        mode::S_IFLNK => {
                            links += 1;
                            if links > MAX_SYMLINKS {
                                return Err(Error::BadEntry(format!(
                                    "too many levels of symbolic links in `{}`",
                                    escape(&path)
                                )));
                            }
                            let target = self.fs.readlink(ino, &inode)?;
                            if target.first() == Some(&b'/') {
                                chain.truncate(1);
                            }
                            todo.extend(
                                target
                                    .split(|&b| b == b'/')
                                    .rev()
                                    .map(|c| (c.to_vec(), false)),
                            );
                            continue;
                        }
                        _ if may_create => {
                            // A non-directory where a parent directory is
                            // needed: the layer replaces it.
                            self.remove(cur, &name, ino)?;
                            self.mkdir(cur, &name, &default_dir_attrs())?
                        }
                        _ => return Ok(None),
                    }
                }
                None if may_create => self.mkdir(cur, &name, &default_dir_attrs())?,
                None => return Ok(None),
            };
            chain.push(ino);
        }
        let ino = *chain.last().expect("never empty");
        self.cache_dir(&path, ino);
        Ok(Some(ino))
    }

    fn whiteout(&mut self, parts: &[Vec<u8>]) -> Result<()> {
        let path = join(parts);
        if self.created.contains(&path) {
            return Ok(());
        }
        let (dir, name) = parts.split_at(parts.len() - 1);
        let Some(parent) = self.find_dir(dir)? else {
            return Ok(());
        };
        if let Some(ino) = self.lookup(parent, &name[0])? {
            self.remove(parent, &name[0], ino)?;
        }
        Ok(())
    }

    fn opaque(&mut self, dir: &[Vec<u8>]) -> Result<()> {
        let ino = self.ensure_dir(dir)?;
        let prefix = join(dir);
        for (name, cino) in self.fs.list_dir(ino)? {
            let mut p = prefix.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&name);
            if self.created.contains(&p) {
                continue;
            }
            if dir.is_empty() && name == b"lost+found" {
                continue;
            }
            self.remove(ino, &name, cino)?;
        }
        Ok(())
    }
}

fn default_dir_attrs() -> Attrs {
    Attrs {
        perm: 0o755,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_paths() {
        assert_eq!(
            normalize(b"./a//b/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert!(normalize(b"./").unwrap().is_empty());
        assert!(normalize(b"a/../b").is_err());
    }
}
