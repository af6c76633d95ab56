//! The TCMU frontend: UAPI, command ring, SCSI emulation, configfs set-up.
