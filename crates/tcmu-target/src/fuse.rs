//! FUSE frontend: the device as one file in a FUSE mount (fuser).
