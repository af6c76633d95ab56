//! The host-wide block cache: origin scopes (no cross-registry poisoning),
//! cleanup of the per-device caches of earlier versions, collection of unused
//! blobs, and a full file system (reads keep working, the cache recovers).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fixtures::random_bytes;
use obd_remote::blob::{RemoteBlob, RemoteOptions};
use obd_remote::cache::{BlockCache, CacheOptions};
use obd_remote::sched::Scheduler;
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::{ReadAt, Result};

const DIGEST: &str = "sha256:c0ffee0000000000000000000000000000000000000000000000000000000000";

/// Serves fixed bytes and counts the bytes it served.
struct Src {
    data: Vec<u8>,
    served: Mutex<u64>,
}

impl Src {
    fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            data,
            served: Mutex::new(0),
        })
    }
    fn served(&self) -> u64 {
        *self.served.lock().unwrap()
    }
}

impl RangeFetcher for Src {
    fn fetch(&self, _: &BlobRef, offset: u64, len: u64, _: Priority) -> Result<Vec<u8>> {
        *self.served.lock().unwrap() += len;
        Ok(self.data[offset as usize..(offset + len) as usize].to_vec())
    }
    fn blob_size(&self, _: &str) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
}

fn blob(host_repo: &str, src: &Arc<Src>, cache: &Arc<BlockCache>) -> RemoteBlob {
    RemoteBlob::new(
        BlobRef::new(
            {
                let (host, repo) = host_repo.split_once('/').unwrap();
                format!("https://{host}/v2/{repo}/blobs/{DIGEST}")
            },
            DIGEST,
            src.data.len() as u64,
        ),
        Arc::clone(src) as Arc<dyn RangeFetcher>,
        Arc::clone(cache),
        Arc::new(Scheduler::new(4)),
        RemoteOptions::default(),
    )
    .unwrap()
}

fn read_all(b: &RemoteBlob) -> Vec<u8> {
    let mut v = vec![0u8; b.size() as usize];
    b.read_exact_at(&mut v, 0).unwrap();
    v
}

#[test]
fn bytes_one_registry_served_never_reach_a_reader_of_another() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlockCache::open(CacheOptions::new(dir.path())).unwrap();
    let honest = random_bytes(1, 1 << 20);
    let mut evil = honest.clone();
    evil[5000] ^= 0xff;
    let (good, bad) = (Src::new(honest.clone()), Src::new(evil.clone()));
    // The lying registry is read first and fills its own scope.
    assert_eq!(read_all(&blob("evil.example/lib/base", &bad, &cache)), evil);
    // A reader of the honest registry never sees those bytes.
    assert_eq!(
        read_all(&blob("good.example/lib/base", &good, &cache)),
        honest
    );
    assert_eq!(good.served(), 1 << 20);
    // Each origin is cached once: a second reader of each fetches nothing.
    assert_eq!(
        read_all(&blob("good.example/lib/base", &good, &cache)),
        honest
    );
    assert_eq!(read_all(&blob("evil.example/lib/base", &bad, &cache)), evil);
    assert_eq!((good.served(), bad.served()), (1 << 20, 1 << 20));
    // A reader whose bytes are checked against a piece table uses the one
    // shared entry, never an origin's unchecked bytes.
    let mut verified = blob("good.example/lib/base", &good, &cache).blob().clone();
    verified.verity = Some(Arc::new(
        obd_remote::verity::PieceTable::build(&honest[..], 64 << 10).unwrap(),
    ));
    let checked = RemoteBlob::new(
        verified,
        Arc::clone(&good) as Arc<dyn RangeFetcher>,
        Arc::clone(&cache),
        Arc::new(Scheduler::new(4)),
        RemoteOptions::default(),
    )
    .unwrap();
    assert_eq!(read_all(&checked), honest);
    assert_eq!(good.served(), 2 << 20, "the shared entry starts empty");
    let scopes: Vec<_> = cache.list().unwrap().into_iter().map(|b| b.scope).collect();
    assert!(scopes.contains(&None), "{scopes:?}");
    assert_eq!(
        scopes.len(),
        3,
        "one entry per origin, one shared: {scopes:?}"
    );
}

