//! trace-replay
