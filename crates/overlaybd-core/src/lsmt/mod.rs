//! LSMT layer files: header/trailer, index, read-only layers, the writable
//! append layer, and commit (compaction).

pub mod commit;
pub mod header;
pub mod ro;
pub mod segment;
pub mod validate;
pub mod writable;

pub use commit::{commit, commit_extents, CommitInfo, CommitInput, CommitOptions};
pub use header::{HeaderTrailer, Uuid};
pub use ro::{RoKind, RoLayer, RoOptions, MAX_RO_INDEX_SIZE};
pub use segment::{Segment, SECTOR};
pub use validate::{check_strict, validate_strict, StrictReport};
pub use writable::{CreateOptions, SealInfo, WritableLayer};
