#![no_main]
//! Parses arbitrary bytes as a ZFile header/trailer block. Nothing may panic, and a
//! block that parses must re-encode to the same fields.

use zfile::header::block_digest;
use zfile::{is_zfile, Header};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = is_zfile(data);
    let _ = block_digest(data);
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let enc = h.encode();
    let again = Header::parse(&enc).expect("an encoded header parses");
    assert!(is_zfile(&enc) == h.is_header());
    if h.has_digest() {
        // `encode` recomputes the digest.
        assert_eq!(block_digest(&enc), Some(again.digest));
        assert_eq!(
            again,
            Header {
                digest: again.digest,
                ..h
            }
        );
    } else {
        assert_eq!(again, h);
    }
});
