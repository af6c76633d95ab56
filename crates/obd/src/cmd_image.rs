//! `obd image …`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use overlaybd_core::image::Image;
use overlaybd_core::lsmt::SECTOR;
use serde_json::json;

use crate::args::RegistryArgs;
use crate::util::human;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Write the merged virtual disk of an image to a raw file (sparse where zero).
    ///
    /// Lowers may be any blob nesting: tar(ZFile(LSMT)), ZFile(LSMT), tar(LSMT) or
    /// LSMT. Relative paths in the config are taken from the config's folder.
    /// Remote lowers are read ahead and fetched in requests of at least 4 MiB
    /// (a larger `[fetch] min_fetch` in the service config is kept); what the
    /// read-ahead streams passes through memory, not the host cache (see
    /// `--cache`).
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
        /// Print the result as one JSON object on stdout (and no progress).
        #[arg(long)]
        json: bool,
        /// Keep every byte fetched from the registry in the host cache, so
        /// images flattened or run later that share layers fetch none of
        /// them again. Without it the read-ahead streams the blobs through
        /// memory and caches only what the flatten did not read in time
        /// (what was cached before is still used).
        #[arg(long)]
        cache: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show the layers of an image and its merged index.
    Info {
        /// The image's config.v1.json.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// Where remote lowers (`digest` + `repoBlobUrl`) are fetched and cached.
#[derive(clap::Args, Debug)]
pub struct RemoteArgs {
    /// Block cache folder for remote layers (overrides the service config).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Service config (TOML): cache, fetch sizes, registry hosts, mirrors, P2P,
    /// timeouts, credentials.
    #[arg(long)]
    service_config: Option<PathBuf>,
    /// Print the remote-fetch metrics (OpenMetrics text) to stderr at the end.
    #[arg(long)]
    metrics: bool,
    /// Registry access (added to the service config's `[registry]`).
    #[command(flatten)]
    pub registry: RegistryArgs,
}

impl RemoteArgs {
    /// The registry source these options give: the service config (or the
    /// defaults), the cache folder and registry access on top, reading as
    /// `access` says; `named` are the hosts a bare `--plain-http`/`--insecure`
    /// applies to.
    pub fn registry_source(
        &self,
        access: Access,
        named: &[&str],
    ) -> Result<Arc<obd_remote::service::RegistrySource>> {
        use obd_remote::service::{RegistrySource, ServiceConfig};
        let mut svc = match &self.service_config {
            Some(p) => ServiceConfig::load(p)?,
            None => ServiceConfig::default(),
        };
        if let Some(d) = &self.cache_dir {
            svc.cache.dir = d.clone();
        }
        self.registry.apply(&mut svc.registry, named);
        if access != Access::Lazy {
            svc.fetch.min_fetch = svc.fetch.min_fetch.max(BULK_MIN_FETCH);
            svc.fetch.max_request = svc.fetch.max_request.max(svc.fetch.min_fetch);
        }
        let pass_through = access == Access::Bulk { cache: false };
        Ok(Arc::new(
            RegistrySource::new(&svc)?
                .with_pass_through(pass_through)
                .with_one_pass(access != Access::Lazy),
        ))
    }
}

fn print_metrics(remote: &RemoteArgs, registry: Option<&obd_remote::service::RegistrySource>) {
    if remote.metrics {
        match registry {
            Some(r) => eprint!("{}", r.metrics().encode()),
            None => eprintln!("(no remote layers: nothing was fetched)"),
        }
    }
}

/// Smallest remote request while flattening: the whole disk is read, so small
/// on-demand requests only add per-request latency (a registry answers a
/// 256 KiB range in about the time it sends 4 MiB), and a unit this size is
/// the piece flatten's read-ahead advises, so a worker that gets ahead of the
/// read-ahead joins its request instead of fetching the bytes again.
const BULK_MIN_FETCH: u64 = 4 << 20;

/// How [`open_image`] reads remote blobs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Lazily, as a device does.
    Lazy,
    /// A one-pass read of the whole image (flatten): units of at least
    /// [`BULK_MIN_FETCH`]; with `cache: false` the read-ahead passes
    /// through memory instead of the cache.
    Bulk { cache: bool },
}

