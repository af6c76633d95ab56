//! Helpers shared by the trace-replay tests.

use std::sync::atomic::AtomicBool;

use trace_replay::{replay, ReplayOptions, ReplayReport, Trace};
use zfile::ReadAt;

/// Replays `trace` over `layers` with the default options, never stopped.
pub fn replay_all(trace: &Trace, layers: &[&dyn ReadAt]) -> ReplayReport {
    replay(
        trace,
        layers,
        &ReplayOptions::default(),
        &AtomicBool::new(false),
    )
}
