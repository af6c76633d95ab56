//! Property tests of the trace format and the priority-list parser.

use proptest::prelude::*;
use trace_replay::{parse_priority_list, Record, Trace, HEADER_SIZE, RECORD_SIZE};

fn record() -> impl Strategy<Value = Record> {
    (
        prop_oneof![Just(b'R'), Just(b'W'), any::<u8>()],
        any::<u32>(),
        any::<i64>(),
        any::<u64>(),
    )
        .prop_map(|(op, layer, offset, count)| Record {
            op,
            layer,
            offset,
            count,
        })
}

proptest! {
    #[test]
    fn serialize_then_parse_is_identity(records in prop::collection::vec(record(), 0..64)) {
        let t = Trace { records };
        let bytes = t.to_bytes();
        prop_assert_eq!(bytes.len(), HEADER_SIZE + RECORD_SIZE * t.records.len());
        let back = Trace::parse(&bytes).unwrap();
        prop_assert_eq!(&back, &t);
        prop_assert_eq!(back.to_bytes(), bytes);
    }

    #[test]
    fn any_single_byte_change_is_rejected(
        records in prop::collection::vec(record(), 1..16),
        pos in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let t = Trace { records };
        let mut bytes = t.to_bytes();
        let i = pos.index(bytes.len());
        bytes[i] ^= flip;
        // Header padding (4..8, 20..24) is not checked upstream either.
        let in_header_padding = (4..8).contains(&i) || (20..24).contains(&i);
        match Trace::parse(&bytes) {
            Ok(p) => prop_assert!(in_header_padding && p == t, "byte {} accepted", i),
            Err(_) => prop_assert!(!in_header_padding),
        }
    }

    #[test]
    fn truncation_or_garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..200), cut in 0usize..200) {
        let _ = Trace::parse(&data);
        let good = Trace { records: vec![Record::read(1, 2, 3); 4] }.to_bytes();
        let cut = cut.min(good.len());
        prop_assert_eq!(Trace::parse(&good[..cut]).is_ok(), cut == good.len());
    }

    #[test]
    fn split_reads_cover_exactly(layer in 0u32..255, offset in 0i64..(1 << 40), count in 0u64..(20 << 20)) {
        let mut t = Trace::default();
        t.push_read(layer, offset, count);
        prop_assert_eq!(t.total_bytes(), count);
        let mut at = offset;
        for r in &t.records {
            prop_assert!(r.count > 0 && r.count <= 1 << 20);
            prop_assert_eq!(r.offset, at);
            at += r.count as i64;
        }
    }

    #[test]
    fn priority_lists_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(entries) = parse_priority_list(&data) {
            for e in entries {
                prop_assert!(e.path.starts_with('/'));
            }
        }
    }

    #[test]
    fn priority_list_of_paths_parses_back(paths in prop::collection::vec(("[a-z0-9_.]{1,8}", any::<bool>()), 1..20)) {
        let text: String = paths
            .iter()
            .map(|(p, dir)| format!("/x/{p}{}\n", if *dir { "/" } else { "" }))
            .collect();
        let entries = parse_priority_list(text.as_bytes()).unwrap();
        prop_assert_eq!(entries.len(), paths.len());
        for (e, (p, dir)) in entries.iter().zip(&paths) {
            prop_assert_eq!(&e.path, &format!("/x/{p}"));
            prop_assert_eq!(e.whole_dir, *dir);
        }
    }
}
