//! Opening the backend a `config.v1.json` describes.

use std::path::Path;
use std::sync::Arc;

use overlaybd_core::config::{resolve, ImageConfig};
use overlaybd_core::image::Image;
use overlaybd_core::lsmt::writable::{CreateOptions, WritableLayer};
use overlaybd_core::source::{LayerSource, LocalFiles};

use crate::backend::ImageBackend;
use crate::{Error, Result};

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
    let mut lower_cfg = cfg.clone();
    lower_cfg.upper = Default::default();
    let mut sources: Vec<&dyn LayerSource> = vec![&LocalFiles];
    sources.extend(remote);
    let lower = Arc::new(Image::open(&lower_cfg, base, &sources).map_err(err)?);
    let mut fresh = false;
    let upper = if cfg.upper.is_writable() {
        let data = resolve(base, &cfg.upper.data);
        let index = resolve(base, &cfg.upper.index);
        let layer = if !data.exists() && !index.exists() {
            fresh = true;
            let vsize = match lower.virtual_size() {
                0 => DEFAULT_VSIZE,
                v => v,
            };
            let opts = CreateOptions {
                virtual_size: vsize,
                ..Default::default()
            };
            WritableLayer::create(&data, &index, opts).map_err(err)?
        } else {
            WritableLayer::open(&data, &index).map_err(err)?
        };
        fresh |= layer.segment_count() == 0;
        Some(layer)
    } else {
        None
    };
    let backend = ImageBackend::new(lower, upper);
    if tcmu_target::BlockBackend::size(&backend) == 0 {
        return Err(Error::Request(format!(
            "{}: the image has size 0 (no layer sets a virtual size)",
            config_path.display()
        )));
    }
    Ok(Opened {
        backend,
        config: cfg,
        fresh_upper: fresh,
    })
}
