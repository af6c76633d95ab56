//! snapshotter: the containerd proxy snapshotter of obd.
//!
//! - [`service`]: containerd's snapshots v1 gRPC service (generated at build
//!   time from containerd's own protos in `vendor/proto/`) on a unix socket;
//!   one key space (containerd's keys carry their namespace).
//! - [`snapshotter`]: plain OCI layers behave like containerd's overlayfs
//!   snapshotter (`<root>/snapshots/<id>/{fs,work}`, overlay/bind mounts).
//! - [`meta`]: crash-safe metadata in redb, one write transaction per change.
//! - [`layer`]: the classification hook where overlaybd layers take the
//!   remote-snapshot (lazy pull) path.
//! - [`config`]: the TOML configuration of `obd-snapshotter`.
//! - [`logging`]: the tracing subscriber of obd's binaries.
//! - [`cri`]: the CRI image-service proxy that hands pull secrets to lazy
//!   reads.

pub mod ahead;
pub mod config;
pub mod cri;
pub mod error;
pub mod filter;
pub mod layer;
pub mod logging;
pub mod meta;
pub mod metrics;
pub mod obd;
pub mod pull;
pub mod service;
pub mod snapshotter;

pub use error::{Error, Result};
pub use snapshotter::Snapshotter;

/// Code generated from containerd's protos (module tree mirrors the proto
/// packages, as the generated code requires).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// `runtime.v1`: Kubernetes' CRI (server and client).
    pub mod runtime {
        /// `runtime.v1`
        pub mod v1 {
            tonic::include_proto!("runtime.v1");
        }
    }
    /// `containerd.*`
    pub mod containerd {
        /// `containerd.types`
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// `containerd.services`
        pub mod services {
            /// `containerd.services.snapshots`
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
            /// `containerd.services.content` (client)
            pub mod content {
                /// `containerd.services.content.v1`
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            /// `containerd.services.images` (client)
            pub mod images {
                /// `containerd.services.images.v1`
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            /// `containerd.services.leases` (client)
            pub mod leases {
                /// `containerd.services.leases.v1`
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
            /// `containerd.services.diff` (client)
            pub mod diff {
                /// `containerd.services.diff.v1`
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
        }
    }
}
