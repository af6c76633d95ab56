//! snapshotter
