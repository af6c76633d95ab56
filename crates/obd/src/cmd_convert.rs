//! `obd convert <src> <dst>`: OCI image → obd image, in user space.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use converter::{convert, OciLayout, Options};
use serde_json::json;

use crate::cmd_zfile::{default_threads, parse_block_size, AlgoArg};
use crate::util::{human, parse_size};

/// Convert an OCI image into an obd (overlaybd) image: one tar(ZFile(LSMT))
/// ext4 layer per source layer, deterministic, without root.
#[derive(Args, Debug)]
#[command(about = "Convert an OCI image into an obd (overlaybd) image, in user space")]
pub struct ConvertArgs {
    /// Source image: `oci:<dir>[:<tag>]` (an OCI image layout).
    pub src: String,
    /// Destination: `oci:<dir>[:<tag>]` (created if missing; the tag is
    /// written last, after every blob).
    pub dst: String,
    /// ZFile codec of the output layers.
    #[arg(long, value_enum, default_value = "lz4")]
    pub algorithm: AlgoArg,
    /// ZFile block size: 4K, 8K, 16K or 32K.
    #[arg(long, default_value = "4K", value_parser = parse_block_size)]
    pub block_size: u32,
    /// Virtual disk (and ext4) size.
    #[arg(long, default_value = "64G", value_parser = parse_size_arg)]
    pub vsize: u64,
    /// Produce a single layer holding the whole image.
    #[arg(long)]
    pub flatten: bool,
    /// Compression threads.
    #[arg(long, default_value_t = default_threads())]
    pub threads: usize,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let src = OciLayout::parse(&a.src)?;
    let dst = OciLayout::parse(&a.dst)?;
    let quiet = a.json;
    let opts = Options {
        algorithm: a.algorithm.into(),
        block_size: a.block_size,
        vsize: a.vsize,
        flatten: a.flatten,
        threads: a.threads.max(1),
        progress: Some(Box::new(move |l: &converter::LayerReport| {
            if !quiet {
                eprintln!(
                    "layer {}: {} entries, {} of files ({} tar) -> {} ({} index entries) in {:.2}s (apply {:.2}s at {}/s, commit {:.2}s)",
                    l.index,
                    l.apply.entries,
                    human(l.apply.file_bytes),
                    human(l.tar_bytes),
                    human(l.size),
                    l.commit.entries,
                    l.seconds,
                    l.apply_seconds,
                    human((l.tar_bytes as f64 / l.apply_seconds.max(1e-9)) as u64),
                    l.commit_seconds,
                );
            }
        })),
        ..Default::default()
    };
    let start = Instant::now();
    let report =
        convert(&src, &dst, &opts).with_context(|| format!("converting {} to {}", a.src, a.dst))?;
    let secs = start.elapsed().as_secs_f64();
    let tar_bytes: u64 = report.layers.iter().map(|l| l.tar_bytes).sum();
    if a.json {
        let layers: Vec<_> = report
            .layers
            .iter()
            .map(|l| {
                json!({
                    "index": l.index,
                    "sources": l.sources,
                    "digest": l.digest,
                    "size": l.size,
                    "source_bytes": l.source_bytes,
                    "tar_bytes": l.tar_bytes,
                    "entries": l.apply.entries,
                    "file_bytes": l.apply.file_bytes,
                    "index_entries": l.commit.entries,
                    "seconds": l.seconds,
                    "apply_seconds": l.apply_seconds,
                    "commit_seconds": l.commit_seconds,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "digest": report.root.digest,
                "media_type": report.root.media_type,
                "size": report.root.size,
                "manifests": report.manifests.iter().map(|m| &m.digest).collect::<Vec<_>>(),
                "layers": layers,
                "seconds": secs,
                "tar_bytes": tar_bytes,
            })
        );
    } else {
        eprintln!(
            "converted {} layer(s), {} of layer tar in {:.2}s ({}/s): {}",
            report.layers.len(),
            human(tar_bytes),
            secs,
            human((tar_bytes as f64 / secs.max(1e-9)) as u64),
            report.root.digest
        );
    }
    Ok(())
}