/// Opens the image of `config`: local lowers from files, the rest lazily from
/// the registry through the block cache, as `access` says.
fn open_image(
    config: &std::path::Path,
    remote: &RemoteArgs,
    access: Access,
) -> Result<(Image, Option<Arc<obd_remote::service::RegistrySource>>)> {
    use overlaybd_core::config::ImageConfig;
    use overlaybd_core::source::LocalFiles;
    let cfg = ImageConfig::load(config)?;
    let base = config.parent();
    if cfg.all_local(base) {
        return Ok((
            Image::open(&cfg, base, &[&LocalFiles]).map_err(|e| e.in_file(config))?,
            None,
        ));
    }
    let registry = remote.registry_source(access, &[])?;
    let img = Image::open(&cfg, base, &[&LocalFiles, &*registry]).map_err(|e| e.in_file(config))?;
    Ok((img, Some(registry)))
}

pub fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Flatten {
            config,
            output,
            threads,
            sha256,
            no_sync,
            json,
            cache,
            remote,
        } => flatten(
            &config,
            &output,
            FlattenOpts {
                threads,
                sha256,
                no_sync,
                json,
                cache,
            },
            &remote,
        ),
        ImageCmd::Info {
            config,
            json,
            remote,
        } => info(&config, json, &remote),
    }
}

/// The switches of `obd image flatten`.
struct FlattenOpts {
    threads: Option<usize>,
    sha256: bool,
    no_sync: bool,
    json: bool,
    cache: bool,
}

/// A bar of the bytes copied, on a terminal only (and not with `--json`).
fn flatten_bar(json: bool) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "flatten [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    Some(pb)
}

/// `obd image flatten`.
fn flatten(config: &Path, output: &Path, o: FlattenOpts, remote: &RemoteArgs) -> Result<()> {
    let FlattenOpts {
        threads,
        sha256,
        no_sync,
        json,
        cache,
    } = o;
    let t0 = Instant::now();
    let (img, registry) = open_image(config, remote, Access::Bulk { cache })?;
    // Replace a regular file rather than truncating it in place (a truncated
    // ext4 file is flushed to disk on close); block devices are written over.
    if std::fs::metadata(output).is_ok_and(|m| m.is_file()) {
        std::fs::remove_file(output)
            .with_context(|| format!("cannot replace {}", output.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let bar = flatten_bar(json);
    let progress = |done: u64, total: u64| {
        if let Some(pb) = &bar {
            pb.set_length(total);
            pb.set_position(done);
        }
    };
    let stats = img.flatten_to_with(&out, threads, 4 << 20, &progress)?;
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    if !no_sync {
        out.sync_all()
            .with_context(|| format!("fsync {}", output.display()))?;
    }
    let dt = t0.elapsed().as_secs_f64();
    let digest = match sha256 {
        true => Some(crate::util::sha256_hex(std::fs::File::open(output)?)?),
        false => None,
    };
    if json {
        println!(
            "{}",
            json!({
                "layers": img.layers().len(),
                "output": output,
                "virtual_size": stats.virtual_size,
                "data_bytes": stats.data_bytes,
                "seconds": dt,
                "sha256": digest,
            })
        );
    } else {
        eprintln!(
            "flattened {} layers into {}: {} virtual, {} data, {:.2}s",
            img.layers().len(),
            output.display(),
            human(stats.virtual_size),
            human(stats.data_bytes),
            dt
        );
        if let Some(d) = digest {
            println!("{d}");
        }
    }
    print_metrics(remote, registry.as_deref());
    Ok(())
}

/// `obd image info`.
fn info(config: &Path, json: bool, remote: &RemoteArgs) -> Result<()> {
    let (img, registry) = open_image(config, remote, Access::Lazy)?;
    let v = info_json(&img);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_info(&v);
    }
    print_metrics(remote, registry.as_deref());
    Ok(())
}

/// What `info` shows of `img`: its layers and its merged index.
fn info_json(img: &Image) -> serde_json::Value {
    let index = img.merged_index();
    let segs = index.segments();
    let bytes = |zeroed: bool| -> u64 {
        segs.iter()
            .filter(|s| s.zeroed == zeroed)
            .map(|s| s.length as u64 * SECTOR)
            .sum()
    };
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
    json!({
        "virtual_size": img.virtual_size(),
        "layers": layers,
        "writable_upper": img.has_upper(),
        "merged_segments": segs.len(),
        "mapped_bytes": bytes(false),
        "zeroed_bytes": bytes(true),
    })
}

/// `info` as text, from [`info_json`]'s value.
fn print_info(v: &serde_json::Value) {
    let vsize = v["virtual_size"].as_u64().unwrap_or(0);
    println!("virtual size: {} ({} bytes)", human(vsize), vsize);
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
        v["merged_segments"],
        human(v["mapped_bytes"].as_u64().unwrap_or(0)),
        human(v["zeroed_bytes"].as_u64().unwrap_or(0))
    );
}
