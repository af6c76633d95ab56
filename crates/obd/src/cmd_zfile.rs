//! `obd zfile …`

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use overlaybd_core::source::Blob;
use overlaybd_core::tar;
use serde_json::json;
use zfile::{Algorithm, FileSource, ReadAt, Window, ZFileReader};

use crate::util::{human, parse_size};

/// The codec `obd convert` and `obd layer commit --zfile` write by default,
/// [`converter::DEFAULT_ALGORITHM`]; with [`converter::DEFAULT_BLOCK_SIZE`]
/// and [`converter::DEFAULT_LEVEL`]. `--algorithm lz4 --block-size 4K` gives
/// upstream's default output.
pub const DEFAULT_ALGORITHM: AlgoArg = AlgoArg::Zstd;

/// Block codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlgoArg {
    /// LZ4 raw blocks (fast decode; upstream default).
    Lz4,
    /// One zstd frame per block (smaller).
    Zstd,
}

impl From<AlgoArg> for Algorithm {
    fn from(a: AlgoArg) -> Self {
        match a {
            AlgoArg::Lz4 => Algorithm::Lz4,
            AlgoArg::Zstd => Algorithm::Zstd,
        }
    }
}

/// Parses a write block size: 4K, 8K, 16K or 32K.
pub fn parse_block_size(s: &str) -> Result<u32, String> {
    match parse_size(s).map_err(|e| e.to_string())? {
        v @ (4096 | 8192 | 16384 | 32768) => Ok(v as u32),
        65536 => Err(
            "64K blocks are read-only: upstream overlaybd cannot read stored blocks over 64 KiB"
                .into(),
        ),
        v => Err(format!("{v} is not a block size; use 4K, 8K, 16K or 32K")),
    }
}

