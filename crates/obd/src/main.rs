//! `obd`: the command-line front of obd (block-level lazy container images,
//! byte-compatible with overlaybd).

mod args;
mod bench;
mod bench_read;
mod bench_remote;
mod bench_snapshotter;
mod bench_zfile;
mod cmd_cache;
mod cmd_convert;
mod cmd_demo;
mod cmd_device;
mod cmd_doctor;
mod cmd_image;
mod cmd_layer;
mod cmd_pull;
mod cmd_trace;
mod cmd_zfile;
mod node;
mod testbed;
mod util;

use clap::{Parser, Subcommand};

/// FUSE device workers run in this binary: their request buffers must be in
/// memory before the kernel copies into them (`tcmu_target::prefault`).
#[global_allocator]
static ALLOC: tcmu_target::prefault::PrefaultAlloc = tcmu_target::prefault::PrefaultAlloc;

/// Block-level lazy container images, compatible with overlaybd.
///
/// Layers are LSMT files (optionally ZFile-compressed and tar-wrapped, as in a
/// registry); an image stacks up to 255 of them from a config.v1.json.
#[derive(Parser, Debug)]
#[command(name = "obd", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Compress, extract, inspect and verify ZFile files.
    #[command(subcommand)]
    Zfile(cmd_zfile::ZfileCmd),
    /// Create, commit, inspect and verify LSMT layer files.
    #[command(subcommand)]
    Layer(cmd_layer::LayerCmd),
    /// Inspect and flatten images described by a config.v1.json.
    #[command(subcommand)]
    Image(cmd_image::ImageCmd),
    /// Convert an OCI image into an obd image (user space, deterministic).
    Convert(cmd_convert::ConvertArgs),
    /// Pull an image into containerd; obd layers are not downloaded.
    Pull(cmd_pull::PullArgs),
    /// Run the whole path end to end: registry, sample image, convert,
    /// containerd + obd-snapshotter, lazy pull, run; prints timings.
    Demo(cmd_demo::DemoArgs),
    /// Check whether this node can run obd images (kernel, containerd,
    /// obd-snapshotter, cache, an image's registry); prints the fix for
    /// each problem and exits non-zero if obd images cannot run.
    Doctor(cmd_doctor::DoctorArgs),
    /// Serve images as block devices: a service, one worker per device.
    #[command(subcommand)]
    Device(cmd_device::DeviceCmd),
    /// Dump trace files and replay them against an image (prefetch).
    #[command(subcommand)]
    Trace(cmd_trace::TraceCmd),
    /// The host-wide block cache: list, usage, collection.
    #[command(subcommand)]
    Cache(cmd_cache::CacheCmd),
    /// Measure the hot paths; `--json` prints one JSON object of figures.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() {
    let cli = Cli::parse_from(args::compat(std::env::args_os()));
    // Diagnostics (of `obd device serve` and its workers above all) go to stderr
    // at INFO and above unless RUST_LOG says otherwise; results and progress are
    // printed by the commands themselves.
    if let Err(e) = snapshotter::logging::init("info", snapshotter::config::LogFormat::Text) {
        eprintln!("obd: {e}");
    }
    let res = match cli.cmd {
        Cmd::Zfile(c) => cmd_zfile::run(c),
        Cmd::Layer(c) => cmd_layer::run(c),
        Cmd::Image(c) => cmd_image::run(c),
        Cmd::Bench(c) => bench::run(c),
        Cmd::Cache(c) => cmd_cache::run(c),
        Cmd::Device(c) => cmd_device::run(c),
        Cmd::Trace(c) => cmd_trace::run(c),
        Cmd::Convert(c) => cmd_convert::run(c),
        Cmd::Pull(c) => cmd_pull::run(c),
        Cmd::Demo(c) => cmd_demo::run(c),
        Cmd::Doctor(c) => cmd_doctor::run(c),
    };
    if let Err(e) = res {
        eprintln!("obd: error: {e:#}");
        if let Some(h) = util::hint(&e) {
            eprintln!("obd: {h}");
        }
        std::process::exit(1);
    }
}
