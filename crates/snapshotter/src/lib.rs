//! snapshotter: the containerd proxy snapshotter (snapshots v1 gRPC on a unix
//! socket) with remote-snapshot lazy pull of overlaybd layers.
//!
//! Filled in by the snapshotter issue.
