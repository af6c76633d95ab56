#![no_main]
//! Trace files, priority lists, page-cache warm lists and acceleration-layer
//! tars: arbitrary bytes must give a value or a typed error; a parsed trace
//! must serialise back to the same bytes when its record padding was zero,
//! and always re-parse to the same records; a parsed warm list re-parses
//! from its own bytes to itself; an acceleration layer's files are top-level
//! names, at most the cap, and the writer's tar of a `trace` reads back to it.
use trace_replay::accel::{accel_layer_tar, read_accel_layer, MAX_ACCEL_FILES};
use trace_replay::warm::WarmList;
use trace_replay::{parse_priority_list, Trace, HEADER_SIZE, RECORD_SIZE};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Trace::parse(data) {
        let bytes = t.to_bytes();
        assert_eq!(bytes.len(), data.len());
        assert_eq!(Trace::parse(&bytes).expect("own bytes parse"), t);
        let padding_zero = data[HEADER_SIZE..]
            .chunks_exact(RECORD_SIZE)
            .all(|r| r[1..4] == [0, 0, 0]);
        let header_padding_zero = data[4..8] == [0; 4] && data[20..24] == [0; 4];
        if padding_zero && header_padding_zero {
            assert_eq!(bytes, data);
        }
        let sizes = [1u64 << 20, 1 << 30, u64::MAX];
        let (reqs, _) = trace_replay::plan(&t.records, &sizes, 4 << 20);
        assert!(reqs.iter().all(|r| r.len > 0 && r.len <= 4 << 20));
    }
    if let Ok(w) = WarmList::parse(data) {
        assert_eq!(WarmList::parse(&w.to_bytes()).expect("own bytes parse"), w);
        assert!(w
            .files
            .iter()
            .all(|f| !f.path.starts_with('/') && f.path.split('/').all(|c| c != "..")));
    }
    if let Ok(files) = read_accel_layer(data) {
        assert!(!files.is_empty() && files.len() <= MAX_ACCEL_FILES);
        assert!(files
            .iter()
            .all(|f| !f.name.is_empty() && !f.name.contains('/') && f.name != ".."));
        assert!(files.iter().map(|f| f.body.len()).sum::<usize>() <= data.len());
    }
    let tar = accel_layer_tar(data, None).expect("in-memory tar");
    assert_eq!(read_accel_layer(&tar).expect("own tar")[0].body, data);
    if let Ok(entries) = parse_priority_list(data) {
        assert!(entries.iter().all(|e| e.path.starts_with('/')));
    }
});