#[test]
fn open_removes_the_per_device_caches_of_earlier_versions() {
    let dir = tempfile::tempdir().unwrap();
    for id in ["s1", "s7"] {
        let d = dir.path().join(id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("LOCK"), b"").unwrap();
        std::fs::write(d.join("sha256_ab.data"), vec![1u8; 100_000]).unwrap();
        std::fs::write(d.join("sha256_ab.meta"), b"old").unwrap();
    }
    // Not ours: a directory without the old layout's LOCK stays.
    std::fs::create_dir_all(dir.path().join("keep")).unwrap();
    let cache = BlockCache::open(CacheOptions::new(dir.path())).unwrap();
    assert!(!dir.path().join("s1").exists() && !dir.path().join("s7").exists());
    assert!(dir.path().join("keep").exists());
    assert_eq!(cache.usage(), 0);
}

#[test]
fn gc_removes_only_unused_unkept_blobs_past_their_grace() {
    let dir = tempfile::tempdir().unwrap();
    let src = Src::new(random_bytes(3, 300_000));
    {
        let cache = BlockCache::open(CacheOptions::new(dir.path())).unwrap();
        read_all(&blob("r.example/a", &src, &cache));
    }
    let cache = BlockCache::open(CacheOptions::new(dir.path())).unwrap();
    assert_eq!(cache.usage(), 300_000);
    // Within its grace period, or kept by a snapshot: stays.
    let r = cache.gc(&|_| false, Duration::from_secs(3600)).unwrap();
    assert!(r.removed.is_empty());
    let r = cache.gc(&|d| d == DIGEST, Duration::ZERO).unwrap();
    assert!(r.removed.is_empty());
    // In use by another "process" (another open of the directory): stays.
    let other = BlockCache::open(CacheOptions::new(dir.path())).unwrap();
    let b = blob("r.example/a", &src, &other);
    assert!(cache
        .gc(&|_| false, Duration::ZERO)
        .unwrap()
        .removed
        .is_empty());
    drop(b);
    drop(other);
    let r = cache.gc(&|_| false, Duration::ZERO).unwrap();
    assert_eq!((r.removed, r.bytes), (vec![DIGEST.to_string()], 300_000));
    assert_eq!(cache.usage(), 0);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sha256"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_full_file_system_passes_reads_through_and_the_cache_recovers() {
    // A small loop-mounted ext4 (skipped loudly without root or loop devices).
    let Some(fs) = fixtures::smallfs::SmallFs::new("cache_full_disk", 32) else {
        return;
    };
    let dir = fs.path().join("cache");
    let cache = BlockCache::open(CacheOptions {
        budget: 1 << 30,
        ..CacheOptions::new(&dir)
    })
    .unwrap();
    // Fill the file system but for ~1 MiB.
    fs.fill_leaving(1 << 20);
    let data = random_bytes(5, 4 << 20);
    let src = Src::new(data.clone());
    let b = blob("r.example/full", &src, &cache);
    // Every read is right although most of it cannot be cached.
    assert_eq!(read_all(&b), data);
    assert!(cache.skipped_full() > 0, "no insert met the full disk");
    assert!(cache.usage() < 2 << 20);
    let before = src.served();
    // Space frees: once the pause is over, inserts resume and the blob is
    // cached whole; a read after that fetches nothing.
    fs.free();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while cache.usage() < data.len() as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cache did not recover"
        );
        read_all(&b);
    }
    let after = src.served();
    assert_eq!(read_all(&b), data);
    assert_eq!(src.served(), after);
    assert!(after > before);
}

/// Openers that find a new cache directory at the same moment all open it:
/// the first one's recovery removes stray temporary files, and the state
/// file another opener was about to link in is one of them while it is not
/// yet linked (each attempt has its own temporary name, so threads of one
/// process do not collide either).
#[test]
fn openers_racing_on_a_new_directory_all_open_it() {
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..40 {
        let dir = tmp.path().join(format!("cache-{round}"));
        let start = std::sync::Barrier::new(6);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        BlockCache::open(CacheOptions::new(&dir)).map(drop)
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap().unwrap();
            }
        });
    }
}
