#![no_main]
//! Piece tables: arbitrary bytes give a table or a typed error, never a
//! panic or an allocation beyond the input; a table that parses encodes
//! back to the same bytes, and checking data against it is a verdict, not a
//! panic. The same bytes taken as a blob: its table round-trips, accepts
//! the blob and refuses it with any byte changed.
use obd_remote::verity::{PieceTable, VerityError};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(t) = PieceTable::decode(data) {
        assert_eq!(t.encode(), data);
        let piece = t.piece_size();
        let probe = &data[..data.len().min(piece as usize)];
        let _ = t.verify(0, probe);
        let (o, l) = t.widen(data.len() as u64, probe.len() as u64);
        assert!(o % piece == 0 && o + l <= t.blob_size().max(o));
    }
    let t = PieceTable::build(data, 4096).expect("small blobs fit a table");
    assert_eq!(PieceTable::decode(&t.encode()).as_ref(), Ok(&t));
    if data.is_empty() {
        return;
    }
    t.verify(0, data).expect("a blob matches its own table");
    let at = data[0] as usize * 31 % data.len();
    let mut bad = data.to_vec();
    bad[at] ^= 1;
    assert!(matches!(
        t.verify(0, &bad),
        Err(VerityError::Mismatch { offset, .. }) if offset == at as u64 / 4096 * 4096
    ));
});
