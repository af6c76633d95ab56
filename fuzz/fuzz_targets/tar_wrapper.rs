#![no_main]
//! Tar wrapper detection on arbitrary bytes. Nothing may panic, and a
//! detected payload must lie inside the blob.

use overlaybd_core::tar::detect;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let blob = data.to_vec();
    if let Ok(Some(p)) = detect(&blob) {
        assert!(p.offset + p.size <= blob.len() as u64);
    }
});
