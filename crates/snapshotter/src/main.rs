//! `obd-snapshotter`: the containerd proxy snapshotter daemon.
//!
//! ```text
//! obd-snapshotter [--config FILE] [--root DIR] [--address SOCK] [--log-level L]
//! ```
//! Command-line values override the config file, which overrides the
//! defaults (see `snapshotter::config`). Register it in containerd with
//! `[proxy_plugins.obd] type = "snapshot"  address = "<SOCK>"`.
//! SIGTERM/SIGINT stop it cleanly (the socket is removed).

use anyhow::Context;
use clap::Parser;
use snapshotter::config::Config;
use snapshotter::layer::{LayerHook, OverlaybdLayers, PlainLayers};
use snapshotter::service::{serve_unix, Service};
use snapshotter::Snapshotter;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "obd-snapshotter",
    version,
    about = "containerd proxy snapshotter for obd (OverlayBD-compatible) images"
)]
struct Args {
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Root directory (metadata.db, snapshots/).
    #[arg(long)]
    root: Option<PathBuf>,
    /// gRPC unix socket path.
    #[arg(long)]
    address: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long)]
    log_level: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(r) = args.root {
        cfg.root = r;
    }
    if let Some(a) = args.address {
        cfg.address = a;
    }
    if let Some(l) = args.log_level {
        cfg.log_level = l;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log_level))
        .context("log level")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let hook: Box<dyn LayerHook> = if cfg.lazy_pull {
        Box::new(OverlaybdLayers)
    } else {
        Box::new(PlainLayers)
    };
    let sn = Arc::new(Snapshotter::open(&cfg.root, hook)?);
    tracing::info!(root = %cfg.root.display(), rw_mode = ?cfg.rw_mode, lazy_pull = cfg.lazy_pull, "obd-snapshotter starting");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
        };
        serve_unix(Service::new(sn), &cfg.address, shutdown).await?;
        anyhow::Ok(())
    })
}
