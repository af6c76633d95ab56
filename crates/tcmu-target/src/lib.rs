//! tcmu-target
