#![no_main]
//! The TOML service config: arbitrary text gives a config or a typed error.
use obd_remote::service::ServiceConfig;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = ServiceConfig::from_toml(s);
    }
});
