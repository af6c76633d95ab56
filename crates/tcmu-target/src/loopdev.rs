//! Loop devices over a file: `LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE`, direct I/O.
