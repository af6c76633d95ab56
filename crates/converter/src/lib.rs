//! converter: OCI image → obd image in user space (libext2fs through FFI into an
//! LSMT writable layer per OCI layer), registry to registry.
//!
//! Filled in by the converter issue.
