#![no_main]
//! config.v1.json parsing: arbitrary bytes must give a config or a typed error,
//! and a parsed config must round-trip through its own JSON.
use overlaybd_core::config::ImageConfig;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = ImageConfig::from_slice(data) {
        let again = ImageConfig::from_slice(cfg.to_json().as_bytes()).expect("own JSON parses");
        assert_eq!(again, cfg);
    }
});
