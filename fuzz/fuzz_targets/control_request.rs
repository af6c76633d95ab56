#![no_main]
//! The device control socket's requests: arbitrary bytes, arriving in
//! arbitrary chunks, are framed the same whatever the chunks, never buffer more
//! than `MAX_REQUEST` bytes, and give a request or a `bad request` error; a
//! request that parses round-trips through its own JSON.
//!
//! The first byte steers: its low 6 bits set the chunk size; with the top bit
//! set, the rest is repeated to just around `MAX_REQUEST` bytes (bits 6..7 of
//! the length pick which side of the cap), so the size limit is exercised
//! without huge inputs.
use obd_device::control::{parse_request, Framed, RequestBuf, MAX_REQUEST};

fn frame<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> (Framed, Vec<u8>) {
    let mut r = RequestBuf::default();
    let mut state = Framed::Incomplete;
    for c in chunks {
        state = r.push(c);
        assert!(r.line().len() <= MAX_REQUEST);
        if state == Framed::TooLarge {
            assert!(r.line().is_empty());
        }
    }
    if state == Framed::Incomplete {
        state = r.finish();
    }
    (state, r.line().to_vec())
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&steer, body)) = data.split_first() else {
        return;
    };
    let step = (steer & 0x3f) as usize + 1;
    let owned;
    let body = if steer & 0x80 != 0 && !body.is_empty() {
        let len = MAX_REQUEST - 2 + (steer as usize >> 6 & 1) * 3;
        owned = body.iter().copied().cycle().take(len).collect::<Vec<u8>>();
        &owned[..]
    } else {
        body
    };
    let whole = frame(std::iter::once(body));
    let chunked = frame(body.chunks(step));
    assert_eq!(whole, chunked);
    // The framing rule, said directly: the first line, newline included, may
    // hold MAX_REQUEST bytes; an unterminated one (the client closed) fewer.
    let (state, line) = whole;
    let expected = match body.iter().position(|&b| b == b'\n') {
        Some(i) if i < MAX_REQUEST => (Framed::Complete, &body[..=i]),
        Some(_) => (Framed::TooLarge, &[][..]),
        None if body.len() >= MAX_REQUEST => (Framed::TooLarge, &[][..]),
        None if body.is_empty() => (Framed::Incomplete, &[][..]),
        None => (Framed::Complete, body),
    };
    assert_eq!((state, &line[..]), expected);
    if state == Framed::Complete {
        match parse_request(&line) {
            Ok(op) => {
                let again = serde_json::to_vec(&op).expect("a request serialises");
                assert_eq!(parse_request(&again).expect("own JSON parses"), op);
            }
            Err(e) => assert!(e.starts_with("bad request: "), "{e}"),
        }
    }
});
