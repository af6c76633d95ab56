//! `obd trace …`: inspect trace files and replay them against an image.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::Subcommand;
use obd_device::open::trace_replay::{self, ReplayOptions, Trace};
use overlaybd_core::config::ImageConfig;
use overlaybd_core::image::Image;
use overlaybd_core::source::{LayerSource, LocalFiles};
use overlaybd_core::ReadAt;
use serde_json::json;

#[path = "cmd_trace_record.rs"]
pub mod record;

#[derive(Subcommand, Debug)]
pub enum TraceCmd {
    /// Record an image's start into a trace and push the image again with
    /// it as an acceleration layer (like upstream `ctr record-trace`).
    Record(Box<record::RecordArgs>),
    /// Print the records of a trace file (upstream's binary format).
    Dump {
        /// The trace file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replay a trace against an image (prefetch at low priority) and print
    /// what was read.
    Replay {
        /// The image's config.v1.json.
        #[arg(long)]
        config: PathBuf,
        /// The trace file.
        #[arg(long)]
        trace: PathBuf,
        /// Requests in flight at once.
        #[arg(long, default_value_t = trace_replay::replay::DEFAULT_CONCURRENCY)]
        concurrency: usize,
        /// Service config (TOML) for remote lowers: cache, registry, credentials.
        #[arg(long)]
        service_config: Option<PathBuf>,
        /// Block cache folder for remote layers (overrides the service config).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: TraceCmd) -> Result<()> {
    match cmd {
        TraceCmd::Record(a) => record::run(*a),
        TraceCmd::Dump { file, json } => {
            let t = Trace::read_file(&file)?;
            if json {
                let recs: Vec<_> = t
                    .records
                    .iter()
                    .map(|r| {
                        json!({"op": (r.op as char).to_string(), "layer": r.layer,
                               "offset": r.offset, "count": r.count})
                    })
                    .collect();
                println!("{}", json!({"records": recs, "bytes": t.total_bytes()}));
            } else {
                println!(
                    "{}: {} records, {} bytes",
                    file.display(),
                    t.records.len(),
                    t.total_bytes()
                );
                for r in &t.records {
                    println!(
                        "{} layer {} offset {} count {}",
                        r.op.escape_ascii(),
                        r.layer,
                        r.offset,
                        r.count
                    );
                }
            }
            Ok(())
        }
        TraceCmd::Replay {
            config,
            trace,
            concurrency,
            service_config,
            cache_dir,
            json,
        } => {
            let t = Trace::read_file(&trace)?;
            let cfg = ImageConfig::load(&config)?;
            let base = config.parent();
            let registry = if cfg.all_local(base) {
                None
            } else {
                use obd_remote::service::{RegistrySource, ServiceConfig};
                let mut svc = match &service_config {
                    Some(p) => ServiceConfig::load(p)?,
                    None => ServiceConfig::default(),
                };
                if let Some(d) = cache_dir {
                    svc.cache.dir = d;
                }
                Some(RegistrySource::new(&svc)?)
            };
            let mut sources: Vec<&dyn LayerSource> = vec![&LocalFiles];
            if let Some(r) = &registry {
                sources.push(r);
            }
            let img = Image::open(&cfg, base, &sources)
                .map_err(|e| e.in_file(&config))
                .context("opening the image")?;
            let readers = img.layer_readers();
            let layers: Vec<&dyn ReadAt> = readers.iter().map(|b| &**b as &dyn ReadAt).collect();
            let opts = ReplayOptions {
                concurrency,
                ..Default::default()
            };
            let r = trace_replay::replay(&t, &layers, &opts, &AtomicBool::new(false));
            if json {
                println!(
                    "{}",
                    json!({"records": r.records, "skipped": r.skipped, "requests": r.requests,
                           "done": r.done, "bytes": r.bytes, "errors": r.errors,
                           "first_error": r.first_error, "elapsed_s": r.elapsed.as_secs_f64()})
                );
            } else {
                println!("{r}");
            }
            if r.errors > 0 {
                anyhow::bail!("{} of {} requests failed", r.errors, r.requests);
            }
            Ok(())
        }
    }
}
