//! This node's obd set-up as obd-snapshotter sees it: its config, the
//! service config its device workers read (registry settings, cache), and
//! whether those settings reach an image's blobs. Read by `obd doctor` and
//! by `obd pull`'s check after a pull.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use obd_remote::registry::{RegistryClient, RegistryOptions};
use obd_remote::service::ServiceConfig;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use snapshotter::config::Config;

/// The snapshotter config file read when none is named, if it exists.
pub const DEFAULT_SNAPSHOTTER_CONFIG: &str = "/etc/obd/snapshotter.toml";

/// Test-only: the FUSE device node checked instead of `/dev/fuse` (so a
/// test can show a node without FUSE). Not for production use.
pub const FUSE_DEV_ENV: &str = "OBD_TEST_FUSE_DEV";

/// The FUSE device node: `/dev/fuse`, or [`FUSE_DEV_ENV`]'s value.
pub fn fuse_dev() -> PathBuf {
    std::env::var_os(FUSE_DEV_ENV).map_or_else(|| "/dev/fuse".into(), PathBuf::from)
}

/// The snapshotter's settings on this node.
pub struct Node {
    /// The snapshotter config read (`None`: the built-in defaults).
    pub config_path: Option<PathBuf>,
    /// The snapshotter config.
    pub config: Config,
    /// The service config file the device workers read (it may not exist).
    pub service_path: PathBuf,
    /// The service config in effect (the file's, else the defaults).
    pub service: ServiceConfig,
}

impl Node {
    /// Reads the snapshotter config `explicit`, else
    /// [`DEFAULT_SNAPSHOTTER_CONFIG`] if it exists, else the defaults; and
    /// the service config its workers use (through `obd_device`'s
    /// `Root::load_service_config`, so it follows that one rule).
    pub fn load(explicit: Option<&Path>) -> Result<Node> {
        let config_path = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_SNAPSHOTTER_CONFIG)).filter(|p| p.is_file()),
        };
        let config = match &config_path {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        let root = obd_device::state::Root::new(&config.root);
        let service = match (root.service_config().exists(), &config.service_config) {
            // Not copied into the root yet (the snapshotter copies it at
            // start): what the next start will use.
            (false, Some(p)) => ServiceConfig::load(p)
                .with_context(|| format!("reading the service config {}", p.display()))?,
            _ => root.load_service_config()?,
        };
        Ok(Node {
            service_path: root.service_config(),
            config_path,
            config,
            service,
        })
    }

    /// Where the settings came from, for messages.
    pub fn settings_name(&self) -> String {
        format!(
            "obd-snapshotter's service config {}{}",
            self.service_path.display(),
            if self.service_path.exists() {
                ""
            } else {
                " (absent: defaults)"
            }
        )
    }
}

/// Reads the first bytes of blob `digest` (`size` bytes) of `image` the way
/// a device worker does: the registry client over `registry`, the blob URL
/// the snapshotter writes into `config.v1.json`.
pub fn read_blob_as_worker(
    registry: &RegistryOptions,
    image: &str,
    digest: &str,
    size: u64,
) -> Result<()> {
    let base = snapshotter::obd::repo_blob_url(image)?;
    let mut opts = registry.clone();
    // A check, not a read a container waits on: one try is enough to tell.
    opts.retry.tries = 1;
    let client = RegistryClient::new(opts)?;
    let blob = BlobRef::new(format!("{base}/{digest}"), digest, size);
    client.fetch(&blob, 0, size.clamp(1, 512), Priority::Foreground)?;
    Ok(())
}
