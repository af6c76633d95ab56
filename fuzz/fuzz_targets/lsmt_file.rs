#![no_main]
//! Opens arbitrary bytes as a read-only LSMT layer; if that succeeds, reads a
//! few ranges and runs strict validation. Nothing may panic.

use overlaybd_core::lsmt::validate::check_strict;
use overlaybd_core::lsmt::RoLayer;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(layer) = RoLayer::from_bytes(data.to_vec()) else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    let extent = layer.extent();
    let mut probes = vec![0u64, 511, extent.saturating_sub(1), extent / 2];
    for s in layer.segments().iter().take(8) {
        probes.push(s.offset * 512);
        probes.push((s.end() * 512).saturating_sub(700));
    }
    for off in probes {
        let _ = layer.read_at(&mut buf, off);
    }
    let _ = check_strict(&layer);
});
