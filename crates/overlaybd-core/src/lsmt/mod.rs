//! LSMT layer files: header/trailer, index, read-only layers, the writable
//! append layer, and commit (compaction).

pub mod segment;

pub use segment::{Segment, SECTOR};
