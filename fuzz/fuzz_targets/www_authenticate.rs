#![no_main]
//! Registry auth parsing: WWW-Authenticate challenges and token responses from
//! arbitrary bytes must parse or fail cleanly.
use obd_remote::auth::{parse_token_response, parse_www_authenticate, Scheme};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let ch = parse_www_authenticate(s);
        let _ = Scheme::from_challenges(&ch);
    }
    let _ = parse_token_response("fuzz", data);
});
