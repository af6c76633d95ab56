//! `obd pull <ref>`: pulls an image through containerd with the
//! remote-snapshot handshake (upstream overlaybd's `ctr rpull`): obd layers
//! are committed by the snapshotter without downloading them, plain layers
//! are fetched and unpacked by containerd's diff service.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use obd_remote::distribution::ImageRef;
use snapshotter::pull::{
    pull_blocking, LayerReport, LayerState, PullError, PullOptions, DEFAULT_ADDRESS,
};

use crate::args::{PlatformArgs, RegistryArgs};
use crate::node::{read_blob_as_worker, Node};
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
    /// Registry access (of this pull; the snapshotter's devices read blobs
    /// with its own service config, checked after the pull).
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Platform to pick from a multi-platform image (default: this machine's).
    #[command(flatten)]
    pub platform: PlatformArgs,
    /// The snapshotter's config, to check that its devices can read the
    /// image's blobs (default: /etc/obd/snapshotter.toml if it exists,
    /// else the snapshotter's defaults).
    #[arg(long, value_name = "FILE")]
    pub snapshotter_config: Option<PathBuf>,
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
    let host = ImageRef::parse(&a.reference)?.host;
    opts.registry = a.registry.options(&[&host]);
    opts.address = a.address;
    opts.namespace = a.namespace;
    opts.snapshotter = a.snapshotter;
    opts.platform = a.platform.one()?;
    let json = a.json;
    // The snapshotter-access check reads one remote layer as a device would;
    // it starts at the first remote layer and overlaps the rest of the pull.
    let mut check: Option<std::thread::JoinHandle<std::result::Result<(), String>>> = None;
    let config = a.snapshotter_config.clone();
    let reference = a.reference.clone();
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
        if check.is_none() && l.state == LayerState::Remote {
            let (config, reference, digest, size) =
                (config.clone(), reference.clone(), l.digest.clone(), l.size);
            check = Some(std::thread::spawn(move || {
                check_snapshotter_access(&reference, &digest, size, config.as_deref())
            }));
        }
    })
    .map_err(|e| explain_pull_error(e, &opts))
    .with_context(|| format!("pulling {}", a.reference))?;
    let attach = match check {
        None => Ok(()),
        Some(h) => h
            .join()
            .unwrap_or_else(|_| Err("the snapshotter-access check panicked".into())),
    };
    if let Err(w) = &attach {
        eprintln!("obd: warning: {w}");
    }
    if json {
        let mut v = serde_json::to_value(&report).context("serialising the report")?;
        v["snapshotter_can_read_blobs"] = serde_json::json!(attach.is_ok());
        if let Err(w) = &attach {
            v["warning"] = serde_json::json!(w);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
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

/// Says what to do about the pull errors a new set-up runs into: containerd
/// without the obd snapshotter, or not answering at all.
fn explain_pull_error(e: PullError, opts: &PullOptions) -> anyhow::Error {
    let hint = match &e {
        PullError::Containerd { status, .. }
            if status.message().contains("snapshotter not loaded") =>
        {
            Some(format!(
                "containerd has no snapshotter `{sn}`: add the proxy plugin to its config \
                 (`[proxy_plugins.{sn}] type = \"snapshot\" address = \"<obd-snapshotter socket>\"`, \
                 see docs/CONTAINERD.md), restart containerd, and check with `obd doctor`",
                sn = opts.snapshotter
            ))
        }
        PullError::Connect { address, .. } => Some(format!(
            "is containerd running with its socket at {}? (`-a SOCKET` names another; `obd doctor` checks it)",
            address.display()
        )),
        _ => None,
    };
    match hint {
        Some(h) => anyhow::Error::new(e).context(h),
        None => e.into(),
    }
}

/// After a pull: can obd-snapshotter's devices read the image's lazily
/// pulled blobs (the remote layer `digest` of `size` bytes) with the
/// snapshotter's own settings (they do not get this command's `--plain-http`
/// and the like)? `Err` is the warning to print.
fn check_snapshotter_access(
    reference: &str,
    digest: &str,
    size: u64,
    config: Option<&std::path::Path>,
) -> std::result::Result<(), String> {
    let node =
        Node::load(config).map_err(|e| format!("cannot read the snapshotter's settings: {e:#}"))?;
    read_blob_as_worker(&node.service.registry, reference, digest, size).map_err(|e| {
        format!(
            "the pull succeeded, but obd-snapshotter cannot read this image's blobs with its settings \
             ({}): {e:#}. Containers of this image will fail to attach until the snapshotter's \
             service config reaches the registry the way this pull did (then restart obd-snapshotter; \
             `obd doctor --image {reference}` checks it)",
            node.settings_name()
        )
    })
}
