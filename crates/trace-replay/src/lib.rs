//! trace-replay: record the reads a container makes at start (upstream trace
//! format) and replay them as low-priority prefetch.
//!
//! Filled in by the trace/prefetch issue.
