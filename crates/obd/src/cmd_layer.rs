//! `obd layer …`

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use overlaybd_core::image::Layer;
use overlaybd_core::lsmt::{self, CommitOptions, CreateOptions, RoLayer, Uuid, WritableLayer};
use overlaybd_core::source::{self, Blob, Nesting};
use overlaybd_core::tar::TarWriter;
use serde_json::json;
use zfile::{FileSource, ReadAt};

use crate::cmd_zfile::{default_threads, parse_block_size, AlgoArg, DEFAULT_ALGORITHM};
use crate::util::{human, parse_size};

#[derive(Subcommand, Debug)]
pub enum LayerCmd {
    /// Create an empty writable layer (an RW data file and an RW index file).
    Create {
        /// Virtual disk size (e.g. 64G); 0 inherits the size of the layers below.
        #[arg(long, default_value = "0", value_parser = parse_size_arg)]
        vsize: u64,
        /// This layer's UUID.
        #[arg(long)]
        uuid: Option<String>,
        /// The UUID of the layer below.
        #[arg(long)]
        parent_uuid: Option<String>,
        /// RW data file to create.
        data: PathBuf,
        /// RW index file to create.
        index: PathBuf,
    },
    /// Write a file's bytes into a writable layer at a byte offset (512-aligned).
    Write {
        /// Byte offset on the virtual disk (multiple of 512).
        #[arg(long, value_parser = parse_size_arg)]
        offset: u64,
        /// RW data file.
        data: PathBuf,
        /// RW index file.
        index: PathBuf,
        /// File whose bytes to write (padded with zeros to 512).
        input: PathBuf,
    },
    /// Discard (zero) a range of a writable layer, hiding lower layers there.
    Discard {
        /// Byte offset (multiple of 512).
        #[arg(long, value_parser = parse_size_arg)]
        offset: u64,
        /// Length in bytes (multiple of 512).
        #[arg(long, value_parser = parse_size_arg)]
        length: u64,
        /// RW data file.
        data: PathBuf,
        /// RW index file.
        index: PathBuf,
    },
    /// Seal a writable layer: append its index and a trailer to the data file,
    /// which becomes a read-only layer (not compacted).
    Seal {
        /// RW data file (becomes the sealed file).
        data: PathBuf,
        /// RW index file.
        index: PathBuf,
    },
    /// Commit (compact) a layer into a read-only layer file, optionally ZFile-compressed
    /// and tar-wrapped. Inputs: `<data> <index> <out>` for a writable layer, or
    /// `<layer> <out>` for a sealed (or any read-only) layer file.
    Commit {
        /// Compress the output as a ZFile.
        #[arg(long)]
        zfile: bool,
        /// ZFile codec (`--algorithm lz4 --block-size 4K`: upstream's default).
        #[arg(long, value_enum, default_value_t = DEFAULT_ALGORITHM, requires = "zfile")]
        algorithm: AlgoArg,
        /// ZFile block size: 4K, 8K, 16K or 32K.
        #[arg(long, default_value_t = converter::DEFAULT_BLOCK_SIZE, value_parser = parse_block_size, requires = "zfile")]
        block_size: u32,
        /// zstd compression level, 1–22 (upstream writes 3). Ignored for LZ4.
        #[arg(long, default_value_t = converter::DEFAULT_LEVEL, requires = "zfile",
              value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
        /// Wrap the output in the overlaybd tar disguise (what registries carry).
        #[arg(long)]
        tar: bool,
        /// With `--zfile` or `--tar` a piece table of the output (for
        /// verified lazy reads) is written to `<out>.verity` and its digest
        /// printed; this turns that off.
        #[arg(long)]
        no_verity: bool,
        /// UUID of the committed layer (default: unset, as upstream).
        #[arg(long)]
        uuid: Option<String>,
        /// Parent UUID (default: the source layer's).
        #[arg(long)]
        parent_uuid: Option<String>,
        /// Commit message stored in the header (at most 256 bytes).
        #[arg(short, long)]
        message: Option<String>,
        /// Compression threads.
        #[arg(long, default_value_t = default_threads())]
        threads: usize,
        /// `<data> <index> <out>` or `<layer> <out>`.
        #[arg(num_args = 2..=3, required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show a layer file's header, trailer and index (any nesting).
    Info {
        /// Layer file: LSMT, ZFile(LSMT), tar(LSMT) or tar(ZFile(LSMT)).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also list every index entry.
        #[arg(long)]
        entries: bool,
    },
    /// Check a layer file: every reader rule, every ZFile CRC, every data read.
    /// Says what was checked and what was not: a raw (uncompressed) LSMT file
    /// has no checksums, so its changed data bytes cannot be detected.
    Verify {
        /// Layer file (any nesting).
        file: PathBuf,
        /// Also apply every rule upstream's writers follow, for a shippable layer.
        #[arg(long)]
        strict: bool,
        /// Print JSON (with `checked` and `not_checked` lists) instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_uuid(s: &Option<String>, what: &str) -> Result<Option<Uuid>> {
    s.as_deref()
        .map(|u| Uuid::parse(u).with_context(|| format!("--{what} `{u}`")))
        .transpose()
}

fn open_blob(path: &Path) -> Result<Blob> {
    let file = overlaybd_core::regular::open(path)?;
    Ok(Arc::new(FileSource::new(file).with_context(|| {
        format!("cannot open {}", path.display())
    })?))
}

pub fn run(cmd: LayerCmd) -> Result<()> {
    match cmd {
        LayerCmd::Create {
            vsize,
            uuid,
            parent_uuid,
            data,
            index,
        } => create(vsize, &uuid, &parent_uuid, &data, &index),
        LayerCmd::Write {
            offset,
            data,
            index,
            input,
        } => write(offset, &data, &index, &input),
        LayerCmd::Discard {
            offset,
            length,
            data,
            index,
        } => discard(offset, length, &data, &index),
        LayerCmd::Seal { data, index } => seal(&data, &index),
        LayerCmd::Commit {
            zfile: compress,
            algorithm,
            block_size,
            level,
            tar,
            no_verity,
            uuid,
            parent_uuid,
            message,
            threads,
            paths,
        } => {
            let opts = CommitOptions {
                uuid: parse_uuid(&uuid, "uuid")?,
                parent_uuid: parse_uuid(&parent_uuid, "parent-uuid")?,
                user_tag: message.unwrap_or_default().into_bytes(),
                ..Default::default()
            };
            let zopts = compress.then(|| zfile::Options {
                algorithm: algorithm.into(),
                block_size,
                level,
                threads,
            });
            let verity = (compress || tar) && !no_verity;
            commit(&paths, &opts, zopts, tar)?;
            if verity {
                write_piece_table(paths.last().expect("clap enforces 2..=3 paths"))?;
            }
            Ok(())
        }
        LayerCmd::Info {
            file,
            json,
            entries,
        } => info(&file, json, entries),
        LayerCmd::Verify { file, strict, json } => verify(&file, strict, json),
    }
}

fn create(
    vsize: u64,
    uuid: &Option<String>,
    parent_uuid: &Option<String>,
    data: &Path,
    index: &Path,
) -> Result<()> {
    if vsize % 512 != 0 {
        bail!("--vsize must be a multiple of 512");
    }
    let opts = CreateOptions {
        virtual_size: vsize,
        uuid: parse_uuid(uuid, "uuid")?.unwrap_or(Uuid::NIL),
        parent_uuid: parse_uuid(parent_uuid, "parent-uuid")?.unwrap_or(Uuid::NIL),
    };
    let w = WritableLayer::create(data, index, opts)?;
    w.fsync()?;
    eprintln!(
        "created writable layer {} + {} ({})",
        data.display(),
        index.display(),
        human(vsize)
    );
    Ok(())
}

fn write(offset: u64, data: &Path, index: &Path, input: &Path) -> Result<()> {
    let mut w = WritableLayer::open(data, index)?;
    let mut f = File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut at = offset;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = f.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        let padded = n.div_ceil(512) * 512;
        buf[n..padded].fill(0);
        w.write_at(&buf[..padded], at)?;
        at += padded as u64;
        if n < buf.len() {
            break;
        }
    }
    w.fsync()?;
    eprintln!("wrote {} at offset {}", human(at - offset), offset);
    Ok(())
}

fn discard(offset: u64, length: u64, data: &Path, index: &Path) -> Result<()> {
    let mut w = WritableLayer::open(data, index)?;
    w.discard(offset, length)?;
    w.fsync()?;
    Ok(())
}

fn seal(data: &Path, index: &Path) -> Result<()> {
    let w = WritableLayer::open(data, index)?;
    let s = w.seal()?;
    eprintln!(
        "sealed {}: {} entries at offset {}, {} bytes",
        data.display(),
        s.index_size,
        s.index_offset,
        s.size
    );
    Ok(())
}

/// Commits the source layer (`<data> <index>` or `<layer>`, the first paths)
/// into `sink`.
fn commit_source(
    paths: &[PathBuf],
    opts: &CommitOptions,
    sink: &mut dyn Write,
) -> Result<lsmt::CommitInfo> {
    if paths.len() == 3 {
        let w = WritableLayer::open(&paths[0], &paths[1])?;
        Ok(w.commit(opts, sink)?)
    } else {
        let dec = source::decode(open_blob(&paths[0])?)
            .with_context(|| format!("{}", paths[0].display()))?;
        let ro = RoLayer::open(dec.lsmt).with_context(|| format!("{}", paths[0].display()))?;
        Ok(ro.commit(opts, sink)?)
    }
}

/// `obd layer commit`: the last of `paths` is the output; `zopts` compresses
/// it as a ZFile, `tar` wraps it.
fn commit(
    paths: &[PathBuf],
    opts: &CommitOptions,
    zopts: Option<zfile::Options>,
    tar: bool,
) -> Result<()> {
    let out_path = paths.last().expect("clap enforces 2..=3 paths");
    let mut out =
        File::create(out_path).with_context(|| format!("cannot create {}", out_path.display()))?;
    let tw = if tar {
        Some(TarWriter::begin(&mut out)?)
    } else {
        None
    };
    let (info, payload) = if let Some(zopts) = zopts {
        let mut z = zfile::ZFileWriter::new(&mut out, zopts)?;
        let info = commit_source(paths, opts, &mut z)?;
        let (_, zi) = z.finish()?;
        (info, zi.zfile_size)
    } else {
        let mut bw = BufWriter::with_capacity(1 << 20, &mut out);
        let info = commit_source(paths, opts, &mut bw)?;
        bw.flush()?;
        drop(bw);
        (info, info.bytes)
    };
    if let Some(tw) = tw {
        tw.finish(&mut out, payload)?;
    }
    out.sync_all()?;
    eprintln!(
        "committed {} entries (+{} padding), {} of data into {} ({})",
        info.entries,
        info.padding,
        human(info.data_sectors * 512),
        out_path.display(),
        human(out.metadata()?.len())
    );
    Ok(())
}

/// Writes the piece table of the layer blob `out` to `<out>.verity` and
/// prints its digest and size (what the layer's `verity.digest` and
/// `verity.size` annotations carry when the blob is pushed).
fn write_piece_table(out: &Path) -> Result<()> {
    use obd_remote::verity::{piece_size_for, PieceTable};
    let f = File::open(out).with_context(|| format!("cannot open {}", out.display()))?;
    let size = f.metadata()?.len();
    let t = PieceTable::build(
        std::io::BufReader::with_capacity(1 << 20, f),
        piece_size_for(size),
    )
    .with_context(|| format!("hashing {}", out.display()))?;
    let bytes = t.encode();
    let mut p = out.as_os_str().to_owned();
    p.push(".verity");
    let p = PathBuf::from(p);
    std::fs::write(&p, &bytes).with_context(|| format!("cannot write {}", p.display()))?;
    eprintln!(
        "piece table of {} ({} pieces of {}) in {}: {} ({} bytes)",
        t.blob_digest(),
        t.pieces(),
        human(t.piece_size()),
        p.display(),
        obd_remote::oci::sha256_digest(&bytes),
        bytes.len()
    );
    Ok(())
}

/// A header or trailer as JSON.
fn header_json(x: &lsmt::HeaderTrailer) -> serde_json::Value {
    json!({
        "flags": x.flags,
        "index_offset": x.index_offset,
        "index_size": x.index_size,
        "virtual_size": x.virtual_size,
        "uuid": x.uuid_str(),
        "parent_uuid": x.parent_uuid_str(),
        "version": [x.version, x.sub_version],
        "user_tag": String::from_utf8_lossy(x.user_tag_bytes()),
    })
}

fn info(file: &Path, json: bool, entries: bool) -> Result<()> {
    let layer = Layer::open(file.display().to_string(), open_blob(file)?)
        .with_context(|| format!("{}", file.display()))?;
    let ro = &layer.lsmt;
    let (h, t) = (ro.header(), ro.trailer());
    let segs = ro.segments();
    let zeroed = segs.iter().filter(|s| s.zeroed).count();
    let mut v = json!({
        "file": file.display().to_string(),
        "nesting": layer.nesting.to_string(),
        "blob_size": layer.blob_size,
        "lsmt_size": ro.source().size(),
        "kind": format!("{:?}", ro.kind()),
        "header": header_json(h),
        "trailer": header_json(t),
        "valid_entries": segs.len(),
        "zeroed_entries": zeroed,
        "data_sectors": ro.data_sectors(),
    });
    if entries {
        v["entries"] = segs
            .iter()
            .map(|s| json!([s.offset, s.length, s.moffset, s.zeroed as u8]))
            .collect();
    }
    crate::util::print_object(&v, json);
    Ok(())
}

/// `obd layer verify`: checks everything the layer's format lets be checked
/// and reports, item by item, what was checked and what the format gives no
/// way to check (a raw LSMT file has no checksums: changed data bytes read
/// back as valid data).
fn verify(file: &Path, strict: bool, json: bool) -> Result<()> {
    let name = file.display().to_string();
    let dec = source::decode(open_blob(file)?).with_context(|| name.clone())?;
    let (mut checked, mut not_checked) = (Vec::<String>::new(), Vec::<String>::new());
    let mut note = |ok: bool, what: String| {
        if ok {
            checked.push(what)
        } else {
            not_checked.push(what)
        }
    };
    if matches!(dec.nesting, Nesting::Tar | Nesting::TarZFile) {
        note(true, "tar wrapper header checksum".into());
    }
    let mut data_checksummed = false;
    if let Some(z) = &dec.zfile {
        let r = z.verify().with_context(|| format!("{name}: ZFile"))?;
        let present = |ok: bool| if ok { "" } else { ": absent from the file" };
        note(
            r.header_digest_checked,
            format!("ZFile header digest{}", present(r.header_digest_checked)),
        );
        note(
            r.trailer_digest_checked,
            format!("ZFile trailer digest{}", present(r.trailer_digest_checked)),
        );
        note(
            r.index_crc_checked,
            format!("ZFile jump table CRC{}", present(r.index_crc_checked)),
        );
        data_checksummed = r.block_crcs_checked;
        note(
            r.block_crcs_checked,
            if r.block_crcs_checked {
                format!(
                    "ZFile block CRC-32C of all {} blocks ({} stored), covering the LSMT file: header, index and data",
                    r.blocks,
                    human(r.compressed_bytes)
                )
            } else {
                "ZFile block data: the file stores no block CRCs (verify = 0)".into()
            },
        );
        if strict {
            if let Err(v) = zfile::validate_strict(z) {
                bail!("{name}: ZFile breaks upstream rules:\n  {}", v.join("\n  "));
            }
            note(true, "strict ZFile rules ok".into());
        }
    }
    let ro = RoLayer::open(dec.lsmt.clone()).with_context(|| name.clone())?;
    note(
        true,
        "LSMT header, trailer and index against the reader's rules (magic, flags, sizes, entry order and ranges)".into(),
    );
    // Read every mapped byte once: catches data that cannot be decoded.
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    for s in ro.segments().iter().filter(|s| !s.zeroed) {
        let (mut at, end) = (s.moffset * 512, s.mend() * 512);
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            dec.lsmt
                .read_exact_at(&mut buf[..n], at)
                .with_context(|| format!("{name}: reading layer data at offset {at}"))?;
            at += n as u64;
            bytes += n as u64;
        }
    }
    note(
        true,
        format!(
            "every mapped data byte read ({} entries, {})",
            ro.segments().len(),
            human(bytes)
        ),
    );
    if !data_checksummed {
        note(
            false,
            "LSMT data and index contents: not checksummed by the format (raw LSMT), so changed bytes cannot be detected".into(),
        );
    }
    if strict {
        let rep = lsmt::validate_strict(&ro)
            .with_context(|| format!("{name}: LSMT breaks upstream rules"))?;
        note(true, format!("strict LSMT rules ok ({rep:?})"));
    } else {
        note(false, "upstream writer rules (use --strict)".into());
    }
    if json {
        let v = json!({
            "file": name,
            "ok": true,
            "nesting": dec.nesting.to_string(),
            "entries": ro.segments().len(),
            "data_bytes_read": bytes,
            "data_checksummed": data_checksummed,
            "checked": checked,
            "not_checked": not_checked,
        });
        crate::util::print_object(&v, true);
        return Ok(());
    }
    let caveat = if data_checksummed {
        ""
    } else {
        "; data not checksummed by the format"
    };
    println!(
        "{name}: OK (nesting {}; {} entries, {} of data read{caveat})",
        dec.nesting,
        ro.segments().len(),
        human(bytes)
    );
    for c in &checked {
        println!("  checked: {c}");
    }
    for c in &not_checked {
        println!("  not checked: {c}");
    }
    Ok(())
}
