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
use snapshotter::layer::LayerHook;
use snapshotter::obd::{self, ObdLayers};
use snapshotter::service::{serve_unix, Service};
use snapshotter::{metrics, Snapshotter};
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
    // Device workers are this binary in a hidden mode (one process per device).
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = obd::device_worker_main(&argv) {
        std::process::exit(code);
    }
    let cfg = load_config(Args::parse())?;
    init_logging(&cfg)?;
    let sn = open_snapshotter(&cfg)?;
    tracing::info!(root = %cfg.root.display(), rw_mode = ?cfg.rw_mode, lazy_pull = cfg.lazy_pull, "obd-snapshotter starting");
    serve(cfg, sn)
}

/// The config file (or the defaults), overridden by the command line.
fn load_config(args: Args) -> anyhow::Result<Config> {
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
    Ok(cfg)
}

fn init_logging(cfg: &Config) -> anyhow::Result<()> {
    snapshotter::logging::init(&cfg.log_level, cfg.log_format).map_err(anyhow::Error::msg)
}

/// Prepares the root, reconciles the devices left from a previous run and
/// opens the snapshotter over them (with its periodic sweeper when devices
/// are attached at pull).
fn open_snapshotter(cfg: &Config) -> anyhow::Result<Arc<Snapshotter>> {
    // obd layers always get devices (a fully downloaded one still works
    // through its tar wrapper); lazy_pull only decides the remote handshake.
    std::fs::create_dir_all(&cfg.root)
        .with_context(|| format!("creating {}", cfg.root.display()))?;
    if let Some(sc) = &cfg.service_config {
        let dst = cfg.root.join("service.toml");
        std::fs::copy(sc, &dst)
            .with_context(|| format!("copying {} to {}", sc.display(), dst.display()))?;
    }
    let layers = ObdLayers::new(
        &cfg.root,
        obd::worker_command().context("locating obd-snapshotter")?,
        &cfg.device_frontend,
        cfg.rw_mode,
        cfg.lazy_pull,
    );
    let layers = layers
        .with_warm_page_cache(cfg.warm_page_cache)
        .with_open_layers_at_commit(cfg.open_layers_at_commit)
        .with_device_idle(std::time::Duration::from_secs(cfg.device_idle_secs));
    let layers = if cfg.prefetch_at_pull {
        layers.with_prefetch_at_pull(std::time::Duration::from_secs(cfg.prefetch_hold_secs))
    } else {
        layers
    };
    let (adopted, cleaned) = layers.reconcile()?;
    tracing::info!(?adopted, ?cleaned, "devices reconciled");
    let hook: Box<dyn LayerHook> = Box::new(layers);
    let sn = Arc::new(Snapshotter::open(&cfg.root, hook)?);
    if let Err(e) = sn.sweep() {
        tracing::warn!(error = %e, "releasing devices no snapshot uses");
    }
    {
        // Devices attached at pull whose container never came are released
        // once their hold is over, and cached blobs no snapshot names are
        // collected, even if nothing else triggers a sweep.
        let sn = Arc::clone(&sn);
        std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(60));
                if let Err(e) = sn.sweep() {
                    tracing::warn!(error = %e, "periodic sweep");
                }
            })
            .context("starting the sweeper thread")?;
    }
    Ok(sn)
}

/// Serves gRPC on the socket (and metrics, if configured) until SIGTERM or
/// SIGINT.
fn serve(cfg: Config, sn: Arc<Snapshotter>) -> anyhow::Result<()> {
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
        let cri_task = cfg.cri_image_address.clone().map(|addr| {
            let proxy = snapshotter::cri::ImageProxy::new(
                &cfg.cri_runtime_address,
                snapshotter::cri::Keychain::new(
                    obd_device::state::Root::new(&cfg.root).cri_credentials(),
                ),
            );
            let rx = stop_rx.clone();
            tokio::spawn(
                async move { snapshotter::cri::serve_unix(proxy, &addr, stopped(rx)).await },
            )
        });
        serve_unix(Service::new(sn), &cfg.address, stopped(stop_rx)).await?;
        if let Some(task) = cri_task {
            task.await.context("CRI image proxy task")??;
        }
        if let Some(task) = metrics_task {
            task.await.context("metrics endpoint task")??;
        }
        anyhow::Ok(())
    })
}
