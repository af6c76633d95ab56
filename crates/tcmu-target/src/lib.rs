//! tcmu-target: the frontends that turn an image into a block device — the Linux
//! TCMU handler (hand-written `target_core_user.h` UAPI, UIO ring, SCSI
//! emulation), FUSE file + loop, and ublk — behind one frontend trait.
//!
//! Filled in by the block-device-service issue; the layout is fixed here so the
//! data path stays frontend → image → layer files → sources.
