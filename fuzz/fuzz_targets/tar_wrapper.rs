#![no_main]
// Filled in by the owner of this parser.
libfuzzer_sys::fuzz_target!(|_data: &[u8]| {});
