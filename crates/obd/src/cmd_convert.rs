//! `obd convert <src> <dst>`: OCI image → obd image, in user space, between
//! OCI layouts (`oci:<dir>[:<tag>]`) and registries
//! (`docker://host[:port]/repo[:tag|@digest]`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use converter::registry::{parse_docker_ref, LogFn, RegistryDest, RegistrySource};
use converter::{
    convert, Descriptor, ImageDest, ImageSource, LayerReport, MediaTypes, Observer, OciLayout,
    Options, Report,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use obd_remote::distribution::Distribution;
use serde_json::json;
use zfile::sync::MutexExt;

use crate::args::{PlatformArgs, RegistryArgs};
use crate::cmd_zfile::{default_threads, parse_block_size, AlgoArg, DEFAULT_ALGORITHM};
use crate::util::{human, parse_size};

/// Convert an OCI image into an obd (overlaybd) image: one tar(ZFile(LSMT))
/// ext4 layer per source layer, deterministic, without root.
#[derive(Args, Debug)]
#[command(about = "Convert an OCI image into an obd (overlaybd) image, in user space")]
pub struct ConvertArgs {
    /// Source image: `oci:<dir>[:<tag>]` (an OCI image layout) or
    /// `docker://<host>[:<port>]/<repo>[:<tag>|@sha256:<hex>]`.
    pub src: String,
    /// Destination: `oci:<dir>[:<tag>]` (created if missing) or
    /// `docker://<host>[:<port>]/<repo>[:<tag>]`. The tag is written last,
    /// after every blob and manifest. May be omitted with `--no-push -o`.
    pub dst: Option<String>,
    /// ZFile codec of the output layers (`--algorithm lz4 --block-size 4K`:
    /// upstream's default output).
    #[arg(long, value_enum, default_value_t = DEFAULT_ALGORITHM)]
    pub algorithm: AlgoArg,
    /// ZFile block size: 4K, 8K, 16K or 32K.
    #[arg(long, default_value_t = converter::DEFAULT_BLOCK_SIZE, value_parser = parse_block_size)]
    pub block_size: u32,
    /// zstd compression level, 1–22 (upstream writes 3). Higher levels
    /// convert slower and make smaller layers that decode as fast, so lazy
    /// pulls move fewer bytes. Ignored for LZ4.
    #[arg(long, default_value_t = converter::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub level: i32,
    /// Virtual disk (and ext4) size. An image built FROM an obd image keeps
    /// its base layers and their size.
    #[arg(long, default_value = "64G", value_parser = parse_size_arg)]
    pub vsize: u64,
    /// Produce a single layer holding the whole image.
    #[arg(long)]
    pub flatten: bool,
    /// Which platforms of an index to convert (default: every platform).
    #[command(flatten)]
    pub platform: PlatformArgs,
    /// OCI media types for the output (default: Docker schema 2, as
    /// upstream's userspace converter).
    #[arg(long)]
    pub oci: bool,
    /// Push the result as a referrer of the source manifest (`subject` =
    /// source, artifactType `application/vnd.containerd.overlaybd.native.v1+json`;
    /// implies `--oci`). Registries without the referrers API get the
    /// `sha256-<hex>` fallback tag.
    #[arg(long)]
    pub referrer: bool,
    /// Do not store a piece table beside each layer blob (the annotations
    /// `…/overlaybd/verity.digest` and `verity.size` that let readers check
    /// lazily fetched bytes): the output is then exactly what upstream's
    /// converter makes.
    #[arg(long)]
    pub no_verity: bool,
    /// Do not push: write the result as an OCI layout into `-o` instead.
    #[arg(long, requires = "output")]
    pub no_push: bool,
    /// The OCI layout directory `--no-push` writes (tag: the destination's,
    /// else `latest`).
    #[arg(short = 'o', long, requires = "no_push")]
    pub output: Option<PathBuf>,
    /// Registry access.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Where registry destinations stage blobs (default: the temp dir).
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Compression threads.
    #[arg(long, default_value_t = default_threads())]
    pub threads: usize,
    /// Print a JSON report on stdout (and no progress).
    #[arg(long)]
    pub json: bool,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Progress: per-layer bars (bytes of the source blob and throughput) and a
/// line per finished layer on a terminal; nothing otherwise (the result
/// line, or the `--json` report, is all).
struct Progress {
    mp: Option<MultiProgress>,
    bars: Mutex<HashMap<(usize, usize), ProgressBar>>,
    platforms: Mutex<HashMap<usize, String>>,
    quiet: bool,
    flatten: bool,
}

impl Progress {
    fn new(quiet: bool, flatten: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        Progress {
            mp: (tty && !quiet).then(MultiProgress::new),
            bars: Mutex::new(HashMap::new()),
            platforms: Mutex::new(HashMap::new()),
            quiet,
            flatten,
        }
    }

    /// A progress line: on a terminal only (quiet otherwise, and with
    /// `--json`).
    fn println(&self, msg: &str) {
        if let (Some(mp), false) = (&self.mp, self.quiet) {
            let _ = mp.println(msg);
        }
    }

    fn label(&self, m: usize, layer: usize) -> String {
        match self.platforms.locked().get(&m) {
            Some(p) => format!("{p} layer {layer}"),
            None => format!("layer {layer}"),
        }
    }
}

impl Observer for Progress {
    fn manifest_start(&self, m: usize, platform: Option<&str>, layers: &[Descriptor]) {
        if let Some(p) = platform {
            self.platforms.locked().insert(m, p.to_string());
        }
        let total: u64 = layers.iter().map(|l| l.size).sum();
        self.println(&format!(
            "converting {}{} layer(s), {}",
            platform.map(|p| format!("{p}: ")).unwrap_or_default(),
            layers.len(),
            human(total)
        ));
    }

    fn layer_start(&self, m: usize, layer: usize, size: u64) {
        let Some(mp) = &self.mp else { return };
        let pb = mp.add(ProgressBar::new(size));
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>18} [{bar:28}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        pb.set_prefix(self.label(m, layer));
        pb.set_message("applying");
        self.bars.locked().insert((m, layer), pb);
    }

    fn layer_read(&self, m: usize, layer: usize, bytes: u64) {
        if let Some(pb) = self.bars.locked().get(&(m, layer)) {
            pb.inc(bytes);
        }
    }

    fn layer_applied(&self, m: usize, layer: usize) {
        if let Some(pb) = self.bars.locked().get(&(m, layer)) {
            pb.set_message("committing");
        }
    }

    fn layer_done(&self, m: usize, l: &LayerReport) {
        let line = format!(
            "{}: {} entries, {} of files ({} tar) -> {} ({} index entries) in {:.2}s (apply {:.2}s at {}/s, commit {:.2}s) {}",
            self.label(m, l.index),
            l.apply.entries,
            human(l.apply.file_bytes),
            human(l.tar_bytes),
            human(l.size),
            l.commit.entries,
            l.seconds,
            l.apply_seconds,
            human((l.tar_bytes as f64 / l.apply_seconds.max(1e-9)) as u64),
            l.commit_seconds,
            l.digest,
        );
        let mut bars = self.bars.locked();
        let keys: Vec<_> = bars
            .keys()
            .filter(|(bm, bl)| *bm == m && (self.flatten || *bl == l.index))
            .copied()
            .collect();
        if keys.is_empty() {
            drop(bars);
            self.println(&line);
            return;
        }
        for k in keys {
            if let Some(pb) = bars.remove(&k) {
                pb.finish_with_message(format!(
                    "-> {} {}",
                    human(l.size),
                    &l.digest[..l.digest.len().min(19)]
                ));
            }
        }
    }
}

/// The registry hosts `src` and `dst` name.
fn named_hosts(a: &ConvertArgs) -> Vec<String> {
    [Some(a.src.as_str()), a.dst.as_deref()]
        .into_iter()
        .flatten()
        .filter(|r| r.starts_with("docker://"))
        .filter_map(|r| parse_docker_ref(r).ok())
        .map(|r| r.host)
        .collect()
}

fn registry_client(a: &ConvertArgs) -> Result<Arc<Distribution>> {
    let hosts = named_hosts(a);
    let named: Vec<&str> = hosts.iter().map(String::as_str).collect();
    Ok(Arc::new(Distribution::new(a.registry.options(&named))?))
}

/// Fails fast, before any layer is converted: the destination registry must
/// answer on the scheme in use and grant push access (the source is read
/// first anyway).
fn preflight(a: &ConvertArgs, client: Option<&Arc<Distribution>>) -> Result<()> {
    let (Some(d), None, Some(client)) = (a.dst.as_deref(), &a.output, client) else {
        return Ok(());
    };
    if !d.starts_with("docker://") {
        return Ok(());
    }
    let r = parse_docker_ref(d)?;
    client
        .check_access(&r, true)
        .with_context(|| format!("checking the destination {d} before converting"))
}

/// The destination `a` names, and how to name it in messages.
fn open_dst(
    a: &ConvertArgs,
    client: Option<&Arc<Distribution>>,
    progress: &Arc<Progress>,
) -> Result<(Box<dyn ImageDest>, String)> {
    Ok(match (&a.dst, &a.output) {
        (_, Some(dir)) => {
            let tag = match a.dst.as_deref() {
                Some(d) if d.starts_with("docker://") => parse_docker_ref(d)?.tag,
                Some(d) => OciLayout::parse(d)?.tag,
                None => None,
            };
            let name = format!(
                "oci:{}:{}",
                dir.display(),
                tag.as_deref().unwrap_or("latest")
            );
            let dir = dir.clone();
            (Box::new(OciLayout { dir, tag }), name)
        }
        (Some(d), None) if d.starts_with("docker://") => {
            let log: Arc<LogFn> = {
                let p = progress.clone();
                Arc::new(move |m: &str| p.println(m))
            };
            let tmp = a.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
            let dst = RegistryDest::new(
                client.expect("client").clone(),
                parse_docker_ref(d)?,
                &tmp,
                Some(log),
            )?;
            (Box::new(dst), d.clone())
        }
        (Some(d), None) => (Box::new(OciLayout::parse(d)?), d.clone()),
        (None, None) => bail!("a destination is needed (or --no-push -o <dir>)"),
    })
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let progress = Arc::new(Progress::new(a.json, a.flatten));
    let client = if a.src.starts_with("docker://")
        || a.dst.as_deref().is_some_and(|d| d.starts_with("docker://"))
    {
        Some(registry_client(&a)?)
    } else {
        None
    };
    let src: Box<dyn ImageSource> = if a.src.starts_with("docker://") {
        Box::new(RegistrySource::new(
            client.clone().expect("client"),
            parse_docker_ref(&a.src)?,
        ))
    } else {
        Box::new(OciLayout::parse(&a.src)?)
    };
    let platforms = a.platform.all()?;
    preflight(&a, client.as_ref())?;
    let (dst, dst_name) = open_dst(&a, client.as_ref(), &progress)?;
    let opts = Options {
        algorithm: a.algorithm.into(),
        block_size: a.block_size,
        level: a.level,
        vsize: a.vsize,
        flatten: a.flatten,
        threads: a.threads.max(1),
        observer: Some(progress.clone()),
        media_types: if a.oci || a.referrer {
            MediaTypes::Oci
        } else {
            MediaTypes::Docker
        },
        platforms,
        referrer: a.referrer,
        verity: !a.no_verity,
        ..Default::default()
    };
    let start = Instant::now();
    let report = convert(&*src, &*dst, &opts)
        .with_context(|| format!("converting {} to {dst_name}", a.src))?;
    drop(dst);
    print_report(&a, &report, start.elapsed().as_secs_f64(), &progress);
    Ok(())
}

/// The result, as JSON on stdout (`--json`) or one line.
fn print_report(a: &ConvertArgs, report: &Report, secs: f64, progress: &Progress) {
    let tar_bytes: u64 = report.layers.iter().map(|l| l.tar_bytes).sum();
    if !a.json {
        let line = format!(
            "converted {} layer(s), {} of layer tar in {:.2}s ({}/s): {}",
            report.layers.len(),
            human(tar_bytes),
            secs,
            human((tar_bytes as f64 / secs.max(1e-9)) as u64),
            report.root.digest
        );
        // The result, on a terminal or not.
        match &progress.mp {
            Some(mp) => {
                let _ = mp.println(&line);
            }
            None => eprintln!("{line}"),
        }
        return;
    }
    let layers: Vec<_> = report
        .layers
        .iter()
        .map(|l| {
            json!({
                "index": l.index,
                "sources": l.sources,
                "digest": l.digest,
                "size": l.size,
                "verity": l.verity.as_ref().map(|v| json!({"digest": v.digest, "size": v.size})),
                "source_bytes": l.source_bytes,
                "tar_bytes": l.tar_bytes,
                "entries": l.apply.entries,
                "file_bytes": l.apply.file_bytes,
                "index_entries": l.commit.entries,
                "seconds": l.seconds,
                "apply_seconds": l.apply_seconds,
                "commit_seconds": l.commit_seconds,
            })
        })
        .collect();
    println!(
        "{}",
        json!({
            "digest": report.root.digest,
            "media_type": report.root.media_type,
            "size": report.root.size,
            "manifests": report.manifests.iter().map(|m| &m.digest).collect::<Vec<_>>(),
            "layers": layers,
            "seconds": secs,
            "tar_bytes": tar_bytes,
        })
    );
}
