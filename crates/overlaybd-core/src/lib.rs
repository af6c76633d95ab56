//! overlaybd-core: LSMT layer files, the merged index over up to 255 layers, the
//! image stack built from `config.v1.json`, the tar wrapper, and the
//! [`source::LayerSource`] trait with the local-file source. Remote sources
//! (registry, cache, download) live in the `obd-remote` crate.
//!
//! Data flows one way: image → layer files → sources.

pub mod error;
pub mod lsmt;

pub use error::{Context, Error, Result};
pub use zfile::{FileSource, ReadAt, Window};
pub mod config;
pub mod image;
pub mod index;
pub mod regular;
pub mod source;
pub mod tar;
