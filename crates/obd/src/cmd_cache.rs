//! `obd cache …`: the host-wide block cache, for an operator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use obd_remote::cache::{BlobInfo, BlockCache};
use serde_json::json;

use crate::util::human;

/// Which cache: `--dir`, else the one of the snapshotter root `--root`
/// (its `service.toml` may move it).
#[derive(Args, Debug)]
pub struct Where {
    /// The snapshotter root whose cache to use.
    #[arg(long, default_value = snapshotter::config::DEFAULT_ROOT)]
    root: PathBuf,
    /// The cache directory itself (overrides `--root`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum CacheCmd {
    /// List the cached blobs with their host-wide counters.
    Ls(Where),
    /// Bytes cached, the budget, and totals.
    Du(Where),
    /// Remove cached blobs no process uses and no snapshot names.
    Gc {
        #[command(flatten)]
        at: Where,
        /// Only blobs unused for this many seconds (default: the config's
        /// `gc_grace`).
        #[arg(long)]
        grace: Option<u64>,
    },
}

fn open(w: &Where) -> Result<(std::sync::Arc<BlockCache>, Duration)> {
    let root = obd_device::state::Root::new(&w.root);
    let cfg = root
        .load_service_config()
        .with_context(|| format!("reading the service config under {}", w.root.display()))?;
    let mut opts = cfg.cache.options(&w.root.join("cache"));
    if let Some(d) = &w.dir {
        opts.dir = d.clone();
    }
    if !opts.dir.is_dir() {
        anyhow::bail!(
            "no block cache at {} (pass --root or --dir)",
            opts.dir.display()
        );
    }
    let cache = BlockCache::open(opts.clone())
        .with_context(|| format!("opening the block cache at {}", opts.dir.display()))?;
    Ok((cache, cfg.cache.grace()))
}

fn blob_json(b: &BlobInfo) -> serde_json::Value {
    json!({
        "digest": b.digest, "scope": b.scope, "size": b.size, "cached": b.cached,
        "hits": b.hits, "misses": b.misses, "fetched": b.fetched, "evicted": b.evicted,
        "last_use": b.last_use, "in_use": b.in_use,
    })
}

pub fn run(c: CacheCmd) -> Result<()> {
    match c {
        CacheCmd::Ls(w) => {
            let (cache, _) = open(&w)?;
            let blobs = cache.list()?;
            if w.json {
                let v: Vec<_> = blobs.iter().map(blob_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<20} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10}  SCOPE",
                "DIGEST", "SIZE", "CACHED", "HITS", "MISSES", "FETCHED", "EVICTED"
            );
            for b in blobs {
                println!(
                    "{:<20} {:>10} {:>10} {:>8} {:>8} {:>10} {:>10}  {}{}",
                    &b.digest[..b.digest.len().min(19)],
                    human(b.size),
                    human(b.cached),
                    b.hits,
                    b.misses,
                    human(b.fetched),
                    human(b.evicted),
                    b.scope.as_deref().unwrap_or("(verified)"),
                    if b.in_use { "  in use" } else { "" }
                );
            }
        }
        CacheCmd::Du(w) => {
            let (cache, _) = open(&w)?;
            let blobs = cache.list()?;
            let sum = |f: fn(&BlobInfo) -> u64| blobs.iter().map(f).sum::<u64>();
            let v = json!({
                "dir": cache.options().dir, "blobs": blobs.len(),
                "bytes": cache.usage(), "budget": cache.budget(),
                "hits": sum(|b| b.hits), "misses": sum(|b| b.misses),
                "fetched": sum(|b| b.fetched), "evicted": sum(|b| b.evicted),
            });
            if w.json {
                println!("{v}");
            } else {
                println!(
                    "{}: {} blobs, {} of a {} budget; {} fetched, {} evicted, {} hits, {} misses",
                    cache.options().dir.display(),
                    blobs.len(),
                    human(cache.usage()),
                    human(cache.budget()),
                    human(v["fetched"].as_u64().unwrap_or(0)),
                    human(v["evicted"].as_u64().unwrap_or(0)),
                    v["hits"],
                    v["misses"]
                );
            }
        }
        CacheCmd::Gc { at, grace } => {
            let (cache, dflt) = open(&at)?;
            let keep = snapshotter::obd::referenced_blobs(&at.root);
            let grace = grace.map_or(dflt, Duration::from_secs);
            let r = cache.gc(&|d| keep.contains(d), grace)?;
            if at.json {
                println!("{}", json!({"removed": r.removed, "bytes": r.bytes}));
            } else {
                println!(
                    "removed {} blobs ({} cached); {} left",
                    r.removed.len(),
                    human(r.bytes),
                    human(cache.usage())
                );
            }
        }
    }
    Ok(())
}
