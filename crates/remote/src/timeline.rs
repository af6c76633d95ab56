//! An opt-in timeline of a cold start, for diagnosis: with
//! `OBD_FETCH_LOG=<dir>`, each process appends lines to
//! `<dir>/fetch-<pid>.log`, times in microseconds since the Unix epoch:
//! - `<digest> <offset> <len> <priority> <asked> <granted> <done> <ok>` per
//!   registry request;
//! - `dev <offset> <len> <start> <end>` per read a block device served.
//!
//! `bench/coldstart.py` sets it with `BENCH_TIMELINE`; `bench/timeline.py`
//! reads it. Off (one cached check) otherwise.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use zfile::sync::MutexExt;

fn file() -> Option<&'static Mutex<std::fs::File>> {
    static LOG: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let dir = std::path::PathBuf::from(std::env::var_os("OBD_FETCH_LOG")?);
        let p = dir.join(format!("fetch-{}.log", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()?;
        Some(Mutex::new(f))
    })
    .as_ref()
}

/// Whether the timeline is on.
pub fn enabled() -> bool {
    file().is_some()
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// Appends `line` (and a newline) if the timeline is on.
pub fn line(line: &str) {
    if let Some(f) = file() {
        let mut f = f.locked();
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}
