//! `obd image …`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use overlaybd_core::image::Image;
use overlaybd_core::lsmt::SECTOR;
use serde_json::json;

use crate::util::human;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Write the merged virtual disk of an image to a raw file (sparse where zero).
    ///
    /// Lowers may be any blob nesting: tar(ZFile(LSMT)), ZFile(LSMT), tar(LSMT) or
    /// LSMT. Relative paths in the config are taken from the config's folder.
    Flatten {
        /// The image's config.v1.json.
        #[arg(long)]
        config: PathBuf,
        /// Output raw disk image.
        #[arg(short, long)]
        output: PathBuf,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print the SHA-256 of the whole disk after writing it.
        #[arg(long)]
        sha256: bool,
        /// Skip the final fsync (the data may still be in the page cache on return).
        #[arg(long)]
        no_sync: bool,
    },
    /// Show the layers of an image and its merged index.
    Info {
        /// The image's config.v1.json.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Flatten {
            config,
            output,
            threads,
            sha256,
            no_sync,
        } => {
            let t0 = Instant::now();
            let img = Image::open_config_file(&config)?;
            // Replace a regular file rather than truncating it in place (a truncated
            // ext4 file is flushed to disk on close); block devices are written over.
            if std::fs::metadata(&output).is_ok_and(|m| m.is_file()) {
                std::fs::remove_file(&output)
                    .with_context(|| format!("cannot replace {}", output.display()))?;
            }
            let out = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&output)
                .with_context(|| format!("cannot create {}", output.display()))?;
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let stats = img.flatten_to(&out, threads, 4 << 20)?;
            if !no_sync {
                out.sync_all()
                    .with_context(|| format!("fsync {}", output.display()))?;
            }
            let dt = t0.elapsed().as_secs_f64();
            eprintln!(
                "flattened {} layers into {}: {} virtual, {} data, {:.2}s",
                img.layers().len(),
                output.display(),
                human(stats.virtual_size),
                human(stats.data_bytes),
                dt
            );
            if sha256 {
                let f = std::fs::File::open(&output)?;
                println!("{}", crate::util::sha256_hex(f)?);
            }
            Ok(())
        }
        ImageCmd::Info { config, json } => {
            let img = Image::open_config_file(&config)?;
            let segs = img.index().segments();
            let mapped: u64 = segs
                .iter()
                .filter(|s| !s.zeroed)
                .map(|s| s.length as u64 * SECTOR)
                .sum();
            let zeroed: u64 = segs
                .iter()
                .filter(|s| s.zeroed)
                .map(|s| s.length as u64 * SECTOR)
                .sum();
            let layers: Vec<_> = img
                .layers()
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let h = l.lsmt.header();
                    json!({
                        "index": i,
                        "name": l.name,
                        "nesting": l.nesting.to_string(),
                        "blob_size": l.blob_size,
                        "lsmt_size": l.lsmt.source().size(),
                        "entries": l.lsmt.segments().len(),
                        "virtual_size": l.lsmt.virtual_size(),
                        "uuid": h.uuid_str(),
                        "parent_uuid": h.parent_uuid_str(),
                    })
                })
                .collect();
            let v = json!({
                "virtual_size": img.virtual_size(),
                "layers": layers,
                "writable_upper": img.upper().is_some(),
                "merged_segments": segs.len(),
                "mapped_bytes": mapped,
                "zeroed_bytes": zeroed,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "virtual size: {} ({} bytes)",
                    human(img.virtual_size()),
                    img.virtual_size()
                );
                for l in v["layers"].as_array().expect("array") {
                    println!(
                        "layer {}: {} [{}] blob {} B, LSMT {} B, {} entries, uuid {}",
                        l["index"],
                        l["name"].as_str().unwrap_or(""),
                        l["nesting"].as_str().unwrap_or(""),
                        l["blob_size"],
                        l["lsmt_size"],
                        l["entries"],
                        l["uuid"].as_str().unwrap_or("")
                    );
                }
                println!(
                    "merged index: {} segments, {} mapped, {} zeroed",
                    segs.len(),
                    human(mapped),
                    human(zeroed)
                );
            }
            Ok(())
        }
    }
}
