//! obd-device: the device service. It serves images as block devices through the
//! `tcmu-target` frontends, one worker process per device, and keeps their state
//! under a root directory so a restarted service finds (or cleans up) them.
//!
//! - [`backend`]: an image as a [`tcmu_target::BlockBackend`].
//! - [`open`]: config.v1.json → backend (local and registry lowers, writable upper).
//! - [`state`]: the per-device records under `<root>/devices/<id>/`.
//! - [`mount`]: mkfs, mount and unmount of a device's filesystem.
//! - [`worker`]: the process that serves one device.
//! - [`service`]: attach/detach/list over the control socket, and reconciliation.
//! - [`control`]: the control socket's transport: permissions, request size
//!   and time limits, bounded concurrency.

pub mod backend;
pub mod control;
pub mod mount;
pub mod open;
pub mod service;
pub mod state;
pub mod worker;

use std::path::PathBuf;

/// Errors of the device service. Each names the device, file or command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or reading the image failed.
    #[error("image {config}: {source}")]
    Image {
        /// The config.v1.json.
        config: PathBuf,
        /// The cause.
        #[source]
        source: overlaybd_core::error::Error,
    },
    /// A frontend failed.
    #[error("frontend {frontend}: {source}")]
    Frontend {
        /// `fuse`, `tcmu`, …
        frontend: String,
        /// The cause.
        #[source]
        source: tcmu_target::Error,
    },
    /// A file or system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An external command (mkfs, mount) failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status and stderr.
        detail: String,
    },
    /// A request that cannot be served (unknown device, bad option).
    #[error("{0}")]
    Request(String),
    /// The service is not running or answered badly.
    #[error("device service at {socket}: {detail}")]
    Service {
        /// The control socket.
        socket: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A device's worker failed to bring it up (its `failed:<reason>`).
    #[error("attach failed: {0}")]
    AttachFailed(String),
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The frontend called `name`.
pub fn frontend(name: &str) -> Result<Box<dyn tcmu_target::Frontend>> {
    match name {
        "fuse" => Ok(Box::new(tcmu_target::fuse::FuseFrontend::default())),
        "tcmu" => Ok(Box::new(tcmu_target::tcmu::TcmuFrontend::default())),
        other => Err(Error::Request(format!(
            "unknown frontend {other:?} (this build has: fuse, tcmu)"
        ))),
    }
}
