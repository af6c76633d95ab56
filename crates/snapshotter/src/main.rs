//! `obd-snapshotter`: the containerd proxy snapshotter daemon.
//!
//! ```text
//! obd-snapshotter [--config FILE] [--root DIR] [--address SOCK] [--log-level L]
//!                 [--log-format text|json] [--metrics-address HOST:PORT]
//! ```
//! Command-line values override the config file, which overrides the
//! defaults (see `snapshotter::config`). Register it in containerd with
//! `[proxy_plugins.obd] type = "snapshot"  address = "<SOCK>"`.
//! SIGTERM/SIGINT stop it cleanly (the socket is removed). With a metrics
//! address, Prometheus metrics are served on `GET /metrics` there.

use anyhow::Context;
use clap::Parser;
use snapshotter::config::{Config, LogFormat};
use snapshotter::layer::{LayerHook, OverlaybdLayers, PlainLayers};
use snapshotter::service::{serve_unix, Service};
use snapshotter::{metrics, Snapshotter};
use std::io::IsTerminal;
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
    /// Log format: text, or json (one JSON object per line).
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics on `GET /metrics` at this `host:port`.
    #[arg(long)]
    metrics_address: Option<String>,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("unknown log format {s:?} (text or json)")),
    }
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
    if let Some(f) = args.log_format {
        cfg.log_format = f;
    }
    if let Some(m) = args.metrics_address {
        cfg.metrics_address = Some(m);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log_level))
        .context("log level")?;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in the journal or in files.
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.log_format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }

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
        // One shutdown signal for the gRPC server and the metrics endpoint.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopper = stop_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
            let _ = stopper.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let metrics_task = cfg.metrics_address.clone().map(|addr| {
            let rx = stop_rx.clone();
            tokio::spawn(async move {
                let res = metrics::serve(&addr, stopped(rx)).await;
                if let Err(e) = &res {
                    // Misconfigured endpoint: stop the gRPC server too.
                    tracing::error!(error = %e, "metrics endpoint failed");
                    let _ = stop_tx.send(true);
                }
                res
            })
        });
        serve_unix(Service::new(sn), &cfg.address, stopped(stop_rx)).await?;
        if let Some(task) = metrics_task {
            task.await.context("metrics endpoint task")??;
        }
        anyhow::Ok(())
    })
}
