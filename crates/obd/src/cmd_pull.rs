//! `obd pull <ref>`: pulls an image through containerd with the
//! remote-snapshot handshake (upstream overlaybd's `ctr rpull`): obd layers
//! are committed by the snapshotter without downloading them, plain layers
//! are fetched and unpacked by containerd's diff service.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use snapshotter::pull::{pull_blocking, LayerReport, LayerState, PullOptions, DEFAULT_ADDRESS};

use crate::util::human;

/// Pull an image into containerd; obd layers become remote snapshots.
#[derive(Args, Debug)]
#[command(about = "Pull an image into containerd; obd layers are not downloaded (lazy pull)")]
pub struct PullArgs {
    /// Image reference, `host[:port]/repo[:tag|@digest]`.
    pub reference: String,
    /// containerd namespace.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// containerd snapshotter (the obd proxy plugin's name).
    #[arg(long, default_value = "obd")]
    pub snapshotter: String,
    /// containerd's gRPC socket.
    #[arg(short, long, default_value = DEFAULT_ADDRESS)]
    pub address: PathBuf,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    pub plain_http: bool,
    /// Skip TLS certificate verification of the registry.
    #[arg(long)]
    pub insecure: bool,
    /// Platform to pick from a multi-platform image, `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn state_name(s: LayerState) -> &'static str {
    match s {
        LayerState::Present => "present",
        LayerState::Remote => "remote",
        LayerState::Downloaded => "downloaded",
    }
}

fn short(d: &str) -> &str {
    &d[..d.len().min(19)]
}

pub fn run(a: PullArgs) -> Result<()> {
    let mut opts = PullOptions::new(&a.reference);
    opts.address = a.address;
    opts.namespace = a.namespace;
    opts.snapshotter = a.snapshotter;
    opts.platform = a.platform;
    opts.plain_http = a.plain_http;
    opts.insecure = a.insecure;
    let json = a.json;
    let report = pull_blocking(&opts, |l: &LayerReport| {
        if !json {
            println!(
                "layer {:>3} {} {:>10} {:<10} {} ms",
                l.index,
                short(&l.digest),
                human(l.size),
                state_name(l.state),
                l.ms
            );
        }
    })
    .with_context(|| format!("pulling {}", a.reference))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("serialising the report")?
        );
    } else {
        println!(
            "{} {}: {} layers ({} remote, {} downloaded, {} present), {} from the registry, {} ms",
            report.name,
            short(&report.digest),
            report.layers.len(),
            report.remote_layers,
            report.downloaded_layers,
            report.present_layers,
            human(report.registry_bytes),
            report.total_ms
        );
        if report.snapshotter_retries > 0 {
            println!(
                "waited for containerd to reach the snapshotter: {} retried calls",
                report.snapshotter_retries
            );
        }
    }
    Ok(())
}