#[derive(Subcommand, Debug)]
pub enum ZfileCmd {
    /// Compress a file into a ZFile (optionally tar-wrapped, as registries carry it).
    Compress {
        /// Block codec.
        #[arg(long, value_enum, default_value = "lz4")]
        algorithm: AlgoArg,
        /// Uncompressed block size: 4K, 8K, 16K or 32K.
        #[arg(long, default_value = "4K", value_parser = parse_block_size)]
        block_size: u32,
        /// Wrap the output in the overlaybd tar disguise.
        #[arg(long)]
        tar: bool,
        /// Compression threads (the output is identical for any count).
        #[arg(long, default_value_t = default_threads())]
        threads: usize,
        /// Input file.
        input: PathBuf,
        /// Output file.
        output: PathBuf,
    },
    /// Decompress a ZFile (plain or tar-wrapped) to its original bytes.
    Extract {
        /// Input ZFile (plain or tar-wrapped).
        input: PathBuf,
        /// Output file.
        output: PathBuf,
    },
    /// Check the header digest, the jump-table CRC and every block CRC without decompressing.
    Verify {
        /// The ZFile (plain or tar-wrapped).
        file: PathBuf,
        /// Also apply every rule upstream's writers follow (flags, block size, layout).
        #[arg(long)]
        strict: bool,
    },
    /// Show the header fields of a ZFile.
    Info {
        /// The ZFile (plain or tar-wrapped).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Opens a ZFile, peeling a tar wrapper if there is one.
pub fn open_zfile(path: &Path) -> Result<(ZFileReader<Blob>, Option<u64>)> {
    let file = overlaybd_core::regular::open(path)?;
    let src: Arc<dyn ReadAt> =
        Arc::new(FileSource::new(file).with_context(|| format!("cannot open {}", path.display()))?);
    let payload = tar::detect(&*src).with_context(|| format!("{}", path.display()))?;
    let (inner, tar_off): (Arc<dyn ReadAt>, Option<u64>) = match payload {
        Some(p) => (Arc::new(Window::new(src, p.offset, p.size)), Some(p.offset)),
        None => (src, None),
    };
    let z = ZFileReader::open(inner)
        .with_context(|| format!("{}: not a valid ZFile", path.display()))?;
    Ok((z, tar_off))
}

pub fn run(cmd: ZfileCmd) -> Result<()> {
    match cmd {
        ZfileCmd::Compress {
            algorithm,
            block_size,
            tar: wrap,
            threads,
            input,
            output,
        } => {
            let t0 = Instant::now();
            let inp =
                File::open(&input).with_context(|| format!("cannot open {}", input.display()))?;
            let mut out = File::create(&output)
                .with_context(|| format!("cannot create {}", output.display()))?;
            let opts = zfile::Options {
                algorithm: algorithm.into(),
                block_size,
                threads,
                ..Default::default()
            };
            let tw = if wrap {
                Some(tar::TarWriter::begin(&mut out)?)
            } else {
                None
            };
            let info = zfile::compress(BufReader::with_capacity(1 << 20, inp), &mut out, opts)
                .with_context(|| format!("compressing {}", input.display()))?;
            if let Some(tw) = tw {
                tw.finish(&mut out, info.zfile_size)?;
            }
            out.sync_all()?;
            eprintln!(
                "{} -> {}: {} -> {} ({} blocks of {} KiB, {}{}), {:.2}s",
                input.display(),
                output.display(),
                human(info.original_size),
                human(out.metadata()?.len()),
                info.blocks,
                info.block_size / 1024,
                info.algorithm,
                if wrap { ", tar" } else { "" },
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        ZfileCmd::Extract { input, output } => {
            let (z, _) = open_zfile(&input)?;
            let out = File::create(&output)
                .with_context(|| format!("cannot create {}", output.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, out);
            let n = zfile::decompress(z.into_inner(), &mut w)
                .with_context(|| format!("extracting {}", input.display()))?;
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            eprintln!("{} -> {}: {} bytes", input.display(), output.display(), n);
            Ok(())
        }
        ZfileCmd::Verify { file, strict } => {
            let (z, _) = open_zfile(&file)?;
            let r = z
                .verify()
                .with_context(|| format!("{}: verification failed", file.display()))?;
            if !r.block_crcs_checked {
                bail!(
                    "{}: the file stores no block CRCs (verify = 0); nothing to check",
                    file.display()
                );
            }
            if strict {
                if let Err(v) = zfile::validate_strict(&z) {
                    bail!(
                        "{}: breaks upstream rules:\n  {}",
                        file.display(),
                        v.join("\n  ")
                    );
                }
            }
            println!(
                "{}: OK ({} blocks, {} stored, header digest {}, index CRC {}{})",
                file.display(),
                r.blocks,
                human(r.compressed_bytes),
                if r.header_digest_checked {
                    "ok"
                } else {
                    "absent"
                },
                if r.index_crc_checked { "ok" } else { "absent" },
                if strict { ", strict rules ok" } else { "" }
            );
            Ok(())
        }
        ZfileCmd::Info { file, json } => {
            let (z, tar_off) = open_zfile(&file)?;
            let i = z.info();
            let v = json!({
                "file": file.display().to_string(),
                "tar_wrapped": tar_off.is_some(),
                "payload_offset": tar_off.unwrap_or(0),
                "zfile_size": i.zfile_size,
                "algorithm": i.algorithm.to_string(),
                "block_size": i.block_size,
                "blocks": i.blocks,
                "original_size": i.original_size,
                "header_flags": i.header_flags,
                "header_digest": i.header_digest,
                "trailer_flags": i.trailer_flags,
                "trailer_digest": i.trailer_digest,
                "index_offset": i.index_offset,
                "index_crc": i.index_crc,
                "verify": i.verify,
                "header_overwritten": i.header_overwritten,
            });
            crate::util::print_object(&v, json);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_defaults_are_the_converters() {
        assert_eq!(
            Algorithm::from(DEFAULT_ALGORITHM),
            converter::DEFAULT_ALGORITHM
        );
        let b = converter::DEFAULT_BLOCK_SIZE;
        assert_eq!(parse_block_size(&b.to_string()), Ok(b));
    }
}
