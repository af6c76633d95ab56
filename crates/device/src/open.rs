//! Opening the backend a `config.v1.json` describes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use overlaybd_core::config::{resolve, Download, ImageConfig};
use overlaybd_core::image::{Image, OpenOptions, ReadObserver};
use overlaybd_core::source::{LayerSource, LocalFiles};

use crate::backend::ImageBackend;

use crate::{Error, Result};
/// The trace crate, whose types [`TracePlan`] carries.
pub use trace_replay;

/// Default device size of an image with no lowers and a fresh upper (64 GiB, as
/// upstream's `overlaybd-create`).
pub const DEFAULT_VSIZE: u64 = 64 << 30;

/// What [`open_image`] made.
pub struct Opened {
    /// The backend to serve.
    pub backend: ImageBackend,
    /// The parsed config.
    pub config: ImageConfig,
    /// True when the upper was created now or holds no data: a fresh writable
    /// layer (mkfs applies when it also has no lowers).
    pub fresh_upper: bool,
    /// What the image's trace file asks for (record, replay, priority list).
    pub trace: TracePlan,
}

/// What the trace file of an image (`recordTracePath`, or `<dir>/trace` of an
/// acceleration layer) asks the worker to do (formats §5.1).
pub enum TracePlan {
    /// No trace file, or it could not be used (a warning was printed).
    None,
    /// Recording: the recorder already observes the image's layer reads; the
    /// worker watches its lock file and finishes it when the device goes.
    Record(Arc<trace_replay::Recorder>),
    /// Replaying a binary trace once the device is up.
    Replay {
        /// The trace file.
        path: PathBuf,
        /// Its records.
        trace: trace_replay::Trace,
    },
    /// A priority list (paths to prefetch).
    PriorityList {
        /// The list file.
        path: PathBuf,
        /// Its entries.
        entries: Vec<trace_replay::PriorityEntry>,
    },
}

impl std::fmt::Debug for TracePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TracePlan::None => f.write_str("None"),
            TracePlan::Record(r) => write!(f, "Record({})", r.path().display()),
            TracePlan::Replay { path, trace } => {
                write!(
                    f,
                    "Replay({}, {} records)",
                    path.display(),
                    trace.records.len()
                )
            }
            TracePlan::PriorityList { path, entries } => {
                write!(
                    f,
                    "PriorityList({}, {} paths)",
                    path.display(),
                    entries.len()
                )
            }
        }
    }
}

/// The trace file of `cfg`: `recordTracePath`, or the `trace` file in the
/// acceleration layer's (last lower's) `dir`. The flag is true for the latter.
pub fn trace_file(cfg: &ImageConfig, base: Option<&Path>) -> Option<(PathBuf, bool)> {
    if !cfg.record_trace_path.is_empty() {
        return Some((resolve(base, &cfg.record_trace_path), false));
    }
    let last = cfg.trace_lower()?;
    (!last.dir.is_empty()).then(|| (resolve(base, &last.dir).join("trace"), true))
}

fn warn_trace(path: &Path, what: &str) {
    tracing::warn!("obd device: trace {}: {what}", path.display());
}

/// Opens `config_path`: lowers through `remote` (after local files), the
/// writable upper created if both its files are missing.
pub fn open_image(config_path: &Path, remote: Option<&dyn LayerSource>) -> Result<Opened> {
    let err = |source| Error::Image {
        config: config_path.to_owned(),
        source,
    };
    let cfg = ImageConfig::load(config_path).map_err(err)?;
    let base = config_path.parent();
    let mut open_cfg = cfg.clone();
    let trace = trace_file(&cfg, base);
    let mode = trace
        .as_ref()
        .map_or(trace_replay::Mode::Disabled, |(p, _)| {
            trace_replay::detect_mode(p).unwrap_or_else(|e| {
                warn_trace(p, &format!("ignored: {e}"));
                trace_replay::Mode::Disabled
            })
        });
    let recording = mode == trace_replay::Mode::Record && trace.as_ref().is_some_and(|t| !t.1);
    if recording {
        // Upstream: no background download while recording, so the trace sees
        // the reads the container makes, not a local copy's.
        open_cfg.download = Some(Download {
            enable: false,
            ..cfg.download.clone().unwrap_or_default()
        });
    }
    let mut sources: Vec<&dyn LayerSource> = vec![&LocalFiles];
    sources.extend(remote);
    let opts = OpenOptions {
        create_upper: Some(DEFAULT_VSIZE),
    };
    let mut image = Image::open_with(&open_cfg, base, &sources, opts).map_err(err)?;
    if image.virtual_size() == 0 {
        return Err(Error::Request(format!(
            "{}: the image has size 0 (no layer sets a virtual size)",
            config_path.display()
        )));
    }
    let plan = trace_plan(
        &mut image,
        trace.as_ref().map(|t| t.0.as_path()),
        mode,
        recording,
    );
    Ok(Opened {
        fresh_upper: image.upper_entries() == Some(0),
        backend: ImageBackend::new(Arc::new(image)),
        config: cfg,
        trace: plan,
    })
}

/// What the trace file `trace` (in `mode`) asks for; when `recording`, the
/// recorder is started and observes `image`'s layer reads.
fn trace_plan(
    image: &mut Image,
    trace: Option<&Path>,
    mode: trace_replay::Mode,
    recording: bool,
) -> TracePlan {
    let Some(p) = trace else {
        return TracePlan::None;
    };
    match mode {
        trace_replay::Mode::Record if recording => match trace_replay::Recorder::start(p) {
            Ok(r) => {
                image.set_observer(Some(r.clone() as Arc<dyn ReadObserver>));
                TracePlan::Record(r)
            }
            Err(e) => {
                warn_trace(p, &format!("not recording: {e}"));
                TracePlan::None
            }
        },
        trace_replay::Mode::Record => {
            warn_trace(
                p,
                "the acceleration layer's trace is empty; nothing to replay",
            );
            TracePlan::None
        }
        trace_replay::Mode::Replay => match trace_replay::Trace::read_file(p) {
            Ok(trace) => TracePlan::Replay {
                path: p.to_owned(),
                trace,
            },
            Err(e) => {
                warn_trace(p, &format!("not replayed: {e}"));
                TracePlan::None
            }
        },
        trace_replay::Mode::PriorityList => match trace_replay::mode::read_priority_list(p) {
            Ok(entries) => TracePlan::PriorityList {
                path: p.to_owned(),
                entries,
            },
            Err(e) => {
                warn_trace(p, &format!("ignored: {e}"));
                TracePlan::None
            }
        },
        trace_replay::Mode::Disabled => TracePlan::None,
    }
}
