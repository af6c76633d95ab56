//! The snapshotter's TOML configuration.
//!
//! ```toml
//! # Metadata (metadata.db) and snapshot directories (snapshots/<id>/).
//! root = "/var/lib/containerd/io.containerd.snapshotter.v1.obd"
//! # gRPC unix socket containerd connects to ([proxy_plugins.obd] address).
//! address = "/run/obd-snapshotter/obd.sock"
//! # error | warn | info | debug | trace (RUST_LOG overrides it).
//! log_level = "info"
//! # Writable layer of a container on an obd image: overlayfs | dir | dev.
//! rw_mode = "overlayfs"
//! # Remote-snapshot handshake for overlaybd layers (lazy pull).
//! lazy_pull = true
//! # Block device frontend for obd images: fuse (FUSE file + loop) | tcmu.
//! device_frontend = "fuse"
//! # Registry/cache settings of lazily pulled layers (overlaybd-core's
//! # service TOML); unset: `<root>/devices/service.toml` if present, else
//! # built-in defaults.
//! # service_config = "/etc/obd/service.toml"
//! # Prometheus endpoint (`GET /metrics`); unset: none.
//! # metrics_address = "127.0.0.1:9863"
//! # text | json (one JSON object per line).
//! log_format = "text"
//! # Serve CRI's ImageService here (kubelet --image-service-endpoint), so
//! # pull secrets reach lazy reads; unset: no proxy.
//! # cri_image_address = "/run/obd-snapshotter/cri-image.sock"
//! # containerd's CRI socket, where the proxy forwards.
//! cri_runtime_address = "/run/containerd/containerd.sock"
//! ```
//! Every key is optional; the values above are the defaults. The
//! upstream spellings `rwMode` and `verbose` are accepted too.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default `root`.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.obd";
/// Default `address`.
pub const DEFAULT_ADDRESS: &str = "/run/obd-snapshotter/obd.sock";

/// How a container's writable layer is stored on an obd image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RwMode {
    /// overlayfs upper on the host over the read-only image device.
    #[default]
    Overlayfs,
    /// A private writable device, mounted and bound into the container.
    Dir,
    /// A private writable device, returned unmounted (VMs).
    Dev,
}

/// The configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Metadata and snapshot directories.
    pub root: PathBuf,
    /// gRPC unix socket.
    pub address: PathBuf,
    /// Log level.
    #[serde(alias = "verbose")]
    pub log_level: String,
    /// Writable layer mode.
    #[serde(alias = "rwMode")]
    pub rw_mode: RwMode,
    /// Remote-snapshot handshake for overlaybd layers.
    #[serde(alias = "lazyPull")]
    pub lazy_pull: bool,
    /// Block device frontend (`fuse` or `tcmu`).
    pub device_frontend: String,
    /// Registry service config for lazily pulled layers.
    pub service_config: Option<PathBuf>,
    /// Prometheus endpoint address (`host:port`).
    pub metrics_address: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Attach an image's device when a pull commits its acceleration layer
    /// (the recorded trace), so the prefetch runs before the container
    /// starts (overlayfs `rw_mode` only).
    pub prefetch_at_pull: bool,
    /// Seconds a device attached at pull waits for its first container
    /// before a sweep may release it.
    pub prefetch_hold_secs: u64,
    /// Read an acceleration layer's page-cache warm list through the
    /// image's mount when its device is mounted.
    pub warm_page_cache: bool,
    /// Seconds an image's device stays attached (with its page cache) after
    /// its last container is gone; 0: released with the last container.
    pub device_idle_secs: u64,
    /// Open each lazily pulled layer (fetch its ends, index and piece table
    /// into the block cache) when the pull commits it, not when the image's
    /// device is attached.
    pub open_layers_at_commit: bool,
    /// Socket of the CRI image-service proxy ([`crate::cri`]); none if unset.
    pub cri_image_address: Option<PathBuf>,
    /// containerd's CRI socket, where the proxy forwards.
    pub cri_runtime_address: PathBuf,
}

/// Default `cri_runtime_address`.
pub const DEFAULT_CRI_RUNTIME_ADDRESS: &str = "/run/containerd/containerd.sock";

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            log_level: "info".into(),
            rw_mode: RwMode::Overlayfs,
            lazy_pull: true,
            device_frontend: "fuse".into(),
            service_config: None,
            metrics_address: None,
            log_format: LogFormat::Text,
            prefetch_at_pull: true,
            prefetch_hold_secs: 600,
            warm_page_cache: true,
            open_layers_at_commit: true,
            device_idle_secs: 600,
            cri_image_address: None,
            cri_runtime_address: DEFAULT_CRI_RUNTIME_ADDRESS.into(),
        }
    }
}

impl Config {
    /// Reads a TOML file (a regular file of at most
    /// [`overlaybd_core::regular::MAX_CONFIG_SIZE`] bytes).
    pub fn load(path: &Path) -> Result<Self> {
        use overlaybd_core::regular;
        let text = regular::read_to_string(path, regular::MAX_CONFIG_SIZE, "snapshotter config")
            .map_err(|e| Error::Config {
                path: path.into(),
                // The message names the path already.
                msg: match e {
                    overlaybd_core::Error::InFile { inner, .. } => inner.to_string(),
                    e => e.to_string(),
                },
            })?;
        Self::parse(&text).map_err(|msg| Error::Config {
            path: path.into(),
            msg,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_aliases() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.root, Path::new(DEFAULT_ROOT));
        assert_eq!(c.rw_mode, RwMode::Overlayfs);
        assert!(c.lazy_pull);
        assert_eq!(c.device_frontend, "fuse");
        let c = Config::parse("rwMode = \"dir\"\nroot = \"/x\"\nverbose = \"debug\"").unwrap();
        assert_eq!(c.rw_mode, RwMode::Dir);
        assert_eq!(c.log_level, "debug");
        assert!(Config::parse("rw_mode = \"bogus\"").is_err());
        assert!(Config::parse("nope = 1").is_err());
    }

    #[test]
    fn example_file_is_the_defaults() {
        let c = Config::parse(include_str!("../obd-snapshotter.toml")).unwrap();
        let d = Config::default();
        assert_eq!(
            (c.root, c.address, c.log_level),
            (d.root, d.address, d.log_level)
        );
        assert_eq!((c.rw_mode, c.lazy_pull), (d.rw_mode, d.lazy_pull));
        assert_eq!(
            (
                c.prefetch_at_pull,
                c.prefetch_hold_secs,
                c.warm_page_cache,
                c.open_layers_at_commit,
                c.device_idle_secs
            ),
            (
                d.prefetch_at_pull,
                d.prefetch_hold_secs,
                d.warm_page_cache,
                d.open_layers_at_commit,
                d.device_idle_secs
            )
        );
        assert_eq!(
            (c.cri_image_address, c.cri_runtime_address),
            (d.cri_image_address, d.cri_runtime_address)
        );
        assert_eq!(
            (
                c.device_frontend,
                c.service_config,
                c.metrics_address,
                c.log_format
            ),
            (
                d.device_frontend,
                d.service_config,
                d.metrics_address,
                d.log_format
            )
        );
    }
}
