//! Replay over remote layers: every fetch it causes is admitted at
//! `Priority::Prefetch` (the advice goes first and fills the cache; the read
//! that follows hits it), so a container's own reads always go first.

mod common;
use common::replay_all;

use std::sync::{Arc, Mutex};

use obd_remote::blob::{RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::sched::Scheduler;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::image::Image;
use overlaybd_core::source::Blob;
use overlaybd_core::Result;
use trace_replay::Trace;
use zfile::ReadAt;

/// Serves a blob from memory and logs each fetch's priority.
struct Fake {
    data: Vec<u8>,
    calls: Mutex<Vec<(u64, u64, Priority)>>,
}

impl RangeFetcher for Fake {
    fn fetch(&self, _: &BlobRef, offset: u64, len: u64, prio: Priority) -> Result<Vec<u8>> {
        self.calls.lock().unwrap().push((offset, len, prio));
        Ok(self.data[offset as usize..(offset + len) as usize].to_vec())
    }
    fn blob_size(&self, _: &str) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
}

#[test]
fn replay_fetches_at_prefetch_priority_only() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlockCache::open(CacheOptions::new(dir.path())).unwrap();
    let sched = Arc::new(Scheduler::new(4));
    let mut fakes = Vec::new();
    let mut blobs: Vec<(String, Blob)> = Vec::new();
    for i in 0..3 {
        let p = fixtures::interop().join(format!("stack-lz4/layer{i}.overlaybd.tar"));
        let fake = Arc::new(Fake {
            data: std::fs::read(&p).unwrap(),
            calls: Mutex::new(Vec::new()),
        });
        let digest = format!("sha256:{:064x}", i + 1);
        let blob = RemoteBlob::new(
            BlobRef {
                url: format!("https://registry.test/v2/r/blobs/{digest}"),
                digest,
                size: fake.data.len() as u64,
                verity: None,
            },
            fake.clone() as Arc<dyn RangeFetcher>,
            cache.clone(),
            sched.clone(),
            RemoteOptions {
                min_fetch: 64 << 10,
                max_request: 256 << 10,
            },
        )
        .unwrap();
        blobs.push((format!("layer{i}"), Arc::new(blob)));
        fakes.push(fake);
    }
    let img = Image::from_blobs(blobs).unwrap();
    // Opening read headers and indexes in the foreground; only replay counts.
    for f in &fakes {
        f.calls.lock().unwrap().clear();
    }
    let mut t = Trace::default();
    for (l, layer) in img.layers().iter().enumerate() {
        let size = layer.lsmt.source().size();
        for k in 0..8u64 {
            t.push_read(l as u32, ((size / 9) * k) as i64, 8192);
        }
    }
    let readers = img.layer_readers();
    let layers: Vec<&dyn ReadAt> = readers.iter().map(|b| &**b as &dyn ReadAt).collect();
    let report = replay_all(&t, &layers);
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.done, report.requests);
    let calls: Vec<_> = fakes
        .iter()
        .flat_map(|f| f.calls.lock().unwrap().clone())
        .collect();
    assert!(!calls.is_empty(), "the replay fetched something");
    assert!(calls.iter().all(|c| c.2 == Priority::Prefetch), "{calls:?}");
    assert!(
        sched.granted(Priority::Foreground) > 0,
        "the open was foreground"
    );
}
